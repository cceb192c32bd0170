import gymnasium as gym
import numpy as np
import pytest

from obd.data import DatasetError, get_task, load_source, resolve_task
from obd.data.minari_store import load_minari


def make_minari_dataset(dataset_id: str, env_id: str, n_steps: int) -> list:
    """Record random-action episodes with Minari's own DataCollector; returns the recorded episodes."""
    import minari

    env = minari.DataCollector(gym.make(env_id))
    env.action_space.seed(0)
    env.reset(seed=0)
    for _ in range(n_steps):
        _, _, term, trunc, _ = env.step(env.action_space.sample())
        if term or trunc:
            env.reset()
    ds = env.create_dataset(
        dataset_id=dataset_id,
        algorithm_name="uniform-random",
        author="obd tests",
        author_email="obd@example.org",
        code_permalink="https://example.org/obd",
        description="obd test data",
        eval_env=env_id,
    )
    env.close()
    return list(ds.iterate_episodes())


def test_datacollector_dataset_read_back_by_id():
    episodes = make_minari_dataset("test/hopper/tiny-v0", "Hopper-v5", 400)
    task = get_task("hopper-medium")
    ds = load_source("minari:test/hopper/tiny-v0", task)
    n = sum(len(e.actions) for e in episodes)
    assert len(ds) == n and ds.source == "minari:test/hopper/tiny-v0"
    np.testing.assert_allclose(ds.observations[: len(episodes[0].actions)], episodes[0].observations[:-1], rtol=1e-6)
    np.testing.assert_allclose(
        ds.next_observations[: len(episodes[0].actions)], episodes[0].observations[1:], rtol=1e-6
    )
    # one episode per Minari episode, with the same returns
    assert len(ds.episode_ends) == len(episodes)
    np.testing.assert_allclose(ds.episode_returns(), [e.rewards.sum() for e in episodes], rtol=1e-5)
    np.testing.assert_array_equal(ds.terminals[ds.episode_ends], [bool(e.terminations[-1]) for e in episodes])


def test_minari_errors():
    make_minari_dataset("test/halfcheetah/tiny-v0", "HalfCheetah-v5", 50)
    with pytest.raises(DatasetError, match="minari:test/halfcheetah/tiny-v0.*observation dimension 11"):
        load_minari("test/halfcheetah/tiny-v0", get_task("hopper-medium"))
    with pytest.raises(DatasetError, match="minari:test/none-v0: not in the local Minari store"):
        load_minari("test/none-v0", get_task("hopper-medium"), download=False)


def test_minari_id_mapping():
    assert get_task("halfcheetah-medium").minari_id == "mujoco/halfcheetah/medium-v0"
    assert get_task("hopper-medium-replay").minari_id is None
    assert resolve_task("minari:mujoco/walker2d/expert-v0", None).name == "walker2d-expert"
