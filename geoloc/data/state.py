"""Progress of long stages under `data/state/`, so an interrupted ingest or index build resumes.

A stage journals finished work as numbered, atomically written parquet parts. A crash loses at
most the part being assembled; finished parts are never rewritten, and a resumed run skips the
keys they hold. Content-addressed outputs (processed images) make redoing a lost part harmless.

Testing hook: `GEOLOC_FAULT_AFTER=<stage>:<n>` kills the process with SIGKILL right after the
n-th journal part of `<stage>` (`ingest`) or after the n-th finished stage of the index build
(`index`) is committed — a real, uncatchable interruption for resume tests.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd

from geoloc.atomic import temp_path, write_json

log = logging.getLogger(__name__)

FAULT_ENV = "GEOLOC_FAULT_AFTER"


def stable_hash(obj: Any, length: int = 16) -> str:
    """Short sha256 of a JSON-able object; keys sorted so equal inputs hash equally."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:length]


def maybe_fault(stage: str, count: int) -> None:
    """Kill this process hard when `GEOLOC_FAULT_AFTER` asks for it (resume tests only)."""
    spec = os.environ.get(FAULT_ENV, "")
    if not spec or ":" not in spec:
        return
    want_stage, _, want_n = spec.partition(":")
    if want_stage == stage and want_n.isdigit() and count >= int(want_n):
        log.warning("%s=%s: killing the process after %d %s steps", FAULT_ENV, spec, count, stage)
        os.kill(os.getpid(), signal.SIGKILL)


class Journal:
    """Append-only parquet parts in one folder: `part-000000.parquet`, `part-000001.parquet`...

    Safe under concurrent writers: each part is created exclusively (a hard link of a complete
    temp file, which fails when the name is taken), so two writers never replace each other's
    part. `lock` makes a whole job take turns: a second ingest of the same source waits for the
    first, then finds its work done instead of storing the same images again."""

    LOCK_NAME = ".lock"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._lock: Any = None
        self._next: int | None = None  # the part number this writer tries next

    def parts(self) -> list[Path]:
        return sorted(self.folder.glob("part-*.parquet"))

    def append(self, rows: Iterable[dict[str, Any]]) -> int:
        """Commit `rows` as the next free part; returns the number of parts now committed."""
        df = pd.DataFrame(list(rows))
        self.folder.mkdir(parents=True, exist_ok=True)
        # the folder is listed once per writer, not once a part (10^6 rows: ~4,000 parts)
        n = len(self.parts()) if self._next is None else self._next
        tmp = temp_path(self.folder / "part.parquet")
        try:
            df.to_parquet(tmp, index=False)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            while True:  # a part appears complete or not at all, and never replaces another
                try:
                    os.link(tmp, self.folder / f"part-{n:06d}.parquet")
                    break
                except FileExistsError:  # another writer took this number first
                    n += 1
        finally:
            tmp.unlink(missing_ok=True)
        self._next = n + 1
        return n + 1

    def lock(self) -> None:
        """Hold this job's lock until `unlock` (or the process ends); waits while another
        process holds it, saying so once."""
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        fh = open(self.folder / self.LOCK_NAME, "a+b")  # noqa: SIM115 - held across calls
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("another ingest of the same source holds %s: waiting for it to finish",
                        self.folder)  # fmt: skip
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        self._lock = fh

    def unlock(self) -> None:
        if self._lock is not None:
            self._lock.close()  # closing the file releases the flock
            self._lock = None

    def read(self, columns: Iterable[str] | None = None) -> pd.DataFrame:
        """All parts as one frame; only `columns` (those a part has) when given, which keeps
        a resume's look at a 10^6-row journal small."""
        parts = self.parts()
        if not parts:
            return pd.DataFrame()
        if columns is None:
            return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
        import pyarrow.parquet as pq

        wanted = list(columns)
        frames = []
        for p in parts:
            names = set(pq.read_schema(p).names)
            frames.append(pq.read_table(p, columns=[c for c in wanted if c in names]).to_pandas())
        return pd.concat(frames, ignore_index=True)

    def clear(self) -> None:
        for p in self.parts():
            p.unlink()
        self._next = None


class StageState:
    """A small JSON document per stage: which sub-steps are done, for which inputs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, Any]:
        if not self.path.is_file():
            return {}
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            log.warning("state file %s is unreadable; starting the stage over", self.path)
            return {}

    def save(self, doc: dict[str, Any]) -> None:
        write_json(self.path, doc)
