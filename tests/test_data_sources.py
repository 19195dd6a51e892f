"""Sources: manifest column spellings, folder listing, and unusable inputs as a whole."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest

from geoloc.data.sources import RawItem, SourceReject, create_source
from geoloc.data.sources.manifest import COLUMNS, read_manifest
from geoloc.errors import DataError


@pytest.mark.parametrize(
    "csv",
    [
        "id,lat,lon,path\nx1,10.5,-20.25,a.jpg\n",
        "id,latitude,longitude,thumb_original_url\nx1,10.5,-20.25,a.jpg\n",  # OSV-5M
        "IMG_ID,LAT,LON\nx1,10.5,-20.25\n",  # MP-16: the id is the path
        "image_id,Latitude,Longitude,image_path,captured_at,sequence_id\nx1,10.5,-20.25,a.jpg,"
        "2020-01-02T03:04:05Z,s9\n",
    ],
)
def test_common_spellings_normalise_to_one_schema(csv: str) -> None:
    df = read_manifest(io.BytesIO(csv.encode()), "m.csv")
    assert list(df.columns) == COLUMNS
    row = df.iloc[0]
    assert (row["image_id"], row["lat"], row["lon"]) == ("x1", 10.5, -20.25)
    assert row["image"] in ("a.jpg", "x1")


def test_parquet_manifest_is_read_too(tmp_path: Path) -> None:
    path = tmp_path / "m.parquet"
    pd.DataFrame({"id": [1, 2], "lat": [1.0, 2.0], "lng": [3.0, 4.0]}).to_parquet(path)
    df = read_manifest(path, path.name)
    assert df["image_id"].tolist() == ["1", "2"] and df["lon"].tolist() == [3.0, 4.0]


def test_manifest_without_coordinates_is_unusable_and_named() -> None:
    with pytest.raises(DataError, match=r"'photos\.csv' has no coordinate columns"):
        read_manifest(io.BytesIO(b"id,path\n1,a.jpg\n"), "photos.csv")


def test_folder_source_lists_images_recursively_and_refuses_other_files(tmp_path: Path) -> None:
    for rel in ["b.jpg", "sub/a.PNG", "sub/deep/c.webp", "notes.txt", ".hidden/x.jpg", ".DS_Store"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    entries = list(create_source(str(tmp_path)).items())
    items = [e.source_ref.rsplit("/", 1)[-1] for e in entries if isinstance(e, RawItem)]
    rejects = [e for e in entries if isinstance(e, SourceReject)]
    assert sorted(items) == ["a.PNG", "b.jpg", "c.webp"]
    assert [(r.source_ref.endswith("notes.txt"), r.reason) for r in rejects] == [
        (True, "not_image")
    ]


def test_links_out_of_the_folder_are_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"x")
    root = tmp_path / "root"
    root.mkdir()
    (root / "link.jpg").symlink_to(outside)
    (entry,) = create_source(str(root)).items()
    assert isinstance(entry, SourceReject) and entry.reason == "path_escape"


@pytest.mark.parametrize("spec", ["missing_folder", "missing.csv"])
def test_missing_inputs_fail_with_their_name(spec: str) -> None:
    with pytest.raises(DataError, match=spec):
        create_source(spec)
