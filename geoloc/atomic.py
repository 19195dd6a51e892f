"""Atomic writes: a partial write never replaces a good file.

Everything that writes a canonical file (index parquet, summary.json, leaderboards) goes
through here: write to a temp file in the same folder, fsync, then `os.replace`.

Temp files are named `.<name>.<host>-<pid>-<random>.tmp` (`temp_path`), so one left behind by a
killed writer is recognisable: the first write of a process into a folder removes the ones there
whose writer is dead (same host, process gone) or, from another host, older than an hour
(`sweep_stale_temps`). Files that do not follow the pattern are never touched.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from geoloc.errors import DiskFullError, is_disk_full

STALE_AFTER_S = 3600.0
"""A temp file from another host is taken as abandoned after this long (pids say nothing there)."""

_TEMP_RE = re.compile(r"^\..+\.(?P<host>\w+)-(?P<pid>\d+)-\w+\.tmp$")
_HOST = re.sub(r"\W", "_", socket.gethostname()) or "host"
_swept: set[str] = set()  # folders this process has already cleaned


def temp_path(target: str | os.PathLike[str]) -> Path:
    """A fresh temp name beside `target` that says who writes it; cleans the folder first."""
    target = Path(target)
    _sweep_once(target.parent)
    token = f"{_HOST}-{os.getpid()}-{secrets.token_hex(4)}"
    return target.with_name(f".{target.name}.{token}.tmp")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def is_stale_temp(path: Path, now: float | None = None) -> bool:
    """Whether `path` is a geoloc temp file whose writer is gone (see the module docstring)."""
    match = _TEMP_RE.match(path.name)
    if match is None:
        return False
    if match["host"] == _HOST:
        pid = int(match["pid"])
        return pid != os.getpid() and not _pid_alive(pid)
    try:
        age = (now if now is not None else time.time()) - path.stat().st_mtime
    except OSError:
        return False
    return age > STALE_AFTER_S


def sweep_stale_temps(folder: str | os.PathLike[str], recursive: bool = False) -> int:
    """Remove temp files left in `folder` (and below, when `recursive`) by dead writers."""
    removed = 0
    folders = (Path(d) for d, _, _ in os.walk(folder)) if recursive else iter([Path(folder)])
    for current in folders:
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            if entry.name.endswith(".tmp") and entry.is_file(follow_symlinks=False):
                path = Path(entry.path)
                if is_stale_temp(path):
                    path.unlink(missing_ok=True)
                    removed += 1
    return removed


def _sweep_once(folder: Path) -> None:
    key = os.fspath(folder)
    if key not in _swept:
        _swept.add(key)
        sweep_stale_temps(folder)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success it replaces `path`, on error it is removed."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = temp_path(target)
    os.close(os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))  # as mkstemp did
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp_path, target)
    except BaseException as exc:
        written = tmp_path.stat().st_size if tmp_path.exists() else 0
        tmp_path.unlink(missing_ok=True)
        if isinstance(exc, Exception) and is_disk_full(exc, target.parent):
            raise DiskFullError.writing(target, written=written) from exc
        raise


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    try:
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
    except DiskFullError as exc:  # the exact size is known here
        raise DiskFullError.writing(path, needed=len(data)) from exc.__cause__


def write_text(path: str | os.PathLike[str], text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike[str], obj: Any, indent: int = 2) -> None:
    write_text(path, json.dumps(obj, indent=indent, sort_keys=False, default=str) + "\n")


def write_parquet(path: str | os.PathLike[str], df: Any) -> None:
    """Write a pandas DataFrame to parquet atomically (no index column)."""
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def file_sha256(path: str | os.PathLike[str]) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (checkpoints and shards can be large)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
