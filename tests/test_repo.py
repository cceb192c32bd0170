"""The repository holds source, tests, configs, docs and small final artifacts only."""

import shutil
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
    """A non-editable install carries the studies and budgets (sweeps/ inside the package)."""
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


def test_generated_tables_of_readme_and_docs_match_the_committed_files():
    """Tables in README.md and docs/*.md between generated markers are what `python -m obd.docs` makes
    from the committed files (results/, the shipped policies), not typed numbers."""
    from obd.docs import BLOCK, block, pages

    names = []
    for page in pages(ROOT):
        for name, body in BLOCK.findall(page.read_text()):
            names.append(name)
            assert body == block(name, page, ROOT), f"{page.name}: block {name} is out of date; run python -m obd.docs"
    assert {"../results/quick", "docs:policies", "docs:weights", "docs:quick-steps", "docs:curves"} <= set(names)
    readme = [name for name, _ in BLOCK.findall((ROOT / "README.md").read_text())]
    assert {"results/converged", "readings:results/converged", "docs:converged"} <= set(readme)


def obd_imports() -> dict[str, set[str]]:
    """obd module -> the obd modules it imports (at module level or inside functions)."""
    import ast

    files = {}
    for p in (ROOT / "obd").rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph: dict[str, set[str]] = {}
    for name, p in files.items():
        package = name if p.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                deps |= {f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names}
        graph[name] = {d for d in deps if d in files and d != name}
    return graph


def test_no_import_cycle_among_obd_modules():
    graph = obd_imports()
    assert graph["obd.train"] and "obd.data" in graph["obd.targets"]  # the walk sees imports

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for d in graph[start]:
            if d == goal or (d not in seen and (seen.add(d) or reaches(d, goal, seen))):
                return True
        return False

    cycles = sorted(m for m in graph if reaches(m, m, set()))
    assert not cycles, f"modules on an import cycle: {cycles}"
    assert not any(d.startswith("obd.behavior") for d in graph["obd.data"]), "reading data imports behaviour code"


def test_make_dashboard_without_a_study_is_one_line(tmp_path):
    if not (ROOT / ".venv" / ".installed").is_file() or not shutil.which("make"):
        pytest.skip("needs the project's .venv (make test builds it) and make")
    r = subprocess.run(
        ["make", "-s", "dashboard", "TASK=hopper-random", f"OUT={tmp_path / 'none'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "error: no study at" in r.stderr and "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if ln.startswith("error:")]) == 1
