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

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from obd.policy import Params, init_policy, policy_forward, stack_params, unstack_params


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
    return (weight * ((policy_forward(params, obs) - target) ** 2).mean(2)).mean(1)


def outer_grad_batched(
    S: Tensor,
    A: Tensor,
    params0: Params,
    obs: Tensor,
    target: Tensor,
    weight: Tensor,
    steps: Tensor,
    lr: Tensor,
    max_steps: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(L_out (K,), dL/dS (K, n, d), dL/dA (K, n, a)) of K independent runs; see the module docstring.
    ``max_steps``: max(steps) when known on the host (then nothing here waits for the device, as a
    CUDA-graph capture requires)."""
    S, A = S.detach(), A.detach()
    L = len(params0) // 2
    n, a = A.shape[1], A.shape[2]
    c = 2.0 / (n * a)
    T = int(steps.max()) if max_steps is None else max_steps
    steps = steps.to(S.device)
    live = torch.arange(T, device=S.device).view(-1, 1) < steps.view(1, -1)  # (T, K): run k still training
    scale = [(lr.to(S.device, S.dtype) * live[t].to(S.dtype)).view(-1, 1, 1) for t in range(T)]
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


def outer_grad_runs(
    S: Tensor,
    A: Tensor,
    params0: Params,
    obs: Tensor,
    target: Tensor,
    weight: Tensor,
    steps: Tensor,
    lr: Tensor,
    engine: str = "auto",
    graphed: Callable[..., tuple[Tensor, ...]] | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The K runs' outer gradients by ``engine``: "bmm" (:func:`outer_grad_batched`, one batched
    computation) or "loop" (each run by the single-run :func:`obd.distill.outer_grad_fast`, whose
    preallocated tape serves every run of the same shape). "auto": bmm on CUDA, where one run cannot
    fill the card; loop on CPU, where a run's 256^3 products already keep the cores busy and the
    batched tensors only add memory traffic (``make bench`` prints both). Same arguments and results.
    ``graphed``: :class:`obd.cuda_graphs.Graphed` of :func:`outer_grad_batched` (bmm on CUDA)."""
    if engine == "auto":
        engine = "bmm" if S.device.type == "cuda" else "loop"
    if engine == "bmm":
        T = int(steps.max())
        if graphed is not None:
            return graphed(S, A, params0, obs, target, weight, steps.to(S.device), lr.to(S.device), T)  # type: ignore[return-value]
        return outer_grad_batched(S, A, params0, obs, target, weight, steps, lr, T)
    if engine != "loop":
        raise ValueError(f"unknown engine {engine!r}; choose auto, bmm or loop")
    from obd.distill import outer_grad_fast

    out = []
    for k in range(S.shape[0]):
        p = unstack_params(params0, k)
        out.append(outer_grad_fast(S[k], A[k], p, obs[k], target[k], weight[k], int(steps[k]), float(lr[k])))
    loss, gS, gA = zip(*out)
    return torch.stack(loss), torch.stack(gS), torch.stack(gA)


# ------------------------------------------------------------------ K runs advanced together


def run_batched(
    cfgs: list, show_progress: bool = True, dtype: torch.dtype = torch.float32, engine: str = "auto"
) -> list[dict]:
    """K distillation runs advanced together (:func:`advance_batched` without listeners); their metrics."""
    done = advance_batched(cfgs, show_progress=show_progress, dtype=dtype, engine=engine)
    for r in done:
        if isinstance(r, BaseException):  # only a listener stops a run; there are none here
            raise r
    return done  # type: ignore[return-value]


def advance_batched(
    cfgs: list,
    listeners: Sequence[Sequence[Callable[[int, float], None]]] | None = None,
    show_progress: bool = True,
    dtype: torch.dtype = torch.float32,
    engine: str = "auto",
) -> list[dict | Exception]:
    """K distillation runs of one dataset advanced in one batched outer iteration per step.

    Each run keeps what :func:`obd.train.run` gives it: its own synthetic set, optimizer (SGD or Adam,
    gradient-norm clip per run), inner-loop inits and outer batches keyed by (seed, step), evaluations
    with the published protocol, ``OUT/checkpoints/batched.pt`` (resumable per run: runs at different
    steps share a batch), ``metrics.json``, ``synthetic.npz`` and, with ``wandb`` on, its own W&B run
    (resumed with the run). Runs may differ in method, seed, inner learning rate, inner steps (masked
    to the maximum), outer optimizer and outer steps; they must share the dataset, the number of
    synthetic pairs, the policy and the real-batch size.

    ``listeners[k]`` are called with (outer step, normalized return) after each of run k's
    evaluations; one that raises stops run k alone: it is dropped from the batch with its checkpoint
    saved, and the exception takes its place in the returned list (an Optuna trial pruned this way
    is reported pruned by :mod:`obd.sweep`). ``engine``: see :func:`outer_grad_runs`.
    """
    import json
    import sys
    import time
    from pathlib import Path

    from tqdm.auto import tqdm

    from obd.config import BASELINE_START, to_dict
    from obd.datamodule import OBDDataModule
    from obd.devices import resolve_device
    from obd.distill import outer_optimizer
    from obd.errors import ConfigError
    from obd.evaluate import evaluate_synthetic, set_change, summarize_history
    from obd.seeding import derive_seed
    from obd.starts import initial_set
    from obd.synthetic_set import save_synthetic
    from obd.targets import prepare_targets
    from obd.tracking import STEP, publish_run, start_run, versions

    if not cfgs:
        return []
    first = cfgs[0]
    shared = (
        "data",
        "distill.n_synthetic",
        "distill.hidden",
        "distill.batch_size",
        "distill.test_batches",
        "distill.init",
        "device",
    )

    def get(cfg, dotted: str):
        for part in dotted.split("."):
            cfg = getattr(cfg, part)
        return cfg

    for c in cfgs[1:]:
        for key in shared:
            if get(c, key) != get(first, key):
                raise ConfigError(f"batched runs must share '{key}': {get(first, key)!r} vs {get(c, key)!r}")
    if any(c.distill.method in BASELINE_START for c in cfgs):
        raise ConfigError("a baseline set has nothing to distil; run it with obd.train")
    device = resolve_device(first.device)
    need = (
        "sdw"
        if any(c.distill.method == "sdw" for c in cfgs)
        else next(m for m in ("avpbc", "pbc", "dbc") if any(c.distill.method == m for c in cfgs))
    )
    if need == "dbc" and any(c.distill.start != "real-pairs" for c in cfgs):
        need = "pbc"  # a teacher-labelled start reads pi*(s)
    t0 = time.time()
    targets = prepare_targets(first, need, show_progress=show_progress)
    task, mean, std = targets.task, targets.mean.numpy(), targets.std.numpy()

    class Run:
        def __init__(self, cfg) -> None:
            self.cfg, self.out = cfg, Path(cfg.out)
            self.out.mkdir(parents=True, exist_ok=True)
            dm = OBDDataModule(
                targets,
                cfg.distill.method,
                cfg.distill.beta,
                cfg.density,
                cfg.distill.batch_size,
                cfg.distill.test_batches,
                cfg.distill.seed,
                device=device,
            )
            self.batches = dm.batches()
            s, a = initial_set(targets, cfg.distill.start, cfg.distill.n_synthetic, cfg.distill.seed)
            self.S = s.to(device, dtype).requires_grad_(True)
            self.A = a.to(device, dtype).requires_grad_(True)
            self.start = (s.float(), a.float())
            self.opt, self.schedule = outer_optimizer([self.S, self.A], cfg.distill, cfg.outer_steps)
            self.evaluation_steps = set(cfg.evaluation_steps())
            self.step, self.history, self.seconds_before = 0, [], 0.0
            self.ckpt = self.out / "checkpoints" / "batched.pt"
            if self.ckpt.is_file():
                st = torch.load(self.ckpt, weights_only=True, map_location=device)
                with torch.no_grad():
                    self.S.copy_(st["S"])
                    self.A.copy_(st["A"])
                self.opt.load_state_dict(st["opt"])
                if self.schedule is not None:
                    self.schedule.load_state_dict(st["schedule"])
                self.step, self.history = int(st["step"]), json.loads(st["history"])
                self.seconds_before = float(st["seconds"])
            self.listeners: list[Callable[[int, float], None]] = []
            self.stopped: Exception | None = None
            self.wandb = self.start_wandb(resume=self.ckpt.is_file()) if cfg.wandb else None

        def start_wandb(self, resume: bool):
            """This run's own W&B run (several live in one process); a resumed run continues its own."""
            id_file = self.out / "wandb-run-id"
            run = start_run(self.cfg, task.name, id_file.read_text().strip() if resume and id_file.is_file() else None)
            id_file.write_text(run.id)
            return run

        def save(self) -> None:
            self.ckpt.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.ckpt.with_name(self.ckpt.name + ".tmp")
            torch.save(
                {
                    "S": self.S.detach(),
                    "A": self.A.detach(),
                    "opt": self.opt.state_dict(),
                    "schedule": self.schedule.state_dict() if self.schedule is not None else {},
                    "step": self.step,
                    "history": json.dumps(self.history),
                    "seconds": self.seconds_before + time.time() - t0,
                },
                tmp,
            )
            tmp.replace(self.ckpt)

        def evaluate(self) -> None:
            if self.history and self.history[-1]["step"] == self.step:
                return
            res = evaluate_synthetic(
                self.S.detach().float(),
                self.A.detach().float(),
                task,
                mean,
                std,
                self.cfg.eval,
                seed=derive_seed(self.cfg.distill.seed, "evaluation", self.step),
            )
            self.history.append({"step": self.step, **res})
            if self.wandb is not None:
                self.wandb.log(
                    {
                        "normalized_return": res["score"],
                        "normalized_return_std_over_policies": res["std_over_policies"],
                        STEP: self.step,
                    }
                )
            for listen in self.listeners:
                try:
                    listen(self.step, res["score"])
                except Exception as e:  # this run stops; the others go on
                    self.stopped = e
                    return

        def finish_wandb(self) -> None:
            if self.wandb is not None:
                self.wandb.finish()
                self.wandb = None

    graphed = None
    if device.type == "cuda" and first.distill.cuda_graph:
        from obd.cuda_graphs import Graphed

        graphed = Graphed(outer_grad_batched)  # recaptured when the batch changes (a run ends or is dropped)
    runs = [Run(c) for c in cfgs]
    for r, ls in zip(runs, listeners or []):
        r.listeners = list(ls)
    active = [r for r in runs if r.step < r.cfg.outer_steps]
    total = sum(r.cfg.outer_steps - r.step for r in active)
    bar = tqdm(total=total, desc=f"{len(runs)} runs, batched", unit="run-step", disable=not show_progress)
    try:
        while active:
            inits = []
            for r in active:
                gen = torch.Generator().manual_seed(derive_seed(r.cfg.distill.seed, "inner-init", r.step))
                inits.append(
                    [
                        q.to(device, dtype)
                        for q in init_policy(task.obs_dim, task.act_dim, r.cfg.distill.hidden, gen, r.cfg.distill.init)
                    ]
                )
            obs, tgt, w = (torch.stack(x).to(dtype) for x in zip(*(r.batches.batch(r.step) for r in active)))
            _, gS, gA = outer_grad_runs(
                torch.stack([r.S.detach() for r in active]),
                torch.stack([r.A.detach() for r in active]),
                stack_params(inits),
                obs,
                tgt,
                w,
                torch.tensor([r.cfg.distill.inner_steps for r in active]),
                torch.tensor([r.cfg.distill.inner_lr for r in active], dtype=dtype),
                engine,
                graphed,
            )
            for k, r in enumerate(active):
                r.opt.zero_grad()
                r.S.grad, r.A.grad = gS[k].clone(), gA[k].clone()
                torch.nn.utils.clip_grad_norm_([r.S, r.A], r.cfg.distill.grad_clip)
                r.opt.step()
                if r.schedule is not None:
                    r.schedule.step()
                r.step += 1
                last = r.step == r.cfg.outer_steps
                if r.step in r.evaluation_steps or last:
                    r.evaluate()
                if r.step % r.cfg.checkpoint_every == 0 or last or r.stopped:
                    r.save()
            bar.update(len(active))
            active = [r for r in active if r.step < r.cfg.outer_steps and not r.stopped]
    finally:
        bar.close()
        if sys.exc_info()[0] is not None:  # interrupted: each run's W&B run ends here, to be resumed later
            for r in runs:
                r.finish_wandb()
    out: list[dict | Exception] = []
    for r in runs:
        if r.stopped:
            r.finish_wandb()
            out.append(r.stopped)
            continue
        r.evaluate()
        c, k = r.cfg, r.cfg.eval.k_for(r.cfg.distill.method)
        save_synthetic(
            r.out / "synthetic.npz",
            r.S.detach().float().cpu(),
            r.A.detach().float().cpu(),
            mean,
            std,
            task.name,
            to_dict(c),
        )
        m = {
            "method": c.distill.method,
            "task": task.name,
            "seed": c.distill.seed,
            "budget": c.budget,
            "outer_steps": c.outer_steps,
            **summarize_history(r.history, k, c.scored_from()),
            "protocol": {
                "policies": c.eval.policies,
                "episodes": c.eval.episodes,
                "last_k": k,
                "ensemble": c.eval.ensemble,
            },
            "history": r.history,
            "set_change": set_change(r.S.detach().float().cpu(), r.A.detach().float().cpu(), *r.start),
            "wall_seconds": round(r.seconds_before + time.time() - t0, 1),
            "engine": "batched",
            **targets.describe(c.distill.method, c.distill.beta, c.density),
            "versions": versions(),
            "config": to_dict(c),
        }
        (r.out / "metrics.json").write_text(json.dumps(m, indent=1, default=str))
        if r.wandb is not None:
            publish_run(r.wandb, m, r.out / "synthetic.npz")
        r.finish_wandb()
        out.append(m)
    return out
