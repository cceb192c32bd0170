"""K independent distillations advanced in one batched outer iteration.

Every run k has its own synthetic set (S_k, A_k), inner-loop initialization, real batch and
weights, inner learning rate lr_k and number of inner steps T_k <= T = max_k T_k. The inner loops
run together as batched matrix products (``baddbmm`` / ``bmm`` over a leading run dimension); a run
whose T_k is reached is masked (its parameters stop changing), so each run's outer gradient is
exactly the one it gets alone from :func:`obd.distill.outer_grad_fast` (tested in float64).

The gradient is the same hand-derived reverse-mode BPTT as :func:`obd.distill.outer_grad_fast`
(forward sweep storing weights, post-ReLU activations and errors; backward sweep of
Hessian-vector products by the R-operator), written for a leading batch dimension and the plain
(in, out) weight layout. Shapes: S (K, n, d), A (K, n, a), params0 [W_1 (K, d, h), b_1 (K, 1, h),
..., W_L (K, h, a), b_L (K, 1, a)], obs (K, B, d), target (K, B, a), weight (K, B), lr (K,),
steps (K,) ints. Everything stays on the inputs' device.
"""

from __future__ import annotations

import torch
from torch import Tensor

Params = list[Tensor]


def stack_params(runs: list[Params]) -> Params:
    """[W (in, out), b (out,), ...] of K runs -> [W (K, in, out), b (K, 1, out), ...]."""
    return [torch.stack([p[i] if i % 2 == 0 else p[i].unsqueeze(0) for p in runs]) for i in range(len(runs[0]))]


def _relu_grad(x: Tensor, h: Tensor) -> Tensor:
    return x * (h > 0)


def _forward(p: Params, S: Tensor, A: Tensor, c: float, L: int):
    hs = [S]
    for i in range(L - 1):
        hs.append(torch.relu(torch.baddbmm(p[2 * i + 1], hs[-1], p[2 * i])))
    y = torch.tanh(torch.baddbmm(p[-1], hs[-1], p[-2]))
    e = y - A
    d = (1 - y * y) * e * c
    deltas = [_relu_grad(torch.bmm(d, p[-2].transpose(1, 2)), hs[L - 1])]
    for i in range(L - 2, 0, -1):
        deltas.append(_relu_grad(torch.bmm(deltas[-1], p[2 * i].transpose(1, 2)), hs[i]))
    deltas = deltas[::-1]  # deltas[i] = dL/dz_{i+1}, i = 0 .. L-2
    grads: Params = []
    for h, dl in zip(hs, deltas):
        grads += [torch.bmm(h.transpose(1, 2), dl), dl.sum(1, keepdim=True)]
    grads += [torch.bmm(hs[-1].transpose(1, 2), d), d.sum(1, keepdim=True)]
    return hs, y, e, d, deltas, grads


def _hvp(
    p: Params, hs: list[Tensor], y: Tensor, e: Tensor, d: Tensor, deltas: list[Tensor], v: Params, c: float, L: int
) -> tuple[Params, Tensor, Tensor]:
    """R_v of (grad_theta L_in, grad_S L_in, grad_A L_in) at p: H v and the mixed terms, per run."""
    r_hs: list[Tensor | None] = [None]
    for i in range(L - 1):
        rz = torch.baddbmm(v[2 * i + 1], hs[i], v[2 * i])
        prev_r = r_hs[-1]
        if prev_r is not None:
            rz = rz + torch.bmm(prev_r, p[2 * i])
        r_hs.append(_relu_grad(rz, hs[i + 1]))
    last = r_hs[-1]
    assert last is not None
    rz_out = torch.baddbmm(v[-1], hs[-1], v[-2]) + torch.bmm(last, p[-2])
    r_y = (1 - y * y) * rz_out
    r_d = ((1 - y * y) - 2 * y * e) * r_y * c
    hv: list[Tensor | None] = [None] * len(p)
    hv[-2] = torch.bmm(hs[-1].transpose(1, 2), r_d) + torch.bmm(last.transpose(1, 2), d)
    hv[-1] = r_d.sum(1, keepdim=True)
    r_dh = _relu_grad(torch.bmm(d, v[-2].transpose(1, 2)) + torch.bmm(r_d, p[-2].transpose(1, 2)), hs[L - 1])
    prev = r_dh
    for i in range(L - 2, -1, -1):
        dl, h, rh = deltas[i], hs[i], r_hs[i]
        gw = torch.bmm(h.transpose(1, 2), r_dh)
        if rh is not None:
            gw = gw + torch.bmm(rh.transpose(1, 2), dl)
        hv[2 * i], hv[2 * i + 1] = gw, r_dh.sum(1, keepdim=True)
        prev = torch.bmm(dl, v[2 * i].transpose(1, 2)) + torch.bmm(r_dh, p[2 * i].transpose(1, 2))
        if i > 0:
            r_dh = _relu_grad(prev, h)
    return [q for q in hv if q is not None], prev, -c * r_y


def outer_loss_batched(params: Params, obs: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Per-run outer loss (K,): mean_i w_i * mean_j (tanh(f(s_i)) - y_i)_j^2."""
    h = obs
    L = len(params) // 2
    for i in range(L):
        h = torch.baddbmm(params[2 * i + 1], h, params[2 * i])
        if i < L - 1:
            h = torch.relu(h)
    return (weight * ((torch.tanh(h) - target) ** 2).mean(2)).mean(1)


def outer_grad_batched(
    S: Tensor, A: Tensor, params0: Params, obs: Tensor, target: Tensor, weight: Tensor, steps: Tensor, lr: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """(L_out (K,), dL/dS (K, n, d), dL/dA (K, n, a)) of K independent runs; see the module docstring."""
    S, A = S.detach(), A.detach()
    L = len(params0) // 2
    n, a = A.shape[1], A.shape[2]
    c = 2.0 / (n * a)
    T = int(steps.max())
    steps = steps.to(S.device)
    scale = [(lr.to(S.device, S.dtype) * (t < steps).to(S.dtype)).view(-1, 1, 1) for t in range(T)]
    tape = []
    p = [q.detach() for q in params0]
    for t in range(T):
        hs, y, e, d, deltas, grads = _forward(p, S, A, c, L)
        tape.append((p, hs, y, e, d, deltas))
        p = [q - scale[t] * g for q, g in zip(p, grads)]
    with torch.enable_grad():
        leaf = [q.detach().requires_grad_(True) for q in p]
        losses = outer_loss_batched(leaf, obs, target, weight)
        lam = list(torch.autograd.grad(losses.sum(), leaf))  # runs are separate: each gets its own
    gS, gA = torch.zeros_like(S), torch.zeros_like(A)
    for t in range(T - 1, -1, -1):
        pt, hs, y, e, d, deltas = tape[t]
        hv, rs, ra = _hvp(pt, hs, y, e, d, deltas, lam, c, L)
        lam = [lm - scale[t] * h for lm, h in zip(lam, hv)]
        gS = gS - scale[t] * rs
        gA = gA - scale[t] * ra
    return losses.detach(), gS, gA
