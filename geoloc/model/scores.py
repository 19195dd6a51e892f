"""Model outputs -> class probabilities: the one place that applies the hierarchy at inference.

Evaluation, rerank, prediction and the MLflow model all score through `class_scores`, so a
run's reported metrics and what a user gets from it agree.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from geoloc.geo import hierarchical_predict, mask_child_logits

__all__ = ["SCORE_INPUTS", "class_scores", "predicted_classes"]

SCORE_INPUTS = ("logits", "parent_logits", "child_logits", "child_parents", "child_classes")
"""The model outputs `class_scores` reads (what rerank caches and prediction keeps)."""


def class_scores(
    outputs: Mapping[str, torch.Tensor],
    parent_of: np.ndarray | torch.Tensor,
    hier_topk_parents: int,
    columns: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, K) class probabilities from model outputs, hierarchy-aware when asked.

    Factorised head (`child_logits` present): P(parent) x P(child | parent) for the children of
    the best `hier_topk_parents` parents the model scored (0, or more than it scored: all of
    them), zero elsewhere. Flat head with a parent head and `hier_topk_parents > 0`: child logits
    outside the top-k parents are masked and child x parent probabilities decide. Both are
    renormalised so rows sum to 1 (which keeps the argmax and makes `prob` a probability).
    Otherwise the child softmax.

    `columns` (factorised head only): (U,) ascending class ids that hold every class the head
    scored; the scores come back as (B, U), one column per id, the same numbers as the (B, K)
    ones at those classes (every other class is 0): rerank's tables at tens of thousands of
    classes.
    """
    if "child_logits" in outputs:
        joint, classes = _factorised_joint(outputs, hier_topk_parents)
        k = int(parent_of.shape[0])
        if columns is not None:
            k, classes = int(columns.shape[0]), torch.searchsorted(columns, classes.contiguous())
        scores = joint.new_zeros(joint.shape[0], k).scatter_add_(1, classes, joint)
        # the scored entries' own sum (= the row's): the same float for K or `columns` columns
        return scores / joint.sum(dim=1, keepdim=True).clamp_min(1e-30)
    if columns is not None:
        raise ValueError("class_scores: `columns` needs a factorised head's outputs")
    logits = outputs["logits"].float()  # (B, K)
    parent_logits = outputs.get("parent_logits")
    if parent_logits is None or hier_topk_parents <= 0:
        return logits.softmax(dim=1)
    parent_logits = parent_logits.float()  # (B, P)
    masked = mask_child_logits(logits, parent_logits, parent_of, hier_topk_parents)
    scores = hierarchical_predict(masked.softmax(dim=1), parent_logits.softmax(dim=1), parent_of)
    return scores / scores.sum(dim=1, keepdim=True).clamp_min(1e-30)


def predicted_classes(
    outputs: Mapping[str, torch.Tensor], hier_topk_parents: int = 0
) -> torch.Tensor:
    """(B,) top-1 class without building (B, K) scores: for the factorised head the argmax of
    `class_scores` (`hier_topk_parents` as there), for the flat head that of its logits."""
    if "child_logits" in outputs:
        joint, classes = _factorised_joint(outputs, hier_topk_parents)
        return classes.gather(1, joint.argmax(dim=1, keepdim=True)).squeeze(1)
    return outputs["logits"].argmax(dim=1)


def _factorised_joint(
    outputs: Mapping[str, torch.Tensor], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, k*C) P(parent) x P(child | parent) over the first `k` scored parents, and the class
    index of each entry (padding slots carry probability 0)."""
    parents = outputs["child_parents"]  # (B, k0), best parent first
    k = parents.shape[1] if k <= 0 else min(k, parents.shape[1])
    if "parent_logits" in outputs:
        p_parent = outputs["parent_logits"].float().softmax(dim=1).gather(1, parents[:, :k])
    else:  # a sparse head in training mode scores its greedy parent only
        p_parent = outputs["child_parent_logp"][:, :k].float().exp()
    p_child = outputs["child_logits"][:, :k].float().softmax(dim=2)  # (B, k, C)
    joint = (p_parent[:, :, None] * p_child).flatten(1)
    return joint, outputs["child_classes"][:, :k].flatten(1).long()
