"""``make report TASK=...``: ``report.md`` and PNG plots from a finished sweep directory.

Plots: normalized return per method (mean +/- std over the final seeds), learning curves of the
final runs, and a 2-D PCA projection of the original (normalized) states coloured by estimated
log density, with the synthetic states of SDW and Av-PBC (first final seed) overlaid.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from obd.density import DensityConfig, log_density  # noqa: E402

COLORS = {"sdw": "tab:red", "avpbc": "tab:blue", "pbc": "tab:green", "dbc": "tab:purple"}


def _finals(out: Path, method: str) -> list[dict]:
    """Metrics of each final run of ``method``, with ``_dir`` (its output directory) added."""
    runs = sorted((out / "final" / method).glob("seed-*/metrics.json"))
    return [{**json.loads(p.read_text()), "_dir": p.parent} for p in runs]


def plot_returns(summary: dict, path: Path) -> None:
    methods = list(summary["methods"])
    means = [summary["methods"][m]["mean"] for m in methods]
    stds = [summary["methods"][m]["std"] for m in methods]
    fig, ax = plt.subplots(figsize=(4 + len(methods), 3.5))
    ax.bar(methods, means, yerr=stds, capsize=6, color=[COLORS.get(m, "gray") for m in methods], alpha=0.8)
    for i, m in enumerate(methods):
        ax.scatter([i] * len(summary["methods"][m]["values"]), summary["methods"][m]["values"], color="k", s=12, zorder=3)
    ax.set_ylabel("normalized return")
    ax.set_title(f"{summary['task']}: final seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_curves(out: Path, methods: list[str], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for m in methods:
        hist = [r["history"] for r in _finals(out, m) if r.get("history")]
        if not hist:
            continue
        steps = [h["step"] for h in hist[0]]
        vals = np.array([[h["normalized_return_mean"] for h in r][: len(steps)] for r in hist
                         if len(r) >= len(steps)])
        mu, sd = vals.mean(0), vals.std(0)
        ax.plot(steps, mu, label=m, color=COLORS.get(m))
        ax.fill_between(steps, mu - sd, mu + sd, color=COLORS.get(m), alpha=0.2)
    ax.set_xlabel("outer step")
    ax.set_ylabel("normalized return")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_projection(out: Path, methods: list[str], path: Path, n: int = 20_000) -> bool:
    runs = {m: _finals(out, m) for m in methods}
    first = next((r[0] for r in runs.values() if r), None)
    if first is None:
        return False
    from obd.data import load_source, resolve_task

    data_cfg = first["config"]["data"]
    task = resolve_task(data_cfg["source"], data_cfg.get("task"))
    ds = load_source(data_cfg["source"], task, size=data_cfg.get("size"), seed=data_cfg.get("data_seed", 0),
                     show_progress=False)
    mean, std = ds.observations.mean(0), ds.observations.std(0) + 1e-3
    rng = np.random.default_rng(0)
    x = (ds.observations[rng.choice(len(ds), min(n, len(ds)), replace=False)] - mean) / std
    logp = log_density(x.astype(np.float32), DensityConfig())
    center = x.mean(0)
    _, _, vt = np.linalg.svd(x - center, full_matrices=False)
    proj = lambda a: (a - center) @ vt[:2].T  # noqa: E731
    fig, ax = plt.subplots(figsize=(6, 5))
    sc = ax.scatter(*proj(x).T, c=logp, s=2, cmap="viridis", alpha=0.5, rasterized=True)
    fig.colorbar(sc, ax=ax, label="log density (kNN KDE)")
    for m, marker in (("sdw", "*"), ("avpbc", "o")):
        if runs.get(m):
            z = np.load(runs[m][0]["_dir"] / "synthetic.npz")
            ax.scatter(*proj(z["states"]).T, marker=marker, s=40, edgecolor="k", color=COLORS[m], label=f"{m} synthetic")
    ax.set_xlabel("PC 1")
    ax.set_ylabel("PC 2")
    ax.legend(loc="best")
    ax.set_title(f"{task.name}: states (PCA) and synthetic sets")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_report(out: str | Path) -> Path:
    out = Path(out)
    path = out / "summary.json"
    if not path.is_file():
        raise ValueError(f"{path}: no sweep summary; run `make sweep` first")
    summary = json.loads(path.read_text())
    methods = list(summary["methods"])
    plot_returns(summary, out / "returns.png")
    plot_curves(out, methods, out / "curves.png")
    has_proj = plot_projection(out, methods, out / "projection.png")
    lines = [f"# {summary['task']}: {' vs '.join(methods)} (budget `{summary['budget']}`)", "",
             "| method | normalized return (mean +/- std) | seeds | best trial | trials (complete / pruned / failed) |",
             "|---|---|---|---|---|"]
    for m, r in summary["methods"].items():
        t = r["trials"]
        lines.append(f"| {m} | {r['mean']:.1f} +/- {r['std']:.1f} | {r['n']} | {r['best_trial_value']:.1f} | "
                     f"{t['complete']} / {t['pruned']} / {t['fail']} |")
    if "difference" in summary:
        d = summary["difference"]
        lines += ["", f"Difference {d['of']}: **{d['mean']:+.1f}** (95% bootstrap CI "
                      f"[{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}])."]
    lines += ["", "Best configurations:", ""]
    lines += [f"- {m}: `{json.dumps(r['best_params'])}`" for m, r in summary["methods"].items()]
    lines += ["", "![normalized return per method](returns.png)", "", "![learning curves](curves.png)"]
    if has_proj:
        lines += ["", "![states and synthetic sets](projection.png)"]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m obd.report", description=__doc__)
    p.add_argument("--task", default="halfcheetah-medium")
    p.add_argument("--out", default=None, help="the sweep directory (default runs/sweep-TASK)")
    a = p.parse_args(argv)
    try:
        path = write_report(a.out or f"runs/sweep-{a.task}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
