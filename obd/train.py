"""One distillation run: ``python -m obd.train --task halfcheetah-medium --method sdw``.

Settings come from, in increasing priority: the ``--budget`` preset, ``--config FILE.yaml``
(nested like :class:`TrainConfig`), and the command-line flags. Outputs in ``--out``:
``synthetic.npz``, ``metrics.json``, ``checkpoints/`` (``--resume`` continues from ``last.ckpt``);
logs go to ``lightning_logs/`` (CSV) and W&B (offline unless you are logged in).
``--method random`` skips distillation and evaluates 256 random real pairs: the baseline.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import warnings
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from obd.data import DatasetError, UnknownTaskError
from obd.datamodule import METHODS, DataConfig, OBDDataModule
from obd.distill import BehaviorDistillation, DistillConfig
from obd.evaluate import EvalConfig, EvaluationCallback, evaluate_synthetic, save_synthetic

log = logging.getLogger("obd.train")
# Lightning's advice for manual optimization does not apply: the synthetic set is checkpointed after its step.
warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
warnings.filterwarnings("ignore", message=".*LeafSpec.*")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    outer_steps: int = 50_000
    eval_every: int = 1_000
    checkpoint_every: int = 200
    grad_fn: str = "fast"  # fast (hand-derived BPTT) | unrolled (plain autograd, the oracle)
    threads: int = 2
    out: str | None = None  # default runs/{task}-{method}-s{seed}
    wandb: bool = True
    wandb_project: str = "obd"
    wandb_group: str | None = None
    budget: str = "paper"


# Budgets scale the run. "paper" keeps the published defaults. The short budgets use Adam on the
# synthetic data: at the published SGD(lr 0.1, momentum 0.9) the outer gradient norm is ~0.02-0.03,
# so a few hundred steps barely move the synthetic set (halfcheetah-medium, seed 0, 300 steps:
# SGD 6.7, Adam lr 0.01 26.1 normalized return; see the README).
_ADAM = {"outer_optimizer": "adam", "outer_lr": 0.01}
BUDGETS: dict[str, dict] = {
    "smoke": {"outer_steps": 4, "eval_every": 0, "checkpoint_every": 2,
              "data": {"size": 20_000, "teacher_cfg": {"steps": 300}, "teacher_eval_episodes": 1},
              "distill": {"inner_steps": 10, "test_batches": 2}, "eval": {"episodes": 2, "inner_steps": 10}},
    "quick": {"outer_steps": 300, "eval_every": 100, "checkpoint_every": 50, "distill": _ADAM,
              "data": {"teacher_cfg": {"steps": 30_000}, "teacher_eval_episodes": 5},
              "eval": {"episodes": 10}},
    "sweep": {"outer_steps": 150, "eval_every": 50, "checkpoint_every": 50, "distill": _ADAM,
              "data": {"teacher_cfg": {"steps": 30_000}, "teacher_eval_episodes": 5},
              "eval": {"episodes": 5}},
    "paper": {"outer_steps": 50_000, "eval_every": 1_000, "data": {"teacher_cfg": {"steps": 1_000_000}}},
}


def merge(cfg, updates: dict, where: str = ""):
    """Recursively apply a nested dict to a (nested) dataclass; unknown keys are an error."""
    names = {f.name: f for f in dataclasses.fields(cfg)}
    for k, v in updates.items():
        if k not in names:
            raise ValueError(f"unknown setting '{where}{k}'; known: {', '.join(names)}")
        cur = getattr(cfg, k)
        if dataclasses.is_dataclass(cur) and isinstance(v, dict):
            merge(cur, v, f"{where}{k}.")
        else:
            setattr(cfg, k, tuple(v) if isinstance(cur, tuple) and isinstance(v, list) else v)
    return cfg


def versions() -> dict:
    import faiss
    import gymnasium
    import mujoco
    import lightning

    import obd

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except OSError:
        commit = None
    return {"obd": obd.__version__, "git_commit": commit, "python": platform.python_version(),
            "torch": torch.__version__, "gymnasium": gymnasium.__version__, "mujoco": mujoco.__version__,
            "faiss": faiss.__version__, "lightning": lightning.__version__}


def make_wandb_logger(cfg: TrainConfig, out: Path, name: str, tags: list[str]):
    """One W&B run per call; offline (syncable later with ``wandb sync``) unless logged in."""
    from lightning.pytorch.loggers import WandbLogger

    mode = os.environ.get("WANDB_MODE")
    if mode is None:
        mode = "online" if (os.environ.get("WANDB_API_KEY") or _netrc_has_wandb()) else "offline"
    return WandbLogger(project=cfg.wandb_project, group=cfg.wandb_group, name=name, save_dir=str(out),
                       mode=mode, tags=tags, config=asdict(cfg))


def _netrc_has_wandb() -> bool:
    p = Path.home() / ".netrc"
    return p.is_file() and "api.wandb.ai" in p.read_text(errors="ignore")


def run(cfg: TrainConfig, resume: bool = False, show_progress: bool = True, extra_callbacks: list | None = None,
        loggers: list | None = None) -> dict:
    """Distil (or, for method 'random', sample) a synthetic set, evaluate it, write the outputs."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger

    torch.set_num_threads(cfg.threads)
    method, seed = cfg.distill.method, cfg.distill.seed
    if method not in (*METHODS, "random"):
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join((*METHODS, 'random'))}")
    pl.seed_everything(seed, workers=True, verbose=False)
    t0 = time.time()
    dm = OBDDataModule(cfg.data, method="dbc" if method == "random" else method, beta=cfg.distill.beta,
                       batch_size=cfg.distill.batch_size, test_batches=cfg.distill.test_batches, seed=seed,
                       show_progress=show_progress)
    dm.prepare()
    task = dm.task
    out = Path(cfg.out or f"runs/{task.name}-{method}-s{seed}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(asdict(cfg), default=list))))
    init_s, init_a = dm.random_real_pairs(cfg.distill.n_synthetic, seed)
    mean, std = dm.mean.numpy(), dm.std.numpy()
    cfg.eval.seed = seed
    history: list[dict] = []
    if method == "random":
        states, actions = init_s, init_a
        final = evaluate_synthetic(states, actions, task, mean, std, cfg.eval)
    else:
        module = BehaviorDistillation(cfg.distill, init_s, init_a, grad_fn=cfg.grad_fn)
        evaluator = EvaluationCallback(task, mean, std, cfg.eval, cfg.eval_every)
        ckpt_dir = out / "checkpoints"
        ckpt_cb = ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                                  every_n_train_steps=cfg.checkpoint_every)
        ckpt_path = None
        if resume and (ckpt_dir / "last.ckpt").is_file():
            ckpt_path = str(ckpt_dir / "last.ckpt")
            dm.start_step = int(torch.load(ckpt_path, weights_only=False, map_location="cpu")["global_step"])
            log.info("resuming from %s at outer step %d", ckpt_path, dm.start_step)
        if loggers is None:
            loggers = [CSVLogger("lightning_logs", name=f"{task.name}-{method}-s{seed}")]
            if cfg.wandb:
                loggers.append(make_wandb_logger(cfg, out, f"{task.name}-{method}-s{seed}", [task.name, method]))
        for lg in loggers:
            lg.log_hyperparams({"config": asdict(cfg), "versions": versions(), **dm.describe()})
        trainer = pl.Trainer(max_steps=cfg.outer_steps, max_epochs=-1, logger=loggers,
                             callbacks=[evaluator, ckpt_cb, *(extra_callbacks or [])],
                             enable_progress_bar=show_progress, enable_model_summary=False, log_every_n_steps=1,
                             accelerator="cpu", devices=1, num_sanity_val_steps=0, deterministic=False)
        trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        trainer.save_checkpoint(ckpt_dir / "last.ckpt")  # the final state, with the final evaluation
        states, actions = module.synthetic()
        history = evaluator.history
        final = {k: history[-1][k] for k in ("normalized_return_mean", "normalized_return_std", "episode_scores")}
    save_synthetic(out / "synthetic.npz", states, actions, mean, std, task, asdict(cfg))
    metrics = {**final, "method": method, "task": task.name, "seed": seed, "outer_steps": cfg.outer_steps,
               "budget": cfg.budget, "history": history, "wall_seconds": round(time.time() - t0, 1),
               **dm.describe(), "versions": versions(), "config": asdict(cfg)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    if method != "random":
        for lg in loggers:
            if hasattr(lg, "experiment") and lg.__class__.__name__ == "WandbLogger":
                lg.experiment.summary.update({k: metrics[k] for k in ("normalized_return_mean", "normalized_return_std")})
    return metrics


def build_config(args: argparse.Namespace) -> TrainConfig:
    cfg = TrainConfig()
    if args.budget not in BUDGETS:
        raise ValueError(f"unknown budget {args.budget!r}; choose one of {', '.join(BUDGETS)}")
    merge(cfg, BUDGETS[args.budget])
    cfg.budget = args.budget
    if args.config:
        path = Path(args.config)
        if not path.is_file():
            raise ValueError(f"{path}: no such config file")
        merge(cfg, yaml.safe_load(path.read_text()) or {})
    flags = {
        "data": {k: v for k, v in {"source": args.data or args.task, "task": args.task if args.data else None,
                                   "size": args.size, "teacher": args.teacher}.items() if v is not None},
        "distill": {k: v for k, v in {"method": args.method, "seed": args.seed, "n_synthetic": args.n_synthetic,
                                      "inner_steps": args.inner_steps, "truncate": args.truncate}.items()
                    if v is not None},
        **{k: v for k, v in {"outer_steps": args.outer_steps, "eval_every": args.eval_every, "out": args.out,
                             "threads": args.threads}.items() if v is not None},
    }
    if args.alpha is not None:
        flags["data"]["density"] = {"alpha": args.alpha}
    if args.episodes is not None:
        flags["eval"] = {"episodes": args.episodes}
    if args.no_wandb:
        flags["wandb"] = False
    merge(cfg, flags)
    cfg.eval.inner_steps, cfg.eval.inner_lr = cfg.distill.inner_steps, cfg.distill.inner_lr
    cfg.eval.hidden = cfg.distill.hidden
    return cfg


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m obd.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default=None, help="e.g. halfcheetah-medium (the generated dataset, env, normalization)")
    p.add_argument("--data", default=None, help="another source: D4RL hdf5 path, d4rl:TASK or minari:ID")
    p.add_argument("--method", default=None, help="dbc | pbc | avpbc | sdw | random (default avpbc)")
    p.add_argument("--budget", default="quick", help="smoke | quick | paper (default quick)")
    p.add_argument("--config", default=None, help="YAML file with TrainConfig fields")
    p.add_argument("--teacher", default=None, help="CORL checkpoint (actor + critic1) instead of training TD3+BC")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--size", type=int, default=None, help="generated dataset size")
    p.add_argument("--alpha", type=float, default=None, help="SDW density exponent")
    p.add_argument("--n-synthetic", type=int, default=None)
    p.add_argument("--inner-steps", type=int, default=None)
    p.add_argument("--truncate", type=int, default=None, help="truncated BPTT window")
    p.add_argument("--outer-steps", type=int, default=None)
    p.add_argument("--eval-every", type=int, default=None)
    p.add_argument("--episodes", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")
    p.add_argument("--no-wandb", action="store_true")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        cfg = build_config(args)
        m = run(cfg, resume=args.resume)
    except (UnknownTaskError, DatasetError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps({k: m[k] for k in ("task", "method", "seed", "normalized_return_mean",
                                             "normalized_return_std")}))
    else:
        print(f"{m['task']} {m['method']} seed {m['seed']}: normalized return "
              f"{m['normalized_return_mean']:.1f} +/- {m['normalized_return_std']:.1f} ({m['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
