"""A calibrated error radius per image: the truth lies within `radius_km` at a stated confidence.

Split conformal on distance, normalised by the image's own uncertainty (Papadopoulos et al.'s
normalised nonconformity, Lei et al. 2018 for regression): the score of a val image is
`error_km / scale(x)`, with `scale(x) = spread(x) + floor_km`. The radius of a new image is
`quantile * scale(x)`, where `quantile` is the conformal quantile of the val scores at the
asked coverage. Under exchangeability of val and test the truth lies inside with probability
>= coverage; an uncertain image gets a wide radius, a sure one a narrow radius.

Two spreads are tried: the expected great-circle distance from the answer to the cell centres
under the calibrated distribution (its `candidates` most likely cells), and, for variants built
from gallery neighbours, the similarity-weighted distance from the answer to the `neighbours_k`
nearest train photos (softmax of similarity / `neighbours_temperature`): where the closest
photos agree on a place the answer is usually near it. `floor_km` keeps sure rows from a zero
radius (the answer is a cell centre or a neighbour estimate, never exact). Spread, neighbours
and floor (multiples of the typical cell radius, or a constant radius for everyone) are chosen
on val by the smallest median radius, cross-fitted over two halves of val like
`geoloc.infer.calibration.choose_conformal`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from geoloc.errors import GeolocError
from geoloc.geo import LabelSpace, haversine_km
from geoloc.infer.calibration import conformal_quantile, softmax_rows

if TYPE_CHECKING:
    from geoloc.infer.rerank import Neighbours

__all__ = [
    "FLOOR_FACTORS",
    "NEIGHBOUR_SPREADS",
    "RADIUS_CANDIDATES",
    "ErrorRadius",
    "expected_distance_km",
    "fit_error_radius",
    "fit_radius_scale",
    "neighbour_spread_km",
    "typical_cell_radius_km",
]

log = logging.getLogger(__name__)

RADIUS_CANDIDATES = 64
"""Most likely cells the spread is computed over (their mass renormalised)."""
FLOOR_FACTORS = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""Floors tried on val, in units of the typical cell radius."""
NEIGHBOUR_SPREADS = ((5, 0.02), (10, 0.02), (20, 0.02), (5, 0.1), (20, 0.1))
"""(k, temperature) of the neighbour spreads tried on val."""


def expected_distance_km(
    probs: np.ndarray,
    lat: np.ndarray,
    lon: np.ndarray,
    label_space: LabelSpace,
    candidates: int = RADIUS_CANDIDATES,
) -> np.ndarray:
    """(N,) expected distance from (lat, lon) to the cell centres under each row's distribution.

    Only the `candidates` most likely cells count (mass renormalised): the rest of a calibrated
    distribution is a thin tail that costs O(K) distances per image for little change.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.shape[0] == 0:
        return np.zeros(0)
    m = min(candidates, p.shape[1])
    top = np.argpartition(-p, m - 1, axis=1)[:, :m]  # (N, m)
    w = np.take_along_axis(p, top, axis=1)
    w = w / np.clip(w.sum(axis=1, keepdims=True), 1e-300, None)
    d = haversine_km(
        np.asarray(lat, dtype=np.float64)[:, None], np.asarray(lon, dtype=np.float64)[:, None],
        label_space.lat[top], label_space.lon[top],
    )  # fmt: skip
    return np.einsum("nm,nm->n", d, w)


def neighbour_spread_km(
    nbrs: Neighbours, lat: np.ndarray, lon: np.ndarray, k: int, temperature: float
) -> np.ndarray:
    """(N,) similarity-weighted distance from (lat, lon) to the `k` nearest gallery photos."""
    k = min(k, nbrs.k)
    w = softmax_rows(nbrs.sims[:, :k], temperature)  # (N, k)
    d = haversine_km(
        np.asarray(lat, dtype=np.float64)[:, None], np.asarray(lon, dtype=np.float64)[:, None],
        nbrs.lat[:, :k], nbrs.lon[:, :k],
    )  # fmt: skip
    return np.einsum("nk,nk->n", w, d)


def typical_cell_radius_km(label_space: LabelSpace) -> float:
    """Half the median distance from a class centre to the nearest other one (km)."""
    from geoloc.geo.distance import nearest_points

    if label_space.num_classes < 2:
        return 1.0
    nbr = nearest_points(label_space.lat, label_space.lon, 2)[:, 1]
    d = haversine_km(label_space.lat, label_space.lon, label_space.lat[nbr], label_space.lon[nbr])
    return max(float(np.median(d)) / 2.0, 1e-3)


def _scale(spread: np.ndarray, floor: float) -> np.ndarray:
    return np.ones(spread.size) if math.isinf(floor) else spread + floor


def _best_floor(
    spread: np.ndarray, errors: np.ndarray, coverage: float, floors: tuple[float, ...], seed: int
) -> tuple[float, float]:
    """(floor, cross-fitted median radius) of the floor with the smallest median radius."""
    n = errors.size
    if n < 40 or len(floors) == 1:
        return floors[0], math.nan
    perm = np.random.default_rng(seed).permutation(n)
    halves = (perm[: n // 2], perm[n // 2 :])
    best, best_median = floors[0], math.inf
    for floor in floors:
        median = 0.0
        for a, b in (halves, halves[::-1]):
            q = conformal_quantile(errors[a] / _scale(spread[a], floor), coverage)
            median += float(np.median(q * _scale(spread[b], floor))) / 2
        if median < best_median - 1e-9:
            best, best_median = floor, median
    return best, best_median


def fit_radius_scale(
    spread: np.ndarray,
    errors: np.ndarray,
    coverage: float,
    floors: tuple[float, ...],
    seed: int = 0,
) -> tuple[float, float]:
    """(floor_km, quantile): the floor with the smallest cross-fitted median radius, then the
    conformal quantile of `errors / (spread + floor)` on all of them.

    A floor of `inf` stands for a constant radius (the conformal quantile of the errors).
    """
    spread = np.asarray(spread, dtype=np.float64)
    errors = np.asarray(errors, dtype=np.float64)
    floor, _ = _best_floor(spread, errors, coverage, floors, seed)
    return float(floor), conformal_quantile(errors / _scale(spread, floor), coverage)


@dataclass(frozen=True)
class ErrorRadius:
    """A fitted error radius: what `predict` needs to draw a circle around a new answer."""

    coverage: float  # the stated confidence
    quantile: float  # conformal quantile of error / scale on val (inf: too few images)
    floor_km: float  # added to the spread (inf: a constant radius of `quantile` km)
    candidates: int = RADIUS_CANDIDATES
    n_calibration: int = 0
    neighbours_k: int = 0  # > 0: the spread is over this many gallery neighbours
    neighbours_temperature: float = 0.02

    def scale(
        self,
        probs: np.ndarray,
        lat: np.ndarray,
        lon: np.ndarray,
        label_space: LabelSpace,
        nbrs: Neighbours | None = None,
    ) -> np.ndarray:
        """(N,) the uncertainty the radius is proportional to (km; 1 for a constant radius)."""
        if math.isinf(self.floor_km):
            return np.ones(np.asarray(lat).shape[0])
        if self.neighbours_k:
            if nbrs is None:
                raise GeolocError("this error radius scales with gallery neighbours: pass them")
            k, t = self.neighbours_k, self.neighbours_temperature
            return neighbour_spread_km(nbrs, lat, lon, k, t) + self.floor_km
        spread = expected_distance_km(probs, lat, lon, label_space, self.candidates)
        return spread + self.floor_km

    def radius_km(
        self,
        probs: np.ndarray,
        lat: np.ndarray,
        lon: np.ndarray,
        label_space: LabelSpace,
        nbrs: Neighbours | None = None,
    ) -> np.ndarray:
        """(N,) radius around (lat, lon) holding the truth with probability `coverage`."""
        return self.quantile * self.scale(probs, lat, lon, label_space, nbrs)

    def evaluate(
        self,
        probs: np.ndarray,
        lat: np.ndarray,
        lon: np.ndarray,
        true_lat: np.ndarray,
        true_lon: np.ndarray,
        label_space: LabelSpace,
        nbrs: Neighbours | None = None,
    ) -> dict[str, float]:
        """`radius_coverage` (share of truths inside) and `radius_median_km` on held-out images."""
        if np.asarray(lat).size == 0:
            return {"radius_coverage": float("nan"), "radius_median_km": float("nan")}
        r = self.radius_km(probs, lat, lon, label_space, nbrs)
        err = haversine_km(true_lat, true_lon, lat, lon)
        return {
            "radius_coverage": float(np.mean(err <= r)),
            "radius_median_km": float(np.median(r)),
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("quantile", "floor_km"):
            d[key] = None if math.isinf(d[key]) else d[key]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ErrorRadius:
        def num(v: Any) -> float:
            return math.inf if v is None else float(v)

        return cls(
            coverage=float(d["coverage"]),
            quantile=num(d.get("quantile")),
            floor_km=num(d.get("floor_km")),
            candidates=int(d.get("candidates", RADIUS_CANDIDATES)),
            n_calibration=int(d.get("n_calibration", 0)),
            neighbours_k=int(d.get("neighbours_k", 0)),
            neighbours_temperature=float(d.get("neighbours_temperature", 0.02)),
        )


def fit_error_radius(
    probs: np.ndarray | None,
    lat: np.ndarray,
    lon: np.ndarray,
    true_lat: np.ndarray,
    true_lon: np.ndarray,
    label_space: LabelSpace,
    coverage: float,
    candidates: int = RADIUS_CANDIDATES,
    nbrs: Neighbours | None = None,
    spread: np.ndarray | None = None,
) -> ErrorRadius:
    """Calibrate the radius on val: calibrated probabilities, answers, the truth and (for
    variants built from votes) the gallery neighbours, whose spread is then tried too.
    `spread` (N,), when given, is the distribution's spread already computed (from each
    image's candidate cells, `geoloc.infer.candidates`) and `probs` is not read."""
    errors = haversine_km(true_lat, true_lon, lat, lon)
    cell = typical_cell_radius_km(label_space)
    floors = (*(f * cell for f in FLOOR_FACTORS), math.inf)
    if spread is None:
        if probs is None:
            raise GeolocError("fit_error_radius needs the probabilities or their spread")
        spread = expected_distance_km(probs, lat, lon, label_space, candidates)
    spreads: dict[tuple[int, float], np.ndarray] = {(0, 0.02): spread}
    if nbrs is not None:
        for k, t in NEIGHBOUR_SPREADS:
            spreads[(k, t)] = neighbour_spread_km(nbrs, lat, lon, k, t)
    best_key, best_floor, best_median = (0, 0.02), floors[0], math.inf
    for key, spread in spreads.items():
        floor, median = _best_floor(spread, errors, coverage, floors, seed=0)
        if median < best_median - 1e-9:
            best_key, best_floor, best_median = key, floor, median
    q = conformal_quantile(errors / _scale(spreads[best_key], best_floor), coverage)
    (k, t), n = best_key, int(errors.size)
    log.info("error radius on val: neighbours %d (t %g), floor %s km, quantile %.3g", k, t,
             best_floor, q)  # fmt: skip
    return ErrorRadius(coverage, q, float(best_floor), candidates, n, k, t)
