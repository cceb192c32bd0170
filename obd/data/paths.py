"""Where cached datasets, behaviour-training runs and downloads live (``OBD_DATA_DIR``, default ~/.cache/obd)."""

from __future__ import annotations

import os
from pathlib import Path


def data_dir() -> Path:
    return Path(os.environ.get("OBD_DATA_DIR", Path.home() / ".cache" / "obd")).expanduser()
