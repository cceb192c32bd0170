"""The one dataset type every loader returns, with its validation and summary."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from obd.errors import ObdError

from .tasks import Task


class DatasetError(ObdError, ValueError):
    """A dataset file or id that cannot be used; the message names the source and the problem."""


@dataclass
class OfflineDataset:
    """Flat transitions of a D4RL-style dataset; episodes are contiguous.

    observations, next_observations: (N, obs_dim) float32; actions: (N, act_dim) float32 in [-1, 1];
    rewards: (N,) float32; terminals, timeouts: (N,) bool. An episode ends where ``terminals`` or
    ``timeouts`` is set, and at the last transition.
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    next_observations: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.observations.shape[0])

    @property
    def obs_dim(self) -> int:
        return int(self.observations.shape[1])

    @property
    def act_dim(self) -> int:
        return int(self.actions.shape[1])

    @property
    def episode_ends(self) -> np.ndarray:
        """Index of the last transition of each episode, (E,) int64."""
        ends = self.terminals | self.timeouts
        ends[-1:] = True
        return np.flatnonzero(ends)

    @property
    def episode_starts(self) -> np.ndarray:
        return np.concatenate([[0], self.episode_ends[:-1] + 1])

    def episode_returns(self) -> np.ndarray:
        """Undiscounted return of each episode, (E,) float64."""
        return np.add.reduceat(self.rewards.astype(np.float64), self.episode_starts)

    def content_hash(self) -> str:
        """Hash of the arrays (not the source path): identical data gives the same key everywhere."""
        h = hashlib.blake2b(digest_size=16)
        for a in (self.observations, self.actions, self.rewards, self.next_observations, self.terminals, self.timeouts):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()

    def summary(self, task: Task) -> dict:
        scores = task.normalized_score(self.episode_returns())
        return {
            "source": self.source,
            "task": task.name,
            "transitions": len(self),
            "episodes": int(len(scores)),
            "obs_dim": self.obs_dim,
            "act_dim": self.act_dim,
            "mean_normalized_return": float(scores.mean()),
            "std_normalized_return": float(scores.std()),
            "mean_return": float(self.episode_returns().mean()),
        }


REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")


def next_observations_from_episodes(obs: np.ndarray, terminals: np.ndarray, timeouts: np.ndarray) -> np.ndarray:
    """Rebuild next observations as obs[t + 1] within an episode.

    The last step of an episode has no stored successor; like D4RL's ``qlearning_dataset`` we
    cannot recover it, so it repeats obs[t]. For a terminal step it is never bootstrapped from;
    for a timeout step the error touches one transition per episode.
    """
    nxt = np.empty_like(obs)
    nxt[:-1] = obs[1:]
    nxt[-1] = obs[-1]
    ends = np.flatnonzero(terminals | timeouts)
    nxt[ends] = obs[ends]
    return nxt


def build_dataset(arrays: dict[str, np.ndarray], task: Task, source: str, meta: dict | None = None) -> OfflineDataset:
    """Validate raw arrays against ``task`` and return a float32 :class:`OfflineDataset`.

    Raises :class:`DatasetError` naming ``source`` for missing keys, wrong dimensions, length
    mismatches and non-finite values.
    """
    missing = [k for k in REQUIRED_KEYS if k not in arrays]
    if missing:
        raise DatasetError(f"{source}: missing key(s) {missing}; a D4RL dataset has {list(REQUIRED_KEYS)}")
    obs = np.asarray(arrays["observations"])
    act = np.asarray(arrays["actions"])
    if obs.ndim != 2 or obs.shape[1] != task.obs_dim:
        raise DatasetError(
            f"{source}: observations have shape {obs.shape}, but {task.env_id} ({task.name}) "
            f"has observation dimension {task.obs_dim}"
        )
    if act.ndim != 2 or act.shape[1] != task.act_dim:
        raise DatasetError(
            f"{source}: actions have shape {act.shape}, but {task.env_id} ({task.name}) "
            f"has action dimension {task.act_dim}"
        )
    n = obs.shape[0]
    if n == 0:
        raise DatasetError(f"{source}: the dataset is empty")
    lengths = {k: np.shape(arrays[k])[0] for k in (*REQUIRED_KEYS, "next_observations") if k in arrays}
    if any(v != n for v in lengths.values()):
        raise DatasetError(f"{source}: arrays differ in length: {lengths}")
    out = {
        "observations": obs.astype(np.float32, copy=False),
        "actions": act.astype(np.float32, copy=False),
        "rewards": np.asarray(arrays["rewards"]).reshape(n).astype(np.float32, copy=False),
        "terminals": np.asarray(arrays["terminals"]).reshape(n).astype(bool),
        "timeouts": np.asarray(arrays["timeouts"]).reshape(n).astype(bool),
    }
    if "next_observations" in arrays:
        nxt = np.asarray(arrays["next_observations"])
        if nxt.shape != obs.shape:
            raise DatasetError(f"{source}: next_observations have shape {nxt.shape}, observations {obs.shape}")
        out["next_observations"] = nxt.astype(np.float32, copy=False)
    else:
        out["next_observations"] = next_observations_from_episodes(
            out["observations"], out["terminals"], out["timeouts"]
        )
    for k in ("observations", "actions", "rewards", "next_observations"):
        bad = ~np.isfinite(out[k])
        if bad.any():
            rows = np.flatnonzero(bad.reshape(n, -1).any(1))
            raise DatasetError(
                f"{source}: {k} has {int(bad.sum())} NaN/inf value(s), first at row(s) {rows[:5].tolist()}"
            )
    return OfflineDataset(**out, source=source, meta=dict(meta or {}))
