"""``make sweep TASK=halfcheetah-medium``: does state-density weighting help on this dataset, and by how much?

For each method (SDW and Av-PBC by default) an Optuna study with the same number of trials
searches the shared space (and SDW its own parameters); pruning sees every evaluation at its own
outer step. Then each method's best configuration, and the random-pairs baseline, run over seeds
1..S, and the comparison (mean +/- std per method; for the first method minus each other one the
paired-by-seed difference with its t interval, Wilcoxon p-value and the Welch interval; see
:mod:`obd.stats`) goes to ``summary.json``, W&B and ``report.md``. A stored study or final run made
from another definition is refused with the difference named, never silently reused.

Storage: SQLite in ``OUT/study.db`` by default, so re-running the same command resumes; with
``--storage postgresql://...`` several ``--worker`` processes on several machines share the
studies (workers only run trials; the main process also runs the finals and the report).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import TrialState
from tqdm.auto import tqdm

from obd import storage as heartbeats
from obd.config import (
    BASELINE_START,
    DISTILL_METHODS,
    RunConfig,
    budget_names,
    build_config,
    deep_update,
    field_type,
    flatten,
    merge,
    nest,
    read_yaml,
    sweeps_dir,
    to_dict,
)
from obd.errors import ConfigError, ObdError, check_writable, cli
from obd.flags import PER_RUN, add_config_flags, config_layer
from obd.runs import Claim, comparable, config_difference, finished_run
from obd.seeding import derive_seed
from obd.storage import Heartbeat, beat_orphans, connect

log = logging.getLogger("obd.sweep")
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
BASELINES = tuple(BASELINE_START)  # the sets that need no outer loop, run beside every study's finals
STUDY_KEYS = (
    "methods",
    "baselines",
    "trials",
    "seeds",
    "budget",
    "sampler_seed",
    "vary_data_per_seed",
    "fixed",
    "search",
    "method_search",
    "pruner",
    "tasks",
)


@dataclass
class StudySpec:
    """A study (``sweeps/default.yaml``): its per-task overrides applied and every key checked by
    :func:`load_study`. ``search`` is shared by the methods, ``method_search`` adds a method's own keys;
    ``fixed`` holds RunConfig fields every run gets; ``baselines`` run beside the finals."""

    methods: list[str]
    trials: int
    seeds: int
    budget: str
    search: dict
    method_search: dict = field(default_factory=dict)
    fixed: dict = field(default_factory=dict)
    baselines: list[str] = field(default_factory=lambda: list(BASELINES))
    sampler_seed: int = 0
    vary_data_per_seed: bool = False
    pruner: dict = field(default_factory=dict)


def default_study() -> Path:
    return sweeps_dir() / "default.yaml"


# ------------------------------------------------------------------ study definition


def load_study(path: Path, task: str, **overrides: Any) -> StudySpec:
    """The YAML study with its per-task overrides and then ``overrides`` (None values ignored) applied;
    every method, budget, fixed key and search key is checked against the config before anything runs."""
    spec = read_yaml(path) or {}
    if not isinstance(spec, dict):
        raise ConfigError(f"{path}: a study is a mapping (methods, trials, seeds, budget, search, ...)")
    unknown_keys = sorted(set(spec) - set(STUDY_KEYS))
    if unknown_keys:
        raise ConfigError(f"{path}: unknown study key(s) {', '.join(unknown_keys)}; known: {', '.join(STUDY_KEYS)}")
    per_task = (spec.pop("tasks", None) or {}).get(task, {})
    spec = deep_update(spec, per_task)
    spec.update({k: v for k, v in overrides.items() if v is not None})
    for key in ("methods", "trials", "seeds", "budget", "search"):
        if key not in spec:
            raise ConfigError(f"{path}: missing {key!r}")
    for key in ("trials", "seeds"):  # checked before any work: a bad value would only fail after the search
        if not isinstance(spec[key], int) or isinstance(spec[key], bool) or spec[key] < 1:
            raise ConfigError(f"{key} must be an integer >= 1, got {spec[key]!r}")
    unknown = [m for m in spec["methods"] if m not in DISTILL_METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(DISTILL_METHODS)}")
    bad = [m for m in spec.get("baselines") or BASELINES if m not in BASELINE_START]
    if bad:
        raise ConfigError(f"{path}: unknown baseline(s) {', '.join(bad)}; choose from {', '.join(BASELINE_START)}")
    if spec["budget"] not in budget_names():
        raise ConfigError(f"unknown budget {spec['budget']!r}; choose one of {', '.join(budget_names())}")
    merge(RunConfig(), spec.get("fixed") or {})
    spaces = [("search", spec["search"] or {})]
    spaces += [(f"method_search.{m}", sp or {}) for m, sp in (spec.get("method_search") or {}).items()]
    for where, space in spaces:
        for key, dim in space.items():
            check_dimension(f"{path}: {where}", key, dim)
    spec["search"] = spec["search"] or {}
    return StudySpec(**{k: v for k, v in spec.items() if v is not None})


def check_dimension(where: str, key: str, dim: dict) -> None:
    """A search dimension names a RunConfig field whose type accepts every value it can take."""
    try:
        tp = field_type(key)
    except ConfigError:
        raise ConfigError(f"{where}: unknown config key '{key}'") from None
    kind = dim.get("type") if isinstance(dim, dict) else None
    samples: dict[str, Callable[[], list]] = {
        "float": lambda: [float(dim["low"]), float(dim["high"])],
        "int": lambda: [int(dim["low"]), int(dim["high"])],
        "categorical": lambda: list(dim["choices"]),
    }
    if kind not in samples:
        raise ConfigError(f"{where}: '{key}' has type {kind!r}; use float, int or categorical")
    probe: dict = {}
    try:
        values = samples[kind]()
    except (KeyError, TypeError, ValueError):
        raise ConfigError(f"{where}: '{key}' needs low/high (float, int) or choices (categorical)") from None
    for v in values:
        probe = nest({key: v})
        try:
            merge(RunConfig(), probe)
        except ConfigError as e:
            raise ConfigError(f"{where}: '{key}' can take {v!r}, which the config refuses ({e})") from None
    del tp


def suggest(trial: optuna.Trial, space: dict) -> dict:
    """Sample the dotted-key search space: {name: {type: float|int|categorical, ...}}."""
    out: dict = {}
    for name, s in space.items():
        kind = s["type"]
        if kind == "float":
            out[name] = trial.suggest_float(name, s["low"], s["high"], log=s.get("log", False))
        elif kind == "int":
            out[name] = trial.suggest_int(name, s["low"], s["high"], step=s.get("step", 1), log=s.get("log", False))
        else:
            out[name] = trial.suggest_categorical(name, s["choices"])
    return out


def run_config(
    spec: StudySpec, task: str, method: str, params: dict, seed: int, out: Path, group: str, job_type: str, name: str
) -> RunConfig:
    """The one builder (:func:`obd.config.build_config`) with the study's layers; ``group``, ``job_type``
    and ``name`` place the run in W&B."""
    return build_config(
        spec.budget,
        [
            spec.fixed,
            nest(params),
            {
                "data": {"source": task},
                "distill": {"method": method, "seed": seed},
                "out": str(out),
                "wandb_group": group,
                "wandb_job_type": job_type,
                "wandb_name": name,
            },
        ],
    )


# ------------------------------------------------------------------ pruning at each evaluation


class TrialPruning:
    """An evaluation listener (see :func:`obd.train.run`): reports each evaluation to the Optuna trial at
    its own outer step and stops the run when the pruner says so."""

    def __init__(self, trial: optuna.Trial):
        self.trial = trial

    def __call__(self, step: int, value: float) -> None:
        self.trial.report(value, step=step)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at outer step {step} (normalized return {value:.1f})")


# ------------------------------------------------------------------ the sweep


def _trial_worker(task: str, spec: StudySpec, out: str, storage: str, method: str, jobs: int, worker: str) -> None:
    """An extra trial process on the same storage (the study's trial target is shared)."""
    from obd.tracking import quiet_libraries

    quiet_libraries()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    Sweep(task, spec, Path(out), storage, show_progress=False, jobs=jobs, worker=worker).optimize(
        method, wait_for_stale=False
    )


def repeated(study: optuna.Study, params: dict) -> optuna.trial.FrozenTrial | None:
    """The finished trial that already ran exactly ``params``, if any."""
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        if t.params == params and "duplicate_of" not in t.user_attrs:
            return t
    return None


class Sweep:
    def __init__(
        self,
        task: str,
        spec: StudySpec,
        out: Path,
        storage: str | None,
        show_progress: bool = True,
        jobs: int = 1,
        batched: bool = False,
        batch_trials: int = 8,
        worker: str = "main",
    ):
        self.task, self.spec, self.out = task, spec, out
        # who proposes trials: each process samples from its own seed (see study())
        self.worker = worker
        self.show_progress = show_progress
        self.jobs = max(1, jobs)
        # batched: trials asked batch_trials at a time and each method's finals (all seeds) advance
        # together through one engine (obd.engine)
        self.batched, self.batch_trials = batched, max(1, batch_trials)
        self.data_hash: str | None = None  # set by prepare(): the dataset every trial and final runs on
        # runs in parallel share the cores: one torch thread each when several run at once
        self.threads = max(1, (os.cpu_count() or 1) // self.jobs)
        out.mkdir(parents=True, exist_ok=True)
        self.url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
        self.storage = connect(self.url)

    def study_name(self, method: str) -> str:
        return f"{self.task}-{method}-{self.spec.budget}"

    def definition(self, method: str) -> dict:
        """What a study's trials depend on: a stored study made from another definition is refused."""
        return {
            "budget": self.spec.budget,
            "fixed": comparable(self.spec.fixed),  # W&B, threads, device: not what trials depend on
            "search": self.space(method),
            "sampler_seed": self.spec.sampler_seed,
            "pruner": self.spec.pruner,
        }

    def study(self, method: str) -> optuna.Study:
        p = self.spec.pruner
        st = optuna.create_study(
            study_name=self.study_name(method),
            storage=self.storage,
            direction="maximize",
            load_if_exists=True,
            pruner=optuna.pruners.MedianPruner(
                n_startup_trials=p.get("n_startup_trials", 2), n_warmup_steps=p.get("n_warmup_steps", 0)
            ),
        )
        # A sampler's state is not stored: rebuilt here, its seed derived from the study, this process's
        # worker name and the trials already stored, so parallel workers and a resumed process do not
        # propose the same first points; the constant liar keeps running trials from being re-proposed.
        seed = derive_seed(self.spec.sampler_seed, "tpe", method, self.worker, len(st.trials))
        st.sampler = optuna.samplers.TPESampler(seed=seed % 2**32, constant_liar=True)
        want = json.loads(json.dumps(self.definition(method)))
        have = st.user_attrs.get("definition")
        if have is None:
            st.set_user_attr("definition", want)
        elif have != want:
            raise ObdError(
                f"study {self.study_name(method)} in {self.out} was made from another definition "
                f"({config_difference(have, want)}); use another --out, or delete it to start over"
            )
        return st

    def space(self, method: str) -> dict:
        return {**self.spec.search, **(self.spec.method_search.get(method) or {})}

    def prepare(self) -> None:
        """Build what every run shares (dataset, teacher, default density) up front, with progress bars:
        inside a trial they would be built silently by the first one."""
        from obd.targets import prepare_targets

        method = next(m for m in ("sdw", "avpbc", "pbc", "dbc") if m in self.spec.methods)
        self.data_hash = prepare_targets(
            self.trial_config(method, {}, 0, self.out),
            method,
            show_progress=self.show_progress,
        ).data_hash
        for m in self.spec.methods:  # trials on another dataset must not mix with new ones
            st = self.study(m)
            have = st.user_attrs.get("data_hash")
            if have is None:
                st.set_user_attr("data_hash", self.data_hash)
            elif have != self.data_hash:
                raise ObdError(
                    f"study {self.study_name(m)} in {self.out} ran on other data (data hash {have}, the "
                    f"dataset's now {self.data_hash}); use another --out, or delete it to start over"
                )

    def optimize(self, method: str, wait_for_stale: bool = True) -> optuna.Study:
        """Run trials until the study holds ``trials`` finished (complete or pruned) ones; with ``jobs`` > 1,
        that many processes run trials at once on the same storage."""
        study = self.study(method)
        target = self.spec.trials
        if wait_for_stale:
            self._wait_for_stale(study)
        helpers = []
        if self.jobs > 1 and wait_for_stale and not self.batched:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            helpers = [
                ctx.Process(
                    target=_trial_worker,
                    args=(self.task, self.spec, str(self.out), self.url, method, self.jobs, f"{self.worker}-{i}"),
                )
                for i in range(1, self.jobs)
            ]
            for h in helpers:
                h.start()
        done_states = (TrialState.COMPLETE, TrialState.PRUNED)

        def n_done() -> int:  # distinct trials: a repeated proposal is not counted
            return sum("duplicate_of" not in t.user_attrs for t in study.get_trials(deepcopy=False, states=done_states))

        bar = tqdm(
            total=target,
            initial=min(n_done(), target),
            desc=f"{method} trials",
            unit="trial",
            disable=not self.show_progress,
        )

        def progress(st: optuna.Study, tr: optuna.trial.FrozenTrial) -> None:
            bar.n = min(n_done(), target)
            try:
                bar.set_postfix(best=f"{st.best_value:.1f}", last=tr.state.name.lower())
            except ValueError:  # no completed trial yet
                bar.set_postfix(last=tr.state.name.lower())
            bar.refresh()

        def n_claimed() -> int:  # finished, or running in some process: parallel workers do not overshoot
            return n_done() + len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))

        if self.batched:
            self._optimize_batched(study, method, target, n_done, progress)
        attempts = 0
        while n_done() < target and attempts < 3 * target:
            if n_claimed() >= target:  # the rest are running elsewhere: wait for them (or their heartbeat to stop)
                time.sleep(2)
                beat_orphans(study)
                optuna.storages.fail_stale_trials(study)
                continue
            study.optimize(
                lambda t: self.objective(t, method),
                n_trials=1,
                catch=(Exception,),
                callbacks=[MaxTrialsCallback(target, states=done_states), progress],
            )
            attempts += 1
        for h in helpers:
            h.join()
        bar.close()
        return study

    def _optimize_batched(self, study: optuna.Study, method: str, target: int, n_done, progress) -> None:
        """Ask-and-tell: ``batch_trials`` trials at a time advance together (:func:`obd.engine.run_many`);
        each reports its evaluations to Optuna and a trial the pruner stops is dropped from the batch. The
        batch's trials heartbeat through the storage; a trial whose worker died (its heartbeat stale, on
        any machine) is failed and retried with the same parameters and run folder, so it resumes from its
        checkpoint when that folder is shared."""
        from obd.engine import run_many

        while n_done() < target:
            beat_orphans(study)
            optuna.storages.fail_stale_trials(study)  # dead workers' trials: failed, and enqueued again
            running = len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
            new = min(self.batch_trials, target - n_done() - running)
            if new <= 0:
                time.sleep(2)  # the rest run in live workers, or wait for their heartbeat to go stale
                continue
            trials, cfgs, listeners = [], [], []
            for trial in (study.ask() for _ in range(new)):  # retries (enqueued) come first
                params = suggest(trial, self.space(method))  # a retried trial gets its stored values back
                same = repeated(study, params)
                if same is not None:
                    trial.set_user_attr("duplicate_of", same.number)
                    progress(study, study.tell(trial, float(same.value)))  # type: ignore[arg-type]
                    continue
                out = Path(trial.user_attrs.get("out") or self.out / "trials" / method / f"trial-{trial.number:03d}")
                cfg = self.trial_config(method, params, trial.number, out)
                cfg.threads = self.threads
                trial.set_user_attr("out", str(out))
                trial.set_user_attr("engine", "batched")
                trial.set_user_attr("worker", self.worker)
                trials.append(trial)
                cfgs.append(cfg)
                listeners.append([TrialPruning(trial)])
            if not trials:
                continue
            try:
                with Heartbeat(self.storage, [t._trial_id for t in trials]):
                    results = run_many(cfgs, listeners, show_progress=self.show_progress)
            except Exception:
                for trial in trials:
                    study.tell(trial, state=TrialState.FAIL)
                raise
            # (KeyboardInterrupt leaves them running: their heartbeat goes stale, and they are retried)
            for trial, res in zip(trials, results):
                if isinstance(res, optuna.TrialPruned):
                    frozen = study.tell(trial, state=TrialState.PRUNED)
                elif isinstance(res, Exception):
                    log.warning("trial %d failed: %s", trial.number, res)
                    frozen = study.tell(trial, state=TrialState.FAIL)
                else:
                    trial.set_user_attr("history", [{"step": h["step"], "value": h["score"]} for h in res["history"]])
                    frozen = study.tell(trial, float(res["score"]))
                progress(study, frozen)

    def _wait_for_stale(self, study: optuna.Study) -> None:
        """SQLite (one machine): trials left RUNNING by a killed process fail once their heartbeat is older
        than the grace period and are then retried with the same parameters; wait that long rather than
        run new trials around them."""
        if not self.storage.url.startswith("sqlite"):
            return  # shared storage: other workers' trials are alive; optuna fails stale ones as trials start
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running:
            return
        log.info(
            "%d trial(s) marked running (a stopped process, or a live worker): waiting %d s for their "
            "heartbeat to expire",
            len(running),
            heartbeats.GRACE_S,
        )
        beat_orphans(study)
        time.sleep(heartbeats.GRACE_S + 1)
        optuna.storages.fail_stale_trials(study)

    def objective(self, trial: optuna.Trial, method: str) -> float:
        from obd.train import run

        params = suggest(trial, self.space(method))
        same = repeated(trial.study, params)
        if same is not None:  # told the earlier trial's value, not run again, not counted
            trial.set_user_attr("duplicate_of", same.number)
            log.info("%s trial %d repeats trial %d's parameters: not run", method, trial.number, same.number)
            return float(same.value)  # type: ignore[arg-type]
        # a retried trial (its worker died) keeps its run folder, so it continues from its checkpoint
        out = Path(trial.user_attrs.get("out") or self.out / "trials" / method / f"trial-{trial.number:03d}")
        cfg = self.trial_config(method, params, trial.number, out)
        cfg.threads = self.threads
        trial.set_user_attr("out", str(out))
        trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
        m = run(cfg, show_progress=False, listeners=[TrialPruning(trial)])
        trial.set_user_attr("history", [{"step": h["step"], "value": h["score"]} for h in m["history"]])
        return float(m["score"])

    # -------------------------------------------------------------- finals and comparison
    def wandb_group(self) -> str:
        """One W&B group per study: its task, budget and OUT."""
        return f"{self.task}-{self.spec.budget}-{self.out.resolve().name}"

    def trial_config(self, method: str, params: dict, number: int, out: Path) -> RunConfig:
        name = f"{self.task}-{method}-trial-{number:03d}"
        return run_config(self.spec, self.task, method, params, 0, out, self.wandb_group(), "trial", name)

    def final_config(self, method: str, seed: int, out: Path) -> RunConfig:
        params = self.study(method).best_trial.params if method in DISTILL_METHODS else {}
        job = "final" if method in DISTILL_METHODS else "baseline"
        name = f"{self.task}-{method}-final-s{seed}"
        cfg = run_config(self.spec, self.task, method, params, seed, out, self.wandb_group(), job, name)
        if self.spec.vary_data_per_seed:  # each final seed: its own generated dataset and teacher
            merge(cfg, {"data": {"data_seed": seed}, "teacher": {"td3bc": {"seed": seed}}})
        return cfg

    def finals(self, method: str) -> dict[int, dict]:
        """Run ``method`` (its best configuration; a baseline as is) over seeds 1..S; a finished seed is
        kept only if its stored configuration is the one the study resolves to now."""
        results: dict[int, dict] = {}
        todo: dict[int, dict] = {}
        for seed in range(1, self.spec.seeds + 1):
            out = self.out / "final" / method / f"seed-{seed}"
            cfg = self.final_config(method, seed, out)
            cfg.threads = self.threads
            m = finished_run(out, cfg, self.data_hash, f"use another --out, or delete {out.parent} to rerun")
            if m is not None:
                results[seed] = m
            else:
                todo[seed] = to_dict(cfg)
        # one process per final: a seed another process (a second sweep into this OUT) is running is
        # skipped now and read back once that process lets it go
        from obd.train import run_config_dict, run_configs

        claims = {seed: Claim(self.out / "final" / method / f"seed-{seed}") for seed in todo}
        elsewhere = [seed for seed, c in claims.items() if not c.take()]
        mine = {seed: c for seed, c in todo.items() if seed not in elsewhere}
        try:
            if self.batched and method in DISTILL_METHODS and mine:
                from obd.engine import run_many

                done = run_many([merge(RunConfig(), c) for c in mine.values()], show_progress=self.show_progress)
                for seed, res in zip(mine, done):
                    if isinstance(res, Exception):
                        raise res
                    results[seed] = res
            else:
                results.update(run_configs(mine, self.jobs, f"{method} finals", self.show_progress))
            for seed in elsewhere:
                log.info("%s final seed %d: running in another process; waiting for it", method, seed)
                claims[seed].take(wait=True)
                path = self.out / "final" / method / f"seed-{seed}" / "metrics.json"
                # finished there, or that process died first: then it is run here
                results[seed] = json.loads(path.read_text()) if path.is_file() else run_config_dict(todo[seed])
        finally:
            for c in claims.values():
                c.release()
        for seed in sorted(results):
            log.info("%s final seed %d: %.1f", method, seed, results[seed]["score"])
        return {seed: results[seed] for seed in sorted(results)}

    def summarize(self, finals: dict[str, dict[int, dict]]) -> dict:
        from obd.stats import method_summary, paired_comparison, teacher_of

        rows: dict[str, dict] = {}
        for m, runs in finals.items():
            row = method_summary(runs)
            if m in DISTILL_METHODS:
                st = self.study(m)
                row.update(best_params=st.best_trial.params, best_trial_value=st.best_value, trials=_trial_counts(st))
            rows[m] = row
        first = next(iter(finals.values()))
        some = next(iter(first.values()))
        summary: dict = {
            "task": self.task,
            "budget": self.spec.budget,
            "methods": rows,
            "protocol": some["protocol"],
            "transitions": some["transitions"],
            "behaviour_score": some["behaviour_score"],
            "teacher": teacher_of([r for runs in finals.values() for r in runs.values()]),
            "comparisons": {},
        }
        main_m = self.spec.methods[0]
        for other in [m for m in finals if m != main_m]:
            summary["comparisons"][f"{main_m} - {other}"] = paired_comparison(
                rows[main_m]["per_seed"], rows[other]["per_seed"]
            )
        (self.out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        return summary


def _trial_counts(study: optuna.Study) -> dict:
    trials = study.get_trials(deepcopy=False)
    return {
        s.name.lower(): sum(t.state == s for t in trials)
        for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    }


def log_study_to_wandb(sweep: Sweep, summary: dict) -> None:
    """The study's own W&B run (job type ``study``, in the study's group): the comparison table, the paired
    differences in its summary and the report's figures."""
    import wandb

    from obd.tracking import wandb_init

    r = wandb_init(
        project=sweep.spec.fixed.get("wandb_project", "obd"),
        group=sweep.wandb_group(),
        name=f"{sweep.wandb_group()}-study",
        job_type="study",
        dir=str(sweep.out),
        config={"study": sweep.spec, "task": sweep.task},
        reinit="create_new",
    )
    table = wandb.Table(columns=["method", "mean", "std", "n", "best_params"])
    for m, row in summary["methods"].items():
        table.add_data(m, row["mean"], row["std"], row["n"], json.dumps(row.get("best_params")))
    r.log({"comparison": table})
    for name, c in summary["comparisons"].items():
        if "paired_t_ci" in c:
            r.summary.update(
                {
                    f"{name}/mean": c["mean_difference"],
                    f"{name}/ci_low": c["paired_t_ci"][0],
                    f"{name}/ci_high": c["paired_t_ci"][1],
                }
            )
    figures = {p.stem: wandb.Image(str(p)) for p in sorted(sweep.out.glob("*.png"))}
    if figures:
        r.log(figures)
    r.finish()


def with_flags(spec: StudySpec, flags: dict) -> None:
    """RunConfig fields given as flags join the study's ``fixed`` layer (so its definition); a searched
    field or a bad value is one line before any work."""
    searched = set(spec.search).union(*(sp or {} for sp in spec.method_search.values()))
    clash = sorted(k for k in flatten(flags) if k in searched)
    if clash:
        raise ConfigError(f"--{clash[0]}: the study searches this field; drop the flag or its search dimension")
    if flags:
        spec.fixed = deep_update(spec.fixed, flags)
        merge(RunConfig(), spec.fixed)
    if "device" in flags:
        from obd.devices import resolve_device

        resolve_device(flags["device"])


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m obd.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--task", default="halfcheetah-medium", help="default halfcheetah-medium")
    p.add_argument("--study", default=None, help=f"YAML study definition (default: {default_study()})")
    p.add_argument(
        "--methods", default=None, help="comma-separated, e.g. sdw,avpbc,pbc,dbc (first is compared with the others)"
    )
    p.add_argument("--trials", type=int, default=None, help="trials per method")
    p.add_argument("--seeds", type=int, default=None, help="final re-runs per method (seeds 1..N)")
    p.add_argument("--budget", default=None, help="a budget of sweeps/budgets/")
    p.add_argument(
        "--storage", default=None, help="default sqlite:///OUT/study.db; postgresql://... for several machines"
    )
    p.add_argument("--out", default=None, help="default runs/sweep-TASK")
    p.add_argument("--worker", action="store_true", help="only run trials (for extra machines)")
    p.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="runs at once on this machine, one torch thread each (default: the number of cores, at most 2)",
    )
    p.add_argument("--no-wandb", action="store_true", help="no W&B runs")
    p.add_argument(
        "--batched",
        action="store_true",
        help="trials asked --batch-trials at a time and each method's finals (all seeds) run as one batched "
        "computation, pruned trials dropped from their batch (for GPUs)",
    )
    p.add_argument("--batch-trials", type=int, default=8, help="trials per batch with --batched (default 8)")
    add_config_flags(p, exclude=(*PER_RUN, "threads"))  # threads: --jobs sets them
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    from obd.data import get_task
    from obd.tracking import setup_logging

    setup_logging()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    task = get_task(a.task).name
    spec = load_study(
        Path(a.study) if a.study else default_study(),
        task,
        trials=a.trials,
        seeds=a.seeds,
        budget=a.budget,
        methods=a.methods.split(",") if a.methods else None,
    )
    flags = deep_update(config_layer(a), {"wandb": False} if a.no_wandb else {})
    with_flags(spec, flags)
    out = Path(a.out or f"runs/sweep-{task}")
    jobs = min(2, os.cpu_count() or 1) if a.jobs is None else a.jobs
    if jobs < 1 or a.batch_trials < 1:
        raise ConfigError(f"--jobs and --batch-trials must be >= 1, got {jobs} and {a.batch_trials}")
    check_writable(out)
    worker = f"{socket.gethostname()}:{os.getpid()}" if a.worker else "main"  # extra machines: one name each
    sweep = Sweep(task, spec, out, a.storage, jobs=jobs, batched=a.batched, batch_trials=a.batch_trials, worker=worker)
    sweep.prepare()
    for method in spec.methods:
        sweep.optimize(method)
    if a.worker:
        return 0
    finals = {m: sweep.finals(m) for m in (*spec.methods, *spec.baselines)}
    summary = sweep.summarize(finals)
    from obd.report import write_report

    report = write_report(out)
    if spec.fixed.get("wandb", True):
        log_study_to_wandb(sweep, summary)  # after the report: its figures go to the study's run
    for m, row in summary["methods"].items():
        print(f"{m:>6}: {row['mean']:.1f} +/- {row['std']:.1f} (n={row['n']})")
    for name, c in summary["comparisons"].items():
        ci = c.get("paired_t_ci")
        print(
            f"{name}: {c['mean_difference']:+.1f}"
            + (f", 95% paired t CI [{ci[0]:+.1f}, {ci[1]:+.1f}]" if ci else "")
            + f": {c['verdict']}"
        )
    print(f"report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(cli(main))
