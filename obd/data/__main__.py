"""``python -m obd.data``: generate a dataset (an explicit step, with a progress bar) or summarise one."""

from __future__ import annotations

import argparse
import json
import sys

from obd.errors import ObdError, cli


def _collect(args: argparse.Namespace) -> None:
    from obd.behavior.generate import collect

    from .tasks import get_task

    task = args.task_flag or args.task
    if not task:
        raise ObdError("collect needs a task, e.g. `python -m obd.data collect halfcheetah-medium`")
    print(collect(get_task(task), args.size, args.data_seed))


def _info(args: argparse.Namespace) -> None:
    from . import load_source, resolve_task

    source = args.data_flag or args.data
    if not source:
        raise ObdError("info needs a source: a task name, a D4RL hdf5 path, d4rl:TASK or minari:ID")
    from obd.synthetic_set import exported_metadata

    distilled = exported_metadata(source)
    task = resolve_task(source, args.task, force=args.force_task)
    ds = load_source(source, task, size=args.size, seed=args.data_seed)
    s = ds.summary(task)
    if distilled is not None:  # its single-step episodes have no return to report
        prov = distilled.get("provenance") or {}
        s = {
            "kind": "synthetic set distilled by obd",
            "task": s["task"],
            "pairs": s["transitions"],
            **{k: prov.get(k) for k in ("method", "seed", "budget", "outer_steps", "score", "data_hash")},
        }
    if args.json:
        print(json.dumps(s))
        return
    width = max(map(len, s))
    for k, v in s.items():
        print(f"{k:<{width}}  {v:.2f}" if isinstance(v, float) else f"{k:<{width}}  {v}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m obd.data", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    c = sub.add_parser(
        "collect", help="generate a D4RL-equivalent dataset (cached under OBD_DATA_DIR)", formatter_class=fmt
    )
    c.add_argument("task", nargs="?", default=None, help="e.g. halfcheetah-medium")
    c.add_argument("--task", dest="task_flag", default=None, help="the same, as a flag")
    c.add_argument("--size", type=int, default=None, help="transitions (default: D4RL's size)")
    c.add_argument("--data-seed", type=int, default=0, help="which generated dataset")
    c.set_defaults(fn=_collect)

    i = sub.add_parser("info", help="summarise a dataset", formatter_class=fmt)
    i.add_argument(
        "data",
        nargs="?",
        default=None,
        help="a task name (generated dataset), a D4RL hdf5 path, d4rl:TASK or minari:ID",
    )
    i.add_argument("--data", dest="data_flag", default=None, help="the same, as a flag")
    i.add_argument("--task", default=None, help="the task whose env and normalization apply (default: the source's)")
    i.add_argument("--force-task", action="store_true", help="accept a --task that contradicts the file's metadata")
    i.add_argument("--size", type=int, default=None, help="for a generated dataset: its size")
    i.add_argument("--data-seed", type=int, default=0, help="for a generated dataset: its data seed")
    i.add_argument("--json", action="store_true", help="print one JSON object")
    i.set_defaults(fn=_info)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    args.fn(args)
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
