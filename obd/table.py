"""``make table`` / ``python -m obd.table``: SDW vs Av-PBC (and the random-pairs baseline) on many datasets.

For every task, method and seed one ``obd.train`` run at the given budget (the budget's settings, no
search), kept under ``OUT/runs/TASK/METHOD-sSEED/`` (its small ``metrics.json`` and
``synthetic.npz`` are kept, so the table can be rebuilt; a finished run whose stored configuration
matches is never recomputed, one asked for more outer steps at a constant learning rate continues from
its checkpoint, one that differs otherwise stops the command with the difference named). Then:

- ``OUT/table.csv`` and ``OUT/table.md``: per dataset, mean +/- std over seeds of each method, the
  paired SDW - Av-PBC difference with its t interval and Wilcoxon p-value, the teacher's score and
  the published Av-PBC (and, where published, SDW) numbers beside ours;
- ``OUT/table.png``: our Av-PBC and SDW per dataset with the published Av-PBC.

Every number in the published columns is from the papers (D4RL v2 data, 50k / 20k outer steps,
Cal-QL teachers); ours come from generated data at the stated budget, so they are comparable in
protocol but not in data, teacher or outer steps (see the README's differences section).
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from obd.errors import ConfigError, ObdError, cli
from obd.flags import PER_RUN, add_config_flags, config_layer

if TYPE_CHECKING:
    from obd.config import RunConfig

log = logging.getLogger("obd.table")

# Lei et al. 2024 (Av-PBC, 256 pairs, mean of 5 seeds x last 5 evaluations) and Lei et al. 2025 (SDW).
PUBLISHED_AVPBC = {
    "halfcheetah-medium-replay": 35.9,
    "halfcheetah-medium": 36.9,
    "halfcheetah-medium-expert": 22.0,
    "hopper-medium-replay": 40.9,
    "hopper-medium": 32.5,
    "hopper-medium-expert": 38.7,
    "walker2d-medium-replay": 55.0,
    "walker2d-medium": 39.5,
    "walker2d-medium-expert": 42.1,
}
PUBLISHED_SDW = {"halfcheetah-medium": 39.5, "hopper-medium": 38.4, "hopper-medium-expert": 42.6}
NINE = tuple(PUBLISHED_AVPBC)
# the three sets that need no outer loop, then the two distillation methods compared
DEFAULT_METHODS = ("random", "random-teacher", "kmeans-teacher", "avpbc", "sdw")


def parse_seeds(text: str) -> list[int]:
    """``0-4`` or ``0,1,2``."""
    try:
        if "-" in text:
            lo, hi = text.split("-")
            return list(range(int(lo), int(hi) + 1))
        return [int(x) for x in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds: expected a range like 0-4 or a list like 0,1,2, got {text!r}") from None


def cell_config(task: str, method: str, seed: int, budget: str, out: Path, layers: list[dict], threads: int):
    """The resolved config of one cell of the table (its run folder ``OUT/runs/TASK/METHOD-sSEED``)."""
    from obd.config import BASELINE_START, build_config

    return build_config(
        budget,
        [
            *layers,
            {
                "data": {"source": task},
                "distill": {"method": method, "seed": seed},
                "out": str(out / "runs" / task / f"{method}-s{seed}"),
                "wandb_group": f"table-{budget}-{out.resolve().name}",
                "wandb_job_type": "baseline" if method in BASELINE_START else "final",
                "threads": threads,
            },
        ],
    )


def run_all(
    tasks: list[str],
    methods: list[str],
    seeds: list[int],
    budget: str,
    out: Path,
    jobs: int,
    layers: list[dict],
    batched: bool = False,
    threads: int | None = None,
) -> dict[tuple[str, str, int], dict]:
    """Every (task, method, seed) run; finished ones are read back, the rest run ``jobs`` at a time."""

    from obd.config import build_config, to_dict
    from obd.runs import check_same_data
    from obd.targets import prepare_dataset, prepare_targets
    from obd.train import run_configs

    threads = threads or max(1, (os.cpu_count() or 1) // max(1, jobs))
    import torch

    torch.set_num_threads(threads)  # the shared stages (teacher training) run in this process
    results, pending = _stored_cells(tasks, methods, seeds, budget, out, layers, threads, "use another --out")
    todo = {cell: to_dict(cfg) for cell, cfg in pending.items()}
    # a dataset regenerated since (e.g. from a re-exported expert) must not mix with runs on its old data
    for task in sorted({k[0] for k in results}):
        _, ds = prepare_dataset(build_config(budget, [*layers, {"data": {"source": task}}]).data)
        now = ds.content_hash()
        for (t, method, seed), m in results.items():
            if t == task:
                check_same_data(
                    out / "runs" / t / f"{method}-s{seed}", m, now, f"move {out / 'runs' / t} away to rerun it"
                )
    # the shared stages (dataset, teacher, density) first, one task at a time, with progress bars
    for task in sorted({k[0] for k in todo}):
        needs = {k[1] for k in todo if k[0] == task}
        teacher_first = ("sdw", "avpbc", "pbc", "random-teacher", "kmeans-teacher", "dbc")
        method = next((m for m in teacher_first if m in needs), "dbc")
        prepare_targets(build_config(budget, [*layers, {"data": {"source": task}}]), method)
    if batched:  # every run of a task advanced together by one engine (obd.engine)
        from obd.config import RunConfig, merge
        from obd.engine import run_many

        for task in sorted({k[0] for k in todo}):
            keys = [k for k in todo if k[0] == task]
            done = run_many([merge(RunConfig(), todo.pop(k)) for k in keys])
            for k, res in zip(keys, done):
                if isinstance(res, Exception):
                    raise res
                results[k] = res
    results.update(run_configs(todo, jobs))
    return results


def build_table(
    results: dict[tuple[str, str, int], dict], tasks: list[str], methods: list[str], budget: str, out: Path
) -> list[dict]:
    """Write table.csv, table.md and table.png from the runs' metrics; returns the rows."""
    import numpy as np

    from obd.config import BASELINE_START, DISTILL_METHODS
    from obd.stats import method_summary, paired_comparison, teacher_of

    rows = []
    for task in tasks:
        runs = {m: {s: r for (t, mm, s), r in results.items() if t == task and mm == m} for m in methods}
        per = {m: {s: r["score"] for s, r in runs[m].items()} for m in methods}
        mine = [r for (t, _, _), r in results.items() if t == task]
        if not mine:
            continue
        any_run = mine[0]
        hashes = sorted({r["data_hash"] for r in mine if r.get("data_hash")})
        if len(hashes) > 1:  # e.g. a rebuild from runs copied in from two generations of the dataset
            raise ObdError(
                f"{out / 'runs' / task}: its runs were made on {len(hashes)} different datasets "
                f"(data hashes {', '.join(hashes)}); one row must come from one dataset"
            )
        teacher = teacher_of(mine)
        row: dict = {
            "task": task,
            "budget": budget,
            "transitions": any_run["transitions"],
            "behaviour_score": round(any_run["behaviour_score"], 1),
            "teacher_score": round(((teacher or {}).get("normalized_return") or {}).get("mean", float("nan")), 1),
            "teacher_se": teacher_se(teacher),
            "teacher_episodes": ((teacher or {}).get("normalized_return") or {}).get("episodes"),
            "corl_td3bc": (teacher or {}).get("corl_td3bc_score"),
            "published_avpbc": PUBLISHED_AVPBC.get(task),
            "published_sdw": PUBLISHED_SDW.get(task),
            "state_diversity": next((r["state_diversity_knn10"] for r in mine if r.get("state_diversity_knn10")), None),
        }
        for m in methods:
            ms = method_summary(runs[m])
            row[f"{m}_mean"] = round(ms["mean"], 2) if ms["n"] else None
            row[f"{m}_std"] = round(ms["std"], 2) if ms["n"] > 1 else None
            row[f"{m}_n"] = ms["n"]
            row[f"{m}_wall_s"] = round(ms["wall_seconds_mean"], 0) if ms["n"] else None
            cpu_s = [c for c in (run_cpu_seconds(r) for r in runs[m].values()) if c is not None]
            row[f"{m}_cpu_s"] = round(float(np.mean(cpu_s)), 0) if cpu_s and len(cpu_s) == ms["n"] else None
        baselines = [m for m in methods if m in BASELINE_START and per[m]]
        if baselines:  # what distillation adds over the best set that needs no outer loop
            best = max(baselines, key=lambda m: float(np.mean(list(per[m].values()))))
            row["best_baseline"] = best
            for m in ("avpbc", "sdw"):
                if m in methods and per[m]:
                    c = paired_comparison(per[m], per[best])
                    row[f"{m}_minus_best_baseline"] = round(c["mean_difference"], 2) if c["n_pairs"] else None
                    lo, hi = c.get("paired_t_ci", (None, None))
                    row[f"{m}_minus_best_baseline_ci_low"] = round(lo, 2) if lo is not None else None
                    row[f"{m}_minus_best_baseline_ci_high"] = round(hi, 2) if hi is not None else None
        if "sdw" in methods and "avpbc" in methods:
            c = paired_comparison(per["sdw"], per["avpbc"])
            row.update(
                sdw_minus_avpbc=round(c["mean_difference"], 2) if c["n_pairs"] else None,
                ci_low=round(c["paired_t_ci"][0], 2) if "paired_t_ci" in c else None,
                ci_high=round(c["paired_t_ci"][1], 2) if "paired_t_ci" in c else None,
                wilcoxon_p=round(c["wilcoxon_p"], 3) if "wilcoxon_p" in c else None,
                n_pairs=c["n_pairs"],
                verdict=c["verdict"],
            )
        cpu = [c for c in (run_cpu_seconds(r) for r in mine) if c is not None]
        row["cpu_hours"] = round(sum(cpu) / 3600, 2) if cpu else None
        row["runs"], row["runs_with_cpu"] = len(mine), len(cpu)
        row["machines"] = "; ".join(sorted({(r.get("versions") or {}).get("machine") or "not recorded" for r in mine}))
        trained = (teacher or {}).get("train_seconds")
        row["teacher_train_hours"] = round(trained / 3600, 2) if trained is not None else None  # 0.0: a tiny teacher
        row["scored_evaluations_per_run"] = round(
            float(
                np.mean([r["last_k_used"] for (t, mm, _), r in results.items() if t == task and mm in DISTILL_METHODS])
            )
            if any(t == task and mm in DISTILL_METHODS for (t, mm, _) in results)
            else 0,
            1,
        )
        rows.append(row)
    if not rows:  # writing an empty table would leave table.csv of an earlier build beside an empty table.md
        raise ObdError(
            f"{out}: no finished run of {', '.join(methods)} on {', '.join(tasks)} at budget {budget}; "
            "the table files are left as they were"
        )
    out.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    claim = diversity_claim(rows)
    (out / "table.md").write_text(markdown(rows, methods, claim))
    plot(rows, out / "table.png")
    if claim is not None:
        plot_diversity(rows, claim, out / "diversity.png")
    return rows


def run_cpu_seconds(metrics: dict) -> float | None:
    """A run's process CPU seconds, distillation and evaluations (its last evaluation included); None for
    a run recorded before CPU time was logged."""
    last = (metrics.get("history") or [{}])[-1]
    if "cpu_seconds" not in last:
        return None
    return float(last["cpu_seconds"]) + float(last.get("eval_cpu_seconds", 0.0))


def compute_line(rows: list[dict]) -> str | None:
    """The table's total compute: CPU hours of its runs, the teachers' training time and the machines."""
    timed = [r for r in rows if r.get("cpu_hours") not in (None, "")]
    if not timed:
        return None
    runs = sum(int(r["runs"]) for r in rows)
    with_cpu = sum(int(r["runs_with_cpu"]) for r in rows)
    hours = sum(float(r["cpu_hours"]) for r in timed)
    teachers = [float(r["teacher_train_hours"]) for r in rows if r.get("teacher_train_hours") not in (None, "")]
    machines = sorted({m for r in rows for m in str(r.get("machines") or "").split("; ") if m})
    line = f"Compute: {hours:.1f} CPU hours in {with_cpu} of the {runs} runs (distillation and evaluations"
    line += ", their own process time)" if with_cpu == runs else f"; {runs - with_cpu} runs recorded none)"
    if teachers:
        line += f"; teacher training {sum(teachers):.1f} hours (wall, {len(teachers)} teacher(s))"
    return line + f"; machines: {', '.join(machines)}."


def diversity_claim(rows: list[dict]) -> dict | None:
    """SDW's claim (it helps most where state diversity is limited) as a rank correlation over datasets:
    Spearman's rho between each dataset's state diversity and its paired SDW - Av-PBC, with a 95%
    interval from Fisher's z (standard error sqrt(1.06 / (n - 3)), Fieller, Hartley and Pearson 1957).
    None with fewer than 4 datasets that have both."""
    import math

    from scipy.stats import spearmanr

    pts = [(r.get("state_diversity"), r.get("sdw_minus_avpbc")) for r in rows]  # neither in a baselines-only table
    pts = [(x, y) for x, y in pts if x is not None and y is not None]
    if len(pts) < 4:
        return None
    rho, p = spearmanr([x for x, _ in pts], [y for _, y in pts])
    n, z = len(pts), math.atanh(max(-0.999999, min(0.999999, float(rho))))
    half = 1.96 * math.sqrt(1.06 / (n - 3))
    return {"n": n, "rho": float(rho), "ci_low": math.tanh(z - half), "ci_high": math.tanh(z + half), "p": float(p)}


def plot_diversity(rows: list[dict], claim: dict, path: Path) -> None:
    """SDW - Av-PBC (paired mean, 95% t interval) against the dataset's state diversity, one point each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rows:
        if r.get("state_diversity") is None or r.get("sdw_minus_avpbc") is None:
            continue
        x, y = r["state_diversity"], r["sdw_minus_avpbc"]
        lo, hi = r.get("ci_low"), r.get("ci_high")
        err = [[y - lo], [hi - y]] if lo is not None and hi is not None else None
        ax.errorbar([x], [y], yerr=err, marker="o", capsize=3, color="tab:red")
        ax.annotate(r["task"], (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax.axhline(0, color="k", linewidth=0.8)
    ax.set_xlabel("state diversity (mean distance to the 10th nearest state, normalized)")
    ax.set_ylabel("SDW - Av-PBC (paired by seed, 95% t CI)")
    rho = f"Spearman rho {claim['rho']:+.2f} [{claim['ci_low']:+.2f}, {claim['ci_high']:+.2f}]"
    ax.set_title(f"{rho} over {claim['n']} datasets", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(mean: float | None, std: float | None) -> str:
    return "-" if mean is None else f"{mean:.1f} +/- {std:.1f}" if std is not None else f"{mean:.1f}"


def _diff(r: dict, prefix: str) -> str:
    if r.get(f"{prefix}sdw_minus_avpbc") is None:
        return "-"
    lo, hi = r.get(f"{prefix}ci_low"), r.get(f"{prefix}ci_high")
    return f"{r[f'{prefix}sdw_minus_avpbc']:+.1f}" + (ci_cell(lo, hi) if lo is not None and hi is not None else "")


def reading(lo: float, hi: float, who: str = "SDW") -> str:
    """What a paired interval says: ``who`` (the first of the pair) ahead or behind, or no evidence when
    it spans zero."""
    return f"{who} ahead".strip() if lo > 0 else f"{who} behind".strip() if hi < 0 else "no evidence"


def ci_cell(lo: float, hi: float, who: str = "SDW") -> str:
    """A paired interval with its reading."""
    return f" [{lo:+.1f}, {hi:+.1f}], {reading(lo, hi, who)}"


def teacher_se(teacher: dict | None) -> float | None:
    """The standard error of the teacher's score (older runs stored only the std over episodes)."""
    nr = (teacher or {}).get("normalized_return") or {}
    if nr.get("se") is not None:
        return round(nr["se"], 1)
    n = nr.get("episodes") or 0
    return round(nr["std"] * (n / (n - 1)) ** 0.5 / n**0.5, 1) if n > 1 and nr.get("std") is not None else None


def teacher_cell(r: dict) -> str:
    """The teacher's score +/- its s.e. over its episodes, with CORL's TD3+BC on D4RL beside it."""
    if r.get("teacher_score") in (None, "") or str(r["teacher_score"]) == "nan":
        return "-"
    cell = f"{float(r['teacher_score']):.1f}"
    if r.get("teacher_se") not in (None, ""):
        cell += f" +/- {float(r['teacher_se']):.1f} ({r.get('teacher_episodes')} ep.)"
    if r.get("corl_td3bc") not in (None, ""):
        cell += f", CORL {r['corl_td3bc']}"
    return cell


def _versus_baseline(r: dict, method: str) -> str:
    d = r.get(f"{method}_minus_best_baseline")
    if d is None:
        return "-"
    lo, hi = r.get(f"{method}_minus_best_baseline_ci_low"), r.get(f"{method}_minus_best_baseline_ci_high")
    return f"{d:+.1f}" + (f" [{lo:+.1f}, {hi:+.1f}]" if lo is not None else "") + f" vs {r['best_baseline']}"


def markdown(rows: list[dict], methods: list[str], claim: dict | None = None) -> str:
    head = [
        "dataset",
        "data score",
        "teacher (+/- s.e.; CORL's TD3+BC on D4RL)",
        *methods,
        "Av-PBC - best no-BPTT set (paired)",
        "SDW - Av-PBC (paired, 95% t CI)",
        "Wilcoxon p",
        "published Av-PBC",
        "published SDW",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        diff = _diff(r, "")
        cells = [
            r["task"],
            f"{r['behaviour_score']:.1f}",
            teacher_cell(r),
            *(_fmt(r[f"{m}_mean"], r[f"{m}_std"]) + f" (n={r[f'{m}_n']})" for m in methods),
            _versus_baseline(r, "avpbc"),
            diff,
            f"{r['wilcoxon_p']:.3f}" if r.get("wilcoxon_p") is not None else "-",
            f"{r['published_avpbc']}" if r["published_avpbc"] is not None else "-",
            f"{r['published_sdw']}" if r["published_sdw"] is not None else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    scored = sorted({float(r["scored_evaluations_per_run"]) for r in rows if r.get("scored_evaluations_per_run")})
    if scored:
        lines += [
            "",
            "A run's score averages its last K evaluations (K = 5) that lie in its final 20% of outer steps; "
            f"evaluations per run that entered it: {', '.join(f'{x:g}' for x in scored)}. Baselines: one evaluation.",
        ]
    compute = compute_line(rows)
    if compute:
        lines += ["", compute]
    if claim is not None:
        lines += [
            "",
            f"SDW - Av-PBC against the datasets' state diversity, {claim['n']} datasets: Spearman rho "
            f"{claim['rho']:+.2f} [{claim['ci_low']:+.2f}, {claim['ci_high']:+.2f}] (95%, Fisher z), p = "
            f"{claim['p']:.3f}; SDW's claim predicts a negative rho (diversity.png).",
        ]
    return "\n".join(lines) + "\n"


def readme_block(out: Path, root: Path = Path(".")) -> str:
    """The README's results block for ``OUT`` (relative to ``root``, the README's folder), made from
    ``OUT/table.md`` and ``OUT/table.csv`` only."""
    import csv

    with open(root / out / "table.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    lines = [(root / out / "table.md").read_text().rstrip(), "", f"![results]({out.as_posix()}/table.png)"]
    shown = {r["task"]: [m for m in ("avpbc", "sdw", "random") if r.get(f"{m}_wall_s")] for r in rows}
    # a run's own CPU time does not depend on what else ran beside it; wall time for runs that predate it
    cpu = all(r.get(f"{m}_cpu_s") for r in rows for m in shown[r["task"]])
    key, what = (
        ("cpu_s", "CPU seconds per run (the run's own process: distillation and evaluations)")
        if cpu
        else ("wall_s", "wall time per run, seconds")
    )
    per_task = [
        f"{r['task']} " + ", ".join(f"{m} {float(r[f'{m}_{key}']):.0f}" for m in shown[r["task"]]) for r in rows
    ]
    lines += ["", f"Mean {what}: " + "; ".join(per_task) + "."]
    return "\n".join(lines) + "\n"


def update_readme(readme: Path, out: Path) -> None:
    """Replace the block between ``<!-- BEGIN generated: OUT -->`` and ``<!-- END generated: OUT -->``."""
    begin, end = f"<!-- BEGIN generated: {out.as_posix()} -->", f"<!-- END generated: {out.as_posix()} -->"
    text = readme.read_text()
    if begin not in text or end not in text:
        raise ObdError(f"{readme} has no '{begin}' ... '{end}' block to fill")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(head + begin + "\n" + readme_block(out, readme.parent) + end + tail)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not rows:
        return
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(2 + 1.6 * len(rows), 4))
    for off, (m, color) in zip((-0.2, 0.2), (("avpbc", "tab:blue"), ("sdw", "tab:red"))):
        if f"{m}_mean" in rows[0]:
            ax.bar(
                x + off,
                [r[f"{m}_mean"] if r[f"{m}_mean"] is not None else np.nan for r in rows],  # not run yet: no bar
                0.38,
                yerr=[r[f"{m}_std"] or 0 for r in rows],
                capsize=4,
                color=color,
                alpha=0.75,
                label=f"{m} (ours)",
            )
    for key, off, color, label in (
        ("published_avpbc", -0.2, "k", "Av-PBC (published, D4RL)"),
        ("published_sdw", 0.2, "darkred", "SDW (published, D4RL)"),
    ):
        pub = [r[key] for r in rows]
        if any(p is not None for p in pub):
            ax.scatter(
                x + off,
                [p if p is not None else np.nan for p in pub],
                marker="_",
                s=400,
                color=color,
                label=label,
                zorder=3,
            )
    if "random_mean" in rows[0]:
        ax.scatter(
            x,
            [r["random_mean"] if r["random_mean"] is not None else np.nan for r in rows],
            marker="x",
            color="gray",
            label="random pairs (ours)",
            zorder=3,
        )
    ax.set_xticks(x, [r["task"] for r in rows], rotation=20, ha="right")
    ax.set_ylabel("normalized return")
    ax.set_title(f"256 distilled pairs, budget {rows[0]['budget']}\nmean +/- std over seeds", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m obd.table", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--tasks", default=",".join(NINE), help="comma-separated (default: the paper's nine datasets)")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"default {','.join(DEFAULT_METHODS)}")
    p.add_argument("--seeds", default="0-4", help="a range 0-4 or a list 0,1,2 (default 0-4)")
    p.add_argument("--budget", default="quick", help="a budget of sweeps/budgets/ (default quick)")
    p.add_argument("--config", default=None, help="YAML of RunConfig fields applied to every run")
    p.add_argument("--out", default=None, help="default results/BUDGET")
    p.add_argument("--jobs", type=int, default=None, help="runs at once (default: cores, at most 2)")
    p.add_argument("--readme", default=None, help="also fill this file's generated block for OUT (README.md)")
    p.add_argument("--rebuild", action="store_true", help="only rebuild the table from the runs already there")
    p.add_argument(
        "--batched", action="store_true", help="each task's runs advanced together (one BPTT call per step for all)"
    )
    p.add_argument(
        "--storage",
        default=None,
        help="an Optuna storage URL (postgresql://... for several machines): the cells go there and any number "
        "of --worker processes take them",
    )
    p.add_argument("--worker", action="store_true", help="with --storage: only run cells (for extra machines)")
    add_config_flags(p, exclude=PER_RUN)  # every other RunConfig field, for every cell (--threads, --device, ...)
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from obd.config import METHODS, check_choices, read_yaml
    from obd.data import get_task
    from obd.tracking import setup_logging

    setup_logging()
    tasks = [get_task(t).name for t in a.tasks.split(",")]
    methods = a.methods.split(",")
    check_choices(methods, METHODS, a.budget)
    layers = [read_yaml(Path(a.config)) or {}] if a.config else []
    flags = config_layer(a)
    layers.append(flags)
    if flags.get("device"):
        from obd.devices import resolve_device

        resolve_device(flags["device"])
    a.threads = flags.get("threads")
    out = Path(a.out or f"results/{a.budget}")
    seeds = parse_seeds(a.seeds)
    if a.worker and not a.storage:
        raise ConfigError("--worker takes cells from a shared --storage; give the main process's URL")
    if a.storage:
        results = _on_storage(a, tasks, methods, seeds, out, layers)
        if results is None:
            return 0
    elif a.rebuild:
        results = _finished_cells(tasks, methods, seeds, a.budget, out, layers)
    else:
        jobs = a.jobs or min(2, os.cpu_count() or 1)
        results = run_all(tasks, methods, seeds, a.budget, out, jobs, layers, batched=a.batched, threads=a.threads)
    rows = build_table(results, tasks, methods, a.budget, out)
    print((out / "table.md").read_text(), end="")
    print(f"{len(rows)} dataset(s); table: {out / 'table.csv'}, {out / 'table.md'}, {out / 'table.png'}")
    if a.readme:
        update_readme(Path(a.readme), out)
        print(f"updated the results block of {a.readme}")
    return 0


def _stored_cells(
    tasks: list[str],
    methods: list[str],
    seeds: list[int],
    budget: str,
    out: Path,
    layers: list[dict],
    threads: int,
    rerun: str,
) -> tuple[dict[tuple[str, str, int], dict], dict[tuple[str, str, int], RunConfig]]:
    """(the metrics of each cell whose run in ``out`` finished at this budget's config, the config of each
    other cell); a run of another config is a one-line error ending in ``rerun``."""
    from obd.runs import finished_run

    results: dict[tuple[str, str, int], dict] = {}
    pending: dict[tuple[str, str, int], RunConfig] = {}
    for task in tasks:
        for method in methods:
            for seed in seeds:
                cfg = cell_config(task, method, seed, budget, out, layers, threads)
                m = finished_run(out / "runs" / task / f"{method}-s{seed}", cfg, None, rerun)
                if m is None:
                    pending[(task, method, seed)] = cfg
                else:
                    results[(task, method, seed)] = m
    return results, pending


def _finished_cells(
    tasks: list[str], methods: list[str], seeds: list[int], budget: str, out: Path, layers: list[dict]
) -> dict[tuple[str, str, int], dict]:
    """The cells whose runs in ``out`` finished at this budget's config; stored runs that did not are named."""
    results, pending = _stored_cells(tasks, methods, seeds, budget, out, layers, 1, "move it away")
    missing = [f"{t}/{m}/s{s}" for t, m, s in pending if (out / "runs" / t / f"{m}-s{s}" / "metrics.json").is_file()]
    if missing:
        print(f"not finished at budget {budget}: {', '.join(missing)}")
    return results


def _on_storage(a: argparse.Namespace, tasks: list[str], methods: list[str], seeds: list[int], out: Path, layers):
    """The table's cells through the storage: a worker runs cells and returns None; the main process
    enqueues the missing ones, runs cells too, waits for the others and returns every finished cell."""
    import time

    from obd.cells import enqueue, finished, open_table, work
    from obd.config import to_dict

    study = open_table(a.storage, a.budget, out)
    if a.worker:
        while not any("cell" in t.user_attrs for t in study.get_trials(deepcopy=False)):
            time.sleep(2)  # the main process has not enqueued the table yet
        print(f"this worker ran {work(study)} cell(s)")
        return None
    wanted = {(t, m, s) for t in tasks for m in methods for s in seeds}
    if not a.rebuild:
        threads = a.threads or 1
        cells = {k: to_dict(cell_config(*k, a.budget, out, layers, threads)) for k in sorted(wanted)}
        log.info("%d new cell(s) enqueued in %s", enqueue(study, cells), study.study_name)
        work(study, wait_for_all=True)
    results = {k: m for k, m in finished(study).items() if k in wanted}
    missing = sorted(wanted - set(results))
    if missing:
        print(f"not finished yet: {', '.join(f'{t}/{m}/s{s}' for t, m, s in missing)}")
    return results


if __name__ == "__main__":
    sys.exit(cli(main))
