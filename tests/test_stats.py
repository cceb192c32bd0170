import numpy as np
import pytest
from scipy import stats

from obd.seeding import derive_seed
from obd.stats import paired_comparison


def test_paired_statistics_match_scipy_and_a_hand_computed_case():
    a = {1: 10.0, 2: 12.0, 3: 11.0, 4: 15.0, 5: 13.0}
    b = {1: 9.0, 2: 10.0, 3: 11.5, 4: 12.0, 5: 12.0}
    c = paired_comparison(a, b)
    d = np.array([1.0, 2.0, -0.5, 3.0, 1.0])
    assert c["mean_difference"] == pytest.approx(1.3)
    # hand: sd of d = 1.3038..., se = 0.5831, t_{0.975, 4} = 2.7764
    half = 2.7764451 * d.std(ddof=1) / np.sqrt(5)
    assert c["paired_t_ci"] == pytest.approx([1.3 - half, 1.3 + half], rel=1e-6)
    assert c["paired_t_p"] == pytest.approx(stats.ttest_rel(list(a.values()), list(b.values())).pvalue)
    assert c["wilcoxon_p"] == pytest.approx(stats.wilcoxon(list(a.values()), list(b.values())).pvalue)
    welch = stats.ttest_ind(list(a.values()), list(b.values()), equal_var=False).confidence_interval(0.95)
    assert c["welch_ci"] == pytest.approx([welch.low, welch.high], rel=1e-6)
    assert c["verdict"].startswith("no evidence")  # the interval spans zero
    # pairing only uses seeds both have, and says when they are few
    c2 = paired_comparison({1: 5.0, 2: 6.0, 3: 7.0}, {1: 1.0, 2: 1.5, 9: 0.0})
    assert c2["seeds"] == [1, 2] and "only 2 paired seeds" in c2["verdict"]
    assert (
        paired_comparison({1: 3.0, 2: 4.0, 3: 5.0, 4: 6.0, 5: 7.0}, {1: 1.0, 2: 1.9, 3: 3.1, 4: 4.0, 5: 5.0})["verdict"]
        == "evidence of a positive difference"
    )


def test_seed_derivation_is_stable_and_distinct():
    assert derive_seed(0, "eval", 3) == derive_seed(0, "eval", 3)
    seeds = {derive_seed(r, k, i) for r in range(3) for k in ("a", "b") for i in range(50)}
    assert len(seeds) == 300 and all(0 <= s < 2**63 for s in seeds)
    with pytest.raises(TypeError):
        derive_seed(0, 1.5)  # type: ignore[arg-type]


def test_compare_two_result_folders_pairs_by_task_method_and_seed(tmp_path, capsys):
    import json

    from obd.stats import compare_results, main

    for folder, shift in (("a", 1.0), ("b", 0.0)):
        for seed, base in enumerate([30.0, 32.0, 35.0]):
            d = tmp_path / folder / "runs" / "hopper-medium" / f"avpbc-s{seed}"
            d.mkdir(parents=True)
            m = {
                "task": "hopper-medium",
                "method": "avpbc",
                "seed": seed,
                "score": base + shift,
                "final_score": base + 2 * shift,
            }
            (d / "metrics.json").write_text(json.dumps(m))
    extra = tmp_path / "a" / "runs" / "hopper-medium" / "sdw-s0"  # only in A: not compared
    extra.mkdir(parents=True)
    (extra / "metrics.json").write_text(
        json.dumps({"task": "hopper-medium", "method": "sdw", "seed": 0, "score": 1.0, "final_score": 1.0})
    )
    rows = compare_results(str(tmp_path / "a"), str(tmp_path / "b"))
    assert [(r["task"], r["method"]) for r in rows] == [("hopper-medium", "avpbc")]
    assert rows[0]["score"]["mean_difference"] == 1.0 and rows[0]["final_score"]["mean_difference"] == 2.0
    assert rows[0]["score"]["n_pairs"] == 3 and abs(rows[0]["score"]["a_mean"] - 33.0 - 1 / 3) < 1e-9
    assert main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    assert "hopper-medium avpbc final evaluation: A 34.3, B 32.3, A - B +2.0" in capsys.readouterr().out
    # one method against another: A's sdw (seed 0 only) against B's avpbc
    rows = compare_results(f"{tmp_path / 'a'}:sdw", f"{tmp_path / 'b'}:avpbc")
    assert [(r["task"], r["method"]) for r in rows] == [("hopper-medium", "sdw - avpbc")]
    assert rows[0]["score"]["n_pairs"] == 1 and rows[0]["score"]["mean_difference"] == 1.0 - 30.0
    with pytest.raises(Exception, match="on both sides"):
        compare_results(f"{tmp_path / 'a'}:sdw", str(tmp_path / "b"))


def test_compare_the_evaluations_at_an_outer_step(tmp_path, capsys):
    import json

    from obd.stats import main

    for folder, shift in (("a", 2.0), ("b", 0.0)):
        for seed in range(3):
            d = tmp_path / folder / "runs" / "hopper-medium" / f"avpbc-s{seed}"
            d.mkdir(parents=True)
            hist = [{"step": 100, "score": 10.0 + seed + shift}, {"step": 200, "score": 30.0 + seed}]
            m = {"task": "hopper-medium", "method": "avpbc", "seed": seed, "score": 30.0, "final_score": 30.0}
            (d / "metrics.json").write_text(json.dumps({**m, "history": hist, "outer_steps": 200, "last_k": 5}))
    assert main([str(tmp_path / "a"), str(tmp_path / "b"), "--steps", "100,200"]) == 0
    out = capsys.readouterr().out
    assert "step 100: A 13.0, B 11.0, A - B +2.0" in out and "step 200: A 31.0, B 31.0, A - B +0.0" in out


def test_a_paired_interval_is_printed_with_its_reading():
    from obd.table import ci_cell

    assert ci_cell(0.4, 2.2) == " [+0.4, +2.2], SDW ahead"
    assert ci_cell(-31.6, -21.8) == " [-31.6, -21.8], SDW behind"
    assert ci_cell(-5.4, 5.5) == " [-5.4, +5.5], no evidence"
