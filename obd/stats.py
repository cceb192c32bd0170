"""Comparisons of two methods over seeds: paired by seed, with the uncertainty stated.

Runs with the same seed share their synthetic-set initialization, outer batches and evaluation
environments, so the per-seed difference removes that shared noise; the paired t interval is the
primary statement, the Wilcoxon signed-rank p-value a distribution-free check, and the Welch
interval (which ignores the pairing) is shown for comparison.
"""

from __future__ import annotations

import numpy as np


def paired_comparison(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> dict:
    """a - b over the seeds both have. ``a``, ``b``: seed -> score."""
    from scipy import stats

    seeds = sorted(set(a) & set(b))
    x = np.array([a[s] for s in seeds], dtype=np.float64)
    y = np.array([b[s] for s in seeds], dtype=np.float64)
    d = x - y
    n = len(d)
    out: dict = {
        "seeds": seeds,
        "n_pairs": n,
        "differences": d.tolist(),
        "level": level,
        "mean_difference": float(d.mean()) if n else None,
    }
    if n >= 2:
        se = d.std(ddof=1) / np.sqrt(n)
        h = float(stats.t.ppf(0.5 + level / 2, n - 1) * se)
        out["paired_t_ci"] = [float(d.mean() - h), float(d.mean() + h)]
        out["paired_t_p"] = float(stats.ttest_rel(x, y).pvalue) if se > 0 else (0.0 if d.mean() != 0 else 1.0)
        out["wilcoxon_p"] = float(stats.wilcoxon(x, y).pvalue) if np.any(d != 0) else 1.0
        vx, vy = x.var(ddof=1) / n, y.var(ddof=1) / n
        se_w = np.sqrt(vx + vy)
        if se_w > 0:
            dof = (vx + vy) ** 2 / (vx**2 / (n - 1) + vy**2 / (n - 1))
            hw = float(stats.t.ppf(0.5 + level / 2, dof) * se_w)
        else:
            hw = 0.0
        out["welch_ci"] = [float(x.mean() - y.mean() - hw), float(x.mean() - y.mean() + hw)]
    out["verdict"] = verdict(out)
    return out


def verdict(c: dict) -> str:
    """One honest sentence about the paired interval."""
    if c["n_pairs"] < 2:
        return "too few paired seeds for an interval"
    lo, hi = c["paired_t_ci"]
    few = f" (only {c['n_pairs']} paired seeds: treat with caution)" if c["n_pairs"] < 5 else ""
    if lo > 0:
        return "evidence of a positive difference" + few
    if hi < 0:
        return "evidence of a negative difference" + few
    return "no evidence of a difference: the interval spans zero" + few
