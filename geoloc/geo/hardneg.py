"""The hard-negative pool: which classes each class is confused with."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from geoloc.config import HardNegConfig
from geoloc.errors import GeolocError

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
