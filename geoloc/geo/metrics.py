"""Geo metrics shared by training, rerank and reporting (one definition of each number).

Conventions (docs/ARCHITECTURE.md, "Metric names"): distances in km from `geoloc.geo`,
accuracy thresholds strict (`d < 25`), GeoScore = mean of 5000 * exp(-d / 1492.7) (GeoGuessr's
scale). Empty inputs give NaN for every metric instead of raising, so an epoch with an empty
split still writes a row; NaN distances propagate into the quantiles.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from geoloc.errors import GeolocError
from geoloc.geo import haversine_km

__all__ = [
    "GEOSCORE_SCALE_KM",
    "GEO_METRIC_NAMES",
    "THRESHOLDS_KM",
    "expected_calibration_error",
    "geo_metrics",
    "geo_metrics_from_errors",
    "geoscore",
    "topk_accuracy",
]

log = logging.getLogger(__name__)

THRESHOLDS_KM: tuple[int, ...] = (1, 25, 200, 750, 2500)
"""Street, city, region, country, continent."""

GEO_METRIC_NAMES: tuple[str, ...] = (
    "median_km",
    "p90_km",
    "p95_km",
    *(f"acc_{t}km" for t in THRESHOLDS_KM),
    "geoscore",
)
"""The keys of `geo_metrics`, in order; reports list them under their `val_`/`test_` prefix."""

GEOSCORE_SCALE_KM = 1492.7
GEOSCORE_MAX = 5000.0


def _as_numpy(x: Any, dtype: type = np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def geoscore(errors_km: Any) -> float:
    """Mean GeoGuessr-style score, 5000 at 0 km; NaN when empty."""
    d = _as_numpy(errors_km)
    if d.size == 0:
        return float("nan")
    return float(np.mean(GEOSCORE_MAX * np.exp(-d / GEOSCORE_SCALE_KM)))


def geo_metrics_from_errors(errors_km: Any) -> dict[str, float]:
    """`median_km, p90_km, p95_km, acc_<t>km..., geoscore` from per-image errors in km."""
    d = _as_numpy(errors_km)
    if d.size == 0:
        return dict.fromkeys(GEO_METRIC_NAMES, float("nan"))
    out: dict[str, float] = {}
    median, p90, p95 = np.percentile(d, [50, 90, 95])
    out.update(median_km=float(median), p90_km=float(p90), p95_km=float(p95))
    out.update({f"acc_{t}km": float(np.mean(d < t)) for t in THRESHOLDS_KM})
    out["geoscore"] = geoscore(d)
    return out


def geo_metrics(true_lat: Any, true_lon: Any, pred_lat: Any, pred_lon: Any) -> dict[str, float]:
    """Distance metrics between true and predicted coordinates (degrees, any array-likes).

    Keys: `median_km, p90_km, p95_km, acc_1km, acc_25km, acc_200km, acc_750km, acc_2500km,
    geoscore` — prefix them with `val_`/`test_` for metrics.csv and summary.json.
    """
    arrays = [_as_numpy(v) for v in (true_lat, true_lon, pred_lat, pred_lon)]
    if len({a.size for a in arrays}) != 1:
        raise GeolocError(
            "geo_metrics: true/pred coordinate arrays differ in length "
            f"({', '.join(str(a.size) for a in arrays)})"
        )
    return geo_metrics_from_errors(haversine_km(*arrays))


def topk_accuracy(scores: torch.Tensor | np.ndarray, targets: Any, k: int) -> float:
    """Share of rows whose target is among the `k` highest scores (k is capped at K); NaN if empty.

    Ties are resolved by `torch.topk`, so a row of identical scores counts at most k classes.
    """
    s = torch.as_tensor(scores).detach()
    t = torch.as_tensor(targets).detach().reshape(-1).to(s.device, torch.long)
    if s.ndim != 2 or s.shape[0] != t.numel():
        raise GeolocError(
            f"topk_accuracy: scores must be (B, K) with B = len(targets); got "
            f"{tuple(s.shape)} and {t.numel()} targets"
        )
    if s.shape[0] == 0 or s.shape[1] == 0:
        return float("nan")
    k = max(1, min(int(k), s.shape[1]))
    top = s.topk(k, dim=1).indices
    return float((top == t[:, None]).any(dim=1).float().mean())


def expected_calibration_error(probs_top1: Any, correct: Any, n_bins: int = 15) -> float:
    """ECE: bin by top-1 confidence on [0, 1] (equal width), sum |accuracy - confidence| weighted
    by each bin's share of samples. 0 is perfectly calibrated; NaN when empty.

    The last bin includes 1.0; confidences are clipped into [0, 1].
    """
    p = np.clip(_as_numpy(probs_top1), 0.0, 1.0)
    c = _as_numpy(correct)
    if p.size != c.size:
        raise GeolocError(f"ECE: {p.size} confidences but {c.size} correctness flags")
    if p.size == 0:
        return float("nan")
    if n_bins < 1:
        raise GeolocError(f"ECE: n_bins must be >= 1, got {n_bins}")
    bins = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    conf = np.bincount(bins, weights=p, minlength=n_bins)
    acc = np.bincount(bins, weights=c, minlength=n_bins)
    return float(np.sum(np.abs(acc - conf)) / p.size)
