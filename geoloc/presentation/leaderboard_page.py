"""The leaderboard's `dashboard.html`: one sortable table of ranked runs, then the skipped ones.

Self-contained (inline CSS and plain JS, no network), links relative to `runs/_aggregate/`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from geoloc.formatting import EMPTY, fmt_km, fmt_share
from geoloc.presentation.html import NO_FAVICON, NUM_CELL_CSS, STATUS_CSS
from geoloc.presentation.html import escape_html as _e
from geoloc.presentation.leaderboard_table import (
    CSV_NAME,
    FLOAT_COLUMNS,
    INT_COLUMNS,
    PARQUET_NAME,
    AggregateResult,
)

_CSS = "\n".join(
    [
        "",
        "body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}",
        ".scroll{overflow-x:auto;max-width:100%}",
        "table{border-collapse:collapse;font-size:.85rem}td,th{border:1px solid #ddd;"
        "padding:.2rem .5rem}",
        "th{background:#f4f4f4;cursor:pointer;user-select:none;position:sticky;top:0}",
        'th.sorted-asc::after{content:" ▲"}th.sorted-desc::after{content:" ▼"}',
        NUM_CELL_CSS,
        STATUS_CSS,
        "code{background:#f4f4f4;padding:0 .2rem}.formula{max-width:60rem}",
        "td.degraded{color:#b00020;font-weight:bold}",
        "",
    ]
)

# plain JS: click a header to sort by it (numbers by data-v, text otherwise), click again to flip
_SORT_JS = """
(function () {
  var table = document.getElementById('leaderboard');
  if (!table) { return; }
  var heads = table.tHead.rows[0].cells;
  function key(cell) {
    var v = cell.getAttribute('data-v');
    if (v === null) { return cell.textContent.toLowerCase(); }
    return v === '' ? null : parseFloat(v);
  }
  function sortBy(col, desc) {
    var body = table.tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = key(a.cells[col]), y = key(b.cells[col]);
      if (x === y) { return 0; }
      if (x === null) { return 1; }
      if (y === null) { return -1; }
      return (x < y ? -1 : 1) * (desc ? -1 : 1);
    });
    rows.forEach(function (r) { body.appendChild(r); });
    for (var i = 0; i < heads.length; i++) { heads[i].className = ''; }
    heads[col].className = desc ? 'sorted-desc' : 'sorted-asc';
    var name = heads[col].getAttribute('data-col');
    table.setAttribute('data-sorted', name + (desc ? ' desc' : ' asc'));
  }
  Array.prototype.forEach.call(heads, function (th, col) {
    th.addEventListener('click', function () {
      sortBy(col, th.className === 'sorted-asc');
    });
  });
})();
"""

_SHOWN: tuple[tuple[str, str], ...] = (
    ("rank", "rank"),
    ("run_name", "run"),
    ("run_id", "run id"),
    ("status", "status"),
    ("score", "score"),
    ("rerank_median_km", "test median, reranked"),
    ("rerank_p90_km", "test P90, reranked"),
    ("rerank_variant", "rerank variant"),
    ("test_median_km", "test median, model"),
    ("test_p90_km", "test P90, model"),
    ("test_top1", "test top-1, model"),
    ("best_val_acc", "best val top-1"),
    ("best_p90_km", "best val P90"),
    ("last_geo_median_km", "last val median"),
    ("norm_acc", "acc part"),
    ("norm_p90", "P90 part"),
    ("norm_median", "median part"),
    ("penalty", "penalty"),
    ("epochs_completed", "epochs"),
    ("unreadable_images", "unreadable images"),
    ("arch", "arch"),
    ("loss", "loss"),
    ("missing_artifacts", "missing artifacts"),
)


def _cell(col: str, value: Any, row: Mapping[str, Any]) -> str:
    """One `<td>`: numbers carry `data-v` to sort by; the run name links to its dashboard."""
    missing = value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))
    if col in FLOAT_COLUMNS or col in INT_COLUMNS:
        if missing:
            return f'<td class="num" data-v="">{EMPTY}</td>'
        v = float(value)
        if col.endswith("_km"):
            text = fmt_km(v)
        elif col in ("test_top1", "best_val_acc"):
            text = fmt_share(v)
        elif col in ("rank", "epochs_completed"):
            text = f"{v:.0f}"
        elif col == "unreadable_images" and v > 0:  # a degraded run stands out
            return f'<td class="num degraded" data-v="{v!r}">{v:,.0f} (degraded)</td>'
        else:
            text = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.4g}"
        return f'<td class="num" data-v="{v!r}">{_e(text)}</td>'
    if col == "run_name":
        label = _e(value or row["run_id"])
        link = row.get("dashboard")
        title = f' title="{_e(row["run_id"])}"'
        if link and link is not pd.NA:
            return f'<td{title}><a href="{_e(link)}">{label}</a></td>'
        href = f"../{row['run_id']}/summary.json"
        return f'<td{title}>{label} <a href="{_e(href)}">(summary)</a></td>'
    if col == "run_id":
        return f"<td><code>{_e(value)}</code></td>"
    if col == "status":
        return f'<td class="status-{_e(value)}">{_e(value)}</td>'
    return f"<td>{'' if missing else _e(value)}</td>"


def render_leaderboard(result: AggregateResult) -> str:
    """The sortable leaderboard page (self-contained; links are relative to `_aggregate/`)."""
    w, p = result.weights, result.penalties
    head = "".join(f'<th data-col="{_e(c)}">{_e(label)}</th>' for c, label in _SHOWN)
    body = []
    for row in result.ranked.to_dict("records"):
        body.append("<tr>" + "".join(_cell(c, row[c], row) for c, _ in _SHOWN) + "</tr>")
    skipped = "".join(
        f"<tr><td>{_e(s.run_id)}</td><td>{_e(s.reason)}</td></tr>" for s in result.skipped
    )
    missing = ", ".join(f"{_e(k)} {v:g}" for k, v in p.missing.items()) or "none"
    status = ", ".join(f"{_e(k)} {v:g}" for k, v in p.status.items()) or "none"
    return "\n".join(
        [
            "<!DOCTYPE html>",
            '<html lang="en"><head><meta charset="utf-8"><title>geoloc leaderboard</title>',
            NO_FAVICON,
            f"<style>{_CSS}</style></head><body>",
            "<h1>geoloc leaderboard</h1>",
            f'<p id="counts">{len(result.ranked)} ranked runs, {len(result.skipped)} skipped. '
            f'Data: <a href="{CSV_NAME}">{CSV_NAME}</a> · '
            f'<a href="{PARQUET_NAME}">{PARQUET_NAME}</a></p>',
            '<p class="formula">score = (w<sub>acc</sub>·acc part + w<sub>p90</sub>·P90 part + '
            "w<sub>median</sub>·median part) / Σw − penalty. Parts are against a fixed reference, "
            "not the other runs: accuracy as it is; km as 1 − log(1+km)/log(1+20,037.5) (1 at "
            "0 km, 0 at half the Earth); missing metric: 0. "
            f"Weights: acc {w.acc:g}, p90 {w.p90:g}, median {w.median:g}. "
            f"Penalties for missing artifacts: {missing}; for status: {status}. "
            "Click a column to sort.</p>",
            f'<div class="scroll"><table id="leaderboard"><thead><tr>{head}</tr></thead>',
            f"<tbody>{''.join(body)}</tbody></table></div>",
            f"<h2>Skipped runs ({len(result.skipped)})</h2>",
            '<table id="skipped"><thead><tr><th>run</th><th>reason</th></tr></thead>',
            f"<tbody>{skipped}</tbody></table>",
            f"<script>{_SORT_JS}</script>",
            "</body></html>",
        ]
    )
