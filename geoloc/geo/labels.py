"""The label space: class index <-> H3 cell, parent and centroid, from `labels.json`."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from geoloc.errors import DataError, GeolocError

log = logging.getLogger(__name__)


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
