import re

import h5py
import numpy as np
import pytest

from obd.data import DatasetError, get_task, load_source
from obd.data.d4rl import d4rl_url, fetch_d4rl, load_d4rl_hdf5, write_d4rl_hdf5

FIELDS = ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")


def write_real_layout(path, tr, *, next_obs=True, dtype=np.float32, drop=(), **override):
    """A file laid out as D4RL's gym-MuJoCo v2 files: top-level arrays, infos/, metadata/."""
    arrays = {k: getattr(tr, k) for k in FIELDS if next_obs or k != "next_observations"}
    arrays = {k: v.astype(dtype) if v.dtype == np.float32 else v for k, v in arrays.items() if k not in drop}
    arrays.update(override)
    infos = {"qpos": tr.qpos, "qvel": tr.qvel, "action_log_probs": np.zeros(len(tr.rewards), np.float32)}
    policy = {"fc0.weight": np.zeros((256, 11), np.float32), "last_fc.bias": np.zeros(3, np.float32)}
    return write_d4rl_hdf5(path, arrays, infos=infos, metadata={"algorithm": "SAC", "iteration": 42}, policy=policy)


def test_round_trip_real_layout(tmp_path, hopper_transitions):
    tr = hopper_transitions
    path = write_real_layout(tmp_path / "hopper_medium-v2.hdf5", tr)
    with h5py.File(path) as f:  # the layout itself
        assert {"observations", "actions", "rewards", "terminals", "timeouts", "infos", "metadata"} <= set(f)
        assert set(f["infos"]) == {"qpos", "qvel", "action_log_probs"} and "policy" in f["metadata"]
    ds = load_source(str(path), get_task("hopper-medium"))
    for k in FIELDS:
        np.testing.assert_array_equal(getattr(ds, k), getattr(tr, k))
    assert ds.observations.dtype == np.float32 and ds.terminals.dtype == bool
    assert ds.meta["metadata/algorithm"] == "SAC" and ds.meta["metadata/iteration"] == 42
    # episodes: every boundary is a terminal or timeout; returns sum to the total reward
    assert len(ds.episode_ends) == int((tr.terminals | tr.timeouts).sum())
    assert ds.episode_returns().sum() == pytest.approx(tr.rewards.astype(np.float64).sum(), rel=1e-6)
    assert ds.summary(get_task("hopper-medium"))["episodes"] == len(ds.episode_ends)


def test_float64_and_rebuilt_next_observations(tmp_path, hopper_transitions):
    tr = hopper_transitions
    path = write_real_layout(tmp_path / "hopper_medium_replay-v2.hdf5", tr, next_obs=False, dtype=np.float64)
    ds = load_d4rl_hdf5(path, get_task("hopper-medium-replay"))
    assert ds.observations.dtype == np.float32
    inner = ~(tr.terminals | tr.timeouts)
    np.testing.assert_allclose(ds.next_observations[inner], tr.next_observations[inner], rtol=1e-6)
    ends = ~inner
    np.testing.assert_array_equal(ds.next_observations[ends], ds.observations[ends])


def test_errors_name_the_file(tmp_path, hopper_transitions):
    tr = hopper_transitions
    task = get_task("hopper-medium")
    cases = {
        "missing.hdf5": (dict(drop=("timeouts",)), "missing key(s) ['timeouts']"),
        "dim.hdf5": (dict(observations=np.zeros((len(tr.rewards), 17), np.float32)), "observation dimension 11"),
        "act.hdf5": (dict(actions=np.zeros((len(tr.rewards), 6), np.float32)), "action dimension 3"),
        "len.hdf5": (dict(rewards=tr.rewards[:-5]), "differ in length"),
    }
    for name, (kw, msg) in cases.items():
        path = write_real_layout(tmp_path / name, tr, **kw)
        with pytest.raises(DatasetError, match=re.escape(msg)) as e:
            load_d4rl_hdf5(path, task)
        assert str(path) in str(e.value)
    obs = tr.observations.copy()
    obs[7, 2] = np.nan
    path = write_real_layout(tmp_path / "nan.hdf5", tr, observations=obs)
    with pytest.raises(DatasetError, match=r"observations has 1 NaN/inf value\(s\), first at row\(s\) \[7\]"):
        load_d4rl_hdf5(path, task)
    garbage = tmp_path / "corrupt.hdf5"
    garbage.write_bytes(b"not an hdf5 file" * 10)
    with pytest.raises(DatasetError, match="corrupt.hdf5: cannot read"):
        load_d4rl_hdf5(garbage, task)
    with pytest.raises(DatasetError, match="no such file"):
        load_d4rl_hdf5(tmp_path / "absent.hdf5", task)
    # a halfcheetah file read as hopper: the env mismatch is named
    with pytest.raises(DatasetError, match="Hopper-v5"):
        load_d4rl_hdf5(
            write_real_layout(
                tmp_path / "hc.hdf5",
                tr,
                observations=np.zeros((600, 17), np.float32),
                actions=np.zeros((600, 6), np.float32),
            ),
            task,
        )


def test_d4rl_url_and_cached_fetch(tmp_path, hopper_transitions, monkeypatch):
    t = get_task("halfcheetah-medium-replay-v2")
    assert d4rl_url(t).endswith("/gym_mujoco_v2/halfcheetah_medium_replay-v2.hdf5")
    # a file already in OBD_DATA_DIR/d4rl is used as is, with no network access
    dest = tmp_path / "data" / "d4rl" / "hopper_medium-v2.hdf5"
    write_real_layout(dest, hopper_transitions)
    assert fetch_d4rl(get_task("hopper-medium")) == dest
    assert len(load_source("d4rl:hopper-medium")) == 600
    # an unreachable server gives a clear error that says where to put the file
    import urllib.request

    def offline(*a, **k):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DatasetError, match="place the file at .*walker2d_expert-v2.hdf5"):
        fetch_d4rl(get_task("walker2d-expert"))


def test_task_read_from_d4rl_file_name_and_contradictions_refused(tmp_path, hopper_transitions):
    """A D4RL file name names its task; a --task whose env contradicts the file is refused."""
    from obd.data import resolve_task

    tr = hopper_transitions
    named = write_real_layout(tmp_path / "hopper_medium_replay-v2.hdf5", tr)
    assert resolve_task(str(named)).name == "hopper-medium-replay"
    # obd's own files carry metadata/task: a halfcheetah file with --task walker2d (same dims) is an error
    arrays = {k: getattr(tr, k) for k in FIELDS}
    arrays["observations"] = arrays["next_observations"] = np.zeros((len(tr.rewards), 17), np.float32)
    arrays["actions"] = np.zeros((len(tr.rewards), 6), np.float32)
    hc = write_d4rl_hdf5(tmp_path / "mine.hdf5", arrays, metadata={"task": "halfcheetah-medium"})
    assert resolve_task(str(hc)).name == "halfcheetah-medium"
    with pytest.raises(DatasetError, match="holds halfcheetah-medium data but the task given is walker2d-medium"):
        resolve_task(str(hc), "walker2d-medium")
    assert resolve_task(str(hc), "walker2d-medium", force=True).name == "walker2d-medium"
    assert resolve_task(str(hc), "halfcheetah-medium-expert").name == "halfcheetah-medium-expert"  # same env
