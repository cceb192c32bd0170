"""The engine: K runs advanced together are each the run obd.train makes alone; resume, pruning, W&B."""

import json

import numpy as np
import pytest
import torch

from obd.engine import CHECKPOINT, run_many
from obd.train import run


def tiny_cfgs(tmp_path, **over):
    from obd.config import RunConfig, merge

    base = {
        "outer_steps": 4,
        "eval_every": 2,
        "checkpoint_every": 2,
        "wandb": False,
        "threads": 1,
        "data": {"source": "hopper-random", "size": 2000},
        "teacher": {"td3bc": {"steps": 50, "hidden": [16, 16]}, "eval_episodes": 0},
        "density": {"k": 5},
        "distill": {
            "n_synthetic": 8,
            "inner_steps": 3,
            "hidden": [16, 16],
            "test_batches": 1,
            "batch_size": 32,
            "outer_optimizer": "adam",
            "outer_lr": 0.05,
        },
        "eval": {"policies": 2, "episodes": 1, "inner_steps": 3, "hidden": [16, 16]},
    }
    specs = [("sdw", 0, 0.1, 3), ("avpbc", 1, 0.2, 2)]
    return [
        merge(
            merge(RunConfig(), base),
            {
                "out": str(tmp_path / f"{m}-{s}"),
                **over,
                "distill": {"method": m, "seed": s, "inner_lr": lr, "inner_steps": t},
            },
        )
        for m, s, lr, t in specs
    ]


def test_a_config_run_by_obd_train_and_as_one_of_two_runs_gives_the_same_set_in_float64(tmp_path):
    alone_cfg = tiny_cfgs(tmp_path / "alone")[0]
    alone = run(alone_cfg, show_progress=False, dtype=torch.float64)
    together = run_many(tiny_cfgs(tmp_path / "together"), show_progress=False, dtype=torch.float64)
    assert isinstance(together[0], dict) and isinstance(together[1], dict)
    za, zt = (np.load(p / "sdw-0" / "synthetic.npz") for p in (tmp_path / "alone", tmp_path / "together"))
    np.testing.assert_allclose(zt["states"], za["states"], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(zt["actions"], za["actions"], rtol=1e-12, atol=1e-12)
    assert together[0]["score"] == pytest.approx(alone["score"], abs=1e-9)
    assert [h["step"] for h in together[0]["history"]] == [2, 4]
    assert together[0]["config"] == json.loads(json.dumps(alone["config"])) | {
        "out": str(tmp_path / "together" / "sdw-0")
    }
    # the two runs differ (method, seed, inner lr and steps) and each has its own outputs
    assert not np.allclose(np.load(tmp_path / "together" / "avpbc-1" / "synthetic.npz")["states"], zt["states"])
    for name in ("sdw-0", "avpbc-1"):
        d = tmp_path / "together" / name
        assert (d / CHECKPOINT).is_file() and (d / "config.yaml").is_file() and (d / "run.json").is_file()
        assert (d / "logs" / "csv" / "metrics.csv").is_file()


@pytest.mark.slow
def test_runs_resume_from_their_own_checkpoints_at_different_steps(tmp_path):
    """One run stopped after 2 steps, then continued to 4 together with a run starting from 0: the same
    sets as straight through, and the CSV log keeps the earlier rows once."""
    straight = run_many(tiny_cfgs(tmp_path / "straight"), show_progress=False, dtype=torch.float64)
    a, b = tiny_cfgs(tmp_path / "resumed")
    run_many([tiny_cfgs(tmp_path / "resumed", outer_steps=2)[0]], show_progress=False, dtype=torch.float64)
    resumed = run_many([a, b], show_progress=False, dtype=torch.float64)
    for s, r, name in zip(straight, resumed, ("sdw-0", "avpbc-1")):
        assert isinstance(s, dict) and isinstance(r, dict)
        assert [h["step"] for h in r["history"]] == [h["step"] for h in s["history"]]
        zs, zr = (np.load(p / name / "synthetic.npz") for p in (tmp_path / "straight", tmp_path / "resumed"))
        np.testing.assert_allclose(zr["states"], zs["states"], rtol=1e-9, atol=1e-12)
    rows = (tmp_path / "resumed" / "sdw-0" / "logs" / "csv" / "metrics.csv").read_text().splitlines()
    steps = [int(float(line.split(",")[-1])) for line in rows[1:] if line.split(",")[0]]  # outer-loss rows
    assert steps == [0, 1, 2, 3]
    with pytest.raises(Exception, match="no checkpoint"):
        run_many(tiny_cfgs(tmp_path / "fresh"), resume=True, show_progress=False)


@pytest.mark.slow
def test_a_run_stopped_by_its_listener_is_dropped_and_each_run_has_its_own_wandb_run(tmp_path):
    """Pruning drops a run and leaves the others as they would be alone; each run logs to its own
    (offline) W&B run."""

    class Pruned(Exception):
        pass

    def prune_at_2(step: int, value: float) -> None:
        if step == 2:
            raise Pruned(f"pruned at {step}")

    seen: list[tuple[int, float]] = []
    cfgs = tiny_cfgs(tmp_path / "batch", wandb=True)
    res = run_many(cfgs, [[prune_at_2], [lambda s, v: seen.append((s, v))]], show_progress=False, dtype=torch.float64)
    assert isinstance(res[0], Pruned) and isinstance(res[1], dict)
    assert [s for s, _ in seen] == [2, 4] and res[1]["history"][-1]["step"] == 4
    assert not (tmp_path / "batch" / "sdw-0" / "metrics.json").exists()
    assert torch.load(tmp_path / "batch" / "sdw-0" / CHECKPOINT, weights_only=True)["step"] == 2  # kept, resumable
    alone = run_many([tiny_cfgs(tmp_path / "alone")[1]], show_progress=False, dtype=torch.float64)[0]
    assert isinstance(alone, dict) and res[1]["score"] == pytest.approx(alone["score"], abs=1e-9)
    ids = [(tmp_path / "batch" / n / "wandb-run-id").read_text() for n in ("sdw-0", "avpbc-1")]
    assert len(set(ids)) == 2
    for n, i in zip(("sdw-0", "avpbc-1"), ids):
        assert list((tmp_path / "batch" / n / "wandb").glob(f"offline-run-*-{i}"))


def test_runs_that_cannot_share_the_engine_are_refused(tmp_path):
    from obd.errors import ConfigError

    a, b = tiny_cfgs(tmp_path)
    b.distill.n_synthetic = 16
    with pytest.raises(ConfigError, match="must share 'distill.n_synthetic'"):
        run_many([a, b], show_progress=False)
    a, b = tiny_cfgs(tmp_path)
    b.out = a.out
    with pytest.raises(ConfigError, match="one output folder each"):
        run_many([a, b], show_progress=False)


def test_device_choice_and_a_clean_error_without_cuda():
    from obd.devices import resolve_device
    from obd.errors import ObdError

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(ObdError, match="--device cuda: no CUDA device is available"):
            resolve_device("cuda")


def test_cuda_unavailable_is_one_line_from_the_cli(tmp_path):
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "obd.train",
            "--task",
            "hopper-random",
            "--budget",
            "smoke",
            "--device",
            "cuda",
            "--out",
            str(tmp_path / "r"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "no CUDA device is available" in r.stderr and "Traceback" not in r.stderr


def test_runs_batches_advance_each_run_from_its_own_step_to_its_own_end():
    """Runs at different steps share an iteration, each with the batch of its own (seed, step); a run
    leaves at its last step; the iterations left are the progress bar's total."""
    from obd.datamodule import StepBatches, _Together

    data = (torch.arange(50.0).view(50, 1), torch.zeros(50, 1), torch.ones(50))
    runs = [StepBatches(data, 4, seed=s) for s in (0, 1)]
    it = _Together(runs, lambda: [(0, 3, 5), (1, 0, 4)])
    assert len(it) == 4
    got = [(idx.tolist(), steps.tolist(), obs.shape) for idx, steps, obs, _, _ in it]
    assert got == [
        ([0, 1], [3, 0], (2, 4, 1)),
        ([0, 1], [4, 1], (2, 4, 1)),
        ([1], [2], (1, 4, 1)),
        ([1], [3], (1, 4, 1)),
    ]
    first = next(iter(it))
    assert torch.equal(first[2][0], runs[0].batch(3)[0]) and torch.equal(first[2][1], runs[1].batch(0)[0])
