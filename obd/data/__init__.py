"""The data layer: every dataset (generated, D4RL hdf5, Minari) arrives as an :class:`OfflineDataset`.

``load_source(source, task)`` accepts
- a task name (``halfcheetah-medium``): the generated dataset, built and cached if absent;
- a path to a D4RL hdf5 file;
- ``d4rl:TASK``: D4RL's own file, from ``OBD_DATA_DIR/d4rl`` or downloaded from D4RL's server;
- ``minari:ID`` (``minari:mujoco/halfcheetah/medium-v0``): a Minari dataset, local or downloaded.
"""
from __future__ import annotations

from pathlib import Path

from .dataset import DatasetError, OfflineDataset
from .tasks import Task, UnknownTaskError, get_task, normalized_score, task_names

__all__ = ["DatasetError", "OfflineDataset", "Task", "UnknownTaskError", "get_task", "load_source",
           "normalized_score", "resolve_task", "task_names"]


def resolve_task(source: str, task: str | None) -> Task:
    """The task (env + normalization) for ``source``: given explicitly, or read off the source itself."""
    if task:
        return get_task(task)
    if source.startswith("d4rl:"):
        return get_task(source[5:])
    if source.startswith("minari:"):
        from .tasks import MINARI_IDS

        by_id = {v: k for k, v in MINARI_IDS.items()}
        if source[7:] in by_id:
            return get_task(by_id[source[7:]])
        raise UnknownTaskError(f"cannot tell the task of {source}; pass --task (one of: {', '.join(task_names())})")
    if Path(source).suffix in (".hdf5", ".h5") or Path(source).exists():
        import h5py

        try:
            with h5py.File(source, "r") as f:
                name = f["metadata/task"][()].decode() if "metadata/task" in f else None
        except OSError as e:
            raise DatasetError(f"{source}: cannot read as an hdf5 dataset ({e})") from None
        if name:
            return get_task(name)
        raise UnknownTaskError(f"cannot tell the task of {source}; pass --task (one of: {', '.join(task_names())})")
    return get_task(source)


def load_source(source: str, task: Task | None = None, *, size: int | None = None, seed: int = 0,
                generate: bool = True, show_progress: bool = True) -> OfflineDataset:
    """Load any dataset the project understands (see the module docstring) for ``task``."""
    task = task or resolve_task(source, None)
    if source.startswith("minari:"):
        from .minari_store import load_minari

        return load_minari(source[7:], task)
    if source.startswith("d4rl:"):
        from .d4rl import fetch_d4rl, load_d4rl_hdf5

        return load_d4rl_hdf5(fetch_d4rl(get_task(source[5:])), task)
    if Path(source).suffix in (".hdf5", ".h5") or Path(source).exists():
        from .d4rl import load_d4rl_hdf5

        return load_d4rl_hdf5(source, task)
    from .generate import load_generated

    gen_task = get_task(source)
    if gen_task.env != task.env:
        raise DatasetError(f"{source} is a {gen_task.env} dataset, but the task is {task.name}")
    return load_generated(gen_task, size, seed, generate=generate, show_progress=show_progress)
