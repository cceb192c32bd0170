"""The distillation engine: K >= 1 runs on one dataset advanced together, hosted by Lightning.

``obd.train`` is K = 1; a sweep's trial batches, its finals and the table's cells are K >= 1. Per
outer iteration, one :func:`obd.bptt.outer_grad` call computes every active run's outer gradient;
each run then takes its own optimizer step (SGD or Adam, gradient-norm clip, learning-rate schedule).
A run keeps everything it would have alone: its synthetic set, inner-loop inits and outer batches
keyed by (seed, step), its evaluations (published protocol), and in its own folder ``OUT``:

- ``checkpoints/state.pt``: the run's state every ``checkpoint_every`` steps, when it stops and at
  its end; a run resumes from it whatever runs it shares the engine with (runs at different steps
  advance together, each with its own batches);
- ``config.yaml``, ``run.json`` (what the run is, checked on resume), ``synthetic.npz``,
  ``metrics.json`` (every evaluation, the scored last-K mean, config, seed, versions, data hash),
  ``logs/csv/metrics.csv`` and, with ``wandb`` on, its own W&B run (resumed with the run).

Runs may differ in method, seed, inner learning rate and steps, outer optimizer and outer steps; they
share the dataset, the number of synthetic pairs, the policy and the real-batch size. A listener of a
run that raises stops that run alone (an Optuna trial pruned so): it leaves the batch with its state
saved, and the exception takes its place in the returned list. A baseline method (``random``,
``random-teacher``, ``kmeans-teacher``) has nothing to distil: its start is evaluated once, at step 0.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from obd.bptt import PRODUCTS, Workspace, outer_grad
from obd.config import BASELINE_START, DistillConfig, RunConfig, to_dict
from obd.errors import ConfigError, ObdError, check_writable
from obd.policy import Params, init_policy, stack_params
from obd.runs import CHECKPOINT
from obd.seeding import derive_seed

if TYPE_CHECKING:
    from obd.datamodule import OBDDataModule
    from obd.targets import Targets

log = logging.getLogger("obd.engine")

SHARED = ("data", "distill.n_synthetic", "distill.hidden", "distill.batch_size", "distill.test_batches", "device")
Listener = Callable[[int, float], None]


# ------------------------------------------------------------------ the outer gradient of K runs


def fresh_policy(cfg: DistillConfig, obs_dim: int, act_dim: int, step: int) -> Params:
    """The inner loop's initialization at outer step ``step``: seeded, so a resumed run repeats it; drawn
    on the CPU (the same init on every device)."""
    gen = torch.Generator().manual_seed(derive_seed(cfg.seed, "inner-init", step))
    return init_policy(obs_dim, act_dim, cfg.hidden, gen, cfg.init)


def q_weight_factor(targets: Targets, cfg: RunConfig) -> float:
    """distill.beta as the Q weights use it (rescaled to the teacher's Q when distill.q_reference is set)."""
    d = cfg.distill
    return targets.beta(d.beta, d.q_reference) if d.method in ("avpbc", "sdw") else d.beta


def outer_gradients(
    cfgs: Sequence[DistillConfig],
    S: Tensor,
    A: Tensor,
    obs: Tensor,
    target: Tensor,
    weight: Tensor,
    steps: Sequence[int],
    unrolled: Sequence[bool] | None = None,
    workspaces: dict[str, Workspace] | None = None,
    graphed: Any = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """(L_out (K,), dL/dS (K, n, d), dL/dA (K, n, a)) of K runs at their outer ``steps`` (shapes as
    :mod:`obd.bptt`). Runs with ``unrolled[k]`` take the autograd unroll
    (:func:`obd.distill.outer_grad_unrolled`, one by one; bf16 products under ``torch.autocast``); the
    others one :func:`obd.bptt.outer_grad` call per inner precision, each with its tape from
    ``workspaces`` (``graphed``: the :class:`obd.cuda_graphs.Graphed` kernel, used when all the runs
    share one precision)."""
    from obd.distill import outer_grad_unrolled

    K, dev, dt = S.shape[0], S.device, S.dtype
    obs, target, weight = obs.to(dt), target.to(dt), weight.to(dt)
    inits = [[q.to(dev, dt) for q in fresh_policy(c, S.shape[2], A.shape[2], st)] for c, st in zip(cfgs, steps)]
    slow = [k for k in range(K) if unrolled and unrolled[k]]
    groups: dict[str, list[int]] = {}
    for k in range(K):
        if k not in slow:
            groups.setdefault(cfgs[k].inner_precision, []).append(k)
    workspaces = {} if workspaces is None else workspaces
    loss, gS, gA = torch.empty(K, dtype=dt, device=dev), torch.empty_like(S), torch.empty_like(A)
    for precision, fast in groups.items():
        rows = fast if len(fast) < K else slice(None)
        sub = [cfgs[k] for k in fast]
        args = (
            S[rows],
            A[rows],
            stack_params([inits[k] for k in fast]),
            obs[rows],
            target[rows],
            weight[rows],
            tuple(c.inner_steps for c in sub),
            tuple(c.inner_lr for c in sub),
        )
        kw: dict[str, Any] = {
            "truncate": tuple(c.truncate for c in sub),
            "workspace": workspaces.setdefault(precision, Workspace()),
            "products": PRODUCTS[precision],
        }
        kernel = graphed if graphed is not None and len(groups) == 1 else outer_grad
        loss[rows], gS[rows], gA[rows] = kernel(*args, **kw)
    for k in slow:
        c = cfgs[k]
        args1 = (S[k], A[k], inits[k], obs[k], target[k], weight[k], c.inner_steps, c.inner_lr)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=c.inner_precision == "bfloat16"):
            out = outer_grad_unrolled(*args1)
        loss[k], gS[k], gA[k] = (x.to(dt) for x in out)
    return loss, gS, gA


# ------------------------------------------------------------------ one run's state


class Run:
    """One run of the engine: its config, synthetic set, optimizer, history, timers and outputs."""

    def __init__(
        self,
        cfg: RunConfig,
        targets: Targets,
        dm: OBDDataModule,
        device: torch.device,
        dtype: torch.dtype,
        resume: bool,
    ):
        from obd.distill import outer_optimizer
        from obd.starts import initial_set

        self.cfg, self.out, self.targets = cfg, Path(cfg.out or "."), targets
        method, d = cfg.distill.method, cfg.distill
        self.distils = method not in BASELINE_START
        s, a = initial_set(targets, BASELINE_START.get(method, d.start), d.n_synthetic, d.seed)
        self.start = (s.float().clone(), a.float().clone())  # kept apart from the parameters that move
        self.S = nn.Parameter(s.to(device, dtype, copy=True))
        self.A = nn.Parameter(a.to(device, dtype, copy=True))
        self.evaluation_steps = set(cfg.evaluation_steps())
        self.step: int = 0
        self.history: list[dict] = []
        self.wall_before = self.cpu = 0.0
        self.listeners: list[Listener] = []
        self.stopped: Exception | None = None
        self.last: dict[str, float] = {}
        if self.distils:
            beta = q_weight_factor(dm.targets, cfg)
            dm.add_run(method, beta, cfg.density, d.batch_size, d.test_batches, d.seed, d.q_negative)
            self.opt, self.schedule = outer_optimizer([self.S, self.A], d, cfg.outer_steps)
            if resume:
                self.load()
        self.csv = self._csv_logger(resume)
        self.wandb = self._start_wandb(resume) if cfg.wandb else None

    @property
    def active(self) -> bool:
        return self.distils and self.stopped is None and self.step < self.cfg.outer_steps

    def _csv_logger(self, resume: bool):
        from lightning.pytorch.loggers import CSVLogger

        path = self.out / "logs" / "csv" / "metrics.csv"
        earlier = _read_csv(path) if resume else []
        warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
        csv = CSVLogger(str(self.out), name="logs", version="csv")
        # the logger deletes an existing file: a resumed run keeps its rows up to the restored step
        csv.experiment.metrics.extend(r for r in earlier if int(float(r["step"])) <= self.step)
        return csv

    def _start_wandb(self, resume: bool):
        from obd.tracking import start_run

        id_file = self.out / "wandb-run-id"
        run_id = id_file.read_text().strip() if resume and id_file.is_file() else None
        run = start_run(self.cfg, self.targets.task.name, run_id)
        id_file.write_text(run.id)
        return run

    def log(self, metrics: dict[str, float], step: int | None = None) -> None:
        """To the CSV log and W&B at ``step`` (default: the current one)."""
        from obd.tracking import STEP

        step = self.step if step is None else step
        self.csv.log_metrics(metrics, step=step)
        if self.wandb is not None:
            self.wandb.log({**metrics, STEP: step})

    def wall_seconds(self, t0: float) -> float:
        return round(self.wall_before + time.time() - t0, 1)

    def save(self, t0: float) -> None:
        path = self.out / CHECKPOINT
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        state = {
            "S": self.S.detach(),
            "A": self.A.detach(),
            "opt": self.opt.state_dict(),
            "schedule": self.schedule.state_dict() if self.schedule is not None else {},
            "step": self.step,
            "history": json.dumps(self.history),
            "wall_seconds": self.wall_seconds(t0),
            "cpu_seconds": self.cpu,
        }
        torch.save(state, tmp)
        tmp.replace(path)
        self.csv.save()

    def load(self) -> None:
        path = self.out / CHECKPOINT
        try:
            st = torch.load(path, weights_only=True, map_location=self.S.device)
            with torch.no_grad():
                self.S.copy_(st["S"])
                self.A.copy_(st["A"])
            self.opt.load_state_dict(st["opt"])
            if self.schedule is not None:
                self.schedule.load_state_dict(st["schedule"])
            self.step, self.history = int(st["step"]), json.loads(st["history"])
            self.wall_before, self.cpu = float(st["wall_seconds"]), float(st["cpu_seconds"])
        except Exception as e:  # a truncated file, another format, another set size
            raise ObdError(f"{path}: not a readable checkpoint of this run ({str(e).splitlines()[0]})") from None

    def evaluate(self) -> None:
        """The published evaluation at the current step (once per step); then the listeners."""
        from obd.evaluate import evaluate_synthetic

        if self.history and self.history[-1]["step"] == self.step:
            return
        cpu0 = time.process_time()
        t = self.targets
        res = evaluate_synthetic(
            self.S.detach().float().cpu(),
            self.A.detach().float().cpu(),
            t.task,
            t.mean.numpy(),
            t.std.numpy(),
            self.cfg.eval,
            seed=derive_seed(self.cfg.distill.seed, "evaluation", self.step),
        )
        spent = time.process_time() - cpu0
        # cpu_seconds: the run's CPU time up to this evaluation (excluded), for curves against compute
        self.history.append(
            {"step": self.step, **res, "cpu_seconds": round(self.cpu, 1), "eval_cpu_seconds": round(spent, 1)}
        )
        self.cpu += spent
        self.log({"normalized_return": res["score"], "normalized_return_std_over_policies": res["std_over_policies"]})
        for listen in self.listeners:
            try:
                listen(self.step, res["score"])
            except Exception as e:  # this run stops; the others go on
                self.stopped = e
                return

    def finish(self, t0: float) -> dict:
        """Outputs of a finished run: synthetic.npz, metrics.json, the W&B run's summary; its metrics."""
        from obd.evaluate import set_change, summarize_history
        from obd.synthetic_set import save_synthetic
        from obd.tracking import publish_run, versions

        c, t = self.cfg, self.targets
        states, actions = self.S.detach().float().cpu(), self.A.detach().float().cpu()
        save_synthetic(
            self.out / "synthetic.npz", states, actions, t.mean.numpy(), t.std.numpy(), t.task.name, to_dict(c)
        )
        k = c.eval.k_for(c.distill.method)
        m = {
            "method": c.distill.method,
            "task": t.task.name,
            "seed": c.distill.seed,
            "budget": c.budget,
            "outer_steps": c.outer_steps,
            **summarize_history(self.history, k, c.scored_from()),
            "protocol": {
                "policies": c.eval.policies,
                "episodes": c.eval.episodes,
                "last_k": k,
                "ensemble": c.eval.ensemble,
            },
            "history": self.history,
            "set_change": set_change(states, actions, *self.start),
            "wall_seconds": self.wall_seconds(t0),
            **t.describe(c.distill.method, q_weight_factor(t, c), c.density, c.distill.q_negative),
            "versions": versions(),
            "config": to_dict(c),
        }
        (self.out / "metrics.json").write_text(json.dumps(m, indent=1, default=str))
        self.csv.save()
        if self.wandb is not None:
            publish_run(self.wandb, m, self.out / "synthetic.npz")
        return m

    def close_wandb(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _read_csv(path: Path) -> list[dict]:
    import csv

    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


# ------------------------------------------------------------------ Lightning: module and callback


def _lightning_parts(runs: list[Run], interrupt: _Interrupt, t0: float):
    import lightning.pytorch as pl

    class Distillation(pl.LightningModule):
        """The K runs' synthetic sets (parameters, normalized states and actions) and the outer objective.
        A batch is (run indices, their steps, obs, target, weight) from :class:`obd.datamodule.OBDDataModule`."""

        def __init__(self) -> None:
            super().__init__()
            self.automatic_optimization = False
            self.states = nn.ParameterList([r.S for r in runs])
            self.actions = nn.ParameterList([r.A for r in runs])
            self.workspaces: dict[str, Workspace] = {}  # the BPTT tapes (one per inner precision), reused
            self.graphed: Any = None
            self.stepped: list[Run] = []
            dev = runs[0].S.device
            if dev.type == "cuda" and all(r.cfg.distill.cuda_graph for r in runs):
                from obd.cuda_graphs import Graphed

                self.graphed = Graphed(outer_grad, keepalive=lambda: self.workspaces)

        def configure_optimizers(self):
            return [r.opt for r in runs]

        def training_step(self, batch, batch_idx):
            idx, steps, obs, target, weight = batch
            rows = [j for j, k in enumerate(idx.tolist()) if runs[k].stopped is None]
            self.stepped = [runs[idx[j]] for j in rows]
            if not rows:
                return None
            for j, r in zip(rows, self.stepped):
                assert r.step == int(steps[j]), "a run's batch belongs to another step"
            if len(rows) < len(idx):
                sel = torch.tensor(rows, device=obs.device)
                obs, target, weight = obs[sel], target[sel], weight[sel]
            loss, gS, gA = outer_gradients(
                [r.cfg.distill for r in self.stepped],
                torch.stack([r.S.detach() for r in self.stepped]),
                torch.stack([r.A.detach() for r in self.stepped]),
                obs,
                target,
                weight,
                [r.step for r in self.stepped],
                [r.cfg.grad_fn == "unrolled" for r in self.stepped],
                self.workspaces,
                self.graphed,
            )
            for k, r in enumerate(self.stepped):
                r.opt.zero_grad()
                r.S.grad, r.A.grad = gS[k], gA[k]
                norm = torch.nn.utils.clip_grad_norm_([r.S, r.A], r.cfg.distill.grad_clip)
                r.opt.step()
                if r.schedule is not None:
                    r.schedule.step()
                r.step += 1
                r.last = {"outer_loss": float(loss[k]), "grad_norm": float(norm)}
            self.log("outer_loss", loss.mean(), prog_bar=True, on_step=True)
            return None

    class Progress(pl.Callback):
        """After each iteration: per stepped run, its logs, evaluations and checkpoints; CPU time shared
        evenly among the runs of an iteration, an evaluation's own time to its run."""

        def on_train_start(self, trainer, module) -> None:
            self.mark = time.process_time()

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            now = time.process_time()
            for r in module.stepped:
                r.cpu += (now - self.mark) / len(module.stepped)
            if interrupt.hit:
                trainer.should_stop = True  # the runs save their state after fit
                return
            for r in module.stepped:
                r.log(r.last, step=r.step - 1)  # the loss measured at the step before the update
                done = r.step == r.cfg.outer_steps
                if r.step in r.evaluation_steps or done:
                    r.evaluate()
                if r.step % r.cfg.checkpoint_every == 0 or done or r.stopped is not None:
                    r.save(t0)
            if not any(r.active for r in runs):
                trainer.should_stop = True
            self.mark = time.process_time()

    return Distillation(), Progress()


class _Interrupt:
    """Ctrl-C during distillation: finish the current outer step, checkpoint, and stop (a second Ctrl-C
    aborts at once)."""

    def __init__(self) -> None:
        self.hit = False
        self._old: Any = None

    def __enter__(self) -> _Interrupt:
        import signal
        import threading

        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        import signal

        self.hit = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __exit__(self, *exc: Any) -> None:
        import signal

        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


# ------------------------------------------------------------------ the engine


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _targets_method(cfgs: Sequence[RunConfig]) -> str:
    """The method whose targets cover every run's: sdw needs the density, the others the teacher where they
    read pi*(s) (a teacher-labelled start or baseline included)."""
    methods = {c.distill.method for c in cfgs}
    if "sdw" in methods:
        return "sdw"
    for m in ("avpbc", "pbc"):
        if m in methods:
            return m
    if any(BASELINE_START.get(c.distill.method, c.distill.start) != "real-pairs" for c in cfgs):
        return "pbc"
    return "dbc"


def run_many(
    cfgs: Sequence[RunConfig],
    listeners: Sequence[Sequence[Listener]] | None = None,
    resume: bool | None = None,
    show_progress: bool = True,
    dtype: torch.dtype = torch.float32,
    force_task: bool = False,
) -> list[dict | Exception]:
    """Advance the runs ``cfgs`` (each with its ``out`` set) together to their ends; per run its metrics,
    or the exception a listener of it raised (``listeners[k]`` are called with (outer step, normalized
    return) after each of run k's evaluations).

    ``resume``: True continues every run from its checkpoint (an error where there is none), False
    starts afresh, None continues where there is one. A checkpoint of another config or dataset is an
    error. ``dtype``: of the synthetic sets and the BPTT (float64 in tests)."""
    import lightning.pytorch as pl
    import yaml

    from obd.datamodule import OBDDataModule
    from obd.devices import lightning_accelerator, native_bf16, resolve_device
    from obd.runs import check_continuable, record_start
    from obd.targets import prepare_targets
    from obd.tracking import quiet_libraries

    if not cfgs:
        return []
    first = cfgs[0]
    for c in cfgs[1:]:
        for key in SHARED:
            if _get(c, key) != _get(first, key):
                raise ConfigError(
                    f"runs advanced together must share '{key}': {_get(first, key)!r} vs {_get(c, key)!r}"
                )
    if any(not c.out for c in cfgs):
        raise ConfigError("every run advanced by the engine needs its output folder (cfg.out)")
    outs = [Path(str(c.out)) for c in cfgs]
    if len({str(o.resolve()) for o in outs}) < len(cfgs):
        raise ConfigError("runs advanced together need one output folder each")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*IterableDataset.* has `__len__` defined.*")
    quiet_libraries()  # device notes and tips, once per process
    torch.set_num_threads(first.threads)
    continuing = []
    for c, out in zip(cfgs, outs):
        check_writable(out)
        has = (out / CHECKPOINT).is_file() and resume is not False and c.distill.method not in BASELINE_START
        if resume and not has and c.distill.method not in BASELINE_START:
            raise ObdError(f"--resume: no checkpoint in {out} ({out / CHECKPOINT} is absent); run without --resume")
        if has:
            check_continuable(out, c)  # before the teacher and density stages, which may take minutes
        elif resume is not False and any((out / CHECKPOINT.parent).glob("*")):
            log.warning("%s holds no %s (an earlier obd's checkpoint?): the run starts over", out, CHECKPOINT)
        continuing.append(has)
    device = resolve_device(first.device)  # before any work: --device cuda without a GPU is a one-line error
    if any(c.distill.inner_precision == "bfloat16" for c in cfgs) and not native_bf16(device):
        log.warning(
            "distill.inner_precision bfloat16 on a CPU without native bf16 (AVX512-BF16 or AMX; this one: %s): "
            "its products are emulated and can be many times slower than float32 (docs/performance.md)",
            torch.backends.cpu.get_cpu_capability(),
        )
    t0 = time.time()
    targets = prepare_targets(first, _targets_method(cfgs), show_progress=show_progress, force_task=force_task)
    dm = OBDDataModule(targets, device)
    runs: list[Run] = []
    for c, has, out in zip(cfgs, continuing, outs):
        if has:
            check_continuable(out, c, targets.data_hash)
        else:
            (out / CHECKPOINT).unlink(missing_ok=True)
        record_start(out, c, targets.data_hash)
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(c), sort_keys=False))
        runs.append(Run(c, targets, dm, device, dtype, has))
    for r, ls in zip(runs, listeners or []):
        r.listeners = list(ls)
    distilling = [r for r in runs if r.distils]
    dm.positions = lambda: [(k, r.step, r.cfg.outer_steps) for k, r in enumerate(distilling) if r.active]
    interrupt = _Interrupt()
    try:
        if any(r.active for r in distilling):
            module, progress = _lightning_parts(distilling, interrupt, t0)
            callbacks: list[pl.Callback] = [progress]
            if show_progress and not sys.stdout.isatty():
                # in a log file the rich bar draws only at the end: a plain bar every 10 steps instead
                callbacks.append(pl.callbacks.TQDMProgressBar(refresh_rate=10))
            trainer = pl.Trainer(
                max_epochs=1,  # one pass over the runs' batches: each run to its last outer step
                logger=False,
                enable_checkpointing=False,
                callbacks=callbacks,
                enable_progress_bar=show_progress,
                enable_model_summary=False,
                accelerator=lightning_accelerator(device),
                devices=1,
                num_sanity_val_steps=0,
            )
            with interrupt:
                trainer.fit(module, datamodule=dm)
        if interrupt.hit:
            for r in distilling:
                if r.active:
                    r.save(t0)
            raise KeyboardInterrupt
        results: list[dict | Exception] = []
        for r in runs:
            if r.stopped is None:
                r.evaluate()  # the final evaluation (done already unless the run had no step left, or is a baseline)
            results.append(r.stopped if r.stopped is not None else r.finish(t0))
            r.close_wandb()
        return results
    finally:
        if sys.exc_info()[0] is not None:  # interrupted or failed: each W&B run ends here, resumed later
            for r in runs:
                r.close_wandb()
