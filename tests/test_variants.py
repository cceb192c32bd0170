"""Recipes of one dataset compared on their plateaus against a reference, from run folders."""

import csv
import json

import numpy as np
import pytest

from obd.errors import ObdError
from obd.variants import main, recipe_label


def write_runs(folder, shape, steps, cfg, seeds=(0, 1, 2), method="avpbc", teacher="td3bc-a"):
    for seed in seeds:
        rng = np.random.default_rng(seed)
        m = {
            "task": "hopper-medium",
            "method": method,
            "seed": seed,
            "outer_steps": steps[-1],
            "data_hash": "h1",
            "teacher": {"key": teacher},
            "config": cfg,
            "history": [
                {"step": s, "score": shape(s) + 0.2 * rng.normal(), "cpu_seconds": 0.5 * s, "eval_cpu_seconds": 0.0}
                for s in steps
            ],
        }
        d = folder / "runs" / "hopper-medium" / f"{method}-s{seed}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "metrics.json").write_text(json.dumps(m))


def cfg(optimizer: str, beta: float, out: str) -> dict:
    return {"distill": {"outer_optimizer": optimizer, "beta": beta, "seed": 0}, "out": out, "threads": 1}


def test_a_recipe_is_named_by_the_config_fields_it_changes():
    assert recipe_label(cfg("sgd", 0.04, "a"), cfg("adam", 0.02, "b")) == (
        "distill.beta=0.04, distill.outer_optimizer=sgd"
    )
    assert recipe_label(cfg("adam", 0.02, "a"), cfg("adam", 0.02, "b")) == "the reference's recipe"


def test_a_slower_recipe_is_behind_at_the_same_steps_and_level_on_its_own_plateau(tmp_path):
    """The reference plateaus at 30 by step 300 of 600; the other rises to 30 only by step 1500 of 3000:
    read at 600 steps it is behind, on its own plateau it is level."""
    write_runs(
        tmp_path / "fast", lambda s: 30.0 * min(1.0, s / 300), list(range(100, 601, 100)), cfg("adam", 0.02, "x")
    )
    write_runs(
        tmp_path / "slow",
        lambda s: 30.0 * min(1.0, s / 1500),
        list(range(100, 3001, 100)),
        cfg("sgd", 0.02, "y"),
        seeds=(0, 1),
    )
    out = tmp_path / "cmp"
    assert main(["hopper-medium", f"{tmp_path / 'fast'}:avpbc", f"{tmp_path / 'slow'}:avpbc", "--out", str(out)]) == 0
    with open(out / "variants.csv", newline="") as f:
        ref, slow = list(csv.DictReader(f))
    assert ref["recipe"] == "reference" and float(ref["plateau_score"]) == pytest.approx(30, abs=0.5)
    assert slow["recipe"] == "distill.outer_optimizer=sgd" and slow["common_steps"] == "600"
    assert float(slow["minus_reference_same_steps"]) < -10 and slow["minus_reference_same_steps_verdict"]
    assert float(slow["minus_reference_same_steps_ci_high"]) < 0
    assert abs(float(slow["minus_reference_own_plateaus"])) < 1
    # within a point of the reference's 30 from about step 1500 (29/30 of the way), at 0.5 CPU s per step
    assert 1300 <= int(slow["steps_to_reference_level"]) <= 1500
    assert float(slow["cpu_seconds_to_reference_level"]) == pytest.approx(0.5 * int(slow["steps_to_reference_level"]))
    assert (out / "hopper-medium.png").is_file()
    from obd.docs import variants_table

    table = variants_table(out).splitlines()
    assert len(table) == 4 and "| reference |" in table[2]
    assert "| at 600: -" in table[3] and "], behind | " in table[3] and "], no evidence | 1" in table[3]
    assert table[2].endswith("| - |")  # the reference


def test_a_source_with_another_teacher_is_refused(tmp_path):
    steps = list(range(100, 601, 100))
    write_runs(tmp_path / "a", lambda s: 30.0, steps, cfg("adam", 0.02, "x"))
    write_runs(tmp_path / "b", lambda s: 30.0, steps, cfg("adam", 0.02, "x"), method="sdw", teacher="td3bc-b")
    with pytest.raises(ObdError, match="another teacher"):
        main(["hopper-medium", f"{tmp_path / 'a'}:avpbc", f"{tmp_path / 'b'}:sdw", "--out", str(tmp_path / "o")])
    with pytest.raises(ObdError, match="no finished avpbc runs"):
        main(["hopper-medium", f"{tmp_path / 'a'}:avpbc", f"{tmp_path / 'b'}:avpbc", "--out", str(tmp_path / "o")])


def test_a_sparsely_evaluated_source_is_compared_on_its_own_plateau_only(tmp_path):
    """Evaluated every 250 steps, a 5000-step source has one evaluation in the last third of the
    reference's 600 steps: no plateau to pair there, said so; its own plateau is still compared."""
    write_runs(tmp_path / "ref", lambda s: 30.0, list(range(100, 601, 100)), cfg("adam", 0.02, "x"))
    write_runs(tmp_path / "sgd", lambda s: 20.0, list(range(250, 5001, 250)), cfg("sgd", 0.02, "y"))
    out = tmp_path / "cmp"
    main(["hopper-medium", f"{tmp_path / 'ref'}:avpbc", f"{tmp_path / 'sgd'}:avpbc", "--out", str(out)])
    with open(out / "variants.csv", newline="") as f:
        _, sgd = list(csv.DictReader(f))
    assert (
        sgd["minus_reference_same_steps"] == "" and "too few evaluations" in sgd["minus_reference_same_steps_verdict"]
    )
    assert float(sgd["minus_reference_own_plateaus"]) == pytest.approx(-10, abs=0.5)
