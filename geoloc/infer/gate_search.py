"""The val search over gates, vectorised on each image's candidate cells.

The dense search blended (N, K) votes into (N, K) probabilities for every one of the ~960 grid
settings: cost settings x val images x classes, and one (N, K) vote matrix per (k, temperature)
held at once (8-11 GB at 10^4 val images x 7,600 classes). Here nothing is (N, K):

- A gate's answer for an image can only be one of a few cells: the blend
  `(1 - w) * model + w * votes` is largest either at the model's top cell or at a cell a
  neighbour voted for (a cell without votes never beats the model's top cell), and its
  `candidates` best cells lie among the model's best `candidates` and the voted cells. So each
  image keeps those cells only (`candidates` + k of them), sorted by class id so that argmax ties
  go to the lowest id, exactly like the dense argmax.
- The answer of an open gate does not depend on the threshold or the disagreement switch: it is
  computed once per (k, temperature, weight, decoding), as an error in km per image, and every
  threshold is then one `np.where` over N errors and three percentiles.

The result (`GateParams`, objective) is the one the dense grid finds, in the grid's order and
with its tie rule (lower mean error); `tests/test_gate_search.py` checks that.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from geoloc.geo import LabelSpace, haversine_km
from geoloc.infer.calibration import softmax_rows
from geoloc.infer.rerank import GateParams, Neighbours, min_risk_among
from geoloc.progress import track

__all__ = [
    "BLOCK_VALUES",
    "CHUNK_ROWS",
    "GateGrid",
    "GateInputs",
    "block_rows",
    "gate_answers",
    "search_gate",
]

CHUNK_ROWS = 4096
"""Images per block when candidate votes are gathered ((rows, cells, k) comparisons)."""
BLOCK_VALUES = 4_000_000
"""Values per (images, classes) block: 32 MB in float64, so a few copies stay far below 1 GB."""


def block_rows(num_classes: int) -> int:
    """Images per block of (images, classes) probabilities: `BLOCK_VALUES` / classes, in
    [64, `CHUNK_ROWS`]."""
    return int(min(CHUNK_ROWS, max(64, BLOCK_VALUES // max(num_classes, 1))))

Objective = Callable[[dict[str, float]], float]


@dataclass(frozen=True)
class GateGrid:
    """The val grid search over gate/blend/decoding parameters."""

    k: Sequence[int] = (5, 10, 20, 50)
    vote_temperature: Sequence[float] = (0.02, 0.1, 1.0)
    weight: Sequence[float] = (0.25, 0.5, 0.75, 1.0)
    max_top1: Sequence[float] = (0.2, 0.35, 0.5, 0.7, 1.01)
    require_disagreement: Sequence[bool] = (False, True)
    decode: Sequence[str] = ("argmax", "min_risk")
    candidates: int = 10


def _metrics(errors: np.ndarray) -> dict[str, float]:
    median, p90, p95 = np.percentile(errors, [50, 90, 95])
    return {"median_km": median, "p90_km": p90, "p95_km": p95, "mean_km": float(errors.mean())}


def _candidate_votes(cells: np.ndarray, nbrs: Neighbours, k: int, temp: float) -> np.ndarray:
    """(N, C) vote mass of each candidate cell from the `k` nearest neighbours."""
    w = softmax_rows(nbrs.sims[:, :k], temp)
    out = np.empty(cells.shape, dtype=np.float64)
    for s in range(0, len(cells), CHUNK_ROWS):
        e = s + CHUNK_ROWS
        same = cells[s:e, :, None] == nbrs.labels[s:e, None, :k]  # (B, C, k)
        out[s:e] = np.einsum("bck,bk->bc", same, w[s:e])
    return out


def _open_cells(
    blend: np.ndarray, cells: np.ndarray, dup: np.ndarray, label_space: LabelSpace, candidates: int
) -> dict[str, np.ndarray]:
    """Per image, an open gate's answer under argmax and under min-risk decoding."""
    arg = cells[np.arange(len(cells)), blend.argmax(axis=1)]
    ranked = np.where(dup, -np.inf, blend)
    m = min(candidates, label_space.num_classes, cells.shape[1])
    top = np.argpartition(-ranked, m - 1, axis=1)[:, :m]
    p = np.take_along_axis(ranked, top, axis=1)
    risk = min_risk_among(np.take_along_axis(cells, top, axis=1), p, label_space)
    return {"argmax": arg, "min_risk": risk}


@dataclass(eq=False)
class GateInputs:
    """What the search reads of the model's distribution: per image its top cell and
    probability, and its candidate cells (model top `candidates` + neighbour labels, sorted by
    class id; `dup` marks repeats) with their probabilities."""

    top1: np.ndarray  # (N,)
    model_top: np.ndarray  # (N,)
    cells: np.ndarray  # (N, C) int64
    p_cells: np.ndarray  # (N, C) float64
    dup: np.ndarray  # (N, C) bool

    @classmethod
    def gather(
        cls, prob_chunks: Iterable[np.ndarray], nbr_labels: np.ndarray, candidates: int
    ) -> GateInputs:
        """From (rows, K) probability blocks in row order: no (N, K) array is kept."""
        parts: list[tuple[np.ndarray, ...]] = []
        start = 0
        for probs in prob_chunks:
            rows = np.arange(len(probs))
            top = probs.argmax(axis=1)
            m = min(candidates, probs.shape[1])
            model_cells = np.argpartition(-probs, m - 1, axis=1)[:, :m]
            labels = nbr_labels[start : start + len(probs)]
            cells = np.sort(np.concatenate([model_cells, labels], axis=1), axis=1)
            parts.append((probs[rows, top], top, cells, np.take_along_axis(probs, cells, axis=1)))
            start += len(probs)
        top1, top, cells, p_cells = (np.concatenate(a) for a in zip(*parts, strict=True))
        dup = np.zeros(cells.shape, dtype=bool)
        dup[:, 1:] = cells[:, 1:] == cells[:, :-1]
        return cls(top1, top, cells, p_cells, dup)


def search_gate(
    inputs: GateInputs,
    nbrs: Neighbours,
    true_lat: np.ndarray,
    true_lon: np.ndarray,
    label_space: LabelSpace,
    grid: GateGrid,
    objective: Objective,
    progress: bool = True,
) -> tuple[GateParams, float]:
    """The gate of `grid` with the lowest `objective`; the closed gate when none beats it.
    Ties go to the lower mean error, the earlier setting after that. `inputs` must have been
    gathered with `grid.candidates` and at least `max(grid.k)` neighbour labels."""
    g, x, ls = grid, inputs, label_space
    rows = np.arange(len(x.top1))
    err_closed = haversine_km(true_lat, true_lon, ls.lat[x.model_top], ls.lon[x.model_top])
    best = GateParams(max_top1=0.0, candidates=g.candidates)
    best_obj, best_mean = objective(_metrics(err_closed)), math.inf
    ks = [k for k in g.k if k <= nbrs.k]
    if not ks or len(rows) == 0:
        return best, best_obj
    outer = list(itertools.product(ks, g.vote_temperature))
    for k, temp in track(outer, desc="gate grid (val)", unit="votes", bars=progress):
        votes = _candidate_votes(x.cells, nbrs, k, temp)
        disagree = x.cells[rows, votes.argmax(axis=1)] != x.model_top
        for w in g.weight:
            blend = (1.0 - w) * x.p_cells + w * votes
            opened = {
                decode: haversine_km(true_lat, true_lon, ls.lat[c], ls.lon[c])
                for decode, c in _open_cells(blend, x.cells, x.dup, ls, g.candidates).items()
            }
            for thr, need_disagree, decode in itertools.product(
                g.max_top1, g.require_disagreement, g.decode
            ):
                gate = x.top1 < thr
                if need_disagree:
                    gate &= disagree
                met = _metrics(np.where(gate, opened[decode], err_closed))
                obj = objective(met)
                if obj < best_obj - 1e-12 or (
                    abs(obj - best_obj) <= 1e-12 and met["mean_km"] < best_mean
                ):
                    best = GateParams(k, temp, w, thr, need_disagree, decode, g.candidates)  # type: ignore[arg-type]
                    best_obj, best_mean = obj, met["mean_km"]
    return best, best_obj


def gate_answers(
    inputs: GateInputs, nbrs: Neighbours, params: GateParams, label_space: LabelSpace
) -> tuple[np.ndarray, np.ndarray]:
    """(pred, gate open) per image under one gate: what `gated_rerank` answers, from the
    candidate cells only."""
    x = inputs
    rows = np.arange(len(x.top1))
    gate = x.top1 < params.max_top1
    if params.is_closed or len(rows) == 0:
        return x.model_top.copy(), gate
    votes = _candidate_votes(x.cells, nbrs, params.k, params.vote_temperature)
    if params.require_disagreement:
        gate &= x.cells[rows, votes.argmax(axis=1)] != x.model_top
    blend = (1.0 - params.weight) * x.p_cells + params.weight * votes
    opened = _open_cells(blend, x.cells, x.dup, label_space, params.candidates)[params.decode]
    return np.where(gate, opened, x.model_top), gate
