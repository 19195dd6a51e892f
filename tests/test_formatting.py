"""Numbers for people: every table, report and epoch line shows missing values the same way."""

from __future__ import annotations

import numpy as np
import pytest

from geoloc.formatting import EMPTY, fmt, fmt_km, fmt_share


@pytest.mark.parametrize("missing", [None, float("nan"), float("inf"), "n/a", True])
def test_missing_or_unusable_values_show_a_dash(missing: object) -> None:
    assert fmt_km(missing) == EMPTY
    assert fmt_share(missing) == EMPTY


def test_distances_keep_a_decimal_below_100_km_and_separate_thousands_above() -> None:
    assert fmt_km(78.54) == "78.5 km"
    assert fmt_km(np.float32(3623.4)) == "3,623 km"
    assert fmt_km("12") == "12.0 km"  # CSV cells arrive as strings


def test_shares_are_percentages_with_one_decimal() -> None:
    assert fmt_share(0.4123) == "41.2%"
    assert fmt_share(1) == "100.0%"


def test_plain_numbers_separate_thousands_and_keep_small_values_readable() -> None:
    assert fmt(12345) == "12,345"
    assert fmt(4612.3) == "4,612"
    assert fmt(0.12345) == "0.1235"
    assert fmt(float("nan")) == EMPTY
