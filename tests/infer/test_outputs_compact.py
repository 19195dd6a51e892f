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


def test_compacting_batch_by_batch_equals_compacting_the_whole_split() -> None:
    """`compute_outputs` compacts each batch as it comes (the whole split's parent logits are
    images x parents: 20 GB for a 10^6-image test split); the rows must come out the same."""
    rng = np.random.default_rng(1)
    n, p, k = 50, 400, 6
    logits = (rng.standard_normal((n, p)) * 3).astype(np.float32)
    head = {"parent_logits": logits, "child_parents": np.argsort(-logits, axis=1)[:, :k]}
    whole = compact_parents(head)
    parts = [compact_parents({a: v[s : s + 7] for a, v in head.items()}) for s in range(0, n, 7)]
    for name in ("parent_logits", "child_parents"):
        assert np.array_equal(np.concatenate([part[name] for part in parts]), whole[name])
