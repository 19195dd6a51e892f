"""Spatial logic, once: distances, the label space, hierarchy and the hard-negative pool.

Everything that needs a distance on the sphere calls `haversine_km` (or its all-pairs sibling
`pairwise_haversine_km`); everything that maps a class index to a place reads a `LabelSpace`
built from `data/index/labels.json`. Training, metrics, rerank and prediction share both.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoloc.config import HardNegConfig
from geoloc.errors import DataError, GeolocError

__all__ = [
    "EARTH_RADIUS_KM",
    "HardNegConfig",
    "HardNegPool",
    "LabelSpace",
    "build_hardneg_pool",
    "haversine_km",
    "hierarchical_predict",
    "mask_child_logits",
    "mask_r7_logits",
    "pairwise_haversine_km",
]

log = logging.getLogger(__name__)

EARTH_RADIUS_KM = 6371.0088
"""Mean Earth radius (IUGG R1). Against the WGS84 geodesic the sphere is typically within ~0.2%;
the worst case, 0.56%, is a short north-south arc near the equator (meridional radius 6335 km)."""

# --------------------------------------------------------------------------------------------
# Distances
# --------------------------------------------------------------------------------------------


def haversine_km(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> np.ndarray | torch.Tensor:
    """Great-circle distance in km between points given in degrees; broadcasts like numpy.

    Torch tensors in (any of the four) give a tensor out on the same device, differentiable;
    anything else is computed in float64 numpy. The haversine form (not the spherical law of
    cosines) keeps metre-level precision for nearby points even in float32.
    """
    if any(isinstance(v, torch.Tensor) for v in (lat1, lon1, lat2, lon2)):
        return _haversine_torch(lat1, lon1, lat2, lon2)
    return _haversine_numpy(lat1, lon1, lat2, lon2)


def _haversine_numpy(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> np.ndarray:
    p1, l1, p2, l2 = (np.radians(np.asarray(v, dtype=np.float64)) for v in (lat1, lon1, lat2, lon2))
    a = np.sin((p2 - p1) / 2) ** 2 + np.cos(p1) * np.cos(p2) * np.sin((l2 - l1) / 2) ** 2
    return 2 * EARTH_RADIUS_KM * np.arcsin(np.sqrt(np.clip(a, 0.0, 1.0)))


def _haversine_torch(lat1: Any, lon1: Any, lat2: Any, lon2: Any) -> torch.Tensor:
    ref = next(v for v in (lat1, lon1, lat2, lon2) if isinstance(v, torch.Tensor))
    dtype = ref.dtype if ref.is_floating_point() else torch.get_default_dtype()
    p1, l1, p2, l2 = (
        torch.deg2rad(torch.as_tensor(v, dtype=dtype, device=ref.device))
        for v in (lat1, lon1, lat2, lon2)
    )
    a = (
        torch.sin((p2 - p1) / 2) ** 2
        + torch.cos(p1) * torch.cos(p2) * torch.sin((l2 - l1) / 2) ** 2
    )
    return 2 * EARTH_RADIUS_KM * torch.asin(torch.sqrt(a.clamp(0.0, 1.0)))


def unit_vectors(lat: torch.Tensor, lon: torch.Tensor) -> torch.Tensor:
    """(N,) degrees -> (N, 3) points on the unit sphere."""
    phi, lam = torch.deg2rad(lat), torch.deg2rad(lon)
    return torch.stack(
        (torch.cos(phi) * torch.cos(lam), torch.cos(phi) * torch.sin(lam), torch.sin(phi)), dim=-1
    )


@torch.no_grad()
def pairwise_haversine_km(
    lat1: torch.Tensor, lon1: torch.Tensor, lat2: torch.Tensor, lon2: torch.Tensor
) -> torch.Tensor:
    """All-pairs distances (N,) x (M,) -> (N, M) km, with one (N, M) buffer and no gradient.

    Why not `haversine_km` with broadcasting: that materialises ~6 (N, M) temporaries, which at
    N=256, M=100k is ~600 MB. Here the chord between unit vectors comes from `torch.cdist` in
    exact (non-matmul) mode, then is turned into an arc in place: d = 2R asin(chord / 2). The
    coordinate differences keep sub-metre precision in float32, unlike a dot-product form.
    """
    u1 = unit_vectors(lat1.reshape(-1), lon1.reshape(-1))
    u2 = unit_vectors(lat2.reshape(-1), lon2.reshape(-1)).to(u1.dtype)
    chord = torch.cdist(u1, u2, compute_mode="donot_use_mm_for_euclid_dist")  # (N, M)
    return chord.mul_(0.5).clamp_(max=1.0).asin_().mul_(2 * EARTH_RADIUS_KM)


# --------------------------------------------------------------------------------------------
# Label space (labels.json)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class LabelSpace:
    """Class index <-> H3 cell, centroids and parent map, as recorded in `labels.json`.

    Built once by the index stage; training, rerank and prediction read it instead of
    re-deriving cells. `to_dict()` is the labels.json document itself, so a checkpoint can carry
    the label mapping and rebuild it with `from_dict`.
    """

    cells: list[str]
    lat: np.ndarray  # (K,) float64 class centroids (H3 cell centres)
    lon: np.ndarray  # (K,)
    parent_of: np.ndarray  # (K,) int64: parent index of each class
    train_counts: np.ndarray  # (K,) int64
    parent_cells: list[str]
    parent_lat: np.ndarray  # (P,)
    parent_lon: np.ndarray  # (P,)
    resolution: int
    parent_resolution: int
    fingerprint: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # other top-level labels.json keys
    _children: list[np.ndarray] = field(default_factory=list, repr=False)
    _lookup: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        order = np.argsort(self.parent_of, kind="stable")
        bounds = np.searchsorted(self.parent_of[order], np.arange(self.num_parents + 1))
        children = [order[bounds[i] : bounds[i + 1]] for i in range(self.num_parents)]
        object.__setattr__(self, "_children", children)
        object.__setattr__(self, "_lookup", {c: i for i, c in enumerate(self.cells)})

    # ---- sizes and lookups -----------------------------------------------------------------

    @property
    def num_classes(self) -> int:
        return len(self.cells)

    @property
    def num_parents(self) -> int:
        return len(self.parent_cells)

    def children_of(self, parent_index: int) -> np.ndarray:
        """Class indices whose parent is `parent_index` (sorted)."""
        if not 0 <= parent_index < self.num_parents:
            raise GeolocError(
                f"parent index {parent_index} is out of range for {self.num_parents} parents"
            )
        return self._children[parent_index]

    def centroids_tensor(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """(K, 2) tensor of (lat, lon) degrees, e.g. for `GeoSoftTargetLoss`."""
        return torch.as_tensor(np.stack([self.lat, self.lon], axis=1), dtype=dtype, device=device)

    def parent_centroids_tensor(
        self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """(P, 2) tensor of parent-cell (lat, lon) degrees."""
        return torch.as_tensor(
            np.stack([self.parent_lat, self.parent_lon], axis=1), dtype=dtype, device=device
        )

    def index_of(self, cell: str) -> int:
        """Class index of an H3 cell string; `GeolocError` when the cell is not a class."""
        if cell not in self._lookup:
            raise GeolocError(f"cell '{cell}' is not a class of this label space")
        return self._lookup[cell]

    # ---- (de)serialisation -----------------------------------------------------------------

    @classmethod
    def from_json(cls, path: str | Path) -> LabelSpace:
        """Read `labels.json`; a missing or malformed file is a `DataError` naming it."""
        p = Path(path)
        if not p.is_file():
            raise DataError(f"labels file '{p}' does not exist (build the index first)")
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"labels file '{p}' could not be parsed: {exc}") from exc
        return cls.from_dict(doc, source=str(p))

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any], source: str = "label mapping") -> LabelSpace:
        """Build from the labels.json document (also what checkpoints carry)."""
        try:
            classes = sorted(doc["classes"], key=lambda c: int(c["index"]))
            parents = sorted(doc["parents"], key=lambda c: int(c["index"]))
            resolution = int(doc["resolution"])
            parent_resolution = int(doc["parent_resolution"])
            cells = [str(c["cell"]) for c in classes]
            lat = np.array([float(c["lat"]) for c in classes], dtype=np.float64)
            lon = np.array([float(c["lon"]) for c in classes], dtype=np.float64)
            parent_of = np.array([int(c["parent_index"]) for c in classes], dtype=np.int64)
            counts = np.array([int(c.get("train_count", 0)) for c in classes], dtype=np.int64)
            parent_cells = [str(c["cell"]) for c in parents]
            plat = np.array([float(c["lat"]) for c in parents], dtype=np.float64)
            plon = np.array([float(c["lon"]) for c in parents], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{source} is malformed: missing or bad field {exc}") from exc
        if not classes:
            raise DataError(f"{source} has no classes")
        if [int(c["index"]) for c in classes] != list(range(len(classes))):
            raise DataError(f"{source}: class indices must be 0..{len(classes) - 1} without gaps")
        if [int(c["index"]) for c in parents] != list(range(len(parents))):
            raise DataError(f"{source}: parent indices must be 0..{len(parents) - 1} without gaps")
        if parent_of.min() < 0 or parent_of.max() >= len(parents):
            raise DataError(f"{source}: a class has a parent_index outside 0..{len(parents) - 1}")
        if not (np.isfinite(lat).all() and np.isfinite(lon).all()):
            raise DataError(f"{source}: class centroids must be finite")
        if len(set(cells)) != len(cells):
            raise DataError(f"{source}: a cell appears as more than one class")
        for c in classes:
            if "parent" in c and c["parent"] != parent_cells[int(c["parent_index"])]:
                raise DataError(
                    f"{source}: class {c['index']} names parent {c['parent']} but its "
                    f"parent_index points at {parent_cells[int(c['parent_index'])]}"
                )
        known = {"classes", "parents", "resolution", "parent_resolution", "fingerprint"}
        return cls(
            cells=cells,
            lat=lat,
            lon=lon,
            parent_of=parent_of,
            train_counts=counts,
            parent_cells=parent_cells,
            parent_lat=plat,
            parent_lon=plon,
            resolution=resolution,
            parent_resolution=parent_resolution,
            fingerprint=str(doc.get("fingerprint", "")),
            extra={k: v for k, v in doc.items() if k not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        """The labels.json document (JSON-safe; `from_dict(to_dict())` round-trips)."""
        extra = dict(self.extra)
        return {
            "version": extra.pop("version", 1),
            "resolution": self.resolution,
            "parent_resolution": self.parent_resolution,
            "fingerprint": self.fingerprint,
            **extra,
            "classes": [
                {
                    "index": i,
                    "cell": self.cells[i],
                    "parent": self.parent_cells[int(self.parent_of[i])],
                    "parent_index": int(self.parent_of[i]),
                    "train_count": int(self.train_counts[i]),
                    "lat": float(self.lat[i]),
                    "lon": float(self.lon[i]),
                }
                for i in range(self.num_classes)
            ],
            "parents": [
                {
                    "index": j,
                    "cell": self.parent_cells[j],
                    "lat": float(self.parent_lat[j]),
                    "lon": float(self.parent_lon[j]),
                }
                for j in range(self.num_parents)
            ],
        }


# --------------------------------------------------------------------------------------------
# Hierarchy
# --------------------------------------------------------------------------------------------


def _parent_index_tensor(parent_of: np.ndarray | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(parent_of, dtype=torch.long, device=like.device)


def hierarchical_predict(
    child_probs: torch.Tensor,
    parent_probs: torch.Tensor,
    parent_of: np.ndarray | torch.Tensor,
) -> torch.Tensor:
    """(B, K) scores: each child's probability times its parent's; the argmax is the answer.

    A child only wins when both heads agree on the region, which cuts far-off mistakes (the
    parent head sees more data per class). Scores are not renormalised.
    """
    if child_probs.shape[0] != parent_probs.shape[0]:
        raise GeolocError(
            f"child and parent batches differ: {child_probs.shape[0]} vs {parent_probs.shape[0]}"
        )
    idx = _parent_index_tensor(parent_of, child_probs)
    if idx.numel() != child_probs.shape[1]:
        raise GeolocError(f"parent_of has {idx.numel()} entries for {child_probs.shape[1]} classes")
    return child_probs * parent_probs[:, idx]


def mask_child_logits(
    child_logits: torch.Tensor,
    parent_logits: torch.Tensor,
    parent_of: np.ndarray | torch.Tensor,
    k: int,
) -> torch.Tensor:
    """Keep the logits of children of the top-`k` parents per row; the rest become -inf.

    `k <= 0` or `k >= P` keeps everything (returns the input unchanged). Ties among parent
    logits follow `torch.topk`.
    """
    num_parents = parent_logits.shape[1]
    if k <= 0 or k >= num_parents:
        return child_logits
    idx = _parent_index_tensor(parent_of, child_logits)
    top = parent_logits.topk(k, dim=1).indices  # (B, k)
    keep_parent = torch.zeros_like(parent_logits, dtype=torch.bool).scatter_(1, top, True)
    keep = keep_parent[:, idx]  # (B, K)
    return child_logits.masked_fill(~keep, float("-inf"))


mask_r7_logits = mask_child_logits
"""The seed architecture's name for `mask_child_logits`."""


# --------------------------------------------------------------------------------------------
# Hard negatives
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HardNegPool:
    """Classes the model confuses, from the previous epoch's (true, predicted) pairs.

    `pairs` (N, 2) are the most-confused (true, predicted) class pairs, most frequent first, with
    their `counts`; `classes` are both sides of each pair. `sample` draws train images whose
    label is in the pool, balanced over the pool's classes so rare confused cells get their share.
    """

    pairs: np.ndarray = field(default_factory=lambda: np.empty((0, 2), dtype=np.int64))
    counts: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    classes: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))

    @classmethod
    def empty(cls) -> HardNegPool:
        return cls()

    def __len__(self) -> int:
        return len(self.classes)

    def sample(self, train_labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """`n` train-set indices (with replacement) whose label is in the pool.

        A class is drawn uniformly among pool classes that have train images, then an image
        uniformly within it. Deterministic given `rng`; an empty pool (or no matching image, or
        n <= 0) gives an empty int64 array.
        """
        labels = np.asarray(train_labels)
        if n <= 0 or len(self.classes) == 0 or labels.size == 0:
            return np.empty(0, dtype=np.int64)
        candidates = np.flatnonzero(np.isin(labels, self.classes))
        if candidates.size == 0:
            return np.empty(0, dtype=np.int64)
        # group candidate indices by label: contiguous runs after a stable sort
        order = candidates[np.argsort(labels[candidates], kind="stable")]
        _, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
        which = rng.integers(0, len(starts), size=n)
        offset = (rng.random(n) * sizes[which]).astype(np.int64)
        return order[starts[which] + offset].astype(np.int64)


def build_hardneg_pool(
    true_labels: np.ndarray, pred_labels: np.ndarray, cfg: HardNegConfig
) -> HardNegPool:
    """The `cfg.top_pairs` most frequent (true, predicted) mistakes and the classes in them.

    Correct predictions are ignored. Ties in counts break by (true, predicted) ascending so the
    pool is deterministic.
    """
    true = np.asarray(true_labels, dtype=np.int64).reshape(-1)
    pred = np.asarray(pred_labels, dtype=np.int64).reshape(-1)
    if true.shape != pred.shape:
        raise GeolocError(
            f"hard-negative pool: {true.size} true labels but {pred.size} predicted labels"
        )
    wrong = true != pred
    if not wrong.any():
        return HardNegPool.empty()
    pairs, counts = np.unique(
        np.stack([true[wrong], pred[wrong]], axis=1), axis=0, return_counts=True
    )
    # np.unique sorts pairs ascending; a stable sort on -count keeps that as the tie-break
    order = np.argsort(-counts, kind="stable")[: cfg.top_pairs]
    pairs, counts = pairs[order], counts[order]
    pool = HardNegPool(pairs=pairs, counts=counts.astype(np.int64), classes=np.unique(pairs))
    log.debug("hard-negative pool: %d pairs, %d classes", len(pairs), len(pool.classes))
    return pool
