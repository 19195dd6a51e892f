"""How the HTML pages look: escaping, status colours, number cells.

A run's dashboard and the leaderboard share them, so a run's status reads the same on both.
"""

from __future__ import annotations

import html
from typing import Any

import pandas as pd

STATUS_CSS = (
    ".status-completed{color:#176f2c}.status-failed{color:#b00020}.status-pruned{color:#a05a00}"
)
NUM_CELL_CSS = "td.num{text-align:right;font-variant-numeric:tabular-nums}"
# a page without it makes the browser request /favicon.ico (a 404 on web servers)
NO_FAVICON = '<link rel="icon" href="data:,">'


def escape_html(value: Any) -> str:
    """Text safe in HTML content and quoted attributes; None and pandas NA become empty."""
    return html.escape("" if value is None or value is pd.NA else str(value), quote=True)
