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
GPU) and `torchrun --nproc_per_node N -m geoloc.train.distributed --config ...` (`main`; multi-node
too, with a run folder every node can see).
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as tdist
from torch import nn

from geoloc.errors import ConfigError
from geoloc.train.loop import EpochResult, TrainingError

if TYPE_CHECKING:
    from collections.abc import Sequence

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
        )

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
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if "OMP_NUM_THREADS" not in os.environ:  # N ranks on one host share its cores
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world)))
    backend = "nccl" if use_cuda else "gloo"
    tdist.init_process_group(backend, rank=rank, world_size=world, timeout=PROCESS_GROUP_TIMEOUT)
    log.info("rank %d/%d on %s (%s)", rank, world, device, backend)
    return DistContext(rank=rank, world_size=world, local_rank=local_rank, device=device)


def run_rank(cfg: RunConfig, run_dir: Path | None, resume: Path | None, progress: bool) -> Path:
    """One rank of a distributed run: rank 0 runs `train_run`, the others only `fit`.

    `run_dir` None (torchrun): rank 0 names the run and tells the others.
    """
    global _CURRENT
    from geoloc.train.run import train_run

    ctx = init_process_group(cfg.train.device)
    _CURRENT = ctx
    try:
        run_dir = _agree_run_dir(ctx, cfg, resume or run_dir)
        if ctx.is_main:
            return train_run(cfg, run_dir=None if resume else run_dir, resume=resume,
                             progress=progress)  # fmt: skip
        _train_follower(ctx, cfg, run_dir, resume)
        return run_dir
    finally:
        _CURRENT = None
        tdist.destroy_process_group()


def _agree_run_dir(ctx: DistContext, cfg: RunConfig, run_dir: Path | None) -> Path:
    from geoloc.paths import runs_dir
    from geoloc.runs.layout import new_run_id

    chosen = [str(run_dir or runs_dir() / new_run_id(cfg.name)) if ctx.is_main else None]
    tdist.broadcast_object_list(chosen, src=0)
    return Path(str(chosen[0]))


def _train_follower(ctx: DistContext, cfg: RunConfig, run_dir: Path, resume: Path | None) -> None:
    """What a rank other than 0 does: the same model and data, `fit` without writing anything."""
    from geoloc.data.dataset import index_files
    from geoloc.runs.layout import RunPaths
    from geoloc.train.loop import fit, load_checkpoint, seed_everything
    from geoloc.train.run import build_model_and_loss, load_run_data, resolve_index_dir

    data = load_run_data(cfg, resolve_index_dir(cfg))
    paths = RunPaths(run_dir)
    resume_ckpt = load_checkpoint(paths.last_checkpoint) if resume is not None else None
    seed_everything(cfg.seed, ctx.rank)
    model, criterion = build_model_and_loss(
        cfg, data.label_space, index_files(data.index_dir)["splits"]
    )
    criterion.to(ctx.device)
    fit(model, data.train, data.val, criterion, data.label_space, cfg, ctx.device,
        paths.checkpoints, resume_from=resume_ckpt, progress=False, dist=ctx)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on the loopback right now (rendezvous of spawned ranks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def launch(
    cfg: RunConfig,
    *,
    run_dir: Path | None = None,
    resume: Path | None = None,
    callbacks: Sequence[Any] = (),
    progress: bool = True,
) -> Path:
    """Train `cfg` with `cfg.train.nproc` processes on this host; returns the one run folder.

    Epoch callbacks (Optuna pruning) live in the caller's process and cannot follow the ranks:
    they are refused. A failed rank stops the others and raises `TrainingError`; rank 0 has
    recorded the failure in summary.json by then when the run folder existed.
    """
    import torch.multiprocessing as mp

    from geoloc.paths import runs_dir
    from geoloc.runs.layout import new_run_id

    if callbacks:
        raise ConfigError(
            f"train.nproc={cfg.train.nproc}: epoch callbacks (pruning) need train.nproc=1"
        )
    target = Path(resume) if resume else Path(run_dir) if run_dir else None
    target = target or runs_dir() / new_run_id(cfg.name)
    port = free_port()
    log.info("launching %d ranks for %s (port %d)", cfg.train.nproc, target, port)
    args = (cfg.model_dump(mode="json"), str(target), str(resume) if resume else None, port,
            progress)  # fmt: skip
    try:
        mp.spawn(_spawned_rank, args=args, nprocs=cfg.train.nproc, join=True)
    except mp.ProcessRaisedException as exc:
        last = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"distributed training of '{target}' failed: {last}") from exc
    except mp.ProcessExitedException as exc:
        raise TrainingError(f"distributed training of '{target}' failed: {exc}") from exc
    return target


def _spawned_rank(
    local_rank: int,
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
    run_rank(cfg, Path(run_dir), Path(resume) if resume else None, progress and local_rank == 0)


def main(argv: list[str] | None = None) -> None:
    """`torchrun --nproc_per_node N -m geoloc.train.distributed [--config C] [--set k=v] [--resume D]`."""
    from geoloc.config import load_config

    parser = argparse.ArgumentParser(prog="python -m geoloc.train.distributed", description=main.__doc__)
    parser.add_argument("--config", "-c", default=None, help="YAML/JSON config or preset name.")
    parser.add_argument("--set", "-s", action="append", default=[], help="key=value override.")
    parser.add_argument("--resume", default=None, help="Run folder to continue.")
    args = parser.parse_args(argv)
    if "WORLD_SIZE" not in os.environ:
        parser.error("run me under torchrun (WORLD_SIZE is not set); or use geoloc train --nproc")
    world = int(os.environ["WORLD_SIZE"])
    cfg = load_config(args.config, [*args.set, f"train.nproc={world}"])
    if os.environ.get("RANK", "0") == "0":
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    resume = Path(args.resume) if args.resume else None
    run_dir = run_rank(cfg, None, resume, progress=os.environ.get("RANK", "0") == "0")
    if os.environ.get("RANK", "0") == "0":
        print(run_dir)


if __name__ == "__main__":
    # `-m geoloc.train.distributed` runs this file as `__main__`, a second copy of the module: run the
    # imported one, whose context `geoloc.train.run` sees
    from geoloc.train.distributed import main as _main

    _main()
