"""The index build as it was before the million-row work (v1), kept as the plain reference.

Same contract and files as `geoloc.data.index.build_index` (no resume bookkeeping): the whole
manifest in pandas, H3 cells as Python strings, `np.unique` over object arrays, a dict lookup
per image, the nearest kept class by a brute-force (block x classes) dot-product matrix, and
feature samples from one `h3.cell_to_children` call per class. The layers themselves (land mask,
coastline, population, Blue Marble) are the library's, which did not change.
"""

from __future__ import annotations

import json
from typing import Any

import h3
import numpy as np
import pandas as pd

from geoloc.atomic import write_json, write_parquet
from geoloc.config import IndexConfig
from geoloc.data import features as F
from geoloc.data.cells import h3_columns
from geoloc.data.index import LABELS_VERSION, REMAP_POLICY, STORAGE_COLUMNS, compute_fingerprint
from geoloc.data.tables import frame_digest
from geoloc.geo.distance import unit_vectors
from geoloc.paths import DataPaths


def _centres(cells: list[str]) -> tuple[np.ndarray, np.ndarray]:
    pts = np.array([h3.cell_to_latlng(c) for c in cells], dtype=np.float64).reshape(-1, 2)
    return pts[:, 0], pts[:, 1]


def _nearest(query: np.ndarray, targets: np.ndarray, block: int = 4096) -> np.ndarray:
    out = np.empty(len(query), dtype=np.int64)
    for i in range(0, len(query), block):
        out[i : i + block] = np.argmax(query[i : i + block] @ targets.T, axis=1)
    return out


def _splits(groups: np.ndarray, cfg: IndexConfig) -> np.ndarray:
    uniq, inverse, counts = np.unique(groups.astype(str), return_inverse=True, return_counts=True)
    order = np.random.default_rng(cfg.seed).permutation(len(uniq))
    n = len(groups)
    before = np.concatenate([[0], np.cumsum(counts[order])[:-1]])
    split_of_group = np.empty(len(uniq), dtype=object)
    test_end, val_end = cfg.test_frac * n, (cfg.test_frac + cfg.val_frac) * n
    split_of_group[order] = np.where(
        before < test_end, "test", np.where(before < val_end, "val", "train")
    )
    return split_of_group[inverse.reshape(-1)]


def _groups(images: pd.DataFrame, cfg: IndexConfig) -> np.ndarray:
    if cfg.split == "geographic":
        return images[f"h3_r{cfg.split_resolution}"].to_numpy(dtype=object)
    if cfg.split == "sequence":
        seq = images["sequence_id"]
        fallback = "img:" + images["image_id"].astype(str)
        return ("seq:" + seq.astype(str)).where(seq.notna(), fallback).to_numpy(dtype=object)
    return images["image_id"].to_numpy(dtype=object)


def _classes(cells: pd.Series, split: np.ndarray, cfg: IndexConfig):
    train_counts = cells[split == "train"].value_counts()
    kept = sorted(c for c, k in train_counts.items() if k >= cfg.min_images_per_class)
    parent_cells = [h3.cell_to_parent(c, cfg.parent_resolution) for c in kept]
    parent_list = sorted(set(parent_cells))
    parent_index = {c: i for i, c in enumerate(parent_list)}
    lat, lon = _centres(kept)
    plat, plon = _centres(parent_list)
    classes = [
        {"index": i, "cell": c, "parent": p, "parent_index": parent_index[p],
         "train_count": int(train_counts[c]), "lat": float(lat[i]), "lon": float(lon[i])}
        for i, (c, p) in enumerate(zip(kept, parent_cells, strict=True))
    ]  # fmt: skip
    parents = [{"index": i, "cell": c, "lat": float(plat[i]), "lon": float(plon[i])}
               for i, c in enumerate(parent_list)]  # fmt: skip
    return classes, parents


def _labels(cells: pd.Series, classes: list[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    index = {c["cell"]: c["index"] for c in classes}
    missing = [c for c in sorted(set(cells)) if c not in index]
    lookup = dict(index)
    if missing:
        targets = unit_vectors(
            np.array([c["lat"] for c in classes]), np.array([c["lon"] for c in classes])
        )
        near = _nearest(unit_vectors(*_centres(missing)), targets)
        lookup.update({c: int(classes[j]["index"]) for c, j in zip(missing, near, strict=True)})
    return cells.map(lookup).to_numpy(dtype=np.int64), ~cells.isin(index.keys()).to_numpy()


def _features(cells: list[str], cfg: IndexConfig) -> pd.DataFrame:
    owner: list[int] = []
    pts: list[tuple[float, float]] = []
    for i, cell in enumerate(cells):
        children = h3.cell_to_children(cell, h3.get_resolution(cell) + F.SAMPLE_DEPTH)
        pts.append(h3.cell_to_latlng(cell))
        pts.extend(h3.cell_to_latlng(c) for c in sorted(children))
        owner.extend([i] * (len(children) + 1))
    arr = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    own, lat, lon = np.asarray(owner), arr[:, 0], arr[:, 1]
    centre = np.array([h3.cell_to_latlng(c) for c in cells], dtype=np.float64).reshape(-1, 2)
    rgb = F.blue_marble_colour(lat, lon)
    n = len(cells)
    return pd.DataFrame(
        {
            "cell": pd.array(cells, dtype="str"),
            "land_fraction": F._per_cell_mean(own, F.is_land(lat, lon).astype(np.float64), n),
            "coast_distance_km": F.coast_distance_km(centre[:, 0], centre[:, 1]),
            "population": F.population(cells, cfg),
            "bm_r": F._per_cell_mean(own, rgb[:, 0], n),
            "bm_g": F._per_cell_mean(own, rgb[:, 1], n),
            "bm_b": F._per_cell_mean(own, rgb[:, 2], n),
        }
    )


def reference_build(paths: DataPaths, cfg: IndexConfig) -> dict[str, Any]:
    """Build data/index/ the v1 way; returns class/parent counts and the fingerprint."""
    manifest = pd.read_parquet(paths.processed_manifest)
    images = manifest.drop(columns=["source_ref"]).copy()
    for name, values in h3_columns(manifest["lat"], manifest["lon"], cfg.resolutions).items():
        images[name] = pd.array(values, dtype="str")
    images = images.sort_values("image_id", kind="stable").reset_index(drop=True)
    del manifest
    write_parquet(paths.images, images)
    images = pd.read_parquet(paths.images)
    split = _splits(_groups(images, cfg), cfg)
    cells = images[f"h3_r{cfg.resolution}"].astype(str)
    classes, parents = _classes(cells, split, cfg)
    labels, remapped = _labels(cells, classes)
    parent_of = np.array([c["parent_index"] for c in classes], dtype=np.int64)
    cell_of = np.array([c["cell"] for c in classes], dtype=object)
    splits = pd.DataFrame(
        {"image_id": images["image_id"].astype("str"), "split": pd.array(split, dtype="str"),
         "label": labels, "parent_label": parent_of[labels],
         "label_cell": pd.array(cell_of[labels], dtype="str"), "remapped": remapped}
    )  # fmt: skip
    write_parquet(paths.splits, splits)
    splits = pd.read_parquet(paths.splits)
    doc = {
        "version": LABELS_VERSION, "resolution": cfg.resolution,
        "parent_resolution": cfg.parent_resolution, "fingerprint": "",
        "min_images_per_class": cfg.min_images_per_class, "remap_policy": REMAP_POLICY,
        "processing": {"max_side": cfg.max_side, "max_pixels": cfg.max_pixels},
        "split": {"strategy": cfg.split, "split_resolution": cfg.split_resolution,
                  "seed": cfg.seed,
                  "counts": {s: int((split == s).sum()) for s in ("train", "val", "test")}},
        "classes": classes, "parents": parents,
    }  # fmt: skip
    content = images.drop(columns=[c for c in STORAGE_COLUMNS if c in images.columns])
    doc["fingerprint"] = compute_fingerprint(frame_digest(content), frame_digest(splits), doc)
    write_json(paths.labels, doc)
    write_parquet(paths.h3_features, _features([c["cell"] for c in classes], cfg))
    return {"n_classes": len(classes), "n_parents": len(parents), "fingerprint": doc["fingerprint"]}


def compare(a: DataPaths, b: DataPaths) -> str:
    """One line: which index files hold the same contents, and how the splits differ."""
    same = {
        name: pd.read_parquet(getattr(a, name)).equals(pd.read_parquet(getattr(b, name)))
        for name in ("images", "h3_features")
    }
    la, lb = (json.loads(p.labels.read_text()) for p in (a, b))
    same["labels"] = {k: v for k, v in la.items() if k != "fingerprint"} == {
        k: v for k, v in lb.items() if k != "fingerprint"
    }
    sa, sb = pd.read_parquet(a.splits), pd.read_parquet(b.splits)
    differ = int((sa != sb).any(axis=1).sum()) if sa.shape == sb.shape else len(sa)
    flags = ", ".join(f"{k} {'identical' if v else 'DIFFERENT'}" for k, v in same.items())
    return f"{flags}; splits rows differing: {differ} of {len(sa)}"
