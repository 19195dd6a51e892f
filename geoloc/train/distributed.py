"""Distributed data-parallel training: process group, launch, and each rank's share of an epoch.

`train.batch_size` stays the *global* batch: with N ranks each trains on `batch_size / N` rows per
step and DDP averages the gradients, so one step of N ranks sees the rows one step of a single
process would. Every rank builds the epoch's row order itself, identically, from the seed
(`geoloc.train.loop.epoch_order`: permutation plus hard-negative draws) and takes its slice of
each global batch (`shard_order`); no order is sent around. Train predictions are gathered after
each epoch, so the hard-negative pool, and with it the next epoch's order, is the same on every
rank. Only rank 0 writes (run directory, checkpoints, summary, report, MLflow); the other ranks
train and exit.

Two ways in: `geoloc train --nproc N` (`launch`: spawns N local processes, gloo on CPU, NCCL on
GPU) and `torchrun --nproc_per_node N -m geoloc train --config ...` (every process is a rank;
multi-node too, with a run folder every node can see). What a rank runs is
`geoloc.train.run.run_rank`; this module knows nothing of it (no import cycle).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from geoloc.compute import share_cores, torchrun_env
from geoloc.errors import TrainingError
from geoloc.train.margin import PrototypeTally
from geoloc.train.steps import EpochResult, EpochTally

if TYPE_CHECKING:
    from geoloc.config import RunConfig

log = logging.getLogger(__name__)

PROCESS_GROUP_TIMEOUT = timedelta(minutes=30)
"""How long a rank waits for the others in a collective before giving up."""


def shard_order(order: np.ndarray, global_batch: int, rank: int, world_size: int) -> list[int]:
    """This rank's rows of an epoch: each global batch of `order` cut into `world_size` slices.

    Slices are contiguous so rank r of step s holds rows `[s*B + r*b, s*B + (r+1)*b)` with
    `b = B / world_size`; batching the result by `b` gives back exactly these slices. Duplicates
    (hard-negative draws) stay where the order put them. A last batch with fewer rows than ranks
    lends its first row to the empty slices: every rank must take the same number of steps, or
    DDP's gradient all-reduce would wait forever.
    """
    rows: list[int] = []
    for start in range(0, len(order), global_batch):
        batch = np.asarray(order[start : start + global_batch])
        part = np.array_split(batch, world_size)[rank]
        rows.extend((part if part.size else batch[:1]).tolist())
    return rows


@dataclass(frozen=True)
class DistContext:
    """One rank's place in the process group; what `fit` needs to train data-parallel."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def local_batch(self, global_batch: int) -> int:
        return global_batch // self.world_size

    def shard(self, order: np.ndarray, global_batch: int) -> list[int]:
        return shard_order(order, global_batch, self.rank, self.world_size)

    def wrap(self, model: nn.Module, cfg: RunConfig) -> nn.Module:
        """DDP around `model` (parameters shared, so `model` itself stays the one to save).

        On GPU, BatchNorm becomes SyncBatchNorm so its statistics cover the global batch as in a
        single process; PyTorch has no CPU SyncBatchNorm, so gloo ranks normalise per shard.
        """
        if self.device.type == "cuda":
            nn.SyncBatchNorm.convert_sync_batchnorm(model)  # in place below the root module
        unused_parent = bool(getattr(model, "has_parent_head", False)) and (
            cfg.train.parent_loss_weight <= 0
        )
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=unused_parent,
        )

    def after_epoch(self, model: nn.Module, result: EpochResult) -> EpochResult:
        """Global loss and train predictions of an epoch; rank 0's BatchNorm buffers everywhere.

        Every rank then evaluates the very same model, so metrics and early stopping agree.
        """
        for buffer in model.buffers():
            tdist.broadcast(buffer.data, src=0)
        totals = torch.tensor([result.loss * result.images, float(result.images)],
                              dtype=torch.float64, device=self.device)  # fmt: skip
        tdist.all_reduce(totals)
        preds = torch.from_numpy(result.pred_labels).to(self.device)
        tdist.all_reduce(preds, op=tdist.ReduceOp.MAX)  # -1 = unseen; each row has one owner
        images = int(totals[1].item())
        return replace(
            result,
            loss=float(totals[0].item()) / max(images, 1),
            images=images,
            pred_labels=preds.cpu().numpy(),
            margin=self._reduce_prototypes(result.margin),
        )

    def count_marked(self, marks: torch.Tensor) -> int:
        """Rows marked (1) on any rank: a union, so a row two ranks both marked counts once."""
        union = marks.to(self.device)
        tdist.all_reduce(union, op=tdist.ReduceOp.MAX)
        return int(union.sum().item())

    def reduce_tally(self, tally: EpochTally) -> EpochTally:
        """The epoch's running totals over all ranks (what a mid-epoch checkpoint records)."""
        totals = torch.tensor([tally.loss_sum, float(tally.seen)], dtype=torch.float64,
                              device=self.device)  # fmt: skip
        tdist.all_reduce(totals)
        preds = torch.from_numpy(tally.preds).to(self.device)
        tdist.all_reduce(preds, op=tdist.ReduceOp.MAX)
        return EpochTally(float(totals[0].item()), int(totals[1].item()), preds.cpu().numpy(),
                          self._reduce_prototypes(tally.margin))  # fmt: skip

    def _reduce_prototypes(self, tally: PrototypeTally | None) -> PrototypeTally | None:
        """Prototype sums, counts and the margin term's total over all ranks (margin mode).

        A rank that has not stepped yet holds (C, 0) sums: it joins with zeros of the width the
        others agree on (the all-reduced maximum), so every rank calls the same collectives.
        """
        if tally is None:
            return None
        width = torch.tensor([tally.sums.shape[1]], device=self.device)
        tdist.all_reduce(width, op=tdist.ReduceOp.MAX)
        sums = tally.sums if tally.sums.shape[1] else np.zeros((len(tally.counts), int(width)))
        parts = [torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(self.device)
                 for a in (sums, tally.counts, [tally.term_sum])]  # fmt: skip
        for part in parts:
            tdist.all_reduce(part)
        sums_t, counts_t, term_t = (p.cpu().numpy() for p in parts)
        return PrototypeTally(sums_t, counts_t.astype(np.int64), float(term_t[0]))

    def gather(self, obj: Any) -> list[Any]:
        """`obj` of every rank, by rank, on every rank (picklable objects, e.g. RNG states)."""
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def agree(self, flag: bool) -> bool:
        """Rank 0's decision, on every rank (early stopping must end all ranks together)."""
        value = torch.tensor([int(flag)], device=self.device)
        tdist.broadcast(value, src=0)
        return bool(value.item())


_CURRENT: DistContext | None = None


def current_context() -> DistContext | None:
    """The context of this process while it is a rank of a distributed run, else None."""
    return _CURRENT


def init_process_group(device_name: str) -> DistContext:
    """Join the group described by torchrun's environment (RANK, WORLD_SIZE, MASTER_*...).

    NCCL and `cuda:LOCAL_RANK` when the run trains on GPU, gloo and CPU otherwise.
    """
    env = torchrun_env()
    rank, world, local_rank = env.rank, env.world_size, env.local_rank
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        share_cores(world)
    backend = "nccl" if use_cuda else "gloo"
    tdist.init_process_group(backend, rank=rank, world_size=world, timeout=PROCESS_GROUP_TIMEOUT)
    log.info("rank %d/%d on %s (%s)", rank, world, device, backend)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on the loopback right now (rendezvous of spawned ranks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


RankEntry = Callable[["RunConfig", Path | None, Path | None, bool], Path]
"""What each rank runs: `(cfg, run_dir, resume, progress) -> run_dir` (`run.run_rank`)."""


def joined_group(ctx: DistContext) -> contextlib.AbstractContextManager[DistContext]:
    """Make `ctx` this process's current context until the block ends, then leave the group."""

    @contextlib.contextmanager
    def _scope() -> Iterator[DistContext]:
        global _CURRENT
        _CURRENT = ctx
        try:
            yield ctx
        finally:
            _CURRENT = None
            tdist.destroy_process_group()

    return _scope()


def agree_run_dir(ctx: DistContext, chosen: Path) -> Path:
    """Rank 0's run folder, on every rank (torchrun: each rank would otherwise name its own)."""
    box = [str(chosen) if ctx.is_main else None]
    tdist.broadcast_object_list(box, src=0)
    return Path(str(box[0]))


def launch(
    entry: RankEntry,
    cfg: RunConfig,
    *,
    run_dir: Path,
    resume: Path | None = None,
    progress: bool = True,
) -> Path:
    """Run `entry` in `cfg.train.nproc` processes on this host; returns the one run folder.

    A failed rank stops the others and raises `TrainingError`; rank 0 has recorded the failure
    in summary.json by then when the run folder existed.
    """
    import torch.multiprocessing as mp

    port = free_port()
    log.info("launching %d ranks for %s (port %d)", cfg.train.nproc, run_dir, port)
    args = (entry, cfg.model_dump(mode="json"), str(run_dir), str(resume) if resume else None,
            port, progress)  # fmt: skip
    try:
        mp.spawn(_spawned_rank, args=args, nprocs=cfg.train.nproc, join=True)
    except mp.ProcessRaisedException as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"distributed training of '{run_dir}' failed: {last}") from exc
    except mp.ProcessExitedException as exc:
        raise TrainingError(f"distributed training of '{run_dir}' failed: {exc}") from exc
    return run_dir


def _spawned_rank(
    local_rank: int,
    entry: RankEntry,
    cfg_doc: dict[str, Any],
    run_dir: str,
    resume: str | None,
    port: int,
    progress: bool,
) -> None:
    from geoloc.config import RunConfig

    cfg = RunConfig.model_validate(cfg_doc)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(local_rank),
        LOCAL_RANK=str(local_rank),
        WORLD_SIZE=str(cfg.train.nproc),
    )
    if local_rank == 0:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    entry(cfg, Path(run_dir), Path(resume) if resume else None, progress and local_rank == 0)
