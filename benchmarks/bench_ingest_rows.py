"""`geoloc data ingest` of an N-row manifest with 1% bad rows: peak RSS of every process, CPU
time per row, and issue 28's "Bad input" checks, at several N.

    python benchmarks/bench_ingest_rows.py --images DIR [--n 100000 1000000] [--work DIR]
        [--workers 2] [--max-side 32]

`--images` is a folder of distinct JPEGs (e.g. `<data>/raw/synth/images` of
`geoloc data synth --n 1000000 --size 32`): distinct content, so deduplication (by the sha256
of the cleaned JPEG) keeps them all. The manifest's N rows point at the first N x 0.99 of them
(sorted by path); the other 1% are bad in equal thirds: a path that does not exist, a NaN
latitude, a JPEG cut short after 200 bytes (written into the work folder); 0.1% of the good
rows repeat an earlier image under another id (duplicates). Bad rows are spread through the file.

The ingest runs as the user runs it, in its own process group, with psutil polling every
process of its tree every 0.2 s: the table gives the peak RSS of the main process (and its
peak until the listing was journaled, before the merge) and of each worker, the CPU seconds of
all of them (`RUSAGE_CHILDREN`), and checks that read = accepted +
rejected + duplicates, that rejects.parquet has a row per refused row, and that the terminal
shows one summary line per reason (no line names a bad row).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil

REPO = Path(__file__).resolve().parent.parent
KINDS = ("missing_file", "nan_coords", "corrupt")


def list_images(folder: Path, n: int, cache: Path) -> list[str]:
    """The first n JPEG paths under `folder`, sorted (listed once, cached in the work folder)."""
    if not cache.is_file():
        found = sorted(str(p) for p in folder.rglob("*.jpg"))
        cache.write_text("\n".join(found) + "\n")
    paths = cache.read_text().splitlines()
    if len(paths) < n:
        raise SystemExit(f"{folder} holds {len(paths)} JPEGs, fewer than the {n} needed")
    return paths[:n]


def make_manifest(folder: Path, images: list[str], n: int) -> tuple[Path, dict[str, int], int]:
    """The N-row manifest; returns it, the bad rows by reason and the number of duplicates."""
    rng = np.random.default_rng(0)
    n_bad = n // 100
    n_dup = n // 1000
    n_good = n - n_bad - n_dup
    paths = list(images[:n_good])
    lat = rng.uniform(-60, 60, n).round(6)
    lon = rng.uniform(-170, 170, n).round(6)
    ids = [f"img{i}" for i in range(n)]
    kinds = [KINDS[j % 3] for j in range(n_bad)]
    corrupt = folder / "corrupt"
    corrupt.mkdir(parents=True, exist_ok=True)
    for j, kind in enumerate(kinds):
        src = images[j % n_good]
        if kind == "missing_file":
            paths.append(str(folder / "missing" / f"{j}.jpg"))
        elif kind == "nan_coords":
            paths.append(src)
            lat[n_good + j] = np.nan
        else:
            cut = corrupt / f"{j}.jpg"
            cut.write_bytes(Path(src).read_bytes()[:200])
            paths.append(str(cut))
    paths += [images[j] for j in range(n_dup)]  # same bytes as an earlier row, another id
    order = rng.permutation(n)
    table = pd.DataFrame({"image_id": ids, "path": paths, "lat": lat, "lon": lon}).iloc[order]
    out = folder / "photos.csv"
    table.to_csv(out, index=False)
    bad = {k: kinds.count(k) for k in KINDS}
    return out, bad, n_dup


def run(cmd: list[str], env: dict[str, str], log: Path) -> dict:
    """Run `cmd` polling its tree; peak RSS per process (MB), CPU seconds, wall, output."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        top = psutil.Process(proc.pid)
        peaks: dict[int, float] = {}
        journal_mb = 0.0  # the main process's peak until its listing is journaled
        while proc.poll() is None:
            try:
                for p in [top, *top.children(recursive=True)]:
                    with contextlib.suppress(psutil.Error):
                        peaks[p.pid] = max(peaks.get(p.pid, 0.0), p.memory_info().rss / 2**20)
            except psutil.Error:
                pass
            if not journal_mb and " img in " in log.read_text():  # the progress line's end
                journal_mb = peaks.get(proc.pid, 0.0)
            time.sleep(0.2)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    main = peaks.pop(proc.pid, 0.0)
    return {"code": proc.returncode, "wall": time.perf_counter() - t0, "cpu": cpu,
            "main_mb": main, "journal_mb": journal_mb,
            "worker_mb": sorted(peaks.values(), reverse=True),
            "out": log.read_text()}  # fmt: skip


def check(out: str, data: Path, n: int, bad: dict[str, int], dups: int) -> list[str]:
    """Issue 28's "Bad input" properties; the problems found (empty: all hold)."""
    problems = []
    line = re.search(r"read (\d+) = accepted (\d+) \+ rejected (\d+) \+ duplicates (\d+)", out)
    if not line:
        return ["no `read = accepted + rejected + duplicates` line"]
    read, acc, rej, dup = map(int, line.groups())
    if read != acc + rej + dup or read != n:
        problems.append(f"counts do not add up: {line.group(0)} (rows {n})")
    if rej != sum(bad.values()) or dup < dups:  # the images may repeat content themselves
        problems.append(f"rejected {rej} / duplicates {dup}, expected {sum(bad.values())} / "
                        f">= {dups}")  # fmt: skip
    rejects = pd.read_parquet(data / "index" / "rejects.parquet")
    if len(rejects) != rej + dup:
        problems.append(f"rejects.parquet has {len(rejects)} rows for {rej + dup} refused")
    reason_lines = [ln for ln in out.splitlines() if ln.startswith("  rejected ")]
    if sorted(reason_lines) != sorted(f"  rejected {r}: {k}" for r, k in bad.items()):
        problems.append(f"reason lines: {reason_lines}")
    per_row = [ln for ln in out.splitlines() if "/missing/" in ln or "/corrupt/" in ln]
    if per_row:
        problems.append(f"{len(per_row)} lines name a bad row, e.g. {per_row[0][:120]}")
    return problems


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=Path, required=True)
    ap.add_argument("--n", type=int, nargs="+", default=[100_000])
    ap.add_argument("--work", type=Path, default=REPO / ".benchmarks" / "ingest-rows")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--max-side", type=int, default=32)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"{'rows':>9} {'wall s':>7} {'CPU ms/row':>10} {'main MB':>8} {'(journal)':>9} "
          f"{'workers MB':>12}  checks")  # fmt: skip
    for n in args.n:
        folder = args.work / f"n{n}"
        shutil.rmtree(folder / "data", ignore_errors=True)
        images = list_images(args.images, n, args.work / "images.txt")
        manifest, bad, dups = make_manifest(folder, images, n)
        env = os.environ | {"GEOLOC_DATA_DIR": str(folder / "data"), "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "geoloc", "data", "ingest", str(manifest), "--workers",
               str(args.workers), "--set", f"max_side={args.max_side}",  # images and bad files
               "-o", f"base_dir={os.path.commonpath([args.images.resolve(), folder.resolve()])}"]
        r = run(cmd, env, folder / "ingest.log")
        problems = [f"exit {r['code']}"] if r["code"] else check(r["out"], folder / "data", n,
                                                                     bad, dups)  # fmt: skip
        workers = "/".join(f"{mb:.0f}" for mb in r["worker_mb"][:4])
        found = re.search(r"read \d+ = .*duplicates \d+", r["out"])
        print(f"  {found.group(0) if found else 'no summary line'}")
        print(f"{n:>9,} {r['wall']:>7.0f} {1000 * r['cpu'] / n:>10.2f} {r['main_mb']:>8.0f} "
              f"{r['journal_mb']:>9.0f} "
              f"{workers:>12}  {'; '.join(problems) or 'ok'}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
