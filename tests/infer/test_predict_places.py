"""`geoloc predict` answers in places a person reads: the error radius and each top-k cell with
its coordinates and probability, in the terminal table, the CSV and the served model's answer."""

from __future__ import annotations

import json
from pathlib import Path

import h3
import pandas as pd
import pytest

from geoloc.cli import main
from geoloc.data.imagestore import ImageLocations
from geoloc.infer.predict import Predictor
from geoloc.paths import DataPaths


@pytest.fixture
def photos(demo_index: DataPaths, tmp_path: Path) -> list[Path]:
    manifest = pd.read_parquet(demo_index.processed_manifest).sort_values("sha256")
    stored = ImageLocations(manifest.reset_index(drop=True), demo_index.root)
    out = []
    for i in range(2):
        out.append(tmp_path / f"photo{i}.jpg")
        out[-1].write_bytes(stored.read(i))
    return out


def test_top_k_cells_come_with_their_centres(reranked_run: Path, photos: list[Path]) -> None:
    table = Predictor(reranked_run, top_k=3).predict(photos, progress=False)
    for row in table.itertuples(index=False):
        assert len(row.topk_cells) == len(row.topk_lats) == len(row.topk_lons) == 3
        for cell, lat, lon in zip(row.topk_cells, row.topk_lats, row.topk_lons, strict=True):
            assert (lat, lon) == pytest.approx(h3.cell_to_latlng(cell), abs=1e-6)


def test_table_and_csv_show_the_radius_and_top_k_places(
    reranked_run: Path, photos: list[Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # a terminal wide enough not to fold the cells
    assert main(["predict", "--run", str(reranked_run), str(photos[0]), "--top-k", "2"]) == 0
    shown = capsys.readouterr().out
    assert "radius" in shown and " km @ " in shown, shown
    assert "(lat, lon)" in shown

    out = tmp_path / "pred.csv"
    assert main(["predict", "--run", str(reranked_run), *map(str, photos), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert table["radius_km"].notna().all()
    assert table["ood_score"].notna().all() and table["ood_flag"].isin([True, False]).all()
    lats = table["topk_lats"].map(json.loads)
    assert all(len(v) == 5 and all(-90 <= x <= 90 for x in v) for v in lats)
