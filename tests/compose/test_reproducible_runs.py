"""Two copies of the code in two folders, each running the demo chain on two threads, give the
same numbers bit for bit: metrics.csv, predictions and the rerank variant chosen on val.

Each copy builds its own demo data (same seed) under its own folder, trains the `demo` preset
(factorised head, sparse GeoSoft) with two torch threads, reranks and reports through the
composer, as `make demo` does. The suite's other tests run on one thread (conftest), where the
variation this guards against never showed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

DEMO_CHAIN = """
import sys
from geoloc.compose.training import run_training
from geoloc.config import IndexConfig, load_config
from geoloc.data.demo import make_demo
from geoloc.data.index import build_index
from geoloc.data.ingest import ingest
from geoloc.paths import DataPaths

paths = DataPaths.default()
n_images, epochs, index_preset = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if index_preset == "demo":
    index_cfg = load_config("demo", model=IndexConfig)
else:  # tests/fixtures/demo_data.py's tiny index: r1 classes under r0 parents
    index_cfg = IndexConfig(resolution=1, parent_resolution=0, split="geographic",
                            split_resolution=2, min_images_per_class=5, max_side=64, workers=1)
make_demo(paths.demo, n=n_images, seed=0, min_population=200_000 if n_images < 2000 else 15000)
ingest("demo", paths, index_cfg)
build_index(paths, index_cfg)
cfg = load_config("demo", ["epochs=" + epochs, "tracking.enabled=false"])
print(run_training(cfg, progress=False))
"""


def _start_copy(
    repo_root: Path, folder: Path, n_images: int, epochs: int, index_preset: str
) -> subprocess.Popen:
    """Copy the package into `folder` and run the reduced demo chain there, on two threads."""
    code = folder / "code"
    shutil.copytree(repo_root / "geoloc", code / "geoloc",
                    ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    env = {
        **os.environ,
        "PYTHONPATH": str(code),
        "GEOLOC_DATA_DIR": str(folder / "data"),
        "GEOLOC_RUNS_DIR": str(folder / "runs"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}",
        "OMP_NUM_THREADS": "2",
    }
    return subprocess.Popen(
        [sys.executable, "-c", DEMO_CHAIN, str(n_images), str(epochs), index_preset],
        cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _run_twice(
    repo_root: Path, tmp_path: Path, n_images: int, epochs: int, index_preset: str = "tiny"
) -> list[Path]:
    folders = [tmp_path / "first", tmp_path / "second" / "elsewhere"]
    procs = [_start_copy(repo_root, f, n_images, epochs, index_preset) for f in folders]
    run_dirs = []
    for proc in procs:
        out, err = proc.communicate(timeout=1800)
        assert proc.returncode == 0, err[-3000:]
        run_dirs.append(Path(out.strip().splitlines()[-1]))
    return run_dirs


def _assert_same_numbers(a: Path, b: Path) -> None:
    metrics = [pd.read_csv(d / "artifacts" / "tables" / "metrics.csv") for d in (a, b)]
    assert len(metrics[0]) > 0
    pd.testing.assert_frame_equal(*(m.drop(columns="epoch_time_s") for m in metrics),
                                  check_exact=True)  # fmt: skip
    for name in ("val_predictions.parquet", "test_predictions.parquet",
                 "rerank_test_predictions.parquet"):  # fmt: skip
        frames = [pd.read_parquet(d / "artifacts" / "data" / name) for d in (a, b)]
        pd.testing.assert_frame_equal(*frames, check_exact=True, obj=name)
    evals = [pd.read_csv(d / "artifacts" / "tables" / "rerank_eval.csv") for d in (a, b)]
    pd.testing.assert_frame_equal(*evals, check_exact=True)
    summaries = [json.loads((d / "summary.json").read_text()) for d in (a, b)]
    assert summaries[0]["rerank"] == summaries[1]["rerank"] and summaries[0]["rerank"]
    assert summaries[0]["dataset"]["fingerprint"] == summaries[1]["dataset"]["fingerprint"]
    assert summaries[0]["determinism"] == summaries[1]["determinism"]
    assert summaries[0]["determinism"]["threads"] == 2


def test_two_copies_of_the_reduced_demo_give_identical_numbers(
    repo_root: Path, tmp_path: Path
) -> None:
    _assert_same_numbers(*_run_twice(repo_root, tmp_path, n_images=600, epochs=2))


@pytest.mark.slow
def test_two_copies_of_the_full_demo_give_identical_numbers(
    repo_root: Path, tmp_path: Path
) -> None:
    """`make demo`'s sizes: 12,000 images, the preset's 12 epochs (~5 min per copy alone)."""
    _assert_same_numbers(*_run_twice(repo_root, tmp_path, n_images=12000, epochs=12,
                                      index_preset="demo"))  # fmt: skip
