"""Every choice rerank makes, from val only, and the evaluation tables it reports.

Prior use, gate, blend and decoding (`choose_gate`), refinement (`choose_refinement`) and
calibration (`fit_calibration`) are chosen on VAL: minimise P90/P90_base + P95/P95_base subject
to median <= 1.02 x base median (`tail_objective`). Test never tunes anything; its labels are
read only by `evaluation_table`.

Each variant's probabilities get a calibration (smoothing + temperature), conformal cell sets and
an error radius fitted on val (`geoloc.infer.calibration`, `geoloc.infer.radius`); the tables
carry those columns next to the geo metrics. The `min_risk` variant's candidate count is chosen
on val too (`choose_min_risk`), after the gated distribution is calibrated.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pandas as pd
import torch

from geoloc.config import RerankConfig
from geoloc.geo import LabelSpace, haversine_km
from geoloc.geo.metrics import expected_calibration_error, geo_metrics_from_errors
from geoloc.infer.calibration import Calibration, ConformalSets
from geoloc.infer.candidates import (
    TopCells,
    choose_conformal_top,
    expected_distance_top,
    fit_scaling_top,
    radius_km_top,
    set_stats_top,
)
from geoloc.infer.gate_search import GateGrid, GateInputs, block_rows, gate_answers, search_gate
from geoloc.infer.ood import OOD_VARIANT, ood_for, widened_members
from geoloc.infer.outputs import SplitOutputs, model_probs
from geoloc.infer.radius import RADIUS_CANDIDATES, ErrorRadius, fit_error_radius
from geoloc.infer.rerank import (
    VARIANTS,
    GateParams,
    Neighbours,
    RefineParams,
    RerankParams,
    VariantOutput,
    apply_prior,
    min_risk_among,
    refine_coordinates,
    run_variants,
)
from geoloc.model.scores import predicted_classes
from geoloc.progress import track

__all__ = [
    "MEDIAN_SLACK",
    "TABLE_COLUMNS",
    "TOPK_PARENTS",
    "FitVariant",
    "GateGrid",
    "choose_best_variant",
    "choose_gate",
    "choose_min_risk",
    "choose_refinement",
    "choose_topk_parents",
    "evaluation_table",
    "ood_row_stats",
    "row_stats",
    "table_row",
    "fit_calibration",
    "stratified_sample",
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
    "coverage", "set_size", "radius_coverage", "radius_median_km",
)  # fmt: skip
"""rerank_eval.csv columns, in order."""
MIN_RISK_CANDIDATES = (2, 3, 5, 10, 20, 50)
"""Candidate counts `choose_min_risk` tries for the `min_risk` variant."""
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
    inputs = GateInputs.gather([probs], nbrs.labels[:, : max(grid.k)], grid.candidates)
    best, best_obj = search_gate(
        inputs, nbrs, true.lat, true.lon, label_space, grid,
        lambda m: tail_objective(m, ref), progress,
    )  # fmt: skip
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


def choose_min_risk(
    gated: TopCells,
    nbrs: Neighbours,
    true: SplitOutputs,
    label_space: LabelSpace,
    refine: RefineParams,
    reference: dict[str, float],
    candidates: Sequence[int] = MIN_RISK_CANDIDATES,
) -> int:
    """How many of the calibrated gated distribution's (`gated`, candidate cells) best cells
    `min_risk` decodes among: the best val tail objective (median constraint included), fewer
    candidates on ties."""
    best, best_key = candidates[0], (math.inf, math.inf)
    for m in sorted(set(candidates)):
        pred = min_risk_among(*gated.best(m), label_space)
        lat, lon, _ = refine_coordinates(pred, nbrs, label_space, refine)
        metrics = geo_metrics_from_errors(_errors(lat, lon, true))
        key = (round(tail_objective(metrics, reference), 12), metrics["median_km"])
        if key < best_key:
            best, best_key = m, key
    log.info("min_risk decoding among the top %d cells (chosen on val)", best)
    return best


@dataclass(eq=False)
class FitVariant:
    """What calibration reads of one variant on the calibration sample: its candidate cells
    (uncalibrated; variants sharing a distribution share the object), answers and neighbours."""

    top: TopCells
    lat: np.ndarray
    lon: np.ndarray
    nbrs: Neighbours | None = None


@dataclass(frozen=True)
class CalibrationFit:
    """Everything fitted on val per variant: probabilities, cell sets, error radius."""

    calibration: dict[str, Calibration]
    conformal: dict[str, ConformalSets]
    radius: dict[str, ErrorRadius]


def fit_calibration(
    val: dict[str, FitVariant],
    val_true: SplitOutputs,
    label_space: LabelSpace,
    cfg: RerankConfig,
    known: dict[str, Calibration] | None = None,
    progress: bool = True,
) -> CalibrationFit:
    """Per variant, on val: the calibration (`fit_scaling_top`: smoothing for variants built
    from votes, then a temperature), conformal cell sets (`choose_conformal_top`, or
    `cfg.conformal`) and the error radius at `cfg.radius_coverage`, all on each image's
    candidate cells. `known` calibrations are reused, not refitted."""
    methods = ("lac", "aps", "raps") if cfg.conformal == "auto" else (cfg.conformal,)
    cals: dict[str, Calibration] = dict(known or {})
    sets, radii = {}, {}
    done: dict[tuple[int, Calibration], tuple[TopCells, ConformalSets]] = {}
    y = val_true.labels
    for name, v in track(list(val.items()), desc="calibrate (val)", unit="variant", bars=progress):
        if name not in cals:
            same = next((n for n, o in val.items() if n in cals and o.top is v.top), None)
            cals[name] = cals[same] if same else fit_scaling_top(v.top, y)
        key = (id(v.top), cals[name])  # gated, gated+refined, min_risk: one distribution
        if key not in done:
            top = v.top.calibrated(cals[name])
            done[key] = top, choose_conformal_top(top, y, cfg.coverage, methods)
        top, sets[name] = done[key]
        spread = expected_distance_top(top, v.lat, v.lon, label_space, RADIUS_CANDIDATES)
        radii[name] = fit_error_radius(None, v.lat, v.lon, val_true.lat, val_true.lon,
                                       label_space, cfg.radius_coverage, nbrs=v.nbrs,
                                       spread=spread)  # fmt: skip
    return CalibrationFit(cals, sets, radii)


def row_stats(
    name: str,
    v: VariantOutput,
    true: SplitOutputs,
    params: RerankParams,
    label_space: LabelSpace,
    cal: TopCells | None = None,
) -> dict[str, np.ndarray]:
    """Per image, what the table columns of one variant average: error, hit, gate, top-1
    confidence and correctness before and after calibration, set coverage and size, radius.
    Row-wise only, so a split can be evaluated in blocks (`table_row` aggregates)."""
    y = true.labels
    if cal is None:  # `params.calibrated_top(name, v)` (variants sharing one may pass it)
        cal = params.calibrated_top(name, v)  # candidate cells: no (images x classes) array
    error = _errors(v.lat, v.lon, true)
    cal_cell, cal_conf = cal.top()
    raw_conf, raw_cell = v.top1()
    stats = {
        "error": error, "hit": v.pred == y, "gate": np.asarray(v.gate, dtype=bool),
        "raw_conf": raw_conf, "raw_ok": raw_cell == y,
        "cal_conf": cal_conf, "cal_ok": cal_cell == y,
    }  # fmt: skip
    sets, radius = params.conformal.get(name), params.radius.get(name)
    if sets is not None:
        stats["covered"], stats["set_size"] = set_stats_top(cal, sets, y)
    if radius is not None:
        stats["radius"] = radius_km_top(radius, cal, v.lat, v.lon, label_space, v.nbrs)
        stats["within"] = error <= stats["radius"]
    return stats


def ood_row_stats(
    variants: dict[str, VariantOutput],
    true: SplitOutputs,
    params: RerankParams,
    label_space: LabelSpace,
    cal: TopCells | None = None,
) -> dict[str, np.ndarray]:
    """`row_stats` of the chosen variant with the OOD step on top: its answer (moved when
    `ood_decode` is on), widened radius and widened sets (`cal`: its calibrated candidates)."""
    name = params.best_variant
    v = variants[name]
    cal = params.calibrated_top(name, v) if cal is None else cal
    stats = row_stats(name, v, true, params, label_space, cal=cal)
    ans = ood_for(params, name, v, variants["gated"].nbrs, label_space, cal=cal)
    assert ans is not None
    stats["error"] = haversine_km(true.lat, true.lon, ans.lat, ans.lon)
    stats["hit"] = ans.pred == true.labels
    stats["radius"], stats["within"] = ans.radius_km, stats["error"] <= ans.radius_km
    sets = params.conformal.get(name)
    if sets is not None:
        member, extra = widened_members(cal, sets, ans)
        stats["covered"] = member[np.arange(len(true.labels)), true.labels]
        stats["set_size"] = member.sum(axis=1) + extra
    return stats


def table_row(name: str, stats: dict[str, np.ndarray], params: RerankParams) -> dict[str, float]:
    """One `TABLE_COLUMNS` row from a variant's `row_stats` over a whole split."""
    row = {
        "variant": name,
        **geo_metrics_from_errors(stats["error"]),
        "top1": float(np.mean(stats["hit"])),
        "gate_share": float(np.mean(stats["gate"])),
        "ece": expected_calibration_error(stats["raw_conf"], stats["raw_ok"]),
        "ece_calibrated": expected_calibration_error(stats["cal_conf"], stats["cal_ok"]),
        "temperature": params.temperatures.get(name, float("nan")),
    }
    empty = stats["error"].size == 0
    if "covered" in stats:
        row["coverage"] = math.nan if empty else float(np.mean(stats["covered"]))
        row["set_size"] = math.nan if empty else float(np.mean(stats["set_size"]))
    if "radius" in stats:
        row["radius_coverage"] = math.nan if empty else float(np.mean(stats["within"]))
        row["radius_median_km"] = math.nan if empty else float(np.median(stats["radius"]))
    return row


def evaluation_table(
    variants: dict[str, VariantOutput],
    true: SplitOutputs,
    params: RerankParams,
    label_space: LabelSpace,
) -> pd.DataFrame:
    """One row per variant (`TABLE_COLUMNS`): geo metrics and calibration against the truth."""
    rows = [table_row(n, row_stats(n, variants[n], true, params, label_space), params)
            for n in VARIANTS]  # fmt: skip
    if params.ood is not None:
        stats = ood_row_stats(variants, true, params, label_space)
        rows.append(table_row(OOD_VARIANT, stats, params))
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


def stratified_sample(labels: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices of a class-stratified sample of `n` rows (all rows when fewer).

    Systematic sampling along the rows sorted by class (random order within a class): every
    class gets its share of the sample, up to one row, so rare and frequent cells keep their
    weight in the tail metrics.
    """
    labels = np.asarray(labels)
    if labels.size <= n:
        return np.arange(labels.size)
    rng = np.random.default_rng(seed)
    perm = rng.permutation(labels.size)
    order = perm[np.argsort(labels[perm], kind="stable")]
    picks = np.floor((np.arange(n) + rng.random()) * labels.size / n).astype(np.int64)
    return np.sort(order[picks])


def tune(
    params: RerankParams,
    val: SplitOutputs,
    val_nbrs: Neighbours,
    probs_of: Callable[[SplitOutputs], np.ndarray],
    label_space: LabelSpace,
    cfg: RerankConfig,
    grid: GateGrid = GateGrid(),
    progress: bool = True,
) -> RerankParams:
    """Every choice rerank makes, from val only: prior use, gate, refinement, calibration,
    min-risk candidates, cell sets and error radii.

    `val` is the tuning sample; `probs_of` gives the base (rows, K) probabilities of some of its
    rows, and is called in blocks (`block_rows`) so no (images x classes) array is held for
    the gate. Calibration, sets, radii and min-risk decoding are fitted on a stratified
    `cfg.calibration_images` of it. `params.log_prior` must be set; the rest is filled in.
    """
    ls = label_space

    def chunks(prior: bool) -> Iterator[np.ndarray]:
        step = block_rows(ls.num_classes)
        for s in range(0, len(val), step):
            p = probs_of(val.subset(slice(s, s + step)))
            yield apply_prior(p, params.log_prior) if prior else p

    ref = _quick_metrics(np.concatenate([p.argmax(1) for p in chunks(False)]), ls, val)
    prior_pred = np.concatenate([p.argmax(1) for p in chunks(True)])
    prior_obj = tail_objective(_quick_metrics(prior_pred, ls, val), ref)
    params.gated_on_prior = bool(prior_obj < tail_objective(ref, ref) - 1e-12)
    grid = replace(grid, k=tuple(sorted({*grid.k, cfg.k_neighbors})), candidates=cfg.top_k)
    kmax = min(max(grid.k), val_nbrs.k)
    inputs = GateInputs.gather(
        chunks(params.gated_on_prior), val_nbrs.labels[:, :kmax], grid.candidates
    )
    params.gate, obj = search_gate(inputs, val_nbrs, val.lat, val.lon, ls, grid,
                                   lambda m: tail_objective(m, ref), progress)  # fmt: skip
    log.info("gate chosen on val: %s (objective %.4f)", params.gate, obj)
    if cfg.refine:
        pred, _ = gate_answers(inputs, val_nbrs, params.gate, ls)
        params.refine = choose_refinement(pred, val_nbrs, val, ls, ref)
    else:
        params.refine = RefineParams(method="none")
    rows = stratified_sample(val.labels, cfg.calibration_images)
    fit, fit_nbrs = val.subset(rows), val_nbrs.subset(rows)
    params.calibration_cells = cfg.calibration_cells
    fit_vars, fit_pred = _fit_variants(fit, fit_nbrs, probs_of, ls, params)
    fit_ref = _quick_metrics(fit_pred, ls, fit)
    gated = fit_vars["gated"]
    gated_cal = fit_scaling_top(gated.top, fit.labels)
    calibrated = gated.top.calibrated(gated_cal)
    params.min_risk_candidates = choose_min_risk(
        calibrated, fit_nbrs, fit, ls, params.refine, fit_ref
    )
    risk = min_risk_among(*calibrated.best(params.min_risk_candidates), ls)
    lat, lon, _ = refine_coordinates(risk, fit_nbrs, ls, params.refine)
    fit_vars["min_risk"] = FitVariant(gated.top, lat, lon, fit_nbrs)
    params.calibration = {"gated": gated_cal}
    cal = fit_calibration(fit_vars, fit, ls, cfg, known=params.calibration, progress=progress)
    params.calibration, params.conformal, params.radius = cal.calibration, cal.conformal, cal.radius
    return params


def _fit_variants(
    fit: SplitOutputs,
    nbrs: Neighbours,
    probs_of: Callable[[SplitOutputs], np.ndarray],
    label_space: LabelSpace,
    params: RerankParams,
) -> tuple[dict[str, FitVariant], np.ndarray]:
    """The calibration sample's variants (all but `min_risk`, which needs the calibration) as
    candidate cells, in blocks of (images, classes) probabilities; and the base answers."""
    names = ("base", "prior", "gated", "gated+refined")
    parts: dict[str, list[tuple[TopCells, np.ndarray, np.ndarray]]] = {n: [] for n in names}
    preds = []
    step = block_rows(label_space.num_classes)
    for s in range(0, max(len(fit), 1), step):
        rows = np.arange(s, min(s + step, len(fit)))
        part = fit.subset(rows)
        probs = probs_of(part)
        own = model_probs(part, label_space, params.hier_topk_parents, params.base_topk_parents)
        out = run_variants(probs, nbrs.subset(rows), label_space, params, own)  # base: model alone
        preds.append(probs.argmax(axis=1))
        tops: dict[int, TopCells] = {}
        for n in names:
            v, m = out[n], params.calibration_cells
            if id(v.scores) not in tops:
                tops[id(v.scores)] = v.candidates(m, label_space.num_classes)
            parts[n].append((tops[id(v.scores)], v.lat, v.lon))
    joined: dict[str, FitVariant] = {}
    concatenated: dict[tuple[int, ...], TopCells] = {}  # one object per shared distribution
    for n in names:
        tops_n, lats, lons = zip(*parts[n], strict=True)
        key = tuple(id(t) for t in tops_n)
        if key not in concatenated:
            concatenated[key] = TopCells.concat(list(tops_n))
        top = concatenated[key]
        joined[n] = FitVariant(top, np.concatenate(lats), np.concatenate(lons),
                               nbrs if n.startswith("gated") else None)  # fmt: skip
    return joined, np.concatenate(preds)
