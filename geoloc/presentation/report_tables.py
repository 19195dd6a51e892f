"""The tables REPORT.md and dashboard.html both show, computed once from a run's `RunInputs`."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pandas as pd

from geoloc.formatting import fmt, fmt_km, fmt_share
from geoloc.geo.metrics import GEO_METRIC_NAMES
from geoloc.presentation.inputs import RunInputs

# metric suffixes shown in the key metrics table, in this order (see docs/ARCHITECTURE.md)
METRIC_SUFFIXES: tuple[str, ...] = ("top1", "top5", "parent_acc", *GEO_METRIC_NAMES, "loss")


def _last_metrics_row(inputs: RunInputs) -> dict[str, Any]:
    if inputs.metrics is None:
        return {}
    return {k: (None if pd.isna(v) else v) for k, v in inputs.metrics.iloc[-1].items()}


def metric_rows(inputs: RunInputs) -> list[tuple[str, Any, Any, Any]]:
    """(metric, val best, val last, test) for every metric any of them has."""
    summary = inputs.summary or {}
    best = summary.get("best") or {}
    last = summary.get("last") or _last_metrics_row(inputs)
    test = summary.get("test") or {}
    rows = []
    for suffix in METRIC_SUFFIXES:
        vals = (best.get(f"val_{suffix}"), last.get(f"val_{suffix}"), test.get(f"test_{suffix}"))
        if any(v is not None for v in vals):
            rows.append((suffix, *vals))
    return rows


@dataclass(frozen=True)
class ResultRow:
    """One test metric as a user gets it (after rerank) and from the model alone."""

    label: str
    kind: str  # "km", "share" or "score" (a whole number): how `fmt_metric` shows it
    reranked: Any
    model: Any

    @property
    def final(self) -> Any:
        """What a user of the run gets: the reranked value when rerank ran, else the model's."""
        return self.reranked if self.reranked is not None else self.model


# (label, kind, summary.test key, summary.rerank.metrics key), headline first
RESULT_METRICS: tuple[tuple[str, str, str, str], ...] = (
    ("median error", "km", "test_median_km", "median_km"),
    ("P90 error", "km", "test_p90_km", "p90_km"),
    ("P95 error", "km", "test_p95_km", "p95_km"),
    ("top-1 cell", "share", "test_top1", "top1"),
    ("within 25 km", "share", "test_acc_25km", "acc_25km"),
    ("within 200 km", "share", "test_acc_200km", "acc_200km"),
    ("within 750 km", "share", "test_acc_750km", "acc_750km"),
    ("GeoScore (max 5,000)", "score", "test_geoscore", "geoscore"),
    ("truth within the error radius", "share", "test_radius_coverage", "radius_coverage"),
    ("median error radius", "km", "test_radius_median_km", "radius_median_km"),
)


def result_rows(summary: Mapping[str, Any] | None) -> list[ResultRow]:
    """The run's test result from summary.json: `rerank.metrics` (what `geoloc predict` serves)
    beside `test` (the model alone); metrics neither has are left out."""
    s = summary or {}
    test = s.get("test") or {}
    reranked = (s.get("rerank") or {}).get("metrics") or {}
    rows = [
        ResultRow(label, kind, reranked.get(rkey), test.get(tkey))
        for label, kind, tkey, rkey in RESULT_METRICS
    ]
    return [r for r in rows if r.reranked is not None or r.model is not None]


def rerank_variant(summary: Mapping[str, Any] | None) -> str | None:
    """The rerank variant chosen on val, or None when rerank did not run."""
    return ((summary or {}).get("rerank") or {}).get("variant")


def fmt_metric(value: Any, kind: str) -> str:
    """A result value as `result_rows` describes it: `78.5 km`, `41.2%` or `3,123`."""
    if kind == "km":
        return fmt_km(value)
    if kind == "share":
        return fmt_share(value)
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return f"{value:,.0f}"
    return fmt(value)


def training_facts(inputs: RunInputs) -> list[tuple[str, Any]]:
    """How training went (status, epochs, best val numbers): beside the result, not instead."""
    s = inputs.summary or {}
    return [
        ("status", s.get("status", "unknown")),
        ("epochs completed", s.get("epochs_completed")),
        ("best epoch", s.get("best_epoch")),
        ("best val top-1", fmt_share(s.get("best_val_acc"))),
        ("best val P90", fmt_km(s.get("best_p90_km"))),
        ("last val median", fmt_km(s.get("last_geo_median_km"))),
    ]


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def config_items(inputs: RunInputs) -> list[tuple[str, str]]:
    """Dotted config keys and values (the whole config.json, else the summary's subset)."""
    tree = inputs.config or (inputs.summary or {}).get("config") or {}
    return [
        (k, v if isinstance(v, str) else json.dumps(v)) for k, v in sorted(_flatten(tree).items())
    ]


def artifact_links(inputs: RunInputs) -> list[tuple[str, str]]:
    """(label, URL-quoted href relative to the run) for every file in the run, reports and
    dot-files (temp files of atomic writes) excluded."""
    root = inputs.paths.root
    skip = {inputs.paths.report, inputs.paths.dashboard}
    rels = [
        p.relative_to(root).as_posix()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p not in skip
    ]
    return [
        (rel, quote(rel))
        for rel in rels
        if not any(part.startswith(".") for part in rel.split("/"))
    ]


def fmt_by_name(column: str, value: Any) -> str:
    """A metric formatted by its name: `*_km` as km, accuracies and shares as percentages."""
    if isinstance(value, str):
        return value
    name = column.removeprefix("val_").removeprefix("test_")
    if name.endswith("_km"):
        return fmt_km(value)
    shares = ("top1", "top5", "parent_acc", "gate_share", "coverage", "radius_coverage")
    if name.startswith("acc_") or name in shares:
        return fmt_share(value)
    return fmt(value)


def rerank_cells(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and rows of rerank_eval.csv: km as `78.5 km`, shares as percentages."""
    cols = [str(c) for c in df.columns]
    rows = [[fmt_by_name(c, v) for c, v in zip(cols, rec, strict=True)] for rec in df.to_numpy()]
    return cols, rows


CONFUSED_PAIRS = 12
"""Rows of the most-confused-cells table."""


@dataclass(frozen=True)
class ConfusedPair:
    """Images of one true cell predicted as one other cell."""

    true_place: str
    pred_place: str
    true_cell: str
    pred_cell: str
    images: int
    share: float  # of the true cell's images
    apart_km: float  # between the two cell centres


def confused_pairs(
    inputs: RunInputs, top: int = CONFUSED_PAIRS
) -> tuple[str | None, list[ConfusedPair]]:
    """(split, pairs): the `top` most frequent (true cell -> other predicted cell) mistakes of
    the test predictions (val when test has none), cells named by their nearest large city."""
    import h3

    from geoloc.geo import haversine_km
    from geoloc.geo.places import cell_place_labels

    found = [
        (split, df)
        for split, df in (("test", inputs.test_predictions), ("val", inputs.val_predictions))
        if df is not None and {"true_cell", "pred_cell"} <= set(df.columns)
    ]
    if not found:
        return None, []
    split, df = found[0]
    cells = df[["true_cell", "pred_cell"]].astype(str)
    per_true = cells["true_cell"].value_counts()
    wrong = cells[cells["true_cell"] != cells["pred_cell"]]
    counts = wrong.value_counts().head(top)
    names = cell_place_labels([c for pair in counts.index for c in pair])
    pairs = []
    for (true_cell, pred_cell), n in counts.items():
        try:
            (a, b), (c, d) = h3.cell_to_latlng(true_cell), h3.cell_to_latlng(pred_cell)
            apart = float(haversine_km(a, b, c, d))
        except (ValueError, TypeError, h3.H3BaseException):
            apart = float("nan")
        pairs.append(ConfusedPair(names[true_cell], names[pred_cell], true_cell, pred_cell,
                                  int(n), int(n) / int(per_true[true_cell]), apart))  # fmt: skip
    return split, pairs


def confused_cells(pairs: list[ConfusedPair]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of the most-confused-cells table."""
    header = ["true place", "predicted as", "images", "share of the true cell", "centres apart"]
    rows = [
        [p.true_place, p.pred_place, fmt(p.images), fmt_share(p.share), fmt_km(p.apart_km)]
        for p in pairs
    ]
    return header, rows
