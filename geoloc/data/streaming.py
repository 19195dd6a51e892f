"""Streaming input: an epoch as a plan of steps, served by an IterableDataset from memory or shards.

Every training and evaluation loader goes through `StreamingSplit`. The main process decides an
epoch's *plan*: for each step of this rank, the rows of its batch. Worker processes (persistent,
see `geoloc.train.epoch_loader`) read the plan from shared memory at the start of each pass, so
a new plan costs no new processes. Where the rows come from depends on the split:

- a split decoded into memory (`GeoDataset.cached`, or stored features) is read by row, in any
  order: its plan is the seeded permutation the loop chose (hard negatives included);
- a streamed split is read sequentially from its shards (`stream_plan`): the split's storage
  order (shard by shard, by offset) is cut into blocks of `BLOCK_ROWS` members, the blocks are
  shuffled per epoch, the stream is cut into one contiguous part per DDP rank and, within a rank,
  per loader worker; each worker reads its part front to back (large range reads, local or S3)
  and hands rows out through a seeded shuffle buffer of `shuffle_buffer` rows: a row leaves the
  buffer at a uniformly random point of the next `shuffle_buffer` reads.

Every row belongs to exactly one (rank, worker), so the parts have no duplicate and no gap; every
rank takes the same number of steps (its last batches may be one row short), as DDP's gradient
all-reduce needs. Step j of a rank comes from producer j mod P, so
the DataLoader's round-robin over workers yields steps in plan order.

Resuming mid-epoch: the plan is a pure function of (index, seed, epoch, ranks, workers); starting
at step k skips the first k steps without reading their rows, so the remaining batches are the
ones an uninterrupted pass yields (`start_step`). Augmentation in workers is reseeded per sample
from (epoch seed, row) (`sample_seed`), so an image's augmentation does not depend on which
worker loads it, nor on a resume.

An unreadable member of a streamed shard is left out of its batch with one warning line naming
the shard and the member (a `GeoDataset` opened with `unreadable="skip"`, as training opens its
splits; otherwise it is the error); the other rows, and the other shards, load on.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from geoloc.data.imagestore import ShardError
from geoloc.errors import DataError

log = logging.getLogger(__name__)

BLOCK_ROWS = 1024
"""Rows of a shuffled block: consecutive members of one shard (about 6-20 MB of JPEGs)."""


def sample_seed(epoch_seed: int, row: int) -> int:
    """The torch seed of one sample's augmentation in a worker (a pure function)."""
    return (int(epoch_seed) * 1_000_003 + int(row) * 7919 + 17) % 2**63


# --------------------------------------------------------------------------------------------
# Plans
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RankPlan:
    """One rank's pass: step j trains on `rows[bounds[j]:bounds[j + 1]]`.

    `reads` (streamed splits) holds, per producer, its rows in the order it reads them; None
    when the rows come from memory. Step j is made by producer `j % len(reads)`.
    """

    rows: np.ndarray
    bounds: np.ndarray
    reads: list[np.ndarray] | None = None

    @property
    def steps(self) -> int:
        return len(self.bounds) - 1

    def step(self, j: int) -> np.ndarray:
        return self.rows[self.bounds[j] : self.bounds[j + 1]]


def memory_plan(rows: Sequence[int] | np.ndarray, batch: int) -> RankPlan:
    """Consecutive batches of `batch` rows (the last one shorter), as a plain DataLoader cuts."""
    rows = np.asarray(rows, dtype=np.int64)
    bounds = np.append(np.arange(0, len(rows), batch), len(rows)).astype(np.int64)
    return RankPlan(rows, bounds if len(rows) else np.zeros(1, np.int64))


def batch_sizes(n_rows: int, steps: int, batch: int) -> np.ndarray:
    """`steps` sizes of at most `batch` summing to `n_rows`: full batches, the shortfall spread
    one row at a time over the last ones (no batch of one where it can be helped: BatchNorm
    cannot train on a single image)."""
    sizes = np.full(steps, batch, dtype=np.int64)
    deficit = steps * batch - n_rows
    rounds, rest = divmod(deficit, steps)
    sizes -= rounds
    if rest:
        sizes[steps - rest :] -= 1
    return np.maximum(sizes, 1)


def shuffled_blocks(storage: np.ndarray, shard_of: np.ndarray, seed: int,
                    shuffle: bool = True) -> np.ndarray:  # fmt: skip
    """The split's rows as one stream: storage order cut into blocks of up to `BLOCK_ROWS`
    members of one shard, blocks in a seeded order."""
    n = len(storage)
    if n == 0 or not shuffle:
        return storage
    codes = shard_of[storage]
    new_shard = np.r_[True, codes[1:] != codes[:-1]]
    shard_start = np.maximum.accumulate(np.where(new_shard, np.arange(n), 0))
    starts = np.flatnonzero(new_shard | ((np.arange(n) - shard_start) % BLOCK_ROWS == 0))
    order = np.random.default_rng([int(seed), 0x5EED]).permutation(len(starts))
    lengths = np.diff(np.append(starts, n))
    # positions of the permuted blocks, concatenated
    first = np.repeat(starts[order], lengths[order])
    within = np.arange(n) - np.repeat(np.cumsum(lengths[order]) - lengths[order], lengths[order])
    return storage[first + within]


def stream_plan(
    storage: np.ndarray,
    shard_of: np.ndarray,
    *,
    seed: int,
    batch: int,
    rank: int = 0,
    world: int = 1,
    producers: int = 1,
    buffer: int = 0,
    shuffle: bool = True,
) -> RankPlan:
    """This rank's part of a sequential pass over the split (see the module docstring).

    `storage`: the split's rows in storage order; `shard_of`: a shard code per row; `batch`:
    this rank's batch size; `buffer`: shuffle-buffer rows per producer (0 or `shuffle=False`:
    rows in read order, as evaluation reads them).
    """
    stream = shuffled_blocks(storage, shard_of, seed, shuffle)
    n = len(stream)
    if n == 0:
        raise DataError("a split with no images cannot be streamed")
    part = np.array_split(stream, world)[rank]
    per_rank = -(-n // world)
    steps = -(-per_rank // batch)  # the same on every rank
    if len(part) < steps:  # fewer rows than ranks x steps: lend rows so every rank steps
        part = np.resize(part if len(part) else stream[:1], steps)
    sizes = batch_sizes(len(part), steps, batch)
    producers = max(1, min(producers, steps))
    quotas = [int(sizes[p::producers].sum()) for p in range(producers)]
    cuts = np.cumsum([0, *quotas])
    reads, chunks = [], []
    for p in range(producers):
        mine = part[cuts[p] : cuts[p + 1]]
        if shuffle and buffer > 1 and len(mine) > 1:
            rng = np.random.default_rng([int(seed), rank, p])
            keys = np.arange(len(mine)) + rng.random(len(mine)) * buffer
            out = mine[np.argsort(keys, kind="stable")]
        else:
            out = mine
        reads.append(mine)
        chunks.append(np.split(out, np.cumsum(sizes[p::producers])[:-1]))
    ordered = [chunks[j % producers][j // producers] for j in range(steps)]
    rows = np.concatenate(ordered).astype(np.int64)
    bounds = np.append(0, np.cumsum(sizes)).astype(np.int64)
    return RankPlan(rows, bounds, reads)


# --------------------------------------------------------------------------------------------
# The plan in shared memory
# --------------------------------------------------------------------------------------------

_META = ("seed", "steps", "start", "n_rows", "producers", "n_reads", "version")


@dataclass(frozen=True)
class PlanSize:
    """The largest plan a loader will be given: rows over all steps, steps, rows to read."""

    rows: int
    steps: int
    reads: int = 0
    producers: int = 1

    @classmethod
    def for_split(cls, n_rows: int, batch: int, *, streamed: bool, world: int = 1,
                  workers: int = 0, extra: int = 0) -> PlanSize:  # fmt: skip
        """A memory plan holds up to `n_rows + extra` rows (hard negatives keep N; DDP's last
        batch may lend a row per rank); a streamed one this rank's part of the split."""
        rows = (-(-n_rows // world) + world if streamed else n_rows) + extra
        return cls(rows, -(-rows // max(1, batch)) + 2, rows if streamed else 0, max(1, workers))


class _SharedPlan:
    """A `RankPlan` in int32 tensors, in shared memory when workers read it (they then see
    each new plan); about 8 bytes per row of a streamed split, 4 in memory."""

    def __init__(self, size: PlanSize, shared: bool) -> None:
        self.size = size

        def zeros(n: int) -> torch.Tensor:
            t = torch.zeros(max(n, 1), dtype=torch.int32)
            return t.share_memory_() if shared else t

        self.meta = torch.zeros(len(_META), dtype=torch.int64)
        if shared:
            self.meta.share_memory_()
        self.rows, self.bounds = zeros(size.rows), zeros(size.steps + 1)
        self.reads, self.read_bounds = zeros(size.reads), zeros(size.producers + 1)

    def _m(self, name: str) -> int:
        return int(self.meta[_META.index(name)])

    def store(self, plan: RankPlan, seed: int, start: int) -> None:
        n, steps = len(plan.rows), plan.steps
        reads = plan.reads or []
        n_reads = sum(len(r) for r in reads)
        if (n > len(self.rows) or steps >= len(self.bounds) or n_reads > len(self.reads)
                or len(reads) >= len(self.read_bounds)):  # fmt: skip
            raise DataError(f"an epoch plan of {n} rows in {steps} steps exceeds its loader's "
                            f"{self.size}")  # fmt: skip
        self.rows[:n] = torch.from_numpy(plan.rows.astype(np.int32))
        self.bounds[: steps + 1] = torch.from_numpy(plan.bounds.astype(np.int32))
        offset = 0
        for p, part in enumerate(reads):
            self.reads[offset : offset + len(part)] = torch.from_numpy(part.astype(np.int32))
            self.read_bounds[p] = offset
            offset += len(part)
        self.read_bounds[len(reads)] = offset
        values = dict(seed=seed, steps=steps, start=start, n_rows=n, producers=len(reads),
                      n_reads=offset, version=self._m("version") + 1)  # fmt: skip
        self.meta[:] = torch.tensor([values[k] for k in _META], dtype=torch.int64)

    def load(self) -> tuple[RankPlan, int, int]:
        """(plan, epoch seed, start step) as last stored."""
        n, steps, producers = self._m("n_rows"), self._m("steps"), self._m("producers")
        rows = self.rows[:n].numpy().astype(np.int64)
        bounds = self.bounds[: steps + 1].numpy().astype(np.int64)
        reads = None
        if producers:
            rb = self.read_bounds[: producers + 1].numpy().astype(np.int64)
            flat = self.reads[: rb[-1]].numpy()
            reads = [flat[rb[p] : rb[p + 1]].astype(np.int64) for p in range(producers)]
        return RankPlan(rows, bounds, reads), self._m("seed"), self._m("start")

    def remaining(self) -> int:
        return max(0, self._m("steps") - self._m("start"))


# --------------------------------------------------------------------------------------------
# The IterableDataset
# --------------------------------------------------------------------------------------------


class StreamingSplit(IterableDataset):
    """Batches `(images, labels, parent labels, rows)` of the current plan, step after step.

    `dataset` is map-style: a `GeoDataset` (streamed when it is not cached: bytes come from its
    `locations`) or anything whose `dataset[row]` is a sample (stored features). Carries the
    split's `split`, `table`, `labels` and `parent_labels` for evaluation.
    """

    def __init__(self, dataset: Any, size: PlanSize, shared: bool = True) -> None:
        self.dataset = dataset
        self.plan = _SharedPlan(size, shared)
        # rows left out as unreadable (1 = skipped), written by whichever worker read them: the
        # run records how many distinct images it trained without (a degraded run)
        self.left_out = torch.zeros(max(len(dataset), 1), dtype=torch.uint8)
        if shared:
            self.left_out.share_memory_()

    # what evaluation and the hard-negative pool read from a split
    def __getattr__(self, name: str) -> Any:
        if name in ("split", "table", "labels", "parent_labels", "locations"):
            return getattr(self.__dict__["dataset"], name)
        raise AttributeError(name)

    @property
    def streamed(self) -> bool:
        """Whether this split is read from its shards (not from memory)."""
        return is_streamed(self.dataset)

    @property
    def skipped(self) -> int:
        """Distinct rows left out as unreadable so far, over every pass of this process."""
        return int(self.left_out.sum())

    def set_plan(self, plan: RankPlan, seed: int, start_step: int = 0) -> None:
        self.plan.store(plan, seed, start_step)

    def __len__(self) -> int:
        return self.plan.remaining()

    def __iter__(self) -> Iterator[Any]:
        plan, seed, start = self.plan.load()
        info = get_worker_info()
        workers, me = (1, 0) if info is None else (info.num_workers, info.id)
        steps = range(start + me, plan.steps, workers)  # the DataLoader's round-robin order
        reseed = info is not None
        if plan.reads is None:
            for j in steps:
                yield self._collate([self._sample(r, seed, reseed) for r in plan.step(j)])
            return
        yield from self._stream(plan, steps, seed, reseed)

    def _sample(self, row: int, seed: int, reseed: bool, data: bytes | None = None) -> Any:
        if reseed:
            torch.manual_seed(sample_seed(seed, row))
        if data is None:
            return self.dataset[int(row)]
        return self.dataset.sample_from_bytes(int(row), data)

    @staticmethod
    def _collate(samples: list[Any]) -> Any:
        return default_collate(samples)

    def _stream(self, plan: RankPlan, steps: range, seed: int, reseed: bool) -> Iterator[Any]:
        """Read each needed producer's part front to back; hand out each step's rows."""
        assert plan.reads is not None
        producers = len(plan.reads)
        needed = np.zeros(len(self.dataset.labels), dtype=bool)  # rows of this worker's steps
        mine = np.asarray(steps, dtype=np.int64)
        if len(mine):
            needed[np.concatenate([plan.step(j) for j in mine])] = True
        locations = self.dataset.locations
        readers = {
            int(p): locations.iter_bytes(plan.reads[p][needed[plan.reads[p]]])
            for p in np.unique(mine % producers)
        }
        held: dict[int, bytes | ShardError] = {}
        strict = getattr(self.dataset, "unreadable", "skip") != "skip"
        for j in steps:
            reader, samples, bad = readers[j % producers], [], []
            for row in plan.step(j).tolist():
                while row not in held:
                    got, data = next(reader)
                    held[got] = data
                data = held.pop(row)
                try:
                    if isinstance(data, ShardError):
                        raise data
                    samples.append(self._sample(row, seed, reseed, data))
                except DataError as exc:
                    if strict:  # readers that must see every image (rerank outputs)
                        raise
                    log.warning("skipping an unreadable image: %s", exc)
                    self.left_out[row] = 1
                    bad.append(exc)
            if not samples:
                raise DataError(f"every image of step {j} is unreadable, e.g. {bad[0]}")
            yield self._collate(samples)


def is_streamed(dataset: Any) -> bool:
    """A split read from its shards: it has image locations and no in-memory pixels."""
    return getattr(dataset, "locations", None) is not None and not getattr(dataset, "cached", True)


def shard_codes(dataset: Any) -> np.ndarray:
    """An integer per row naming the file its bytes are in (rows of one shard share it)."""
    return dataset.locations.codes


def split_loader(
    split: StreamingSplit, num_workers: int, pin_memory: bool, persistent: bool | None = None
) -> DataLoader[Any]:
    """The DataLoader over a `StreamingSplit` (batches come whole from the dataset)."""
    from geoloc.data.dataset import make_loader

    return make_loader(split, None, shuffle=False, seed=0, num_workers=num_workers,
                       pin_memory=pin_memory, persistent_workers=persistent)  # fmt: skip


def eval_loader(
    dataset: Any, batch_size: int, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader[Any]:
    """One pass over a split for evaluation: from memory in row order, or sequentially from its
    shards (rows in storage order, no shuffle); every row exactly once."""
    n = len(dataset.labels)
    size = PlanSize.for_split(n, batch_size, streamed=is_streamed(dataset), workers=num_workers)
    split = StreamingSplit(dataset, size, shared=num_workers > 0)
    if is_streamed(dataset):
        plan = stream_plan(dataset.locations.storage_order(), shard_codes(dataset), seed=0,
                           batch=batch_size, producers=max(1, num_workers),
                           shuffle=False)  # fmt: skip
    else:
        plan = memory_plan(np.arange(n), batch_size)
    split.set_plan(plan, seed=0)
    return split_loader(split, num_workers, pin_memory, persistent=False)
