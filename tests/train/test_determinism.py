"""Same inputs, same numbers: kernels, the record a rerun needs, and warnings when it differs.

The suite runs torch on one thread (conftest); the run-to-run variation these tests guard
against only shows with several, so each test that trains or back-propagates sets two.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from geoloc.compute import determinism_settings
from geoloc.config import load_config
from geoloc.geo import LabelSpace
from geoloc.model.heads import FactorisedHead
from geoloc.presentation.leaderboard import aggregate_runs
from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import library_versions, new_summary, read_summary, write_summary
from geoloc.train.records import start_summary


@pytest.fixture
def two_threads() -> None:
    torch.set_num_threads(2)  # conftest's `one_torch_thread` restores the count afterwards


def _child_weight_grad(head: FactorisedHead, h: torch.Tensor, parents: torch.Tensor) -> bytes:
    head.zero_grad(set_to_none=True)
    z = head.child_logits(h, parents)
    z.masked_fill(torch.isinf(z), 0.0).pow(2).sum().backward()
    return head.child_weight.grad.numpy().tobytes() + head.child_bias.grad.numpy().tobytes()


def test_factorised_head_gradients_are_bit_identical_on_two_threads(two_threads: None) -> None:
    """The demo preset's head: samples sharing a parent add into one child table. Gathered by
    advanced indexing, two threads summed them in a varying order (193 of 199 repeats differed
    from the first in the last digits); every repeat must give the same bytes."""
    gen = torch.Generator().manual_seed(0)
    parent_of = np.repeat(np.arange(20), 12)  # 20 parents x 12 children
    head = FactorisedHead(128, parent_of, 20)
    h = torch.randn(64, 128, generator=gen)
    parents = torch.randint(0, 4, (64, 1), generator=gen)  # most samples share a parent
    first = _child_weight_grad(head, h, parents)
    assert all(_child_weight_grad(head, h, parents) == first for _ in range(60))


ONE_CLASS = LabelSpace.from_dict(
    {"version": 1, "resolution": 1, "parent_resolution": 0, "fingerprint": "f",
     "classes": [{"index": 0, "cell": "81003ffffffffff", "parent": "8001fffffffffff",
                  "parent_index": 0, "lat": 0.0, "lon": 0.0}],
     "parents": [{"index": 0, "cell": "8001fffffffffff", "lat": 0.0, "lon": 0.0}]}
)  # fmt: skip


def test_summary_records_what_a_rerun_needs(tmp_path: Path, two_threads: None) -> None:
    cfg = load_config("demo", {"seed": 7})
    paths = RunPaths(tmp_path / "run").make()
    start_summary(paths, cfg, ONE_CLASS, resumed=False)
    summary = read_summary(paths.root)  # validated against the schema on read and write
    code, det = summary["code"], summary["determinism"]
    assert set(code) >= {"git_commit", "git_dirty", "libraries"}
    assert code["libraries"]["torch"].split("+")[0] == torch.__version__.split("+")[0]
    assert code["libraries"]["numpy"] == np.__version__ and code["libraries"]["pillow"]
    assert det["threads"] == 2 and det["seed"] == 7 and det["world_size"] == 1
    assert det["deterministic"] is True and det["cudnn_benchmark"] is False
    assert det["cpu"] and det["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert det == determinism_settings(cfg)


def _finished_run(
    root: Path, name: str, torch_version: str, threads: int, cpu_capability: str = "AVX2"
) -> None:
    summary = new_summary(name, name)
    summary.update(status="completed", best_val_acc=0.5, best_p90_km=100.0,
                   last_geo_median_km=10.0, epochs_completed=1)  # fmt: skip
    summary["code"]["libraries"] = {**library_versions(), "torch": torch_version}
    summary["determinism"] = {"threads": threads, "world_size": 1, "cpu_capability": cpu_capability}
    (root / name).mkdir(parents=True)
    write_summary(root / name, summary)


def test_ranking_runs_of_other_library_versions_warns_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runs = tmp_path / "runs"
    _finished_run(runs, "a", "2.14.1", 2)
    _finished_run(runs, "b", "2.14.1", 2)
    with caplog.at_level(logging.WARNING, logger="geoloc.presentation.leaderboard"):
        aggregate_runs(runs, write=False)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    _finished_run(runs, "c", "2.15.0", 1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="geoloc.presentation.leaderboard"):
        result = aggregate_runs(runs, write=False)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert "torch 2.14.1 vs 2.15.0 (run c)" in warnings[0] and "threads 2 vs 1" in warnings[0]
    assert len(result.ranked) == 3  # a warning, not a failure


def test_ranking_runs_made_on_other_cpu_kernels_warns(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Same code, data and threads on a CPU of another instruction set differ in the last
    digits (measured: a demo seed 122.9 vs 118.4 km): the leaderboard says so."""
    runs = tmp_path / "runs"
    _finished_run(runs, "a", "2.14.1", 2, "AVX2")
    _finished_run(runs, "b", "2.14.1", 2, "AVX512")
    with caplog.at_level(logging.WARNING, logger="geoloc.presentation.leaderboard"):
        aggregate_runs(runs, write=False)
    [warning] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "CPU kernels AVX2 vs AVX512 (run b)" in warning


def test_resuming_under_another_thread_count_warns_in_one_line(
    tmp_path: Path, two_threads: None, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = load_config("demo")
    paths = RunPaths(tmp_path / "run").make()
    start_summary(paths, cfg, ONE_CLASS, resumed=False)
    with caplog.at_level(logging.WARNING, logger="geoloc.train.records"):
        start_summary(paths, cfg, ONE_CLASS, resumed=True)  # same settings: silent
        assert not caplog.records
        torch.set_num_threads(1)
        start_summary(paths, cfg, ONE_CLASS, resumed=True)
    [record] = caplog.records
    assert "threads 2 -> 1" in record.getMessage() and "\n" not in record.getMessage()
    assert read_summary(paths.root)["determinism"]["threads"] == 1  # what the rest ran under
