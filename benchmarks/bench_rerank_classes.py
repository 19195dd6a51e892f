"""Seconds per image of rerank's evaluation tables as the number of classes grows.

    .venv/bin/python benchmarks/bench_rerank_classes.py [--classes 7756 62154] [--images 2048]

`split_evaluation` (the val and test tables of `geoloc rerank`) runs the variant chain (prior,
neighbour votes, gated blend, refinement, min-risk decoding on each distribution's calibration
candidates) in blocks of scores. This times it on synthetic outputs (`--images` test images,
50 neighbours each, already searched, so the gallery search is not in the time) at each
`--classes`: the cost per image that grows with the number of classes is what a 10^6-image
index (62,154 r7 classes) pays ~100,000 times. Conformal sets and the error radius are left out
(they read each image's candidate cells only). Three rows per class count:

- `flat`: a flat head's random logits, blocks of (images x classes);
- `factorised, all K`: a factorised head (10 parents x 7 children scored) whose blocks are still
  (images x classes) (the reference: what rerank did before `scored_columns`);
- `factorised`: the same outputs, each block scored on its own classes only (scored children
  and neighbours' classes), as `geoloc rerank` does now.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from geoloc.infer import evaluation
from geoloc.infer.evaluation import split_evaluation, table_block_rows
from geoloc.infer.gallery import Gallery, l2_normalize
from geoloc.infer.gate_search import block_rows
from geoloc.infer.outputs import SplitOutputs
from geoloc.infer.rerank import GateParams, Neighbours, RefineParams, RerankParams


class _Space:
    """The parts of a `LabelSpace` the variant chain reads."""

    def __init__(self, k: int, rng: np.random.Generator) -> None:
        self.num_classes = k
        self.lat = np.degrees(np.arcsin(rng.uniform(-0.9, 0.95, k)))
        self.lon = rng.uniform(-180, 180, k)
        self.parent_of = np.zeros(k, dtype=np.int64)


def _outputs(k: int, n: int, head: str, ls: _Space, rng: np.random.Generator) -> SplitOutputs:
    """Synthetic test outputs: a flat head's logits, or a factorised head's 10 parents x 7
    children (the truth among them for most images)."""
    y = rng.integers(0, k, n)
    emb, ids = l2_normalize(rng.standard_normal((n, 16))), np.array([f"i{i}" for i in range(n)])
    if head == "flat":
        logits = rng.standard_normal((n, k), dtype=np.float32)
        logits[np.arange(n), y] += 4.0
        return SplitOutputs(logits, None, emb, y, ls.lat[y], ls.lon[y], ids)
    parents, children = 10, 7
    classes = rng.integers(0, k, (n, parents, children))
    classes[:, 0, 0] = y
    child_logits = rng.standard_normal((n, parents, children), dtype=np.float32)
    child_logits[:, 0, 0] += 3.0
    parent_logits = rng.standard_normal((n, parents + 1), dtype=np.float32)
    order = np.broadcast_to(np.arange(parents, dtype=np.int64), (n, parents)).copy()
    return SplitOutputs(None, parent_logits, emb, y, ls.lat[y], ls.lon[y], ids,
                        child_logits=child_logits, child_parents=order,
                        child_classes=classes)  # fmt: skip


def time_tables(k: int, n: int, head: str = "flat", seed: int = 0) -> tuple[float, int]:
    """Wall seconds of `split_evaluation` over `n` synthetic images at `k` classes, and the
    block size it used. `head`: flat, factorised (blocks on their own classes) or dense
    (factorised on all K columns)."""
    rng = np.random.default_rng(seed)
    ls = _Space(k, rng)
    out = _outputs(k, n, "flat" if head == "flat" else "factorised", ls, rng)
    y = out.labels
    labels = np.where(rng.random((n, 50)) < 0.6, y[:, None], rng.integers(0, k, (n, 50)))
    sims = np.sort(rng.uniform(0.2, 0.9, (n, 50)), axis=1)[:, ::-1].astype(np.float32)
    nbrs = Neighbours(sims, labels, ls.lat[labels], ls.lon[labels])
    gallery = Gallery(
        l2_normalize(rng.standard_normal((64, 16))),
        np.zeros(64),
        np.zeros(64),
        np.zeros(64),
        [f"g{i}" for i in range(64)],
    )  # fmt: skip (never searched)
    params = RerankParams(
        log_prior=-rng.random(k), neighbours=50, calibration_cells=512, min_risk_candidates=10,
        gate=GateParams(k=20, vote_temperature=0.05, weight=0.5, max_top1=1.01,
                        decode="min_risk"),
        refine=RefineParams("mean", 20, 0.05),
    )  # fmt: skip
    columns = evaluation.scored_columns
    block = table_block_rows(out, k, 50)
    if head == "dense":  # the reference: every block on all K columns
        evaluation.scored_columns, block = (lambda *a, **kw: None), block_rows(k)  # noqa: E731
    try:
        t0 = time.perf_counter()
        split_evaluation(out, gallery, ls, params, "test", progress=False, nbrs=nbrs,  # type: ignore[arg-type]
                         block=block)  # fmt: skip
        return time.perf_counter() - t0, block
    finally:
        evaluation.scored_columns = columns


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[7756, 62154])
    ap.add_argument("--images", type=int, default=2048)
    args = ap.parse_args()
    print(f"{args.images} images; load average {os.getloadavg()[0]:.1f}")
    print(f"{'classes':>8} {'head':>18} {'block rows':>10} {'seconds':>8} {'ms / image':>10}")
    for k in args.classes:
        for head, label in (("flat", "flat"), ("dense", "factorised, all K"),
                            ("factorised", "factorised")):  # fmt: skip
            secs, block = time_tables(k, args.images, head)
            print(f"{k:>8} {label:>18} {block:>10} {secs:>8.1f} "
                  f"{1000 * secs / args.images:>10.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
