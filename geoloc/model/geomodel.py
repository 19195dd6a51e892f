"""`GeoModel`: a registered backbone, a small neck giving the embedding, a child head and an
optional parent head (hierarchy), trained jointly; `create_model` builds it from `ModelConfig`."""

from __future__ import annotations

import torch
from torch import nn

from geoloc.config import ModelConfig
from geoloc.errors import GeolocError
from geoloc.model.backbones import MODELS

__all__ = ["GeoModel", "create_model"]


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
    backbone, feature_dim = MODELS.get(cfg.arch)(cfg)
    return GeoModel(
        backbone,
        feature_dim,
        num_classes=num_classes,
        num_parents=num_parents if cfg.hierarchy else None,
        embed_dim=cfg.embed_dim,
        dropout=cfg.dropout,
        arch=cfg.arch,
    )
