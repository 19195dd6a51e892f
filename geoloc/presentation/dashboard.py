"""A run's `dashboard.html`: one self-contained page, plots embedded, links relative to the run.

It opens on the result a user gets (the test numbers after rerank, the model alone beside them)
and how training went; wide tables scroll inside their own box, so the page itself never
scrolls sideways at 1,280 px.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from geoloc.formatting import fmt
from geoloc.presentation.breakdown import error_breakdowns
from geoloc.presentation.html import NO_FAVICON, NUM_CELL_CSS, STATUS_CSS
from geoloc.presentation.html import escape_html as _e
from geoloc.presentation.inputs import RunInputs, degraded_counts
from geoloc.presentation.plots import PlotOutcome
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

_CSS = "\n".join(
    [
        "",
        "*{box-sizing:border-box}",
        "body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222;"
        "padding:0 1rem;overflow-wrap:anywhere}",
        "h1{font-size:1.5rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}",
        ".scroll{overflow-x:auto;max-width:100%}",
        "table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}td,th{border:1px solid #ddd;"
        "padding:.25rem .6rem;overflow-wrap:normal}",
        "th{background:#f4f4f4;text-align:left}" + NUM_CELL_CSS,
        "table.config td{overflow-wrap:anywhere;max-width:40rem}",
        "table.rerank td,table.metrics td,table.result td{white-space:nowrap}",
        ".cards{display:flex;flex-wrap:wrap;gap:.6rem;margin:.4rem 0}",
        ".card{border:1px solid #ddd;border-radius:6px;padding:.5rem .8rem;min-width:9rem}",
        ".card .k{font-size:.8rem;color:#666}.card .v{font-size:1.2rem}",
        ".card .m{font-size:.8rem;color:#666}",
        ".result .card{border-color:#7aa7d8;background:#f5f9fd}.result .card .v{font-size:1.6rem}",
        STATUS_CSS,
        ".note{color:#a05a00}figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}",
        "",
    ]
)


def _img_tag(path: Path, alt: str) -> str:
    """An inline PNG, so the page still shows its plots when mailed or moved alone."""
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{data}">'


def _html_table(header: Sequence[str], rows: Sequence[Sequence[Any]], cls: str = "") -> str:
    """A table in a box that scrolls sideways when the table is wider than the page."""
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    table = f'<table class="{_e(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'
    return f'<div class="scroll">{table}</div>'


def _card(key: str, value: str, more: str = "") -> str:
    extra = f'<div class="m">{_e(more)}</div>' if more else ""
    return f'<div class="card"><div class="k">{_e(key)}</div><div class="v">{_e(value)}</div>' \
        f"{extra}</div>"  # fmt: skip


def _headline(inputs: RunInputs) -> list[str]:
    """Result cards (after rerank, the model alone underneath) and the training facts."""
    variant = rerank_variant(inputs.summary)
    rows = result_rows(inputs.summary)
    cards = []
    for r in rows[:4]:
        more = f"model alone: {fmt_metric(r.model, r.kind)}" if variant else ""
        cards.append(_card(r.label, fmt_metric(r.final, r.kind), more))
    if not rows:
        lead = '<p class="note">No test result yet.</p>'
    elif variant:
        lead = (f"<p>Test split, after rerank (variant <code>{_e(variant)}</code>, chosen on "
                "val; what <code>geoloc predict</code> serves), with the model alone "
                "underneath.</p>")  # fmt: skip
    else:
        lead = "<p>Test split, the model alone (no rerank evaluation).</p>"
    facts = "".join(_card(k, fmt(v)) for k, v in training_facts(inputs))
    return [
        '<section id="headline"><h2>Result</h2>',
        lead,
        f'<div class="cards result" id="result-cards">{"".join(cards)}</div>',
        "<h3>Training</h3>",
        f'<div class="cards" id="training-cards">{facts}</div></section>',
    ]


def _result_table(inputs: RunInputs) -> str:
    rows = result_rows(inputs.summary)
    variant = rerank_variant(inputs.summary)
    if not rows:
        return ""
    if variant:
        body = [(r.label, fmt_metric(r.reranked, r.kind), fmt_metric(r.model, r.kind))
                for r in rows]  # fmt: skip
        return _html_table(["test metric", f"after rerank ({variant})", "model alone"], body,
                           "result")  # fmt: skip
    return _html_table(
        ["test metric", "model"], [(r.label, fmt_metric(r.model, r.kind)) for r in rows], "result"
    )


def render_dashboard(inputs: RunInputs, plots: Sequence[PlotOutcome]) -> str:
    """One self-contained page: plots embedded as base64, artifact links relative to the run."""
    s = inputs.summary or {}
    status = inputs.status
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(inputs.run_name)} · geoloc run</title>",
        NO_FAVICON,
        f"<style>{_CSS}</style></head><body>",
        f'<h1>Run <span id="run-name">{_e(inputs.run_name)}</span></h1>',
        f"<p>id <code>{_e(inputs.paths.run_id)}</code> · status "
        f'<b id="status" class="status-{_e(status)}">{_e(status)}</b></p>',
    ]
    if s.get("failure_reason"):
        parts.append(f'<p class="note" id="failure">Failure: {_e(s["failure_reason"])}</p>')
    if (counts := degraded_counts(s)) is not None:
        parts.append(f'<p class="note" id="degraded"><b>Degraded</b>: unreadable images left out '
                     f"({_e(counts)}); the numbers below are over the images that could be "
                     "read</p>")  # fmt: skip
    parts += [f'<p class="note">{_e(k)}: {_e(v)}</p>' for k, v in inputs.notes.items()]
    parts += _headline(inputs)
    parts.append(_result_table(inputs))
    parts.append("<h2>Metrics per split</h2>")
    rows = [(m, *(fmt_by_name(m, v) for v in vals)) for m, *vals in metric_rows(inputs)]
    parts.append(_html_table(["metric", "val best", "val last", "test (model)"], rows, "metrics"))
    parts.append("<h2>Plots</h2>")
    for p in plots:
        if p.path is not None and p.path.is_file():
            img = _img_tag(p.path, p.spec.title)
            parts.append(f"<figure>{img}<figcaption>{_e(p.spec.title)}</figcaption></figure>")
        else:
            parts.append(f'<p class="note">{_e(p.spec.title)}: not available ({_e(p.reason)})</p>')
    parts += _confused_section(inputs)
    parts += _breakdown_section(inputs)
    parts.append("<h2>Rerank evaluation (test)</h2>")
    if inputs.rerank is not None:
        parts.append(_html_table(*rerank_cells(inputs.rerank), "rerank"))
    else:
        parts.append(f'<p class="note">No rerank evaluation: {_e(inputs.notes.get("rerank"))}</p>')
    parts += ["<h2>Config</h2>", _html_table(["key", "value"], config_items(inputs), "config")]
    links = '<li><a href="REPORT.md">REPORT.md</a></li>' + "".join(
        f'<li><a href="{_e(href)}">{_e(label)}</a></li>' for label, href in artifact_links(inputs)
    )
    parts += ["<h2>Artifacts</h2>", f'<ul id="artifacts">{links}</ul>', "</body></html>"]
    return "\n".join(parts) + "\n"


def _confused_section(inputs: RunInputs) -> list[str]:
    split, pairs = confused_pairs(inputs)
    out = ["<h2>Most confused cells</h2>"]
    if not pairs:
        out.append('<p class="note">No mistakes to show (no predictions, or none wrong).</p>')
        return out
    out.append(
        f"<p>The model's most frequent mistakes on {_e(split)}: images of one cell "
        "predicted as another, cells named after the largest nearby city.</p>"
    )
    out.append(_html_table(*confused_cells(pairs), "confused"))
    return out


def _breakdown_section(inputs: RunInputs) -> list[str]:
    """Error by continent and by country, when the index has a country per image."""
    found = error_breakdowns(inputs)
    if not found.tables:
        return [f'<p class="note">{_e(found.note)}</p>'] if found.note else []
    out = []
    for i, table in enumerate(found.tables):
        anchor = table.title.lower().replace(" ", "-")
        out.append(f'<h2 id="{_e(anchor)}">{_e(table.title)}</h2>')
        out += [f"<p>{_e(found.note)}</p>"] if i == 0 else []
        out.append(_html_table(table.header, table.rows, "breakdown"))
    return out
