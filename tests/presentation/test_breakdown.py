"""Error by country and continent in a run's report, when the index has a country per image."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from geoloc.formatting import fmt_km
from geoloc.geo.countries import continent_of, country_name
from geoloc.paths import DataPaths
from geoloc.presentation.report import write_report
from geoloc.runfolder.layout import RunPaths

# test predictions of a fake run are img000000.. ; countries cycle, every fifth image has none
CODES = ["FR", "DE", "JP", "BR", None]


def _index_with_countries(n: int, fingerprint: str = "fp0", country: bool = True) -> None:
    paths = DataPaths.default()
    paths.index.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame({"image_id": [f"img{i:06d}" for i in range(n)]})
    if country:
        frame["country"] = pd.Series([CODES[i % len(CODES)] for i in range(n)], dtype="str")
    frame.to_parquet(paths.images, index=False)
    paths.labels.write_text(json.dumps({"version": 1, "fingerprint": fingerprint}))


def test_report_breaks_test_errors_down_by_country_and_continent(
    make_run: Callable[..., Path],
) -> None:
    run = make_run("osv", n_predictions=300)
    _index_with_countries(300)
    write_report(run)
    preds = pd.read_parquet(RunPaths(run).test_predictions)
    codes = np.array([CODES[i % len(CODES)] for i in range(len(preds))], dtype=object)
    france = preds["error_km"][codes == "FR"].to_numpy()
    report = RunPaths(run).report.read_text()
    assert "## Error by country" in report and "## Error by continent" in report
    row = f"| France (FR) | {len(france)} | {fmt_km(np.median(france))} |"
    assert row in report
    europe = preds["error_km"][np.isin(codes, ["FR", "DE"])].to_numpy()
    assert f"| Europe | {len(europe)} | {fmt_km(np.median(europe))} |" in report
    unknown = f"| (unknown) | {int((codes == None).sum())} |"  # noqa: E711
    assert report.index(unknown) > report.index("| South America |")  # last
    page = RunPaths(run).dashboard.read_text()
    assert 'id="error-by-country"' in page and "France (FR)" in page


def test_the_breakdown_shows_the_answers_after_rerank_when_rerank_ran(
    make_run: Callable[..., Path],
) -> None:
    run = make_run("reranked", n_predictions=100)
    _index_with_countries(100)
    reranked = pd.read_parquet(RunPaths(run).test_predictions)[["image_id", "error_km"]]
    reranked["error_km"] = 3.0  # every answer 3 km off after rerank
    reranked["variant"] = "gated"
    reranked.to_parquet(RunPaths(run).rerank_test_predictions, index=False)
    write_report(run)
    report = RunPaths(run).report.read_text()
    assert "after rerank (gated)" in report
    assert "| France (FR) | 20 | 3.0 km | 3.0 km | 100.0% | 100.0% |" in report


def test_no_country_column_no_section_and_another_index_is_not_joined(
    make_run: Callable[..., Path],
) -> None:
    run = make_run("plain", n_predictions=50)
    _index_with_countries(50, country=False)
    write_report(run)
    assert "Error by country" not in RunPaths(run).report.read_text()
    _index_with_countries(50, fingerprint="some-other-index")
    write_report(run)
    report = RunPaths(run).report.read_text()
    assert "## Error by country" not in report
    assert "is not the one this run trained on" in report


def test_country_codes_have_names_and_continents() -> None:
    assert (country_name("fr"), continent_of("fr")) == ("France", "Europe")
    assert continent_of("BR") == "South America" and continent_of("KE") == "Africa"
    assert continent_of("UK") == "Europe" and continent_of("XX") is None
