"""`GeoModel`: a registered backbone, a small neck giving the embedding and a registered head
(`geoloc.model.heads`: flat, optionally with a parent layer, or factorised), trained jointly;
`create_model` builds it from `ModelConfig`."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from geoloc.config import ModelConfig
from geoloc.errors import GeolocError
from geoloc.model.backbones import MODELS, check_pretrained
from geoloc.model.heads import FactorisedHead, FlatHead, HeadSpec, create_head

__all__ = ["GeoModel", "create_model"]


class GeoModel(nn.Module):
    """Backbone -> embedding -> head.

    `forward(x, parents=None)` returns a dict: `embedding` (B, D) (the neck output, before
    dropout and heads; L2-normalise it for neighbour search) and the head's outputs: `logits`
    (B, K) and, with a parent layer, `parent_logits` (B, P) for the flat head; for the factorised
    head the keys in `geoloc.model.heads` (`parents`, the parents a loss needs scored, goes to
    it). Its input is (B, 3, H, W) images or, for a frozen backbone whose outputs were stored
    (`geoloc.train.embeddings`), (B, F) backbone features.
    With `freeze_backbone` the backbone stays in eval mode without gradients whatever
    `train()` says, so its BatchNorm statistics and weights never move.
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
        freeze_backbone: bool = False,
        head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise GeolocError(f"a model needs at least one class, got num_classes={num_classes}")
        self.arch = arch
        self.num_classes = num_classes
        self.num_parents = num_parents or 0
        self.embed_dim = embed_dim
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.freeze_backbone = freeze_backbone
        if freeze_backbone:
            backbone.requires_grad_(False)
            backbone.eval()
        self.neck = nn.Sequential(
            nn.Linear(feature_dim, embed_dim), nn.LayerNorm(embed_dim), nn.GELU()
        )
        self.dropout = nn.Dropout(dropout)
        self.head = head if head is not None else FlatHead(embed_dim, num_classes, num_parents)
        self._register_load_state_dict_pre_hook(_upgrade_flat_head_keys)

    @property
    def has_parent_head(self) -> bool:
        return bool(getattr(self.head, "has_parent_head", False))

    @property
    def topk_parents(self) -> int:
        """Parents the factorised head scores at inference (0: all; other heads: 0)."""
        return self.head.topk_parents if isinstance(self.head, FactorisedHead) else 0

    @topk_parents.setter
    def topk_parents(self, k: int) -> None:
        if isinstance(self.head, FactorisedHead):
            self.head.topk_parents = int(k)

    def train(self, mode: bool = True) -> GeoModel:
        super().train(mode)
        if self.freeze_backbone:
            self.backbone.eval()
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, F) backbone features (no graph when frozen)."""
        if self.freeze_backbone:
            with torch.no_grad():
                return self.backbone(x)
        return self.backbone(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images or (B, F) stored backbone features -> (B, D) embedding."""
        return self.neck(x if x.dim() == 2 else self.features(x))

    def forward(
        self, x: torch.Tensor, parents: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        emb = self.embed(x)
        out = self.head(self.dropout(emb), parents=parents)
        out["embedding"] = emb
        return out


def _upgrade_flat_head_keys(state: dict[str, Any], prefix: str, *_: Any) -> None:
    """Checkpoints from before the head registry: `head.*` / `parent_head.*` were the flat
    head's two layers, now `head.classifier.*` / `head.parent.*`."""
    for name in ("weight", "bias"):
        if f"{prefix}head.{name}" in state:
            state[f"{prefix}head.classifier.{name}"] = state.pop(f"{prefix}head.{name}")
        if f"{prefix}parent_head.{name}" in state:
            state[f"{prefix}head.parent.{name}"] = state.pop(f"{prefix}parent_head.{name}")


def create_model(
    cfg: ModelConfig,
    num_classes: int,
    num_parents: int | None = None,
    *,
    parent_of: np.ndarray | None = None,
    topk_parents: int = 0,
) -> GeoModel:
    """Build the model `cfg.arch` and `cfg.head` name. The flat head has a parent layer iff
    `cfg.hierarchy` and `num_parents` are both set; the factorised head needs `parent_of` (K,)
    and scores the `topk_parents` best parents at inference. Unknown names raise `ConfigError`
    listing the valid ones, and pretrained weights that cannot be had a `GeolocError` saying how
    to get them."""
    builder = MODELS.get(cfg.arch)
    head = create_head(cfg, cfg.embed_dim, HeadSpec(num_classes, num_parents, parent_of,
                                                    topk_parents))  # fmt: skip
    check_pretrained(cfg)
    backbone, feature_dim = builder(cfg)
    return GeoModel(
        backbone,
        feature_dim,
        num_classes=num_classes,
        num_parents=num_parents if cfg.hierarchy else None,
        embed_dim=cfg.embed_dim,
        dropout=cfg.dropout,
        arch=cfg.arch,
        freeze_backbone=cfg.freeze_backbone,
        head=head,
    )
