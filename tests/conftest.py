import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def isolated_dirs(tmp_path, monkeypatch):
    """Every test gets its own OBD_DATA_DIR, Minari store and working directory (lightning_logs/, runs/)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OBD_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "minari"))
    return tmp_path


@pytest.fixture
def hopper_transitions():
    """~600 real Hopper-v5 transitions from uniform random actions (many short episodes)."""
    from obd.rollout import collect_transitions

    rng = np.random.default_rng(0)
    return collect_transitions("Hopper-v5", lambda o: rng.uniform(-1, 1, (len(o), 3)), 600, seed=0, n_envs=4)


def _pg_bin() -> Path | None:
    for cand in sorted(Path("/usr/lib/postgresql").glob("*/bin")) + [Path("/usr/local/bin"), Path("/usr/bin")]:
        if (cand / "initdb").exists() and (cand / "pg_ctl").exists():
            return cand
    return None


@pytest.fixture
def postgres(tmp_path):
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("PostgreSQL server binaries not installed (Debian package 'postgresql'); .ci/run installs them")
    # pytest's tmp dirs are private to their owner; the server needs a directory it can reach
    data = Path(tempfile.mkdtemp(prefix="obd-pg-"))
    as_user: list[str] = []
    if os.geteuid() == 0:  # initdb refuses to run as root
        shutil.chown(data, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    subprocess.run(
        [*as_user, str(bindir / "initdb"), "-D", str(data), "-U", "obd", "--auth=trust"],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [
            *as_user,
            str(bindir / "pg_ctl"),
            "-D",
            str(data),
            "-w",
            "-l",
            str(data / "log"),
            "-o",
            f"-p {port} -k {data} -c listen_addresses=127.0.0.1",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    try:
        subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "obd", "-d", "postgres", "-c", "CREATE DATABASE optuna"],
            check=True,
            capture_output=True,
        )
        yield f"postgresql://obd@127.0.0.1:{port}/optuna"
    finally:
        subprocess.run(
            [*as_user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"], capture_output=True
        )
        shutil.rmtree(data, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def storage_url(request, tmp_path):
    """An Optuna storage URL: an SQLite file, then a PostgreSQL server on loopback."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'storage.db'}"
    return request.getfixturevalue("postgres")
