"""Model outputs -> class probabilities: the one place that applies the hierarchy at inference.

Evaluation, rerank, prediction and the MLflow model all score through `class_scores`, so a
run's reported metrics and what a user gets from it agree.
"""

from __future__ import annotations

import numpy as np
import torch

from geoloc.geo import hierarchical_predict, mask_child_logits


def class_scores(
    outputs: dict[str, torch.Tensor], parent_of: np.ndarray | torch.Tensor, hier_topk_parents: int
) -> torch.Tensor:
    """(B, K) class probabilities from model outputs, hierarchy-aware when asked.

    With a parent head and `hier_topk_parents > 0`, child logits outside the top-k parents are
    masked and child x parent probabilities decide (renormalised so rows sum to 1, which keeps the
    argmax and makes `prob` a probability). Otherwise the child softmax.
    """
    logits = outputs["logits"].float()  # (B, K)
    parent_logits = outputs.get("parent_logits")
    if parent_logits is None or hier_topk_parents <= 0:
        return logits.softmax(dim=1)
    parent_logits = parent_logits.float()  # (B, P)
    masked = mask_child_logits(logits, parent_logits, parent_of, hier_topk_parents)
    scores = hierarchical_predict(masked.softmax(dim=1), parent_logits.softmax(dim=1), parent_of)
    return scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-30)
