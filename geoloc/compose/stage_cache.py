"""Stage cache keys: fingerprints of what the index stages read, so an orchestrator skips a
stage whose inputs did not change (`demo_key` / `ingest_key` / `index_key`)."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel

import geoloc
from geoloc.atomic import file_sha256
from geoloc.config import IndexConfig
from geoloc.paths import DataPaths


def _digest(obj: Any) -> str:
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def tree_fingerprint(root: Path) -> str:
    """Fingerprint of a file or folder from names, sizes and mtimes (stat only, no reads).

    Cheap enough to run before every stage; a touched or added file changes it. `missing`
    when the path does not exist, so a later appearance changes the key too.
    """
    root = Path(root)
    if not root.exists():
        return "missing"
    if root.is_file():
        st = root.stat()
        return _digest([root.name, st.st_size, st.st_mtime_ns])
    entries = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            st = p.stat()
            entries.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return _digest(entries)


def is_remote_source(spec: str) -> bool:
    """Whether ingesting `spec` goes over the network (object storage, HTTP APIs)."""
    return "://" in spec or spec.startswith("mapillary:")


def source_fingerprint(spec: str, paths: DataPaths) -> str | None:
    """What a local ingestion source holds now (by stat); None for a remote source.

    `demo` is the demo folder of `paths`. Remote sources (s3://, http(s)://, mapillary:) cannot
    be fingerprinted without listing them, which is most of ingestion's work; they are never
    cached (ingestion itself resumes and skips what it already fetched).
    """
    if spec == "demo":
        return tree_fingerprint(paths.demo)
    if is_remote_source(spec):
        return None
    prefixed = spec.startswith(("folder:", "manifest:", "demo:"))
    return tree_fingerprint(Path(spec.split(":", 1)[1] if prefixed else spec))


def _config_dump(cfg: BaseModel | None) -> Any:
    return cfg.model_dump(mode="json") if cfg is not None else None


def demo_key(out_dir: Path, n: int, seed: int, sigma_deg: float) -> str:
    """Cache key of the demo generator: its parameters and where it writes."""
    return _digest(["demo", geoloc.__version__, str(Path(out_dir).resolve()), n, seed, sigma_deg])


def ingest_key(
    spec: str, paths: DataPaths, cfg: IndexConfig, options: Mapping[str, Any] | None = None
) -> str | None:
    """Cache key of ingestion + processing: the source's content, the options, the config.

    None (never cached) for remote sources, whose content is unknown until listed.
    """
    source = source_fingerprint(spec, paths)
    if source is None:
        return None
    return _digest(
        [
            "ingest",
            geoloc.__version__,
            str(paths.root.resolve()),
            spec,
            source,
            dict(options or {}),
            _config_dump(cfg),
        ]
    )


def index_key(paths: DataPaths, cfg: IndexConfig) -> str:
    """Cache key of the index build: the processed manifest's content and the config."""
    return _digest(
        [
            "index",
            geoloc.__version__,
            str(paths.root.resolve()),
            file_sha256(paths.processed_manifest) if paths.processed_manifest.is_file() else None,
            tree_fingerprint(paths.external),
            _config_dump(cfg),
        ]
    )


def stage_cache_dir(paths: DataPaths) -> Path:
    """Where an orchestrator keeps stage cache records: with the data they describe."""
    return paths.state / "stage-cache"


def stage_outputs_present(stage: str, paths: DataPaths, demo_dir: Path | None = None) -> bool:
    """Whether a stage's outputs are on disk; a cached stage whose outputs vanished must rerun."""
    if stage == "demo":
        folder = Path(demo_dir or paths.demo)
        return folder.is_dir() and any(folder.iterdir())
    if stage == "ingest":
        return paths.processed_manifest.is_file()
    if stage == "index":
        return all(p.is_file() for p in (paths.images, paths.splits, paths.labels))
    raise ValueError(f"unknown stage '{stage}'")
