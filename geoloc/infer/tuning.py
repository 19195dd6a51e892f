"""Every choice rerank makes, from val only, and the evaluation tables it reports.

Prior use, gate, blend and decoding (`choose_gate`), refinement (`choose_refinement`) and
calibration (`fit_calibration`) are chosen on VAL: minimise P90/P90_base + P95/P95_base subject
to median <= 1.02 x base median (`tail_objective`). Test never tunes anything; its labels are
read only by `evaluation_table`.

Each variant's probabilities get a temperature and a conformal threshold fitted on val
(`geoloc.infer.calibration`); the tables carry those columns next to the geo metrics.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from geoloc.config import RerankConfig
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
from geoloc.infer.outputs import SplitOutputs
from geoloc.infer.rerank import (
    VARIANTS,
    GateParams,
    Neighbours,
    RefineParams,
    RerankParams,
    VariantOutput,
    apply_prior,
    gated_rerank,
    neighbour_votes,
    refine_coordinates,
    run_variants,
)
from geoloc.model.scores import predicted_classes
from geoloc.progress import track

__all__ = [
    "MEDIAN_SLACK",
    "TABLE_COLUMNS",
    "TOPK_PARENTS",
    "GateGrid",
    "choose_best_variant",
    "choose_gate",
    "choose_refinement",
    "choose_topk_parents",
    "evaluation_table",
    "fit_calibration",
    "tail_objective",
    "tune",
    "variant_metrics",
]

log = logging.getLogger(__name__)

MEDIAN_SLACK = 1.02
"""A tuned variant may make the val median at most 2% worse than base."""
TABLE_COLUMNS = (
    "variant", "median_km", "p90_km", "p95_km", "acc_1km", "acc_25km", "acc_200km", "acc_750km",
    "acc_2500km", "geoscore", "top1", "gate_share", "ece", "ece_calibrated", "temperature",
    "coverage", "set_size",
)  # fmt: skip
"""rerank_eval.csv columns, in order."""
TOPK_PARENTS = (1, 2, 3, 5, 10)
"""Candidates for the factorised head's `hier_topk_parents` (rerank scores the best 10)."""


# --------------------------------------------------------------------------------------------
# Metrics and the objective
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


# --------------------------------------------------------------------------------------------
# Choices on val
# --------------------------------------------------------------------------------------------


def choose_topk_parents(
    val: SplitOutputs, label_space: LabelSpace, candidates: Sequence[int] = TOPK_PARENTS
) -> tuple[int, pd.DataFrame]:
    """How many parents the factorised head's scores keep, chosen on val.

    Each k <= the parents the model scored is judged by `tail_objective` against the most
    parents scored (the exact product argmax over them); the fewest parents win ties (cheaper
    and the same answers). Returns k and the val table (`k`, median/P90/P95 km, `top1`).
    """
    scored = val.scored_parents
    if scored == 0:
        raise ValueError("choose_topk_parents needs factorised-head outputs (child_logits)")
    head = {name: torch.from_numpy(np.asarray(v)) for name, v in val.head_arrays().items()}
    rows = []
    for k in sorted({k for k in candidates if 0 < k < scored} | {scored}):
        pred = predicted_classes(head, k).numpy()
        rows.append({"k": k, **_quick_metrics(pred, label_space, val),
                     "top1": float(np.mean(pred == val.labels))})  # fmt: skip
    table = pd.DataFrame(rows)
    ref = rows[-1]
    objective = [round(tail_objective(row, ref), 12) for row in rows]
    best = min(range(len(rows)), key=lambda i: (objective[i], rows[i]["k"]))
    return int(rows[best]["k"]), table


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
    for k, temp, w, thr, disagree, decode in track(
        combos, desc="gate grid (val)", unit="gate", bars=progress
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


# --------------------------------------------------------------------------------------------
# Calibration and the evaluation tables
# --------------------------------------------------------------------------------------------


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
    """ECE before and after the val temperature, and the conformal sets' coverage and size."""
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
    """One row per variant (`TABLE_COLUMNS`): geo metrics and calibration against the truth."""
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


# --------------------------------------------------------------------------------------------
# All choices, in order
# --------------------------------------------------------------------------------------------


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
