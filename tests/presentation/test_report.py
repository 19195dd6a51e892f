"""Per-run reports: every run, finished or not, gets plots, REPORT.md and a safe dashboard."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fixtures.fake_runs import fake_classes

from geoloc.cli import main
from geoloc.formatting import fmt_km, fmt_share
from geoloc.presentation.plots import PLOTS, confusion_groups, shore_polygons
from geoloc.presentation.report import write_report
from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import read_summary, update_summary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
EVIL = '</script><script>window.__pwned = 1</script><img src=x onerror="window.__pwned=2">'


def _assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 5_000, f"{path} looks empty ({len(data)} bytes)"


def test_complete_run_gets_every_plot_report_and_dashboard(fake_run: Path) -> None:
    write_report(fake_run)
    rp = RunPaths(fake_run)
    for spec in PLOTS:
        _assert_png(rp.plots / spec.filename)
    report = rp.report.read_text()
    for spec in PLOTS:
        assert f"(artifacts/plots/{spec.filename})" in report
    assert "Not available" not in report
    assert "gated+refined" in report  # the rerank table
    page = rp.dashboard.read_text()
    assert page.count("data:image/png;base64,") == len(PLOTS)
    assert 'href="artifacts/tables/metrics.csv"' in page
    flags = read_summary(fake_run)["artifacts"]
    assert flags["report"] and flags["dashboard"] and flags["plots"]


def test_report_is_idempotent_and_leaves_no_temp_files(make_run: Callable[..., Path]) -> None:
    fake_run = make_run("again", with_predictions=False)
    write_report(fake_run)
    first = RunPaths(fake_run).report.read_text()
    write_report(fake_run)
    assert RunPaths(fake_run).report.read_text() == first
    assert not [p for p in fake_run.rglob(".*") if p.is_file()]


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"with_metrics": False}, "no metrics.csv"),
        ({"with_predictions": False}, "no test_predictions.parquet"),
        ({"with_rerank": False}, "No rerank evaluation"),
        ({"with_summary": False}, "no summary.json"),
        ({"with_config": False, "with_summary": False, "with_metrics": False}, "no config.json"),
    ],
)
def test_partial_run_gets_a_report_that_says_what_is_missing(
    make_run: Callable[..., Path], kwargs: dict[str, bool], expected: str
) -> None:
    run = make_run("partial", **kwargs)
    write_report(run)
    rp = RunPaths(run)
    assert expected in rp.report.read_text()
    assert html.escape(expected) in rp.dashboard.read_text()


def test_failed_run_with_nothing_but_a_summary_shows_status_and_reason(
    make_run: Callable[..., Path],
) -> None:
    run = make_run(
        "broken",
        status="failed",
        failure_reason="NaN loss at epoch 2",
        with_metrics=False,
        with_predictions=False,
        with_checkpoints=False,
    )
    write_report(run)
    report = RunPaths(run).report.read_text()
    assert "status **failed**" in report
    assert "NaN loss at epoch 2" in report
    assert read_summary(run)["status"] == "failed"  # refreshing flags keeps the status


def test_corrupt_inputs_do_not_stop_the_report(make_run: Callable[..., Path]) -> None:
    run = make_run("corrupt")
    rp = RunPaths(run)
    rp.summary.write_text("{half a json")
    rp.metrics_csv.write_bytes(b"\x00\xff garbage")
    rp.test_predictions.write_text("not parquet")
    write_report(run)
    report = rp.report.read_text()
    assert "corrupt JSON" in report
    assert "test_predictions.parquet could not be read" in report
    assert rp.summary.read_text() == "{half a json"  # never overwritten by the report


def test_exact_hits_and_one_epoch_still_plot(make_run: Callable[..., Path]) -> None:
    """A log-scale CDF with 0 km errors and a single epoch are common on tiny demo runs."""
    run = make_run("tiny", epochs=1, accuracy=1.0, num_classes=3, n_predictions=5)
    preds = pd.read_parquet(RunPaths(run).test_predictions)
    preds["error_km"] = 0.0
    preds.to_parquet(RunPaths(run).test_predictions, index=False)
    write_report(run)
    for spec in PLOTS:
        _assert_png(RunPaths(run).plots / spec.filename)


def test_one_or_two_epochs_plot_as_whole_epochs_with_big_markers(tmp_path: Path) -> None:
    """A 1-epoch run used to draw one dot on an axis from 0.945 to 1.05."""
    from geoloc.presentation.inputs import RunInputs
    from geoloc.presentation.plots import draw_loss, pyplot

    for epochs in (1, 2):
        metrics = pd.DataFrame({"epoch": range(1, epochs + 1), "train_loss": [5.7, 5.1][:epochs],
                                "val_loss": [5.6, 5.3][:epochs]})  # fmt: skip
        inputs = RunInputs(paths=RunPaths(tmp_path / f"e{epochs}"), metrics=metrics)
        fig = pyplot().figure()
        draw_loss(fig, inputs)
        (ax,) = fig.axes
        assert ax.get_xlim() == (0.5, epochs + 0.5)
        assert [t for t in ax.get_xticks() if 0.5 <= t <= epochs + 0.5] == list(
            range(1, epochs + 1)
        )
        assert all(line.get_markersize() >= 6 for line in ax.get_lines())
        pyplot().close(fig)


def test_report_leads_with_the_reranked_result_and_names_confused_cells(
    fake_run: Path,
) -> None:
    write_report(fake_run)
    summary = read_summary(fake_run)
    reranked = summary["rerank"]["metrics"]["median_km"]
    report = RunPaths(fake_run).report.read_text()
    result = report.split("## Result", 1)[1].split("##", 1)[0]
    row = next(line for line in result.splitlines() if line.startswith("| median error"))
    # after rerank first, then the model alone, both as people read km
    assert row.split("|")[2].strip() == fmt_km(reranked)
    assert row.split("|")[3].strip() == fmt_km(summary["test"]["test_median_km"])
    confused = report.split("## Most confused cells", 1)[1].split("##", 1)[0]
    assert ", " in confused  # "City, CC" labels
    assert not re.search(r"\b8[0-9a-f]{14}\b", confused), "raw H3 ids in the confusion table"


def test_places_are_named_after_the_largest_nearby_city() -> None:
    import h3

    from geoloc.geo.places import cell_place_labels, place_labels

    assert place_labels([48.86, 45.76, 0.0], [2.35, 4.84, -160.0]) == [
        "Paris, FR",
        "Lyon, FR",
        "0°N 160°W",  # open Pacific: a coordinate, not a city 2,000 km away
    ]
    paris = [h3.latlng_to_cell(48.86, 2.35, 7), h3.latlng_to_cell(48.80, 2.40, 7)]
    assert cell_place_labels(paris) == {paris[0]: "Paris, FR", paris[1]: "Paris, FR #2"}


def test_distances_and_shares_read_like_people_write_them() -> None:
    assert [fmt_km(v) for v in (78.5123, 11480.3, 0.04, None, float("nan"))] == [
        "78.5 km",
        "11,480 km",
        "0.0 km",
        "—",
        "—",
    ]
    assert fmt_share(0.41234) == "41.2%"


def test_strings_from_config_and_data_are_escaped(make_run: Callable[..., Path]) -> None:
    run = make_run("evil")
    rp = RunPaths(run)
    update_summary(run, run_name=EVIL, failure_reason=EVIL)
    config = json.loads(rp.config.read_text())
    config["name"] = EVIL
    rp.config.write_text(json.dumps(config))
    rerank = pd.read_csv(rp.rerank_eval)
    rerank.loc[0, "variant"] = EVIL
    rerank.to_csv(rp.rerank_eval, index=False)
    write_report(run)
    page = rp.dashboard.read_text()
    assert EVIL not in page
    assert "<script>window" not in page
    assert html.escape(EVIL) in page
    assert EVIL not in rp.report.read_text()


def test_every_artifact_is_linked_even_under_a_hidden_folder(tmp_path: Path) -> None:
    """Runs may live under e.g. ~/.cache; odd file names still get working relative links."""
    run = RunPaths(tmp_path / ".cache" / "run1").make().root
    (run / "artifacts" / "tables" / "extra table #1.csv").write_text("a\n1\n")
    write_report(run)
    page = (run / "dashboard.html").read_text()
    assert 'href="artifacts/tables/extra%20table%20%231.csv"' in page
    assert "(artifacts/tables/extra%20table%20%231.csv)" in (run / "REPORT.md").read_text()


def test_confusion_matrix_stays_readable_at_thousands_of_classes() -> None:
    classes = fake_classes(3000, seed=3)
    rng = np.random.default_rng(0)
    true = classes["cell"].to_numpy()[rng.integers(0, 3000, 20_000)]
    pred = classes["cell"].to_numpy()[rng.integers(0, 3000, 20_000)]
    true_g, pred_g, desc = confusion_groups(pd.Series(true), pd.Series(pred), 6)
    groups = set(true_g) | set(pred_g)
    assert len(groups) <= 30
    assert "other" in groups
    assert desc.startswith("parent level")
    assert len(true_g) == 20_000


def test_confusion_matrix_keeps_classes_when_few() -> None:
    cells = pd.Series(["a", "b", "c", "a"])
    true_g, _, desc = confusion_groups(cells, cells[::-1].reset_index(drop=True))
    assert list(true_g) == list(cells)
    assert desc.startswith("class level")


def test_coastlines_are_real_world_polygons() -> None:
    polys = shore_polygons()
    assert len(polys) > 500
    pts = np.concatenate([p for _, p in polys])
    assert pts[:, 0].min() >= -180.0 and pts[:, 0].max() <= 180.0
    assert pts[:, 1].min() >= -90.0 and pts[:, 1].max() <= 90.0
    biggest = max(len(p) for level, p in polys if level == 1)
    assert biggest > 500  # a continent, not noise from a misread offset


def test_cli_report_takes_a_run_id(
    make_run: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    fake_run = make_run("cli", with_predictions=False)
    assert main(["report", fake_run.name]) == 0
    assert "dashboard:" in capsys.readouterr().out
    assert RunPaths(fake_run).dashboard.is_file()


def test_cli_report_unknown_run_is_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "no-such-run"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: run 'no-such-run'") and "\n" not in err


# --------------------------------------------------------------------------------------------
# In a real browser
# --------------------------------------------------------------------------------------------


def _check_dashboard(page, url: str) -> None:  # noqa: ANN001 - BrowserPage from the fixture
    page.goto(url)
    page.assert_clean()
    assert page.page.title().endswith("geoloc run")
    headline = page.page.inner_text("#headline")
    assert "best val top-1" in headline and "completed" in headline
    assert "p90_km" in page.page.inner_text("table.metrics")
    n_images = page.page.locator("img").count()
    assert n_images == len(PLOTS)
    assert page.broken_images() == []
    assert page.page.evaluate("window.__pwned === undefined")


@pytest.mark.browser
def test_dashboard_renders_from_disk_and_from_a_web_server(
    make_run: Callable[..., Path],
    page,
    static_server,  # noqa: ANN001
) -> None:
    run = make_run("browser")
    update_summary(run, run_name=EVIL)
    write_report(run)
    _check_dashboard(page, RunPaths(run).dashboard.as_uri())
    base = static_server(run.parent)
    _check_dashboard(page, f"{base}{run.name}/dashboard.html")
    # artifact links are relative to the run and resolve on the server
    href = page.page.get_attribute("a[href='artifacts/tables/metrics.csv']", "href")
    assert page.page.request.get(f"{base}{run.name}/{href}").ok
    page.screenshot("run_dashboard")


@pytest.mark.browser
def test_dashboard_leads_with_the_reranked_result_and_fits_1280_px(
    make_run: Callable[..., Path],
    page,  # noqa: ANN001
) -> None:
    run = make_run("wide")
    rp = RunPaths(run)
    update_summary(run, run_name="w" * 64)  # one unbroken word as wide as a name may be
    config = json.loads(rp.config.read_text())
    config["index_dir"] = "/data/" + "deep/" * 60 + "index"
    rp.config.write_text(json.dumps(config))
    write_report(run)
    page.goto(rp.dashboard.as_uri())
    page.assert_clean()
    width, scroll = page.page.evaluate(
        "[window.innerWidth, document.documentElement.scrollWidth]"
    )
    assert width == 1280 and scroll <= width, f"the page scrolls sideways ({scroll} px)"
    # the 17-column rerank table is wider than the page: it scrolls inside its own box
    table, box = page.page.eval_on_selector(
        "table.rerank", "t => [t.scrollWidth, t.parentElement.clientWidth]"
    )
    assert table > box
    summary = read_summary(run)
    first = page.page.inner_text("#result-cards .card:first-child")
    assert "median error" in first
    assert fmt_km(summary["rerank"]["metrics"]["median_km"]) in first
    assert f"model alone: {fmt_km(summary['test']['test_median_km'])}" in first
    page.screenshot("run_dashboard_1280")
