"""The nine-dataset table and the misalignment study, end to end at a smoke budget (issue 12)."""

import csv
import json

import pytest
import yaml

TINY = {
    "outer_steps": 2,
    "eval_every": 1,
    "checkpoint_every": 2,
    "threads": 1,
    "data": {"size": 2000},
    "teacher": {"td3bc": {"steps": 50, "hidden": [16, 16]}, "eval_episodes": 1},
    "density": {"k": 5},
    "distill": {"n_synthetic": 8, "inner_steps": 3, "hidden": [16, 16], "test_batches": 1, "batch_size": 32},
    "eval": {"policies": 2, "episodes": 1, "inner_steps": 3, "hidden": [16, 16]},
}


def table_args(tmp_path, *extra: str) -> list[str]:
    """obd.table on hopper-random, 2 seeds x random/avpbc/sdw at the tiny config above."""
    cfg = tmp_path / "tiny.yaml"
    if not cfg.exists():
        cfg.write_text(yaml.safe_dump(TINY))
    return [
        "--tasks",
        "hopper-random",
        "--methods",
        "random,avpbc,sdw",
        "--seeds",
        "0-1",
        "--budget",
        "smoke",
        "--config",
        str(cfg),
        "--jobs",
        "1",
        "--out",
        str(tmp_path / "res"),
        *extra,
    ]


@pytest.mark.slow
def test_table_runs_every_cell_once_and_rebuilds(tmp_path, capsys):
    from obd.errors import cli
    from obd.table import main

    args = table_args(tmp_path)
    cfg = tmp_path / "tiny.yaml"
    assert main(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "res" / "table.csv")))
    assert len(rows) == 1 and rows[0]["task"] == "hopper-random" and rows[0]["sdw_n"] == "2"
    assert rows[0]["sdw_minus_avpbc"] != "" and "paired seeds" in rows[0]["verdict"]
    assert (tmp_path / "res" / "table.png").stat().st_size > 1000
    md = (tmp_path / "res" / "table.md").read_text()
    assert "hopper-random" in md and "published Av-PBC" in md
    metrics = sorted((tmp_path / "res" / "runs").glob("*/*/metrics.json"))
    assert len(metrics) == 6
    mtimes = [p.stat().st_mtime for p in metrics]
    assert main(args) == 0  # resumable: nothing recomputed
    assert [p.stat().st_mtime for p in metrics] == mtimes
    # the README's results block is filled from the results files (issue 12)
    readme = tmp_path / "README.md"
    out = (tmp_path / "res").relative_to(tmp_path)
    readme.write_text(f"intro\n<!-- BEGIN generated: {out} -->\nold\n<!-- END generated: {out} -->\nrest\n")
    assert main([*args[:-1], str(out), "--rebuild", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "hopper-random: " in text and f"![results]({out}/table.png)" in text
    # a rebuild (metrics files only, no dataset) refuses a row whose runs came from two datasets
    one = json.loads(metrics[0].read_text())
    metrics[0].write_text(json.dumps({**one, "data_hash": "0" * 16}))
    assert cli(main, [*args[:-1], str(out), "--rebuild"]) == 2 and "different datasets" in capsys.readouterr().err
    metrics[0].write_text(json.dumps(one))
    # runs on a dataset that was regenerated since (other content) are refused, not mixed in
    import h5py

    from obd.data import generated_path, get_task

    with h5py.File(generated_path(get_task("hopper-random"), 2000, 0), "r+") as f:
        f["observations"][0, 0] += 1.0
    assert cli(main, args) == 2 and "run on other data" in capsys.readouterr().err
    with h5py.File(generated_path(get_task("hopper-random"), 2000, 0), "r+") as f:
        f["observations"][0, 0] -= 1.0
    assert main(args) == 0
    # a changed configuration in the same OUT is refused, not mixed in
    cfg.write_text(yaml.safe_dump({**TINY, "distill": {**TINY["distill"], "n_synthetic": 4}}))
    assert cli(main, args) == 2 and "another configuration" in capsys.readouterr().err


@pytest.mark.slow
def test_misalignment_study_end_to_end(tmp_path):
    from obd.misalignment import main

    out = tmp_path / "mis"
    assert (
        main(
            [
                "--env",
                "hopper",
                "--kinds",
                "random,medium",
                "--n",
                "16",
                "--steps",
                "1,20",
                "--policies",
                "2",
                "--episodes",
                "1",
                "--size",
                "2000",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads((out / "misalignment.json").read_text())
    assert set(res["datasets"]) == {"hopper-random", "hopper-medium"}
    for d in res["datasets"].values():
        assert d["state_diversity_knn10"] > 0 and [lv["steps"] for lv in d["levels"]] == [1, 20]
        assert d["levels"][1]["train_mse"] < d["levels"][0]["train_mse"]  # more steps, lower loss
    assert isinstance(res["flips"], bool) and len(res["ranking_low_loss"]) == 2
    assert (out / "misalignment.png").stat().st_size > 1000


@pytest.mark.slow
def test_table_batched_engine(tmp_path):
    from obd.table import main

    assert main(table_args(tmp_path, "--batched")) == 0
    m = json.loads((tmp_path / "res" / "runs" / "hopper-random" / "sdw-s1" / "metrics.json").read_text())
    assert m["engine"] == "batched" and m["seed"] == 1 and m["history"]
    rows = list(csv.DictReader(open(tmp_path / "res" / "table.csv")))
    assert rows[0]["sdw_n"] == "2" and rows[0]["random_n"] == "2"


def test_table_plot_with_a_method_not_run_yet(tmp_path):
    """A dataset whose SDW runs have not finished is plotted without them (it used to raise)."""
    from obd.table import plot

    row = {"task": "walker2d-medium", "budget": "quick", "published_avpbc": 39.5, "published_sdw": None}
    row |= {"avpbc_mean": 11.3, "avpbc_std": 2.6, "sdw_mean": None, "sdw_std": None, "random_mean": None}
    plot([row], tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000
