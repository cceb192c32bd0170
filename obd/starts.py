"""Where a synthetic set starts: n (state, action) pairs taken from the real data, by name.

- ``real-pairs``: n distinct random real states with their dataset actions (the published init);
- ``teacher-labelled``: the same random states, labelled with the teacher's actions pi*(s);
- ``kmeans``: faiss k-means with n centroids over the normalized states; the real state nearest to
  each centroid (each state used once), labelled with pi*(s): coverage of the state space.

Each is also a set that needs no outer loop: the baselines ``random``, ``random-teacher`` and
``kmeans-teacher`` (:data:`obd.config.BASELINE_START`) are these starts, evaluated as they are.
States are normalized like everything distillation sees; actions are not clipped.
"""

from __future__ import annotations

import numpy as np
import torch

from obd.errors import ConfigError
from obd.seeding import derive_seed
from obd.targets import Targets


def random_indices(n_states: int, n: int, seed: int) -> torch.Tensor:
    """n distinct row indices drawn by (seed, "synthetic-init")."""
    gen = torch.Generator().manual_seed(derive_seed(seed, "synthetic-init"))
    return torch.randperm(n_states, generator=gen)[:n]


def kmeans_plus_plus(x: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n seeds (n, d) by k-means++ (Arthur & Vassilvitskii, 2007): each next seed drawn with
    probability proportional to its squared distance to the nearest seed so far."""
    seeds = [x[rng.integers(len(x))]]
    d2 = ((x - seeds[0]) ** 2).sum(1)
    for _ in range(n - 1):
        total = d2.sum()
        i = rng.choice(len(x), p=d2 / total) if total > 0 else rng.integers(len(x))
        seeds.append(x[i])
        d2 = np.minimum(d2, ((x - x[i]) ** 2).sum(1))
    return np.stack(seeds).astype(np.float32)


def kmeans_indices(obs: np.ndarray, n: int, seed: int, niter: int = 20) -> np.ndarray:
    """Indices (n,) of the real states nearest to n k-means centroids of ``obs`` (N, d), all distinct.

    Seeds by k-means++ on a subsample of 256 points per centroid (faiss's own training subsample
    size), then faiss's Lloyd iterations on that subsample; a centroid whose nearest state is
    already taken gets its nearest free one among 64 neighbours (then any free state)."""
    import faiss

    x = np.ascontiguousarray(obs, dtype=np.float32)
    rng = np.random.default_rng(derive_seed(seed, "kmeans"))
    sub = x[rng.choice(len(x), 256 * n, replace=False)] if len(x) > 256 * n else x
    km = faiss.Kmeans(x.shape[1], n, niter=niter, seed=derive_seed(seed, "kmeans-faiss") % 2**31, verbose=False)
    km.train(sub, init_centroids=kmeans_plus_plus(sub, n, rng))
    index = faiss.IndexFlatL2(x.shape[1])
    index.add(x)
    assert km.centroids is not None  # set by train
    _, nearest = index.search(km.centroids, min(64, len(x)))
    taken: set[int] = set()
    out = []
    for row in nearest:
        pick = next((int(i) for i in row if i >= 0 and int(i) not in taken), None)
        if pick is None:
            pick = next(i for i in range(len(x)) if i not in taken)
        taken.add(pick)
        out.append(pick)
    return np.asarray(out, dtype=np.int64)


def initial_set(targets: Targets, start: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The start ``start`` with n pairs: (states (n, obs_dim) normalized, actions (n, act_dim))."""
    if n > len(targets.obs):
        raise ConfigError(f"config key 'distill.n_synthetic': {n} exceeds the dataset's {len(targets.obs)} states")
    if start == "real-pairs":
        idx = random_indices(len(targets.obs), n, seed)
        return targets.obs[idx].clone(), targets.actions[idx].clone()
    if targets.teacher_actions is None:
        raise RuntimeError(f"start {start!r} labels states with the teacher; prepare targets with the teacher")
    if start == "teacher-labelled":
        idx = random_indices(len(targets.obs), n, seed)
    elif start == "kmeans":
        idx = torch.from_numpy(kmeans_indices(targets.obs.numpy(), n, seed))
    else:
        raise ConfigError(f"config key 'distill.start': unknown start {start!r}")
    return targets.obs[idx].clone(), targets.teacher_actions[idx].clone()
