"""Per-row sampling probabilities of the train split (`train.sampling`), as data about the index.

An epoch of a non-uniform sampling draws N rows with replacement from these probabilities
(`geoloc.train.loop.epoch_order`):

- `inverse_density` (OSV-5M): p_i ~ n(cell_i) ** -power, n = train images in row i's H3 cell at
  the density resolution. Each cell's share of the epoch goes from n to n ** (1 - power): dense
  cities give way to sparse roads without every empty cell's one image dominating (power < 1).
- `class_balanced`: p_i ~ 1 / n(class_i), so every class with train images is equally likely.

The probabilities depend on the split's coordinates and labels only, so they are computed once
per run; cells come from the index build's own helper (`latlng_to_cells_int`).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from geoloc.config import TrainConfig
from geoloc.data.cells import latlng_to_cells_int

log = logging.getLogger(__name__)

MAX_H3_RESOLUTION = 15


def density_resolution(cfg: TrainConfig, class_resolution: int) -> int:
    """The H3 resolution densities are counted at: `cfg.density_resolution`, else the classes'
    resolution + 1 (finer than a class, so density varies inside a class too)."""
    if cfg.density_resolution is not None:
        return cfg.density_resolution
    return min(class_resolution + 1, MAX_H3_RESOLUTION)


def _normalised(weights: np.ndarray) -> np.ndarray:
    return weights / weights.sum()


def inverse_density_probabilities(
    lat: np.ndarray, lon: np.ndarray, resolution: int, power: float
) -> np.ndarray:
    """(N,) p_i ~ count(rows in row i's H3 cell at `resolution`) ** -power, summing to 1."""
    lat, lon = np.asarray(lat, np.float64), np.asarray(lon, np.float64)
    cells = latlng_to_cells_int(lat, lon, resolution)
    _, inverse, counts = np.unique(cells, return_inverse=True, return_counts=True)
    return _normalised(counts[inverse].astype(np.float64) ** -power)


def class_balanced_probabilities(labels: np.ndarray) -> np.ndarray:
    """(N,) p_i ~ 1 / count(rows of row i's class), summing to 1: classes equally likely."""
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels)
    return _normalised(1.0 / counts[labels])


def sampling_probabilities(
    split: Any, cfg: TrainConfig, class_resolution: int
) -> np.ndarray | None:
    """(N,) probabilities of `cfg.sampling` for the rows of a train split (a `GeoDataset`, or
    anything with its `table` (lat, lon) and `labels`); None for `uniform`: an epoch is then a
    permutation."""
    if cfg.sampling == "uniform" or len(split.labels) == 0:
        return None
    if cfg.sampling == "class_balanced":
        return class_balanced_probabilities(split.labels)
    res = density_resolution(cfg, class_resolution)
    lat, lon = split.table["lat"].to_numpy(), split.table["lon"].to_numpy()
    p = inverse_density_probabilities(lat, lon, res, cfg.density_power)
    log.info("inverse-density sampling at H3 r%d: %s train images drawn %.3gx to %.3gx as often "
             "as uniform", res, f"{len(p):,}", p.min() * len(p), p.max() * len(p))  # fmt: skip
    return p
