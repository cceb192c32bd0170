import os

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
