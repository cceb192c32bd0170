"""OBDDataModule: the real data side of distillation, computed once and cached.

setup(): load the dataset through :mod:`obd.data`, normalize states with the dataset mean and
std (std + 1e-3, as CORL and OBD), get the teacher (trained TD3+BC, cached by dataset hash, or a
CORL checkpoint), and precompute per state: the teacher action pi*(s), the Av-PBC weight
beta * Q(s, pi*(s)) and the SDW density weight. Outer batches are ``(obs, target, weight)``:

    dbc   target = dataset action, weight 1
    pbc   target = pi*(s),          weight 1
    avpbc target = pi*(s),          weight beta * Q(s, pi*(s))
    sdw   target = pi*(s),          weight beta * Q(s, pi*(s)) * density weight (alpha = 0: exactly avpbc)
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from obd.data import OfflineDataset, Task, load_source
from obd.data.paths import data_dir
from obd.density import DensityConfig, density_weights
from obd.teacher import Teacher, TD3BCConfig, load_corl_checkpoint, load_teacher_file, teacher_numpy_policy, train_td3bc

log = logging.getLogger(__name__)
METHODS = ("dbc", "pbc", "avpbc", "sdw")


@dataclass
class DataConfig:
    source: str = "halfcheetah-medium"  # task name (generated), D4RL hdf5 path, d4rl:TASK, minari:ID
    task: str | None = None  # env + normalization; read off the source when None
    size: int | None = None  # generated datasets only: transitions (None: D4RL's size)
    data_seed: int = 0  # generated datasets only
    teacher: str | None = None  # a CORL checkpoint path; None trains TD3+BC
    teacher_cfg: TD3BCConfig = field(default_factory=TD3BCConfig)
    teacher_eval_episodes: int = 10
    density: DensityConfig = field(default_factory=DensityConfig)


class RandomBatches(IterableDataset):
    """Endless batches of ``n`` random rows (with replacement), seeded; a batch is one outer step."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], n: int, seed: int, start: int = 0):
        self.tensors, self.n, self.seed, self.start = tensors, n, seed, start

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed)
        size = self.tensors[0].shape[0]
        step = 0
        while True:
            idx = torch.randint(0, size, (self.n,), generator=gen)
            if step >= self.start:
                yield tuple(t[idx] for t in self.tensors)
            step += 1


class OBDDataModule(pl.LightningDataModule):
    def __init__(self, cfg: DataConfig, method: str = "avpbc", beta: float = 0.02, batch_size: int = 256,
                 test_batches: int = 10, seed: int = 0, show_progress: bool = True):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        self.cfg, self.method, self.beta = cfg, method, beta
        self.batch_size, self.test_batches, self.seed = batch_size, test_batches, seed
        self.show_progress = show_progress
        self.start_step = 0  # set on resume so the batch stream continues rather than repeats
        self.task: Task | None = None
        self.dataset: OfflineDataset | None = None

    # ------------------------------------------------------------ once per dataset
    def prepare(self) -> None:
        """Load everything (idempotent); Lightning calls it from setup()."""
        if self.dataset is not None:
            return
        from obd.data import resolve_task

        self.task = resolve_task(self.cfg.source, self.cfg.task)
        ds = load_source(self.cfg.source, self.task, size=self.cfg.size, seed=self.cfg.data_seed,
                         show_progress=self.show_progress)
        self.dataset = ds
        self.data_hash = ds.content_hash()
        obs = torch.from_numpy(ds.observations)
        self.mean = obs.mean(0)
        self.std = obs.std(0) + 1e-3
        self.obs = (obs - self.mean) / self.std
        self.actions = torch.from_numpy(ds.actions)
        if self.method == "dbc":  # imitates the dataset's actions: no teacher needed
            self.teacher, self.teacher_info = None, None
        else:
            self.teacher, self.teacher_info = self._teacher()
            self.teacher_actions, self.q_values = self._teacher_outputs()
        self.density_w = self._density()

    def _cache_dir(self) -> Path:
        d = data_dir() / "cache" / self.data_hash
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _teacher(self) -> tuple[Teacher, dict]:
        ds, task = self.dataset, self.task
        if self.cfg.teacher:
            teacher = load_corl_checkpoint(self.cfg.teacher, task.obs_dim, task.act_dim)
            key = "corl-" + hashlib.blake2b(Path(self.cfg.teacher).read_bytes(), digest_size=8).hexdigest()
        else:
            key = "td3bc-" + _hash_json(asdict(self.cfg.teacher_cfg))
            path = self._cache_dir() / f"teacher-{key}.pt"
            if path.is_file():
                teacher = load_teacher_file(path)
            else:
                teacher = train_td3bc(self.obs, self.actions, torch.from_numpy(ds.rewards),
                                      (torch.from_numpy(ds.next_observations) - self.mean) / self.std,
                                      torch.from_numpy(ds.terminals), self.cfg.teacher_cfg, self.show_progress)
                teacher.info["normalized_return"] = self._measure_teacher(teacher)
                teacher.save(path)
        info = {**teacher.info, "key": key}
        if "normalized_return" not in info and self.cfg.teacher_eval_episodes:
            info["normalized_return"] = self._measure_teacher(teacher)
        log.info("teacher %s: normalized return %s", key, info.get("normalized_return"))
        return teacher, info

    def _measure_teacher(self, teacher: Teacher) -> dict | None:
        from obd.rollout import evaluate_episodes

        if not self.cfg.teacher_eval_episodes:
            return None
        rets = evaluate_episodes(self.task.env_id, teacher_numpy_policy(teacher, self.mean.numpy(), self.std.numpy()),
                                 self.cfg.teacher_eval_episodes, seed=self.seed + 777)
        scores = self.task.normalized_score(rets)
        return {"mean": float(scores.mean()), "std": float(scores.std()), "episodes": len(scores)}

    def _teacher_outputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        path = self._cache_dir() / f"teacher-outputs-{self.teacher_info['key']}.pt"
        if path.is_file():
            d = torch.load(path, weights_only=True)
            return d["actions"], d["q"]
        a, q = self.teacher.actions_and_values(self.obs)
        torch.save({"actions": a, "q": q}, path)
        return a, q

    def _density(self) -> torch.Tensor:
        if self.method != "sdw" or self.cfg.density.alpha == 0:
            return torch.ones(len(self.obs))
        path = self._cache_dir() / f"density-{_hash_json(asdict(self.cfg.density))}.npy"
        if path.is_file():
            return torch.from_numpy(np.load(path))
        w = density_weights(self.obs, self.cfg.density)
        np.save(path, w)
        return torch.from_numpy(w)

    # ------------------------------------------------------------ outer batches
    def targets_and_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-state target (N, act_dim) and weight (N,) of the chosen method."""
        if self.method == "dbc":
            return self.actions, torch.ones(len(self.obs))
        if self.method == "pbc":
            return self.teacher_actions, torch.ones(len(self.obs))
        q_w = self.beta * self.q_values
        if (q_w < 0).any():
            log.warning("%.1f%% of beta*Q weights are negative; clamped at 0", 100 * float((q_w < 0).float().mean()))
            q_w = q_w.clamp_min(0)
        return self.teacher_actions, q_w * self.density_w if self.method == "sdw" else q_w

    def setup(self, stage: str | None = None) -> None:
        self.prepare()

    def train_dataloader(self) -> DataLoader:
        target, weight = self.targets_and_weights()
        ds = RandomBatches((self.obs, target, weight), self.batch_size * self.test_batches, self.seed + 1,
                           start=self.start_step)
        return DataLoader(ds, batch_size=None, num_workers=0)

    def random_real_pairs(self, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """n distinct real (normalized state, action) pairs: the initialization and the baseline."""
        idx = torch.randperm(len(self.obs), generator=torch.Generator().manual_seed(seed))[:n]
        return self.obs[idx].clone(), self.actions[idx].clone()

    def describe(self) -> dict:
        return {"task": self.task.name, "source": self.cfg.source, "transitions": len(self.obs),
                "data_hash": self.data_hash, "teacher": self.teacher_info}


def _hash_json(d: dict) -> str:
    return hashlib.blake2b(json.dumps(d, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()
