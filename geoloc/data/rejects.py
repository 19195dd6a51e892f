"""Reason codes for refused input and the `data/index/rejects.parquet` table.

Nothing is dropped silently: every refused record lands in rejects.parquet with where it came
from (`source`, `source_ref`), a reason code, a human detail and the stage that refused it.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from geoloc.atomic import write_parquet

# Reason codes (docs/ARCHITECTURE.md). `duplicate` marks content already accepted (counted as a
# duplicate, not a reject); `missing_file` a manifest path that does not exist (or a dangling
# symlink); `malformed_row` a manifest row that is not a row (e.g. more fields than the header).
CORRUPT = "corrupt"
NO_GPS = "no_gps"
OUT_OF_RANGE = "out_of_range"
NULL_ISLAND = "null_island"
NAN_COORDS = "nan_coords"
DUPLICATE_ID = "duplicate_id"
DUPLICATE = "duplicate"
PATH_ESCAPE = "path_escape"
UNREACHABLE = "unreachable"
EMPTY_FILE = "empty_file"
NOT_IMAGE = "not_image"
DECOMPRESSION_BOMB = "decompression_bomb"
MISSING_FILE = "missing_file"
MALFORMED_ROW = "malformed_row"
NOT_REGULAR_FILE = "not_regular_file"  # a pipe, socket, device or folder named like an image

REASONS = (
    CORRUPT,
    NO_GPS,
    OUT_OF_RANGE,
    NULL_ISLAND,
    NAN_COORDS,
    DUPLICATE_ID,
    DUPLICATE,
    PATH_ESCAPE,
    UNREACHABLE,
    EMPTY_FILE,
    NOT_IMAGE,
    DECOMPRESSION_BOMB,
    MISSING_FILE,
    MALFORMED_ROW,
    NOT_REGULAR_FILE,
)

COLUMNS = ["source", "source_ref", "reason", "detail", "stage"]


def coords_problem(lat: object, lon: object) -> tuple[str, str] | None:
    """(reason, detail) when a coordinate pair is unusable, else None.

    Exactly (0, 0) is refused: it is the classic placeholder of a missing fix ("null island").
    """
    try:
        flat, flon = float(lat), float(lon)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return NAN_COORDS, f"lat/lon not numeric: {lat!r}, {lon!r}"
    if math.isnan(flat) or math.isnan(flon) or math.isinf(flat) or math.isinf(flon):
        return NAN_COORDS, f"lat/lon is NaN or infinite: {flat}, {flon}"
    if not (-90.0 <= flat <= 90.0) or not (-180.0 <= flon <= 180.0):
        return OUT_OF_RANGE, f"lat {flat} / lon {flon} outside [-90, 90] / [-180, 180]"
    if flat == 0.0 and flon == 0.0:
        return NULL_ISLAND, "lat/lon is exactly (0, 0), a placeholder for a missing fix"
    return None


def empty_rejects() -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series([], dtype="str") for c in COLUMNS})


def read_rejects(path: Path) -> pd.DataFrame:
    if not path.is_file():
        return empty_rejects()
    return pd.read_parquet(path)


def write_rejects(path: Path, kept: pd.DataFrame, new: pd.DataFrame) -> None:
    """Write `kept` rows plus `new` ones as rejects.parquet, sorted, atomically."""
    out = pd.concat([kept, new[COLUMNS]], ignore_index=True) if len(new) else kept
    out = out.astype({c: "str" for c in COLUMNS})
    out = out.sort_values(["source", "source_ref", "stage", "reason"], kind="stable")
    write_parquet(path, out.reset_index(drop=True))
