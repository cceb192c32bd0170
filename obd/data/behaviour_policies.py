"""The behaviour-policy files a generated dataset is rolled out from: where they are, reading them, and
the digest of the actors a dataset comes from (recorded in the dataset, checked when it is read).

Reading only: nothing here builds or runs a policy (that is :mod:`obd.behavior`).
"""

from __future__ import annotations

import hashlib
import importlib.resources
from pathlib import Path

import h5py
import torch

from obd.data.dataset import DatasetError
from obd.data.paths import data_dir
from obd.data.tasks import Task


def policy_file(env: str) -> Path:
    """A user-trained policy file in ``OBD_DATA_DIR/policies`` wins over the one shipped in the package."""
    local = data_dir() / "policies" / f"{env}.pt"
    if local.is_file():
        return local
    return Path(str(importlib.resources.files("obd.behavior") / "policies" / f"{env}.pt"))


def load_policy_file(env: str) -> dict:
    path = policy_file(env)
    if not path.is_file():
        raise DatasetError(
            f"no behaviour policies for {env} at {path}; train them with "
            f"`python -m obd.behavior train {env}` and `python -m obd.behavior export {env}`"
        )
    return torch.load(path, weights_only=True)


def policy_state(pf: dict, env: str, kind: str) -> dict:
    """The actor state dict of the ``medium`` or ``expert`` policy; a clear error when it is absent."""
    if kind not in pf:
        raise DatasetError(
            f"no {kind} policy for {env} in {policy_file(env)}: its training has "
            f"not reached it; resume it with `python -m obd.behavior train {env}`"
        )
    return pf[kind]["actor"]


def acting_snapshots(pf: dict) -> list[dict]:
    """The replay snapshots that acted in training (before ``learning_starts`` actions were random)."""
    return [s for s in pf["replay"] if s["step"] > int(pf["learning_starts"])]


def behaviour_digest(task: Task) -> str:
    """16 hex digits over the actors ``task``'s data is rolled out from (``"random"`` for random data)."""
    if task.kind == "random":
        return "random"
    pf = load_policy_file(task.env)
    if task.kind == "medium-replay":
        actors = [s["actor"] for s in acting_snapshots(pf)]
    else:
        actors = [policy_state(pf, task.env, k) for k in task.kind.split("-")]  # medium, expert, or both
    h = hashlib.blake2b(digest_size=8)
    for state in actors:
        for k in sorted(state):
            h.update(k.encode())
            h.update(state[k].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def check_generated(path: Path, task: Task) -> None:
    """Raise :class:`DatasetError` when the generated file ``path`` was rolled out from other behaviour
    policies than the policy file holds now; files written before obd recorded the digest pass."""
    try:
        with h5py.File(path, "r") as f:
            rec = f["metadata/behaviour_digest"][()] if "metadata/behaviour_digest" in f else None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read as an hdf5 dataset ({e})") from None
    if rec is None:
        return
    recorded = rec.decode() if isinstance(rec, bytes) else str(rec)
    now = behaviour_digest(task)
    if recorded != now:
        raise DatasetError(
            f"{path}: rolled out from other {task.env} behaviour policies than {policy_file(task.env)} "
            f"holds now (digest {recorded}, now {now}); move the file away to generate it from the current ones"
        )
