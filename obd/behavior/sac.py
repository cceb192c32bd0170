"""Behaviour-policy SAC (Haarnoja et al. 2018) for generating D4RL-style datasets.

D4RL's recipe: train SAC online; ``medium`` = a snapshot at about a third of expert return,
``medium-replay`` = everything the agent did up to that snapshot, ``expert`` = the trained policy.
We keep an actor snapshot (with its evaluated return) every ``snapshot_every`` steps so all of
these can be rebuilt from small files.

Speed on a 2-core CPU: the two critics are one batched ensemble (one ``baddbmm`` per layer),
Adam is ``fused`` and the target update is a single ``_foreach_lerp_``.
Training checkpoints (networks, optimisers, replay buffer, RNGs) are written atomically at the
first episode boundary after every ``checkpoint_every`` steps, and a run resumes from them exactly
as it would have gone on (on CPU; tested), so interruptions do not change what the run produces.
"""

from __future__ import annotations

import copy
import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from obd.data import Task
from obd.nets import EnsembleCritic, TanhGaussianActor
from obd.rollout import evaluate_episodes
from obd.seeding import derive_seed


@dataclass
class SACConfig:
    total_steps: int = 1_000_000  # D4RL's expert: 1M steps of SAC
    learning_starts: int = 5_000  # uniform random actions before the first update
    batch_size: int = 256
    hidden: tuple[int, ...] = (256, 256)
    gamma: float = 0.99
    tau: float = 0.005
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    alpha_lr: float = 3e-4
    snapshot_every: int = 10_000
    eval_episodes: int = 5  # stochastic-policy episodes per snapshot (behaviour data is sampled)
    checkpoint_every: int = 10_000  # ~2 minutes on one core: an interrupt loses that plus one episode
    seed: int = 0


class ReplayBuffer:
    def __init__(self, capacity: int, obs_dim: int, act_dim: int):
        self.obs = torch.zeros(capacity, obs_dim)
        self.act = torch.zeros(capacity, act_dim)
        self.rew = torch.zeros(capacity)
        self.next_obs = torch.zeros(capacity, obs_dim)
        self.not_done = torch.zeros(capacity)
        self.size = 0

    def add(self, o, a, r, o2, terminated: bool) -> None:
        i = self.size
        self.obs[i] = torch.as_tensor(o)
        self.act[i] = torch.as_tensor(a)
        self.rew[i] = float(r)
        self.next_obs[i] = torch.as_tensor(o2)
        self.not_done[i] = 0.0 if terminated else 1.0
        self.size += 1

    def sample(self, n: int, gen: torch.Generator):
        idx = torch.randint(0, self.size, (n,), generator=gen)
        return self.obs[idx], self.act[idx], self.rew[idx], self.next_obs[idx], self.not_done[idx]

    def state_dict(self) -> dict:
        s = self.size
        return {
            "obs": self.obs[:s].clone(),
            "act": self.act[:s].clone(),
            "rew": self.rew[:s].clone(),
            "next_obs": self.next_obs[:s].clone(),
            "not_done": self.not_done[:s].clone(),
        }

    def load_state_dict(self, d: dict) -> None:
        s = d["obs"].shape[0]
        for k in ("obs", "act", "rew", "next_obs", "not_done"):
            getattr(self, k)[:s] = d[k]
        self.size = s


class SAC(nn.Module):
    """Actor, twin critic ensemble with target, learned temperature."""

    def __init__(self, obs_dim: int, act_dim: int, cfg: SACConfig):
        super().__init__()
        self.cfg = cfg
        self.actor = TanhGaussianActor(obs_dim, act_dim, cfg.hidden)
        self.critic = EnsembleCritic(obs_dim, act_dim, cfg.hidden, n=2)
        self.critic_target = copy.deepcopy(self.critic).requires_grad_(False)
        self.log_alpha = nn.Parameter(torch.zeros(()))
        self.target_entropy = -float(act_dim)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), lr=cfg.actor_lr, fused=True)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=cfg.critic_lr, fused=True)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=cfg.alpha_lr)
        self._params: list[torch.Tensor] = list(self.critic.parameters())
        self._target_params: list[torch.Tensor] = list(self.critic_target.parameters())

    def update(self, obs, act, rew, next_obs, not_done) -> dict[str, torch.Tensor]:
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            next_act, next_logp = self.actor.sample(next_obs)
            q_next = self.critic_target(next_obs, next_act).min(0).values - alpha * next_logp
            target = rew + self.cfg.gamma * not_done * q_next
        q = self.critic(obs, act)
        critic_loss = ((q - target) ** 2).mean(1).sum()
        self.critic_opt.zero_grad(set_to_none=True)
        critic_loss.backward()
        self.critic_opt.step()

        self.critic.requires_grad_(False)
        pi, logp = self.actor.sample(obs)
        actor_loss = (alpha * logp - self.critic(obs, pi).min(0).values).mean()
        self.actor_opt.zero_grad(set_to_none=True)
        actor_loss.backward()
        self.actor_opt.step()
        self.critic.requires_grad_(True)

        alpha_loss = -(self.log_alpha * (logp.detach() + self.target_entropy)).mean()
        self.alpha_opt.zero_grad(set_to_none=True)
        alpha_loss.backward()
        self.alpha_opt.step()

        with torch.no_grad():
            torch._foreach_lerp_(self._target_params, self._params, self.cfg.tau)
        return {"critic_loss": critic_loss.detach(), "actor_loss": actor_loss.detach(), "alpha": alpha}


def actor_policy(actor: TanhGaussianActor, stochastic: bool, seed: int = 0):
    """Wrap an actor as a numpy policy for :mod:`obd.rollout`; stochastic policies sample a ~ pi(.|s)."""
    gen = torch.Generator().manual_seed(seed)

    dev = next(actor.parameters()).device

    @torch.no_grad()
    def policy(obs: np.ndarray) -> np.ndarray:
        o = torch.as_tensor(obs, dtype=torch.float32, device=dev)
        if not stochastic:
            return actor.deterministic(o).cpu().numpy()
        mu, log_std = (x.cpu() for x in actor(o))
        return torch.tanh(mu + log_std.exp() * torch.randn(mu.shape, generator=gen)).numpy()

    return policy


def _atomic_save(obj, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def train_sac(
    task: Task,
    cfg: SACConfig,
    workdir: Path,
    stop_at_score: float | None = None,
    show_progress: bool = True,
    device: torch.device | None = None,
) -> list[dict]:
    """Train (or resume) SAC on ``task.env_id``; returns the snapshot list.

    ``workdir`` holds ``checkpoint.pt`` (full state, resumable) and ``snapshots.pt``: a list of
    ``{"step", "score", "actor"}`` where ``score`` is the mean normalized return of the stochastic
    policy over ``cfg.eval_episodes`` episodes. ``stop_at_score`` stops early once a snapshot's
    score reaches it (used to produce medium policies without training to the end).
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ckpt_path, snap_path = workdir / "checkpoint.pt", workdir / "snapshots.pt"
    torch.manual_seed(cfg.seed)
    env = gym.make(task.env_id)
    obs_dim, act_dim = task.obs_dim, task.act_dim
    dev = device or torch.device("cpu")
    agent = SAC(obs_dim, act_dim, cfg).to(dev)
    buffer = ReplayBuffer(cfg.total_steps, obs_dim, act_dim)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    snapshots: list[dict] = []
    step, episodes = 0, 0
    if ckpt_path.exists():
        ck = torch.load(ckpt_path, weights_only=False, map_location=dev)
        agent.load_state_dict(ck["agent"])
        for name in ("actor_opt", "critic_opt", "alpha_opt"):
            getattr(agent, name).load_state_dict(ck[name])
        buffer.load_state_dict(ck["buffer"])
        gen.set_state(ck["gen"].cpu())
        rng.bit_generator.state = ck["rng"]
        step, episodes = ck["step"], ck["episodes"]
        if "torch_rng" in ck:  # absent in checkpoints written before resumption was exact
            torch.set_rng_state(ck["torch_rng"])
        snapshots = torch.load(snap_path, weights_only=True) if snap_path.exists() else []
        snapshots = [s for s in snapshots if s["step"] <= step]  # later ones are redone from here
    (workdir / "config.json").write_text(json.dumps({"task": task.name, **asdict(cfg)}, indent=1))

    # Checkpoints are taken at episode boundaries and each episode's reset and acting noise are
    # seeded by its index, so a resumed run continues exactly as the uninterrupted one (D4RL's medium
    # and expert must come from one run). Extending a finished run (a larger total_steps) resumes from
    # its last step, which may be mid-episode: that part starts a fresh episode.
    obs, _ = env.reset(seed=derive_seed(cfg.seed, "episode", episodes))
    sample = actor_policy(agent.actor, stochastic=True, seed=derive_seed(cfg.seed, "acting", episodes))
    ckpt_due = False
    bar = tqdm(
        total=cfg.total_steps,
        initial=step,
        desc=f"SAC {task.env_id}",
        disable=not show_progress,
        unit="step",
        smoothing=0.05,
    )
    t0, last = time.time(), {}
    while step < cfg.total_steps:
        if step < cfg.learning_starts:
            act = rng.uniform(-1, 1, act_dim).astype(np.float32)
        else:
            act = sample(obs[None].astype(np.float32))[0]
        nxt, rew, term, trunc, _ = env.step(act)
        buffer.add(obs, act, rew, nxt, term)
        obs = nxt
        if term or trunc:
            episodes += 1
            obs, _ = env.reset(seed=derive_seed(cfg.seed, "episode", episodes))
            sample = actor_policy(agent.actor, stochastic=True, seed=derive_seed(cfg.seed, "acting", episodes))
        if step >= cfg.learning_starts:
            last = agent.update(*(x.to(dev) for x in buffer.sample(cfg.batch_size, gen)))
        step += 1
        bar.update(1)
        if step % cfg.snapshot_every == 0:
            actor = {k: v.clone() for k, v in agent.actor.state_dict().items()}
            rets = evaluate_episodes(
                task.env_id,
                actor_policy(agent.actor, True, seed=derive_seed(cfg.seed, "eval-act", step)),
                cfg.eval_episodes,
                seed=derive_seed(cfg.seed, "eval-env", step),
            )
            score = float(task.normalized_score(rets).mean())
            snapshots.append({"step": step, "score": score, "actor": actor})
            _atomic_save(snapshots, snap_path)
            bar.set_postfix(
                score=f"{score:.1f}",
                alpha=f"{float(last.get('alpha', 1.0)):.3f}",
                ups=f"{step / max(time.time() - t0, 1e-9):.0f}",
            )
            if stop_at_score is not None and score >= stop_at_score:
                step_ckpt(ckpt_path, agent, buffer, gen, rng, step, episodes)
                break
        ckpt_due = ckpt_due or step % cfg.checkpoint_every == 0
        if ckpt_due and (term or trunc):
            step_ckpt(ckpt_path, agent, buffer, gen, rng, step, episodes)
            ckpt_due = False
    else:
        step_ckpt(ckpt_path, agent, buffer, gen, rng, step, episodes)
    bar.close()
    env.close()
    return snapshots


def step_ckpt(path: Path, agent: SAC, buffer: ReplayBuffer, gen, rng, step: int, episodes: int) -> None:
    _atomic_save(
        {
            "agent": agent.state_dict(),
            "actor_opt": agent.actor_opt.state_dict(),
            "critic_opt": agent.critic_opt.state_dict(),
            "alpha_opt": agent.alpha_opt.state_dict(),
            "buffer": buffer.state_dict(),
            "gen": gen.get_state(),
            "rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(),  # the actor's sampling noise in the SAC updates
            "step": step,
            "episodes": episodes,
        },
        path,
    )
