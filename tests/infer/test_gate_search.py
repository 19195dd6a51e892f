"""The vectorised gate search chooses what the dense grid chose, without (images x classes)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from fixtures.labels import make_label_doc
from fixtures.rerank_data import synthetic_split, synthetic_task

from geoloc.geo import LabelSpace
from geoloc.infer.calibration import softmax_rows
from geoloc.infer.outputs import SplitOutputs
from geoloc.infer.rerank import GateParams, Neighbours, gated_rerank, neighbour_votes
from geoloc.infer.tuning import GateGrid, _quick_metrics, choose_gate, tail_objective


def dense_choose_gate(
    probs: np.ndarray, nbrs: Neighbours, true: SplitOutputs, ls: LabelSpace, grid: GateGrid
) -> tuple[GateParams, float]:
    """The search as it was: every setting blends dense (N, K) votes into the probabilities."""
    ref = _quick_metrics(probs.argmax(axis=1), ls, true)
    best = GateParams(max_top1=0.0, candidates=grid.candidates)
    best_obj, best_mean = tail_objective(ref, ref), math.inf
    for k, temp, w, thr, disagree, decode in itertools.product(
        grid.k, grid.vote_temperature, grid.weight, grid.max_top1,
        grid.require_disagreement, grid.decode,
    ):  # fmt: skip
        if k > nbrs.k:
            continue
        votes = neighbour_votes(nbrs, ls.num_classes, k, temp)
        params = GateParams(k, temp, w, thr, disagree, decode, grid.candidates)  # type: ignore[arg-type]
        _, pred, _ = gated_rerank(probs, votes, params, ls)
        m = _quick_metrics(pred, ls, true)
        obj = tail_objective(m, ref)
        if obj < best_obj - 1e-12 or (abs(obj - best_obj) <= 1e-12 and m["mean_km"] < best_mean):
            best, best_obj, best_mean = params, obj, m["mean_km"]
    return best, best_obj


def _many_classes(seed: int) -> tuple[LabelSpace, dict[str, SplitOutputs]]:
    """~200 classes over the land masses, with hierarchical-style exact zeros in the model."""
    rng = np.random.default_rng(seed)
    pts = list(zip(rng.uniform(-60, 70, 400), rng.uniform(-180, 180, 400), strict=True))
    ls = LabelSpace.from_dict(make_label_doc(pts, resolution=2, parent_resolution=1))
    protos = rng.standard_normal((ls.num_classes, 16))
    outs = {s: synthetic_split(ls, n, rng, prototypes=protos, confusion=c)
            for s, n, c in (("train", 1500, 0.0), ("val", 400, 0.3))}  # fmt: skip
    return ls, outs


def _probs(out: SplitOutputs, zero_share: float, seed: int) -> np.ndarray:
    assert out.logits is not None
    p = softmax_rows(out.logits, 1.0)
    if zero_share:  # masked parents: most cells of a row have probability exactly 0
        keep = np.random.default_rng(seed).random(p.shape) > zero_share
        keep[np.arange(len(p)), p.argmax(axis=1)] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=1, keepdims=True)
    return p


GRID = GateGrid(k=(5, 50), vote_temperature=(0.02, 1.0), weight=(0.25, 1.0),
                max_top1=(0.35, 0.7, 1.01))  # fmt: skip
"""Small enough for the dense reference to run in seconds; every switch of the default grid."""


@pytest.mark.parametrize(
    ("make", "zero_share", "seed"),
    [(synthetic_task, 0.0, 0), (_many_classes, 0.0, 1), (_many_classes, 0.9, 0)],
)
def test_vectorised_search_finds_the_dense_grids_gate(make, zero_share, seed) -> None:  # type: ignore[no-untyped-def]
    ls, outs = make(seed)
    gallery = outs["train"].to_gallery()
    val = outs["val"]
    nbrs = Neighbours.search(gallery, val.embeddings, 50, kind="brute")
    probs = _probs(val, zero_share, seed)
    grid = GRID
    want, want_obj = dense_choose_gate(probs, nbrs, val, ls, grid)
    got, got_obj = choose_gate(probs, nbrs, val, ls, grid, progress=False)
    assert got == want
    assert got_obj == pytest.approx(want_obj, rel=1e-12)
