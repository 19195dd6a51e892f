"""Atomic writes: a kill mid-write leaves the old file intact; its temp file is cleaned later."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd

from geoloc.atomic import is_stale_temp, sweep_stale_temps, temp_path, write_json
from geoloc.config import IndexConfig
from geoloc.data.ingest import ingest
from geoloc.paths import DataPaths


def _killed_while_writing(target: Path) -> Path:
    """Run a process that dies by SIGKILL halfway through an atomic write of `target`."""
    code = textwrap.dedent(f"""
        import os, signal
        from geoloc.atomic import atomic_path
        with atomic_path({str(target)!r}) as tmp:
            tmp.write_bytes(b"half a file")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == -9, done.stderr
    (left,) = target.parent.glob(f".{target.name}.*.tmp")
    return left


def _write_in_a_new_process(target: Path) -> None:
    code = f"from geoloc.atomic import write_json; write_json({str(target)!r}, {{}})"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_kill_mid_write_keeps_the_old_file_and_the_next_write_sweeps_its_temp(
    tmp_path: Path,
) -> None:
    target = tmp_path / "out" / "summary.json"
    write_json(target, {"ok": True})
    left = _killed_while_writing(target)
    assert target.read_text() == '{\n  "ok": true\n}\n'  # the good file survived the kill
    assert is_stale_temp(left)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = temp_path(target).with_name(
            left.name.replace(left.name.split("-")[-2], str(live.pid))
        )
        busy.write_bytes(b"a live writer's temp")
        foreign = target.parent / ".notes.tmp"  # not ours: never touched
        foreign.write_bytes(b"x")
        _write_in_a_new_process(target.parent / "other.json")  # the next run writes there
        assert not left.exists(), "the dead writer's temp is removed"
        assert busy.exists() and foreign.exists()
    finally:
        live.kill()
        live.wait()
    assert sweep_stale_temps(target.parent) == 1 and not busy.exists()


def test_a_rerun_ingest_removes_temp_files_a_killed_one_left(tmp_path: Path, write_image) -> None:
    for i in range(3):
        write_image(tmp_path / "in" / f"{i}.jpg", 10 + i, 20, seed=i)
    paths = DataPaths(tmp_path / "data")
    cfg = IndexConfig(workers=1, max_side=64)
    first = ingest(str(tmp_path / "in"), paths, cfg)
    journal = next((paths.state / "ingest").iterdir())
    left = [
        _killed_while_writing(paths.processed / "ab" / "cd.jpg"),
        _killed_while_writing(journal / "part-000001.parquet"),
    ]
    again = ingest(str(tmp_path / "in"), paths, cfg)
    assert not any(p.exists() for p in left)
    assert (again.read, again.accepted) == (first.read, first.accepted) == (3, 3)
    assert len(pd.read_parquet(paths.processed_manifest)) == 3
    assert not list(paths.root.rglob("*.tmp"))
    assert os.listdir(paths.processed / "ab") == []
