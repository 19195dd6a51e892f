"""`geoloc data synth` -> ingest -> index build at 10^5 images: images/s and peak memory per stage.

    .venv/bin/python benchmarks/bench_synth_ingest.py [--n 100000] [--workers 2]
        [--reference 1000]

Each stage is the command a user types, run in its own process through the CLI:
`geoloc data synth --n N --layout folder` (64 px crops of the procedural world, EXIF GPS,
`--workers` processes), `geoloc data ingest <folder>` (decode, EXIF, resize, re-encode,
tar-shard write, journal, manifest; `--workers` processes) and `geoloc index build`
(r7/r6, `min_images_per_class` 3). Reported per stage: wall time, images/s, and the peak RSS of
its largest process (`ru_maxrss` of the command and of its worker processes). The reference for
synth renders and encodes the first `--reference` images one at a time in one process (a batch
of 1, as a per-image loop would), so the ratio is what batching and the workers buy. Files and
bytes under `data/processed/` are counted: tar shards of `shard_size_mb` plus the manifest.
On a shared machine, read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def child(argv: list[str]) -> None:
    """Run one CLI command here and print the peak RSS of this process and its workers."""
    from geoloc.cli import main

    code = main(argv)
    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    kids_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"code": code, "self_mb": self_mb, "workers_mb": kids_mb}))


def stage(argv: list[str], data_dir: Path) -> dict:
    env = {**os.environ, "GEOLOC_DATA_DIR": str(data_dir)}
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, __file__, "--child", *argv], env=env,
                          capture_output=True, text=True)  # fmt: skip
    seconds = time.perf_counter() - t0
    lines = done.stdout.strip().splitlines()
    if done.returncode or not lines:
        raise SystemExit(f"{' '.join(argv)} failed:\n{done.stderr[-2000:]}")
    out = json.loads(lines[-1])
    if out["code"]:
        raise SystemExit(f"{' '.join(argv)} exited {out['code']}:\n{done.stderr[-2000:]}")
    return {**out, "seconds": seconds, "said": lines[:-1]}


def reference_synth(n: int, folder: Path) -> float:
    """Images/s of a per-image loop over the same places: one render call per crop."""
    from geoloc.data import synth
    from geoloc.data.synth_world import render

    places = synth.sample_places(n, 0)
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    for i in range(n):
        pixels = render(places.lat[i : i + 1], places.lon[i : i + 1])[0]
        data = synth._encode(pixels, float(places.lat[i]), float(places.lon[i]), exif=True)
        (folder / f"{i}.jpg").write_bytes(data)
    return n / (time.perf_counter() - t0)


def _tree(folder: Path) -> tuple[int, int]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    return len(files), sum(p.stat().st_size for p in files)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--reference", type=int, default=1000)
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child is not None:
        child(args.child)
        return
    w = str(args.workers)
    index = ["--set", "resolution=7", "--set", "parent_resolution=6",
             "--set", "min_images_per_class=3"]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        synth_dir = data / "raw" / "synth"
        results = {
            "synth": stage(["data", "synth", "--n", str(args.n), "--workers", w], data),
            "ingest": stage(["data", "ingest", str(synth_dir), "--workers", w], data),
            "index": stage(["index", "build", *index], data),
        }
        ref_rate = reference_synth(args.reference, Path(tmp) / "reference")
        n_raw, raw_bytes = _tree(synth_dir / "images")
        processed = data / "processed"
        n_files, size = _tree(processed)
        n_shards = sum(1 for p in processed.rglob("*.tar"))
    print(f"synth -> ingest -> index, {args.n:,} images, {args.workers} workers, "
          f"{os.cpu_count()} CPUs (shared machine: read ratios, not absolute times)")  # fmt: skip
    print(f"{'stage':<8} {'wall s':>8} {'images/s':>9} {'peak GB (main/worker)':>22}")
    for name, r in results.items():
        peak = f"{r['self_mb'] / 1024:.2f} / {r['workers_mb'] / 1024:.2f}"
        print(f"{name:<8} {r['seconds']:>8.1f} {args.n / r['seconds']:>9.0f} {peak:>22}")
    total = sum(r["seconds"] for r in results.values())
    print(f"{'total':<8} {total:>8.1f} {args.n / total:>9.0f}")
    synth_rate = args.n / results["synth"]["seconds"]
    print(f"synth vs per-image loop ({args.reference:,} images, 1 process, {ref_rate:.0f}/s): "
          f"{synth_rate / ref_rate:.1f}x")  # fmt: skip
    print(f"raw synth: {n_raw:,} files, {raw_bytes / 1e6:.0f} MB; data/processed: {n_files:,} "
          f"files ({n_shards:,} tar shards + the manifest; goal <= N/1000 = {args.n // 1000:,}), "
          f"{size / 1e6:.0f} MB")  # fmt: skip
    for name, r in results.items():
        for line in r["said"][-2:]:
            print(f"  [{name}] {line}")


if __name__ == "__main__":
    main()
