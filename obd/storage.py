"""The Optuna storage that studies and tables share, with heartbeats: a trial whose worker died, on any
machine, goes stale and is failed and retried with the same parameters (and run folder).

SQLite (one machine) or PostgreSQL (several); heartbeats every ``HEARTBEAT_S`` seconds, stale after
``GRACE_S``. Ask-and-tell trials (batched sweeps, table cells) heartbeat through :class:`Heartbeat`.
"""

from __future__ import annotations

import logging
import random
import time
import warnings
from typing import Any

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from obd.errors import ObdError

log = logging.getLogger("obd.storage")
# ask-and-tell (the batched search) on the heartbeat storage: its trials are tracked without heartbeats
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")
HEARTBEAT_S, GRACE_S = 5, 20


class Heartbeat:
    """Heartbeats for trials Optuna does not beat for (ask-and-tell): recorded in the storage every
    ``HEARTBEAT_S`` seconds while the block runs, so a worker that dies, on any machine, leaves trials
    whose heartbeat goes stale and that :func:`optuna.storages.fail_stale_trials` fails and retries."""

    def __init__(self, storage: RDBStorage, trial_ids: list[int]):
        import threading

        self.storage, self.ids = storage, list(trial_ids)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self) -> None:
        while True:
            for tid in self.ids:
                try:
                    self.storage.record_heartbeat(tid)
                except Exception as e:  # a storage hiccup: the next beat tries again
                    log.warning("heartbeat of trial id %d failed: %s", tid, e)
            if self.stop.wait(HEARTBEAT_S):
                return

    def __enter__(self) -> Heartbeat:
        for tid in self.ids:  # marks the trial as one that beats (see beat_orphans)
            self.storage.set_trial_user_attr(tid, "heartbeat", True)
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join()


def beat_orphans(study: optuna.Study) -> None:
    """Trials left running that never had a heartbeat (their process died before beating, or they were
    started by an older obd) get one now, so that Optuna finds them stale a grace period later."""
    from datetime import datetime

    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        started = t.datetime_start or datetime.now()
        if not t.user_attrs.get("heartbeat") and (datetime.now() - started).total_seconds() > GRACE_S:
            study._storage.record_heartbeat(t._trial_id)  # type: ignore[attr-defined]
            study._storage.set_trial_user_attr(t._trial_id, "heartbeat", True)


def connect(url: str, attempts: int = 5) -> RDBStorage:
    """Optuna RDB storage with heartbeats; workers starting together may race to create the schema,
    so a failed first connection is retried."""
    for i in range(attempts):
        try:
            return RDBStorage(
                url,
                heartbeat_interval=HEARTBEAT_S,
                grace_period=GRACE_S,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
                engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {},
            )
        except Exception as e:  # sqlalchemy errors of several kinds
            if i == attempts - 1:
                raise ObdError(
                    f"cannot open the study storage {url.split('@')[-1]}: {str(e).splitlines()[0]}"
                ) from None
            time.sleep(1 + 2 * random.random())
    raise AssertionError("unreachable")
