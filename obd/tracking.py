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


STEP = "trainer/global_step"  # what Lightning's WandbLogger logs the outer step as


def start_run(cfg, task_name: str, run_id: str | None = None):
    """The W&B run of one obd run: its group, job type (trial / final / baseline, as the study or table
    that made it says), a unique name, the full config; the outer step is every chart's x axis.
    ``run_id`` continues that run (a resumed run keeps its W&B run)."""
    from obd.config import BASELINE_START, to_dict

    method, seed = cfg.distill.method, cfg.distill.seed
    run = wandb_init(
        project=cfg.wandb_project,
        group=cfg.wandb_group,
        job_type=cfg.wandb_job_type or ("baseline" if method in BASELINE_START else "run"),
        name=cfg.wandb_name or f"{task_name}-{method}-s{seed}",
        dir=cfg.out,
        config={"config": to_dict(cfg), "versions": versions()},
        tags=[task_name, method, cfg.budget or "custom"],
        id=run_id,
        resume="allow" if run_id else None,
        reinit="create_new",
    )
    run.define_metric(STEP)
    run.define_metric("*", step_metric=STEP)
    return run


def publish_run(run, metrics: dict, synthetic: Path) -> None:
    """The run's score (what metrics.json and the reports use) in its summary, its set as an artifact."""
    import wandb

    run.summary.update(
        {
            "score": metrics["score"],
            "final_score": metrics["final_score"],
            "last_k_used": metrics["last_k_used"],
            "scored_steps": metrics.get("scored_steps"),
            "data_hash": metrics.get("data_hash"),
        }
    )
    art = wandb.Artifact(
        f"synthetic-{metrics['task']}-{metrics['method']}-s{metrics['seed']}",
        type="synthetic-set",
        metadata={k: metrics.get(k) for k in ("task", "method", "seed", "budget", "score", "data_hash")},
    )
    art.add_file(str(synthetic))
    run.log_artifact(art)


def wandb_init(**kwargs):
    """``wandb.init`` in obd's mode, quiet; ``WANDB_DIR``, when set, wins over the run folder."""
    import wandb

    _quiet_wandb()
    if os.environ.get("WANDB_DIR"):  # passed on: W&B reads its environment once per process
        kwargs["dir"] = os.environ["WANDB_DIR"]
    if kwargs.get("dir"):
        Path(kwargs["dir"]).mkdir(parents=True, exist_ok=True)  # W&B itself falls back to a temp dir
    return wandb.init(mode=wandb_mode(), **kwargs)  # type: ignore[arg-type]


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
        "machine": machine(),
    }


def machine() -> str:
    """The CPU model, its widest vector units and the logical CPU count, e.g. "Intel(R) Xeon(R) Processor
    (AMX, AVX-512), 2 CPUs": timings compare only on one kind of machine (bf16 is native on AMX/AVX-512 BF16
    and emulated on AVX2)."""
    model, flags = platform.processor() or platform.machine(), set[str]()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        info = ""
    for ln in info.splitlines():
        if ln.startswith("model name"):
            model = ln.split(":", 1)[1].strip()
        elif ln.startswith("flags") and not flags:
            flags = set(ln.split(":", 1)[1].split())
    vector = next(
        (n for f, n in (("avx512_bf16", "AVX-512 BF16"), ("avx512f", "AVX-512"), ("avx2", "AVX2")) if f in flags), None
    )
    units = (["AMX"] if "amx_bf16" in flags else []) + ([vector] if vector else [])
    tag = f" ({', '.join(units)})" if units else ""
    return f"{model}{tag}, {os.cpu_count()} CPUs"
