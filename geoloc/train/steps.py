"""One epoch of training and one evaluation pass: the steps `fit` repeats.

Also the seeding and device rules every step shares. Epoch numbers are 1-based.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader

from geoloc.data.dataset import GeoDataset
from geoloc.errors import GeolocError, TrainingError
from geoloc.geo import LabelSpace
from geoloc.geo import haversine_km as _haversine_km
from geoloc.geo.metrics import geo_metrics_from_errors, topk_accuracy
from geoloc.model.losses import forward_inputs
from geoloc.model.scores import class_scores, predicted_classes
from geoloc.progress import track

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

PREDICTION_TOPK = 10
"""How many top classes the predictions parquet keeps per image."""


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


def total_loss(
    outputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    parent_labels: torch.Tensor,
    criterion: nn.Module,
    parent_loss_weight: float,
) -> torch.Tensor:
    """Child-head loss plus `parent_loss_weight` x parent-head cross-entropy (when there is one).

    The factorised head's loss scores P(parent) x P(child | parent) itself (the parent term is
    part of the class likelihood), so `parent_loss_weight` does not apply to it.
    """
    if "target_child_logits" in outputs:
        return criterion(outputs, labels)
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
    # a bar in a terminal; as log lines only a slow epoch says where it is (its line follows)
    bar = track(loader, total=total, desc=f"epoch {epoch}", unit="batch", bars=progress,
                summary=False)  # fmt: skip
    for step, (images, labels, parent_labels, rows) in enumerate(bar):
        if max_steps and step >= max_steps:
            break
        images = images.to(device, non_blocking=True)  # (B, 3, S, S)
        labels = labels.to(device, non_blocking=True)  # (B,)
        parent_labels = parent_labels.to(device, non_blocking=True)  # (B,)
        with _autocast(device, amp):
            outputs = model(images, **forward_inputs(criterion, labels))
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
        preds[rows.numpy()] = predicted_classes(outputs).detach().cpu().numpy()
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
    for images, labels, parent_labels, rows in track(
        loader, desc=f"eval {prefix}", unit="batch", bars=progress, summary=False
    ):
        images = images.to(device, non_blocking=True)
        labels_d = labels.to(device, non_blocking=True)
        with _autocast(device, amp):
            outputs = model(images, **forward_inputs(criterion, labels_d))
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
