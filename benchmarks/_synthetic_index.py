"""A synthetic canonical index for benchmarks: random 64x64 JPEGs, K classes on a lat/lon grid.

Benchmarks measure loops, not accuracy, so they build their own data in a temp folder instead of
depending on a built demo index.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image


def write_synthetic_index(
    root: Path, n_train: int, num_classes: int, n_val: int = 0, size: int = 64
) -> Path:
    """Write processed JPEGs and images/splits/labels under `root`; return the index folder."""
    rng = np.random.default_rng(0)
    (root / "processed").mkdir(parents=True, exist_ok=True)
    index = root / "index"
    index.mkdir(parents=True, exist_ok=True)
    num_parents = max(1, num_classes // 4)
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
