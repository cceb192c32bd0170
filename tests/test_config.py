import subprocess
import sys

import pytest

from obd.config import (
    DISTILL_METHODS,
    EvalConfig,
    RunConfig,
    budget_names,
    build_config,
    merge,
    read_yaml,
    sweeps_dir,
)
from obd.errors import ConfigError
from obd.sweep import load_study


@pytest.mark.parametrize("budget", budget_names())
def test_every_budget_builds_for_every_env_and_method(budget):
    assert set(budget_names()) >= {"smoke", "quick", "sweep", "paper"}
    for env in ("halfcheetah", "hopper", "walker2d"):
        for method in (*DISTILL_METHODS, "random"):
            cfg = build_config(budget, [{"data": {"source": f"{env}-medium"}, "distill": {"method": method}}])
            assert cfg.budget == budget and cfg.outer_steps >= 1
            assert cfg.eval.inner_steps >= 1 and cfg.eval.policies >= 1


@pytest.mark.parametrize("path", sorted(sweeps_dir().glob("*.yaml")), ids=lambda p: p.name)
def test_every_study_loads_and_its_search_keys_exist(path):
    for task in ("halfcheetah-medium", "hopper-medium", "walker2d-medium-replay"):
        spec = load_study(path, task)
        assert spec.methods and spec.search


def test_paper_budget_follows_the_published_steps_per_env_and_method():
    def steps(env: str, method: str) -> int:
        return build_config("paper", [{"data": {"source": f"{env}-medium"}, "distill": {"method": method}}]).outer_steps

    assert steps("halfcheetah", "avpbc") == steps("walker2d", "sdw") == 50_000
    assert steps("hopper", "avpbc") == steps("hopper", "sdw") == 20_000
    assert steps("halfcheetah", "dbc") == steps("walker2d", "pbc") == 200_000
    assert steps("hopper", "pbc") == 50_000
    cfg = build_config("paper", [{"data": {"source": "hopper-medium"}}])
    assert cfg.distill.outer_optimizer == "sgd" and cfg.distill.outer_lr == 0.1 and cfg.distill.init == "official"
    assert cfg.eval == EvalConfig() and cfg.eval.k_for("avpbc") == 5 and cfg.eval.k_for("dbc") == 10
    # a layer beats the budget's per-env clause
    assert build_config("paper", [{"data": {"source": "hopper-medium"}, "outer_steps": 7}]).outer_steps == 7


@pytest.mark.parametrize(
    "update, message",
    [
        ({"distill": {"inner_steps": "ten"}}, "config key 'distill.inner_steps': expected int, got 'ten'"),
        ({"outer_steps": 4.5}, "config key 'outer_steps': expected int, got 4.5"),
        ({"distill": {"n_synthetic": 0}}, "config key 'distill.n_synthetic': must be >= 1, got 0"),
        ({"distill": {"inner_lr": -0.1}}, "config key 'distill.inner_lr': must be > 0"),
        ({"distill": {"method": "avg"}}, "config key 'distill.method': expected one of 'dbc', 'pbc'"),
        ({"distill": {"hidden": [256, 0]}}, "config key 'distill.hidden': must be >= 1, got 0"),
        ({"wandb": "yes"}, "config key 'wandb': expected bool"),
        ({"distill": {"nope": 1}}, "unknown config key 'distill.nope'"),
        ({"distill": 3}, "config key 'distill': expected a mapping"),
    ],
)
def test_values_are_type_and_range_checked(update, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        merge(RunConfig(), update)


def test_ints_are_accepted_as_floats_and_lists_as_tuples():
    cfg = merge(RunConfig(), {"distill": {"inner_lr": 1, "hidden": [8, 8]}, "density": {"clip": None}})
    assert cfg.distill.inner_lr == 1.0 and isinstance(cfg.distill.inner_lr, float)
    assert cfg.distill.hidden == (8, 8) and cfg.density.clip is None


def test_yaml_errors_are_one_line_with_file_and_line(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("distill:\n  inner_steps: 10\n  outer_lr: [0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: YAML syntax error at line \d+"):
        read_yaml(f)
    r = subprocess.run(
        [sys.executable, "-m", "obd.train", "--task", "hopper-random", "--config", str(f)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "YAML syntax error" in r.stderr


def test_bad_config_value_fails_before_any_work(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("distill: {inner_steps: ten}\n")
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "obd.train",
            "--task",
            "hopper-random",
            "--config",
            str(f),
            "--out",
            str(tmp_path / "run"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and "'distill.inner_steps': expected int, got 'ten'" in r.stderr
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


def test_when_clauses_select_on_dataset_kind(tmp_path, monkeypatch):
    def teacher_steps(task: str) -> int:
        return build_config("quick", [{"data": {"source": task}}]).teacher.td3bc.steps

    assert teacher_steps("halfcheetah-medium") == 30_000
    assert teacher_steps("halfcheetah-medium-expert") == teacher_steps("hopper-medium") == 200_000
    assert teacher_steps("/some/file.hdf5") == 30_000  # a file names no task: no clause applies
    (tmp_path / "budgets").mkdir()
    (tmp_path / "budgets" / "bad.yaml").write_text("when:\n  - {dataset: medium, set: {outer_steps: 3}}\n")
    monkeypatch.setattr("obd.config.sweeps_dir", lambda: tmp_path)
    with pytest.raises(ConfigError, match="bad.yaml: a when clause is a mapping of env"):
        build_config("bad")


def test_sweep_quick_and_converged_budgets_share_every_teacher():
    """One cached teacher per dataset serves the study, the quick table and the converged table."""
    for env in ("halfcheetah", "hopper", "walker2d"):
        for kind in ("random", "medium", "medium-replay", "medium-expert", "expert"):
            layer = [{"data": {"source": f"{env}-{kind}"}}]
            for budget in ("sweep", "converged"):
                assert build_config(budget, layer).teacher == build_config("quick", layer).teacher, (env, kind)


def test_scored_evaluations_lie_at_the_end_of_every_budget():
    from obd.config import build_config

    paper = build_config("paper", [{"data": {"source": "halfcheetah-medium"}, "distill": {"method": "avpbc"}}])
    steps = paper.evaluation_steps()  # the published schedule: every 1,000, the score over the last 5
    assert steps == list(range(1000, 50_001, 1000))
    assert [s for s in steps if s >= paper.scored_from()][-5:] == [46_000, 47_000, 48_000, 49_000, 50_000]
    for budget in ("quick", "sweep", "converged"):
        cfg = build_config(budget, [{"data": {"source": "halfcheetah-medium"}}])
        tail = [s for s in cfg.evaluation_steps() if s >= cfg.scored_from()]
        assert (
            len(tail) >= cfg.eval.k_for("avpbc") and tail[-1] == cfg.outer_steps and tail[0] >= 0.8 * cfg.outer_steps
        ), budget


def test_rescore_drops_evaluations_before_the_window():
    from obd.evaluate import rescore

    old = {"method": "avpbc", "outer_steps": 300, "last_k": 5, "config": {}, "score": 20.0}
    old["history"] = [{"step": 100, "score": 10.0}, {"step": 200, "score": 20.0}, {"step": 300, "score": 30.0}]
    m = rescore(old)
    assert m["score"] == 30.0 and m["scored_steps"] == [300] and m["last_k_used"] == 1
