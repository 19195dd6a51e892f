"""Queries/s of neighbour search on a large gallery: faiss (exact and approximate) vs brute force.

    .venv/bin/python benchmarks/bench_gallery.py [--n 1000000] [--dim 128] [--queries 500]

The gallery is clustered synthetic data (a mixture of Gaussians on the unit sphere, like the
embeddings of a trained model); `--uniform` takes uniformly random vectors instead, the worst
case for IVF, whose recall relies on cluster structure. Memory: N * dim * 4 bytes for the vectors
(512 MB at 1M x 128), kept once in the brute-force/flat indexes plus the IVF copy; HNSW adds
~N * M * 8 bytes and is opt-in (`--hnsw`) because its build takes minutes on 2 cores.

Prints one table row per method: build seconds, queries/s, recall@k against the exact answer,
and the speed-up over the plain reference (torch matmul + topk, `kind="brute"`).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from geoloc.infer.gallery import create_index, l2_normalize


def clustered(n: int, dim: int, n_clusters: int, seed: int, spread: float = 0.6) -> np.ndarray:
    """(n, dim) unit vectors around `n_clusters` random centres, built in chunks (low peak RAM)."""
    rng = np.random.default_rng(seed)
    centres = l2_normalize(rng.standard_normal((n_clusters, dim)).astype(np.float32))
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        noise = rng.standard_normal((m, dim), dtype=np.float32) * (spread / np.sqrt(dim))
        out[start : start + m] = centres[rng.integers(0, n_clusters, m)] + noise
    return l2_normalize(out)


def timed_search(
    index: object, queries: np.ndarray, k: int, batch: int = 0
) -> tuple[float, np.ndarray]:
    """Seconds to search every query, `batch` at a time (0: all in one call), and the ids."""
    index.search(queries[:8], k)  # type: ignore[attr-defined]  # warm-up
    step = batch or len(queries)
    t0 = time.perf_counter()
    ids = np.concatenate([index.search(queries[s : s + step], k)[1]  # type: ignore[attr-defined]
                          for s in range(0, len(queries), step)])  # fmt: skip
    return time.perf_counter() - t0, ids


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact, strict=True)]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery size")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 32])
    parser.add_argument(
        "--nlist", type=int, default=1024, help="IVF lists (k-means on 64 x nlist vectors)"
    )
    parser.add_argument("--hnsw", action="store_true", help="also build HNSW (slow build)")
    parser.add_argument(
        "--uniform", action="store_true", help="uniform random vectors (IVF's worst case)"
    )
    parser.add_argument(
        "--batch",
        type=int,
        default=0,
        help="queries per search call (0: all in one call, as a table pass)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch and faiss (OpenMP) threads (0: their defaults)",
    )
    parser.add_argument(
        "--spread",
        type=float,
        default=0.6,
        help="noise norm around each centre (0.6 tight; 1.0 bench_gallery_ann's)",
    )
    args = parser.parse_args()
    if args.threads:
        import faiss
        import torch

        torch.set_num_threads(args.threads)
        faiss.omp_set_num_threads(args.threads)

    if args.uniform:
        rng0 = np.random.default_rng(0)
        data = l2_normalize(rng0.standard_normal((args.n, args.dim), dtype=np.float32))
    else:
        data = clustered(args.n, args.dim, n_clusters=max(10, args.n // 1000), seed=0,
                         spread=args.spread)  # fmt: skip
    rng = np.random.default_rng(1)
    queries = l2_normalize(
        data[rng.choice(args.n, args.queries, replace=False)]
        + rng.standard_normal((args.queries, args.dim), dtype=np.float32) * 0.02
    )

    rows: list[tuple[str, float, float, float]] = []
    t0 = time.perf_counter()
    brute = create_index(data, kind="brute")
    build = time.perf_counter() - t0
    ref_s, exact = timed_search(brute, queries, args.k, args.batch)
    rows.append(("brute (torch, exact)", build, args.queries / ref_s, 1.0))
    del brute

    configs: list[tuple[str, str, dict[str, int]]] = [("faiss flat (exact)", "flat", {})]
    configs += [
        (f"faiss ivf{args.nlist} nprobe={p}", "ivf", {"nprobe": p, "nlist": args.nlist})
        for p in args.nprobe
    ]
    if args.hnsw:
        configs.append(("faiss hnsw ef=128", "hnsw", {"ef_search": 128}))
    for name, method, opts in configs:
        t0 = time.perf_counter()
        index = create_index(data, kind="faiss", method=method, **opts)  # type: ignore[arg-type]
        build = time.perf_counter() - t0
        secs, ids = timed_search(index, queries, args.k, args.batch)
        rows.append((name, build, args.queries / secs, recall_at_k(ids, exact)))
        del index

    ref_qps = rows[0][2]
    shape = "uniform random" if args.uniform else "clustered"
    print(
        f"gallery {args.n:,} x {args.dim} ({shape}, spread {args.spread}), {args.queries} "
        f"queries, k={args.k}, batch {args.batch or args.queries}, threads {args.threads}"
    )
    print(f"{'method':<26} {'build_s':>8} {'queries/s':>10} {'recall@k':>9} {'vs brute':>9}")
    for name, build, qps, rec in rows:
        print(f"{name:<26} {build:>8.2f} {qps:>10.1f} {rec:>9.3f} {qps / ref_qps:>8.2f}x")


if __name__ == "__main__":
    main()
