"""Published dataset layouts by name: OSV-5M (folder and zip shards) and MP-16 ingest as they
ship, with no renaming; their per-image attributes reach the index; bad input is a reject with
its reason; URLs are fetched only when asked, and a dead network is one error, not N waits."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from fixtures.image_files import image_bytes
from fixtures.published_layouts import closed_port, osv5m_rows, write_mp16, write_osv5m

from geoloc.cli import main
from geoloc.config import IndexConfig
from geoloc.data.attributes import ATTRIBUTE_COLUMNS
from geoloc.data.ingest import ingest
from geoloc.data.sources import create_source, detect_format
from geoloc.errors import DataError
from geoloc.paths import DataPaths

CFG = IndexConfig(workers=1, max_side=64)
SMALL_INDEX = ["--set", "resolution=2", "--set", "parent_resolution=1", "--set",
               "split_resolution=1", "--set", "min_images_per_class=1"]  # fmt: skip


def _counts_add_up(report) -> None:
    assert report.read == report.accepted + report.rejected + report.duplicates


def _rejects() -> pd.DataFrame:
    return pd.read_parquet(DataPaths.default().rejects)


def _manifest() -> pd.DataFrame:
    return pd.read_parquet(DataPaths.default().processed_manifest)


# ------------------------------------------------------------------------------------------
# OSV-5M
# ------------------------------------------------------------------------------------------


def test_osv5m_folder_ingests_by_id_and_its_attributes_reach_the_index(tmp_path, capsys):
    osv = write_osv5m(tmp_path / "osv5m", n=30, form="folder")
    assert main(["data", "ingest", str(osv.root), "--workers", "1"]) == 0  # auto-detected
    assert "read 30 = accepted 30 + rejected 0 + duplicates 0" in capsys.readouterr().out
    m = _manifest()
    assert set(m["source"]) == {"osv5m"} and sorted(m["image_id"]) == sorted(osv.rows["id"])
    assert not (DataPaths.default().raw / "osv5m").exists()  # nothing was fetched
    assert main(["index", "build", *SMALL_INDEX]) == 0
    images = pd.read_parquet(DataPaths.default().images).set_index("image_id")
    assert set(ATTRIBUTE_COLUMNS) <= set(images.columns)
    rows = osv.rows.set_index("id")
    for image_id in rows.index[:7]:
        want, got = rows.loc[image_id], images.loc[image_id]
        assert (got["country"], got["region"], got["city"]) == (
            want["country"], want["region"], want["city"]
        )  # fmt: skip
        assert got["sub_region"] == want["sub-region"]
        for col in ("land_cover", "climate", "soil", "drive_side", "dist_sea"):
            assert got[col] == pytest.approx(float(want[col]))
        assert got["sequence_id"] == want["sequence"]
        assert got["lat"] == pytest.approx(float(want["latitude"]))
        assert got["captured_at"] == pd.Timestamp(int(want["captured_at"]), unit="ms", tz="UTC")
    assert str(images["dist_sea"].dtype) == "float64"


def test_osv5m_zip_shards_are_read_in_place_and_give_the_same_images(tmp_path: Path) -> None:
    """The same rows as loose files and as zip members: the zip form is all duplicates of the
    folder form (same decoded pixels), and nothing is extracted or fetched."""
    folder = write_osv5m(tmp_path / "as_files", n=24, form="folder")
    zipped = write_osv5m(tmp_path / "as_zips", n=24, form="zip", shards=3)
    paths = DataPaths.default()
    first = ingest(str(zipped.table), paths, CFG.model_copy(update={"workers": 2}))
    assert (first.read, first.accepted, first.rejected) == (24, 24, 0)
    again = ingest(str(folder.root), paths, CFG)
    assert (again.read, again.accepted, again.duplicates) == (24, 0, 24)
    files = sorted(p.name for p in (tmp_path / "as_zips").rglob("*") if p.is_file())
    assert files == ["00.zip", "01.zip", "02.zip", "train.csv"]
    assert not (paths.raw / "osv5m").exists()
    m = _manifest()
    assert m["source_ref"].str.startswith(zipped.table.as_posix()).all()
    assert set(m["country"]) == {"FR", "DE", "US", "JP", "BR", "KE"}


def test_osv5m_zipped_rows_put_aside_on_disk_come_out_as_from_memory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from geoloc.data.sources.archive import ArchiveOrder

    zipped = write_osv5m(tmp_path / "osv5m", n=40, form="zip", shards=3)
    table = pd.read_csv(zipped.table, dtype=str)
    table.sample(frac=1, random_state=0).to_csv(zipped.table, index=False)  # ids out of zip order

    def listing() -> list[tuple]:
        items = create_source(str(zipped.root)).items()
        return [(i.source_ref, i.local_path, i.member, i.lat, i.attributes) for i in items]

    in_memory = listing()
    monkeypatch.setattr(ArchiveOrder, "BUFFER", 3)  # through pickles on disk, 3 rows at a time
    assert listing() == in_memory and len(in_memory) == 40
    # zip by zip, each in stored order (the fixture stores a zip's members sorted by name)
    assert [(p, m) for _, p, m, *_ in in_memory] == sorted((p, m) for _, p, m, *_ in in_memory)


def _osv5m_with_bad_input(root: Path) -> tuple[Path, list[str], bytes]:
    """30 good rows in 3 zips, the second truncated, plus rows whose zip member is text
    (`bad_text`), a truncated JPEG (`bad_cut`), or nothing at all (`bad_none`)."""
    osv = write_osv5m(root, n=30, form="zip", shards=3)
    extra = osv5m_rows(3)
    extra["id"] = ["bad_text", "bad_cut", "bad_none"]
    pd.concat([osv.rows, extra]).to_csv(osv.table, index=False)
    jpeg = image_bytes(size=(32, 24), seed=77)
    with zipfile.ZipFile(osv.zips[0].parent / "03.zip", "w") as zf:
        zf.writestr("bad_text.jpg", b"this member is text, not a JPEG")
        zf.writestr("bad_cut.jpg", jpeg[: len(jpeg) // 2])
        zf.writestr("README.txt", b"not listed in train.csv: ignored")
    good = osv.zips[1].read_bytes()
    osv.zips[1].write_bytes(good[: len(good) // 2])  # a download cut in the middle
    in_bad_zip = [i for k, i in enumerate(osv.images) if k % 3 == 1]
    return osv.zips[1], in_bad_zip, good


def test_osv5m_bad_input_is_rejected_with_reasons_and_a_corrupt_zip_named(tmp_path, capsys):
    bad_zip, lost_ids, good_bytes = _osv5m_with_bad_input(tmp_path / "osv5m")
    argv = ["data", "ingest", str(tmp_path / "osv5m"), "--format", "osv5m", "--workers", "1"]
    assert main(argv) == 1  # everything else is ingested, the command still fails
    out, err = capsys.readouterr()
    # 33 rows + the unreadable zip itself; its 10 images, bad_none: missing_file
    assert "read 34 = accepted 20 + rejected 14 + duplicates 0" in out
    assert err.strip().splitlines()[-1].startswith(f"error: zip '{bad_zip}' cannot be read")
    assert "note: " in out and "--fetch-urls" in out  # the rows with a URL and no file
    rej = _rejects().set_index("source_ref")
    assert rej.loc[bad_zip.as_posix(), "reason"] == "corrupt"
    by_id = {ref.rsplit(":", 1)[-1]: row for ref, row in rej.iterrows()}
    assert by_id["bad_text"]["reason"] == "not_image"
    assert by_id["bad_cut"]["reason"] == "corrupt"
    for image_id in [*lost_ids, "bad_none"]:
        assert by_id[image_id]["reason"] == "missing_file" and by_id[image_id]["stage"] == "source"
    assert "01.zip" in by_id[lost_ids[0]]["detail"]  # where it may be
    assert "unreachable" not in set(rej["reason"])  # no URL was tried

    bad_zip.write_bytes(good_bytes)  # the zip downloaded again: its images come in
    assert main(argv) == 0
    assert "read 33 = accepted 30 + rejected 3 + duplicates 0" in capsys.readouterr().out
    assert bad_zip.as_posix() not in set(_rejects()["source_ref"])
    assert set(lost_ids) <= set(_manifest()["image_id"])


def test_osv5m_table_alone_or_one_split_of_a_folder(tmp_path: Path) -> None:
    osv = write_osv5m(tmp_path / "osv5m", n=12, form="folder")
    test_rows = osv5m_rows(4)
    test_rows["id"] = [f"t{i}" for i in range(4)]
    test_rows.to_csv(osv.root / "test.csv", index=False)
    for i, image_id in enumerate(test_rows["id"]):
        path = osv.root / "images" / "test" / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(image_bytes(seed=500 + i))
    both = list(create_source(str(osv.root)).items())
    assert len(both) == 16 and all(e.local_path is not None for e in both)
    train_only = create_source(str(osv.root), split="train")
    assert [t.name for t in train_only.tables] == ["train.csv"]
    (only_test,) = create_source(str(osv.root / "test.csv")).tables
    assert only_test.name == "test.csv"


def test_osv5m_without_its_images_folder_is_one_clear_error(tmp_path: Path) -> None:
    osv5m_rows(5).to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DataError, match=r"has no images folder: expected .*images/train"):
        create_source(str(tmp_path / "train.csv"))


# ------------------------------------------------------------------------------------------
# MP-16 / im2gps3k
# ------------------------------------------------------------------------------------------


def test_mp16_by_name_finds_its_images_folder_and_keeps_country_codes(tmp_path, capsys):
    mp16 = write_mp16(tmp_path / "mp16", n=12)
    argv = ["data", "ingest", str(mp16.table), "--format", "mp16", "--workers", "1"]
    assert main(argv) == 0
    assert "read 12 = accepted 12 + rejected 0 + duplicates 0" in capsys.readouterr().out
    m = _manifest().set_index("image_id")
    assert sorted(m.index) == sorted(mp16.rows["IMG_ID"])  # the relative path is the id
    assert set(m["source"]) == {"mp16"}
    first = mp16.rows.iloc[0]
    assert (m.loc[first["IMG_ID"], "lat"], m.loc[first["IMG_ID"], "lon"]) == (
        pytest.approx(first["LAT"]), pytest.approx(first["LON"])
    )  # fmt: skip
    assert m.loc[first["IMG_ID"], "country"] == "FR"  # country_code, upper-cased
    assert m.loc[first["IMG_ID"], "city"] == "Paris"


def test_im2gps3k_style_flat_names_and_missing_files(tmp_path: Path) -> None:
    root = tmp_path / "im2gps3k"
    names = [f"{1029452221 + i}_a1e4ef8e7b_{i}.jpg" for i in range(4)]
    for i, name in enumerate(names[:3]):
        (root / "im2gps3ktest").mkdir(parents=True, exist_ok=True)
        (root / "im2gps3ktest" / name).write_bytes(image_bytes(seed=300 + i))
    pd.DataFrame({"IMG_ID": names, "LAT": [1.0, 2.0, 3.0, 4.0], "LON": [5.0, 6.0, 7.0, 8.0]}
                 ).to_csv(root / "im2gps3k_places365.csv", index=False)  # fmt: skip
    report = ingest(str(root / "im2gps3k_places365.csv"), DataPaths.default(), CFG)
    assert (report.read, report.accepted, report.rejected) == (4, 3, 1)
    assert report.reasons == {"missing_file": 1}


# ------------------------------------------------------------------------------------------
# formats
# ------------------------------------------------------------------------------------------


def test_auto_detection_reads_columns_and_files(tmp_path: Path, write_image) -> None:
    osv = write_osv5m(tmp_path / "osv5m", n=3, form="folder")
    mp16 = write_mp16(tmp_path / "mp16", n=2)
    (tmp_path / "plain.csv").write_text("id,latitude,longitude,url\na,1,2,http://x/a.jpg\n")
    write_image(tmp_path / "photos" / "a.jpg", 1.0, 2.0)
    assert detect_format(str(osv.root)) == "osv5m"
    assert detect_format(str(osv.table)) == "osv5m"
    assert detect_format(str(mp16.table)) == "mp16"
    assert detect_format(str(tmp_path / "plain.csv")) == "manifest"
    assert detect_format(str(tmp_path / "photos")) == "folder"
    assert detect_format(str(osv.root / "images")) == "folder"
    assert detect_format("s3://bucket/prefix") == "s3"


def test_a_format_that_does_not_fit_is_one_line_naming_the_input(tmp_path, capsys) -> None:
    osv = write_osv5m(tmp_path / "osv5m", n=3, form="folder")
    assert main(["data", "ingest", str(osv.table), "--format", "mp16"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: '{osv.table}' is not an MP-16 table: expected columns IMG_ID")
    assert main(["data", "ingest", str(osv.table), "--format", "parquet"]) == 1
    assert "format 'parquet' is not known: expected auto, " in capsys.readouterr().err
    assert main(["data", "ingest", str(tmp_path), "--format", "osv5m"]) == 1
    assert "holds no OSV-5M table" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# URLs: only when asked, a local file first, one error when the network is down
# ------------------------------------------------------------------------------------------


class _CountingHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        self.server.requested.append(self.path)  # type: ignore[attr-defined]
        super().do_GET()


@pytest.fixture
def web(tmp_path: Path) -> Iterator[tuple[Path, str, list[str]]]:
    """A local HTTP server over a folder: (folder, base URL, paths requested)."""
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(_CountingHandler, directory=str(root))
    )
    server.requested = []  # type: ignore[attr-defined]
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}", server.requested  # type: ignore[attr-defined]
    server.shutdown()
    server.server_close()


@pytest.mark.server
def test_urls_are_fetched_only_when_asked_and_a_file_on_disk_wins(tmp_path, web) -> None:
    www, base, requested = web
    osv = write_osv5m(tmp_path / "osv5m", n=6, form="folder", url_base=base)
    on_server = osv.rows["id"].iloc[:2].tolist()
    for i, image_id in enumerate(osv.rows["id"]):
        (www / "thumb").mkdir(exist_ok=True)
        (www / "thumb" / f"{image_id}.jpg").write_bytes(image_bytes(seed=900 + i))  # other bytes
        if image_id in on_server:  # these two are not on disk
            next((osv.root / "images").rglob(f"{image_id}.jpg")).unlink()
    paths = DataPaths.default()
    report = ingest(str(osv.root), paths, CFG)
    assert (report.accepted, report.reasons) == (4, {"missing_file": 2}) and requested == []
    assert report.notes and "--fetch-urls" in report.notes[0]
    report = ingest(str(osv.root), paths, CFG, fetch_urls=True)
    assert report.accepted == 6
    assert sorted(requested) == sorted(f"/thumb/{i}.jpg" for i in on_server)  # only those
    assert len(list((paths.raw / "osv5m").iterdir())) == 2


def _unreachable_osv5m(root: Path, port: int, n: int) -> Path:
    root.mkdir(parents=True)
    osv5m_rows(n, url_base=f"http://127.0.0.1:{port}").to_csv(root / "train.csv", index=False)
    return root / "train.csv"


def test_a_closed_port_is_one_error_after_three_attempts(tmp_path, capsys) -> None:
    port = closed_port()
    table = _unreachable_osv5m(tmp_path / "osv5m", port, n=40)
    assert main(["data", "ingest", str(table), "--fetch-urls", "--workers", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if line.startswith("error: ")]) == 1
    assert err[-1].startswith(f"error: 127.0.0.1:{port} unreachable after 3 attempts (")
    assert err[-1].endswith(f"images are expected on disk under {table.parent}")


@pytest.mark.server
def test_a_dead_host_is_tried_a_few_times_not_once_per_row(tmp_path: Path) -> None:
    """A server that hangs up on every connection: the ingest stops after a handful of
    attempts (the fetch threads already under way), not one per row."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    accepted: list[int] = []

    def hang_up() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            accepted.append(1)
            conn.close()

    threading.Thread(target=hang_up, daemon=True).start()
    table = _unreachable_osv5m(tmp_path / "osv5m", listener.getsockname()[1], n=60)
    try:
        with pytest.raises(DataError, match="unreachable after 3 attempts"):
            ingest(str(table), DataPaths.default(), CFG, fetch_urls=True)
    finally:
        listener.close()
    assert 3 <= len(accepted) < 20
