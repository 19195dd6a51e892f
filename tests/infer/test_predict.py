"""`geoloc predict`: one row per file, errors as rows, every output format, rerank on or off."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from geoloc.cli import main
from geoloc.data.imagestore import ImageLocations
from geoloc.errors import GeolocError
from geoloc.infer.predict import OUTPUT_COLUMNS, Predictor, collect_images, write_predictions
from geoloc.paths import DataPaths


@pytest.fixture
def photo_folder(demo_index: DataPaths, tmp_path: Path) -> Path:
    """Five demo photos in nested folders, a corrupt .jpg, and a text file (not an image)."""
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    manifest = pd.read_parquet(demo_index.processed_manifest).sort_values("sha256")
    stored = ImageLocations(manifest.reset_index(drop=True), demo_index.root)  # tar shards
    for i in range(5):
        ((folder / ("sub" if i % 2 else "")) / f"img{i}.jpg").write_bytes(stored.read(i))
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (folder / "notes.txt").write_text("not a photo")
    return folder


def test_collect_images_walks_folders_and_keeps_named_files(photo_folder: Path) -> None:
    files = collect_images([photo_folder, photo_folder / "notes.txt"])
    names = [f.name for f in files]
    assert sorted(names[:-1]) == ["broken.jpg", *[f"img{i}.jpg" for i in range(5)]]
    assert names[-1] == "notes.txt", "a file named explicitly is always tried"


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".json"])
def test_predict_folder_with_a_corrupt_file_in_every_format(
    reranked_run: Path, photo_folder: Path, tmp_path: Path, suffix: str
) -> None:
    out = tmp_path / f"pred{suffix}"
    code = main(["predict", "--run", str(reranked_run), str(photo_folder), "--top-k", "3",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    if suffix == ".csv":
        table = pd.read_csv(out)
        table["topk_cells"] = table["topk_cells"].map(json.loads)
        table["conformal_set"] = table["conformal_set"].map(json.loads)
    elif suffix == ".parquet":
        table = pd.read_parquet(out)
    else:
        table = pd.DataFrame(json.loads(out.read_text()))
    assert list(table.columns) == list(OUTPUT_COLUMNS)
    assert len(table) == 6
    bad = table[table["path"].str.endswith("broken.jpg")]
    assert len(bad) == 1 and "not a readable image" in bad["error"].iloc[0]
    good = table[~table["path"].str.endswith("broken.jpg")]
    assert good["error"].isna().all()
    assert good["lat"].between(-90, 90).all() and good["lon"].between(-180, 180).all()
    assert good["prob"].between(0, 1).all()
    assert all(len(c) == 3 for c in good["topk_cells"])
    # the most likely cell is always in the conformal set
    assert all(t[0] in s for t, s in zip(good["topk_cells"], good["conformal_set"], strict=True))
    assert all(len(s) >= 1 for s in good["conformal_set"])


def test_predictions_match_the_model_and_rerank_can_be_turned_off(
    reranked_run: Path, photo_folder: Path
) -> None:
    plain = Predictor(reranked_run, rerank=False).predict([photo_folder], progress=False)
    assert set(plain["variant"]) == {"base"}
    ok = plain[plain["error"].isna()]
    # with rerank off the coordinate is the predicted cell's centroid
    from geoloc.infer.trained import load_trained

    ls = load_trained(reranked_run).label_space
    for cell, lat, lon in zip(ok["cell"], ok["lat"], ok["lon"], strict=True):
        i = ls.index_of(cell)
        assert (lat, lon) == pytest.approx((ls.lat[i], ls.lon[i]))
    reranked = Predictor(reranked_run, rerank=True).predict([photo_folder], progress=False)
    params = json.loads((reranked_run / "artifacts/data/rerank_params.json").read_text())
    assert set(reranked["variant"]) == {params["best_variant"]}
    # batching does not change answers
    one_by_one = Predictor(reranked_run, rerank=True, batch_size=1).predict(
        [photo_folder], progress=False
    )
    ok2 = one_by_one["error"].isna()
    np.testing.assert_allclose(
        one_by_one.loc[ok2, "prob"].to_numpy(), reranked.loc[ok2, "prob"].to_numpy(), atol=1e-4
    )


def test_predict_without_rerank_params_falls_back_to_the_base_model(
    trained_run: Path, photo_folder: Path
) -> None:
    table = Predictor(trained_run, rerank=True).predict([photo_folder], progress=False)
    assert set(table["variant"]) == {"base"}
    assert table.loc[table["error"].isna(), "conformal_set"].map(len).eq(0).all()


def test_missing_files_are_error_rows_and_bad_formats_are_refused(
    reranked_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # the terminal table, unwrapped
    code = main(["predict", "--run", str(reranked_run), str(tmp_path / "nope.jpg")])
    assert code == 0
    assert "does not exist" in capsys.readouterr().out
    with pytest.raises(GeolocError, match="unknown format"):
        write_predictions(pd.DataFrame(columns=list(OUTPUT_COLUMNS)), tmp_path / "x.xlsx")
