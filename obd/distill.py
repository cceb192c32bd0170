"""Offline behavior distillation: the bi-level problem, its reference gradient and the outer optimizer.

Inner loop: a freshly initialized policy (the mean head of a tanh-Gaussian MLP, three hidden
layers of 256, orthogonal init with gain sqrt(2) on every layer as the official code) takes T
full-batch SGD steps on the synthetic pairs (S, A):

    theta_{t+1} = theta_t - eta * grad_theta L_in(theta_t; S, A),   L_in = mean (tanh(f(S; theta)) - A)^2.

Outer loss on real normalized states s with targets y and weights w (see :mod:`obd.datamodule`):

    L_out = mean_i w_i * mean_j (tanh(f(s_i; theta_T)) - y_i)_j^2

and its gradient with respect to (S, A) flows back through all T inner steps (BPTT).

Two exact implementations of that gradient:
- :func:`obd.bptt.outer_grad` (used for training, K runs at once): reverse-mode BPTT with a
  hand-derived backward. It stores, per inner step, only the weights, activations and errors (no
  autograd graph; memory linear in T and bounded), and walks back one step at a time; ``truncate``
  limits the walk to the last steps (truncated BPTT).
- :func:`outer_grad_unrolled` (here): a plain autograd unroll with ``create_graph=True``; simple, it
  keeps every step's double-backward graph alive, and is the correctness oracle (tests, ``make bench``).

The runs themselves (synthetic sets as parameters, their optimizers, evaluations) live in
:mod:`obd.engine`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from obd.config import DistillConfig
from obd.policy import Params, policy_forward


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


def outer_grad_unrolled(
    states: Tensor, actions: Tensor, params0: Params, obs: Tensor, target: Tensor, weight: Tensor, steps: int, lr: float
) -> tuple[Tensor, Tensor, Tensor]:
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


# ------------------------------------------------------------------ the outer optimizer


def outer_optimizer(params: list[Tensor], cfg: DistillConfig, outer_steps: int) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer of the synthetic set and its learning-rate schedule (None when constant)."""
    if cfg.outer_optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=cfg.outer_lr, momentum=cfg.outer_momentum)
    else:
        opt = torch.optim.Adam(params, lr=cfg.outer_lr)
    if cfg.outer_lr_schedule == "cosine":
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, outer_steps))
    return opt, None
