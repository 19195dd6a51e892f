"""Model outputs per split: one eval pass of a run's best model, cached next to the run.

Rerank needs the logits and embeddings of every train, val and test image; computing them is the
only slow part, so they are cached under `artifacts/data/outputs_<split>.npz`, keyed by the
checkpoint's sha256 and the label space's fingerprint (another checkpoint or index recomputes).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping
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
from geoloc.runfolder.layout import RunPaths

__all__ = [
    "SplitOutputs",
    "base_probs",
    "compact_parents",
    "compute_outputs",
    "scored_columns",
    "split_outputs",
    "stored_embeddings",
]

log = logging.getLogger(__name__)

OUTPUTS_VERSION = 1
_REQUIRED = ("key", "embeddings", "labels", "lat", "lon", "image_ids")
_HEAD_ARRAYS = ("logits", "parent_logits", "child_logits", "child_parents", "child_classes")
"""What `class_scores` reads (`geoloc.model.scores.SCORE_INPUTS`), as cached arrays."""


@dataclass(eq=False)
class SplitOutputs:
    """What one pass of the model over a split gives, row-aligned with the split table."""

    logits: np.ndarray | None  # (N, K) float32; None for the factorised head
    parent_logits: np.ndarray | None  # (N, P) float32; factorised: (N, k+1), `compact_parents`
    embeddings: np.ndarray  # (N, D) float32, L2-normalised, float16 precision on disk
    labels: np.ndarray  # (N,) int64 true class
    lat: np.ndarray  # (N,) float64 true coordinates
    lon: np.ndarray  # (N,)
    image_ids: np.ndarray  # (N,) str
    # factorised head: the children of its best parents (`geoloc.model.heads`)
    child_logits: np.ndarray | None = None  # (N, k, C) float32, padding -inf
    child_parents: np.ndarray | None = None  # (N, k) int64, best parent first
    child_classes: np.ndarray | None = None  # (N, k, C) int64

    def __post_init__(self) -> None:
        # fixed-width unicode, not object: the cache is read back with allow_pickle=False
        self.image_ids = np.asarray(self.image_ids, dtype=str)

    def __len__(self) -> int:
        return self.labels.shape[0]

    @property
    def scored_parents(self) -> int:
        """How many parents the factorised head scored per image (0 for other heads)."""
        return 0 if self.child_parents is None else int(self.child_parents.shape[1])

    def head_arrays(self) -> dict[str, np.ndarray]:
        """The model outputs `base_probs` turns into class probabilities."""
        arrays = {name: getattr(self, name) for name in _HEAD_ARRAYS}
        return {k: v for k, v in arrays.items() if v is not None}

    def subset(self, rows: np.ndarray | slice) -> SplitOutputs:
        """The same outputs for some rows only (a view for a slice)."""
        arrays = {k: v[rows] for k, v in self.arrays().items()}
        arrays.setdefault("logits", None)
        arrays.setdefault("parent_logits", None)
        return SplitOutputs(**arrays)

    def to_gallery(self) -> Gallery:
        return Gallery(self.embeddings, self.labels, self.lat, self.lon, self.image_ids)

    def arrays(self) -> dict[str, np.ndarray]:
        """The arrays to cache (only the head outputs the model has)."""
        arrays = {
            **self.head_arrays(),
            "embeddings": self.embeddings,
            "labels": self.labels,
            "lat": self.lat,
            "lon": self.lon,
            "image_ids": self.image_ids,
        }
        return {k: v for k, v in arrays.items() if v is not None}

    def save(self, path: Path, key: str) -> None:
        """Cache these outputs; `key` ties them to one checkpoint and label space. Embeddings
        are stored in float16 (`stored_embeddings`: they only rank neighbours)."""
        arrays = {**self.arrays(), "embeddings": self.embeddings.astype(np.float16)}
        write_npz(path, OUTPUTS_VERSION, {"key": np.str_(key), **arrays})

    @classmethod
    def load(cls, path: Path, key: str, heads: bool = True) -> SplitOutputs | None:
        """The cached outputs, or None when missing, stale (other checkpoint/index) or broken;
        `heads=False` accepts a gallery-only cache (no class logits)."""
        if not path.is_file():
            return None
        try:
            z = read_npz(path, OUTPUTS_VERSION, "cached outputs", _REQUIRED)
        except DataError as exc:
            log.warning("ignoring unreadable cache %s: %s", path, exc)
            return None
        if str(z["key"]) != key:
            return None
        if heads and "logits" not in z and "child_logits" not in z:
            log.warning("ignoring cache %s: it holds no class logits", path)
            return None
        return cls(
            embeddings=stored_embeddings(z["embeddings"]),
            labels=z["labels"],
            lat=z["lat"],
            lon=z["lon"],
            image_ids=z["image_ids"],
            **{name: z.get(name) for name in _HEAD_ARRAYS},
        )


@torch.no_grad()
def compute_outputs(
    model: torch.nn.Module,
    dataset: Any,
    device: torch.device,
    batch_size: int = 128,
    num_workers: int = 0,
    progress: bool = True,
    keep_heads: bool = True,
) -> SplitOutputs:
    """One eval-mode pass over a `GeoDataset` (built with the eval transform) or its stored
    backbone features (`geoloc.train.embeddings.FeatureDataset`), read as evaluation reads it
    (sequentially from shards when the split is not in memory); arrays come back in row order.
    `keep_heads=False` keeps embeddings only (the train gallery: its (images x parents) logits
    would be the largest array of a run and nothing reads them). A factorised head's parent
    logits are compacted batch by batch (`compact_parents`): whole, they are images x parents
    (at 10^6 images, 100,000 test images x ~50,000 r6 parents: 20 GB)."""
    from geoloc.data.streaming import eval_loader

    model.eval()
    loader = eval_loader(dataset, batch_size, num_workers)
    heads: dict[str, list[np.ndarray]] = {}
    embs, order = [], []
    for images, _, _, rows in track(
        loader, desc=f"embed {dataset.split}", unit="batch", bars=progress
    ):
        order.append(rows)
        out = model(images.to(device))
        embs.append(out["embedding"].float().cpu())
        if keep_heads:
            batch = {n: _host(out[n]) for n in _HEAD_ARRAYS if n in out}
            for name, value in compact_parents(batch).items():
                heads.setdefault(name, []).append(np.asarray(value))
    table = dataset.table
    rank = torch.argsort(torch.cat(order)).numpy()  # loader order -> row order
    arrays = {n: np.concatenate(heads[n])[rank] if n in heads else None for n in _HEAD_ARRAYS}
    return SplitOutputs(
        **arrays,
        embeddings=stored_embeddings(torch.cat(embs)[rank]),
        labels=np.asarray(dataset.labels, dtype=np.int64),
        lat=table["lat"].to_numpy(dtype=np.float64),
        lon=table["lon"].to_numpy(dtype=np.float64),
        image_ids=table["image_id"].astype(str).to_numpy(),
    )


def _host(value: torch.Tensor) -> np.ndarray:
    """A head output as a host array (float32 for floating point)."""
    return (value.float() if value.is_floating_point() else value).cpu().numpy()


def stored_embeddings(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """(N, D) float32 unit rows as stored: rounded through float16, the precision the cache and
    `gallery.npz` keep (half the bytes; a cosine moves by ~1e-3, which only reorders neighbours
    that are near ties), so fresh and cached outputs search alike."""
    return l2_normalize(l2_normalize(x).astype(np.float16))


def compact_parents(head: dict[str, np.ndarray | None]) -> dict[str, np.ndarray | None]:
    """Factorised-head outputs without their (images x parents) logits: only the parents whose
    children were scored are ever read (`geoloc.model.scores._factorised_joint`), so the
    parent logits become those parents' log-probabilities plus one column holding the rest of
    the mass, and `child_parents` points at the columns. Softmax over the compact row gives
    the same parent probabilities; at 10^5 images x ~7,000 r6 parents this is 280 MB -> 0.4 MB
    per split. Other heads come back unchanged."""
    parents, logits = head.get("child_parents"), head.get("parent_logits")
    if parents is None or logits is None or logits.shape[1] <= parents.shape[1] + 1:
        return head
    logp = torch.from_numpy(np.asarray(logits, dtype=np.float32)).log_softmax(dim=1)
    top = logp.gather(1, torch.from_numpy(np.asarray(parents, dtype=np.int64)))
    rest = torch.log1p(-top.exp().sum(dim=1, keepdim=True).clamp(max=1.0))
    n, k = parents.shape
    return {
        **head,
        "parent_logits": torch.cat([top, rest], dim=1).numpy(),
        "child_parents": np.broadcast_to(np.arange(k, dtype=np.int64), (n, k)).copy(),
    }


def base_probs(
    head: Mapping[str, np.ndarray],
    label_space: LabelSpace,
    hier_topk_parents: int,
    cols: np.ndarray | None = None,
) -> np.ndarray:
    """(N, K) class probabilities exactly as training evaluates them (`class_scores`), from the
    head's outputs (`SplitOutputs.head_arrays()`); (N, len(cols)) at the classes `cols` only
    (ascending, holding every class a factorised head scored: `scored_columns`)."""
    from geoloc.model.scores import class_scores

    tensors = {
        name: torch.from_numpy(
            np.asarray(value, dtype=np.float32) if name.endswith("logits") else np.asarray(value)
        )
        for name, value in head.items()
    }
    columns = None if cols is None else torch.from_numpy(np.asarray(cols, dtype=np.int64))
    scores = class_scores(tensors, label_space.parent_of, hier_topk_parents, columns)
    return scores.double().numpy()


def model_probs(
    out: SplitOutputs,
    label_space: LabelSpace,
    used: int,
    model: int,
    cols: np.ndarray | None = None,
) -> np.ndarray | None:
    """(N, K) the model's own probabilities (its `model` parents kept) when a factorised head
    was scored with another number (`used`, chosen on val), else None: the `base` variant's
    scores, so "base" is the model alone as training evaluated it. `cols` as in `base_probs`."""
    if not out.scored_parents or used == model:
        return None
    return base_probs(out.head_arrays(), label_space, model, cols)


def scored_columns(out: SplitOutputs, extra: np.ndarray, num_classes: int) -> np.ndarray | None:
    """The classes a block of images can have mass at, ascending: every child a factorised
    head scored plus `extra` (the classes its neighbours vote for). None for other heads, or
    when they are most of the classes (dense columns are then as cheap)."""
    if out.child_classes is None:
        return None
    cols = np.unique(np.concatenate([np.ravel(out.child_classes), np.ravel(extra)]))
    return cols if 2 * len(cols) <= num_classes else None


def split_outputs(
    trained: Any,
    index_dir: Path,
    split: str,
    paths: RunPaths,
    key: str,
    use_cache: bool,
    progress: bool,
    rows: np.ndarray | None = None,
) -> SplitOutputs:
    """Cached model outputs for a split, computed (and cached) when missing or stale.

    `rows`: only those positions of the split (sorted; rerank's val tuning sample), so the
    model's pass costs the sample, not the split. The cache is keyed by them too: the outputs
    of another sample, or of the whole split, are recomputed, never used in their place."""
    from geoloc.data.dataset import GeoDataset

    cache = paths.outputs(split)
    heads = split != "train"  # train is the gallery: embeddings, labels and places only
    if rows is not None:
        digest = hashlib.sha256(np.ascontiguousarray(rows, dtype=np.int64)).hexdigest()
        key = f"{key}:rows{len(rows)}-{digest[:16]}"
    if use_cache:
        cached = SplitOutputs.load(cache, key, heads=heads)
        if cached is not None:
            log.info("using cached %s outputs from %s", split, cache)
            return cached
    cfg = trained.config.train
    stored = cfg.embeddings == "cache"  # the split's stored features are kept whole
    dataset: Any = GeoDataset(index_dir, split, trained.transform(), progress=progress,
                              cache=False if stored else None,
                              rows=None if stored else rows)  # fmt: skip
    if stored:  # the heads run on the frozen backbone's stored features
        from geoloc.train.embeddings import embed_split

        dataset = embed_split(trained.model, dataset, trained.config, trained.device, index_dir,
                              progress=progress)  # fmt: skip
    out = compute_outputs(
        trained.model, dataset, trained.device, cfg.batch_size, cfg.num_workers, progress,
        keep_heads=heads,
    )  # fmt: skip
    if stored and rows is not None:
        out = out.subset(np.asarray(rows, dtype=np.int64))
    out.save(cache, key)
    return out
