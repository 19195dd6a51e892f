"""Sources: manifest column spellings, folder listing, and unusable inputs as a whole."""

from __future__ import annotations

import io
from pathlib import Path

import pandas as pd
import pytest

from geoloc.data.sources import RawItem, SourceReject, create_source
from geoloc.data.sources.manifest import COLUMNS, checked_rows, iter_manifest, read_manifest
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


def test_dangling_links_and_linked_folders_outside_are_rejects_not_silence(
    tmp_path: Path,
) -> None:
    """Nothing listed vanishes: each odd entry is a reject with its reason."""
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "private.jpg").write_bytes(b"x")
    root = tmp_path / "root"
    (root / "inner").mkdir(parents=True)
    (root / "inner" / "a.jpg").write_bytes(b"x")
    (root / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (root / "loop.jpg").symlink_to(root / "loop.jpg")
    (root / "trip").symlink_to(outside, target_is_directory=True)
    (root / "again").symlink_to(root / "inner", target_is_directory=True)  # inside: listed once
    entries = list(create_source(str(root)).items())
    got = {e.source_ref.rsplit("/", 1)[-1]: e for e in entries}
    assert sorted(got) == ["a.jpg", "gone.jpg", "loop.jpg", "trip"]
    assert isinstance(got["a.jpg"], RawItem)
    reasons = {k: (e.reason, e.detail) for k, e in got.items() if isinstance(e, SourceReject)}
    assert reasons["gone.jpg"][0] == "missing_file" and "deleted.jpg" in reasons["gone.jpg"][1]
    assert reasons["loop.jpg"][0] == "missing_file"
    assert reasons["trip"] == ("path_escape", f"links to a folder outside '{root}'")


def test_a_non_numeric_coordinate_keeps_its_text_in_the_reject(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"x")
    (tmp_path / "m.csv").write_text("id,lat,lon,path\nx,48°51'N,2.35,a.jpg\ny,,3,a.jpg\n")
    first, second = create_source(str(tmp_path / "m.csv")).items()
    assert isinstance(first, SourceReject) and first.reason == "nan_coords"
    assert first.detail == "lat/lon not numeric: lat=\"48°51'N\", lon='2.35'"
    assert isinstance(second, SourceReject) and "lat=''" in second.detail


@pytest.mark.parametrize("sep", [",", "\t"])
def test_a_row_with_an_extra_field_is_a_reject_and_the_rest_is_read(
    tmp_path: Path, sep: str
) -> None:
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        (tmp_path / name).write_bytes(b"x")
    rows = [["id", "lat", "lon", "path"], ["a", "1", "1", "a.jpg"],
            ["b", "2", "2", "b.jpg", "stray"], ["c", "3", "3", "c.jpg"]]  # fmt: skip
    path = tmp_path / ("m.csv" if sep == "," else "m.tsv")
    path.write_text("\n".join(sep.join(r) for r in rows) + "\n")
    entries = list(create_source(str(path)).items())
    assert [type(e).__name__ for e in entries] == ["RawItem", "SourceReject", "RawItem"]
    bad = entries[1]
    assert bad.reason == "malformed_row" and bad.detail == "expected 4 fields, found 5"
    assert bad.source_ref == f"{path.as_posix()}:2"
    assert entries[2].source_ref == f"{path.as_posix()}:3:c.jpg"  # later rows keep their numbers
    assert [e.lat for e in entries if isinstance(e, RawItem)] == [1.0, 3.0]


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_a_manifest_streamed_in_chunks_gives_the_rows_of_the_whole_file(tmp_path, fmt) -> None:
    """A 10^6-row manifest is read a chunk at a time; row numbers, repeated ids across chunks
    and a malformed row after the first chunk come out as from the whole file."""
    lines = ["image_id,path,lat,lon"] + [f"id{i % 7},p{i}.jpg,{i % 80}.5,10" for i in range(12)]
    lines[4] = "id3,p3.jpg,nan,10"
    if fmt == "csv":
        lines.insert(9, "idx,px.jpg,1,2,extra,fields")  # malformed: more fields than the header
        path = tmp_path / "m.csv"
        path.write_text("\n".join(lines) + "\n")
    else:
        path = tmp_path / "m.parquet"
        rows = [line.split(",") for line in lines[1:]]
        pd.DataFrame(rows, columns=lines[0].split(",")).to_parquet(path)
    whole = list(checked_rows(read_manifest(path, path.name), "m", "manifest"))
    for chunk_rows in (1, 3, 5, 100):
        chunked = checked_rows(iter_manifest(path, path.name, chunk_rows), "m", "manifest")
        assert list(chunked) == whole
    refs = [(r.ref if hasattr(r, "ref") else r.source_ref).split(":")[1] for r in whole]
    assert refs == [str(i + 1) for i in range(len(whole))]
    assert sum(getattr(r, "reason", "") == "duplicate_id" for r in whole) >= 4
