"""The frozen-backbone embedding cache: every image through the backbone once, stored beside the
index, so the heads train on stored features (`train.embeddings=cache`).

With a big frozen backbone almost all of a step is the backbone's forward pass, and it gives the
same features every epoch (eval mode, no augmentation): computing them once turns each later
epoch, run and sweep trial into a pass over (N, F) floats. Rerank's gallery of the same run is
built from the same stored features (`geoloc.infer.outputs.split_outputs`).

Layout (`<index>/embeddings/<fingerprint>/`):

```
key.json                      what the fingerprint hashes (arch, weights, backbone tensors'
                              sha256, image size, eval transform, feature dim)
<split>-00000.npy ...         (rows, F) float32 shards of the split, in split order
<split>.manifest.json         rows, image set sha256, shard files and rows; written last
```

The fingerprint covers the backbone's actual tensors, so another arch, other weights, another
seed of a random backbone, image size or transform never reuses stale features; the manifest's
image-set hash (image ids and paths in split order) catches a rebuilt index. Shards and manifests
are written atomically; an interrupted pass keeps its finished shards and resumes after them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from bisect import bisect_right
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from geoloc.atomic import atomic_path, write_json
from geoloc.compute import resolve_compute
from geoloc.config import RunConfig
from geoloc.data.dataset import GeoDataset, build_transforms, make_loader
from geoloc.data.state import stable_hash
from geoloc.errors import DataError
from geoloc.model.backbones import pretrained_weights
from geoloc.progress import track

__all__ = [
    "EmbeddingStore",
    "FeatureDataset",
    "backbone_key",
    "embed_split",
    "embeddings_dir",
]

log = logging.getLogger(__name__)

EMBEDDINGS_VERSION = 1
SHARD_BYTES = 256 << 20
"""Target size of one shard file (rows = SHARD_BYTES / (4 F))."""
IN_MEMORY_BYTES = 1 << 30
"""Splits whose features fit in this many bytes are read into memory, larger ones memory-mapped."""


def embeddings_dir(index_dir: Path) -> Path:
    """Where the embedding caches of an index live: `<index>/embeddings/`."""
    return Path(index_dir) / "embeddings"


def _tensors_sha256(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def backbone_key(model: Any, cfg: RunConfig) -> dict[str, Any]:
    """What stored features depend on: backbone (name, weights, tensors) and the eval input."""
    return {
        "version": EMBEDDINGS_VERSION,
        "arch": cfg.model.arch,
        "weights": pretrained_weights(cfg.model) or "random-init",
        "backbone_sha256": _tensors_sha256(model.backbone),
        "feature_dim": int(model.feature_dim),
        "image_size": cfg.train.image_size,
        "transform": repr(build_transforms(cfg.train, train=False)),
    }


def _image_set_sha256(table: pd.DataFrame) -> str:
    """Image ids and paths in split order: the rows the shards must line up with."""
    text = "\n".join(f"{i}\t{p}" for i, p in zip(table["image_id"], table["path"], strict=True))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class EmbeddingStore:
    """One backbone's cache folder: `<index>/embeddings/<fingerprint>/`."""

    folder: Path
    key: dict[str, Any]

    @classmethod
    def for_model(cls, model: Any, cfg: RunConfig, index_dir: Path) -> EmbeddingStore:
        key = backbone_key(model, cfg)
        store = cls(embeddings_dir(index_dir) / stable_hash(key, 16), key)
        if not (store.folder / "key.json").is_file():
            write_json(store.folder / "key.json", key)
        return store

    @property
    def fingerprint(self) -> str:
        return self.folder.name

    def manifest_path(self, split: str) -> Path:
        return self.folder / f"{split}.manifest.json"

    def shard_path(self, split: str, number: int) -> Path:
        return self.folder / f"{split}-{number:05d}.npy"

    def read_manifest(self, split: str) -> dict[str, Any] | None:
        path = self.manifest_path(split)
        try:
            return json.loads(path.read_text()) if path.is_file() else None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable embedding manifest %s: %s", path, exc)
            return None

    def load(self, split: str, table: pd.DataFrame) -> list[np.ndarray] | None:
        """The split's shards (memory-mapped), or None when missing or not these images."""
        doc = self.read_manifest(split)
        if doc is None or doc.get("image_set_sha256") != _image_set_sha256(table):
            return None
        try:
            shards = [np.load(self.folder / s["file"], mmap_mode="r") for s in doc["shards"]]
        except (OSError, ValueError, KeyError) as exc:
            log.warning("embedding cache %s/%s unusable (%s): recomputing", self.folder, split,
                        exc)  # fmt: skip
            return None
        dim = self.key["feature_dim"]
        if sum(len(s) for s in shards) != len(table) or any(
            s.ndim != 2 or s.shape[1] != dim for s in shards
        ):
            return None
        return shards

    def done_shards(self, split: str, shard_rows: int, image_set: str, n: int) -> int:
        """How many leading shards an interrupted pass over the same images left behind."""
        pending = self.folder / f"{split}.pending.json"
        try:
            doc = json.loads(pending.read_text()) if pending.is_file() else {}
        except (OSError, ValueError):
            doc = {}
        if doc != {"image_set_sha256": image_set, "shard_rows": shard_rows}:
            write_json(pending, {"image_set_sha256": image_set, "shard_rows": shard_rows})
            return 0
        done = 0
        for number in range(-(-n // shard_rows)):
            expected = min(shard_rows, n - number * shard_rows)
            try:
                shard = np.load(self.shard_path(split, number), mmap_mode="r")
            except (OSError, ValueError):
                break
            if shard.shape != (expected, self.key["feature_dim"]):
                break
            done += 1
        return done

    def write_shard(self, split: str, number: int, features: np.ndarray) -> str:
        path = self.shard_path(split, number)
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.save(fh, np.ascontiguousarray(features, dtype=np.float32))
        return path.name

    def finish(self, split: str, table: pd.DataFrame, shard_rows: int) -> None:
        n = len(table)
        shards = [
            {"file": self.shard_path(split, k).name, "rows": min(shard_rows, n - k * shard_rows)}
            for k in range(-(-n // shard_rows))
        ]
        write_json(self.manifest_path(split), {
            "version": EMBEDDINGS_VERSION, "fingerprint": self.fingerprint, "split": split,
            "rows": n, "feature_dim": self.key["feature_dim"], "dtype": "float32",
            "image_set_sha256": _image_set_sha256(table), "shard_rows": shard_rows,
            "shards": shards,
        })  # fmt: skip
        (self.folder / f"{split}.pending.json").unlink(missing_ok=True)
        for stale in self.folder.glob(f"{split}-*.npy"):  # shards of an earlier, longer split
            if stale.name not in {s["file"] for s in shards}:
                stale.unlink(missing_ok=True)


class FeatureDataset(Dataset[tuple[torch.Tensor, int, int, int]]):
    """A split's stored backbone features: `(features (F,), label, parent, row)` samples.

    Carries the split's `table`, `labels` and `parent_labels` like the `GeoDataset` it stands
    in for, so training, evaluation and rerank read it the same way.
    """

    def __init__(self, images: GeoDataset, shards: list[np.ndarray]) -> None:
        self.split = images.split
        self.table = images.table
        self.labels = images.labels
        self.parent_labels = images.parent_labels
        if sum(s.nbytes for s in shards) <= IN_MEMORY_BYTES:
            shards = [np.concatenate([np.asarray(s) for s in shards])] if shards else []
        self._shards = shards
        self._starts = np.cumsum([0] + [len(s) for s in shards[:-1]]).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def features(self, i: int) -> torch.Tensor:
        k = bisect_right(self._starts, i) - 1
        return torch.from_numpy(np.array(self._shards[k][i - self._starts[k]], dtype=np.float32))

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, int, int]:
        return self.features(i), int(self.labels[i]), int(self.parent_labels[i]), i


@torch.no_grad()
def embed_split(
    model: Any,
    images: GeoDataset,
    cfg: RunConfig,
    device: torch.device,
    index_dir: Path,
    *,
    progress: bool | None = None,
    shard_rows: int | None = None,
) -> FeatureDataset:
    """The split's stored features for `model`'s frozen backbone, computed once.

    `images` must use the eval transform (it does under `train.embeddings=cache`, where
    augmentation is off). Reuses `<index>/embeddings/<fingerprint>/` when it holds these
    images; otherwise runs the backbone over the split (resuming after finished shards).
    """
    if not getattr(model, "freeze_backbone", False):
        raise DataError("stored embeddings need a frozen backbone (model.freeze_backbone=true)")
    store = EmbeddingStore.for_model(model, cfg, index_dir)
    shards = store.load(images.split, images.table)
    if shards is not None:
        log.info("using stored %s embeddings from %s", images.split, store.folder)
        return FeatureDataset(images, shards)
    dim = store.key["feature_dim"]
    rows_per_shard = shard_rows or max(1, SHARD_BYTES // (4 * dim))
    _compute_shards(model, images, cfg, device, store, rows_per_shard, progress)
    store.finish(images.split, images.table, rows_per_shard)
    shards = store.load(images.split, images.table)
    if shards is None:  # only when another writer replaced the files in between
        raise DataError(f"embeddings in '{store.folder}' changed while they were written")
    return FeatureDataset(images, shards)


def _compute_shards(
    model: Any, images: GeoDataset, cfg: RunConfig, device: torch.device, store: EmbeddingStore,
    shard_rows: int, progress: bool | None,
) -> None:  # fmt: skip
    """Run the backbone over the rows not yet in a finished shard, one shard file at a time."""
    n = len(images)
    done = store.done_shards(images.split, shard_rows, _image_set_sha256(images.table), n)
    first = done * shard_rows
    model.to(device).eval()
    compute = resolve_compute(cfg.train, device, model)
    compute.prepare_model(model)
    loader = make_loader(images, cfg.train.batch_size, shuffle=False, seed=0,
                         num_workers=cfg.train.num_workers, sampler=range(first, n),
                         pin_memory=device.type == "cuda")  # fmt: skip
    log.info("embedding %d %s images with the frozen %s backbone into %s", n - first,
             images.split, cfg.model.arch, store.folder)  # fmt: skip
    buffer: list[np.ndarray] = []
    buffered, number = 0, done
    for batch, _, _, _ in track(loader, desc=f"embed {images.split}", unit="batch",
                                bars=progress):  # fmt: skip
        with compute.autocast():
            feats = model.features(compute.images(batch, device))  # (B, F)
        buffer.append(feats.float().cpu().numpy())
        buffered += len(batch)
        while buffered >= shard_rows or (buffered and number * shard_rows + buffered == n):
            block = np.concatenate(buffer)
            store.write_shard(images.split, number, block[:shard_rows])
            rest = block[shard_rows:]
            buffer, buffered, number = ([rest] if len(rest) else []), len(rest), number + 1
