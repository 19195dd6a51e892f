"""Test errors broken down by country and continent, when the index knows each image's country.

A published dataset such as OSV-5M ships a `country` per image, which ingest keeps as an
optional column of `images.parquet`. The test predictions carry `image_id` (after rerank when
rerank ran, else the model's), so the report joins them with the run's index
(`config.index_dir`, else `$GEOLOC_DATA_DIR/index`) and shows where the model is good and where
it is lost. No `country` column, no test predictions: no section. An index that is not the one
the run trained on (another fingerprint) is not joined; the note says so.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geoloc.formatting import fmt, fmt_km, fmt_share
from geoloc.geo.countries import continent_of, country_name
from geoloc.geo.metrics import geo_metrics_from_errors
from geoloc.paths import DataPaths
from geoloc.presentation.inputs import RunInputs

TOP_COUNTRIES = 20
"""Countries listed by name (most test images first); the rest share one row."""
UNKNOWN = "(unknown)"


@dataclass(frozen=True)
class Breakdown:
    """One table: test errors per group (a country, a continent)."""

    title: str
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Breakdowns:
    tables: list[Breakdown]
    note: str  # what the tables cover, or why there are none


def _index_dir(inputs: RunInputs) -> Path:
    configured = (inputs.config or {}).get("index_dir")
    return Path(configured) if configured else DataPaths.default().index


def _countries(inputs: RunInputs, index_dir: Path) -> tuple[pd.DataFrame | None, str]:
    """(image_id, country) of the run's index, or None with the reason."""
    import pyarrow.parquet as pq

    images = index_dir / "images.parquet"
    try:
        if "country" not in pq.read_schema(images).names:
            return None, ""
        frame = pd.read_parquet(images, columns=["image_id", "country"])
    except (OSError, ValueError) as exc:
        return None, f"{images} could not be read: {exc}"
    trained_on = ((inputs.summary or {}).get("dataset") or {}).get("fingerprint")
    try:
        current = json.loads((index_dir / "labels.json").read_text()).get("fingerprint")
    except (OSError, ValueError):
        current = None
    if trained_on and current and trained_on != current:
        return None, (
            f"no breakdown by country: the index at {index_dir} (fingerprint {current}) is not "
            f"the one this run trained on ({trained_on})"
        )
    return frame, ""


def _row(group: str, errors: np.ndarray) -> list[str]:
    m = geo_metrics_from_errors(errors)
    return [group, fmt(int(errors.size)), fmt_km(m["median_km"]), fmt_km(m["p90_km"]),
            fmt_share(m["acc_25km"]), fmt_share(m["acc_750km"])]  # fmt: skip


def _table(title: str, first: str, groups: pd.Series, errors: pd.Series) -> Breakdown:
    header = [first, "test images", "median error", "P90 error", "within 25 km",
              "within 750 km"]  # fmt: skip
    sizes = groups[groups != UNKNOWN].value_counts()
    sizes = sizes.iloc[np.lexsort((sizes.index.astype(str), -sizes.to_numpy()))]  # most first
    named = list(sizes.index[:TOP_COUNTRIES]) if first == "country" else list(sizes.index)
    rows = [_row(str(g), errors[groups == g].to_numpy()) for g in named]
    rest = ~groups.isin(named) & (groups != UNKNOWN)
    if rest.any():
        others = f"{int(sizes.size - len(named))} other countries"
        rows.append(_row(others, errors[rest].to_numpy()))
    if (groups == UNKNOWN).any():
        rows.append(_row(UNKNOWN, errors[groups == UNKNOWN].to_numpy()))
    return Breakdown(title, header, rows)


def _country_label(code: Any) -> str:
    if code is None or (not isinstance(code, str) and pd.isna(code)):
        return UNKNOWN
    name = country_name(code)
    return f"{name} ({code})" if name else str(code)


def _test_predictions(inputs: RunInputs) -> tuple[pd.DataFrame | None, str]:
    """The test answers a user gets (after rerank when it ran, else the model's), and which."""
    needed = {"image_id", "error_km"}
    reranked = getattr(inputs, "rerank_predictions", None)
    if reranked is not None and needed <= set(reranked.columns):
        variants = reranked["variant"].dropna().unique() if "variant" in reranked else []
        name = f" ({variants[0]})" if len(variants) == 1 else ""
        return reranked, f"after rerank{name}, as `geoloc predict` answers"
    preds = inputs.test_predictions
    if preds is not None and needed <= set(preds.columns):
        return preds, "the model alone (no rerank predictions)"
    return None, ""


def error_breakdowns(inputs: RunInputs) -> Breakdowns:
    """Test errors by country and by continent, when the run's index has a `country` column."""
    preds, which = _test_predictions(inputs)
    if preds is None:
        return Breakdowns([], "")
    index_dir = _index_dir(inputs)
    countries, reason = _countries(inputs, index_dir)
    if countries is None:
        return Breakdowns([], reason)
    joined = preds[["image_id", "error_km"]].merge(countries, on="image_id", how="left")
    errors = joined["error_km"].astype("float64")
    codes = joined["country"]
    by_country = codes.map(_country_label)
    by_continent = codes.map(lambda c: continent_of(c) or UNKNOWN)
    known = int((by_country != UNKNOWN).sum())
    note = (
        f"Test split, {which}: {len(joined):,} images, {known:,} with a country in "
        f"{index_dir / 'images.parquet'}."
    )
    tables = [
        _table("Error by continent", "continent", by_continent, errors),
        _table("Error by country", "country", by_country, errors),
    ]
    return Breakdowns(tables, note)
