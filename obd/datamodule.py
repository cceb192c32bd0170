"""OBDDataModule: the outer batches of K distillation runs on one dataset, read from :class:`obd.targets.Targets`.

Run k's batch is ``(obs, target, weight)`` of ``batch_size x test_batches`` random real states (with
replacement), with its method's target and weight (see :meth:`Targets.targets_and_weights`). The batch
of run k at its outer step t is a function of (seed_k, t) only, so a resumed run sees exactly the
batches it would have seen without the interruption, whichever runs it shares the engine with. No
training or estimation happens here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from obd.config import DensityConfig, QNegative
from obd.seeding import derive_seed
from obd.targets import Targets


class StepBatches:
    """One run's batches: ``n`` random rows of ``tensors``, the batch of outer step t drawn from seed (seed, t)."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], n: int, seed: int):
        self.tensors, self.n, self.seed = tensors, n, seed

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "outer-batch", step))
        idx = torch.randint(0, self.tensors[0].shape[0], (self.n,), generator=gen).to(self.tensors[0].device)
        return tuple(t[idx] for t in self.tensors)


Position = tuple[int, int, int]  # (run index, its next outer step, its last outer step)


class _Together(IterableDataset):
    """Per engine iteration, the stacked batches of the runs still going: (run indices (K,), their steps
    (K,), obs (K, B, d), target (K, B, a), weight (K, B)). The positions are read once, when iteration
    begins, and advanced here, so a batch fetched ahead of its step is still the right one."""

    def __init__(self, runs: list[StepBatches], positions: Callable[[], list[Position]]):
        self.runs, self.positions = runs, positions

    def __len__(self) -> int:  # the iterations left: the progress bar's total
        return max((last - step for _, step, last in self.positions()), default=0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        at = {k: (step, last) for k, step, last in self.positions()}
        while at:
            idx = sorted(at)
            parts = [self.runs[k].batch(at[k][0]) for k in idx]
            yield (
                torch.tensor(idx),
                torch.tensor([at[k][0] for k in idx]),
                *(torch.stack(x) for x in zip(*parts)),
            )
            at = {k: (s + 1, last) for k, (s, last) in at.items() if s + 1 < last}


class OBDDataModule(pl.LightningDataModule):
    """The real data on ``device`` once (states, and each method's targets and weights once); a run added
    by :meth:`add_run` gets its own batch stream; the train dataloader yields the runs' batches together,
    from the positions ``positions()`` gives (all runs from step 0 unless the engine sets it)."""

    def __init__(self, targets: Targets, device: torch.device | None = None):
        super().__init__()
        self.targets = targets
        self.device = device or torch.device("cpu")
        # the real data moves to the device once; each outer step sends only its batches' indices
        self.obs = targets.obs.to(self.device)
        self._columns: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self.runs: list[StepBatches] = []
        self.positions: Callable[[], list[Position]] = lambda: []

    def add_run(
        self,
        method: str,
        beta: float,
        density: DensityConfig,
        batch_size: int = 256,
        test_batches: int = 10,
        seed: int = 0,
        q_negative: QNegative = "keep",
    ) -> StepBatches:
        key = (method, beta, repr(density), q_negative)
        if key not in self._columns:
            target, weight = self.targets.targets_and_weights(method, beta, density, q_negative)
            self._columns[key] = (target.to(self.device), weight.to(self.device))
        self.runs.append(StepBatches((self.obs, *self._columns[key]), batch_size * test_batches, seed))
        return self.runs[-1]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_Together(self.runs, self.positions), batch_size=None, num_workers=0)
