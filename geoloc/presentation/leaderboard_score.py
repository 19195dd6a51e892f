"""The leaderboard score's settings and arithmetic: weights, penalties, parts against a fixed
reference.

The formula is in `presentation.leaderboard`'s docstring; weights and penalties come from the CLI
as `name=number` pairs and are checked here, with an error that names the bad pair.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import Field, ValidationError, model_validator

from geoloc.config import StrictModel
from geoloc.errors import ConfigError

# the three score parts: summary key, column of the normalised value, higher-is-better
SCORE_PARTS: tuple[tuple[str, str, str, bool], ...] = (
    ("acc", "best_val_acc", "norm_acc", True),
    ("p90", "best_p90_km", "norm_p90", False),
    ("median", "last_geo_median_km", "norm_median", False),
)


def _parse_pairs(text: str, what: str) -> dict[str, float]:
    """`a=0.4,b=0.1` -> {"a": 0.4, "b": 0.1}; the error names the bad pair."""
    out: dict[str, float] = {}
    for item in (p.strip() for p in text.split(",")):
        if not item:
            continue
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[key.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"{what} '{item}' is not of the form name=number") from None
    return out


class ScoreWeights(StrictModel):
    """Weights of the normalised score parts (they need not sum to 1: the score divides)."""

    acc: float = Field(0.4, ge=0, description="Weight of best_val_acc (higher is better).")
    p90: float = Field(0.4, ge=0, description="Weight of best_p90_km (lower is better).")
    median: float = Field(0.2, ge=0, description="Weight of last_geo_median_km (lower is better).")

    @model_validator(mode="after")
    def _some_weight(self) -> ScoreWeights:
        if self.acc + self.p90 + self.median <= 0:
            raise ValueError("at least one weight must be > 0")
        return self

    @classmethod
    def parse(cls, text: str | None) -> ScoreWeights:
        """`acc=0.5,p90=0.5,median=0` from the CLI; keys not given keep their default."""
        pairs = _parse_pairs(text or "", "weight")
        try:
            return cls(**pairs)
        except ValidationError as exc:
            valid = ", ".join(cls.model_fields)
            reasons = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'weights'}: "
                + ("unknown name" if e["type"] == "extra_forbidden" else e["msg"])
                for e in exc.errors()
            )
            raise ConfigError(f"invalid weights '{text}' ({reasons}; names: {valid})") from exc


def _default_missing() -> dict[str, float]:
    return {
        "checkpoint_best": 0.1,
        "metrics_csv": 0.05,
        "test_predictions": 0.05,
        "plots": 0.02,
        "report": 0.02,
        "dashboard": 0.02,
    }


class Penalties(StrictModel):
    """Subtracted from the score: per missing artifact flag, and per run status."""

    missing: dict[str, float] = Field(
        default_factory=_default_missing,
        description="Artifact flag (summary.json `artifacts`) -> penalty when it is false/absent.",
    )
    status: dict[str, float] = Field(
        default_factory=lambda: {"failed": 0.25},
        description="Run status -> penalty (a failed run is ranked, below its peers).",
    )

    @classmethod
    def parse(cls, text: str | None) -> Penalties:
        """`checkpoint_best=0.2,status.failed=0.5`: artifact flags, or `status.<status>`."""
        pen = cls()
        for key, value in _parse_pairs(text or "", "penalty").items():
            if value < 0:
                raise ConfigError(f"penalty '{key}' must be >= 0, got {value}")
            if key.startswith("status."):
                pen.status = {**pen.status, key.removeprefix("status."): value}
            else:
                pen.missing = {**pen.missing, key: value}
        return pen


def missing_and_penalty(
    artifacts: Iterable[Mapping[str, Any]], status: Iterable[Any], penalties: Penalties
) -> tuple[list[str], list[float]]:
    """Per run: its missing penalised artifacts (comma-joined) and its total penalty."""
    missing_out, penalty_out = [], []
    for flags, st in zip(artifacts, status, strict=True):
        missing = [name for name in penalties.missing if not flags.get(name)]
        missing_out.append(",".join(missing))
        penalty_out.append(
            sum(penalties.missing[m] for m in missing) + penalties.status.get(str(st), 0.0)
        )
    return missing_out, penalty_out


REFERENCE_KM = 20037.5
"""Half the Earth's circumference: the worst possible error, the fixed end of the km scale."""


def reference_part(value: Any, higher_is_better: bool) -> float:
    """One score part against a fixed reference, not the other runs: accuracy as it is, km on a
    log scale from 1 (0 km) to 0 (half the Earth), so a run keeps its score when others join."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        return 0.0
    if v != v:  # NaN: missing
        return 0.0
    if higher_is_better:
        return min(max(v, 0.0), 1.0)
    return min(max(1.0 - math.log1p(max(v, 0.0)) / math.log1p(REFERENCE_KM), 0.0), 1.0)


def reference_score(
    metrics: Mapping[str, Any], weights: ScoreWeights | None = None
) -> float | None:
    """The leaderboard's weighted parts of one run (`best_val_acc`, `best_p90_km`,
    `last_geo_median_km`) against the fixed reference; None when the run has none of them."""
    weights = weights or ScoreWeights()
    if all(metrics.get(key) is None for _, key, _, _ in SCORE_PARTS):
        return None
    total = sum(getattr(weights, name) for name, *_ in SCORE_PARTS)
    parts = sum(
        getattr(weights, name) * reference_part(metrics.get(key), higher)
        for name, key, _, higher in SCORE_PARTS
    )
    return parts / total
