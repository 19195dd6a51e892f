"""Image processing throughput (images/s) of ingestion with 1 and 2 worker processes.

    .venv/bin/python benchmarks/bench_processing.py [--n 300] [--size 640 480]
        [--max-side 512] [--workers 1 2] [--reps 2]

Source images are real imagery: Blue Marble crops upscaled to `--size`, saved as JPEG with GPS
in EXIF (made once, not timed). Each row ingests the same folder into a fresh data root with
`geoloc.data.ingest.ingest` (decode, EXIF GPS + orientation, RGB, resize to `--max-side`,
JPEG re-encode, content-addressed write, journal, manifest). `plain PIL loop` is the reference
doing the same image work in one process with no ingestion machinery (open, exif_transpose,
convert, thumbnail, save to memory); the ratio of a row to it is the cost (or gain) of the
machinery and the workers. `CPU ms/img` (this process + its finished worker processes) is the
work per image, which a busy machine barely changes. Each path reports its best of `--reps`
interleaved runs; on a shared machine, read the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import io
import resource
import tempfile
import time
from pathlib import Path

from PIL import Image, ImageOps

from geoloc.config import IndexConfig
from geoloc.data.assets import blue_marble
from geoloc.data.demo import crop_at, gps_exif, sample_locations
from geoloc.data.ingest import ingest
from geoloc.paths import DataPaths


def make_sources(folder: Path, n: int, size: tuple[int, int]) -> None:
    lat, lon, _ = sample_locations(n, 0, 0.5, 15000)
    image = blue_marble()
    for i in range(n):
        crop = Image.fromarray(crop_at(image, lat[i], lon[i], size=96))
        crop = crop.resize(size, Image.Resampling.BICUBIC)
        exif = gps_exif(float(lat[i]), float(lon[i]))
        crop.save(folder / f"src_{i:05d}.jpg", "JPEG", quality=90, exif=exif)


def plain_loop(folder: Path, max_side: int) -> int:
    n = 0
    for path in sorted(folder.glob("*.jpg")):
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
            im.save(io.BytesIO(), "JPEG", quality=95)
        n += 1
    return n


def _keep_best(best: dict[str, float], name: str, rate: float) -> None:
    best[name] = max(rate, best.get(name, 0.0))


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (the pool's workers)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--size", type=int, nargs=2, default=[640, 480])
    ap.add_argument("--max-side", type=int, default=512)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=2, help="best of N interleaved runs")
    args = ap.parse_args()
    best: dict[str, float] = {}
    cpu_ms: dict[str, float] = {}  # CPU ms per image: independent of how busy the machine is
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        make_sources(src, args.n, tuple(args.size))
        # paths take turns within each rep so that a busy shared machine slows them alike
        for rep in range(args.reps):
            t0, c0 = time.perf_counter(), _cpu_s()
            plain_loop(src, args.max_side)
            _keep_best(best, "plain PIL loop", args.n / (time.perf_counter() - t0))
            cpu_ms["plain PIL loop"] = (_cpu_s() - c0) * 1000 / args.n
            for w in args.workers:
                paths = DataPaths(Path(tmp) / f"data_w{w}_rep{rep}")
                cfg = IndexConfig(workers=w, max_side=args.max_side)
                t0, c0 = time.perf_counter(), _cpu_s()
                report = ingest(str(src), paths, cfg)
                assert report.accepted + report.duplicates == args.n, report
                name = f"ingest, {w} worker{'s' if w > 1 else ''}"
                _keep_best(best, name, args.n / (time.perf_counter() - t0))
                cpu_ms[name] = (_cpu_s() - c0) * 1000 / args.n
    rows = list(best.items())
    ref = rows[0][1]
    print(f"processing {args.n} JPEGs {args.size[0]}x{args.size[1]} -> max side {args.max_side}")
    print(f"{'path':<20} {'images/s':>10} {'vs plain':>9} {'CPU ms/img':>11}")
    for name, rate in rows:
        print(f"{name:<20} {rate:>10.1f} {rate / ref:>8.2f}x {cpu_ms[name]:>11.1f}")
    if len(rows) >= 3:
        print(f"{rows[2][0]} vs {rows[1][0]}: {rows[2][1] / rows[1][1]:.2f}x")


if __name__ == "__main__":
    main()
