"""Spatial logic, once: distances, the label space, hierarchy, hard negatives and geo metrics.

Everything that needs a distance on the sphere calls `haversine_km` (or its all-pairs sibling
`pairwise_haversine_km`); everything that maps a class index to a place reads a `LabelSpace`
built from `data/index/labels.json`. Training, metrics, rerank and prediction share both.
The names below are the package's public API; each is defined once, in the submodule named.
"""

from geoloc.geo.distance import (
    EARTH_RADIUS_KM,
    chord_arc_km,
    haversine_km,
    hexagon_edge_km,
    nearest_points,
    pairwise_haversine_km,
    unit_vectors,
)
from geoloc.geo.hardneg import (
    FarNegatives,
    HardNegConfig,
    HardNegPool,
    build_hardneg_pool,
    mine_far_negatives,
)
from geoloc.geo.hierarchy import hierarchical_predict, mask_child_logits, mask_r7_logits
from geoloc.geo.labels import LabelSpace

__all__ = [
    "EARTH_RADIUS_KM",
    "FarNegatives",
    "HardNegConfig",
    "HardNegPool",
    "LabelSpace",
    "build_hardneg_pool",
    "chord_arc_km",
    "haversine_km",
    "hexagon_edge_km",
    "hierarchical_predict",
    "mask_child_logits",
    "mask_r7_logits",
    "mine_far_negatives",
    "nearest_points",
    "pairwise_haversine_km",
    "unit_vectors",
]
