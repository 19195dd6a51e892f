"""Vectorised H3 labelling: many points -> cell strings at several resolutions at once.

h3-py 4 has no vectorised `latlng_to_cell`, so the finest resolution is computed once per point
through the integer API (no string formatting per call); every coarser resolution is derived
from it with numpy bit operations on the H3 index layout (resolution in bits 52-55, one 3-bit
digit per resolution, unused digits set to 7). Strings are formatted in bulk
with numpy and Arrow, not with one Python call per point.

The coarser columns are the H3 *parents* of the finest cell (`h3.cell_to_parent`), so the
columns form one tree and a class always sits inside its parent class. H3 children overlap
their parent's edge, so for ~7% of points the r6 parent differs from the r6 cell that
`latlng_to_cell` would return for the point itself.
"""

from __future__ import annotations

import itertools

import h3
import numpy as np
import pandas as pd
import pyarrow as pa
from h3.api import basic_int

_RES_SHIFT = np.uint64(52)
_RES_MASK = np.uint64(0xF << 52)


def latlng_to_cells_int(lat: np.ndarray, lon: np.ndarray, res: int) -> np.ndarray:
    """(N,) uint64 H3 indexes of the points at `res`."""
    # map() over plain lists keeps the per-point Python overhead to the call itself
    cells = map(basic_int.latlng_to_cell, lat.tolist(), lon.tolist(), itertools.repeat(res))
    return np.fromiter(cells, dtype=np.uint64, count=len(lat))


def parent_int(cells: np.ndarray, res: int, parent_res: int) -> np.ndarray:
    """Parents at `parent_res` of uint64 cells at `res` (pure bit arithmetic, no H3 calls)."""
    if parent_res > res:
        raise ValueError(f"parent resolution {parent_res} is finer than {res}")
    if parent_res == res:
        return cells.copy()
    # digits of resolutions parent_res+1 .. 15 become 7 (unused)
    unused = np.uint64((1 << (3 * (15 - parent_res))) - 1)
    out = (cells & ~_RES_MASK) | (np.uint64(parent_res) << _RES_SHIFT)
    return out | unused


_HEX_DIGITS = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_NIBBLE_SHIFTS = np.arange(56, -1, -4, dtype=np.uint64)  # the 15 hex digits of a cell index
_STR_DTYPE = pd.StringDtype(storage="pyarrow", na_value=np.nan)  # pandas' default "str"


def to_strings(cells: np.ndarray) -> pd.api.extensions.ExtensionArray:
    """(N,) H3 strings as a pandas "str" array, formatted in bulk.

    A valid cell index has its top nibble 0 and mode bits 0001, so its string is exactly 15
    lowercase hex digits: nibbles are looked up in a table and viewed as fixed-width bytes,
    then handed to Arrow without a Python object per row.
    """
    cells = np.asarray(cells, dtype=np.uint64)
    if len(cells) and not np.all((cells >> np.uint64(59)) == np.uint64(1)):
        raise ValueError("not H3 cell indexes (mode bits are not 1)")
    nibbles = ((cells[:, None] >> _NIBBLE_SHIFTS) & np.uint64(0xF)).astype(np.uint8)
    fixed = np.ascontiguousarray(_HEX_DIGITS[nibbles]).view("S15").reshape(-1)
    arrow = pa.array(fixed, type=pa.binary(15)).cast(pa.string())
    return pd.array(arrow.to_pandas(types_mapper={pa.string(): _STR_DTYPE}.get), dtype="str")


def h3_columns(
    lat: np.ndarray, lon: np.ndarray, resolutions: list[int]
) -> dict[str, pd.api.extensions.ExtensionArray]:
    """`{"h3_r7": cells, "h3_r6": ...}` (pandas "str" arrays) for every resolution."""
    lat = np.asarray(lat, dtype=np.float64)
    lon = np.asarray(lon, dtype=np.float64)
    finest = max(resolutions)
    base = latlng_to_cells_int(lat, lon, finest)
    return {
        f"h3_r{r}": to_strings(parent_int(base, finest, r))
        for r in sorted(set(resolutions), reverse=True)
    }


def cell_centers(cells: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) arrays of the centres of H3 cells (class centroids)."""
    pts = np.array([h3.cell_to_latlng(c) for c in cells], dtype=np.float64).reshape(-1, 2)
    return pts[:, 0], pts[:, 1]


def nearest(query: np.ndarray, targets: np.ndarray, block: int = 4096) -> np.ndarray:
    """Index of the nearest `targets` row (unit vectors) for each `query` row, in blocks."""
    out = np.empty(len(query), dtype=np.int64)
    for i in range(0, len(query), block):
        out[i : i + block] = np.argmax(query[i : i + block] @ targets.T, axis=1)
    return out
