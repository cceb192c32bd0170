"""Synthetic-set starts (real pairs, teacher-labelled, k-means) and the baselines that skip distillation."""

import numpy as np
import pytest
import torch

from obd.config import RunConfig, merge
from obd.data.tasks import get_task
from obd.starts import initial_set, kmeans_indices
from obd.targets import Targets


def blob_targets(per_blob: int = 200, blobs: int = 4, seed: int = 0) -> tuple[Targets, np.ndarray]:
    """States in ``blobs`` well-separated clusters (cluster c around 10 * c on every axis); the teacher
    action of a state is its cluster index in every coordinate, the dataset action is -1."""
    rng = np.random.default_rng(seed)
    label = np.repeat(np.arange(blobs), per_blob)
    obs = torch.from_numpy((rng.normal(size=(len(label), 3)) * 0.1 + 10.0 * label[:, None]).astype(np.float32))
    t = Targets(
        task=get_task("hopper-random"),
        data_hash="test",
        obs=obs,
        actions=-torch.ones(len(label), 2),
        mean=torch.zeros(3),
        std=torch.ones(3),
        behaviour_score=0.0,
        teacher_actions=torch.from_numpy(np.repeat(label[:, None], 2, 1).astype(np.float32)),
    )
    return t, label


def test_kmeans_start_takes_one_real_state_from_each_cluster_labelled_by_the_teacher():
    t, label = blob_targets()
    idx = kmeans_indices(t.obs.numpy(), 4, seed=0)
    assert sorted(label[idx]) == [0, 1, 2, 3]  # coverage: one state per cluster
    s, a = initial_set(t, "kmeans", 4, seed=0)
    assert torch.equal(s, t.obs[torch.from_numpy(idx)])  # real states, not centroids
    assert torch.equal(a, t.teacher_actions[torch.from_numpy(idx)])


def test_kmeans_start_never_repeats_a_state():
    t, _ = blob_targets(per_blob=30, blobs=2)
    idx = kmeans_indices(t.obs.numpy(), 40, seed=1)  # more centroids than clusters: nearest states collide
    assert len(set(idx.tolist())) == 40


def test_teacher_labelled_start_is_the_real_pairs_states_with_teacher_actions():
    t, _ = blob_targets()
    s0, a0 = initial_set(t, "real-pairs", 16, seed=5)
    s1, a1 = initial_set(t, "teacher-labelled", 16, seed=5)
    assert torch.equal(s0, s1)
    assert torch.all(a0 == -1)  # the dataset's actions
    rows = [int(torch.nonzero((t.obs == s).all(1))[0]) for s in s1]
    assert torch.equal(a1, t.teacher_actions[rows])


def test_a_start_larger_than_the_data_is_a_config_error():
    from obd.errors import ConfigError

    t, _ = blob_targets(per_blob=2, blobs=2)
    with pytest.raises(ConfigError, match="n_synthetic"):
        initial_set(t, "real-pairs", 5, seed=0)


def test_baselines_are_scored_on_all_their_evaluations():
    cfg = merge(RunConfig(), {"outer_steps": 300, "distill": {"method": "kmeans-teacher"}})
    assert cfg.evaluation_steps() == [0] and cfg.scored_from() == 0
