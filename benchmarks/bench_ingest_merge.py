"""Peak memory of ingest's merge (journal -> manifest + rejects) at N rows, against a plain one.

    python benchmarks/bench_ingest_merge.py [--n 100000 1000000] [--work DIR]

Writes an ingest journal of N rows as the ingest process leaves it (parts of 256 rows; 1% refused
rows: missing files, NaN coordinates, corrupt JPEGs; 0.2% repeated content), then merges it in
a fresh process each way and prints wall seconds and peak RSS (`ru_maxrss`):

- geoloc: `geoloc.data.finalize.finalize_journals` (digest sets, slices, external sort);
- plain: the same merge as one pandas frame (read every part, keep each key's last row, sort by
  listing order, drop repeated content, sort by image_id, write), as the merge was before.

No images are decoded: this isolates the merge, the stage of ingest that grew with N.
"""

from __future__ import annotations

import argparse
import hashlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

PART_ROWS = 256
REASONS = ("missing_file", "nan_coords", "corrupt")


def _part(start: int, stop: int) -> pd.DataFrame:
    i = np.arange(start, stop)
    bad = i % 100 == 7  # 1% refused
    repeat = i % 500 == 11  # 0.2% the content of an earlier row
    content = np.where(repeat, i - 11, i)
    sha = [hashlib.sha256(str(c).encode()).hexdigest() for c in content]
    frame = pd.DataFrame({
        "key": [f"bench\tr{k}" for k in i], "source": "bench",
        "source_ref": [f"r{k}" for k in i], "image_id": None, "captured_at": None,
        "sequence_id": [f"seq{k // 20}" for k in i],
        "status": np.where(bad, "rejected", "accepted"),
        "reason": [REASONS[k % 3] if b else None for k, b in zip(i, bad, strict=True)],
        "detail": ["bad row" if b else None for b in bad],
        "stage": np.where(bad, "process", None), "sha256": sha,
        "lat": (i % 170) - 85.0 + 0.5, "lon": (i % 350) - 175.0 + 0.5,
        "width": 32, "height": 32, "exif_captured_at": None,
        "path": "processed/shards/bench-00000.tar", "shard": "bench-00000.tar",
        "member": [f"{s}.jpg" for s in sha], "offset": i * 1024, "length": 900,
    })  # fmt: skip
    frame.loc[bad, ["sha256", "path", "shard", "member"]] = None
    return frame


def build(folder: Path, n: int) -> None:
    """The journal and the listing's keys of an N-row ingest job (skipped when present)."""
    journal = folder / "data" / "state" / "ingest" / "bench"
    if (folder / "keys.txt").is_file():
        return
    journal.mkdir(parents=True, exist_ok=True)
    for p, start in enumerate(range(0, n, PART_ROWS)):
        _part(start, min(n, start + PART_ROWS)).to_parquet(journal / f"part-{p:06d}.parquet")
    (folder / "keys.txt").write_text("\n".join(f"bench\tr{k}" for k in range(n)) + "\n")


def child_geoloc(folder: Path) -> dict:
    from geoloc.data.digests import digests
    from geoloc.data.finalize import finalize_journals
    from geoloc.paths import DataPaths

    paths = DataPaths(folder / "data")
    with open(folder / "keys.txt") as fh:  # the listing, as ingest keeps it: digests only
        listed = digests(line.rstrip("\n") for line in fh)
    counts = finalize_journals([paths.state / "ingest" / "bench"], listed, paths)
    return {"read": counts.read, "accepted": counts.accepted, "duplicates": counts.duplicates,
            "rejected": counts.rejected}  # fmt: skip


def child_plain(folder: Path) -> dict:
    from geoloc.data.finalize import normalise_manifest
    from geoloc.data.state import Journal

    keys = (folder / "keys.txt").read_text().splitlines()
    order = {k: i for i, k in enumerate(keys)}
    rows = Journal(folder / "data" / "state" / "ingest" / "bench").read()
    rows = rows[rows["key"].isin(order.keys())].drop_duplicates("key", keep="last")
    rows = rows.assign(_order=rows["key"].map(order)).sort_values("_order", kind="stable")
    good = rows[rows["status"] == "accepted"]
    first = ~good["sha256"].duplicated()
    manifest = good[first].assign(image_id=lambda f: f["sha256"].str[:16])
    manifest = normalise_manifest(manifest).sort_values("image_id", kind="stable")
    manifest.to_parquet(folder / "plain_manifest.parquet", index=False)
    rejected = rows[rows["status"] != "accepted"]
    rejected.to_parquet(folder / "plain_rejects.parquet", index=False)
    return {"read": len(rows), "accepted": int(first.sum()), "duplicates": int((~first).sum()),
            "rejected": len(rejected)}  # fmt: skip


def child_imports(folder: Path) -> dict:
    import geoloc.data.finalize  # noqa: F401 - what every merge loads before its first row

    return {"read": 0, "accepted": 0, "duplicates": 0, "rejected": 0}


def run_child(kind: str, folder: Path) -> dict:
    for sub in ("processed", "index"):  # every merge starts from an empty data folder
        shutil.rmtree(folder / "data" / sub, ignore_errors=True)
    out = subprocess.run([sys.executable, __file__, "--child", kind, str(folder)],
                         capture_output=True, text=True, check=True)  # fmt: skip
    return eval(out.stdout.strip().splitlines()[-1])  # our own child's dict literal


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, nargs="+", default=[100_000])
    ap.add_argument("--work", type=Path, default=None)
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        kind, folder = args.child
        start = time.perf_counter()
        child = {"geoloc": child_geoloc, "plain": child_plain, "imports": child_imports}[kind]
        result = child(Path(folder))
        result |= {"seconds": round(time.perf_counter() - start, 1),
                   "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
        print(repr(result))  # fmt: skip
        return
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-ingest-merge-"))
    print(f"{'rows':>9} {'merge':>7} {'s':>7} {'peak MB':>8}  counts")
    for n in args.n:
        folder = work / f"n{n}"
        t0 = time.perf_counter()
        build(folder, n)
        print(f"  (journal of {n:,} rows ready in {time.perf_counter() - t0:.0f} s)", flush=True)
        for kind in ("imports", "geoloc", "plain"):
            r = run_child(kind, folder)
            counts = {k: r[k] for k in ("read", "accepted", "rejected", "duplicates")}
            print(f"{n:>9,} {kind:>7} {r['seconds']:>7.1f} {r['peak_mb']:>8,}  {counts}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
