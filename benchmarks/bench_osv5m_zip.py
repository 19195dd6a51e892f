"""OSV-5M zip shards read in place vs the same images as loose files (the plain reference).

Writes one OSV-5M copy (`train.csv` + `images/train/`) twice, as `<id>.jpg` files and as zip
shards, and times `geoloc data ingest` on each (same rows, same bytes, separate data roots),
then the listing step alone (`ImageLookup.scan`: one walk, one id -> member map per zip).
Prints images/s and the zip/files ratio from one run.

    python -m benchmarks bench_osv5m_zip [-- --n 2000 --shards 4 --workers 1 --side 256]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from fixtures.published_layouts import write_osv5m  # noqa: E402

from geoloc.config import IndexConfig  # noqa: E402
from geoloc.data.ingest import ingest  # noqa: E402
from geoloc.data.sources.archive import ImageLookup  # noqa: E402
from geoloc.data.sources.folder import IMAGE_SUFFIXES  # noqa: E402
from geoloc.paths import DataPaths  # noqa: E402


def _ingest_rate(spec: Path, data_root: Path, cfg: IndexConfig) -> tuple[float, int]:
    t0 = time.perf_counter()
    report = ingest(str(spec), DataPaths(data_root), cfg)
    seconds = time.perf_counter() - t0
    assert report.rejected == 0, report
    return report.accepted / seconds, report.accepted


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="images")
    parser.add_argument("--shards", type=int, default=4, help="zip shards")
    parser.add_argument("--workers", type=int, default=1, help="decode processes")
    parser.add_argument("--side", type=int, default=256, help="image width (height 3/4 of it)")
    args = parser.parse_args()
    cfg = IndexConfig(workers=args.workers, max_side=64)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        size = (args.side, args.side * 3 // 4)
        files = write_osv5m(work / "as_files", args.n, "folder", args.shards, size=size)
        zips = write_osv5m(work / "as_zips", args.n, "zip", args.shards, size=size)
        mb = sum(p.stat().st_size for p in zips.zips) / 2**20
        print(f"{args.n} images {size[0]}x{size[1]}, {args.shards} zips ({mb:.1f} MB), "
              f"workers={args.workers}, cpus={os.cpu_count()} (shared machine: read the ratio, "
              "not the rates)")  # fmt: skip
        files_rate, n1 = _ingest_rate(files.root, work / "data_files", cfg)
        zips_rate, n2 = _ingest_rate(zips.root, work / "data_zips", cfg)
        assert n1 == n2 == args.n
        print(f"ingest from loose files: {files_rate:8.1f} images/s")
        ratio = zips_rate / files_rate
        print(f"ingest from zip shards:  {zips_rate:8.1f} images/s   ratio {ratio:.2f}x")
        for name, copy in (("files", files), ("zips", zips)):
            t0 = time.perf_counter()
            lookup = ImageLookup.scan(copy.root / "images" / "train", IMAGE_SUFFIXES)
            seconds = time.perf_counter() - t0
            found = len(lookup.files) + len(lookup.members)
            print(f"listing ({name}): {seconds * 1e3:7.1f} ms for {found} images "
                  f"({seconds / found * 1e6:.1f} us/image)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
