"""Aggregating many runs: `presentation.leaderboard.aggregate_runs` vs a naive loop.

    .venv/bin/python benchmarks/bench_aggregate.py [--runs 10000] [--naive-runs 1000]

Writes `--runs` synthetic run folders (summary.json only, like `tests/fixtures/fake_runs.py`
makes them: realistic size, with `last`/`best`/`test` metric dicts; 1% corrupt, 1% still running)
into a temporary folder, then times, in this process:

- `aggregate_runs`: read + validate (compiled JSON Schema validator) every summary, score,
  rank, and write CSV + Parquet + dashboard atomically. Wall-clock of one full call after one
  warm-up on a small folder (so imports are not counted).
- naive reference: what one writes first - per run `json.load`, `jsonschema.validate` (which
  re-checks the schema on each call), `pd.json_normalize` and `pd.concat` onto the table so far,
  then the same min-max score with pandas and `to_csv`/`to_parquet`. It grows quadratically,
  so it runs on `--naive-runs` only; the ratio compares both on that same folder.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from fixtures.fake_runs import fake_summary, write_summary_fast  # noqa: E402

from geoloc.presentation.leaderboard import aggregate_runs  # noqa: E402
from geoloc.runfolder.summary import load_schema  # noqa: E402


def make_runs(root: Path, n: int, seed: int = 0) -> None:
    """`n` run folders; numbers vary per run, 1% corrupt and 1% running."""
    rng = np.random.default_rng(seed)
    template = fake_summary("template", "template", epochs=10)
    template["test"] = {f"test_{k[4:]}": v for k, v in template["last"].items() if "val_" in k}
    for i in range(n):
        run_id = f"20261125T{i:06d}000000Z-bench-{i:06x}"
        folder = root / run_id
        if i % 100 == 17:
            folder.mkdir(parents=True)
            (folder / "summary.json").write_text('{"schema_version": 1, "run_id": ')
            continue
        s = dict(template)
        s.update(
            run_id=run_id,
            run_name=f"bench-{i}",
            status="running" if i % 100 == 42 else "completed",
            best_val_acc=float(rng.uniform(0.05, 0.6)),
            best_p90_km=float(rng.uniform(300, 9000)),
            last_geo_median_km=float(rng.uniform(5, 2000)),
        )
        write_summary_fast(folder, s)


def naive_aggregate(root: Path, out: Path) -> pd.DataFrame:
    """The obvious version: validate per call, normalise per run, concat per run."""
    schema = load_schema(1)
    table = pd.DataFrame()
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_")):
        try:
            summary: dict[str, Any] = json.loads((folder / "summary.json").read_text())
            jsonschema.validate(summary, schema)
        except (ValueError, jsonschema.ValidationError):
            continue
        if summary["status"] == "running":
            continue
        row = pd.json_normalize(summary)
        row["run_id"] = folder.name
        table = pd.concat([table, row], ignore_index=True)
    score = pd.Series(0.0, index=table.index)
    for col, w, higher in (
        ("best_val_acc", 0.4, True),
        ("best_p90_km", 0.4, False),
        ("last_geo_median_km", 0.2, False),
    ):
        v = table[col]
        norm = (v - v.min()) / (v.max() - v.min())
        score += w * (norm if higher else 1 - norm)
    table["score"] = score
    table = table.sort_values("score", ascending=False)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "naive.csv", index=False)
    table.astype(str).to_parquet(out / "naive.parquet", index=False)
    return table


def timed(fn: Any, *args: Any) -> tuple[float, Any]:
    start = time.perf_counter()
    value = fn(*args)
    return time.perf_counter() - start, value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--naive-runs", type=int, default=1_000)
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_aggregate_"))
    try:
        warm, small, big = tmp / "warm", tmp / "small", tmp / "big"
        make_runs(warm, 20)
        aggregate_runs(warm)  # imports and caches out of the timings
        naive_aggregate(warm, warm / "_naive")
        make_runs(small, args.naive_runs)
        make_runs(big, args.runs)

        t_small, res_small = timed(aggregate_runs, small)
        t_naive, naive = timed(naive_aggregate, small, small / "_naive")
        t_big, res_big = timed(aggregate_runs, big)
        assert len(naive) == len(res_small.ranked), "naive and library rank different runs"

        print(
            f"{'method':<28} {'runs':>7} {'ranked':>7} {'skipped':>8} {'seconds':>8} {'runs/s':>9}"
        )
        rows = [
            ("naive (concat per run)", args.naive_runs, len(naive), "-", t_naive),
            (
                "aggregate_runs",
                args.naive_runs,
                len(res_small.ranked),
                len(res_small.skipped),
                t_small,
            ),
            ("aggregate_runs", args.runs, len(res_big.ranked), len(res_big.skipped), t_big),
        ]
        for name, n, ranked, skipped, t in rows:
            print(f"{name:<28} {n:>7} {ranked:>7} {skipped!s:>8} {t:>8.2f} {n / t:>9.0f}")
        ratio = t_naive / t_small
        print(f"\nspeed-up over the naive reference at {args.naive_runs} runs: {ratio:.1f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
