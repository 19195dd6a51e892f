"""The distance-weighted prototype margin of `hardneg.mode=margin` (the term itself, no state).

`geoloc.train.margin` keeps the class prototypes and mined negatives from epoch to epoch and adds
this term to each training step's loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812

__all__ = ["prototype_margin_loss"]


def prototype_margin_loss(
    embedding: torch.Tensor,
    labels: torch.Tensor,
    prototypes: torch.Tensor,
    present: torch.Tensor,
    negatives: torch.Tensor,
    weights: torch.Tensor,
    margin: float,
) -> torch.Tensor:
    """mean over (image i, negative n of its true class) of
    `w_n * relu(margin + cos(e_i, P_n) - cos(e_i, P_{y_i}))`.

    `embedding` (B, D) (normalised here, in float32 whatever autocast produced), `labels` (B,),
    `prototypes` (C, D) unit rows, `present` (C,) bool (a class without a prototype takes part
    neither as truth nor as negative), `negatives` (C, N) class indices (-1: none) and their
    `weights` (C, N). An image's negatives come from its true class's row. With no valid pair
    the term is 0 (and still part of the graph, so every rank's backward matches under DDP).
    """
    e = F.normalize(embedding.float(), dim=1)  # (B, D)
    neg = negatives[labels]  # (B, N)
    valid = (neg >= 0) & present[neg.clamp(min=0)] & present[labels][:, None]  # (B, N)
    own = (e * prototypes[labels]).sum(dim=1)  # (B,) cos(e_i, P_{y_i})
    other = torch.einsum("bd,bnd->bn", e, prototypes[neg.clamp(min=0)])  # (B, N)
    hinge = torch.relu(margin + other - own[:, None]) * weights[labels]  # (B, N)
    total = (hinge * valid).sum()
    return total / valid.sum().clamp(min=1)
