"""D4RL hdf5 files: read, write (the real layout) and download.

Layout of a D4RL gym-MuJoCo v2 file (``h5py``): top-level ``observations`` (N, obs_dim),
``actions`` (N, act_dim), ``rewards`` (N,), ``terminals`` (N,), ``timeouts`` (N,),
``next_observations`` (N, obs_dim, v2 only), a group ``infos/`` (``action_log_probs``, ``qpos``,
``qvel``) and a group ``metadata/`` (``algorithm``, ``iteration``, ``policy/...`` weights).
medium-replay files store float64 arrays, the others float32.
"""

from __future__ import annotations

import os
import urllib.request
from pathlib import Path

import h5py
import numpy as np
from tqdm.auto import tqdm

from .dataset import REQUIRED_KEYS, DatasetError, OfflineDataset, build_dataset
from .paths import data_dir
from .tasks import Task

D4RL_URL = "http://rail.eecs.berkeley.edu/datasets/offline_rl/gym_mujoco_v2/{env}_{kind}-v2.hdf5"


def d4rl_url(task: Task) -> str:
    return D4RL_URL.format(env=task.env, kind=task.kind.replace("-", "_"))


def load_d4rl_hdf5(path: str | Path, task: Task) -> OfflineDataset:
    """Read a D4RL-layout hdf5 file; raises :class:`DatasetError` naming the file on any problem."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: no such file")
    try:
        with h5py.File(path, "r") as f:
            keys = [k for k in (*REQUIRED_KEYS, "next_observations") if k in f]
            arrays = {k: f[k][()] for k in keys}
            meta = (
                {f"metadata/{k}": _scalar(v) for k, v in f["metadata"].items() if isinstance(v, h5py.Dataset)}
                if "metadata" in f
                else {}
            )
            meta.update({f"attrs/{k}": _scalar(v) for k, v in f.attrs.items()})
    except DatasetError:
        raise
    except (OSError, KeyError, ValueError) as e:
        raise DatasetError(f"{path}: cannot read as an hdf5 dataset ({e})") from None
    return build_dataset(arrays, task, source=str(path), meta=meta)


def _scalar(v):
    v = v[()] if isinstance(v, h5py.Dataset) else v
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray) and v.size == 1:
        return v.item()
    return v if isinstance(v, (str, int, float)) else str(v)


def write_d4rl_hdf5(
    path: str | Path,
    arrays: dict[str, np.ndarray],
    infos: dict[str, np.ndarray] | None = None,
    metadata: dict | None = None,
    policy: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write arrays in D4RL's layout (atomically: a temp file renamed into place)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # writers sharing OBD_DATA_DIR
    with h5py.File(tmp, "w") as f:
        for k, v in arrays.items():
            f.create_dataset(k, data=v, compression="gzip" if v.size > 1 << 16 else None)
        g = f.create_group("infos")
        for k, v in (infos or {}).items():
            g.create_dataset(k, data=v, compression="gzip" if v.size > 1 << 16 else None)
        m = f.create_group("metadata")
        for k, v in (metadata or {}).items():
            m.create_dataset(k, data=v)
        if policy:
            pg = m.create_group("policy")
            for k, v in policy.items():
                pg.create_dataset(k.replace(".", "/"), data=v)
    os.replace(tmp, path)
    return path


def fetch_d4rl(task: Task, root: Path | None = None) -> Path:
    """Path of D4RL's file for ``task`` under ``OBD_DATA_DIR/d4rl``, downloading it if absent."""
    url = d4rl_url(task)
    dest = (root or data_dir() / "d4rl") / url.rsplit("/", 1)[1]
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(tmp, "wb") as out:
            total = int(r.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"download {dest.name}") as bar:
                while chunk := r.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DatasetError(f"cannot download {url} ({e}); place the file at {dest} by hand, or pass its path") from None
    os.replace(tmp, dest)
    return dest
