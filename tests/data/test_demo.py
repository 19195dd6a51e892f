"""The offline demo dataset: real imagery, GPS in EXIF, reproducible to the byte."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from geoloc.data.assets import blue_marble
from geoloc.data.demo import crop_at, make_demo, sample_locations
from geoloc.data.process import gps_from_exif


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.glob("*.jpg")}


def test_same_seed_same_bytes_other_seed_other_images(tmp_path: Path) -> None:
    make_demo(tmp_path / "a", n=25, seed=3)
    make_demo(tmp_path / "b", n=25, seed=3)
    make_demo(tmp_path / "c", n=25, seed=4)
    a, b, c = (_digests(tmp_path / x) for x in "abc")
    assert len(a) == 25 and a == b
    assert a != c


def test_demo_images_are_64px_crops_with_their_location_in_exif(tmp_path: Path) -> None:
    make_demo(tmp_path, n=30, seed=0)
    lat, lon, _ = sample_locations(30, 0, 0.5, 15000)
    for i in range(30):
        with Image.open(tmp_path / f"demo_{i:06d}.jpg") as im:
            assert im.format == "JPEG" and im.size == (64, 64)
            fix = gps_from_exif(im.getexif())
        assert fix == pytest.approx((lat[i], lon[i]), abs=1e-6)
        assert -85 <= fix[0] <= 85


def test_locations_follow_cities_and_stay_on_the_map() -> None:
    lat, lon, n_cities = sample_locations(5000, 0, 0.5, 15000)
    assert n_cities > 20000
    assert np.abs(lat).max() <= 85 and (lon >= -180).all() and (lon < 180).all()
    # people live mostly in the northern hemisphere, and so do the demo photos
    assert (lat > 0).mean() > 0.7


def test_crops_wrap_around_the_antimeridian() -> None:
    image = blue_marble()  # (2700, 5400, 3)
    crop = crop_at(image, 66.0, 179.99)  # Chukotka: textured land on both sides of 180
    cy = int((90 - 66.0) / 180 * 2700)
    rows = slice(cy - 32, cy + 32)
    assert crop.shape == (64, 64, 3)
    # centre column x = 5399; columns run 5367..5399 then wrap to 0..30
    np.testing.assert_array_equal(crop[:, 32], image[rows, 5399])
    np.testing.assert_array_equal(crop[:, 33], image[rows, 0])
    np.testing.assert_array_equal(crop[:, -1], image[rows, 30])
    assert not np.array_equal(image[rows, 30], image[rows, 31])  # the check can fail


def test_a_smaller_demo_replaces_a_larger_one(tmp_path: Path) -> None:
    make_demo(tmp_path, n=12)
    make_demo(tmp_path, n=5)
    assert sorted(p.name for p in tmp_path.glob("*.jpg")) == [f"demo_{i:06d}.jpg" for i in range(5)]


def test_repeating_the_same_demo_is_instant_and_repairs_missing_files(tmp_path: Path) -> None:
    make_demo(tmp_path, n=8)
    before = _digests(tmp_path)
    assert make_demo(tmp_path, n=8).seconds == 0.0  # up to date: nothing rewritten
    (tmp_path / "demo_000003.jpg").unlink()
    assert make_demo(tmp_path, n=8).seconds > 0.0
    assert _digests(tmp_path) == before
