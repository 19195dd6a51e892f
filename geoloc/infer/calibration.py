"""Calibrated confidence: temperature scaling and split-conformal prediction sets of cells.

- Temperature scaling (Guo et al. 2017): one scalar T > 0 divides the logits, fitted on val by
  minimising the negative log-likelihood with LBFGS over log T (so T stays positive). It changes
  no argmax, only how much a `prob` of 0.8 can be trusted; ECE before/after is reported.
  Rerank variants whose output is a probability vector (not logits) are scaled through log p,
  which for the base model is the logits up to a per-row constant, i.e. the same thing.
- Conformal sets, split conformal with the LAC score (Sadinle et al. 2019, "least ambiguous
  set-valued classifiers"): nonconformity `1 - p(true cell)`; the threshold is the
  ceil((n+1)(1-alpha))/n empirical quantile of the val scores, and a set holds every cell whose
  probability is at least `1 - threshold`. Under exchangeability of val and test the set contains
  the true cell with probability >= 1 - alpha, and among sets with that guarantee LAC gives the
  smallest expected size — what the issue asks for. APS (adaptive, cumulative-mass score) is
  available too (`method="aps"`): larger sets, but coverage that adapts to how hard an image is,
  and RAPS (Angelopoulos et al. 2021, `method="raps"`): APS plus `penalty` per rank beyond
  `k_reg`, which stops sets from growing through a long tail of tiny probabilities.
  `choose_conformal` picks the method (and RAPS's k_reg/penalty) with the smallest sets on val,
  cross-fitted over two halves so the choice is not judged on the images that set its threshold.
  Sets always contain the top-1 cell, so no image gets an empty answer (coverage only rises).
- `Calibration`: what a rerank variant's scores go through before temperature scaling. A variant
  built from neighbour votes can be nearly one-hot; flooring its zeros and scaling would give
  every such row the same probability and tie all other cells (the confident rows then get the
  largest sets). So the variant's scores are first mixed with the model's own distribution
  (`smoothing`, chosen on val by NLL), which keeps the model's ranking below the votes' choice.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch

from geoloc.errors import GeolocError
from geoloc.geo.metrics import expected_calibration_error

__all__ = [
    "SMOOTHING_GRID",
    "Calibration",
    "ConformalMethod",
    "ConformalSets",
    "TemperatureObjective",
    "apply_temperature",
    "calibration_metrics",
    "choose_conformal",
    "conformal_candidates",
    "tie_group_end",
    "cross_fitted_choice",
    "conformal_quantile",
    "conformal_scores",
    "conformal_sets",
    "conformal_threshold",
    "fit_conformal",
    "fit_scaling",
    "fit_temperature",
    "nll",
    "softmax_rows",
    "log_probs",
    "top1_ece",
]

log = logging.getLogger(__name__)

ConformalMethod = Literal["lac", "aps", "raps"]
TemperatureObjective = Literal["nll", "top_label"]
_EPS = 1e-12


def _as_tensor(x: Any) -> torch.Tensor:
    """A float64 tensor (a copy for numpy input: cached arrays may be read-only)."""
    if isinstance(x, torch.Tensor):
        return x.detach().double()
    return torch.from_numpy(np.array(x, dtype=np.float64))


def softmax_rows(x: np.ndarray, temperature: float) -> np.ndarray:
    """(N, k) softmax(x / temperature) per row, float64 (e.g. neighbour weights from similarity)."""
    z = x.astype(np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def log_probs(probs: np.ndarray) -> np.ndarray:
    """log p with a floor, so probability outputs can be temperature-scaled like logits."""
    return np.log(np.clip(np.asarray(probs, dtype=np.float64), _EPS, None))


# --------------------------------------------------------------------------------------------
# Temperature scaling
# --------------------------------------------------------------------------------------------


def fit_temperature(
    logits: Any, labels: Any, objective: TemperatureObjective = "nll", max_iter: int = 200
) -> float:
    """The T > 0 minimising a loss of softmax(logits / T) on (val) labels.

    `objective="nll"`: the negative log-likelihood of the true class (Guo et al.).
    `objective="top_label"`: the log loss of the top-1 probability as a forecast of top-1
    correctness — what ECE and the reported `prob` are about. The two agree for a plain softmax
    head; they part when scores hold hard zeros (hierarchical masking zeroes whole parents, and
    one true class in a masked parent makes NLL soften everything to reach it).
    LBFGS on log T from T = 1; an empty split returns 1.0 (no change) rather than failing.
    """
    z = _as_tensor(logits)  # (N, K)
    y = torch.from_numpy(np.array(labels, dtype=np.int64)).reshape(-1)
    if z.ndim != 2 or z.shape[0] != y.numel():
        raise GeolocError(
            f"fit_temperature: logits must be (N, K) with N = len(labels); got {tuple(z.shape)} "
            f"and {y.numel()} labels"
        )
    if z.shape[0] == 0:
        return 1.0
    if objective not in ("nll", "top_label"):
        raise GeolocError(f"unknown temperature objective '{objective}'; valid: nll, top_label")
    correct = (z.argmax(dim=1) == y).double()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t], lr=0.5, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        scaled = z / log_t.exp()
        if objective == "nll":
            loss = torch.nn.functional.cross_entropy(scaled, y)
        else:
            conf = scaled.softmax(dim=1).max(dim=1).values.clamp(1e-12, 1 - 1e-12)
            loss = torch.nn.functional.binary_cross_entropy(conf, correct)
        loss.backward()
        return loss

    opt.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t) or t <= 0:
        log.warning("temperature fit diverged (T=%s); keeping T=1", t)
        return 1.0
    return t


def apply_temperature(logits: Any, temperature: float) -> np.ndarray:
    """(N, K) probabilities softmax(logits / T), float64."""
    if temperature <= 0:
        raise GeolocError(f"temperature must be > 0, got {temperature}")
    z = _as_tensor(logits)
    return torch.softmax(z / temperature, dim=1).numpy()


def nll(probs: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true class (probabilities floored at 1e-12)."""
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if y.size == 0:
        return float("nan")
    p_true = np.asarray(probs, dtype=np.float64)[np.arange(y.size), y]
    return float(-np.log(np.clip(p_true, _EPS, None)).mean())


SMOOTHING_GRID = (0.01, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
"""Shares of the model's distribution `fit_scaling` tries (never 0: see `Calibration`)."""


@dataclass(frozen=True)
class Calibration:
    """Scores -> calibrated probabilities: mix in the model's distribution, then a temperature.

    `apply(scores, model)` = softmax(log((1 - smoothing) * scores + smoothing * model) / T).
    With `model` given (variants built from neighbour votes) the mixture has no zeros the model
    does not have, so near one-hot votes keep the model's ranking of every other cell instead
    of a floor that ties them; without it (base, prior) this is plain temperature scaling.
    """

    temperature: float = 1.0
    smoothing: float = 0.0  # share of the model's distribution in the mixture

    def mixed(self, scores: np.ndarray, model: np.ndarray | None = None) -> np.ndarray:
        """(N, K) the mixture before the temperature."""
        if model is None or self.smoothing <= 0.0:
            return np.asarray(scores, dtype=np.float64)
        return (1.0 - self.smoothing) * scores + self.smoothing * model

    def apply(self, scores: np.ndarray, model: np.ndarray | None = None) -> np.ndarray:
        """(N, K) calibrated probabilities."""
        return apply_temperature(log_probs(self.mixed(scores, model)), self.temperature)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Calibration:
        return cls(float(d.get("temperature", 1.0)), float(d.get("smoothing", 0.0)))


def fit_scaling(
    scores: np.ndarray,
    labels: np.ndarray,
    model: np.ndarray | None = None,
    smoothing_grid: tuple[float, ...] = SMOOTHING_GRID,
) -> Calibration:
    """The `Calibration` of a variant's scores, fitted on (val) labels.

    With `model`: the smoothing with the lowest val NLL (each at its NLL temperature). Then the
    temperature is fitted for NLL and for top-label log loss, and the one with the lower val
    ECE is kept (hierarchical masking makes NLL over-soften; see `fit_temperature`).
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    smoothing = 0.0
    if model is not None and y.size:
        best = math.inf
        for lam in smoothing_grid:
            z = log_probs(Calibration(1.0, lam).mixed(scores, model))
            loss = nll(apply_temperature(z, fit_temperature(z, y, "nll")), y)
            if loss < best - 1e-12:
                smoothing, best = lam, loss
    z = log_probs(Calibration(1.0, smoothing).mixed(scores, model))
    temps = [fit_temperature(z, y, obj) for obj in ("nll", "top_label")]
    t = min(temps, key=lambda t: top1_ece(apply_temperature(z, t), y))
    return Calibration(t, smoothing)


def top1_ece(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> float:
    """ECE of the top-1 probability against top-1 correctness (`geoloc.geo.metrics`)."""
    p = np.asarray(probs)
    pred = p.argmax(axis=1)
    return expected_calibration_error(p.max(axis=1), pred == np.asarray(labels), n_bins=n_bins)


# --------------------------------------------------------------------------------------------
# Conformal prediction sets
# --------------------------------------------------------------------------------------------


def _sorted_desc(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, sorted probabilities) per row, most likely first; ties keep the class order."""
    order = np.argsort(-p, axis=1, kind="stable")
    return order, np.take_along_axis(p, order, axis=1)


def _rank_penalty(ranks: np.ndarray, k_reg: int, penalty: float) -> np.ndarray:
    """RAPS's size penalty for 1-based ranks: `penalty` per rank beyond `k_reg`."""
    return penalty * np.maximum(ranks - k_reg, 0)


def conformal_scores(
    probs: np.ndarray,
    labels: np.ndarray,
    method: ConformalMethod,
    k_reg: int = 0,
    penalty: float = 0.0,
) -> np.ndarray:
    """(N,) nonconformity of each true label: higher means the model found it less likely."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    p_true = p[np.arange(len(y)), y]
    if method == "lac":
        return 1.0 - p_true
    if method == "aps":
        # mass of every class at least as likely as the true one (the true one included)
        return np.sum(np.where(p >= p_true[:, None], p, 0.0), axis=1)
    if method == "raps":
        # mass down to the true class's rank in the stable order, plus the rank penalty
        order, sorted_p = _sorted_desc(p)
        rank = np.argmax(order == y[:, None], axis=1)  # 0-based
        cum = np.cumsum(sorted_p, axis=1)[np.arange(len(y)), rank]
        return cum + _rank_penalty(rank + 1, k_reg, penalty)
    raise GeolocError(f"unknown conformal method '{method}'; valid: lac, aps, raps")


def conformal_quantile(scores: np.ndarray, coverage: float) -> float:
    """The split-conformal quantile of calibration scores for coverage 1 - alpha.

    With n calibration scores the level is ceil((n+1) * coverage) / n; above 1 (too few scores
    for the coverage asked) the quantile is +inf. Shared by cell sets and the error radius.
    """
    if not 0.0 < coverage < 1.0:
        raise GeolocError(f"coverage must be in (0, 1), got {coverage}")
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    n = scores.size
    if n == 0:
        return math.inf
    level = math.ceil((n + 1) * coverage) / n
    if level > 1.0:
        log.warning("%d calibration images are too few for coverage %.3f", n, coverage)
        return math.inf
    return float(np.quantile(scores, level, method="higher"))


def conformal_threshold(
    probs: np.ndarray,
    labels: np.ndarray,
    coverage: float,
    method: ConformalMethod = "lac",
    k_reg: int = 0,
    penalty: float = 0.0,
) -> float:
    """The conformal quantile of the calibration scores; +inf (full sets) with too few images."""
    if not 0.0 < coverage < 1.0:
        raise GeolocError(f"coverage must be in (0, 1), got {coverage}")
    return conformal_quantile(conformal_scores(probs, labels, method, k_reg, penalty), coverage)


def conformal_sets(
    probs: np.ndarray,
    threshold: float,
    method: ConformalMethod = "lac",
    k_reg: int = 0,
    penalty: float = 0.0,
) -> np.ndarray:
    """(N, K) bool: which cells are in each image's set (the top-1 cell always is)."""
    p = np.asarray(probs, dtype=np.float64)
    if method == "lac":
        member = p >= 1.0 - threshold
    elif method in ("aps", "raps"):
        # a class is in when its (penalised) cumulative mass <= threshold; one sort per row
        order, sorted_p = _sorted_desc(p)
        cum = np.cumsum(sorted_p, axis=1)
        if method == "aps":
            # ties share the mass of the whole tie group, as in `conformal_scores`
            cum = np.take_along_axis(cum, tie_group_end(sorted_p), axis=1)
        else:
            cum = cum + _rank_penalty(np.arange(1, p.shape[1] + 1)[None, :], k_reg, penalty)
        member = np.zeros_like(p, dtype=bool)
        np.put_along_axis(member, order, cum <= threshold, axis=1)
    else:
        raise GeolocError(f"unknown conformal method '{method}'; valid: lac, aps, raps")
    if p.shape[0]:
        member[np.arange(p.shape[0]), p.argmax(axis=1)] = True
    return member


def tie_group_end(sorted_desc: np.ndarray) -> np.ndarray:
    """(N, K) index of the last position holding the same value, per row of a descending sort."""
    n, k = sorted_desc.shape
    idx = np.broadcast_to(np.arange(k), (n, k)).copy()
    for j in range(k - 2, -1, -1):
        same = sorted_desc[:, j] == sorted_desc[:, j + 1]
        idx[same, j] = idx[same, j + 1]
    return idx


@dataclass(frozen=True)
class ConformalSets:
    """A fitted conformal predictor: what `predict` needs to draw a set for a new image."""

    method: ConformalMethod
    coverage: float  # the target 1 - alpha
    threshold: float  # the calibrated score quantile (inf: full sets)
    n_calibration: int
    k_reg: int = 0  # RAPS: ranks free of the size penalty
    penalty: float = 0.0  # RAPS: score added per rank beyond k_reg

    def sets(self, probs: np.ndarray) -> np.ndarray:
        """(N, K) bool membership."""
        return conformal_sets(probs, self.threshold, self.method, self.k_reg, self.penalty)

    def evaluate(self, probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
        """Empirical `coverage` and mean `set_size` on held-out (test) images."""
        member = self.sets(probs)
        y = np.asarray(labels, dtype=np.int64).reshape(-1)
        if y.size == 0:
            return {"coverage": float("nan"), "set_size": float("nan")}
        return {
            "coverage": float(member[np.arange(y.size), y].mean()),
            "set_size": float(member.sum(axis=1).mean()),
        }

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["threshold"] = None if math.isinf(self.threshold) else self.threshold
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConformalSets:
        thr = d.get("threshold")
        return cls(
            method=d["method"],
            coverage=float(d["coverage"]),
            threshold=math.inf if thr is None else float(thr),
            n_calibration=int(d.get("n_calibration", 0)),
            k_reg=int(d.get("k_reg", 0)),
            penalty=float(d.get("penalty", 0.0)),
        )


def fit_conformal(
    probs: np.ndarray,
    labels: np.ndarray,
    coverage: float,
    method: ConformalMethod = "lac",
    k_reg: int = 0,
    penalty: float = 0.0,
) -> ConformalSets:
    """Calibrate on val: the threshold for sets that hold the true cell `coverage` of the time."""
    thr = conformal_threshold(probs, labels, coverage, method, k_reg, penalty)
    n = int(np.asarray(labels).size)
    return ConformalSets(method, float(coverage), thr, n, int(k_reg), float(penalty))


RAPS_GRID: tuple[tuple[int, float], ...] = tuple(
    (k, lam) for k in (1, 2, 5, 10) for lam in (0.001, 0.01, 0.1)
)
"""(k_reg, penalty) pairs `choose_conformal` tries for RAPS."""


def choose_conformal(
    probs: np.ndarray,
    labels: np.ndarray,
    coverage: float,
    methods: tuple[ConformalMethod, ...] = ("lac", "aps", "raps"),
    seed: int = 0,
) -> ConformalSets:
    """The conformal method with the smallest mean set on val, fitted on all of val.

    Each candidate (LAC, APS, RAPS x `RAPS_GRID`) is judged cross-fitted: the threshold from one
    half of val, the mean set size on the other, both ways. Ties go to the earlier candidate
    (LAC first: it is the simplest). Fewer than 40 images: LAC without a choice.
    """
    y = np.asarray(labels, dtype=np.int64).reshape(-1)

    def mean_size(c: ConformalChoice, a: np.ndarray, b: np.ndarray) -> float:
        thr = conformal_threshold(probs[a], y[a], coverage, *c)
        return float(conformal_sets(probs[b], thr, *c).sum(axis=1).mean())

    best = cross_fitted_choice(conformal_candidates(methods), y.size, mean_size, seed)
    return fit_conformal(probs, y, coverage, *best)


ConformalChoice = tuple[ConformalMethod, int, float]
"""(method, k_reg, penalty) of a conformal set."""


def conformal_candidates(methods: tuple[ConformalMethod, ...]) -> list[ConformalChoice]:
    """Every (method, k_reg, penalty) `choose_conformal` tries: LAC, APS, RAPS x `RAPS_GRID`."""
    candidates: list[ConformalChoice] = []
    for m in methods:
        if m not in ("lac", "aps", "raps"):
            raise GeolocError(f"unknown conformal method '{m}'; valid: lac, aps, raps")
        candidates += [(m, k, lam) for k, lam in RAPS_GRID] if m == "raps" else [(m, 0, 0.0)]
    return candidates


def cross_fitted_choice(
    candidates: list[ConformalChoice],
    n: int,
    mean_size: Callable[[ConformalChoice, np.ndarray, np.ndarray], float],
    seed: int = 0,
) -> ConformalChoice:
    """The candidate with the smallest mean set, fitted on one half of `n` images and measured
    on the other, both ways (`mean_size(candidate, fit_rows, eval_rows)`); ties go to the
    earlier candidate; fewer than 40 images or one candidate: no choice (LAC, or the one)."""
    if n < 40 or len(candidates) == 1:
        return candidates[0] if len(candidates) == 1 else ("lac", 0, 0.0)
    perm = np.random.default_rng(seed).permutation(n)
    halves = (perm[: n // 2], perm[n // 2 :])
    best, best_size = candidates[0], math.inf
    for c in candidates:
        size = sum(mean_size(c, a, b) for a, b in (halves, halves[::-1])) / 2
        if size < best_size - 1e-9:
            best, best_size = c, size
    log.info("conformal sets: %s (k_reg %d, penalty %g) chosen on val, cross-fitted mean size %.1f",
             *best, best_size)  # fmt: skip
    return best


# --------------------------------------------------------------------------------------------
# One call for a variant's table columns
# --------------------------------------------------------------------------------------------


def calibration_metrics(
    val_scores: np.ndarray,
    val_labels: np.ndarray,
    test_scores: np.ndarray,
    test_labels: np.ndarray,
    coverage: float,
    method: ConformalMethod = "lac",
) -> tuple[dict[str, float], float, ConformalSets]:
    """Fit T and the conformal threshold on val, measure on test.

    Scores are logits or log-probabilities (N, K). Returns the test columns (`ece`,
    `ece_calibrated`, `temperature`, `coverage`, `set_size`), T and the fitted sets. Conformal
    sets use the temperature-scaled probabilities (T does not change LAC's ranking but does
    change which probabilities a user sees next to the set).
    """
    t = fit_temperature(val_scores, val_labels)
    test_raw = apply_temperature(test_scores, 1.0)
    test_cal = apply_temperature(test_scores, t)
    sets = fit_conformal(apply_temperature(val_scores, t), val_labels, coverage, method)
    cols = {
        "ece": top1_ece(test_raw, test_labels),
        "ece_calibrated": top1_ece(test_cal, test_labels),
        "temperature": t,
        **sets.evaluate(test_cal, test_labels),
    }
    return cols, t, sets
