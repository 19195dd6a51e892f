"""`geoloc data synth`: a deterministic synthetic world in the folder and OSV-5M layouts, whose
crops carry their location (learnable) and which ingests and indexes like real photos."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import ExifTags, Image

from geoloc.cli import main
from geoloc.config import IndexConfig
from geoloc.data import synth
from geoloc.data.features import is_land
from geoloc.data.index import build_index
from geoloc.data.ingest import ingest
from geoloc.data.synth import OSV5M_COLUMNS, make_synth, sample_places, towns
from geoloc.data.synth_world import PX_PER_DEG, render
from geoloc.errors import DataError
from geoloc.paths import DataPaths


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != synth.STAMP_NAME
    }


def test_same_seed_same_bytes_whatever_the_workers(tmp_path: Path, monkeypatch) -> None:
    make_synth(tmp_path / "a", 60, "osv5m", seed=3, workers=1)
    monkeypatch.setattr(synth, "CHUNK", 7)  # other chunk boundaries, other processes
    make_synth(tmp_path / "b", 60, "osv5m", seed=3, workers=2)
    a, b = _files(tmp_path / "a"), _files(tmp_path / "b")
    assert len(a) == 62 and a == b
    make_synth(tmp_path / "c", 60, "osv5m", seed=4, workers=1)
    c = _files(tmp_path / "c")
    assert c["train.csv"] != a["train.csv"]
    assert not set(a.values()) & set(c.values())  # other places, other pixels


def test_osv5m_layout_has_the_published_columns_beside_the_images(tmp_path: Path) -> None:
    tmp_path = tmp_path / "osv5m"
    make_synth(tmp_path, 200, "osv5m", seed=0, test_frac=0.3, workers=1)
    train = pd.read_csv(tmp_path / "train.csv")
    test = pd.read_csv(tmp_path / "test.csv")
    header = (tmp_path / "train.csv").read_text().splitlines()[0]
    assert header == ",".join(OSV5M_COLUMNS)
    assert header.startswith("id,latitude,longitude,thumb_original_url,country,sequence,")
    assert len(train) + len(test) == 200 and len(test) > 0
    assert not set(train["sequence"]) & set(test["sequence"])  # whole sequences per split
    both = pd.concat([train, test])
    assert both["id"].is_unique and both["id"].astype(str).str.len().eq(15).all()
    for split, table in (("train", train), ("test", test)):
        on_disk = {p.stem for p in (tmp_path / "images" / split).glob("*.jpg")}
        assert on_disk == set(table["id"].astype(str))
    assert both["country"].str.fullmatch("[A-Z]{2}").all()
    assert both["land_cover"].between(1, 11).all() and both["soil"].between(1, 14).all()
    assert set(both["drive_side"]) <= {0, 1} and both["climate"].between(1, 30).all()
    assert (both["dist_sea"] >= 0).all() and both["captured_at"].gt(1.3e12).all()
    assert both["sub-region"].isna().all()
    gb = both[both["country"] == "GB"]
    assert gb.empty or (gb["drive_side"] == 1).all()
    with Image.open(next((tmp_path / "images" / "train").glob("*.jpg"))) as im:
        assert im.size == (64, 64) and ExifTags.IFD.GPSInfo not in im.getexif()


def test_folder_layout_ingests_and_indexes(capsys: pytest.CaptureFixture[str]) -> None:
    paths = DataPaths.default()
    assert main(["data", "synth", "--n", "240", "--layout", "folder", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "240 images (folder)" in out and f"geoloc data ingest {paths.raw / 'synth'}" in out
    cfg = IndexConfig(resolution=5, parent_resolution=4, split_resolution=2,
                      min_images_per_class=3, workers=1)  # fmt: skip
    report = ingest(str(paths.raw / "synth"), paths, cfg)
    assert (report.read, report.accepted) == (240, 240)
    manifest = pd.read_parquet(paths.processed_manifest).sort_values("source_ref")
    places = sample_places(240, 0)
    order = np.argsort([f"{i}" for i in synth.image_ids(240, 0)])  # files sort by id
    # EXIF keeps seconds to 1/1000: ~3 cm
    assert np.allclose(manifest["lat"], places.lat[order], atol=1e-6)
    assert np.allclose(manifest["lon"], places.lon[order], atol=1e-6)
    index = build_index(paths, cfg)
    assert index.n_images == 240 and index.n_classes >= 5


def test_places_follow_towns_by_population_and_stay_on_land() -> None:
    places = sample_places(20000, seed=1, test_frac=0.1)
    t = towns()
    km = np.hypot(
        (places.lat - t["lat"].to_numpy()[places.town]) * 111.2,
        (places.lon - t["lon"].to_numpy()[places.town]) * 111.2 * np.cos(np.radians(places.lat)),
    )
    assert np.median(km) < 10 and np.quantile(km, 0.95) > 20  # dense centres, a long tail
    big = t["population"].to_numpy()[places.town] >= 1_000_000
    assert big.mean() > 0.3  # ~1% of the towns, a large share of the images
    assert is_land(places.lat, places.lon).mean() > 0.95
    assert 0.05 < places.test.mean() < 0.15
    runs = np.diff(places.sequence)
    assert set(np.unique(runs)) <= {0, 1} and (runs == 0).mean() > 0.8  # sequences of images


def _crops_at(lat: np.ndarray, lon: np.ndarray, metres_east: float) -> np.ndarray:
    lon2 = lon + metres_east / 1000 / (111.195 * np.cos(np.radians(lat)))
    return render(lat, lon2).astype(np.float32)


def test_crops_carry_their_location() -> None:
    """The learnability proxy: a crop 300 m away is recognised as the same place among 80 towns
    by plain pixel distance; crops look more alike the nearer they are (neighbouring r7 cells
    look alike)."""
    places = sample_places(4000, seed=2)
    pick = np.sort(np.unique(places.town, return_index=True)[1])[:80]  # 80 different towns
    lat, lon = places.lat[pick], places.lon[pick]
    base = _crops_at(lat, lon, 0)
    near = _crops_at(lat, lon, 300)
    dists = ((near[:, None] - base[None]) ** 2).mean(axis=(2, 3, 4))  # (80, 80)
    assert (dists.argmin(axis=1) == np.arange(80)).mean() >= 0.95
    gap = {m: np.abs(_crops_at(lat, lon, m) - base).mean() for m in (300, 3000, 300_000)}
    assert gap[300] < gap[3000] < gap[300_000]


def test_overlapping_crops_share_their_pixels_across_the_antimeridian() -> None:
    lat = np.array([10.0, -35.0])
    lon = np.array([179.99, 179.995])
    a = render(lat, lon)
    step = 10 / (PX_PER_DEG * np.cos(np.radians(lat)))  # 10 columns east, past 180
    b = render(lat, (lon + step + 180.0) % 360.0 - 180.0)
    assert (b[:, :, :54].astype(int) - a[:, :, 10:]).__abs__().max() <= 1


def test_repeating_is_instant_and_foreign_folders_are_refused(tmp_path: Path) -> None:
    first = make_synth(tmp_path / "s", 20, "folder", workers=1)
    again = make_synth(tmp_path / "s", 20, "folder", workers=1)
    assert not first.skipped and again.skipped
    stamp = json.loads((tmp_path / "s" / synth.STAMP_NAME).read_text())
    assert stamp["complete"] and stamp["n"] == 20
    smaller = make_synth(tmp_path / "s", 10, "folder", workers=1)  # replaces its own output
    assert not smaller.skipped and len(list((tmp_path / "s").rglob("*.jpg"))) == 10
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not empty and holds no synth dataset"):
        make_synth(tmp_path / "mine", 10, "folder")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(DataError, match="is a file, not a folder"):
        make_synth(tmp_path / "afile", 10, "folder")
    with pytest.raises(DataError, match="layout 'zip'"):
        make_synth(tmp_path / "z", 10, "zip")


def test_the_osv5m_layout_ingests_as_osv5m_with_its_attributes(tmp_path: Path) -> None:
    out = tmp_path / "osv5m"
    make_synth(out, 60, "osv5m", seed=5, test_frac=0.5, workers=1)
    paths = DataPaths.default()
    report = ingest(str(out), paths, IndexConfig(workers=1))  # --format auto finds OSV-5M
    assert (report.read, report.accepted) == (60, 60)
    manifest = pd.read_parquet(paths.processed_manifest).set_index("image_id")
    train, test = pd.read_csv(out / "train.csv"), pd.read_csv(out / "test.csv")
    assert len(train) and len(test)
    table = pd.concat([train, test])
    table = table.set_index(table["id"].astype(str))
    assert set(manifest["source"]) == {"osv5m"} and set(manifest.index) == set(table.index)
    rows = manifest.loc[table.index]
    assert np.allclose(rows["lat"], table["latitude"]) and np.allclose(
        rows["lon"], table["longitude"]
    )
    assert (rows["country"] == table["country"]).all()
    assert (rows["sequence_id"] == table["sequence"]).all()
