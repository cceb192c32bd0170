"""Evaluate a synthetic set: train fresh policies on it exactly as the inner loop does, roll them out.

``python -m obd.evaluate PATH [--task TASK] [--episodes 10] [--json]`` works on any saved
``synthetic.npz`` (states in normalized space, actions, the normalization mean/std, the config).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import lightning.pytorch as pl
import torch
from torch import Tensor

from obd.data import Task, UnknownTaskError, get_task
from obd.distill import Params, init_policy, inner_loss, policy_forward, train_inner
from obd.rollout import evaluate_episodes


@dataclass
class EvalConfig:
    episodes: int = 10
    inner_steps: int = 100  # as the inner loop
    inner_lr: float = 0.1
    hidden: tuple[int, ...] = (256, 256, 256)
    optimizer: str = "sgd"  # sgd (as the inner loop) | adam
    ensemble: int = 1  # policies trained from different inits; their actions are averaged
    seed: int = 0


def train_policies(states: Tensor, actions: Tensor, cfg: EvalConfig) -> list[Params]:
    out = []
    for m in range(cfg.ensemble):
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + m)
        p0 = init_policy(states.shape[1], actions.shape[1], cfg.hidden, gen)
        if cfg.optimizer == "sgd":
            out.append(train_inner(p0, states, actions, cfg.inner_steps, cfg.inner_lr))
        elif cfg.optimizer == "adam":
            p = [q.clone().requires_grad_(True) for q in p0]
            opt = torch.optim.Adam(p, lr=cfg.inner_lr)
            for _ in range(cfg.inner_steps):
                opt.zero_grad()
                inner_loss(p, states, actions).backward()
                opt.step()
            out.append([q.detach() for q in p])
        else:
            raise ValueError(f"unknown optimizer {cfg.optimizer!r}; choose sgd or adam")
    return out


def evaluate_synthetic(states: Tensor, actions: Tensor, task: Task, mean: np.ndarray, std: np.ndarray,
                       cfg: EvalConfig) -> dict:
    """Normalized return (mean, std over episodes) of policies trained on (states, actions)."""
    policies = train_policies(states.detach().float(), actions.detach().float(), cfg)
    m, s = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        x = (torch.from_numpy(obs) - m) / s
        return torch.stack([policy_forward(p, x) for p in policies]).mean(0).numpy()

    scores = task.normalized_score(evaluate_episodes(task.env_id, act, cfg.episodes, seed=cfg.seed + 1_000))
    return {"normalized_return_mean": float(scores.mean()), "normalized_return_std": float(scores.std()),
            "episode_scores": [round(float(x), 3) for x in scores]}


class EvaluationCallback(pl.Callback):
    """Evaluates the module's synthetic set every ``every`` outer steps and at the end of training.

    Results are logged at their own outer step (``normalized_return``) and kept in ``history``.
    """

    def __init__(self, task: Task, mean: np.ndarray, std: np.ndarray, cfg: EvalConfig, every: int):
        self.task, self.mean, self.std, self.cfg, self.every = task, mean, std, cfg, every
        self.history: list[dict] = []

    def _run(self, trainer: pl.Trainer, module) -> None:
        step = trainer.global_step
        if self.history and self.history[-1]["step"] == step:
            return
        states, actions = module.synthetic()
        res = evaluate_synthetic(states, actions, self.task, self.mean, self.std, self.cfg)
        self.history.append({"step": step, **res})
        for lg in trainer.loggers:
            lg.log_metrics({"normalized_return": res["normalized_return_mean"],
                            "normalized_return_std": res["normalized_return_std"]}, step=step)
        for cb in trainer.callbacks:  # e.g. an Optuna pruning callback
            if hasattr(cb, "on_evaluation"):
                cb.on_evaluation(trainer, step, res["normalized_return_mean"])

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.every and trainer.global_step % self.every == 0:
            self._run(trainer, module)

    def on_train_end(self, trainer, module):
        self._run(trainer, module)

    def state_dict(self) -> dict:
        return {"history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))


def save_synthetic(path: Path, states: Tensor, actions: Tensor, mean, std, task: Task, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, states=states.numpy(), actions=actions.numpy(), mean=np.asarray(mean), std=np.asarray(std),
             task=task.name, config=json.dumps(config, default=str))


def load_synthetic(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such synthetic set")
    try:
        with np.load(path, allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a synthetic set saved by obd ({e})") from None
    missing = {"states", "actions", "mean", "std"} - set(d)
    if missing:
        raise ValueError(f"{path}: missing {sorted(missing)}")
    return d


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m obd.evaluate", description=__doc__)
    p.add_argument("path", help="synthetic.npz written by python -m obd.train")
    p.add_argument("--task", default=None, help="default: the task stored in the file")
    p.add_argument("--episodes", type=int, default=10)
    p.add_argument("--inner-steps", type=int, default=None, help="default: the run's inner steps")
    p.add_argument("--inner-lr", type=float, default=None, help="default: the run's inner lr")
    p.add_argument("--optimizer", default="sgd", choices=["sgd", "adam"])
    p.add_argument("--hidden", default=None, help="e.g. 256,256,256 (default: the run's)")
    p.add_argument("--ensemble", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        d = load_synthetic(a.path)
        task = get_task(a.task or str(d["task"]))
        run = json.loads(str(d["config"])).get("distill", {}) if "config" in d else {}
        cfg = EvalConfig(
            episodes=a.episodes, seed=a.seed, optimizer=a.optimizer, ensemble=a.ensemble,
            inner_steps=a.inner_steps or run.get("inner_steps", 100), inner_lr=a.inner_lr or run.get("inner_lr", 0.1),
            hidden=tuple(int(x) for x in a.hidden.split(",")) if a.hidden else tuple(run.get("hidden", (256,) * 3)))
        if d["states"].shape[1] != task.obs_dim or d["actions"].shape[1] != task.act_dim:
            raise ValueError(f"{a.path}: synthetic set has dims {d['states'].shape[1]}/{d['actions'].shape[1]}, "
                             f"{task.name} needs {task.obs_dim}/{task.act_dim}")
        res = evaluate_synthetic(torch.from_numpy(d["states"]), torch.from_numpy(d["actions"]), task, d["mean"],
                                 d["std"], cfg)
    except (UnknownTaskError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    res = {"task": task.name, "path": str(a.path), **res}
    if a.json:
        print(json.dumps(res))
    else:
        print(f"{task.name}: normalized return {res['normalized_return_mean']:.1f} +/- "
              f"{res['normalized_return_std']:.1f} over {cfg.episodes} episodes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
