"""The shift split (demo crops uniform over land) and `geoloc evaluate` on a folder of photos."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from geoloc.cli import main
from geoloc.data.demo import STAMP_NAME, make_demo
from geoloc.data.features import is_land
from geoloc.data.process import gps_from_exif
from geoloc.errors import DataError
from geoloc.geo import LabelSpace, haversine_km
from geoloc.infer.folder_eval import evaluate_folder, true_classes
from geoloc.infer.ood import OOD_VARIANT
from geoloc.infer.predict import Predictor
from geoloc.infer.rerank import VARIANTS
from geoloc.infer.tuning import TABLE_COLUMNS
from geoloc.paths import DataPaths


def _locations(folder: Path) -> np.ndarray:
    out = []
    for path in sorted(folder.glob("demo_*.jpg")):
        with Image.open(path) as im:
            out.append(gps_from_exif(im.getexif()))
    return np.array(out)


@pytest.fixture(scope="module")
def shift_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 demo crops uniform over land."""
    folder = tmp_path_factory.mktemp("shift") / "demo-shift"
    make_demo(folder, n=40, seed=3, placement="uniform-land")
    return folder


def test_uniform_land_placement_puts_every_crop_on_land_far_from_the_city_demo(
    shift_folder: Path, tmp_path: Path
) -> None:
    loc = _locations(shift_folder)
    assert loc.shape == (40, 2)
    assert is_land(loc[:, 0], loc[:, 1]).all()
    assert np.abs(loc[:, 0]).max() <= 85.0
    assert json.loads((shift_folder / STAMP_NAME).read_text())["placement"] == "uniform-land"
    # the same folder asked for the city demo is regenerated, not mistaken for it
    copy = tmp_path / "copy"
    shutil.copytree(shift_folder, copy)
    make_demo(copy, n=40, seed=3)
    assert not np.allclose(_locations(copy), loc)
    with pytest.raises(DataError, match="placement"):
        make_demo(tmp_path / "bad", n=5, placement="oceans")  # type: ignore[arg-type]


def test_true_classes_are_the_own_cell_else_the_nearest_centre(reranked_run: Path) -> None:
    import h3

    ls: LabelSpace = Predictor(reranked_run, rerank=False).label_space
    assert h3.latlng_to_cell(-89.0, 0.0, ls.resolution) not in ls.cells  # no demo class there
    labels = true_classes(np.array([ls.lat[3], -89.0]), np.array([ls.lon[3], 0.0]), ls)
    assert labels[0] == 3
    assert labels[1] == int(np.argmin(haversine_km(-89.0, 0.0, ls.lat, ls.lon)))


def test_geoloc_evaluate_measures_every_variant_on_a_shift_folder(
    reranked_run: Path, shift_folder: Path, demo_index: DataPaths, tmp_path: Path, capsys
) -> None:  # type: ignore[no-untyped-def]
    run = tmp_path / "run"
    shutil.copytree(reranked_run, run)
    photos = tmp_path / "photos"
    shutil.copytree(shift_folder, photos)
    # a photo without GPS and a file that is not an image are skipped with a reason
    with Image.open(photos / "demo_000000.jpg") as im:
        im.convert("RGB").save(photos / "no_gps.jpg")
    (photos / "broken.jpg").write_bytes(b"not a jpeg")

    result = evaluate_folder(run, [photos], name="shift", progress=False)
    assert list(result.table.columns) == list(TABLE_COLUMNS)
    assert list(result.table["variant"]) == [*VARIANTS, OOD_VARIANT]
    assert len(result.answers) == 40
    assert set(result.skipped) == {str(photos / "no_gps.jpg"), str(photos / "broken.jpg")}
    assert "no GPS" in result.skipped[str(photos / "no_gps.jpg")]
    best = result.table.set_index("variant").loc[OOD_VARIANT]  # the chosen variant's answers
    assert best["radius_coverage"] == pytest.approx(result.answers["within_radius"].mean())
    assert (result.answers["radius_km"] > 0).all()
    on_disk = pd.read_csv(run / "artifacts" / "tables" / "rerank_eval_shift.csv")
    assert list(on_disk["variant"]) == [*VARIANTS, OOD_VARIANT]
    assert result.answers_path.is_file()

    # the command: same numbers, printed
    assert main(["evaluate", "--run", str(run), str(photos), "--name", "shift2"]) == 0
    out = capsys.readouterr().out
    assert "40 photos evaluated, 2 skipped" in out and "min_risk" in out
    again = pd.read_csv(run / "artifacts" / "tables" / "rerank_eval_shift2.csv")
    pd.testing.assert_frame_equal(again, on_disk)
    assert main(["evaluate", "--run", str(run), str(tmp_path / "nothing-here")]) == 1


def test_predict_gives_each_photo_an_error_radius(reranked_run: Path, shift_folder: Path) -> None:
    table = Predictor(reranked_run).predict([shift_folder], progress=False)
    assert table["error"].isna().all()
    assert (table["radius_km"] > 0).all()
    assert (table["radius_coverage"] == 0.9).all()
    assert table["prob"].between(0, 1).all()
