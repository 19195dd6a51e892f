"""A run stopped during rerank resumes the rerank, never the training (issue 28, item 8)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from geoloc.atomic import file_sha256
from geoloc.compose.training import run_training
from geoloc.config import load_config
from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import read_summary


def _checkpoints(run_dir: Path) -> dict[str, str]:
    return {p.name: file_sha256(p) for p in sorted(RunPaths(run_dir).checkpoints.glob("*.pt"))}


def _copy(run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(run, run_dir)
    return run_dir


def test_resume_of_a_trained_run_reranks_without_training_again(
    trained_run: Path, reranked_run: Path, tmp_path: Path
) -> None:
    run_dir = _copy(trained_run, tmp_path)  # trained; its rerank never ran (or was lost)
    before, metrics = _checkpoints(run_dir), RunPaths(run_dir).metrics_csv.read_bytes()
    cfg = load_config(str(RunPaths(run_dir).config), {})
    assert run_training(cfg, resume=run_dir, progress=False) == run_dir
    assert _checkpoints(run_dir) == before, "no checkpoint was rewritten"
    assert RunPaths(run_dir).metrics_csv.read_bytes() == metrics, "no epoch ran again"
    assert read_summary(run_dir)["rerank"] == read_summary(reranked_run)["rerank"]
    pd.testing.assert_frame_equal(
        pd.read_csv(RunPaths(run_dir).rerank_eval), pd.read_csv(RunPaths(reranked_run).rerank_eval)
    )


@pytest.mark.slow  # two fresh interpreters and a real SIGKILL
def test_run_killed_mid_rerank_resumes_to_the_same_result(
    trained_run: Path, reranked_run: Path, tmp_path: Path
) -> None:
    run_dir = _copy(trained_run, tmp_path)
    before = _checkpoints(run_dir)
    code = "import sys; from geoloc.cli import run; sys.argv[0] = 'geoloc'; run()"
    cmd = [sys.executable, "-c", code, "train", "--resume", str(run_dir)]
    proc = subprocess.Popen(cmd, env=dict(os.environ), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    cached = RunPaths(run_dir).data / "outputs_train.npz"  # rerank's first cached pass
    deadline = time.monotonic() + 300
    while not cached.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert cached.is_file(), "rerank never started"
    if RunPaths(run_dir).rerank_eval.is_file():
        pytest.skip("the rerank finished before it could be killed")
    resumed = subprocess.run(cmd, env=dict(os.environ), capture_output=True, text=True,
                             timeout=600, check=False)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming at rerank" in resumed.stderr + resumed.stdout
    assert _checkpoints(run_dir) == before
    pd.testing.assert_frame_equal(
        pd.read_csv(RunPaths(run_dir).rerank_eval), pd.read_csv(RunPaths(reranked_run).rerank_eval)
    )
