"""Turn a behaviour-SAC run (its snapshots) into the small policy file that generation reads."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from obd.rollout import evaluate_episodes

from .generate import make_actor
from .sac import actor_policy
from .tasks import D4RL_BEHAVIOUR_SCORE, Task


def export_policy(task: Task, workdir: Path, out: Path, episodes: int = 10, seed: int = 0, command: str = "") -> dict:
    """Pick the medium snapshot (closest to D4RL's medium score), measure it, write ``out``.

    The 3 snapshots closest to the target on their training-time estimate are re-measured over
    ``episodes`` stochastic episodes; the closest wins. Snapshots up to it are kept in float16 for
    medium-replay. ``expert`` is the last snapshot when training ran to its configured length.
    Returns the metadata written (measured scores included).
    """
    cfg = json.loads((workdir / "config.json").read_text())
    snaps = torch.load(workdir / "snapshots.pt", weights_only=True)
    if not snaps:
        raise ValueError(f"{workdir}: no snapshots yet")
    obs_dim, act_dim = task.obs_dim, task.act_dim
    pf = {"env": task.env, "obs_dim": obs_dim, "act_dim": act_dim, "hidden": list(cfg["hidden"]),
          "learning_starts": cfg["learning_starts"]}
    target = D4RL_BEHAVIOUR_SCORE[task.env]["medium"]
    candidates = sorted(snaps, key=lambda s: abs(s["score"] - target))[:3]

    def measure(snap: dict) -> np.ndarray:
        rets = evaluate_episodes(task.env_id, actor_policy(make_actor(pf, snap["actor"]), True, seed), episodes,
                                 seed=seed + 123)
        return task.normalized_score(rets)

    measured = [(s, measure(s)) for s in candidates]
    med, med_scores = min(measured, key=lambda x: abs(x[1].mean() - target))
    pf["medium"] = {"actor": med["actor"], "step": med["step"], "score": float(med_scores.mean()),
                    "score_std": float(med_scores.std())}
    pf["replay"] = [{"step": s["step"], "actor": {k: v.half() for k, v in s["actor"].items()}}
                    for s in snaps if s["step"] <= med["step"]]
    if snaps[-1]["step"] >= cfg["total_steps"]:
        exp_scores = measure(snaps[-1])
        pf["expert"] = {"actor": snaps[-1]["actor"], "step": snaps[-1]["step"], "score": float(exp_scores.mean()),
                        "score_std": float(exp_scores.std())}
    meta = {"env": task.env, "seed": cfg["seed"], "trained_steps": snaps[-1]["step"], "command": command,
            "medium_step": med["step"], "medium_score": pf["medium"]["score"],
            "medium_score_std": pf["medium"]["score_std"], "eval_episodes": episodes,
            "expert_score": pf["expert"]["score"] if "expert" in pf else None}
    pf["meta"] = json.dumps(meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(pf, out)
    return meta
