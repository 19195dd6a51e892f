"""Class losses, chosen by `TrainConfig.loss` through the loss registry, and class weights.

- `create_loss(cfg, label_space, class_weights, head)`: `ce` (cross-entropy), `geosoft`
  (`GeoSoftTargetLoss`, distance-soft targets in O(B*K) memory) or `geosoft_sparse`
  (`geoloc.model.sparse_losses`: the same targets over each class's nearest classes, O(B*r)).
  For `model.head=factorised` the loss scores P(parent) x P(child | parent) (`FactorisedLoss`);
  `forward_inputs(criterion, labels)` says which parents the model must score for it.
- `compute_class_weights_from_parquet` turns train frequencies into per-class loss weights.

A new loss is one function decorated with `@register_loss(name)`; it receives the head name and
raises `ConfigError` for heads it cannot train.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from geoloc.config import TrainConfig
from geoloc.errors import ConfigError, DataError, GeolocError
from geoloc.geo import LabelSpace, pairwise_haversine_km
from geoloc.model.registry import Registry
from geoloc.model.soft_targets import (
    TAU_PER_EDGE,
    at_least_float32,
    check_geosoft_inputs,
    default_tau_km,
)

__all__ = [
    "LOSSES",
    "TAU_PER_EDGE",
    "GeoSoftTargetLoss",
    "LossBuilder",
    "at_least_float32",
    "check_loss_for_head",
    "class_weights_from_counts",
    "compute_class_weights_from_parquet",
    "create_loss",
    "default_tau_km",
    "forward_inputs",
    "loss_names",
    "register_loss",
]

# --------------------------------------------------------------------------------------------
# GeoSoft
# --------------------------------------------------------------------------------------------

_MIN_EXPONENT = -70.0  # e^-70 ~ 4e-31: far above float32's smallest normal (1.2e-38)


class GeoSoftTargetLoss(nn.Module):
    """Cross-entropy against distance-soft targets (PIGEON's haversine label smoothing).

    q_k ∝ exp(-(d(y, c_k) - d(y, c_true)) / tau) with y the true class centroid, so
    q_k = softmax_k(-d(c_true, c_k) / tau). Targets are computed on the fly for the batch:
    (B, K) distances, never a (K, K) matrix; with the soft CE written as
    logsumexp(z) - <q, z> the peak extra memory is about two (B, K) float32 buffers
    (~200 MB at B=256, K=100k). `tau -> 0` recovers plain cross-entropy.
    `benchmarks/bench_geosoft_loss.py` (B=256, 1 CPU thread): forward+backward takes ~2x the
    time of `F.cross_entropy` at K=100k (~3x at 10k) with ~0.7x its peak memory.

    Per-class weights scale each sample by its true class's weight (weighted mean, like
    `F.cross_entropy(weight=...)`).
    """

    def __init__(
        self,
        centroids: torch.Tensor,
        tau_km: float,
        class_weights: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        check_geosoft_inputs(centroids, tau_km)
        self.tau_km = float(tau_km)
        self.register_buffer("centroids", centroids.detach().float().clone(), persistent=False)
        weights = None if class_weights is None else class_weights.detach().float().clone()
        if weights is not None and weights.shape != (centroids.shape[0],):
            raise GeolocError(
                f"class weights have shape {tuple(weights.shape)}, expected ({centroids.shape[0]},)"
            )
        self.register_buffer("class_weights", weights, persistent=False)

    @classmethod
    def from_config(
        cls,
        cfg: TrainConfig,
        label_space: LabelSpace,
        class_weights: torch.Tensor | None = None,
    ) -> GeoSoftTargetLoss:
        tau = cfg.tau_km if cfg.tau_km is not None else default_tau_km(label_space.resolution)
        return cls(label_space.centroids_tensor(), tau, class_weights)

    @torch.no_grad()
    def soft_targets(self, targets: torch.Tensor) -> torch.Tensor:
        """(B,) class indices -> (B, K) target distributions (rows sum to 1)."""
        c = self.centroids
        targets = targets.to(device=c.device, dtype=torch.long)
        true = c[targets]  # (B, 2)
        d = pairwise_haversine_km(true[:, 0], true[:, 1], c[:, 0], c[:, 1])  # (B, K), owned
        # q_k ∝ exp(-(d_k - d_true) / tau); every exponent is <= 0 and the true one is 0, so
        # exp cannot overflow and each row sums to >= 1 (no max-subtraction pass needed)
        x = d.sub_(d.gather(1, targets[:, None])).mul_(-1.0 / self.tau_km)
        # far classes get exactly 0 instead of float32 denormals, which make exp and the
        # products in the loss ~10x slower on CPU: clamp the exponent, then subtract the floor
        # (the mass dropped is < K * e^-70 ~ 1e-25)
        q = x.clamp_(min=_MIN_EXPONENT).exp_().sub_(math.exp(_MIN_EXPONENT))
        return q.div_(q.sum(dim=1, keepdim=True))

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if logits.ndim != 2 or logits.shape[1] != self.centroids.shape[0]:
            raise GeolocError(
                f"GeoSoft logits must be (B, {self.centroids.shape[0]}), got {tuple(logits.shape)}"
            )
        targets = targets.to(device=logits.device, dtype=torch.long)
        q = self.soft_targets(targets)
        if self.class_weights is None:
            w = torch.full(targets.shape, 1.0 / targets.numel(), device=logits.device)
        else:
            w = self.class_weights[targets]
            w = w / w.sum()
        return _SoftTargetCrossEntropy.apply(at_least_float32(logits), q, w)


class _SoftTargetCrossEntropy(torch.autograd.Function):
    """sum_b w_b * (-sum_k q_bk log softmax(z_b)_k) with a hand-written backward.

    Since each q row sums to 1 the loss is logsumexp(z) - <q, z>, and its gradient is
    w_b * (softmax(z_b) - q_b). Forward keeps softmax(z) (as cross-entropy does) and backward
    turns it into the gradient in place: one (B, K) buffer besides q, and about half the
    memory passes of composing logsumexp + einsum under autograd. The loss is computed in at
    least float32 whatever the logits' dtype (mixed precision).
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        p = torch.mul(q, z)  # (B, K) scratch: first q * z, then softmax(z)
        dot = p.sum(dim=1)  # (B,) <q_b, z_b>; 2x faster than a batched bmm on CPU
        zmax = z.amax(dim=1, keepdim=True)  # (B, 1)
        torch.sub(z, zmax, out=p).exp_()
        total = p.sum(dim=1, keepdim=True)
        lse = (total.log() + zmax).view(-1)  # (B,)
        ctx.save_for_backward(p.div_(total), q, w)
        return ((lse - dot) * w).sum()

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, None, None]:  # type: ignore[override]
        p, q, w = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None
        # the saved softmax becomes the gradient in place; a second backward through the same
        # graph (retain_graph=True) is refused by autograd's version check, never silently wrong
        return p.sub_(q).mul_((w * grad_out)[:, None]), None, None


# --------------------------------------------------------------------------------------------
# Loss registry
# --------------------------------------------------------------------------------------------

LossBuilder = Callable[[TrainConfig, LabelSpace, "torch.Tensor | None", str], nn.Module]
"""(cfg, label_space, class_weights, head) -> loss module. For the flat head it is called as
`(logits (B, K), targets (B,)) -> scalar`; for the factorised head as `(outputs, targets)`."""

LOSSES: Registry[LossBuilder] = Registry("loss")
"""Loss builders by `TrainConfig.loss`; this module registers the built-in ones."""


def register_loss(name: str) -> Callable[[LossBuilder], LossBuilder]:
    """Register a loss builder `(cfg, label_space, class_weights, head) -> nn.Module`."""
    return LOSSES.register(name)


def loss_names() -> list[str]:
    """Every registered loss name, sorted."""
    return LOSSES.names()


def create_loss(
    cfg: TrainConfig,
    label_space: LabelSpace,
    class_weights: torch.Tensor | None = None,
    head: str = "flat",
) -> nn.Module:
    """The loss `cfg.loss` names, for the head `head` (`ModelConfig.head`)."""
    return LOSSES.get(cfg.loss)(cfg, label_space, class_weights, head)


def forward_inputs(criterion: nn.Module, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """Extra inputs of the model's forward for this loss: `{"parents": (B, R)}` for the
    factorised head (the parents whose children the loss reads), nothing otherwise."""
    from geoloc.model.sparse_losses import FactorisedLoss

    if isinstance(criterion, FactorisedLoss):
        return {"parents": criterion.head_parents(labels)}
    return {}


def check_loss_for_head(cfg: TrainConfig, head: str) -> None:
    """`ConfigError` naming the fix when `cfg.loss` cannot train `head` (checked before a run
    starts, and again by the builders)."""
    if head != "factorised":
        return
    if cfg.loss == "geosoft":
        raise ConfigError(
            "train.loss=geosoft builds dense (B, K) targets, which model.head=factorised is "
            "there to avoid: use train.loss=geosoft_sparse"
        )
    if cfg.label_smoothing > 0:
        raise ConfigError(
            f"train.label_smoothing={cfg.label_smoothing} is not supported with "
            "model.head=factorised; set it to 0 (train.loss=geosoft_sparse smooths by distance)"
        )


def _factorised(
    cfg: TrainConfig,
    label_space: LabelSpace,
    class_weights: torch.Tensor | None,
    sparse: bool,
) -> nn.Module:
    from geoloc.model.sparse_losses import FactorisedLoss, GeoSoftNeighbours

    check_loss_for_head(cfg, "factorised")
    neighbours = GeoSoftNeighbours.from_config(cfg, label_space) if sparse else None
    return FactorisedLoss.for_label_space(label_space, neighbours, class_weights)


@register_loss("ce")
def _ce(
    cfg: TrainConfig, label_space: LabelSpace, class_weights: torch.Tensor | None, head: str
) -> nn.Module:
    """Cross-entropy with `cfg.label_smoothing` and optional class weights; for the factorised
    head, the negative log-likelihood CE(parent) + CE(child | true parent)."""
    if head == "factorised":
        return _factorised(cfg, label_space, class_weights, sparse=False)
    return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=cfg.label_smoothing)


@register_loss("geosoft")
def _geosoft(
    cfg: TrainConfig, label_space: LabelSpace, class_weights: torch.Tensor | None, head: str
) -> nn.Module:
    """GeoSoft targets; `cfg.label_smoothing` is not applied (the soft targets already smooth)."""
    check_loss_for_head(cfg, head)
    return GeoSoftTargetLoss.from_config(cfg, label_space, class_weights)


@register_loss("geosoft_sparse")
def _geosoft_sparse(
    cfg: TrainConfig, label_space: LabelSpace, class_weights: torch.Tensor | None, head: str
) -> nn.Module:
    """GeoSoft over each class's `cfg.geosoft_neighbours` nearest classes (O(B*r) targets)."""
    from geoloc.model.sparse_losses import GeoSoftNeighbours, SparseGeoSoftLoss

    if head == "factorised":
        return _factorised(cfg, label_space, class_weights, sparse=True)
    return SparseGeoSoftLoss(GeoSoftNeighbours.from_config(cfg, label_space), class_weights)


# --------------------------------------------------------------------------------------------
# Class weights
# --------------------------------------------------------------------------------------------


def class_weights_from_counts(
    counts: np.ndarray,
    scheme: Literal["inverse", "effective", "none"] = "inverse",
    beta: float = 0.999,
) -> torch.Tensor:
    """Per-class weights from train counts, mean 1 over classes that have train images.

    `inverse`: 1 / n. `effective` (Cui et al. 2019): (1 - beta) / (1 - beta**n), which saturates
    for frequent classes. Classes with no train image get weight 0: they never appear as a
    train target, and a 0 keeps them from shifting the normalisation.
    """
    n = np.asarray(counts, dtype=np.float64)
    present = n > 0
    w = np.zeros_like(n)
    if scheme == "none":
        w[present] = 1.0
    elif scheme == "inverse":
        w[present] = 1.0 / n[present]
    elif scheme == "effective":
        if not 0.0 < beta < 1.0:
            raise ConfigError(f"effective-number beta must be in (0, 1), got {beta}")
        w[present] = (1.0 - beta) / -np.expm1(n[present] * math.log(beta))
    else:
        raise ConfigError(
            f"unknown class weighting scheme '{scheme}'; valid names: effective, inverse, none"
        )
    if present.any():
        w[present] /= w[present].mean()
    return torch.as_tensor(w, dtype=torch.float32)


def compute_class_weights_from_parquet(
    splits_parquet: Path,
    num_classes: int,
    scheme: str = "inverse",
    beta: float = 0.999,
) -> torch.Tensor:
    """(K,) class weights from the train rows of `splits.parquet` (see `class_weights_from_counts`).

    Only the train split counts: val/test frequencies must not leak into training.
    """
    import pandas as pd

    path = Path(splits_parquet)
    if not path.is_file():
        raise DataError(f"splits file '{path}' does not exist (build the index first)")
    try:
        df = pd.read_parquet(path, columns=["split", "label"])
    except Exception as exc:  # pyarrow raises several types for bad files/missing columns
        raise DataError(f"splits file '{path}' could not be read: {exc}") from exc
    labels = df.loc[df["split"] == "train", "label"].to_numpy(dtype=np.int64)
    if labels.size == 0:
        raise DataError(f"splits file '{path}' has no train rows")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise DataError(
            f"splits file '{path}' has train labels outside 0..{num_classes - 1} "
            f"(min {labels.min()}, max {labels.max()}): index and label space disagree"
        )
    counts = np.bincount(labels, minlength=num_classes)
    return class_weights_from_counts(counts, scheme=scheme, beta=beta)  # type: ignore[arg-type]
