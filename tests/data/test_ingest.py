"""Ingestion: every source and bad input ends accepted, rejected with a reason, or duplicate."""

from __future__ import annotations

import functools
import http.server
import io
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from geoloc.config import IndexConfig
from geoloc.data.imagestore import ImageLocations
from geoloc.data.ingest import MANIFEST_COLUMNS, ingest
from geoloc.paths import DataPaths

CFG = IndexConfig(workers=1, max_side=64)


def _paths() -> DataPaths:
    return DataPaths.default()


def _rejects(paths: DataPaths) -> pd.DataFrame:
    return pd.read_parquet(paths.rejects)


def _reason_of(paths: DataPaths, ref_suffix: str) -> str:
    rej = _rejects(paths)
    hit = rej[rej["source_ref"].str.endswith(ref_suffix)]
    assert len(hit) == 1, f"{ref_suffix} not (exactly once) in rejects: {rej.to_dict('records')}"
    return str(hit["reason"].iloc[0])


@pytest.fixture
def photo_folder(tmp_path: Path, write_image) -> Path:
    """Six good photos (JPEG/PNG/WebP, nested) with GPS in EXIF."""
    root = tmp_path / "photos"
    write_image(root / "a.jpg", 48.85, 2.35, seed=1)
    write_image(root / "b.png", -33.9, 151.2, fmt="PNG", seed=2)
    write_image(root / "c.webp", 35.7, 139.7, fmt="WEBP", seed=3)
    write_image(root / "trip" / "d.jpg", 40.7, -74.0, seed=4)
    write_image(root / "trip" / "deeper" / "e.JPG", -22.9, -43.2, seed=5)
    write_image(root / "f.jpeg", 55.75, 37.6, seed=6)
    return root


def test_folder_ingest_reads_exif_gps_recursively_into_the_manifest(photo_folder: Path) -> None:
    paths = _paths()
    report = ingest(str(photo_folder), paths, CFG)
    assert (report.read, report.accepted, report.rejected, report.duplicates) == (6, 6, 0, 0)
    m = pd.read_parquet(paths.processed_manifest)
    assert list(m.columns) == MANIFEST_COLUMNS
    assert m["image_id"].is_unique and set(m["source"]) == {"folder"}
    tokyo = m[m["source_ref"].str.endswith("c.webp")].iloc[0]
    assert (tokyo["lat"], tokyo["lon"]) == pytest.approx((35.7, 139.7), abs=1e-5)
    stored = ImageLocations(m, paths.root)
    for i, row in enumerate(m.itertuples()):
        # one tar shard holds them; each member is named by its content
        assert row.path == f"processed/shards/{row.shard}" and row.member == f"{row.sha256}.jpg"
        with Image.open(io.BytesIO(stored.read(i))) as im:
            assert im.format == "JPEG" and im.mode == "RGB"
            assert (im.width, im.height) == (row.width, row.height)
    assert m["shard"].nunique() == 1


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("CMYK", "JPEG"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("I;16", "PNG"),
        ("L", "JPEG"),
    ],
)
def test_any_colour_mode_becomes_rgb(tmp_path: Path, write_image, mode: str, fmt: str) -> None:
    write_image(tmp_path / "in" / f"x.{fmt.lower()}", 10.0, 20.0, mode=mode, fmt=fmt)
    paths = _paths()
    assert ingest(str(tmp_path / "in"), paths, CFG).accepted == 1
    stored = ImageLocations(pd.read_parquet(paths.processed_manifest), paths.root)
    with Image.open(io.BytesIO(stored.read(0))) as im:
        assert im.mode == "RGB"


def test_exif_orientation_is_applied_and_large_images_are_shrunk(tmp_path: Path, write_image):
    write_image(tmp_path / "in" / "rot.jpg", 10.0, 20.0, size=(400, 200), orientation=6)
    paths = _paths()
    ingest(str(tmp_path / "in"), paths, CFG)
    m = pd.read_parquet(paths.processed_manifest)
    # rotated by 90 degrees (portrait), then the long side shrunk to max_side
    assert (m["width"].iloc[0], m["height"].iloc[0]) == (32, 64)


def _bad_folder(root: Path, write_image) -> None:
    good = write_image(root / "good.jpg", 12.0, 13.0, seed=10)
    (root / "dup_copy.jpg").write_bytes(good.read_bytes())  # same content, other name
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("this is not an image")
    (root / "notes.txt").write_text("not an image type either")
    (root / "truncated.jpg").write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    write_image(root / "nogps.jpg", seed=11)
    write_image(root / "null.jpg", 0.0, 0.0, seed=12)
    write_image(root / "outside.jpg", 95.0, 10.0, seed=13)  # EXIF can say anything
    write_image(root / "huge.png", 1.0, 1.0, size=(300, 300), fmt="PNG", seed=14)


def test_each_bad_file_is_rejected_with_its_reason_and_counts_add_up(tmp_path, write_image):
    root = tmp_path / "bad"
    _bad_folder(root, write_image)
    paths = _paths()
    cfg = CFG.model_copy(update={"max_pixels": 50_000})
    report = ingest(str(root), paths, cfg)
    assert report.read == 10
    assert report.read == report.accepted + report.rejected + report.duplicates
    assert (report.accepted, report.duplicates) == (1, 1)
    expected = {
        "empty.jpg": "empty_file",
        "text.jpg": "not_image",
        "notes.txt": "not_image",
        "truncated.jpg": "corrupt",
        "nogps.jpg": "no_gps",
        "null.jpg": "null_island",
        "outside.jpg": "out_of_range",
        "huge.png": "decompression_bomb",
    }
    for name, reason in expected.items():
        assert _reason_of(paths, f"/{name}") == reason
    # the later copy (sorted order) is the duplicate; the first one is kept
    assert _reason_of(paths, "/good.jpg") == "duplicate"
    assert report.reasons == {r: list(expected.values()).count(r) for r in set(expected.values())}
    rej = _rejects(paths)
    assert list(rej.columns) == ["source", "source_ref", "reason", "detail", "stage"]
    assert (rej["detail"].str.len() > 0).all()


def test_rerunning_an_ingest_changes_nothing(photo_folder: Path, tmp_path: Path, write_image):
    _bad_folder(photo_folder / "bad", write_image)
    paths = _paths()
    first = ingest(str(photo_folder), paths, CFG)
    manifest, rejects = paths.processed_manifest.read_bytes(), paths.rejects.read_bytes()
    again = ingest(str(photo_folder), paths, CFG)
    assert (again.read, again.accepted, again.rejected, again.duplicates) == (
        first.read,
        first.accepted,
        first.rejected,
        first.duplicates,
    )
    assert again.resumed == first.read
    assert paths.processed_manifest.read_bytes() == manifest
    assert paths.rejects.read_bytes() == rejects


def test_a_second_source_with_the_same_photos_only_adds_duplicates(photo_folder: Path, tmp_path):
    paths = _paths()
    ingest(str(photo_folder), paths, CFG)
    rows = ["image_id,latitude,longitude,path"]
    rows += [
        f"m{i},1.5,2.5,photos/{p.name}" for i, p in enumerate(sorted(photo_folder.glob("*.*")))
    ]
    manifest = tmp_path / "list.csv"
    manifest.write_text("\n".join(rows) + "\n")
    report = ingest(str(manifest), paths, CFG)
    assert report.duplicates == report.read == 4 and report.accepted == 0
    assert len(pd.read_parquet(paths.processed_manifest)) == 6


# ------------------------------------------------------------------------------------------
# manifests
# ------------------------------------------------------------------------------------------


def test_manifest_rows_use_their_own_coordinates_ids_and_metadata(tmp_path: Path, write_image):
    write_image(tmp_path / "imgs" / "p1.jpg", seed=1)  # no EXIF GPS: the manifest has it
    write_image(tmp_path / "imgs" / "p2.jpg", 1.0, 1.0, seed=2)  # manifest wins over EXIF
    (tmp_path / "m.csv").write_text(
        "id,latitude,longitude,image_path,captured_at,sequence\n"
        "p1,45.5,-73.6,imgs/p1.jpg,2021-06-01T12:00:00Z,seqA\n"
        "p2,-1.3,36.8,imgs/p2.jpg,,\n"
    )
    paths = _paths()
    report = ingest(str(tmp_path / "m.csv"), paths, CFG)
    assert report.accepted == 2
    m = pd.read_parquet(paths.processed_manifest).set_index("image_id")
    assert (m.loc["p2", "lat"], m.loc["p2", "lon"]) == (-1.3, 36.8)
    assert m.loc["p1", "sequence_id"] == "seqA" and pd.isna(m.loc["p2", "sequence_id"])
    assert m.loc["p1", "captured_at"] == pd.Timestamp("2021-06-01T12:00:00Z")
    assert str(m["captured_at"].dtype) == "datetime64[ns, UTC]"


def test_bad_manifest_rows_are_rejected_with_reasons(tmp_path: Path, write_image):
    write_image(tmp_path / "imgs" / "ok.jpg", seed=1)
    write_image(tmp_path / "imgs" / "ok2.jpg", seed=2)
    (tmp_path / "secret.jpg").write_bytes(b"outside the manifest folder")
    sub = tmp_path / "sub"
    sub.mkdir()
    (tmp_path / "imgs").rename(sub / "imgs")
    (sub / "m.csv").write_text(
        "id,lat,lon,path\n"
        "ok,10,10,imgs/ok.jpg\n"
        "ok,11,11,imgs/ok2.jpg\n"  # duplicate id
        "nan,nan,10,imgs/ok2.jpg\n"
        "far,10,200,imgs/ok2.jpg\n"
        "zero,0,0,imgs/ok2.jpg\n"
        "esc,10,10,../secret.jpg\n"
        "gone,10,10,imgs/missing.jpg\n"
    )
    paths = _paths()
    report = ingest(str(sub / "m.csv"), paths, CFG)
    assert (report.read, report.accepted, report.rejected) == (7, 1, 6)
    rej = _rejects(paths).set_index("source_ref")["reason"].to_dict()
    assert sorted(rej.values()) == sorted(
        ["duplicate_id", "nan_coords", "out_of_range", "null_island", "path_escape", "missing_file"]
    )
    assert rej[f"{(sub / 'm.csv').as_posix()}:6:../secret.jpg"] == "path_escape"


def test_parquet_manifest_with_mp16_spelling(tmp_path: Path, write_image):
    write_image(tmp_path / "a4" / "b1" / "123.jpg", seed=1)
    pd.DataFrame({"IMG_ID": ["a4/b1/123.jpg"], "LAT": [52.5], "LON": [13.4]}).to_parquet(
        tmp_path / "mp16.parquet"
    )
    paths = _paths()
    assert ingest(str(tmp_path / "mp16.parquet"), paths, CFG).accepted == 1
    m = pd.read_parquet(paths.processed_manifest)
    assert m["image_id"].tolist() == ["a4/b1/123.jpg"] and m["lat"].tolist() == [52.5]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def http_folder(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A local HTTP server over a folder: (folder, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.server
def test_manifest_urls_are_fetched_into_raw_and_dead_ones_rejected(http_folder, write_image):
    www, base = http_folder
    write_image(www / "u1.jpg", seed=1)
    write_image(www / "u2.png", fmt="PNG", seed=2)
    dead = f"http://127.0.0.1:{_closed_port()}/x.jpg"
    (www.parent / "urls.csv").write_text(
        "id,lat,lon,url\n"
        f"u1,10,10,{base}/u1.jpg\n"
        f"u2,20,20,{base}/u2.png\n"
        f"u3,30,30,{base}/missing.jpg\n"
        f"u4,40,40,{dead}\n"
    )
    paths = _paths()
    report = ingest(str(www.parent / "urls.csv"), paths, CFG, fetch_urls=True)
    assert (report.accepted, report.rejected) == (2, 2)
    fetched = sorted(p.name for p in (paths.raw / "manifest").iterdir())
    assert [(n[:3], n[-4:]) for n in fetched] == [("u1-", ".jpg"), ("u2-", ".png")]
    rej = _rejects(paths)
    assert set(rej["reason"]) == {"unreachable"} and set(rej["stage"]) == {"fetch"}
    assert rej["detail"].str.contains("404").any()


# ------------------------------------------------------------------------------------------
# resume
# ------------------------------------------------------------------------------------------


@pytest.fixture
def many_photos(tmp_path: Path, write_image) -> Path:
    root = tmp_path / "many"
    for i in range(40):
        write_image(root / f"p{i:03d}.jpg", -40 + 2 * i, -170 + 8 * i, size=(16, 16), seed=i)
    write_image(root / "zz_nogps.jpg", seed=99)
    return root


class Interrupt(Exception):
    pass


def test_ingest_resumes_after_an_exception_without_duplicates(many_photos: Path, tmp_path: Path):
    reference = DataPaths(tmp_path / "reference")
    ingest(str(many_photos), reference, CFG, chunk_size=8)

    def stop_after_two(parts: int) -> None:
        if parts == 2:
            raise Interrupt

    paths = _paths()
    with pytest.raises(Interrupt):
        ingest(str(many_photos), paths, CFG, chunk_size=8, on_chunk=stop_after_two)
    assert not paths.processed_manifest.exists()  # nothing half-finished is published
    report = ingest(str(many_photos), paths, CFG, chunk_size=8)
    assert report.resumed == 16 and report.read == 41
    assert (report.accepted, report.rejected, report.duplicates) == (40, 1, 0)
    assert paths.processed_manifest.read_bytes().__len__() > 0
    pd.testing.assert_frame_equal(
        pd.read_parquet(paths.processed_manifest).drop(columns="source_ref"),
        pd.read_parquet(reference.processed_manifest).drop(columns="source_ref"),
    )


def test_ingest_resumes_after_the_process_is_killed(many_photos: Path, tmp_path: Path):
    env = dict(os.environ, GEOLOC_FAULT_AFTER="ingest:2")
    cmd = [sys.executable, "-c", "from geoloc.cli import run; run()", "data", "ingest"]
    cmd += [str(many_photos), "--set", "max_side=64", "--workers", "2", "--chunk-size", "8"]
    killed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9, killed.stderr
    paths = _paths()
    journal = list((paths.state / "ingest").glob("*/part-*.parquet"))
    assert len(journal) == 2  # killed right after the second chunk of 8 was committed
    env.pop("GEOLOC_FAULT_AFTER")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "read 41 = accepted 40 + rejected 1 + duplicates 0" in done.stdout
    assert "16 resumed" in done.stdout
    m = pd.read_parquet(paths.processed_manifest)
    assert len(m) == 40 and m["sha256"].is_unique


def test_parallel_ingests_into_one_data_root_keep_both(tmp_path: Path, write_image) -> None:
    for name in ("left", "right"):
        for i in range(6):
            write_image(tmp_path / name / f"{i}.jpg", 10 + i, 20, seed=i + 100 * len(name))
    paths = _paths()
    threads = [
        threading.Thread(target=ingest, args=(str(tmp_path / name), paths, CFG))
        for name in ("left", "right")
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    m = pd.read_parquet(paths.processed_manifest)
    assert len(m) == 12 and m["sha256"].is_unique


def test_an_empty_folder_is_an_empty_result_not_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    paths = _paths()
    report = ingest(str(tmp_path / "empty"), paths, CFG)
    assert (report.read, report.accepted, report.rejected, report.duplicates) == (0, 0, 0, 0)
    assert list(pd.read_parquet(paths.processed_manifest).columns) == MANIFEST_COLUMNS


def test_an_id_taken_by_another_source_is_a_duplicate_id(tmp_path: Path, write_image) -> None:
    write_image(tmp_path / "a" / "one.jpg", seed=1)
    write_image(tmp_path / "b" / "two.jpg", seed=2)
    (tmp_path / "a" / "m.csv").write_text("id,lat,lon,path\nsame,1,1,one.jpg\n")
    (tmp_path / "b" / "m.csv").write_text("id,lat,lon,path\nsame,2,2,two.jpg\n")
    paths = _paths()
    ingest(str(tmp_path / "a" / "m.csv"), paths, CFG)
    report = ingest(str(tmp_path / "b" / "m.csv"), paths, CFG)
    assert (report.accepted, report.rejected, report.reasons) == (0, 1, {"duplicate_id": 1})
    assert pd.read_parquet(paths.processed_manifest)["lat"].tolist() == [1.0]


def test_links_leading_nowhere_or_outside_are_counted_rejects(tmp_path: Path, write_image):
    """A dangling link and a linked folder outside are in rejects.parquet; counts add up."""
    root = tmp_path / "photos"
    write_image(root / "ok.jpg", 10.0, 20.0, seed=1)
    write_image(tmp_path / "elsewhere" / "private.jpg", 11.0, 21.0, seed=2)
    (root / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (root / "trip").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    paths = _paths()
    report = ingest(str(root), paths, CFG)
    assert (report.read, report.accepted, report.rejected) == (3, 1, 2)
    assert report.read == report.accepted + report.rejected + report.duplicates
    assert _reason_of(paths, "/gone.jpg") == "missing_file"
    assert _reason_of(paths, "/trip") == "path_escape"


def test_one_malformed_manifest_row_is_rejected_and_the_rest_ingested(tmp_path, write_image):
    write_image(tmp_path / "a.jpg", seed=1)
    write_image(tmp_path / "b.jpg", seed=2)
    (tmp_path / "m.csv").write_text(
        "id,lat,lon,path\na,10,10,a.jpg\nx,11,11,a.jpg,stray\nb,12,12,b.jpg\nn,north,10,b.jpg\n"
    )
    paths = _paths()
    report = ingest(str(tmp_path / "m.csv"), paths, CFG)
    assert (report.read, report.accepted, report.rejected) == (4, 2, 2)
    assert report.reasons == {"malformed_row": 1, "nan_coords": 1}
    rej = _rejects(paths).set_index("reason")["detail"]
    assert rej["malformed_row"] == "expected 4 fields, found 5"
    assert rej["nan_coords"] == "lat/lon not numeric: lat='north', lon='10'"
