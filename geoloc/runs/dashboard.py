"""A run's `dashboard.html`: one self-contained page, plots embedded, links relative to the run."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from geoloc.runs.formatting import NO_FAVICON, NUM_CELL_CSS, STATUS_CSS, fmt
from geoloc.runs.formatting import escape_html as _e
from geoloc.runs.inputs import RunInputs
from geoloc.runs.plots import PlotOutcome
from geoloc.runs.report_tables import (
    artifact_links,
    config_items,
    headline,
    metric_rows,
    rerank_cells,
)

_CSS = "\n".join(
    [
        "",
        "body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222;"
        "padding:0 1rem}",
        "h1{font-size:1.5rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}",
        "table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;"
        "padding:.25rem .6rem}",
        "th{background:#f4f4f4;text-align:left}" + NUM_CELL_CSS,
        ".cards{display:flex;flex-wrap:wrap;gap:.6rem}"
        ".card{border:1px solid #ddd;border-radius:6px;",
        "padding:.5rem .8rem;min-width:9rem}.card .k{font-size:.8rem;color:#666}"
        ".card .v{font-size:1.2rem}",
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
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{_e(cls)}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def render_dashboard(inputs: RunInputs, plots: Sequence[PlotOutcome]) -> str:
    """One self-contained page: plots embedded as base64, artifact links relative to the run."""
    s = inputs.summary or {}
    status = inputs.status
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(inputs.run_name)} · geoloc run</title>",
        NO_FAVICON,
        f"<style>{_CSS}</style></head><body>",
        f'<h1>Run <span id="run-name">{_e(inputs.run_name)}</span></h1>',
        f"<p>id <code>{_e(inputs.paths.run_id)}</code> · status "
        f'<b id="status" class="status-{_e(status)}">{_e(status)}</b></p>',
    ]
    if s.get("failure_reason"):
        parts.append(f'<p class="note" id="failure">Failure: {_e(s["failure_reason"])}</p>')
    parts += [f'<p class="note">{_e(k)}: {_e(v)}</p>' for k, v in inputs.notes.items()]
    cards = "".join(
        f'<div class="card"><div class="k">{_e(k)}</div><div class="v">{_e(fmt(v))}</div></div>'
        for k, v in headline(inputs)
    )
    parts += ["<h2>Key metrics</h2>", f'<div class="cards" id="headline">{cards}</div>']
    rows = [(m, fmt(b), fmt(la), fmt(t)) for m, b, la, t in metric_rows(inputs)]
    parts.append(_html_table(["metric", "val best", "val last", "test"], rows, "metrics"))
    parts.append("<h2>Plots</h2>")
    for p in plots:
        if p.path is not None and p.path.is_file():
            img = _img_tag(p.path, p.spec.title)
            parts.append(f"<figure>{img}<figcaption>{_e(p.spec.title)}</figcaption></figure>")
        else:
            parts.append(f'<p class="note">{_e(p.spec.title)}: not available ({_e(p.reason)})</p>')
    parts.append("<h2>Rerank evaluation</h2>")
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
