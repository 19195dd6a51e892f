"""Distances on the sphere, once: every km in geoloc comes from `haversine_km`."""

from __future__ import annotations

import logging
from typing import Any

import h3
import numpy as np
import torch

log = logging.getLogger(__name__)

EARTH_RADIUS_KM = 6371.0088
"""Mean Earth radius (IUGG R1). Against the WGS84 geodesic the sphere is typically within ~0.2%;
the worst case, 0.56%, is a short north-south arc near the equator (meridional radius 6335 km)."""


def hexagon_edge_km(resolution: int) -> float:
    """Mean edge length in km of H3 hexagons at `resolution` (the scale of a class cell)."""
    return float(h3.average_hexagon_edge_length(int(resolution), unit="km"))


def haversine_km(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> np.ndarray | torch.Tensor:
    """Great-circle distance in km between points given in degrees; broadcasts like numpy.

    Torch tensors in (any of the four) give a tensor out on the same device, differentiable;
    anything else is computed in float64 numpy. The haversine form (not the spherical law of
    cosines) keeps metre-level precision for nearby points even in float32.
    """
    if any(isinstance(v, torch.Tensor) for v in (lat1, lon1, lat2, lon2)):
        return _haversine_torch(lat1, lon1, lat2, lon2)
    return _haversine_numpy(lat1, lon1, lat2, lon2)


def _haversine_numpy(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> np.ndarray:
    p1, l1, p2, l2 = (np.radians(np.asarray(v, dtype=np.float64)) for v in (lat1, lon1, lat2, lon2))
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin((l2 - l1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def _haversine_torch(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> torch.Tensor:
    ref = next(v for v in (lat1, lon1, lat2, lon2) if isinstance(v, torch.Tensor))
    dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
    p1, l1, p2, l2 = (
        torch.deg2rad(torch.as_tensor(v, dtype=dtype, device=ref.device))
        for v in (lat1, lon1, lat2, lon2)
    )
    a = (
        torch.sin((p2 - p1) / 2) ** 2
        + torch.cos(p1) * torch.cos(p2) * torch.sin((l2 - l1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * torch.asin(torch.sqrt(a.clamp(0.0, 1.0)))


def unit_vectors(lat: Any, lon: Any) -> np.ndarray | torch.Tensor:
    """Degrees (any shape) -> points on the unit sphere, shape (..., 3).

    Nearest by chord is nearest by great circle. Torch tensors in (either) give a tensor out on
    the same device, as in `haversine_km`; anything else is computed in float64 numpy.
    """
    if isinstance(lat, torch.Tensor) or isinstance(lon, torch.Tensor):
        return _unit_vectors_torch(lat, lon)
    phi, lam = (np.radians(np.asarray(v, dtype=np.float64)) for v in (lat, lon))
    return np.stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)], axis=-1)


def _unit_vectors_torch(lat: Any, lon: Any) -> torch.Tensor:
    ref = lat if isinstance(lat, torch.Tensor) else lon
    dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
    lat, lon = (
        v if isinstance(v, torch.Tensor) else torch.as_tensor(v, dtype=dtype, device=ref.device)
        for v in (lat, lon)
    )
    phi, lam = torch.deg2rad(lat), torch.deg2rad(lon)
    return torch.stack(
        (torch.cos(phi) * torch.cos(lam), torch.cos(phi) * torch.sin(lam), torch.sin(phi)), dim=-1
    )


@torch.no_grad()
def pairwise_haversine_km(
    lat1: torch.Tensor, lon1: torch.Tensor, lat2: torch.Tensor, lon2: torch.Tensor
) -> torch.Tensor:
    """All-pairs distances (N,) x (M,) -> (N, M) km, with one (N, M) buffer and no gradient.

    Why not `haversine_km` with broadcasting: that materialises ~6 (N, M) temporaries, which at
    N=256, M=100k is ~600 MB. Here the chord between unit vectors comes from `torch.cdist` in
    exact (non-matmul) mode, then is turned into an arc in place: d = 2R asin(chord / 2). The
    coordinate differences keep sub-metre precision in float32, unlike a dot-product form.
    """
    u1 = unit_vectors(lat1.reshape(-1), lon1.reshape(-1))
    u2 = unit_vectors(lat2.reshape(-1), lon2.reshape(-1)).to(u1.dtype)
    chord = torch.cdist(u1, u2, compute_mode="donot_use_mm_for_euclid_dist")  # (N, M)
    return chord.mul_(0.5).clamp_(max=1.0).asin_().mul_(2 * EARTH_RADIUS_KM)


def chord_arc_km(u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """Great-circle km between unit vectors (..., 3) (broadcasting), no gradient needed.

    The same chord -> arc step as `pairwise_haversine_km`, for chosen pairs instead of all of
    them, so sparse and dense GeoSoft targets agree to float32 rounding.
    """
    chord = torch.linalg.vector_norm(u1 - u2, dim=-1)
    return chord.mul_(0.5).clamp_(max=1.0).asin_().mul_(2 * EARTH_RADIUS_KM)


def nearest_points(lat: Any, lon: Any, k: int, chunk: int = 65_536) -> np.ndarray:
    """(N, k) int64: for each point, the indices of its `k` nearest points, itself first.

    A k-d tree over unit vectors (nearest by chord is nearest by great circle), queried in
    chunks so memory stays O(chunk x k) besides the answer; ~seconds per 10^5 points. Ties
    follow the tree; a point that shares its position with another still comes first.
    """
    from scipy.spatial import cKDTree

    u = np.asarray(unit_vectors(lat, lon), dtype=np.float64).reshape(-1, 3)
    n = u.shape[0]
    k = min(int(k), n)
    if k < 1:
        raise ValueError(f"nearest_points needs k >= 1 and at least one point, got k={k}, n={n}")
    tree = cKDTree(u)
    out = np.empty((n, k), dtype=np.int64)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        _, idx = tree.query(u[start:stop], k=k, workers=-1)
        out[start:stop] = np.asarray(idx, dtype=np.int64).reshape(stop - start, k)
    _self_first(out)
    return out


def _self_first(nbr: np.ndarray) -> None:
    """Put each row's own index in column 0 (in place); coincident points can displace it."""
    own = np.arange(nbr.shape[0])
    for row in np.flatnonzero(nbr[:, 0] != own):
        rest = [j for j in nbr[row] if j != row][: nbr.shape[1] - 1]
        nbr[row] = [row, *rest]
