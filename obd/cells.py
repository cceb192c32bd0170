"""A table's cells (task, method, seed) spread over any number of workers through one Optuna storage.

The table is one Optuna study (``table-BUDGET-OUTNAME``); each cell is an enqueued trial whose user
attributes hold the cell's name and its resolved config. A worker pops a waiting trial (the storage
hands each to one worker), runs it with :func:`obd.train.run` while recording heartbeats, and tells
its score with a compact copy of its metrics. A worker that dies leaves its trial's heartbeat stale;
the next worker to look fails it and Optuna's retry callback enqueues the cell again with the same
config and run folder, so it resumes from its checkpoint where OUT is shared (and restarts where it
is not). A finished cell is never run again. SQLite is the one-machine default; PostgreSQL serves
several machines.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

log = logging.getLogger("obd.cells")

# what a table needs of a run's metrics (build_table), kept in the trial so that no shared OUT is needed
KEPT = (
    "task",
    "method",
    "seed",
    "score",
    "final_score",
    "last_k_used",
    "scored_steps",
    "wall_seconds",
    "data_hash",
    "transitions",
    "behaviour_score",
    "teacher",
    "outer_steps",
)


def study_name(budget: str, out: Path) -> str:
    return f"table-{budget}-{out.resolve().name}"


def open_table(storage_url: str, budget: str, out: Path) -> optuna.Study:
    from obd.storage import connect

    return optuna.create_study(
        study_name=study_name(budget, out), storage=connect(storage_url), direction="maximize", load_if_exists=True
    )


def cell_name(task: str, method: str, seed: int) -> str:
    return f"{task}/{method}/s{seed}"


def enqueue(study: optuna.Study, cells: dict[tuple[str, str, int], dict]) -> int:
    """Enqueue every cell the study does not hold yet (finished, running or waiting); how many were new."""
    have = {t.user_attrs.get("cell") for t in study.get_trials(deepcopy=False) if t.state != TrialState.FAIL}
    new = 0
    for (task, method, seed), cfg in cells.items():
        name = cell_name(task, method, seed)
        if name not in have:
            study.enqueue_trial({}, user_attrs={"cell": name, "config": cfg})
            new += 1
    return new


def _pending(study: optuna.Study) -> tuple[int, int]:
    """(waiting, running) cells."""
    trials = study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))
    waiting = sum(t.state == TrialState.WAITING and "cell" in t.user_attrs for t in trials)
    return waiting, sum(t.state == TrialState.RUNNING and "cell" in t.user_attrs for t in trials)


def work(study: optuna.Study, wait_for_all: bool = False) -> int:
    """Run waiting cells until none is left (and, with ``wait_for_all``, none runs elsewhere); how many
    this process ran."""
    from obd.config import RunConfig, merge
    from obd.runs import finished_run
    from obd.storage import Heartbeat, beat_orphans
    from obd.train import run

    storage = study._storage
    ran = 0
    while True:
        beat_orphans(study)
        optuna.storages.fail_stale_trials(study)  # cells of dead workers: failed and enqueued again
        waiting, running = _pending(study)
        if not waiting:
            if running and wait_for_all:
                time.sleep(2)
                continue
            return ran
        trial = study.ask()
        if "cell" not in trial.user_attrs:  # another worker took the last waiting cell first
            study.tell(trial, state=TrialState.FAIL)
            continue
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        cfg = merge(RunConfig(), trial.user_attrs["config"])
        log.info("cell %s (trial %d)", trial.user_attrs["cell"], trial.number)
        try:
            # a cell finished before (e.g. here, while others took its worker for dead) is read back
            m = finished_run(Path(str(cfg.out)), cfg, None, "use another --out")
            if m is None:
                with Heartbeat(storage, [trial._trial_id]):  # type: ignore[arg-type]
                    m = run(cfg, show_progress=False)
        except Exception:
            study.tell(trial, state=TrialState.FAIL)
            raise
        try:
            trial.set_user_attr("metrics", {k: m.get(k) for k in KEPT} | {"history": _steps(m)})
            study.tell(trial, float(m["score"]))
        except optuna.exceptions.UpdateFinishedTrialError:
            # a heartbeat missed under load: another worker failed this cell as dead and queued its retry,
            # which reads this finished run back from its folder instead of computing it again
            log.warning("cell %s finished here after it was failed as stale; its retry reuses the run", cfg.out)
        ran += 1


def _steps(m: dict) -> list[dict]:
    return [{"step": h["step"], "score": h["score"]} for h in m.get("history") or []]


def finished(study: optuna.Study) -> dict[tuple[str, str, int], dict]:
    """(task, method, seed) -> the compact metrics of every finished cell."""
    out = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        m = t.user_attrs.get("metrics")
        if m and "cell" in t.user_attrs:
            out[(m["task"], m["method"], int(m["seed"]))] = m
    return out
