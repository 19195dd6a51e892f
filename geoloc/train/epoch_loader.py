"""One training DataLoader for the whole run, given a new plan every epoch.

The loader is a `geoloc.data.streaming.StreamingSplit`: the main process decides each epoch's
plan and its worker processes, started once, read it from shared memory at every pass (a
DataLoader built per epoch would start its workers again every epoch). Two kinds of plan:

- a split in memory (cached pixels, stored features) trains on the order the loop chose
  (`epoch_order`: a seeded permutation with hard negatives, sharded per DDP rank by
  `shard_order`), cut into batches;
- a streamed split trains on `stream_plan`: shuffled shard blocks read sequentially, one
  contiguous part per rank and worker, through a seeded shuffle buffer (hard negatives need
  random access and are refused for it before the run starts).

`epoch(..., start_step=k)` starts a pass at step k, with the batches an uninterrupted pass would
have yielded from there (a run resumed mid-epoch). Augmentation randomness stays a function of
`(seed, epoch)`: without workers, samples draw from torch's global RNG, which `fit` reseeds at
every epoch start (and a mid-epoch checkpoint restores); in a worker, torch is reseeded per
sample from (epoch seed, row), so an image's augmentation does not depend on which worker loads
it, how many there are, or whether the run was resumed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.utils.data import DataLoader

from geoloc.data.streaming import (
    PlanSize,
    StreamingSplit,
    is_streamed,
    memory_plan,
    sample_seed,
    shard_codes,
    split_loader,
    stream_plan,
)

__all__ = ["EpochLoader", "sample_seed"]


class EpochLoader:
    """The training loader of a run: `loader = epoch_loader.epoch(rows, seed)` per epoch.

    `batch_size` is this process's batch (the global batch over the DDP ranks); `rank`/`world`
    place a streamed split's part. Workers (`num_workers > 0`) persist between epochs;
    `pin_memory` pins batches for asynchronous copies to a GPU.
    """

    def __init__(
        self, dataset: Any, batch_size: int, num_workers: int = 0, pin_memory: bool = False,
        *, rank: int = 0, world: int = 1, shuffle_buffer: int = 4096,
    ) -> None:  # fmt: skip
        self.batch_size = batch_size
        self.rank, self.world, self.shuffle_buffer = rank, world, shuffle_buffer
        self.producers = max(1, num_workers)
        self.streamed = is_streamed(dataset)
        size = PlanSize.for_split(len(dataset), batch_size, streamed=self.streamed, world=world,
                                  workers=num_workers, extra=batch_size + world)  # fmt: skip
        self.split = StreamingSplit(dataset, size, shared=num_workers > 0)
        self._storage = dataset.locations.storage_order() if self.streamed else None
        self._codes = shard_codes(dataset) if self.streamed else None
        self.loader: DataLoader[Any] = split_loader(self.split, num_workers, pin_memory,
                                                    persistent=num_workers > 0)  # fmt: skip

    def epoch(
        self, rows: Sequence[int] | None, seed: int, start_step: int = 0
    ) -> DataLoader[Any]:
        """The loader, now yielding this epoch's batches from step `start_step` on.

        `rows`: this rank's rows in order (a split in memory); ignored for a streamed split,
        whose order is `stream_plan`'s for `seed`.
        """
        if self.streamed:
            plan = stream_plan(
                self._storage, self._codes, seed=seed, batch=self.batch_size, rank=self.rank,
                world=self.world, producers=self.producers, buffer=self.shuffle_buffer,
            )  # fmt: skip
        else:
            plan = memory_plan(list(rows or []), self.batch_size)
        self.split.set_plan(plan, seed, start_step)
        return self.loader
