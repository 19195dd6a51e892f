"""Decode and clean one image: the work done in parallel processes during ingestion.

Each file is decoded, oriented (EXIF), converted to 8-bit RGB (CMYK, palette, alpha, 16-bit,
float), shrunk to `max_side`, re-encoded as JPEG without metadata and stored under its content
address `data/processed/<aa>/<sha256>.jpg`. Identical content lands on the same path, which
makes deduplication a set lookup and redoing a lost chunk harmless.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError

from geoloc.data import rejects as R

JPEG_QUALITY = 95


@dataclass(frozen=True)
class ProcessTask:
    """What a worker needs; plain data so it pickles cheaply."""

    key: str
    path: str
    lat: float | None
    lon: float | None
    processed_root: str
    max_side: int
    max_pixels: int


class Rejected(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


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


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; transparency is composited over white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        if im.mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        im = Image.fromarray(np.nan_to_num(scaled).clip(0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB") if im.mode != "RGB" else im


def _open_checked(data: bytes, max_pixels: int) -> Image.Image:
    if not data:
        raise Rejected(R.EMPTY_FILE, "zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise Rejected(R.DECOMPRESSION_BOMB, str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise Rejected(R.NOT_IMAGE, "not a recognised image format") from exc
    except Exception as exc:  # a header PIL chokes on
        raise Rejected(R.CORRUPT, f"{type(exc).__name__}: {exc}") from exc
    w, h = im.size
    if w * h > max_pixels:
        raise Rejected(R.DECOMPRESSION_BOMB, f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
    return im


def clean_image(data: bytes, max_side: int, max_pixels: int) -> tuple[bytes, int, int, Image.Exif]:
    """JPEG bytes, width, height and the original EXIF of a cleaned image; `Rejected` if bad."""
    im = _open_checked(data, max_pixels)
    try:
        exif = im.getexif()
        if im.format == "JPEG":
            im.draft("RGB", (max_side, max_side))  # decode at reduced scale when much larger
        im.load()
        im = ImageOps.exif_transpose(im) or im
        im = to_rgb(im)
    except Rejected:
        raise
    except Exception as exc:  # truncated data, broken codecs
        raise Rejected(R.CORRUPT, f"{type(exc).__name__}: {exc}") from exc
    if max(im.size) > max_side:
        im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), im.width, im.height, exif


def store(processed_root: Path, data: bytes) -> tuple[str, str]:
    """(sha256, path relative to the data root) of bytes stored content-addressed."""
    sha = hashlib.sha256(data).hexdigest()
    target = processed_root / sha[:2] / f"{sha}.jpg"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{sha}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)  # no fsync per image: a lost file is re-made on the next ingest
    return sha, f"{processed_root.name}/{sha[:2]}/{sha}.jpg"


def process_one(task: ProcessTask) -> dict[str, Any]:
    """Worker entry point: a journal row, `status` accepted or rejected (never raises)."""
    row: dict[str, Any] = {"key": task.key}
    try:
        try:
            data = Path(task.path).read_bytes()
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
        sha, rel = store(Path(task.processed_root), jpeg)
    except Rejected as rej:
        row.update(status="rejected", reason=rej.reason, detail=rej.detail[:500], stage="process")
        return row
    row.update(
        status="accepted",
        sha256=sha,
        path=rel,
        lat=float(lat),
        lon=float(lon),
        width=int(width),
        height=int(height),
        exif_captured_at=captured_from_exif(exif),
    )
    return row
