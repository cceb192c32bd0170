"""``python -m obd.curves``: where each dataset's plateau is, in outer steps and in CPU time.

Runs (or reads back) long distillation runs with an evaluation every ``--eval-every`` outer steps,
kept as ``obd.table`` keeps its runs (``OUT/runs/TASK/METHOD-sSEED/``, resumable, a finished run
never recomputed), then writes from their histories only:

- ``OUT/curves.csv``: one row per evaluation: task, method, seed, outer step, score, and the run's
  distillation CPU seconds up to that step (evaluations excluded);
- ``OUT/plateau.csv``: per dataset and method, the plateau and the steps and CPU time to reach it
  (definitions below);
- ``OUT/TASK.png``: score against outer step and against distillation CPU minutes, mean +/- s.e.
  over seeds, the published Av-PBC as a reference line;
- ``OUT/comparison.csv``: per dataset, SDW - Av-PBC on the plateau, paired by seed (t interval,
  Wilcoxon), both read at their common horizon, beside the dataset's state diversity; and, with 4
  or more datasets, ``OUT/diversity.json`` and ``OUT/diversity.png``: SDW's claim (it helps most
  where state diversity is limited) as a rank correlation over the datasets (:func:`obd.table.diversity_claim`).

Definitions (T = the runs' outer steps, the shortest seed's where they differ: at a constant learning
rate a longer run's first T steps are the run of T steps; every number is over the seeds, each seed's
curve first):

- plateau score: each seed's mean score over its evaluations in the last third (steps >= 2T/3);
- change over the last third: per seed, the mean over [5T/6, T] minus the mean over [2T/3, 5T/6);
  the curve is **flat** when the mean change is within +/- ``FLAT_POINTS`` (1 point);
- steps to the plateau: the first evaluation step from which the mean curve over seeds, smoothed
  by a running mean of 3 evaluations, reaches the plateau score minus ``FLAT_POINTS``; CPU seconds
  to the plateau are the seeds' mean distillation CPU time at that step.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import numpy as np

from obd.errors import ConfigError, ObdError, cli
from obd.flags import PER_RUN, add_config_flags, config_layer

FLAT_POINTS = 1.0


def distill_cpu_seconds(history: list[dict]) -> list[float | None]:
    """Per evaluation, the run's CPU seconds up to it, minus the earlier evaluations' own CPU time."""
    out: list[float | None] = []
    spent_evaluating = 0.0
    for h in history:
        if "cpu_seconds" not in h:
            out.append(None)  # a run recorded before CPU time was logged
            continue
        out.append(round(h["cpu_seconds"] - spent_evaluating, 1))
        spent_evaluating += h.get("eval_cpu_seconds", 0.0)
    return out


Curve = list[tuple[int, float, float | None]]  # (outer step, score, distillation CPU seconds)


def _halves(c: Curve, T: int, seed: int) -> tuple[list[float], list[float]]:
    """The scores of [2T/3, 5T/6) and of [5T/6, T]: the last third's two halves."""
    a = [s for st, s, _ in c if 2 * T / 3 <= st < 5 * T / 6]
    b = [s for st, s, _ in c if 5 * T / 6 <= st <= T]
    if not (a and b):
        raise ObdError(f"seed {seed}: too few evaluations in the last third of its {T} steps to find a plateau")
    return a, b


def seed_plateaus(curves: dict[int, Curve], outer_steps: int) -> dict[int, float]:
    """seed -> its mean score over the evaluations in the last third of ``outer_steps``."""
    return {seed: float(np.mean(sum(_halves(c, outer_steps, seed), []))) for seed, c in curves.items()}


def plateau(curves: dict[int, Curve], outer_steps: int) -> dict:
    """The plateau of one dataset and method from its seeds' curves (seed -> [(step, score, cpu_s)])."""
    from obd.stats import paired_comparison

    T = outer_steps
    halves = {seed: _halves(c, T, seed) for seed, c in curves.items()}
    per_seed = {seed: float(np.mean(a + b)) for seed, (a, b) in halves.items()}
    first_half = {seed: float(np.mean(a)) for seed, (a, _) in halves.items()}
    second_half = {seed: float(np.mean(b)) for seed, (_, b) in halves.items()}
    scores = np.array(list(per_seed.values()))
    change = paired_comparison(second_half, first_half)
    level = float(scores.mean())
    step, cpu = first_reaching(curves, level - FLAT_POINTS)
    assert step is not None  # the smoothed mean curve's last third averages to the level: it gets there
    return {
        "seeds": len(curves),
        "outer_steps": T,
        "plateau_score": round(level, 2),
        "plateau_se": round(float(scores.std(ddof=1) / math.sqrt(len(scores))), 2) if len(scores) > 1 else None,
        "last_third_change": round(change["mean_difference"], 2),
        "change_ci_low": round(change["paired_t_ci"][0], 2) if "paired_t_ci" in change else None,
        "change_ci_high": round(change["paired_t_ci"][1], 2) if "paired_t_ci" in change else None,
        "flat": abs(change["mean_difference"]) <= FLAT_POINTS,
        "steps_to_plateau": step,
        "cpu_seconds_to_plateau": cpu,
    }


def first_reaching(curves: dict[int, Curve], level: float) -> tuple[int | None, float | None]:
    """(outer step, the seeds' mean distillation CPU seconds there) of the first evaluation from which the
    mean curve over seeds, smoothed by a running mean of 3 evaluations, is at ``level`` or above; (None,
    None) when it never is. CPU seconds are None when a seed did not record them."""
    steps = sorted(set.intersection(*(set(st for st, _, _ in c) for c in curves.values())))
    mean_curve = np.array([np.mean([dict((st, s) for st, s, _ in c)[step] for c in curves.values()]) for step in steps])
    smooth = np.convolve(np.pad(mean_curve, 1, mode="edge"), np.ones(3) / 3, mode="valid")
    reached = next((i for i, v in enumerate(smooth) if v >= level), None)
    if reached is None:
        return None, None
    step = steps[reached]
    cpus = [dict((st, cpu) for st, _, cpu in c)[step] for c in curves.values()]
    known = [c for c in cpus if c is not None]
    return step, round(float(np.mean(known)), 0) if len(known) == len(cpus) else None


def read_runs(out: Path, tasks: list[str] | None = None) -> dict[tuple[str, str], dict[int, dict]]:
    """(task, method) -> seed -> metrics, from ``OUT/runs/*/*/metrics.json``."""
    runs: dict[tuple[str, str], dict[int, dict]] = {}
    for path in sorted(out.glob("runs/*/*/metrics.json")):
        m = json.loads(path.read_text())
        if tasks is None or m["task"] in tasks:
            runs.setdefault((m["task"], m["method"]), {})[int(m["seed"])] = m
    return runs


def build(out: Path, tasks: list[str] | None = None) -> list[dict]:
    """curves.csv, plateau.csv and one figure per dataset from the runs under ``out``; the plateau rows."""
    from obd.config import BASELINE_START

    runs = read_runs(out, tasks)
    if not runs:
        raise ObdError(f"{out}: no finished runs under runs/*/*/metrics.json")
    hashes: dict[str, set[str]] = {}
    for (task, _), seeds in runs.items():
        hashes.setdefault(task, set()).update(m["data_hash"] for m in seeds.values() if m.get("data_hash"))
    for task, hs in hashes.items():
        if len(hs) > 1:  # generated data depends on the machine's floating point: one dataset per curve
            raise ObdError(f"{out / 'runs' / task}: runs on {len(hs)} different datasets ({', '.join(sorted(hs))})")
    teachers: dict[str, set[str]] = {}
    for (task, _), seeds in runs.items():
        teachers.setdefault(task, set()).update(m["teacher"]["key"] for m in seeds.values() if m.get("teacher"))
    for task, keys in teachers.items():
        if len(keys) > 1:  # the targets (pi*, Q) differ: curves of one dataset must share them to be compared
            raise ObdError(
                f"{out / 'runs' / task}: runs with {len(keys)} different teachers ({', '.join(sorted(keys))})"
            )
    curve_rows, rows = [], []
    horizons: dict[tuple[str, str], int] = {}
    all_curves: dict[tuple[str, str], dict[int, Curve]] = {}
    for (task, method), seeds in sorted(runs.items()):
        if method in BASELINE_START:
            continue
        curves: dict[int, Curve] = {}
        for seed, m in sorted(seeds.items()):
            cpu = distill_cpu_seconds(m["history"])
            curves[seed] = [(h["step"], h["score"], c) for h, c in zip(m["history"], cpu)]
            curve_rows += [
                {"task": task, "method": method, "seed": seed, "step": st, "score": round(s, 3), "distill_cpu_s": c}
                for st, s, c in curves[seed]
            ]
        lengths = {m["outer_steps"] for m in seeds.values()}
        if len(lengths) > 1 and any(
            m["config"]["distill"].get("outer_lr_schedule") == "cosine" for m in seeds.values()
        ):
            raise ObdError(f"{out / 'runs' / task}: {method} runs of different lengths {sorted(lengths)} with a decay")
        # at a constant learning rate a longer run's first T steps are the run of T steps: the common horizon
        T = min(lengths)
        common = {seed: [x for x in c if x[0] <= T] for seed, c in curves.items()}
        rows.append({"task": task, "method": method, **plateau(common, T)})
        horizons[(task, method)], all_curves[(task, method)] = T, curves
    _write_csv(out / "curves.csv", curve_rows)
    _write_csv(out / "plateau.csv", rows)
    write_comparison(out, runs, all_curves, horizons)
    for task in sorted({r["task"] for r in rows}):
        plot_task(task, [r for r in curve_rows if r["task"] == task], [r for r in rows if r["task"] == task], out)
    return rows


def compare_on_plateau(sdw: dict[int, Curve], avpbc: dict[int, Curve], T: int) -> dict:
    """SDW - Av-PBC, each seed's plateau (last third of T steps) paired by seed: obd.stats' comparison."""
    from obd.stats import paired_comparison

    return paired_comparison(seed_plateaus(sdw, T), seed_plateaus(avpbc, T))


def write_comparison(
    out: Path, runs: dict[tuple[str, str], dict[int, dict]], curves: dict, horizons: dict[tuple[str, str], int]
) -> list[dict]:
    """``comparison.csv`` (and the diversity claim's json and figure): SDW - Av-PBC per dataset on the
    plateau, both methods read at their common horizon (the shorter one's steps)."""
    from obd.stats import teacher_of
    from obd.table import diversity_claim, plot_diversity, teacher_se

    rows = []
    for task in sorted({t for t, m in curves if m == "sdw"} & {t for t, m in curves if m == "avpbc"}):
        T = min(horizons[(task, "sdw")], horizons[(task, "avpbc")])
        c = compare_on_plateau(curves[(task, "sdw")], curves[(task, "avpbc")], T)
        if not c["n_pairs"]:
            continue
        both = [*runs[(task, "avpbc")].values(), *runs[(task, "sdw")].values()]
        diversity = next((m["state_diversity_knn10"] for m in both if m.get("state_diversity_knn10")), None)
        record = teacher_of(both) or {}
        teacher = record.get("normalized_return") or {}
        rows.append(
            {
                "task": task,
                "outer_steps": T,
                "n_pairs": c["n_pairs"],
                "sdw_minus_avpbc": round(c["mean_difference"], 2),
                "ci_low": round(c["paired_t_ci"][0], 2) if "paired_t_ci" in c else None,
                "ci_high": round(c["paired_t_ci"][1], 2) if "paired_t_ci" in c else None,
                "wilcoxon_p": round(c["wilcoxon_p"], 3) if "wilcoxon_p" in c else None,
                "verdict": c["verdict"],
                "state_diversity": round(diversity, 4) if diversity is not None else None,
                "teacher_score": round(teacher["mean"], 1) if teacher.get("mean") is not None else None,
                "teacher_se": teacher_se(record),
                "teacher_episodes": teacher.get("episodes"),
                "corl_td3bc": record.get("corl_td3bc_score"),
            }
        )
    for name in ("comparison.csv", "diversity.json", "diversity.png"):
        (out / name).unlink(missing_ok=True)  # what an earlier build found must not outlive its runs
    if rows:
        _write_csv(out / "comparison.csv", rows)
    claim = diversity_claim(rows)
    if claim is not None:
        (out / "diversity.json").write_text(json.dumps({k: round(v, 4) for k, v in claim.items()}, indent=1) + "\n")
        plot_diversity(rows, claim, out / "diversity.png")
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


METHOD_STYLE = {"avpbc": ("Av-PBC", "tab:blue", "o"), "sdw": ("SDW", "tab:red", "s")}


def plot_task(task: str, curve_rows: list[dict], rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from obd.table import PUBLISHED_AVPBC

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for r in rows:
        method = r["method"]
        label, color, marker = METHOD_STYLE.get(method, (method, None, "^"))
        mine = [c for c in curve_rows if c["method"] == method]
        steps = sorted({c["step"] for c in mine})
        seeds = sorted({c["seed"] for c in mine})
        by = {(c["seed"], c["step"]): c for c in mine}
        y = np.array([[by[(s, st)]["score"] for s in seeds if (s, st) in by] for st in steps], dtype=object)
        mean = np.array([np.mean(v) for v in y])
        se = np.array([np.std(v, ddof=1) / math.sqrt(len(v)) if len(v) > 1 else 0.0 for v in y])
        cpu = [
            np.mean([by[(s, st)]["distill_cpu_s"] for s in seeds if (s, st) in by and by[(s, st)]["distill_cpu_s"]])
            if any((s, st) in by and by[(s, st)]["distill_cpu_s"] for s in seeds)
            else np.nan
            for st in steps
        ]
        for ax, x in ((axes[0], np.array(steps)), (axes[1], np.array(cpu, dtype=float) / 60)):
            ax.plot(x, mean, color=color, marker=marker, markersize=3, label=f"{label} (n={len(seeds)} seeds)")
            ax.fill_between(x, mean - se, mean + se, color=color, alpha=0.2)
        axes[0].axvline(r["steps_to_plateau"], color=color, linestyle=":", linewidth=1)
    pub = PUBLISHED_AVPBC.get(task)
    for ax in axes:
        if pub is not None:
            ax.axhline(pub, color="k", linestyle="--", linewidth=1, label="Av-PBC published (50k steps, D4RL)")
        ax.grid(alpha=0.3)
    axes[0].set_xlabel("outer step (dotted: steps to the plateau)")
    axes[1].set_xlabel("distillation CPU minutes (evaluations excluded)")
    axes[0].set_ylabel("normalized return")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{task}: mean +/- s.e. over seeds, 10 policies x 10 episodes per evaluation", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / f"{task}.png", dpi=110)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m obd.curves", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks", default=None, help="comma-separated (default: the paper's nine datasets)")
    p.add_argument("--methods", default="avpbc,sdw", help="default avpbc,sdw")
    p.add_argument("--seeds", default="0-2", help="a range 0-2 or a list 0,1,2 (default 0-2)")
    p.add_argument("--budget", default="quick", help="the recipe, a budget of sweeps/budgets/ (default quick)")
    p.add_argument("--config", default=None, help="YAML of RunConfig fields applied to every run")
    p.add_argument("--outer-steps", type=int, default=3000, help="length of every run (default 3000)")
    p.add_argument("--eval-every", type=int, default=100, help="evaluation interval (default 100)")
    p.add_argument("--out", default="results/curves", help="default results/curves")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--rebuild", action="store_true", help="only rebuild the files from the runs already there")
    p.add_argument(
        "--batched", action="store_true", help="each task's runs advanced together (one BPTT call per step for all)"
    )
    add_config_flags(p, exclude=(*PER_RUN, "outer_steps", "eval_every"))  # e.g. --threads, --start, --alpha
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from obd.config import DISTILL_METHODS, check_choices, read_yaml
    from obd.data import get_task
    from obd.table import NINE, parse_seeds, run_all
    from obd.tracking import setup_logging

    setup_logging()
    tasks = [get_task(t).name for t in a.tasks.split(",")] if a.tasks else list(NINE)
    methods = a.methods.split(",")
    check_choices(methods, DISTILL_METHODS, a.budget)
    if a.outer_steps < 6 or a.eval_every < 1:
        raise ConfigError("--outer-steps must be >= 6 and --eval-every >= 1 (a plateau needs evaluations)")
    out = Path(a.out)
    if not a.rebuild:
        layers = [read_yaml(Path(a.config)) or {}] if a.config else []
        flags = config_layer(a)
        layers += [flags, {"outer_steps": a.outer_steps, "eval_every": a.eval_every}]
        seeds, threads = parse_seeds(a.seeds), flags.get("threads", 1)
        run_all(tasks, methods, seeds, a.budget, out, a.jobs, layers, batched=a.batched, threads=threads)
    rows = build(out, tasks)
    for r in rows:
        print(
            f"{r['task']:>26} {r['method']:>6}: plateau {r['plateau_score']:.1f} "
            f"(change over the last third {r['last_third_change']:+.1f}, {'flat' if r['flat'] else 'NOT flat'}), "
            f"reached at step {r['steps_to_plateau']}"
            + (f", {r['cpu_seconds_to_plateau'] / 60:.1f} CPU min" if r["cpu_seconds_to_plateau"] else "")
        )
    print(f"wrote {out / 'curves.csv'}, {out / 'plateau.csv'} and one figure per dataset")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
