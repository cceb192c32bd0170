"""``python -m obd.behavior``: train (or resume) the behaviour SAC of an env and export its policies."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from obd.errors import cli

ENVS = ("halfcheetah", "hopper", "walker2d")


def _workdir(args: argparse.Namespace) -> Path:
    from obd.data.paths import data_dir

    return Path(args.workdir) if args.workdir else data_dir() / "sac" / f"{args.env}-seed{args.seed}"


def _train(args: argparse.Namespace) -> None:
    import torch

    from obd.data import get_task

    from .sac import SACConfig, train_sac

    torch.set_num_threads(args.threads)
    cfg = SACConfig(total_steps=args.steps, seed=args.seed)
    workdir = _workdir(args)
    from obd.devices import resolve_device

    snaps = train_sac(
        get_task(f"{args.env}-medium"),
        cfg,
        workdir,
        stop_at_score=args.stop_at_score,
        device=resolve_device(args.device),
    )
    best = max(snaps, key=lambda s: s["score"]) if snaps else None
    print(f"{workdir}: {len(snaps)} snapshots" + (f", best {best['score']:.1f} at step {best['step']}" if best else ""))


def _export(args: argparse.Namespace) -> None:
    import torch

    from obd.data import get_task
    from obd.data.paths import data_dir

    from .export import export_policy

    torch.set_num_threads(1)
    out = Path(args.out) if args.out else data_dir() / "policies" / f"{args.env}.pt"
    meta = export_policy(
        get_task(f"{args.env}-medium"),
        _workdir(args),
        out,
        command=f"python -m obd.behavior train {args.env} --seed {args.seed}",
        keep_medium=Path(args.keep_medium) if args.keep_medium else None,
    )
    print(json.dumps({"out": str(out), **meta}, indent=1))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m obd.behavior", description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    sub = p.add_subparsers(dest="cmd", required=True)
    tb = sub.add_parser(
        "train",
        help="train (or resume) the behaviour SAC of one env",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    tb.add_argument("env", choices=ENVS)
    tb.add_argument("--steps", type=int, default=1_000_000, help="SAC steps in all (D4RL's expert: 1M)")
    tb.add_argument("--seed", type=int, default=0, help="the SAC run's seed")
    tb.add_argument(
        "--stop-at-score", type=float, default=None, help="stop once a snapshot's mean normalized return reaches this"
    )
    tb.add_argument("--workdir", default=None, help="resumable state (default OBD_DATA_DIR/sac/ENV-seedSEED)")
    tb.add_argument("--threads", type=int, default=1, help="torch threads")
    tb.add_argument(
        "--device",
        default="cpu",
        choices=("auto", "cpu", "cuda"),
        help="where the SAC updates run (default cpu: small networks, one env)",
    )
    tb.set_defaults(fn=_train)
    ex = sub.add_parser(
        "export",
        help="write the policy file generation uses, from a SAC run",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ex.add_argument("env", choices=ENVS)
    ex.add_argument("--seed", type=int, default=0, help="the SAC run's seed")
    ex.add_argument("--workdir", default=None, help="default OBD_DATA_DIR/sac/ENV-seedSEED")
    ex.add_argument(
        "--out",
        default=None,
        help="default OBD_DATA_DIR/policies/ENV.pt (wins over the package's obd/behavior/policies)",
    )
    ex.add_argument(
        "--keep-medium",
        default=None,
        help="an earlier export of this run (e.g. obd/behavior/policies/ENV.pt): keep its medium and replay "
        "snapshots, so the medium datasets stay the same, and add the expert",
    )
    ex.set_defaults(fn=_export)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
