"""The training loop: small named steps that `geoloc.train.run.train_run` composes.

`seed_everything` -> `fit` (per epoch: `epoch_order` -> `train_one_epoch` -> `evaluate` ->
`save_checkpoint` -> callbacks). Every epoch re-derives its randomness (sample order, hard-negative
draw, augmentation, dropout) from `(seed, epoch)`, so a run resumed from `last.pt` after epoch k
continues exactly like the uninterrupted run; the RNG states stored in checkpoints are restored too
for anything outside that per-epoch reseeding.

Inside an epoch, `checkpoints/last.pt` is also written every `train.checkpoint_every_steps`
steps with the epoch's position (step, running loss, predictions so far) and the RNG state there;
a resume from it skips the steps already taken (`EpochLoader.epoch(start_step=...)`) and ends the
epoch as the uninterrupted run would have.

Epoch numbers in metrics, callbacks and checkpoints are 1-based (`epoch` = epochs completed);
`HardNegConfig.start_epoch` is a 0-based epoch index, as documented in the config.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from geoloc.compute import Compute, resolve_compute, seed_everything
from geoloc.config import HardNegConfig, RunConfig, TrainConfig
from geoloc.data.dataset import GeoDataset
from geoloc.data.sampling import sampling_probabilities
from geoloc.data.state import maybe_fault
from geoloc.data.streaming import eval_loader
from geoloc.formatting import fmt_km, fmt_share
from geoloc.geo import LabelSpace, build_hardneg_pool
from geoloc.model import use_dense_gradients
from geoloc.progress import EpochCallback, format_duration, progress_log
from geoloc.train.checkpoint import rank_rng_state, rng_state, save_checkpoint, set_rng_state
from geoloc.train.epoch_loader import EpochLoader
from geoloc.train.margin import MarginTerm, Prototypes, epoch_margin_term
from geoloc.train.optim import build_optimizer, build_scheduler, steps_per_epoch
from geoloc.train.steps import (
    EpochResult,
    EpochTally,
    EvalResult,
    epoch_seed,
    evaluate,
    train_one_epoch,
)

if TYPE_CHECKING:
    from geoloc.train.distributed import DistContext

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------


def epoch_order(
    train_labels: np.ndarray,
    epoch_index: int,
    seed: int,
    pool_pred_labels: np.ndarray | None,
    pool_true_labels: np.ndarray | None,
    hardneg: HardNegConfig,
    probabilities: np.ndarray | None = None,
) -> np.ndarray:
    """Train row indices of one epoch: a seeded permutation, part replaced by hard negatives.

    With `probabilities` (`train.sampling` other than uniform, `geoloc.data.sampling`) the N rows
    are drawn with replacement from them instead of permuted. From `hardneg.start_epoch` on (and
    once a pool exists), `share` of the epoch's N samples are drawn from the cells confused in
    the previous epoch, the rest from the permutation (or draw); the epoch keeps N samples so the
    schedule and the budget do not change.
    """
    rng = np.random.default_rng(epoch_seed(seed, epoch_index))
    n = len(train_labels)
    if probabilities is None:
        order = rng.permutation(n)
    else:
        order = rng.choice(n, size=n, replace=True, p=probabilities)
    use_pool = (
        hardneg.enabled
        and epoch_index >= hardneg.start_epoch
        and pool_pred_labels is not None
        and pool_true_labels is not None
    )
    if not use_pool:
        return order
    seen = pool_pred_labels >= 0  # train-split pools only know rows seen last epoch
    pool = build_hardneg_pool(pool_true_labels[seen], pool_pred_labels[seen], hardneg)
    hard = pool.sample(train_labels, int(round(hardneg.share * n)), rng)
    if hard.size == 0:
        return order
    mixed = np.concatenate([order[: n - hard.size], hard])
    return mixed[rng.permutation(mixed.size)]


def is_better(value: float | None, best: float | None, mode: str) -> bool:
    """Does `value` improve on `best` (`min` or `max`)? Non-finite values never do."""
    if value is None or not math.isfinite(value):
        return False
    if best is None:
        return True
    return value < best if mode == "min" else value > best


@dataclass
class FitState:
    """Where a run stands; carried in checkpoints so a resume continues it."""

    epoch: int = 0  # epochs completed
    best_value: float | None = None
    best_epoch: int | None = None
    epochs_since_best: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    pool_pred_labels: np.ndarray | None = None  # previous epoch's predictions on pool_split
    prototypes: Prototypes | None = None  # hardneg.mode=margin: previous epoch's class means
    position: tuple[int, EpochTally] | None = None  # (steps done, tally) inside epoch `epoch`

    def to_checkpoint(self) -> tuple[dict[str, Any], dict[str, Any]]:
        best = {"value": self.best_value, "epoch": self.best_epoch}
        extra = {
            "epochs_since_best": self.epochs_since_best,
            "pool_pred_labels": (
                torch.from_numpy(self.pool_pred_labels)
                if self.pool_pred_labels is not None
                else None
            ),
            "prototypes": None if self.prototypes is None else self.prototypes.to_dict(),
            "position": (
                None if self.position is None
                else {"step": self.position[0], **self.position[1].to_dict()}
            ),  # fmt: skip
        }
        return best, extra

    def record(self, metrics: dict[str, Any], tc: TrainConfig) -> tuple[bool, bool]:
        """Add one epoch's metrics; (improved on the early-stopping metric, patience spent)."""
        self.epoch = int(metrics["epoch"])
        self.history.append(metrics)
        value = metrics.get(tc.early_stopping_metric)
        improved = is_better(value, self.best_value, tc.early_stopping_mode)
        if improved:
            self.best_value, self.best_epoch, self.epochs_since_best = float(value), self.epoch, 0
        else:
            self.epochs_since_best += 1
        patience = tc.early_stopping_patience
        return improved, bool(patience) and self.epochs_since_best >= patience

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> FitState:
        extra = ckpt.get("extra") or {}
        pool = extra.get("pool_pred_labels")
        pos = extra.get("position")
        protos = extra.get("prototypes")
        return cls(
            position=(int(pos["step"]), EpochTally.from_dict(pos)) if pos else None,
            epoch=int(ckpt["epoch"]),
            best_value=ckpt["best"].get("value"),
            best_epoch=ckpt["best"].get("epoch"),
            epochs_since_best=int(extra.get("epochs_since_best", 0)),
            history=list(ckpt.get("history", [])),
            pool_pred_labels=pool.numpy() if pool is not None else None,
            prototypes=Prototypes.from_dict(protos) if protos else None,
        )


@dataclass
class FitResult:
    """How `fit` ended."""

    state: FitState
    stopped_early: bool
    skipped_train: int = 0  # distinct streamed training images left out as unreadable (all ranks)
    best_val: EvalResult | None = None
    """The last epoch's val evaluation when that epoch was the best: the model in memory is
    then `best.pt`, and the final val numbers need no second pass (at 10^6 images, ~4 min)."""


@dataclass
class _Optimisation:
    """Optimiser, per-step schedule and AMP scaler of one run (what a checkpoint restores)."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler

    @classmethod
    def build(cls, model: nn.Module, cfg: RunConfig, n_rows: int,
              compute: Compute) -> _Optimisation:  # fmt: skip
        optimizer = build_optimizer(model, cfg.train)
        scheduler = build_scheduler(optimizer, cfg.train, steps_per_epoch(n_rows, cfg.train))
        return cls(optimizer, scheduler, compute.grad_scaler())

    def restore(self, model: nn.Module, ckpt: dict[str, Any], rank: int = 0) -> FitState:
        """Load a checkpoint's model, optimiser, schedule, scaler and this rank's RNG; its
        `FitState`."""
        model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(rank_rng_state(ckpt, rank))
        return FitState.from_checkpoint(ckpt)


def fit(
    model: nn.Module,
    train_set: GeoDataset,
    val_set: GeoDataset,
    criterion: nn.Module,
    label_space: LabelSpace,
    cfg: RunConfig,
    device: torch.device,
    checkpoint_dir: Path,
    *,
    callbacks: Sequence[EpochCallback] = (),
    resume_from: dict[str, Any] | None = None,
    progress: bool = True,
    dist: DistContext | None = None,
) -> FitResult:
    """Train for `cfg.train.epochs`, evaluating on val and checkpointing every epoch.

    `checkpoint_dir/last.pt` is written after each epoch (every `checkpoint_every`, and always at
    the end) and `best.pt` when `early_stopping_metric` improves. Callbacks run after the
    checkpoint; an exception from one (e.g. `TrialPruned`) propagates to the caller.
    With `dist` (`geoloc.train.distributed`), this rank trains its shard of each global batch
    through DDP; only rank 0 writes checkpoints and runs callbacks.
    """
    tc = cfg.train
    compute = resolve_compute(tc, device, model)
    compute.prepare_model(model.to(device))
    opt = _Optimisation.build(model, cfg, len(train_set), compute)
    state = FitState()
    if resume_from is not None:
        state = opt.restore(model, resume_from, 0 if dist is None else dist.rank)
        log.info("resuming after epoch %d", state.epoch)
    train_model = _training_model(model, cfg, dist)
    is_main = dist is None or dist.is_main
    cuda = device.type == "cuda"
    val_loader = eval_loader(val_set, tc.batch_size, tc.num_workers, pin_memory=cuda)
    batch_size = tc.batch_size if dist is None else dist.local_batch(tc.batch_size)
    train_loader = EpochLoader(
        train_set, batch_size, tc.num_workers, pin_memory=cuda, shuffle_buffer=tc.shuffle_buffer,
        rank=0 if dist is None else dist.rank, world=1 if dist is None else dist.world_size,
    )  # fmt: skip
    saver = _StepCheckpoints(checkpoint_dir, model, opt, cfg, label_space, state, dist)
    pool_true = None  # oversampling's pool; margin mode mines in `epoch_margin_term`
    if cfg.hardneg.enabled and cfg.hardneg.mode == "oversample":
        pool_true = train_set.labels if cfg.hardneg.pool_split == "train" else val_set.labels
    # train.sampling's row probabilities (run.py refuses a non-uniform one on a streamed split)
    probabilities = None if train_loader.streamed else sampling_probabilities(
        train_set, tc, label_space.resolution)  # fmt: skip
    epochs_bar = tqdm(range(state.epoch, tc.epochs), initial=state.epoch, total=tc.epochs,
                      desc="train", unit="epoch", disable=not progress)  # fmt: skip
    session_start = (state.epoch, time.perf_counter())  # (epochs done, when) for the ETA
    best_val: EvalResult | None = None
    for epoch_index in epochs_bar:
        start = time.perf_counter()
        order = None
        if not train_loader.streamed:  # a streamed split's order is the loader's stream plan
            order = epoch_order(train_set.labels, epoch_index, cfg.seed, state.pool_pred_labels,
                                pool_true, cfg.hardneg, probabilities)  # fmt: skip
        margin = epoch_margin_term(cfg.hardneg, epoch_index, train_set.labels,
                                   state.pool_pred_labels, state.prototypes, label_space,
                                   device)  # fmt: skip
        trained = _train_epoch(train_model, model, train_loader, order, len(train_set), criterion,
                               opt, cfg, device, epoch_index, compute, progress, dist,
                               saver, margin)  # fmt: skip
        state.position = None
        evaluated = evaluate(
            model, val_loader, criterion, label_space, device, prefix="val",
            parent_loss_weight=tc.parent_loss_weight, hier_topk_parents=tc.hier_topk_parents,
            compute=compute, progress=progress,
        )  # fmt: skip
        if cfg.hardneg.enabled:
            train_pool = cfg.hardneg.pool_split == "train"
            state.pool_pred_labels = trained.pred_labels if train_pool else evaluated.pred_labels
        metrics = {"epoch": epoch_index + 1, "train_loss": trained.loss, **evaluated.metrics,
                   "lr": opt.optimizer.param_groups[0]["lr"],
                   "epoch_time_s": time.perf_counter() - start}  # fmt: skip
        if trained.margin is not None:  # the term's mean per image (part of train_loss)
            state.prototypes = Prototypes.updated(state.prototypes, trained.margin)
            metrics["train_margin_loss"] = trained.margin.term_sum / max(trained.images, 1)
        improved, stop = state.record(metrics, tc)
        best_val = evaluated if improved else None
        stop = stop if dist is None else dist.agree(stop)
        skipped = _skipped_train(train_loader, dist)
        if is_main:
            _save_checkpoints(checkpoint_dir, model, opt, cfg, label_space, state, improved,
                              last=stop or state.epoch == tc.epochs)  # fmt: skip
        if is_main:
            _log_epoch(epochs_bar, metrics, tc.epochs, session_start, skipped)
        for callback in callbacks if is_main else ():
            callback(state.epoch, dict(metrics))
        if stop:
            log.info("early stopping after epoch %d (%s did not improve for %d epochs)",
                     state.epoch, tc.early_stopping_metric, state.epochs_since_best)  # fmt: skip
            return FitResult(state=state, stopped_early=True, skipped_train=skipped,
                             best_val=best_val)  # fmt: skip
    return FitResult(state=state, stopped_early=False,
                     skipped_train=_skipped_train(train_loader, dist),
                     best_val=best_val)  # fmt: skip


def _skipped_train(loader: EpochLoader, dist: DistContext | None) -> int:
    """Distinct training images left out as unreadable so far (a streamed split only: one
    decoded into memory counts them as it loads); under DDP, rows any rank left out."""
    if not loader.streamed:
        return 0
    marks = loader.split.left_out
    return int(marks.sum()) if dist is None else dist.count_marked(marks)


def _training_model(model: nn.Module, cfg: RunConfig, dist: DistContext | None) -> nn.Module:
    """What the training steps call: `model`, DDP-wrapped under `dist`, compiled on request.

    Parameters are shared, so `model` itself is what gets evaluated and checkpointed.
    """
    if dist is not None and use_dense_gradients(model):
        log.warning(
            "model.sparse_head under DistributedDataParallel: the head's tables take dense "
            "gradients (DDP here all-reduces dense gradients only), so each step updates every "
            "row, as plain AdamW; the parent tree is kept"
        )
    train_model = model if dist is None else dist.wrap(model, cfg)
    if cfg.train.compile:
        log.info("compiling the model with torch.compile (the first steps are slow)")
        train_model = torch.compile(train_model)
    return train_model


def _train_epoch(
    train_model: nn.Module,
    model: nn.Module,
    train_loader: EpochLoader,
    order: np.ndarray | None,
    num_rows: int,
    criterion: nn.Module,
    opt: _Optimisation,
    cfg: RunConfig,
    device: torch.device,
    epoch_index: int,
    compute: Compute,
    progress: bool,
    dist: DistContext | None,
    saver: _StepCheckpoints,
    margin: MarginTerm | None = None,
) -> EpochResult:
    """One pass over `order` (this rank's shard of it under DDP; a streamed split's own plan),
    reseeded from the epoch, or continued from a mid-epoch checkpoint's position."""
    tc = cfg.train
    seed = epoch_seed(cfg.seed, epoch_index)
    start_step, tally = saver.resume_point(epoch_index)
    if start_step == 0:
        # augmentation (without workers) and dropout draw from torch's global RNG: reseed per
        # epoch (a mid-epoch resume has restored the RNG state of its step instead)
        seed_everything(seed, 0 if dist is None else dist.rank, tc.deterministic)
    rows = None
    if order is not None:
        rows = order.tolist() if dist is None else dist.shard(order, tc.batch_size)
    trained = train_one_epoch(
        train_model, train_loader.epoch(rows, seed, start_step), criterion, opt.optimizer,
        opt.scheduler, opt.scaler, device, epoch=epoch_index + 1,
        parent_loss_weight=tc.parent_loss_weight, compute=compute,
        max_steps=tc.max_steps_per_epoch, num_rows=num_rows, progress=progress,
        start_step=start_step, tally=tally, on_step=saver.hook(epoch_index), margin=margin,
    )  # fmt: skip
    return trained if dist is None else dist.after_epoch(model, trained)


class _StepCheckpoints:
    """Mid-epoch `last.pt` every `train.checkpoint_every_steps` steps, and where to resume.

    The checkpoint records the epoch's position (steps done, running loss and predictions,
    reduced over DDP ranks) and the RNG state after that step; rank 0 writes it.
    `GEOLOC_FAULT_AFTER=train:<n>` kills the process after its n-th step (resume tests).
    """

    def __init__(self, checkpoint_dir: Path, model: nn.Module, opt: _Optimisation,
                 cfg: RunConfig, label_space: LabelSpace, state: FitState,
                 dist: DistContext | None) -> None:  # fmt: skip
        self.checkpoint_dir, self.model, self.opt = checkpoint_dir, model, opt
        self.cfg, self.label_space, self.state, self.dist = cfg, label_space, state, dist
        self.steps_run = 0  # steps this process has taken (the fault hook counts them)

    def resume_point(self, epoch_index: int) -> tuple[int, EpochTally | None]:
        """(first step, tally) of this epoch: (0, None) unless resuming inside it."""
        if self.state.position is None or epoch_index != self.state.epoch:
            return 0, None
        step, tally = self.state.position
        if self.dist is not None and not self.dist.is_main:  # rank 0 carries the ranks' totals
            tally = EpochTally(
                0.0, 0, tally.preds.copy(), None if tally.margin is None else tally.margin.zeros()
            )
        log.info("resuming epoch %d at step %d", epoch_index + 1, step)
        return step, tally

    def hook(self, epoch_index: int) -> Callable[[int, Callable[[], EpochTally]], None]:
        every = self.cfg.train.checkpoint_every_steps

        def after_step(steps_done: int, tally: Callable[[], EpochTally]) -> None:
            self.steps_run += 1
            if every and steps_done % every == 0:
                self.save(steps_done, tally())
            maybe_fault("train", self.steps_run)

        return after_step

    def save(self, steps_done: int, tally: EpochTally) -> None:
        rng_ranks = None
        if self.dist is not None:
            tally = self.dist.reduce_tally(tally)
            rng_ranks = self.dist.gather(rng_state())  # each rank resumes its own draws
        if self.dist is not None and not self.dist.is_main:
            return
        state = FitState(**{**self.state.__dict__, "position": (steps_done, tally)})
        best, extra = state.to_checkpoint()
        save_checkpoint(
            self.checkpoint_dir / "last.pt", model=self.model, optimizer=self.opt.optimizer,
            scheduler=self.opt.scheduler, scaler=self.opt.scaler, epoch=state.epoch,
            config=self.cfg.model_dump(mode="json"), label_space=self.label_space, best=best,
            history=state.history, extra=extra, rng_ranks=rng_ranks,
        )  # fmt: skip


def _save_checkpoints(
    checkpoint_dir: Path,
    model: nn.Module,
    opt: _Optimisation,
    cfg: RunConfig,
    label_space: LabelSpace,
    state: FitState,
    improved: bool,
    last: bool,
) -> None:
    """`best.pt` when the run improved, `last.pt` every `checkpoint_every` epochs and at the end."""
    best, extra = state.to_checkpoint()
    kwargs = dict(
        model=model, optimizer=opt.optimizer, scheduler=opt.scheduler, scaler=opt.scaler,
        epoch=state.epoch, config=cfg.model_dump(mode="json"), label_space=label_space,
        best=best, history=state.history, extra=extra,
    )  # fmt: skip
    if improved:
        save_checkpoint(checkpoint_dir / "best.pt", **kwargs)
    if state.epoch % cfg.train.checkpoint_every == 0 or last:
        save_checkpoint(checkpoint_dir / "last.pt", **kwargs)


def epoch_line(metrics: dict[str, Any], epochs: int, eta_s: float | None,
               skipped: int = 0) -> str:  # fmt: skip
    """`epoch 3/8: loss 4.213, val top-1 41.2%, median 201 km, P90 3,623 km, 24.1 s, ETA ...`,
    then `, 12 unreadable training images skipped` when a damaged shard left images out."""
    eta = "done" if metrics["epoch"] >= epochs else f"ETA {format_duration(eta_s)}"
    left_out = f", {skipped:,} unreadable training images skipped" if skipped else ""
    return (
        f"epoch {metrics['epoch']}/{epochs}: loss {metrics['train_loss']:.4f}, "
        f"val top-1 {fmt_share(metrics.get('val_top1'))}, "
        f"median {fmt_km(metrics.get('val_median_km'))}, P90 {fmt_km(metrics.get('val_p90_km'))}, "
        f"{format_duration(metrics['epoch_time_s'])}, {eta}{left_out}"
    )


def _log_epoch(bar: Any, metrics: dict[str, Any], epochs: int,
               session_start: tuple[int, float], skipped: int = 0) -> None:  # fmt: skip
    """One line per epoch on `geoloc.progress` (CLI, flow-run logs), and the bar's postfix."""
    done0, t0 = session_start
    done = metrics["epoch"] - done0  # epochs of this process: a resume does not skew the ETA
    eta = (time.perf_counter() - t0) / done * (epochs - metrics["epoch"]) if done > 0 else None
    progress_log.info(epoch_line(metrics, epochs, eta, skipped))
    bar.set_postfix(
        val_top1=f"{metrics['val_top1']:.3f}", val_median_km=f"{metrics['val_median_km']:.0f}"
    )
