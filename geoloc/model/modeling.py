"""Models and losses, chosen through small registries.

- `create_model(cfg, num_classes, num_parents)` -> `GeoModel`: a backbone from the model registry
  (`MultiScaleCNN` or a torchvision network), a small neck giving the embedding, a child head and
  an optional parent head (hierarchy), trained jointly.
- `create_loss(cfg, label_space, class_weights)` -> a loss from the loss registry: `ce` or
  `geosoft` (`GeoSoftTargetLoss`, distance-soft targets in O(B*K) memory).
- `compute_class_weights_from_parquet` turns train frequencies into per-class loss weights.

A new backbone or loss is one decorated function; the training loop never branches on names.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import h3
import numpy as np
import torch
from torch import nn

from geoloc.config import ModelConfig, TrainConfig
from geoloc.errors import ConfigError, DataError, GeolocError
from geoloc.geo import LabelSpace, pairwise_haversine_km

__all__ = [
    "TAU_PER_EDGE",
    "TINY_MODEL_CONFIG",
    "GeoModel",
    "GeoSoftTargetLoss",
    "MultiScaleCNN",
    "compute_class_weights_from_parquet",
    "create_loss",
    "create_model",
    "default_tau_km",
    "loss_names",
    "model_names",
    "register_loss",
    "register_model",
]

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Model registry
# --------------------------------------------------------------------------------------------

BackboneBuilder = Callable[[ModelConfig], tuple[nn.Module, int]]
"""cfg -> (backbone mapping (B, 3, H, W) to (B, F) features, F)."""

_MODELS: dict[str, BackboneBuilder] = {}


def register_model(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Register a backbone builder under `name` (what `ModelConfig.arch` selects)."""

    def deco(fn: BackboneBuilder) -> BackboneBuilder:
        if name in _MODELS:
            raise ValueError(f"model '{name}' is already registered")
        _MODELS[name] = fn
        return fn

    return deco


def model_names() -> list[str]:
    """Every registered `arch`, sorted."""
    return sorted(_MODELS)


class GeoModel(nn.Module):
    """Backbone -> embedding -> child head (+ parent head).

    `forward` returns a dict: `logits` (B, K), `embedding` (B, D) (the neck output, before dropout
    and heads; L2-normalise it for neighbour search) and `parent_logits` (B, P) only when the
    model has a parent head.
    """

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int,
        num_classes: int,
        num_parents: int | None = None,
        embed_dim: int = 256,
        dropout: float = 0.1,
        arch: str = "",
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise GeolocError(f"a model needs at least one class, got num_classes={num_classes}")
        self.arch = arch
        self.num_classes = num_classes
        self.num_parents = num_parents or 0
        self.embed_dim = embed_dim
        self.backbone = backbone
        self.neck = nn.Sequential(
            nn.Linear(feature_dim, embed_dim), nn.LayerNorm(embed_dim), nn.GELU()
        )
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(embed_dim, num_classes)
        self.parent_head = nn.Linear(embed_dim, num_parents) if num_parents else None

    @property
    def has_parent_head(self) -> bool:
        return self.parent_head is not None

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, D) embedding."""
        return self.neck(self.backbone(x))

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = self.embed(x)
        h = self.dropout(emb)
        out = {"logits": self.head(h), "embedding": emb}
        if self.parent_head is not None:
            out["parent_logits"] = self.parent_head(h)
        return out


def create_model(cfg: ModelConfig, num_classes: int, num_parents: int | None = None) -> GeoModel:
    """Build the model `cfg.arch` names; the parent head exists iff `cfg.hierarchy` and
    `num_parents` are both set. Unknown names raise `ConfigError` listing the valid ones."""
    if cfg.arch not in _MODELS:
        raise ConfigError(
            f"unknown model arch '{cfg.arch}'; valid names: {', '.join(model_names())}"
        )
    backbone, feature_dim = _MODELS[cfg.arch](cfg)
    return GeoModel(
        backbone,
        feature_dim,
        num_classes=num_classes,
        num_parents=num_parents if cfg.hierarchy else None,
        embed_dim=cfg.embed_dim,
        dropout=cfg.dropout,
        arch=cfg.arch,
    )


# --------------------------------------------------------------------------------------------
# MultiScaleCNN: the lean demo model
# --------------------------------------------------------------------------------------------


def _conv_bn_act(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class _Stage(nn.Module):
    """Strided conv (downsample) then one residual 3x3 pair."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.down = _conv_bn_act(c_in, c_out, stride)
        self.body = nn.Sequential(
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
        )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.down(x)
        return self.act(x + self.body(x))


class MultiScaleCNN(nn.Module):
    """A small CNN whose stages are each globally pooled and concatenated.

    Early stages carry fine texture (vegetation, road markings), late stages the layout (skyline,
    terrain); pooling every stage lets the head weigh both instead of only the last. Stage `i` has
    `min(width * 2**i, 8 * width)` channels and halves the resolution; the stem halves it too, so
    a 64x64 image is 32x32 after the stem.
    """

    def __init__(self, width: int = 32, depth: int = 4, in_channels: int = 3) -> None:
        super().__init__()
        chans = [min(width * 2**i, 8 * width) for i in range(depth)]
        self.stem = _conv_bn_act(in_channels, width, stride=2)
        stages, c_in = [], width
        for c_out in chans:
            stages.append(_Stage(c_in, c_out, stride=2))
            c_in = c_out
        self.stages = nn.ModuleList(stages)
        self.out_dim = sum(chans)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> MultiScaleCNN:
        return cls(width=cfg.width, depth=cfg.depth)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        pooled = []
        for stage in self.stages:
            x = stage(x)
            pooled.append(x.mean(dim=(2, 3)))  # (B, C_i)
        return torch.cat(pooled, dim=1)  # (B, sum C_i)


TINY_MODEL_CONFIG = ModelConfig(arch="multiscale_cnn_tiny", width=8, depth=3, embed_dim=32)
"""A model for tests: ~20k parameters, a forward pass on 64x64 in milliseconds."""


@register_model("multiscale_cnn")
def _multiscale_cnn(cfg: ModelConfig) -> tuple[nn.Module, int]:
    net = MultiScaleCNN.from_config(cfg)
    return net, net.out_dim


@register_model("multiscale_cnn_tiny")
def _multiscale_cnn_tiny(cfg: ModelConfig) -> tuple[nn.Module, int]:
    """width=8, depth=3 whatever the config says (embed_dim still comes from the config)."""
    net = MultiScaleCNN(width=8, depth=3)
    return net, net.out_dim


# --------------------------------------------------------------------------------------------
# torchvision backbones
# --------------------------------------------------------------------------------------------


def _load_torchvision(name: str, pretrained: bool) -> nn.Module:
    """Build a torchvision model; with `pretrained`, load its default weights or fail clearly.

    Weights come from the torch hub cache (`$TORCH_HOME/hub/checkpoints`) or are downloaded; any
    failure (offline, bad hash) becomes a `GeolocError` that says how to proceed.
    """
    import torchvision

    net = torchvision.models.get_model(name, weights=None)
    if not pretrained:
        return net
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        state = weights.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # URLError, OSError, RuntimeError (hash) ...
        raise GeolocError(
            f"could not load pretrained torchvision weights for '{name}' from {weights.url}: "
            f"{type(exc).__name__}: {exc}. Without network access, put the file in "
            f"{torch.hub.get_dir()}/checkpoints, or set model.pretrained=false"
        ) from exc
    net.load_state_dict(state)
    log.info("loaded pretrained weights %s for %s", weights, name)
    return net


@register_model("resnet18")
def _resnet18(cfg: ModelConfig) -> tuple[nn.Module, int]:
    return _resnet("resnet18", cfg)


@register_model("resnet50")
def _resnet50(cfg: ModelConfig) -> tuple[nn.Module, int]:
    return _resnet("resnet50", cfg)


def _resnet(name: str, cfg: ModelConfig) -> tuple[nn.Module, int]:
    net = _load_torchvision(name, cfg.pretrained)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


@register_model("efficientnet_b0")
def _efficientnet_b0(cfg: ModelConfig) -> tuple[nn.Module, int]:
    net = _load_torchvision("efficientnet_b0", cfg.pretrained)
    dim = net.classifier[-1].in_features
    net.classifier = nn.Identity()  # keeps avgpool + flatten, drops dropout + linear
    return net, dim


@register_model("convnext_tiny")
def _convnext_tiny(cfg: ModelConfig) -> tuple[nn.Module, int]:
    net = _load_torchvision("convnext_tiny", cfg.pretrained)
    dim = net.classifier[-1].in_features
    net.classifier[-1] = nn.Identity()  # keeps LayerNorm2d + flatten
    return net, dim


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------

TAU_PER_EDGE = 1.0
"""GeoSoft tau in units of the mean H3 edge length at the class resolution.

1.0 gives tau = 69 km at r3 (cells about PIGEON's size, where it uses 65-75 km) and 1.4 km at r7.
An adjacent cell (centres ~sqrt(3) edges apart) then gets exp(-sqrt(3)) ~ 0.18 of the true
cell's mass, two rings out ~0.03: the neighbourhood counts, the far field does not.
"""


def default_tau_km(resolution: int) -> float:
    """GeoSoft temperature for classes at H3 `resolution`: `TAU_PER_EDGE` x mean edge length."""
    if not 0 <= resolution <= 15:
        raise ConfigError(f"H3 resolution must be in 0..15, got {resolution}")
    return TAU_PER_EDGE * float(h3.average_hexagon_edge_length(resolution, unit="km"))


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
        if centroids.ndim != 2 or centroids.shape[1] != 2:
            raise GeolocError(
                f"GeoSoft centroids must be (K, 2) lat/lon, got {tuple(centroids.shape)}"
            )
        if not tau_km > 0:
            raise ConfigError(f"GeoSoft tau_km must be > 0, got {tau_km}")
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
        return _SoftTargetCrossEntropy.apply(logits.float(), q, w)


class _SoftTargetCrossEntropy(torch.autograd.Function):
    """sum_b w_b * (-sum_k q_bk log softmax(z_b)_k) with a hand-written backward.

    Since each q row sums to 1 the loss is logsumexp(z) - <q, z>, and its gradient is
    w_b * (softmax(z_b) - q_b). Forward keeps softmax(z) (as cross-entropy does) and backward
    turns it into the gradient in place: one (B, K) buffer besides q, and about half the
    memory passes of composing logsumexp + einsum under autograd. The loss is computed in
    float32 whatever the logits' dtype (mixed precision).
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


LossBuilder = Callable[[TrainConfig, LabelSpace, "torch.Tensor | None"], nn.Module]
_LOSSES: dict[str, LossBuilder] = {}


def register_loss(name: str) -> Callable[[LossBuilder], LossBuilder]:
    """Register a loss builder `(cfg, label_space, class_weights) -> nn.Module` under `name`."""

    def deco(fn: LossBuilder) -> LossBuilder:
        if name in _LOSSES:
            raise ValueError(f"loss '{name}' is already registered")
        _LOSSES[name] = fn
        return fn

    return deco


def loss_names() -> list[str]:
    """Every registered loss name, sorted."""
    return sorted(_LOSSES)


def create_loss(
    cfg: TrainConfig, label_space: LabelSpace, class_weights: torch.Tensor | None = None
) -> nn.Module:
    """The child-head loss `cfg.loss` names: `forward(logits (B, K), targets (B,)) -> scalar`."""
    if cfg.loss not in _LOSSES:
        raise ConfigError(f"unknown loss '{cfg.loss}'; valid names: {', '.join(loss_names())}")
    return _LOSSES[cfg.loss](cfg, label_space, class_weights)


@register_loss("ce")
def _ce(cfg: TrainConfig, label_space: LabelSpace, class_weights: torch.Tensor | None) -> nn.Module:
    """Cross-entropy with `cfg.label_smoothing` and optional class weights."""
    return nn.CrossEntropyLoss(weight=class_weights, label_smoothing=cfg.label_smoothing)


@register_loss("geosoft")
def _geosoft(
    cfg: TrainConfig, label_space: LabelSpace, class_weights: torch.Tensor | None
) -> nn.Module:
    """GeoSoft targets; `cfg.label_smoothing` is not applied (the soft targets already smooth)."""
    return GeoSoftTargetLoss.from_config(cfg, label_space, class_weights)


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
