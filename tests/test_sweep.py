import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import optuna
import pytest
import sqlalchemy.exc
import yaml
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from obd.errors import ConfigError
from obd.sweep import TrialPruning, default_study, load_study

STUDY = {
    "methods": ["sdw", "avpbc"],
    "trials": 2,
    "seeds": 2,
    "budget": "smoke",
    "sampler_seed": 0,
    "fixed": {
        "outer_steps": 4,
        "eval_every": 2,
        "checkpoint_every": 2,
        "threads": 1,
        "data": {"size": 2000},
        "teacher": {"td3bc": {"steps": 100, "hidden": [16, 16]}, "eval_episodes": 0},
        "distill": {"n_synthetic": 8, "hidden": [16, 16], "test_batches": 1, "batch_size": 32},
        "eval": {"policies": 2, "episodes": 1, "inner_steps": 5, "hidden": [16, 16]},
    },
    "search": {
        "distill.outer_lr": {"type": "float", "low": 0.05, "high": 0.5, "log": True},
        "distill.inner_steps": {"type": "int", "low": 2, "high": 4},
    },
    "method_search": {
        "sdw": {
            "density.alpha": {"type": "float", "low": 0.1, "high": 1.0},
            "density.k": {"type": "int", "low": 3, "high": 8},
        }
    },
    "pruner": {"n_startup_trials": 1, "n_warmup_steps": 0},
}


def write_study(tmp_path, **over) -> Path:
    spec = {**STUDY, **over}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def sweep_cmd(study: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "obd.sweep",
        "--task",
        "hopper-random",
        "--study",
        str(study),
        "--out",
        str(out),
        *extra,
    ]


def env(tmp_path) -> dict:
    return {**os.environ, "OBD_DATA_DIR": str(tmp_path / "data"), "WANDB_MODE": "offline"}


def trials_of(out: Path, method: str, storage: str | None = None):
    st = optuna.load_study(
        study_name=f"hopper-random-{method}-smoke", storage=storage or f"sqlite:///{out / 'study.db'}"
    )
    return st.get_trials(deepcopy=False)


@pytest.mark.slow
def test_tiny_study_end_to_end_and_resume(tmp_path):
    study, out = write_study(tmp_path), tmp_path / "sweep"
    r = subprocess.run(sweep_cmd(study, out), capture_output=True, text=True, env=env(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    # the three sets that need no outer loop always run beside the methods
    assert set(summary["methods"]) == {"sdw", "avpbc", "random", "random-teacher", "kmeans-teacher"}
    assert summary["protocol"]["policies"] == 2 and summary["protocol"]["last_k"] == 5
    for m in ("sdw", "avpbc"):
        row = summary["methods"][m]
        assert row["n"] == 2 and len(row["per_seed"]) == 2
        done = [t for t in trials_of(out, m) if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
        assert len(done) == 2
        assert (out / "final" / m / "seed-2" / "synthetic.npz").is_file()
    assert "density.alpha" in summary["methods"]["sdw"]["best_params"]
    assert "density.alpha" not in summary["methods"]["avpbc"]["best_params"]
    c = summary["comparisons"]["sdw - avpbc"]
    assert c["n_pairs"] == 2 and c["paired_t_ci"][0] <= c["mean_difference"] <= c["paired_t_ci"][1]
    assert "only 2 paired seeds" in c["verdict"]
    # the console is ours, not W&B's
    assert len([ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("wandb:")]) <= 2
    # the study is a standard Optuna RDB: the optuna CLI (and optuna-dashboard) read it
    ls = subprocess.run(
        [
            str(Path(sys.executable).parent / "optuna"),
            "studies",
            "--storage",
            f"sqlite:///{out / 'study.db'}",
            "-f",
            "json",
        ],
        capture_output=True,
        text=True,
    )
    assert ls.returncode == 0 and "hopper-random-sdw-smoke" in ls.stdout
    report = (out / "report.md").read_text()
    assert "| sdw |" in report and "| avpbc |" in report and "| random |" in report and "sdw - avpbc" in report
    assert "smoke: a plumbing check; the numbers mean nothing" in report
    assert "did not move" not in report  # the smoke budget's Adam moves the sets
    for png in ("returns.png", "curves.png", "projection.png"):
        assert (out / png).stat().st_size > 1000
    # W&B: one offline run per trial and per final run, plus the study run
    runs = list(out.rglob("offline-run-*"))
    assert len(runs) >= 2 * 2 + 2 * 2 + 1
    # a second invocation resumes: no new trials, finals untouched
    mtime = (out / "final" / "sdw" / "seed-1" / "metrics.json").stat().st_mtime
    r2 = subprocess.run(sweep_cmd(study, out), capture_output=True, text=True, env=env(tmp_path), cwd=tmp_path)
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert len(trials_of(out, "sdw")) == 2 and len(trials_of(out, "avpbc")) == 2
    assert (out / "final" / "sdw" / "seed-1" / "metrics.json").stat().st_mtime == mtime
    # trials and finals on a dataset generated again since (other content) are refused, not mixed in
    import h5py

    data = tmp_path / "data" / "datasets" / "hopper-random-n2000-s0.hdf5"
    with h5py.File(data, "r+") as f:
        f["observations"][0, 0] += 1.0
    r = subprocess.run(sweep_cmd(study, out), capture_output=True, text=True, env=env(tmp_path), cwd=tmp_path)
    assert r.returncode == 2 and "ran on other data" in r.stderr and "Traceback" not in r.stderr
    with h5py.File(data, "r+") as f:
        f["observations"][0, 0] -= 1.0
    # a changed study in the same OUT is refused with the difference named (it used to reuse old finals)
    changed = write_study(
        tmp_path, fixed={**STUDY["fixed"], "distill": {**STUDY["fixed"]["distill"], "n_synthetic": 4}}
    )
    r3 = subprocess.run(sweep_cmd(changed, out), capture_output=True, text=True, env=env(tmp_path), cwd=tmp_path)
    assert r3.returncode == 2 and "another definition" in r3.stderr and "n_synthetic" in r3.stderr
    assert "Traceback" not in r3.stderr


@pytest.mark.slow
def test_killed_sweep_resumes_without_losing_or_repeating_trials(tmp_path):
    study = write_study(
        tmp_path,
        methods=["avpbc"],
        trials=4,
        seeds=1,
        fixed={**STUDY["fixed"], "outer_steps": 150, "eval_every": 50, "wandb": False},
    )
    out = tmp_path / "sweep"
    proc = subprocess.Popen(
        sweep_cmd(study, out),
        env=env(tmp_path),
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 300
    before = []
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
        if not (out / "study.db").exists():
            continue
        try:
            trials = trials_of(out, "avpbc")
        except (KeyError, sqlalchemy.exc.SQLAlchemyError):  # no study yet, or the sweep is creating the schema
            continue
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        if len(done) >= 1 and any(t.state == TrialState.RUNNING for t in trials):
            before = [(t.number, t.value, t.params) for t in done]
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait()
    assert before, "the sweep never reached a second trial"
    r = subprocess.run(sweep_cmd(study, out), capture_output=True, text=True, env=env(tmp_path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    trials = trials_of(out, "avpbc")
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(finished) == 4  # exactly the target: none lost, none extra
    for number, value, params in before:  # finished trials kept as they were
        t = trials[number]
        assert t.state == TrialState.COMPLETE and t.value == value and t.params == params
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert 1 <= len(failed) <= 2  # the killed trials (one per parallel job) are recorded ...
    for f in failed:  # ... and each is retried once with its parameters
        retry = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == f.number]
        assert len(retry) == 1
        if f.params:  # a trial killed before its parameters were sampled has none to keep; its retry samples anew
            assert retry[0].params == f.params


def test_pruner_sees_each_evaluation_step():
    study = optuna.create_study(
        direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    )

    def objective(trial, values):
        listen = TrialPruning(trial)
        for step, v in values:
            listen(step, v)
        return values[-1][1]

    study.optimize(lambda t: objective(t, [(100, 50.0), (200, 60.0), (300, 70.0)]), n_trials=1)
    assert study.trials[0].intermediate_values == {100: 50.0, 200: 60.0, 300: 70.0}
    study.optimize(lambda t: objective(t, [(100, 10.0), (200, 5.0), (300, 80.0)]), n_trials=1)
    assert study.trials[1].state == TrialState.PRUNED
    assert study.trials[1].intermediate_values == {100: 10.0}  # pruned at the first weak evaluation


def test_study_files_are_checked_against_the_config(tmp_path):
    spec = load_study(default_study(), "hopper-medium", trials=3)
    assert spec.trials == 3 and spec.methods == ["sdw", "avpbc"]
    assert load_study(write_study(tmp_path, tasks={"hopper-medium": {"trials": 9}}), "hopper-medium").trials == 9
    with pytest.raises(ConfigError, match="unknown budget"):
        load_study(write_study(tmp_path, budget="huge"), "hopper-random")
    with pytest.raises(ConfigError, match="unknown method.*xyz"):
        load_study(write_study(tmp_path, methods=["sdw", "xyz"]), "hopper-random")
    # a typo in a search key is refused before any trial, not turned into failed trials
    with pytest.raises(ConfigError, match="unknown config key 'distill.inner_lrr'"):
        load_study(
            write_study(tmp_path, search={"distill.inner_lrr": {"type": "float", "low": 0.1, "high": 1}}),
            "hopper-random",
        )
    with pytest.raises(ConfigError, match="'distill.inner_steps' can take 2.5"):
        load_study(
            write_study(tmp_path, search={"distill.inner_steps": {"type": "categorical", "choices": [2.5]}}),
            "hopper-random",
        )
    with pytest.raises(ConfigError, match="unknown config key 'distill.nope'"):
        load_study(write_study(tmp_path, fixed={"distill": {"nope": 1}}), "hopper-random")


def test_search_never_changes_the_evaluation_learner():
    """a trial that searches distill.inner_lr/inner_steps is still scored by the published learner."""
    from obd.config import EvalConfig
    from obd.sweep import run_config

    spec = load_study(default_study(), "halfcheetah-medium")
    cfg = run_config(
        spec,
        "halfcheetah-medium",
        "sdw",
        {"distill.inner_lr": 0.05, "distill.inner_steps": 50},
        0,
        Path("x"),
        "g",
        "trial",
        "t",
    )
    assert cfg.distill.inner_lr == 0.05 and cfg.distill.inner_steps == 50
    published = EvalConfig()
    assert (cfg.eval.inner_lr, cfg.eval.inner_steps, cfg.eval.hidden, cfg.eval.init) == (
        published.inner_lr,
        published.inner_steps,
        published.hidden,
        published.init,
    )


@pytest.mark.slow
def test_two_workers_share_a_postgresql_study(tmp_path, postgres):
    study = write_study(
        tmp_path,
        methods=["avpbc"],
        trials=4,
        seeds=1,
        fixed={**STUDY["fixed"], "outer_steps": 40, "eval_every": 20, "wandb": False},
    )
    out = tmp_path / "sweep"
    cmd = sweep_cmd(study, out, "--storage", postgres, "--worker")
    workers = [
        subprocess.Popen(
            cmd, env=env(tmp_path), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    for w in workers:
        _, err = w.communicate(timeout=600)
        assert w.returncode == 0, err[-3000:]
    trials = trials_of(out, "avpbc", storage=postgres)
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert 4 <= len(finished) <= 5  # the target; a worker may finish one it started just before the target
    # one study, not two: every trial is in the shared storage with its worker recorded. (Which worker
    # ran how many depends on start-up timing, so it is not asserted.)
    assert all("worker" in t.user_attrs for t in finished)
    assert len(optuna.get_all_study_summaries(postgres)) == 1
    assert len({t.number for t in trials}) == len(trials)


def test_finals_can_vary_data_and_teacher_seed_per_seed(tmp_path):
    """The finals may draw a fresh dataset and teacher per seed, so a claim need not rest on one of each."""
    from obd.sweep import Sweep

    spec = load_study(write_study(tmp_path, vary_data_per_seed=True), "hopper-random")
    sw = Sweep("hopper-random", spec, tmp_path / "s", None, show_progress=False)
    cfg = sw.final_config("random", 3, tmp_path / "s" / "final")
    assert cfg.data.data_seed == 3 and cfg.teacher.td3bc.seed == 3 and cfg.distill.seed == 3
    spec2 = load_study(write_study(tmp_path), "hopper-random")
    cfg2 = Sweep("hopper-random", spec2, tmp_path / "s2", None, show_progress=False).final_config(
        "random", 3, tmp_path / "x"
    )
    assert cfg2.data.data_seed == 0 and cfg2.teacher.td3bc.seed == 0


@pytest.mark.slow
def test_batched_sweep_asks_trials_in_batches_and_takes_up_orphaned_ones(tmp_path, monkeypatch):
    """Ask-and-tell, batch_trials trials advanced together; a trial the pruner stops is
    dropped from its batch and told pruned; a trial a stopped process left running is resumed."""
    import time

    import obd.storage
    from obd.sweep import Sweep

    monkeypatch.setattr(obd.storage, "GRACE_S", 1)
    monkeypatch.setattr(obd.storage, "HEARTBEAT_S", 1)
    monkeypatch.setenv("OBD_DATA_DIR", str(tmp_path / "data"))
    spec = load_study(write_study(tmp_path, trials=3, methods=["avpbc"]), "hopper-random")
    spec.fixed["wandb"] = False
    out = tmp_path / "sweep"
    sw = Sweep("hopper-random", spec, out, None, show_progress=False, batched=True, batch_trials=2)
    study = sw.study("avpbc")
    orphan = study.ask()  # left running by a process that no longer exists
    orphan.suggest_float("distill.outer_lr", 0.05, 0.5, log=True)
    orphan.suggest_int("distill.inner_steps", 2, 4)
    orphan.set_user_attr("engine", "batched")
    orphan.set_user_attr("worker", f"{socket.gethostname()}:999999999")  # it never beat: an older obd's trial
    time.sleep(1.5)
    # the pruner: a trial whose first evaluation is below every completed one stops there
    calls: list[int] = []
    real_should_prune = optuna.trial.Trial.should_prune

    def should_prune(self):
        calls.append(self.number)
        return self.number == 2 or real_should_prune(self)

    monkeypatch.setattr(optuna.trial.Trial, "should_prune", should_prune)
    sw.prepare()
    sw.optimize("avpbc")
    trials = trials_of(out, "avpbc")
    # the orphan went stale, failed, and was taken up again with its parameters
    assert trials[0].state == TrialState.FAIL
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 0)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    assert retry.state in finished and retry.params == orphan.params
    assert trials[2].state == TrialState.PRUNED and list(trials[2].intermediate_values) == [2]  # dropped early
    assert trials[1].state == TrialState.COMPLETE and sorted(trials[1].intermediate_values) == [2, 4]
    assert sum(t.state in finished for t in trials) == 3
    assert all(t.user_attrs["engine"] == "batched" for t in trials[1:])
    assert not (out / "trials" / "avpbc" / "trial-002" / "metrics.json").exists()


def test_a_stored_run_from_before_a_new_field_is_still_the_same_configuration():
    """A finished run whose stored config predates a field (it ran with the default) is kept; an
    execution detail (CUDA graph on or off) never makes a difference; a real change does."""
    from obd.config import RunConfig, to_dict
    from obd.runs import comparable_run, config_difference

    now = to_dict(RunConfig())
    old = to_dict(RunConfig())
    del old["distill"]["inner_precision"], old["distill"]["cuda_graph"]
    assert config_difference(comparable_run(old), comparable_run(now)) is None
    eager = to_dict(RunConfig())
    eager["distill"]["cuda_graph"] = False
    assert config_difference(comparable_run(eager), comparable_run(now)) is None
    other = to_dict(RunConfig())
    other["distill"]["inner_precision"] = "bfloat16"
    assert config_difference(comparable_run(other), comparable_run(now)).startswith("distill.inner_precision")


def test_unknown_study_keys_and_baselines_are_refused(tmp_path):
    from obd.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown study key.*seed_count"):
        load_study(write_study(tmp_path, seed_count=3), "hopper-random")
    with pytest.raises(ConfigError, match="unknown baseline.*random-pairs"):
        load_study(write_study(tmp_path, baselines=["random-pairs"]), "hopper-random")
    assert load_study(write_study(tmp_path, baselines=["kmeans-teacher"]), "hopper-random").baselines == [
        "kmeans-teacher"
    ]


def test_bad_counts_and_unwritable_places_are_one_line_before_any_work(tmp_path, capsys):
    from obd.behavior.generate import collect
    from obd.data import get_task
    from obd.errors import ObdError, cli
    from obd.sweep import main

    study = write_study(tmp_path)
    for flag in ("--trials", "--seeds"):
        assert (
            cli(main, ["--task", "hopper-random", "--study", str(study), flag, "0", "--out", str(tmp_path / "s")]) == 2
        )
        assert f"{flag[2:]} must be an integer >= 1" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert cli(main, ["--task", "hopper-random", "--study", str(study), "--out", str(tmp_path / "file" / "s")]) == 2
    assert "cannot write there" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    os.environ["OBD_DATA_DIR"], before = str(tmp_path / "file" / "data"), os.environ.get("OBD_DATA_DIR")
    try:
        with pytest.raises(ObdError, match="OBD_DATA_DIR: .* cannot write there"):
            collect(get_task("hopper-random"), 100, 0, show_progress=False)
    finally:
        os.environ.pop("OBD_DATA_DIR") if before is None else os.environ.update(OBD_DATA_DIR=before)


def test_config_flags_join_the_studys_fixed_fields_and_a_searched_one_is_refused(tmp_path):
    from obd.errors import ConfigError
    from obd.flags import config_layer
    from obd.sweep import parser, with_flags

    spec = load_study(write_study(tmp_path), "hopper-random")
    flags = config_layer(parser().parse_args(["--eval.policies", "3", "--density.clip", "7"]))
    with_flags(spec, flags)
    assert spec.fixed["eval"]["policies"] == 3 and spec.fixed["density"]["clip"] == 7
    assert spec.fixed["eval"]["hidden"] == [16, 16]  # the study's own fixed fields stay
    searched = next(iter(spec.search))
    with pytest.raises(ConfigError, match=f"--{searched}: the study searches this field"):
        with_flags(spec, config_layer(parser().parse_args([f"--{searched}", "0.02"])))
    with pytest.raises(ConfigError, match="eval.policies"):
        with_flags(spec, config_layer(parser().parse_args(["--eval.policies", "many"])))


def test_workers_and_resumed_processes_propose_distinct_trials_and_a_repeat_is_not_run(tmp_path, monkeypatch):
    import obd.train
    from obd.sweep import Sweep

    runs: list[dict] = []

    def fake_run(cfg, show_progress=False, listeners=()):
        runs.append({"outer_lr": cfg.distill.outer_lr, "inner_steps": cfg.distill.inner_steps})
        score = -abs(cfg.distill.outer_lr - 0.2)
        return {"history": [{"step": 4, "score": score}], "score": score}

    monkeypatch.setattr(obd.train, "run", fake_run)
    out = tmp_path / "s"

    def sweep(trials: int, worker: str) -> Sweep:
        spec = load_study(write_study(tmp_path, trials=trials), "hopper-random")
        return Sweep("hopper-random", spec, out, None, show_progress=False, worker=worker)

    sweep(2, "main").optimize("avpbc")  # the main process
    sweep(4, "main").optimize("avpbc")  # the same process name again: a resumed process
    sweep(6, "main-1").optimize("avpbc")  # another worker
    study = sweep(6, "main").study("avpbc")
    params = [tuple(sorted(t.params.items())) for t in study.trials]
    assert len(params) == 6 and len(set(params)) == 6, params
    assert len(runs) == 6
    # a proposal that repeats a finished trial is told that trial's value and not run
    study.enqueue_trial(study.trials[0].params)
    sweep(7, "main").optimize("avpbc")
    dup = [t for t in sweep(7, "main").study("avpbc").trials if "duplicate_of" in t.user_attrs]
    assert [t.user_attrs["duplicate_of"] for t in dup] == [0] and dup[0].value == study.trials[0].value
    assert len(runs) == 7  # the repeat was not run; one distinct trial ran in its place


def test_report_flags_sets_that_did_not_move_or_equal_another_methods(tmp_path):
    import numpy as np

    from obd.report import set_warnings

    for method, change in (("sdw", 0.0), ("avpbc", 0.0), ("dbc", 0.2)):
        for seed in (1, 2):
            d = tmp_path / "final" / method / f"seed-{seed}"
            d.mkdir(parents=True)
            (d / "metrics.json").write_text(json.dumps({"set_change": {"l2": change, "relative": change}}))
            states = np.full((4, 3), float(seed)) + (change if method == "dbc" else 0.0)
            np.savez(d / "synthetic.npz", states=states)
    w = set_warnings(tmp_path, ["sdw", "avpbc", "dbc", "random"])
    assert any(x.startswith("sdw: every final set is its start") for x in w)
    assert any(x.startswith("avpbc: every final set is its start") for x in w)
    assert "sdw and avpbc: identical final sets" in w and not any(x.startswith("dbc") for x in w)


def test_a_final_claimed_by_another_process_is_read_back_not_run_again(tmp_path, monkeypatch):
    import threading

    import obd.train
    from obd.runs import Claim
    from obd.sweep import Sweep

    ran: list[int] = []

    def fake_run(cfg, show_progress=False, listeners=()):
        ran.append(cfg.distill.seed)
        return {"score": float(cfg.distill.seed), "history": [], "config": {}}

    monkeypatch.setattr(obd.train, "run", fake_run)
    spec = load_study(write_study(tmp_path, seeds=2), "hopper-random")
    sweep = Sweep("hopper-random", spec, tmp_path / "s", None, show_progress=False)
    other = Claim(tmp_path / "s" / "final" / "random" / "seed-1")
    assert other.take()  # another process is computing seed 1

    def finish_elsewhere() -> None:
        (tmp_path / "s" / "final" / "random" / "seed-1" / "metrics.json").write_text(json.dumps({"score": 41.0}))
        other.release()

    timer = threading.Timer(1.0, finish_elsewhere)
    timer.start()
    results = sweep.finals("random")
    timer.join()
    assert ran == [2] and results[1]["score"] == 41.0 and results[2]["score"] == 2.0


def test_curves_figure_shows_baselines_as_reference_lines_and_names_the_budget(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.container import ErrorbarContainer

    from obd.report import plot_curves

    hist = [{"step": s, "score": float(s)} for s in (10, 20, 30)]
    for method in ("sdw", "avpbc", "random"):
        for seed in (1, 2):
            d = tmp_path / "final" / method / f"seed-{seed}"
            d.mkdir(parents=True)
            h = hist if method != "random" else [{"step": 0, "score": 3.0}]
            (d / "metrics.json").write_text(json.dumps({"history": h, "score": h[-1]["score"]}))
    fig = plot_curves(tmp_path, ["sdw", "avpbc", "random"], tmp_path / "c.png", "hopper-medium", "quick")
    ax = fig.axes[0]
    assert "budget quick" in ax.get_title() and "std over seeds" in ax.get_title()
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert [c.get_label() for c in bars] == ["SDW (n=2 seeds)", "Av-PBC (n=2 seeds)"]
    xs = [c.lines[0].get_xdata() for c in bars]
    assert not np.array_equal(xs[0], xs[1])  # identical curves are offset, so neither hides the other
    ref = [ln for ln in ax.get_lines() if ln.get_label().startswith("random real pairs")]
    assert len(ref) == 1 and set(ref[0].get_ydata()) == {3.0}  # a horizontal line, not a dot at step 0


def test_a_batched_trial_whose_worker_died_is_retried_in_its_own_folder(tmp_path, monkeypatch):
    import time

    import obd.engine
    import obd.storage
    from obd.storage import Heartbeat
    from obd.sweep import Sweep

    monkeypatch.setattr(obd.storage, "HEARTBEAT_S", 1)
    monkeypatch.setattr(obd.storage, "GRACE_S", 2)
    batches: list[list[str]] = []

    def fake_advance(cfgs, listeners, show_progress=True):
        batches.append([c.out for c in cfgs])
        return [{"score": 1.0, "history": [{"step": 4, "score": 1.0}]} for _ in cfgs]

    monkeypatch.setattr(obd.engine, "run_many", fake_advance)
    spec = load_study(write_study(tmp_path, trials=2), "hopper-random")
    sweep = Sweep("hopper-random", spec, tmp_path / "s", None, show_progress=False, batched=True, batch_trials=2)
    study = sweep.study("avpbc")
    # a worker on some machine took a trial and died: its heartbeats stop
    dead = study.ask()
    dead.suggest_float("distill.outer_lr", 0.05, 0.5, log=True)
    dead.suggest_int("distill.inner_steps", 2, 4)
    dead.set_user_attr("out", str(tmp_path / "s" / "trials" / "avpbc" / "trial-000"))
    with Heartbeat(sweep.storage, [dead._trial_id]):
        pass
    time.sleep(3)  # past the grace period
    sweep.optimize("avpbc", wait_for_stale=False)
    trials = sweep.study("avpbc").trials
    assert trials[0].state == TrialState.FAIL  # failed through its stale heartbeat, not by host and pid
    retry = next(t for t in trials if t.system_attrs.get("failed_trial") == 0)
    assert retry.state == TrialState.COMPLETE and retry.params == trials[0].params
    assert str(tmp_path / "s" / "trials" / "avpbc" / "trial-000") in batches[0]  # resumes in its own folder
    assert sum(t.state == TrialState.COMPLETE for t in trials) == 2


@pytest.mark.slow
def test_a_batched_study_survives_a_killed_worker(tmp_path, storage_url):
    """A --batched study on a shared storage with a worker that is killed in its batch: the dead worker's
    trials go stale through their heartbeats and are retried; the study reaches its target with
    distinct parameter sets and finishes."""
    import signal
    import time

    # runs long enough that the poll below finds a batch mid-run, not one about to be told complete
    fixed = {**STUDY["fixed"], "outer_steps": 400, "eval_every": 200, "wandb": False}
    study = write_study(tmp_path, methods=["avpbc"], trials=4, seeds=1, fixed=fixed, pruner={"n_startup_trials": 10})
    out = tmp_path / "sweep"
    base = sweep_cmd(study, out, "--storage", storage_url, "--batched", "--batch-trials", "2", "--jobs", "1")
    victim = subprocess.Popen([*base, "--worker"], env=env(tmp_path), cwd=tmp_path)
    killed: list[int] = []
    deadline = time.time() + 240
    while not killed and time.time() < deadline:
        time.sleep(0.5)
        try:
            trials = trials_of(out, "avpbc", storage=storage_url)
        except Exception:  # not created yet
            continue
        running = [t for t in trials if t.state == TrialState.RUNNING and t.user_attrs.get("out")]
        if running and all(list(Path(t.user_attrs["out"]).glob("checkpoints/*.pt")) for t in running):
            victim.send_signal(signal.SIGKILL)
            killed = [t.number for t in running]
    victim.wait(timeout=60)
    # a trial told complete between the poll and the kill was not killed: keep those left running
    killed = [t.number for t in trials_of(out, "avpbc", storage=storage_url) if t.state == TrialState.RUNNING]
    assert killed, "the worker never had a batch running"
    main = subprocess.run(base, env=env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert main.returncode == 0, main.stderr[-3000:]
    trials = trials_of(out, "avpbc", storage=storage_url)
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(done) >= 4 and len({tuple(sorted(t.params.items())) for t in done}) == len(done)
    retried = {t.system_attrs.get("failed_trial") for t in done}
    assert set(killed) <= retried  # each killed trial was taken up again with its parameters
