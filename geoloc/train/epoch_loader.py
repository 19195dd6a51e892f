"""One training DataLoader for the whole run, given a new order every epoch.

The order of an epoch is computed in the main process (`epoch_order`: a seeded permutation with
hard negatives); a DataLoader built per epoch would start its worker processes again every
epoch. `EpochLoader` keeps one loader, so its workers persist, and a sampler that the main
process points at each epoch's rows.

Augmentation randomness stays a function of `(seed, epoch)`: without workers, samples draw from
torch's global RNG, which `fit` reseeds at every epoch start (exactly as before this loader
existed); in a worker, torch is reseeded per sample from (epoch seed, row), so an image's
augmentation does not depend on which worker loads it, how many there are, or whether the run
was resumed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from geoloc.data.dataset import make_loader

__all__ = ["EpochLoader", "EpochSampler", "sample_seed"]


def sample_seed(epoch_seed: int, row: int) -> int:
    """The torch seed of one sample's augmentation in a worker (a pure function)."""
    return (int(epoch_seed) * 1_000_003 + int(row) * 7919 + 17) % 2**63


class EpochSampler(Sampler[tuple[int, int]]):
    """Yields `(row, epoch seed)` for the rows of the current epoch (set by `set_epoch`)."""

    def __init__(self) -> None:
        self.rows: list[int] = []
        self.seed = 0

    def set_epoch(self, rows: Sequence[int], seed: int) -> None:
        self.rows, self.seed = [int(r) for r in rows], int(seed)

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seed = self.seed
        return ((row, seed) for row in self.rows)


class _SeededRows(Dataset[Any]):
    """`dataset[row]` for `(row, epoch seed)` keys; reseeds torch per sample inside workers."""

    def __init__(self, dataset: Dataset[Any]) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        row, seed = key
        if get_worker_info() is not None:
            torch.manual_seed(sample_seed(seed, row))
        return self.dataset[row]


class EpochLoader:
    """The training loader of a run: `loader = epoch_loader.epoch(rows, seed)` per epoch.

    Workers (`num_workers > 0`) persist between epochs; `pin_memory` pins batches for
    asynchronous copies to a GPU.
    """

    def __init__(
        self, dataset: Dataset[Any], batch_size: int, num_workers: int = 0,
        pin_memory: bool = False,
    ) -> None:  # fmt: skip
        self.sampler = EpochSampler()
        self.loader: DataLoader[Any] = make_loader(
            _SeededRows(dataset), batch_size, shuffle=False, seed=0, num_workers=num_workers,
            sampler=self.sampler, pin_memory=pin_memory, persistent_workers=num_workers > 0,
        )  # fmt: skip

    def epoch(self, rows: Sequence[int], seed: int) -> DataLoader[Any]:
        """The loader, now yielding `rows` in order (augmentation seeded from `seed`)."""
        self.sampler.set_epoch(rows, seed)
        return self.loader
