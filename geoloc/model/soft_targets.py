"""What the dense and sparse GeoSoft losses share: the temperature rule, per-sample weights and
the precision they compute in."""

from __future__ import annotations

import torch

from geoloc.errors import ConfigError, GeolocError
from geoloc.geo.distance import hexagon_edge_km

__all__ = ["TAU_PER_EDGE", "at_least_float32", "default_tau_km", "sample_weights"]

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
    return TAU_PER_EDGE * hexagon_edge_km(resolution)


def at_least_float32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision logits (mixed precision) in float32; float32 and float64 unchanged."""
    return x if x.dtype == torch.float64 else x.float()


def sample_weights(class_weights: torch.Tensor | None, targets: torch.Tensor) -> torch.Tensor:
    """(B,) per-sample weights summing to 1 (a weighted mean, like `F.cross_entropy`)."""
    if class_weights is None:
        return torch.full(targets.shape, 1.0 / targets.numel(), device=targets.device)
    w = class_weights[targets]
    return w / w.sum()


def check_geosoft_inputs(centroids: torch.Tensor, tau_km: float) -> None:
    """GeoSoft needs (K, 2) lat/lon centroids and a positive temperature (dense and sparse)."""
    if centroids.ndim != 2 or centroids.shape[1] != 2:
        raise GeolocError(f"GeoSoft centroids must be (K, 2) lat/lon, got {tuple(centroids.shape)}")
    if not tau_km > 0:
        raise ConfigError(f"GeoSoft tau_km must be > 0, got {tau_km}")
