"""``python -m obd.docs``: fill the generated tables of README.md and docs/*.md from committed files.

A generated block sits between ``<!-- BEGIN generated: NAME -->`` and ``<!-- END generated: NAME -->``.
NAME is a results folder (``results/quick``: the table of ``obd.table``, see
:func:`obd.table.readme_block`) or one of :data:`TABLES`, each made from committed files only:

- ``docs:policies``: the shipped behaviour policies' scores (``obd/behavior/policies/ENV.pt``);
- ``docs:weights``: where Av-PBC's and SDW's weights go, from the quick runs' ``metrics.json``;
- ``docs:quick-steps``: the quick runs' Av-PBC mean score at each evaluated step;
- ``docs:curves``: each dataset's plateau, from ``results/curves/plateau.csv``;
- ``docs:curves-comparison``: SDW - Av-PBC on each plateau and the diversity claim, from
  ``results/curves/comparison.csv`` and ``diversity.json``;
- ``variants:FOLDER``: recipes of one dataset against a reference, from ``FOLDER/variants.csv``
  (the output of ``python -m obd.variants``);
- ``readings:FOLDER``: a table of ``obd.table`` (``FOLDER/table.csv``) against the quick table, per
  dataset: Av-PBC and SDW - Av-PBC, and whether the SDW - Av-PBC reading changed;
- ``docs:converged``: the ``converged`` budget per dataset (outer steps, teacher steps) and a run's
  distillation CPU minutes at that length, read off ``results/curves/curves.csv``;
- ``docs:failed-policies``: per dataset of ``results/converged``, the share of Av-PBC's and SDW's evaluation
  policies that fail, and the others' mean return;
- ``docs:teachers``: every teacher a committed run or ``results/teachers/*.json`` (the output of
  ``python -m obd.targets``) records, its score beside CORL's TD3+BC.

``--check`` exits 1 when a block differs from what its files give (a test runs it).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from obd.errors import ObdError, cli

ROOT = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"<!-- BEGIN generated: (\S+) -->\n(.*?)<!-- END generated: \1 -->", re.S)


def _runs(folder: Path, method: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in sorted(folder.glob(f"runs/*/{method}-s*/metrics.json")):
        m = json.loads(p.read_text())
        out.setdefault(m["task"], []).append(m)
    return out


def policies_table(root: Path) -> str:
    import torch

    lines = [
        "| env | medium (SAC step) | expert (SAC step of the run) | the run's last snapshot |",
        "|---|---|---|---|",
    ]
    for p in sorted((root / "obd" / "behavior" / "policies").glob("*.pt")):
        pf = torch.load(p, weights_only=True)
        meta = json.loads(pf["meta"])
        med, exp = pf["medium"], pf.get("expert")
        run_len = f"{meta['trained_steps'] / 1e6:g}M"
        expert = f"{exp['score']:.1f} +/- {exp['score_std']:.1f} ({exp['step'] / 1e6:g}M of {run_len})" if exp else "-"
        last = f"{meta['last_snapshot_score']:.1f}" if meta.get("last_snapshot_score") is not None else "-"
        medium = f"{med['score']:.1f} +/- {med['score_std']:.1f} ({med['step'] // 1000}k)"
        lines.append(f"| {pf['env']} | {medium} | {expert} | {last} |")
    return "\n".join(lines) + "\n"


def weights_table(root: Path) -> str:
    from obd.table import NINE

    av, sdw = _runs(root / "results" / "quick", "avpbc"), _runs(root / "results" / "quick", "sdw")
    lines = [
        "| dataset | corr(log p, Q) | Av-PBC: ESS, low-Q share | SDW: ESS, low-Q share |",
        "|---|---|---|---|",
    ]
    for task in NINE:
        if task not in av or task not in sdw:
            continue
        a, s = av[task][0], sdw[task][0]

        def num(d: dict, *keys: str) -> str:
            for k in keys:
                d = d.get(k) if isinstance(d, dict) else None  # type: ignore[assignment]
            return f"{d:.2f}" if isinstance(d, float) else "-"  # "-": the run predates the statistic

        lines.append(
            f"| {task} | {num(s, 'density_q_correlation')} | {num(a, 'weight_stats', 'ess_fraction')}, "
            f"{num(a, 'weight_stats', 'low_q_share')} | {num(s, 'weight_stats', 'ess_fraction')}, "
            f"{num(s, 'weight_stats', 'low_q_share')} |"
        )
    return "\n".join(lines) + "\n"


def quick_steps_table(root: Path) -> str:
    from obd.table import NINE, PUBLISHED_AVPBC

    av = _runs(root / "results" / "quick", "avpbc")
    steps = sorted({h["step"] for runs in av.values() for m in runs for h in m["history"]})
    lines = [
        "| dataset | " + " | ".join(f"step {s}" for s in steps) + " | published Av-PBC (50k steps) |",
        "|---|" + "---|" * (len(steps) + 1),
    ]
    for task in NINE:
        if task not in av:
            continue
        means = [np.mean([h["score"] for m in av[task] for h in m["history"] if h["step"] == s]) for s in steps]
        lines.append(f"| {task} | " + " | ".join(f"{v:.1f}" for v in means) + f" | {PUBLISHED_AVPBC[task]} |")
    return "\n".join(lines) + "\n"


def flat_cell(r: dict) -> str:
    """``yes`` when flat; otherwise which way the last third's paired change goes, or ``unclear`` when its
    interval spans zero (the evaluations' noise hides the trend; one seed has no interval)."""
    if r["flat"] == "True":
        return "yes"
    lo, hi = r.get("change_ci_low"), r.get("change_ci_high")
    if lo and hi and float(lo) > 0:
        return "no: rising"
    if lo and hi and float(hi) < 0:
        return "no: falling"
    return "no: unclear"


def curves_table(root: Path) -> str:
    """One row per dataset and method of ``results/curves/plateau.csv``; for Av-PBC, whether its plateau
    is within 2 points of the published score (or above) within 15 CPU minutes of distillation."""
    from obd.table import PUBLISHED_AVPBC, PUBLISHED_SDW

    path = root / "results" / "curves" / "plateau.csv"
    if not path.is_file():
        return "No curves committed yet (`python -m obd.curves`).\n"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    lines = [
        "| dataset | method | seeds | outer steps | plateau score (+/- s.e.) | change over the last third (95% CI) | "
        "flat | steps to the plateau | distillation CPU min to it | published | published - 2 within 15 CPU min |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    met: dict[str, list[str]] = {}
    for r in rows:
        se = f" +/- {float(r['plateau_se']):.1f}" if r.get("plateau_se") else ""
        cpu_s = float(r["cpu_seconds_to_plateau"]) if r.get("cpu_seconds_to_plateau") else None
        cpu = "-" if cpu_s is None else f"{cpu_s / 60:.1f}"
        published = (PUBLISHED_AVPBC if r["method"] == "avpbc" else PUBLISHED_SDW).get(r["task"])
        target = "-"
        if r["method"] == "avpbc" and published is not None and cpu_s is not None:
            target = "yes" if float(r["plateau_score"]) >= published - 2 and cpu_s <= 15 * 60 else "no"
        lo, hi = r.get("change_ci_low"), r.get("change_ci_high")
        change = f"{float(r['last_third_change']):+.1f}" + (
            f" [{float(lo):+.1f}, {float(hi):+.1f}]" if lo and hi else ""
        )
        lines.append(
            f"| {r['task']} | {r['method']} | {r['seeds']} | {r['outer_steps']} | "
            f"{float(r['plateau_score']):.1f}{se} | {change} | {flat_cell(r)} | "
            f"{r['steps_to_plateau']} | {cpu} | {'-' if published is None else published} | {target} |"
        )
        if target != "-":
            met.setdefault(target, []).append(r["task"])
    text = "\n".join(lines) + "\n"
    if met:
        n = sum(len(v) for v in met.values())
        text += (
            f"\nAv-PBC within 2 points of its published score within 15 distillation CPU minutes: "
            f"{len(met.get('yes', []))} of the {n} datasets measured ({', '.join(met.get('yes', [])) or 'none'}).\n"
        )
    return text


def curves_comparison_table(root: Path) -> str:
    """SDW - Av-PBC on the plateau per dataset (paired by seed), then the diversity claim's line."""
    from obd.table import PUBLISHED_AVPBC, PUBLISHED_SDW, ci_cell, teacher_cell

    folder = root / "results" / "curves"
    if not (folder / "comparison.csv").is_file():
        return "No paired plateau comparison committed yet (`python -m obd.curves`).\n"
    with open(folder / "comparison.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    quick = _quick_rows(root)
    lines = [
        "| dataset | teacher (+/- s.e.; CORL's TD3+BC) | outer steps | paired seeds | "
        "SDW - Av-PBC on the plateau (95% t CI) | Wilcoxon p | state diversity | published SDW - Av-PBC | "
        "the quick table's reading (300 steps) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ci = ci_cell(float(r["ci_low"]), float(r["ci_high"])) if r.get("ci_low") else ""
        p = r.get("wilcoxon_p") or "-"
        pub = PUBLISHED_SDW.get(r["task"])
        gap = f"{pub - PUBLISHED_AVPBC[r['task']]:+.1f}" if pub is not None else "-"
        diversity = f"{float(r['state_diversity']):.2f}" if r.get("state_diversity") else "-"
        before = _quick_reading(quick.get(r["task"]), r)
        lines.append(
            f"| {r['task']} | {teacher_cell(r)} | {r['outer_steps']} | {r['n_pairs']} | "
            f"{float(r['sdw_minus_avpbc']):+.1f}{ci} | {p} | {diversity} | {gap} | {before} |"
        )
    text = "\n".join(lines) + "\n"
    if (folder / "diversity.json").is_file():
        c = json.loads((folder / "diversity.json").read_text())
        text += (
            f"\nSDW - Av-PBC against state diversity over {c['n']} datasets (`results/curves/diversity.png`): "
            f"Spearman rho {c['rho']:+.2f} [{c['ci_low']:+.2f}, {c['ci_high']:+.2f}] (95%, Fisher z), p = "
            f"{c['p']:.3f}; SDW's claim predicts a negative rho.\n"
        )
    return text


def _quick_rows(root: Path) -> dict[str, dict]:
    """The quick table's rows with a paired SDW - Av-PBC interval, by task."""
    path = root / "results" / "quick" / "table.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {r["task"]: r for r in csv.DictReader(f) if r.get("ci_low") and r.get("ci_high")}


def _quick_reading(quick: dict | None, now: dict) -> str:
    """The quick table's SDW - Av-PBC reading, and whether ``now``'s interval (if any) reads the same."""
    from obd.table import reading

    if quick is None:
        return "-"
    before = reading(float(quick["ci_low"]), float(quick["ci_high"]))
    if now.get("ci_low") not in (None, "") and now.get("ci_high") not in (None, ""):
        same = before == reading(float(now["ci_low"]), float(now["ci_high"]))
        before += " (same)" if same else " (changed)"
    return before


def readings_table(folder: Path, root: Path) -> str:
    """Per dataset of ``folder``'s table (``obd.table``'s table.csv): its SDW - Av-PBC and Av-PBC against the
    quick table's (300 outer steps), and whether the SDW - Av-PBC reading changed."""
    from obd.config import build_config
    from obd.table import ci_cell

    path = folder / "table.csv"
    if not path.is_file():
        return f"No table in {folder.relative_to(root)} yet (`python -m obd.table`).\n"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    quick = _quick_rows(root)
    lines = [
        "| dataset | outer steps | seeds | Av-PBC here (quick) | SDW - Av-PBC here (95% t CI) | "
        "the quick table's reading (300 steps) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        steps = build_config(r["budget"], [{"data": {"source": r["task"]}}]).outer_steps
        q = quick.get(r["task"])
        av = f"{float(r['avpbc_mean']):.1f}" if r.get("avpbc_mean") else "-"
        if q is not None and q.get("avpbc_mean"):
            av += f" ({float(q['avpbc_mean']):.1f})"
        diff = "-"
        if r.get("sdw_minus_avpbc"):
            diff = f"{float(r['sdw_minus_avpbc']):+.1f}"
            if r.get("ci_low") and r.get("ci_high"):
                diff += ci_cell(float(r["ci_low"]), float(r["ci_high"]))
        seeds = r.get("n_pairs") or r.get("avpbc_n") or "-"
        lines.append(f"| {r['task']} | {steps} | {seeds} | {av} | {diff} | {_quick_reading(q, r)} |")
    return "\n".join(lines) + "\n"


def converged_table(root: Path) -> str:
    """Per dataset, the ``converged`` budget's outer steps and teacher steps, and the distillation CPU
    minutes a run of that length took in the curves (mean over their runs that reached it, both methods)."""
    from obd.config import build_config
    from obd.table import NINE

    cpu: dict[tuple[str, int], list[float]] = {}
    path = root / "results" / "curves" / "curves.csv"
    if path.is_file():
        with open(path, newline="") as f:
            for r in csv.DictReader(f):
                if r.get("distill_cpu_s"):
                    cpu.setdefault((r["task"], int(r["step"])), []).append(float(r["distill_cpu_s"]))
    lines = [
        "| dataset | outer steps | teacher TD3+BC steps | distillation CPU min per run (curves' runs at that step) |",
        "|---|---|---|---|",
    ]
    for task in NINE:
        cfg = build_config("converged", [{"data": {"source": task}}])
        T = cfg.outer_steps
        at = cpu.get((task, T))
        minutes = f"{np.mean(at) / 60:.1f} ({len(at)} runs)" if at else "- (no curve reaches it)"
        lines.append(f"| {task} | {T} | {cfg.teacher.td3bc.steps // 1000}k | {minutes} |")
    return "\n".join(lines) + "\n"


FAILED = 5.0  # normalized return below which a policy counts as failed (the random policy scores 0)


def failed_policies_table(root: Path) -> str:
    """Per dataset of the converged table, Av-PBC's and SDW's fresh evaluation policies in their scored
    evaluations: the share that fail (normalized return below :data:`FAILED`), mean over seeds with the
    seeds' range, and the mean return of the others. A score can fall because more policies fail or
    because the others do worse; this tells which."""
    from obd.table import NINE

    folder = root / "results" / "converged"
    by_method = {m: _runs(folder, m) for m in ("avpbc", "sdw")}

    def cell(runs: list[dict]) -> str:
        shares, rest = [], []
        for m in runs:
            scored = set(m["scored_steps"])
            ps = np.array([x for h in m["history"] if h["step"] in scored for x in h["policy_scores"]])
            shares.append(float(np.mean(ps < FAILED)))
            rest.extend(ps[ps >= FAILED].tolist())
        others = f"{np.mean(rest):.1f}" if rest else "-"
        return f"{np.mean(shares):.0%} ({min(shares):.0%}-{max(shares):.0%}) | {others} | {len(runs)}"

    lines = [
        f"| dataset | Av-PBC: policies below {FAILED:g} (seeds' range) | Av-PBC: mean of the others | seeds | "
        f"SDW: policies below {FAILED:g} | SDW: mean of the others | seeds |",
        "|---|---|---|---|---|---|---|",
    ]
    for task in NINE:
        if task in by_method["avpbc"] and task in by_method["sdw"]:
            lines.append(f"| {task} | {cell(by_method['avpbc'][task])} | {cell(by_method['sdw'][task])} |")
    return "\n".join(lines) + "\n"


def variants_table(folder: Path) -> str:
    """One row per recipe of ``folder/variants.csv``: its plateau, and its paired difference from the
    reference at the same outer steps and on each one's own plateau."""
    from obd.table import ci_cell

    path = folder / "variants.csv"
    if not path.is_file():
        return f"No comparison committed in {folder.name}/ yet (`python -m obd.variants`).\n"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))

    def diff(r: dict, key: str) -> str:
        if not r.get(key):
            return "-"
        lo, hi = r.get(f"{key}_ci_low"), r.get(f"{key}_ci_high")
        return f"{float(r[key]):+.1f}" + (ci_cell(float(lo), float(hi), "") if lo and hi else "")

    lines = [
        "| recipe | runs | seeds | outer steps | plateau (+/- s.e.), flat | steps (CPU min) to it | "
        "minus the reference, same steps (95% t CI) | minus the reference, each on its own plateau | "
        "steps (CPU min) to the reference's plateau - 1 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        se = f" +/- {float(r['plateau_se']):.1f}" if r.get("plateau_se") else ""
        cpu = f" ({float(r['cpu_seconds_to_plateau']) / 60:.1f})" if r.get("cpu_seconds_to_plateau") else ""
        to_ref = "-" if r["source"] == rows[0]["source"] else "never"
        if r.get("steps_to_reference_level"):
            cpu_ref = r.get("cpu_seconds_to_reference_level")
            to_ref = r["steps_to_reference_level"] + (f" ({float(cpu_ref) / 60:.1f})" if cpu_ref else "")
        same = diff(r, "minus_reference_same_steps")
        if same != "-":
            same = f"at {r['common_steps']}: {same}"
        elif r.get("minus_reference_same_steps_verdict"):
            same = r["minus_reference_same_steps_verdict"]
        lines.append(
            f"| {r['recipe']} | `{r['source']}` | {r['seeds']} | {r['outer_steps']} | "
            f"{float(r['plateau_score']):.1f}{se}, {'flat' if r['flat'] == 'True' else 'not flat'} | "
            f"{r['steps_to_plateau']}{cpu} | {same} | {diff(r, 'minus_reference_own_plateaus')} | {to_ref} |"
        )
    return "\n".join(lines) + "\n"


def teachers_table(root: Path) -> str:
    from obd.table import NINE

    found: dict[tuple[str, str, str], tuple[dict, str]] = {}
    files = sorted(root.glob("results/*/runs/*/*/metrics.json")) + sorted(root.glob("results/teachers/*.json"))
    for p in files:
        m = json.loads(p.read_text())
        t = m.get("teacher")
        if t and t.get("normalized_return"):
            where = p.relative_to(root).parts[1]
            found.setdefault((m["task"], t["key"], m.get("data_hash", "")), (t, where))
    order = {task: i for i, task in enumerate(NINE)}
    lines = [
        "| dataset | TD3+BC steps | score +/- s.e. (episodes) | CORL's TD3+BC | of CORL's | dataset hash | in |",
        "|---|---|---|---|---|---|---|",
    ]
    rows = sorted(found.items(), key=lambda kv: (order.get(kv[0][0], 99), kv[0][0], kv[1][0]["config"]["steps"]))
    for (task, _, data_hash), (t, where) in rows:
        nr, corl = t["normalized_return"], t.get("corl_td3bc_score")
        n = nr.get("episodes") or 0
        se = nr.get("se")
        if se is None and n > 1 and nr.get("std") is not None:
            se = nr["std"] * (n / (n - 1)) ** 0.5 / n**0.5
        score = f"{nr['mean']:.1f}" + (f" +/- {se:.1f}" if se is not None else "") + f" ({n})"
        share = f"{100 * nr['mean'] / corl:.0f}%" if corl else "-"
        steps = f"{t['config']['steps'] // 1000}k"
        lines.append(f"| {task} | {steps} | {score} | {corl if corl else '-'} | {share} | {data_hash[:8]} | {where} |")
    return "\n".join(lines) + "\n"


TABLES: dict[str, Callable[[Path], str]] = {
    "docs:policies": policies_table,
    "docs:weights": weights_table,
    "docs:quick-steps": quick_steps_table,
    "docs:curves": curves_table,
    "docs:curves-comparison": curves_comparison_table,
    "docs:teachers": teachers_table,
    "docs:converged": converged_table,
    "docs:failed-policies": failed_policies_table,
}


def block(name: str, page: Path, root: Path = ROOT) -> str:
    """What the generated block NAME of ``page`` should hold."""
    if name in TABLES:
        return TABLES[name](root)
    if name.startswith("variants:"):
        return variants_table(root / name.split(":", 1)[1])
    if name.startswith("readings:"):
        return readings_table(root / name.split(":", 1)[1], root)
    from obd.table import readme_block

    return readme_block(Path(name), page.parent)


def pages(root: Path = ROOT) -> list[Path]:
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def fill(page: Path, root: Path = ROOT) -> list[str]:
    """Regenerate every block of ``page`` in place; the names of the blocks that changed."""
    text = page.read_text()
    changed = [name for name, body in BLOCK.findall(text) if body != block(name, page, root)]
    new = BLOCK.sub(
        lambda m: f"<!-- BEGIN generated: {m[1]} -->\n{block(m[1], page, root)}<!-- END generated: {m[1]} -->", text
    )
    page.write_text(new)
    return changed


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m obd.docs", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--check", action="store_true", help="change nothing; exit 1 when a block is out of date")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    stale = []
    for page in pages():
        if a.check:
            stale += [f"{page.name}: {n}" for n, body in BLOCK.findall(page.read_text()) if body != block(n, page)]
        else:
            stale += [f"{page.name}: {n}" for n in fill(page)]
    if a.check and stale:
        raise ObdError(f"generated blocks out of date: {', '.join(stale)}; run `python -m obd.docs`")
    print("\n".join(f"updated {s}" for s in stale) if stale else "every generated block is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
