"""How numbers and text look in what `runs/` writes: REPORT.md, a run's dashboard, the leaderboard.

Both HTML pages share the escaping, the status colours and the number-cell style, so a run's
status reads the same on its dashboard and on the leaderboard.
"""

from __future__ import annotations

import html
import math
from typing import Any

import numpy as np
import pandas as pd

EMPTY = "—"
"""Shown for a missing number."""

STATUS_CSS = (
    ".status-completed{color:#176f2c}.status-failed{color:#b00020}.status-pruned{color:#a05a00}"
)
NUM_CELL_CSS = "td.num{text-align:right;font-variant-numeric:tabular-nums}"
# a page without it makes the browser request /favicon.ico (a 404 on web servers)
NO_FAVICON = '<link rel="icon" href="data:,">'


def fmt(value: Any) -> str:
    """A number for people: thousands separators for km, 4 digits below 1, dash for missing."""
    if value is None or isinstance(value, bool):
        return EMPTY if value is None else str(value)
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isnan(v) or math.isinf(v):
            return EMPTY
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.4f}"
    return str(value)


def fmt_km(value: Any) -> str:
    """A distance for people: `78.5 km` below 100 km, `3,623 km` above, dash for missing."""
    if value is None or isinstance(value, bool):
        return EMPTY
    try:
        v = float(value)
    except (TypeError, ValueError):
        return EMPTY
    if not math.isfinite(v):
        return EMPTY
    return f"{v:.1f} km" if abs(v) < 100 else f"{v:,.0f} km"


def fmt_share(value: Any) -> str:
    """A share in [0, 1] as a percentage with one decimal (`41.2%`), dash for missing."""
    if value is None or isinstance(value, bool):
        return EMPTY
    try:
        v = float(value)
    except (TypeError, ValueError):
        return EMPTY
    return f"{100 * v:.1f}%" if math.isfinite(v) else EMPTY


def escape_html(value: Any) -> str:
    """Text safe in HTML content and quoted attributes; None and pandas NA become empty."""
    return html.escape("" if value is None or value is pd.NA else str(value), quote=True)
