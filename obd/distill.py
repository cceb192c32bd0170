"""Offline behavior distillation: the bi-level problem and its Lightning module.

Inner loop: a freshly initialized policy (the mean head of a tanh-Gaussian MLP, three hidden
layers of 256, orthogonal init) takes T full-batch SGD steps on the synthetic pairs (S, A):

    theta_{t+1} = theta_t - eta * grad_theta L_in(theta_t; S, A),   L_in = mean (tanh(f(S; theta)) - A)^2.

Outer loss on real normalized states s with targets y and weights w (see :mod:`obd.datamodule`):

    L_out = mean_i w_i * mean_j (tanh(f(s_i; theta_T)) - y_i)_j^2

and its gradient with respect to (S, A) flows back through all T inner steps (BPTT).

Two exact implementations of that gradient:
- :func:`outer_grad_unrolled`: a plain autograd unroll with ``create_graph=True``; simple, it
  keeps every step's graph alive, and is the correctness oracle.
- :func:`outer_grad_reverse`: reverse-mode BPTT that stores only the T weight vectors (no graphs)
  and, walking back, recomputes one inner step at a time to take its vector-Jacobian product.
  Memory is O(T * |theta|) floats plus one step's activations; ``truncate`` limits the walk back
  to the last K steps (truncated BPTT).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

Params = list[Tensor]


@dataclass
class DistillConfig:
    """Published OBD defaults (Lei et al., 2024), all in one place."""

    method: str = "avpbc"  # dbc | pbc | avpbc | sdw
    n_synthetic: int = 256
    inner_steps: int = 100  # T
    inner_lr: float = 0.1
    hidden: tuple[int, ...] = (256, 256, 256)
    outer_lr: float = 0.1  # SGD on the synthetic states and actions
    outer_momentum: float = 0.9
    grad_clip: float = 2.0
    test_batches: int = 10  # outer loss over test_batches x batch_size real states
    batch_size: int = 256
    beta: float = 0.02  # Av-PBC weight = beta * Q(s, pi*(s))
    truncate: int | None = None  # truncated BPTT: backpropagate through the last K inner steps only
    seed: int = 0


# ------------------------------------------------------------------ the policy, functionally

def init_policy(obs_dim: int, act_dim: int, hidden: Sequence[int], gen: torch.Generator) -> Params:
    """[W1, b1, ..., W_L, b_L] with W (in, out): orthogonal, gain sqrt(2) for hidden layers and 1e-2
    for the head; zero biases. Only the mean half of the tanh-Gaussian head is kept: log-std
    never enters the MSE on the deterministic action."""
    dims = (obs_dim, *hidden, act_dim)
    params: Params = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        gain = 1e-2 if i == len(dims) - 2 else math.sqrt(2)
        w = torch.empty(b, a)
        _orthogonal_(w, gain, gen)
        params += [w.T.contiguous(), torch.zeros(b)]
    return params


def _orthogonal_(w: Tensor, gain: float, gen: torch.Generator) -> None:
    rows, cols = w.shape
    flat = torch.randn(max(rows, cols), min(rows, cols), generator=gen)
    q, r = torch.linalg.qr(flat)
    q = q * torch.sign(torch.diagonal(r))
    w.copy_((q if rows >= cols else q.T) * gain)


def policy_forward(params: Params, x: Tensor) -> Tensor:
    """Deterministic action tanh(mu(x)); x (B, obs_dim) -> (B, act_dim)."""
    h = x
    n = len(params) // 2
    for i in range(n):
        h = torch.addmm(params[2 * i + 1], h, params[2 * i])
        if i < n - 1:
            h = torch.relu(h)
    return torch.tanh(h)


def inner_loss(params: Params, states: Tensor, actions: Tensor) -> Tensor:
    return ((policy_forward(params, states) - actions) ** 2).mean()


def outer_loss(params: Params, obs: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    return (weight * ((policy_forward(params, obs) - target) ** 2).mean(1)).mean()


def train_inner(params: Params, states: Tensor, actions: Tensor, steps: int, lr: float) -> Params:
    """T plain SGD steps on the synthetic set without a graph (evaluation and the forward sweep)."""
    p = [q.detach().clone() for q in params]
    for _ in range(steps):
        p = _sgd_step(p, states, actions, lr)
    return p


def _sgd_step(p: Params, states: Tensor, actions: Tensor, lr: float) -> Params:
    with torch.enable_grad():
        leaf = [q.detach().requires_grad_(True) for q in p]
        g = torch.autograd.grad(inner_loss(leaf, states, actions), leaf)
    return [q.detach() - lr * gi for q, gi in zip(p, g)]


# ------------------------------------------------------------------ outer gradients

def outer_grad_unrolled(states: Tensor, actions: Tensor, params0: Params, obs: Tensor, target: Tensor,
                        weight: Tensor, steps: int, lr: float) -> tuple[Tensor, Tensor, Tensor]:
    """Reference: autograd through the whole unroll. Returns (L_out, dL/dS, dL/dA)."""
    S = states.detach().requires_grad_(True)
    A = actions.detach().requires_grad_(True)
    with torch.enable_grad():
        p = [q.detach().requires_grad_(True) for q in params0]
        for _ in range(steps):
            g = torch.autograd.grad(inner_loss(p, S, A), p, create_graph=True)
            p = [q - lr * gi for q, gi in zip(p, g)]
        loss = outer_loss(p, obs, target, weight)
        gS, gA = torch.autograd.grad(loss, [S, A])
    return loss.detach(), gS, gA


def outer_grad_reverse(states: Tensor, actions: Tensor, params0: Params, obs: Tensor, target: Tensor,
                       weight: Tensor, steps: int, lr: float, truncate: int | None = None
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """Reverse-mode BPTT over stored weights. Returns (L_out, dL/dS, dL/dA); exact when truncate is None."""
    S, A = states.detach(), actions.detach()
    history: list[Params] = []
    p = [q.detach() for q in params0]
    for _ in range(steps):
        history.append(p)
        p = _sgd_step(p, S, A, lr)
    with torch.enable_grad():
        leaf = [q.requires_grad_(True) for q in p]
        loss = outer_loss(leaf, obs, target, weight)
        lam = list(torch.autograd.grad(loss, leaf))
        gS, gA = torch.zeros_like(S), torch.zeros_like(A)
        first = 0 if truncate is None else max(0, steps - truncate)
        Sg, Ag = S.requires_grad_(True), A.requires_grad_(True)
        for t in range(steps - 1, first - 1, -1):
            pt = [q.requires_grad_(True) for q in history[t]]
            g = torch.autograd.grad(inner_loss(pt, Sg, Ag), pt, create_graph=True)
            # theta_{t+1} = theta_t - lr * g(theta_t, S, A): pull lam back through that map
            vj = torch.autograd.grad(g, [*pt, Sg, Ag], grad_outputs=lam)
            lam = [l - lr * v for l, v in zip(lam, vj[:-2])]
            gS -= lr * vj[-2]
            gA -= lr * vj[-1]
            history[t] = []  # free as we go
    return loss.detach(), gS, gA


# ------------------------------------------------------------------ Lightning module

class BehaviorDistillation(pl.LightningModule):
    """Holds the synthetic set (parameters ``syn_states`` in normalized space, ``syn_actions``) and
    optimizes it by the outer gradient. Batches are ``(obs, target, weight)`` from
    :class:`obd.datamodule.OBDDataModule`."""

    def __init__(self, cfg: DistillConfig, init_states: Tensor, init_actions: Tensor, grad_fn: str = "reverse"):
        super().__init__()
        self.cfg = cfg
        self.automatic_optimization = False
        self.syn_states = nn.Parameter(init_states.clone().float())
        self.syn_actions = nn.Parameter(init_actions.clone().float())
        self.obs_dim, self.act_dim = init_states.shape[1], init_actions.shape[1]
        self.grad_fn = grad_fn
        self.save_hyperparameters({"distill": vars(cfg), "grad_fn": grad_fn})

    def configure_optimizers(self):
        return torch.optim.SGD([self.syn_states, self.syn_actions], lr=self.cfg.outer_lr,
                               momentum=self.cfg.outer_momentum)

    def fresh_policy(self, step: int) -> Params:
        """The inner loop's initialization at outer step ``step``: seeded, so a resumed run repeats it."""
        gen = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + step)
        return init_policy(self.obs_dim, self.act_dim, self.cfg.hidden, gen)

    def outer_gradient(self, obs: Tensor, target: Tensor, weight: Tensor, step: int):
        args = (self.syn_states, self.syn_actions, self.fresh_policy(step), obs, target, weight,
                self.cfg.inner_steps, self.cfg.inner_lr)
        if self.grad_fn == "unrolled":
            return outer_grad_unrolled(*args)
        return outer_grad_reverse(*args, truncate=self.cfg.truncate)

    def training_step(self, batch, batch_idx):
        obs, target, weight = batch
        opt = self.optimizers()
        loss, gS, gA = self.outer_gradient(obs, target, weight, self.global_step)
        opt.zero_grad()
        self.syn_states.grad, self.syn_actions.grad = gS, gA
        grad_norm = torch.nn.utils.clip_grad_norm_([self.syn_states, self.syn_actions], self.cfg.grad_clip)
        opt.step()
        self.log_dict({"outer_loss": loss, "grad_norm": grad_norm}, prog_bar=True, on_step=True)
        return loss

    def synthetic(self) -> tuple[Tensor, Tensor]:
        return self.syn_states.detach().clone(), self.syn_actions.detach().clone()
