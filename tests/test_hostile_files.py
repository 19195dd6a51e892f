"""Hostile files and names: a checkpoint or array file that is not geoloc's (a pickle bomb,
garbage, a stripped dict) is refused in one line and nothing in it runs; a run name that is a
path is refused before anything is written."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from geoloc.cli import main
from geoloc.errors import DataError, TrainingError
from geoloc.infer.arrays import read_npz
from geoloc.paths import DataPaths
from geoloc.train.checkpoint import load_checkpoint


class _Bomb:
    """Unpickling this runs a shell command (what a hostile .pt file would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _bad_run(root: Path, kind: str, index_dir: Path | None = None) -> tuple[Path, Path]:
    """A run folder whose checkpoints are `kind`; returns (run dir, marker a bomb would touch)."""
    marker = root / "pwned"
    ckpts = root / "run" / "checkpoints"
    ckpts.mkdir(parents=True)
    for name in ("best.pt", "last.pt"):
        if kind == "pickle":
            torch.save({"version": 1, "model": _Bomb(marker)}, ckpts / name)
        elif kind == "garbage":
            (ckpts / name).write_bytes(b"\x80\x04garbage" * 10)
        else:  # a real torch file that lacks what a checkpoint carries
            torch.save({"version": 1, "model": {}}, ckpts / name)
    cfg = {"name": "hostile", "index_dir": str(index_dir) if index_dir else None}
    (root / "run" / "config.json").write_text(json.dumps(cfg))
    return root / "run", marker


def _geoloc(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "geoloc", *args], capture_output=True, text=True, timeout=120
    )


def _one_error_line(stderr: str) -> str:
    """The command's single `error:` line, checked to be its last word and not a traceback."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], stderr
    assert "Traceback" not in stderr and "weights_only" not in stderr, stderr
    return errors[0]


@pytest.mark.parametrize("kind", ["pickle", "garbage", "stripped"])
def test_load_checkpoint_refuses_in_one_line_and_runs_nothing(tmp_path: Path, kind: str) -> None:
    run, marker = _bad_run(tmp_path, kind)
    with pytest.raises(TrainingError) as err:
        load_checkpoint(run / "checkpoints" / "best.pt")
    message = str(err.value)
    assert "\n" not in message and "best.pt" in message
    assert "weights_only=False" not in message  # never advise running the file's code
    assert not marker.exists()


def test_predict_on_a_pickle_bomb_run_prints_one_error_line(tmp_path: Path) -> None:
    run, marker = _bad_run(tmp_path, "pickle")
    (tmp_path / "photo.jpg").write_bytes(b"x")
    done = _geoloc("predict", "--run", str(run), str(tmp_path / "photo.jpg"))
    assert done.returncode == 1
    line = _one_error_line(done.stderr)
    assert line.startswith(f"error: checkpoint '{run / 'checkpoints' / 'best.pt'}' is refused")
    assert "GLOBAL posix.system" in line and not marker.exists()


def test_resume_from_a_pickle_bomb_prints_one_error_line(
    demo_index: DataPaths, tmp_path: Path
) -> None:
    run, marker = _bad_run(tmp_path, "pickle", demo_index.index)
    done = _geoloc("train", "--resume", str(run))
    assert done.returncode == 1
    line = _one_error_line(done.stderr)
    assert line.startswith(f"error: checkpoint '{run / 'checkpoints' / 'last.pt'}' is refused")
    assert not marker.exists()


def test_an_npz_holding_pickled_objects_is_refused_without_running_them(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bomb = np.empty(1, dtype=object)
    bomb[0] = _Bomb(marker)
    np.savez(tmp_path / "gallery.npz", version=np.int64(1), embeddings=bomb)
    with pytest.raises(DataError, match=r"gallery '.*gallery\.npz' could not be read"):
        read_npz(tmp_path / "gallery.npz", 1, "gallery")
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../../escape", "a/b", ".hidden", "..\\up"])
def test_a_run_name_that_is_a_path_is_refused_before_any_write(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = sorted(p.name for p in Path.cwd().iterdir())
    assert main(["train", "--set", f"name={name}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "name" in err and "\n" not in err
    assert sorted(p.name for p in Path.cwd().iterdir()) == before  # no runs/ folder, nothing
