"""Advisory file locks for read-modify-writes that several processes share.

Foundation: `data/` (manifest merges), the MLflow store and the Optuna study all take turns
through it, so the integrations need not import `data/` for a lock.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive advisory lock (POSIX `flock`) around a read-modify-write of shared files.

    Two ingests into one data root (e.g. parallel Prefect tasks) both merge into
    `manifest.parquet` and `rejects.parquet`; the lock makes those merges take turns.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as fh:
        try:
            import fcntl
        except ImportError:  # not POSIX: no locking available
            yield
            return
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
