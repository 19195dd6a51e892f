"""One epoch of training and one evaluation pass: the steps `fit` repeats.

Devices, seeding and mixed precision are `geoloc.compute`'s. Epoch numbers are 1-based.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from torch.utils.data import DataLoader

from geoloc.compute import FP32, Compute
from geoloc.errors import TrainingError
from geoloc.geo import LabelSpace
from geoloc.geo import haversine_km as _haversine_km
from geoloc.geo.metrics import geo_metrics_from_errors, topk_accuracy
from geoloc.model.losses import forward_inputs
from geoloc.model.scores import class_scores, predicted_classes
from geoloc.progress import track
from geoloc.train.margin import MarginTerm, PrototypeTally


@runtime_checkable
class LabelledSplit(Protocol):
    """What evaluation reads from a split: a `GeoDataset`, or its stored backbone features
    (`geoloc.train.embeddings.FeatureDataset`)."""

    split: str
    table: pd.DataFrame
    labels: np.ndarray
    parent_labels: np.ndarray

log = logging.getLogger(__name__)

PREDICTION_TOPK = 10
"""How many top classes the predictions parquet keeps per image."""


# --------------------------------------------------------------------------------------------
# Seeding
# --------------------------------------------------------------------------------------------


def epoch_seed(seed: int, epoch_index: int) -> int:
    """The seed of one epoch's randomness; a pure function so resumed runs reproduce it."""
    return (int(seed) * 1_000_003 + 7919 * int(epoch_index) + 1) % 2**31


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
    margin: PrototypeTally | None = None  # hardneg.mode=margin: prototype sums, term total


@dataclass
class EpochTally:
    """Running totals of a training epoch: what a mid-epoch checkpoint carries to a resume."""

    loss_sum: float
    seen: int
    preds: np.ndarray  # (N_train,) last prediction per row, -1 if unseen
    margin: PrototypeTally | None = None  # hardneg.mode=margin only

    @classmethod
    def empty(cls, n_rows: int) -> EpochTally:
        return cls(0.0, 0, np.full(n_rows, -1, dtype=np.int64))

    def to_dict(self) -> dict[str, Any]:
        doc = {"loss_sum": self.loss_sum, "seen": self.seen,
               "preds": torch.from_numpy(self.preds.copy())}  # fmt: skip
        if self.margin is not None:
            doc["margin"] = self.margin.to_dict()
        return doc

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> EpochTally:
        margin = PrototypeTally.from_dict(doc["margin"]) if doc.get("margin") else None
        return cls(float(doc["loss_sum"]), int(doc["seen"]), doc["preds"].numpy().copy(), margin)


StepHook = Callable[[int, Callable[[], EpochTally]], None]
"""Called after each step with (steps done this epoch, a function giving the tally so far)."""


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
    compute: Compute = FP32,
    max_steps: int = 0,
    num_rows: int | None = None,
    progress: bool = True,
    start_step: int = 0,
    tally: EpochTally | None = None,
    on_step: StepHook | None = None,
    margin: MarginTerm | None = None,
) -> EpochResult:
    """One pass over `loader`; a non-finite loss stops with a `TrainingError` naming the step.

    Returns the mean loss per image and each row's last training-time prediction (the
    hard-negative pool can be built from train confusion without another pass). Each step
    synchronises with the device once (the loss check); predictions stay on the device until
    the epoch ends or `on_step` asks for the tally. A pass resumed mid-epoch starts at
    `start_step` with the `tally` its checkpoint carried (`loader` then starts there too).
    `margin` (`hardneg.mode=margin`) adds its term to each step's loss and sums the prototypes.
    """
    model.train()
    if tally is None:
        n_rows = num_rows if num_rows is not None else len(loader.dataset.labels)  # type: ignore[attr-defined]
        tally = EpochTally.empty(n_rows)
    preds = tally.preds
    if margin is not None:
        margin.begin(tally.margin)
    step_preds: list[tuple[torch.Tensor, torch.Tensor]] = []  # (rows, argmax on the device)
    loss_sum, seen, start = tally.loss_sum, tally.seen, time.perf_counter()

    def current() -> EpochTally:
        for rows_, pred_ in step_preds:  # in step order: a row seen twice keeps its last one
            preds[rows_.numpy()] = pred_.cpu().numpy()
        step_preds.clear()
        return EpochTally(loss_sum, seen, preds, None if margin is None else margin.tally)

    remaining = len(loader)
    total = min(remaining, max(max_steps - start_step, 0)) if max_steps else remaining
    # a bar in a terminal; as log lines only a slow epoch says where it is (its line follows)
    bar = track(loader, total=total, desc=f"epoch {epoch}", unit="batch", bars=progress,
                summary=False)  # fmt: skip
    for step, (images, labels, parent_labels, rows) in enumerate(bar, start=start_step):
        if max_steps and step >= max_steps:
            break
        images = compute.images(images, device)  # (B, 3, S, S) or (B, F) stored features
        labels = labels.to(device, non_blocking=True)  # (B,)
        parent_labels = parent_labels.to(device, non_blocking=True)  # (B,)
        with compute.autocast():
            outputs = model(images, **forward_inputs(criterion, labels))
        loss = total_loss(outputs, labels, parent_labels, criterion, parent_loss_weight)
        term = None if margin is None else margin(outputs, labels)
        if term is not None:
            loss = loss + term
        value = float(loss.detach())  # the step's one host-device synchronisation
        if not math.isfinite(value):
            lr = optimizer.param_groups[0]["lr"]
            raise TrainingError(
                f"loss is {value} at epoch {epoch}, step {step} (lr={lr:.3g}); "
                "lower train.lr or check the data"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if scheduler is not None:
            scheduler.step()
        batch = labels.shape[0]
        loss_sum += value * batch
        seen += batch
        step_preds.append((rows, predicted_classes(outputs).detach()))
        bar.set_postfix(loss=f"{loss_sum / seen:.3f}", refresh=False)
        if on_step is not None:
            on_step(step + 1, current)
    current()
    return EpochResult(
        loss=loss_sum / max(seen, 1),
        images=seen,
        seconds=time.perf_counter() - start,
        pred_labels=preds,
        margin=None if margin is None else margin.tally,
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
    skipped: int = 0  # images that could not be read and are not scored


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
    compute: Compute = FP32,
    progress: bool = True,
) -> EvalResult:
    """Loss, top-1/top-5, parent accuracy and geo metrics on a `GeoDataset` loader.

    The predicted location is the predicted class centroid; the true location is the image's
    own coordinate. `parent_acc` asks whether the predicted class lies in the true parent cell, so
    it is comparable between runs with and without a parent head.
    """
    dataset = loader.dataset
    if not isinstance(dataset, LabelledSplit):
        raise TypeError("evaluate needs a loader over a GeoDataset (or its stored features)")
    model.eval()
    parent_of = torch.as_tensor(label_space.parent_of, dtype=torch.long)
    n = len(dataset.labels)
    seen = np.zeros(n, dtype=bool)
    k = min(PREDICTION_TOPK, label_space.num_classes)
    top_labels = np.zeros((n, k), dtype=np.int64)
    top_probs = np.zeros((n, k), dtype=np.float32)
    loss_sum, top5_hits = 0.0, 0.0
    for images, labels, parent_labels, rows in track(
        loader, desc=f"eval {prefix}", unit="batch", bars=progress, summary=False
    ):
        images = compute.images(images, device)
        labels_d = labels.to(device, non_blocking=True)
        with compute.autocast():
            outputs = model(images, **forward_inputs(criterion, labels_d))
        outputs = {key: value.float() if value.is_floating_point() else value
                   for key, value in outputs.items()}  # bf16 has no numpy  # fmt: skip
        loss = total_loss(
            outputs, labels_d, parent_labels.to(device, non_blocking=True), criterion,
            parent_loss_weight,
        )  # fmt: skip
        loss_sum += float(loss) * labels.shape[0]
        scores = class_scores(outputs, parent_of.to(device), hier_topk_parents).cpu()  # (B, K)
        top5_hits += topk_accuracy(scores, labels, 5) * labels.shape[0]
        p, i = scores.topk(k, dim=1)
        top_labels[rows.numpy()] = i.numpy()
        top_probs[rows.numpy()] = p.numpy()
        seen[rows.numpy()] = True
    all_pred = np.where(seen, top_labels[:, 0], -1)  # (N,) -1: not scored
    unseen = int((~seen).sum())
    if not seen.all():  # unreadable images were left out (one warning line each)
        log.warning("%s: %d of %d images could not be read and are not scored", prefix,
                    int((~seen).sum()), n)  # fmt: skip
        dataset = SimpleNamespace(table=dataset.table[seen].reset_index(drop=True),
                                  labels=dataset.labels[seen],
                                  parent_labels=dataset.parent_labels[seen])  # fmt: skip
        top_labels, top_probs, n = top_labels[seen], top_probs[seen], int(seen.sum())
    predictions = predictions_frame(dataset, label_space, top_labels, top_probs)
    errors = predictions["error_km"].to_numpy()
    pred = top_labels[:, 0]
    metrics = {
        "loss": loss_sum / max(n, 1),
        "top1": float(np.mean(pred == dataset.labels)),
        "top5": top5_hits / max(n, 1),
        "parent_acc": float(np.mean(label_space.parent_of[pred] == dataset.parent_labels)),
        **geo_metrics_from_errors(errors),
    }
    return EvalResult(
        metrics={f"{prefix}_{key}": float(v) for key, v in metrics.items()},
        predictions=predictions,
        pred_labels=all_pred,
        skipped=unseen,
    )


def predictions_frame(
    dataset: LabelledSplit, label_space: LabelSpace, top_labels: np.ndarray, top_probs: np.ndarray
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
