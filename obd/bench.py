"""``make bench``: speed figures of this machine, printed and written to ``bench.json``.

- one outer iteration at the published defaults (256 synthetic pairs, T = 100, 3x256 policy,
  10 x 256 real states), Av-PBC and SDW weights, for the hand-derived BPTT used by training
  (``outer_iter_fast_s``) and the plain autograd unroll kept as the oracle (``outer_iter_ref_s``);
- density weights for 1,000,000 states of dimension 17;
- evaluation rollout throughput on HalfCheetah-v5 with the policy in the loop;
- behaviour-SAC updates per second: ours (batched critic ensemble, fused Adam, foreach target
  update) and a straightforward reference (two critics, Python-loop target updates).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from obd.bptt import PRODUCTS, Workspace, outer_grad, outer_grad_one
from obd.config import DensityConfig
from obd.density import density_weights
from obd.distill import outer_grad_unrolled
from obd.nets import TanhGaussianActor, mlp
from obd.policy import init_policy, policy_forward
from obd.rollout import evaluate_episodes


def _time(fn, repeat: int) -> float:
    """Median wall time of ``repeat`` calls after one warm-up."""
    fn()
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def bench_outer(repeat: int) -> dict:
    g = torch.Generator().manual_seed(0)
    S, A = torch.randn(256, 17, generator=g), torch.rand(256, 6, generator=g) * 2 - 1
    p0 = init_policy(17, 6, (256, 256, 256), g)
    obs, target = torch.randn(2560, 17, generator=g), torch.rand(2560, 6, generator=g) * 2 - 1
    q_w = 0.02 * (300 + 50 * torch.randn(2560, generator=g)).clamp_min(0)
    sdw_w = q_w * torch.from_numpy(np.random.default_rng(0).lognormal(0, 1, 2560).astype(np.float32))
    a, b = torch.randn(256, 256, generator=g), torch.randn(256, 256, generator=g)
    # the exact gradient's FLOP floor: 18 products of 256^3 per inner step, nothing else
    out = {"gemm_floor_s": _time(lambda: [torch.mm(a, b) for _ in range(18 * 100)], repeat)}
    ws = Workspace()
    for name, w in (("avpbc", q_w), ("sdw", sdw_w)):
        # interleaved, so that drifts in this VM's speed hit both paths alike
        fast, ref = _time_pair(
            lambda w=w: outer_grad_one(S, A, p0, obs, target, w, 100, 0.1, workspace=ws),
            lambda w=w: outer_grad_unrolled(S, A, p0, obs, target, w, 100, 0.1),
            repeat,
        )
        out[f"{name}_fast_s"], out[f"{name}_ref_s"] = fast, ref

    ws16 = Workspace()

    def bf16():  # distill.inner_precision: bfloat16 (the kernel's products in bf16)
        return outer_grad_one(S, A, p0, obs, target, q_w, 100, 0.1, workspace=ws16, products=torch.bfloat16)

    def bf16_autocast():  # the same products under torch.autocast, through the autograd unroll
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return outer_grad_unrolled(S, A, p0, obs, target, q_w, 100, 0.1)

    out["avpbc_bf16_s"], out["avpbc_bf16_autocast_s"] = _time_pair(bf16, bf16_autocast, repeat)
    a16, b16 = a.bfloat16(), b.bfloat16()
    out["gemm_floor_bf16_s"] = _time(lambda: [torch.mm(a16, b16) for _ in range(18 * 100)], repeat)
    exact = outer_grad_one(
        S.double(), A.double(), [q.double() for q in p0], obs.double(), target.double(), q_w.double(), 100, 0.1
    )
    for name, got in (("fp32", outer_grad_one(S, A, p0, obs, target, q_w, 100, 0.1, workspace=ws)), ("bf16", bf16())):
        out[f"{name}_grad_rel_err"] = float((got[1].double() - exact[1]).norm() / exact[1].norm())
    return out


def _time_pair(f, g, repeat: int) -> tuple[float, float]:
    """Median wall times of f and g, called alternately ``repeat`` times each after a warm-up."""
    f(), g()
    tf: list[float] = []
    tg: list[float] = []
    for _ in range(repeat):
        for fn, ts in ((f, tf), (g, tg)):
            t = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t)
    return float(np.median(tf)), float(np.median(tg))


def bench_rollout(episodes: int = 8) -> float:
    g = torch.Generator().manual_seed(0)
    p = init_policy(17, 6, (256, 256, 256), g)

    @torch.no_grad()
    def act(o):
        return policy_forward(p, torch.from_numpy(o)).numpy()

    t = time.perf_counter()
    evaluate_episodes("HalfCheetah-v5", act, episodes, seed=0)  # halfcheetah episodes are 1000 steps
    return episodes * 1000 / (time.perf_counter() - t)


class _PlainSAC:
    """Straightforward SAC update: two separate critics, a Python loop for the target update."""

    def __init__(self, obs_dim: int, act_dim: int):
        self.actor = TanhGaussianActor(obs_dim, act_dim)
        self.q1, self.q2 = mlp(obs_dim + act_dim, 1, (256, 256)), mlp(obs_dim + act_dim, 1, (256, 256))
        self.t1, self.t2 = copy.deepcopy(self.q1), copy.deepcopy(self.q2)
        self.log_alpha = nn.Parameter(torch.zeros(()))
        self.a_opt = torch.optim.Adam(self.actor.parameters(), lr=3e-4)
        self.q_opt = torch.optim.Adam([*self.q1.parameters(), *self.q2.parameters()], lr=3e-4)
        self.al_opt = torch.optim.Adam([self.log_alpha], lr=3e-4)

    def update(self, o, a, r, o2, nd):
        alpha = self.log_alpha.exp().detach()
        with torch.no_grad():
            a2, lp2 = self.actor.sample(o2)
            x2 = torch.cat([o2, a2], 1)
            y = r + 0.99 * nd * (torch.min(self.t1(x2), self.t2(x2)).squeeze(1) - alpha * lp2)
        x = torch.cat([o, a], 1)
        q_loss = ((self.q1(x).squeeze(1) - y) ** 2).mean() + ((self.q2(x).squeeze(1) - y) ** 2).mean()
        self.q_opt.zero_grad()
        q_loss.backward()
        self.q_opt.step()
        pi, lp = self.actor.sample(o)
        xp = torch.cat([o, pi], 1)
        a_loss = (alpha * lp - torch.min(self.q1(xp), self.q2(xp)).squeeze(1)).mean()
        self.a_opt.zero_grad()
        a_loss.backward()
        self.a_opt.step()
        al_loss = -(self.log_alpha * (lp.detach() - 6)).mean()
        self.al_opt.zero_grad()
        al_loss.backward()
        self.al_opt.step()
        with torch.no_grad():
            for net, tgt in ((self.q1, self.t1), (self.q2, self.t2)):
                for p, tp in zip(net.parameters(), tgt.parameters()):
                    tp.data.mul_(0.995).add_(0.005 * p.data)


def bench_sac(n: int) -> tuple[float, float]:
    from obd.behavior.sac import SAC, SACConfig

    g = torch.Generator().manual_seed(0)
    batch = (
        torch.randn(256, 17, generator=g),
        torch.rand(256, 6, generator=g) * 2 - 1,
        torch.randn(256, generator=g),
        torch.randn(256, 17, generator=g),
        torch.ones(256),
    )
    ours, plain = SAC(17, 6, SACConfig()), _PlainSAC(17, 6)
    res = []
    for agent in (ours, plain):
        for _ in range(10):
            agent.update(*batch)
        t = time.perf_counter()
        for _ in range(n):
            agent.update(*batch)
        res.append(n / (time.perf_counter() - t))
    return res[0], res[1]


def _published_batch(device: torch.device, k: int) -> tuple:
    """K runs' inputs at the published sizes (256 pairs, 3x256 policy, T = 100, 10 x 256 real states)."""
    from obd.policy import stack_params

    g = torch.Generator().manual_seed(0)
    S = torch.randn(k, 256, 17, generator=g).to(device)
    A = (torch.rand(k, 256, 6, generator=g) * 2 - 1).to(device)
    p0 = [q.to(device) for q in stack_params([init_policy(17, 6, (256, 256, 256), g) for _ in range(k)])]
    obs, tgt = torch.randn(k, 2560, 17, generator=g).to(device), torch.rand(k, 2560, 6, generator=g).to(device)
    w = torch.rand(k, 2560, generator=g).to(device)
    return S, A, p0, obs, tgt, w, (100,) * k, (0.1,) * k


def bench_runs(device: torch.device, ks: tuple[int, ...] = (1, 8), repeat: int = 2, graph: bool = True) -> dict:
    """Seconds per run per outer iteration (published sizes) when K runs advance together through the one
    BPTT kernel as the engine calls it (its workspace kept; on CUDA captured as a graph unless ``graph``
    is False), with float32 products (key "K") and bf16 products (key "K-bf16")."""
    out: dict[str, float] = {}
    for k in ks:
        args = _published_batch(device, k)
        for precision, products in PRODUCTS.items():
            ws = Workspace()
            fn: Any = outer_grad
            if graph and device.type == "cuda":
                from obd.cuda_graphs import Graphed

                fn = Graphed(outer_grad, keepalive=lambda: ws)  # noqa: B023 (used within this iteration)

            def step(args: tuple = args, fn: Any = fn, ws: Workspace = ws, products: Any = products) -> None:
                fn(*args, workspace=ws, products=products)
                if device.type == "cuda":
                    torch.cuda.synchronize()

            key = str(k) if products is None else f"{k}-bf16"
            out[key] = _time(step, max(1, repeat if k < 32 else 1)) / k
            how = "graph" if fn is not outer_grad else "eager"
            print(
                f"  K = {k:>2} runs together on {device.type} ({how}, {precision} products): {out[key]:.3f} s per "
                "run per outer iteration"
            )
    return out


def bench_help() -> float:
    """Wall time of ``python -m obd.train --help`` in a fresh interpreter (median of 3)."""
    import subprocess
    import sys

    ts = []
    for _ in range(3):
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "obd.train", "--help"], capture_output=True, check=True)
        ts.append(time.perf_counter() - t)
    return float(np.median(ts))


def bench_eval_training(repeat: int) -> tuple[float, float]:
    """Training the 10 evaluation policies (published learner, 256 pairs): batched vs one at a time."""
    from obd.config import EvalConfig
    from obd.evaluate import init_stacked, train_stacked

    g = torch.Generator().manual_seed(0)
    S, A = torch.randn(256, 17, generator=g), torch.rand(256, 6, generator=g) * 2 - 1
    cfg = EvalConfig()
    p10 = init_stacked(10, 17, 6, cfg, 0)
    singles = [[q[m : m + 1] for q in p10] for m in range(10)]
    return _time_pair(
        lambda: train_stacked(p10, S, A, cfg),
        lambda: [train_stacked(p, S, A, cfg) for p in singles],
        max(1, repeat // 2),
    )


CELL_CONFIG = {
    "outer_steps": 60,
    "eval_every": 30,
    "checkpoint_every": 5,
    "data": {"size": 5000},
    "teacher": {"td3bc": {"steps": 200, "hidden": [32, 32]}, "eval_episodes": 1},
    "distill": {"n_synthetic": 32, "inner_steps": 10, "hidden": [64, 64]},
    "eval": {"policies": 2, "episodes": 2, "inner_steps": 10, "hidden": [64, 64]},
}


def bench_cells(workers: tuple[int, ...], seeds: int = 8) -> dict[str, float]:
    """Table cells per minute with W processes sharing one storage (SQLite here; the same code path as
    PostgreSQL on loopback): hopper-random x {Av-PBC, SDW} x ``seeds`` at a tiny config, the data and
    teacher built once beforehand; W = 1 is the main process alone."""
    import subprocess
    import sys
    import tempfile

    import yaml

    tmp = Path(tempfile.mkdtemp(prefix="obd-bench-cells-"))
    (tmp / "cell.yaml").write_text(yaml.safe_dump(CELL_CONFIG))
    env = {**os.environ, "OBD_DATA_DIR": str(tmp / "data"), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    common = ["--tasks", "hopper-random", "--methods", "avpbc,sdw", "--budget", "smoke", "--config"]
    common += [str(tmp / "cell.yaml"), "--threads", "1"]
    warm = [sys.executable, "-m", "obd.table", *common, "--seeds", "99", "--out", str(tmp / "warm")]
    subprocess.run(warm, env=env, check=True, capture_output=True)  # data, teacher and density, once
    out: dict[str, float] = {}
    for w in workers:
        db = f"sqlite:///{tmp / f'w{w}.db'}"
        args = [sys.executable, "-m", "obd.table", *common, "--seeds", f"0-{seeds - 1}", "--storage", db]
        args += ["--out", str(tmp / f"w{w}")]
        t = time.perf_counter()
        main = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        extra = [
            subprocess.Popen([*args, "--worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for _ in range(w - 1)
        ]
        _, err = main.communicate()
        for e in extra:
            e.wait()
        if main.returncode != 0:
            raise RuntimeError(f"table with {w} workers failed: {err[-500:]}")
        out[str(w)] = 2 * seeds / ((time.perf_counter() - t) / 60)
        print(f"table cells per minute with {w} process(es) on one storage: {out[str(w)]:.1f}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m obd.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--density-n", type=int, default=1_000_000)
    p.add_argument("--sac-updates", type=int, default=300)
    p.add_argument("--out", default="bench.json")
    p.add_argument(
        "--device",
        default="auto",
        choices=("auto", "cpu", "cuda"),
        help="auto: every available device (cpu, and cuda when present)",
    )
    p.add_argument("--runs-k", default="1,8", help="run counts K for the K-runs figures (default 1,8)")
    p.add_argument("--cells-workers", default="1,2,4", help="process counts for the table-cells figure (default 1,2,4)")
    p.add_argument("--only", choices=("runs", "cells"), help="only the K-runs figures, or only the table-cells figure")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    ks = tuple(int(k) for k in a.runs_k.split(","))
    if a.only:
        from obd.devices import resolve_device

        only: dict = (
            {"outer_iter_per_run_s": {"cpu": bench_runs(resolve_device("cpu"), ks, a.repeat)}}
            if a.only == "runs"
            else {"table_cells_per_minute": bench_cells(tuple(int(w) for w in a.cells_workers.split(",")))}
        )
        Path(a.out).write_text(json.dumps(only, indent=1))
        print(f"wrote {a.out}")
        return 0
    machine = (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{a.threads} threads"
    )
    print(f"machine: {machine}", flush=True)
    outer = bench_outer(a.repeat)
    print(
        f"outer iteration (published defaults), Av-PBC: fast {outer['avpbc_fast_s']:.3f} s, "
        f"reference {outer['avpbc_ref_s']:.3f} s",
        flush=True,
    )
    print(
        f"outer iteration (published defaults), SDW:    fast {outer['sdw_fast_s']:.3f} s, "
        f"reference {outer['sdw_ref_s']:.3f} s",
        flush=True,
    )
    print(f"  floor: the 1,800 matrix products of 256^3 alone take {outer['gemm_floor_s']:.3f} s", flush=True)
    print(
        f"  bf16 inner products (distill.inner_precision bfloat16): {outer['avpbc_bf16_s']:.3f} s "
        f"(autocast through the autograd unroll: {outer['avpbc_bf16_autocast_s']:.3f} s; bf16 products alone: "
        f"{outer['gemm_floor_bf16_s']:.3f} s); relative error of dL/dS against float64: float32 "
        f"{outer['fp32_grad_rel_err']:.3f}, bf16 {outer['bf16_grad_rel_err']:.3f}",
        flush=True,
    )
    x = np.random.default_rng(0).standard_normal((a.density_n, 17)).astype(np.float32)
    t = time.perf_counter()
    density_weights(x, DensityConfig())
    dens = time.perf_counter() - t
    print(f"density weights, {a.density_n:,} states x 17: {dens:.1f} s", flush=True)
    rollout = bench_rollout()
    print(f"evaluation rollout, HalfCheetah-v5, policy in the loop: {rollout:,.0f} env steps/s", flush=True)
    devices = (
        ["cpu", "cuda"]
        if a.device == "auto" and torch.cuda.is_available()
        else (["cpu"] if a.device == "auto" else [a.device])
    )
    from obd.devices import resolve_device

    per_run = {d: bench_runs(resolve_device(d), ks, a.repeat) for d in devices}
    eager_cuda = bench_runs(resolve_device("cuda"), ks, a.repeat, graph=False) if "cuda" in devices else None
    ev_b, ev_s = bench_eval_training(a.repeat)
    print(
        f"evaluation learner, 10 policies x 100 SGD steps: batched {ev_b:.2f} s, one at a time {ev_s:.2f} s", flush=True
    )
    help_s = bench_help()
    print(f"`python -m obd.train --help`: {help_s:.2f} s", flush=True)
    cells = bench_cells(tuple(int(w) for w in a.cells_workers.split(",")))
    sac, sac_ref = bench_sac(a.sac_updates)
    print(f"behaviour SAC updates/s ({a.threads} threads): ours {sac:.0f}, straightforward {sac_ref:.0f}", flush=True)
    res = {
        "machine": machine,
        "outer_iter_fast_s": outer["avpbc_fast_s"],
        "outer_iter_ref_s": outer["avpbc_ref_s"],
        "outer_iter_speedup": outer["avpbc_ref_s"] / outer["avpbc_fast_s"],
        "outer_iter_sdw_fast_s": outer["sdw_fast_s"],
        "outer_iter_sdw_ref_s": outer["sdw_ref_s"],
        "outer_iter_gemm_floor_s": outer["gemm_floor_s"],
        "outer_iter_bf16_s": outer["avpbc_bf16_s"],
        "outer_iter_bf16_autocast_s": outer["avpbc_bf16_autocast_s"],
        "gemm_floor_bf16_s": outer["gemm_floor_bf16_s"],
        "outer_grad_rel_err": {"float32": outer["fp32_grad_rel_err"], "bfloat16": outer["bf16_grad_rel_err"]},
        "density_1m_s": dens,
        "density_n": a.density_n,
        "rollout_steps_per_s": rollout,
        "sac_updates_per_s": sac,
        "sac_reference_updates_per_s": sac_ref,
        "outer_iter_per_run_s": per_run,
        **({"outer_iter_per_run_cuda_eager_s": eager_cuda} if eager_cuda else {}),
        "eval_train_10_batched_s": ev_b,
        "eval_train_10_sequential_s": ev_s,
        "train_help_s": help_s,
        "table_cells_per_minute": cells,
    }
    print(f"outer iteration speed-up, fast / reference: {res['outer_iter_speedup']:.2f}x")
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    from obd.errors import cli

    raise SystemExit(cli(main))
