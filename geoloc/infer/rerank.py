"""Post-hoc reranking and in-cell refinement: cut the tail (P90/P95 km) without hurting the median.

Four variants, each built on the previous one, turn a model's class probabilities into answers:

- `base`: the model's own probabilities (hierarchy-aware, exactly as training evaluates).
- `prior`: probabilities x (train frequency + 1) ** alpha x a land-fraction prior from
  `h3_features.parquet`, renormalised (`RerankConfig.prior_alpha`, `use_land_prior`).
- `gated`: the train images form a gallery (`geoloc.infer.gallery`); a query's nearest neighbours
  vote for their cells (softmax of similarity / temperature) and the votes are blended into the
  model's distribution. A gate opens only for low top-1 confidence (optionally only where model
  and neighbours disagree); when open, the answer may also be the minimum-expected-distance cell
  among the top candidates (a Bayes decision for km instead of top-1, which is what cuts far-off
  mistakes).
- `gated+refined`: the coordinate is no longer the chosen cell's centroid but the
  similarity-weighted mean (or medoid) of the nearest train neighbours inside that cell, falling
  back to the centroid when no neighbour is in it.
- `min_risk`: the gated distribution after its val calibration (`RerankParams.calibration`,
  which mixes the model back into near one-hot votes), decoded for every image to the cell of
  least expected great-circle distance among its `min_risk_candidates` most likely cells, then
  refined like `gated+refined`. Minimum-expected-distance decoding is the Bayes answer for km
  under a calibrated distribution; whether it beats top-1 is, like everything, decided on val.

This module only scores: every parameter (`RerankParams`) is chosen on val by
`geoloc.infer.tuning`, and `geoloc.infer.evaluation` runs it all on a trained run. `geoloc predict`
applies the same `run_variants` to new images.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd

from geoloc.atomic import write_json
from geoloc.errors import DataError, GeolocError
from geoloc.geo import LabelSpace, haversine_km, unit_vectors
from geoloc.infer.calibration import Calibration, ConformalSets, softmax_rows
from geoloc.infer.candidates import TopCells
from geoloc.infer.gallery import Gallery, IndexKind
from geoloc.infer.ood import OodModel
from geoloc.infer.radius import ErrorRadius

__all__ = [
    "VARIANTS",
    "CellColumns",
    "GateParams",
    "Neighbours",
    "RefineParams",
    "RerankParams",
    "VariantOutput",
    "apply_prior",
    "class_log_prior",
    "gated_rerank",
    "land_fraction_for",
    "min_risk_among",
    "min_risk_cells",
    "neighbour_votes",
    "refine_coordinates",
    "run_variants",
]

log = logging.getLogger(__name__)

VARIANTS: tuple[str, ...] = ("base", "prior", "gated", "gated+refined", "min_risk")
PARAMS_VERSION = 1
LAND_FLOOR = 0.1
"""A cell with no land keeps this share of its probability (the land prior never zeroes a cell)."""


# --------------------------------------------------------------------------------------------
# Prior
# --------------------------------------------------------------------------------------------


def class_log_prior(
    label_space: LabelSpace,
    alpha: float,
    land_fraction: np.ndarray | None = None,
    land_floor: float = LAND_FLOOR,
) -> np.ndarray:
    """(K,) log prior: alpha * log(train count + 1) [+ log(floor + (1 - floor) * land)].

    Counts come from labels.json (the index's record of train frequency); a cell unknown to the
    features table gets a neutral land prior (NaN -> 1).
    """
    lp = alpha * np.log(label_space.train_counts.astype(np.float64) + 1.0)
    if land_fraction is not None:
        land = np.nan_to_num(np.clip(land_fraction, 0.0, 1.0), nan=1.0)
        lp = lp + np.log(land_floor + (1.0 - land_floor) * land)
    return lp - lp.max()


def land_fraction_for(label_space: LabelSpace, features_path: Path) -> np.ndarray | None:
    """(K,) land fraction per class from h3_features.parquet, None when the file is missing."""
    if not features_path.is_file():
        log.warning("no %s: the prior uses train frequency only", features_path)
        return None
    feats = pd.read_parquet(features_path, columns=["cell", "land_fraction"])
    by_cell = dict(zip(feats["cell"].astype(str), feats["land_fraction"], strict=True))
    return np.array([by_cell.get(c, np.nan) for c in label_space.cells], dtype=np.float64)


def apply_prior(probs: np.ndarray, log_prior: np.ndarray) -> np.ndarray:
    """(N, K) probs x exp(log_prior), renormalised per row."""
    scores = probs * np.exp(log_prior)[None, :]
    return scores / np.clip(scores.sum(axis=1, keepdims=True), 1e-300, None)


# --------------------------------------------------------------------------------------------
# Neighbours and votes
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class Neighbours:
    """The k nearest gallery images of each query, best first."""

    sims: np.ndarray  # (N, k) float32 cosine similarity
    labels: np.ndarray  # (N, k) int64 class of each neighbour
    lat: np.ndarray  # (N, k) float64
    lon: np.ndarray  # (N, k)

    @classmethod
    def search(
        cls,
        gallery: Gallery,
        queries: np.ndarray,
        k: int,
        kind: IndexKind = "auto",
        exact: bool = False,
    ) -> Neighbours:
        sims, ids = gallery.search(queries, k, kind=kind, exact=exact)
        return cls(sims, gallery.labels[ids], gallery.lat[ids], gallery.lon[ids])

    @property
    def k(self) -> int:
        return self.sims.shape[1]

    def __len__(self) -> int:
        return self.sims.shape[0]

    def subset(self, rows: np.ndarray) -> Neighbours:
        return Neighbours(self.sims[rows], self.labels[rows], self.lat[rows], self.lon[rows])

    @classmethod
    def concat(cls, parts: list[Neighbours]) -> Neighbours:
        """The neighbours of several query batches, in order."""
        return cls(*(np.concatenate([getattr(p, a) for p in parts])
                     for a in ("sims", "labels", "lat", "lon")))  # fmt: skip


def neighbour_votes(nbrs: Neighbours, num_classes: int, k: int, temperature: float) -> np.ndarray:
    """(N, K) cell votes of the `k` nearest neighbours, weights softmax(sim / temperature).

    A small temperature trusts the closest neighbours, a large one counts heads.
    """
    k = min(k, nbrs.k)
    n = len(nbrs)
    w = softmax_rows(nbrs.sims[:, :k], temperature)  # (N, k)
    flat = (np.arange(n)[:, None] * num_classes + nbrs.labels[:, :k]).reshape(-1)
    votes = np.bincount(flat, weights=w.reshape(-1), minlength=n * num_classes)
    return votes.reshape(n, num_classes)


# --------------------------------------------------------------------------------------------
# Gated rerank
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GateParams:
    """Where and how neighbour votes change the model's answer (chosen on val)."""

    k: int = 20  # neighbours that vote
    vote_temperature: float = 0.05
    weight: float = 0.5  # blend: (1 - w) * model + w * votes
    max_top1: float = 0.0  # the gate opens when the top-1 probability is below this
    require_disagreement: bool = False  # ...and only where the neighbours' top cell differs
    decode: Literal["argmax", "min_risk"] = "argmax"
    candidates: int = 10  # top cells that min-risk decoding chooses among

    @property
    def is_closed(self) -> bool:
        return self.max_top1 <= 0.0


def min_risk_cells(
    probs: np.ndarray, label_space: LabelSpace | CellColumns, candidates: int
) -> np.ndarray:
    """(N,) the cell among each row's top `candidates` with the least expected distance.

    Expected distance to the truth under the (renormalised) top-candidate mass: a hedge between
    two far-apart likely places picks the one closer to the rest of the mass, which is what keeps
    a near-coin-flip from costing thousands of km.
    """
    m = min(candidates, probs.shape[1])
    top = np.argpartition(-probs, m - 1, axis=1)[:, :m]  # (N, m), unordered
    return min_risk_among(top, np.take_along_axis(probs, top, axis=1), label_space)


def min_risk_among(
    cells: np.ndarray, p: np.ndarray, label_space: LabelSpace | CellColumns
) -> np.ndarray:
    """(N,) the cell of `cells` (N, m) with the least expected distance under the mass `p`
    (renormalised per row). Only cells with mass compete: a zero-mass cell among the top m is
    there by an arbitrary tie (e.g. weight-1 votes leave all but the voted cells at 0), so it
    never wins; -inf marks a padding slot. A row without mass keeps its first cell."""
    p = np.where(np.isfinite(p), p, 0.0)
    pad = p <= 0.0
    pad[pad.all(axis=1)] = False
    p = p / np.clip(p.sum(axis=1, keepdims=True), 1e-300, None)
    lat, lon = label_space.lat[cells], label_space.lon[cells]  # (N, m)
    d = haversine_km(lat[:, :, None], lon[:, :, None], lat[:, None, :], lon[:, None, :])  # (N,m,m)
    risk = np.einsum("nij,nj->ni", d, p)
    risk[pad] = np.inf
    return cells[np.arange(len(cells)), risk.argmin(axis=1)]


@dataclass(eq=False)
class VariantOutput:
    """One variant's answer for every query."""

    scores: np.ndarray  # (N, K) probabilities
    pred: np.ndarray  # (N,) chosen class
    lat: np.ndarray  # (N,) predicted coordinate
    lon: np.ndarray  # (N,)
    gate: np.ndarray  # (N,) bool: the rerank changed this row's inputs
    refined: np.ndarray | None = None  # (N,) bool: coordinate from in-cell neighbours
    model: np.ndarray | None = None  # (N, K) the model's distribution the votes were blended into
    nbrs: Neighbours | None = None  # the gallery neighbours the votes came from
    cols: np.ndarray | None = None  # (U,) class of each column of `scores`/`model`; None: all K

    def top1(self) -> tuple[np.ndarray, np.ndarray]:
        """(N,) the largest score and its class (the lower class id on a tie)."""
        col = self.scores.argmax(axis=1)
        conf = self.scores[np.arange(len(col)), col]
        return conf, (col if self.cols is None else self.cols[col])

    def candidates(self, m: int, num_classes: int) -> TopCells:
        """The `m` most likely cells of `scores` (+ `model`) and a tail (`TopCells.from_dense`)."""
        return TopCells.from_dense(self.scores, self.model, m, self.cols, num_classes)


@dataclass(frozen=True)
class CellColumns:
    """The classes a block's score columns stand for (`ids`, ascending), with their centroids:
    what the variant chain reads of a `LabelSpace` when it works on those columns only."""

    ids: np.ndarray  # (U,) int64 class ids
    lat: np.ndarray  # (U,)
    lon: np.ndarray  # (U,)

    @classmethod
    def of(cls, label_space: LabelSpace, ids: np.ndarray) -> CellColumns:
        ids = np.asarray(ids, dtype=np.int64)
        return cls(ids, label_space.lat[ids], label_space.lon[ids])

    @property
    def num_classes(self) -> int:
        return len(self.ids)

    def local(self, nbrs: Neighbours) -> Neighbours:
        """`nbrs` with each label as its column (every label must be among `ids`)."""
        col = np.searchsorted(self.ids, nbrs.labels)
        if col.size and (col.max() >= len(self.ids) or (self.ids[col] != nbrs.labels).any()):
            raise GeolocError("a neighbour's class has no column among the block's classes")
        return Neighbours(nbrs.sims, col, nbrs.lat, nbrs.lon)


def gated_rerank(
    probs: np.ndarray,
    votes: np.ndarray,
    params: GateParams,
    label_space: LabelSpace | CellColumns,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Blend votes into the model's distribution where the gate opens.

    Returns (scores (N, K), predicted class (N,), gate open (N,)).
    """
    top1 = probs.max(axis=1)
    model_top = probs.argmax(axis=1)
    gate = top1 < params.max_top1
    if params.require_disagreement:
        gate &= votes.argmax(axis=1) != model_top
    scores = probs.copy()
    w = params.weight
    scores[gate] = (1.0 - w) * probs[gate] + w * votes[gate]
    pred = scores.argmax(axis=1)
    if params.decode == "min_risk" and gate.any():
        pred[gate] = min_risk_cells(scores[gate], label_space, params.candidates)
    return scores, pred, gate


# --------------------------------------------------------------------------------------------
# In-cell refinement
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RefineParams:
    """How the coordinate inside the chosen cell is estimated (chosen on val)."""

    method: Literal["none", "mean", "medoid"] = "mean"
    k: int = 20  # nearest neighbours considered (those in the chosen cell are used)
    temperature: float = 0.05  # softmax(sim / temperature) weights


def refine_coordinates(
    pred: np.ndarray, nbrs: Neighbours, label_space: LabelSpace, params: RefineParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lat, lon, refined) per query: an estimate from its neighbours inside the predicted cell.

    `mean`: similarity-weighted mean on the sphere (mean of unit vectors); `medoid`: the in-cell
    neighbour with the least weighted distance to the others (stays on a real photo location
    when the cell's images form separate clusters). Rows without an in-cell neighbour, and
    `method="none"`, keep the cell centroid.
    """
    lat = label_space.lat[pred].astype(np.float64)
    lon = label_space.lon[pred].astype(np.float64)
    if params.method == "none" or len(pred) == 0:
        return lat, lon, np.zeros(len(pred), dtype=bool)
    k = min(params.k, nbrs.k)
    inside = nbrs.labels[:, :k] == pred[:, None]  # (N, k)
    w = softmax_rows(nbrs.sims[:, :k], params.temperature) * inside
    refined = inside.any(axis=1)
    rows = np.flatnonzero(refined)
    if rows.size == 0:
        return lat, lon, refined
    w = w[rows] / w[rows].sum(axis=1, keepdims=True)  # (R, k)
    nlat, nlon = nbrs.lat[rows, :k], nbrs.lon[rows, :k]
    if params.method == "mean":
        v = np.einsum("rk,rkc->rc", w, unit_vectors(nlat, nlon))
        lat[rows] = np.degrees(np.arctan2(v[:, 2], np.hypot(v[:, 0], v[:, 1])))
        lon[rows] = np.degrees(np.arctan2(v[:, 1], v[:, 0]))
    elif params.method == "medoid":
        d = haversine_km(nlat[:, :, None], nlon[:, :, None], nlat[:, None, :], nlon[:, None, :])
        cost = np.einsum("rij,rj->ri", d, w)
        cost[w == 0] = np.inf  # only in-cell neighbours can be the medoid
        best = cost.argmin(axis=1)
        lat[rows] = nlat[np.arange(rows.size), best]
        lon[rows] = nlon[np.arange(rows.size), best]
    else:
        raise GeolocError(f"unknown refinement method '{params.method}'; valid: none, mean, medoid")
    return lat, lon, refined


# --------------------------------------------------------------------------------------------
# Parameters and the variant chain
# --------------------------------------------------------------------------------------------


@dataclass
class RerankParams:
    """Everything rerank chose on val; `geoloc predict` applies it to new images unchanged."""

    log_prior: np.ndarray  # (K,)
    gated_on_prior: bool = False  # gated builds on the prior variant (it helped on val)
    gate: GateParams = field(default_factory=GateParams)
    refine: RefineParams = field(default_factory=RefineParams)
    calibration: dict[str, Calibration] = field(default_factory=dict)  # per variant
    conformal: dict[str, ConformalSets] = field(default_factory=dict)  # per variant
    radius: dict[str, ErrorRadius] = field(default_factory=dict)  # per variant
    min_risk_candidates: int = 10  # cells the min_risk variant decodes among
    calibration_cells: int = 0  # candidate cells calibration keeps per image (0: all classes)
    best_variant: str = "base"
    hier_topk_parents: int = 0  # factorised head: parents kept by every variant but `base`
    model_topk_parents: int | None = None
    """The model's own k (`train.hier_topk_parents`, as training evaluated it): `base` keeps it,
    so "base" is the model alone, the same figure as summary.json's `test`. None: files from
    before it, where `base` used `hier_topk_parents` too."""
    neighbours: int = 50  # neighbours searched per query (max of gate and refine k)
    index: str = "auto"
    checkpoint_sha256: str = ""
    ood: OodModel | None = None  # OOD score, widened radius and decoding (`geoloc.infer.ood`)

    @property
    def temperatures(self) -> dict[str, float]:
        """Each variant's temperature (part of its `calibration`)."""
        return {k: c.temperature for k, c in self.calibration.items()}

    @property
    def base_topk_parents(self) -> int:
        """The parents the `base` variant keeps (see `model_topk_parents`)."""
        if self.model_topk_parents is None:
            return self.hier_topk_parents
        return self.model_topk_parents

    def calibrated(self, name: str, v: VariantOutput) -> np.ndarray:
        """(N, K) the calibrated probabilities of variant `name` (raw scores when not fitted)."""
        return self.calibration.get(name, Calibration()).apply(v.scores, v.model)

    def calibrated_top(self, name: str, v: VariantOutput) -> TopCells:
        """The calibrated distribution of variant `name` on its `calibration_cells` candidates
        and a tail term (`geoloc.infer.candidates`): what sets, radii and min-risk read."""
        top = v.candidates(self.calibration_cells, len(self.log_prior))
        return top.calibrated(self.calibration.get(name, Calibration()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PARAMS_VERSION,
            "best_variant": self.best_variant,
            "gated_on_prior": bool(self.gated_on_prior),
            "gate": asdict(self.gate),
            "refine": asdict(self.refine),
            "temperatures": self.temperatures,
            "calibration": {k: v.to_dict() for k, v in self.calibration.items()},
            "conformal": {k: v.to_dict() for k, v in self.conformal.items()},
            "radius": {k: v.to_dict() for k, v in self.radius.items()},
            "min_risk_candidates": self.min_risk_candidates,
            "calibration_cells": self.calibration_cells,
            "hier_topk_parents": self.hier_topk_parents,
            "model_topk_parents": self.model_topk_parents,
            "neighbours": self.neighbours,
            "index": self.index,
            "checkpoint_sha256": self.checkpoint_sha256,
            "log_prior": [float(x) for x in self.log_prior],
            "ood": None if self.ood is None else self.ood.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RerankParams:
        if d.get("version") != PARAMS_VERSION:
            raise DataError(
                f"rerank params version {d.get('version')!r}; this geoloc reads {PARAMS_VERSION}"
            )
        # files written before smoothing and radii: plain temperatures, no radius
        calibration = d.get("calibration") or {
            k: {"temperature": v} for k, v in d["temperatures"].items()
        }
        return cls(
            log_prior=np.asarray(d["log_prior"], dtype=np.float64),
            gated_on_prior=bool(d["gated_on_prior"]),
            gate=GateParams(**d["gate"]),
            refine=RefineParams(**d["refine"]),
            calibration={k: Calibration.from_dict(v) for k, v in calibration.items()},
            conformal={k: ConformalSets.from_dict(v) for k, v in d["conformal"].items()},
            radius={k: ErrorRadius.from_dict(v) for k, v in (d.get("radius") or {}).items()},
            min_risk_candidates=int(d.get("min_risk_candidates", 10)),
            calibration_cells=int(d.get("calibration_cells", 0)),
            best_variant=str(d["best_variant"]),
            hier_topk_parents=int(d.get("hier_topk_parents", 0)),
            model_topk_parents=(
                None if d.get("model_topk_parents") is None else int(d["model_topk_parents"])
            ),  # fmt: skip
            neighbours=int(d.get("neighbours", 50)),
            index=str(d.get("index", "auto")),
            checkpoint_sha256=str(d.get("checkpoint_sha256", "")),
            ood=OodModel.from_dict(d.get("ood")),
        )

    def save(self, path: Path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: Path) -> RerankParams:
        if not Path(path).is_file():
            raise DataError(f"rerank params '{path}' do not exist (run `geoloc rerank` first)")
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise DataError(f"rerank params '{path}' could not be read: {exc}") from exc


def run_variants(
    probs: np.ndarray,
    nbrs: Neighbours,
    label_space: LabelSpace,
    params: RerankParams,
    model_probs: np.ndarray | None = None,
    cols: np.ndarray | None = None,
) -> dict[str, VariantOutput]:
    """base -> prior -> gated -> gated+refined -> min_risk for a batch of queries (evaluation
    and predict). `model_probs`: the model's own scores for `base` when they differ from
    `probs` (a factorised head whose k rerank chose on val, see `RerankParams`).

    `cols`: the classes the columns of `probs` stand for (ascending; every class with mass and
    every neighbour's class among them), when the block is scored on those only
    (`geoloc.infer.outputs.scored_columns`): the same answers as on all K columns, since every
    other class has probability 0 and gets no vote, at a cost that no longer grows with K."""
    n = probs.shape[0]
    closed = np.zeros(n, dtype=bool)
    space = label_space if cols is None else CellColumns.of(label_space, cols)
    local = nbrs if cols is None else space.local(nbrs)  # type: ignore[union-attr]
    ids = (lambda c: c) if cols is None else (lambda c: cols[c])  # noqa: E731

    def output(scores: np.ndarray, pred: np.ndarray, gate: np.ndarray, **kw: Any) -> VariantOutput:
        return VariantOutput(scores, ids(pred), space.lat[pred], space.lon[pred], gate,
                             cols=cols, **kw)  # fmt: skip

    def centroid_output(scores: np.ndarray, gate: np.ndarray) -> VariantOutput:
        return output(scores, scores.argmax(axis=1), gate)

    out = {"base": centroid_output(probs if model_probs is None else model_probs, closed)}
    log_prior = params.log_prior if cols is None else params.log_prior[cols]
    out["prior"] = centroid_output(apply_prior(probs, log_prior), closed)
    # the gate reads `probs` (the k chosen on val, as the gate search did), never `model_probs`
    chosen = out["base"] if model_probs is None else centroid_output(probs, closed)
    source = out["prior"] if params.gated_on_prior else chosen
    g = params.gate
    votes = neighbour_votes(local, space.num_classes, g.k, g.vote_temperature)
    scores, pred, gate = gated_rerank(source.scores, votes, g, space)
    model = source.scores
    out["gated"] = output(scores, pred, gate, model=model, nbrs=nbrs)
    pred = out["gated"].pred  # class ids from here on
    lat, lon, refined = refine_coordinates(pred, nbrs, label_space, params.refine)
    out["gated+refined"] = VariantOutput(scores, pred, lat, lon, gate, refined, model, nbrs, cols)
    cells, mass = params.calibrated_top("gated", out["gated"]).best(params.min_risk_candidates)
    risk_pred = min_risk_among(cells, mass, label_space)
    lat, lon, refined = refine_coordinates(risk_pred, nbrs, label_space, params.refine)
    out["min_risk"] = VariantOutput(scores, risk_pred, lat, lon, gate, refined, model, nbrs, cols)
    return out
