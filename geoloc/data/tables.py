"""Parquet tables read and written in row groups, so a pass over N rows holds one batch at once.

Batches come back as pandas frames with the dtypes `pd.read_parquet` gives the whole file, and
`table_digest` hashes them as `hash_pandas_object` hashes the whole frame (its row hashes do not
depend on how the rows are cut), so a streamed digest equals the one of the loaded frame.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from geoloc.atomic import atomic_path

BATCH_ROWS = 262_144  # rows per batch and per written row group (~10-30 MB of index columns)


def _open(path: Path) -> pq.ParquetFile:
    # pre_buffer (pyarrow's default) caches every row group read so far until the file is
    # closed: memory grew by ~150 bytes per manifest row; without it, one row group at a time
    return pq.ParquetFile(path, pre_buffer=False)


def _to_frame(table: pa.Table) -> pd.DataFrame:
    # Table.to_pandas applies the pandas metadata stored with the file, as read_parquet does
    return table.to_pandas()


def iter_frames(
    path: Path, columns: list[str] | None = None, batch_rows: int | None = None
) -> Iterator[pd.DataFrame]:
    """The file's rows in order, `batch_rows` at a time (at least one frame, maybe empty)."""
    batch_rows = batch_rows or BATCH_ROWS
    pf = _open(path)
    schema = pf.schema_arrow
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns], metadata=schema.metadata)
    empty = True
    for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
        empty = False
        yield _to_frame(pa.Table.from_batches([batch], schema=schema))
    if empty:
        yield _to_frame(schema.empty_table())


def is_sorted(path: Path, column: str) -> bool:
    """Whether `column` never decreases down the file (checked batch by batch)."""
    last = None
    for batch in _open(path).iter_batches(batch_size=BATCH_ROWS, columns=[column]):
        values = batch.column(0)
        if values.null_count:
            return False
        if len(values) > 1 and not pc.all(pc.less_equal(values[:-1], values[1:])).as_py():
            return False
        if len(values) and last is not None and values[0].as_py() < last:
            return False
        if len(values):
            last = values[-1].as_py()
    return True


def write_frames(path: Path, frames: Iterable[pd.DataFrame]) -> int:
    """Write frames (same columns and dtypes) as row groups of one parquet file, atomically.

    Returns the number of rows. The schema, with its pandas metadata, is the first frame's, as
    `DataFrame.to_parquet(index=False)` would write it.
    """
    rows = 0
    with atomic_path(path) as tmp:
        writer: pq.ParquetWriter | None = None
        try:
            for frame in frames:
                schema = writer.schema if writer is not None else None
                table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table, row_group_size=max(len(frame), 1))
                rows += len(frame)
        finally:
            if writer is not None:
                writer.close()
        if writer is None:
            raise ValueError(f"no frames to write to {path}")
    release_memory()
    return rows


class FrameDigest:
    """sha256 of a frame's column names, dtypes and row hashes, fed one batch at a time."""

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self._started = False

    def update(self, frame: pd.DataFrame) -> None:
        if not self._started:
            self._hash.update(json.dumps([[c, str(t)] for c, t in frame.dtypes.items()]).encode())
            self._started = True
        if len(frame):
            rows = pd.util.hash_pandas_object(frame, index=False)
            self._hash.update(rows.to_numpy().tobytes())

    def digest(self) -> bytes:
        return self._hash.digest()


def frame_digest(frame: pd.DataFrame) -> bytes:
    digest = FrameDigest()
    digest.update(frame)
    return digest.digest()


def table_digest(
    path: Path, batch_rows: int | None = None, exclude: Sequence[str] = ()
) -> bytes:
    """`frame_digest(pd.read_parquet(path))` without the `exclude` columns, batch by batch."""
    digest = FrameDigest()
    names = _open(path).schema_arrow.names
    columns = [c for c in names if c not in exclude] if exclude else None
    for frame in iter_frames(path, columns=columns, batch_rows=batch_rows):
        digest.update(frame)
    release_memory()
    return digest.digest()


def release_memory() -> None:
    """Hand Arrow's freed batch buffers back to the system after a pass (its allocator keeps
    them otherwise, and the next stage's numpy arrays would come on top)."""
    pa.default_memory_pool().release_unused()
