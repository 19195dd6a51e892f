"""Hierarchy: combine the child and parent heads (r7 children under r6 parents)."""

from __future__ import annotations

import logging

import numpy as np
import torch

from geoloc.errors import GeolocError

log = logging.getLogger(__name__)


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
