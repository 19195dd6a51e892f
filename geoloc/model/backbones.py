"""Backbones, chosen by `ModelConfig.arch` through the model registry.

A backbone maps (B, 3, H, W) images to (B, F) features; `GeoModel` adds the neck and heads.
Registered here: `multiscale_cnn` (tests use it at width=8, depth=3) and the torchvision
networks `resnet18`, `resnet50`, `efficientnet_b0`, `convnext_tiny`. A new backbone is one
function decorated with `@register_model(name)`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import torch
from torch import nn

from geoloc.config import ModelConfig
from geoloc.errors import ConfigError, GeolocError
from geoloc.model.registry import Registry

__all__ = [
    "MODELS",
    "TORCHVISION_ARCHS",
    "BackboneBuilder",
    "MultiScaleCNN",
    "check_pretrained",
    "model_names",
    "pretrained_weights",
    "register_model",
    "weights_cache_file",
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


@register_model("multiscale_cnn")
def _multiscale_cnn(cfg: ModelConfig) -> tuple[nn.Module, int]:
    net = MultiScaleCNN.from_config(cfg)
    return net, net.out_dim


# --------------------------------------------------------------------------------------------
# torchvision backbones
# --------------------------------------------------------------------------------------------


TORCHVISION_ARCHS = ("resnet18", "resnet50", "efficientnet_b0", "convnext_tiny")
"""Registered archs built by torchvision; `pretrained` loads their published ImageNet weights."""


def _default_weights(name: str) -> Any:
    import torchvision

    return torchvision.models.get_model_weights(name).DEFAULT


def weights_cache_file(url: str) -> Path:
    """Where torchvision's weights API caches `url`: `torch.hub.get_dir()/checkpoints/<basename>`.

    `torch.hub.get_dir()` is `$TORCH_HOME/hub` (default `~/.cache/torch/hub`).
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name


def pretrained_weights(cfg: ModelConfig) -> str | None:
    """The weights `cfg` starts from (e.g. `ResNet18_Weights.IMAGENET1K_V1`), None for random
    init; part of the embedding cache key. `ConfigError` when the arch has none to offer."""
    if not cfg.pretrained:
        return None
    if cfg.arch not in TORCHVISION_ARCHS:
        raise ConfigError(
            f"model.pretrained=true but model.arch '{cfg.arch}' has no published weights "
            f"(pretrained archs: {', '.join(TORCHVISION_ARCHS)}); set model.pretrained=false"
        )
    return str(_default_weights(cfg.arch))


def check_pretrained(cfg: ModelConfig) -> None:
    """Fail before any work when `cfg` asks for pretrained weights it cannot get offline.

    A missing cache file is a `GeolocError` naming the folder, the file torchvision expects and
    how to pre-seed it; with `model.download_weights=true` the file may be fetched instead.
    """
    if pretrained_weights(cfg) is None or cfg.download_weights:
        return
    weights = _default_weights(cfg.arch)
    path = weights_cache_file(weights.url)
    if not path.is_file():
        raise GeolocError(
            f"pretrained weights for model.arch '{cfg.arch}' ({weights}) are not cached: "
            f"'{path.name}' is missing in {path.parent} ($TORCH_HOME/hub/checkpoints); pre-seed "
            f"it with `curl -L --create-dirs -o {path} {weights.url}`, or set "
            "model.download_weights=true (network) or model.pretrained=false"
        )


def _one_line(exc: BaseException) -> str:
    return " ".join(f"{type(exc).__name__}: {exc}".split())[:500]


def _load_torchvision(cfg: ModelConfig, name: str) -> nn.Module:
    """Build a torchvision model; with `cfg.pretrained`, load its published default weights.

    Weights come through torchvision's weights API and its cache (`weights_cache_file`); nothing
    is downloaded unless `cfg.download_weights`. Any failure is a one-line `GeolocError`.
    """
    import torchvision

    net = torchvision.models.get_model(name, weights=None)
    if not cfg.pretrained:
        return net
    check_pretrained(cfg)
    weights = _default_weights(name)
    path = weights_cache_file(weights.url)
    source = path if path.is_file() else weights.url
    try:  # reads the cached file; downloads (hash-checked) only when it is missing
        state = weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
        net.load_state_dict(state)
    except Exception as exc:  # URLError, OSError, unpickling, hash or key mismatch ...
        raise GeolocError(
            f"could not load pretrained weights {weights} for model.arch '{name}' from "
            f"{source}: {_one_line(exc)}; replace the file (from {weights.url}) or set "
            "model.pretrained=false"
        ) from exc
    log.info("loaded pretrained weights %s for %s from %s", weights, name, path)
    return net


@register_model("resnet18")
def _resnet18(cfg: ModelConfig) -> tuple[nn.Module, int]:
    return _resnet("resnet18", cfg)


@register_model("resnet50")
def _resnet50(cfg: ModelConfig) -> tuple[nn.Module, int]:
    return _resnet("resnet50", cfg)


def _resnet(name: str, cfg: ModelConfig) -> tuple[nn.Module, int]:
    net = _load_torchvision(cfg, name)
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


@register_model("efficientnet_b0")
def _efficientnet_b0(cfg: ModelConfig) -> tuple[nn.Module, int]:
    net = _load_torchvision(cfg, "efficientnet_b0")
    dim = net.classifier[-1].in_features
    net.classifier = nn.Identity()  # keeps avgpool + flatten, drops dropout + linear
    return net, dim


@register_model("convnext_tiny")
def _convnext_tiny(cfg: ModelConfig) -> tuple[nn.Module, int]:
    net = _load_torchvision(cfg, "convnext_tiny")
    dim = net.classifier[-1].in_features
    net.classifier[-1] = nn.Identity()  # keeps LayerNorm2d + flatten
    return net, dim
