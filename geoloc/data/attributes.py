"""Optional per-image attributes that published datasets ship beside the coordinates.

OSV-5M's tables carry `country`, `region`, `sub-region`, `city`, `land_cover`, `climate`,
`soil`, `drive_side` and `dist_sea` per image (MP-16's places365 tables some of them). They ride
along from the source table through processing (`manifest.parquet`) into the index
(`images.parquet`) as optional columns, so reports can break errors down by them. A column is
present only when some image has a value; images without one hold null.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

TEXT_ATTRIBUTES: tuple[str, ...] = ("country", "region", "sub_region", "city")
"""Kept as strings; `country` as written (OSV-5M: ISO 3166 alpha-2, upper-cased)."""
NUMERIC_ATTRIBUTES: tuple[str, ...] = ("land_cover", "climate", "soil", "drive_side", "dist_sea")
"""Kept as float64 (OSV-5M writes its codes as floats: `5.0`); unparseable values are null."""
ATTRIBUTE_COLUMNS: tuple[str, ...] = TEXT_ATTRIBUTES + NUMERIC_ATTRIBUTES

# normalised name -> accepted spellings (compared case-insensitively), first match wins;
# MP-16's `country` is a country name, its `country_code` the ISO code reports group by
ATTRIBUTE_ALIASES: dict[str, tuple[str, ...]] = {
    "country": ("country_code", "country", "iso2"),
    "region": ("region",),
    "sub_region": ("sub_region", "sub-region", "subregion"),
    "city": ("city",),
    "land_cover": ("land_cover",),
    "climate": ("climate",),
    "soil": ("soil",),
    "drive_side": ("drive_side",),
    "dist_sea": ("dist_sea",),
}


def parse_attribute(name: str, values: pd.Series) -> pd.Series:
    """One attribute column as the manifest keeps it: float64 or str, missing as null."""
    if name in NUMERIC_ATTRIBUTES:
        return pd.to_numeric(values, errors="coerce").astype("float64")
    text = values.astype("str").str.strip()
    missing = values.isna() | text.str.lower().isin(["", "nan", "none", "null"])
    text = text.where(~missing)
    if name == "country":  # ISO codes compare upper-case; names stay as written
        short = text.str.len() == 2
        text = text.where(~short.fillna(False), text.str.upper())
    return text.astype("str")


def attribute_dtype(name: str) -> str:
    """The pandas dtype of an attribute column in manifest.parquet / images.parquet."""
    return "float64" if name in NUMERIC_ATTRIBUTES else "str"


def present_values(row: dict[str, Any]) -> dict[str, Any]:
    """The attributes of one record that have a value (null and NaN dropped)."""
    out = {}
    for name in ATTRIBUTE_COLUMNS:
        value = row.get(name)
        if value is None or (not isinstance(value, str) and pd.isna(value)):
            continue
        out[name] = value
    return out
