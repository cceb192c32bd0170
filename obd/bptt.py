"""The outer gradient of K distillation runs by hand-derived reverse-mode BPTT (one run is K = 1).

Run k has its synthetic set (S_k, A_k), inner-loop initialization, real batch and weights, inner
learning rate lr_k, inner steps T_k and truncation window W_k. The K inner loops run together as
batched products over a leading run dimension; a run whose T_k < T = max T_k is frozen after T_k
steps (its update is scaled by 0), so each run gets exactly the gradient it gets alone (tested in
float64 against the autograd unroll :func:`obd.distill.outer_grad_unrolled`).

The forward sweep runs the inner SGD by explicit backprop and keeps, per step, the weights,
post-ReLU activations h_l and backpropagated errors delta_l (ReLU masks are recovered from h).
Walking back, the vector-Jacobian product of one SGD step with cotangent lam is a Hessian-vector
product: an R-operator (Pearlmutter) forward pass along lam and an R-backward pass reusing the stored
h and delta, which also yields the synthetic-state and -action terms. 18 matrix products of
n x hidden x hidden per inner step, the FLOP count of an exact gradient, no autograd graph:
- the tape lives in a :class:`Workspace` the caller keeps between calls, because first-touching
  ~2 MB of fresh memory per inner step (page faults) costs as much as a third of the products;
- the output layer is kept transposed, (K, act_dim, hidden): the skinny products with 6 columns
  are several times faster in that layout.

Shapes: S (K, n, d), A (K, n, a), params0 as :func:`obd.policy.stack_params` [W_1 (K, d, h),
b_1 (K, 1, h), ..., W_L (K, h, a), b_L (K, 1, a)], obs (K, B, d), target (K, B, a), weight (K, B);
steps, lr and truncate are per-run Python sequences (constants of a CUDA graph). Everything stays on
the inputs' device.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from obd.policy import Params, policy_forward


def outer_loss(params: Params, obs: Tensor, target: Tensor, weight: Tensor) -> Tensor:
    """Per-run outer loss (K,): mean_i w_i * mean_j (tanh(f(s_i)) - y_i)_j^2."""
    return (weight * ((policy_forward(params, obs) - target) ** 2).mean(2)).mean(1)


# DistillConfig.inner_precision -> the kernel's ``products`` dtype (None: the tape's own)
PRODUCTS: dict[str, torch.dtype | None] = {"float32": None, "bfloat16": torch.bfloat16}


class Workspace:
    """Preallocated tape of the forward sweep, reused by every call of the same shape (the last shape
    only). Step slots 0..kept-1 hold the backpropagated steps; activation slot ``kept`` is scratch for
    the steps before the truncation window; parameter slot ``kept`` holds theta_T, and slots kept+1,
    kept+2 alternate before the window."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.P: list[Tensor] = []
        self.h: list[Tensor] = []
        self.d: list[Tensor] = []
        self.yT = self.eT = self.dT = torch.empty(0)
        self.kept = 0
        self._scales_key: tuple | None = None
        self._scales: tuple[Tensor, Tensor] | None = None

    def prepare(self, internal: Params, n: int, kept: int, low: torch.dtype | None = None) -> None:
        """``low``: the dtype of the hidden layers' activations and errors (bf16 products), else the
        parameters' dtype."""
        key = (tuple(q.shape for q in internal), internal[0].dtype, internal[0].device, n, kept, low)
        if key == self.key:
            return
        self.key, self.P, self.h, self.d = None, [], [], []  # free the old tape first
        K, dt, dev = internal[0].shape[0], internal[0].dtype, internal[0].device
        self.P = [torch.empty(kept + 3, *q.shape, dtype=dt, device=dev) for q in internal]
        widths = [internal[2 * i].shape[2] for i in range(len(internal) // 2 - 1)]
        act = internal[-2].shape[1]
        self.h = [torch.empty(kept + 1, K, n, w, dtype=low or dt, device=dev) for w in widths]
        self.d = [torch.empty(kept + 1, K, n, w, dtype=low or dt, device=dev) for w in widths]
        self.yT, self.eT, self.dT = (torch.empty(kept + 1, K, act, n, dtype=dt, device=dev) for _ in range(3))
        self.kept, self.key, self._scales_key = kept, key, None

    def scales(self, steps: Sequence[int], lr: Sequence[float], windows: Sequence[int]) -> tuple[Tensor, Tensor]:
        """Per inner step t and run k, minus the update scale (T, K, 1, 1): forward, lr_k while t < T_k;
        backward, lr_k inside the run's window. Cached, so that a CUDA-graph capture copies nothing."""
        key = (tuple(steps), tuple(lr), tuple(windows))
        if key != self._scales_key:
            K, T = len(steps), max(steps)
            fwd = [[-lr[k] if t < steps[k] else 0.0 for k in range(K)] for t in range(T)]
            bwd = [[-lr[k] if steps[k] - windows[k] <= t < steps[k] else 0.0 for k in range(K)] for t in range(T)]
            dt, dev = self.P[0].dtype, self.P[0].device
            f, b = (torch.tensor(x, dtype=dt, device=dev).view(T, K, 1, 1) for x in (fwd, bwd))
            self._scales = (f, b)
            self._scales_key = key
        return self._scales  # type: ignore[return-value]

    def params(self, slot: int) -> Params:
        return [q[slot] for q in self.P]

    def param_slot(self, t: int, first: int) -> int:
        return t - first if t >= first else self.kept + 1 + t % 2

    def act_slot(self, t: int, first: int) -> int:
        return t - first if t >= first else self.kept


class Products:
    """The kernel's batched matrix products: in the tape's dtype, or (``low`` = torch.bfloat16) on bf16
    copies of both factors with float32 accumulation, each product rounded to bf16 (as under
    ``torch.autocast``) and added into the float32 tape. Everything else (the inner SGD updates, the
    tape, the outer loss) stays in the tape's dtype. A factor used by several products is converted
    once until :meth:`clear` (called per inner step); the cache holds its source, so no other tensor
    can take its address meanwhile."""

    def __init__(self, low: torch.dtype | None = None):
        self.low = low
        self.cache: dict[tuple, tuple[Tensor, Tensor]] = {}

    def clear(self) -> None:
        self.cache.clear()

    def _low(self, x: Tensor) -> Tensor:
        if self.low is None or x.dtype == self.low:
            return x
        transposed = not x.is_contiguous() and x.transpose(1, 2).is_contiguous()
        base = x.transpose(1, 2) if transposed else x
        key = (base.data_ptr(), base._version, tuple(base.shape), base.stride())
        hit = self.cache.get(key)
        if hit is None:
            hit = self.cache[key] = (base, base.to(self.low))
        return hit[1].transpose(1, 2) if transposed else hit[1]

    def _direct(self, out: Tensor | None) -> bool:
        """Whether the product can be written straight into ``out`` (its dtype is the products')."""
        return self.low is None or out is None or out.dtype == self.low

    def bmm(self, a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
        if self._direct(out):
            return torch.bmm(self._low(a), self._low(b), out=out)
        return out.copy_(torch.bmm(self._low(a), self._low(b)))  # type: ignore[union-attr]

    def baddbmm(self, c: Tensor, a: Tensor, b: Tensor, out: Tensor | None = None) -> Tensor:
        """c + a @ b (c broadcast like torch.baddbmm's input)."""
        if self._direct(out):
            return torch.baddbmm(self._low(c), self._low(a), self._low(b), out=out)
        return torch.add(c, torch.bmm(self._low(a), self._low(b)), out=out)

    def baddbmm_(self, x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        """x += a @ b in place."""
        if self._direct(x):
            return x.baddbmm_(self._low(a), self._low(b))
        return x.add_(torch.bmm(self._low(a), self._low(b)))


def outer_grad(
    S: Tensor,
    A: Tensor,
    params0: Params,
    obs: Tensor,
    target: Tensor,
    weight: Tensor,
    steps: Sequence[int],
    lr: Sequence[float],
    truncate: Sequence[int | None] | None = None,
    workspace: Workspace | None = None,
    products: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(L_out (K,), dL/dS (K, n, d), dL/dA (K, n, a)) of K runs; see the module docstring.

    ``truncate[k]``: backpropagate run k through its last ``truncate[k]`` inner steps only (None: all,
    the exact gradient). ``workspace``: the tape to reuse (a fresh one when None). ``products``:
    torch.bfloat16 for bf16 matrix products (:class:`Products`), None for the tape's dtype."""
    S, A = S.detach(), A.detach()
    K, n, a = A.shape
    L = len(params0) // 2
    mm = Products(products)
    assert L >= 2, "the policy needs at least one hidden layer"
    assert len(steps) == len(lr) == K, "one inner-step count and learning rate per run"
    windows = [int(s) if w is None else min(int(s), int(w)) for s, w in zip(steps, truncate or [None] * K)]
    c = 2.0 / (n * a)
    T = max(steps)
    first = min(s - w for s, w in zip(steps, windows))  # the earliest step any run backpropagates through
    ws = workspace if workspace is not None else Workspace()
    p0 = _to_internal([q.detach() for q in params0])
    ws.prepare(p0, n, T - first, products)
    fscale, bscale = ws.scales(steps, lr, windows)
    AT = A.transpose(1, 2).contiguous()
    for q, src in zip(ws.params(ws.param_slot(0, first)), p0):
        q.copy_(src)
    for t in range(T):
        mm.clear()
        k = ws.act_slot(t, first)
        p = ws.params(ws.param_slot(t, first))
        hs, _, _, dT = _forward_store(p, S, AT, c, L, ws, k, mm)
        deltas = _backward_deltas(p, hs, dT, L, ws, k, mm)
        for q_new, q, g in zip(ws.params(ws.param_slot(t + 1, first)), p, _grads(hs, deltas, dT, mm)):
            torch.addcmul(q, g, fscale[t], out=q_new)
    with torch.enable_grad():
        p_T = ws.params(ws.param_slot(T, first))
        leaf = [q.detach().clone().requires_grad_(True) for q in _from_internal(p_T)]
        losses = outer_loss(leaf, obs, target, weight)
        lam = _to_internal([g.detach() for g in torch.autograd.grad(losses.sum(), leaf)])  # runs are separate
    gS, gAT = torch.zeros_like(S), torch.zeros_like(AT)
    for t in range(T - 1, first - 1, -1):
        mm.clear()
        k = t - first
        hs = [S, *(h[k] for h in ws.h)]
        hv, rs, raT = _hvp(ws.params(k), hs, ws.yT[k], ws.eT[k], ws.dT[k], [d[k] for d in ws.d], lam, c, L, mm)
        torch._foreach_addcmul_(lam, hv, [bscale[t]] * len(lam))
        gS.addcmul_(rs, bscale[t])
        gAT.addcmul_(raT, bscale[t])
    return losses.detach(), gS, gAT.transpose(1, 2).contiguous()


def outer_grad_one(
    S: Tensor,
    A: Tensor,
    params0: Params,
    obs: Tensor,
    target: Tensor,
    weight: Tensor,
    steps: int,
    lr: float,
    truncate: int | None = None,
    workspace: Workspace | None = None,
    products: torch.dtype | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """One run (K = 1) in the single-run shapes: S (n, d), params0 [W (in, out), b (out,), ...], obs (B, d)."""
    p = [q.unsqueeze(0) if i % 2 == 0 else q.view(1, 1, -1) for i, q in enumerate(params0)]
    loss, gS, gA = outer_grad(
        S[None], A[None], p, obs[None], target[None], weight[None], (steps,), (lr,), (truncate,), workspace, products
    )
    return loss[0], gS[0], gA[0]


def _to_internal(params: Params) -> Params:
    """Stacked [W_1, b_1, ..., W_L (K, h, a), b_L (K, 1, a)] -> the head transposed: W_L^T (K, a, h),
    b_L^T (K, a, 1). Its own inverse."""
    return [*params[:-2], params[-2].transpose(1, 2).contiguous(), params[-1].transpose(1, 2).contiguous()]


_from_internal = _to_internal


def _forward_store(
    p: Params, S: Tensor, AT: Tensor, c: float, L: int, ws: Workspace, k: int, mm: Products
) -> tuple[list[Tensor], Tensor, Tensor, Tensor]:
    """Inputs of every layer [S, h_1, .., h_{L-1}] (post-ReLU), the output y^T = tanh(z_L)^T, the error
    e^T = (y - A)^T and the output delta^T = dL/dz_L^T, the last three (K, act_dim, n); into slot k."""
    hs = [S]
    for i in range(L - 1):
        hs.append(torch.relu_(mm.baddbmm(p[2 * i + 1], hs[-1], p[2 * i], out=ws.h[i][k])))
    yT = torch.tanh_(mm.baddbmm(p[-1], p[-2], hs[-1].transpose(1, 2), out=ws.yT[k]))
    eT = torch.sub(yT, AT, out=ws.eT[k])
    dT = torch.mul(yT, yT, out=ws.dT[k]).neg_().add_(1).mul_(eT).mul_(c)
    return hs, yT, eT, dT


def _relu_grad_(x: Tensor, h: Tensor) -> Tensor:
    """x * relu'(z) in place, given h = relu(z)."""
    return torch.ops.aten.threshold_backward.grad_input(x, h, 0.0, grad_input=x)


def _backward_deltas(
    p: Params, hs: list[Tensor], dT: Tensor, L: int, ws: Workspace, k: int, mm: Products
) -> list[Tensor]:
    """dL/dz_l for the hidden layers l = 1..L-1, each (K, n, width), into slot k."""
    deltas = [_relu_grad_(mm.bmm(dT.transpose(1, 2), p[-2], out=ws.d[L - 2][k]), hs[L - 1])]
    for i in range(L - 2, 0, -1):
        deltas.append(_relu_grad_(mm.bmm(deltas[-1], p[2 * i].transpose(1, 2), out=ws.d[i - 1][k]), hs[i]))
    return deltas[::-1]


def _grads(hs: list[Tensor], deltas: list[Tensor], dT: Tensor, mm: Products) -> Params:
    out: Params = []
    for h, d in zip(hs, deltas):
        out += [mm.bmm(h.transpose(1, 2), d), d.sum(1, keepdim=True)]
    return out + [mm.bmm(dT, hs[-1]), dT.sum(2, keepdim=True)]


def _hvp(
    p: Params,
    hs: list[Tensor],
    yT: Tensor,
    eT: Tensor,
    dT: Tensor,
    deltas: list[Tensor],
    v: Params,
    c: float,
    L: int,
    mm: Products,
) -> tuple[Params, Tensor, Tensor]:
    """R_v of (grad_theta L, grad_S L, grad_A^T L) at p: the Hessian-vector product H v and the
    mixed terms (d grad_theta L / dS)^T v, (d grad_theta L / dA^T)^T v, per run; internal layout."""
    tr = lambda x: x.transpose(1, 2)  # noqa: E731
    # R-forward: tangents of the hidden activations along v (the input S has none)
    r_hs: list[Tensor | None] = [None]
    for i in range(L - 1):
        rz = mm.baddbmm(v[2 * i + 1], hs[i], v[2 * i])
        prev_r = r_hs[-1]
        if prev_r is not None:
            mm.baddbmm_(rz, prev_r, p[2 * i])
        r_hs.append(_relu_grad_(rz, hs[i + 1]))
    last = r_hs[-1]
    assert last is not None  # L >= 2: at least one hidden layer has a tangent
    rzT = mm.baddbmm_(mm.baddbmm(v[-1], v[-2], tr(hs[-1])), p[-2], tr(last))
    r_yT = (1 - yT * yT).mul_(rzT)  # (1 - y^2) R z
    r_dT = (1 - yT * yT).sub_(2 * yT * eT).mul_(r_yT).mul_(c)
    hv: list[Tensor | None] = [None] * len(p)
    hv[-2] = mm.baddbmm(mm.bmm(r_dT, hs[-1]), dT, last)
    hv[-1] = r_dT.sum(2, keepdim=True)
    # R delta of the last hidden layer: (R delta_L W_L^T + delta_L V_L^T) * relu'
    r_d = _relu_grad_(mm.baddbmm(mm.bmm(tr(dT), v[-2]), tr(r_dT), p[-2]), hs[L - 1])
    prev = r_d
    for i in range(L - 2, -1, -1):
        d, h, rh = deltas[i], hs[i], r_hs[i]
        gw = mm.bmm(tr(h), r_d)
        if rh is not None:
            mm.baddbmm_(gw, tr(rh), d)
        hv[2 * i], hv[2 * i + 1] = gw, r_d.sum(1, keepdim=True)
        prev = mm.baddbmm(mm.bmm(d, tr(v[2 * i])), r_d, tr(p[2 * i]))
        if i > 0:
            r_d = _relu_grad_(prev, h)
    return [q for q in hv if q is not None], prev, -c * r_yT
