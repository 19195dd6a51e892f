"""`python -m benchmarks scale`: the whole pipeline at N images as one table (issue 28).

A reader relies on one row per stage with its time, memory and bytes, on the test metrics beside
the image-blind baselines, and on a killed benchmark picking up at the stage it was in.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import bench_scale as bs


def _bench(work: Path, repo_root: Path, *extra: str, env: dict[str, str] | None = None):
    cmd = [sys.executable, "-m", "benchmarks", "scale", "--n", "300", "--epochs", "1",
           "--min-per-class", "1", "--work", str(work), *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=repo_root, capture_output=True, text=True, timeout=1800,
                          env={**os.environ, **(env or {})})  # fmt: skip


def _rows(work: Path) -> dict[str, bs.Row]:
    b = bs.Bench(work, bs.parse(["--n", "300"]))
    return {s: b.load(s) for s in bs.STAGES}


def _metric_row(table: str, name: str) -> list[str]:
    row = next(line for line in table.splitlines() if line.startswith(f"| {name}"))
    return [cell.strip() for cell in row.split("|")[2:-1]]  # top-1, top-5, median, P90


def test_killed_benchmark_resumes_at_the_stage_it_was_in(tmp_path: Path, repo_root: Path) -> None:
    """Data stages only (the default suite's budget); the whole pipeline is the slow test."""
    work, stages = tmp_path / "scale", ("--stages", "synth,ingest,index")
    killed = _bench(work, repo_root, *stages, env={bs.KILL_ENV: "index"})
    assert killed.returncode in (-9, 256 - 9), killed.stderr[-2000:]  # SIGKILL, via the runner
    rows = _rows(work)
    assert rows["synth"].status == "ok" and rows["ingest"].status == "ok"
    assert rows["index"].status == "running"  # the kill left it mid-stage

    done = _bench(work, repo_root, *stages)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    rows = _rows(work)
    assert rows["synth"].attempts == 1 and rows["ingest"].attempts == 1  # not redone
    assert rows["index"].status == "ok" and rows["index"].attempts == 2
    assert "resumed" in rows["index"].note
    assert rows["train"].status == "pending"  # not asked for
    table = (work / "table.md").read_text()
    assert table in done.stdout  # printed as well as written
    lines = table.splitlines()
    for stage in ("synth", "ingest", "index"):
        row = next(line for line in lines if line.startswith(f"| {stage} |"))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        wall, peak = (float(c.replace(",", "")) for c in cells[2:4])
        assert cells[1].startswith("ok") and wall > 0 and peak > 0
        assert float(cells[6].replace(",", "")) > 0  # data MB
    assert "resumed after a kill" in table
    for name in ("prior: most frequent train cell", "prior: geographic median of train"):
        top1, _, median, p90 = _metric_row(table, name)
        assert 0 <= float(median.replace(",", "")) <= float(p90.replace(",", "")) <= 20_038


@pytest.mark.slow
def test_whole_pipeline_table_has_every_stage_and_the_model_beside_the_baselines(
    tmp_path: Path, repo_root: Path
) -> None:
    work = tmp_path / "scale"
    done = _bench(work, repo_root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    rows = _rows(work)
    assert all(r.status == "ok" and r.seconds > 0 and r.peak_mb > 0 for r in rows.values())
    assert rows["train"].run_mb > 0 and rows["mlflow"].mlflow_mb > 0
    table = (work / "table.md").read_text()
    for stage in bs.STAGES:
        assert sum(line.startswith(f"| {stage} | ok") for line in table.splitlines()) == 1
    top1, _, median, _ = _metric_row(table, "model after rerank")
    assert top1.endswith("%") and float(median.replace(",", "")) >= 0
    assert _metric_row(table, "model before rerank")[1].endswith("%")  # top-5
    assert (work / "predictions.csv").is_file()


def test_a_stage_past_its_time_limit_is_recorded_and_its_dependants_skipped(
    tmp_path: Path,
) -> None:
    args = bs.parse(["--n", "10", "--stage-timeout", "1"])
    b = bs.Bench(tmp_path / "w", args)
    row = bs.Row("synth")
    status = bs.measure([sys.executable, "-c", "import time; time.sleep(60)"], b, row,
                        tmp_path / "log.txt")  # fmt: skip
    assert status.startswith("timeout") and row.seconds < 30
    row.status = status
    b.save(row)
    ingest = bs.run_stage(b, "ingest")  # needs synth: recorded, not run
    assert ingest.status.startswith("skipped (synth timeout")
    assert ingest.attempts == 0


def test_geographic_median_is_the_point_of_least_total_distance() -> None:
    import numpy as np

    from geoloc.geo import haversine_km

    lat = np.array([10.0, 10.0, 10.0, 50.0, -30.0])
    lon = np.array([20.0, 20.0, 20.0, 100.0, -60.0])
    m_lat, m_lon = bs._geographic_median(lat, lon)
    total = haversine_km(lat, lon, np.full(5, m_lat), np.full(5, m_lon)).sum()
    for d_lat, d_lon in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        moved = haversine_km(lat, lon, np.full(5, m_lat + d_lat), np.full(5, m_lon + d_lon))
        assert total <= moved.sum()
    assert abs(m_lat - 10.0) < 0.5 and abs(m_lon - 20.0) < 0.5  # the majority point wins


@pytest.mark.parametrize("present", [False, True])
def test_doc_section_for_n_is_replaced_not_duplicated(tmp_path: Path, present: bool) -> None:
    doc = tmp_path / "scale.md"
    doc.write_text("# Scale\n\nintro\n\n### N = 10\n\nold\n\n### N = 20\n\nkeep\n" if present
                   else "# Scale\n")  # fmt: skip
    bs.write_doc(doc, 10, "new table\n")
    text = doc.read_text()
    assert text.count("### N = 10") == 1 and "new table" in text and "old" not in text
    assert ("keep" in text) == present


def test_doc_section_ends_at_the_next_heading_of_any_higher_level(tmp_path: Path) -> None:
    doc = tmp_path / "scale.md"
    doc.write_text("# Scale\n\n### N = 10\n\nold\n\n## Post-training stages\n\nkeep\n")
    bs.write_doc(doc, 10, "new table\n")
    text = doc.read_text()
    assert "old" not in text and "## Post-training stages\n\nkeep" in text
