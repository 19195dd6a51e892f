"""Honest off the map: an out-of-distribution score per photo, and a radius, cell set and answer
that widen with it. Everything is fitted on val; nothing sees a shifted split.

- **Score.** Three things the gallery search rerank already does tell for free: how far the
  photo's embedding is from its nearest train photo (`1 - cosine similarity`, deep k-NN, Sun et
  al. 2022), how far apart on the map its `geo_k` nearest neighbours are (mean distance from the
  nearest one to the others: photos like the training data have neighbours from one place) and
  how far its answer is from its `spread_k` nearest neighbours (similarity-weighted, the radius's
  neighbour spread). Each is `log1p`'d and put on val's scale (minus the val median, over the val
  interquartile range) and they are added: 0 is a typical val photo. Model confidence was tried
  and is no use (the model is *more* confident on off-map photos); Mahalanobis distance and
  logit energies add nothing (docs/quality.md). The flag threshold is the
  `flag_quantile` (0.95) of the val scores: 5% of photos like the training data are flagged.
- **How lost.** `lost(s) = P(error > lost_km | score s)`, a logistic fit of val errors of the
  chosen variant on the score (an error model that extrapolates with the score: val holds few
  off-map photos, but its highest scores are lost more often, and the slope carries on), and 1
  above the `widen_quantile` (0.9) of the val scores: there the land prior takes over.
- **Widened distribution.** The answer's error follows `(1 - lost) * F_c + lost * F_land`:
  `F_c` is the val distribution of `error / scale(x)` (the conformal radius's normalised error,
  `geoloc.infer.radius`), `F_land` the distance from the answer to a point uniform over land
  (where a photo can come from when the model has nothing to go on). The radius is the
  distance where this mixture reaches `level`, at least `coverage` for a widened photo (its
  radius holds that share of the land, whatever val says), and `level` is split-conformal on val
  given those (the other val images' mixture CDF at their own error), so val coverage stays at
  the asked 0.9 while a photo far from everything seen gets a radius that covers the land it
  might be on.
- **Decoding** (`decode`, off by default: it lost on the demo, docs/quality.md). A widened
  photo's answer may become the point of least expected distance under the widened
  distribution, among the model's top cells (and a fixed set of land points).
- **Sets.** A widened photo's cell set also holds the land cells: the fewest cells that hold
  `set_level` of the land (`geoloc.infer.land_prior.land_cells`), the cell-level twin of the land
  radius, so a point uniform over land is in its set at `set_level`.
- **Not photos.** Blank, one-colour and noise images (`is_degenerate`, on the pixels) are
  flagged and widened whatever their score: a model can embed them next to anything.

`apply_ood` takes the chosen variant's output and is separate from `run_variants`, so the
variants (and how they are computed in blocks) stay as they are.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from geoloc.geo import LabelSpace, haversine_km
from geoloc.infer.calibration import ConformalSets
from geoloc.infer.candidates import TopCells, radius_scale_top, set_members_top
from geoloc.infer.land_prior import DECODE_LAND, hedge_answer, land_cdf, land_cells
from geoloc.infer.radius import neighbour_spread_km

if TYPE_CHECKING:
    from geoloc.infer.radius import ErrorRadius
    from geoloc.infer.rerank import Neighbours, RerankParams, VariantOutput

__all__ = [
    "OOD_VARIANT",
    "OodAnswer",
    "OodModel",
    "apply_ood",
    "auroc",
    "fit_ood",
    "is_degenerate",
    "knn_distance",
    "neighbour_dispersion_km",
    "ood_for",
    "widened_radius_km",
    "widened_members",
]

log = logging.getLogger(__name__)

OOD_VARIANT = "ood"
"""Table row of the chosen variant with the OOD radius, sets and decoding on top."""
RADII_KM = np.geomspace(1.0, 20_038.0, 400)
"""Radii the mixture CDF is evaluated on (1 km to half the circumference)."""
OOD_VERSION = 2
"""Bumped when the saved OOD model changes meaning; an older one is ignored (rerank again)."""
NORM_LEVELS = np.linspace(0.0, 1.0, 201)
"""Levels at which the val distribution of normalised errors is stored."""
SPREAD_TEMPERATURE = 0.02
"""Softmax temperature over similarities of the score's neighbour spread (the radius's)."""


def knn_distance(nbrs: Neighbours, k: int) -> np.ndarray:
    """(N,) 1 - mean cosine similarity of the `k` nearest gallery embeddings."""
    k = min(k, nbrs.k)
    return 1.0 - np.asarray(nbrs.sims[:, :k], dtype=np.float64).mean(axis=1)


def neighbour_dispersion_km(nbrs: Neighbours, k: int) -> np.ndarray:
    """(N,) mean distance from the nearest gallery photo to the next `k - 1` (on the map)."""
    k = min(k, nbrs.k)
    lat, lon = nbrs.lat[:, :k], nbrs.lon[:, :k]
    return haversine_km(lat, lon, lat[:, :1], lon[:, :1]).mean(axis=1)


def _robust_scale(x: np.ndarray) -> tuple[float, float]:
    """(median, interquartile range) of `x`, the range never 0."""
    if x.size == 0:
        return 0.0, 1.0
    q25, q50, q75 = np.quantile(x, [0.25, 0.5, 0.75])
    return float(q50), float(max(q75 - q25, 1e-6))


def score_features(
    nbrs: Neighbours, lat: np.ndarray, lon: np.ndarray, k: int = 1, geo_k: int = 5,
    spread_k: int = 10,
) -> np.ndarray:  # fmt: skip
    """(N, 3) log1p of the embedding distance to the `k` nearest train photos, of the `geo_k`
    neighbours' dispersion in km and of the answer's km from its `spread_k` neighbours."""
    spread = neighbour_spread_km(nbrs, lat, lon, spread_k, SPREAD_TEMPERATURE)
    return np.log1p(np.stack([knn_distance(nbrs, k), neighbour_dispersion_km(nbrs, geo_k),
                              spread], axis=1))  # fmt: skip


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """P(score of an `outside` photo > score of an `inside` one), ties half (Mann-Whitney)."""
    a, b = np.asarray(inside, float), np.asarray(outside, float)
    if a.size == 0 or b.size == 0:
        return math.nan
    ranks = _ranks(np.concatenate([a, b]))
    return float((ranks[a.size :].sum() - b.size * (b.size + 1) / 2) / (a.size * b.size))


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size)
    ranks[order] = np.arange(1, x.size + 1)
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, weights=ranks)
    return sums[inv] / counts[inv]  # average rank of ties


def _logistic_fit(s: np.ndarray, y: np.ndarray, iters: int = 50) -> tuple[float, float]:
    """(a, b) of P(y | s) = sigmoid(a + b s) by Newton's method, a little L2 on b."""
    x = np.stack([np.ones_like(s), s], axis=1)
    w = np.zeros(2)
    w[0] = math.log((y.mean() + 1e-3) / (1 - y.mean() + 1e-3))
    reg = np.diag([0.0, 1e-3])
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (p - y) + reg @ w
        hess = (x * (p * (1 - p))[:, None]).T @ x + reg + 1e-9 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return float(w[0]), float(w[1])


@dataclass(frozen=True)
class OodModel:
    """What `fit_ood` chose on val; `apply_ood` needs nothing else (and the run's radius)."""

    centres: tuple[float, ...]  # val median of each of `score_features`
    spreads: tuple[float, ...]  # ... and interquartile range
    threshold: float  # flag when the score is above (val quantile `flag_quantile`)
    flag_quantile: float
    lost_km: float  # an error above this is "lost" for the error model
    lost_a: float  # P(lost | s) = sigmoid(lost_a + lost_b * s)
    lost_b: float
    level: float  # mixture-CDF level of the radius (conformal on val)
    coverage: float  # the radius coverage asked
    norm_quantiles: tuple[float, ...]  # val error / scale at NORM_LEVELS
    val_scores: tuple[float, ...] = ()  # val score quantiles at 0, 1, ..., 100% (for reports)
    n_calibration: int = 0
    widen_threshold: float = math.inf  # above: P(lost) is at least `widened_lost`
    widen_quantile: float = 1.0
    widened_lost: float = 1.0
    decode: str = "none"  # widened photos: "none", "cells" (top cells), "land" (+ land points)
    land: tuple[int, ...] = ()  # the land cells a widened photo's set holds (`land_cells`)
    set_level: float = 0.9  # the share of the land they hold
    k: int = 1  # gallery neighbours of each score feature (`score_features`)
    geo_k: int = 5
    spread_k: int = 10

    def score(self, nbrs: Neighbours, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        """(N,) the OOD score of answers (lat, lon): 0 for a typical val photo, higher further
        from the gallery."""
        x = score_features(nbrs, lat, lon, self.k, self.geo_k, self.spread_k)
        return ((x - np.asarray(self.centres)) / np.asarray(self.spreads)).sum(axis=1)

    def lost(self, score: np.ndarray) -> np.ndarray:
        """(N,) P(error > lost_km) under the val error model, at least `widened_lost` above
        the widening threshold."""
        z = np.clip(self.lost_a + self.lost_b * np.asarray(score, float), -50, 50)
        lost = 1.0 / (1.0 + np.exp(-z))
        return np.where(self.widen(score), np.maximum(lost, self.widened_lost), lost)

    def flag(self, score: np.ndarray) -> np.ndarray:
        """(N,) bool: out of distribution (the words a user reads)."""
        return np.asarray(score) > self.threshold

    def widen(self, score: np.ndarray) -> np.ndarray:
        """(N,) bool: far enough from the gallery that the land prior takes over."""
        return np.asarray(score) > self.widen_threshold

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for key in ("norm_quantiles", "val_scores", "centres", "spreads"):
            d[key] = [float(x) for x in d[key]]
        d["land"] = [int(c) for c in self.land]
        return {"version": OOD_VERSION, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> OodModel | None:
        """The saved model; None (with a warning) for one another geoloc version wrote."""
        if not d:
            return None
        if d.get("version") != OOD_VERSION:
            log.warning("ignoring an OOD model of version %r (this geoloc reads %d): run "
                        "`geoloc rerank` again", d.get("version"), OOD_VERSION)  # fmt: skip
            return None
        d = {k: v for k, v in d.items() if k != "version"}
        seqs = ("norm_quantiles", "val_scores", "centres", "spreads", "land")
        return cls(**{**d, **{k: tuple(d[k]) for k in seqs if k in d}})


@dataclass(eq=False)
class OodAnswer:
    """The chosen variant's answer after the OOD step, per image."""

    score: np.ndarray  # (N,) OOD score
    flag: np.ndarray  # (N,) bool: above the val threshold
    widened: np.ndarray  # (N,) bool: above the widening threshold
    lost: np.ndarray  # (N,) P(error > lost_km)
    lat: np.ndarray  # (N,) answer (moved for flagged photos)
    lon: np.ndarray
    pred: np.ndarray  # (N,) class of the answer (nearest class centre when it moved)
    radius_km: np.ndarray  # (N,) widened radius
    moved: np.ndarray  # (N,) bool: the answer moved
    land: tuple[int, ...] = ()  # the land cells a widened photo's set holds (`OodModel.land`)


def _norm_cdf(model_q: np.ndarray, x: np.ndarray) -> np.ndarray:
    """F_c(x): the val CDF of error / scale, interpolated between its stored quantiles."""
    q = np.maximum.accumulate(model_q)
    return np.interp(x, q, NORM_LEVELS, left=0.0, right=1.0)


def mixture_cdf(
    model: OodModel, lost: np.ndarray, scale: np.ndarray, lat: np.ndarray, lon: np.ndarray,
    at_km: np.ndarray,
) -> np.ndarray:  # fmt: skip
    """(N, G) P(error <= at_km) under (1 - lost) F_c(r / scale) + lost F_land(r)."""
    q = np.asarray(model.norm_quantiles)
    inside = _norm_cdf(q, at_km / scale[:, None])
    return (1 - lost[:, None]) * inside + lost[:, None] * land_cdf(lat, lon, at_km)


def widened_radius_km(
    model: OodModel,
    lost: np.ndarray,
    scale: np.ndarray,
    lat: np.ndarray,
    lon: np.ndarray,
    widened: np.ndarray | None = None,
) -> np.ndarray:
    """(N,) the least radius where the mixture CDF reaches `model.level` (grid, log-interpolated),
    and at least `model.coverage` for `widened` rows (the land prior's own promise: their radius
    holds that share of the land); a larger `lost` never gives a smaller radius where the land
    spreads wider than the answer."""
    n = len(lat)
    level = np.full(n, model.level)
    if widened is not None:
        level[np.asarray(widened, bool)] = max(model.level, model.coverage)
    grid = np.broadcast_to(RADII_KM, (n, RADII_KM.size))
    cdf = np.maximum.accumulate(mixture_cdf(model, lost, scale, lat, lon, grid), axis=1)
    j = np.clip((cdf < level[:, None]).sum(axis=1), 1, RADII_KM.size - 1)  # first >= level
    rows = np.arange(n)
    c0, c1 = cdf[rows, j - 1], cdf[rows, j]
    t = np.clip((level - c0) / np.clip(c1 - c0, 1e-12, None), 0.0, 1.0)
    logr = np.log(RADII_KM)
    r = np.exp(logr[j - 1] + t * (logr[j] - logr[j - 1]))
    return np.where(cdf[:, 0] >= level, RADII_KM[0], r)


def apply_ood(
    model: OodModel,
    top: TopCells,
    lat: np.ndarray,
    lon: np.ndarray,
    pred: np.ndarray,
    nbrs: Neighbours,
    radius: ErrorRadius,
    label_space: LabelSpace,
    degenerate: np.ndarray | None = None,
) -> OodAnswer:
    """The OOD step on a variant's calibrated candidates `top` and answer (lat, lon, pred);
    `degenerate` rows are flagged and widened (P(lost) = 1) whatever their score."""
    score = model.score(nbrs, lat, lon)
    bad = np.zeros(len(score), bool) if degenerate is None else np.asarray(degenerate, bool)
    wide = model.widen(score) | bad
    lost = np.where(bad, 1.0, model.lost(score))
    lat, lon, pred = np.array(lat, float), np.array(lon, float), np.array(pred)
    moved = np.zeros(len(lat), dtype=bool)
    if wide.any() and model.decode != "none":
        n_land = DECODE_LAND if model.decode == "land" else 0
        hl, ho = hedge_answer(top.subset(np.flatnonzero(wide)), lost[wide], label_space,
                              n_land=n_land)  # fmt: skip
        moved[wide] = haversine_km(hl, ho, lat[wide], lon[wide]) > 1e-6
        lat[wide], lon[wide] = hl, ho
        near = haversine_km(hl[:, None], ho[:, None], label_space.lat, label_space.lon)
        pred[wide] = near.argmin(axis=1)
    scale = radius_scale_top(radius, top, lat, lon, label_space, nbrs)
    r = widened_radius_km(model, lost, scale, lat, lon, wide)
    return OodAnswer(score, model.flag(score) | bad, wide, lost, lat, lon, pred, r, moved,
                     model.land)  # fmt: skip


def widened_members(
    top: TopCells, sets: ConformalSets, ans: OodAnswer
) -> tuple[np.ndarray, np.ndarray]:
    """(member (N, K) bool, extra (N,) int) cell sets of a bounded block: the conformal set on
    the candidates (all tail cells when the set holds the whole tail), plus for widened photos
    the OOD model's land cells (`land_prior.land_cells`). `extra`: tail cells a RAPS set holds only
    in part (counted, not named)."""
    inside, tail_in = set_members_top(top, sets.threshold, sets.method, sets.k_reg, sets.penalty)
    n, m = top.cells.shape
    rows = np.repeat(np.arange(n), m)
    out = np.zeros((n, top.num_classes), dtype=bool)
    whole = (tail_in >= top.tail_count) & (top.tail_count > 0)
    if whole.any():
        out[whole] = True
        out[rows, top.cells.ravel()] = False  # the tail: every class but the candidates
        out[~whole] = False
    out[rows, top.cells.ravel()] = inside.ravel()
    wide = np.flatnonzero(ans.widened)
    if wide.size and ans.land:
        out[np.ix_(wide, np.asarray(ans.land, dtype=np.int64))] = True
    return out, np.where(whole, 0, tail_in)


def fit_ood(
    nbrs: Neighbours,
    top: TopCells,
    lat: np.ndarray,
    lon: np.ndarray,
    pred: np.ndarray,
    true_lat: np.ndarray,
    true_lon: np.ndarray,
    radius: ErrorRadius,
    label_space: LabelSpace,
    *,
    flag_quantile: float = 0.95,
    widen_quantile: float = 0.9,
    lost_km: float = 2500.0,
    decode: str = "none",
    set_level: float = 0.9,
) -> OodModel:
    """Fit the score's scale and threshold, the error model and the radius level on val (the
    chosen variant's calibrated candidates `top`, answers, and the truth); widened sets hold the
    land cells of `set_level` of the land (the sets' coverage)."""
    x = score_features(nbrs, lat, lon)
    centres, spreads = zip(*(_robust_scale(x[:, j]) for j in range(x.shape[1])), strict=True)
    score = ((x - np.asarray(centres)) / np.asarray(spreads)).sum(axis=1)
    err = haversine_km(true_lat, true_lon, lat, lon)
    scale = radius_scale_top(radius, top, lat, lon, label_space, nbrs)
    norm_q = np.quantile(err / scale, NORM_LEVELS) if err.size else np.zeros(NORM_LEVELS.size)
    y = (err > lost_km).astype(float)
    if 0 < y.sum() < y.size:
        a, b = _logistic_fit(score, y)
        b = max(b, 0.0)  # the error model may not say "further from the gallery, surer"
    else:
        a, b = (-20.0 if y.sum() == 0 else 20.0), 0.0

    def at(q: float) -> float:
        return float(np.quantile(score, q)) if score.size and q < 1.0 else math.inf

    threshold, widen_threshold = at(flag_quantile), at(widen_quantile)
    val_scores = np.quantile(score, np.linspace(0, 1, 101)) if score.size else np.zeros(0)
    land = land_cells(label_space.lat, label_space.lon, set_level)
    model = OodModel(
        centres=tuple(centres), spreads=tuple(spreads), threshold=threshold,
        flag_quantile=flag_quantile, lost_km=lost_km, lost_a=a, lost_b=b, level=radius.coverage,
        coverage=radius.coverage, norm_quantiles=tuple(float(x) for x in norm_q),
        val_scores=tuple(float(x) for x in val_scores), n_calibration=int(err.size),
        widen_threshold=widen_threshold, widen_quantile=widen_quantile, decode=decode,
        land=tuple(int(c) for c in land), set_level=set_level,
    )  # fmt: skip
    ans = apply_ood(model, top, lat, lon, pred, nbrs, radius, label_space)
    err = haversine_km(true_lat, true_lon, ans.lat, ans.lon)
    scale = radius_scale_top(radius, top, ans.lat, ans.lon, label_space, nbrs)
    t = mixture_cdf(model, ans.lost, scale, ans.lat, ans.lon, err[:, None])[:, 0]
    level = _level(t[~ans.widened], int((err <= ans.radius_km)[ans.widened].sum()), err.size,
                   radius.coverage)  # fmt: skip
    log.info("OOD on val: flag above %.4g (q%.2f), P(lost > %g km) = sigmoid(%.3g + %.3g s), "
             "radius level %.4f", model.threshold, flag_quantile, lost_km, a, b, level)  # fmt: skip
    return OodModel(**{**asdict(model), "level": float(level)})


def _level(t: np.ndarray, covered_widened: int, n: int, coverage: float) -> float:
    """The mixture-CDF level of the photos that are not widened (their CDF at their own error:
    `t`) at which, with the `covered_widened` widened photos the land radius holds, `coverage`
    of all `n` val photos are covered (split-conformal: ceil((n + 1) coverage) of them)."""
    if t.size == 0:
        return coverage
    need = math.ceil((n + 1) * coverage) - covered_widened
    if need > t.size:
        return 1.0
    return float(np.sort(t)[max(need, 1) - 1])


def ood_for(
    params: RerankParams,
    name: str,
    v: VariantOutput,
    nbrs: Neighbours,
    label_space: LabelSpace,
    degenerate: np.ndarray | None = None,
    cal: TopCells | None = None,
) -> OodAnswer | None:
    """The OOD step on variant `name`'s answer, None when the run has no OOD model or radius.
    `degenerate` rows (not photos: `is_degenerate`) are flagged and widened whatever their score;
    `cal`: the variant's calibrated candidates when already computed."""
    radius = params.radius.get(name)
    if params.ood is None or radius is None:
        return None
    top = params.calibrated_top(name, v) if cal is None else cal
    return apply_ood(params.ood, top, v.lat, v.lon, v.pred, nbrs, radius, label_space,
                     degenerate)  # fmt: skip


FLAT_STD = 1.0
"""Pixel standard deviation (0-255) below which an image is one colour."""
NOISE_CORRELATION = 0.5
"""Neighbouring-pixel correlation below which an image is noise (photos: 0.8-1.0)."""


def is_degenerate(pixels: np.ndarray) -> bool:
    """A blank, single-colour or noise image (`pixels`: (C, H, W) uint8): not a photo, so no
    embedding distance should vouch for it (a tiny model can map any of them near a gallery
    photo). Flat: standard deviation under `FLAT_STD`; noise: the correlation of horizontally
    and vertically neighbouring pixels under `NOISE_CORRELATION`."""
    x = np.asarray(pixels, dtype=np.float64).mean(axis=0)  # (H, W) grey
    if x.std() < FLAT_STD:
        return True
    if min(x.shape) < 2:
        return False

    def corr(a: np.ndarray, b: np.ndarray) -> float:
        a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
        return float((a @ b) / max(np.sqrt((a @ a) * (b @ b)), 1e-12))

    return max(corr(x[:, :-1], x[:, 1:]), corr(x[:-1], x[1:])) < NOISE_CORRELATION
