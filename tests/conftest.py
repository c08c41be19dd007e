import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's small-tensor tests on one torch thread: on 2 busy cores a second OpenMP thread mostly waits."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
