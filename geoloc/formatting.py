"""How numbers look for people: km, shares and plain numbers, a dash when missing.

Foundation, not presentation: training's epoch lines print `fmt_km`/`fmt_share` too, and
training must not import the presentation layer. HTML styling lives in `presentation/html.py`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

EMPTY = "—"
"""Shown for a missing number."""


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


def _finite(value: Any) -> float | None:
    """The value as a finite float, or None for missing, boolean, non-numeric or non-finite."""
    if value is None or isinstance(value, bool):
        return None
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def fmt_km(value: Any) -> str:
    """A distance for people: `78.5 km` below 100 km, `3,623 km` above, dash for missing."""
    v = _finite(value)
    if v is None:
        return EMPTY
    return f"{v:.1f} km" if abs(v) < 100 else f"{v:,.0f} km"


def fmt_share(value: Any) -> str:
    """A share in [0, 1] as a percentage with one decimal (`41.2%`), dash for missing."""
    v = _finite(value)
    return EMPTY if v is None else f"{100 * v:.1f}%"
