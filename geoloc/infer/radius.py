"""A calibrated error radius per image: the truth lies within `radius_km` at a stated confidence.

Split conformal on distance, normalised by the image's own uncertainty (Papadopoulos et al.'s
normalised nonconformity, Lei et al. 2018 for regression): the score of a val image is
`error_km / scale(x)`, with `scale(x) = spread(x) + floor_km` and `spread(x)` the expected
great-circle distance from the decoded point to the truth under the calibrated distribution
(over its `candidates` most likely cells, renormalised). The radius of a new image is
`quantile * scale(x)`, where `quantile` is the conformal quantile of the val scores at the
asked coverage. Under exchangeability of val and test the truth lies inside with probability
>= coverage; a diffuse distribution gets a wide radius, a sharp one a narrow radius.

`floor_km` keeps confident rows from getting a zero radius (the decoded point is a cell centre
or a neighbour estimate, never exact): it is chosen on val among multiples of the typical cell
radius, plus a constant radius (no adaptation), by the smallest median radius, cross-fitted over
two halves of val like `geoloc.infer.calibration.choose_conformal`.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from geoloc.geo import LabelSpace, haversine_km
from geoloc.infer.calibration import conformal_quantile

__all__ = [
    "FLOOR_FACTORS",
    "RADIUS_CANDIDATES",
    "ErrorRadius",
    "expected_distance_km",
    "fit_error_radius",
    "fit_radius_scale",
    "typical_cell_radius_km",
]

log = logging.getLogger(__name__)

RADIUS_CANDIDATES = 64
"""Most likely cells the spread is computed over (their mass renormalised)."""
FLOOR_FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
"""Floors tried on val, in units of the typical cell radius."""


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


def typical_cell_radius_km(label_space: LabelSpace) -> float:
    """Half the median distance from a class centre to the nearest other one (km)."""
    from geoloc.geo.distance import nearest_points

    if label_space.num_classes < 2:
        return 1.0
    nbr = nearest_points(label_space.lat, label_space.lon, 2)[:, 1]
    d = haversine_km(label_space.lat, label_space.lon, label_space.lat[nbr], label_space.lon[nbr])
    return max(float(np.median(d)) / 2.0, 1e-3)


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
    n = errors.size

    def scale(rows: np.ndarray | slice, floor: float) -> np.ndarray:
        return np.ones(errors[rows].size) if math.isinf(floor) else spread[rows] + floor

    best = floors[0]
    if n >= 40 and len(floors) > 1:
        perm = np.random.default_rng(seed).permutation(n)
        halves = (perm[: n // 2], perm[n // 2 :])
        best_median = math.inf
        for floor in floors:
            median = 0.0
            for a, b in (halves, halves[::-1]):
                q = conformal_quantile(errors[a] / scale(a, floor), coverage)
                median += float(np.median(q * scale(b, floor))) / 2
            if median < best_median - 1e-9:
                best, best_median = floor, median
    q = conformal_quantile(errors / scale(slice(None), best), coverage)
    return float(best), q


@dataclass(frozen=True)
class ErrorRadius:
    """A fitted error radius: what `predict` needs to draw a circle around a new answer."""

    coverage: float  # the stated confidence
    quantile: float  # conformal quantile of error / scale on val (inf: too few images)
    floor_km: float  # added to the spread (inf: a constant radius of `quantile` km)
    candidates: int = RADIUS_CANDIDATES
    n_calibration: int = 0

    def scale(
        self, probs: np.ndarray, lat: np.ndarray, lon: np.ndarray, label_space: LabelSpace
    ) -> np.ndarray:
        """(N,) the uncertainty the radius is proportional to (km; 1 for a constant radius)."""
        if math.isinf(self.floor_km):
            return np.ones(np.asarray(lat).shape[0])
        spread = expected_distance_km(probs, lat, lon, label_space, self.candidates)
        return spread + self.floor_km

    def radius_km(
        self, probs: np.ndarray, lat: np.ndarray, lon: np.ndarray, label_space: LabelSpace
    ) -> np.ndarray:
        """(N,) radius around (lat, lon) holding the truth with probability `coverage`."""
        return self.quantile * self.scale(probs, lat, lon, label_space)

    def evaluate(
        self,
        probs: np.ndarray,
        lat: np.ndarray,
        lon: np.ndarray,
        true_lat: np.ndarray,
        true_lon: np.ndarray,
        label_space: LabelSpace,
    ) -> dict[str, float]:
        """`radius_coverage` (share of truths inside) and `radius_median_km` on held-out images."""
        if np.asarray(lat).size == 0:
            return {"radius_coverage": float("nan"), "radius_median_km": float("nan")}
        r = self.radius_km(probs, lat, lon, label_space)
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
        )


def fit_error_radius(
    probs: np.ndarray,
    lat: np.ndarray,
    lon: np.ndarray,
    true_lat: np.ndarray,
    true_lon: np.ndarray,
    label_space: LabelSpace,
    coverage: float,
    candidates: int = RADIUS_CANDIDATES,
) -> ErrorRadius:
    """Calibrate the radius on val: calibrated probabilities, decoded points and the truth."""
    spread = expected_distance_km(probs, lat, lon, label_space, candidates)
    errors = haversine_km(true_lat, true_lon, lat, lon)
    cell = typical_cell_radius_km(label_space)
    floors = (*(f * cell for f in FLOOR_FACTORS), math.inf)
    floor, q = fit_radius_scale(spread, errors, coverage, floors)
    log.info("error radius: floor %s km, quantile %.3g (coverage %.2f, on val)", floor, q, coverage)
    return ErrorRadius(coverage, q, floor, candidates, int(errors.size))
