"""Sharded index build on a local Dask cluster: 2 workers vs 1 (and vs plain sequential ingest).

    .venv/bin/python benchmarks/bench_dask_index.py [--n 240] [--shards 4] [--size 640 480]
        [--workers 1 2] [--reps 2]

Source: `--n` Blue Marble crops upscaled to `--size` JPEGs with GPS in EXIF, dealt into
`--shards` folders (made once, not timed). `sequential` ingests the shards one after another in
this process (`geoloc.data.ingest.ingest`, 1 processing worker) then builds the index: the plain
way. `dask, N workers` submits `geoloc.data.shards.process_shard` per shard to a
`distributed.LocalCluster` of N single-threaded worker processes (what `prefect-dask`'s
`DaskTaskRunner` runs the `index-sharded` flow's tasks on), then `merge_shards` +
`build_index`. Cluster start-up is paid once per cluster and reported apart, not in the rate.
Each path: best of `--reps` interleaved runs into fresh data roots. Read the ratio on a shared
machine: the absolute numbers move with its load, and 2 workers cannot beat 1 by more than the
free cores allow.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_processing import make_sources  # noqa: E402
from distributed import Client, LocalCluster  # noqa: E402

from geoloc.config import IndexConfig  # noqa: E402
from geoloc.data.index import build_index  # noqa: E402
from geoloc.data.ingest import ingest  # noqa: E402
from geoloc.data.shards import merge_shards, process_shard  # noqa: E402
from geoloc.paths import DataPaths  # noqa: E402

INDEX = dict(resolution=1, parent_resolution=0, min_images_per_class=2, max_side=256, workers=1)


def deal(src: Path, root: Path, shards: int) -> list[str]:
    """Hard-link the source images round-robin into `shards` folders."""
    folders = [root / f"shard_{i}" for i in range(shards)]
    for folder in folders:
        folder.mkdir(parents=True)
    for i, image in enumerate(sorted(src.glob("*.jpg"))):
        os.link(image, folders[i % shards] / image.name)
    return [str(f) for f in folders]


def sequential(specs: list[str], paths: DataPaths, cfg: IndexConfig) -> None:
    for spec in specs:
        ingest(spec, paths, cfg)
    build_index(paths, cfg)


def on_dask(client: Client, specs: list[str], paths: DataPaths, cfg: IndexConfig) -> int:
    jobs = client.gather(client.map(process_shard, specs, paths=paths, cfg=cfg, pure=False))
    report = merge_shards(jobs, paths)
    build_index(paths, cfg)
    return report.accepted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=240)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--size", type=int, nargs=2, default=[640, 480])
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=2, help="best of N interleaved runs")
    args = ap.parse_args()
    cfg = IndexConfig(**INDEX)
    best: dict[str, float] = {}
    startup: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        make_sources(src, args.n, tuple(args.size))
        specs = deal(src, Path(tmp) / "shards", args.shards)
        clients = {}
        for w in args.workers:
            t0 = time.perf_counter()
            cluster = LocalCluster(
                n_workers=w,
                threads_per_worker=1,
                processes=True,
                dashboard_address=None,
                silence_logs=logging.WARNING,
            )
            clients[w] = Client(cluster)
            startup[f"dask, {w} worker{'s' if w > 1 else ''}"] = time.perf_counter() - t0
        try:
            for rep in range(args.reps):  # paths take turns so load hits them alike
                paths = DataPaths(Path(tmp) / f"seq_{rep}")
                t0 = time.perf_counter()
                sequential(specs, paths, cfg)
                rate = args.n / (time.perf_counter() - t0)
                best["sequential"] = max(rate, best.get("sequential", 0.0))
                for w, client in clients.items():
                    name = f"dask, {w} worker{'s' if w > 1 else ''}"
                    paths = DataPaths(Path(tmp) / f"dask_{w}_{rep}")
                    t0 = time.perf_counter()
                    on_dask(client, specs, paths, cfg)
                    rate = args.n / (time.perf_counter() - t0)
                    best[name] = max(rate, best.get(name, 0.0))
        finally:
            for client in clients.values():
                cluster = client.cluster
                client.close()
                cluster.close()
    print(f"sharded index build: {args.n} JPEGs {args.size[0]}x{args.size[1]} in {args.shards} "
          f"shards, {os.cpu_count()} CPUs")  # fmt: skip
    ref = best["sequential"]
    print(f"{'path':<18} {'images/s':>9} {'vs seq':>7} {'startup s':>10}")
    for name, rate in best.items():
        up = f"{startup[name]:.1f}" if name in startup else "-"
        print(f"{name:<18} {rate:>9.1f} {rate / ref:>6.2f}x {up:>10}")
    names = [n for n in best if n.startswith("dask")]
    if len(names) >= 2:
        print(f"{names[1]} vs {names[0]}: {best[names[1]] / best[names[0]]:.2f}x")


if __name__ == "__main__":
    main()
