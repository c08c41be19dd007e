"""Tune callback of a sweep in URI storage: uploads betadiff's working folder (Optuna journal, MLflow write
journal, state) whenever Tune saves its experiment state, so a resume on another machine finds them as recent
as Tune's own state. Pickled by Tune into the experiment (tuner.pkl): keep this import path.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from betadiff.sweep import storage


class StateSync(Callback):
    def __init__(self, store: storage.SweepStore, name: str, work: Path):
        self.store, self.name, self.work = store, name, Path(work)
        self._since: dict[str, float] = {}
        self._last = 0.0
        self._warned = False

    def __getstate__(self) -> dict[str, Any]:  # a restored driver uploads everything once, then what changes
        return {**self.__dict__, "_since": {}, "_last": 0.0, "_warned": False}

    def sync(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < storage.SYNC_INTERVAL_S:
            return
        self._last = now
        work = storage.WORK_DIRS.get(self.name, self.work)
        try:  # upload only: what the journals no longer hold is deleted there by the runner at the end
            self.store.upload(self.name, work, mirror=False, since=self._since)
            self._warned = False
        except Exception as e:  # noqa: BLE001 - the storage is away: the sweep goes on, the next save retries
            if not self._warned:
                self._warned = True
                where = self.store.experiment(self.name)
                print(f"betadiff: warning: cannot upload the sweep state to {where} "
                      f"({storage._first_line(e)}); retried at the next save", flush=True)

    def get_state(self) -> None:  # called by Tune whenever it saves the experiment state
        self.sync()
        return None

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.sync()
