"""One distillation run: ``python -m obd.train --task halfcheetah-medium --method sdw``.

Settings (see :mod:`obd.config`), in increasing priority: the ``--budget`` YAML, ``--config
FILE.yaml`` (nested like :class:`obd.config.RunConfig`), and the flags. The pipeline:
dataset -> targets (teacher, Q, density; cached) -> distillation -> evaluation -> outputs in
``--out``: ``synthetic.npz``, ``metrics.json`` (every evaluation, the last-K score, config, seed,
versions, data hash), ``config.yaml``, ``checkpoints/`` (``--resume`` continues from ``last.ckpt``),
``logs/`` (CSV) and ``wandb/`` (offline unless you are logged in).
``--method random | random-teacher | kmeans-teacher`` skips distillation and evaluates a start of
:mod:`obd.starts` as it is (random real pairs; random states with pi*(s); k-means states with pi*(s)).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from obd.config import BASELINE_START, RunConfig, budget_names, build_config, read_yaml, to_dict
from obd.errors import ConfigError, ObdError, check_writable, cli

log = logging.getLogger("obd.train")


def default_out(cfg: RunConfig) -> Path:
    name = (cfg.data.task or cfg.data.source).replace("/", "_").replace(":", "_")
    return Path(f"runs/{name}-{cfg.distill.method}-s{cfg.distill.seed}")


class _Interrupt:
    """Ctrl-C during distillation: finish the current outer step, checkpoint, and stop (a second Ctrl-C
    aborts at once). Lightning's own handling exits with status 1 and no word on how to resume."""

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


def _evaluation_callback(task, mean, std, cfg: RunConfig, listeners: Sequence, interrupt: _Interrupt):
    import lightning.pytorch as pl

    from obd.evaluate import evaluate_synthetic
    from obd.seeding import derive_seed

    steps = set(cfg.evaluation_steps())

    class EvaluationCallback(pl.Callback):
        """Evaluates the synthetic set at ``cfg.evaluation_steps()`` and at the end, with the published
        protocol; results go to the loggers at their own outer step, to ``history`` and to ``listeners``."""

        def __init__(self) -> None:
            self.history: list[dict] = []
            self.seconds_before, self.t0 = 0.0, time.time()  # wall time of earlier invocations, this one's start
            self.cpu_before, self.cpu0 = 0.0, time.process_time()  # the same in CPU time (all threads)

        def wall_seconds(self) -> float:
            return round(self.seconds_before + time.time() - self.t0, 1)

        def cpu_seconds(self) -> float:
            return round(self.cpu_before + time.process_time() - self.cpu0, 1)

        def _run(self, trainer: pl.Trainer, module: Any) -> None:
            if interrupt.hit:
                return
            step = trainer.global_step
            if self.history and self.history[-1]["step"] == step:
                return
            states, actions = module.synthetic()
            cpu_before_eval = self.cpu_seconds()
            res = evaluate_synthetic(
                states, actions, task, mean, std, cfg.eval, seed=derive_seed(cfg.distill.seed, "evaluation", step)
            )
            # cpu_seconds: the run's CPU time up to this evaluation (excluded), for curves against compute
            self.history.append(
                {
                    "step": step,
                    **res,
                    "cpu_seconds": cpu_before_eval,
                    "eval_cpu_seconds": self.cpu_seconds() - cpu_before_eval,
                }
            )
            for lg in trainer.loggers:
                lg.log_metrics(
                    {
                        "normalized_return": res["score"],
                        "normalized_return_std_over_policies": res["std_over_policies"],
                    },
                    step=step,
                )
            for listen in listeners:
                listen(step, res["score"])

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            if interrupt.hit:
                trainer.should_stop = True
                return
            if trainer.global_step in steps:
                self._run(trainer, module)

        def final(self, trainer: pl.Trainer, module: Any) -> None:
            """The evaluation at the last outer step (also when a resumed run had no step left to do)."""
            self._run(trainer, module)

        def state_dict(self) -> dict:
            return {"history": self.history, "wall_seconds": self.wall_seconds(), "cpu_seconds": self.cpu_seconds()}

        def load_state_dict(self, state: dict) -> None:
            self.history = list(state.get("history", []))
            self.seconds_before = float(state.get("wall_seconds", 0.0))
            self.cpu_before = float(state.get("cpu_seconds", 0.0))

    return EvaluationCallback()


def run(
    cfg: RunConfig,
    resume: bool | None = None,
    show_progress: bool = True,
    listeners: Sequence = (),
    loggers: list | None = None,
    force_task: bool = False,
) -> dict:
    """Distil (or, for a baseline method, pick) a synthetic set, evaluate it, write the outputs; returns metrics.

    ``resume``: True continues the checkpoint in ``cfg.out`` (an error when there is none), False starts
    afresh, None continues one if there is one. A checkpoint of another config or dataset is an error."""
    import lightning.pytorch as pl
    import torch
    import yaml

    from obd.datamodule import OBDDataModule
    from obd.runs import check_continuable, record_start
    from obd.seeding import derive_seed
    from obd.starts import initial_set
    from obd.targets import prepare_targets
    from obd.tracking import publish_run, start_run

    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    from obd.tracking import quiet_libraries

    quiet_libraries()  # device notes and tips, once per run (also in worker processes)
    torch.set_num_threads(cfg.threads)
    method, seed = cfg.distill.method, cfg.distill.seed
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    check_writable(out)
    ckpt = out / "checkpoints" / "last.ckpt"
    continuing = ckpt.is_file() and resume is not False and method not in BASELINE_START
    if resume and not continuing:
        raise ObdError(f"--resume: no checkpoint in {out} ({ckpt} is absent); run without --resume to start it")
    if continuing:
        check_continuable(out, cfg)  # before the teacher and density stages, which may take minutes
    from obd.devices import resolve_device

    device = resolve_device(cfg.device)  # before any work: --device cuda without a GPU is a one-line error
    pl.seed_everything(derive_seed(seed, "lightning") % 2**32, workers=True, verbose=False)
    t0 = time.time()
    targets = prepare_targets(cfg, method, show_progress=show_progress, force_task=force_task)
    if continuing:
        check_continuable(out, cfg, targets.data_hash)
    record_start(out, cfg, targets.data_hash)
    task = targets.task
    dm = OBDDataModule(
        targets,
        "dbc" if method in BASELINE_START else method,
        cfg.distill.beta,
        cfg.density,
        cfg.distill.batch_size,
        cfg.distill.test_batches,
        seed,
        device=device,
    )
    (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    init_s, init_a = initial_set(targets, BASELINE_START.get(method, cfg.distill.start), cfg.distill.n_synthetic, seed)
    described = targets.describe(method, cfg.distill.beta, cfg.density)
    wb = None
    if loggers is None and cfg.wandb:
        id_file = out / "wandb-run-id"
        wb = start_run(cfg, task.name, id_file.read_text().strip() if continuing and id_file.is_file() else None)
        id_file.write_text(wb.id)
    try:
        metrics = _distil_and_evaluate(
            cfg, out, targets, dm, init_s, init_a, described, listeners, loggers, wb, continuing, show_progress, t0
        )
        if wb is not None:
            publish_run(wb, metrics, out / "synthetic.npz")
    finally:
        if wb is not None:
            wb.finish()
    return metrics


def _distil_and_evaluate(
    cfg: RunConfig, out, targets, dm, init_s, init_a, described, listeners, loggers, wb, continuing, show_progress, t0
) -> dict:
    """The distillation (or, for a baseline, the one evaluation) of :func:`run`, and its outputs."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    from obd.devices import lightning_accelerator, resolve_device
    from obd.distill import BehaviorDistillation
    from obd.evaluate import evaluate_synthetic, set_change, summarize_history
    from obd.seeding import derive_seed
    from obd.synthetic_set import save_synthetic
    from obd.tracking import STEP, versions

    task, method, seed = targets.task, cfg.distill.method, cfg.distill.seed
    mean, std = targets.mean.numpy(), targets.std.numpy()
    k = cfg.eval.k_for(method)
    if method in BASELINE_START:
        states, actions = init_s, init_a
        res = evaluate_synthetic(states, actions, task, mean, std, cfg.eval, seed=derive_seed(seed, "evaluation", 0))
        history = [{"step": 0, **res}]
        wall = round(time.time() - t0, 1)
        if wb is not None:
            wb.log({"normalized_return": res["score"], STEP: 0})
    else:
        module = BehaviorDistillation(cfg.distill, init_s, init_a, grad_fn=cfg.grad_fn, outer_steps=cfg.outer_steps)
        interrupt = _Interrupt()
        evaluator = _evaluation_callback(task, mean, std, cfg, listeners, interrupt)
        evaluator.t0 = t0  # wall time counts this invocation's data and teacher loading too
        ckpt_dir = out / "checkpoints"
        ckpt_cb = ModelCheckpoint(
            dirpath=ckpt_dir, save_last=True, save_top_k=0, every_n_train_steps=cfg.checkpoint_every
        )
        ckpt = out / "checkpoints" / "last.ckpt"
        ckpt_path = str(ckpt) if continuing else None
        if ckpt_path:
            log.info("resuming from %s", ckpt_path)
        own_loggers = loggers is None
        csv_path = out / "logs" / "csv" / "metrics.csv"
        # Lightning's CSV logger deletes an existing log: keep the earlier rows of a resumed run
        earlier = _read_csv(csv_path) if ckpt_path and own_loggers else []
        if loggers is None:
            loggers = [CSVLogger(str(out), name="logs", version="csv")]
            if wb is not None:
                loggers.append(WandbLogger(experiment=wb, save_dir=str(out)))
        for lg in loggers:
            lg.log_hyperparams({"config": to_dict(cfg), "versions": versions(), **described})
        trainer = pl.Trainer(
            max_steps=cfg.outer_steps,
            max_epochs=-1,
            logger=loggers,
            callbacks=[evaluator, ckpt_cb],
            enable_progress_bar=show_progress,
            enable_model_summary=False,
            log_every_n_steps=1,
            accelerator=lightning_accelerator(resolve_device(cfg.device)),
            devices=1,
            num_sanity_val_steps=0,
            deterministic=False,
        )
        with interrupt:
            trainer.fit(module, datamodule=dm, ckpt_path=ckpt_path)
        evaluator.final(trainer, module)
        if earlier:
            _prepend_csv(csv_path, earlier)
        trainer.save_checkpoint(ckpt_dir / "last.ckpt")  # the final state (with the final evaluation)
        if interrupt.hit:
            raise KeyboardInterrupt
        wall = evaluator.wall_seconds()
        states, actions = module.synthetic()
        history = evaluator.history
    save_synthetic(out / "synthetic.npz", states, actions, mean, std, task.name, to_dict(cfg))
    metrics = {
        "method": method,
        "task": task.name,
        "seed": seed,
        "budget": cfg.budget,
        "outer_steps": cfg.outer_steps,
        **summarize_history(history, k, cfg.scored_from()),
        "protocol": {
            "policies": cfg.eval.policies,
            "episodes": cfg.eval.episodes,
            "last_k": k,
            "ensemble": cfg.eval.ensemble,
        },
        "history": history,
        "set_change": set_change(states, actions, init_s, init_a),
        "wall_seconds": wall,
        **described,
        "versions": versions(),
        "config": to_dict(cfg),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1, default=str))
    return metrics


def _read_csv(path: Path) -> list[dict]:
    import csv

    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _prepend_csv(path: Path, earlier: list[dict]) -> None:
    """One CSV log across invocations: the earlier rows, then this invocation's."""
    import csv

    rows = earlier + _read_csv(path)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)
    tmp.replace(path)


# ------------------------------------------------------------------ command line


def parser() -> argparse.ArgumentParser:
    from obd.flags import add_config_flags

    p = argparse.ArgumentParser(
        prog="python -m obd.train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", default=None, help="e.g. halfcheetah-medium: the generated dataset, or the env of --data")
    p.add_argument("--data", default=None, help="another source: a D4RL hdf5 path, d4rl:TASK or minari:ID")
    p.add_argument("--force-task", action="store_true", help="accept a --task that contradicts the data's own")
    p.add_argument("--budget", default="quick", help=f"one of sweeps/budgets/: {' | '.join(budget_names())}")
    p.add_argument("--config", default=None, help="YAML file of RunConfig fields (obd/config.py)")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoints/last.ckpt")
    p.add_argument("--no-wandb", action="store_true", help="no W&B run (the same as --wandb false)")
    p.add_argument("--print-config", action="store_true", help="print the resolved configuration as YAML and exit")
    p.add_argument("--json", action="store_true", help="print the final metrics as JSON")
    add_config_flags(p)
    return p


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run's config: the budget, then --config, then --task/--data, then every config flag."""
    from obd.flags import config_layer

    layers: list[dict] = []
    if args.config:
        loaded = read_yaml(Path(args.config))
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{args.config}: a config file is a mapping of RunConfig fields")
        layers.append(loaded or {})
    if args.data or args.task:
        layers.append({"data": {"source": args.data or args.task, **({"task": args.task} if args.data else {})}})
    layers.append(config_layer(args))
    if args.no_wandb:
        layers.append({"wandb": False})
    if args.budget not in budget_names():
        raise ConfigError(f"unknown budget {args.budget!r}; choose one of {', '.join(budget_names())}")
    return build_config(args.budget, layers)


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    from obd.tracking import setup_logging

    setup_logging()
    cfg = config_from_args(args)
    out = Path(cfg.out) if cfg.out else default_out(cfg)
    cfg.out = str(out)
    if args.print_config:
        import yaml

        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    try:
        m = run(cfg, resume=args.resume, force_task=args.force_task)
    except KeyboardInterrupt:
        given = argv if argv is not None else sys.argv[1:]
        again = " ".join(["python -m obd.train", *given, *([] if args.resume else ["--resume"])])
        if (out / "checkpoints" / "last.ckpt").is_file():
            raise ObdError(f"interrupted; the state is kept in {out / 'checkpoints'}; continue with: {again}") from None
        raise ObdError(
            "interrupted before distillation started; cached stages are kept, run the same command again"
        ) from None
    if args.json:
        print(json.dumps({k: m[k] for k in ("task", "method", "seed", "score", "final_score", "last_k_used")}))
    else:
        print(
            f"{m['task']} {m['method']} seed {m['seed']}: normalized return {m['score']:.1f} (mean of the last "
            f"{m['last_k_used']} evaluations, {m['protocol']['policies']} policies x {m['protocol']['episodes']} "
            f"episodes each; {m['wall_seconds']:.0f} s)"
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    sys.exit(cli(main))
