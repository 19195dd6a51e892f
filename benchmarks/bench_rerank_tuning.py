"""Seconds and peak memory of rerank's gate search: vectorised on candidate cells vs the dense grid.

    .venv/bin/python benchmarks/bench_rerank_tuning.py [--n 2000] [--classes 7600] [--dense 24]

Synthetic val outputs: each row's probability mass on ~50 random cells (as the factorised head
leaves it: the children of its best parents, zeros elsewhere), 50 neighbours whose labels agree
with the truth 60% of the time, class centres spread over the globe. The plain reference is the
search as it was (`tests/test_gate_search.py::dense_choose_gate`: dense (N, K) votes blended for
every setting), timed on its first `--dense` settings and extrapolated per setting to the full
960-setting grid; the vectorised search runs the whole grid. Peak memory is tracemalloc's (numpy
allocations), so the two are comparable within one process.
"""

from __future__ import annotations

import argparse
import itertools
import time
import tracemalloc

import numpy as np

from geoloc.infer.gate_search import GateGrid, GateInputs, search_gate
from geoloc.infer.rerank import GateParams, Neighbours, gated_rerank, neighbour_votes
from geoloc.infer.tuning import _quick_metrics, tail_objective


class _Space:
    """The parts of a `LabelSpace` the search reads (centres and the class count)."""

    def __init__(self, k: int, rng: np.random.Generator) -> None:
        self.num_classes = k
        self.lat = np.degrees(np.arcsin(rng.uniform(-0.9, 0.95, k)))
        self.lon = rng.uniform(-180, 180, k)


class _Truth:
    def __init__(self, lat: np.ndarray, lon: np.ndarray, labels: np.ndarray) -> None:
        self.lat, self.lon, self.labels = lat, lon, labels


def synthetic(n: int, k: int, seed: int = 0) -> tuple[_Space, np.ndarray, Neighbours, _Truth]:
    rng = np.random.default_rng(seed)
    ls = _Space(k, rng)
    y = rng.integers(0, k, n)
    probs = np.zeros((n, k))
    cells = rng.integers(0, k, (n, 50))
    cells[:, 0] = np.where(rng.random(n) < 0.4, y, cells[:, 0])
    np.put_along_axis(probs, cells, rng.dirichlet(np.full(50, 0.3), n), axis=1)
    labels = np.where(rng.random((n, 50)) < 0.6, y[:, None], rng.integers(0, k, (n, 50)))
    sims = np.sort(rng.uniform(0.2, 0.9, (n, 50)), axis=1)[:, ::-1].astype(np.float32)
    nbrs = Neighbours(sims, labels, ls.lat[labels], ls.lon[labels])
    return ls, probs, nbrs, _Truth(ls.lat[y], ls.lon[y], y)


def dense(probs, nbrs, true, ls, grid, limit):  # type: ignore[no-untyped-def]
    ref = _quick_metrics(probs.argmax(axis=1), ls, true)  # type: ignore[arg-type]
    settings = itertools.product(grid.k, grid.vote_temperature, grid.weight, grid.max_top1,
                                 grid.require_disagreement, grid.decode)  # fmt: skip
    for k, temp, w, thr, dis, dec in itertools.islice(settings, limit):
        votes = neighbour_votes(nbrs, ls.num_classes, k, temp)
        _, pred, _ = gated_rerank(probs, votes, GateParams(k, temp, w, thr, dis, dec), ls)  # type: ignore[arg-type]
        tail_objective(_quick_metrics(pred, ls, true), ref)  # type: ignore[arg-type]


def measure(fn) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    tracemalloc.start()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="val images")
    ap.add_argument("--classes", type=int, default=7600)
    ap.add_argument("--dense", type=int, default=24, help="settings of the dense reference")
    args = ap.parse_args()
    ls, probs, nbrs, true = synthetic(args.n, args.classes)
    grid = GateGrid()
    total = len(list(itertools.product(grid.k, grid.vote_temperature, grid.weight, grid.max_top1,
                                       grid.require_disagreement, grid.decode)))  # fmt: skip
    ref = _quick_metrics(probs.argmax(axis=1), ls, true)  # type: ignore[arg-type]

    def vectorised() -> None:
        inputs = GateInputs.gather([probs], nbrs.labels, grid.candidates)
        search_gate(inputs, nbrs, true.lat, true.lon, ls, grid,  # type: ignore[arg-type]
                    lambda m: tail_objective(m, ref), progress=False)  # fmt: skip

    d_s, d_mb = measure(lambda: dense(probs, nbrs, true, ls, grid, args.dense))
    v_s, v_mb = measure(vectorised)
    full = d_s / args.dense * total
    print(f"val {args.n:,} x {args.classes:,} classes, {total} settings")
    print(f"| dense grid (reference) | {full:.1f} s (extrapolated from {args.dense}) | "
          f"{d_mb:.0f} MB peak | 1.00x |")
    print(f"| vectorised on candidate cells | {v_s:.1f} s | {v_mb:.0f} MB peak | "
          f"{full / v_s:.0f}x faster |")


if __name__ == "__main__":
    main()
