"""`python -m benchmarks figures` (`make figures`): the numbers README and docs quote are
produced, not typed (issue 27, item 4).

A reader relies on each quoted block holding exactly what the runs recorded (mean ± std over
seeds), stamped with where it came from, and on the rest of the page staying as written; whoever
reruns it after a crash relies on finished seeds not training again.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import figures
from geoloc.errors import GeolocError

BEFORE, AFTER = "# Title\n\nText a person wrote.\n\n", "\n\nMore text, kept as is.\n"


def _page(names: list[str]) -> str:
    blocks = ["\n".join(figures.markers(n)) for n in names]
    return BEFORE + "\n\nbetween\n\n".join(blocks) + AFTER


def _docs_root(root: Path) -> dict[Path, str]:
    pages: dict[Path, list[str]] = {}
    for name, files in figures.BLOCKS.items():
        for rel in files:
            pages.setdefault(root / rel, []).append(name)
    texts = {}
    for path, names in pages.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        texts[path] = _page(names)
        path.write_text(texts[path])
    return texts


def _figures(
    tmp_path: Path, repo_root: Path, docs: Path, *extra: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "GEOLOC_DATA_DIR": str(tmp_path / "data"),
           "GEOLOC_RUNS_DIR": str(tmp_path / "runs")}  # fmt: skip
    cmd = [sys.executable, "-m", "benchmarks", "figures", "--quick", "--seeds", "0", "1",
           "--docs", str(docs), *extra]  # fmt: skip
    return subprocess.run(cmd, cwd=repo_root, env=env, capture_output=True, text=True,
                          timeout=1200)  # fmt: skip


def _block(text: str, name: str) -> str:
    begin, end = figures.markers(name)
    return text[text.index(begin) + len(begin) : text.index(end)]


def _at(root: Path, files: tuple[str, ...]) -> list[Path]:
    return [root / rel for rel in files]


def _outside(text: str, names: list[str]) -> str:
    """`text` with every block's body cut out (its markers kept)."""
    for name in names:
        text = text.replace(_block(text, name), "\n")
    return text


def _row(block: str, label: str) -> list[str]:
    line = next(x for x in block.splitlines() if x.startswith(f"| {label} |"))
    return [cell.strip() for cell in line.split("|")[2:-1]]


def test_figures_rewrite_their_blocks_from_the_runs_and_reuse_finished_seeds(
    tmp_path: Path, repo_root: Path
) -> None:
    docs = tmp_path / "docs_root"
    before = _docs_root(docs)
    done = _figures(tmp_path, repo_root, docs)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = [tmp_path / "runs" / f"figures-quick-seed{s}" for s in (0, 1)]
    summaries = [json.loads((r / "summary.json").read_text()) for r in runs]
    for path, old in before.items():
        names = [n for n, files in figures.BLOCKS.items() if path in _at(docs, files)]
        new = path.read_text()
        assert _outside(new, names) == _outside(old, names)  # outside the markers: untouched
        for name in names:
            block = _block(new, name)
            assert "`make figures`" in block and "(dirty: " in block and "seeds 0, 1" in block
            commit = summaries[0]["code"]["git_commit"]
            assert commit is None or commit[:10] in block
    quality = _block((docs / "docs/quality.md").read_text(), "demo-quality")
    # every number is the mean ± std of what the runs' summaries recorded after rerank
    for key, label, digits in figures.METRICS[:5]:
        xs = [s["rerank"]["metrics"][key] for s in summaries]
        mean, std = statistics.fmean(xs), statistics.stdev(xs)
        assert _row(quality, label)[1] == f"{mean:,.{digits}f} ± {std:,.{digits}f}"
        assert _row(quality, label)[3] == f"{min(xs):,.{digits}f}-{max(xs):,.{digits}f}"
        alone = [s["test"][f"test_{key}"] for s in summaries]  # the model alone, on test
        mean, std = statistics.fmean(alone), statistics.stdev(alone)
        assert _row(quality, label)[0] == f"{mean:,.{digits}f} ± {std:,.{digits}f}"
    for s, summary in zip((0, 1), summaries, strict=True):
        assert _row(quality, str(s))[0] == summary["rerank"]["variant"]
    # a rerun (after a crash, or to render again) trains nothing that is already there
    stamps = [(r / "checkpoints" / "best.pt").stat().st_mtime_ns for r in runs]
    again = _figures(tmp_path, repo_root, docs)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stderr.count("reusing") == 2
    assert [(r / "checkpoints" / "best.pt").stat().st_mtime_ns for r in runs] == stamps
    # post-hoc code changed: --rerank reranks each trained seed again, retraining nothing
    reranked = _figures(tmp_path, repo_root, docs, "--rerank")
    assert reranked.returncode == 0, reranked.stderr[-3000:]
    assert reranked.stderr.count("(rerank)") == 2 and "reusing" not in reranked.stderr
    assert [(r / "checkpoints" / "best.pt").stat().st_mtime_ns for r in runs] == stamps
    assert "reranked at " in _block((docs / "docs/quality.md").read_text(), "demo-quality")


def _result(seed: int, median: float) -> figures.SeedResult:
    row = {key: median for key, _, _ in figures.METRICS}
    rows = {column: row for column in figures.COLUMNS}
    return figures.SeedResult(seed, Path("run"), "gated", rows, "abc", False, "2026-12-08", 2,
                              60.0, False, 471)  # fmt: skip


def test_a_page_without_its_markers_is_refused_and_no_page_is_written(tmp_path: Path) -> None:
    texts = _docs_root(tmp_path)
    (tmp_path / "docs/quality.md").write_text("someone deleted the markers\n")
    results = [_result(0, 40.0), _result(1, 50.0), _result(2, 60.0)]
    with pytest.raises(GeolocError, match="docs/quality.md: needs exactly one"):
        figures.rewrite_docs(tmp_path, results)
    for path, text in texts.items():  # checked before anything was written
        if path.name != "quality.md":
            assert path.read_text() == text
    _docs_root(tmp_path)
    figures.rewrite_docs(tmp_path, results)
    assert "50.0 ± 10.0 km after reranking" in (tmp_path / "README.md").read_text()


def test_the_repository_pages_hold_each_block_once(repo_root: Path) -> None:
    """`make figures` on this checkout finds every block it owns."""
    for name, files in figures.BLOCKS.items():
        for rel in files:
            text = (repo_root / rel).read_text()
            assert figures.replace_block(text, name, "x", where=rel) != ""


def test_malformed_markers_are_named(tmp_path: Path) -> None:
    text = BEFORE + "no markers here" + AFTER
    with pytest.raises(GeolocError, match="figures:demo-quality begin"):
        figures.replace_block(text, "demo-quality", "| new |", where="docs/quality.md")
    twice = _page(["make-demo", "make-demo"])
    with pytest.raises(GeolocError, match="exactly one"):
        figures.replace_block(twice, "make-demo", "body")
    page = _page(["make-demo"])
    once = figures.replace_block(page, "make-demo", "body one")
    assert figures.replace_block(once, "make-demo", "body one") == once  # idempotent
    assert once.startswith(BEFORE) and once.endswith(AFTER) and "body one" in once
