"""Index build at 10^6 (and 10^7) rows: the streamed integer-id build vs the previous one.

    .venv/bin/python benchmarks/bench_index_build.py [--n 1000000 [10000000 ...]]
        [--reference-max 1000000] [--min-images 3]

Input: a processed manifest of N rows at the places of `geoloc data synth` (street-level
sequences around ~34,000 GeoNames towns), written once per N and not timed; `--jitter-deg D`
uses the demo's places instead (towns ~ sqrt(population) + D degrees of Gaussian jitter: many
sparse cells, so many images remapped to their nearest class). Settings: classes
r7, parents r6, geographic split at r3, `min_images_per_class` 3. Each build is the whole
command (labels, parents, splits, classes, features, parquet, fingerprint) in its own process,
which reports its wall time, its peak RSS (`VmHWM`) and its peak right after the imports
(`geoloc.geo` imports torch: ~0.85 GB of every peak is that). `current` is
`geoloc.data.index.build_index` (stage times from its `on_stage` hook); `reference` is the
previous implementation (`_index_reference.py`), run only up to `--reference-max` rows: it
held everything as Python strings and a (4096 x classes) float64 matrix. Both indexes are then
compared (images, labels and features identical; splits rows differ only where two classes
are equidistant to rounding, which v1 left to BLAS).
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

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _synthetic_index import write_processed_manifest  # noqa: E402

from geoloc.paths import DataPaths  # noqa: E402

SETTINGS = dict(resolution=7, parent_resolution=6, split_resolution=3, workers=1)


def _rss_mb() -> float:
    """Peak RSS of this process in MB: VmHWM, which starts afresh at exec (ru_maxrss would
    include the parent's RSS at fork time)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(path: str, root: str, min_images: int) -> None:
    """Run one build in this process and print its measurements as JSON."""
    from geoloc.config import IndexConfig
    from geoloc.data.index import build_index

    cfg = IndexConfig(**SETTINGS, min_images_per_class=min_images)
    paths = DataPaths(Path(root))
    base = _rss_mb()
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    if path == "current":

        def stamp(stage: str) -> None:
            stages[stage] = time.perf_counter()

        report = build_index(paths, cfg, on_stage=stamp)
        out = {"n_classes": report.n_classes, "n_parents": report.n_parents,
               "remapped": report.n_remapped / report.n_images}  # fmt: skip
        last = t0
        for name in list(stages):
            stages[name], last = stages[name] - last, stages[name]
    else:
        from _index_reference import reference_build

        out = reference_build(paths, cfg)
    seconds = time.perf_counter() - t0
    print(json.dumps({**out, "seconds": seconds, "peak_mb": _rss_mb(), "base_mb": base,
                      "stages": stages}))  # fmt: skip


def measure(path: str, root: Path, min_images: int) -> dict:
    cmd = [sys.executable, __file__, "--child", path, str(root), "--min-images", str(min_images)]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
    if done.returncode:
        raise SystemExit(f"{path} build failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, nargs="+", default=[1_000_000])
    ap.add_argument("--reference-max", type=int, default=1_000_000)
    ap.add_argument("--min-images", type=int, default=3)
    ap.add_argument("--jitter-deg", type=float, default=0.0,
                    help="places: towns ~ sqrt(population) + this Gaussian jitter (the demo's) "
                    "instead of synth's street-level sequences")  # fmt: skip
    ap.add_argument("--child", nargs=2, metavar=("PATH", "ROOT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child, args.min_images)
        return
    places = f"towns + {args.jitter_deg} deg jitter" if args.jitter_deg else "synth places"
    print(f"index build ({places}; r7/r6, split r3, min_images_per_class={args.min_images}), "
          f"{os.cpu_count()} CPUs, shared machine: read ratios, not absolute times")  # fmt: skip
    print(f"{'rows':>11} {'path':<10} {'wall s':>8} {'peak GB':>8} {'imports GB':>10} "
          f"{'classes':>8} {'parents':>8}  stages")  # fmt: skip
    from _index_reference import compare

    for n in args.n:
        with tempfile.TemporaryDirectory() as tmp:
            roots = {p: Path(tmp) / p for p in ("current", "reference")}
            t0 = time.perf_counter()
            write_processed_manifest(DataPaths(roots["current"]), n, jitter_deg=args.jitter_deg)
            made = time.perf_counter() - t0
            paths = ["current"]
            if n <= args.reference_max:
                DataPaths(roots["reference"]).processed.mkdir(parents=True)
                os.link(DataPaths(roots["current"]).processed_manifest,
                        DataPaths(roots["reference"]).processed_manifest)  # fmt: skip
                paths.append("reference")
            results = {p: measure(p, roots[p], args.min_images) for p in paths}
            for p, r in results.items():
                stages = " ".join(f"{k} {v:.1f}s" for k, v in r["stages"].items())
                print(f"{n:>11,} {p:<10} {r['seconds']:>8.1f} {r['peak_mb'] / 1024:>8.2f} "
                      f"{r['base_mb'] / 1024:>10.2f} {r['n_classes']:>8,} {r['n_parents']:>8,}"
                      f"  {stages}")  # fmt: skip
            cur = results["current"]
            print(f"{'':>11} (manifest of {n:,} rows written in {made:.0f}s, not timed; "
                  f"{n / cur['seconds']:,.0f} rows/s; {cur['remapped']:.0%} of the images "
                  f"remapped to their nearest class)")  # fmt: skip
            if "reference" in results:
                ref = results["reference"]
                print(f"{'':>11} current vs reference: {ref['seconds'] / cur['seconds']:.1f}x "
                      f"faster, peak {ref['peak_mb'] / cur['peak_mb']:.1f}x lower "
                      f"(above imports: {(ref['peak_mb'] - ref['base_mb']) / max(cur['peak_mb'] - cur['base_mb'], 1):.1f}x); "  # noqa: E501
                      f"{compare(*(DataPaths(roots[p]) for p in paths))}")  # fmt: skip


if __name__ == "__main__":
    main()
