"""`geoloc data demo`, `geoloc data ingest`, `geoloc index build` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from geoloc.cli import main
from geoloc.paths import DataPaths

SMALL = ["--set", "resolution=1", "--set", "parent_resolution=0", "--set", "split_resolution=2"]


def test_demo_ingest_build_from_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "demo", "--n", "120", "--min-population", "500000"]) == 0
    assert "120 images" in capsys.readouterr().out
    assert main(["data", "ingest", "demo", "--config", "demo", "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "read 120 = accepted" in out
    cmd = ["index", "build", "--config", "demo", *SMALL, "--set", "min_images_per_class=2"]
    assert main(cmd) == 0
    out = capsys.readouterr().out
    paths = DataPaths.default()
    labels = json.loads(paths.labels.read_text())
    assert f"{len(labels['classes'])} classes" in out and labels["fingerprint"] in out
    manifest = pd.read_parquet(paths.processed_manifest)
    assert set(manifest["source"]) == {"demo"}
    assert manifest["source_ref"].str.startswith("raw/demo/demo_").all()


def test_ingest_prints_reject_counts(tmp_path: Path, write_image, capsys) -> None:
    write_image(tmp_path / "in" / "ok.jpg", 1.0, 2.0)
    write_image(tmp_path / "in" / "nogps.jpg")
    (tmp_path / "in" / "zero.jpg").write_bytes(b"")
    assert main(["data", "ingest", str(tmp_path / "in"), "--workers", "1"]) == 0
    out = capsys.readouterr().out
    assert "read 3 = accepted 1 + rejected 2 + duplicates 0" in out
    assert "rejected no_gps: 1" in out and "rejected empty_file: 1" in out


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["data", "ingest", "no/such/folder"], "folder 'no/such/folder' does not exist"),
        (["data", "ingest", "demo"], "run `geoloc data demo` first"),
        (["index", "build"], "no processed images"),
        (["index", "build", "--set", "bogus=1"], "unknown config key 'bogus'"),
    ],
)
def test_unusable_input_exits_1_with_one_line(argv, reason, capsys) -> None:
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and reason in err[-1]


def test_manifest_without_coordinates_exits_1(tmp_path: Path, capsys) -> None:
    (tmp_path / "m.csv").write_text("id,path\n1,a.jpg\n")
    assert main(["data", "ingest", str(tmp_path / "m.csv")]) == 1
    assert "has no coordinate columns" in capsys.readouterr().err


def test_source_options_reach_the_source(tmp_path: Path, write_image, capsys) -> None:
    write_image(tmp_path / "photos" / "a.jpg", seed=1)
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "m.csv").write_text("id,lat,lon,path\na,5,6,a.jpg\n")
    argv = ["data", "ingest", str(tmp_path / "lists" / "m.csv"), "--workers", "1"]
    assert main([*argv, "-o", f"base_dir={tmp_path / 'photos'}"]) == 0
    assert "accepted 1" in capsys.readouterr().out
