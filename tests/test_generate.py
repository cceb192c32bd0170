import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from obd.behavior.export import export_policy, medium_candidates, pick_expert
from obd.behavior.generate import collect
from obd.behavior.sac import SACConfig, train_sac
from obd.data import DatasetError, generated_path, get_task, load_source
from obd.errors import ObdError

TINY = dict(
    learning_starts=200, batch_size=32, hidden=(16, 16), snapshot_every=150, eval_episodes=1, checkpoint_every=150
)


@pytest.fixture
def hopper_policies(tmp_path):
    """A tiny SAC run on Hopper-v5 exported as the policy file generation reads."""
    workdir = tmp_path / "sac"
    train_sac(get_task("hopper-medium"), SACConfig(total_steps=450, **TINY), workdir, show_progress=False)
    out = tmp_path / "data" / "policies" / "hopper.pt"
    meta = export_policy(
        get_task("hopper-medium"), workdir, out, episodes=2, command="python -m obd.behavior train hopper"
    )
    return out, meta


@pytest.mark.slow
def test_sac_resumes_from_checkpoint(tmp_path):
    task = get_task("hopper-medium")
    w = tmp_path / "run"
    s1 = train_sac(task, SACConfig(total_steps=300, **TINY), w, show_progress=False)
    assert [s["step"] for s in s1] == [150, 300]
    ck = torch.load(w / "checkpoint.pt", weights_only=False)
    assert ck["step"] == 300 and ck["buffer"]["obs"].shape == (300, 11)
    s2 = train_sac(task, SACConfig(total_steps=450, **TINY), w, show_progress=False)
    assert [s["step"] for s in s2] == [150, 300, 450]  # continued, nothing redone
    np.testing.assert_array_equal(
        torch.load(w / "checkpoint.pt", weights_only=False)["buffer"]["obs"][:300], ck["buffer"]["obs"]
    )
    # the updates changed the actor since the first snapshot
    assert not torch.equal(s2[0]["actor"]["net.0.weight"], s2[-1]["actor"]["net.0.weight"])


@pytest.mark.slow
def test_interrupted_sac_run_resumes_exactly(tmp_path, monkeypatch):
    """An interrupted, resumed run produces the same snapshots as an uninterrupted one (the medium
    and expert policies of a dataset must come from one run, whatever interrupted it)."""
    import obd.behavior.sac as sac

    task, cfg = get_task("hopper-medium"), SACConfig(total_steps=600, **TINY)
    straight = train_sac(task, cfg, tmp_path / "straight", show_progress=False)
    save = sac.step_ckpt

    def save_then_interrupt(path, *args):
        save(path, *args)
        if args[-2] >= 300:  # step
            raise KeyboardInterrupt

    monkeypatch.setattr(sac, "step_ckpt", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_sac(task, cfg, tmp_path / "cut", show_progress=False)
    assert 300 <= torch.load(tmp_path / "cut" / "checkpoint.pt", weights_only=False)["step"] < 600
    monkeypatch.setattr(sac, "step_ckpt", save)
    resumed = train_sac(task, cfg, tmp_path / "cut", show_progress=False)
    assert [s["step"] for s in resumed] == [s["step"] for s in straight] == [150, 300, 450, 600]
    for a, b in zip(straight, resumed):
        assert a["score"] == b["score"] and all(torch.equal(a["actor"][k], b["actor"][k]) for k in a["actor"])


@pytest.mark.slow
def test_export_and_collect_each_kind(hopper_policies):
    out, meta = hopper_policies
    pf = torch.load(out, weights_only=True)
    assert pf["medium"]["step"] == meta["medium_step"] and "expert" in pf  # ran to total_steps
    assert meta["command"] == "python -m obd.behavior train hopper --steps 450"  # reproduces this run
    assert [r["step"] for r in pf["replay"]][-1] == pf["medium"]["step"]
    assert pf["replay"][0]["actor"]["net.0.weight"].dtype == torch.float16

    for kind, size in [("random", 300), ("medium", 300), ("medium", 200), ("expert", 200), ("medium-expert", 400)]:
        task = get_task(f"hopper-{kind}")
        path = collect(task, size, seed=1, show_progress=False)
        assert path == generated_path(task, size, 1)
        with h5py.File(path) as f:
            assert f["observations"].shape == (size, 11) and f["metadata/task"][()].decode() == task.name
            assert {"qpos", "qvel"} <= set(f["infos"])
        ds = load_source(task.name, task, size=size, seed=1)
        assert len(ds) == size and np.all(np.abs(ds.actions) <= 1)
        # consecutive transitions inside an episode chain: next_obs[t] == obs[t + 1]
        inner = ~(ds.terminals | ds.timeouts)[:-1]
        np.testing.assert_array_equal(ds.next_observations[:-1][inner], ds.observations[1:][inner])

    # medium-expert is exactly medium followed by expert, as D4RL built it (same data seed, same sizes)
    me = load_source("hopper-medium-expert", size=400, seed=1)
    med = load_source("hopper-medium", size=200, seed=1)
    exp = load_source("hopper-expert", size=200, seed=1)
    np.testing.assert_array_equal(me.observations, np.concatenate([med.observations, exp.observations]))

    # medium-replay defaults to the number of training steps up to the medium snapshot, stored float64
    task = get_task("hopper-medium-replay")
    path = collect(task, None, seed=0, show_progress=False)
    with h5py.File(path) as f:
        assert f["observations"].shape[0] == pf["medium"]["step"] and f["observations"].dtype == np.float64
        policies = f["metadata/policies"][()].decode().split(",")
    assert policies[0] == "random" and policies[-1] == f"step{pf['medium']['step']}"

    # a second call is a cache hit: same file, untouched
    mtime = os.path.getmtime(path)
    assert collect(task, None, seed=0, show_progress=False) == path and os.path.getmtime(path) == mtime
    # a different seed is a different dataset
    other = collect(get_task("hopper-random"), 300, seed=2, show_progress=False)
    assert not np.array_equal(
        h5py.File(other)["actions"][()], h5py.File(generated_path(get_task("hopper-random"), 300, 1))["actions"][()]
    )


def test_medium_is_early_stopped():
    """Medium candidates end at the run's first snapshot scoring 1.25x the target: a late snapshot with
    one bad evaluation never qualifies (D4RL early-stopped its medium policy)."""
    scores = [10.0, 30.0, 42.0, 47.0, 60.0, 40.0, 90.0, 44.0, 95.0]
    snaps = [{"step": 100 * (i + 1), "score": sc} for i, sc in enumerate(scores)]
    assert [s["step"] for s in medium_candidates(snaps, 44.0, n=3)] == [300, 400, 200]  # not 800 (44.0)
    assert [s["step"] for s in medium_candidates(snaps[:4], 44.0, n=2)] == [300, 400]  # never passed: all
    assert medium_candidates(snaps, 44.0, n=10)[-1]["step"] == 100 and len(medium_candidates(snaps, 44.0, n=10)) == 5


def test_expert_is_the_best_remeasured_late_snapshot():
    """The expert is picked among the last 10% of the run: the 5 best training-time estimates are
    re-measured and the best re-measurement wins, however good an earlier snapshot looked."""
    snaps = [
        {"step": s, "score": sc}
        for s, sc in [
            (100, 99.0),
            (850, 10.0),
            (910, 60.0),
            (920, 90.0),
            (930, 70.0),
            (940, 80.0),
            (950, 85.0),
            (960, 20.0),
            (1000, 75.0),
        ]
    ]
    remeasured = {910: 50.0, 920: 40.0, 930: 95.0, 940: 60.0, 950: 61.0, 960: 200.0, 1000: 30.0}
    calls: list[int] = []

    def data_score(s: dict) -> float:
        calls.append(s["step"])
        return remeasured[s["step"]]

    assert pick_expert(snaps, 1000, data_score)["step"] == 930  # 960 (estimate 20) is not re-measured
    assert sorted(calls) == [920, 930, 940, 950, 1000]
    snaps[7]["score"] = 86.0  # now among the 5 best estimates, and its re-measurement is the best
    assert pick_expert(snaps, 1000, data_score)["step"] == 960
    with pytest.raises(ObdError, match="no snapshot in the last 10%"):
        pick_expert(snaps[:2], 1000, data_score)


@pytest.mark.slow
def test_missing_expert_is_a_clear_error(tmp_path):
    w = tmp_path / "sac"
    train_sac(get_task("hopper-medium"), SACConfig(total_steps=300, **TINY), w, show_progress=False)
    cfg = json.loads((w / "config.json").read_text())
    cfg["total_steps"] = 10_000  # pretend training has not finished
    (w / "config.json").write_text(json.dumps(cfg))
    export_policy(get_task("hopper-medium"), w, tmp_path / "data" / "policies" / "hopper.pt", episodes=1)
    with pytest.raises(DatasetError, match="no expert policy for hopper"):
        collect(get_task("hopper-expert"), 100, show_progress=False)


@pytest.mark.slow
def test_expert_added_later_keeps_the_shipped_medium(tmp_path):
    """The expert is exported when training finishes, without changing the medium policy (and
    so the medium datasets) exported earlier from the same run; another run's file is refused."""
    task, w = get_task("hopper-medium"), tmp_path / "sac"
    train_sac(task, SACConfig(total_steps=300, **TINY), w, show_progress=False)
    cfg = json.loads((w / "config.json").read_text())
    cfg["total_steps"] = 450  # the first export happens before training ends
    (w / "config.json").write_text(json.dumps(cfg))
    early = tmp_path / "early.pt"
    export_policy(task, w, early, episodes=1)
    assert "expert" not in torch.load(early, weights_only=True)
    train_sac(task, SACConfig(total_steps=450, **TINY), w, show_progress=False)
    final = tmp_path / "final.pt"
    meta = export_policy(task, w, final, episodes=1, keep_medium=early)
    a, b = torch.load(early, weights_only=True), torch.load(final, weights_only=True)
    assert b["expert"]["step"] == 450 and meta["expert_score"] is not None
    assert b["medium"]["step"] == a["medium"]["step"] and meta["medium_step"] == a["medium"]["step"]
    assert all(torch.equal(a["medium"]["actor"][k], b["medium"]["actor"][k]) for k in a["medium"]["actor"])
    assert [r["step"] for r in a["replay"]] == [r["step"] for r in b["replay"]]
    other = tmp_path / "other"
    train_sac(task, SACConfig(total_steps=300, seed=1, **TINY), other, show_progress=False)
    with pytest.raises(ObdError, match="not a snapshot of this SAC run"):
        export_policy(task, other, tmp_path / "x.pt", episodes=1, keep_medium=early)

    # data generated before the expert was added stays valid; data of a replaced expert is refused
    shipped = tmp_path / "data" / "policies" / "hopper.pt"
    shipped.parent.mkdir(parents=True)
    shutil.copy(early, shipped)
    collect(get_task("hopper-medium"), 100, show_progress=False)
    shutil.copy(final, shipped)
    assert len(load_source("hopper-medium", size=100)) == 100
    collect(get_task("hopper-expert"), 100, show_progress=False)
    b["expert"]["actor"]["net.0.weight"] += 0.01  # an expert trained further and exported again
    torch.save(b, shipped)
    assert len(load_source("hopper-medium", size=100)) == 100
    for read in (
        lambda: load_source("hopper-expert", size=100),
        lambda: collect(get_task("hopper-expert"), 100, show_progress=False),
    ):
        with pytest.raises(DatasetError, match=r"hopper-expert-n100-s0.hdf5: rolled out from other hopper behaviour"):
            read()


def run_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "obd.data", *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def test_cli_collect_and_info(tmp_path):
    r = run_cli("collect", "--task", "walker2d-random", "--size", "250")
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).is_file()
    r = run_cli("info", "walker2d-random", "--size", "250", "--json")
    info = json.loads(r.stdout)
    assert info["transitions"] == 250 and info["obs_dim"] == 17 and info["act_dim"] == 6
    assert info["episodes"] >= 1 and info["mean_normalized_return"] < 20  # random data scores about 0
    # the same file by path: the task is read from the file's metadata
    r2 = run_cli("info", r.stdout and info["source"], "--json")
    assert json.loads(r2.stdout)["transitions"] == 250
    text = run_cli("info", "walker2d-random", "--size", "250").stdout
    assert "mean_normalized_return" in text and "transitions" in text


def test_cli_errors_are_one_line():
    r = run_cli("collect", "ant-medium")
    assert r.returncode == 2 and "unknown task 'ant-medium'" in r.stderr and "hopper-medium-replay" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("info", "hopper-medium")  # never generated here: reading does not generate
    assert r.returncode == 2 and "not generated yet" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("info", "/nonexistent/file.hdf5", "--task", "hopper-medium")
    assert r.returncode == 2 and "/nonexistent/file.hdf5: no such file" in r.stderr


def test_reading_never_generates(tmp_path):
    """Reading a dataset that is not generated yet is a one-line error naming the command; nothing is generated."""
    with pytest.raises(DatasetError, match="not generated yet.*python -m obd.data collect hopper-random"):
        load_source("hopper-random", size=100)
    assert not (tmp_path / "data" / "datasets").exists()


def test_behavior_export_error_is_one_line(tmp_path):
    """export-policy on a directory without a SAC run is a one-line error, no traceback."""
    r = subprocess.run(
        [sys.executable, "-m", "obd.behavior", "export", "hopper", "--workdir", str(tmp_path / "none")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "not a behaviour-SAC run" in r.stderr and "Traceback" not in r.stderr


SHIPPED = {
    "halfcheetah": (120_000, 980_000),
    "hopper": (230_000, 1_910_000),
    "walker2d": (360_000, 1_970_000),
}  # env: (medium step, expert step)


@pytest.mark.parametrize("env", sorted(SHIPPED))
def test_shipped_policy_makes_expert_data(env):
    """A fresh clone generates ENV-expert from the shipped policy file; its medium is the
    snapshot the medium datasets were made from and its expert the one the README reports."""
    from obd.data.behaviour_policies import policy_file

    pf = torch.load(policy_file(env), weights_only=True)
    assert "obd/behavior/policies" in policy_file(env).as_posix()
    assert (pf["medium"]["step"], pf["expert"]["step"]) == SHIPPED[env]
    path = collect(get_task(f"{env}-expert"), 1000, seed=0, show_progress=False)
    d = load_source(f"{env}-expert", size=1000, seed=0)
    assert path.is_file() and len(d.observations) == 1000
