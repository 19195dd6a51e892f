"""H3 labelling + writing images.parquet columns: the vectorised path vs a per-row Python loop.

    .venv/bin/python benchmarks/bench_h3_index.py [--n 1000000] [--res 7 6 3] [--reps 1]

Both paths produce the same columns (`h3_r7`, `h3_r6`, `h3_r3`: the finest cell and its H3
parents, as `geoloc.data.cells.h3_columns` defines them) for the same random points, then write
them with the point coordinates to parquet. `loop` is the plain reference: for each row
`h3.latlng_to_cell(lat, lon, finest)` and `h3.cell_to_parent` for each coarser resolution.
`loop_latlng` calls `h3.latlng_to_cell` once per row and resolution (containment cells, not
parents, so its output differs slightly; shown for scale). `vectorised` is `h3_columns`: one
integer-API call per point at the finest resolution, numpy bit arithmetic for the parents and
one string per distinct cell. `h3ronpy` (shown only when the optional `h3ronpy` package is
installed; geoloc does not depend on it) is the same with its columnar Arrow
`coordinates_to_cells` in place of the per-point call. Times are wall-clock medians of `reps`
runs in this process.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h3
import numpy as np
import pandas as pd

from geoloc.data.cells import columns_from_finest, h3_columns


def points(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Uniform on the sphere (lat from arcsin), like a worldwide photo collection at scale."""
    rng = np.random.default_rng(seed)
    lat = np.degrees(np.arcsin(rng.uniform(-1, 1, n)))
    return lat, rng.uniform(-180, 180, n)


def loop_parents(lat: np.ndarray, lon: np.ndarray, res: list[int]) -> dict[str, list[str]]:
    finest, coarser = max(res), sorted(set(res) - {max(res)}, reverse=True)
    out: dict[str, list[str]] = {f"h3_r{r}": [] for r in [finest, *coarser]}
    for a, b in zip(lat.tolist(), lon.tolist(), strict=True):
        cell = h3.latlng_to_cell(a, b, finest)
        out[f"h3_r{finest}"].append(cell)
        for r in coarser:
            out[f"h3_r{r}"].append(h3.cell_to_parent(cell, r))
    return out


def loop_latlng(lat: np.ndarray, lon: np.ndarray, res: list[int]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {f"h3_r{r}": [] for r in sorted(set(res), reverse=True)}
    for a, b in zip(lat.tolist(), lon.tolist(), strict=True):
        for r in out:
            out[r].append(h3.latlng_to_cell(a, b, int(r.removeprefix("h3_r"))))
    return out


def h3ronpy_columns(lat: np.ndarray, lon: np.ndarray, res: list[int]) -> dict:
    """`h3_columns` with h3ronpy's columnar call for the finest cells (optional package)."""
    import pyarrow as pa
    from h3ronpy import vector

    finest = pa.array(vector.coordinates_to_cells(lat, lon, max(res)))
    cells = finest.to_numpy(zero_copy_only=False).astype(np.uint64)
    return columns_from_finest(cells, max(res), res)


def run(label: Callable, lat, lon, res, folder: Path) -> tuple[float, float, dict]:
    t0 = time.perf_counter()
    cols = label(lat, lon, res)
    t1 = time.perf_counter()
    df = pd.DataFrame({"lat": lat, "lon": lon, **cols})
    df.to_parquet(folder / "images.parquet", index=False)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, cols


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--res", type=int, nargs="+", default=[7, 6, 3])
    ap.add_argument("--reps", type=int, default=1)
    args = ap.parse_args()
    lat, lon = points(args.n)
    paths = {"loop": loop_parents, "loop_latlng": loop_latlng, "vectorised": h3_columns}
    try:
        import h3ronpy  # noqa: F401

        paths["h3ronpy"] = h3ronpy_columns
    except ImportError:
        pass
    results: dict[str, tuple[float, float]] = {}
    outputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in paths.items():
            runs = [run(fn, lat, lon, args.res, Path(tmp)) for _ in range(args.reps)]
            results[name] = (
                statistics.median(r[0] for r in runs),
                statistics.median(r[1] for r in runs),
            )
            outputs[name] = runs[0][2]
    same = all(list(outputs["loop"][c]) == list(outputs["vectorised"][c]) for c in outputs["loop"])
    print(f"H3 labelling + parquet write, {args.n:,} points, resolutions {args.res}")
    print(f"{'path':<12} {'label s':>9} {'write s':>9} {'total s':>9} {'points/s':>12}")
    for name, (t_label, t_write) in results.items():
        total = t_label + t_write
        print(f"{name:<12} {t_label:>9.2f} {t_write:>9.2f} {total:>9.2f} {args.n / total:>12,.0f}")
    if "h3ronpy" in outputs:
        same_r = all(
            list(outputs["h3ronpy"][c]) == list(outputs["vectorised"][c]) for c in outputs["loop"]
        )
        gain = results["vectorised"][0] / results["h3ronpy"][0]
        print(f"h3ronpy vs vectorised labelling: {gain:.1f}x; identical: {same_r}")
    ref, vec = sum(results["loop"]), sum(results["vectorised"])
    print(
        f"vectorised vs loop: {ref / vec:.1f}x faster (labelling alone "
        f"{results['loop'][0] / results['vectorised'][0]:.1f}x); identical output: {same}"
    )


if __name__ == "__main__":
    main()
