"""Versioned `.npz` files: the one way the gallery and the cached model outputs reach disk.

Both are plain arrays next to an int64 `version`, written atomically and uncompressed (they load
fast), and read back without pickle: a file from another geoloc version or a broken write is a
`DataError` naming the file, never a silently wrong array.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from geoloc.atomic import atomic_path
from geoloc.errors import DataError

__all__ = ["read_npz", "write_npz"]


def write_npz(path: Path, version: int, arrays: Mapping[str, np.ndarray]) -> None:
    """Write `arrays` and `version` to `path` atomically (uncompressed)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, version=np.int64(version), **arrays)


def read_npz(
    path: Path, version: int, what: str, required: Iterable[str] = ()
) -> dict[str, np.ndarray]:
    """Every array of a file written by `write_npz` (without `version`), read into memory.

    `DataError` naming `what` and the file when it is unreadable, has another version or lacks
    one of the `required` arrays.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            found = int(z["version"])
            if found != version:
                raise DataError(f"{what} '{path}' has version {found}; this geoloc reads {version}")
            arrays = {name: z[name] for name in z.files if name != "version"}
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile) as exc:  # truncated
        raise DataError(f"{what} '{path}' could not be read: {exc}") from exc
    missing = [name for name in required if name not in arrays]
    if missing:
        raise DataError(f"{what} '{path}' could not be read: no array {', '.join(missing)}")
    return arrays
