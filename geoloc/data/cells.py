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

The index build works on uint64 ids throughout (`from_strings` parses stored columns back) and
formats strings only when it writes a file. A valid id is 15 lowercase hex digits, so sorting
the strings and sorting the integers give the same order.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
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
    return columns_from_finest(latlng_to_cells_int(lat, lon, finest), finest, resolutions)


def columns_from_finest(
    cells: np.ndarray, res: int, resolutions: list[int]
) -> dict[str, pd.api.extensions.ExtensionArray]:
    """`h3_r*` string columns, finest first, from uint64 cells at `res` (the finest of them)."""
    return {
        f"h3_r{r}": to_strings(parent_int(cells, res, r))
        for r in sorted(set(resolutions), reverse=True)
    }


_HEX_VALUE = np.full(256, 255, dtype=np.uint8)
_HEX_VALUE[np.frombuffer(b"0123456789abcdef", dtype=np.uint8)] = np.arange(16, dtype=np.uint8)


def from_strings(cells: Any) -> np.ndarray:
    """(N,) uint64 ids of H3 strings (a list, a pandas "str" array or an Arrow array)."""
    if isinstance(cells, pa.ChunkedArray):
        arr = cells.combine_chunks()
    elif isinstance(cells, pa.Array):
        arr = cells
    else:
        arr = pa.array(cells, type=pa.string())
    arr = arr.cast(pa.binary())
    if arr.null_count or (len(arr) and not pc.all(pc.equal(pc.binary_length(arr), 15)).as_py()):
        raise ValueError("not H3 cell strings (each is 15 hex digits)")
    fixed = arr.cast(pa.binary(15))
    raw = np.frombuffer(fixed.buffers()[1], dtype=np.uint8)[15 * fixed.offset :][: 15 * len(arr)]
    nibbles = _HEX_VALUE[raw].reshape(-1, 15)
    if (nibbles == 255).any():
        raise ValueError("not H3 cell strings (each is 15 lowercase hex digits)")
    return (nibbles.astype(np.uint64) << _NIBBLE_SHIFTS).sum(axis=1, dtype=np.uint64)


def centers_int(cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lat, lon) of the centres of uint64 cells: the same floats as `h3.cell_to_latlng`."""
    flat = itertools.chain.from_iterable(map(basic_int.cell_to_latlng, cells.tolist()))
    pts = np.fromiter(flat, dtype=np.float64, count=2 * len(cells)).reshape(-1, 2)
    return pts[:, 0], pts[:, 1]


def children_int(cells: np.ndarray, res: int, child_res: int) -> tuple[np.ndarray, np.ndarray]:
    """(owner, child) of uint64 cells at `res`: every child at `child_res`, ascending per cell.

    Bit arithmetic (each child digit runs over 0..6); a pentagon has no child on its deleted
    K axis, so the few pentagons among `cells` go through `h3.cell_to_children` instead.
    """
    depth = child_res - res
    if depth < 0:
        raise ValueError(f"child resolution {child_res} is coarser than {res}")
    digits = np.array(list(itertools.product(range(7), repeat=depth)), dtype=np.uint64)
    shifts = np.array([3 * (15 - r) for r in range(res + 1, child_res + 1)], dtype=np.uint64)
    offsets = (digits << shifts).sum(axis=1, dtype=np.uint64) if depth else np.zeros(1, np.uint64)
    cleared = ~np.uint64((1 << (3 * (15 - res))) - 1) | np.uint64((1 << (3 * (15 - child_res))) - 1)
    base = (cells & ~_RES_MASK & cleared) | (np.uint64(child_res) << _RES_SHIFT)
    child = (base[:, None] | offsets[None, :]).reshape(-1)
    owner = np.repeat(np.arange(len(cells), dtype=np.int64), len(offsets))
    pent = np.fromiter(map(basic_int.is_pentagon, cells.tolist()), dtype=bool, count=len(cells))
    if not pent.any():
        return owner, child
    keep = ~pent[owner]
    parts_owner, parts_child = [owner[keep]], [child[keep]]
    for i in np.flatnonzero(pent):
        kids = np.array(sorted(basic_int.cell_to_children(int(cells[i]), child_res)), np.uint64)
        parts_owner.append(np.full(len(kids), i, dtype=np.int64))
        parts_child.append(kids)
    owner, child = np.concatenate(parts_owner), np.concatenate(parts_child)
    order = np.argsort(owner, kind="stable")
    return owner[order], child[order]
