"""Plateau detection on curves with a known shape, and the files obd.curves writes from run folders."""

import json

import numpy as np
import pytest

from obd.curves import build, distill_cpu_seconds, plateau


def curve(shape, seed: int, steps=range(100, 3001, 100), noise: float = 0.3):
    rng = np.random.default_rng(seed)
    return [(s, shape(s) + noise * rng.normal(), 2.0 * s) for s in steps]


def test_a_curve_that_rises_then_levels_off_is_flat_and_reaches_its_plateau_at_the_knee():
    def shape(s):
        return 40.0 * min(1.0, s / 1000)  # rises to 40 at step 1000, flat after

    p = plateau({k: curve(shape, k) for k in range(3)}, 3000)
    assert p["flat"] and p["plateau_score"] == pytest.approx(40, abs=0.5)
    assert 900 <= p["steps_to_plateau"] <= 1100  # the knee, within one evaluation interval (the smoothing)
    assert p["cpu_seconds_to_plateau"] == pytest.approx(2.0 * p["steps_to_plateau"])


def test_a_curve_still_rising_is_not_flat():
    p = plateau({k: curve(lambda s: s / 100, k) for k in range(3)}, 3000)  # +10 points over the last third
    assert not p["flat"] and p["last_third_change"] == pytest.approx(5, abs=0.5)
    assert p["change_ci_low"] > 0


def test_distill_cpu_time_leaves_out_the_evaluations():
    h = [
        {"cpu_seconds": 10.0, "eval_cpu_seconds": 5.0},
        {"cpu_seconds": 25.0, "eval_cpu_seconds": 5.0},
        {"cpu_seconds": 40.0, "eval_cpu_seconds": 5.0},
    ]
    assert distill_cpu_seconds(h) == [10.0, 20.0, 30.0]
    assert distill_cpu_seconds([{"step": 1}]) == [None]


def test_build_writes_the_tables_and_one_figure_per_dataset(tmp_path):
    for method, top in (("avpbc", 30.0), ("sdw", 35.0)):
        for seed in range(2):
            c = curve(lambda s, top=top: top * min(1.0, s / 600), seed, steps=range(100, 1201, 100))
            m = {
                "task": "hopper-medium",
                "method": method,
                "seed": seed,
                "outer_steps": 1200,
                "history": [
                    {"step": st, "score": sc, "cpu_seconds": cpu, "eval_cpu_seconds": 0.0} for st, sc, cpu in c
                ],
            }
            d = tmp_path / "runs" / "hopper-medium" / f"{method}-s{seed}"
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps(m))
    rows = build(tmp_path)
    assert [(r["task"], r["method"]) for r in rows] == [("hopper-medium", "avpbc"), ("hopper-medium", "sdw")]
    assert rows[1]["plateau_score"] == pytest.approx(35, abs=1)
    assert (tmp_path / "hopper-medium.png").is_file()
    lines = (tmp_path / "curves.csv").read_text().splitlines()
    assert lines[0].startswith("task,method,seed,step,score,distill_cpu_s") and len(lines) == 1 + 2 * 2 * 12
    assert "steps_to_plateau" in (tmp_path / "plateau.csv").read_text()


def test_seeds_of_different_lengths_are_read_on_their_common_horizon(tmp_path):
    """At a constant learning rate a 1200-step seed's first 600 steps are the 600-step run: the plateau is
    taken over the shortest seed's last third; with a decaying rate mixing lengths is an error."""
    from obd.errors import ObdError

    def write(seed: int, T: int, schedule: str) -> None:
        c = curve(lambda s: 30.0 if s <= 600 else 50.0, seed, steps=range(100, T + 1, 100))
        m = {
            "task": "hopper-medium",
            "method": "avpbc",
            "seed": seed,
            "outer_steps": T,
            "config": {"distill": {"outer_lr_schedule": schedule}},
            "history": [{"step": st, "score": sc, "cpu_seconds": cpu, "eval_cpu_seconds": 0.0} for st, sc, cpu in c],
        }
        d = tmp_path / "runs" / "hopper-medium" / f"avpbc-s{seed}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "metrics.json").write_text(json.dumps(m))

    write(0, 1200, "constant")
    write(1, 600, "constant")
    (row,) = build(tmp_path)
    assert row["outer_steps"] == 600 and row["plateau_score"] == pytest.approx(30, abs=1)
    write(1, 600, "cosine")
    with pytest.raises(ObdError, match="different lengths"):
        build(tmp_path)


def test_runs_of_one_dataset_on_two_generated_versions_are_refused(tmp_path):
    from obd.errors import ObdError

    for seed, h in ((0, "aaa"), (1, "bbb")):
        c = curve(lambda s: 30.0, seed, steps=range(100, 601, 100))
        m = {
            "task": "hopper-medium",
            "method": "avpbc",
            "seed": seed,
            "outer_steps": 600,
            "data_hash": h,
            "history": [{"step": st, "score": sc, "cpu_seconds": cpu, "eval_cpu_seconds": 0.0} for st, sc, cpu in c],
        }
        d = tmp_path / "runs" / "hopper-medium" / f"avpbc-s{seed}"
        d.mkdir(parents=True)
        (d / "metrics.json").write_text(json.dumps(m))
    with pytest.raises(ObdError, match="2 different datasets"):
        build(tmp_path)


def test_the_docs_table_marks_av_pbc_within_2_of_the_published_score_in_15_cpu_minutes(tmp_path):
    """docs:curves: an Av-PBC plateau within 2 points of the published score (or above) reached within 15
    CPU minutes is marked yes; one too low or too slow no; SDW rows show SDW's published score."""
    from obd.docs import curves_table

    (tmp_path / "results" / "curves").mkdir(parents=True)
    cols = (
        "task,method,seeds,outer_steps,plateau_score,plateau_se,last_third_change,change_ci_low,change_ci_high,"
        "flat,steps_to_plateau,cpu_seconds_to_plateau"
    )
    rows = [
        "halfcheetah-medium,avpbc,3,600,35.0,0.5,0.1,-1.0,1.2,True,400,216.0",  # published 36.9: within 2
        "hopper-medium,avpbc,3,900,30.0,0.5,3.1,0.5,5.7,False,400,216.0",  # published 32.5: 2.5 below
        "walker2d-medium,avpbc,1,3000,45.0,,2.0,,,False,2900,1000.0",  # above, but after 16.7 CPU min
        "halfcheetah-medium,sdw,3,600,38.2,0.2,-4.0,-9.0,1.0,False,400,213.0",
    ]
    (tmp_path / "results" / "curves" / "plateau.csv").write_text("\n".join([cols, *rows]) + "\n")
    text = curves_table(tmp_path)
    lines = [line for line in text.splitlines()[2:] if line.startswith("|")]
    assert [line.rstrip(" |").rsplit("| ", 1)[1] for line in lines] == ["yes", "no", "no", "-"]
    assert "| 39.5 |" in lines[3]  # SDW's published halfcheetah-medium score, not Av-PBC's
    # the last third's change with its interval, and what "not flat" means: rising, falling or unclear
    assert "| +0.1 [-1.0, +1.2] | yes |" in lines[0] and "| +3.1 [+0.5, +5.7] | no: rising |" in lines[1]
    assert "| +2.0 | no: unclear |" in lines[2] and "| -4.0 [-9.0, +1.0] | no: unclear |" in lines[3]
    assert "15 distillation CPU minutes: 1 of the 3 datasets measured (halfcheetah-medium)." in text


def _write_run(
    root, task: str, method: str, seed: int, T: int, shape, diversity: float | None = None, teacher: str = "td3bc-a"
) -> None:
    c = curve(shape, seed, steps=range(100, T + 1, 100))
    m = {
        "task": task,
        "method": method,
        "seed": seed,
        "outer_steps": T,
        "state_diversity_knn10": diversity,
        "teacher": {
            "key": teacher,
            "normalized_return": {"mean": 55.24, "se": 1.49, "episodes": 20},
            "corl_td3bc_score": 60.4,
        },
        "history": [{"step": st, "score": sc, "cpu_seconds": cpu, "eval_cpu_seconds": 0.0} for st, sc, cpu in c],
    }
    d = root / "runs" / task / f"{method}-s{seed}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.json").write_text(json.dumps(m))


def test_sdw_minus_av_pbc_is_paired_on_the_plateau_at_the_methods_common_horizon(tmp_path):
    """SDW ran to 1200 steps and climbs to 50 after step 600; Av-PBC stopped at 600: the comparison reads
    both over steps 400-600 (SDW 35 vs Av-PBC 30), not SDW's later level."""
    import csv

    for seed in range(3):
        _write_run(tmp_path, "hopper-medium", "avpbc", seed, 600, lambda s: 30.0, diversity=0.6)
        _write_run(tmp_path, "hopper-medium", "sdw", seed, 1200, lambda s: 35.0 if s <= 600 else 50.0)
    build(tmp_path)
    (row,) = csv.DictReader(open(tmp_path / "comparison.csv"))
    assert row["outer_steps"] == "600" and row["n_pairs"] == "3"
    assert float(row["sdw_minus_avpbc"]) == pytest.approx(5, abs=0.6)
    assert float(row["ci_low"]) > 0 and float(row["state_diversity"]) == 0.6
    assert not (tmp_path / "diversity.json").exists()  # one dataset: no correlation


def test_the_diversity_claim_is_a_rank_correlation_over_the_datasets(tmp_path):
    """Four datasets where SDW's gain falls as state diversity grows: Spearman's rho is -1."""
    for i, (task, diversity) in enumerate(
        (("hopper-medium", 0.5), ("walker2d-medium", 0.8), ("halfcheetah-medium", 1.1), ("hopper-medium-replay", 1.4))
    ):
        for seed in range(2):
            _write_run(tmp_path, task, "avpbc", seed, 600, lambda s: 30.0, diversity=diversity)
            _write_run(tmp_path, task, "sdw", seed, 600, lambda s, g=8.0 - 4 * i: 30.0 + g)
    build(tmp_path)
    claim = json.loads((tmp_path / "diversity.json").read_text())
    assert claim["n"] == 4 and claim["rho"] == pytest.approx(-1.0)
    assert (tmp_path / "diversity.png").is_file()


def test_the_docs_comparison_shows_each_paired_gap_beside_the_published_one_and_the_claim(tmp_path):
    from obd.docs import curves_comparison_table

    for task, diversity in (
        ("hopper-medium", 0.5),
        ("walker2d-medium", 0.8),
        ("halfcheetah-medium", 1.1),
        ("hopper-medium-replay", 1.4),
    ):
        for seed in range(2):
            _write_run(tmp_path / "results" / "curves", task, "avpbc", seed, 600, lambda s: 30.0, diversity=diversity)
            _write_run(tmp_path / "results" / "curves", task, "sdw", seed, 600, lambda s: 32.0)
    build(tmp_path / "results" / "curves")
    (tmp_path / "results" / "quick").mkdir()  # the quick table's reading beside each plateau's
    (tmp_path / "results" / "quick" / "table.csv").write_text(
        "task,sdw_minus_avpbc,ci_low,ci_high\nhalfcheetah-medium,1.3,0.4,2.2\nhopper-medium,-3.0,-4.0,-2.0\n"
    )
    text = curves_comparison_table(tmp_path)
    hc = next(line for line in text.splitlines() if line.startswith("| halfcheetah-medium |"))
    assert "| 2 | +2.0 [" in hc and hc.endswith("| 1.10 | +2.6 | SDW ahead (same) |")  # published 39.5 - 36.9
    assert "], SDW ahead |" in hc  # the interval's reading beside it
    lines = text.splitlines()
    assert next(x for x in lines if x.startswith("| hopper-medium |")).endswith("| SDW behind (changed) |")
    assert next(x for x in lines if x.startswith("| walker2d-medium |")).endswith("| - |")  # not in the quick table
    assert "| 55.2 +/- 1.5 (20 ep.), CORL 60.4 |" in hc  # the teacher beside CORL's
    assert "over 4 datasets" in text and "Spearman rho" in text


def test_runs_of_one_dataset_with_two_teachers_are_refused(tmp_path):
    """pi* and Q set the targets: a seed distilled against another teacher is not the same curve."""
    from obd.errors import ObdError

    _write_run(tmp_path, "hopper-medium", "avpbc", 0, 600, lambda s: 30.0, teacher="td3bc-30k")
    _write_run(tmp_path, "hopper-medium", "sdw", 0, 600, lambda s: 30.0, teacher="td3bc-100k")
    with pytest.raises(ObdError, match="2 different teachers"):
        build(tmp_path)


def _curves_args(tmp_path, out: str, steps: int, *extra: str) -> list[str]:
    import yaml

    from tests.test_studies import TINY

    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "checkpoint_every": 1}))
    return [
        "--tasks", "hopper-random", "--methods", "avpbc", "--seeds", "0", "--budget", "smoke", "--config", str(cfg),
        "--outer-steps", str(steps), "--eval-every", "2", "--out", str(tmp_path / out), *extra,
    ]  # fmt: skip


@pytest.mark.slow
def test_a_finished_curve_asked_for_more_steps_continues_to_the_longer_run(tmp_path, capsys):
    """At a constant outer learning rate the 6 steps already run are the first 6 of a 10-step run: asking
    for 10 continues from the checkpoint (the evaluations of steps 2-6 are kept), and the set equals the
    straight 10-step run's; a run without its checkpoint or with a decaying rate is refused, naming why."""
    import shutil

    from obd.curves import main
    from obd.errors import cli

    assert main(_curves_args(tmp_path, "ext", 6)) == 0
    run_dir = tmp_path / "ext" / "runs" / "hopper-random" / "avpbc-s0"
    first = json.loads((run_dir / "metrics.json").read_text())
    assert main(_curves_args(tmp_path, "ext", 10)) == 0
    longer = json.loads((run_dir / "metrics.json").read_text())
    n = len(first["history"])
    assert longer["history"][:n] == first["history"] and longer["history"][n]["step"] > 6
    assert main(_curves_args(tmp_path, "straight", 10)) == 0
    straight = json.loads((tmp_path / "straight" / "runs" / "hopper-random" / "avpbc-s0" / "metrics.json").read_text())
    tail = [h for h in straight["history"] if h["step"] > 6]
    assert [(h["step"], pytest.approx(h["score"], rel=1e-4)) for h in tail] == [
        (h["step"], h["score"]) for h in longer["history"][n:]
    ]
    assert longer["score"] == pytest.approx(straight["score"], rel=1e-4)  # both from the steps in the final 20%
    a = np.load(run_dir / "synthetic.npz")
    b = np.load(tmp_path / "straight" / "runs" / "hopper-random" / "avpbc-s0" / "synthetic.npz")
    np.testing.assert_allclose(a["states"], b["states"], rtol=1e-5, atol=1e-6)
    shutil.rmtree(run_dir / "checkpoints")
    assert cli(main, _curves_args(tmp_path, "ext", 12)) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    assert cli(main, _curves_args(tmp_path, "straight", 12, "--distill.outer_lr_schedule", "cosine")) == 2
    assert "another configuration" in capsys.readouterr().err


def test_the_converged_budget_table_reads_a_runs_cpu_minutes_at_its_length_off_the_curves(tmp_path):
    from obd.config import build_config
    from obd.docs import converged_table

    T = build_config("converged", [{"data": {"source": "halfcheetah-medium"}}]).outer_steps
    (tmp_path / "results" / "curves").mkdir(parents=True)
    (tmp_path / "results" / "curves" / "curves.csv").write_text(
        "task,method,seed,step,score,distill_cpu_s\n"
        f"halfcheetah-medium,avpbc,0,{T},30.0,200.0\nhalfcheetah-medium,sdw,0,{T},31.0,220.0\n"
        f"halfcheetah-medium,sdw,0,{T + 100},31.0,999.0\n"
    )
    lines = converged_table(tmp_path).splitlines()
    assert f"| halfcheetah-medium | {T} | 30k | 3.5 (2 runs) |" in lines
    assert any(x.startswith("| walker2d-medium-expert |") and x.endswith("| - (no curve reaches it) |") for x in lines)
