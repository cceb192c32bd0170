"""The repository holds source, tests, configs, docs and small final artifacts only."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def tracked() -> list[str]:
    r = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("not a git checkout")
    return r.stdout.splitlines()


def test_no_training_state_logs_or_large_files_tracked():
    files = tracked()
    assert not [f for f in files if f.startswith(("behavior_runs/", "runs/", "lightning_logs/", "wandb/"))]
    assert not [f for f in files if f.endswith((".ckpt", "MUJOCO_LOG.TXT", "checkpoint.pt", "snapshots.pt"))]
    big = [f for f in files if (ROOT / f).is_file() and (ROOT / f).stat().st_size > 10 * 2**20]
    assert not big, big


@pytest.mark.slow
def test_wheel_ships_the_studies_and_budgets(tmp_path):
    """Bug (issue 9): the default study was found via __file__/../sweeps, absent from a non-editable install."""
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    (wheel,) = tmp_path.glob("obd-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for f in (
        "obd/_sweeps/default.yaml",
        "obd/_sweeps/budgets/paper.yaml",
        "obd/_sweeps/budgets/quick.yaml",
        "obd/behavior/policies/hopper.pt",
    ):
        assert f in names


def test_readme_results_blocks_are_generated_from_the_committed_results():
    """Issue 12: the README's results tables are the committed results files, not typed numbers
    (regenerate with `python -m obd.table --rebuild --tasks ... --readme README.md`)."""
    import re

    from obd.table import readme_block

    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"<!-- BEGIN generated: (\S+) -->\n(.*?)<!-- END generated: \1 -->", readme, re.S)
    assert blocks, "the README has no generated results block"
    for out, body in blocks:
        assert body == readme_block(Path(out), ROOT), f"README block {out} differs from its results files"
