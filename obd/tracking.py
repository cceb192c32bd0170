"""Run tracking: W&B (offline unless logged in), CSV logs under the run's directory, provenance.

W&B's mode is decided here only (:func:`wandb_mode`); its console output is silenced unless
``OBD_VERBOSE_WANDB=1`` (W&B's own ``WANDB_SILENT`` / ``WANDB_QUIET`` are respected when set).
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path

NOISY_LOGGERS = (
    "lightning",
    "lightning.pytorch",
    "lightning_fabric",
    "lightning.pytorch.utilities.rank_zero",
    "faiss.loader",
)


def setup_logging() -> None:
    """INFO for obd's own messages; libraries' device notes and tips only when they are warnings."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    quiet_libraries()


def quiet_libraries() -> None:
    import logging

    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def wandb_mode() -> str:
    """``WANDB_MODE`` when set; else online when credentials exist (env or ~/.netrc), offline otherwise."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    netrc = Path.home() / ".netrc"
    logged_in = bool(os.environ.get("WANDB_API_KEY")) or (
        netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")
    )
    return "online" if logged_in else "offline"


def _quiet_wandb() -> None:
    if os.environ.get("OBD_VERBOSE_WANDB") != "1":
        os.environ.setdefault("WANDB_SILENT", "true")
        os.environ.setdefault("WANDB_QUIET", "true")
        os.environ.setdefault("WANDB_CONSOLE", "off")


def wandb_logger(
    project: str,
    group: str | None,
    name: str,
    save_dir: Path,
    config: dict,
    tags: list[str],
    run_id: str | None = None,
):
    """A Lightning WandbLogger around a run we start (so W&B gets only the settings we mean);
    ``run_id`` resumes that run (``--resume`` continues the same W&B run)."""
    from lightning.pytorch.loggers import WandbLogger

    run = wandb_init(
        project=project,
        group=group,
        name=name,
        dir=str(save_dir),
        config=config,
        tags=tags,
        id=run_id,
        resume="allow" if run_id else None,
    )
    return WandbLogger(experiment=run, save_dir=str(save_dir))


def wandb_init(**kwargs):
    import wandb

    _quiet_wandb()
    return wandb.init(mode=wandb_mode(), **kwargs)  # type: ignore[arg-type]


def finish(loggers: list) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for lg in loggers:
        if isinstance(lg, WandbLogger):  # obd logs hyperparameters first, so the run has started
            lg.experiment.finish()


@functools.lru_cache(maxsize=1)
def versions() -> dict:
    """Package versions and the git commit, computed once per process (a git call and imports)."""
    import faiss
    import gymnasium
    import lightning
    import mujoco
    import torch

    import obd

    try:
        commit = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent, timeout=5
            ).stdout.strip()
            or None
        )
    except OSError:
        commit = None
    return {
        "obd": obd.__version__,
        "git_commit": commit,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gymnasium": gymnasium.__version__,
        "mujoco": mujoco.__version__,
        "faiss": faiss.__version__,
        "lightning": lightning.__version__,
    }
