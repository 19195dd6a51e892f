"""Synthetic data for benchmarks, built in a temp folder instead of depending on a demo index.

- `write_synthetic_index`: random 64x64 JPEGs, K classes on a lat/lon grid (training loops).
- `write_processed_manifest`: a processed manifest of N rows at the street-level places of
  `geoloc data synth` (index build at 10^6-10^7 rows; no image files: the build never opens
  them), written in row groups so 10^7 rows fit in a few hundred MB.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from geoloc.data.demo import sample_locations
from geoloc.data.ingest import normalise_manifest
from geoloc.data.synth import image_ids, sample_places
from geoloc.paths import DataPaths

_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)


def write_synthetic_index(
    root: Path,
    n_train: int,
    num_classes: int,
    n_val: int = 0,
    size: int = 64,
    num_parents: int | None = None,
) -> Path:
    """Write processed JPEGs and images/splits/labels under `root`; return the index folder.
    Classes go round-robin to `num_parents` parents (default: a quarter of the classes)."""
    rng = np.random.default_rng(0)
    (root / "processed").mkdir(parents=True, exist_ok=True)
    index = root / "index"
    index.mkdir(parents=True, exist_ok=True)
    num_parents = num_parents or max(1, num_classes // 4)
    lat = np.linspace(-60, 60, num_classes)
    lon = np.linspace(-170, 170, num_classes)
    images, splits = [], []
    for i in range(n_train + n_val):
        k = i % num_classes
        rel = f"processed/{i:06d}.jpg"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(
            root / rel, quality=90
        )
        images.append({"image_id": f"i{i}", "path": rel, "lat": lat[k], "lon": lon[k],
                       "width": size, "height": size})  # fmt: skip
        splits.append({"image_id": f"i{i}", "split": "train" if i < n_train else "val",
                       "label": k, "parent_label": k % num_parents, "label_cell": f"c{k}",
                       "remapped": False})  # fmt: skip
    pd.DataFrame(images).to_parquet(index / "images.parquet", index=False)
    pd.DataFrame(splits).to_parquet(index / "splits.parquet", index=False)
    labels = {
        "version": 1, "resolution": 2, "parent_resolution": 1, "fingerprint": "synthetic",
        "classes": [{"index": k, "cell": f"c{k}", "parent": f"p{k % num_parents}",
                     "parent_index": k % num_parents, "train_count": 1,
                     "lat": float(lat[k]), "lon": float(lon[k])} for k in range(num_classes)],
        "parents": [{"index": p, "cell": f"p{p}", "lat": 0.0, "lon": 0.0}
                    for p in range(num_parents)],
    }  # fmt: skip
    (index / "labels.json").write_text(json.dumps(labels))
    return index


def _hex(rng: np.random.Generator, n: int, digits: int) -> np.ndarray:
    """(n,) random lowercase hex strings of `digits` characters (vectorised)."""
    nibbles = rng.integers(0, 16, size=(n, digits), dtype=np.uint8)
    return np.ascontiguousarray(_HEX[nibbles]).view(f"S{digits}").reshape(-1).astype(str)


def write_processed_manifest(
    paths: DataPaths, n: int, seed: int = 0, chunk: int = 1_000_000, jitter_deg: float = 0.0
) -> Path:
    """`paths.processed_manifest` with `n` rows at synth places, sorted by image_id.

    Places are drawn `chunk` at a time (seed `(seed, k)` for chunk k), so memory stays flat;
    ids are `geoloc.data.synth.image_ids` (15 digits, so string order = numeric order). With
    `jitter_deg`, places are the demo's instead: GeoNames towns drawn ~ sqrt(population) plus
    Gaussian jitter of that many degrees (sparse cells: many images remapped to a class).
    """
    paths.processed.mkdir(parents=True, exist_ok=True)
    writer = None
    ids = image_ids(n, seed)
    try:
        for k, start in enumerate(range(0, n, chunk)):
            m = min(chunk, n - start)
            places = sample_places(m, seed * 1000 + k)
            if jitter_deg:
                lat, lon, _ = sample_locations(m, seed * 1000 + k, jitter_deg, 15000)
                places = replace(places, lat=lat, lon=lon)
            rng = np.random.default_rng([seed, k])
            sha = _hex(rng, m, 64)
            image_id = ids[start : start + m].astype(str)
            frame = normalise_manifest(
                pd.DataFrame(
                    {
                        "image_id": image_id,
                        "path": np.char.add(np.char.add("processed/", sha), ".jpg"),
                        "lat": places.lat,
                        "lon": places.lon,
                        "sha256": sha,
                        "width": 64,
                        "height": 64,
                        "source": "folder",
                        "source_ref": np.char.add("raw/synth/", image_id),
                        "captured_at": None,
                        "sequence_id": np.char.add(f"s{k}-", places.sequence.astype(str)),
                    }
                )
            )
            table = pa.Table.from_pandas(frame, preserve_index=False)
            if writer is None:
                writer = pq.ParquetWriter(paths.processed_manifest, table.schema)
            writer.write_table(table.cast(writer.schema))
    finally:
        if writer is not None:
            writer.close()
    return paths.processed_manifest
