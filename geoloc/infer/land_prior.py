"""The land prior of the OOD step (`geoloc.infer.ood`): where a photo can be when the model has
nothing to go on. A uniform-over-land point stands for the truth of a photo far from anything
seen; this module gives its distance CDF around an answer (the widened radius), the cells that
hold most of the land (the widened cell set) and the answer of least expected distance under a
mixture of the model and the land (the optional decoding).

- **Land points.** A fixed sample of points uniform over land (the basemap land mask,
  |lat| <= 85; fixed seeds, so every run sees the same ones): `LAND_POINTS` for the CDF and
  decoding, `LAND_SET_POINTS` for the land shares (the shares of a few-point sample are too
  coarse for 10^3 classes).
- **Land cells.** Each land point belongs to its nearest class centre (the cell a truth there is
  scored against when it lies in no class's own cell, as `geoloc evaluate` labels a photo); the
  land set at `level` is the fewest cells, largest share first, that hold `level` of the land.
  On the demo's 471 city-weighted r3 classes, 124 cells hold 90% of the land (dense Europe's
  small cells hold little of it): a point uniform over land falls in the set at `level`, with a
  quarter of the classes, where "every class centre within the widened radius" (the rule
  before) took two thirds of them.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from geoloc.geo import LabelSpace, haversine_km
from geoloc.geo.distance import unit_vectors
from geoloc.infer.candidates import TopCells

__all__ = [
    "DECODE_CELLS",
    "DECODE_LAND",
    "LAND_POINTS",
    "LAND_SET_POINTS",
    "hedge_answer",
    "land_cdf",
    "land_cells",
    "land_points",
    "land_shares",
]

LAND_POINTS = 1024
"""Points uniform over land that stand for the land distribution (fixed seed: the same for
every run)."""
LAND_SET_POINTS = 20_000
"""Points uniform over land the cells' land shares are counted on (seed 1)."""
DECODE_LAND = 128
"""Of the `LAND_POINTS`, the land points a widened photo's answer may move to."""
DECODE_CELLS = 10
"""The model's most likely cells a widened photo's answer may move to."""


@lru_cache(maxsize=4)
def land_points(n: int = LAND_POINTS, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) of `n` points uniform over land (the basemap land mask, |lat| <= 85)."""
    from geoloc.data.demo import sample_land_locations

    return sample_land_locations(n, seed)


def land_shares(lat: np.ndarray, lon: np.ndarray, n: int = LAND_SET_POINTS) -> np.ndarray:
    """(K,) share of the land whose nearest class centre (`lat`, `lon`: (K,)) is each class."""
    from scipy.spatial import cKDTree

    llat, llon = land_points(n, seed=1)
    tree = cKDTree(unit_vectors(lat, lon).reshape(-1, 3))  # nearest by chord = by great circle
    near = tree.query(unit_vectors(llat, llon).reshape(-1, 3))[1]
    return np.bincount(near, minlength=len(lat)) / n


def land_cells(lat: np.ndarray, lon: np.ndarray, level: float) -> np.ndarray:
    """Sorted class ids of the fewest cells (centres `lat`, `lon`), largest land share first,
    holding `level` of the land (`level` >= 1: every class)."""
    if level >= 1.0:
        return np.arange(len(lat))
    share = land_shares(lat, lon)
    order = np.argsort(-share, kind="stable")
    n = int(np.searchsorted(np.cumsum(share[order]), level - 1e-12) + 1)
    return np.sort(order[: min(n, order.size)])


def land_cdf(lat: np.ndarray, lon: np.ndarray, at_km: np.ndarray) -> np.ndarray:
    """(N, G) share of the land points within each of `at_km` (N, G) of (lat, lon)."""
    llat, llon = land_points()
    out = np.empty(at_km.shape)
    for s in range(0, len(lat), 256):
        d = np.sort(haversine_km(lat[s : s + 256, None], lon[s : s + 256, None], llat, llon), 1)
        for i, row in enumerate(d):
            out[s + i] = np.searchsorted(row, at_km[s + i], side="right") / row.size
    return out


def hedge_answer(
    top: TopCells,
    lost: np.ndarray,
    label_space: LabelSpace,
    cells: int = DECODE_CELLS,
    n_land: int = DECODE_LAND,
) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) of least expected distance under (1 - lost) top + lost * land, among each
    row's `cells` most likely class centres and `n_land` land points."""
    from geoloc.infer.radius import RADIUS_CANDIDATES

    llat, llon = land_points()
    best, w = top.best(RADIUS_CANDIDATES)  # (N, m) the calibrated candidates' most likely
    n = len(top)
    w = w / np.clip(w.sum(axis=1, keepdims=True), 1e-300, None)
    order = np.argsort(-w, axis=1)[:, : min(cells, w.shape[1])]
    cand_cells = np.take_along_axis(best, order, axis=1)  # (N, c)
    dl = haversine_km(llat[:n_land, None], llon[:n_land, None], llat, llon)
    land_lat = np.broadcast_to(llat[:n_land], (n, n_land))
    land_lon = np.broadcast_to(llon[:n_land], (n, n_land))
    cand_lat = np.concatenate([label_space.lat[cand_cells], land_lat], 1)
    cand_lon = np.concatenate([label_space.lon[cand_cells], land_lon], 1)
    land_cost = np.concatenate([
        haversine_km(label_space.lat[cand_cells][..., None], label_space.lon[cand_cells][..., None],
                     llat, llon).mean(axis=2),
        np.broadcast_to(dl.mean(axis=1), (n, n_land)),
    ], axis=1)  # fmt: skip
    d = haversine_km(
        cand_lat[:, :, None],
        cand_lon[:, :, None],
        label_space.lat[best][:, None, :],
        label_space.lon[best][:, None, :],
    )
    model_cost = np.einsum("ncm,nm->nc", d, w)
    cost = (1 - lost[:, None]) * model_cost + lost[:, None] * land_cost
    pick = cost.argmin(axis=1)
    rows = np.arange(n)
    return cand_lat[rows, pick], cand_lon[rows, pick]
