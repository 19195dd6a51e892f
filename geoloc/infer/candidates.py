"""Each image's distribution as its top candidate cells plus one tail term, for calibration.

Calibration, conformal cell sets, the error radius and min-risk decoding used to work on dense
(images x classes) probabilities: at 10^5 images (7,756 classes) the fits on a 2,000-image
sample held ~4 GB, and at 10^5-10^6 classes no sample fits. Here an image keeps its `m` most
likely cells (`TopCells`: ids in ascending class order, so ties break towards the lower id as
in a dense argmax or stable sort) and the rest of its mass as one tail term, read as
`K - m` cells sharing it equally, so probabilities still sum to 1. Everything is (images x m).

When `m >= K` every class is a candidate, the tail is empty and every function here gives the
dense result of `geoloc.infer.calibration` / `radius` (`tests/infer/test_candidates.py`). When
`m < K` the tail's cells are approximated as equal; that moves a temperature fit only through
the normalisation of the rest, and min-risk decoding (a ratio over the top cells) not at all.
A variant built from neighbour votes keeps the cells of `scores + model` (its mixture with the
model, `Calibration.smoothing`, ranks its cells among those of the two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from geoloc.errors import GeolocError
from geoloc.geo import LabelSpace, haversine_km
from geoloc.geo.metrics import expected_calibration_error
from geoloc.infer.calibration import (
    SMOOTHING_GRID,
    Calibration,
    ConformalChoice,
    ConformalMethod,
    ConformalSets,
    TemperatureObjective,
    conformal_candidates,
    conformal_quantile,
    cross_fitted_choice,
    tie_group_end,
)
from geoloc.infer.radius import ErrorRadius

if TYPE_CHECKING:
    from geoloc.infer.rerank import Neighbours

__all__ = [
    "TopCells",
    "choose_conformal_top",
    "conformal_scores_top",
    "expected_distance_top",
    "fit_conformal_top",
    "fit_scaling_top",
    "fit_temperature_top",
    "radius_km_top",
    "radius_scale_top",
    "set_members_top",
    "set_size_top",
    "set_stats_top",
    "top1_ece_top",
]

_EPS = 1e-12  # the floor `geoloc.infer.calibration.log_probs` puts under probabilities


@dataclass(eq=False)
class TopCells:
    """A distribution over K classes kept as `m` candidate cells and a tail shared by the rest."""

    cells: np.ndarray  # (N, m) int64 class ids, ascending per row
    p: np.ndarray  # (N, m) float64 mass of each candidate
    tail: np.ndarray  # (N,) float64 mass of the other K - m classes together
    num_classes: int
    model_p: np.ndarray | None = None  # (N, m) the model's mass at the same cells (votes)
    model_tail: np.ndarray | None = None  # (N,)

    @classmethod
    def from_dense(
        cls,
        scores: np.ndarray,
        model: np.ndarray | None,
        m: int,
        cols: np.ndarray | None = None,
        num_classes: int | None = None,
    ) -> TopCells:
        """From a bounded (rows, K) block: the `m` cells with most `scores` (+ `model`) mass.

        `cols`: the block has columns for those classes only (ascending) out of `num_classes`,
        every other class holding no mass (`geoloc.infer.rerank.run_variants`); the result is
        that of the (rows, K) block, up to which zero-mass cells fill the `m` places when fewer
        classes have columns (a dense `argpartition` picks those arbitrarily too)."""
        scores = np.asarray(scores, dtype=np.float64)
        n, u = scores.shape
        k = u if num_classes is None else int(num_classes)
        width = k if m <= 0 or m >= k else m
        if width >= u:
            local = np.broadcast_to(np.arange(u, dtype=np.int64), (n, u))
        else:
            key = scores if model is None else scores + model
            local = np.sort(np.argpartition(-key, width - 1, axis=1)[:, :width], axis=1)

        def gather(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            p = np.take_along_axis(x, local, axis=1)
            return p, np.clip(x.sum(axis=1) - p.sum(axis=1), 0.0, None)

        p, tail = gather(scores)
        mp, mt = gather(np.asarray(model, dtype=np.float64)) if model is not None else (None, None)
        cells = local.copy() if cols is None else np.asarray(cols, dtype=np.int64)[local]
        if width > u:  # fewer columns than places: zero-mass classes fill them, in class order
            fill = np.setdiff1d(np.arange(width, dtype=np.int64), cells[0])[: width - u]
            order = np.argsort(np.concatenate([cells[0], fill]), kind="stable")
            zeros = np.zeros((n, width - u))
            cells = np.concatenate([cells, np.broadcast_to(fill, (n, width - u))], axis=1)[:, order]
            p = np.concatenate([p, zeros], axis=1)[:, order]
            mp = None if mp is None else np.concatenate([mp, zeros], axis=1)[:, order]
        return cls(cells, p, tail, k, mp, mt)

    @classmethod
    def concat(cls, parts: list[TopCells]) -> TopCells:
        """Row blocks of the same width, in order."""
        first = parts[0]

        def cat(name: str) -> np.ndarray | None:
            values = [getattr(t, name) for t in parts]
            return None if values[0] is None else np.concatenate(values)

        return cls(cat("cells"), cat("p"), cat("tail"), first.num_classes,  # type: ignore[arg-type]
                   cat("model_p"), cat("model_tail"))  # fmt: skip

    def __len__(self) -> int:
        return self.cells.shape[0]

    @property
    def tail_count(self) -> int:
        """How many classes the tail stands for."""
        return self.num_classes - self.cells.shape[1]

    def subset(self, rows: np.ndarray) -> TopCells:
        pick = lambda x: None if x is None else x[rows]  # noqa: E731
        return TopCells(self.cells[rows], self.p[rows], self.tail[rows], self.num_classes,
                        pick(self.model_p), pick(self.model_tail))  # fmt: skip

    def mixed(self, smoothing: float) -> tuple[np.ndarray, np.ndarray]:
        """(p, tail) of `(1 - s) * scores + s * model` (`Calibration.mixed`)."""
        if self.model_p is None or smoothing <= 0.0:
            return self.p, self.tail
        s = smoothing
        return (1 - s) * self.p + s * self.model_p, (1 - s) * self.tail + s * self.model_tail

    def log_terms(self, smoothing: float) -> tuple[np.ndarray, np.ndarray]:
        """(z (N, m), tail z (N,)): floored log mass of each candidate and of one tail cell."""
        p, tail = self.mixed(smoothing)
        share = tail / max(self.tail_count, 1)
        return np.log(np.clip(p, _EPS, None)), np.log(np.clip(share, _EPS, None))

    def calibrated(self, cal: Calibration) -> TopCells:
        """The calibrated distribution (`Calibration.apply`), in the same form (no model)."""
        z, tz = self.log_terms(cal.smoothing)
        t = cal.temperature
        if t <= 0:
            raise GeolocError(f"temperature must be > 0, got {t}")
        logits = np.concatenate([z / t, (tz / t + _log_count(self.tail_count))[:, None]], axis=1)
        top = logits.max(axis=1, keepdims=True)
        p = np.exp(logits - top)
        p /= p.sum(axis=1, keepdims=True)
        return TopCells(self.cells, p[:, :-1], p[:, -1], self.num_classes)

    def columns(self, labels: np.ndarray) -> np.ndarray:
        """(N,) the column of each label among the candidates; `m` when it is in the tail."""
        y = np.asarray(labels, dtype=np.int64).reshape(-1, 1)
        hit = self.cells == y
        return np.where(hit.any(axis=1), hit.argmax(axis=1), self.cells.shape[1])

    def prob_of(self, labels: np.ndarray) -> np.ndarray:
        """(N,) the mass of each label (a tail cell's equal share when not a candidate)."""
        col = self.columns(labels)
        share = self.tail / max(self.tail_count, 1)
        full = np.concatenate([self.p, share[:, None]], axis=1)
        return full[np.arange(len(col)), col]

    def top(self) -> tuple[np.ndarray, np.ndarray]:
        """(class, probability) of each row's most likely candidate (the lowest id on ties)."""
        j = self.p.argmax(axis=1)
        rows = np.arange(len(j))
        return self.cells[rows, j], self.p[rows, j]

    def best(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(cells, p) (N, min(m, width)) of the `m` most likely candidates, unordered."""
        m = min(m, self.cells.shape[1])
        idx = np.argpartition(-self.p, m - 1, axis=1)[:, :m]
        return np.take_along_axis(self.cells, idx, 1), np.take_along_axis(self.p, idx, 1)


def _log_count(count: int) -> float:
    return math.log(count) if count > 0 else -math.inf


# --------------------------------------------------------------------------------------------
# Temperature and smoothing
# --------------------------------------------------------------------------------------------


def fit_temperature_top(
    top: TopCells,
    labels: np.ndarray,
    smoothing: float = 0.0,
    objective: TemperatureObjective = "nll",
    max_iter: int = 200,
) -> float:
    """`geoloc.infer.calibration.fit_temperature` on the candidates and the tail term."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if len(top) != y.size:
        raise GeolocError(f"fit_temperature_top: {len(top)} rows but {y.size} labels")
    if y.size == 0:
        return 1.0
    if objective not in ("nll", "top_label"):
        raise GeolocError(f"unknown temperature objective '{objective}'; valid: nll, top_label")
    z, tz = (torch.from_numpy(a) for a in top.log_terms(smoothing))
    col = torch.from_numpy(top.columns(y))
    m = z.shape[1]
    full = torch.cat([z, tz[:, None]], dim=1)  # (N, m + 1)
    offset = torch.zeros(m + 1, dtype=torch.float64)
    offset[m] = _log_count(top.tail_count)  # the tail column stands for that many cells
    mixed_top = top.cells[np.arange(y.size), top.mixed(smoothing)[0].argmax(axis=1)]
    correct_t = torch.from_numpy((mixed_top == y).astype(np.float64))
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        scaled = full / log_t.exp()
        lse = torch.logsumexp(scaled + offset, dim=1)
        if objective == "nll":
            loss = (lse - scaled.gather(1, col[:, None])[:, 0]).mean()
        else:
            conf = (scaled[:, :m].max(dim=1).values - lse).exp().clamp(1e-12, 1 - 1e-12)
            loss = torch.nn.functional.binary_cross_entropy(conf, correct_t)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    return t if math.isfinite(t) and t > 0 else 1.0


def _nll(top: TopCells, y: np.ndarray) -> float:
    return float(-np.log(np.clip(top.prob_of(y), _EPS, None)).mean()) if y.size else math.nan


def top1_ece_top(top: TopCells, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top-1 probability against top-1 correctness (`calibration.top1_ece`)."""
    cell, conf = top.top()
    return expected_calibration_error(conf, cell == np.asarray(labels), n_bins=n_bins)


def fit_scaling_top(
    top: TopCells, labels: np.ndarray, smoothing_grid: tuple[float, ...] = SMOOTHING_GRID
) -> Calibration:
    """`geoloc.infer.calibration.fit_scaling` on the candidates: the smoothing with the lowest
    NLL (variants with a model), then the NLL or top-label temperature of lower ECE."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    smoothing = 0.0
    if top.model_p is not None and y.size:
        best = math.inf
        for lam in smoothing_grid:
            t = fit_temperature_top(top, y, lam, "nll")
            loss = _nll(top.calibrated(Calibration(t, lam)), y)
            if loss < best - 1e-12:
                smoothing, best = lam, loss
    temps = [fit_temperature_top(top, y, smoothing, obj) for obj in ("nll", "top_label")]
    t = min(temps, key=lambda t: top1_ece_top(top.calibrated(Calibration(t, smoothing)), y))
    return Calibration(t, smoothing)


# --------------------------------------------------------------------------------------------
# Conformal sets
# --------------------------------------------------------------------------------------------


def _ranked(top: TopCells) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Candidates and the tail as one weighted row: (order, values, weights) (N, m + 1), most
    likely first; ties keep the class order, the tail after the candidates it ties with."""
    share = top.tail / max(top.tail_count, 1)
    values = np.concatenate([top.p, share[:, None]], axis=1)
    weights = np.ones(values.shape)
    weights[:, -1] = top.tail_count
    order = np.argsort(-values, axis=1, kind="stable")
    return order, np.take_along_axis(values, order, 1), np.take_along_axis(weights, order, 1)


def conformal_scores_top(
    top: TopCells, labels: np.ndarray, method: ConformalMethod, k_reg: int = 0, penalty: float = 0.0
) -> np.ndarray:
    """(N,) `calibration.conformal_scores` of each true label; a label in the tail is the last
    of its tail cells (the most conservative place among equals)."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p_true = top.prob_of(y)
    if method == "lac":
        return 1.0 - p_true
    if method == "aps":  # the mass of every cell at least as likely as the true one
        share = top.tail / max(top.tail_count, 1)
        inside = np.sum(np.where(top.p >= p_true[:, None], top.p, 0.0), axis=1)
        return inside + np.where(share >= p_true, top.tail, 0.0)
    order, values, weights = _ranked(top)
    mass = values * weights
    if method == "raps":
        pos = np.argmax(order == top.columns(y)[:, None], axis=1)  # sorted position
        rows = np.arange(y.size)
        cum = np.cumsum(mass, axis=1)[rows, pos]
        rank = np.cumsum(weights, axis=1)[rows, pos]  # 1-based rank of the last cell there
        return cum + penalty * np.maximum(rank - k_reg, 0)
    raise GeolocError(f"unknown conformal method '{method}'; valid: lac, aps, raps")


def set_members_top(
    top: TopCells, threshold: float, method: ConformalMethod, k_reg: int = 0, penalty: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """(member (N, m) bool, tail cells in the set (N,) int): `calibration.conformal_sets`."""
    n, m = top.p.shape
    count = top.tail_count
    share = top.tail / max(count, 1)
    if method == "lac":
        member = top.p >= 1.0 - threshold
        tail_in = np.where(share >= 1.0 - threshold, count, 0)
    elif method in ("aps", "raps"):
        order, values, weights = _ranked(top)
        mass = values * weights
        cum = np.cumsum(mass, axis=1)
        if method == "aps":  # a tie group shares the mass of the whole group
            ends = tie_group_end(values)
            inside = np.take_along_axis(cum, ends, axis=1) <= threshold
            tail_n = inside * weights
        else:
            first = np.cumsum(weights, axis=1) - weights + 1  # rank of the column's first cell
            tail_n = _raps_count(cum, values, first, weights, threshold, k_reg, penalty)
            inside = tail_n > 0
        full = np.zeros((n, m + 1), dtype=bool)
        np.put_along_axis(full, order, inside, axis=1)
        member = full[:, :m]
        counts = np.zeros((n, m + 1))
        np.put_along_axis(counts, order, tail_n, axis=1)
        tail_in = counts[:, m].astype(np.int64) if count else np.zeros(n, dtype=np.int64)
    else:
        raise GeolocError(f"unknown conformal method '{method}'; valid: lac, aps, raps")
    if n:
        member[np.arange(n), top.p.argmax(axis=1)] = True
    return member, np.asarray(tail_in, dtype=np.int64)


def _raps_count(
    cum: np.ndarray, v: np.ndarray, first: np.ndarray, w: np.ndarray,
    threshold: float, k_reg: int, penalty: float,
) -> np.ndarray:  # fmt: skip
    """How many of a column's `w` equal cells (ranks `first`..) have cum mass + rank penalty
    <= threshold (`cum`: the mass through the whole column). A single cell is compared as
    `calibration.conformal_sets` compares it; the j-th tail cell has cum mass
    `cum - (w - j) v`, rising in j, so its count is solved in closed form."""
    single = (cum + penalty * np.maximum(first - k_reg, 0) <= threshold).astype(np.float64)
    if not math.isfinite(threshold):
        return np.where(w > 1, w if threshold > 0 else 0.0, single * (w > 0))
    before = cum - w * v
    free = np.clip(k_reg - first + 1, 0, w)  # cells at ranks without a penalty

    def solve(room: np.ndarray, slope: np.ndarray) -> np.ndarray:
        with np.errstate(divide="ignore", invalid="ignore"):
            n = np.floor(room / np.where(slope > 0, slope, 1.0))
        return np.where(slope > 0, n, np.where(room >= 0, np.inf, -1.0))

    n1 = np.clip(solve(threshold - before, v), 0, free)
    room2 = threshold - before - penalty * (first - 1 - k_reg)
    n2 = np.clip(solve(room2, v + penalty), free, w)
    many = np.where(n1 < free, n1, n2)
    return np.where(w > 1, many, single * (w > 0))


def set_stats_top(
    top: TopCells, sets: ConformalSets, labels: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(covered (N,) bool, set size (N,) int) of fitted sets on labelled images."""
    member, tail_in = set_members_top(top, sets.threshold, sets.method, sets.k_reg, sets.penalty)
    col = top.columns(labels)
    m = member.shape[1]
    in_cands = col < m
    covered = np.where(
        in_cands, member[np.arange(len(col)), np.minimum(col, m - 1)], tail_in >= top.tail_count
    )
    return covered, member.sum(axis=1) + tail_in


def set_size_top(top: TopCells, sets: ConformalSets) -> np.ndarray:
    """(N,) how many cells each image's set holds (tail cells included)."""
    member, tail_in = set_members_top(top, sets.threshold, sets.method, sets.k_reg, sets.penalty)
    return member.sum(axis=1) + tail_in


def fit_conformal_top(
    top: TopCells, labels: np.ndarray, coverage: float, method: ConformalMethod = "lac",
    k_reg: int = 0, penalty: float = 0.0,
) -> ConformalSets:  # fmt: skip
    """`calibration.fit_conformal` on calibrated candidates."""
    scores = conformal_scores_top(top, labels, method, k_reg, penalty)
    thr = conformal_quantile(scores, coverage)
    return ConformalSets(method, float(coverage), thr, int(scores.size), int(k_reg), float(penalty))


def choose_conformal_top(
    top: TopCells,
    labels: np.ndarray,
    coverage: float,
    methods: tuple[ConformalMethod, ...] = ("lac", "aps", "raps"),
    seed: int = 0,
) -> ConformalSets:
    """`calibration.choose_conformal` on calibrated candidates: the smallest cross-fitted sets."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)

    def mean_size(c: ConformalChoice, a: np.ndarray, b: np.ndarray) -> float:
        thr = fit_conformal_top(top.subset(a), y[a], coverage, *c).threshold
        member, tail_in = set_members_top(top.subset(b), thr, *c)
        return float((member.sum(axis=1) + tail_in).mean())

    best = cross_fitted_choice(conformal_candidates(methods), y.size, mean_size, seed)
    return fit_conformal_top(top, y, coverage, *best)


# --------------------------------------------------------------------------------------------
# Spread for the error radius
# --------------------------------------------------------------------------------------------


def expected_distance_top(
    top: TopCells, lat: np.ndarray, lon: np.ndarray, label_space: LabelSpace, candidates: int
) -> np.ndarray:
    """(N,) `radius.expected_distance_km` over the `candidates` most likely candidates."""
    if len(top) == 0:
        return np.zeros(0)
    cells, w = top.best(candidates)
    w = w / np.clip(w.sum(axis=1, keepdims=True), 1e-300, None)
    d = haversine_km(
        np.asarray(lat, dtype=np.float64)[:, None], np.asarray(lon, dtype=np.float64)[:, None],
        label_space.lat[cells], label_space.lon[cells],
    )  # fmt: skip
    return np.einsum("nm,nm->n", d, w)


def radius_km_top(
    radius: ErrorRadius,
    top: TopCells,
    lat: np.ndarray,
    lon: np.ndarray,
    label_space: LabelSpace,
    nbrs: Neighbours | None = None,
) -> np.ndarray:
    """(N,) `ErrorRadius.radius_km` with the spread over calibrated candidates."""
    return radius.quantile * radius_scale_top(radius, top, lat, lon, label_space, nbrs)


def radius_scale_top(
    radius: ErrorRadius,
    top: TopCells,
    lat: np.ndarray,
    lon: np.ndarray,
    label_space: LabelSpace,
    nbrs: Neighbours | None = None,
) -> np.ndarray:
    """(N,) `ErrorRadius.scale` with the spread over calibrated candidates."""
    if math.isinf(radius.floor_km) or radius.neighbours_k:
        return radius.scale(np.zeros((len(top), 0)), lat, lon, label_space, nbrs)
    spread = expected_distance_top(top, lat, lon, label_space, radius.candidates)
    return spread + radius.floor_km
