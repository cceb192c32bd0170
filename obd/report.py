"""``make report TASK=...``: ``report.md`` and PNG plots from a finished sweep directory.

Reads only what earlier stages wrote: ``summary.json``, each final run's ``metrics.json`` and
``synthetic.npz``, and the stage-2 artifacts those runs name (the dataset file, its normalization,
the log-density). Plots: normalized return per method over seeds, learning curves (mean and band
over seeds), and a PCA projection of the real states coloured by log density with each method's
synthetic states in its own panel.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from obd.errors import ObdError, cli

COLORS = {
    "sdw": "tab:red",
    "avpbc": "tab:blue",
    "pbc": "tab:green",
    "dbc": "tab:purple",
    "random": "tab:gray",
    "random-teacher": "tab:olive",
    "kmeans-teacher": "tab:brown",
}


def _finals(out: Path, method: str) -> list[dict]:
    runs = sorted((out / "final" / method).glob("seed-*/metrics.json"))
    return [{**json.loads(p.read_text()), "_dir": p.parent} for p in runs]


# method names as the papers write them
LABELS = {
    "sdw": "SDW",
    "avpbc": "Av-PBC",
    "pbc": "PBC",
    "dbc": "DBC",
    "random": "random real pairs",
    "random-teacher": "random states, pi* labels",
    "kmeans-teacher": "k-means states, pi* labels",
}
MARKERS = {"sdw": "s", "avpbc": "o", "pbc": "^", "dbc": "v"}


def label(method: str) -> str:
    return LABELS.get(method, method)


def plot_returns(summary: dict, path: Path):
    """One bar per method: mean over seeds, error bar = standard deviation over seeds, dots = seeds."""
    import matplotlib.pyplot as plt

    methods = list(summary["methods"])
    fig, ax = plt.subplots(figsize=(2 + 1.5 * len(methods), 3.8))
    for i, m in enumerate(methods):
        row = summary["methods"][m]
        ax.bar(i, row["mean"], yerr=row["std"], capsize=6, color=COLORS.get(m, "gray"), alpha=0.7)
        vals = list(row["per_seed"].values())
        ax.scatter([i] * len(vals), vals, color="k", s=12, zorder=3)
    ax.set_xticks(range(len(methods)), [f"{label(m)}\n(n={summary['methods'][m]['n']})" for m in methods], fontsize=8)
    ax.set_ylabel("normalized return (the run's score)")
    ax.set_title(
        f"{summary['task']}, budget {summary['budget']}: bars mean, error bars std over seeds, dots seeds", fontsize=9
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def plot_curves(out: Path, methods: list[str], path: Path, task: str, budget: str = ""):
    """Learning curves of the distillation methods (mean over seeds, band = std over seeds, markers so
    overlapping lines stay visible); a set that needs no outer loop is a horizontal reference line."""
    import matplotlib.pyplot as plt
    import numpy as np

    from obd.config import BASELINE_START

    fig, ax = plt.subplots(figsize=(6.5, 4))
    drawn = 0
    for m in methods:
        runs = [r for r in _finals(out, m) if r.get("history")]
        if not runs:
            continue
        if m in BASELINE_START:
            v = np.array([r["score"] for r in runs])
            ax.axhline(
                v.mean(),
                color=COLORS.get(m, "gray"),
                linestyle="--",
                linewidth=1.2,
                label=f"{label(m)}: {v.mean():.1f} (no outer loop, n={len(v)})",
            )
            continue
        hists = [r["history"] for r in runs]
        steps = [h["step"] for h in hists[0]]
        vals = np.array([[h["score"] for h in r][: len(steps)] for r in hists if len(r) >= len(steps)])
        mu, sd = vals.mean(0), vals.std(0)
        # each method's markers are shifted a little along x so identical curves stay distinguishable
        dx = (drawn - 0.5) * 0.01 * (steps[-1] - steps[0] if len(steps) > 1 else 1)
        ax.errorbar(
            np.array(steps) + dx,
            mu,
            yerr=sd,
            marker=MARKERS.get(m, "o"),
            markersize=5,
            capsize=3,
            color=COLORS.get(m),
            label=f"{label(m)} (n={len(vals)} seeds)",
            alpha=0.9,
        )
        drawn += 1
    ax.set_xlabel("outer step")
    ax.set_ylabel("normalized return")
    ax.set_title(f"{task}, budget {budget}: mean over seeds, error bars = std over seeds", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return fig


def plot_projection(out: Path, methods: list[str], path: Path, n: int = 20_000):
    """PCA of (normalized) real states, coloured by the cached log-density; one panel per method."""
    import matplotlib.pyplot as plt
    import numpy as np

    from obd.data import get_task, load_source
    from obd.seeding import numpy_rng

    runs = {m: _finals(out, m) for m in methods}
    runs = {m: r for m, r in runs.items() if r}
    if not runs:
        return None
    first = next(iter(runs.values()))[0]
    arts = first.get("artifacts") or {}
    sdw = next((r[0] for m, r in runs.items() if m == "sdw"), None)
    task = get_task(first["task"])
    ds = load_source(arts["dataset"], task)
    with np.load(arts["normalization"]) as z:
        mean, std = z["mean"], z["std"]
    rng = numpy_rng(0, "report-projection")
    pick = rng.choice(len(ds), min(n, len(ds)), replace=False)
    x = (ds.observations[pick] - mean) / std
    logp_path = (sdw or {}).get("artifacts", {}).get("log_density") if sdw else None
    logp = np.load(logp_path)[pick] if logp_path and Path(logp_path).is_file() else None
    center = x.mean(0)
    _, _, vt = np.linalg.svd(x - center, full_matrices=False)

    def proj(a: np.ndarray) -> np.ndarray:
        return (a - center) @ vt[:2].T

    px = proj(x)
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 4), squeeze=False, sharex=True, sharey=True)
    lo, hi = np.percentile(logp, [2, 98]) if logp is not None else (None, None)
    for ax, (m, rs) in zip(axes[0], runs.items()):
        sc = ax.scatter(
            *px.T,
            c=logp if logp is not None else "lightgray",
            s=2,
            cmap="viridis",
            vmin=lo,
            vmax=hi,
            alpha=0.4,
            rasterized=True,
        )
        with np.load(rs[0]["_dir"] / "synthetic.npz") as z:
            ax.scatter(
                *proj(z["states"]).T,
                s=22,
                marker="o",
                facecolor=COLORS.get(m, "k"),
                edgecolor="k",
                linewidth=0.5,
                label=f"{m} synthetic (seed {rs[0]['seed']})",
            )
        ax.set_title(m)
        ax.set_xlabel("PC 1")
        ax.legend(loc="upper right", fontsize=7)
    axes[0][0].set_ylabel("PC 2")
    if logp is not None:
        fig.colorbar(sc, ax=axes[0].tolist(), label="log density (k-NN KDE, 2-98% range)")
    fig.suptitle(f"{task.name}: real states (PCA of normalized states) and synthetic sets")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return fig


def set_warnings(out: Path, methods: list[str]) -> list[str]:
    """Methods whose final sets did not move from their start, or equal another method's sets."""
    import numpy as np

    from obd.config import BASELINE_START

    warnings = []
    sets = {}
    for m in methods:
        if m in BASELINE_START:
            continue
        runs = _finals(out, m)
        moved = [r["set_change"]["relative"] for r in runs if (r.get("set_change") or {}).get("relative") is not None]
        if moved and max(moved) < 1e-3:
            warnings.append(
                f"{m}: every final set is its start (relative change at most {max(moved):.1e}); "
                "distillation did not move it, so its score is its start's"
            )
        sets[m] = [
            np.load(r["_dir"] / "synthetic.npz")["states"] for r in runs if (r["_dir"] / "synthetic.npz").is_file()
        ]
    done = [m for m in sets if sets[m]]
    for i, a in enumerate(done):
        for b in done[i + 1 :]:
            if len(sets[a]) == len(sets[b]) and all(np.array_equal(x, y) for x, y in zip(sets[a], sets[b])):
                warnings.append(f"{a} and {b}: identical final sets")
    return warnings


def write_report(out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    path = out / "summary.json"
    if not path.is_file():
        raise ObdError(f"{path}: no sweep summary; run `make sweep` first")
    s = json.loads(path.read_text())
    methods = list(s["methods"])
    plot_returns(s, out / "returns.png")
    plot_curves(out, methods, out / "curves.png", s["task"], s["budget"])
    has_proj = plot_projection(out, methods, out / "projection.png") is not None
    pr = s["protocol"]
    teacher = s.get("teacher") or {}
    t_score = (teacher.get("normalized_return") or {}).get("mean")
    lines = [
        f"# {s['task']}: {' vs '.join(methods)} (budget `{s['budget']}`)",
        "",
        *(
            ["**smoke: a plumbing check; the numbers mean nothing** (a few outer steps on tiny data).", ""]
            if s["budget"] == "smoke"
            else []
        ),
        *[f"**Warning:** {w}" + "\n" for w in set_warnings(out, methods)],
        f"Dataset: {s['transitions']:,} transitions, behaviour score {s['behaviour_score']:.1f}. "
        f"Teacher: {teacher.get('kind', '-')} scoring {t_score:.1f}"
        + (
            f" +/- {(teacher.get('normalized_return') or {})['se']:.1f} s.e. over "
            f"{(teacher.get('normalized_return') or {}).get('episodes')} episodes"
            if (teacher.get("normalized_return") or {}).get("se") is not None
            else ""
        )
        + (f" (CORL's TD3+BC on D4RL: {teacher['corl_td3bc_score']})" if teacher.get("corl_td3bc_score") else "")
        if t_score is not None
        else f"Dataset: {s['transitions']:,} transitions, behaviour score {s['behaviour_score']:.1f}.",
        "",
        f"Protocol: each evaluation trains {pr['policies']} fresh policies x {pr['episodes']} episodes; "
        f"a run's score is the mean of its last {pr['last_k']} evaluations (Av-PBC/SDW default), all of them in "
        "the final 20% of its outer steps (fewer when fewer lie there; never an earlier one).",
        "",
        "| method | normalized return (mean +/- std over seeds) | seeds | per seed | best trial | "
        "trials (complete / pruned / failed) |",
        "|---|---|---|---|---|---|",
    ]
    for m, r in s["methods"].items():
        t = r.get("trials")
        per = ", ".join(f"{v:.1f}" for v in r["per_seed"].values())
        trials = f"{t['complete']} / {t['pruned']} / {t['fail']}" if t else "-"
        best = f"{r['best_trial_value']:.1f}" if "best_trial_value" in r else "-"
        lines.append(f"| {m} | {r['mean']:.1f} +/- {r['std']:.1f} | {r['n']} | {per} | {best} | {trials} |")
    lines += [
        "",
        "| comparison | mean paired difference | 95% paired t CI | Wilcoxon p | 95% Welch CI | verdict |",
        "|---|---|---|---|---|---|",
    ]
    rows = [(name, c) for name, c in s["comparisons"].items()]
    for name, c in rows:
        ci, wci = c.get("paired_t_ci"), c.get("welch_ci")
        fmt = lambda v: f"[{v[0]:+.1f}, {v[1]:+.1f}]" if v else "-"  # noqa: E731
        wp = f"{c['wilcoxon_p']:.3f}" if "wilcoxon_p" in c else "-"
        lines.append(
            f"| {name} | {c['mean_difference']:+.1f} ({c['n_pairs']} seeds) | {fmt(ci)} | {wp} | "
            f"{fmt(wci)} | {c['verdict']} |"
        )
    lines += ["", "Best configurations:", ""]
    lines += [f"- {m}: `{json.dumps(r['best_params'])}`" for m, r in s["methods"].items() if "best_params" in r]
    lines += ["", "![normalized return per method](returns.png)", "", "![learning curves](curves.png)"]
    if has_proj:
        lines += ["", "![states and synthetic sets](projection.png)"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m obd.report", description=__doc__)
    p.add_argument("--task", default="halfcheetah-medium", help="default halfcheetah-medium")
    p.add_argument("--out", default=None, help="the sweep directory (default runs/sweep-TASK)")
    a = p.parse_args(argv)
    print(write_report(a.out or f"runs/sweep-{a.task}"))
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
