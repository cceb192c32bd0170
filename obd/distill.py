"""Offline behavior distillation: the bi-level problem and its Lightning module.

Inner loop: a freshly initialized policy (the mean head of a tanh-Gaussian MLP, three hidden
layers of 256, orthogonal init with gain sqrt(2) on every layer as the official code) takes T
full-batch SGD steps on the synthetic pairs (S, A):

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

import dataclasses
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from obd.config import DistillConfig
from obd.policy import Params, init_policy, policy_forward
from obd.seeding import derive_seed


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


def outer_grad_fast(
    states: Tensor,
    actions: Tensor,
    params0: Params,
    obs: Tensor,
    target: Tensor,
    weight: Tensor,
    steps: int,
    lr: float,
    truncate: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Hand-derived reverse-mode BPTT for the MLP inner loop; the same result as the autograd unroll.

    The forward sweep runs the inner SGD by explicit backprop and keeps, per step, the weights,
    post-ReLU activations h_l and backpropagated errors delta_l (ReLU masks are recovered from h).
    Walking back, the vector-Jacobian product of one SGD step with cotangent lam is a
    Hessian-vector product: an R-operator (Pearlmutter) forward pass along direction lam and an
    R-backward pass reusing the stored h and delta, which also yields the synthetic-state and
    -action terms. 18 matrix products of 256^3 per inner step (as many as the autograd unroll
    does, the FLOP count of an exact gradient), no autograd graph, no other overhead worth naming:
    - the tape lives in a :class:`_Tape` reused across calls, because first-touching ~2 MB of
      fresh memory per inner step (page faults) costs as much as a third of the matrix products;
    - the output layer is kept transposed (act_dim, hidden): the skinny products with 6 columns
      are several times faster in that layout.
    Exact when ``truncate`` is None; otherwise backpropagates through the last ``truncate`` steps.
    """
    S, A = states.detach(), actions.detach()
    L = len(params0) // 2
    assert L >= 2, "the policy needs at least one hidden layer"
    n, d_out = A.shape
    c = 2.0 / (n * d_out)
    AT = A.T.contiguous()
    first = 0 if truncate is None else max(0, steps - truncate)
    tape = _Tape.get(params0, n, steps - first)
    p0 = _to_internal(params0)
    for q, src in zip(tape.params(tape.param_slot(0, first)), p0):
        q.copy_(src)
    for t in range(steps):
        k = tape.act_slot(t, first)
        p = tape.params(tape.param_slot(t, first))
        hs, yT, eT, dT = _forward_store(p, S, AT, c, L, tape, k)
        deltas = _backward_deltas(p, hs, dT, L, tape, k)
        grads = _grads(hs, deltas, dT)
        for q_new, q, g in zip(tape.params(tape.param_slot(t + 1, first)), p, grads):
            torch.add(q, g, alpha=-lr, out=q_new)
    with torch.enable_grad():
        p_T = tape.params(tape.param_slot(steps, first))
        leaf = [q.detach().clone().requires_grad_(True) for q in _from_internal(p_T)]
        loss = outer_loss(leaf, obs, target, weight)
        lam = _to_internal([g.detach() for g in torch.autograd.grad(loss, leaf)])
    gS, gAT = torch.zeros_like(S), torch.zeros_like(AT)
    for t in range(steps - 1, first - 1, -1):
        k = t - first
        hs = [S, *(h[k] for h in tape.h)]
        hv, rs, raT = _hvp(tape.params(k), hs, tape.yT[k], tape.eT[k], tape.dT[k], [d[k] for d in tape.d], lam, c, L)
        torch._foreach_add_(lam, hv, alpha=-lr)
        gS.add_(rs, alpha=-lr)
        gAT.add_(raT, alpha=-lr)
    return loss.detach(), gS, gAT.T.contiguous()


class _Tape:
    """Preallocated storage for the forward sweep, kept between calls (one at a time, the last shape).

    Slots 0..K-1 hold the K backpropagated steps; activation slot K is scratch for the steps before
    a truncation window; parameter slot K holds theta_T and slots K+1, K+2 alternate before the window.
    """

    _cached: _Tape | None = None

    def __init__(self, params0: Params, n: int, kept: int):
        self.key = _Tape.key_of(params0, n, kept)
        internal = _to_internal(params0)
        dt, dev = params0[0].dtype, params0[0].device
        self.P = [torch.empty(kept + 3, *q.shape, dtype=dt, device=dev) for q in internal]
        widths = [internal[2 * i].shape[1] for i in range(len(internal) // 2 - 1)]
        act = internal[-2].shape[0]
        self.h = [torch.empty(kept + 1, n, w, dtype=dt, device=dev) for w in widths]
        self.d = [torch.empty(kept + 1, n, w, dtype=dt, device=dev) for w in widths]
        self.yT, self.eT, self.dT = (torch.empty(kept + 1, act, n, dtype=dt, device=dev) for _ in range(3))
        self.kept = kept

    @staticmethod
    def key_of(params0: Params, n: int, kept: int) -> tuple:
        return tuple(q.shape for q in params0), params0[0].dtype, params0[0].device, n, kept

    @classmethod
    def get(cls, params0: Params, n: int, kept: int) -> _Tape:
        key = cls.key_of(params0, n, kept)
        if cls._cached is None or cls._cached.key != key:
            cls._cached = None  # free the old one first
            cls._cached = cls(params0, n, kept)
        return cls._cached

    def params(self, slot: int) -> Params:
        return [q[slot] for q in self.P]

    def param_slot(self, t: int, first: int) -> int:
        return t - first if t >= first else self.kept + 1 + t % 2

    def act_slot(self, t: int, first: int) -> int:
        return t - first if t >= first else self.kept


def _to_internal(params: Params) -> Params:
    """[W1, b1, ..., W_L, b_L] with W (in, out) -> the same with the head transposed, W_L^T (out, in)."""
    return [*params[:-2], params[-2].T.contiguous(), params[-1]]


_from_internal = _to_internal  # transposing the head is its own inverse


def _forward_store(
    p: Params, S: Tensor, AT: Tensor, c: float, L: int, tape: _Tape, k: int
) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    """Inputs of every layer [S, h_1, .., h_{L-1}] (post-ReLU), the output y^T = tanh(z_L)^T, the error
    e^T = (y - A)^T and the output delta^T = dL/dz_L^T, all (act_dim, n); written into tape slot k."""
    hs = [S]
    for i in range(L - 1):
        hs.append(torch.relu_(torch.addmm(p[2 * i + 1], hs[-1], p[2 * i], out=tape.h[i][k])))
    yT = torch.tanh_(torch.addmm(p[-1].unsqueeze(1), p[-2], hs[-1].T, out=tape.yT[k]))
    eT = torch.sub(yT, AT, out=tape.eT[k])
    dT = torch.mul(yT, yT, out=tape.dT[k]).neg_().add_(1).mul_(eT).mul_(c)
    return hs, yT, eT, dT


def _relu_grad_(x: Tensor, h: Tensor) -> Tensor:
    """x * relu'(z) in place, given h = relu(z)."""
    return torch.ops.aten.threshold_backward.grad_input(x, h, 0.0, grad_input=x)


def _backward_deltas(p: Params, hs: list[Tensor], dT: Tensor, L: int, tape: _Tape, k: int) -> list[Tensor]:
    """dL/dz_l for the hidden layers l = 1..L-1, each (n, width), written into tape slot k."""
    deltas = [_relu_grad_(torch.mm(dT.T, p[-2], out=tape.d[L - 2][k]), hs[L - 1])]
    for i in range(L - 2, 0, -1):
        deltas.append(_relu_grad_(torch.mm(deltas[-1], p[2 * i].T, out=tape.d[i - 1][k]), hs[i]))
    return deltas[::-1]


def _grads(hs: list[Tensor], deltas: list[Tensor], dT: Tensor) -> Params:
    out: Params = []
    for h, d in zip(hs, deltas):
        out += [h.T @ d, d.sum(0)]
    return out + [dT @ hs[-1], dT.sum(1)]


def _hvp(
    p: Params, hs: list[Tensor], yT: Tensor, eT: Tensor, dT: Tensor, deltas: list[Tensor], v: Params, c: float, L: int
) -> tuple[Params, Tensor, Tensor]:
    """R_v of (grad_theta L, grad_S L, grad_A^T L) at p: the Hessian-vector product H v and the
    mixed terms (d grad_theta L / dS)^T v, (d grad_theta L / dA^T)^T v. Internal layout throughout."""
    # R-forward: tangents of the hidden activations along v (the input S has none)
    r_hs: list[Tensor | None] = [None]
    for i in range(L - 1):
        rz = torch.addmm(v[2 * i + 1], hs[i], v[2 * i])
        if r_hs[-1] is not None:
            rz.addmm_(r_hs[-1], p[2 * i])
        r_hs.append(_relu_grad_(rz, hs[i + 1]))
    last = r_hs[-1]
    assert last is not None  # L >= 2: at least one hidden layer has a tangent
    rzT = torch.addmm(v[-1].unsqueeze(1), v[-2], hs[-1].T).addmm_(p[-2], last.T)
    r_yT = (1 - yT * yT).mul_(rzT)  # (1 - y^2) R z
    r_dT = (1 - yT * yT).sub_(2 * yT * eT).mul_(r_yT).mul_(c)
    hv: Params = [None] * len(p)  # type: ignore[list-item]
    hv[-2] = torch.addmm(r_dT @ hs[-1], dT, last)
    hv[-1] = r_dT.sum(1)
    # R delta of the last hidden layer: (R delta_L W_L^T + delta_L V_L^T) * relu'
    r_d = _relu_grad_(torch.addmm(dT.T @ v[-2], r_dT.T, p[-2]), hs[L - 1])
    for i in range(L - 2, -1, -1):
        d, h, rh = deltas[i], hs[i], r_hs[i]
        gw = h.T @ r_d
        if rh is not None:
            gw.addmm_(rh.T, d)
        hv[2 * i], hv[2 * i + 1] = gw, r_d.sum(0)
        prev = torch.addmm(d @ v[2 * i].T, r_d, p[2 * i].T)
        if i > 0:
            r_d = _relu_grad_(prev, h)
    return hv, prev, -c * r_yT


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


# ------------------------------------------------------------------ Lightning module


class BehaviorDistillation(pl.LightningModule):
    """Holds the synthetic set (parameters ``syn_states`` in normalized space, ``syn_actions``) and
    optimizes it by the outer gradient. Batches are ``(obs, target, weight)`` from
    :class:`obd.datamodule.OBDDataModule`."""

    def __init__(
        self,
        cfg: DistillConfig,
        init_states: Tensor,
        init_actions: Tensor,
        grad_fn: str = "fast",
        outer_steps: int = 50_000,
    ):
        super().__init__()
        self.cfg, self.outer_steps = cfg, outer_steps
        self.automatic_optimization = False
        self.syn_states = nn.Parameter(init_states.clone().float())
        self.syn_actions = nn.Parameter(init_actions.clone().float())
        self.obs_dim, self.act_dim = init_states.shape[1], init_actions.shape[1]
        self.grad_fn = grad_fn
        self._graphed: Any = None  # obd.cuda_graphs.Graphed, made on the first CUDA outer step
        self.save_hyperparameters({"distill": dataclasses.asdict(cfg), "grad_fn": grad_fn, "outer_steps": outer_steps})

    def configure_optimizers(self):
        opt, schedule = outer_optimizer([self.syn_states, self.syn_actions], self.cfg, self.outer_steps)
        if schedule is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def fresh_policy(self, step: int) -> Params:
        """The inner loop's initialization at outer step ``step``: seeded, so a resumed run repeats it."""
        gen = torch.Generator().manual_seed(derive_seed(self.cfg.seed, "inner-init", step))
        # drawn on the CPU (the same init on every device), moved once per outer step
        return [
            q.to(self.syn_states.device)
            for q in init_policy(self.obs_dim, self.act_dim, self.cfg.hidden, gen, self.cfg.init)
        ]

    def outer_gradient(self, obs: Tensor, target: Tensor, weight: Tensor, step: int):
        args = (
            self.syn_states,
            self.syn_actions,
            self.fresh_policy(step),
            obs,
            target,
            weight,
            self.cfg.inner_steps,
            self.cfg.inner_lr,
        )
        if self.cfg.inner_precision == "bfloat16":
            # autocast: the matrix products in bf16 with float32 accumulation, everything else (the
            # inner SGD updates, the synthetic set, its optimizer) in float32; the autograd unroll,
            # because the fast path writes into preallocated float32 buffers
            with torch.autocast(self.syn_states.device.type, dtype=torch.bfloat16):
                loss, gS, gA = outer_grad_unrolled(*args)
            return loss.float(), gS.float(), gA.float()
        if self.grad_fn == "unrolled":
            return outer_grad_unrolled(*args)
        if self.cfg.cuda_graph and self.syn_states.device.type == "cuda":
            if self._graphed is None:
                from obd.cuda_graphs import Graphed

                self._graphed = Graphed(outer_grad_fast, keepalive=lambda: _Tape._cached)
            return self._graphed(*args, truncate=self.cfg.truncate)
        return outer_grad_fast(*args, truncate=self.cfg.truncate)

    def training_step(self, batch, batch_idx):
        obs, target, weight = batch
        opt = self.optimizers()
        assert not isinstance(opt, list)
        loss, gS, gA = self.outer_gradient(obs, target, weight, self.global_step)
        opt.zero_grad()
        self.syn_states.grad, self.syn_actions.grad = gS, gA
        grad_norm = torch.nn.utils.clip_grad_norm_([self.syn_states, self.syn_actions], self.cfg.grad_clip)
        opt.step()
        schedule = self.lr_schedulers()
        if schedule is not None:
            schedule.step()  # type: ignore[union-attr]
        self.log_dict({"outer_loss": loss, "grad_norm": grad_norm}, prog_bar=True, on_step=True)
        return loss

    def synthetic(self) -> tuple[Tensor, Tensor]:
        return self.syn_states.detach().clone(), self.syn_actions.detach().clone()
