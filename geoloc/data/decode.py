"""One decode for every image that enters a model: ingest, training, rerank, gallery, predict.

`decode_image(src, max_pixels)` turns bytes or a file into 8-bit RGB by one set of rules: the
EXIF orientation is applied, transparency is composited over white, palette, CMYK, grayscale,
16-bit and float images are converted the same way every time, and an image above `max_pixels`
is refused from its header, before its pixels are decoded (decompression bombs). Ingest stores
what it returns (shrunk, as JPEG); the dataset and `geoloc predict` decode through it as well, so
a photo reaches the model the same way whichever door it came in by.
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from geoloc.config import IndexConfig
from geoloc.data import rejects as R

DEFAULT_MAX_PIXELS: int = IndexConfig.model_fields["max_pixels"].default
"""Ingest's default pixel limit, for readers that were not told the one their index used."""


class Rejected(Exception):
    """An image refused with a reject reason code (`geoloc.data.rejects`) and a human detail."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


ImageSource = bytes | str | os.PathLike[str]


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB from any PIL mode; transparency is composited over white.

    16-bit images map 0..65535 onto 0..255 (their full range, so a dark frame stays dark);
    32-bit integer and float images are stretched from their own min to max.
    """
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


def open_image(src: ImageSource, max_pixels: int) -> Image.Image:
    """The opened (not yet decoded) image; `Rejected` for empty, non-image or oversized input.

    Only the header is read here, so a decompression bomb is refused before it costs memory.
    """
    if isinstance(src, bytes):
        if not src:
            raise Rejected(R.EMPTY_FILE, "zero bytes")
        fp: io.BytesIO | Path = io.BytesIO(src)
    else:
        fp = Path(src)
        try:
            if fp.stat().st_size == 0:
                raise Rejected(R.EMPTY_FILE, "zero bytes")
        except OSError as exc:
            raise Rejected(R.CORRUPT, f"unreadable: {exc}") from exc
    try:
        with warnings.catch_warnings():  # `max_pixels` below is the limit, not PIL's default
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp)
    except Image.DecompressionBombError as exc:  # beyond twice PIL's own limit
        raise Rejected(R.DECOMPRESSION_BOMB, str(exc)) from exc
    except UnidentifiedImageError as exc:
        raise Rejected(R.NOT_IMAGE, "not a recognised image format") from exc
    except Exception as exc:  # a header PIL chokes on, an unreadable file
        raise Rejected(R.CORRUPT, f"{type(exc).__name__}: {exc}") from exc
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise Rejected(R.DECOMPRESSION_BOMB, f"{w}x{h} = {w * h} pixels > max_pixels {max_pixels}")
    return im


def decode_image_exif(
    src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, *, draft_side: int | None = None
) -> tuple[Image.Image, Image.Exif]:
    """`decode_image` plus the image's EXIF as it was in the file (ingest reads GPS from it)."""
    im = open_image(src, max_pixels)
    try:
        exif = im.getexif()
        if draft_side is not None and im.format == "JPEG":
            im.draft("RGB", (draft_side, draft_side))  # decode at reduced scale when much larger
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # no copy when there is nothing to turn
        rgb = to_rgb(im)
    except Exception as exc:  # truncated data, broken codecs
        im.close()
        raise Rejected(R.CORRUPT, f"{type(exc).__name__}: {exc}") from exc
    if rgb is not im:
        im.close()
    return rgb, exif


def decode_image(
    src: ImageSource, max_pixels: int = DEFAULT_MAX_PIXELS, *, draft_side: int | None = None
) -> Image.Image:
    """8-bit RGB pixels of an image file or its bytes, oriented; `Rejected` when unusable.

    `draft_side` lets a JPEG decode at a reduced scale that still covers that side (ingest
    shrinks to `max_side` anyway); readers that keep the full size leave it None.
    """
    return decode_image_exif(src, max_pixels, draft_side=draft_side)[0]
