"""Stages 1 and 2 of the pipeline: the dataset, and the per-state targets distillation needs.

    dataset (stage 1)  ->  normalization, teacher pi* and Q, log-density (stage 2)  ->  distillation

Each stage writes a cached artifact keyed by what it depends on, under
``OBD_DATA_DIR/cache/<data hash>/``:

- ``normalization.npz``: the mean and std (sample std + 1e-3, as CORL and OBD) of the states;
- ``teacher-<key>.pt``: the teacher (trained TD3+BC, keyed by its config; or a given file, keyed by
  its bytes), with its measured score in its info;
- ``teacher-outputs-<key>.pt``: pi*(s) and Q(s, pi*(s)) for every state;
- ``logp-<key>.npy``: the log state density, keyed by the estimator settings only (alpha and clip
  are applied when a run loads it, see :meth:`Targets.targets_and_weights`).

Later stages (the data module, evaluation, the report) read these; none recomputes them.
Generation of a missing generated dataset is an explicit step (:func:`prepare_dataset`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from obd.config import (
    BASELINE_START,
    DataConfig,
    DensityConfig,
    QNegative,
    RunConfig,
    TD3BCConfig,
    TeacherConfig,
)
from obd.data import OfflineDataset, Task, generated_path, load_source, parse_source, resolve_task
from obd.data.paths import data_dir
from obd.runs import Claim
from obd.seeding import derive_seed

log = logging.getLogger(__name__)

# CORL's published TD3+BC scores on D4RL v2 medium (normalized return; the teacher's yardstick).
# CORL's TD3+BC on D4RL v2: the "Last Scores" table of its README (tinkoff-ai/CORL)
CORL_TD3BC_SCORE: dict[str, float] = {
    "halfcheetah-medium": 48.1,
    "halfcheetah-medium-replay": 44.8,
    "halfcheetah-medium-expert": 90.8,
    "hopper-medium": 60.4,
    "hopper-medium-replay": 64.4,
    "hopper-medium-expert": 101.2,
    "walker2d-medium": 82.7,
    "walker2d-medium-replay": 85.6,
    "walker2d-medium-expert": 110.0,
}


def hash_json(d: object) -> str:
    return hashlib.blake2b(json.dumps(d, sort_keys=True, default=str).encode(), digest_size=8).hexdigest()


def prepare_dataset(
    cfg: DataConfig, generate: bool = True, show_progress: bool = True, force_task: bool = False
) -> tuple[Task, OfflineDataset]:
    """Stage 1: the dataset of ``cfg``. A generated dataset that is absent is generated first (with a
    progress bar) when ``generate``; otherwise reading it is an error naming the command to run."""
    from obd.synthetic_set import refuse_distilled_set

    refuse_distilled_set(cfg.source)
    task = resolve_task(cfg.source, cfg.task, force=force_task)
    src = parse_source(cfg.source)
    if src.kind == "generated" and generate:
        from obd.data import get_task

        gen_task = get_task(src.value)
        if not generated_path(gen_task, cfg.size, cfg.data_seed).is_file():
            from obd.behavior.generate import collect

            log.info(
                "generating %s (data seed %d): not in %s yet", gen_task.name, cfg.data_seed, data_dir() / "datasets"
            )
            collect(gen_task, cfg.size, cfg.data_seed, show_progress=show_progress)
    return task, load_source(cfg.source, task, size=cfg.size, seed=cfg.data_seed)


def _save_atomic(obj: Any, path: Path) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")  # processes sharing the cache
    if path.suffix == ".npy":
        with open(tmp, "wb") as f:
            np.save(f, obj)
    else:
        torch.save(obj, tmp)
    os.replace(tmp, path)


@dataclass
class Targets:
    """Everything distillation reads about the real data, N states (torch, CPU, float32)."""

    task: Task
    data_hash: str
    obs: torch.Tensor  # (N, obs_dim) normalized states
    actions: torch.Tensor  # (N, act_dim) dataset actions
    mean: torch.Tensor  # (obs_dim,) normalization
    std: torch.Tensor  # (obs_dim,) sample std + 1e-3
    behaviour_score: float  # the dataset's mean normalized episode return
    teacher_actions: torch.Tensor | None = None  # (N, act_dim) pi*(s)
    q: torch.Tensor | None = None  # (N,) Q(s, pi*(s))
    log_density: torch.Tensor | None = None  # (N,) log p(s) up to a constant
    teacher_info: dict | None = None
    artifacts: dict | None = None  # stage-2 files: name -> path
    state_diversity: float | None = None  # mean distance to the 10th nearest state (normalized), a sample

    def targets_and_weights(
        self, method: str, beta: float, density: DensityConfig, q_negative: QNegative = "keep"
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-state outer-loss target (N, act_dim) and weight (N,) of ``method``:

        dbc   dataset action, 1
        pbc   pi*(s),          1
        avpbc pi*(s),          beta * Q(s, pi*(s))   (with ``q_negative`` "zero", negative values weigh 0)
        sdw   pi*(s),          beta * Q(s, pi*(s)) * p(s)^-alpha / mean (capped at clip x mean)
        """
        n = len(self.obs)
        if method == "dbc":
            return self.actions, torch.ones(n)
        if self.teacher_actions is None or self.q is None:
            raise RuntimeError(f"method {method} needs the teacher's outputs; prepare targets for it")
        if method == "pbc":
            return self.teacher_actions, torch.ones(n)
        q_w = beta * self.q
        if q_negative == "zero":  # metrics.json records how many states that is (q_stats.negative_fraction)
            q_w = q_w.clamp_min(0)
        if method == "avpbc":
            return self.teacher_actions, q_w
        return self.teacher_actions, q_w * self.density_weights(density)

    def beta(self, beta: float, q_reference: float | None) -> float:
        """The Q weights' factor: ``beta``, or with ``q_reference`` (DistillConfig) ``beta`` rescaled so that
        the teacher's median Q counts as ``q_reference`` does."""
        if q_reference is None:
            return beta
        if self.q is None:
            raise RuntimeError("q_reference needs the teacher's Q; prepare targets for avpbc or sdw")
        median = float(self.q.double().median())
        if median <= 0:
            from obd.errors import ObdError

            raise ObdError(f"distill.q_reference: the teacher's median Q is {median:.3g}, not a scale to match")
        return beta * q_reference / median

    def density_weights(self, density: DensityConfig) -> torch.Tensor:
        from obd.density import weights_from_log_density

        if density.alpha == 0:
            return torch.ones(len(self.obs))
        if self.log_density is None:
            raise RuntimeError("SDW needs the log-density; prepare targets for method sdw")
        return torch.from_numpy(weights_from_log_density(self.log_density.numpy(), density.alpha, density.clip))

    def describe(self, method: str, beta: float, density: DensityConfig, q_negative: QNegative = "keep") -> dict:
        """What a run logs about its data and targets: sizes, teacher, Q and weight statistics."""
        from obd.density import weight_stats

        out: dict = {
            "task": self.task.name,
            "transitions": len(self.obs),
            "data_hash": self.data_hash,
            "behaviour_score": self.behaviour_score,
            "state_diversity_knn10": self.state_diversity,
            "teacher": self.teacher_info,
            "artifacts": self.artifacts,
        }
        if self.q is not None:
            q = self.q.double()
            out["q_stats"] = {
                "mean": float(q.mean()),
                "median": float(q.median()),
                "std": float(q.std()),
                "min": float(q.min()),
                "max": float(q.max()),
                "negative_fraction": float((q < 0).double().mean()),  # negative weights unless q_negative zero
            }
        if method in ("avpbc", "sdw"):
            out["beta"] = beta  # the Q weights' factor used (distill.beta, rescaled when q_reference is set)
        if method not in BASELINE_START:
            _, w = self.targets_and_weights(method, beta, density, q_negative)
            out["weight_stats"] = weight_stats(w)
            if self.q is not None and method in ("avpbc", "sdw"):
                # Where the weight goes in value terms: 0.5 would be value-neutral.
                low = self.q < self.q.median()
                out["weight_stats"]["low_q_share"] = float(w[low].double().sum() / w.double().sum())
            if method == "sdw":
                out["density_weight_stats"] = weight_stats(self.density_weights(density))
                if self.q is not None and self.log_density is not None:
                    # Positive: rare states are low-value ones, so SDW moves weight towards them.
                    out["density_q_correlation"] = float(
                        torch.corrcoef(torch.stack([self.log_density.double(), self.q.double()]))[0, 1]
                    )
        return out


def _cache_dir(data_hash: str) -> Path:
    d = data_dir() / "cache" / data_hash
    d.mkdir(parents=True, exist_ok=True)
    return d


def prepare_targets(
    cfg: RunConfig, method: str, show_progress: bool = True, generate: bool = True, force_task: bool = False
) -> Targets:
    """Stages 1 and 2 for ``method``: the teacher where the method or the synthetic set's start
    (``cfg.distill.start``, or the baseline's own) reads pi*(s); the density for sdw only."""
    task, ds = prepare_dataset(cfg.data, generate=generate, show_progress=show_progress, force_task=force_task)
    data_hash = ds.content_hash()
    cache = _cache_dir(data_hash)
    obs = torch.from_numpy(ds.observations)
    norm_path = cache / "normalization.npz"
    if norm_path.is_file():
        with np.load(norm_path) as z:
            mean, std = torch.from_numpy(z["mean"]), torch.from_numpy(z["std"])
    else:
        mean, std = obs.mean(0), obs.std(0) + 1e-3
        tmp = cache / f"normalization.{os.getpid()}.tmp.npz"
        np.savez(tmp, mean=mean.numpy(), std=std.numpy())
        os.replace(tmp, norm_path)
    scores = task.normalized_score(ds.episode_returns())
    t = Targets(
        task=task,
        data_hash=data_hash,
        obs=(obs - mean) / std,
        actions=torch.from_numpy(ds.actions),
        mean=mean,
        std=std,
        behaviour_score=float(scores.mean()),
        artifacts={"dataset": ds.source, "normalization": str(norm_path)},
    )
    diversity_path = cache / "state_diversity_knn10.json"  # a property of the dataset: once per dataset
    if not diversity_path.is_file():
        from obd.density import state_diversity

        tmp = cache / f"state_diversity_knn10.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(state_diversity(t.obs)))
        os.replace(tmp, diversity_path)
    t.state_diversity = float(json.loads(diversity_path.read_text()))
    start = BASELINE_START.get(method, cfg.distill.start)
    if method in ("pbc", "avpbc", "sdw") or start != "real-pairs":
        from obd.devices import resolve_device

        _teacher_stage(t, ds, cfg.teacher, cache, show_progress, resolve_device(cfg.device))
    if method == "sdw":
        _density_stage(t, cfg.density, cache)
    return t


def _teacher_stage(
    t: Targets, ds: OfflineDataset, cfg: TeacherConfig, cache: Path, show_progress: bool, device: torch.device
) -> None:
    from obd.teacher import load_teacher, load_teacher_file, train_td3bc

    assert t.artifacts is not None
    if cfg.path:
        path = Path(cfg.path)
        teacher = load_teacher(path, t.task.obs_dim, t.task.act_dim)
        key = "file-" + hashlib.blake2b(path.read_bytes(), digest_size=8).hexdigest()
        if "normalized_return" not in teacher.info and cfg.eval_episodes:
            teacher.info["normalized_return"] = _measure_teacher(teacher, t, cfg.eval_episodes)
        t.artifacts["teacher"] = str(path)
    else:
        key = "td3bc-" + hash_json(dataclasses.asdict(cfg.td3bc))
        path = cache / f"teacher-{key}.pt"
        # one process trains a teacher at a time: others (table workers sharing OBD_DATA_DIR) wait and load it
        claim = Claim(cache / f"teacher-{key}.claim")
        claim.take(wait=True)
        try:
            if path.is_file():
                teacher = load_teacher_file(path)
                measured = (teacher.info.get("normalized_return") or {}).get("episodes", 0)
                if cfg.eval_episodes > measured:  # a cached teacher scored on fewer episodes than asked now
                    teacher.info["normalized_return"] = _measure_teacher(teacher, t, cfg.eval_episodes)
                    teacher.save(path)
            else:
                # the training state: resumed after an interrupt, kept once trained, so that a longer teacher of
                # the same config continues from the longest shorter one instead of starting over
                partial = cache / f"teacher-{key}.partial.pt"
                if not partial.is_file():
                    shorter = _shorter_teacher_state(cache, cfg.td3bc)
                    if shorter is not None:
                        log.info("teacher %s: continuing %s to %d steps", key, shorter.name, cfg.td3bc.steps)
                        shutil.copyfile(shorter, partial)
                teacher = train_td3bc(
                    t.obs,
                    t.actions,
                    torch.from_numpy(ds.rewards),
                    (torch.from_numpy(ds.next_observations) - t.mean) / t.std,
                    torch.from_numpy(ds.terminals),
                    cfg.td3bc,
                    show_progress,
                    checkpoint=partial,
                    device=device,
                )
                teacher.info["normalized_return"] = _measure_teacher(teacher, t, cfg.eval_episodes)
                teacher.save(path)
                partial.replace(_teacher_state_path(cache, cfg.td3bc))
        finally:
            claim.release()
        t.artifacts["teacher"] = str(path)
    t.teacher_info = {**teacher.info, "key": key, "corl_td3bc_score": CORL_TD3BC_SCORE.get(t.task.name)}
    log.info(
        "teacher %s: normalized return %s (CORL's TD3+BC on D4RL: %s)",
        key,
        (t.teacher_info.get("normalized_return") or {}).get("mean"),
        t.teacher_info["corl_td3bc_score"],
    )
    out_path = cache / f"teacher-outputs-{key}.pt"
    if out_path.is_file():
        d = torch.load(out_path, weights_only=True)
        t.teacher_actions, t.q = d["actions"], d["q"]
    else:
        t.teacher_actions, t.q = teacher.actions_and_values(t.obs)
        _save_atomic({"actions": t.teacher_actions, "q": t.q}, out_path)
    t.artifacts["teacher_outputs"] = str(out_path)


def _teacher_state_path(cache: Path, cfg: TD3BCConfig, steps: int | None = None) -> Path:
    """Where a trained teacher's final training state is kept: named by its config without the length."""
    rest = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "steps"}
    return cache / f"teacher-state-td3bc-{hash_json(rest)}-{cfg.steps if steps is None else steps}.pt"


def _shorter_teacher_state(cache: Path, cfg: TD3BCConfig) -> Path | None:
    """The final training state of the longest teacher of this config shorter than ``cfg.steps``."""
    prefix = _teacher_state_path(cache, cfg, 0).name.removesuffix("0.pt")
    lengths = [p.name[len(prefix) : -len(".pt")] for p in cache.glob(f"{prefix}*.pt")]
    below = [int(n) for n in lengths if n.isdigit() and int(n) < cfg.steps]
    return _teacher_state_path(cache, cfg, max(below)) if below else None


def _measure_teacher(teacher, t: Targets, episodes: int) -> dict | None:
    from obd.rollout import evaluate_episodes
    from obd.teacher import teacher_numpy_policy

    if not episodes:
        return None
    rets = evaluate_episodes(
        t.task.env_id,
        teacher_numpy_policy(teacher, t.mean.numpy(), t.std.numpy()),
        episodes,
        seed=derive_seed(0, "teacher-eval"),
    )
    scores = t.task.normalized_score(rets)
    return {
        "mean": float(scores.mean()),
        "std": float(scores.std()),
        "se": float(scores.std(ddof=1) / np.sqrt(len(scores))) if len(scores) > 1 else None,
        "episodes": len(scores),
    }


def _density_stage(t: Targets, cfg: DensityConfig, cache: Path) -> None:
    from obd.density import log_density

    assert t.artifacts is not None
    path = cache / f"logp-{hash_json(cfg.estimate_key())}.npy"
    if path.is_file():
        logp = np.load(path)
    else:
        logp = log_density(t.obs.numpy(), cfg)
        _save_atomic(logp, path)
    t.log_density = torch.from_numpy(logp)
    t.artifacts["log_density"] = str(path)


def main(argv: list[str] | None = None) -> int:
    """``python -m obd.targets SOURCE``: prepare (or read back from the cache) the targets a run of
    METHOD would use and print what the run would log about them (``Targets.describe``) as JSON."""
    import argparse

    from obd.config import METHODS, build_config
    from obd.errors import ConfigError
    from obd.flags import PER_RUN, add_config_flags, config_layer
    from obd.tracking import setup_logging

    p = argparse.ArgumentParser(prog="python -m obd.targets", description=main.__doc__)
    p.add_argument("source", help="a task name (generated data) or any source obd.train accepts")
    p.add_argument("--method", default="sdw", help="default sdw")
    p.add_argument("--budget", default="quick", help="whose teacher and density settings (default quick)")
    add_config_flags(p, exclude=PER_RUN)  # e.g. --teacher.td3bc.steps 100000, --alpha 0.3
    a = p.parse_args(argv)
    if a.method not in METHODS:
        raise ConfigError(f"unknown method {a.method!r}; choose from {', '.join(METHODS)}")
    setup_logging()
    cfg = build_config(a.budget, [{"data": {"source": a.source}}, config_layer(a)])  # an unknown budget: one line
    t = prepare_targets(cfg, a.method)
    beta = t.beta(cfg.distill.beta, cfg.distill.q_reference) if a.method in ("avpbc", "sdw") else cfg.distill.beta
    print(json.dumps(t.describe(a.method, beta, cfg.density, cfg.distill.q_negative), indent=1, default=str))
    return 0


if __name__ == "__main__":
    import sys

    from obd.errors import cli

    sys.exit(cli(main))
