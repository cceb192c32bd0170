import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from obd.data import get_task
from obd.datamodule import DataConfig, OBDDataModule
from obd.density import DensityConfig
from obd.distill import BehaviorDistillation, DistillConfig
from obd.teacher import TD3BCConfig
from obd.train import BUDGETS, TrainConfig, merge, run

TINY = {"outer_steps": 6, "eval_every": 3, "checkpoint_every": 2, "wandb": False, "threads": 1,
        "data": {"source": "hopper-random", "size": 3000, "teacher_cfg": {"steps": 200, "hidden": [32, 32]},
                 "teacher_eval_episodes": 1, "density": {"alpha": 1.0, "k": 5}},
        "distill": {"n_synthetic": 16, "inner_steps": 5, "hidden": [32, 32], "test_batches": 2, "batch_size": 64},
        "eval": {"episodes": 1, "inner_steps": 5, "hidden": [32, 32]}}


def tiny_cfg(tmp_path, **over) -> TrainConfig:
    cfg = merge(TrainConfig(), TINY)
    return merge(cfg, {"out": str(tmp_path / "run"), **over})


def test_sdw_alpha_zero_equals_avpbc(tmp_path):
    dc = DataConfig(source="hopper-random", size=3000, teacher_cfg=TD3BCConfig(steps=100, hidden=(32, 32)),
                    teacher_eval_episodes=0, density=DensityConfig(alpha=0.0))
    av = OBDDataModule(dc, "avpbc", show_progress=False)
    av.prepare()
    sdw = OBDDataModule(dc, "sdw", show_progress=False)
    sdw.prepare()
    (t1, w1), (t2, w2) = av.targets_and_weights(), sdw.targets_and_weights()
    assert torch.equal(t1, t2) and torch.equal(w1, w2)
    # and with alpha > 0 the weights differ, by exactly the density factor
    dc.density = DensityConfig(alpha=1.0, k=5)
    sdw1 = OBDDataModule(dc, "sdw", show_progress=False)
    sdw1.prepare()
    _, w3 = sdw1.targets_and_weights()
    assert not torch.equal(w1, w3)
    torch.testing.assert_close(w3, w1 * sdw1.density_w)
    # same batch stream, same synthetic init -> identical outer gradients for sdw(alpha=0) and avpbc
    grads = []
    for dm in (av, sdw):
        b = next(iter(dm.train_dataloader()))
        s, a = dm.random_real_pairs(8, 0)
        m = BehaviorDistillation(DistillConfig(hidden=(16,), inner_steps=3), s, a)
        grads.append(m.outer_gradient(*b, step=0))
    assert torch.equal(grads[0][1], grads[1][1]) and torch.equal(grads[0][2], grads[1][2])


def test_tiny_run_lowers_outer_loss_and_saves(tmp_path):
    cfg = tiny_cfg(tmp_path, distill={"method": "sdw", "outer_lr": 1.0})
    m = run(cfg, show_progress=False)
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    for k in ("normalized_return_mean", "normalized_return_std", "method", "task", "seed", "data_hash", "versions"):
        assert k in metrics
    assert metrics["method"] == "sdw" and metrics["task"] == "hopper-random"
    assert [h["step"] for h in metrics["history"]] == [3, 6]
    z = np.load(out / "synthetic.npz")
    assert z["states"].shape == (16, 11) and z["actions"].shape == (16, 3) and str(z["task"]) == "hopper-random"
    # the outer loss of the learned set is lower than that of its initialization, on the same batches
    dm = OBDDataModule(cfg.data, "sdw", batch_size=64, test_batches=2, show_progress=False)
    dm.prepare()
    s0, a0 = dm.random_real_pairs(16, 0)
    batch = next(iter(dm.train_dataloader()))
    losses = []
    for s, a in ((s0, a0), (torch.from_numpy(z["states"]), torch.from_numpy(z["actions"]))):
        mod = BehaviorDistillation(cfg.distill, s, a)
        losses.append(np.mean([float(mod.outer_gradient(*batch, step=k)[0]) for k in range(4)]))
    assert losses[1] < losses[0]
    # the standalone evaluator reads it back
    r = subprocess.run([sys.executable, "-m", "obd.evaluate", str(out / "synthetic.npz"), "--episodes", "2", "--json"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["task"] == "hopper-random" and len(res["episode_scores"]) == 2


def test_resume_continues(tmp_path):
    run(tiny_cfg(tmp_path, outer_steps=2), show_progress=False)
    m = run(tiny_cfg(tmp_path, outer_steps=4), resume=True, show_progress=False)
    ck = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert ck["global_step"] == 4
    assert [h["step"] for h in m["history"]] == [2, 3, 4]  # step 2 from the first run kept, not redone


def test_random_baseline_method(tmp_path):
    m = run(tiny_cfg(tmp_path, distill={"method": "random"}), show_progress=False)
    assert m["method"] == "random" and m["history"] == []
    z = np.load(tmp_path / "run" / "synthetic.npz")
    assert z["states"].shape == (16, 11)


def test_cli_errors(tmp_path):
    env = {**os.environ, "OBD_DATA_DIR": str(tmp_path)}
    r = subprocess.run([sys.executable, "-m", "obd.train", "--task", "hopper-mediocre", "--budget", "smoke"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "unknown task 'hopper-mediocre'" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "obd.train", "--task", "hopper-random", "--method", "xyz"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "unknown method 'xyz'" in r.stderr
    r = subprocess.run([sys.executable, "-m", "obd.train", "--task", "hopper-random", "--budget", "huge"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "unknown budget 'huge'" in r.stderr and "smoke" in r.stderr


def test_budgets_and_config_merge(tmp_path):
    assert set(BUDGETS) == {"smoke", "quick", "sweep", "paper"}
    cfg = merge(TrainConfig(), BUDGETS["paper"])
    assert cfg.outer_steps == 50_000 and cfg.distill.inner_steps == 100 and cfg.distill.inner_lr == 0.1
    assert cfg.distill.outer_momentum == 0.9 and cfg.distill.grad_clip == 2.0 and cfg.distill.beta == 0.02
    with pytest.raises(ValueError, match="unknown setting 'distill.nope'"):
        merge(TrainConfig(), {"distill": {"nope": 1}})


def test_outer_optimizer_choice():
    S, A = torch.randn(4, 3), torch.rand(4, 2)
    assert isinstance(BehaviorDistillation(DistillConfig(), S, A).configure_optimizers(), torch.optim.SGD)
    adam = BehaviorDistillation(DistillConfig(outer_optimizer="adam", outer_lr=0.03), S, A).configure_optimizers()
    assert isinstance(adam, torch.optim.Adam) and adam.param_groups[0]["lr"] == 0.03
    with pytest.raises(ValueError, match="unknown outer_optimizer 'rmsprop'"):
        BehaviorDistillation(DistillConfig(outer_optimizer="rmsprop"), S, A)
