"""What a user sees while work runs: epoch lines in the CLI, bars or log lines (never both)."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

from geoloc.cli import main
from geoloc.progress import PROGRESS_LOGGER, format_duration, track

BAR = re.compile(r"\d+%\|")  # how a tqdm bar looks in a stream

EPOCH_LINE = re.compile(
    r"^epoch (\d+)/(\d+): loss [\d.]+, val top-1 [\d.]+%, median [\d,.]+ km, "
    r"P90 [\d,.]+ km, [\d.]+ s, (ETA .+|done)$"
)


def test_log_mode_reports_in_lines_and_draws_no_bar(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger=PROGRESS_LOGGER)
    items = list(track(range(7), desc="decode train", unit="img", bars=False, interval_s=0))
    assert items == list(range(7))
    lines = [r.getMessage() for r in caplog.records if r.name == PROGRESS_LOGGER]
    assert lines[0].startswith("decode train: 1/7 img (14%)")
    assert "ETA" in lines[0]
    assert re.fullmatch(r"decode train: 7 img in \d+\.\d s", lines[-1])
    assert not BAR.search(capfd.readouterr().err)


def test_bar_mode_draws_a_bar_and_logs_nothing(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.INFO, logger=PROGRESS_LOGGER)
    assert list(track(range(3), desc="embed val", bars=True, leave=True)) == [0, 1, 2]
    assert BAR.search(capfd.readouterr().err)
    assert not [r for r in caplog.records if r.name == PROGRESS_LOGGER]


def test_durations_read_like_a_clock() -> None:
    assert [format_duration(s) for s in (8.24, 185, 3720, None)] == [
        "8.2 s",
        "3 min 05 s",
        "1 h 02 min",
        "?",
    ]


@pytest.mark.usefixtures("demo_data")
def test_cli_train_prints_one_line_per_epoch_at_the_default_log_level(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GEOLOC_LOG_LEVEL", raising=False)
    args = ["train", "--config", "demo"]
    for kv in ("train.epochs=2", "train.batch_size=32", "train.image_size=32",
               "model.arch=multiscale_cnn", "model.width=8", "model.depth=3", "model.embed_dim=32",
               "rerank.enabled=false",
               "tracking.enabled=false"):  # fmt: skip
        args += ["--set", kv]
    assert main(args) == 0
    out, err = capsys.readouterr()
    run_dir = Path(out.strip().splitlines()[-1])
    epochs = [m.groups()[:2] for m in map(EPOCH_LINE.match, err.splitlines()) if m]
    assert epochs == [("1", "2"), ("2", "2")], err
    assert f"run {run_dir.name}: " in err  # which run, before the first epoch
    assert re.search(rf"run {run_dir.name}: test top-1 [\d.]+%, median [\d,.]+ km", err)
    assert "INFO" not in err  # progress lines, not the other INFO logs


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_sleep_unless_the_user_says_otherwise(
    given: str | None, expected: str
) -> None:
    """Spinning OpenMP threads made epochs ~14-40x slower on a busy 2-core machine."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    # set on `import geoloc`, before torch loads the OpenMP runtime (which reads it once)
    code = "import geoloc, os, sys; print(os.environ['OMP_WAIT_POLICY'], 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == [expected, "False"], out.stderr
