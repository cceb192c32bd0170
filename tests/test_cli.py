import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from obd.cli import main as obd_main
from obd.tracking import wandb_mode


def test_wandb_mode_is_decided_in_one_place(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode() == "offline"
    (tmp_path / ".netrc").write_text("machine api.wandb.ai\n  login user\n  password x\n")
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode() == "disabled"


def test_one_console_command_dispatches_and_errors_are_one_line(capsys):
    assert obd_main(["data", "info", "hopper-expert"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not generated yet" in err and len(err.strip().splitlines()) == 1
    assert obd_main([]) == 2 and "obd train" in capsys.readouterr().out


def test_sweep_help_names_the_default_study():
    r = subprocess.run([sys.executable, "-m", "obd.sweep", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "default.yaml" in "".join(r.stdout.split())


def test_report_reads_the_runs_artifacts_and_never_recomputes(tmp_path, monkeypatch):
    """The report uses the normalization and log-density the runs used (their files), never the data
    reloaded and the density recomputed with default settings."""
    import json

    import obd.density
    from obd.behavior.generate import collect
    from obd.data import get_task
    from obd.report import plot_projection

    task = get_task("hopper-random")
    path = collect(task, 300, seed=0, show_progress=False)
    cache = tmp_path / "cache"
    cache.mkdir()
    np.savez(cache / "normalization.npz", mean=np.zeros(11, np.float32), std=np.ones(11, np.float32))
    np.save(cache / "logp.npy", np.linspace(-3, 0, 300))
    for method, steps in (("sdw", [50, 100, 150]), ("avpbc", [50, 100, 150])):
        for seed in (1, 2):
            run = tmp_path / "sweep" / "final" / method / f"seed-{seed}"
            run.mkdir(parents=True)
            metrics = {
                "task": task.name,
                "seed": seed,
                "history": [{"step": st, "score": float(st + seed)} for st in steps],
                "artifacts": {
                    "dataset": str(path),
                    "normalization": str(cache / "normalization.npz"),
                    "log_density": str(cache / "logp.npy"),
                },
            }
            (run / "metrics.json").write_text(json.dumps(metrics))
            np.savez(run / "synthetic.npz", states=np.zeros((4, 11), np.float32), actions=np.zeros((4, 3), np.float32))

    def refuse(*a, **k):
        raise AssertionError("the report recomputed the density")

    monkeypatch.setattr(obd.density, "log_density", refuse)
    fig = plot_projection(tmp_path / "sweep", ["sdw", "avpbc"], tmp_path / "p.png")
    assert fig is not None and (tmp_path / "p.png").stat().st_size > 1000
    # every method in its own panel, so no method's points hide another's
    assert [ax.get_title() for ax in fig.axes[:2]] == ["sdw", "avpbc"] and "synthetic sets" in fig.get_suptitle()


def test_learning_curves_have_title_axes_and_an_error_bar_per_method(tmp_path):
    import json

    from matplotlib.container import ErrorbarContainer

    from obd.report import plot_curves

    for method in ("sdw", "avpbc"):
        for seed in (1, 2):
            run = tmp_path / "final" / method / f"seed-{seed}"
            run.mkdir(parents=True)
            hist = [{"step": st, "score": float(st / 10 + seed)} for st in (50, 100, 150)]
            (run / "metrics.json").write_text(json.dumps({"seed": seed, "history": hist}))
    fig = plot_curves(tmp_path, ["sdw", "avpbc"], tmp_path / "c.png", "hopper-random", "smoke")
    ax = fig.axes[0]
    assert "hopper-random" in ax.get_title() and ax.get_xlabel() == "outer step" and ax.get_ylabel()
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["SDW (n=2 seeds)", "Av-PBC (n=2 seeds)"]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert [len(c.lines[0].get_xdata()) for c in bars] == [3, 3]  # a point per evaluation, std over seeds
    assert {c.lines[0].get_marker() for c in bars} == {"s", "o"}  # distinct markers


@pytest.mark.slow
def test_non_editable_install_finds_the_default_study(tmp_path):
    """A non-editable install, run from another directory, finds the packaged study."""
    root = Path(__file__).resolve().parent.parent
    site = tmp_path / "site"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(site),
            str(root),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}  # the installed copy comes first on the path
    code = (
        "import obd, obd.config as c; print(obd.__file__); print(c.sweeps_dir()); "
        "print(sorted(p.name for p in (c.sweeps_dir() / 'budgets').glob('*')))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=elsewhere, env=env)
    assert r.returncode == 0, r.stderr
    file, sweeps, budgets = r.stdout.splitlines()
    assert file.startswith(str(site)) and "_sweeps" in sweeps and "paper.yaml" in budgets
    r = subprocess.run(
        [sys.executable, "-m", "obd.sweep", "--help"], capture_output=True, text=True, cwd=elsewhere, env=env
    )
    assert r.returncode == 0 and "_sweeps/default.yaml" in "".join(r.stdout.split())  # help wraps lines


def test_run_settings_of_train_table_and_curves_come_from_the_config_dataclasses():
    """Every flag that sets a run's config is generated from RunConfig (or is a declared alias); the rest are
    the command's own (what to run, where to write)."""
    from obd import curves, sweep, table, train
    from obd.flags import ALIASES, leaves

    generated = {f"--{k}" for k, *_ in leaves()} | {f"--{a}" for a in ALIASES}
    own = {
        train: {"--task", "--data", "--force-task", "--budget", "--config", "--resume", "--no-wandb"}
        | {"--print-config", "--json"},
        table: {"--tasks", "--methods", "--seeds", "--budget", "--config", "--out", "--jobs", "--readme"}
        | {"--rebuild", "--batched", "--storage", "--worker"},
        curves: {"--tasks", "--methods", "--seeds", "--budget", "--config", "--outer-steps", "--eval-every"}
        | {"--out", "--jobs", "--rebuild", "--batched"},
        sweep: {"--task", "--study", "--methods", "--trials", "--seeds", "--budget", "--storage", "--out"}
        | {"--worker", "--jobs", "--no-wandb", "--batched", "--batch-trials"},
    }
    for module, mine in own.items():
        flags = {s for a in module.parser()._actions for s in a.option_strings} - {"-h", "--help"}
        assert flags - generated <= mine, (module.__name__, sorted(flags - generated - mine))
    args = table.parser().parse_args(["--start", "kmeans", "--threads", "1", "--distill.outer_lr", "0.02"])
    from obd.flags import config_layer

    assert config_layer(args) == {"distill": {"start": "kmeans", "outer_lr": 0.02}, "threads": 1}


def test_workers_checking_one_output_folder_at_once_all_pass(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from obd.errors import check_writable

    out = tmp_path / "shared"
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: check_writable(out), range(2000)))
    assert out.is_dir() and not list(out.iterdir())
