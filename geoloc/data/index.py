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
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h3
import numpy as np
import pandas as pd

from geoloc.atomic import file_sha256, write_json, write_parquet
from geoloc.config import IndexConfig
from geoloc.data import rejects as R
from geoloc.data.cells import cell_centers, h3_columns, nearest
from geoloc.data.ingest import read_processed_manifest
from geoloc.data.state import StageState, maybe_fault, stable_hash
from geoloc.errors import DataError, IndexMissingError
from geoloc.geo.distance import unit_vectors
from geoloc.paths import DataPaths

log = logging.getLogger(__name__)

LABELS_VERSION = 1
REMAP_POLICY = "nearest_kept_class"
SPLITS = ("train", "val", "test")
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


def label_images(manifest: pd.DataFrame, cfg: IndexConfig) -> pd.DataFrame:
    """images.parquet: the manifest (minus source_ref) plus `h3_r*` columns, sorted by id."""
    cols = h3_columns(manifest["lat"].to_numpy(), manifest["lon"].to_numpy(), cfg.resolutions)
    images = manifest.drop(columns=["source_ref"]).copy()
    for name, values in cols.items():
        images[name] = pd.array(values, dtype="str")
    return images.sort_values("image_id", kind="stable").reset_index(drop=True)


# ------------------------------------------------------------------------------------------
# splits
# ------------------------------------------------------------------------------------------


def split_groups(images: pd.DataFrame, cfg: IndexConfig) -> np.ndarray:
    """The group of each image: groups never straddle splits."""
    if cfg.split == "geographic":
        return images[f"h3_r{cfg.split_resolution}"].to_numpy(dtype=object)
    if cfg.split == "sequence":
        seq = images["sequence_id"]
        if seq.isna().all():
            log.warning("split=sequence but no image has a sequence_id: splitting per image")
        fallback = "img:" + images["image_id"].astype(str)
        return ("seq:" + seq.astype(str)).where(seq.notna(), fallback).to_numpy(dtype=object)
    return images["image_id"].to_numpy(dtype=object)


def assign_splits(groups: np.ndarray, cfg: IndexConfig) -> np.ndarray:
    """train/val/test per row: seeded shuffle of whole groups, filled test first, then val."""
    uniq, inverse, counts = np.unique(groups.astype(str), return_inverse=True, return_counts=True)
    order = np.random.default_rng(cfg.seed).permutation(len(uniq))
    n = len(groups)
    before = np.concatenate([[0], np.cumsum(counts[order])[:-1]])  # images placed before group
    split_of_group = np.empty(len(uniq), dtype=object)
    test_end = cfg.test_frac * n
    val_end = (cfg.test_frac + cfg.val_frac) * n
    split_of_group[order] = np.where(
        before < test_end, "test", np.where(before < val_end, "val", "train")
    )
    return split_of_group[inverse.reshape(-1)]


# ------------------------------------------------------------------------------------------
# classes
# ------------------------------------------------------------------------------------------


def make_classes(
    cells: pd.Series, split: np.ndarray, cfg: IndexConfig
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(classes, parents) for labels.json: kept cells sorted by cell id, parents likewise."""
    train_counts = cells[split == "train"].value_counts()
    kept = sorted(c for c, k in train_counts.items() if k >= cfg.min_images_per_class)
    if not kept:
        raise DataError(
            f"no H3 r{cfg.resolution} cell has >= {cfg.min_images_per_class} train images "
            f"({int((split == 'train').sum())} train images in {len(train_counts)} cells): "
            f"lower min_images_per_class or use a coarser resolution"
        )
    parent_cells = [h3.cell_to_parent(c, cfg.parent_resolution) for c in kept]
    parent_list = sorted(set(parent_cells))
    parent_index = {c: i for i, c in enumerate(parent_list)}
    lat, lon = cell_centers(kept)
    plat, plon = cell_centers(parent_list)
    classes = [
        {
            "index": i,
            "cell": cell,
            "parent": parent,
            "parent_index": parent_index[parent],
            "train_count": int(train_counts[cell]),
            "lat": float(lat[i]),
            "lon": float(lon[i]),
        }
        for i, (cell, parent) in enumerate(zip(kept, parent_cells, strict=True))
    ]
    parents = [
        {"index": i, "cell": c, "lat": float(plat[i]), "lon": float(plon[i])}
        for i, c in enumerate(parent_list)
    ]
    return classes, parents


def map_to_classes(
    cells: pd.Series, classes: list[dict[str, Any]]
) -> tuple[np.ndarray, np.ndarray]:
    """(label, remapped) per image: its own cell's class, else the nearest kept class."""
    index = {c["cell"]: c["index"] for c in classes}
    uniq = sorted(set(cells))
    missing = [c for c in uniq if c not in index]
    lookup = dict(index)
    if missing:
        targets = unit_vectors(
            np.array([c["lat"] for c in classes]), np.array([c["lon"] for c in classes])
        )
        mlat, mlon = cell_centers(missing)
        near = nearest(unit_vectors(mlat, mlon), targets)
        lookup.update({c: int(classes[j]["index"]) for c, j in zip(missing, near, strict=True)})
    labels = cells.map(lookup).to_numpy(dtype=np.int64)
    remapped = ~cells.isin(index.keys()).to_numpy()
    return labels, remapped


def make_splits(images: pd.DataFrame, cfg: IndexConfig) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(splits.parquet frame, labels.json document without fingerprint)."""
    split = assign_splits(split_groups(images, cfg), cfg)
    cells = images[f"h3_r{cfg.resolution}"].astype(str)
    classes, parents = make_classes(cells, split, cfg)
    labels, remapped = map_to_classes(cells, classes)
    parent_of = np.array([c["parent_index"] for c in classes], dtype=np.int64)
    cell_of = np.array([c["cell"] for c in classes], dtype=object)
    splits = pd.DataFrame(
        {
            "image_id": images["image_id"].astype("str"),
            "split": pd.array(split, dtype="str"),
            "label": labels,
            "parent_label": parent_of[labels],
            "label_cell": pd.array(cell_of[labels], dtype="str"),
            "remapped": remapped,
        }
    )
    doc = {
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
            "counts": {s: int((split == s).sum()) for s in SPLITS},
        },
        "classes": classes,
        "parents": parents,
    }
    return splits, doc


# ------------------------------------------------------------------------------------------
# fingerprint and labels I/O
# ------------------------------------------------------------------------------------------


def _frame_digest(df: pd.DataFrame) -> bytes:
    """Content hash of a frame (names, dtypes, values), independent of the parquet writer."""
    h = hashlib.sha256()
    h.update(json.dumps([[c, str(t)] for c, t in df.dtypes.items()]).encode())
    h.update(pd.util.hash_pandas_object(df, index=False).to_numpy().tobytes())
    return h.digest()


def compute_fingerprint(images: pd.DataFrame, splits: pd.DataFrame, doc: dict[str, Any]) -> str:
    body = {k: v for k, v in doc.items() if k != "fingerprint"}
    h = hashlib.sha256()
    h.update(_frame_digest(images))
    h.update(_frame_digest(splits))
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
    return compute_fingerprint(pd.read_parquet(paths.images), pd.read_parquet(paths.splits), doc)


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
    manifest = read_processed_manifest(paths)
    if not len(manifest):
        raise IndexMissingError(
            f"no processed images in {paths.processed_manifest}: run `geoloc data demo` and "
            f"`geoloc data ingest demo` (or ingest your own source) first"
        )
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

    if _stage_done(doc, "images", stage_files["images"]):
        skipped.append("images")
        images = pd.read_parquet(paths.images)
    else:
        images = label_images(manifest, cfg)
        write_parquet(paths.images, images)
        images = pd.read_parquet(paths.images)
        commit("images")

    if _stage_done(doc, "splits", stage_files["splits"]):
        skipped.append("splits")
        splits = pd.read_parquet(paths.splits)
        labels = read_labels(paths)
    else:
        splits, labels = make_splits(images, cfg)
        write_parquet(paths.splits, splits)
        splits = pd.read_parquet(paths.splits)
        labels["fingerprint"] = compute_fingerprint(images, splits, labels)
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
        n_images=len(images),
        n_classes=len(labels["classes"]),
        n_parents=len(labels["parents"]),
        n_remapped=int(splits["remapped"].sum()),
        split_counts={s: int((splits["split"] == s).sum()) for s in SPLITS},
        fingerprint=labels["fingerprint"],
        skipped_stages=skipped,
        seconds=time.perf_counter() - t0,
    )
    log.info("index: %s", report)
    return report
