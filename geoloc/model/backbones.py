"""Backbones, chosen by `ModelConfig.arch` through the model registry.

A backbone maps (B, 3, H, W) images to (B, F) features; `GeoModel` adds the neck and heads.
Registered here: `multiscale_cnn` (and `multiscale_cnn_tiny` for tests) and the torchvision
networks `resnet18`, `resnet50`, `efficientnet_b0`, `convnext_tiny`. A new backbone is one
function decorated with `@register_model(name)`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn

from geoloc.config import ModelConfig
from geoloc.errors import GeolocError
from geoloc.model.registry import Registry

__all__ = [
    "MODELS",
    "TINY_MODEL_CONFIG",
    "BackboneBuilder",
    "MultiScaleCNN",
    "model_names",
    "register_model",
]

log = logging.getLogger(__name__)

BackboneBuilder = Callable[[ModelConfig], tuple[nn.Module, int]]
"""cfg -> (backbone mapping (B, 3, H, W) to (B, F) features, F)."""

MODELS: Registry[BackboneBuilder] = Registry("model arch")
"""Backbone builders by `ModelConfig.arch`; this module registers the built-in ones."""


def register_model(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Register a backbone builder under `name` (what `ModelConfig.arch` selects)."""
    return MODELS.register(name)


def model_names() -> list[str]:
    """Every registered `arch`, sorted."""
    return MODELS.names()


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
