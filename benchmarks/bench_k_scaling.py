"""Scaling the head: step time and peak memory of head + loss as the number of classes K grows.

    .venv/bin/python benchmarks/bench_k_scaling.py [--classes 1000 10000 100000 1000000]
        [--batch 256] [--dim 256] [--reps 3] [--neighbours 64] [--threads N] [--max-gb G]

Workload: one training step of the classifier alone, on CPU: a fixed (B, d) float32 embedding
(requiring grad, as it would coming out of the backbone) -> head -> loss -> backward, with the
head's gradients set to None first (as `optimizer.zero_grad(set_to_none=True)` leaves them).
The backbone and the optimiser step are left out.

  flat CE          nn.Linear(d, K) + `F.cross_entropy` (the plain reference)
  dense GeoSoft    nn.Linear(d, K) + `GeoSoftTargetLoss` (distance-soft targets over all K)
  sparse GeoSoft   nn.Linear(d, K) + `SparseGeoSoftLoss` (the `--neighbours` nearest classes)
  fact.+sparse     `FactorisedHead` + `FactorisedLoss` over the same neighbours: P(parent) x
                   P(child | parent), child logits only for the true parent (plus the top-1
                   parent's children without grad, for the training-time prediction, as in
                   training)
  sparse head      the same with `model.sparse_head`: the parents under a block tree (<= 64 per
                   block), row-sparse gradients into every table
  sparse head+opt  the same plus its optimiser step (`RowSparseAdamW`, rows read only): the
                   whole per-step cost of the head; its lazily made Adam state exists before
                   timing (one step is taken at set-up)

Classes: synthetic r7 cells, all 7 children of K/7 contiguous r6 parents around 48N 10E (so
P = K/7, the best case for the factorised head; sparser data has more parents per class),
tau = the r7 default (1.4 km). Neighbour tables are built once per K (a k-d tree) and shared;
that one-off cost is printed, not counted in step times.

Time: median wall-clock of `--reps` steps (more for fast steps: ~3 s per method) after one
warm-up, in this process, with `--threads` torch threads (default 1: on a loaded 2-core machine
two threads made small ops up to ~100x slower); the methods take turns within each rep so that
load from other processes on a shared machine hits them alike (read the ratios).

Memory: each (method, K) runs once in a fresh subprocess; "peak MB" is the rise of the process's
peak RSS (`VmHWM`, reset through /proc/self/clear_refs before the step) over its RSS once the
head, its weights and the loss tables exist. So it counts what one step adds (gradients,
logits, softmax buffers, soft targets, gathered child tables), not the weights. A method whose
estimated peak (measured at the previous K, scaled linearly in K) is over --max-gb is reported as
"skipped (needs ~N GB)" instead of run.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import h3
import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from geoloc.config import TrainConfig
from geoloc.geo import nearest_points
from geoloc.model import (
    FactorisedHead,
    FactorisedLoss,
    GeoSoftNeighbours,
    GeoSoftTargetLoss,
    SparseGeoSoftLoss,
    default_tau_km,
)
from geoloc.train.optim import build_optimizer

METHODS = ("flat CE", "dense GeoSoft", "sparse GeoSoft", "fact.+sparse", "sparse head",
           "sparse head+opt")  # fmt: skip
SPARSE_HEADS = ("sparse head", "sparse head+opt")
GOALS = ("goals: the factorised head <= 0.5x flat CE at K=10^6 and <= 3x its own K=10^3; "
         "sparse <= 1.2x CE")  # fmt: skip


# --------------------------------------------------------------------------------------------
# The classes and the methods
# --------------------------------------------------------------------------------------------


def synthetic_r7(k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lat, lon, parent_of) of `k` r7 cells: all children of contiguous r6 parents."""
    num_parents = -(-k // 7)
    centre, radius = h3.latlng_to_cell(48.0, 10.0, 6), 0
    while 3 * radius * (radius + 1) + 1 < num_parents:
        radius += 1
    parents = sorted(h3.grid_disk(centre, radius))[:num_parents]
    cells, parent_of = [], []
    for j, p in enumerate(parents):
        children = sorted(h3.cell_to_children(p, 7))
        cells += children
        parent_of += [j] * len(children)
    cells, parent_of = cells[:k], parent_of[:k]
    latlon = np.array([h3.cell_to_latlng(c) for c in cells])
    return latlon[:, 0], latlon[:, 1], np.asarray(parent_of, dtype=np.int64)


def tables_path(folder: Path, k: int, neighbours: int) -> Path:
    """Classes + neighbour table of one K, built once and read by every worker."""
    path = folder / f"classes_{k}_{neighbours}.npz"
    if not path.is_file():
        lat, lon, parent_of = synthetic_r7(k)
        t0 = time.perf_counter()
        nbr = nearest_points(lat, lon, neighbours).astype(np.int32)
        print(f"  K={k:,}: neighbour table ({neighbours} per class) built in "
              f"{time.perf_counter() - t0:.1f} s", flush=True)  # fmt: skip
        np.savez(path, lat=lat, lon=lon, parent_of=parent_of, nbr=nbr)
    return path


Step = Callable[[], None]


def build(method: str, tables: Path, batch: int, dim: int, shared: dict | None = None) -> Step:
    """One training step of `method` (forward + backward of head and loss) as a closure.

    `shared` keeps what several methods can share in one process (inputs, the flat layer).
    """
    shared = {} if shared is None else shared
    if "tables" not in shared:
        z = np.load(tables)
        g = torch.Generator().manual_seed(0)
        k = z["lat"].shape[0]
        shared.update(tables={name: z[name] for name in z.files},
                      h=torch.randn(batch, dim, generator=g).requires_grad_(True),
                      y=torch.randint(0, k, (batch,), generator=g))  # fmt: skip
    t, h, y = shared["tables"], shared["h"], shared["y"]
    lat, lon, parent_of, nbr = t["lat"], t["lon"], t["parent_of"], t["nbr"]
    k = lat.shape[0]
    centroids = torch.from_numpy(np.stack([lat, lon], axis=1)).float()
    tau = default_tau_km(7)
    if method in SPARSE_HEADS:
        return _sparse_head_step(method, dim, parent_of, centroids, tau, nbr, h, y)
    if method == "fact.+sparse":
        head = FactorisedHead(dim, parent_of, int(parent_of.max()) + 1).train()
        loss = FactorisedLoss(parent_of, head.num_parents,
                              GeoSoftNeighbours(centroids, tau, nbr.shape[1], nbr))  # fmt: skip

        def factorised_step() -> None:
            _zero(head, h)
            loss(head(h, parents=loss.head_parents(y)), y).backward()

        return factorised_step
    linear = shared.setdefault("linear", torch.nn.Linear(dim, k))
    if method == "flat CE":
        criterion: Callable = F.cross_entropy
    elif method == "dense GeoSoft":
        criterion = GeoSoftTargetLoss(centroids, tau)
    elif method == "sparse GeoSoft":
        criterion = SparseGeoSoftLoss(GeoSoftNeighbours(centroids, tau, nbr.shape[1], nbr))
    else:
        raise ValueError(method)

    def flat_step() -> None:
        _zero(linear, h)
        criterion(linear(h), y).backward()

    return flat_step


def _sparse_head_step(
    method: str, dim: int, parent_of: np.ndarray, centroids: torch.Tensor, tau: float,
    nbr: np.ndarray, h: torch.Tensor, y: torch.Tensor,
) -> Step:  # fmt: skip
    head = FactorisedHead(dim, parent_of, int(parent_of.max()) + 1, sparse=True).train()
    loss = FactorisedLoss(parent_of, head.num_parents,
                          GeoSoftNeighbours(centroids, tau, nbr.shape[1], nbr))  # fmt: skip
    opt = build_optimizer(head, TrainConfig(lr=1e-3)) if method == "sparse head+opt" else None

    def sparse_head_step() -> None:
        _zero(head, h)
        loss(head(h, parents=loss.head_parents(y)), y).backward()
        if opt is not None:
            opt.step()

    if opt is not None:
        sparse_head_step()  # Adam's moments are made at the first step: not a per-step cost
    return sparse_head_step


def _zero(module: torch.nn.Module, h: torch.Tensor) -> None:
    for p in module.parameters():
        p.grad = None
    h.grad = None


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------


def time_ms(steps: dict[str, Step], reps: int, budget_s: float = 3.0) -> dict[str, float]:
    """Median ms per step; the methods take turns within each rep. Fast steps get more reps
    (about `budget_s` per method, at most 100) so that their medians settle on a busy machine."""
    times: dict[str, list[float]] = {m: [] for m in steps}
    slowest = 0.0
    for step in steps.values():
        t0 = time.perf_counter()
        step()  # warm-up
        slowest = max(slowest, time.perf_counter() - t0)
    for _ in range(max(reps, min(100, int(budget_s / max(slowest, 1e-6))))):
        for method, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[method].append(time.perf_counter() - t0)
    return {m: 1000 * statistics.median(ts) for m, ts in times.items()}


def _status_kib(field: str) -> int:
    return int(Path("/proc/self/status").read_text().split(f"{field}:")[1].split()[0])


def peak_mb_worker(method: str, tables: str, batch: int, dim: int) -> None:
    """Run in a fresh process: print the peak-RSS rise (MB) of one step over the set-up RSS."""
    step = build(method, Path(tables), batch, dim)
    with contextlib.suppress(OSError):  # reset the high-water mark to the RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    before = _status_kib("VmRSS")
    step()
    print(json.dumps({"peak_mb": (_status_kib("VmHWM") - before) / 1024}))


def peak_mb(method: str, tables: Path, batch: int, dim: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", method, str(tables), str(batch), str(dim)],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])


def _mem_available_gb() -> float:
    text = Path("/proc/meminfo").read_text()
    return int(text.split("MemAvailable:")[1].split()[0]) / 2**20


def _weights_gb(method: str, k: int, dim: int) -> float:
    """What a method holds before its step: the head's weights (+ padding for the factorised
    head's child tables, 7 per parent here) and the neighbour table."""
    share = 1.0 if method in ("flat CE", "dense GeoSoft", "sparse GeoSoft") else 1.0 + 1 / 7
    return (k * dim * 4 * share * (3 if method == "sparse head+opt" else 1)) / 2**30


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, folder: Path) -> list[dict]:
    rows: list[dict] = []
    peak_prev: dict[str, tuple[int, float]] = {}
    for k in args.classes:
        tables = tables_path(folder, k, args.neighbours)
        fits, skipped = [], {}
        for m in METHODS:
            if m in peak_prev:
                k0, mb0 = peak_prev[m]
                need = (mb0 / 1024) * k / k0 + _weights_gb(m, k, args.dim)
                if need > args.max_gb:
                    skipped[m] = need
                    continue
            fits.append(m)
        shared: dict = {}
        t = time_ms({m: build(m, tables, args.batch, args.dim, shared) for m in fits}, args.reps)
        del shared
        mem = {m: peak_mb(m, tables, args.batch, args.dim) for m in fits}
        for m in fits:
            peak_prev[m] = (k, mem[m])
        for m in METHODS:
            rows.append({"K": k, "method": m, "ms": t.get(m), "peak_mb": mem.get(m),
                         "skipped_gb": skipped.get(m)})  # fmt: skip
        print_table([r for r in rows if r["K"] == k], header=k == args.classes[0])
    return rows


def print_table(rows: list[dict], header: bool) -> None:
    by = {r["method"]: r for r in rows}
    ce = by["flat CE"]["ms"]
    if header:
        print(f"{'K':>9} {'method':<15} {'step ms':>9} {'x flat CE':>9} {'peak MB':>9}")
    for r in rows:
        if r["ms"] is None:
            print(f"{r['K']:>9,} {r['method']:<15} skipped (needs ~{r['skipped_gb']:.1f} GB)")
            continue
        ratio = f"{r['ms'] / ce:9.2f}" if ce else f"{'-':>9}"
        print(f"{r['K']:>9,} {r['method']:<15} {r['ms']:9.1f} {ratio} {r['peak_mb']:9.0f}")
    sys.stdout.flush()


def print_goals(rows: list[dict]) -> None:
    ms = {(r["K"], r["method"]): r["ms"] for r in rows}
    ks = sorted({r["K"] for r in rows})
    lo, hi = ks[0], ks[-1]
    print(f"\n{GOALS}")
    ce_hi = ms[(hi, "flat CE")]
    for method in ("fact.+sparse", *SPARSE_HEADS):
        fact_hi, fact_lo = ms[(hi, method)], ms[(lo, method)]
        if fact_hi and ce_hi:
            print(f"  {method} / flat CE at K={hi:,}: {fact_hi / ce_hi:.2f}x")
        if fact_hi and fact_lo:
            print(f"  {method} at K={hi:,} / at K={lo:,}: {fact_hi / fact_lo:.1f}x")
    ratios = [(ms[(k, "sparse GeoSoft")] / ms[(k, "flat CE")], k) for k in ks
              if ms[(k, "sparse GeoSoft")] and ms[(k, "flat CE")]]  # fmt: skip
    if ratios:
        worst = max(ratios)
        print(f"  sparse GeoSoft / flat CE, worst K ({worst[1]:,}): {worst[0]:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+",
                        default=[1_000, 10_000, 100_000, 1_000_000])  # fmt: skip
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--neighbours", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (0: torch's default; 1 keeps a loaded machine steady)")
    parser.add_argument("--max-gb", type=float, default=None,
                        help="skip a method whose estimated peak exceeds this (default: half "
                        "of MemAvailable)")  # fmt: skip
    parser.add_argument("--worker", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        method, tables, batch, dim = args.worker
        peak_mb_worker(method, tables, int(batch), int(dim))
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    args.max_gb = args.max_gb or 0.5 * _mem_available_gb()
    print(f"B={args.batch} d={args.dim} reps={args.reps} neighbours={args.neighbours} "
          f"threads={torch.get_num_threads()} max-gb={args.max_gb:.1f} (CPU, float32)")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="bench_k_scaling_") as tmp:
        rows = run(args, Path(tmp))
    print_goals(rows)


if __name__ == "__main__":
    main()
