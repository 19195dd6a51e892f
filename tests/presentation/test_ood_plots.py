"""The OOD reliability plot in a run's report: drawn when the answers carry an OOD score."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from geoloc.presentation.inputs import load_run_inputs
from geoloc.presentation.ood_plots import OOD_PLOTS, ood_answer_sets
from geoloc.presentation.plots import PLOTS
from geoloc.presentation.report import write_report
from geoloc.runfolder.layout import RunPaths


def _answers(n: int, shift: float, seed: int) -> pd.DataFrame:
    """Answers whose radius and coverage fall as the score rises by `shift` (an off-map split)."""
    rng = np.random.default_rng(seed)
    score = rng.normal(shift, 1.0, n)
    radius = 100.0 * np.exp(np.clip(score, -2, 4))
    return pd.DataFrame({
        "image_id": [f"i{i}" for i in range(n)], "true_lat": 0.0, "true_lon": 0.0,
        "pred_lat": 0.0, "pred_lon": 0.0, "error_km": 50.0, "radius_km": radius,
        "within_radius": rng.random(n) < 0.9, "radius_coverage": 0.9, "ood_score": score,
        "ood_flag": score > 1.6,
    })  # fmt: skip


def test_the_report_shows_radius_coverage_against_the_ood_score(
    make_run: Callable[..., Path],
) -> None:
    run = make_run("ood")
    paths = RunPaths(run)
    paths.data.mkdir(parents=True, exist_ok=True)
    _answers(300, 0.0, 0).to_parquet(paths.rerank_test_predictions, index=False)
    _answers(200, 2.0, 1).to_parquet(paths.data / "rerank_shift_predictions.parquet", index=False)
    assert set(ood_answer_sets(load_run_inputs(run))) == {"test", "shift"}
    write_report(run)
    spec = OOD_PLOTS[0]
    png = paths.plots / spec.filename
    assert png.is_file() and png.stat().st_size > 5_000
    assert f"(artifacts/plots/{spec.filename})" in paths.report.read_text()
    page = paths.dashboard.read_text()
    assert page.count("data:image/png;base64,") == len(PLOTS) + len(OOD_PLOTS)


def test_a_run_without_ood_scores_has_no_such_plot_and_no_gap(
    make_run: Callable[..., Path],
) -> None:
    run = make_run("plain")
    write_report(run)
    paths = RunPaths(run)
    assert not (paths.plots / OOD_PLOTS[0].filename).exists()
    assert "Not available" not in paths.report.read_text()
