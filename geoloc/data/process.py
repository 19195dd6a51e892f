"""Decode and clean one image: the work done in parallel processes during ingestion.

Each file is decoded by `geoloc.data.decode` (oriented by EXIF, 8-bit RGB from CMYK, palette,
alpha, 16-bit or float, bombs refused), shrunk to `max_side` and re-encoded as JPEG without
metadata. The worker returns the JPEG and its sha256; the ingest process appends it to the job's
image shard (`geoloc.data.imagestore`) as member `<sha256>.jpg`, so identical content is stored
once, deduplication is a set lookup and redoing a lost chunk harmless.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from PIL import ExifTags, Image

from geoloc.data import rejects as R
from geoloc.data.decode import Rejected, decode_image_exif
from geoloc.data.sources.archive import read_bytes

JPEG_QUALITY = 95


@dataclass(frozen=True)
class ProcessTask:
    """What a worker needs; plain data so it pickles cheaply."""

    key: str
    path: str
    lat: float | None
    lon: float | None
    max_side: int
    max_pixels: int
    member: str | None = None  # a member of the zip at `path`, read in place


def _ratio(value: Any) -> float:
    if isinstance(value, tuple) and len(value) == 2:  # (num, den) from old writers
        return float(value[0]) / float(value[1]) if value[1] else float("nan")
    return float(value)


def gps_from_exif(exif: Image.Exif) -> tuple[float, float] | None:
    """(lat, lon) from the EXIF GPS block, or None when there is no usable fix."""
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    try:
        lat_dms = gps[ExifTags.GPS.GPSLatitude]
        lon_dms = gps[ExifTags.GPS.GPSLongitude]
    except KeyError:
        return None
    try:
        lat = sum(_ratio(v) / 60**i for i, v in enumerate(lat_dms))
        lon = sum(_ratio(v) / 60**i for i, v in enumerate(lon_dms))
    except (TypeError, ValueError, ZeroDivisionError):
        return float("nan"), float("nan")
    if str(gps.get(ExifTags.GPS.GPSLatitudeRef, "N")).upper().startswith("S"):
        lat = -lat
    if str(gps.get(ExifTags.GPS.GPSLongitudeRef, "E")).upper().startswith("W"):
        lon = -lon
    return lat, lon


def captured_from_exif(exif: Image.Exif) -> str | None:
    """DateTimeOriginal (read as UTC: EXIF carries no zone) as ISO 8601, if present."""
    value = exif.get_ifd(ExifTags.IFD.Exif).get(ExifTags.Base.DateTimeOriginal) or exif.get(
        ExifTags.Base.DateTime
    )
    if not value:
        return None
    try:
        return (
            datetime.strptime(str(value).strip(), "%Y:%m:%d %H:%M:%S")
            .replace(tzinfo=UTC)
            .isoformat()
        )
    except ValueError:
        return None


def clean_image(data: bytes, max_side: int, max_pixels: int) -> tuple[bytes, int, int, Image.Exif]:
    """JPEG bytes, width, height and the original EXIF of a cleaned image; `Rejected` if bad.

    The pixels come from `geoloc.data.decode` (the decode every model input goes through);
    this adds the shrink to `max_side` and the JPEG that ingest stores.
    """
    im, exif = decode_image_exif(data, max_pixels, draft_side=max_side)
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), im.width, im.height, exif


def process_one(task: ProcessTask) -> dict[str, Any]:
    """Worker entry point: a journal row, `status` accepted or rejected (never raises).

    An accepted row carries the cleaned JPEG under `jpeg` (bytes) for the shard writer, which
    replaces it with the image's place in its shard before the row is journaled."""
    row: dict[str, Any] = {"key": task.key}
    try:
        try:
            data = read_bytes(task.path, task.member)
        except OSError as exc:
            raise Rejected(R.CORRUPT, f"unreadable: {exc}") from exc
        jpeg, width, height, exif = clean_image(data, task.max_side, task.max_pixels)
        lat, lon = task.lat, task.lon
        if lat is None or lon is None:
            fix = gps_from_exif(exif)
            if fix is None:
                raise Rejected(R.NO_GPS, "no GPS position in EXIF")
            lat, lon = fix
        problem = R.coords_problem(lat, lon)
        if problem:
            raise Rejected(*problem)
    except Rejected as rej:
        row.update(status="rejected", reason=rej.reason, detail=rej.detail[:500], stage="process")
        return row
    row.update(
        status="accepted",
        sha256=hashlib.sha256(jpeg).hexdigest(),
        jpeg=jpeg,
        lat=float(lat),
        lon=float(lon),
        width=int(width),
        height=int(height),
        exif_captured_at=captured_from_exif(exif),
    )
    return row
