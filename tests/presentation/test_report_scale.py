"""Report artifacts stay bounded when a split has 10^5 images (issue 28, item 5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from geoloc.presentation.inputs import RunInputs
from geoloc.presentation.plots import (
    MAX_CDF_POINTS,
    MAX_MAP_POINTS,
    draw_error_map,
    draw_geo_error,
    pyplot,
)
from geoloc.runfolder.layout import RunPaths


def _predictions(n: int) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({
        "true_lat": rng.uniform(-60, 70, n), "true_lon": rng.uniform(-180, 180, n),
        "error_km": rng.lognormal(5, 2, n),
    })  # fmt: skip


def test_plots_of_a_hundred_thousand_images_draw_a_bounded_sample(tmp_path: Path) -> None:
    inputs = RunInputs(paths=RunPaths(tmp_path), test_predictions=_predictions(100_000))
    plt = pyplot()
    fig = plt.figure()
    draw_error_map(fig, inputs)
    (ax,) = fig.axes[:1]
    assert sum(len(c.get_offsets()) for c in ax.collections) <= MAX_MAP_POINTS + 100
    assert f"{MAX_MAP_POINTS:,} of 100,000" in ax.get_title()
    plt.close(fig)
    fig = plt.figure()
    draw_geo_error(fig, inputs)
    (line,) = fig.axes[0].get_lines()[:1]
    assert len(line.get_xdata()) <= MAX_CDF_POINTS
    assert "n=100000" in fig.axes[0].get_legend().get_texts()[0].get_text()
    plt.close(fig)
