"""The `manifest` source: a CSV or Parquet table of id, latitude, longitude and image path/URL.

Column spellings of the common datasets are accepted (OSV-5M `id/latitude/longitude`, MP-16
`IMG_ID/LAT/LON`, ...) and normalised by `read_manifest`, which the S3 source reuses. Local
paths are resolved against the manifest's folder and may not escape it (`../`); http(s) URLs
are fetched during ingestion with timeouts and retries.
"""

from __future__ import annotations

import hashlib
import io
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import pandas as pd

from geoloc.data.rejects import (
    DUPLICATE_ID,
    MALFORMED_ROW,
    MISSING_FILE,
    NAN_COORDS,
    PATH_ESCAPE,
    coords_problem,
)
from geoloc.data.sources import FetchError, RawItem, SourceReject, register_source
from geoloc.errors import DataError

log = logging.getLogger(__name__)

ROW_ERROR = "row_error"
COORDS_TEXT = "coords_text"
COLUMNS = ["image_id", "lat", "lon", "image", "captured_at", "sequence_id", COORDS_TEXT, ROW_ERROR]
"""Normalised columns; `coords_text` keeps coordinates as written when they are not numbers,
`row_error` says why a row could not be read as a row (e.g. too many fields)."""

# normalised name -> accepted spellings (compared case-insensitively), first match wins
ALIASES: dict[str, tuple[str, ...]] = {
    "image_id": ("image_id", "id", "img_id", "imageid", "photo_id", "key", "image_key"),
    "lat": ("lat", "latitude", "gps_lat", "y"),
    "lon": ("lon", "lng", "long", "longitude", "gps_lon", "gps_lng", "x"),
    "image": (
        "image",
        "path",
        "image_path",
        "img_path",
        "file",
        "filename",
        "file_name",
        "url",
        "image_url",
        "thumb_1024_url",
        "thumb_original_url",
    ),
    "captured_at": ("captured_at", "timestamp", "datetime", "date_taken", "taken_at", "date"),
    "sequence_id": ("sequence_id", "sequence", "seq_id", "sequence_key", "seq_key"),
}
MANIFEST_SUFFIXES = (".csv", ".tsv", ".csv.gz", ".parquet", ".pq")
HTTP_TIMEOUT_S = (5.0, 30.0)
HTTP_RETRIES = 3


def _is_parquet(name: str) -> bool:
    return name.lower().endswith((".parquet", ".pq"))


def _read_table(path_or_buffer: str | Path | IO[bytes], name: str) -> pd.DataFrame:
    try:
        if _is_parquet(name):
            return pd.read_parquet(path_or_buffer)
        sep = "\t" if name.lower().endswith(".tsv") else ","
        try:
            return pd.read_csv(path_or_buffer, sep=sep, dtype=str, keep_default_na=False)
        except pd.errors.ParserError:  # a row with too many fields: read again, row by row
            return _read_csv_keeping_bad_rows(path_or_buffer, sep)
    except FileNotFoundError as exc:
        raise DataError(f"manifest '{name}' does not exist") from exc
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise DataError(f"manifest '{name}' could not be read: {exc}") from exc


_BAD_ROW = "\x00bad row:"  # marks a malformed row in its first field; real CSV text has no NUL


def _read_csv_keeping_bad_rows(path_or_buffer: str | Path | IO[bytes], sep: str) -> pd.DataFrame:
    """The slow path for a CSV with malformed rows: each keeps its place (so later rows keep
    their numbers) with `ROW_ERROR` saying what is wrong; the other rows read as usual."""

    def rewind() -> str | Path | IO[bytes]:
        if hasattr(path_or_buffer, "seek"):
            path_or_buffer.seek(0)  # type: ignore[union-attr]
        return path_or_buffer

    width = len(pd.read_csv(rewind(), sep=sep, dtype=str, nrows=0).columns)

    def keep(fields: list[str]) -> list[str]:
        return [f"{_BAD_ROW}expected {width} fields, found {len(fields)}"] + [""] * (width - 1)

    table = pd.read_csv(rewind(), sep=sep, dtype=str, keep_default_na=False, engine="python",
                        on_bad_lines=keep)  # fmt: skip
    first = table.iloc[:, 0].astype(str)
    bad = first.str.startswith(_BAD_ROW)
    table[ROW_ERROR] = [v.removeprefix(_BAD_ROW) if v.startswith(_BAD_ROW) else None for v in first]
    table.loc[bad, table.columns[0]] = ""
    return table


def _find(columns: list[str], spellings: tuple[str, ...]) -> str | None:
    lower = {c.lower().strip(): c for c in columns}
    for s in spellings:
        if s in lower:
            return lower[s]
    return None


def _to_iso(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and pd.isna(value)) or value == "":
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    text = str(value).strip()
    # Mapillary-style epoch milliseconds
    if text.isdigit() and len(text) >= 12:
        return pd.Timestamp(int(text), unit="ms", tz="UTC").isoformat()
    return text


def read_manifest(path_or_buffer: str | Path | IO[bytes], name: str) -> pd.DataFrame:
    """Read a CSV/Parquet manifest into `COLUMNS` (image_id, lat, lon, image, ...).

    `name` is the file name used for the format and in error messages. Coordinates become
    float64 (unparseable -> NaN, refused later with a reason that quotes `coords_text`); missing
    optional columns are None; a CSV row with more fields than the header keeps its place with
    `row_error` set. Raises `DataError` naming the file when it has no latitude/longitude columns.
    """
    raw = _read_table(path_or_buffer, name)
    cols = [str(c) for c in raw.columns]
    raw.columns = cols
    found = {key: _find(cols, spellings) for key, spellings in ALIASES.items()}
    if found["lat"] is None or found["lon"] is None:
        raise DataError(
            f"manifest '{name}' has no coordinate columns: expected lat/lon or "
            f"latitude/longitude, found {', '.join(cols) or 'no columns'}"
        )
    n = len(raw)
    out = pd.DataFrame(index=range(n))
    for key in COLUMNS[:6]:
        col = found[key]
        values = raw[col].tolist() if col is not None else [None] * n
        if key in ("lat", "lon"):
            out[key] = pd.to_numeric(pd.Series(values, dtype=object), errors="coerce").astype(
                "float64"
            )
        elif key == "captured_at":
            out[key] = pd.Series([_to_iso(v) for v in values], dtype=object)
        else:
            out[key] = pd.Series(
                [None if v is None or str(v) == "" or pd.isna(v) else str(v) for v in values],
                dtype=object,
            )
    if found["image"] is None and found["image_id"] is not None:
        out["image"] = out["image_id"]  # MP-16 style: the id is the relative path
    out[COORDS_TEXT] = _coords_text(raw[found["lat"]], raw[found["lon"]], out["lat"], out["lon"])
    errors = raw[ROW_ERROR].tolist() if ROW_ERROR in raw else [None] * n
    out[ROW_ERROR] = pd.Series([None if pd.isna(v) else str(v) for v in errors], dtype=object)
    return out


def _coords_text(
    lat_in: pd.Series, lon_in: pd.Series, lat: pd.Series, lon: pd.Series
) -> pd.Series:
    """`lat='abc', lon='10'` where a coordinate as written is not a number, else None."""

    def unparsed(given: pd.Series, parsed: pd.Series) -> pd.Series:
        written_nan = given.astype(str).str.strip().str.lower().isin(["nan", "-nan", "+nan"])
        return parsed.isna().to_numpy() & ~written_nan.to_numpy()

    bad = unparsed(lat_in, lat) | unparsed(lon_in, lon)
    text = [
        f"lat={a!r}, lon={b!r}" if is_bad else None
        for a, b, is_bad in zip(lat_in.tolist(), lon_in.tolist(), bad, strict=True)
    ]
    return pd.Series(text, dtype=object)


def http_fetcher(url: str, retries: int = HTTP_RETRIES) -> Callable[[], bytes]:
    """A `fetch()` for one URL: timeouts, retries with backoff on errors, 429 and 5xx."""

    def fetch() -> bytes:
        import requests

        last = ""
        for attempt in range(retries):
            try:
                resp = requests.get(url, timeout=HTTP_TIMEOUT_S)
            except requests.RequestException as exc:
                last = f"{url}: {type(exc).__name__}: {exc}"
            else:
                if resp.status_code == 200:
                    return resp.content
                last = f"{url}: HTTP {resp.status_code}"
                if resp.status_code != 429 and resp.status_code < 500:
                    break  # 404 and friends will not get better
            time.sleep(min(0.2 * 2**attempt, 2.0))
        raise FetchError("unreachable", last)

    return fetch


def _raw_name(image_id: str | None, url: str) -> str:
    """`<id or url stem>-<hash of the url><ext>`: readable, and never shared by two URLs.

    A fetched file is reused on resume when its name exists, so two URLs must never map to one
    name (ids are sanitised and URL stems repeat across folders: the hash keeps them apart).
    """
    suffix = PurePosixPath(url.split("?", 1)[0]).suffix.lower()
    suffix = suffix if 1 < len(suffix) <= 6 else ".jpg"
    base = image_id or PurePosixPath(url.split("?", 1)[0]).stem or "image"
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in base)[:100]
    digest = hashlib.sha256(url.encode()).hexdigest()[:10]
    return f"{safe}-{digest}{suffix}"


@dataclass(frozen=True)
class ManifestRow:
    """A manifest row that passed the checks every manifest shares."""

    ref: str  # `<manifest>:<1-based row>:<image>`
    image: str  # the image column: a path, key or URL
    fields: dict[str, Any]  # RawItem fields: image_id, lat, lon, captured_at, sequence_id


def checked_rows(
    table: pd.DataFrame, manifest_ref: str, source: str
) -> Iterator[ManifestRow | SourceReject]:
    """Rows of a normalised manifest (`read_manifest`) with valid coordinates, a first-seen id
    and an image; every other row as a reject with its reason. Local and S3 manifests share it,
    so a bad row gets the same reason wherever the manifest lives."""
    ids_seen: set[str] = set()
    for i, row in enumerate(table.itertuples(index=False)):
        image = row.image
        ref = f"{manifest_ref}:{i + 1}" + (f":{image}" if image is not None else "")
        if row.row_error is not None:
            yield SourceReject(source, ref, MALFORMED_ROW, row.row_error)
            continue
        problem = coords_problem(row.lat, row.lon)
        if problem and row.coords_text is not None:
            problem = (NAN_COORDS, f"lat/lon not numeric: {row.coords_text}")
        if problem:
            yield SourceReject(source, ref, *problem)
            continue
        if row.image_id is not None:
            if row.image_id in ids_seen:
                yield SourceReject(source, ref, DUPLICATE_ID, f"id {row.image_id} repeats")
                continue
            ids_seen.add(row.image_id)
        if image is None:
            yield SourceReject(source, ref, MISSING_FILE, "row has no image path, key or URL")
            continue
        fields = {
            "image_id": row.image_id,
            "lat": float(row.lat),
            "lon": float(row.lon),
            "captured_at": row.captured_at,
            "sequence_id": row.sequence_id,
        }
        yield ManifestRow(ref=ref, image=image, fields=fields)


class ManifestSource:
    """Rows of a manifest as `RawItem`s; bad rows as `SourceReject`s with a reason."""

    name = "manifest"

    def __init__(self, path: Path, base_dir: Path | None = None) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"manifest '{path}' does not exist")
        self.base_dir = Path(base_dir) if base_dir else self.path.parent
        self.table = read_manifest(self.path, self.path.name)

    def _local(self, image: str) -> Path | None:
        """The resolved local path, or None when it escapes the manifest's folder."""
        base = self.base_dir.resolve()
        target = (base / image).resolve()
        return target if target.is_relative_to(base) else None

    def _candidates(self, image: str) -> list[str]:
        # OSV-5M lists bare ids: try `<id>`, `<id>.jpg` and `images/<id>.jpg`
        if PurePosixPath(image).suffix:
            return [image]
        return [image, f"{image}.jpg", f"images/{image}.jpg"]

    def items(self) -> Iterator[RawItem | SourceReject]:
        # refs: the file as given + 1-based data row (+ the image column)
        for row in checked_rows(self.table, self.path.as_posix(), self.name):
            if isinstance(row, SourceReject):
                yield row
                continue
            ref, image = row.ref, row.image
            common = dict(source=self.name, source_ref=ref, **row.fields)
            if image.lower().startswith(("http://", "https://")):
                raw_name = _raw_name(row.fields["image_id"], image)
                yield RawItem(**common, fetch=http_fetcher(image), raw_name=raw_name)
                continue
            resolved = [self._local(c) for c in self._candidates(image)]
            if resolved[0] is None:
                yield SourceReject(
                    self.name, ref, PATH_ESCAPE, f"'{image}' escapes the folder {self.base_dir}"
                )
                continue
            existing = [p for p in resolved if p is not None and p.is_file()]
            if not existing:
                yield SourceReject(self.name, ref, MISSING_FILE, f"'{image}' does not exist")
                continue
            yield RawItem(**common, local_path=existing[0])


def _is_manifest_spec(spec: str) -> bool:
    low = spec.lower()
    return low.endswith(MANIFEST_SUFFIXES) and not low.startswith(("s3://", "mapillary:"))


@register_source("manifest", _is_manifest_spec)
def create_manifest_source(spec: str, base_dir: str | None = None, **_: object) -> ManifestSource:
    """`path/to/manifest.csv` (or .parquet); `base_dir` overrides where relative paths live."""
    return ManifestSource(Path(spec), Path(base_dir) if base_dir else None)


def read_manifest_bytes(data: bytes, name: str) -> pd.DataFrame:
    """`read_manifest` over bytes already in memory (e.g. an object fetched from S3)."""
    return read_manifest(io.BytesIO(data), name)
