"""Seed derivation: every random stream in obd comes from one root seed and a path of names.

``derive_seed(7, "eval", 3)`` is a 63-bit integer from ``numpy.random.SeedSequence``; distinct
paths give statistically independent streams, and no two call sites share arithmetic by accident.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch


def _word(key: int | str) -> int:
    if isinstance(key, bool) or not isinstance(key, (int, str)):
        raise TypeError(f"seed keys are ints or strings, got {key!r}")
    if isinstance(key, str):
        return zlib.crc32(key.encode())
    if key < 0:
        raise ValueError(f"seed keys are non-negative, got {key}")
    return key


def derive_seed(root: int, *path: int | str) -> int:
    """A seed in [0, 2**63) determined by ``root`` and ``path``."""
    ss = np.random.SeedSequence([_word(root), *(_word(k) for k in path)])
    return int(ss.generate_state(1, dtype=np.uint64)[0]) >> 1


def torch_generator(root: int, *path: int | str) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(root, *path))


def numpy_rng(root: int, *path: int | str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(root, *path))
