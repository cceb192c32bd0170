"""Turn a behaviour-SAC run (its snapshots) into the small policy file that generation reads."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from obd.data.tasks import D4RL_BEHAVIOUR_SCORE, Task
from obd.errors import ObdError
from obd.rollout import collect_transitions, evaluate_episodes
from obd.seeding import derive_seed

from .generate import make_actor
from .sac import actor_policy


def export_policy(
    task: Task,
    workdir: Path,
    out: Path,
    episodes: int = 10,
    seed: int = 0,
    command: str = "",  # the training command, without --steps (appended from the run's config)
    select_steps: int = 50_000,
    keep_medium: Path | None = None,
) -> dict:
    """Pick the medium snapshot (closest to D4RL's medium score), measure it, write ``out``.

    Medium is early-stopped as in D4RL (see :func:`medium_candidates`): of the snapshots up to the
    run's first clear pass of the target, the 5 closest to it on their training-time estimate are re-measured as the
    dataset they would produce (``select_steps`` transitions, D4RL's medium score is that of its
    data) and the closest wins; the score written (and shown in the README) is a separate
    measurement over ``episodes`` full episodes. Snapshots up to it are kept in float16 for
    medium-replay. Once training ran to its configured length, ``expert`` is picked the same way among
    the snapshots of the run's last ``EXPERT_WINDOW`` (see :func:`pick_expert`); the last snapshot is
    measured too and its score written to the metadata beside the chosen one's.
    ``keep_medium``: a policy file exported earlier from this run; its medium and replay snapshots are
    kept as they are (the medium datasets stay the same data) after checking that they are this run's.
    Returns the metadata written (measured scores included).
    """
    if not (workdir / "config.json").is_file() or not (workdir / "snapshots.pt").is_file():
        raise ObdError(
            f"{workdir}: not a behaviour-SAC run (config.json and snapshots.pt are needed); "
            f"train one with `python -m obd.behavior train {task.env}`"
        )
    cfg = json.loads((workdir / "config.json").read_text())
    snaps = torch.load(workdir / "snapshots.pt", weights_only=True)
    if not snaps:
        raise ObdError(f"{workdir}: no snapshots yet")
    obs_dim, act_dim = task.obs_dim, task.act_dim
    pf = {
        "env": task.env,
        "obs_dim": obs_dim,
        "act_dim": act_dim,
        "hidden": list(cfg["hidden"]),
        "learning_starts": cfg["learning_starts"],
    }
    target = D4RL_BEHAVIOUR_SCORE[task.env]["medium"]
    candidates = medium_candidates(snaps, target)
    kept = _kept_medium(keep_medium, snaps) if keep_medium else None

    def measure(snap: dict, n: int, eval_seed: int) -> np.ndarray:
        rets = evaluate_episodes(
            task.env_id, actor_policy(make_actor(pf, snap["actor"]), True, eval_seed), n, seed=eval_seed
        )
        return task.normalized_score(rets)

    def data_score(snap: dict) -> float:
        """Mean normalized episode return of a fixed-size rollout: the score of the dataset it would make
        (short episodes weigh more than in an episode average, as in D4RL's files)."""
        tr = collect_transitions(
            task.env_id,
            actor_policy(make_actor(pf, snap["actor"]), True, derive_seed(seed, "select-act")),
            select_steps,
            seed=derive_seed(seed, "select-env"),
        )
        ends = tr.terminals | tr.timeouts
        starts = np.concatenate([[0], np.flatnonzero(ends)[:-1] + 1])
        return float(task.normalized_score(np.add.reduceat(tr.rewards.astype(np.float64), starts)).mean())

    if kept is not None:
        pf["medium"], pf["replay"] = kept["medium"], kept["replay"]
    else:
        med = min(candidates, key=lambda s: abs(data_score(s) - target))
        med_scores = measure(med, episodes, derive_seed(seed, "measure"))
        pf["medium"] = {
            "actor": med["actor"],
            "step": med["step"],
            "score": float(med_scores.mean()),
            "score_std": float(med_scores.std()),
        }
        pf["replay"] = [
            {"step": s["step"], "actor": {k: v.half() for k, v in s["actor"].items()}}
            for s in snaps
            if s["step"] <= med["step"]
        ]
    last_score = None
    if snaps[-1]["step"] >= cfg["total_steps"]:
        exp = pick_expert(snaps, cfg["total_steps"], data_score)
        exp_scores = measure(exp, episodes, derive_seed(seed, "measure"))
        pf["expert"] = {
            "actor": exp["actor"],
            "step": exp["step"],
            "score": float(exp_scores.mean()),
            "score_std": float(exp_scores.std()),
        }
        last = exp_scores if exp is snaps[-1] else measure(snaps[-1], episodes, derive_seed(seed, "measure"))
        last_score = float(last.mean())
    meta = {
        "env": task.env,
        "seed": cfg["seed"],
        "trained_steps": snaps[-1]["step"],
        "command": f"{command} --steps {cfg['total_steps']}" if command else "",
        "medium_step": pf["medium"]["step"],
        "medium_score": pf["medium"]["score"],
        "medium_score_std": pf["medium"]["score_std"],
        "eval_episodes": episodes,
        "expert_step": pf["expert"]["step"] if "expert" in pf else None,
        "expert_score": pf["expert"]["score"] if "expert" in pf else None,
        "last_snapshot_score": last_score,
    }
    pf["meta"] = json.dumps(meta)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(pf, out)
    return meta


MEDIUM_STOP = 1.25  # medium candidates end at the first snapshot scoring 1.25x D4RL's medium score


def medium_candidates(snaps: list[dict], target: float, n: int = 5) -> list[dict]:
    """The ``n`` snapshots closest to ``target`` on their training-time estimate, among those up to the
    first whose estimate reaches ``MEDIUM_STOP * target`` (all of them if none does).

    D4RL early-stopped its medium policy; without the stop a late snapshot that had one bad
    evaluation would qualify (hopper's run: 1.09M steps scored 45.4 against a target of 44.3).
    """
    stop = next((i for i, s in enumerate(snaps) if s["score"] >= MEDIUM_STOP * target), len(snaps) - 1)
    return sorted(snaps[: stop + 1], key=lambda s: abs(s["score"] - target))[:n]


EXPERT_WINDOW = 0.1  # the expert is chosen among the snapshots of the run's last 10% of steps


def pick_expert(snaps: list[dict], total_steps: int, data_score: Callable[[dict], float], n: int = 5) -> dict:
    """The fully trained policy: of the snapshots in the last ``EXPERT_WINDOW`` of a ``total_steps`` run,
    the ``n`` best on their training-time estimate are re-measured as the dataset they would produce
    (``data_score``) and the best wins.

    Late SAC snapshots differ a lot (hopper's run, 0.9M-1.16M steps: 34 to 103, 10 episodes each), so
    the last one alone is a draw from that spread; the score written is a separate measurement.
    """
    late = [s for s in snaps if s["step"] > (1.0 - EXPERT_WINDOW) * total_steps]
    if not late:
        raise ObdError(f"no snapshot in the last {EXPERT_WINDOW:.0%} of the run's {total_steps} steps")
    best = sorted(late, key=lambda s: s["score"])[-n:]
    return best[0] if len(best) == 1 else max(best, key=data_score)


def _kept_medium(path: Path, snaps: list[dict]) -> dict:
    """The medium and replay entries of an earlier export of this run (checked: same weights at that step)."""
    if not path.is_file():
        raise ObdError(f"{path}: no such policy file to keep the medium policy of")
    try:
        old = torch.load(path, weights_only=True)
        med = old["medium"]
    except Exception as e:
        raise ObdError(f"{path}: not a policy file written by export ({type(e).__name__}: {e})") from None
    same = [s for s in snaps if s["step"] == med["step"]]
    if not same or any(not torch.equal(same[0]["actor"][k], v) for k, v in med["actor"].items()):
        raise ObdError(f"{path}: its medium policy (step {med['step']}) is not a snapshot of this SAC run")
    return old
