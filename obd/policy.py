"""The policy, functionally: its initialization and its forward pass, for one policy or K stacked ones.

The policy is the mean head of a tanh-Gaussian MLP (the OBD learner): parameters are a list
[W_1, b_1, ..., W_L, b_L] with W (in, out) and b (out,); K policies stack into W (K, in, out) and
b (K, 1, out). Distillation, evaluation and the K-run engine all use this one module.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

Params = list[Tensor]

HEAD_GAIN = {"official": math.sqrt(2), "corl": 1e-2}


def init_policy(
    obs_dim: int, act_dim: int, hidden: Sequence[int], gen: torch.Generator, init: str = "official"
) -> Params:
    """[W1, b1, ..., W_L, b_L] with W (in, out): orthogonal with gain sqrt(2), zero biases; the head's
    gain is sqrt(2) too (``official``, the OBD code's init_module_weights) or 1e-2 (``corl``). Only the
    mean half of the tanh-Gaussian head is kept: log-std never enters the MSE on the deterministic
    action (and the orthogonal rows of the mean half are those of the full head's init)."""
    dims = (obs_dim, *hidden, act_dim)
    params: Params = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        gain = HEAD_GAIN[init] if i == len(dims) - 2 else math.sqrt(2)
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
    """Deterministic action tanh(mu(x)): one policy, x (B, obs_dim) -> (B, act_dim); or K stacked policies
    (:func:`stack_params`), x (K, B, obs_dim) -> (K, B, act_dim), each policy on its own inputs."""
    product = torch.addmm if x.dim() == 2 else torch.baddbmm
    h = x
    n = len(params) // 2
    for i in range(n):
        h = product(params[2 * i + 1], h, params[2 * i])
        if i < n - 1:
            h = torch.relu(h)
    return torch.tanh(h)


def stack_params(policies: list[Params]) -> Params:
    """[W (in, out), b (out,), ...] of K policies -> [W (K, in, out), b (K, 1, out), ...]."""
    return [torch.stack([p[i] if i % 2 == 0 else p[i].unsqueeze(0) for p in policies]) for i in range(len(policies[0]))]


def unstack_params(params: Params, k: int) -> Params:
    """Policy k of stacked parameters, in the single-policy layout."""
    return [q[k] if i % 2 == 0 else q[k, 0] for i, q in enumerate(params)]
