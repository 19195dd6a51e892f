"""Model outputs per split: one eval pass of a run's best model, cached next to the run.

Rerank needs the logits and embeddings of every train, val and test image; computing them is the
only slow part, so they are cached under `artifacts/data/outputs_<split>.npz`, keyed by the
checkpoint's sha256 and the label space's fingerprint (another checkpoint or index recomputes).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoloc.errors import DataError
from geoloc.geo import LabelSpace
from geoloc.infer.arrays import read_npz, write_npz
from geoloc.infer.gallery import Gallery, l2_normalize
from geoloc.progress import track
from geoloc.runs.layout import RunPaths

__all__ = [
    "SplitOutputs",
    "base_probs",
    "compute_outputs",
    "outputs_path",
    "split_outputs",
]

log = logging.getLogger(__name__)

OUTPUTS_VERSION = 1
_REQUIRED = ("key", "logits", "embeddings", "labels", "lat", "lon", "image_ids")


@dataclass(eq=False)
class SplitOutputs:
    """What one pass of the model over a split gives, row-aligned with the split table."""

    logits: np.ndarray  # (N, K) float32
    parent_logits: np.ndarray | None  # (N, P) float32, None without a parent head
    embeddings: np.ndarray  # (N, D) float32, L2-normalised
    labels: np.ndarray  # (N,) int64 true class
    lat: np.ndarray  # (N,) float64 true coordinates
    lon: np.ndarray  # (N,)
    image_ids: np.ndarray  # (N,) str

    def __post_init__(self) -> None:
        # fixed-width unicode, not object: the cache is read back with allow_pickle=False
        self.image_ids = np.asarray(self.image_ids, dtype=str)

    def __len__(self) -> int:
        return self.logits.shape[0]

    def to_gallery(self) -> Gallery:
        return Gallery(self.embeddings, self.labels, self.lat, self.lon, self.image_ids)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays to cache (no `parent_logits` without a parent head)."""
        arrays = {
            "logits": self.logits,
            "parent_logits": self.parent_logits,
            "embeddings": self.embeddings,
            "labels": self.labels,
            "lat": self.lat,
            "lon": self.lon,
            "image_ids": self.image_ids,
        }
        return {k: v for k, v in arrays.items() if v is not None}

    def save(self, path: Path, key: str) -> None:
        """Cache these outputs; `key` ties them to one checkpoint and label space."""
        write_npz(path, OUTPUTS_VERSION, {"key": np.str_(key), **self.arrays()})

    @classmethod
    def load(cls, path: Path, key: str) -> SplitOutputs | None:
        """The cached outputs, or None when missing, stale (other checkpoint/index) or broken."""
        if not path.is_file():
            return None
        try:
            z = read_npz(path, OUTPUTS_VERSION, "cached outputs", _REQUIRED)
        except DataError as exc:
            log.warning("ignoring unreadable cache %s: %s", path, exc)
            return None
        if str(z["key"]) != key:
            return None
        return cls(
            logits=z["logits"],
            parent_logits=z.get("parent_logits"),
            embeddings=z["embeddings"],
            labels=z["labels"],
            lat=z["lat"],
            lon=z["lon"],
            image_ids=z["image_ids"],
        )


@torch.no_grad()
def compute_outputs(
    model: torch.nn.Module,
    dataset: Any,
    device: torch.device,
    batch_size: int = 128,
    num_workers: int = 0,
    progress: bool = True,
) -> SplitOutputs:
    """One eval-mode pass over a `GeoDataset` (built with the eval transform)."""
    from geoloc.data.dataset import make_loader

    model.eval()
    loader = make_loader(dataset, batch_size, shuffle=False, seed=0, num_workers=num_workers)
    logits, parents, embs = [], [], []
    for images, _, _, _ in track(
        loader, desc=f"embed {dataset.split}", unit="batch", bars=progress
    ):
        out = model(images.to(device))
        logits.append(out["logits"].float().cpu())
        embs.append(out["embedding"].float().cpu())
        if "parent_logits" in out:
            parents.append(out["parent_logits"].float().cpu())
    table = dataset.table
    return SplitOutputs(
        logits=torch.cat(logits).numpy(),
        parent_logits=torch.cat(parents).numpy() if parents else None,
        embeddings=l2_normalize(torch.cat(embs)),
        labels=np.asarray(dataset.labels, dtype=np.int64),
        lat=table["lat"].to_numpy(dtype=np.float64),
        lon=table["lon"].to_numpy(dtype=np.float64),
        image_ids=table["image_id"].astype(str).to_numpy(),
    )


def base_probs(
    logits: np.ndarray,
    parent_logits: np.ndarray | None,
    label_space: LabelSpace,
    hier_topk_parents: int,
) -> np.ndarray:
    """(N, K) class probabilities exactly as training evaluates them (`class_scores`)."""
    from geoloc.model.scores import class_scores

    tensors = {"logits": torch.from_numpy(np.asarray(logits, dtype=np.float32))}
    if parent_logits is not None:
        tensors["parent_logits"] = torch.from_numpy(np.asarray(parent_logits, dtype=np.float32))
    return class_scores(tensors, label_space.parent_of, hier_topk_parents).double().numpy()


def outputs_path(paths: RunPaths, split: str) -> Path:
    """Where the cached outputs of `split` live in a run."""
    return paths.data / f"outputs_{split}.npz"


def split_outputs(
    trained: Any,
    index_dir: Path,
    split: str,
    paths: RunPaths,
    key: str,
    use_cache: bool,
    progress: bool,
) -> SplitOutputs:
    """Cached model outputs for a split, computed (and cached) when missing or stale."""
    from geoloc.data.dataset import GeoDataset

    cache = outputs_path(paths, split)
    if use_cache:
        cached = SplitOutputs.load(cache, key)
        if cached is not None:
            log.info("using cached %s outputs from %s", split, cache)
            return cached
    dataset = GeoDataset(index_dir, split, trained.transform(), progress=progress)
    cfg = trained.config.train
    out = compute_outputs(
        trained.model, dataset, trained.device, cfg.batch_size, cfg.num_workers, progress
    )
    out.save(cache, key)
    return out
