"""OBDDataModule: the outer batches of distillation, read from the prepared :class:`obd.targets.Targets`.

A batch is ``(obs, target, weight)`` of ``batch_size x test_batches`` random real states (with
replacement), with the method's target and weight (see :meth:`Targets.targets_and_weights`).
The batch of outer step t is a function of (seed, t) only, so a resumed run sees exactly the
batches it would have seen without the interruption. No training or estimation happens here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, IterableDataset

from obd.config import DensityConfig
from obd.seeding import derive_seed
from obd.targets import Targets


class StepBatches(IterableDataset):
    """Endless batches of ``n`` random rows; the batch of outer step t is drawn from seed (seed, t).

    Iteration starts at ``start()``, read when iteration begins (after a checkpoint is restored)."""

    def __init__(self, tensors: tuple[torch.Tensor, ...], n: int, seed: int, start: Callable[[], int] = lambda: 0):
        self.tensors, self.n, self.seed, self.start = tensors, n, seed, start

    def batch(self, step: int) -> tuple[torch.Tensor, ...]:
        gen = torch.Generator().manual_seed(derive_seed(self.seed, "outer-batch", step))
        idx = torch.randint(0, self.tensors[0].shape[0], (self.n,), generator=gen).to(self.tensors[0].device)
        return tuple(t[idx] for t in self.tensors)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        step = self.start()
        while True:
            yield self.batch(step)
            step += 1


class OBDDataModule(pl.LightningDataModule):
    def __init__(
        self,
        targets: Targets,
        method: str,
        beta: float,
        density: DensityConfig,
        batch_size: int = 256,
        test_batches: int = 10,
        seed: int = 0,
        device: torch.device | None = None,
    ):
        super().__init__()
        self.targets, self.method = targets, method
        self.device = device or torch.device("cpu")
        target, weight = targets.targets_and_weights(method, beta, density)
        # the real data moves to the device once; each outer step sends only its batch's indices
        self.obs, self.target, self.weight = (x.to(self.device) for x in (targets.obs, target, weight))
        self.batch_size, self.test_batches, self.seed = batch_size, test_batches, seed

    def _start(self) -> int:
        trainer = getattr(self, "trainer", None)
        return int(trainer.global_step) if trainer is not None else 0

    def batches(self) -> StepBatches:
        return StepBatches(
            (self.obs, self.target, self.weight),
            self.batch_size * self.test_batches,
            self.seed,
            start=self._start,
        )

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.batches(), batch_size=None, num_workers=0)
