"""``make misalignment`` / ``python -m obd.misalignment``: does the ranking of datasets flip with the training loss?

The OBD papers' misalignment finding: which dataset gives the better behaviour-cloned policy can
depend on how well the policy fits its data. Here, for each dataset of one env (e.g. random,
medium-replay, medium), random subsets of ``n`` real (state, dataset action) pairs are cloned by
the published evaluation learner (10 fresh policies, full-batch SGD at lr 0.1, official init)
for an increasing number of steps; each level gives a training loss (the MSE on the subset, mean
over policies) and a normalized return (10 policies x E episodes). The state-diversity measure
reported per dataset is the mean distance to the k-th nearest neighbour among normalized states
(faiss; larger = more diverse), on a random sample of states.

Output: ``OUT/misalignment.json``, ``OUT/misalignment.csv``, ``OUT/misalignment.png`` (return
against training loss, one line per dataset) and a one-line answer: the ranking of the datasets at
the highest and at the lowest loss level, and whether it flips.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from obd.density import state_diversity
from obd.errors import ConfigError, cli

DEFAULT_STEPS = (5, 20, 100, 500, 2000)


def study(
    env: str, kinds: list[str], n: int, steps: list[int], policies: int, episodes: int, seed: int, data_layer: dict
) -> dict:
    import torch

    from obd.config import EvalConfig, build_config
    from obd.evaluate import evaluate_synthetic
    from obd.seeding import derive_seed, torch_generator
    from obd.targets import prepare_targets

    out: dict = {"env": env, "n_pairs": n, "steps": steps, "policies": policies, "episodes": episodes, "datasets": {}}
    for kind in kinds:
        task = f"{env}-{kind}"
        t = prepare_targets(build_config("quick", [{"data": {"source": task, **data_layer}}]), "dbc")
        idx = torch.randperm(len(t.obs), generator=torch_generator(seed, "misalignment-subset", task))[:n]
        S, A = t.obs[idx], t.actions[idx]
        levels = []
        for s in steps:
            cfg = EvalConfig(policies=policies, episodes=episodes, inner_steps=s)
            r = evaluate_synthetic(S, A, t.task, t.mean.numpy(), t.std.numpy(), cfg, seed=derive_seed(seed, "mis", s))
            levels.append(
                {
                    "steps": s,
                    "train_mse": r["train_mse"],
                    "score": r["score"],
                    "std_over_policies": r["std_over_policies"],
                }
            )
            print(f"{task:>26} steps {s:>5}: train MSE {r['train_mse']:.4f}, return {r['score']:.1f}", flush=True)
        out["datasets"][task] = {
            "behaviour_score": t.behaviour_score,
            "transitions": len(t.obs),
            "state_diversity_knn10": state_diversity(t.obs),
            "levels": levels,
        }
    first, last = steps[0], steps[-1]

    def ranking(step: int) -> list[str]:
        scores = {d: next(lv["score"] for lv in v["levels"] if lv["steps"] == step) for d, v in out["datasets"].items()}
        return sorted(scores, key=scores.get, reverse=True)  # type: ignore[arg-type]

    out["ranking_high_loss"], out["ranking_low_loss"] = ranking(first), ranking(last)
    out["flips"] = out["ranking_high_loss"] != out["ranking_low_loss"]

    def separated(step: int) -> bool:
        """Do neighbouring datasets in the ranking differ by more than twice their combined standard error?"""
        lv = {d: next(x for x in v["levels"] if x["steps"] == step) for d, v in out["datasets"].items()}
        order = ranking(step)
        se = {d: lv[d]["std_over_policies"] / policies**0.5 for d in order}
        return all(
            lv[a]["score"] - lv[b]["score"] > 2 * (se[a] ** 2 + se[b] ** 2) ** 0.5 for a, b in zip(order, order[1:])
        )

    out["high_loss_ranking_resolved"], out["low_loss_ranking_resolved"] = separated(first), separated(last)
    return out


def write(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "misalignment.json").write_text(json.dumps(res, indent=1))
    with open(out / "misalignment.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["dataset", "state_diversity_knn10", "behaviour_score", "bc_steps", "train_mse", "score"])
        for d, v in res["datasets"].items():
            for lv in v["levels"]:
                w.writerow(
                    [
                        d,
                        round(v["state_diversity_knn10"], 4),
                        round(v["behaviour_score"], 2),
                        lv["steps"],
                        round(lv["train_mse"], 5),
                        round(lv["score"], 2),
                    ]
                )
    fig, ax = plt.subplots(figsize=(7, 4.3))
    for d, v in res["datasets"].items():
        xs = [lv["train_mse"] for lv in v["levels"]]
        ys = [lv["score"] for lv in v["levels"]]
        err = [lv["std_over_policies"] / res["policies"] ** 0.5 for lv in v["levels"]]  # standard error
        ax.errorbar(
            xs, ys, yerr=err, marker="o", capsize=3, label=f"{d} (state diversity {v['state_diversity_knn10']:.2f})"
        )
    ax.set_xscale("log")
    ax.invert_xaxis()
    ax.set_xlabel("training loss of the cloned policies (MSE on the subset, log scale; lower = better fit)")
    ax.set_ylabel("normalized return")
    ax.set_title(
        f"{res['env']}: behaviour cloning on {res['n_pairs']} real pairs, "
        f"{res['policies']} policies x {res['episodes']} episodes"
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "misalignment.png", dpi=120)
    plt.close(fig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m obd.misalignment", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--env", default="halfcheetah", choices=("halfcheetah", "hopper", "walker2d"), help="default halfcheetah"
    )
    p.add_argument(
        "--kinds",
        default="random,medium-replay,medium",
        help="datasets of the env, comma-separated (default random,medium-replay,medium)",
    )
    p.add_argument("--n", type=int, default=256, help="real pairs per subset (default 256)")
    p.add_argument(
        "--steps",
        default=",".join(map(str, DEFAULT_STEPS)),
        help=f"BC steps per loss level (default {','.join(map(str, DEFAULT_STEPS))})",
    )
    p.add_argument("--policies", type=int, default=10, help="policies per level (default 10)")
    p.add_argument("--episodes", type=int, default=10, help="episodes per policy (default 10)")
    p.add_argument("--size", type=int, default=None, help="generated dataset size (default: D4RL's)")
    p.add_argument("--seed", type=int, default=0, help="default 0")
    p.add_argument("--out", default=None, help="default results/misalignment-ENV")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    try:
        steps = sorted(int(x) for x in a.steps.split(","))
    except ValueError:
        raise ConfigError(f"--steps: expected comma-separated integers, got {a.steps!r}") from None
    if a.n < 1 or a.policies < 1 or a.episodes < 1 or not steps or steps[0] < 1:
        raise ConfigError("--n, --policies, --episodes and every --steps value must be >= 1")
    res = study(
        a.env, a.kinds.split(","), a.n, steps, a.policies, a.episodes, a.seed, {"size": a.size} if a.size else {}
    )
    out = Path(a.out or f"results/misalignment-{a.env}")
    write(res, out)
    verdict = "flips" if res["flips"] else "does not flip"
    if not (res["high_loss_ranking_resolved"] and res["low_loss_ranking_resolved"]):
        verdict += " (but at least one ranking is within 2 standard errors: not resolved by this many policies)"
    print(
        f"ranking at the highest loss ({steps[0]} steps): {' > '.join(res['ranking_high_loss'])}; at the lowest "
        f"({steps[-1]} steps): {' > '.join(res['ranking_low_loss'])}: the ranking {verdict}. {out / 'misalignment.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
