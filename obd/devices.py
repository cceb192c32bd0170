"""Where tensors live: ``--device auto|cpu|cuda`` (auto = cuda when available), checked up front."""

from __future__ import annotations

from pathlib import Path
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


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 natively: any CUDA GPU torch runs on, or a CPU with AVX512-BF16
    or AMX (elsewhere oneDNN emulates bf16 products, far slower than float32; docs/performance.md)."""
    if device.type != "cpu":
        return True
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:  # a torch without the probes: read the flags the kernel reports
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "avx512_bf16" in flags or "amx_bf16" in flags
