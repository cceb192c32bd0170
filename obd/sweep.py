"""``make sweep TASK=halfcheetah-medium``: does state-density weighting help on this dataset, and by how much?

For each method (SDW and Av-PBC by default) an Optuna study with the same number of trials
searches the shared space (and SDW its own parameters); pruning sees every evaluation at its own
outer step. Then each method's best configuration is re-run over fresh seeds and the comparison
(mean +/- std, difference with a 95% bootstrap confidence interval) goes to ``summary.json``,
W&B and ``report.md``.

Storage: SQLite in ``OUT/study.db`` by default, so re-running the same command resumes; with
``--storage postgresql://...`` several ``--worker`` processes on several machines share the
studies (workers only run trials; the main process also runs the finals and the report).
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import random
import socket
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import optuna
import yaml
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from optuna_integration import PyTorchLightningPruningCallback
from tqdm.auto import tqdm

from obd.data import DatasetError, UnknownTaskError, get_task
from obd.datamodule import METHODS
from obd.train import BUDGETS, TrainConfig, make_wandb_logger, merge, run

log = logging.getLogger("obd.sweep")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
DEFAULT_STUDY = Path(__file__).resolve().parent.parent / "sweeps" / "default.yaml"
HEARTBEAT_S, GRACE_S = 5, 20


# ------------------------------------------------------------------ study definition

def load_study(path: Path, task: str, **overrides) -> dict:
    """The YAML study with its per-task overrides and then ``overrides`` (None values ignored) applied."""
    if not path.is_file():
        raise ValueError(f"{path}: no such study file")
    spec = yaml.safe_load(path.read_text()) or {}
    per_task = (spec.pop("tasks", None) or {}).get(task, {})
    spec = _deep_update(spec, per_task)
    spec.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("methods", "trials", "seeds", "budget", "search"):
        if key not in spec:
            raise ValueError(f"{path}: missing {key!r}")
    unknown = [m for m in spec["methods"] if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    if spec["budget"] not in BUDGETS:
        raise ValueError(f"unknown budget {spec['budget']!r}; choose one of {', '.join(BUDGETS)}")
    return spec


def _deep_update(base: dict, upd: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in upd.items():
        out[k] = _deep_update(out.get(k, {}), v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _nest(dotted: dict) -> dict:
    out: dict = {}
    for key, v in dotted.items():
        d = out
        *parents, leaf = key.split(".")
        for p in parents:
            d = d.setdefault(p, {})
        d[leaf] = v
    return out


def suggest(trial: optuna.Trial, space: dict) -> dict:
    """Sample the dotted-key search space: {name: {type: float|int|categorical, ...}}."""
    out = {}
    for name, s in space.items():
        kind = s["type"]
        if kind == "float":
            out[name] = trial.suggest_float(name, s["low"], s["high"], log=s.get("log", False))
        elif kind == "int":
            out[name] = trial.suggest_int(name, s["low"], s["high"], step=s.get("step", 1), log=s.get("log", False))
        elif kind == "categorical":
            out[name] = trial.suggest_categorical(name, s["choices"])
        else:
            raise ValueError(f"search space {name!r}: unknown type {kind!r}")
    return out


def run_config(spec: dict, task: str, method: str, params: dict, seed: int, out: Path, group: str) -> TrainConfig:
    cfg = merge(TrainConfig(), BUDGETS[spec["budget"]])
    cfg.budget = spec["budget"]
    merge(cfg, spec.get("fixed") or {})
    merge(cfg, _nest(params))
    merge(cfg, {"data": {"source": task}, "distill": {"method": method, "seed": seed}, "out": str(out),
                "wandb_group": group})
    cfg.eval.inner_steps, cfg.eval.inner_lr, cfg.eval.hidden = (cfg.distill.inner_steps, cfg.distill.inner_lr,
                                                                 cfg.distill.hidden)
    return cfg


# ------------------------------------------------------------------ pruning at each evaluation

class EvaluationPruning(PyTorchLightningPruningCallback):
    """Optuna's Lightning pruning callback, fed by :class:`obd.evaluate.EvaluationCallback`.

    The stock callback reports once per validation epoch; our runs are one endless epoch of outer
    steps, so each evaluation is reported at its own outer step instead.
    """

    def __init__(self, trial: optuna.Trial):
        super().__init__(trial, monitor="normalized_return")

    def on_validation_end(self, trainer, pl_module) -> None:  # no validation loop here
        return

    def on_evaluation(self, trainer, step: int, value: float) -> None:
        self._trial.report(value, step=step)
        if self._trial.should_prune():
            raise optuna.TrialPruned(f"pruned at outer step {step} (normalized return {value:.1f})")


# ------------------------------------------------------------------ the sweep

def connect(url: str, attempts: int = 5) -> RDBStorage:
    """Optuna RDB storage with heartbeats; workers starting together may race to create the schema,
    so a failed first connection is retried."""
    for i in range(attempts):
        try:
            return RDBStorage(url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
                              engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {})
        except Exception as e:  # sqlalchemy errors of several kinds
            if i == attempts - 1:
                raise ValueError(f"cannot open the study storage {url.split('@')[-1]}: {e}") from None
            time.sleep(1 + 2 * random.random())
    raise AssertionError("unreachable")


class Sweep:
    def __init__(self, task: str, spec: dict, out: Path, storage: str | None, show_progress: bool = True):
        self.task, self.spec, self.out = task, spec, out
        self.show_progress = show_progress
        out.mkdir(parents=True, exist_ok=True)
        url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
        self.storage = connect(url)

    def study_name(self, method: str) -> str:
        return f"{self.task}-{method}-{self.spec['budget']}"

    def study(self, method: str) -> optuna.Study:
        p = self.spec.get("pruner", {})
        return optuna.create_study(
            study_name=self.study_name(method), storage=self.storage, direction="maximize", load_if_exists=True,
            sampler=optuna.samplers.TPESampler(seed=self.spec.get("sampler_seed", 0) + zlib.crc32(method.encode()) % 1000),
            pruner=optuna.pruners.MedianPruner(n_startup_trials=p.get("n_startup_trials", 2),
                                               n_warmup_steps=p.get("n_warmup_steps", 0)))

    def space(self, method: str) -> dict:
        return {**self.spec["search"], **(self.spec.get("method_search") or {}).get(method, {})}

    def prepare(self) -> None:
        """Build what the trials share (dataset, teacher, default density weights) up front, with progress
        bars: inside a trial they would be built silently by the first one."""
        from obd.datamodule import OBDDataModule

        # one data module covers all: sdw needs everything avpbc/pbc need (teacher) plus density, dbc only data
        method = next(m for m in ("sdw", "avpbc", "pbc", "dbc") if m in self.spec["methods"])
        cfg = run_config(self.spec, self.task, method, {}, seed=0, out=self.out, group="")
        OBDDataModule(cfg.data, method=method, beta=cfg.distill.beta, show_progress=self.show_progress).prepare()

    def optimize(self, method: str) -> optuna.Study:
        """Run trials until the study holds ``trials`` finished (complete or pruned) ones."""
        study = self.study(method)
        target = int(self.spec["trials"])
        self._wait_for_stale(study)
        done_states = (TrialState.COMPLETE, TrialState.PRUNED)
        n_done = lambda: len(study.get_trials(deepcopy=False, states=done_states))  # noqa: E731
        bar = tqdm(total=target, initial=min(n_done(), target), desc=f"{method} trials", unit="trial",
                   disable=not self.show_progress)

        def progress(st: optuna.Study, tr: optuna.trial.FrozenTrial) -> None:
            bar.n = min(n_done(), target)
            try:
                bar.set_postfix(best=f"{st.best_value:.1f}", last=tr.state.name.lower())
            except ValueError:  # no completed trial yet
                bar.set_postfix(last=tr.state.name.lower())
            bar.refresh()

        attempts = 0
        while n_done() < target and attempts < 3 * target:
            study.optimize(lambda t: self.objective(t, method), n_trials=1, catch=(Exception,),
                           callbacks=[MaxTrialsCallback(target, states=done_states), progress])
            attempts += 1
        bar.close()
        return study

    def _wait_for_stale(self, study: optuna.Study) -> None:
        """SQLite (one machine): trials left RUNNING by a killed process fail once their heartbeat is older
        than the grace period and are then retried with the same parameters; wait that long rather than
        run new trials around them."""
        if not self.storage.url.startswith("sqlite"):
            return  # shared storage: other workers' trials are alive; optuna fails stale ones as trials start
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        log.info("%d trial(s) marked running (a stopped process, or a live worker): waiting %d s for their "
                 "heartbeat to expire", len(running), GRACE_S)
        time.sleep(GRACE_S + 1)
        optuna.storages.fail_stale_trials(study)

    def objective(self, trial: optuna.Trial, method: str) -> float:
        params = suggest(trial, self.space(method))
        out = self.out / "trials" / method / f"trial-{trial.number:03d}"
        cfg = run_config(self.spec, self.task, method, params, seed=0, out=out, group=self.study_name(method))
        trial.set_user_attr("out", str(out))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        loggers = self._loggers(cfg, out, f"{method}-trial{trial.number}", [self.task, method, "trial"])
        try:
            m = run(cfg, show_progress=False, extra_callbacks=[EvaluationPruning(trial)], loggers=loggers)
        finally:
            _finish_wandb(loggers)
        trial.set_user_attr("history", [{"step": h["step"], "value": h["normalized_return_mean"]}
                                        for h in m["history"]])
        return float(m["normalized_return_mean"])

    def _loggers(self, cfg: TrainConfig, out: Path, name: str, tags: list[str]) -> list:
        from lightning.pytorch.loggers import CSVLogger

        loggers = [CSVLogger(str(self.out / "lightning_logs"), name=name)]
        if cfg.wandb:
            loggers.append(make_wandb_logger(cfg, out, name, tags))
        return loggers

    # -------------------------------------------------------------- finals and comparison
    def finals(self, method: str) -> list[dict]:
        """Re-run the best configuration over ``seeds`` fresh seeds (1..S); finished seeds are kept."""
        study = self.study(method)
        best = study.best_trial
        results = []
        for seed in range(1, int(self.spec["seeds"]) + 1):
            out = self.out / "final" / method / f"seed-{seed}"
            path = out / "metrics.json"
            if not path.is_file():
                cfg = run_config(self.spec, self.task, method, best.params, seed, out, self.study_name(method))
                loggers = self._loggers(cfg, out, f"{method}-final-s{seed}", [self.task, method, "final"])
                try:
                    run(cfg, show_progress=False, loggers=loggers)
                finally:
                    _finish_wandb(loggers)
            m = json.loads(path.read_text())
            results.append({"seed": seed, "normalized_return": m["normalized_return_mean"], "out": str(out)})
            log.info("%s final seed %d: %.1f", method, seed, m["normalized_return_mean"])
        return results

    def summarize(self, finals: dict[str, list[dict]]) -> dict:
        methods = list(finals)
        rows = {}
        for m in methods:
            v = np.array([r["normalized_return"] for r in finals[m]])
            st = self.study(m)
            rows[m] = {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": len(v),
                       "values": v.tolist(), "best_params": st.best_trial.params,
                       "best_trial_value": st.best_value, "trials": _trial_counts(st)}
        summary = {"task": self.task, "budget": self.spec["budget"], "methods": rows}
        if len(methods) >= 2:
            a, b = methods[0], methods[1]
            diff, lo, hi = bootstrap_diff(np.array(rows[a]["values"]), np.array(rows[b]["values"]))
            summary["difference"] = {"of": f"{a} - {b}", "mean": diff, "ci95": [lo, hi]}
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        return summary


def _trial_counts(study: optuna.Study) -> dict:
    trials = study.get_trials(deepcopy=False)
    return {s.name.lower(): sum(t.state == s for t in trials)
            for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}


def bootstrap_diff(a: np.ndarray, b: np.ndarray, n: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Difference of means a - b and its 95% percentile-bootstrap interval (independent samples)."""
    rng = np.random.default_rng(seed)
    da = a[rng.integers(0, len(a), (n, len(a)))].mean(1)
    db = b[rng.integers(0, len(b), (n, len(b)))].mean(1)
    lo, hi = np.percentile(da - db, [2.5, 97.5])
    return float(a.mean() - b.mean()), float(lo), float(hi)


def _finish_wandb(loggers: list) -> None:
    for lg in loggers:
        if lg.__class__.__name__ == "WandbLogger" and lg._experiment is not None:
            lg.experiment.finish()


def log_study_to_wandb(sweep: Sweep, summary: dict) -> None:
    import wandb

    mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
    r = wandb.init(project="obd", group=f"{sweep.task}-study", name=f"{sweep.task}-comparison", job_type="study",
                   dir=str(sweep.out), mode=mode, config={"study": sweep.spec, "task": sweep.task})
    table = wandb.Table(columns=["method", "mean", "std", "n", "best_params"])
    for m, row in summary["methods"].items():
        table.add_data(m, row["mean"], row["std"], row["n"], json.dumps(row["best_params"]))
    r.log({"comparison": table})
    if "difference" in summary:
        r.summary.update({"difference": summary["difference"]["mean"], "ci95_low": summary["difference"]["ci95"][0],
                          "ci95_high": summary["difference"]["ci95"][1]})
    r.finish()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m obd.sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="halfcheetah-medium")
    p.add_argument("--study", default=str(DEFAULT_STUDY), help="YAML study definition")
    p.add_argument("--methods", default=None, help="comma-separated, e.g. sdw,avpbc,pbc,dbc")
    p.add_argument("--trials", type=int, default=None, help="trials per method")
    p.add_argument("--seeds", type=int, default=None, help="final re-runs per method")
    p.add_argument("--budget", default=None)
    p.add_argument("--storage", default=None, help="default sqlite:///OUT/study.db; postgresql://... for several machines")
    p.add_argument("--out", default=None, help="default runs/sweep-TASK")
    p.add_argument("--worker", action="store_true", help="only run trials (for extra machines)")
    p.add_argument("--no-wandb", action="store_true")
    a = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    for noisy in ("lightning", "lightning.pytorch", "lightning_fabric"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        task = get_task(a.task).name
        spec = load_study(Path(a.study), task, trials=a.trials, seeds=a.seeds, budget=a.budget,
                          methods=a.methods.split(",") if a.methods else None)
        if a.no_wandb:
            spec["fixed"] = _deep_update(spec.get("fixed") or {}, {"wandb": False})
        out = Path(a.out or f"runs/sweep-{task}")
        sweep = Sweep(task, spec, out, a.storage)
        sweep.prepare()
        for method in spec["methods"]:
            sweep.optimize(method)
        if a.worker:
            return 0
        finals = {m: sweep.finals(m) for m in spec["methods"]}
        summary = sweep.summarize(finals)
        if (spec.get("fixed") or {}).get("wandb", True):
            log_study_to_wandb(sweep, summary)
        from obd.report import write_report

        report = write_report(out)
    except (UnknownTaskError, DatasetError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for m, row in summary["methods"].items():
        print(f"{m:>6}: {row['mean']:.1f} +/- {row['std']:.1f} (n={row['n']})")
    if "difference" in summary:
        d = summary["difference"]
        print(f"{d['of']}: {d['mean']:+.1f}, 95% CI [{d['ci95'][0]:+.1f}, {d['ci95'][1]:+.1f}]")
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
