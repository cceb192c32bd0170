"""One distillation run: ``python -m obd.train --task halfcheetah-medium --method sdw``.

Settings (see :mod:`obd.config`), in increasing priority: the ``--budget`` YAML, ``--config
FILE.yaml`` (nested like :class:`obd.config.RunConfig`), and the flags. The pipeline:
dataset -> targets (teacher, Q, density; cached) -> distillation -> evaluation -> outputs in
``--out``: ``synthetic.npz``, ``metrics.json`` (every evaluation, the last-K score, config, seed,
versions, data hash), ``config.yaml``, ``checkpoints/state.pt`` (``--resume`` continues from it),
``logs/`` (CSV) and ``wandb/`` (offline unless you are logged in); see :mod:`obd.engine`.
``--method random | random-teacher | kmeans-teacher`` skips distillation and evaluates a start of
:mod:`obd.starts` as it is (random real pairs; random states with pi*(s); k-means states with pi*(s)).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from obd.config import RunConfig, budget_names, build_config, merge, read_yaml, to_dict
from obd.errors import ConfigError, ObdError, cli

log = logging.getLogger("obd.train")


def default_out(cfg: RunConfig) -> Path:
    name = (cfg.data.task or cfg.data.source).replace("/", "_").replace(":", "_")
    return Path(f"runs/{name}-{cfg.distill.method}-s{cfg.distill.seed}")


def run(
    cfg: RunConfig,
    resume: bool | None = None,
    show_progress: bool = True,
    listeners: Sequence = (),
    force_task: bool = False,
    dtype: Any = None,
) -> dict:
    """Distil (or, for a baseline method, pick) a synthetic set, evaluate it, write the outputs; returns
    metrics. The engine of :mod:`obd.engine` with one run (``dtype``: float32 unless given).

    ``resume``: True continues the checkpoint in ``cfg.out`` (an error when there is none), False starts
    afresh, None continues one if there is one. A checkpoint of another config or dataset is an error."""
    import torch

    from obd.engine import run_many

    if not cfg.out:
        cfg.out = str(default_out(cfg))
    (res,) = run_many(
        [cfg],
        [listeners],
        resume=resume,
        show_progress=show_progress,
        dtype=dtype or torch.float32,
        force_task=force_task,
    )
    if isinstance(res, Exception):
        raise res
    return res


def run_config_dict(cfg: dict) -> dict:
    """A run in a worker process (top level, so that it pickles)."""
    return run(merge(RunConfig(), cfg), show_progress=False)


def run_configs(todo: dict, jobs: int, desc: str = "runs", show_progress: bool = True) -> dict:
    """Run every config (key -> RunConfig as a dict) ``jobs`` at a time in spawned processes; key -> metrics."""
    from tqdm.auto import tqdm

    results: dict = {}
    bar = tqdm(total=len(todo), desc=desc, unit="run", disable=not show_progress or not todo)
    if jobs > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn")) as pool:
            futures = {pool.submit(run_config_dict, c): k for k, c in todo.items()}
            for f in as_completed(futures):
                results[futures[f]] = f.result()
                bar.update(1)
    else:
        for k, c in todo.items():
            results[k] = run_config_dict(c)
            bar.update(1)
    bar.close()
    return results


# ------------------------------------------------------------------ command line


def parser() -> argparse.ArgumentParser:
    from obd.flags import add_config_flags

    p = argparse.ArgumentParser(
        prog="python -m obd.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", default=None, help="e.g. halfcheetah-medium: the generated dataset, or the env of --data")
    p.add_argument("--data", default=None, help="another source: a D4RL hdf5 path, d4rl:TASK or minari:ID")
    p.add_argument("--force-task", action="store_true", help="accept a --task that contradicts the data's own")
    p.add_argument("--budget", default="quick", help=f"one of sweeps/budgets/: {' | '.join(budget_names())}")
    p.add_argument("--config", default=None, help="YAML file of RunConfig fields (obd/config.py)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/state.pt")
    p.add_argument("--no-wandb", action="store_true", help="no W&B run (the same as --wandb false)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as YAML and exit")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    add_config_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's config: the budget, then --config, then --task/--data, then every config flag."""
    from obd.flags import config_layer

    layers: list[dict] = []
    if args.config:
        loaded = read_yaml(Path(args.config))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{args.config}: a config file is a mapping of RunConfig fields")
        layers.append(loaded or {})
    if args.data or args.task:
        layers.append({"data": {"source": args.data or args.task, **({"task": args.task} if args.data else {})}})
    layers.append(config_layer(args))
    if args.no_wandb:
        layers.append({"wandb": False})
    if args.budget not in budget_names():
        raise ConfigError(f"unknown budget {args.budget!r}; choose one of {', '.join(budget_names())}")
    return build_config(args.budget, layers)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from obd.tracking import setup_logging

    setup_logging()
    cfg = config_from_args(args)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    cfg.out = str(out)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    try:
        m = run(cfg, resume=args.resume, force_task=args.force_task)
    except KeyboardInterrupt:
        given = argv if argv is not None else sys.argv[1:]
        again = " ".join(["python -m obd.train", *given, *([] if args.resume else ["--resume"])])
        from obd.engine import CHECKPOINT

        if (out / CHECKPOINT).is_file():
            raise ObdError(f"interrupted; the state is kept in {out / 'checkpoints'}; continue with: {again}") from None
        raise ObdError(
            "interrupted before distillation started; cached stages are kept, run the same command again"
        ) from None
    if args.json:
        print(json.dumps({k: m[k] for k in ("task", "method", "seed", "score", "final_score", "last_k_used")}))
    else:
        print(
            f"{m['task']} {m['method']} seed {m['seed']}: normalized return {m['score']:.1f} (mean of the last "
            f"{m['last_k_used']} evaluations, {m['protocol']['policies']} policies x {m['protocol']['episodes']} "
            f"episodes each; {m['wall_seconds']:.0f} s)"
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(cli(main))
