"""Run folders as a store: when a stored run may stand for the run a config asks for.

A run folder holds ``config.yaml`` (written at the start), ``run.json`` (the config and the data hash it
started on), ``checkpoints/`` while it runs, and ``metrics.json`` and ``synthetic.npz`` once finished.
A finished run is reused, and an unfinished one continued, only when its config (completed with
today's defaults for fields added since) and its dataset's content hash equal what is asked for now;
otherwise the caller gets a one-line error naming the first difference. At a constant outer learning
rate a run of T steps is the first T steps of a longer one, so a finished run asked for more steps is
continued from its checkpoint, not refused.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from obd.config import RunConfig, merge, to_dict
from obd.errors import ObdError

CHECKPOINT = Path("checkpoints") / "state.pt"  # the resumable state of a run, relative to its folder
LENGTH_KEYS = ("outer_steps", "eval_every", "checkpoint_every")  # what continuing a run may change


def finished_run(run_dir: Path, cfg: RunConfig, data_hash: str | None, rerun: str) -> dict | None:
    """The metrics of the finished run in ``run_dir`` (re-scored by today's rule), None when it has not
    finished; an error when it ran with another config or, ``data_hash`` given, on other data."""
    from obd.evaluate import rescore

    path = run_dir / "metrics.json"
    if not path.is_file():
        return None
    m = rescore(json.loads(path.read_text()))
    have, want = comparable_run(m["config"]), comparable_run(to_dict(cfg))
    diff = config_difference(have, want)
    if diff and _only_longer(have, want):
        if (run_dir / CHECKPOINT).is_file():
            return None  # the engine continues it from its checkpoint to the longer length
        raise ObdError(
            f"{path} ran {have['outer_steps']} outer steps and has no checkpoint ({CHECKPOINT}) to continue "
            f"to {want['outer_steps']}; {rerun}"
        )
    if diff:
        raise ObdError(f"{path} was run with another configuration ({diff}); {rerun}")
    if data_hash:
        check_same_data(path, m, data_hash, rerun)
    return m


def _only_longer(have: dict, want: dict) -> bool:
    """Whether ``want`` is ``have`` run for more outer steps at a constant learning rate."""
    if want["distill"]["outer_lr_schedule"] != "constant" or want["outer_steps"] <= have["outer_steps"]:
        return False
    return config_difference(_without_length(have), _without_length(want)) is None


def _without_length(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in LENGTH_KEYS}


def check_same_data(path: Path, metrics: dict, data_hash: str, rerun: str) -> None:
    """A finished run is reused only on the data it ran on: a dataset generated again (e.g. from a
    re-exported behaviour policy) has another content hash. ``rerun`` says what to do instead."""
    if metrics.get("data_hash", data_hash) != data_hash:
        raise ObdError(
            f"{path}: run on other data (data hash {metrics['data_hash']}, the dataset's now {data_hash}); {rerun}"
        )


def config_difference(a: dict, b: dict, where: str = "") -> str | None:
    """The first dotted key where two nested configs differ, or None."""
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            d = config_difference(x, y, f"{where}{k}.")
            if d:
                return d
        elif x != y:
            return f"{where}{k}: {x!r} then, {y!r} now"
    return None


IGNORED_IN_COMPARISON = (
    "budget",  # the preset's name: two presets resolving to the same config ask for the same run
    "out",
    "wandb",
    "wandb_group",
    "wandb_project",
    "wandb_job_type",
    "wandb_name",
    "threads",
    "device",
)


def comparable(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if k not in IGNORED_IN_COMPARISON}


def comparable_run(cfg: dict) -> dict:
    """What a run's result depends on: its full config, a stored one completed with today's defaults
    for fields added since (it ran with their default), without execution details."""
    if "q_negative" not in cfg.get("distill", {}):  # stored before the option: negative Q weighed 0 then
        cfg = {**cfg, "distill": {**cfg.get("distill", {}), "q_negative": "zero"}}
    full = to_dict(merge(RunConfig(), cfg))
    full["distill"].pop("cuda_graph", None)  # graph replay computes what eager execution does
    full["teacher"].pop("eval_episodes", None)  # how the teacher is scored, not what the run computes
    return comparable(full)


def check_continuable(out: Path, cfg: RunConfig, data_hash: str | None = None) -> None:
    """Raise when the unfinished run in ``out`` was started with another config or on other data."""
    path = out / "run.json"
    if not path.is_file():
        return  # a run started before run.json existed: nothing to compare
    stored = json.loads(path.read_text())
    have, want = comparable_run(stored["config"]), comparable_run(to_dict(cfg))
    if want["distill"]["outer_lr_schedule"] == "constant":  # it may be continued to more outer steps
        have, want = _without_length(have), _without_length(want)
    diff = config_difference(have, want)
    if diff:
        raise ObdError(f"{out}: its checkpoint is of another run ({diff}); use another --out")
    if data_hash is not None:
        check_same_data(out, stored, data_hash, "use another --out")


def record_start(out: Path, cfg: RunConfig, data_hash: str) -> None:
    """``run.json``: what the run in ``out`` is, for :func:`check_continuable`."""
    (out / "run.json").write_text(json.dumps({"config": to_dict(cfg), "data_hash": data_hash}, indent=1))


class Claim:
    """An exclusive claim on a run folder for this process (``flock`` on ``DIR/.claim``): two processes
    sharing an OUT never compute the same run; the claim ends when it is released or the process dies."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(run_dir / ".claim", os.O_RDWR | os.O_CREAT, 0o644)

    def take(self, wait: bool = False) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return False
        return True

    def release(self) -> None:
        os.close(self.fd)  # closing the descriptor drops the lock
