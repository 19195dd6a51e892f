"""The error radius in a run's report: circles on the error map, rows in the result table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geoloc.geo import haversine_km
from geoloc.presentation.inputs import load_run_inputs
from geoloc.presentation.plots import RADIUS_CIRCLES, draw_error_map, pyplot
from geoloc.presentation.report import write_report
from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import read_summary, update_summary


def _answers(n: int = 50) -> pd.DataFrame:
    """rerank_test_predictions rows: radii from 50 to 5,000 km, one at the antimeridian."""
    rng = np.random.default_rng(0)
    lat, lon = rng.uniform(-60, 60, n), rng.uniform(-180, 180, n)
    lon[5] = 179.9  # the circle at the 10th percentile of the radii crosses the antimeridian
    radius = np.geomspace(50.0, 5000.0, n)
    return pd.DataFrame({
        "image_id": [f"i{i}" for i in range(n)], "true_lat": lat + 1.0, "true_lon": lon,
        "pred_lat": lat, "pred_lon": lon, "error_km": np.full(n, 111.0),
        "radius_km": radius, "within_radius": radius >= 111.0, "radius_coverage": 0.9,
    })  # fmt: skip


def test_error_map_draws_the_radius_circles_at_their_distance(
    make_run: Callable[..., Path],
) -> None:
    run = make_run("radius")
    answers = _answers()
    answers.to_parquet(RunPaths(run).rerank_test_predictions, index=False)
    plt = pyplot()
    fig = plt.figure()
    draw_error_map(fig, load_run_inputs(run))
    ax = fig.axes[0]
    circles = [line for line in ax.get_lines() if len(line.get_xdata()) > 100]
    assert len(circles) == RADIUS_CIRCLES
    assert "90% error radius" in ax.get_title()
    drawn_radii, cut = [], 0
    for line in circles:
        x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
        assert np.nanmax(np.abs(np.diff(x))) < 180.0, "no line across the whole map"
        cut += int(np.isnan(x).any())
        ok = np.isfinite(x)
        # every point of a circle is one radius away from one answer
        lat0, lon0 = answers["pred_lat"].to_numpy(), answers["pred_lon"].to_numpy()
        d = haversine_km(lat0[:, None], lon0[:, None], y[ok][None, :], x[ok][None, :])
        row = int(np.argmin(np.ptp(d, axis=1)))
        assert np.ptp(d[row]) < 1.0
        assert d[row].mean() == pytest.approx(answers["radius_km"].iloc[row], rel=1e-6)
        drawn_radii.append(answers["radius_km"].iloc[row])
    assert cut >= 1, "the circle at the antimeridian is split, not drawn across the map"
    # typical radii from the 10th to the 90th percentile, not the extremes
    radii = answers["radius_km"]
    assert sorted(drawn_radii) == drawn_radii
    assert drawn_radii[0] == radii.iloc[5] and drawn_radii[-1] == radii.iloc[44]
    plt.close(fig)


def test_a_run_reranked_before_radii_still_gets_its_error_map(
    make_run: Callable[..., Path],
) -> None:
    run = make_run("no-radius")
    plt = pyplot()
    fig = plt.figure()
    inputs = load_run_inputs(run)
    draw_error_map(fig, inputs)
    assert "radius" not in fig.axes[0].get_title()
    assert not any("rerank_test_predictions" in note for note in inputs.notes.values())
    plt.close(fig)


def test_report_result_table_shows_the_radius_coverage_and_median(
    make_run: Callable[..., Path],
) -> None:
    run = make_run("radius-report")
    summary = read_summary(run)
    metrics = {**summary["rerank"]["metrics"], "radius_coverage": 0.893,
               "radius_median_km": 212.4}  # fmt: skip
    update_summary(run, rerank={**summary["rerank"], "metrics": metrics})
    write_report(run)
    result = RunPaths(run).report.read_text().split("## Result", 1)[1].split("##", 1)[0]
    assert "| truth within the error radius | 89.3% |" in result
    assert "| median error radius | 212 km |" in result
