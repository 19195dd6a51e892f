"""GeoSoftTargetLoss vs plain cross-entropy: time and peak memory of forward + backward.

    .venv/bin/python benchmarks/bench_geosoft_loss.py [--classes 1000 10000 100000]
        [--batch 256] [--reps 5] [--naive-max 10000] [--threads N]

Time: median wall-clock of `reps` forward+backward passes on random logits (B, K), after one
warm-up, in this process, with torch's default thread count; the losses take turns within each
rep so that a busy shared machine slows them alike (the ratio is the number to read).

Memory: each (loss, K) runs once in a fresh subprocess; "peak MB" is the rise of the process's
peak RSS (`VmHWM` in /proc/self/status; `ru_maxrss` elsewhere, which on Linux would inherit the
parent's peak across fork+exec) over one forward+backward, measured after the
logits, targets and loss module already exist. So it counts what the loss itself adds (soft
targets, distances, softmax buffers, the logits' gradient), not the inputs. RSS is a coarse
allocator-level number: freed-and-reused buffers are not double counted, pages returned to the OS
early are. For reference, one (B, K) float32 buffer is B*K*4 bytes (~98 MB at 256 x 100k).

References: `ce` is `F.cross_entropy` on the same logits (the plain loss this replaces);
`naive` is GeoSoft written the obvious way — a broadcast haversine to a (B, K) matrix and
`-(q * log_softmax(z)).sum()` — run only for K <= --naive-max since it is the memory hog the
on-the-fly version avoids. Class centroids are uniform on the sphere.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from geoloc.geo import haversine_km
from geoloc.model import GeoSoftTargetLoss

TAU_KM = 75.0


def random_centroids(k: int, seed: int = 0) -> torch.Tensor:
    """(K, 2) lat/lon degrees uniform on the sphere."""
    g = torch.Generator().manual_seed(seed)
    lat = torch.rad2deg(torch.asin(torch.rand(k, generator=g) * 2 - 1))
    lon = torch.rand(k, generator=g) * 360 - 180
    return torch.stack([lat, lon], dim=1)


class NaiveGeoSoft(torch.nn.Module):
    """The straightforward version: ~6 broadcast (B, K) temporaries plus log_softmax."""

    def __init__(self, centroids: torch.Tensor, tau_km: float) -> None:
        super().__init__()
        self.c, self.tau = centroids, tau_km

    def forward(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        t = self.c[targets]
        d = haversine_km(t[:, None, 0], t[:, None, 1], self.c[None, :, 0], self.c[None, :, 1])
        q = torch.softmax(-d / self.tau, dim=1)
        return -(q * F.log_softmax(logits, dim=1)).sum(1).mean()


def make_loss(kind: str, k: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if kind == "ce":
        return F.cross_entropy
    if kind == "geosoft":
        return GeoSoftTargetLoss(random_centroids(k), TAU_KM)
    if kind == "naive":
        return NaiveGeoSoft(random_centroids(k), TAU_KM)
    raise ValueError(kind)


def inputs(k: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(batch, k, generator=g).requires_grad_(True)
    return logits, torch.randint(0, k, (batch,), generator=g)


def step(loss: Callable, logits: torch.Tensor, targets: torch.Tensor) -> None:
    logits.grad = None
    loss(logits, targets).backward()


def time_ms(kinds: list[str], k: int, batch: int, reps: int) -> dict[str, float]:
    """Median ms per forward+backward for each kind; reps interleave the kinds so that load
    from other processes on a shared machine hits them alike."""
    losses = {kind: make_loss(kind, k) for kind in kinds}
    logits, targets = inputs(k, batch)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for kind in kinds:
        step(losses[kind], logits, targets)  # warm-up
    for _ in range(reps):
        for kind in kinds:
            t0 = time.perf_counter()
            step(losses[kind], logits, targets)
            times[kind].append(time.perf_counter() - t0)
    return {kind: 1000 * statistics.median(ts) for kind, ts in times.items()}


def peak_rss_kib() -> int:
    """This process's peak resident set size in KiB."""
    try:
        status = Path("/proc/self/status").read_text()
        return int(status.split("VmHWM:")[1].split()[0])
    except (OSError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def peak_mb_worker(kind: str, k: int, batch: int) -> None:
    """Run in a fresh process: print the peak-RSS rise (MB) of one forward+backward."""
    loss, (logits, targets) = make_loss(kind, k), inputs(k, batch)
    before = peak_rss_kib()
    step(loss, logits, targets)
    print(json.dumps({"peak_mb": (peak_rss_kib() - before) / 1024}))


def peak_mb(kind: str, k: int, batch: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", kind, str(k), str(batch)],
        check=True,
        capture_output=True,
        text=True,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[1_000, 10_000, 100_000])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--naive-max", type=int, default=10_000, help="largest K for `naive`")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--worker", nargs=3, metavar=("KIND", "K", "B"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        peak_mb_worker(args.worker[0], int(args.worker[1]), int(args.worker[2]))
        return
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"batch={args.batch} reps={args.reps} threads={torch.get_num_threads()} tau={TAU_KM}km")
    header = (
        f"{'K':>8} {'(B,K) MB':>9} | {'ce ms':>8} {'geosoft ms':>10} {'x ce':>6} {'naive ms':>9}"
        f" | {'ce MB':>7} {'geosoft MB':>10} {'x ce':>6} {'naive MB':>9}"
    )
    print(header)
    print("-" * len(header))
    for k in args.classes:
        buf_mb = args.batch * k * 4 / 2**20
        kinds = ["ce", "geosoft"] + (["naive"] if k <= args.naive_max else [])
        t = time_ms(kinds, k, args.batch, args.reps)
        t_ce, t_gs = t["ce"], t["geosoft"]
        m_ce, m_gs = peak_mb("ce", k, args.batch), peak_mb("geosoft", k, args.batch)
        if "naive" in t:
            t_nv, m_nv = f"{t['naive']:9.1f}", f"{peak_mb('naive', k, args.batch):9.0f}"
        else:
            t_nv = m_nv = f"{'-':>9}"
        print(
            f"{k:>8} {buf_mb:>9.1f} | {t_ce:>8.1f} {t_gs:>10.1f} {t_gs / t_ce:>6.2f} {t_nv}"
            f" | {m_ce:>7.0f} {m_gs:>10.0f} {m_gs / max(m_ce, 1e-9):>6.2f} {m_nv}"
        )


if __name__ == "__main__":
    main()
