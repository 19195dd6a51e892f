"""The leaderboard: every run folder is ranked or listed as skipped with its reason."""

from __future__ import annotations

import html
import json
import math
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fixtures.fake_runs import fake_summary, write_summary_fast

from geoloc.cli import main
from geoloc.errors import ConfigError, GeolocError
from geoloc.paths import aggregate_dir, runs_dir
from geoloc.presentation.leaderboard import aggregate_runs
from geoloc.presentation.leaderboard_score import Penalties, ScoreWeights
from geoloc.presentation.leaderboard_table import COLUMNS
from geoloc.runfolder.summary import validate_summary

ALL_ARTIFACTS = {
    k: True
    for k in (
        "config",
        "checkpoint_best",
        "checkpoint_last",
        "metrics_csv",
        "val_predictions",
        "test_predictions",
        "plots",
        "report",
        "dashboard",
        "rerank_eval",
    )
}


def put_run(
    run_id: str,
    acc: float | None = 0.5,
    p90: float | None = 1000.0,
    median: float | None = 100.0,
    status: str = "completed",
    artifacts: dict[str, bool] | None = None,
    **fields: Any,
) -> Path:
    """A run folder holding only a valid summary.json with these headline numbers."""
    summary = fake_summary(run_id, run_id, status=status, artifacts=artifacts or ALL_ARTIFACTS)
    summary.update(best_val_acc=acc, best_p90_km=p90, last_geo_median_km=median, **fields)
    validate_summary(summary)
    write_summary_fast(runs_dir() / run_id, summary)
    return runs_dir() / run_id


def by_id(df: pd.DataFrame) -> dict[str, dict[str, Any]]:
    return {row["run_id"]: row for row in df.to_dict("records")}


def test_better_run_ranks_first_and_score_matches_the_documented_formula() -> None:
    put_run("good", acc=0.8, p90=500.0, median=20.0)
    put_run("mid", acc=0.5, p90=1500.0, median=60.0)
    put_run("bad", acc=0.2, p90=4000.0, median=300.0)
    result = aggregate_runs()
    assert list(result.ranked["run_id"]) == ["good", "mid", "bad"]
    assert list(result.ranked["rank"]) == [1, 2, 3]
    rows = by_id(result.ranked)
    mid = rows["mid"]

    def km(v: float) -> float:  # against the fixed reference: 1 at 0 km, 0 at half the Earth
        return 1 - math.log1p(v) / math.log1p(20037.5)

    n_acc, n_p90, n_med = 0.5, km(1500.0), km(60.0)
    assert (mid["norm_acc"], mid["norm_p90"], mid["norm_median"]) == pytest.approx(
        (n_acc, n_p90, n_med)
    )
    assert mid["score"] == pytest.approx(0.4 * n_acc + 0.4 * n_p90 + 0.2 * n_med)
    # a run keeps its score when others leave: two runs are not simply scored 1 and 0
    shutil.rmtree(runs_dir() / "bad")
    again = by_id(aggregate_runs().ranked)
    assert again["mid"]["score"] == pytest.approx(mid["score"])
    assert 0 < again["mid"]["score"] < again["good"]["score"] < 1


def test_weights_decide_between_accuracy_and_tail() -> None:
    put_run("accurate", acc=0.9, p90=3000.0, median=50.0)
    put_run("tail", acc=0.4, p90=300.0, median=50.0)
    acc_first = aggregate_runs(weights=ScoreWeights.parse("acc=1,p90=0,median=0"), write=False)
    p90_first = aggregate_runs(weights=ScoreWeights.parse("acc=0,p90=1,median=0"), write=False)
    assert acc_first.ranked["run_id"].iloc[0] == "accurate"
    assert p90_first.ranked["run_id"].iloc[0] == "tail"


def test_missing_artifacts_and_failure_cost_the_configured_penalty() -> None:
    put_run("whole")
    put_run("no_ckpt", artifacts={**ALL_ARTIFACTS, "checkpoint_best": False})
    put_run("crashed", status="failed", failure_reason="CUDA OOM")
    penalties = Penalties.parse("checkpoint_best=0.3,status.failed=0.5")
    rows = by_id(aggregate_runs(penalties=penalties).ranked)
    whole = rows["whole"]["score"]
    assert rows["no_ckpt"]["score"] == pytest.approx(whole - 0.3)
    assert rows["no_ckpt"]["missing_artifacts"] == "checkpoint_best"
    assert rows["crashed"]["score"] == pytest.approx(whole - 0.5)
    assert rows["crashed"]["failure_reason"] == "CUDA OOM"


def test_a_run_without_metrics_is_ranked_last_not_dropped() -> None:
    put_run("measured")
    put_run("pruned_early", acc=None, p90=None, median=None, status="pruned")
    result = aggregate_runs()
    assert list(result.ranked["run_id"]) == ["measured", "pruned_early"]
    assert result.ranked["score"].iloc[1] == pytest.approx(0.0)


def _write(path: Path, text: str) -> None:
    path.mkdir(parents=True)
    (path / "summary.json").write_text(text)


def test_unusable_runs_are_listed_as_skipped_with_the_reason_everywhere(
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = runs_dir()
    put_run("ok")
    put_run("live", status="running")
    _write(root / "corrupt", '{"schema_version": 1, "run_id": ')
    _write(root / "future", json.dumps({"schema_version": 2, "run_id": "future"}))
    _write(root / "invalid", json.dumps({"schema_version": 1, "run_id": "invalid"}))
    (root / "empty").mkdir()
    for not_a_run in ("_aggregate", "_sweeps", ".trash"):
        _write(root / not_a_run / "x", "{}")
    assert main(["aggregate"]) == 0
    out = capsys.readouterr().out
    expected = {
        "live": "still in progress",
        "corrupt": "corrupt JSON",
        "future": "unknown schema_version 2",
        "invalid": "does not match schema v1",
        "empty": "no summary.json",
    }
    for run_id, reason in expected.items():
        assert f"skipped {run_id}: " in out and reason in out
    csv = pd.read_csv(aggregate_dir() / "runs_summary.csv")
    parquet = pd.read_parquet(aggregate_dir() / "runs_summary.parquet")
    for table in (csv, parquet):
        assert set(table["run_id"]) == {"ok", *expected}
        skipped = table[table["skipped"]].set_index("run_id")["skip_reason"]
        for run_id, reason in expected.items():
            assert reason in skipped[run_id]
    page = (aggregate_dir() / "dashboard.html").read_text()
    for run_id, reason in expected.items():
        assert f"<td>{run_id}</td>" in page and html.escape(reason) in page


def test_csv_and_parquet_agree_and_keep_their_columns() -> None:
    put_run("a", acc=0.7)
    put_run("b", acc=0.3, p90=None)
    _write(runs_dir() / "broken", "nope")
    result = aggregate_runs()
    csv = pd.read_csv(result.csv_path)
    parquet = pd.read_parquet(result.parquet_path)
    assert list(csv.columns) == list(parquet.columns) == list(COLUMNS)
    assert list(parquet["run_id"]) == ["a", "b", "broken"]
    assert parquet["rank"].tolist()[:2] == [1, 2] and pd.isna(parquet["rank"].iloc[2])
    pd.testing.assert_series_equal(csv["score"], parquet["score"], check_dtype=False)


def test_no_runs_yet_gives_empty_outputs() -> None:
    runs_dir().mkdir(parents=True)
    result = aggregate_runs()
    assert result.ranked.empty and result.skipped == []
    assert list(pd.read_parquet(result.parquet_path).columns) == list(COLUMNS)


def test_missing_runs_folder_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(GeolocError, match="does not exist"):
        aggregate_runs(tmp_path / "nowhere")


@pytest.mark.parametrize(
    ("text", "match"),
    [("acc=x", "not of the form"), ("speed=1", "unknown name"), ("acc=-1", "acc")],
)
def test_bad_weights_are_refused_with_the_reason(text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ScoreWeights.parse(text)


def test_cli_bad_weights_exit_1(capsys: pytest.CaptureFixture[str]) -> None:
    runs_dir().mkdir(parents=True)
    assert main(["aggregate", "--weights", "acc=0,p90=0,median=0"]) == 1
    assert "at least one weight" in capsys.readouterr().err


def test_leaderboard_shows_run_ids_and_the_reranked_result() -> None:
    rerank = {"variant": "gated+refined", "metrics": {"median_km": 78.5, "p90_km": 463.2}}
    put_run("with-rerank", run_name="demo", rerank=rerank)
    put_run("without", run_name="demo")
    result = aggregate_runs()
    rows = by_id(pd.read_csv(result.csv_path))
    assert rows["with-rerank"]["rerank_variant"] == "gated+refined"
    assert (rows["with-rerank"]["rerank_median_km"], rows["with-rerank"]["rerank_p90_km"]) == (
        78.5,
        463.2,
    )
    assert pd.isna(rows["without"]["rerank_median_km"])
    page = (result.dashboard_path or Path()).read_text()
    # two runs of the same name are told apart by their ids
    assert "<code>with-rerank</code>" in page and "<code>without</code>" in page
    assert ">78.5 km<" in page and ">463 km<" in page and ">gated+refined<" in page


def test_strings_from_summaries_are_escaped_in_the_leaderboard() -> None:
    evil = "<script>window.__pwned=1</script>"
    put_run("evil", run_name=evil, failure_reason=evil)
    page = (aggregate_runs().dashboard_path or Path()).read_text()
    assert evil not in page and html.escape(evil) in page


def test_concurrent_aggregations_never_leave_a_torn_file() -> None:
    """Two writers and a reader at once: every read parses and holds every run."""
    for i in range(30):
        put_run(f"run{i:02d}", acc=i / 30)
    aggregate_runs()
    errors: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        try:
            for _ in range(8):
                aggregate_runs()
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(f"writer: {exc!r}")

    def reader() -> None:
        out = aggregate_dir()
        while not stop.is_set():
            try:
                assert len(pd.read_csv(out / "runs_summary.csv")) == 30
                assert len(pd.read_parquet(out / "runs_summary.parquet")) == 30
                assert (out / "dashboard.html").read_text().rstrip().endswith("</html>")
            except Exception as exc:  # noqa: BLE001
                errors.append(f"reader: {exc!r}")

    writers = [threading.Thread(target=writer) for _ in range(2)]
    read = threading.Thread(target=reader)
    read.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    read.join()
    assert errors == []
    assert sorted(p.name for p in aggregate_dir().iterdir()) == [
        "dashboard.html",
        "runs_summary.csv",
        "runs_summary.parquet",
    ]


# --------------------------------------------------------------------------------------------
# In a real browser
# --------------------------------------------------------------------------------------------


@pytest.mark.browser
def test_leaderboard_sorts_and_links_to_run_dashboards(
    make_run: Callable[..., Path], page: Any, static_server: Any
) -> None:
    from geoloc.presentation.report import write_report

    for name, quality in (("strong", 1.0), ("weak", 0.3)):
        write_report(make_run(name, quality=quality, with_predictions=False))
    put_run("lonely", acc=0.01, p90=20000.0, median=9000.0, run_name="<b>x</b>")
    result = aggregate_runs()
    for url in (result.dashboard_path.as_uri(), static_server(runs_dir()) + "_aggregate/"):
        page.goto(url + ("dashboard.html" if url.endswith("/") else ""))
        page.assert_clean()
        names = page.page.locator("#leaderboard tbody tr td:nth-child(2)").all_inner_texts()
        assert names[0].startswith("strong") and "<b>x</b>" in " ".join(names)
        page.page.click("th[data-col=score]")  # ascending
        first = page.page.locator("#leaderboard tbody tr td:nth-child(2)").first.inner_text()
        assert not first.startswith("strong")
        assert page.page.get_attribute("#leaderboard", "data-sorted") == "score asc"
        page.page.get_by_role("link", name="strong").click()
        page.page.wait_for_load_state()
        assert page.page.title().endswith("geoloc run")
        page.assert_clean()
