"""Built-in generation of D4RL-equivalent datasets on the gymnasium v5 MuJoCo envs.

D4RL's recipe, with our own behaviour SAC (:mod:`obd.behavior.sac`):
- ``random``: uniform random actions;
- ``medium``: a SAC snapshot at about a third of expert return (D4RL's medium data scores about
  40 / 44 / 62 normalized on halfcheetah / hopper / walker2d), actions sampled from the policy;
- ``medium-replay``: what the agent did while training up to that snapshot, rebuilt by rolling out
  each training snapshot for as many steps as it acted during training (the first
  ``learning_starts`` steps uniform random);
- ``expert``: the fully trained policy; ``medium-expert``: medium followed by expert.
Datasets are written in D4RL's hdf5 layout where :func:`obd.data.generated_path` says (keyed by
task, size and data seed), so a second call is a cache hit; each file records a digest of the
behaviour actors it was rolled out from, so a file made by other policies than the current policy
file (e.g. an expert trained further and exported again) is refused instead of silently reused.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import obd
from obd.data import Task, generated_path
from obd.data.behaviour_policies import (
    acting_snapshots,
    behaviour_digest,
    check_generated,
    load_policy_file,
    policy_state,
)
from obd.data.d4rl import write_d4rl_hdf5
from obd.errors import check_writable
from obd.nets import TanhGaussianActor
from obd.rollout import Policy, Transitions, collect_transitions
from obd.seeding import derive_seed

from .sac import actor_policy

DEFAULT_SIZES = {"random": 1_000_000, "medium": 1_000_000, "expert": 1_000_000, "medium-expert": 2_000_000}
N_ENVS = 8


def make_actor(pf: dict, state: dict) -> TanhGaussianActor:
    actor = TanhGaussianActor(pf["obs_dim"], pf["act_dim"], tuple(pf["hidden"]))
    actor.load_state_dict({k: v.float() for k, v in state.items()})
    return actor.eval()


def default_size(task: Task) -> int:
    if task.kind == "medium-replay":
        pf = load_policy_file(task.env)
        return int(pf["medium"]["step"])
    return DEFAULT_SIZES[task.kind]


def _random_policy(act_dim: int, seed: int):
    rng = np.random.default_rng(derive_seed(seed, "random-actions"))
    return lambda obs: rng.uniform(-1.0, 1.0, (obs.shape[0], act_dim)).astype(np.float32)


def _segments(task: Task, size: int, seed: int) -> list[tuple[str, Policy, int]]:
    """(label, numpy policy, n_steps) pieces whose rollouts make up the dataset."""
    if task.kind == "random":
        return [("random", _random_policy(task.act_dim, seed), size)]
    pf = load_policy_file(task.env)
    if task.kind in ("medium", "expert"):
        state = policy_state(pf, task.env, task.kind)
        return [(task.kind, actor_policy(make_actor(pf, state), True, derive_seed(seed, task.kind)), size)]
    if task.kind == "medium-expert":
        half = size // 2
        return _segments(Task(task.env, "medium"), half, seed) + _segments(Task(task.env, "expert"), size - half, seed)
    # medium-replay: each snapshot acted for the steps since the previous one.
    total = int(pf["medium"]["step"])
    starts = int(pf["learning_starts"])
    acting = acting_snapshots(pf)
    bounds = np.array([0, min(starts, total), *(s["step"] for s in acting)], dtype=np.float64)
    counts = np.diff(np.round(bounds / total * size)).astype(int)
    segs: list[tuple[str, Policy, int]] = [("random", _random_policy(task.act_dim, seed), int(counts[0]))]
    for snap, n in zip(acting, counts[1:]):
        segs.append(
            (
                f"step{snap['step']}",
                actor_policy(make_actor(pf, snap["actor"]), True, derive_seed(seed, "replay", snap["step"])),
                int(n),
            )
        )
    return [s for s in segs if s[2] > 0]


def collect(task: Task, size: int | None = None, seed: int = 0, show_progress: bool = True) -> Path:
    """Generate (or find cached) ``task``'s dataset with data seed ``seed``; returns the hdf5 path."""
    path = generated_path(task, size, seed)
    if path.is_file():
        check_generated(path, task)
        return path
    check_writable(path.parent, "OBD_DATA_DIR:")  # before minutes of rollouts
    size = size or default_size(task)
    torch.set_num_threads(1)
    segs = _segments(task, size, seed)
    parts: list[Transitions] = []
    with tqdm(total=size, desc=f"collect {task.name}", unit="step", disable=not show_progress) as bar:
        for label, policy, n in segs:
            bar.set_postfix(policy=label)
            parts.append(
                collect_transitions(
                    task.env_id, policy, n, seed=derive_seed(seed, "rollout", label), n_envs=N_ENVS, progress=bar.update
                )
            )
    tr = Transitions.concat(parts)
    arrays = {
        k: getattr(tr, k) for k in ("observations", "actions", "rewards", "next_observations", "terminals", "timeouts")
    }
    if task.kind == "medium-replay":  # as D4RL's medium-replay files
        arrays = {k: v.astype(np.float64) if v.dtype == np.float32 else v for k, v in arrays.items()}
    meta = {
        "algorithm": "SAC" if task.kind != "random" else "random",
        "task": task.name,
        "env_id": task.env_id,
        "size": size,
        "seed": seed,
        "obd_version": obd.__version__,
        "policies": ",".join(s[0] for s in segs),
        "behaviour_digest": behaviour_digest(task),
    }
    write_d4rl_hdf5(path, arrays, infos={"qpos": tr.qpos, "qvel": tr.qvel}, metadata=meta)
    return path
