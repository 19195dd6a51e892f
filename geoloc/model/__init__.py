"""Modeling layer: backbones, heads, losses and how model outputs become class scores.

Importing this package registers every built-in backbone, head and loss, so
`from geoloc.model import create_model` sees them all whatever was imported first.
"""

from geoloc.model.backbones import (
    MultiScaleCNN,
    model_names,
    register_model,
)
from geoloc.model.geomodel import GeoModel, create_model
from geoloc.model.heads import (
    FactorisedHead,
    FlatHead,
    create_head,
    head_names,
    register_head,
    use_dense_gradients,
)
from geoloc.model.losses import (
    TAU_PER_EDGE,
    GeoSoftTargetLoss,
    class_weights_from_counts,
    compute_class_weights_from_parquet,
    create_loss,
    default_tau_km,
    forward_inputs,
    loss_names,
    register_loss,
)
from geoloc.model.registry import Registry
from geoloc.model.sparse_losses import FactorisedLoss, GeoSoftNeighbours, SparseGeoSoftLoss

__all__ = [
    "TAU_PER_EDGE",
    "FactorisedHead",
    "FactorisedLoss",
    "FlatHead",
    "GeoModel",
    "GeoSoftNeighbours",
    "GeoSoftTargetLoss",
    "MultiScaleCNN",
    "Registry",
    "SparseGeoSoftLoss",
    "class_weights_from_counts",
    "compute_class_weights_from_parquet",
    "create_head",
    "create_loss",
    "create_model",
    "default_tau_km",
    "forward_inputs",
    "head_names",
    "loss_names",
    "model_names",
    "register_head",
    "register_loss",
    "register_model",
    "use_dense_gradients",
]
