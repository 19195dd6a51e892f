"""A run's report: `REPORT.md` and `dashboard.html`, with the plots they show.

`write_report(run_dir)` is called at the end of every training run, completed or not, so it
reads what the run recorded and never crashes on a partial run: a missing table, prediction file
or summary turns into a section that says what is missing instead of an exception.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from geoloc.atomic import write_text
from geoloc.errors import GeolocError
from geoloc.formatting import EMPTY, fmt
from geoloc.presentation.breakdown import error_breakdowns
from geoloc.presentation.dashboard import render_dashboard
from geoloc.presentation.inputs import RunInputs, degraded_counts, load_run_inputs
from geoloc.presentation.ood_plots import draw_optional_plots
from geoloc.presentation.plots import PlotOutcome, draw_plots
from geoloc.presentation.report_tables import (
    artifact_links,
    config_items,
    confused_cells,
    confused_pairs,
    fmt_by_name,
    fmt_metric,
    metric_rows,
    rerank_cells,
    rerank_variant,
    result_rows,
    training_facts,
)
from geoloc.runfolder.summary import SummaryError, read_summary, write_summary

log = logging.getLogger(__name__)


def _md_escape(text: Any) -> str:
    """Keep table cells on one line and stop markdown/HTML in data from rendering."""
    s = str(text).replace("\n", " ").replace("|", "\\|")
    return html.escape(s, quote=False)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table, every cell escaped."""
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |"]
    lines.append("|" + "|".join(" --- " for _ in header) + "|")
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(inputs: RunInputs, plots: Sequence[PlotOutcome]) -> str:
    """REPORT.md: result, training, metrics, plots (linked), confusions, rerank, config, files."""
    s = inputs.summary or {}
    lines = [f"# Run report: {_md_escape(inputs.run_name)}", ""]
    lines.append(f"Run id `{inputs.paths.run_id}` · status **{_md_escape(inputs.status)}**")
    if s.get("failure_reason"):
        lines.append(f"\nFailure reason: {_md_escape(s['failure_reason'])}")
    if (counts := degraded_counts(s)) is not None:
        lines.append(f"\n**Degraded**: unreadable images left out ({counts}); the numbers "
                     "below are over the images that could be read")  # fmt: skip
    for key, note in inputs.notes.items():
        lines.append(f"\n> {key}: {_md_escape(note)}")
    lines += ["", "## Result", ""]
    lines += _result_lines(inputs)
    lines += ["", "## Training", ""]
    lines += _md_table(["", "value"], [(k, fmt(v)) for k, v in training_facts(inputs)])
    rows = metric_rows(inputs)
    lines += ["", "| metric | val best | val last | test (model) |", "| --- | --- | --- | --- |"]
    lines += [
        f"| {m} | " + " | ".join(fmt_by_name(m, v) for v in vals) + " |" for m, *vals in rows
    ] or [
        f"| {EMPTY} | {EMPTY} | {EMPTY} | {EMPTY} |"
    ]
    lines += ["", "## Plots", ""]
    for p in plots:
        rel = f"artifacts/plots/{p.spec.filename}"
        if p.path is not None:
            lines += [f"### {p.spec.title}", "", f"![{p.spec.title}]({rel})", ""]
        else:
            lines += [f"### {p.spec.title}", "", f"_Not available: {_md_escape(p.reason)}_", ""]
    split, pairs = confused_pairs(inputs)
    lines += ["## Most confused cells", ""]
    if pairs:
        lines += [f"On {split}; cells named after the largest nearby city.", ""]
        lines += _md_table(*confused_cells(pairs)) + [""]
    else:
        lines += ["_No mistakes to show._", ""]
    lines += _breakdown_lines(inputs)
    lines += ["## Rerank evaluation (test)", ""]
    if inputs.rerank is not None:
        lines += _md_table(*rerank_cells(inputs.rerank))
    else:
        lines.append(f"_No rerank evaluation: {_md_escape(inputs.notes.get('rerank', ''))}_")
    lines += ["", "## Config", ""]
    lines += _md_table(["key", "value"], config_items(inputs)) if config_items(inputs) else []
    lines += ["", "## Artifacts", "", "- [dashboard.html](dashboard.html)"]
    lines += [f"- [{_md_escape(label)}]({href})" for label, href in artifact_links(inputs)]
    return "\n".join(lines) + "\n"


def _result_lines(inputs: RunInputs) -> list[str]:
    """The test result: after rerank beside the model alone (or the model only)."""
    rows = result_rows(inputs.summary)
    variant = rerank_variant(inputs.summary)
    if not rows:
        return ["_No test result yet._"]
    if not variant:
        return _md_table(["test metric", "model"], [(r.label, fmt_metric(r.model, r.kind))
                                                    for r in rows])  # fmt: skip
    body = [(r.label, fmt_metric(r.reranked, r.kind), fmt_metric(r.model, r.kind)) for r in rows]
    note = [f"After rerank (`{variant}`, chosen on val) is what `geoloc predict` serves.", ""]
    return note + _md_table(["test metric", f"after rerank ({variant})", "model alone"], body)


def _breakdown_lines(inputs: RunInputs) -> list[str]:
    """Error by continent and by country, when the index has a country per image."""
    found = error_breakdowns(inputs)
    if not found.tables:
        return [f"> {_md_escape(found.note)}", ""] if found.note else []
    lines: list[str] = []
    for i, table in enumerate(found.tables):
        lines += [f"## {table.title}", ""] + ([_md_escape(found.note), ""] if i == 0 else [])
        lines += _md_table(table.header, table.rows) + [""]
    return lines


def refresh_summary_artifacts(run_dir: Path) -> None:
    """Rewrite summary.json so its artifact flags include the report just written."""
    try:
        write_summary(run_dir, read_summary(run_dir))
    except SummaryError as exc:
        log.warning("summary of %s not refreshed: %s", run_dir, exc)


def write_report(run_dir: Path) -> None:
    """Write plots, REPORT.md and dashboard.html for a run; never fails on a partial run."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise GeolocError(f"run directory '{run_dir}' does not exist")
    inputs = load_run_inputs(run_dir)
    plots = draw_plots(inputs) + draw_optional_plots(inputs)
    write_text(inputs.paths.report, render_markdown(inputs, plots))
    write_text(inputs.paths.dashboard, render_dashboard(inputs, plots))
    refresh_summary_artifacts(run_dir)
    log.info("report written for %s", run_dir)
