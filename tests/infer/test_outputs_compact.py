"""Cached factorised-head outputs hold no (images x parents) array, and score the same."""

from __future__ import annotations

import numpy as np
import torch

from geoloc.infer.outputs import compact_parents
from geoloc.model.scores import class_scores, predicted_classes


def test_compact_parents_give_the_same_class_probabilities() -> None:
    rng = np.random.default_rng(0)
    n, p, k, c, classes = 64, 3000, 10, 7, 21000
    logits = (rng.standard_normal((n, p)) * 3).astype(np.float32)
    parents = np.argsort(-logits, axis=1)[:, :k]
    head = {
        "parent_logits": logits,
        "child_parents": parents,
        "child_logits": rng.standard_normal((n, k, c)).astype(np.float32),
        "child_classes": parents[:, :, None] * c + np.arange(c),
    }
    small = compact_parents(head)
    assert small["parent_logits"].shape == (n, k + 1)
    parent_of = np.zeros(classes, dtype=np.int64)
    for topk in (1, 3, 10):
        full = class_scores({a: torch.from_numpy(v) for a, v in head.items()}, parent_of, topk)
        comp = class_scores({a: torch.from_numpy(v) for a, v in small.items()}, parent_of, topk)
        torch.testing.assert_close(comp, full, rtol=1e-5, atol=1e-7)
        assert torch.equal(
            predicted_classes({a: torch.from_numpy(v) for a, v in small.items()}, topk),
            predicted_classes({a: torch.from_numpy(v) for a, v in head.items()}, topk),
        )
    flat = {"logits": logits}
    assert compact_parents(flat) is flat
