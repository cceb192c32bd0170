"""The synthetic-set formats, read and written in one place.

- ``synthetic.npz`` (what ``obd.train`` writes): normalized states, actions, the normalization
  (mean, std), the task name and the run's config as JSON;
- an exported set (what ``obd.export`` writes): a D4RL-layout hdf5 file or a Minari dataset, states in
  the environment's raw scale (float64, ``s * std + mean``), each (state, action) pair one single-step
  episode (reward 0, truncated), and one JSON object of metadata (``metadata/obd`` in the hdf5 file,
  the description of a Minari dataset): the normalization, the evaluation learner's recipe and seed,
  and the run's provenance (task, method, seed, data hash, score, versions).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from obd.errors import ObdError


def save_synthetic(path: Path, states, actions, mean, std, task_name: str, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(
        tmp,
        states=states.numpy(),
        actions=actions.numpy(),
        mean=np.asarray(mean),
        std=np.asarray(std),
        task=task_name,
        config=json.dumps(config, default=str),
    )
    tmp.replace(path)


def load_synthetic(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ObdError(f"{path}: no such synthetic set")
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except (OSError, ValueError, EOFError) as e:
        if "allow_pickle" in str(e):
            e = ValueError("it holds pickled objects, which obd never writes")
        raise ObdError(f"{path}: not a synthetic set saved by obd ({str(e).splitlines()[0]})") from None
    missing = {"states", "actions", "mean", "std"} - set(d)
    if missing:
        raise ObdError(f"{path}: missing {sorted(missing)}; not a synthetic set saved by obd")
    return d


PROVENANCE_KEYS = ("task", "method", "seed", "budget", "outer_steps", "score", "final_score", "data_hash", "versions")


def load_run(run: Path) -> tuple[dict, dict]:
    """(synthetic set, metrics) of a run directory (or of its synthetic.npz)."""
    run_dir = run.parent if run.suffix == ".npz" else run
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        raise ObdError(f"{run_dir}: no metrics.json; pass a finished run directory of python -m obd.train")
    return load_synthetic(run_dir / "synthetic.npz"), json.loads(metrics_path.read_text())


def export_metadata(syn: dict, metrics: dict) -> dict:
    final_step = metrics["history"][-1]["step"] if metrics.get("history") else 0
    return {
        "format": "obd-synthetic-set-1",
        "mean": np.asarray(syn["mean"], float).tolist(),
        "std": np.asarray(syn["std"], float).tolist(),
        "eval": metrics["config"]["eval"],
        "eval_seed_root": metrics["seed"],
        "eval_step": final_step,
        "provenance": {k: metrics.get(k) for k in PROVENANCE_KEYS},
    }


def raw_states(syn: dict) -> np.ndarray:
    return syn["states"].astype(np.float64) * syn["std"].astype(np.float64) + syn["mean"].astype(np.float64)


def export_d4rl(syn: dict, metrics: dict, out: Path, force: bool = False) -> Path:
    from obd.data.d4rl import write_d4rl_hdf5
    from obd.data.tasks import get_task
    from obd.errors import check_writable

    if out.exists() and not force:
        raise ObdError(f"{out} exists; choose another --out or pass --force to overwrite it")
    check_writable(out.parent)

    task = get_task(metrics["task"])
    s, a = raw_states(syn), syn["actions"].astype(np.float32)
    n = len(s)
    arrays = {
        "observations": s,
        "actions": a,
        "rewards": np.zeros(n, np.float32),
        "next_observations": s,
        "terminals": np.zeros(n, bool),
        "timeouts": np.ones(n, bool),
    }
    meta = {
        "task": task.name,
        "env_id": task.env_id,
        "algorithm": f"obd-{metrics['method']}",
        "obd": json.dumps(export_metadata(syn, metrics)),
    }
    return write_d4rl_hdf5(out, arrays, metadata=meta)


def export_minari(syn: dict, metrics: dict, dataset_id: str, force: bool = False) -> str:
    import minari
    from minari.data_collector import EpisodeBuffer

    from obd.data.tasks import get_task

    task = get_task(metrics["task"])
    if dataset_id in minari.list_local_datasets():
        if not force:
            raise ObdError(f"minari:{dataset_id} exists in the local Minari store; choose another id or pass --force")
        minari.delete_dataset(dataset_id)
    s, a = raw_states(syn), syn["actions"].astype(np.float32)
    buffers = [
        EpisodeBuffer(
            id=i, observations=[s[i], s[i]], actions=[a[i]], rewards=[0.0], terminations=[False], truncations=[True]
        )
        for i in range(len(s))
    ]
    try:
        minari.create_dataset_from_buffers(
            dataset_id,
            buffers,
            env=task.env_id,
            algorithm_name=f"obd-{metrics['method']}",
            author="obd",
            description=json.dumps(export_metadata(syn, metrics)),
        )
    except ValueError as e:
        raise ObdError(f"minari:{dataset_id}: {str(e).splitlines()[0]}") from None
    return dataset_id


def read_export(source: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(raw states float64, actions, metadata) of an exported set: a D4RL hdf5 path or ``minari:ID``."""
    if source.startswith("minari:"):
        import minari

        try:
            ds = minari.load_dataset(source[len("minari:") :])
        except Exception as e:  # Minari raises several types for missing or broken datasets
            raise ObdError(f"{source}: cannot be read by Minari ({str(e).splitlines()[0]})") from None
        try:
            meta = json.loads(ds.storage.metadata.get("description") or "")
        except (json.JSONDecodeError, TypeError):
            raise ObdError(f"{source}: not a synthetic set exported by obd (no obd metadata)") from None
        eps = list(ds.iterate_episodes())
        return (
            np.stack([e.observations[0] for e in eps]).astype(np.float64),
            np.stack([e.actions[0] for e in eps]).astype(np.float32),
            meta,
        )
    import h5py

    path = Path(source)
    if not path.is_file():
        raise ObdError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            if "metadata/obd" not in f:
                raise ObdError(f"{path}: not a synthetic set exported by obd (no metadata/obd)")
            raw = f["metadata/obd"][()]
            meta = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
            return f["observations"][()].astype(np.float64), f["actions"][()].astype(np.float32), meta
    except OSError as e:
        raise ObdError(f"{path}: cannot read as hdf5 ({e})") from None


def exported_metadata(source: str) -> dict | None:
    """The obd metadata of ``source`` when it is a distilled set exported by obd (a D4RL-layout hdf5
    path or ``minari:ID``), else None. Reads only the metadata, never the data."""
    try:
        if source.startswith("minari:"):
            import minari

            if source[len("minari:") :] not in minari.list_local_datasets():
                return None
            ds = minari.load_dataset(source[len("minari:") :])
            meta = json.loads(ds.storage.metadata.get("description") or "{}")
        else:
            import h5py

            path = Path(source)
            if path.suffix not in (".hdf5", ".h5") or not path.is_file():
                return None
            with h5py.File(path, "r") as f:
                if "metadata/obd" not in f:
                    return None
                raw = f["metadata/obd"][()]
            meta = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
    except (OSError, ValueError, TypeError):
        return None
    return meta if isinstance(meta, dict) and str(meta.get("format", "")).startswith("obd-synthetic-set") else None


def refuse_distilled_set(source: str) -> None:
    """A distilled set is not a dataset to distil from: one line naming what it is."""
    meta = exported_metadata(source)
    if meta is not None:
        prov = meta.get("provenance") or {}
        raise ObdError(
            f"{source} is a synthetic set distilled by obd ({prov.get('method')} on {prov.get('task')}, score "
            f"{prov.get('score')}), not an offline dataset; re-evaluate it with `python -m obd.evaluate {source}`"
        )
