"""Stage 4, evaluation as published: train N fresh policies on a synthetic set, roll each out E episodes.

Protocol (official ``evaluate_synset.py``): each evaluation trains ``policies`` (N = 10) fresh
policies on the synthetic set with the fixed published learner (:class:`obd.config.EvalConfig`:
100 full-batch SGD steps at lr 0.1, official init), rolls each out for ``episodes`` (E = 10)
episodes, and averages. A run's score is the mean of its last K evaluations (K = 5 for Av-PBC and
SDW, 10 for DBC and PBC). The N policies train as one batched computation (``bmm`` over stacked
weights: each policy's update is exactly its own, as its loss is separate) and are rolled out in
N x E vectorized envs with batched inference. ``ensemble`` instead rolls out one agent acting with
the N policies' mean action (the paper's Table 3 protocol).

``python -m obd.evaluate PATH`` re-evaluates any saved ``synthetic.npz`` with the same protocol.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from obd.config import EvalConfig
from obd.errors import ObdError, cli
from obd.policy import policy_forward

EvalListener = Callable[[int, float], None]  # (outer step, score of that evaluation)


def init_stacked(n: int, obs_dim: int, act_dim: int, cfg: EvalConfig, seed: int):
    """N independent initial policies, stacked: [W1 (N, in, out), b1 (N, 1, out), ...]."""
    import torch

    from obd.policy import init_policy, stack_params
    from obd.seeding import derive_seed

    ps = [
        init_policy(
            obs_dim, act_dim, cfg.hidden, torch.Generator().manual_seed(derive_seed(seed, "eval-init", m)), cfg.init
        )
        for m in range(n)
    ]
    return stack_params(ps)


def train_stacked(params, states, actions, cfg: EvalConfig):
    """``cfg.inner_steps`` full-batch steps of every stacked policy on (states, actions), at once.

    The summed loss sum_m L_m separates, so each policy gets exactly its own gradient and update."""
    import torch

    p = [q.detach().clone().requires_grad_(True) for q in params]
    n = p[0].shape[0]
    S, A = states.expand(n, -1, -1), actions.expand(n, -1, -1)
    opt = torch.optim.SGD(p, lr=cfg.inner_lr) if cfg.optimizer == "sgd" else torch.optim.Adam(p, lr=cfg.inner_lr)
    with torch.enable_grad():
        for _ in range(cfg.inner_steps):
            opt.zero_grad(set_to_none=True)
            ((policy_forward(p, S) - A) ** 2).mean((1, 2)).sum().backward()
            opt.step()
    return [q.detach() for q in p]


def evaluate_synthetic(
    states, actions, task, mean: np.ndarray, std: np.ndarray, cfg: EvalConfig, seed: int, device=None
) -> dict:
    """One evaluation: N policies trained on (states, actions), E episodes each.

    Returns the score (mean normalized return over all N x E episodes), its std over policies, the
    per-policy mean scores (N,) and every episode's score (N x E)."""
    import torch

    from obd.rollout import one_episode_per_env
    from obd.seeding import derive_seed

    dev = device or states.device
    S, A = states.detach().float().to(dev), actions.detach().float().to(dev)
    p0 = [q.to(dev) for q in init_stacked(cfg.policies, S.shape[1], A.shape[1], cfg, seed)]  # inits drawn on the CPU
    params = train_stacked(p0, S, A, cfg)
    with torch.no_grad():
        train_mse = ((policy_forward(params, S.expand(len(params[0]), -1, -1)) - A) ** 2).mean((1, 2))
    params = [q.cpu() for q in params]  # rollouts step CPU simulators: the policies act on the CPU
    m, s = torch.as_tensor(mean, dtype=torch.float32), torch.as_tensor(std, dtype=torch.float32)
    n, e = cfg.policies, cfg.episodes

    @torch.no_grad()
    def act(obs: np.ndarray) -> np.ndarray:
        x = (torch.from_numpy(obs) - m) / s
        if cfg.ensemble:  # one agent per env, acting with the policies' mean action
            return policy_forward(params, x.expand(n, -1, -1)).mean(0).numpy()
        return policy_forward(params, x.view(n, e, -1)).reshape(n * e, -1).numpy()

    rets = one_episode_per_env(task.env_id, act, e if cfg.ensemble else n * e, seed=derive_seed(seed, "eval-envs"))
    scores = task.normalized_score(rets).reshape(1 if cfg.ensemble else n, e)
    per_policy = scores.mean(1)
    return {
        "score": float(scores.mean()),
        "train_mse": float(train_mse.mean()),  # the learner's final loss on the set, mean over policies
        "std_over_policies": float(per_policy.std()),
        "policy_scores": [round(float(x), 3) for x in per_policy],
        "episode_scores": [[round(float(x), 3) for x in row] for row in scores],
    }


def summarize_history(history: list[dict], k: int, scored_from: int = 0) -> dict:
    """The run's score: the mean of its last ``k`` evaluations at outer steps >= ``scored_from`` (fewer
    when fewer lie there, never an earlier one), and the final evaluation's score."""
    if not history:
        return {"score": None, "final_score": None, "last_k": k, "last_k_used": 0, "scored_steps": []}
    tail = [h for h in history if h["step"] >= scored_from][-k:]
    return {
        "score": float(np.mean([h["score"] for h in tail])) if tail else None,
        "final_score": history[-1]["score"],
        "last_k": k,
        "last_k_used": len(tail),
        "scored_steps": [h["step"] for h in tail],
    }


def set_change(states, actions, init_states, init_actions) -> dict:
    """How far distillation moved a set from its start: L2 norm of the change of (S, A), and that
    relative to the start's norm (0 when nothing moved)."""
    import torch

    d = torch.cat([(states - init_states).flatten(), (actions - init_actions).flatten()]).double().norm()
    base = torch.cat([init_states.flatten(), init_actions.flatten()]).double().norm()
    return {"l2": round(float(d), 6), "relative": round(float(d / base), 6) if base > 0 else None}


def rescore(metrics: dict) -> dict:
    """A stored run's metrics with its score recomputed by :func:`summarize_history` from its history
    (runs written before the scored window existed averaged their last K evaluations, wherever they lay)."""
    from obd.config import BASELINE_START

    if not metrics.get("history"):
        return metrics  # nothing to recompute from
    cfg = metrics.get("config") or {}
    window = float(cfg.get("eval_window", 0.2))
    steps = int(metrics.get("outer_steps") or cfg.get("outer_steps") or 0)
    start = 0 if metrics.get("method") in BASELINE_START else math.ceil((1 - window) * steps)
    k = int(metrics.get("last_k") or (metrics.get("protocol") or {}).get("last_k") or 5)
    return {**metrics, **summarize_history(metrics.get("history") or [], k, start)}


def parser() -> argparse.ArgumentParser:
    d = EvalConfig()
    p = argparse.ArgumentParser(
        prog="python -m obd.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "path",
        help="synthetic.npz of python -m obd.train, or a set exported by python -m obd.export "
        "(a D4RL-layout .hdf5 or minari:ID)",
    )
    p.add_argument("--task", default=None, help="default: the task stored with the set")
    p.add_argument("--policies", type=int, default=None, help=f"fresh policies (default: the run's, {d.policies})")
    p.add_argument("--episodes", type=int, default=None, help=f"episodes per policy (default: the run's, {d.episodes})")
    p.add_argument("--ensemble", action="store_true", help="one agent with the policies' mean action (Table 3)")
    p.add_argument(
        "--seed",
        type=int,
        default=None,
        help="evaluation seed (default: the one of the run's final evaluation, so the score repeats)",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="where the policies train (default auto); rollouts run on the CPU",
    )
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def _load_any(path: str) -> tuple:
    """(normalized states, actions, mean, std, task name, eval config dict, seed root, final step)."""
    import torch

    if path.endswith(".npz"):
        from obd.synthetic_set import load_synthetic

        d = load_synthetic(path)
        run_cfg = json.loads(str(d["config"])) if "config" in d else {}
        metrics_path = Path(path).parent / "metrics.json"
        metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else {}
        step = metrics["history"][-1]["step"] if metrics.get("history") else 0
        return (
            torch.from_numpy(d["states"]),
            torch.from_numpy(d["actions"]),
            d["mean"],
            d["std"],
            str(d["task"]),
            run_cfg.get("eval", {}),
            run_cfg.get("distill", {}).get("seed", 0),
            step,
        )
    from obd.synthetic_set import read_export

    raw, actions, meta = read_export(path)
    mean, std = np.asarray(meta["mean"]), np.asarray(meta["std"])
    states = ((raw - mean) / std).astype(np.float32)
    return (
        torch.from_numpy(states),
        torch.from_numpy(actions),
        mean.astype(np.float32),
        std.astype(np.float32),
        meta["provenance"]["task"],
        meta["eval"],
        meta["eval_seed_root"],
        meta["eval_step"],
    )


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    import torch

    from obd.config import merge
    from obd.data import get_task
    from obd.seeding import derive_seed

    torch.set_num_threads(1)
    states, actions, mean, std, task_name, eval_cfg, root, step = _load_any(a.path)
    task = get_task(a.task or task_name)
    over = {k: v for k, v in {"policies": a.policies, "episodes": a.episodes}.items() if v is not None}
    cfg = merge(EvalConfig(), {**eval_cfg, **over, **({"ensemble": True} if a.ensemble else {})})
    if states.shape[1] != task.obs_dim or actions.shape[1] != task.act_dim:
        raise ObdError(
            f"{a.path}: synthetic set has dims {states.shape[1]}/{actions.shape[1]}, "
            f"{task.name} needs {task.obs_dim}/{task.act_dim}"
        )
    seed = derive_seed(root, "evaluation", step) if a.seed is None else a.seed
    from obd.devices import resolve_device

    res = evaluate_synthetic(states, actions, task, mean, std, cfg, seed=seed, device=resolve_device(a.device))
    res = {"task": task.name, "path": str(a.path), "policies": cfg.policies, "episodes": cfg.episodes, **res}
    if a.json:
        print(json.dumps(res))
    else:
        print(
            f"{task.name}: normalized return {res['score']:.1f} (std over {cfg.policies} policies "
            f"{res['std_over_policies']:.1f}, {cfg.episodes} episodes each)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
