"""Peak memory of listing an image folder (`ImageLookup.scan`, OSV-5M's source), against a dict.

    python benchmarks/bench_listing.py [--images DIR ...] [--n 20000] [--geoloc-from CHECKOUT]

Lists each folder (default: a temporary flat folder of N empty `<id>.jpg` files; the scan never
reads an image) in a fresh process each way and prints wall seconds, peak RSS (`ru_maxrss`),
the bytes a listed image costs over the imports alone, and microseconds a `find`:

- geoloc: `geoloc.data.sources.archive.ImageLookup.scan` (`--geoloc-from` imports geoloc from
  another checkout, e.g. the one before a change);
- plain: `os.walk` into a dict name -> `Path`, as the listing was kept before issue 28 item 6.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FINDS = 20_000


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _names(folder: Path, n: int) -> list[str]:
    names = []
    with os.scandir(folder) as entries:
        for entry in entries:
            if entry.name.endswith(".jpg") and len(names) < n:
                names.append(entry.name[:-4])
    return names


def child(kind: str, folder: Path) -> dict:
    from geoloc.data.sources.archive import ImageLookup
    from geoloc.data.sources.folder import IMAGE_SUFFIXES

    start = time.perf_counter()
    if kind == "imports":
        return {"images": 0, "seconds": 0.0, "peak_mb": _peak_mb(), "find_us": 0.0}
    if kind == "geoloc":
        lookup = ImageLookup.scan(folder, IMAGE_SUFFIXES)
        images = len(lookup.files) + len(lookup.members)
        find = lookup.find
    else:
        listing: dict[str, Path] = {}
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                stem, suffix = os.path.splitext(name)
                if suffix.lower() in IMAGE_SUFFIXES:
                    listing.setdefault(stem, Path(dirpath) / name)
        images, find = len(listing), listing.get
    seconds, peak = time.perf_counter() - start, _peak_mb()
    sample = _names(next(p for p in (folder / "train", folder) if p.is_dir()), FINDS)
    t0 = time.perf_counter()
    found = sum(find(name) is not None for name in sample)
    assert found == len(sample), (found, len(sample))
    find_us = (time.perf_counter() - t0) / max(len(sample), 1) * 1e6
    return {"images": images, "seconds": round(seconds, 1), "peak_mb": round(peak),
            "find_us": round(find_us, 1)}  # fmt: skip


def run_child(kind: str, folder: Path, geoloc_from: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(geoloc_from))
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(folder)],
                         capture_output=True, text=True, check=True, env=env)  # fmt: skip
    return eval(out.stdout.strip().splitlines()[-1])  # our own child's dict literal


def _empty_folder(n: int) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="bench-listing-"))
    for i in range(n):
        (folder / f"{100_000_000_000_000 + i}.jpg").touch()
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, nargs="+", default=None)
    ap.add_argument("--n", type=int, default=20_000, help="files of the default folder")
    ap.add_argument("--geoloc-from", type=Path, default=REPO)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(repr(child(args.child[0], Path(args.child[1]))))
        return
    folders = args.images or [_empty_folder(args.n)]
    print(f"geoloc from {args.geoloc_from}; load average {os.getloadavg()[0]:.1f}")
    print(f"{'images':>9} {'listing':>7} {'s':>7} {'peak MB':>8} {'B/image':>8} {'find us':>8}")
    for folder in folders:
        base = run_child("imports", folder, args.geoloc_from)["peak_mb"]
        for kind in ("geoloc", "plain"):
            r = run_child(kind, folder, args.geoloc_from)
            per = (r["peak_mb"] - base) * 2**20 / max(r["images"], 1)
            print(f"{r['images']:>9,} {kind:>7} {r['seconds']:>7.1f} {r['peak_mb']:>8,} "
                  f"{per:>8.0f} {r['find_us']:>8.1f}", flush=True)  # fmt: skip
        print(f"  (imports alone: {base:,.0f} MB; {folder})")
    if args.images is None:
        shutil.rmtree(folders[0])


if __name__ == "__main__":
    main()
