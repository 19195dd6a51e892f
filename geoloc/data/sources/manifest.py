"""The `manifest` source: a CSV or Parquet table of id, latitude, longitude and image path/URL.

Column spellings of the common datasets are accepted (OSV-5M `id/latitude/longitude`, MP-16
`IMG_ID/LAT/LON`, ...) and normalised by `read_manifest`, which the S3 source and the published
layouts (`osv5m`, `mp16`) reuse. Local paths are resolved against the manifest's folder and may
not escape it (`../`). A file on disk always wins over a URL: http(s) URLs are fetched only with
the `fetch_urls` option, and then stop the ingest with one line when the network is down
(`geoloc.data.sources.urls`); without it a row with no file is a `missing_file` reject.
"""

from __future__ import annotations

import hashlib
import io
import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
import pandas as pd

from geoloc.data.attributes import ATTRIBUTE_ALIASES, parse_attribute, present_values
from geoloc.data.digests import DIGEST, DigestIndex, digests
from geoloc.data.rejects import (
    DUPLICATE_ID,
    MALFORMED_ROW,
    MISSING_FILE,
    NAN_COORDS,
    NOT_REGULAR_FILE,
    PATH_ESCAPE,
    coords_problem,
)
from geoloc.data.sources import RawItem, SourceReject, register_source
from geoloc.data.sources.urls import HostBreaker, http_fetcher
from geoloc.errors import DataError

log = logging.getLogger(__name__)

ROW_ERROR = "row_error"
COORDS_TEXT = "coords_text"
COLUMNS = [
    "image_id", "lat", "lon", "image", "url", "captured_at", "sequence_id", COORDS_TEXT, ROW_ERROR
]  # fmt: skip
"""Normalised columns; `image` is the path column (else a URL column, else the id), `url` the
first URL column; `coords_text` keeps coordinates as written when they are not numbers,
`row_error` says why a row could not be read as a row (e.g. too many fields). Attribute columns
(`geoloc.data.attributes`) follow when the table has them."""
_URL_SPELLINGS = ("url", "image_url", "thumb_1024_url", "thumb_original_url", "download_url")

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
        *_URL_SPELLINGS[1:],
    ),
    "url": _URL_SPELLINGS,
    "captured_at": ("captured_at", "timestamp", "datetime", "date_taken", "taken_at", "date"),
    "sequence_id": ("sequence_id", "sequence", "seq_id", "sequence_key", "seq_key"),
}
MANIFEST_SUFFIXES = (".csv", ".tsv", ".csv.gz", ".parquet", ".pq")


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
    return _normalise(_read_table(path_or_buffer, name), name)


CHUNK_ROWS = 65_536


def iter_manifest(path: Path, name: str, chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """`read_manifest` of a file a chunk of rows at a time, rows in order (at least one chunk):
    a 10^6-row manifest is never held whole. A CSV found to hold a malformed row mid-way is
    read again whole by the slow path, which keeps such rows in place, from where it stopped."""
    done, yielded = 0, False
    try:
        if _is_parquet(name):
            import pyarrow.parquet as pq

            pf = pq.ParquetFile(path)
            for batch in pf.iter_batches(batch_size=chunk_rows):
                yielded = True
                yield _normalise(batch.to_pandas(), name)
            if not yielded:
                yield _normalise(pf.schema_arrow.empty_table().to_pandas(), name)
            return
        sep = "\t" if name.lower().endswith(".tsv") else ","
        with pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False,
                         chunksize=chunk_rows) as reader:  # fmt: skip
            for raw in reader:
                chunk = _normalise(raw.reset_index(drop=True), name)
                done, yielded = done + len(raw), True
                yield chunk
    except pd.errors.ParserError:  # a row with too many fields: the slow path, from row `done`
        yield read_manifest(path, name).iloc[done:].reset_index(drop=True)
        return
    except FileNotFoundError as exc:
        raise DataError(f"manifest '{name}' does not exist") from exc
    except (OSError, ValueError) as exc:
        raise DataError(f"manifest '{name}' could not be read: {exc}") from exc
    if not yielded:  # a header and no rows
        yield read_manifest(path, name)


def _normalise(raw: pd.DataFrame, name: str) -> pd.DataFrame:
    """A table as read into `COLUMNS` (see `read_manifest`)."""
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
    for key in COLUMNS[:7]:
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
    for name, spellings in ATTRIBUTE_ALIASES.items():
        col = _find(cols, spellings)
        if col is not None:
            out[name] = parse_attribute(name, raw[col].reset_index(drop=True))
    return out


def table_columns(path: Path) -> list[str]:
    """The column names of a CSV/TSV/Parquet table, read from its header only ([] if none)."""
    name = path.name.lower()
    try:
        if _is_parquet(name):
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
        sep = "\t" if name.endswith(".tsv") else ","
        return [str(c) for c in pd.read_csv(path, sep=sep, nrows=0).columns]
    except (OSError, ValueError, pd.errors.ParserError, pd.errors.EmptyDataError):
        return []


def has_columns(columns: list[str], *spellings: str) -> bool:
    """Whether every one of `spellings` is among `columns` (case-insensitively)."""
    lower = {c.lower().strip() for c in columns}
    return all(s.lower() in lower for s in spellings)


def _coords_text(lat_in: pd.Series, lon_in: pd.Series, lat: pd.Series, lon: pd.Series) -> pd.Series:
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


def url_raw_name(image_id: str | None, url: str) -> str:
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


def is_url(text: str | None) -> bool:
    return text is not None and text.lower().startswith(("http://", "https://"))


@dataclass(frozen=True)
class ManifestRow:
    """A manifest row that passed the checks every manifest shares."""

    ref: str  # `<manifest>:<1-based row>:<image>`
    image: str  # the image column: a path, key or URL
    fields: dict[str, Any]  # RawItem fields: image_id, lat, lon, captured_at, sequence_id, ...
    url: str | None = None  # a URL column beside the path (fetched only with `fetch_urls`)


def _attributes(table: pd.DataFrame) -> list[str]:
    return [c for c in table.columns if c in ATTRIBUTE_ALIASES]


def checked_rows(
    table: pd.DataFrame | Iterable[pd.DataFrame], manifest_ref: str, source: str
) -> Iterator[ManifestRow | SourceReject]:
    """Rows of a normalised manifest (`read_manifest`, or its chunks from `iter_manifest`) with
    valid coordinates, a first-seen id and an image; every other row as a reject with its
    reason. Local and S3 manifests share it, so a bad row gets the same reason wherever the
    manifest lives. Ids seen are kept as 16-byte digests (`geoloc.data.digests`)."""
    ids_seen = DigestIndex()  # ids of earlier chunks
    first = 0  # the chunk's first row number
    for chunk in [table] if isinstance(table, pd.DataFrame) else table:
        chunk_ids: set[bytes] = set()
        yield from _checked_chunk(chunk, first, ids_seen, chunk_ids, manifest_ref, source)
        ids_seen.add(np.array(sorted(chunk_ids), DIGEST))
        first += len(chunk)


def _checked_chunk(
    table: pd.DataFrame, first: int, ids_seen: DigestIndex, chunk_ids: set[bytes],
    manifest_ref: str, source: str,
) -> Iterator[ManifestRow | SourceReject]:  # fmt: skip
    attributes = _attributes(table)
    ids = table["image_id"].tolist()
    id_digests = digests("" if v is None else v for v in ids)
    seen_before = ids_seen.contains(id_digests)
    for j, row in enumerate(table.itertuples(index=False)):
        i = first + j
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
            if seen_before[j] or id_digests[j] in chunk_ids:
                yield SourceReject(source, ref, DUPLICATE_ID, f"id {row.image_id} repeats")
                continue
            chunk_ids.add(id_digests[j])
        if image is None:
            yield SourceReject(source, ref, MISSING_FILE, "row has no image path, key or URL")
            continue
        fields = {
            "image_id": row.image_id,
            "lat": float(row.lat),
            "lon": float(row.lon),
            "captured_at": row.captured_at,
            "sequence_id": row.sequence_id,
            "attributes": present_values({a: getattr(row, a) for a in attributes}),
        }
        yield ManifestRow(ref=ref, image=image, fields=fields, url=row.url)


class ManifestSource:
    """Rows of a manifest as `RawItem`s; bad rows as `SourceReject`s with a reason.

    Each row's image is looked for on disk first: its path, or for a URL or a bare id,
    `<id>`, `<id>.jpg` and `images/<id>.jpg` beside the manifest. Its URL is fetched only when
    that finds nothing and `fetch_urls` is set.
    """

    name = "manifest"

    def __init__(self, path: Path, base_dir: Path | None = None, fetch_urls: bool = False) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise DataError(f"manifest '{path}' is a folder, not a CSV/Parquet file")
        if not self.path.is_file():
            raise DataError(f"manifest '{path}' does not exist")
        self.base_dir = Path(base_dir) if base_dir else self.path.parent
        self.fetch_urls = bool(fetch_urls)
        # the first chunk: checks the columns now; the rows are streamed by `items`
        self.table = next(iter_manifest(self.path, self.path.name))
        self.breaker = HostBreaker(disk_hint=self.base_dir)
        self.notes: list[str] = []
        self._not_fetched = 0

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

    def _on_disk(self, row: ManifestRow) -> Path | SourceReject | None:
        """The row's file, a `path_escape` reject, or None when nothing is on disk."""
        if is_url(row.image):
            image_id = row.fields["image_id"]
            names = self._candidates(image_id) if image_id else []
            found = [p for p in map(self._local, names) if p is not None and p.is_file()]
            return found[0] if found else None
        resolved = [self._local(c) for c in self._candidates(row.image)]
        if resolved[0] is None:
            detail = f"'{row.image}' escapes the folder {self.base_dir}"
            return SourceReject(self.name, row.ref, PATH_ESCAPE, detail)
        found = next((p for p in resolved if p is not None and p.is_file()), None)
        if found is None and any(p is not None and p.exists() for p in resolved):
            # a FIFO named like the image would block the read
            detail = f"'{row.image}' is not a regular file (a pipe, socket, device or folder)"
            return SourceReject(self.name, row.ref, NOT_REGULAR_FILE, detail)
        return found

    def _missing(self, row: ManifestRow) -> SourceReject:
        url = row.url or (row.image if is_url(row.image) else None)
        where = row.fields["image_id"] if is_url(row.image) else row.image
        detail = f"'{where}' does not exist under {self.base_dir}"
        if url is not None:
            self._not_fetched += 1
            detail += "; its URL is fetched only with --fetch-urls (option fetch_urls=true)"
        return SourceReject(self.name, row.ref, MISSING_FILE, detail)

    def items(self) -> Iterator[RawItem | SourceReject]:
        # refs: the file as given + 1-based data row (+ the image column)
        rows = iter_manifest(self.path, self.path.name)
        for row in checked_rows(rows, self.path.as_posix(), self.name):
            if isinstance(row, SourceReject):
                yield row
                continue
            found = self._on_disk(row)
            if isinstance(found, SourceReject):
                yield found
                continue
            common = dict(source=self.name, source_ref=row.ref, **row.fields)
            if found is not None:
                yield RawItem(**common, local_path=found)
                continue
            url = row.url or (row.image if is_url(row.image) else None)
            if url is not None and self.fetch_urls:
                raw_name = url_raw_name(row.fields["image_id"], url)
                yield RawItem(**common, fetch=http_fetcher(url, breaker=self.breaker),
                              raw_name=raw_name)  # fmt: skip
                continue
            yield self._missing(row)
        if self._not_fetched:
            self.notes.append(url_hint(self._not_fetched))


def url_hint(count: int) -> str:
    return (
        f"{count} row(s) have no image on disk but a URL: pass --fetch-urls "
        "(option fetch_urls=true) to download them"
    )


def _is_manifest_spec(spec: str) -> bool:
    low = spec.lower()
    return low.endswith(MANIFEST_SUFFIXES) and not low.startswith(("s3://", "mapillary:"))


@register_source("manifest", _is_manifest_spec)
def create_manifest_source(
    spec: str, base_dir: str | None = None, fetch_urls: bool = False, **_: object
) -> ManifestSource:
    """`path/to/manifest.csv` (or .parquet); `base_dir` overrides where relative paths live;
    `fetch_urls` downloads the URL of a row with no file on disk."""
    return ManifestSource(Path(spec), Path(base_dir) if base_dir else None, fetch_urls)


def read_manifest_bytes(data: bytes, name: str) -> pd.DataFrame:
    """`read_manifest` over bytes already in memory (e.g. an object fetched from S3)."""
    return read_manifest(io.BytesIO(data), name)
