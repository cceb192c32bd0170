"""Where tensors live: ``--device auto|cpu|cuda`` (auto = cuda when available), checked up front."""

from __future__ import annotations

from typing import Literal

import torch

from obd.errors import ObdError

DeviceName = Literal["auto", "cpu", "cuda"]


def resolve_device(name: str) -> torch.device:
    """The torch device for ``name``; ``cuda`` without a usable GPU is a one-line error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ObdError(
                f"--device cuda: no CUDA device is available (torch {torch.__version__}, {build}); "
                "use --device cpu, or install a CUDA build of torch (make venv TORCH=cuda)"
            )
        return torch.device("cuda")
    if name == "cpu":
        return torch.device("cpu")
    raise ObdError(f"--device: expected auto, cpu or cuda, got {name!r}")


def lightning_accelerator(device: torch.device) -> str:
    return "gpu" if device.type == "cuda" else "cpu"
