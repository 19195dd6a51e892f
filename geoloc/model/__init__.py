"""Modeling layer: backbones, heads, losses and how model outputs become class scores.

Importing this package registers every built-in backbone and loss, so
`from geoloc.model import create_model` sees them all whatever was imported first.
"""

from geoloc.model.backbones import (
    TINY_MODEL_CONFIG,
    MultiScaleCNN,
    model_names,
    register_model,
)
from geoloc.model.geomodel import GeoModel, create_model
from geoloc.model.losses import (
    TAU_PER_EDGE,
    GeoSoftTargetLoss,
    class_weights_from_counts,
    compute_class_weights_from_parquet,
    create_loss,
    default_tau_km,
    loss_names,
    register_loss,
)
from geoloc.model.registry import Registry

__all__ = [
    "TAU_PER_EDGE",
    "TINY_MODEL_CONFIG",
    "GeoModel",
    "GeoSoftTargetLoss",
    "MultiScaleCNN",
    "Registry",
    "class_weights_from_counts",
    "compute_class_weights_from_parquet",
    "create_loss",
    "create_model",
    "default_tau_km",
    "loss_names",
    "model_names",
    "register_loss",
    "register_model",
]
