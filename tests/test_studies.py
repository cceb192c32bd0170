"""The nine-dataset table and the misalignment study, end to end at a smoke budget."""

import csv
import json

import pytest
import yaml

TINY = {
    "outer_steps": 2,
    "eval_every": 1,
    "checkpoint_every": 2,
    "threads": 1,
    "data": {"size": 2000},
    "teacher": {"td3bc": {"steps": 50, "hidden": [16, 16]}, "eval_episodes": 1},
    "density": {"k": 5},
    "distill": {"n_synthetic": 8, "inner_steps": 3, "hidden": [16, 16], "test_batches": 1, "batch_size": 32},
    "eval": {"policies": 2, "episodes": 1, "inner_steps": 3, "hidden": [16, 16]},
}


def table_args(tmp_path, *extra: str) -> list[str]:
    """obd.table on hopper-random, 2 seeds x random/avpbc/sdw at the tiny config above."""
    cfg = tmp_path / "tiny.yaml"
    if not cfg.exists():
        cfg.write_text(yaml.safe_dump(TINY))
    return [
        "--tasks",
        "hopper-random",
        "--methods",
        "random,avpbc,sdw",
        "--seeds",
        "0-1",
        "--budget",
        "smoke",
        "--config",
        str(cfg),
        "--jobs",
        "1",
        "--out",
        str(tmp_path / "res"),
        *extra,
    ]


@pytest.mark.slow
def test_table_runs_every_cell_once_and_rebuilds(tmp_path, capsys):
    from obd.errors import cli
    from obd.table import main

    args = table_args(tmp_path)
    cfg = tmp_path / "tiny.yaml"
    assert main(args) == 0
    rows = list(csv.DictReader(open(tmp_path / "res" / "table.csv")))
    assert len(rows) == 1 and rows[0]["task"] == "hopper-random" and rows[0]["sdw_n"] == "2"
    assert rows[0]["sdw_minus_avpbc"] != "" and "paired seeds" in rows[0]["verdict"]
    assert (tmp_path / "res" / "table.png").stat().st_size > 1000
    md = (tmp_path / "res" / "table.md").read_text()
    assert "hopper-random" in md and "published Av-PBC" in md
    # the table's total compute: every run's own CPU time, the teacher's training, the machine named
    from obd.tracking import machine

    last = [json.loads(p.read_text())["history"][-1] for p in (tmp_path / "res" / "runs").glob("*/*/metrics.json")]
    hours = sum(h["cpu_seconds"] + h["eval_cpu_seconds"] for h in last) / 3600
    assert float(rows[0]["cpu_hours"]) == pytest.approx(hours, abs=0.006) and rows[0]["runs_with_cpu"] == "6"
    assert "in 6 of the 6 runs" in md and "(wall, 1 teacher(s))" in md and f"machines: {machine()}." in md
    metrics = sorted((tmp_path / "res" / "runs").glob("*/*/metrics.json"))
    assert len(metrics) == 6
    mtimes = [p.stat().st_mtime for p in metrics]
    assert main(args) == 0  # resumable: nothing recomputed
    assert [p.stat().st_mtime for p in metrics] == mtimes
    # the README's results block is filled from the results files
    readme = tmp_path / "README.md"
    out = (tmp_path / "res").relative_to(tmp_path)
    readme.write_text(f"intro\n<!-- BEGIN generated: {out} -->\nold\n<!-- END generated: {out} -->\nrest\n")
    assert main([*args[:-1], str(out), "--rebuild", "--readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "| hopper-random | " in text and f"![results]({out}/table.png)" in text
    assert "Mean CPU seconds per run (the run's own process" in text  # not wall time, which load inflates
    # a rebuild (metrics files only, no dataset) refuses a row whose runs came from two datasets
    one = json.loads(metrics[0].read_text())
    metrics[0].write_text(json.dumps({**one, "data_hash": "0" * 16}))
    assert cli(main, [*args[:-1], str(out), "--rebuild"]) == 2 and "different datasets" in capsys.readouterr().err
    metrics[0].write_text(json.dumps(one))
    # runs on a dataset that was regenerated since (other content) are refused, not mixed in
    import h5py

    from obd.data import generated_path, get_task

    with h5py.File(generated_path(get_task("hopper-random"), 2000, 0), "r+") as f:
        f["observations"][0, 0] += 1.0
    assert cli(main, args) == 2 and "run on other data" in capsys.readouterr().err
    with h5py.File(generated_path(get_task("hopper-random"), 2000, 0), "r+") as f:
        f["observations"][0, 0] -= 1.0
    assert main(args) == 0
    # a changed configuration in the same OUT is refused, not mixed in
    cfg.write_text(yaml.safe_dump({**TINY, "distill": {**TINY["distill"], "n_synthetic": 4}}))
    assert cli(main, args) == 2 and "another configuration" in capsys.readouterr().err
    # a rebuild counts only the runs finished at this config: another one is refused, shorter ones are named
    assert cli(main, [*args[:-1], str(out), "--rebuild"]) == 2 and "move it away" in capsys.readouterr().err
    cfg.write_text(yaml.safe_dump({**TINY, "outer_steps": 4}))
    distilled = [a if a != "random,avpbc,sdw" else "avpbc,sdw" for a in args[:-1]]  # their runs continue
    table = (tmp_path / "res" / "table.csv").read_text()
    assert cli(main, [*distilled, str(out), "--rebuild"]) == 2
    captured = capsys.readouterr()
    assert "not finished at budget smoke:" in captured.out and "hopper-random/avpbc/s0" in captured.out
    assert "no finished run of avpbc, sdw" in captured.err  # and the earlier table is kept, not emptied
    assert (tmp_path / "res" / "table.csv").read_text() == table


@pytest.mark.slow
def test_misalignment_study_end_to_end(tmp_path):
    from obd.misalignment import main

    out = tmp_path / "mis"
    assert (
        main(
            [
                "--env",
                "hopper",
                "--kinds",
                "random,medium",
                "--n",
                "16",
                "--steps",
                "1,20",
                "--policies",
                "2",
                "--episodes",
                "1",
                "--size",
                "2000",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    res = json.loads((out / "misalignment.json").read_text())
    assert set(res["datasets"]) == {"hopper-random", "hopper-medium"}
    for d in res["datasets"].values():
        assert d["state_diversity_knn10"] > 0 and [lv["steps"] for lv in d["levels"]] == [1, 20]
        assert d["levels"][1]["train_mse"] < d["levels"][0]["train_mse"]  # more steps, lower loss
    assert isinstance(res["flips"], bool) and len(res["ranking_low_loss"]) == 2
    assert (out / "misalignment.png").stat().st_size > 1000


@pytest.mark.slow
def test_table_with_every_run_of_a_task_in_one_engine(tmp_path):
    from obd.table import main

    assert main(table_args(tmp_path, "--batched")) == 0
    m = json.loads((tmp_path / "res" / "runs" / "hopper-random" / "sdw-s1" / "metrics.json").read_text())
    assert m["seed"] == 1 and m["history"]
    rows = list(csv.DictReader(open(tmp_path / "res" / "table.csv")))
    assert rows[0]["sdw_n"] == "2" and rows[0]["random_n"] == "2"


def test_table_plot_with_a_method_not_run_yet(tmp_path):
    """A dataset whose SDW runs have not finished is plotted without them (it used to raise)."""
    from obd.table import plot

    row = {"task": "walker2d-medium", "budget": "quick", "published_avpbc": 39.5, "published_sdw": None}
    row |= {"avpbc_mean": 11.3, "avpbc_std": 2.6, "sdw_mean": None, "sdw_std": None, "random_mean": None}
    plot([row], tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000


def test_table_compares_distillation_with_the_best_set_that_needs_no_outer_loop(tmp_path):
    from obd.table import build_table

    def run(method: str, seed: int, score: float) -> dict:
        return {
            "task": "hopper-medium",
            "method": method,
            "seed": seed,
            "score": score,
            "wall_seconds": 1.0,
            "data_hash": "h",
            "transitions": 10,
            "behaviour_score": 40.0,
            # a tiny teacher's training rounds to 0.0 s: still a teacher in the compute line
            "teacher": {"train_seconds": 0.0, "normalized_return": {"mean": 50.0, "se": 1.0, "episodes": 20}},
            "last_k_used": 5 if method in ("avpbc", "sdw") else 1,
        }

    scores = {"random": [5, 6, 7], "random-teacher": [8, 9, 10], "kmeans-teacher": [12, 14, 13], "avpbc": [30, 33, 31]}
    scores["sdw"] = [31, 33, 30]
    results = {("hopper-medium", m, s): run(m, s, float(v)) for m, vs in scores.items() for s, v in enumerate(vs)}
    (row,) = build_table(results, ["hopper-medium"], list(scores), "quick", tmp_path)
    assert row["best_baseline"] == "kmeans-teacher"  # the highest mean of the three
    assert row["avpbc_minus_best_baseline"] == pytest.approx(18.33, abs=0.01)
    assert row["avpbc_minus_best_baseline_ci_low"] > 0 and row["scored_evaluations_per_run"] == 5
    assert row["teacher_train_hours"] == 0.0 and row["teacher_score"] == 50.0
    md = (tmp_path / "table.md").read_text()
    assert "Av-PBC - best no-BPTT set" in md and "vs kmeans-teacher" in md
    # the baselines alone, on datasets whose diversity is known, make a table with no SDW claim
    tasks = ["hopper-medium", "hopper-random", "walker2d-medium", "walker2d-random"]
    base = {
        (t, m, s): {**run(m, s, 5.0 + s), "task": t, "state_diversity_knn10": 0.5 + i}
        for i, t in enumerate(tasks)
        for m in ("random", "kmeans-teacher")
        for s in range(3)
    }
    rows = build_table(base, tasks, ["random", "kmeans-teacher"], "quick", tmp_path / "base")
    assert len(rows) == 4 and all(r["state_diversity"] and "sdw_minus_avpbc" not in r for r in rows)
    assert "Spearman" not in (tmp_path / "base" / "table.md").read_text()


def _cells_of(db: str, out) -> list:
    import optuna

    from obd.cells import study_name

    return optuna.load_study(study_name=study_name("smoke", out), storage=db).get_trials(deepcopy=False)


@pytest.mark.slow
def test_table_cells_on_a_storage_survive_a_killed_worker_and_run_once(tmp_path, storage_url):
    """Three processes share a table through an Optuna storage; one worker is killed in a cell: every
    cell finishes exactly once (the killed one retried), and the table is the single-process one."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from optuna.trial import TrialState

    slow = {**TINY, "outer_steps": 600, "eval_every": 300, "checkpoint_every": 2}  # cells long enough to be hit
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(slow))
    env = {**os.environ, "OBD_DATA_DIR": str(tmp_path / "data"), "WANDB_MODE": "disabled"}
    db = storage_url
    args = [sys.executable, "-m", "obd.table", *table_args(tmp_path), "--storage", db]
    main = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and main.poll() is None:  # the victim starts once cells are enqueued
        time.sleep(0.5)
        try:
            if len(_cells_of(db, tmp_path / "res")) >= 6:
                break
        except Exception:  # the study is not created yet
            continue
    # the second worker starts after the kill, so that the victim, however slow to start, gets a cell
    victim, killed = subprocess.Popen([*args, "--worker"], env=env, cwd=tmp_path), None
    workers = [victim]
    while killed is None and time.time() < deadline and main.poll() is None:
        time.sleep(0.5)
        try:
            trials = _cells_of(db, tmp_path / "res")
        except Exception:  # the study is not created yet
            continue
        for t in trials:
            mine = t.user_attrs.get("worker", "").endswith(f":{victim.pid}")
            ckpt = t.user_attrs.get("config", {}).get("out")
            if t.state == TrialState.RUNNING and mine and ckpt and list((tmp_path / ckpt).glob("checkpoints/state.pt")):
                victim.send_signal(signal.SIGKILL)  # dies in the middle of a cell, after a checkpoint
                killed = t.user_attrs["cell"]
                workers.append(subprocess.Popen([*args, "--worker"], env=env, cwd=tmp_path))
                break
    _, err = main.communicate(timeout=300)
    for w in workers:
        w.wait(timeout=60)
    assert main.returncode == 0, err[-3000:]
    assert killed is not None, "no cell was running in the victim worker"
    trials = _cells_of(db, tmp_path / "res")
    done = [t.user_attrs["cell"] for t in trials if t.state == TrialState.COMPLETE]
    assert sorted(done) == sorted(set(done)) and len(done) == 6  # every cell finished exactly once
    assert any(t.state == TrialState.FAIL and t.user_attrs.get("cell") == killed for t in trials)
    shared = list(csv.DictReader(open(tmp_path / "res" / "table.csv")))
    # the same table made by one process without a storage
    from obd.table import main as table_main

    assert table_main([*table_args(tmp_path)[:-1], str(tmp_path / "alone")]) == 0
    alone = list(csv.DictReader(open(tmp_path / "alone" / "table.csv")))
    keys = [k for k in alone[0] if k.endswith(("_mean", "_std")) or k == "sdw_minus_avpbc"]
    assert [{k: r[k] for k in keys} for r in shared] == [{k: r[k] for k in keys} for r in alone]


def test_a_cell_failed_as_stale_while_it_ran_does_not_stop_its_worker_and_its_retry_reuses_the_run(
    tmp_path, monkeypatch
):
    """Under load a worker may miss its heartbeats: others fail its cell and queue a retry while it still
    runs. The worker finishes without an error, and the retry reads the finished run back."""
    import optuna

    import obd.train
    from obd.cells import enqueue, work
    from obd.config import RunConfig, merge, to_dict
    from obd.storage import connect

    cfg = merge(RunConfig(), {**TINY, "out": str(tmp_path / "cell"), "data": {"source": "hopper-random"}})
    study = optuna.create_study(study_name="cells", storage=connect(f"sqlite:///{tmp_path / 'db.sqlite'}"))
    enqueue(study, {("hopper-random", "avpbc", 0): to_dict(cfg)})
    calls = []

    def run_failed_meanwhile(c, show_progress=False):
        calls.append(c.out)
        (t,) = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        study._storage.set_trial_state_values(t._trial_id, optuna.trial.TrialState.FAIL)  # others: "dead"
        study.enqueue_trial({}, user_attrs=t.user_attrs)  # and its retry
        m = {"task": "hopper-random", "method": "avpbc", "seed": 0, "score": 1.0, "history": [], "config": to_dict(c)}
        (tmp_path / "cell").mkdir(exist_ok=True)
        (tmp_path / "cell" / "metrics.json").write_text(json.dumps(m))
        return m

    monkeypatch.setattr(obd.train, "run", run_failed_meanwhile)
    assert work(study) == 2  # the cell, then its retry (read back)
    assert calls == [str(tmp_path / "cell")]  # computed once
    states = sorted(t.state.name for t in study.get_trials(deepcopy=False))
    assert states == ["COMPLETE", "FAIL"]


def test_the_table_tests_sdws_claim_by_a_rank_correlation_with_state_diversity(tmp_path):
    """Datasets whose SDW - Av-PBC falls as their state diversity grows give a negative Spearman rho with an
    interval, a figure and a line in table.md; with fewer than 4 such datasets there is no claim."""
    from obd.table import build_table, diversity_claim

    tasks = ["hopper-medium", "walker2d-medium", "halfcheetah-medium", "hopper-medium-replay", "walker2d-medium-replay"]
    results = {}
    for i, task in enumerate(tasks):
        for seed in range(3):
            for method, score in (("avpbc", 30.0 + seed), ("sdw", 30.0 + seed + 4 - 2 * i + 0.1 * seed)):
                results[(task, method, seed)] = {
                    "score": score,
                    "wall_seconds": 1.0,
                    "data_hash": task,
                    "transitions": 10,
                    "behaviour_score": 40.0,
                    "teacher": None,
                    "last_k_used": 5,
                    "state_diversity_knn10": 0.5 + 0.3 * i,
                }
    rows = build_table(results, tasks, ["avpbc", "sdw"], "quick", tmp_path)
    claim = diversity_claim(rows)
    assert claim is not None and claim["n"] == 5 and claim["rho"] == pytest.approx(-1.0)
    assert -1 <= claim["ci_low"] < claim["ci_high"] < 0
    assert (tmp_path / "diversity.png").stat().st_size > 1000
    assert "Spearman rho -1.00" in (tmp_path / "table.md").read_text()
    assert diversity_claim(rows[:3]) is None


def test_failed_policies_table_splits_a_score_into_failing_policies_and_the_others(tmp_path):
    from obd.docs import failed_policies_table

    def run(method: str, seed: int, scored: list[float], early: list[float]) -> None:
        d = tmp_path / "results" / "converged" / "runs" / "walker2d-medium" / f"{method}-s{seed}"
        d.mkdir(parents=True)
        hist = [{"step": 100, "policy_scores": early}, {"step": 200, "policy_scores": scored}]
        m = {"task": "walker2d-medium", "scored_steps": [200], "history": hist}
        d.joinpath("metrics.json").write_text(json.dumps(m))

    run("avpbc", 0, [0.0, 1.0, 60.0, 80.0], early=[0.0, 0.0, 0.0, 0.0])  # the unscored evaluation is ignored
    run("avpbc", 1, [0.0, 50.0, 50.0, 50.0], early=[90.0] * 4)
    run("sdw", 0, [20.0, 20.0, 20.0, 4.9], early=[0.0] * 4)
    run("random", 0, [1.0], early=[1.0])  # a baseline's policies are not counted
    lines = failed_policies_table(tmp_path).splitlines()
    assert lines[2:] == ["| walker2d-medium | 38% (25%-50%) | 58.0 | 2 | 25% (25%-25%) | 20.0 | 1 |"]


def test_a_tables_readings_against_the_quick_table_say_which_verdict_changed(tmp_path):
    from obd.config import build_config
    from obd.docs import readings_table

    head = "task,budget,avpbc_mean,avpbc_n,sdw_minus_avpbc,ci_low,ci_high,n_pairs\n"
    (tmp_path / "results" / "quick").mkdir(parents=True)
    (tmp_path / "results" / "quick" / "table.csv").write_text(
        head + "halfcheetah-medium-replay,quick,33.1,5,-26.7,-31.6,-21.8,5\nhopper-medium,quick,34.0,5,0.1,-5.4,5.5,5\n"
    )
    (tmp_path / "results" / "converged").mkdir()
    (tmp_path / "results" / "converged" / "table.csv").write_text(
        head + "halfcheetah-medium-replay,converged,11.2,5,-1.0,-3.0,1.0,5\n"
        "hopper-medium,converged,42.0,5,-1.2,-7.3,5.0,5\nwalker2d-medium,converged,27.3,2,,,,\n"
    )
    lines = readings_table(tmp_path / "results" / "converged", tmp_path).splitlines()
    steps = build_config("converged", [{"data": {"source": "hopper-medium"}}]).outer_steps
    hcmr = next(x for x in lines if x.startswith("| halfcheetah-medium-replay |"))
    assert "| 11.2 (33.1) | -1.0 [-3.0, +1.0], no evidence | SDW behind (changed) |" in hcmr
    assert next(x for x in lines if x.startswith("| hopper-medium |")).startswith(f"| hopper-medium | {steps} | 5 |")
    assert next(x for x in lines if x.startswith("| hopper-medium |")).endswith("| no evidence (same) |")
    walker = next(x for x in lines if x.startswith("| walker2d-medium |"))
    assert walker.endswith("| 27.3 | - | - |")  # no pair, no quick row
    assert "No table" in readings_table(tmp_path / "results" / "none", tmp_path)
