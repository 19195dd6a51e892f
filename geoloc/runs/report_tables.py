"""The tables REPORT.md and dashboard.html both show, computed once from a run's `RunInputs`."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote

import pandas as pd

from geoloc.geo.metrics import GEO_METRIC_NAMES
from geoloc.runs.formatting import fmt
from geoloc.runs.inputs import RunInputs

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


def headline(inputs: RunInputs) -> list[tuple[str, Any]]:
    """The numbers a reader looks at first (the leaderboard's score parts among them)."""
    s = inputs.summary or {}
    test = s.get("test") or {}
    return [
        ("status", s.get("status", "unknown")),
        ("epochs completed", s.get("epochs_completed")),
        ("best epoch", s.get("best_epoch")),
        ("best val top-1", s.get("best_val_acc")),
        ("best val P90 km", s.get("best_p90_km")),
        ("last val median km", s.get("last_geo_median_km")),
        ("test top-1", test.get("test_top1")),
        ("test median km", test.get("test_median_km")),
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


def rerank_cells(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    """Header and formatted rows of rerank_eval.csv (text cells kept as they are)."""
    cols = [str(c) for c in df.columns]
    rows = [[fmt(v) if not isinstance(v, str) else v for v in rec] for rec in df.to_numpy()]
    return cols, rows
