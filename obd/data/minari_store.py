"""Minari datasets (``mujoco/halfcheetah/medium-v0`` ...) read into :class:`OfflineDataset`.

Datasets are looked up in the local Minari store (``MINARI_DATASETS_PATH``, default
``~/.minari/datasets``) and downloaded with Minari's own ``download_dataset`` when absent.
"""

from __future__ import annotations

import numpy as np

from .dataset import DatasetError, OfflineDataset, build_dataset
from .tasks import Task


def load_minari(dataset_id: str, task: Task, download: bool = True) -> OfflineDataset:
    """Episodes of a Minari dataset, flattened; next observations come from each episode's T+1 observations."""
    import minari

    source = f"minari:{dataset_id}"
    local = {d for d in minari.list_local_datasets()}
    if dataset_id not in local:
        if not download:
            raise DatasetError(f"{source}: not in the local Minari store ({minari.storage.get_dataset_path()})")
        try:
            minari.download_dataset(dataset_id)
        except Exception as e:  # network errors, unknown ids: Minari raises several types
            raise DatasetError(f"{source}: not in the local Minari store and cannot be downloaded ({e})") from None
    try:
        ds = minari.load_dataset(dataset_id)
        episodes = list(ds.iterate_episodes())
    except Exception as e:
        raise DatasetError(f"{source}: cannot be read by Minari ({e})") from None
    if not episodes:
        raise DatasetError(f"{source}: the dataset has no episodes")
    if not isinstance(episodes[0].observations, np.ndarray):
        raise DatasetError(
            f"{source}: observations are {type(episodes[0].observations).__name__}, "
            "expected a flat array (a MuJoCo Box observation space)"
        )
    terminals = np.concatenate([np.asarray(e.terminations, bool) for e in episodes])
    truncations = np.concatenate([np.asarray(e.truncations, bool) for e in episodes])
    ends = np.cumsum([len(e.actions) for e in episodes]) - 1
    timeouts = truncations & ~terminals
    # Every Minari episode is complete in itself: mark its last step as a boundary.
    timeouts[ends] |= ~terminals[ends]
    arrays = {
        "observations": np.concatenate([e.observations[:-1] for e in episodes]),
        "next_observations": np.concatenate([e.observations[1:] for e in episodes]),
        "actions": np.concatenate([e.actions for e in episodes]),
        "rewards": np.concatenate([e.rewards for e in episodes]),
        "terminals": terminals,
        "timeouts": timeouts,
    }
    return build_dataset(arrays, task, source=source, meta={"minari_id": dataset_id, "env_spec": str(ds.env_spec)})
