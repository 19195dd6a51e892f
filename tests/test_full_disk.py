"""A full disk is one `error:` line naming the folder and the bytes needed, never a traceback,
in every command that writes; nothing half-written replaces a good file, and a training run
that hits it still records `failed` with the reason (space for that is reserved up front).

The disk is real: a tmpfs of a few hundred KiB mounted for the test (root only; elsewhere these
tests skip with the reason)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fixtures.demo_data import DEMO_FIXTURE_CONFIG

from geoloc.atomic import write_bytes, write_json
from geoloc.cli import main
from geoloc.data.sources.archive import ArchiveOrder, ZipMember
from geoloc.errors import DiskFullError
from geoloc.paths import DATA_DIR_ENV, DataPaths

TINY_TRAINING = {"epochs": 1, "batch_size": 32, "image_size": 32,
        "arch": "multiscale_cnn", "width": 8, "depth": 3,
                 "embed_dim": 32, "rerank.enabled": False}  # fmt: skip


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Callable[[int], Path]]:
    """`make(size_bytes)` -> a folder on a fresh tmpfs of that size, unmounted afterwards."""
    mounts: list[Path] = []

    def make(size: int) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                              capture_output=True, text=True)  # fmt: skip
        if done.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()[:200]}")
        mounts.append(where)
        return where

    yield make
    for where in mounts:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(folder: Path, leave: int) -> None:
    """Fill `folder`'s disk until about `leave` bytes are free."""
    free = shutil.disk_usage(folder).free
    if free > leave:
        with open(folder / "filler", "wb") as fh:
            fh.write(b"\1" * (free - leave))


def one_error_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert lines and lines[-1].startswith("error: no space left in '"), err
    return lines[-1]


def test_an_atomic_write_on_a_full_disk_names_folder_and_bytes_and_keeps_the_old_file(
    small_disk: Callable[[int], Path],
) -> None:
    disk = small_disk(64 << 10)
    write_json(disk / "summary.json", {"status": "completed"})
    fill(disk, leave=0)
    with pytest.raises(DiskFullError) as caught:
        write_bytes(disk / "summary.json", b"x" * 100_000)
    message = str(caught.value)
    assert f"'{disk}'" in message and "100,000 bytes" in message and "summary.json" in message
    assert json.loads((disk / "summary.json").read_text()) == {"status": "completed"}
    assert sorted(p.name for p in disk.iterdir()) == ["filler", "summary.json"]  # no temp left


def test_ingest_onto_a_full_disk_is_one_error_line(
    small_disk: Callable[[int], Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from geoloc.data.demo import make_demo

    photos = tmp_path / "photos"
    make_demo(photos, n=60, seed=0, min_population=200_000)
    disk = small_disk(128 << 10)
    monkeypatch.setenv(DATA_DIR_ENV, str(disk / "data"))
    assert main(["data", "ingest", str(photos), "--workers", "1"]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(disk) in line and "bytes" in line


def test_index_build_on_a_full_disk_is_one_error_line(
    small_disk: Callable[[int], Path], demo_index: DataPaths, monkeypatch, capsys
) -> None:
    size = sum(p.stat().st_size for p in demo_index.root.rglob("*") if p.is_file())
    disk = small_disk(size * 2 + (4 << 20))
    root = disk / "data"
    shutil.copytree(demo_index.root, root)
    shutil.rmtree(root / "index")
    before = sorted(p.name for p in root.iterdir())
    fill(disk, leave=16 << 10)
    monkeypatch.setenv(DATA_DIR_ENV, str(root))
    sets = [a for k, v in DEMO_FIXTURE_CONFIG.items() for a in ("--set", f"{k}={v}")]
    assert main(["index", "build", *sets]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(disk) in line
    assert sorted(p.name for p in root.iterdir() if p.name != "index") == [
        n for n in before if n != "index"
    ]


def test_training_that_fills_the_disk_ends_failed_with_the_reason(
    small_disk: Callable[[int], Path], demo_data: DataPaths, monkeypatch, capsys
) -> None:
    disk = small_disk(4 << 20)
    monkeypatch.setenv("GEOLOC_RUNS_DIR", str(disk / "runs"))
    (disk / "runs").mkdir()
    fill(disk, leave=(256 << 10) + (48 << 10))  # the reserve + the run's small files
    args = [a for k, v in {**TINY_TRAINING, "name": "full"}.items()
            for a in ("--set", f"{k}={str(v).lower() if isinstance(v, bool) else v}")]  # fmt: skip
    assert main(["train", *args]) == 1
    line = one_error_line(capsys.readouterr().err)
    assert str(disk / "runs") in line
    (run,) = (disk / "runs").iterdir()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert "no space left" in summary["failure_reason"]
    assert not os.path.exists(run / ".space-reserve")


def test_rerank_on_a_full_disk_is_one_error_line_and_the_run_records_it(
    small_disk: Callable[[int], Path], trained_run: Path, capsys
) -> None:
    size = sum(p.stat().st_size for p in trained_run.rglob("*") if p.is_file())
    disk = small_disk(size + (2 << 20))
    run_dir = disk / "runs" / trained_run.name
    shutil.copytree(trained_run, run_dir)
    best = (run_dir / "checkpoints" / "best.pt").read_bytes()
    fill(disk, leave=(256 << 10) + (24 << 10))  # the reserve + a little: rerank needs more
    for argv in (["rerank", str(run_dir)], ["train", "--resume", str(run_dir)]):
        assert main(argv) == 1, argv
        line = one_error_line(capsys.readouterr().err)
        assert str(run_dir) in line and "bytes" in line, line
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["status"] == "failed", argv
        assert summary["failure_reason"].startswith("evaluate-rerank: DiskFullError: no space")
        assert not os.path.exists(run_dir / ".space-reserve")
    assert (run_dir / "checkpoints" / "best.pt").read_bytes() == best  # never trained again

    (disk / "filler").unlink()  # space freed: the same command finishes the run
    assert main(["rerank", str(run_dir)]) == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["failure_reason"] is None
    assert summary["rerank"]["variant"]


def test_zipped_rows_put_aside_on_a_full_tmpdir_are_one_error_naming_it(
    small_disk: Callable[[int], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = small_disk(64 << 10)
    monkeypatch.setattr(tempfile, "tempdir", str(disk))  # TMPDIR
    monkeypatch.setattr(ArchiveOrder, "BUFFER", 10)
    fill(disk, leave=4096)
    order: ArchiveOrder[str] = ArchiveOrder()
    with pytest.raises(DiskFullError) as caught:
        for i in range(1000):  # OSV-5M rows whose images are in a zip, ~1 KB each pickled
            order.add(ZipMember(disk / "00.zip", f"{i}.jpg", i), "x" * 1000)
    assert f"no space left in '{disk}" in str(caught.value)
    assert sorted(p.name for p in disk.iterdir()) == ["filler"]  # its temporary folder is gone
