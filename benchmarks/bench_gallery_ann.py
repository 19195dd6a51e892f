"""The run's saved gallery index at 10^6 images: recall@k against exact search, ms per query,
build and load time, bytes on disk (`geoloc.infer.ann`, what rerank and `geoloc predict` use).

    .venv/bin/python benchmarks/bench_gallery_ann.py [--n 1000000] [--dim 128] [--queries 300]
        [--k 20] [--nprobe 64 128 256] [--spread 1.0 1.5] [--float16] [--threads 2]

Gallery: `--n` synthetic L2-normalised embeddings around n / 100 centres (about 100 images per
cell, as an r7 gallery), Gaussian noise of norm `--spread` around unit centres (1.0: a query's
cosine to its cell centre ~0.7; 1.5: ~0.55, harder). `--float16` stores the gallery in float16
first, as a run may (searched as float32). Queries are new draws from the same clusters.

Per setting: the index is built through `use_run_index` into a temporary run folder (k-means
on 64 x nlist vectors, then every vector assigned; saved atomically), loaded back as predict
loads it, and searched: one query at a time (what one photo costs) and in batches of 64 (what
`geoloc predict` does per batch), against the plain reference, exact search over the whole
gallery (`kind="brute"`: torch matmul + top-k, chunked).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from geoloc.infer.ann import AnnSettings, ann_path, use_run_index
from geoloc.infer.gallery import Gallery, l2_normalize


def clustered(n: int, dim: int, spread: float, seed: int, centres_seed: int = 0) -> np.ndarray:
    """(n, dim) unit vectors around n_centres fixed centres, in chunks (low peak memory)."""
    n_centres = max(10, n // 100)
    centres = l2_normalize(np.random.default_rng(centres_seed)
                           .standard_normal((n_centres, dim), dtype=np.float32))  # fmt: skip
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), dtype=np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        noise = rng.standard_normal((m, dim), dtype=np.float32) * (spread / np.sqrt(dim))
        out[start : start + m] = centres[rng.integers(0, n_centres, m)] + noise
    return l2_normalize(out)


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    k = exact.shape[1]
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(found, exact, strict=True)]))


def ms_per_query(index: object, queries: np.ndarray, k: int, batch: int) -> float:
    index.search(queries[:batch], k)  # type: ignore[attr-defined]  # warm-up
    t0 = time.perf_counter()
    for start in range(0, len(queries), batch):
        index.search(queries[start : start + batch], k)  # type: ignore[attr-defined]
    return 1000 * (time.perf_counter() - t0) / len(queries)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--k", type=int, default=20)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--spread", type=float, nargs="+", default=[1.0, 1.5])
    parser.add_argument("--float16", action="store_true")
    parser.add_argument("--threads", type=int, default=2, help="torch and faiss threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    print(f"gallery {args.n:,} x {args.dim} ({'float16' if args.float16 else 'float32'} stored), "
          f"{args.queries} queries, k={args.k}, {args.threads} threads")  # fmt: skip
    print(f"{'spread':>6} {'search':<22} {'recall@k':>8} {'ms/q (1)':>9} {'ms/q (64)':>9} "
          f"{'build s':>8} {'load s':>7} {'MB':>6}")  # fmt: skip
    for spread in args.spread:
        emb = clustered(args.n, args.dim, spread, seed=1)
        if args.float16:
            emb = emb.astype(np.float16).astype(np.float32)
        queries = clustered(args.queries, args.dim, spread, seed=2)
        n = args.n
        gallery = Gallery(emb, np.zeros(n, np.int64), np.zeros(n), np.zeros(n), np.arange(n))
        del emb
        brute = gallery.index("brute")
        _, exact = brute.search(queries, args.k)
        one = ms_per_query(brute, queries[:20], args.k, 1)
        many = ms_per_query(brute, queries, args.k, 64)
        print(f"{spread:>6} {'exact (brute force)':<22} {1.0:>8.3f} {one:>9.1f} {many:>9.2f}")
        with tempfile.TemporaryDirectory(prefix="bench_gallery_ann_") as tmp:
            gallery_file = Path(tmp) / "gallery.npz"
            gallery.save(gallery_file)  # as rerank does; the index is fingerprinted by it
            for nprobe in args.nprobe:
                settings = AnnSettings(min_gallery=1, nprobe=nprobe)
                t0 = time.perf_counter()
                use_run_index(gallery, gallery_file, settings)  # builds (first) or loads
                first = time.perf_counter() - t0
                fresh = Gallery(gallery.embeddings, gallery.labels, gallery.lat, gallery.lon,
                                gallery.image_ids)  # fmt: skip
                t0 = time.perf_counter()
                index = use_run_index(fresh, gallery_file, settings)  # as predict loads it
                load = time.perf_counter() - t0
                assert index is not None
                _, ids = index.search(queries, args.k)
                rec = recall_at_k(ids, exact)
                one = ms_per_query(index, queries, args.k, 1)
                many = ms_per_query(index, queries, args.k, 64)
                mb = ann_path(gallery_file).stat().st_size / 2**20
                name = f"IVF{settings.lists_for(n)} nprobe={nprobe}"
                print(f"{spread:>6} {name:<22} {rec:>8.3f} {one:>9.2f} {many:>9.2f} "
                      f"{first:>8.1f} {load:>7.1f} {mb:>6.0f}", flush=True)  # fmt: skip
                del fresh, index
        del gallery, brute


if __name__ == "__main__":
    main()
