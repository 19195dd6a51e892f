"""Seconds per image of rerank's evaluation tables as the number of classes grows.

    .venv/bin/python benchmarks/bench_rerank_classes.py [--classes 7756 62154] [--images 2048]

`split_evaluation` (the val and test tables of `geoloc rerank`) runs the variant chain (prior,
neighbour votes, gated blend, refinement, min-risk decoding on each distribution's calibration
candidates) in blocks of (images x classes) scores. This times it on synthetic outputs of a flat
head (`--images` test images with random logits, 50 neighbours each, already searched, so the
gallery search is not in the time) at each `--classes`: the cost per image that grows with the
number of classes is what a 10^6-image index (62,154 r7 classes) pays ~100,000 times. Conformal
sets and the error radius are left out (they read each image's candidate cells only).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from geoloc.infer.evaluation import split_evaluation
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


def time_tables(k: int, n: int, seed: int = 0) -> tuple[float, int]:
    """Wall seconds of `split_evaluation` over `n` synthetic images at `k` classes, and the
    block size it used."""
    rng = np.random.default_rng(seed)
    ls = _Space(k, rng)
    y = rng.integers(0, k, n)
    logits = rng.standard_normal((n, k), dtype=np.float32)
    logits[np.arange(n), y] += 4.0
    out = SplitOutputs(logits, None, l2_normalize(rng.standard_normal((n, 16))), y,
                       ls.lat[y], ls.lon[y], np.array([f"i{i}" for i in range(n)]))  # fmt: skip
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
    t0 = time.perf_counter()
    split_evaluation(out, gallery, ls, params, "test", progress=False, nbrs=nbrs)  # type: ignore[arg-type]
    return time.perf_counter() - t0, block_rows(k)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--classes", type=int, nargs="+", default=[7756, 62154])
    ap.add_argument("--images", type=int, default=2048)
    args = ap.parse_args()
    print(f"{args.images} images; load average {os.getloadavg()[0]:.1f}")
    print(f"{'classes':>8} {'block rows':>10} {'seconds':>8} {'ms / image':>10}")
    for k in args.classes:
        secs, block = time_tables(k, args.images)
        print(f"{k:>8} {block:>10} {secs:>8.1f} {1000 * secs / args.images:>10.2f}")


if __name__ == "__main__":
    main()
