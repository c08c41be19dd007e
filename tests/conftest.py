import os
import sys
from pathlib import Path

import pytest
import torch

# Subprocesses find the environment's console scripts (ray, mlflow, betadiff) even when it is not activated,
# as in `.venv/bin/python -m pytest`.
os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"


@pytest.fixture(autouse=True)
def _isolated_environment():
    """Each test starts from the session's environment: e.g. mlflow.set_tracking_uri() exports
    MLFLOW_TRACKING_URI, which would send a later test's subprocess runs into an earlier test's store."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
    if "mlflow" in sys.modules:
        try:
            from mlflow.tracking._tracking_service import utils as _u
            _u._tracking_uri = None
        except (ImportError, AttributeError):
            pass


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's small-tensor tests on one torch thread: on 2 busy cores a second OpenMP thread mostly waits."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
