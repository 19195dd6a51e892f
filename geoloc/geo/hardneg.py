"""Hard negatives: which classes each class is confused with, from the train split's predictions.

Two uses (`hardneg.mode`): `build_hardneg_pool`, the confused cells whose images `oversample`
draws again; `mine_far_negatives`, the far cells each true cell is confused with, which `margin`
pushes each image's embedding away from (`geoloc.model.losses.prototype_margin_loss`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from geoloc.config import HardNegConfig
from geoloc.errors import GeolocError
from geoloc.geo.distance import haversine_km, hexagon_edge_km
from geoloc.geo.labels import LabelSpace
from geoloc.geo.metrics import GEOSCORE_SCALE_KM

MIN_KM_PER_EDGE = 4.0
"""Default `hardneg.min_km` in class-cell edge lengths: adjacent cells' centres are ~1.7 edges
apart and the next ring ~3.5, so a negative is at least two rings away from the truth: a
neighbour, which GeoSoft rewards as nearly right, is never pushed away."""

log = logging.getLogger(__name__)


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
    true, pred = _label_pairs(true_labels, pred_labels, "hard-negative pool")
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


def _label_pairs(
    true_labels: np.ndarray, pred_labels: np.ndarray, what: str
) -> tuple[np.ndarray, np.ndarray]:
    """(true, predicted) as flat int64 arrays of one length."""
    true = np.asarray(true_labels, dtype=np.int64).reshape(-1)
    pred = np.asarray(pred_labels, dtype=np.int64).reshape(-1)
    if true.shape != pred.shape:
        raise GeolocError(f"{what}: {true.size} true labels but {pred.size} predicted labels")
    return true, pred


@dataclass(frozen=True)
class FarNegatives:
    """Per true class (row), the far classes it is confused with, most confused first.

    `classes` (C, K) int64 class indices, -1 where a class has fewer than K negatives;
    `weights` (C, K) float32, `distance_weight` of each negative (0 on padding).
    """

    classes: np.ndarray
    weights: np.ndarray

    @property
    def num_pairs(self) -> int:
        """(true, negative) pairs held."""
        return int((self.classes >= 0).sum())


def distance_weight(km: np.ndarray) -> np.ndarray:
    """1 - exp(-d / 1492.7 km): the share of GeoScore's 5000 points a prediction d km off loses.

    A negative counts as much as confusing it costs on the metric the project reports: ~0.17 at
    275 km (r3's default `min_km`), 0.49 at 1000 km, 0.81 at 2500 km. It saturates, so one
    antipodal confusion does not outweigh several continental ones (a linear d/scale would).
    """
    return (1.0 - np.exp(-np.asarray(km, dtype=np.float64) / GEOSCORE_SCALE_KM)).astype(np.float32)


def default_min_km(label_space: LabelSpace) -> float:
    """`MIN_KM_PER_EDGE` x the mean edge length of the class cells."""
    return MIN_KM_PER_EDGE * hexagon_edge_km(label_space.resolution)


def mine_far_negatives(
    true_labels: np.ndarray,
    pred_labels: np.ndarray,
    label_space: LabelSpace,
    cfg: HardNegConfig,
) -> FarNegatives:
    """Each true class's `cfg.negatives_per_cell` most-confused predicted classes whose centre
    lies at least `cfg.min_km` (default `default_min_km`) from its own.

    Pass the train split's labels and the previous epoch's training-time predictions (`-1`:
    row not seen, ignored); validation labels must never come here, or the term trains on them.
    Ties in confusion count break by predicted class ascending, so mining is deterministic.
    """
    true, pred = _label_pairs(true_labels, pred_labels, "far negatives")
    k, c = cfg.negatives_per_cell, label_space.num_classes
    if (true < 0).any() or (true >= c).any() or (pred >= c).any():
        raise GeolocError(f"far negatives: labels outside the label space's {c} classes")
    classes = np.full((c, k), -1, dtype=np.int64)
    weights = np.zeros((c, k), dtype=np.float32)
    wrong = (pred >= 0) & (pred != true)
    if not wrong.any():
        return FarNegatives(classes, weights)
    pairs, counts = np.unique(
        np.stack([true[wrong], pred[wrong]], axis=1), axis=0, return_counts=True
    )
    t, p = pairs[:, 0], pairs[:, 1]
    km = np.asarray(haversine_km(label_space.lat[t], label_space.lon[t],
                                 label_space.lat[p], label_space.lon[p]))  # fmt: skip
    min_km = cfg.min_km if cfg.min_km is not None else default_min_km(label_space)
    far = km >= min_km
    t, p, counts, km = t[far], p[far], counts[far], km[far]
    order = np.lexsort((p, -counts, t))  # by true class, then most confused, then class index
    t, p, km = t[order], p[order], km[order]
    rank = np.arange(t.size) - np.searchsorted(t, t, side="left")  # position within its class
    keep = rank < k
    classes[t[keep], rank[keep]] = p[keep]
    weights[t[keep], rank[keep]] = distance_weight(km[keep])
    log.debug("far negatives: %d pairs over %d classes (min %.0f km)", int(keep.sum()),
              len(np.unique(t[keep])), min_km)  # fmt: skip
    return FarNegatives(classes, weights)
