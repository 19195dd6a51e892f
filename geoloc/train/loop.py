"""The training loop: small named steps that `geoloc.train.run.train_run` composes.

`seed_everything` -> `fit` (per epoch: `epoch_order` -> `train_one_epoch` -> `evaluate` ->
`save_checkpoint` -> callbacks). Every epoch re-derives its randomness (sample order, hard-negative
draw, augmentation, dropout) from `(seed, epoch)`, so a run resumed from `last.pt` after epoch k
continues exactly like the uninterrupted run; the RNG states stored in checkpoints are restored too
for anything outside that per-epoch reseeding.

Epoch numbers in metrics, callbacks and checkpoints are 1-based (`epoch` = epochs completed);
`HardNegConfig.start_epoch` is a 0-based epoch index, as documented in the config.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from geoloc.atomic import atomic_path
from geoloc.config import HardNegConfig, RunConfig, TrainConfig
from geoloc.data.dataset import GeoDataset, make_loader
from geoloc.errors import GeolocError
from geoloc.geo import LabelSpace, build_hardneg_pool
from geoloc.geo import haversine_km as _haversine_km
from geoloc.geo.metrics import geo_metrics_from_errors, topk_accuracy
from geoloc.model.scores import class_scores

if TYPE_CHECKING:
    from geoloc.train.distributed import DistContext

log = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
PREDICTION_TOPK = 10
"""How many top classes the predictions parquet keeps per image."""

EpochCallback = Callable[[int, dict[str, Any]], None]


class TrainingError(GeolocError):
    """Training cannot go on (NaN loss, incompatible checkpoint...); the message says why."""


# --------------------------------------------------------------------------------------------
# Seeding and devices
# --------------------------------------------------------------------------------------------


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (CPU and CUDA) from one number; ranks get distinct streams."""
    s = (int(seed) + 1_000_003 * int(rank)) % 2**32
    random.seed(s)
    np.random.seed(s)
    torch.manual_seed(s)  # also seeds every CUDA device
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def epoch_seed(seed: int, epoch_index: int) -> int:
    """The seed of one epoch's randomness; a pure function so resumed runs reproduce it."""
    return (int(seed) * 1_000_003 + 7919 * int(epoch_index) + 1) % 2**31


def resolve_device(name: str) -> torch.device:
    """`auto` -> CUDA when available, else CPU; anything else must name an available device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise GeolocError(f"train.device '{name}' is not a device: {exc}") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GeolocError(f"train.device '{name}' asks for CUDA but no GPU is available")
    return device


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch RNG states as tensors/lists (safe for `weights_only=True`)."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    return {
        "python": [int(version), list(internal), gauss],
        "numpy": [
            str(np_state[0]),
            torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            *(int(v) if i < 2 else float(v) for i, v in enumerate(np_state[2:])),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(v) for v in internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------------
# Optimisation pieces
# --------------------------------------------------------------------------------------------


def build_optimizer(model: nn.Module, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW or SGD with momentum over all trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=train_cfg.lr,
            momentum=0.9,
            nesterov=True,
            weight_decay=train_cfg.weight_decay,
        )
    return torch.optim.AdamW(params, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """Multiplier of the peak lr at optimizer step `step`: linear warm-up, then cosine or flat."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "none":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(
    optimizer: torch.optim.Optimizer, train_cfg: TrainConfig, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step schedule over the whole run (warm-up epochs, then cosine to 0 or constant)."""
    total = train_cfg.epochs * steps_per_epoch
    warmup = train_cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        return lr_factor(step, warmup, total, train_cfg.scheduler)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def steps_per_epoch(num_samples: int, train_cfg: TrainConfig) -> int:
    steps = math.ceil(num_samples / train_cfg.batch_size)
    return min(steps, train_cfg.max_steps_per_epoch) if train_cfg.max_steps_per_epoch else steps


def total_loss(
    outputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    parent_labels: torch.Tensor,
    criterion: nn.Module,
    parent_loss_weight: float,
) -> torch.Tensor:
    """Child-head loss plus `parent_loss_weight` x parent-head cross-entropy (when there is one)."""
    loss = criterion(outputs["logits"].float(), labels)
    parent_logits = outputs.get("parent_logits")
    if parent_logits is not None and parent_loss_weight > 0:
        loss = loss + parent_loss_weight * F.cross_entropy(parent_logits.float(), parent_labels)
    return loss


def _autocast(device: torch.device, amp: bool) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.float16, enabled=amp and device.type == "cuda")


# --------------------------------------------------------------------------------------------
# One epoch of training
# --------------------------------------------------------------------------------------------


@dataclass
class EpochResult:
    """What one training epoch produced."""

    loss: float
    images: int
    seconds: float
    pred_labels: np.ndarray  # (N_train,) argmax per train row seen this epoch, -1 if unseen


def train_one_epoch(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    scaler: torch.amp.GradScaler,
    device: torch.device,
    *,
    epoch: int,
    parent_loss_weight: float = 0.0,
    amp: bool = False,
    max_steps: int = 0,
    num_rows: int | None = None,
    progress: bool = True,
) -> EpochResult:
    """One pass over `loader`; a non-finite loss stops with a `TrainingError` naming the step.

    Returns the mean loss per image and each row's last training-time prediction (the
    hard-negative pool can be built from train confusion without another pass).
    """
    model.train()
    n_rows = num_rows if num_rows is not None else len(loader.dataset)  # type: ignore[arg-type]
    preds = np.full(n_rows, -1, dtype=np.int64)
    loss_sum, seen, start = 0.0, 0, time.perf_counter()
    total = min(len(loader), max_steps) if max_steps else len(loader)
    bar = tqdm(loader, total=total, desc=f"epoch {epoch}", unit="batch", leave=False,
               disable=not progress)  # fmt: skip
    for step, (images, labels, parent_labels, rows) in enumerate(bar):
        if max_steps and step >= max_steps:
            break
        images = images.to(device, non_blocking=True)  # (B, 3, S, S)
        labels = labels.to(device, non_blocking=True)  # (B,)
        parent_labels = parent_labels.to(device, non_blocking=True)  # (B,)
        with _autocast(device, amp):
            outputs = model(images)
        loss = total_loss(outputs, labels, parent_labels, criterion, parent_loss_weight)
        if not torch.isfinite(loss):
            lr = optimizer.param_groups[0]["lr"]
            raise TrainingError(
                f"loss is {loss.item()} at epoch {epoch}, step {step} (lr={lr:.3g}); "
                "lower train.lr or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        batch = labels.shape[0]
        loss_sum += float(loss.detach()) * batch
        seen += batch
        preds[rows.numpy()] = outputs["logits"].detach().argmax(dim=1).cpu().numpy()
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", refresh=False)
    return EpochResult(
        loss=loss_sum / max(seen, 1),
        images=seen,
        seconds=time.perf_counter() - start,
        pred_labels=preds,
    )


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """Metrics (prefixed, e.g. `val_top1`) and one prediction row per image."""

    metrics: dict[str, float]
    predictions: pd.DataFrame
    pred_labels: np.ndarray = field(repr=False)  # (N,) top-1 class per row


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    criterion: nn.Module,
    label_space: LabelSpace,
    device: torch.device,
    *,
    prefix: str = "val",
    parent_loss_weight: float = 0.0,
    hier_topk_parents: int = 0,
    amp: bool = False,
    progress: bool = True,
) -> EvalResult:
    """Loss, top-1/top-5, parent accuracy and geo metrics on a `GeoDataset` loader.

    The predicted location is the predicted class centroid; the true location is the image's
    own coordinate. `parent_acc` asks whether the predicted class lies in the true parent cell, so
    it is comparable between runs with and without a parent head.
    """
    dataset = loader.dataset
    if not isinstance(dataset, GeoDataset):
        raise TypeError("evaluate needs a loader over a GeoDataset")
    model.eval()
    parent_of = torch.as_tensor(label_space.parent_of, dtype=torch.long)
    n = len(dataset)
    k = min(PREDICTION_TOPK, label_space.num_classes)
    top_labels = np.zeros((n, k), dtype=np.int64)
    top_probs = np.zeros((n, k), dtype=np.float32)
    loss_sum, top5_hits = 0.0, 0.0
    for images, labels, parent_labels, rows in tqdm(
        loader, desc=f"eval {prefix}", unit="batch", leave=False, disable=not progress
    ):
        images = images.to(device, non_blocking=True)
        labels_d = labels.to(device, non_blocking=True)
        with _autocast(device, amp):
            outputs = model(images)
        loss = total_loss(
            outputs, labels_d, parent_labels.to(device), criterion, parent_loss_weight
        )
        loss_sum += float(loss) * labels.shape[0]
        scores = class_scores(outputs, parent_of.to(device), hier_topk_parents).cpu()  # (B, K)
        top5_hits += topk_accuracy(scores, labels, 5) * labels.shape[0]
        p, i = scores.topk(k, dim=1)
        top_labels[rows.numpy()] = i.numpy()
        top_probs[rows.numpy()] = p.numpy()
    predictions = predictions_frame(dataset, label_space, top_labels, top_probs)
    errors = predictions["error_km"].to_numpy()
    pred = top_labels[:, 0]
    metrics = {
        "loss": loss_sum / n,
        "top1": float(np.mean(pred == dataset.labels)),
        "top5": top5_hits / n,
        "parent_acc": float(np.mean(label_space.parent_of[pred] == dataset.parent_labels)),
        **geo_metrics_from_errors(errors),
    }
    return EvalResult(
        metrics={f"{prefix}_{key}": float(v) for key, v in metrics.items()},
        predictions=predictions,
        pred_labels=pred,
    )


def predictions_frame(
    dataset: GeoDataset, label_space: LabelSpace, top_labels: np.ndarray, top_probs: np.ndarray
) -> pd.DataFrame:
    """The predictions parquet contract (docs/ARCHITECTURE.md) from top-k labels/probabilities."""
    table = dataset.table
    cells = np.asarray(label_space.cells, dtype=object)
    pred = top_labels[:, 0]
    true_lat = table["lat"].to_numpy(dtype=np.float64)
    true_lon = table["lon"].to_numpy(dtype=np.float64)
    pred_lat, pred_lon = label_space.lat[pred], label_space.lon[pred]
    return pd.DataFrame(
        {
            "image_id": table["image_id"].astype(str).to_numpy(),
            "true_lat": true_lat,
            "true_lon": true_lon,
            "true_cell": cells[dataset.labels],
            "true_label": dataset.labels,
            "pred_label": pred,
            "pred_cell": cells[pred],
            "pred_lat": pred_lat,
            "pred_lon": pred_lon,
            "error_km": _haversine_km(true_lat, true_lon, pred_lat, pred_lon),
            "prob": top_probs[:, 0].astype(np.float64),
            "topk_labels": [row.tolist() for row in top_labels],
            "topk_cells": [cells[row].tolist() for row in top_labels],
            "topk_probs": [row.astype(np.float64).tolist() for row in top_probs],
        }
    )


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def save_checkpoint(
    path: Path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None,
    scaler: torch.amp.GradScaler | None,
    epoch: int,
    config: dict[str, Any],
    label_space: LabelSpace,
    best: dict[str, Any],
    history: list[dict[str, Any]],
    extra: dict[str, Any] | None = None,
) -> None:
    """Everything to rebuild the model and resume: one dict of tensors and plain values.

    Written atomically, so a crash mid-save never leaves a broken `last.pt`. Loadable with
    `torch.load(weights_only=True)`: RNG states are tensors/lists, configs are JSON dicts.
    """
    state = {
        "version": CHECKPOINT_VERSION,
        "epoch": int(epoch),
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rng_state(),
        "config": config,
        "label_space": label_space.to_dict(),
        "best": best,
        "history": history,
        "extra": extra or {},
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint dict (`weights_only=True`); `TrainingError` naming the file when unusable."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"checkpoint '{path}' does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for a bad file
        raise TrainingError(f"checkpoint '{path}' could not be loaded: {exc}") from exc
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise TrainingError(
            f"checkpoint '{path}' has version {version!r}; this geoloc reads {CHECKPOINT_VERSION}"
        )
    return state


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
) -> np.ndarray:
    """Train row indices of one epoch: a seeded permutation, part replaced by hard negatives.

    From `hardneg.start_epoch` on (and once a pool exists), `share` of the epoch's N samples are
    drawn from the cells confused in the previous epoch, the rest from a fresh permutation; the
    epoch keeps N samples so the schedule and the budget do not change.
    """
    rng = np.random.default_rng(epoch_seed(seed, epoch_index))
    n = len(train_labels)
    order = rng.permutation(n)
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

    def to_checkpoint(self) -> tuple[dict[str, Any], dict[str, Any]]:
        best = {"value": self.best_value, "epoch": self.best_epoch}
        extra = {
            "epochs_since_best": self.epochs_since_best,
            "pool_pred_labels": (
                torch.from_numpy(self.pool_pred_labels)
                if self.pool_pred_labels is not None
                else None
            ),
        }
        return best, extra

    @classmethod
    def from_checkpoint(cls, ckpt: dict[str, Any]) -> FitState:
        extra = ckpt.get("extra") or {}
        pool = extra.get("pool_pred_labels")
        return cls(
            epoch=int(ckpt["epoch"]),
            best_value=ckpt["best"].get("value"),
            best_epoch=ckpt["best"].get("epoch"),
            epochs_since_best=int(extra.get("epochs_since_best", 0)),
            history=list(ckpt.get("history", [])),
            pool_pred_labels=pool.numpy() if pool is not None else None,
        )


@dataclass
class FitResult:
    """How `fit` ended."""

    state: FitState
    stopped_early: bool


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
    With `dist` (`geoloc.train.distributed`), this rank trains its shard of each global batch through
    DDP; only rank 0 writes checkpoints and runs callbacks.
    """
    tc = cfg.train
    amp = tc.amp and device.type == "cuda"
    model.to(device)
    optimizer = build_optimizer(model, tc)
    n_steps = steps_per_epoch(len(train_set), tc)
    scheduler = build_scheduler(optimizer, tc, n_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    state = FitState()
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
        optimizer.load_state_dict(resume_from["optimizer"])
        scheduler.load_state_dict(resume_from["scheduler"])
        if resume_from.get("scaler"):
            scaler.load_state_dict(resume_from["scaler"])
        set_rng_state(resume_from["rng"])
        state = FitState.from_checkpoint(resume_from)
        log.info("resuming after epoch %d", state.epoch)
    train_model = model if dist is None else dist.wrap(model, cfg)
    is_main = dist is None or dist.is_main
    rank = 0 if dist is None else dist.rank

    val_loader = make_loader(val_set, tc.batch_size, shuffle=False, seed=cfg.seed,
                             num_workers=tc.num_workers)  # fmt: skip
    pool_true = None
    if cfg.hardneg.enabled:
        pool_true = train_set.labels if cfg.hardneg.pool_split == "train" else val_set.labels
    config_doc = cfg.model_dump(mode="json")
    stopped_early = False

    epochs_bar = tqdm(range(state.epoch, tc.epochs), initial=state.epoch, total=tc.epochs,
                      desc="train", unit="epoch", disable=not progress)  # fmt: skip
    for epoch_index in epochs_bar:
        epoch = epoch_index + 1
        start = time.perf_counter()
        order = epoch_order(train_set.labels, epoch_index, cfg.seed, state.pool_pred_labels,
                            pool_true, cfg.hardneg)  # fmt: skip
        # augmentation and dropout draw from torch's global RNG: reseed it per epoch
        seed_everything(epoch_seed(cfg.seed, epoch_index), rank)
        sampler = order.tolist() if dist is None else dist.shard(order, tc.batch_size)
        batch_size = tc.batch_size if dist is None else dist.local_batch(tc.batch_size)
        loader = make_loader(train_set, batch_size, shuffle=False,
                             seed=epoch_seed(cfg.seed, epoch_index), num_workers=tc.num_workers,
                             sampler=sampler)  # fmt: skip
        trained = train_one_epoch(
            train_model, loader, criterion, optimizer, scheduler, scaler, device,
            epoch=epoch, parent_loss_weight=tc.parent_loss_weight, amp=amp,
            max_steps=tc.max_steps_per_epoch, num_rows=len(train_set), progress=progress,
        )  # fmt: skip
        if dist is not None:
            trained = dist.after_epoch(model, trained)
        evaluated = evaluate(
            model, val_loader, criterion, label_space, device, prefix="val",
            parent_loss_weight=tc.parent_loss_weight, hier_topk_parents=tc.hier_topk_parents,
            amp=amp, progress=progress,
        )  # fmt: skip
        if cfg.hardneg.enabled:
            state.pool_pred_labels = (
                trained.pred_labels if cfg.hardneg.pool_split == "train" else evaluated.pred_labels
            )
        metrics = {
            "epoch": epoch,
            "train_loss": trained.loss,
            **evaluated.metrics,
            "lr": optimizer.param_groups[0]["lr"],
            "epoch_time_s": time.perf_counter() - start,
        }
        state.epoch = epoch
        state.history.append(metrics)
        value = metrics.get(tc.early_stopping_metric)
        improved = is_better(value, state.best_value, tc.early_stopping_mode)
        if improved:
            state.best_value, state.best_epoch, state.epochs_since_best = float(value), epoch, 0
        else:
            state.epochs_since_best += 1
        stop = bool(tc.early_stopping_patience) and (
            state.epochs_since_best >= tc.early_stopping_patience
        )
        stop = stop if dist is None else dist.agree(stop)
        last_epoch = epoch == tc.epochs or stop
        best, extra = state.to_checkpoint()
        ckpt_kwargs = dict(
            model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, epoch=epoch,
            config=config_doc, label_space=label_space, best=best, history=state.history,
            extra=extra,
        )  # fmt: skip
        if improved and is_main:
            save_checkpoint(checkpoint_dir / "best.pt", **ckpt_kwargs)
        if (epoch % tc.checkpoint_every == 0 or last_epoch) and is_main:
            save_checkpoint(checkpoint_dir / "last.pt", **ckpt_kwargs)
        log.info(
            "epoch %d: train_loss=%.4f val_top1=%.4f val_median_km=%.1f (%.1fs)",
            epoch, trained.loss, metrics["val_top1"], metrics["val_median_km"],
            metrics["epoch_time_s"],
        )  # fmt: skip
        epochs_bar.set_postfix(
            val_top1=f"{metrics['val_top1']:.3f}", val_median_km=f"{metrics['val_median_km']:.0f}"
        )
        for callback in callbacks if is_main else ():
            callback(epoch, dict(metrics))
        if stop:
            log.info("early stopping after epoch %d (%s did not improve for %d epochs)",
                     epoch, tc.early_stopping_metric, state.epochs_since_best)  # fmt: skip
            stopped_early = True
            break
    return FitResult(state=state, stopped_early=stopped_early)
