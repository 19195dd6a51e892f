"""The canonical index under `data/index/`: H3 labels, splits, the class list and features.

`build_index` reads `data/processed/manifest.parquet` and writes, each atomically:
`images.parquet` (manifest + `h3_r*` columns), `splits.parquet` (split, class label, parent
label, remapping), `labels.json` (the class list and the dataset fingerprint),
`h3_features.parquet` (per-class-cell features) and an empty `rejects.parquet` when ingestion
wrote none. Stages record what they finished in `data/state/index.json`; a rerun with the same
inputs skips them, and the same manifest and config always give byte-identical files.

Cells with fewer than `min_images_per_class` train images do not become classes. Their images
are not dropped: every image (any split) whose own cell is not a class is mapped to the class
whose cell centre is nearest to its own cell's centre, with `remapped=True` in splits.parquet.

Scale: the manifest is streamed in row groups (`geoloc.data.tables`) into images.parquet and
again into splits.parquet; between them the build holds a few numpy values per image (H3 ids,
split codes, labels) and the class table, never a Python object per image. Splits and classes
are whole-array operations on integer H3 ids (`geoloc.data.splits`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from geoloc.atomic import file_sha256, write_json, write_parquet
from geoloc.config import IndexConfig
from geoloc.data import rejects as R
from geoloc.data import tables
from geoloc.data.cells import (
    columns_from_finest,
    from_strings,
    latlng_to_cells_int,
    parent_int,
    to_strings,
)
from geoloc.data.imagestore import LOCATION_COLUMNS, manifest_shard_problems
from geoloc.data.ingest import read_processed_manifest
from geoloc.data.splits import (
    SPLITS,
    ClassTable,
    assign_splits,
    group_codes,
    make_classes,
    map_to_classes,
)
from geoloc.data.state import StageState, maybe_fault, stable_hash
from geoloc.data.tables import is_sorted, iter_frames, table_digest, write_frames
from geoloc.errors import DataError, IndexMissingError
from geoloc.paths import DataPaths

log = logging.getLogger(__name__)

LABELS_VERSION = 1
REMAP_POLICY = "nearest_kept_class"
STAGES = ("images", "splits", "features")


@dataclass(frozen=True)
class IndexReport:
    n_images: int
    n_classes: int
    n_parents: int
    n_remapped: int
    split_counts: dict[str, int]
    fingerprint: str
    skipped_stages: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------
# images.parquet
# ------------------------------------------------------------------------------------------


@dataclass
class _Rows:
    """Per-image values the split stage needs, gathered batch by batch in image order."""

    finest: list[np.ndarray] = field(default_factory=list)  # uint64 cells at the finest res
    image_ids: list[pa.Array] = field(default_factory=list)  # only for split=random/sequence
    sequence_ids: list[pa.Array] = field(default_factory=list)  # only for split=sequence

    def add(self, frame: pd.DataFrame, finest: np.ndarray, cfg: IndexConfig) -> None:
        self.finest.append(finest)
        if cfg.split != "geographic":
            self.image_ids.append(pa.array(frame["image_id"].array, type=pa.string()))
        if cfg.split == "sequence":
            self.sequence_ids.append(pa.array(frame["sequence_id"].array, type=pa.string()))

    def cells(self) -> np.ndarray:
        if len(self.finest) != 1:  # one array from here on, not the batches and a copy
            self.finest = [np.concatenate(self.finest) if self.finest else np.zeros(0, np.uint64)]
        return self.finest[0]

    def column(self, name: str) -> pa.ChunkedArray | None:
        chunks = getattr(self, name)
        return pa.chunked_array(chunks, type=pa.string()) if chunks else None


def label_images(manifest: pd.DataFrame, cfg: IndexConfig) -> tuple[pd.DataFrame, np.ndarray]:
    """(images rows, finest uint64 cells): the manifest minus source_ref plus `h3_r*` columns.

    One H3 call per point at the finest resolution; the coarser columns are its parents.
    """
    finest_res = max(cfg.resolutions)
    lat = manifest["lat"].to_numpy(dtype=np.float64)
    lon = manifest["lon"].to_numpy(dtype=np.float64)
    finest = latlng_to_cells_int(lat, lon, finest_res)
    images = manifest.drop(columns=["source_ref"])
    for name, values in columns_from_finest(finest, finest_res, cfg.resolutions).items():
        images[name] = values
    return images, finest


def _manifest_frames(paths: DataPaths) -> Iterator[pd.DataFrame]:
    """The processed manifest sorted by image_id, a batch at a time.

    Ingest writes it sorted, so it streams; a manifest written otherwise is sorted in memory.
    """
    if is_sorted(paths.processed_manifest, "image_id"):
        yield from iter_frames(paths.processed_manifest)
        return
    log.warning("%s is not sorted by image_id: sorting it in memory", paths.processed_manifest)
    manifest = read_processed_manifest(paths)
    manifest = manifest.sort_values("image_id", kind="stable").reset_index(drop=True)
    step = tables.BATCH_ROWS
    for i in range(0, len(manifest), step):
        yield manifest.iloc[i : i + step].reset_index(drop=True)


def write_images(paths: DataPaths, cfg: IndexConfig) -> _Rows:
    """Stream the manifest into images.parquet; return what the split stage needs."""
    rows = _Rows()

    def frames() -> Iterator[pd.DataFrame]:
        for batch in _manifest_frames(paths):
            images, finest = label_images(batch, cfg)
            rows.add(images, finest, cfg)
            yield images

    write_frames(paths.images, frames())
    return rows


def read_images(paths: DataPaths, cfg: IndexConfig) -> _Rows:
    """What the split stage needs, from an images.parquet built earlier."""
    finest_col = f"h3_r{max(cfg.resolutions)}"
    columns = [finest_col, "image_id", "sequence_id"]
    rows = _Rows()
    for frame in iter_frames(paths.images, columns=columns):
        rows.add(frame, from_strings(frame[finest_col].array), cfg)
    return rows


# ------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Splits:
    split: np.ndarray  # (N,) int8 codes into SPLITS
    table: ClassTable
    labels: np.ndarray  # (N,) int64 class index
    remapped: np.ndarray  # (N,) bool


def make_splits(rows: _Rows, cfg: IndexConfig) -> _Splits:
    """Split every image, choose the classes, label every image (own cell or nearest class)."""
    finest = rows.cells()
    finest_res = max(cfg.resolutions)
    groups = group_codes(
        cfg,
        parent_int(finest, finest_res, cfg.split_resolution),
        rows.column("image_ids"),
        rows.column("sequence_ids"),
    )
    split = assign_splits(groups, cfg)
    cells = parent_int(finest, finest_res, cfg.resolution)
    table = make_classes(cells, split, cfg)
    labels, remapped = map_to_classes(cells, table)
    return _Splits(split=split, table=table, labels=labels, remapped=remapped)


def write_splits(paths: DataPaths, result: _Splits) -> None:
    """splits.parquet, one row per images.parquet row (same order), a batch at a time."""
    names = np.array(SPLITS, dtype=object)

    def frames() -> Iterator[pd.DataFrame]:
        offset = 0
        for ids in iter_frames(paths.images, columns=["image_id"]):
            part = slice(offset, offset + len(ids))
            offset += len(ids)
            labels = result.labels[part]
            yield pd.DataFrame(
                {
                    "image_id": ids["image_id"].astype("str"),
                    "split": pd.array(names[result.split[part]], dtype="str"),
                    "label": labels,
                    "parent_label": result.table.parent_index[labels],
                    "label_cell": to_strings(result.table.cells[labels]),
                    "remapped": result.remapped[part],
                }
            )

    write_frames(paths.splits, frames())


def labels_document(result: _Splits, cfg: IndexConfig) -> dict[str, Any]:
    """labels.json without its fingerprint."""
    classes, parents = result.table.documents()
    return {
        "version": LABELS_VERSION,
        "resolution": cfg.resolution,
        "parent_resolution": cfg.parent_resolution,
        "fingerprint": "",
        "min_images_per_class": cfg.min_images_per_class,
        "remap_policy": REMAP_POLICY,
        # how images were decoded and shrunk, so `geoloc predict` prepares photos the same way
        "processing": {"max_side": cfg.max_side, "max_pixels": cfg.max_pixels},
        "split": {
            "strategy": cfg.split,
            "split_resolution": cfg.split_resolution,
            "seed": cfg.seed,
            "counts": _split_counts(result.split),
        },
        "classes": classes,
        "parents": parents,
    }


def _split_counts(split: np.ndarray) -> dict[str, int]:
    counts = np.bincount(split, minlength=len(SPLITS))
    return {name: int(counts[i]) for i, name in enumerate(SPLITS)}


# ------------------------------------------------------------------------------------------
# fingerprint and labels I/O
# ------------------------------------------------------------------------------------------


STORAGE_COLUMNS = ("path", *LOCATION_COLUMNS)
"""Where an image's bytes lie (file, tar shard, offset), not what they are: left out of the
fingerprint, so the same images, splits and labels ingested anywhere (shard names carry the
ingest job's id) have one fingerprint. The `sha256` column stands for the bytes."""


def content_digest(images_parquet: Path) -> bytes:
    """The images table's digest over its content columns (`STORAGE_COLUMNS` left out)."""
    return table_digest(images_parquet, exclude=STORAGE_COLUMNS)


def compute_fingerprint(images: bytes, splits: bytes, doc: dict[str, Any]) -> str:
    """sha256 of the images (`content_digest`) and splits digests and labels.json's body."""
    # the fingerprint is content only: the file hash of images.parquet carries storage columns
    body = {k: v for k, v in doc.items() if k not in ("fingerprint", "images_sha256")}
    h = hashlib.sha256()
    h.update(images)
    h.update(splits)
    h.update(json.dumps(body, sort_keys=True).encode())
    return h.hexdigest()


def read_labels(paths: DataPaths) -> dict[str, Any]:
    """labels.json, checked for its version; `IndexMissingError` when there is no index."""
    if not paths.labels.is_file():
        raise IndexMissingError(f"no index at {paths.index}: run `geoloc index build` first")
    doc = json.loads(paths.labels.read_text())
    if doc.get("version") != LABELS_VERSION:
        raise DataError(f"{paths.labels}: labels version {doc.get('version')} is not supported")
    return doc


def index_fingerprint(paths: DataPaths) -> str:
    """The fingerprint of the index on disk (recomputed from its files, not read back)."""
    doc = read_labels(paths)
    return compute_fingerprint(content_digest(paths.images), table_digest(paths.splits), doc)


# ------------------------------------------------------------------------------------------
# build
# ------------------------------------------------------------------------------------------


def _inputs_key(paths: DataPaths, cfg: IndexConfig) -> str:
    manifest_sha = file_sha256(paths.processed_manifest)
    settings = cfg.model_dump(mode="json", exclude={"workers"})
    layers = {
        name: (paths.external / name).stat().st_mtime_ns
        for name in cfg.external_layers
        if (paths.external / name).is_file()
    }
    return stable_hash({"manifest": manifest_sha, "cfg": settings, "layers": layers}, 32)


def _stage_done(doc: dict[str, Any], stage: str, files: list[Any]) -> bool:
    recorded = doc.get("done", {}).get(stage)
    return bool(recorded) and all(
        f.is_file() and recorded.get(f.name) == file_sha256(f) for f in files
    )


def build_index(
    paths: DataPaths, cfg: IndexConfig, *, on_stage: Callable[[str], None] | None = None
) -> IndexReport:
    """Build `data/index/` from the processed manifest; resumable, deterministic.

    `on_stage(name)` is called after each stage is committed (tests inject interruptions here).
    """
    t0 = time.perf_counter()
    if not paths.processed_manifest.is_file() or not _num_rows(paths.processed_manifest):
        raise IndexMissingError(
            f"no processed images in {paths.processed_manifest}: run `geoloc data demo` and "
            f"`geoloc data ingest demo` (or ingest your own source) first"
        )
    for problem in manifest_shard_problems(paths.processed_manifest, paths.root):
        log.warning("%s: its images are in the index but cannot be read", problem)
    state = StageState(paths.state / "index.json")
    doc = state.load()
    key = _inputs_key(paths, cfg)
    if doc.get("inputs") != key:
        doc = {"inputs": key, "done": {}}
    skipped: list[str] = []
    stage_files = {
        "images": [paths.images],
        "splits": [paths.splits, paths.labels],
        "features": [paths.h3_features],
    }

    def commit(stage: str) -> None:
        doc["done"][stage] = {f.name: file_sha256(f) for f in stage_files[stage]}
        state.save(doc)
        if on_stage is not None:
            on_stage(stage)
        maybe_fault("index", len(doc["done"]))

    rows: _Rows | None = None
    if _stage_done(doc, "images", stage_files["images"]):
        skipped.append("images")
    else:
        rows = write_images(paths, cfg)
        commit("images")

    if _stage_done(doc, "splits", stage_files["splits"]):
        skipped.append("splits")
        labels = read_labels(paths)
        split_counts, n_remapped = _splits_summary(paths)
    else:
        result = make_splits(rows if rows is not None else read_images(paths, cfg), cfg)
        rows = None  # the per-image ids are no longer needed
        write_splits(paths, result)
        labels = labels_document(result, cfg)
        split_counts, n_remapped = _split_counts(result.split), int(result.remapped.sum())
        del result
        images_digest, splits_digest = content_digest(paths.images), table_digest(paths.splits)
        labels["fingerprint"] = compute_fingerprint(images_digest, splits_digest, labels)
        # which images.parquet these splits were made from: `check_index` refuses an index whose
        # rebuild stopped after its images stage (new images, old splits)
        labels["images_sha256"] = doc["done"]["images"]["images.parquet"]
        write_json(paths.labels, labels)
        commit("splits")

    if _stage_done(doc, "features", stage_files["features"]):
        skipped.append("features")
    else:
        from geoloc.data.features import build_features

        cells = [c["cell"] for c in labels["classes"]]
        write_parquet(paths.h3_features, build_features(cells, paths, cfg))
        commit("features")

    if not paths.rejects.is_file():
        write_parquet(paths.rejects, R.empty_rejects())

    report = IndexReport(
        n_images=_num_rows(paths.images),
        n_classes=len(labels["classes"]),
        n_parents=len(labels["parents"]),
        n_remapped=n_remapped,
        split_counts=split_counts,
        fingerprint=labels["fingerprint"],
        skipped_stages=skipped,
        seconds=time.perf_counter() - t0,
    )
    log.info("index: %s", report)
    return report


def _num_rows(path: Any) -> int:
    return pq.ParquetFile(path).metadata.num_rows


def _splits_summary(paths: DataPaths) -> tuple[dict[str, int], int]:
    """(split counts, remapped images) of a splits.parquet built earlier."""
    counts = dict.fromkeys(SPLITS, 0)
    remapped = 0
    for frame in iter_frames(paths.splits, columns=["split", "remapped"]):
        for name, n in frame["split"].value_counts().items():
            counts[name] += int(n)
        remapped += int(frame["remapped"].sum())
    return counts, remapped
