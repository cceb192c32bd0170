import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from obd.config import DensityConfig, DistillConfig, RunConfig, build_config, merge
from obd.datamodule import OBDDataModule
from obd.engine import CHECKPOINT, outer_gradients
from obd.errors import ConfigError
from obd.starts import initial_set
from obd.targets import prepare_targets
from obd.train import run

TINY = {
    "outer_steps": 6,
    "eval_every": 3,
    "checkpoint_every": 2,
    "wandb": False,
    "threads": 1,
    "data": {"source": "hopper-random", "size": 3000},
    "teacher": {"td3bc": {"steps": 200, "hidden": [32, 32]}, "eval_episodes": 1},
    "density": {"alpha": 1.0, "k": 5},
    "distill": {"n_synthetic": 16, "inner_steps": 5, "hidden": [32, 32], "test_batches": 2, "batch_size": 64},
    "eval": {"policies": 2, "episodes": 1, "inner_steps": 5, "hidden": [32, 32]},
}


def tiny_cfg(tmp_path, **over) -> RunConfig:
    cfg = merge(RunConfig(), TINY)
    return merge(cfg, {"out": str(tmp_path / "run"), **over})


def test_sdw_alpha_zero_equals_avpbc(tmp_path):
    cfg = tiny_cfg(tmp_path, density={"alpha": 0.0})
    t = prepare_targets(cfg, "sdw", show_progress=False)
    (t1, w1), (t2, w2) = (
        t.targets_and_weights("avpbc", 0.02, cfg.density),
        t.targets_and_weights("sdw", 0.02, cfg.density),
    )
    assert torch.equal(t1, t2) and torch.equal(w1, w2)
    # and with alpha > 0 the weights differ, by exactly the density factor
    d1 = DensityConfig(alpha=1.0, k=5)
    _, w3 = t.targets_and_weights("sdw", 0.02, d1)
    assert not torch.equal(w1, w3)
    torch.testing.assert_close(w3, w1 * t.density_weights(d1))
    # same batch stream, same synthetic init -> identical outer gradients for sdw(alpha=0) and avpbc
    grads = []
    for method in ("avpbc", "sdw"):
        b = OBDDataModule(t).add_run(method, 0.02, cfg.density, 64, 2, seed=0).batch(0)
        s, a = initial_set(t, "real-pairs", 8, 0)
        grads.append(
            outer_gradients([DistillConfig(hidden=(16,), inner_steps=3)], s[None], a[None], *(x[None] for x in b), [0])
        )
    assert torch.equal(grads[0][1], grads[1][1]) and torch.equal(grads[0][2], grads[1][2])


def test_density_estimate_is_cached_once_for_every_alpha_and_clip(tmp_path):
    """log p(s) is keyed by the estimator only; alpha and the cap apply on load."""
    cfg = tiny_cfg(tmp_path)
    t = prepare_targets(cfg, "sdw", show_progress=False)
    cache = tmp_path / "data" / "cache" / t.data_hash
    files = sorted(cache.glob("logp-*.npy"))
    assert len(files) == 1
    for alpha, clip in ((0.3, 3.0), (1.0, None)):
        t2 = prepare_targets(
            merge(tiny_cfg(tmp_path), {"density": {"alpha": alpha, "clip": clip}}), "sdw", show_progress=False
        )
        assert sorted(cache.glob("logp-*.npy")) == files
        w = t2.density_weights(DensityConfig(alpha=alpha, clip=clip, k=5))
        assert float(w.mean()) == pytest.approx(1.0, rel=1e-4)
    prepare_targets(merge(tiny_cfg(tmp_path), {"density": {"k": 7}}), "sdw", show_progress=False)
    assert len(list(cache.glob("logp-*.npy"))) == 2  # k changes the estimate


def hopper_targets(q: torch.Tensor, log_density: torch.Tensor | None = None, obs: torch.Tensor | None = None):
    """Targets of n hopper states with the given Q(s, pi*(s)) (and log-density), zero actions."""
    from obd.data import get_task
    from obd.targets import Targets

    n = len(q)
    return Targets(
        task=get_task("hopper-medium"),
        data_hash="x",
        obs=torch.zeros(n, 11) if obs is None else obs,
        actions=torch.zeros(n, 3),
        mean=torch.zeros(11),
        std=torch.ones(11),
        behaviour_score=0.0,
        teacher_actions=torch.zeros(n, 3),
        q=q,
        log_density=log_density,
    )


def test_describe_says_where_sdw_moves_the_weight_in_value_terms():
    """Rare states that are low-value (log p and Q correlated) pull SDW's weight below the median Q."""

    n = 2000
    g = torch.Generator().manual_seed(0)
    q = torch.rand(n, generator=g) * 100 + 1
    log_density = q / 10 + 0.1 * torch.randn(n, generator=g)  # the rare states are the low-Q ones
    t = hopper_targets(q, log_density, obs=torch.randn(n, 11, generator=g))
    dens = DensityConfig(alpha=1.0, clip=10.0)
    av, sdw = t.describe("avpbc", 0.02, dens), t.describe("sdw", 0.02, dens)
    assert av["weight_stats"]["low_q_share"] < 0.5 < sdw["weight_stats"]["low_q_share"]
    assert sdw["density_q_correlation"] > 0.9
    assert "density_q_correlation" not in av and "low_q_share" not in t.describe("pbc", 0.02, dens)["weight_stats"]


def test_q_reference_rescales_beta_to_the_teachers_median_q():
    """With q_reference the Q weights' factor is beta * q_reference / median Q: the teacher's median state
    weighs what it would with a teacher whose median Q is q_reference."""
    from obd.engine import q_weight_factor
    from obd.errors import ObdError

    t = hopper_targets(torch.linspace(0, 400, 1001))  # median Q 200
    q = t.q
    assert t.beta(0.02, None) == 0.02 and t.beta(0.02, 500.0) == pytest.approx(0.05)
    cfg = merge(RunConfig(), {"distill": {"method": "avpbc", "q_reference": 500.0}})
    assert q_weight_factor(t, cfg) == pytest.approx(0.05)
    _, w = t.targets_and_weights("avpbc", q_weight_factor(t, cfg), DensityConfig())
    assert float(w[500]) == pytest.approx(0.02 * 500.0)  # the median state: beta x q_reference
    assert t.describe("avpbc", 0.05, DensityConfig())["beta"] == 0.05
    assert q_weight_factor(t, merge(cfg, {"distill": {"method": "pbc"}})) == 0.02  # no Q weights: untouched
    t.q = q - 300  # a teacher whose median Q is negative gives no scale to match
    with pytest.raises(ObdError, match="median Q is -100"):
        t.beta(0.02, 500.0)


def test_negative_q_weighs_negative_as_published_or_zero_when_asked():
    """Av-PBC's weight is beta * Q, negative where Q is (the official code); q_negative "zero" (the short
    budgets) gives those states weight 0. SDW multiplies the same Q weights by its density weights."""
    q = torch.tensor([-50.0, 0.0, 100.0, 200.0])
    t = hopper_targets(q, log_density=torch.zeros(4), obs=torch.zeros(4, 11))
    _, keep = t.targets_and_weights("avpbc", 0.02, DensityConfig())
    _, zero = t.targets_and_weights("avpbc", 0.02, DensityConfig(), "zero")
    assert keep.tolist() == pytest.approx([-1.0, 0.0, 2.0, 4.0]) and zero.tolist() == pytest.approx(
        [0.0, 0.0, 2.0, 4.0]
    )
    _, sdw = t.targets_and_weights("sdw", 0.02, DensityConfig(alpha=1.0, clip=10.0))
    assert sdw.tolist() == pytest.approx(keep.tolist())  # equal densities: density weights 1
    described = [t.describe("avpbc", 0.02, DensityConfig(), how)["weight_stats"] for how in ("keep", "zero")]
    assert described[0]["max_over_mean"] == pytest.approx(4 / 1.25) and described[1]["max_over_mean"] == 4 / 1.5
    assert build_config("quick").distill.q_negative == "zero" and build_config("paper").distill.q_negative == "keep"


def test_a_run_stored_before_q_negative_existed_counts_as_zero():
    """Runs recorded before the option weighed negative Q as 0: the store reads their config so."""
    from obd.runs import comparable_run

    old = {"distill": {"method": "avpbc"}}
    assert comparable_run(old)["distill"]["q_negative"] == "zero"
    assert comparable_run({"distill": {"method": "avpbc", "q_negative": "keep"}})["distill"]["q_negative"] == "keep"


def test_targets_command_prints_the_description(tmp_path, monkeypatch, capsys):
    from obd.errors import ConfigError
    from obd.targets import main

    monkeypatch.setenv("OBD_DATA_DIR", str(tmp_path / "data"))
    with pytest.raises(ConfigError, match="unknown method"):
        main(["hopper-random", "--method", "nope"])
    with pytest.raises(ConfigError, match="unknown budget"):
        main(["hopper-random", "--budget", "nope"])
    assert main(["hopper-random", "--budget", "smoke", "--alpha", "0.5"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["task"] == "hopper-random" and d["transitions"] == 20000
    assert -1 <= d["density_q_correlation"] <= 1 and 0 < d["weight_stats"]["low_q_share"] < 1
    assert d["density_weight_stats"]["max_over_mean"] <= 10.0 + 1e-4  # the budget's cap


@pytest.mark.slow
def test_tiny_run_lowers_outer_loss_and_saves(tmp_path):
    cfg = tiny_cfg(tmp_path, distill={"method": "sdw", "outer_lr": 1.0})
    run(cfg, show_progress=False)
    out = tmp_path / "run"
    metrics = json.loads((out / "metrics.json").read_text())
    for k in (
        "score",
        "final_score",
        "method",
        "task",
        "seed",
        "data_hash",
        "versions",
        "protocol",
        "weight_stats",
        "density_weight_stats",
        "q_stats",
        "behaviour_score",
        "artifacts",
    ):
        assert k in metrics
    assert metrics["method"] == "sdw" and metrics["task"] == "hopper-random"
    assert metrics["set_change"]["relative"] > 0  # measured against the start, not the moving set
    assert [h["step"] for h in metrics["history"]] == [3, 5, 6]  # coarse, then the scored final fifth
    assert metrics["protocol"] == {"policies": 2, "episodes": 1, "last_k": 5, "ensemble": False}
    assert metrics["score"] == pytest.approx(np.mean([h["score"] for h in metrics["history"][1:]]))
    assert len(metrics["history"][0]["policy_scores"]) == 2
    assert 0 < metrics["density_weight_stats"]["ess_fraction"] <= 1
    # every log of the run under its own directory (CSV and W&B), none in the working directory
    assert (out / "logs" / "csv" / "metrics.csv").is_file() and not (tmp_path / "lightning_logs").exists()
    z = np.load(out / "synthetic.npz")
    assert z["states"].shape == (16, 11) and z["actions"].shape == (16, 3) and str(z["task"]) == "hopper-random"
    # the outer loss of the learned set is lower than that of its initialization, on the same batches
    t = prepare_targets(cfg, "sdw", show_progress=False)
    batch = [x[None] for x in OBDDataModule(t).add_run("sdw", cfg.distill.beta, cfg.density, 64, 2, seed=0).batch(0)]
    s0, a0 = initial_set(t, "real-pairs", 16, 0)
    losses = []
    for s, a in ((s0, a0), (torch.from_numpy(z["states"]), torch.from_numpy(z["actions"]))):
        losses.append(
            np.mean([float(outer_gradients([cfg.distill], s[None], a[None], *batch, [k])[0]) for k in range(4)])
        )
    assert losses[1] < losses[0]
    # the standalone evaluator reads it back with the same protocol
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "obd.evaluate",
            str(out / "synthetic.npz"),
            "--policies",
            "3",
            "--episodes",
            "2",
            "--json",
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["task"] == "hopper-random" and len(res["policy_scores"]) == 3 and len(res["episode_scores"][0]) == 2


def test_a_run_logged_to_a_file_shows_its_progress_while_it_runs(tmp_path, capsys):
    """Outside a terminal (a log file, a pipe) the progress bar is written every 10 outer steps, not
    drawn once at the end."""
    run(tiny_cfg(tmp_path, outer_steps=20, eval_every=0, wandb=False), show_progress=True)
    out = capsys.readouterr()
    assert "10/20" in out.out + out.err


def test_bf16_products_on_a_cpu_without_native_bf16_are_warned_about(tmp_path, monkeypatch, caplog):
    """Emulated bf16 products are slower than float32: a run asking for them there says so once, up front."""
    import obd.devices

    monkeypatch.setattr(obd.devices, "native_bf16", lambda device: False)
    bf16 = {"distill": {**TINY["distill"], "inner_precision": "bfloat16"}}
    with caplog.at_level("WARNING", logger="obd.engine"):
        run(tiny_cfg(tmp_path, outer_steps=1, eval_every=0, **bf16), show_progress=False)
    assert any("without native bf16" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level("WARNING", logger="obd.engine"):
        run(tiny_cfg(tmp_path / "f32", outer_steps=1, eval_every=0), show_progress=False)
    assert not any("native bf16" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_resume_gives_the_uninterrupted_result(tmp_path):
    """A resumed run equals the uninterrupted one: the batch of step t depends on (seed, t) only."""
    straight = run(tiny_cfg(tmp_path / "a", outer_steps=4), show_progress=False)
    run(tiny_cfg(tmp_path / "b", outer_steps=2), show_progress=False)
    resumed = run(tiny_cfg(tmp_path / "b", outer_steps=4), resume=True, show_progress=False)
    assert [h["step"] for h in resumed["history"]] == [2, 3, 4]  # step 2 from the first run kept, not redone
    za, zb = np.load(tmp_path / "a" / "run" / "synthetic.npz"), np.load(tmp_path / "b" / "run" / "synthetic.npz")
    np.testing.assert_allclose(za["states"], zb["states"], rtol=1e-5, atol=1e-6)
    assert straight["history"][-1]["step"] == 4
    # the CSV log continues in the same file: rows of both invocations (Lightning's logger alone deletes it)
    import csv

    rows = list(csv.DictReader(open(tmp_path / "b" / "run" / "logs" / "csv" / "metrics.csv")))
    steps = {int(r["step"]) for r in rows if r.get("outer_loss")}
    assert {0, 1} <= steps and {2, 3} <= steps


def test_random_baseline_evaluates_random_real_pairs(tmp_path):
    """The random baseline scores the random real pairs it draws: the same pairs evaluated directly give its score."""
    from obd.evaluate import evaluate_synthetic
    from obd.seeding import derive_seed

    cfg = tiny_cfg(tmp_path, distill={"method": "random", "seed": 3})
    m = run(cfg, show_progress=False)
    assert m["method"] == "random" and [h["step"] for h in m["history"]] == [0]
    z = np.load(tmp_path / "run" / "synthetic.npz")
    t = prepare_targets(cfg, "dbc", show_progress=False)
    s, a = initial_set(t, "real-pairs", 16, 3)
    np.testing.assert_array_equal(z["states"], s.numpy())
    np.testing.assert_array_equal(z["actions"], a.numpy())  # dataset actions of those states
    again = evaluate_synthetic(s, a, t.task, t.mean.numpy(), t.std.numpy(), cfg.eval, derive_seed(3, "evaluation", 0))
    assert m["score"] == pytest.approx(again["score"])


def run_train(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "obd.train", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def test_cli_errors(tmp_path):
    r = run_train("--task", "hopper-mediocre", "--budget", "smoke")
    assert r.returncode == 2 and "unknown task 'hopper-mediocre'" in r.stderr and "Traceback" not in r.stderr
    r = run_train("--task", "hopper-random", "--method", "xyz")
    assert r.returncode == 2 and "config key 'distill.method': expected one of" in r.stderr
    r = run_train("--task", "hopper-random", "--budget", "huge")
    assert r.returncode == 2 and "unknown budget 'huge'" in r.stderr and "smoke" in r.stderr


def test_config_file_keeps_eval_settings(tmp_path):
    """eval settings from --config survive (eval.inner_steps is not replaced by distill.inner_steps)."""
    from obd.train import config_from_args, parser

    f = tmp_path / "c.yaml"
    f.write_text("eval: {inner_steps: 7}\ndistill: {inner_steps: 20}\n")
    cfg = config_from_args(parser().parse_args(["--task", "hopper-random", "--config", str(f)]))
    assert cfg.eval.inner_steps == 7 and cfg.distill.inner_steps == 20 and cfg.budget == "quick"


def test_budget_is_recorded_by_the_one_builder():
    """One builder applies and records the budget; a bare config claims none."""
    assert RunConfig().budget is None  # a bare config claims no budget
    cfg = build_config("quick", [{"data": {"source": "hopper-medium"}}])
    assert cfg.budget == "quick" and cfg.outer_steps == 300 and cfg.distill.outer_optimizer == "adam"


def test_a_finished_run_stands_for_any_budget_resolving_to_its_config(tmp_path):
    """The budget's name is a label: a run finished under one preset is reused by another that resolves to
    the same config (the curves' runs at a dataset's converged length serve the converged table); a
    config that differs in what the run computes is refused, naming the field."""
    import dataclasses

    from obd.errors import ObdError
    from obd.runs import finished_run

    cfg = tiny_cfg(tmp_path, outer_steps=2, eval_every=2, budget="quick")
    m = run(cfg, show_progress=False)
    out = tmp_path / "run"
    assert finished_run(out, dataclasses.replace(cfg, budget="converged"), m["data_hash"], "")["score"] == m["score"]
    other = merge(cfg, {"budget": "converged", "distill": {"outer_lr": 0.02}})
    with pytest.raises(ObdError, match="distill.outer_lr: 0.1 then, 0.02 now"):
        finished_run(out, other, m["data_hash"], "")


def test_unwritable_out_fails_before_any_work(tmp_path):
    """An --out that cannot be written (below a regular file, on /proc) fails before data and teacher are prepared."""
    (tmp_path / "file").write_text("")
    for out in (str(tmp_path / "file" / "run"), "/proc/obd-run"):
        r = run_train(
            "--task", "hopper-random", "--budget", "smoke", "--out", out, env={"OBD_DATA_DIR": str(tmp_path / "data")}
        )
        assert r.returncode == 2 and "cannot write there" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "data").exists()


@pytest.mark.slow
def test_ctrl_c_keeps_the_state_and_names_the_resume_command(tmp_path):
    """Ctrl-C during distillation checkpoints the run and names the command that resumes it."""
    import signal
    import time

    env = {**os.environ, "OBD_DATA_DIR": str(tmp_path / "data"), "WANDB_MODE": "offline"}
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        json.dumps({k: v for k, v in TINY.items() if k != "wandb"} | {"outer_steps": 100000, "eval_every": 0})
    )
    args = [sys.executable, "-m", "obd.train", "--budget", "smoke", "--config", str(cfg), "--out", str(tmp_path / "r")]
    p = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    deadline = time.time() + 240
    while time.time() < deadline and not (tmp_path / "r" / CHECKPOINT).exists():
        time.sleep(0.2)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: interrupted; the state is kept in") and last.endswith("--resume")
    ck = torch.load(tmp_path / "r" / CHECKPOINT, weights_only=True, map_location="cpu")
    assert ck["step"] >= 2
    run_id = (tmp_path / "r" / "wandb-run-id").read_text()
    # resuming continues the same W&B run (and stops at once here: --outer-steps at the checkpoint's step)
    r = subprocess.run(
        [*args, "--resume", "--outer-steps", str(ck["step"])],
        env=env,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / "r" / "wandb-run-id").read_text() == run_id
    assert len(list((tmp_path / "r" / "wandb").glob("offline-run-*"))) >= 1


@pytest.mark.slow
def test_ctrl_c_during_collect_is_one_line(tmp_path):
    import re
    import signal
    import time

    env = {**os.environ, "OBD_DATA_DIR": str(tmp_path / "data")}
    log = tmp_path / "err.log"
    with open(log, "w") as err_file:  # a file, not a pipe: tqdm's output must never block the child
        # a test runner started in the background inherits SIGINT ignored (shells do that to background
        # jobs, and Python then keeps it ignored): give the child the default a terminal user has
        p = subprocess.Popen(
            [sys.executable, "-m", "obd.data", "collect", "hopper-random", "--size", "2000000"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err_file,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        deadline = time.time() + 120
        while time.time() < deadline and not re.search(r"\| *[1-9]\d*/2000000", log.read_text()):
            time.sleep(0.2)  # interrupt once steps are being collected
        p.send_signal(signal.SIGINT)
        p.wait(timeout=120)
    err = log.read_text()
    assert p.returncode == 130 and "Traceback" not in err, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("error: interrupted")
    assert not list((tmp_path / "data" / "datasets").glob("*.hdf5"))  # nothing half-written


def test_every_config_field_is_a_flag_and_print_config_shows_the_resolved_config(tmp_path, capsys):
    import yaml

    from obd.config import to_dict
    from obd.flags import ALIASES, NOT_FLAGS, leaves
    from obd.train import config_from_args, main, parser

    p = parser()
    flags = {s for a in p._actions for s in a.option_strings}
    for key, *_ in leaves():
        assert key in NOT_FLAGS or f"--{key}" in flags, key
    assert all(f"--{a}" in flags for a in ALIASES)
    argv = ["--task", "hopper-medium", "--budget", "smoke", "--seed", "3", "--distill.outer_lr", "1e-3"]
    argv += ["--eval.hidden", "[64,64]", "--start", "kmeans", "--density.clip", "null", "--out", str(tmp_path)]
    c = config_from_args(p.parse_args([*argv, "--no-wandb"]))
    assert (c.distill.seed, c.distill.outer_lr, c.eval.hidden, c.distill.start) == (3, 1e-3, (64, 64), "kmeans")
    assert c.density.clip is None and c.wandb is False and c.budget == "smoke" and c.data.source == "hopper-medium"
    assert main([*argv, "--no-wandb", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out) == to_dict(c)
    with pytest.raises(ConfigError, match="distill.inner_lr"):
        config_from_args(p.parse_args(["--distill.inner_lr", "fast"]))


@pytest.mark.parametrize("method,start", [("random-teacher", "teacher-labelled"), ("kmeans-teacher", "kmeans")])
def test_teacher_baselines_run_without_distillation(tmp_path, method, start):
    cfg = tiny_cfg(tmp_path, distill={"method": method, "seed": 2})
    m = run(cfg, show_progress=False)
    assert m["method"] == method and [h["step"] for h in m["history"]] == [0]
    assert m["teacher"] is not None  # the teacher labelled the states
    z = np.load(tmp_path / "run" / "synthetic.npz")
    t = prepare_targets(cfg, "pbc", show_progress=False)
    s, a = initial_set(t, start, 16, 2)
    np.testing.assert_array_equal(z["states"], s.numpy())
    np.testing.assert_array_equal(z["actions"], a.numpy())


def test_a_distillation_run_starts_from_the_configured_start(tmp_path):
    """With zero outer steps the saved set is the start itself."""
    cfg = tiny_cfg(tmp_path, outer_steps=0, distill={"method": "dbc", "start": "kmeans", "seed": 1})
    run(cfg, show_progress=False)
    z = np.load(tmp_path / "run" / "synthetic.npz")
    s, a = initial_set(prepare_targets(cfg, "pbc", show_progress=False), "kmeans", 16, 1)
    np.testing.assert_array_equal(z["states"], s.numpy())
    np.testing.assert_array_equal(z["actions"], a.numpy())


def test_the_score_averages_only_evaluations_in_the_final_fifth(tmp_path):
    cfg = tiny_cfg(tmp_path, outer_steps=10, eval_every=5, checkpoint_every=5)
    assert cfg.evaluation_steps() == [5, 8, 9, 10] and cfg.scored_from() == 8
    m = run(cfg, show_progress=False)
    assert [h["step"] for h in m["history"]] == [5, 8, 9, 10]  # the coarse one, then the scored ones
    assert m["scored_steps"] == [8, 9, 10] and m["last_k_used"] == 3
    assert m["score"] == pytest.approx(np.mean([h["score"] for h in m["history"][1:]]))
    assert m["final_score"] == m["history"][-1]["score"]
    assert all(h["cpu_seconds"] >= 0 and h["eval_cpu_seconds"] >= 0 for h in m["history"])


def test_cosine_schedule_resumes_to_the_uninterrupted_result(tmp_path):
    over = {"outer_steps": 6, "distill": {"outer_optimizer": "adam", "outer_lr": 0.05, "outer_lr_schedule": "cosine"}}
    run(tiny_cfg(tmp_path / "a", **over), show_progress=False)

    class Stop(Exception):
        pass

    def stop_at_3(step: int, score: float) -> None:
        if step == 3:
            raise Stop  # killed after step 3; the last checkpoint is step 2's

    with pytest.raises(Stop):
        run(tiny_cfg(tmp_path / "b", **over), show_progress=False, listeners=[stop_at_3])
    run(tiny_cfg(tmp_path / "b", **over), resume=True, show_progress=False)
    za, zb = np.load(tmp_path / "a" / "run" / "synthetic.npz"), np.load(tmp_path / "b" / "run" / "synthetic.npz")
    np.testing.assert_allclose(za["states"], zb["states"], rtol=1e-5, atol=1e-6)
    # and the schedule matters: a constant lr ends elsewhere
    const = tiny_cfg(tmp_path / "c", **{**over, "distill": {**over["distill"], "outer_lr_schedule": "constant"}})
    run(const, show_progress=False)
    assert not np.allclose(za["states"], np.load(tmp_path / "c" / "run" / "synthetic.npz")["states"], atol=1e-4)


def test_resume_refuses_another_method_or_a_missing_checkpoint(tmp_path):
    from obd.errors import ObdError

    with pytest.raises(ObdError, match="no checkpoint in"):
        run(tiny_cfg(tmp_path, outer_steps=2), resume=True, show_progress=False)
    run(tiny_cfg(tmp_path, outer_steps=2, distill={"method": "sdw"}), show_progress=False)
    with pytest.raises(ObdError, match="another run.*distill.method: 'sdw' then, 'avpbc' now"):
        run(tiny_cfg(tmp_path, outer_steps=4, distill={"method": "avpbc"}), resume=True, show_progress=False)
    # the same run continues to more steps; with no resume flag a library caller continues it too
    m = run(tiny_cfg(tmp_path, outer_steps=4, distill={"method": "sdw"}), show_progress=False)
    assert [h["step"] for h in m["history"]][0] == 2  # step 2's evaluation kept from the first invocation


def wandb_records(folder) -> dict:
    """What an offline W&B run under ``folder`` recorded: its run record, summary keys and values,
    step metrics and record types, read from the run's transaction log (LevelDB log format of W&B
    protobuf records). wandb-core may still be writing the log when ``finish()`` has returned (it
    closes the run's stream in its own process), so the log is read once it holds the run's exit."""
    import time

    deadline = time.monotonic() + 60
    while True:
        out = _wandb_log(folder)
        if "exit" in out["types"] or time.monotonic() > deadline:
            return out
        time.sleep(0.2)


def _wandb_log(folder) -> dict:
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = list(folder.glob("**/offline-run-*/run-*.wandb"))
    data, pos, records, buf = path.read_bytes(), 7, [], b""
    while pos < len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        pos += 7
        if kind == 0:
            pos += left - 7
            continue
        chunk, pos = data[pos : pos + length], pos + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            records.append(rec)
    out: dict = {"types": set(), "summary": {}, "step_metrics": {}}
    for r in records:
        t = r.WhichOneof("record_type")
        out["types"].add(t)
        if t == "run":
            out["run"] = r.run
        elif t == "summary":
            out["summary"].update({u.key: json.loads(u.value_json) for u in r.summary.update if u.key})
        elif t == "metric" and r.metric.step_metric:
            out["step_metrics"][r.metric.glob_name or r.metric.name] = r.metric.step_metric
    return out


def test_wandb_run_carries_the_score_the_outer_step_and_its_place(tmp_path, monkeypatch):
    over = {"wandb": True, "wandb_group": "g", "wandb_job_type": "final", "wandb_name": "hopper-sdw-final-s1"}
    m = run(tiny_cfg(tmp_path / "a", **over, distill={"method": "sdw", "seed": 1}), show_progress=False)
    w = wandb_records(tmp_path / "a" / "run")
    assert (w["run"].job_type, w["run"].run_group, w["run"].display_name) == ("final", "g", "hopper-sdw-final-s1")
    assert w["summary"]["score"] == pytest.approx(m["score"]) and w["summary"]["final_score"] == m["final_score"]
    assert w["step_metrics"]["*"] == "trainer/global_step"  # charts against the outer step
    assert "artifact" in w["types"]  # the synthetic set
    # a baseline is logged too, as a baseline; WANDB_DIR, when set, is where the run goes
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    b = run(tiny_cfg(tmp_path / "b", wandb=True, distill={"method": "random"}), show_progress=False)
    w = wandb_records(tmp_path / "wb")
    assert w["run"].job_type == "baseline" and w["summary"]["score"] == pytest.approx(b["score"])
    assert not list((tmp_path / "b").glob("**/offline-run-*"))


def test_a_cached_teacher_is_scored_again_when_more_episodes_are_asked(tmp_path):
    cfg = tiny_cfg(tmp_path, teacher={"eval_episodes": 1})
    first = prepare_targets(cfg, "pbc", show_progress=False).teacher_info["normalized_return"]
    assert first["episodes"] == 1 and first["se"] is None
    more = prepare_targets(tiny_cfg(tmp_path, teacher={"eval_episodes": 3}), "pbc", show_progress=False)
    again = more.teacher_info["normalized_return"]
    assert again["episodes"] == 3 and again["se"] is not None  # the same cached teacher, scored on 3 episodes
    assert more.teacher_info["key"] == prepare_targets(cfg, "pbc", show_progress=False).teacher_info["key"]


def test_a_longer_teacher_continues_the_shorter_ones_training_and_equals_a_straight_one(tmp_path, monkeypatch, caplog):
    """Finding a teacher's length trains each length once: the 300-step teacher continues from the kept
    final state of the 200-step one (the same config), and its outputs equal a 300-step teacher trained
    from scratch elsewhere."""

    def cfg(steps: int):
        return tiny_cfg(tmp_path, teacher={"td3bc": {**TINY["teacher"]["td3bc"], "steps": steps}})

    prepare_targets(cfg(200), "pbc", show_progress=False)
    with caplog.at_level("INFO", logger="obd.targets"):
        longer = prepare_targets(cfg(300), "pbc", show_progress=False)
    assert any(
        "continuing teacher-state-td3bc-" in r.getMessage() and r.getMessage().endswith("-200.pt to 300 steps")
        for r in caplog.records
    )
    monkeypatch.setenv("OBD_DATA_DIR", str(tmp_path / "elsewhere"))
    caplog.clear()
    with caplog.at_level("INFO", logger="obd.targets"):
        straight = prepare_targets(cfg(300), "pbc", show_progress=False)
    assert not any("continuing" in r.getMessage() for r in caplog.records)
    assert straight.data_hash == longer.data_hash
    torch.testing.assert_close(longer.teacher_actions, straight.teacher_actions)
    torch.testing.assert_close(longer.q, straight.q)
