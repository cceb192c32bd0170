"""Comparisons of two methods over seeds: paired by seed, with the uncertainty stated.

Runs with the same seed share their synthetic-set initialization, outer batches and evaluation
environments, so the per-seed difference removes that shared noise; the paired t interval is the
primary statement, the Wilcoxon signed-rank p-value a distribution-free check, and the Welch
interval (which ignores the pairing) is shown for comparison.
"""

from __future__ import annotations

import numpy as np


def method_summary(runs: dict[int, dict]) -> dict:
    """One method's finished runs (seed -> metrics.json): mean, std (ddof 1; 0 for one seed) and n of their
    scores, the scores by seed, and the mean wall seconds of a run. Studies and tables both summarize so."""
    v = np.array([r["score"] for r in runs.values()], dtype=float)
    return {
        "mean": float(v.mean()) if len(v) else None,
        "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
        "n": len(v),
        "per_seed": {int(s): r["score"] for s, r in runs.items()},
        "wall_seconds_mean": float(np.mean([r["wall_seconds"] for r in runs.values()])) if len(v) else None,
    }


def teacher_of(runs: list[dict]) -> dict | None:
    """The teacher record the runs of one dataset carry (the first that has one)."""
    return next((r["teacher"] for r in runs if r.get("teacher")), None)


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


def compare_results(a_dir: str, b_dir: str, steps: tuple[int, ...] = ()) -> list[dict]:
    """Runs of two result folders (``OUT/runs/TASK/METHOD-sSEED/metrics.json``, as ``obd.table`` writes)
    paired by (task, method, seed): A - B of the last-K score and of the final evaluation.

    ``FOLDER:METHOD`` on both sides pairs A's METHOD with B's (e.g. ``new:sdw old:avpbc``) by task and seed.
    """
    import json
    from pathlib import Path

    from obd.evaluate import rescore

    def split(spec: str) -> tuple[str, str | None]:
        folder, _, method = spec.rpartition(":")
        return (folder, method) if folder and method and not Path(spec).exists() else (spec, None)

    def load(d: str, only: str | None) -> dict[tuple[str, str], dict[int, dict]]:
        runs: dict[tuple[str, str], dict[int, dict]] = {}
        for p in sorted(Path(d).glob("runs/*/*/metrics.json")):
            m = rescore(json.loads(p.read_text()))
            if only is None or m["method"] == only:
                runs.setdefault((m["task"], "" if only else m["method"]), {})[int(m["seed"])] = m
        return runs

    (a_path, a_method), (b_path, b_method) = split(a_dir), split(b_dir)
    if (a_method is None) != (b_method is None):
        from obd.errors import ObdError

        raise ObdError("name a method on both sides (FOLDER:METHOD) or on neither")
    a, b = load(a_path, a_method), load(b_path, b_method)
    rows = []
    for key in sorted(set(a) & set(b)):
        seeds = sorted(set(a[key]) & set(b[key]))
        if not seeds:
            continue
        row: dict = {"task": key[0], "method": key[1] or f"{a_method} - {b_method}"}
        for what in ("score", "final_score", *(f"step {t}" for t in steps)):

            def value(m: dict, what: str = what) -> float:
                if not what.startswith("step "):
                    return float(m[what])
                at = {h["step"]: h["score"] for h in m.get("history") or []}
                if int(what[5:]) not in at:
                    raise ObdError(f"{m['task']} {m['method']} seed {m['seed']}: no evaluation at outer {what}")
                return float(at[int(what[5:])])

            sa = {s: value(a[key][s]) for s in seeds}
            sb = {s: value(b[key][s]) for s in seeds}
            row[what] = {"a_mean": float(np.mean(list(sa.values()))), "b_mean": float(np.mean(list(sb.values())))}
            row[what] |= paired_comparison(sa, sb)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m obd.stats",
        description="A - B for the runs two result folders share (paired by task, method and seed).",
    )
    p.add_argument("a", help="a results folder (OUT of obd.table), or FOLDER:METHOD")
    p.add_argument("b", help="another one (FOLDER:METHOD when A names a method)")
    p.add_argument("--steps", default="", help="also compare the evaluations at these outer steps, e.g. 100,200")
    args = p.parse_args(argv)
    try:
        steps = tuple(int(x) for x in args.steps.split(",") if x)
    except ValueError:
        from obd.errors import ConfigError

        raise ConfigError(f"--steps: expected outer steps like 100,200, got {args.steps!r}") from None
    rows = compare_results(args.a, args.b, steps)
    if not rows:
        from obd.errors import ObdError

        raise ObdError(f"{args.a} and {args.b} share no (task, method) with runs/*/*/metrics.json")
    for r in rows:
        labels = [("score", "score"), ("final_score", "final evaluation")] + [(f"step {t}", f"step {t}") for t in steps]
        for what, label in labels:
            c = r[what]
            ci = c.get("paired_t_ci")
            print(
                f"{r['task']} {r['method']} {label}: A {c['a_mean']:.1f}, B {c['b_mean']:.1f}, A - B "
                f"{c['mean_difference']:+.1f}"
                + (f" [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")
                + f" over {c['n_pairs']} seeds: {c['verdict']}"
            )
    return 0


if __name__ == "__main__":
    import sys

    from obd.errors import cli

    sys.exit(cli(main))
