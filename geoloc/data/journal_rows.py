"""Which journal rows an ingest merge takes, in source order, read a slice at a time.

`geoloc.data.finalize` merges what these choose: for each listed key the last journal row
(source verdicts are redone on every run), ordered by the key's place in the listing. Only the
parts' key columns are read to choose; the rows themselves travel `slice_rows` at a time.
Per-row memory while choosing: 20 bytes a listed key (`listing_index`), 8 for the choice, 16
for the digest of each chosen key.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from geoloc.data.digests import DigestIndex, digests
from geoloc.data.state import Journal


def listing_index(listed: np.ndarray, first_wins: bool = False) -> DigestIndex:
    """Each listed key's position in the listing (its first or its last, when listed twice)."""
    n = len(listed)
    uniq, at = np.unique(listed if first_wins else listed[::-1], return_index=True)
    return DigestIndex(uniq, (at if first_wins else n - 1 - at).astype(np.int32))


@dataclass
class Selection:
    """The journal row that stands for each listed key, in listing order, and the keys that
    have one (this job's refs: its earlier rows in both tables are replaced)."""

    parts: list[Path]
    part: np.ndarray  # int32 (rows,): the part holding each chosen row
    row: np.ndarray  # int32 (rows,): its row in that part
    keys: np.ndarray  # S16 (rows,), sorted: the digest of each chosen row's key
    gone: set[tuple[str, str]] = field(default_factory=set)  # source rejects no longer listed


def select_rows(journals: Sequence[Path], order: DigestIndex) -> Selection:
    """The last journal row of each listed key (source verdicts are redone on every run), in
    the order of the keys' places in the listing; reading only each part's key columns.

    The choice is one slot per listing place (8 bytes a row), overwritten by later parts: no
    per-row list of every journal row to sort afterwards (~60 bytes a row at its peak)."""
    parts = [p for folder in journals for p in Journal(folder).parts()]
    size = int(order.values.max()) + 1 if len(order) else 0
    part_of = np.full(size, -1, np.int32)
    row_of = np.full(size, -1, np.int32)
    gone: set[tuple[str, str]] = set()
    for i, path in enumerate(parts):
        names = set(pq.read_schema(path).names)
        if "key" not in names:
            continue
        cols = ["key"] + (["stage", "source", "source_ref"] if "stage" in names else [])
        table = pq.read_table(path, columns=cols)
        at = order.find(digests(table.column("key").to_pylist()))
        if "stage" in names:
            stage = table.column("stage").to_pylist()
            for j in np.flatnonzero(at < 0):
                if stage[j] == "source":  # a source reject no longer listed (a zip repaired)
                    gone.add((table.column("source")[j].as_py(),
                              table.column("source_ref")[j].as_py()))  # fmt: skip
        # a key twice in one part: its last row (fancy assignment leaves repeats unordered)
        place, last = np.unique(at[::-1], return_index=True)
        rows = len(at) - 1 - last[place >= 0]
        part_of[place[place >= 0]] = i
        row_of[place[place >= 0]] = rows
    chosen = np.flatnonzero(part_of >= 0)
    keys = order.keys[part_of[order.values] >= 0]  # sorted, as order.keys are
    return Selection(parts, part_of[chosen], row_of[chosen], keys, gone)


def row_slices(sel: Selection, slice_rows: int) -> Iterator[pd.DataFrame]:
    """The chosen journal rows, `slice_rows` at a time, in listing order (one frame each)."""
    cache: dict[int, pa.Table] = {}  # the last part read: slices cut parts in two
    for start in range(0, len(sel.part), slice_rows):
        part, row = sel.part[start : start + slice_rows], sel.row[start : start + slice_rows]
        tables, slots = [], []
        for p in np.unique(part):
            if int(p) not in cache:
                cache = {int(p): pq.read_table(sel.parts[p])}
            at = np.flatnonzero(part == p)
            tables.append(cache[int(p)].take(pa.array(row[at])))
            slots.append(at)
        # parts differ in columns (a part of rejects has no sha256): missing ones are null
        table = pa.concat_tables(tables, promote_options="permissive")
        order = np.argsort(np.concatenate(slots), kind="stable")
        yield table.take(pa.array(order)).to_pandas()
