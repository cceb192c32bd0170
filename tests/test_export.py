import json

import pytest

from obd.config import RunConfig, merge
from obd.errors import ObdError
from obd.train import run

TINY = {
    "outer_steps": 2,
    "eval_every": 0,
    "checkpoint_every": 2,
    "wandb": False,
    "threads": 1,
    "data": {"source": "hopper-random", "size": 2000},
    "teacher": {"td3bc": {"steps": 50, "hidden": [16, 16]}, "eval_episodes": 0},
    "distill": {
        "method": "avpbc",
        "n_synthetic": 8,
        "inner_steps": 3,
        "hidden": [16, 16],
        "test_batches": 1,
        "batch_size": 32,
    },
    "eval": {"policies": 2, "episodes": 1, "inner_steps": 3, "hidden": [16, 16]},
}


def test_exported_sets_load_back_and_reevaluate_to_the_runs_score(tmp_path, capsys):
    """A distilled set as D4RL hdf5 and as a Minari dataset, readable by obd's loaders and
    re-evaluating to the run's own (final-evaluation) score."""
    from obd.data.__main__ import main as data_main
    from obd.evaluate import main as evaluate_main
    from obd.export import main as export_main

    cfg = merge(RunConfig(), {**TINY, "out": str(tmp_path / "run")})
    m = run(cfg, show_progress=False)
    final = m["history"][-1]["score"]
    assert export_main([str(tmp_path / "run"), "--format", "d4rl", "--out", str(tmp_path / "set.hdf5")]) == 0
    assert export_main([str(tmp_path / "run"), "--format", "minari", "--out", "obd/hopper-random-avpbc-v0"]) == 0
    capsys.readouterr()
    for fmt, out in (("d4rl", str(tmp_path / "set.hdf5")), ("minari", "obd/hopper-random-avpbc-v0")):
        with pytest.raises(ObdError, match="--force"):  # never overwritten silently
            export_main([str(tmp_path / "run"), "--format", fmt, "--out", out])
    assert export_main([str(tmp_path / "run"), "--format", "d4rl", "--out", str(tmp_path / "set.hdf5"), "--force"]) == 0
    capsys.readouterr()
    for source, extra in (
        (str(tmp_path / "set.hdf5"), []),
        ("minari:obd/hopper-random-avpbc-v0", ["--task", "hopper-random"]),
    ):
        assert data_main(["info", source, *extra, "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["pairs"] == 8 and info["task"] == "hopper-random" and info["method"] == "avpbc"
        assert info["kind"] == "synthetic set distilled by obd" and info["score"] == m["score"]
        with pytest.raises(ObdError, match="is a synthetic set distilled by obd"):  # not a dataset to distil
            run(merge(RunConfig(), {**TINY, "data": {"source": source}, "out": str(tmp_path / "again")}))
        assert evaluate_main([source, "--json"]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["score"] == pytest.approx(final, abs=1e-6)
    # the run's own npz re-evaluates to the same score too
    assert evaluate_main([str(tmp_path / "run" / "synthetic.npz"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["score"] == pytest.approx(final, abs=1e-6)


def test_export_errors_are_one_line(tmp_path, capsys):
    from obd.errors import cli
    from obd.evaluate import main as evaluate_main
    from obd.export import main as export_main

    assert cli(export_main, [str(tmp_path), "--format", "d4rl", "--out", str(tmp_path / "x.hdf5")]) == 2
    assert "no metrics.json" in capsys.readouterr().err
    bad = tmp_path / "notes.npz"
    bad.write_text("not a zip")
    assert cli(evaluate_main, [str(bad)]) == 2
    err = capsys.readouterr().err
    assert "not a synthetic set saved by obd" in err and "allow_pickle" not in err
