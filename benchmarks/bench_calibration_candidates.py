"""Seconds and peak memory of rerank's calibration fits: on candidate cells vs dense rows x classes.

    .venv/bin/python benchmarks/bench_calibration_candidates.py [--n 2000] [--classes 7600]

What `geoloc.infer.tuning` fits on the calibration sample for a variant built from votes:
smoothing + temperature (`fit_scaling`, 9 smoothing values x LBFGS) and the conformal choice
(`choose_conformal`: LAC, APS, 12 RAPS settings, cross-fitted). The plain reference is the dense
path of `geoloc.infer.calibration` on (n, K) float64 arrays; the candidate path is
`geoloc.infer.candidates` on the 512 best cells + one tail term. Synthetic rows: a softmax of
Gaussian logits (scale 3) for the model, near one-hot neighbour votes on 5 cells. Peak memory is
tracemalloc's (numpy and torch CPU allocations through numpy), so both are comparable here.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np

from geoloc.infer import calibration as dense
from geoloc.infer.candidates import TopCells, choose_conformal_top, fit_scaling_top


def _rows(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, k)) * 3
    model = np.exp(z - z.max(axis=1, keepdims=True))
    model /= model.sum(axis=1, keepdims=True)
    y = np.array([rng.choice(k, p=row) for row in model])
    votes = np.zeros((n, k))
    cells = rng.integers(0, k, size=(n, 5))
    cells[:, 0] = np.where(rng.random(n) < 0.6, y, cells[:, 0])
    np.add.at(votes, (np.arange(n)[:, None], cells), 0.2)
    return 0.25 * model + 0.75 * votes, model, y


def _measure(fn: Callable[[], Any]) -> tuple[Any, float, float]:
    tracemalloc.start()
    t = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - t
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return out, seconds, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--classes", type=int, default=7600)
    ap.add_argument("--cells", type=int, default=512)
    args = ap.parse_args()
    scores, model, y = _rows(args.n, args.classes, seed=0)

    def run_dense() -> tuple[dense.Calibration, dense.ConformalSets]:
        cal = dense.fit_scaling(scores, y, model)
        return cal, dense.choose_conformal(cal.apply(scores, model), y, 0.9)

    # rerank gathers candidates block by block (`block_rows`); here in one go, timed apart
    top, t_g, m_g = _measure(lambda: TopCells.from_dense(scores, model, args.cells))

    def run_top() -> tuple[dense.Calibration, dense.ConformalSets]:
        cal = fit_scaling_top(top, y)
        return cal, choose_conformal_top(top.calibrated(cal), y, 0.9)

    (cal_d, sets_d), t_d, m_d = _measure(run_dense)
    (cal_t, sets_t), t_t, m_t = _measure(run_top)
    print(f"n={args.n} classes={args.classes} candidates={args.cells}")
    print(f"dense (reference): {t_d:.1f} s, peak {m_d:.0f} MB, {cal_d}, {sets_d.method}")
    print(f"candidates, fits:  {t_t:.1f} s, peak {m_t:.0f} MB, {cal_t}, {sets_t.method}")
    print(f"candidates, gathering them from the (n, K) rows: {t_g:.1f} s, peak {m_g:.0f} MB")
    total = t_t + t_g
    print(f"speed-up {t_d / total:.1f}x with the gathering ({t_d / t_t:.1f}x the fits); fits' "
          f"memory {m_d / max(m_t, 1e-9):.0f}x less")


if __name__ == "__main__":
    main()
