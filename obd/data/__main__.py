"""``python -m obd.data``: generate, inspect, and train the behaviour policies behind generation."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .dataset import DatasetError
from .paths import data_dir
from .tasks import ENVS, UnknownTaskError, get_task


def _collect(args: argparse.Namespace) -> None:
    from .generate import collect

    path = collect(get_task(args.task), args.size, args.seed)
    print(path)


def _info(args: argparse.Namespace) -> None:
    from . import load_source, resolve_task

    task = resolve_task(args.source, args.task)
    ds = load_source(args.source, task, size=args.size, seed=args.seed, generate=False)
    s = ds.summary(task)
    if args.json:
        print(json.dumps(s))
        return
    width = max(map(len, s))
    for k, v in s.items():
        print(f"{k:<{width}}  {v:.2f}" if isinstance(v, float) else f"{k:<{width}}  {v}")


def _train_behavior(args: argparse.Namespace) -> None:
    from .sac import SACConfig, train_sac

    torch.set_num_threads(args.threads)
    task = get_task(f"{args.env}-medium")
    cfg = SACConfig(total_steps=args.steps, seed=args.seed)
    workdir = Path(args.workdir) if args.workdir else data_dir() / "sac" / f"{args.env}-seed{args.seed}"
    snaps = train_sac(task, cfg, workdir, stop_at_score=args.stop_at_score)
    best = max(snaps, key=lambda s: s["score"]) if snaps else None
    print(f"{workdir}: {len(snaps)} snapshots" + (f", best {best['score']:.1f} at step {best['step']}" if best else ""))


def _export_policy(args: argparse.Namespace) -> None:
    from .export import export_policy

    torch.set_num_threads(1)
    workdir = Path(args.workdir) if args.workdir else data_dir() / "sac" / f"{args.env}-seed{args.seed}"
    out = Path(args.out) if args.out else data_dir() / "policies" / f"{args.env}.pt"
    meta = export_policy(get_task(f"{args.env}-medium"), workdir, out,
                         command=f"python -m obd.data train-behavior {args.env} --seed {args.seed}")
    print(json.dumps({"out": str(out), **meta}, indent=1))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m obd.data", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    c = sub.add_parser("collect", help="generate a D4RL-equivalent dataset (cached under OBD_DATA_DIR)")
    c.add_argument("task", help="e.g. halfcheetah-medium")
    c.add_argument("--size", type=int, default=None, help="transitions (default: D4RL's size)")
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(fn=_collect)

    i = sub.add_parser("info", help="summarise a dataset")
    i.add_argument("source", help="a task name (generated dataset), a D4RL hdf5 path, d4rl:TASK or minari:ID")
    i.add_argument("--task", default=None, help="the task whose env and normalization apply")
    i.add_argument("--size", type=int, default=None, help="for a generated dataset: its size")
    i.add_argument("--seed", type=int, default=0, help="for a generated dataset: its seed")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(fn=_info)

    tb = sub.add_parser("train-behavior", help="train (or resume) the behaviour SAC for one env")
    tb.add_argument("env", choices=sorted(ENVS))
    tb.add_argument("--steps", type=int, default=1_000_000)
    tb.add_argument("--seed", type=int, default=0)
    tb.add_argument("--stop-at-score", type=float, default=None,
                    help="stop once a snapshot's mean normalized return reaches this")
    tb.add_argument("--workdir", default=None)
    tb.add_argument("--threads", type=int, default=1)
    tb.set_defaults(fn=_train_behavior)

    ex = sub.add_parser("export-policy", help="write the policy file generation uses from a SAC run")
    ex.add_argument("env", choices=sorted(ENVS))
    ex.add_argument("--seed", type=int, default=0)
    ex.add_argument("--workdir", default=None)
    ex.add_argument("--out", default=None, help="default: OBD_DATA_DIR/policies/ENV.pt (the package ships obd/data/policies)")
    ex.set_defaults(fn=_export_policy)

    args = p.parse_args(argv)
    try:
        args.fn(args)
    except (UnknownTaskError, DatasetError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
