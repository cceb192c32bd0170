"""Offline behavior distillation: the bi-level problem and its Lightning module.

Inner loop: a freshly initialized policy (the mean head of a tanh-Gaussian MLP, three hidden
layers of 256, orthogonal init) takes T full-batch SGD steps on the synthetic pairs (S, A):

    theta_{t+1} = theta_t - eta * grad_theta L_in(theta_t; S, A),   L_in = mean (tanh(f(S; theta)) - A)^2.

Outer loss on real normalized states s with targets y and weights w (see :mod:`obd.datamodule`):

    L_out = mean_i w_i * mean_j (tanh(f(s_i; theta_T)) - y_i)_j^2

and its gradient with respect to (S, A) flows back through all T inner steps (BPTT).

Two exact implementations of that gradient:
- :func:`outer_grad_fast` (used for training): reverse-mode BPTT with a hand-derived backward.
  It stores, per inner step, only the weights, activations and errors (no autograd graph; memory
  linear in T and bounded), and walks back one step at a time; ``truncate`` limits the walk to the
  last K steps (truncated BPTT).
- :func:`outer_grad_unrolled`: a plain autograd unroll with ``create_graph=True``; simple, it keeps
  every step's double-backward graph alive, and is the correctness oracle (tests, ``make bench``).
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


def outer_grad_fast(states: Tensor, actions: Tensor, params0: Params, obs: Tensor, target: Tensor,
                    weight: Tensor, steps: int, lr: float, truncate: int | None = None
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Hand-derived reverse-mode BPTT for the MLP inner loop; the same result as the autograd unroll.

    The forward sweep runs the inner SGD by explicit backprop and keeps, per step, the weights,
    activations h_l and backpropagated errors delta_l. Walking back, the vector-Jacobian product of
    one SGD step with cotangent lam is a Hessian-vector product: an R-operator (Pearlmutter)
    forward pass along direction lam and an R-backward pass reusing the stored h and delta, which
    also yields the synthetic-state and -action terms. About 18 large matrix products per inner
    step, no autograd graph. Exact when ``truncate`` is None.
    """
    S, A = states.detach(), actions.detach()
    n_layers = len(params0) // 2
    n, d_out = A.shape
    c = 2.0 / (n * d_out)
    first = 0 if truncate is None else max(0, steps - truncate)
    tape: list[tuple] = []
    p = [q.detach() for q in params0]
    for t in range(steps):
        hs, masks, y = _forward_store(p, S, n_layers)
        deltas = _backward_deltas(p, masks, y, A, c, n_layers)
        grads = _grads(hs, S, deltas)
        if t >= first:
            tape.append((p, hs, masks, y, deltas))
        p = [q - lr * g for q, g in zip(p, grads)]
    with torch.enable_grad():
        leaf = [q.requires_grad_(True) for q in p]
        loss = outer_loss(leaf, obs, target, weight)
        lam = [g.detach() for g in torch.autograd.grad(loss, leaf)]
    gS, gA = torch.zeros_like(S), torch.zeros_like(A)
    for p_t, hs, masks, y, deltas in reversed(tape):
        hv, rs, ra = _hvp(p_t, hs, masks, y, deltas, S, A, lam, c, n_layers)
        lam = [l - lr * h for l, h in zip(lam, hv)]
        gS -= lr * rs
        gA -= lr * ra
    return loss.detach(), gS, gA


def _forward_store(p: Params, S: Tensor, n_layers: int) -> tuple[list[Tensor], list[Tensor], Tensor]:
    """Hidden activations h_1..h_{L-1} (post-ReLU), their ReLU masks, and the output y = tanh(z_L)."""
    hs, masks, h = [], [], S
    for i in range(n_layers - 1):
        h = torch.relu_(torch.addmm(p[2 * i + 1], h, p[2 * i]))
        hs.append(h)
        masks.append((h > 0).to(h.dtype))
    return hs, masks, torch.tanh_(torch.addmm(p[-1], h, p[-2]))


def _backward_deltas(p: Params, masks: list[Tensor], y: Tensor, A: Tensor, c: float, n_layers: int) -> list[Tensor]:
    """dL/dz_l for l = 1..L of L = mean((y - A)^2)."""
    delta = c * (y - A) * (1 - y * y)
    deltas = [delta]
    for i in range(n_layers - 1, 0, -1):
        delta = torch.mm(delta, p[2 * i].T).mul_(masks[i - 1])
        deltas.append(delta)
    return deltas[::-1]


def _grads(hs: list[Tensor], S: Tensor, deltas: list[Tensor]) -> Params:
    ins = [S, *hs]
    out: Params = []
    for h, d in zip(ins, deltas):
        out += [h.T @ d, d.sum(0)]
    return out


def _hvp(p: Params, hs: list[Tensor], masks: list[Tensor], y: Tensor, deltas: list[Tensor], S: Tensor, A: Tensor,
         v: Params, c: float, n_layers: int) -> tuple[Params, Tensor, Tensor]:
    """R_v of (grad_theta L, grad_S L, grad_A L) at p: the Hessian-vector product H v and the
    mixed terms (d grad_theta L / dS)^T v, (d grad_theta L / dA)^T v."""
    ins = [S, *hs]
    # R-forward: tangents of the pre-activations along v
    r_h: Tensor | None = None
    r_hs: list[Tensor | None] = [None]  # R of the input S is zero
    for i in range(n_layers):
        rz = torch.addmm(v[2 * i + 1], ins[i], v[2 * i])
        if r_h is not None:
            rz = rz.addmm_(r_h, p[2 * i])
        if i < n_layers - 1:
            r_h = rz.mul_(masks[i])
            r_hs.append(r_h)
    r_y = (1 - y * y) * rz
    e = y - A
    r_delta = c * r_y * ((1 - y * y) - 2 * y * e)
    hv: Params = [None] * len(p)  # type: ignore[list-item]
    for i in range(n_layers - 1, -1, -1):
        d, h, rh = deltas[i], ins[i], r_hs[i]
        gw = h.T @ r_delta
        if rh is not None:
            gw = gw.addmm_(rh.T, d)
        hv[2 * i], hv[2 * i + 1] = gw, r_delta.sum(0)
        # propagate: R delta_{i-1} = (R delta_i W_i^T + delta_i V_i^T) * relu'(z_{i-1}); at i = 0 it is R grad_S
        prev = torch.addmm(d @ v[2 * i].T, r_delta, p[2 * i].T)
        if i > 0:
            r_delta = prev.mul_(masks[i - 1])
    return hv, prev, -c * r_y


# ------------------------------------------------------------------ Lightning module

class BehaviorDistillation(pl.LightningModule):
    """Holds the synthetic set (parameters ``syn_states`` in normalized space, ``syn_actions``) and
    optimizes it by the outer gradient. Batches are ``(obs, target, weight)`` from
    :class:`obd.datamodule.OBDDataModule`."""

    def __init__(self, cfg: DistillConfig, init_states: Tensor, init_actions: Tensor, grad_fn: str = "fast"):
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
        return outer_grad_fast(*args, truncate=self.cfg.truncate)

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
