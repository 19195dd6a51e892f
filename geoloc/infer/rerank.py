"""Post-hoc reranking and in-cell refinement: cut the tail (P90/P95 km) without hurting the median.

One pass of the run's best model over train, val and test gives embeddings and class
probabilities (cached under `artifacts/data/outputs_<split>.npz`). Then four variants, each built
on the previous one, are evaluated:

- `base`: the model's own probabilities (hierarchy-aware, exactly as training evaluates).
- `prior`: probabilities x (train frequency + 1) ** alpha x a land-fraction prior from
  `h3_features.parquet`, renormalised (`RerankConfig.prior_alpha`, `use_land_prior`).
- `gated`: the train images form a gallery (`geoloc.infer.gallery`); a query's nearest neighbours vote
  for their cells (softmax of similarity / temperature) and the votes are blended into the
  model's distribution. A gate opens only for low top-1 confidence (optionally only where model
  and neighbours disagree); when open, the answer may also be the minimum-expected-distance cell
  among the top candidates (a Bayes decision for km instead of top-1, which is what cuts far-off
  mistakes). Gate, blend and decoding are chosen on VAL by grid search: minimise
  P90/P90_base + P95/P95_base subject to median <= 1.02 x base median. Test never tunes anything.
- `gated+refined`: the coordinate is no longer the chosen cell's centroid but the
  similarity-weighted mean (or medoid) of the nearest train neighbours inside that cell, falling
  back to the centroid when no neighbour is in it. Method and k are chosen on val the same way.

Each variant's probabilities get a temperature and a conformal threshold fitted on val
(`geoloc.infer.calibration`). The tables go to `artifacts/tables/rerank_eval.csv` (test) and
`rerank_eval_val.csv`; every chosen parameter goes to `artifacts/data/rerank_params.json`, which
`geoloc predict` reuses; the best variant on val goes to `summary.json` with its test numbers.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from geoloc.atomic import atomic_path, write_json, write_text
from geoloc.config import RerankConfig
from geoloc.errors import DataError, GeolocError
from geoloc.geo import LabelSpace, haversine_km
from geoloc.geo.metrics import geo_metrics_from_errors
from geoloc.infer.calibration import (
    ConformalSets,
    apply_temperature,
    fit_conformal,
    fit_temperature,
    log_probs,
    top1_ece,
)
from geoloc.infer.gallery import Gallery, IndexKind, l2_normalize
from geoloc.runs.layout import RunPaths

__all__ = [
    "VARIANTS",
    "GateParams",
    "Neighbours",
    "RefineParams",
    "RerankParams",
    "RerankResult",
    "SplitOutputs",
    "apply_prior",
    "base_probs",
    "choose_gate",
    "choose_refinement",
    "class_log_prior",
    "gated_rerank",
    "neighbour_votes",
    "refine_coordinates",
    "rerank_run",
    "run_variants",
]

log = logging.getLogger(__name__)

VARIANTS: tuple[str, ...] = ("base", "prior", "gated", "gated+refined")
MEDIAN_SLACK = 1.02
"""A tuned variant may make the val median at most 2% worse than base."""
OUTPUTS_VERSION = 1
PARAMS_VERSION = 1
LAND_FLOOR = 0.1
"""A cell with no land keeps this share of its probability (the land prior never zeroes a cell)."""
TABLE_COLUMNS = (
    "variant", "median_km", "p90_km", "p95_km", "acc_1km", "acc_25km", "acc_200km", "acc_750km",
    "acc_2500km", "geoscore", "top1", "gate_share", "ece", "ece_calibrated", "temperature",
    "coverage", "set_size",
)  # fmt: skip
"""rerank_eval.csv columns, in order."""


# --------------------------------------------------------------------------------------------
# Model outputs per split (cached)
# --------------------------------------------------------------------------------------------


@dataclass(eq=False)
class SplitOutputs:
    """What one pass of the model over a split gives, row-aligned with the split table."""

    logits: np.ndarray  # (N, K) float32
    parent_logits: np.ndarray | None  # (N, P) float32, None without a parent head
    embeddings: np.ndarray  # (N, D) float32, L2-normalised
    labels: np.ndarray  # (N,) int64 true class
    lat: np.ndarray  # (N,) float64 true coordinates
    lon: np.ndarray  # (N,)
    image_ids: np.ndarray  # (N,) str

    def __post_init__(self) -> None:
        # fixed-width unicode, not object: the cache is read back with allow_pickle=False
        self.image_ids = np.asarray(self.image_ids, dtype=str)

    def __len__(self) -> int:
        return self.logits.shape[0]

    def to_gallery(self) -> Gallery:
        return Gallery(self.embeddings, self.labels, self.lat, self.lon, self.image_ids)

    def save(self, path: Path, key: str) -> None:
        arrays = {k: v for k, v in asdict_arrays(self).items() if v is not None}
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, version=np.int64(OUTPUTS_VERSION), key=np.str_(key), **arrays)

    @classmethod
    def load(cls, path: Path, key: str) -> SplitOutputs | None:
        """The cached outputs, or None when missing, stale (other checkpoint/index) or broken."""
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                if int(z["version"]) != OUTPUTS_VERSION or str(z["key"]) != key:
                    return None
                return cls(
                    logits=z["logits"],
                    parent_logits=z.get("parent_logits"),
                    embeddings=z["embeddings"],
                    labels=z["labels"],
                    lat=z["lat"],
                    lon=z["lon"],
                    image_ids=z["image_ids"],
                )
        except (OSError, KeyError, ValueError) as exc:
            log.warning("ignoring unreadable cache %s: %s", path, exc)
            return None


def asdict_arrays(out: SplitOutputs) -> dict[str, np.ndarray | None]:
    return {
        "logits": out.logits,
        "parent_logits": out.parent_logits,
        "embeddings": out.embeddings,
        "labels": out.labels,
        "lat": out.lat,
        "lon": out.lon,
        "image_ids": out.image_ids,
    }


@torch.no_grad()
def compute_outputs(
    model: torch.nn.Module,
    dataset: Any,
    device: torch.device,
    batch_size: int = 128,
    num_workers: int = 0,
    progress: bool = True,
) -> SplitOutputs:
    """One eval-mode pass over a `GeoDataset` (built with the eval transform)."""
    from geoloc.data.dataset import make_loader

    model.eval()
    loader = make_loader(dataset, batch_size, shuffle=False, seed=0, num_workers=num_workers)
    logits, parents, embs = [], [], []
    for images, _, _, _ in tqdm(
        loader, desc=f"embed {dataset.split}", unit="batch", leave=False, disable=not progress
    ):
        out = model(images.to(device))
        logits.append(out["logits"].float().cpu())
        embs.append(out["embedding"].float().cpu())
        if "parent_logits" in out:
            parents.append(out["parent_logits"].float().cpu())
    table = dataset.table
    return SplitOutputs(
        logits=torch.cat(logits).numpy(),
        parent_logits=torch.cat(parents).numpy() if parents else None,
        embeddings=l2_normalize(torch.cat(embs)),
        labels=np.asarray(dataset.labels, dtype=np.int64),
        lat=table["lat"].to_numpy(dtype=np.float64),
        lon=table["lon"].to_numpy(dtype=np.float64),
        image_ids=table["image_id"].astype(str).to_numpy(),
    )


def file_digest(path: Path) -> str:
    """sha256 of a file: the cache key that ties cached outputs to one checkpoint."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def base_probs(
    logits: np.ndarray,
    parent_logits: np.ndarray | None,
    label_space: LabelSpace,
    hier_topk_parents: int,
) -> np.ndarray:
    """(N, K) class probabilities exactly as training evaluates them (`class_scores`)."""
    from geoloc.model.scores import class_scores

    tensors = {"logits": torch.from_numpy(np.asarray(logits, dtype=np.float32))}
    if parent_logits is not None:
        tensors["parent_logits"] = torch.from_numpy(np.asarray(parent_logits, dtype=np.float32))
    return class_scores(tensors, label_space.parent_of, hier_topk_parents).double().numpy()


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
        cls, gallery: Gallery, queries: np.ndarray, k: int, kind: IndexKind = "auto"
    ) -> Neighbours:
        sims, ids = gallery.search(queries, k, kind=kind)
        return cls(sims, gallery.labels[ids], gallery.lat[ids], gallery.lon[ids])

    @property
    def k(self) -> int:
        return self.sims.shape[1]

    def __len__(self) -> int:
        return self.sims.shape[0]

    def subset(self, rows: np.ndarray) -> Neighbours:
        return Neighbours(self.sims[rows], self.labels[rows], self.lat[rows], self.lon[rows])


def _softmax_rows(x: np.ndarray, temperature: float) -> np.ndarray:
    z = x.astype(np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def neighbour_votes(nbrs: Neighbours, num_classes: int, k: int, temperature: float) -> np.ndarray:
    """(N, K) cell votes of the `k` nearest neighbours, weights softmax(sim / temperature).

    A small temperature trusts the closest neighbours, a large one counts heads.
    """
    k = min(k, nbrs.k)
    n = len(nbrs)
    w = _softmax_rows(nbrs.sims[:, :k], temperature)  # (N, k)
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


def min_risk_cells(probs: np.ndarray, label_space: LabelSpace, candidates: int) -> np.ndarray:
    """(N,) the cell among each row's top `candidates` with the least expected distance.

    Expected distance to the truth under the (renormalised) top-candidate mass: a hedge between
    two far-apart likely places picks the one closer to the rest of the mass, which is what keeps
    a near-coin-flip from costing thousands of km.
    """
    m = min(candidates, probs.shape[1])
    top = np.argpartition(-probs, m - 1, axis=1)[:, :m]  # (N, m), unordered
    p = np.take_along_axis(probs, top, axis=1)
    p = p / np.clip(p.sum(axis=1, keepdims=True), 1e-300, None)
    lat, lon = label_space.lat[top], label_space.lon[top]  # (N, m)
    d = haversine_km(lat[:, :, None], lon[:, :, None], lat[:, None, :], lon[:, None, :])  # (N,m,m)
    risk = np.einsum("nij,nj->ni", d, p)
    return top[np.arange(len(top)), risk.argmin(axis=1)]


@dataclass(eq=False)
class VariantOutput:
    """One variant's answer for every query."""

    scores: np.ndarray  # (N, K) probabilities
    pred: np.ndarray  # (N,) chosen class
    lat: np.ndarray  # (N,) predicted coordinate
    lon: np.ndarray  # (N,)
    gate: np.ndarray  # (N,) bool: the rerank changed this row's inputs
    refined: np.ndarray | None = None  # (N,) bool: coordinate from in-cell neighbours


def gated_rerank(
    probs: np.ndarray,
    votes: np.ndarray,
    params: GateParams,
    label_space: LabelSpace,
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


def _to_unit(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    phi, lam = np.radians(lat), np.radians(lon)
    return np.stack([np.cos(phi) * np.cos(lam), np.cos(phi) * np.sin(lam), np.sin(phi)], axis=-1)


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
    w = _softmax_rows(nbrs.sims[:, :k], params.temperature) * inside
    refined = inside.any(axis=1)
    rows = np.flatnonzero(refined)
    if rows.size == 0:
        return lat, lon, refined
    w = w[rows] / w[rows].sum(axis=1, keepdims=True)  # (R, k)
    nlat, nlon = nbrs.lat[rows, :k], nbrs.lon[rows, :k]
    if params.method == "mean":
        v = np.einsum("rk,rkc->rc", w, _to_unit(nlat, nlon))
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
    temperatures: dict[str, float] = field(default_factory=dict)  # per variant
    conformal: dict[str, ConformalSets] = field(default_factory=dict)  # per variant
    best_variant: str = "base"
    hier_topk_parents: int = 0
    neighbours: int = 50  # neighbours searched per query (max of gate and refine k)
    index: str = "auto"
    checkpoint_sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PARAMS_VERSION,
            "best_variant": self.best_variant,
            "gated_on_prior": bool(self.gated_on_prior),
            "gate": asdict(self.gate),
            "refine": asdict(self.refine),
            "temperatures": self.temperatures,
            "conformal": {k: v.to_dict() for k, v in self.conformal.items()},
            "hier_topk_parents": self.hier_topk_parents,
            "neighbours": self.neighbours,
            "index": self.index,
            "checkpoint_sha256": self.checkpoint_sha256,
            "log_prior": [float(x) for x in self.log_prior],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RerankParams:
        if d.get("version") != PARAMS_VERSION:
            raise DataError(
                f"rerank params version {d.get('version')!r}; this geoloc reads {PARAMS_VERSION}"
            )
        return cls(
            log_prior=np.asarray(d["log_prior"], dtype=np.float64),
            gated_on_prior=bool(d["gated_on_prior"]),
            gate=GateParams(**d["gate"]),
            refine=RefineParams(**d["refine"]),
            temperatures={k: float(v) for k, v in d["temperatures"].items()},
            conformal={k: ConformalSets.from_dict(v) for k, v in d["conformal"].items()},
            best_variant=str(d["best_variant"]),
            hier_topk_parents=int(d.get("hier_topk_parents", 0)),
            neighbours=int(d.get("neighbours", 50)),
            index=str(d.get("index", "auto")),
            checkpoint_sha256=str(d.get("checkpoint_sha256", "")),
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
    probs: np.ndarray, nbrs: Neighbours, label_space: LabelSpace, params: RerankParams
) -> dict[str, VariantOutput]:
    """base -> prior -> gated -> gated+refined for a batch of queries (evaluation and predict)."""
    n = probs.shape[0]
    closed = np.zeros(n, dtype=bool)

    def centroid_output(scores: np.ndarray, gate: np.ndarray) -> VariantOutput:
        pred = scores.argmax(axis=1)
        return VariantOutput(scores, pred, label_space.lat[pred], label_space.lon[pred], gate)

    out = {"base": centroid_output(probs, closed)}
    out["prior"] = centroid_output(apply_prior(probs, params.log_prior), closed)
    source = out["prior"] if params.gated_on_prior else out["base"]
    g = params.gate
    votes = neighbour_votes(nbrs, label_space.num_classes, g.k, g.vote_temperature)
    scores, pred, gate = gated_rerank(source.scores, votes, g, label_space)
    out["gated"] = VariantOutput(scores, pred, label_space.lat[pred], label_space.lon[pred], gate)
    lat, lon, refined = refine_coordinates(pred, nbrs, label_space, params.refine)
    out["gated+refined"] = VariantOutput(scores, pred, lat, lon, gate, refined)
    return out


# --------------------------------------------------------------------------------------------
# Evaluation and choice on val
# --------------------------------------------------------------------------------------------


def variant_metrics(v: VariantOutput, true: SplitOutputs) -> dict[str, float]:
    """Geo metrics + top1 + gate_share of one variant against the truth."""
    errors = haversine_km(true.lat, true.lon, v.lat, v.lon)
    return {
        **geo_metrics_from_errors(errors),
        "top1": float(np.mean(v.pred == true.labels)),
        "gate_share": float(np.mean(v.gate)),
    }


def tail_objective(metrics: dict[str, float], base: dict[str, float]) -> float:
    """Lower is better: relative P90 + relative P95; +inf when the median breaks the slack."""
    if metrics["median_km"] > MEDIAN_SLACK * base["median_km"] + 1e-9:
        return math.inf
    return metrics["p90_km"] / max(base["p90_km"], 1e-9) + metrics["p95_km"] / max(
        base["p95_km"], 1e-9
    )


def _errors(lat: np.ndarray, lon: np.ndarray, true: SplitOutputs) -> np.ndarray:
    return haversine_km(true.lat, true.lon, lat, lon)


def _quick_metrics(pred: np.ndarray, label_space: LabelSpace, true: SplitOutputs) -> dict:
    d = _errors(label_space.lat[pred], label_space.lon[pred], true)
    median, p90, p95 = np.percentile(d, [50, 90, 95])
    return {"median_km": median, "p90_km": p90, "p95_km": p95, "mean_km": float(d.mean())}


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


def choose_gate(
    probs: np.ndarray,
    nbrs: Neighbours,
    true: SplitOutputs,
    label_space: LabelSpace,
    grid: GateGrid = GateGrid(),
    reference: dict[str, float] | None = None,
    progress: bool = True,
) -> tuple[GateParams, float]:
    """The gate with the lowest val tail objective; the closed gate when nothing beats it.

    `reference` is the base variant's val metrics (the median constraint and the scale of the
    objective); it defaults to the metrics of `probs` itself. Only `true` (val) labels are read.
    """
    ref = reference or _quick_metrics(probs.argmax(axis=1), label_space, true)
    best = GateParams(max_top1=0.0, candidates=grid.candidates)
    best_obj = tail_objective(_quick_metrics(probs.argmax(axis=1), label_space, true), ref)
    best_mean = math.inf
    combos = list(
        itertools.product(grid.k, grid.vote_temperature, grid.weight, grid.max_top1,
                          grid.require_disagreement, grid.decode)
    )  # fmt: skip
    votes_cache: dict[tuple[int, float], np.ndarray] = {}
    for k, temp, w, thr, disagree, decode in tqdm(
        combos, desc="gate grid (val)", leave=False, disable=not progress
    ):
        if k > nbrs.k:
            continue
        if (k, temp) not in votes_cache:
            votes_cache[(k, temp)] = neighbour_votes(nbrs, label_space.num_classes, k, temp)
        params = GateParams(k, temp, w, thr, disagree, decode, grid.candidates)  # type: ignore[arg-type]
        _, pred, _ = gated_rerank(probs, votes_cache[(k, temp)], params, label_space)
        m = _quick_metrics(pred, label_space, true)
        obj = tail_objective(m, ref)
        # ties (common on small val sets) go to the lower mean error
        if obj < best_obj - 1e-12 or (abs(obj - best_obj) <= 1e-12 and m["mean_km"] < best_mean):
            best, best_obj, best_mean = params, obj, m["mean_km"]
    log.info("gate chosen on val: %s (objective %.4f)", best, best_obj)
    return best, best_obj


def choose_refinement(
    pred: np.ndarray,
    nbrs: Neighbours,
    true: SplitOutputs,
    label_space: LabelSpace,
    reference: dict[str, float],
    methods: Iterable[str] = ("mean", "medoid"),
    ks: Iterable[int] = (5, 10, 20, 50),
    temperatures: Iterable[float] = (0.02, 0.1),
) -> RefineParams:
    """Refinement with the best val tail objective (median constraint included); 'none' if none
    beats the centroid. Ties go to the lower val median."""
    best = RefineParams(method="none")
    lat, lon, _ = refine_coordinates(pred, nbrs, label_space, best)
    m = geo_metrics_from_errors(_errors(lat, lon, true))
    best_key = (tail_objective(m, reference), m["median_km"])
    for method, k, temp in itertools.product(methods, ks, temperatures):
        if k > nbrs.k:
            continue
        params = RefineParams(method, k, temp)  # type: ignore[arg-type]
        lat, lon, _ = refine_coordinates(pred, nbrs, label_space, params)
        m = geo_metrics_from_errors(_errors(lat, lon, true))
        key = (tail_objective(m, reference), m["median_km"])
        if key < best_key:
            best, best_key = params, key
    log.info("refinement chosen on val: %s", best)
    return best


def fit_calibration(
    val: dict[str, VariantOutput], val_true: SplitOutputs, coverage: float
) -> tuple[dict[str, float], dict[str, ConformalSets]]:
    """Per variant: temperature on log-probabilities and the conformal threshold, both on val.

    The temperature is fitted for NLL and for top-label log loss; the one with the lower val ECE
    is kept (see `fit_temperature`: hierarchical masking makes NLL over-soften).
    """
    temps, sets = {}, {}
    for name, v in val.items():
        z = log_probs(v.scores)
        candidates = [fit_temperature(z, val_true.labels, obj) for obj in ("nll", "top_label")]
        temps[name] = min(
            candidates, key=lambda t, z=z: top1_ece(apply_temperature(z, t), val_true.labels)
        )
        sets[name] = fit_conformal(apply_temperature(z, temps[name]), val_true.labels, coverage)
    return temps, sets


def calibration_columns(
    v: VariantOutput, true: SplitOutputs, temperature: float, sets: ConformalSets
) -> dict[str, float]:
    z = log_probs(v.scores)
    calibrated = apply_temperature(z, temperature)
    return {
        "ece": top1_ece(v.scores, true.labels),
        "ece_calibrated": top1_ece(calibrated, true.labels),
        "temperature": temperature,
        **sets.evaluate(calibrated, true.labels),
    }


def evaluation_table(
    variants: dict[str, VariantOutput], true: SplitOutputs, params: RerankParams
) -> pd.DataFrame:
    rows = []
    for name in VARIANTS:
        v = variants[name]
        rows.append(
            {
                "variant": name,
                **variant_metrics(v, true),
                **calibration_columns(v, true, params.temperatures[name], params.conformal[name]),
            }
        )
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def choose_best_variant(val_table: pd.DataFrame) -> str:
    """The variant with the best val tail objective (median constraint), simplest on ties."""
    base = val_table.set_index("variant").loc["base"].to_dict()
    best, best_obj = "base", tail_objective(base, base)
    for _, row in val_table.iterrows():
        obj = tail_objective(row.to_dict(), base)
        if obj < best_obj - 1e-12:
            best, best_obj = str(row["variant"]), obj
    return best


def tune(
    params: RerankParams,
    val_probs: np.ndarray,
    val_nbrs: Neighbours,
    val_true: SplitOutputs,
    label_space: LabelSpace,
    cfg: RerankConfig,
    grid: GateGrid = GateGrid(),
    progress: bool = True,
) -> RerankParams:
    """Every choice rerank makes, from val only: prior use, gate, refinement, calibration.

    `params.log_prior` must be set; the rest of `params` is filled in and returned.
    """
    base_pred = val_probs.argmax(axis=1)
    ref = _quick_metrics(base_pred, label_space, val_true)
    prior_probs = apply_prior(val_probs, params.log_prior)
    prior_obj = tail_objective(_quick_metrics(prior_probs.argmax(1), label_space, val_true), ref)
    params.gated_on_prior = bool(prior_obj < tail_objective(ref, ref) - 1e-12)
    source = prior_probs if params.gated_on_prior else val_probs
    grid = replace(grid, k=tuple(sorted({*grid.k, cfg.k_neighbors})), candidates=cfg.top_k)
    params.gate, _ = choose_gate(source, val_nbrs, val_true, label_space, grid, ref, progress)
    if cfg.refine:
        votes = neighbour_votes(
            val_nbrs, label_space.num_classes, params.gate.k, params.gate.vote_temperature
        )
        _, pred, _ = gated_rerank(source, votes, params.gate, label_space)
        params.refine = choose_refinement(pred, val_nbrs, val_true, label_space, ref)
    else:
        params.refine = RefineParams(method="none")
    val_variants = run_variants(val_probs, val_nbrs, label_space, params)
    params.temperatures, params.conformal = fit_calibration(val_variants, val_true, cfg.coverage)
    return params


# --------------------------------------------------------------------------------------------
# The run-level entry point
# --------------------------------------------------------------------------------------------


@dataclass
class RerankResult:
    """What `rerank_run` wrote, for the CLI and flows to show."""

    run_dir: Path
    test_table: pd.DataFrame
    val_table: pd.DataFrame
    params: RerankParams
    best_variant: str


def outputs_path(paths: RunPaths, split: str) -> Path:
    return paths.data / f"outputs_{split}.npz"


def gallery_path(paths: RunPaths) -> Path:
    return paths.data / "gallery.npz"


def params_path(paths: RunPaths) -> Path:
    return paths.data / "rerank_params.json"


def val_table_path(paths: RunPaths) -> Path:
    return paths.tables / "rerank_eval_val.csv"


def split_outputs(
    trained: Any,
    index_dir: Path,
    split: str,
    paths: RunPaths,
    key: str,
    use_cache: bool,
    progress: bool,
) -> SplitOutputs:
    """Cached model outputs for a split, computed (and cached) when missing or stale."""
    from geoloc.data.dataset import GeoDataset

    cache = outputs_path(paths, split)
    if use_cache:
        cached = SplitOutputs.load(cache, key)
        if cached is not None:
            log.info("using cached %s outputs from %s", split, cache)
            return cached
    dataset = GeoDataset(index_dir, split, trained.transform())
    cfg = trained.config.train
    out = compute_outputs(
        trained.model, dataset, trained.device, cfg.batch_size, cfg.num_workers, progress
    )
    out.save(cache, key)
    return out


def evaluate_rerank(
    outs: dict[str, SplitOutputs],
    label_space: LabelSpace,
    cfg: RerankConfig,
    *,
    land_fraction: np.ndarray | None = None,
    hier_topk_parents: int = 0,
    grid: GateGrid = GateGrid(),
    progress: bool = True,
    gallery: Gallery | None = None,
) -> tuple[RerankParams, dict[str, pd.DataFrame]]:
    """Choose every parameter on `outs["val"]`, then evaluate all variants on val and test.

    `outs` holds the model outputs of `train` (the gallery), `val` and `test`. No I/O: this is
    the part tests drive with synthetic outputs. Test labels are read only by the final tables.
    """
    gallery = gallery or outs["train"].to_gallery()
    k_search = min(max(*grid.k, cfg.k_neighbors, 50), len(gallery))
    probs = {
        s: base_probs(outs[s].logits, outs[s].parent_logits, label_space, hier_topk_parents)
        for s in ("val", "test")
    }
    nbrs = {
        s: Neighbours.search(gallery, outs[s].embeddings, k_search, kind=cfg.index)
        for s in ("val", "test")
    }
    params = RerankParams(
        log_prior=class_log_prior(label_space, cfg.prior_alpha, land_fraction),
        hier_topk_parents=hier_topk_parents,
        neighbours=k_search,
        index=cfg.index,
    )
    params = tune(params, probs["val"], nbrs["val"], outs["val"], label_space, cfg, grid, progress)
    tables = {
        s: evaluation_table(run_variants(probs[s], nbrs[s], label_space, params), outs[s], params)
        for s in ("val", "test")
    }
    params.best_variant = choose_best_variant(tables["val"])
    return params, tables


def rerank_run(
    run_dir: Path,
    *,
    index_dir: Path | None = None,
    cfg: RerankConfig | None = None,
    use_cache: bool = True,
    progress: bool = True,
    report: bool = True,
    grid: GateGrid = GateGrid(),
) -> RerankResult:
    """Rerank evaluation of a trained run; writes tables, params, gallery and the summary.

    `cfg` defaults to the run's own `rerank` section. Every parameter is chosen on val; test is
    only evaluated.
    """
    from geoloc.infer.trained import load_trained
    from geoloc.runs.summary import finite_or_none, update_summary
    from geoloc.train.run import resolve_index_dir

    paths = RunPaths(Path(run_dir))
    trained = load_trained(paths.root, "best")
    cfg = cfg or trained.config.rerank
    index_dir = Path(index_dir) if index_dir else resolve_index_dir(trained.config)
    label_space = trained.label_space
    key = f"{file_digest(trained.checkpoint)}:{label_space.fingerprint}"
    paths.data.mkdir(parents=True, exist_ok=True)
    outs = {
        s: split_outputs(trained, index_dir, s, paths, key, use_cache, progress)
        for s in ("train", "val", "test")
    }
    gallery = outs["train"].to_gallery()
    gallery.save(gallery_path(paths))
    land = (
        land_fraction_for(label_space, index_dir / "h3_features.parquet")
        if cfg.use_land_prior
        else None
    )
    params, tables = evaluate_rerank(
        outs,
        label_space,
        cfg,
        land_fraction=land,
        hier_topk_parents=trained.config.train.hier_topk_parents,
        grid=grid,
        progress=progress,
        gallery=gallery,
    )
    params.checkpoint_sha256 = key.split(":")[0]
    params.save(params_path(paths))
    _write_table(paths.rerank_eval, tables["test"])
    _write_table(val_table_path(paths), tables["val"])
    best_row = tables["test"].set_index("variant").loc[params.best_variant]
    metrics = {k: finite_or_none(v) for k, v in best_row.to_dict().items()}
    update_summary(paths.root, rerank={"variant": params.best_variant, "metrics": metrics})
    if report:
        _refresh_report(paths)
    return RerankResult(paths.root, tables["test"], tables["val"], params, params.best_variant)

def _write_table(path: Path, table: pd.DataFrame) -> None:
    write_text(path, table.to_csv(index=False, float_format="%.6g"))


def _refresh_report(paths: RunPaths) -> None:
    """REPORT.md/dashboard show rerank_eval.csv; a reporting failure never fails the rerank."""
    try:
        from geoloc.runs.report import write_report

        write_report(paths.root)
    except Exception as exc:  # noqa: BLE001
        log.warning("report refresh for %s failed: %s", paths.root, exc)
