"""h3_features: built-in layers from packaged data, and user GeoTIFF layers."""

from __future__ import annotations

from pathlib import Path

import h3
import numpy as np
import pandas as pd
import pytest
from PIL import Image, TiffImagePlugin, TiffTags

from geoloc.config import IndexConfig
from geoloc.data.features import build_features, read_geotiff
from geoloc.errors import DataError
from geoloc.paths import DataPaths

CFG = IndexConfig(resolution=2, parent_resolution=1, split_resolution=0)
PLACES = {
    "sahara": (23.0, 10.0),
    "pacific": (0.0, -150.0),
    "tokyo": (35.68, 139.69),
    "lisbon": (38.72, -9.14),
}


def _cells() -> list[str]:
    return [h3.latlng_to_cell(lat, lon, CFG.resolution) for lat, lon in PLACES.values()]


def test_builtin_layers_describe_real_places() -> None:
    feats = build_features(_cells(), DataPaths.default(), CFG)
    f = dict(zip(PLACES, feats.to_dict("records"), strict=True))
    assert f["sahara"]["land_fraction"] == 1.0 and f["pacific"]["land_fraction"] == 0.0
    assert f["sahara"]["coast_distance_km"] > 500 and f["pacific"]["coast_distance_km"] > 500
    # a coastal cell (~300 km across): partly land, its centre within a cell of the shore
    assert 0 < f["lisbon"]["land_fraction"] < 1 and f["lisbon"]["coast_distance_km"] < 200
    assert f["tokyo"]["population"] > 5e6 and f["pacific"]["population"] == 0
    assert f["sahara"]["bm_r"] > f["sahara"]["bm_b"]  # desert is warm
    assert f["pacific"]["bm_b"] > f["pacific"]["bm_r"]  # ocean is blue
    assert feats["cell"].tolist() == _cells()


def write_geotiff(path: Path, values: np.ndarray, x0: float, y0: float, step: float, *,
                  model_type: int = 2) -> Path:  # fmt: skip
    """A single-band float GeoTIFF, north-up, in degrees (model_type 2) or 'projected' (1)."""
    ifd = TiffImagePlugin.ImageFileDirectory_v2()
    ifd[33550] = (step, step, 0.0)
    ifd.tagtype[33550] = TiffTags.DOUBLE
    ifd[33922] = (0.0, 0.0, 0.0, x0, y0, 0.0)
    ifd.tagtype[33922] = TiffTags.DOUBLE
    ifd[34735] = (1, 1, 0, 1, 1024, 0, 1, model_type)
    ifd.tagtype[34735] = TiffTags.SHORT
    ifd[42113] = "-9999"
    ifd.tagtype[42113] = TiffTags.ASCII
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(values.astype(np.float32), mode="F").save(path, tiffinfo=ifd)
    return path


def latitude_raster(path: Path) -> Path:
    """Each pixel holds its own latitude; covers lat -60..60; one nodata block."""
    lat = np.repeat(np.linspace(59.75, -59.75, 240)[:, None], 720, axis=1)
    lat[:4, :4] = -9999
    return write_geotiff(path, lat, x0=-180.0, y0=60.0, step=0.5)


def test_a_user_geotiff_becomes_a_feature_column() -> None:
    paths = DataPaths.default()
    latitude_raster(paths.external / "my-lat.tif")
    cfg = CFG.model_copy(update={"external_layers": ["my-lat.tif"]})
    cells = [*_cells(), h3.latlng_to_cell(75.0, 40.0, 2)]  # the last one is off the raster
    feats = build_features(cells, paths, cfg)
    assert "my_lat" in feats.columns
    centres = np.array([h3.cell_to_latlng(c)[0] for c in cells[:4]])
    assert feats["my_lat"].iloc[:4].to_numpy() == pytest.approx(centres, abs=1.5)
    assert np.isnan(feats["my_lat"].iloc[4])


def test_geotiff_nodata_and_extent_are_respected(tmp_path: Path) -> None:
    raster = read_geotiff(latitude_raster(tmp_path / "lat.tif"))
    got = raster.sample(np.array([59.9, 10.1, -70.0]), np.array([-179.9, 20.0, 0.0]))
    assert np.isnan(got[0]) and got[1] == pytest.approx(10.25) and np.isnan(got[2])


def test_projected_or_missing_geotiffs_are_refused_with_a_reason(tmp_path: Path) -> None:
    proj = write_geotiff(tmp_path / "utm.tif", np.zeros((4, 4)), 500000, 4e6, 30, model_type=1)
    with pytest.raises(DataError, match="projected"):
        read_geotiff(proj)
    with pytest.raises(DataError, match="nope.tif"):
        read_geotiff(tmp_path / "nope.tif")
    plain = tmp_path / "plain.tif"
    Image.new("L", (4, 4)).save(plain)
    with pytest.raises(DataError, match="ModelPixelScale"):
        read_geotiff(plain)


def test_index_build_writes_user_layers(demo_data_copy: DataPaths) -> None:
    from fixtures.demo_data import DEMO_FIXTURE_CONFIG

    from geoloc.data.index import build_index

    latitude_raster(demo_data_copy.external / "lat.tif")
    cfg = IndexConfig(**DEMO_FIXTURE_CONFIG, external_layers=["lat.tif"])
    build_index(demo_data_copy, cfg)
    feats = pd.read_parquet(demo_data_copy.h3_features)
    assert "lat" in feats.columns and feats["lat"].notna().any()
