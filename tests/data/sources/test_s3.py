"""The `s3://bucket/prefix` source against moto's real HTTP S3 server."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from PIL import Image

from geoloc.config import IndexConfig
from geoloc.data.demo import gps_exif
from geoloc.data.sources import FetchError, RawItem, SourceReject, create_source
from geoloc.errors import DataError
from geoloc.paths import DataPaths

pytestmark = pytest.mark.server


def jpeg(seed: int, lat: float | None = None, lon: float | None = None) -> bytes:
    """A tiny distinct JPEG, with a GPS fix in EXIF when lat/lon are given."""
    buf = io.BytesIO()
    im = Image.new("RGB", (24, 16), ((seed * 40) % 256, (seed * 90) % 256, (seed * 20) % 256))
    im.putpixel((seed % 24, 0), (255, 255, 255))
    kwargs = {"exif": gps_exif(lat, lon)} if lat is not None and lon is not None else {}
    im.save(buf, "JPEG", quality=90, **kwargs)
    return buf.getvalue()


def put(s3_env, key: str, body: bytes) -> None:
    s3_env.client().put_object(Bucket=s3_env.bucket, Key=key, Body=body)


def split(entries: list) -> tuple[list[RawItem], list[SourceReject]]:
    items = [e for e in entries if isinstance(e, RawItem)]
    rejects = [e for e in entries if isinstance(e, SourceReject)]
    return items, rejects


def test_images_under_the_prefix_are_listed_and_fetched(s3_env) -> None:
    bodies = {f"photos/{i}.jpg": jpeg(i, 48.0 + i, 2.0) for i in range(3)}
    bodies["photos/sub/deep.png"] = b"\x89PNG not decoded here"
    for key, body in bodies.items():
        put(s3_env, key, body)
    put(s3_env, "photos-other/x.jpg", jpeg(9))  # a sibling prefix, not below photos/

    items, rejects = split(list(create_source(s3_env.url("photos")).items()))

    assert rejects == []
    assert sorted(i.source_ref for i in items) == sorted(
        f"s3://{s3_env.bucket}/{k}" for k in bodies
    )
    for item in items:
        assert item.source == "s3" and item.lat is None and item.local_path is None
        assert item.fetch() == bodies[item.source_ref.split("/", 3)[3]]
    assert len({i.raw_name for i in items}) == len(items)


def test_non_images_are_rejected_with_a_reason(s3_env) -> None:
    put(s3_env, "p/a.jpg", jpeg(1, 10.0, 10.0))
    put(s3_env, "p/notes.txt", b"hello")
    _, rejects = split(list(create_source(s3_env.url("p")).items()))
    assert [(r.source_ref.rsplit("/", 1)[-1], r.reason) for r in rejects] == [
        ("notes.txt", "not_image")
    ]


def test_a_key_deleted_after_listing_is_a_fetch_error(s3_env) -> None:
    put(s3_env, "p/a.jpg", jpeg(1))
    (item,) = list(create_source(s3_env.url("p")).items())
    s3_env.client().delete_object(Bucket=s3_env.bucket, Key="p/a.jpg")
    with pytest.raises(FetchError) as info:
        item.fetch()
    assert info.value.reason == "unreachable" and "no such key" in info.value.detail


def test_manifest_rows_become_items_with_their_coordinates(s3_env) -> None:
    put(s3_env, "ds/images/a.jpg", jpeg(1))
    put(s3_env, "ds/images/b.jpg", jpeg(2))
    put(s3_env, "ds/images/extra.jpg", jpeg(3, 40.0, -3.0))  # in no manifest: EXIF item
    manifest = pd.DataFrame(
        {
            "id": ["a", "b", "c", "d", "e", "a"],
            "latitude": [48.85, 51.5, 10.0, 95.0, 1.0, 3.0],
            "longitude": [2.35, -0.12, 10.0, 0.0, 1.0, 3.0],
            "image_path": [
                "images/a.jpg",
                "images/b",  # OSV-5M style bare name: images/b.jpg
                "../outside/c.jpg",
                "images/a.jpg",
                "images/missing.jpg",
                "images/a.jpg",
            ],
            "sequence_id": ["s1", "s1", None, None, None, None],
        }
    )
    put(s3_env, "ds/train.csv", manifest.to_csv(index=False).encode())

    items, rejects = split(list(create_source(s3_env.url("ds")).items()))

    by_id = {i.image_id: i for i in items if i.image_id}
    assert set(by_id) == {"a", "b"}
    assert (by_id["a"].lat, by_id["a"].lon, by_id["a"].sequence_id) == (48.85, 2.35, "s1")
    assert by_id["b"].fetch() == jpeg(2)
    exif_items = [i for i in items if i.image_id is None]
    assert [i.source_ref for i in exif_items] == [f"s3://{s3_env.bucket}/ds/images/extra.jpg"]
    reasons = sorted(r.reason for r in rejects)
    assert reasons == ["duplicate_id", "missing_file", "out_of_range", "path_escape"]
    assert all(r.source_ref.startswith(f"s3://{s3_env.bucket}/ds/train.csv:") for r in rejects)


def test_parquet_manifest_with_s3_urls(s3_env) -> None:
    put(s3_env, "elsewhere/z.jpg", jpeg(5))
    table = pd.DataFrame(
        {"image_id": ["z"], "lat": [35.0], "lon": [139.0], "image": [s3_env.url("elsewhere/z.jpg")]}
    )
    buf = io.BytesIO()
    table.to_parquet(buf, index=False)
    put(s3_env, "m/index.parquet", buf.getvalue())

    (item,) = list(create_source(s3_env.url("m")).items())
    assert (item.image_id, item.lat, item.lon) == ("z", 35.0, 139.0)
    assert item.fetch() == jpeg(5)


def test_manifest_without_coordinates_makes_the_source_unusable(s3_env) -> None:
    put(s3_env, "bad/list.csv", b"id,path\n1,a.jpg\n")
    with pytest.raises(DataError, match=r"list\.csv.*coordinate"):
        list(create_source(s3_env.url("bad")).items())


def test_missing_bucket_is_a_data_error(s3_env) -> None:
    with pytest.raises(DataError, match="bucket 'nope' does not exist"):
        list(create_source("s3://nope/prefix").items())


def test_unreachable_endpoint_is_a_data_error(s3_env) -> None:
    source = create_source(s3_env.url("p"), endpoint_url="http://127.0.0.1:9")
    with pytest.raises(DataError, match="cannot reach"):
        list(source.items())


def test_empty_prefix_is_a_data_error(s3_env) -> None:
    with pytest.raises(DataError, match="no objects"):
        list(create_source(s3_env.url("empty")).items())


def test_explicit_endpoint_is_used_without_the_environment(s3_env, monkeypatch) -> None:
    put(s3_env, "p/a.jpg", jpeg(1))
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    (item,) = list(create_source(s3_env.url("p"), endpoint_url=s3_env.endpoint_url).items())
    assert item.fetch() == jpeg(1)


def test_ingest_from_s3_into_the_processed_manifest(s3_env) -> None:
    """End to end: images (EXIF GPS) + a manifest under one prefix -> processed manifest."""
    from geoloc.data.ingest import ingest

    put(s3_env, "set/exif/1.jpg", jpeg(1, 48.1, 11.5))
    put(s3_env, "set/exif/2.jpg", jpeg(2, -33.9, 151.2))
    put(s3_env, "set/exif/nogps.jpg", jpeg(3))
    put(s3_env, "set/exif/dup.jpg", jpeg(1, 48.1, 11.5))  # same bytes as 1.jpg
    put(s3_env, "set/listed/a.jpg", jpeg(4))
    put(s3_env, "set/listed/broken.jpg", b"not a jpeg at all")
    rows = "image_id,lat,lon,image\nA,40.4,-3.7,listed/a.jpg\nB,0,0,listed/a.jpg\n"
    rows += "C,41.0,2.0,listed/broken.jpg\nD,41.0,2.0,listed/gone.jpg\n"
    put(s3_env, "set/meta.csv", rows.encode())
    paths = DataPaths.default()

    report = ingest(s3_env.url("set"), paths, IndexConfig(workers=1, max_side=64))

    assert report.read == 8
    assert (report.accepted, report.duplicates) == (3, 1)
    assert report.read == report.accepted + report.rejected + report.duplicates
    assert report.reasons == {"missing_file": 1, "no_gps": 1, "not_image": 1, "null_island": 1}
    manifest = pd.read_parquet(paths.processed_manifest)
    assert set(manifest["source"]) == {"s3"}
    assert "A" in set(manifest["image_id"])
    a = manifest.set_index("image_id").loc["A"]
    assert (a["lat"], a["lon"]) == (40.4, -3.7)
    assert all((paths.root / p).is_file() for p in manifest["path"])
    assert len(list((paths.raw / "s3").iterdir())) == 6  # each fetched object once


def test_cli_ingest_s3_prefix_prints_counts(s3_env, monkeypatch, capsys) -> None:
    """`geoloc data ingest s3://...` with --endpoint-url: counts add up, manifest per contract."""
    from geoloc.cli import main
    from geoloc.data.ingest import MANIFEST_COLUMNS

    for i in range(3):
        put(s3_env, f"cli/{i}.jpg", jpeg(i, 10.0 + i, 20.0 + i))
    put(s3_env, "cli/plain.jpg", jpeg(7))  # no GPS
    monkeypatch.delenv("AWS_ENDPOINT_URL")

    args = ["data", "ingest", s3_env.url("cli"), "--endpoint-url", s3_env.endpoint_url]
    assert main([*args, "--workers", "1"]) == 0

    out = capsys.readouterr().out
    assert "read 4 = accepted 3 + rejected 1 + duplicates 0" in out
    assert "no_gps: 1" in out
    manifest = pd.read_parquet(DataPaths.default().processed_manifest)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert sorted(manifest["lat"].round(3)) == [10.0, 11.0, 12.0]


def test_cli_ingest_missing_bucket_fails_with_one_line(s3_env, capsys) -> None:
    from geoloc.cli import main

    assert main(["data", "ingest", "s3://no-such-bucket/x"]) == 1
    lines = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "bucket 'no-such-bucket' does not exist" in errors[0]


def test_a_replaced_object_is_fetched_again_not_served_from_a_stale_copy(s3_env) -> None:
    from geoloc.data.ingest import ingest

    put(s3_env, "v/a.jpg", jpeg(1, 10.0, 10.0))
    paths = DataPaths.default()
    cfg = IndexConfig(workers=1, max_side=64)
    first = ingest(s3_env.url("v"), paths, cfg)
    put(s3_env, "v/a.jpg", jpeg(2, 20.0, 20.0))  # same key, new content

    again = ingest(s3_env.url("v"), paths, cfg, fresh=True)

    assert (first.accepted, again.accepted) == (1, 1)
    manifest = pd.read_parquet(paths.processed_manifest)
    assert list(manifest["lat"].round(3)) == [20.0]


def test_manifest_rows_may_point_at_http_urls(s3_env, mapillary_api) -> None:
    """An image column holding http(s) URLs is fetched over HTTP (here: a local server)."""
    from fixtures.mapillary_server import thumb_path

    mapillary_api.add_thumb("42", jpeg(6))
    url = f"{mapillary_api.cdn}{thumb_path('42')}"
    rows = f"id,lat,lon,url\nh1,1.5,2.5,{url}\nh2,1.5,2.5,{mapillary_api.cdn}/missing.jpg\n"
    put(s3_env, "web/list.csv", rows.encode())

    items, _ = split(list(create_source(s3_env.url("web")).items()))

    by_id = {i.image_id: i for i in items}
    assert by_id["h1"].fetch() == jpeg(6)
    with pytest.raises(FetchError, match="404"):
        by_id["h2"].fetch()
