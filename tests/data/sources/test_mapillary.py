"""The `mapillary:` source against a local server answering like the Graph API v4."""

from __future__ import annotations

import io

import pandas as pd
import pytest
from PIL import Image

from geoloc.data.sources import FetchError, RawItem, SourceReject, create_source
from geoloc.data.sources.mapillary import (
    captured_at_iso,
    parse_bbox,
    redact,
    retry_after_seconds,
    split_bbox,
)
from geoloc.errors import DataError

SPEC = "mapillary:2.29,48.85,2.30,48.86"
GOOD = ("1933525276802129", "498763468214164", "827361549283746", "104958372615243")
FAST = {"backoff_s": 0.01}


def jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 24), (seed * 50 % 256, 120, 200 - seed)).save(buf, "JPEG")
    return buf.getvalue()


def collect(**options) -> tuple[dict[str, RawItem], dict[str, SourceReject]]:
    entries = list(create_source(SPEC, **{**FAST, **options}).items())
    items = {e.image_id: e for e in entries if isinstance(e, RawItem)}
    rejects = {e.source_ref: e for e in entries if isinstance(e, SourceReject)}
    assert len(items) + len(rejects) == len(entries)
    return items, rejects


def test_all_pages_are_read_with_positions_times_and_sequences(mapillary_api) -> None:
    items, rejects = collect()

    assert sorted(items) == sorted(GOOD)
    first = items["1933525276802129"]
    assert (first.lat, first.lon) == (48.8583701, 2.2945123)  # GeoJSON is lon, lat
    assert first.captured_at == "2019-08-06T13:20:26+00:00"
    assert first.sequence_id == "mX7HJqe1bnrPhYzN2ytwoS"
    assert first.source == "mapillary" and first.source_ref == "mapillary:1933525276802129"
    assert {r.reason for r in rejects.values()} == {"no_gps", "null_island"}
    assert rejects["mapillary:311226407130938"].reason == "no_gps"
    assert len(mapillary_api.calls("/images")) == 2


def test_the_search_asks_for_the_bbox_and_the_fields(mapillary_api) -> None:
    collect(page_limit=3)
    first = mapillary_api.calls("/images")[0]
    assert first.query["bbox"] == "2.29,48.85,2.3,48.86"
    assert set(first.query["fields"].split(",")) == {
        "id",
        "computed_geometry",
        "captured_at",
        "sequence",
        "thumb_1024_url",
    }
    assert first.query["limit"] == "3"
    assert mapillary_api.calls("/images")[1].query["after"] == "QVFIUk9NZA2"


def test_rate_limits_and_server_errors_are_retried_honouring_retry_after(mapillary_api) -> None:
    mapillary_api.fail_next("/images", (429, {"Retry-After": "1"}), (500, {}))

    items, _ = collect()

    assert sorted(items) == sorted(GOOD)
    calls = mapillary_api.calls("/images")
    assert len(calls) == 4  # 429, 500, page 1, page 2
    assert calls[1].at - calls[0].at >= 0.95  # waited as told by Retry-After


def test_large_boxes_are_searched_in_tiles_and_repeats_kept_once(mapillary_api) -> None:
    # the API caps a bbox search (2000 results, rarely a next page): tiles keep big boxes whole
    entries = list(create_source("mapillary:2.28,48.85,2.30,48.86", tile_deg=0.01, **FAST).items())

    first_pages = [c for c in mapillary_api.calls("/images") if "after" not in c.query]
    assert [c.query["bbox"] for c in first_pages] == [
        "2.28,48.85,2.29,48.86",
        "2.29,48.85,2.3,48.86",
    ]
    ids = [e.source_ref for e in entries]
    assert len(ids) == len(set(ids)) == 6  # both tiles saw the same records: yielded once


def test_a_full_page_without_next_warns_that_results_may_be_missing(mapillary_api, caplog):
    del mapillary_api.pages[None]["paging"]["next"]  # 3 records, no next page
    collect(page_limit=3)
    assert "truncated" in caplog.text


def test_split_bbox_covers_the_box_exactly() -> None:
    box = parse_bbox("mapillary:-0.5,51.2,0.3,51.7")
    tiles = split_bbox(box, 0.25)
    assert len(tiles) == 4 * 2
    assert (tiles[0].min_lon, tiles[0].min_lat) == (-0.5, 51.2)
    assert (tiles[-1].max_lon, tiles[-1].max_lat) == (0.3, 51.7)
    assert all(t.max_lon - t.min_lon <= 0.25 + 1e-9 for t in tiles)
    assert split_bbox(box, 10.0) == [box]


def test_a_search_that_keeps_failing_is_a_data_error(mapillary_api) -> None:
    mapillary_api.fail_next("/images", *[(503, {})] * 3)
    with pytest.raises(DataError, match="unreachable.*HTTP 503.*3 attempts"):
        collect(retries=3)


def test_thumbnails_are_fetched_without_the_token(mapillary_api) -> None:
    items, _ = collect()
    mapillary_api.add_thumb("498763468214164", jpeg(1))
    mapillary_api.fail_next("/m1/v/t6/An8xQp498763468214164", (502, {}))

    assert items["498763468214164"].fetch() == jpeg(1)
    thumb_calls = [r for r in mapillary_api.requests if r.route.startswith("/m1/")]
    assert len(thumb_calls) == 2  # the 502 was retried
    assert all("Authorization" not in r.headers for r in thumb_calls)
    assert all(r.headers.get("Authorization") for r in mapillary_api.calls("/images"))


def test_a_missing_thumbnail_is_a_fetch_error(mapillary_api) -> None:
    items, _ = collect()
    with pytest.raises(FetchError) as info:
        items["104958372615243"].fetch()
    assert info.value.reason == "unreachable" and "404" in info.value.detail


def test_missing_token_is_a_data_error(mapillary_api, monkeypatch) -> None:
    monkeypatch.delenv("MAPILLARY_TOKEN")
    with pytest.raises(DataError, match="MAPILLARY_TOKEN"):
        create_source(SPEC)


def test_a_refused_token_is_a_data_error_that_does_not_show_it(mapillary_api, monkeypatch):
    monkeypatch.setenv("MAPILLARY_TOKEN", "MLY|wrong|secret-value")
    with pytest.raises(DataError, match="refused the token.*Invalid OAuth") as info:
        collect()
    assert "secret-value" not in str(info.value)


@pytest.mark.parametrize(
    "spec",
    [
        "mapillary:",
        "mapillary:1,2,3",
        "mapillary:a,b,c,d",
        "mapillary:2.3,48.85,2.29,48.86",  # min lon > max lon
        "mapillary:2.29,95,2.30,96",
        "mapillary:-190,48,2,49",
    ],
)
def test_malformed_bbox_is_a_data_error(spec: str, monkeypatch) -> None:
    monkeypatch.setenv("MAPILLARY_TOKEN", "MLY|x")
    with pytest.raises(DataError, match="minlon,minlat,maxlon,maxlat"):
        create_source(spec)


def test_bbox_and_time_helpers() -> None:
    assert str(parse_bbox("mapillary:-0.5, 51.2, 0.3, 51.7")) == "-0.5,51.2,0.3,51.7"
    assert captured_at_iso(0) == "1970-01-01T00:00:00+00:00"
    assert captured_at_iso(None) is None
    assert "abc" not in redact("https://x/images?access_token=abc&bbox=1,2,3,4")
    assert retry_after_seconds("7") == 7.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT") < 0  # a date in the past
    assert retry_after_seconds("soon") is None


def test_max_images_stops_the_search_early(mapillary_api) -> None:
    entries = list(create_source(SPEC, max_images=2, **FAST).items())
    assert len(entries) == 2
    assert len(mapillary_api.calls("/images")) == 1  # page 2 never requested


def test_ingest_from_mapillary_into_the_processed_manifest(mapillary_api) -> None:
    """End to end: 2 pages, retries, rejects and a missing thumbnail -> processed manifest."""
    from geoloc.config import IndexConfig
    from geoloc.data.ingest import ingest
    from geoloc.paths import DataPaths

    mapillary_api.fail_next("/images", (429, {"Retry-After": "0"}), (500, {}))
    for i, image_id in enumerate(GOOD[:3]):
        mapillary_api.add_thumb(image_id, jpeg(i))  # GOOD[3]'s thumbnail stays missing
    paths = DataPaths.default()

    report = ingest(SPEC, paths, IndexConfig(workers=1, max_side=64), **FAST)

    assert (report.read, report.accepted, report.duplicates) == (6, 3, 0)
    assert report.reasons == {"no_gps": 1, "null_island": 1, "unreachable": 1}
    manifest = pd.read_parquet(paths.processed_manifest).set_index("image_id")
    assert sorted(manifest.index) == sorted(GOOD[:3])
    row = manifest.loc["1933525276802129"]
    assert (row["lat"], row["lon"], row["sequence_id"]) == (
        48.8583701,
        2.2945123,
        row["sequence_id"],
    )
    assert row["sequence_id"] == "mX7HJqe1bnrPhYzN2ytwoS"
    assert row["captured_at"] == pd.Timestamp("2019-08-06T13:20:26Z")
    assert set(manifest["source"]) == {"mapillary"}


def test_cli_ingest_mapillary_prints_counts(mapillary_api, capsys) -> None:
    from geoloc.cli import main

    mapillary_api.fail_next("/images", (429, {"Retry-After": "0"}))
    for i, image_id in enumerate(GOOD):
        mapillary_api.add_thumb(image_id, jpeg(i))

    assert main(["data", "ingest", SPEC, "--workers", "1"]) == 0

    out = capsys.readouterr().out
    assert "read 6 = accepted 4 + rejected 2 + duplicates 0" in out


def test_cli_ingest_mapillary_without_token_fails_with_one_line(capsys) -> None:
    from geoloc.cli import main

    assert main(["data", "ingest", SPEC]) == 1
    lines = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and "MAPILLARY_TOKEN" in errors[0]
