"""``python -m obd.variants``: one dataset's curves under several recipes, each against a reference.

Each SOURCE is ``FOLDER:METHOD``, a results folder of ``obd.curves`` (or ``obd.table``) with runs of the
dataset; the first is the reference. A source's recipe is named by the config fields in which its runs
differ from the reference's (``distill.outer_optimizer=sgd, distill.beta=0.0432``), so a label cannot
say more than the runs did. Writes ``OUT/variants.csv`` (one row per source) and ``OUT/TASK.png`` (the
sources' mean curves against outer step and against distillation CPU minutes).

Per source, on its own horizon T (its shortest seed's steps), the plateau of :func:`obd.curves.plateau`
(mean over the last third, flat when the change over it is within +/- 1 point); against the reference,
paired by seed, twice: both read at their common horizon (the same outer steps), and each on its own
plateau (where each recipe ends up, at whatever steps it ran); and the steps and CPU time until its mean
curve (smoothed as the plateau's) comes within 1 point of the reference's plateau, what a faster recipe is
judged by. Sources on another dataset version or
with another teacher than the reference's are refused: their targets differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from obd.config import flatten
from obd.curves import (
    FLAT_POINTS,
    Curve,
    _write_csv,
    distill_cpu_seconds,
    first_reaching,
    plateau,
    plot_task,
    read_runs,
    seed_plateaus,
)
from obd.errors import ConfigError, ObdError, cli
from obd.runs import comparable_run

# beyond what the run store ignores (obd.runs.comparable): the run's length, its evaluation and checkpoint
# schedule and its gradient path, which say how long and how it was watched, not what it computed
BOOKKEEPING = ("outer_steps", "eval_every", "checkpoint_every", "grad_fn")


def flat_config(cfg: dict) -> dict[str, object]:
    """``{"distill": {"beta": 0.02}}`` -> ``{"distill.beta": 0.02}``, as the run store reads a stored config
    (fields added since at the value the run computed with), bookkeeping and W&B fields left out."""
    return flatten({k: v for k, v in comparable_run(cfg).items() if k not in BOOKKEEPING})


def recipe_label(cfg: dict, reference: dict) -> str:
    """The fields of ``cfg`` that differ from ``reference`` (both flattened), as ``key=value, ...``."""
    a, b = flat_config(cfg), flat_config(reference)
    diff = [f"{k}={a.get(k)}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return ", ".join(diff) or "the reference's recipe"


def load_source(spec: str, task: str) -> tuple[dict[int, dict], dict[int, Curve]]:
    """``FOLDER:METHOD`` -> (seed -> metrics, seed -> curve) of ``task``."""
    folder, _, method = spec.rpartition(":")
    if not folder or not method:
        raise ConfigError(f"{spec!r}: expected FOLDER:METHOD, e.g. results/curves:avpbc")
    runs = read_runs(Path(folder), [task]).get((task, method))
    if not runs:
        raise ObdError(f"{folder}: no finished {method} runs of {task} under runs/*/*/metrics.json")
    curves = {}
    for seed, m in sorted(runs.items()):
        cpu = distill_cpu_seconds(m["history"])
        curves[seed] = [(h["step"], h["score"], c) for h, c in zip(m["history"], cpu)]
    return runs, curves


def _same_targets(spec: str, runs: dict[int, dict], ref_spec: str, ref: dict[int, dict]) -> None:
    def keys(rs: dict[int, dict], what: str) -> set[str]:
        found = (m.get("data_hash") if what == "dataset" else (m.get("teacher") or {}).get("key") for m in rs.values())
        return {str(k) for k in found if k}

    for what in ("dataset", "teacher"):
        mine, theirs = keys(runs, what), keys(ref, what)
        if mine and theirs and mine != theirs:
            raise ObdError(
                f"{spec}: another {what} ({', '.join(sorted(mine))}) than {ref_spec} ({', '.join(sorted(theirs))})"
            )


def _paired(a: dict[int, float], b: dict[int, float], prefix: str) -> dict:
    from obd.stats import paired_comparison

    c = paired_comparison(a, b)
    ci = c.get("paired_t_ci")
    return {
        f"{prefix}": round(c["mean_difference"], 2) if c["n_pairs"] else None,
        f"{prefix}_ci_low": round(ci[0], 2) if ci else None,
        f"{prefix}_ci_high": round(ci[1], 2) if ci else None,
        f"{prefix}_verdict": c.get("verdict") if c["n_pairs"] else None,
    }


def compare(task: str, sources: list[str]) -> tuple[list[dict], list[dict]]:
    """(one row per source, the curve rows for the figure); ``sources[0]`` is the reference."""
    loaded = [load_source(s, task) for s in sources]
    ref_runs, ref_curves = loaded[0]
    ref_cfg = next(iter(ref_runs.values())).get("config", {})
    T_ref = min(m["outer_steps"] for m in ref_runs.values())
    ref_plateau = seed_plateaus({s: [x for x in c if x[0] <= T_ref] for s, c in ref_curves.items()}, T_ref)
    rows, curve_rows = [], []
    for i, (spec, (runs, curves)) in enumerate(zip(sources, loaded)):
        _same_targets(spec, runs, sources[0], ref_runs)
        T = min(m["outer_steps"] for m in runs.values())
        own = {s: [x for x in c if x[0] <= T] for s, c in curves.items()}
        label = "reference" if i == 0 else recipe_label(next(iter(runs.values())).get("config", {}), ref_cfg)
        p = plateau(own, T)
        row = {"task": task, "source": spec, "recipe": label, **{k: p[k] for k in p if k != "outer_steps"}}
        row["outer_steps"] = T
        if i:
            H = min(T, T_ref)
            at_h = {s: [x for x in c if x[0] <= H] for s, c in curves.items()}
            ref_h = {s: [x for x in c if x[0] <= H] for s, c in ref_curves.items()}
            row["common_steps"] = H
            try:
                row.update(_paired(seed_plateaus(at_h, H), seed_plateaus(ref_h, H), "minus_reference_same_steps"))
            except ObdError:  # one of them was not evaluated often enough by then: no plateau to pair there
                row.update(_paired({}, {}, "minus_reference_same_steps"))
                row["minus_reference_same_steps_verdict"] = f"too few evaluations in the last third of {H} steps"
            row.update(_paired(seed_plateaus(own, T), ref_plateau, "minus_reference_own_plateaus"))
            # what a faster recipe is judged by: the CPU time until it is within a point of the reference's plateau
            step, cpu = first_reaching(own, float(np.mean(list(ref_plateau.values()))) - FLAT_POINTS)
            row["steps_to_reference_level"], row["cpu_seconds_to_reference_level"] = step, cpu
        rows.append(row)
        curve_rows += [
            {"task": task, "method": _name(i, spec), "seed": s, "step": st, "score": sc, "distill_cpu_s": cpu}
            for s, c in own.items()
            for st, sc, cpu in c
        ]
    return rows, curve_rows


def _name(i: int, spec: str) -> str:
    return f"{i}: {spec}"


def write(task: str, sources: list[str], out: Path) -> list[dict]:
    """``OUT/variants.csv`` and ``OUT/TASK.png``; the rows."""
    rows, curve_rows = compare(task, sources)
    out.mkdir(parents=True, exist_ok=True)
    plot_task(task, curve_rows, [{**r, "method": _name(i, r["source"])} for i, r in enumerate(rows)], out)
    _write_csv(out / "variants.csv", rows)
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m obd.variants", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("task", help="the dataset, e.g. halfcheetah-medium")
    p.add_argument("sources", nargs="+", help="FOLDER:METHOD ..., the reference first")
    p.add_argument("--out", required=True, help="folder for variants.csv and the figure")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from obd.data import get_task

    task = get_task(a.task).name
    if len(a.sources) < 2:
        raise ConfigError("give the reference and at least one other source")
    for r in write(task, a.sources, Path(a.out)):
        line = f"{r['source']} ({r['recipe']}): plateau {r['plateau_score']:.1f} at {r['outer_steps']} steps"
        if r.get("minus_reference_same_steps") is not None:
            lo, hi = r["minus_reference_same_steps_ci_low"], r["minus_reference_same_steps_ci_high"]
            ci = f" [{lo:+.1f}, {hi:+.1f}]" if lo is not None else ""
            line += (
                f"; minus the reference at {r['common_steps']} steps "
                f"{r['minus_reference_same_steps']:+.1f}{ci} ({r['minus_reference_same_steps_verdict']})"
            )
        print(line)
    print(f"wrote {Path(a.out) / 'variants.csv'} and {Path(a.out) / (task + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
