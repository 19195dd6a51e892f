"""The leaderboard across runs: `runs/_aggregate/` (CSV, Parquet and a sortable dashboard).

Every `runs/<run_id>/summary.json` is read once (what the run recorded; nothing is re-derived).
Runs that cannot be ranked (corrupt summary, unknown schema version, still running, no
summary) are listed as skipped with the reason, in every output: never a crash, never dropped.

Score of a ranked run (parts kept as columns; see README "Reports and the leaderboard"):

    norm_acc    = (best_val_acc - min) / (max - min)              higher accuracy is better
    norm_p90    = (max - best_p90_km) / (max - min)               lower P90 is better
    norm_median = (max - last_geo_median_km) / (max - min)        lower median is better
    score = (w_acc * norm_acc + w_p90 * norm_p90 + w_median * norm_median) / (w_acc + w_p90
            + w_median) - penalty

min/max are over the ranked runs; a metric equal in every run normalises to 1, a missing one
to 0. `penalty` sums the configured weight of each missing artifact and of the run's status.
"""

from __future__ import annotations

import html
import json
import logging
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from geoloc.atomic import write_parquet, write_text
from geoloc.errors import ConfigError, GeolocError
from geoloc.paths import aggregate_dir, runs_dir
from geoloc.runs.summary import SummaryError, parse_summary

log = logging.getLogger(__name__)

CSV_NAME = "runs_summary.csv"
PARQUET_NAME = "runs_summary.parquet"
DASHBOARD_NAME = "dashboard.html"
# folders under runs/ that are not runs
RESERVED_DIRS = frozenset({"_aggregate", "_sweeps"})

# the three score parts: summary key, column of the normalised value, higher-is-better
SCORE_PARTS: tuple[tuple[str, str, str, bool], ...] = (
    ("acc", "best_val_acc", "norm_acc", True),
    ("p90", "best_p90_km", "norm_p90", False),
    ("median", "last_geo_median_km", "norm_median", False),
)

COLUMNS: tuple[str, ...] = (
    "rank",
    "run_id",
    "run_name",
    "status",
    "score",
    "norm_acc",
    "norm_p90",
    "norm_median",
    "penalty",
    "missing_artifacts",
    "best_val_acc",
    "best_p90_km",
    "last_geo_median_km",
    "test_top1",
    "test_median_km",
    "test_p90_km",
    "rerank_variant",
    "epochs_completed",
    "best_epoch",
    "arch",
    "loss",
    "fingerprint",
    "created_at",
    "updated_at",
    "failure_reason",
    "dashboard",
    "skipped",
    "skip_reason",
)
_FLOAT_COLUMNS = (
    "score",
    "norm_acc",
    "norm_p90",
    "norm_median",
    "penalty",
    "best_val_acc",
    "best_p90_km",
    "last_geo_median_km",
    "test_top1",
    "test_median_km",
    "test_p90_km",
)
_INT_COLUMNS = ("rank", "epochs_completed", "best_epoch")
_STR_COLUMNS = tuple(c for c in COLUMNS if c not in (*_FLOAT_COLUMNS, *_INT_COLUMNS, "skipped"))


# --------------------------------------------------------------------------------------------
# Score configuration
# --------------------------------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


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


class ScoreWeights(_Strict):
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


class Penalties(_Strict):
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


# --------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkippedRun:
    """A run folder that is listed but not ranked, and why."""

    run_id: str
    reason: str


@dataclass
class AggregateResult:
    """What `aggregate_runs` produced: publish `ranked` (MLflow, Prefect artifacts) as is."""

    ranked: pd.DataFrame
    skipped: list[SkippedRun]
    table: pd.DataFrame  # ranked rows then skipped rows, the CSV/Parquet content
    weights: ScoreWeights
    penalties: Penalties
    csv_path: Path | None = None
    parquet_path: Path | None = None
    dashboard_path: Path | None = None
    paths: list[Path] = field(default_factory=list)


def iter_run_dirs(root: Path) -> Iterator[os.DirEntry[str]]:
    """Every run folder under `root`: not `_aggregate`, `_sweeps` or a dot-folder."""
    with os.scandir(root) as entries:
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name in RESERVED_DIRS:
                continue
            if entry.is_dir(follow_symlinks=False):
                yield entry


def _config_value(config: Mapping[str, Any], dotted: str) -> Any:
    """A config subset may be flat (`model.arch`), nested or keyed by leaf (`arch`)."""
    if dotted in config:
        return config[dotted]
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            node = None
            break
        node = node[part]
    return node if node is not None else config.get(dotted.rsplit(".", 1)[-1])


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def summary_row(run_id: str, summary: Mapping[str, Any]) -> dict[str, Any]:
    """The leaderboard columns a summary provides (score columns come later)."""
    test = summary.get("test") or {}
    config = summary.get("config") or {}
    dataset = summary.get("dataset") or {}
    artifacts = summary.get("artifacts") or {}
    rerank = summary.get("rerank") or {}
    arch, loss = _config_value(config, "model.arch"), _config_value(config, "train.loss")
    return {
        "run_id": run_id,
        "run_name": summary.get("run_name") or "",
        "status": summary.get("status"),
        "best_val_acc": _num(summary.get("best_val_acc")),
        "best_p90_km": _num(summary.get("best_p90_km")),
        "last_geo_median_km": _num(summary.get("last_geo_median_km")),
        "test_top1": _num(test.get("test_top1")),
        "test_median_km": _num(test.get("test_median_km")),
        "test_p90_km": _num(test.get("test_p90_km")),
        "rerank_variant": rerank.get("variant"),
        "epochs_completed": summary.get("epochs_completed"),
        "best_epoch": summary.get("best_epoch"),
        "arch": None if arch is None else str(arch),
        "loss": None if loss is None else str(loss),
        "fingerprint": dataset.get("fingerprint"),
        "created_at": summary.get("created_at"),
        "updated_at": summary.get("updated_at"),
        "failure_reason": summary.get("failure_reason"),
        "dashboard": f"../{run_id}/dashboard.html" if artifacts.get("dashboard") else None,
        "_artifacts": artifacts,
        "skipped": False,
        "skip_reason": None,
    }


def read_run(entry: os.DirEntry[str] | Path) -> dict[str, Any] | SkippedRun:
    """One run folder -> its leaderboard row, or why it is skipped."""
    path = Path(entry)
    run_id = path.name
    try:
        text = (path / "summary.json").read_bytes()
    except FileNotFoundError:
        return SkippedRun(run_id, "no summary.json")
    except OSError as exc:
        return SkippedRun(run_id, f"summary.json unreadable: {exc.strerror or exc}")
    try:
        summary = parse_summary(text)
    except SummaryError as exc:
        return SkippedRun(run_id, str(exc))
    if summary.get("status") == "running":
        return SkippedRun(run_id, "run still in progress (status: running)")
    return summary_row(run_id, summary)


def read_runs(root: Path) -> tuple[list[dict[str, Any]], list[SkippedRun]]:
    """Rows of every rankable run, and the skipped ones, sorted by run id."""
    rows: list[dict[str, Any]] = []
    skipped: list[SkippedRun] = []
    for entry in sorted(iter_run_dirs(root), key=lambda e: e.name):
        got = read_run(entry)
        if isinstance(got, SkippedRun):
            skipped.append(got)
        else:
            rows.append(got)
    return rows, skipped


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


def normalise(values: pd.Series, higher_is_better: bool) -> pd.Series:
    """Min-max to [0, 1] with 1 the best; all equal -> 1, missing -> 0."""
    v = values.astype("float64")
    lo, hi = v.min(skipna=True), v.max(skipna=True)
    if pd.isna(lo):
        return pd.Series(0.0, index=v.index)
    if hi == lo:
        out = v.notna().astype("float64").where(v.notna())
    else:
        out = (v - lo) / (hi - lo) if higher_is_better else (hi - v) / (hi - lo)
    return out.fillna(0.0)


def _missing_and_penalty(
    artifacts: Iterable[Mapping[str, Any]], status: Iterable[Any], penalties: Penalties
) -> tuple[list[str], list[float]]:
    missing_out, penalty_out = [], []
    for flags, st in zip(artifacts, status, strict=True):
        missing = [name for name in penalties.missing if not flags.get(name)]
        missing_out.append(",".join(missing))
        penalty_out.append(
            sum(penalties.missing[m] for m in missing) + penalties.status.get(str(st), 0.0)
        )
    return missing_out, penalty_out


def score_runs(
    rows: list[dict[str, Any]], weights: ScoreWeights, penalties: Penalties
) -> pd.DataFrame:
    """Ranked leaderboard of rankable rows: score, its parts, rank (1 = best)."""
    df = pd.DataFrame(rows, columns=[*(c for c in COLUMNS if c != "rank"), "_artifacts"])
    if df.empty:
        return _typed(df.drop(columns="_artifacts"))
    total = weights.acc + weights.p90 + weights.median
    score = pd.Series(0.0, index=df.index)
    for name, source, column, higher in SCORE_PARTS:
        df[column] = normalise(df[source], higher)
        score += getattr(weights, name) * df[column]
    df["missing_artifacts"], df["penalty"] = _missing_and_penalty(
        df["_artifacts"], df["status"], penalties
    )
    df["score"] = score / total - df["penalty"]
    df = df.drop(columns="_artifacts").sort_values(
        ["score", "best_val_acc", "run_id"], ascending=[False, False, True], na_position="last"
    )
    df.insert(0, "rank", np.arange(1, len(df) + 1))
    return _typed(df.reset_index(drop=True))


def _typed(df: pd.DataFrame) -> pd.DataFrame:
    """Stable dtypes whatever the rows: CSV and Parquet readers see the same schema."""
    for col in COLUMNS:
        if col not in df.columns:
            df[col] = None
    df = df[list(COLUMNS)].copy()
    for col in _FLOAT_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("float64")
    for col in _INT_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype("Int64")
    for col in _STR_COLUMNS:
        df[col] = df[col].astype("string")
    df["skipped"] = df["skipped"].fillna(False).astype("bool")
    return df


def skipped_frame(skipped: list[SkippedRun]) -> pd.DataFrame:
    """Rows for skipped runs: same columns, `skipped` true, the reason kept."""
    rows = [
        {"run_id": s.run_id, "status": "skipped", "skipped": True, "skip_reason": s.reason}
        for s in skipped
    ]
    return _typed(pd.DataFrame(rows, columns=list(COLUMNS)))


# --------------------------------------------------------------------------------------------
# Dashboard
# --------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5rem;color:#222}
table{border-collapse:collapse;font-size:.85rem}td,th{border:1px solid #ddd;padding:.2rem .5rem}
th{background:#f4f4f4;cursor:pointer;user-select:none;position:sticky;top:0}
th.sorted-asc::after{content:" ▲"}th.sorted-desc::after{content:" ▼"}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.status-completed{color:#176f2c}.status-failed{color:#b00020}.status-pruned{color:#a05a00}
code{background:#f4f4f4;padding:0 .2rem}.formula{max-width:60rem}
"""

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
    ("status", "status"),
    ("score", "score"),
    ("norm_acc", "acc part"),
    ("norm_p90", "P90 part"),
    ("norm_median", "median part"),
    ("penalty", "penalty"),
    ("best_val_acc", "best val top-1"),
    ("best_p90_km", "best val P90 km"),
    ("last_geo_median_km", "last val median km"),
    ("test_top1", "test top-1"),
    ("test_median_km", "test median km"),
    ("epochs_completed", "epochs"),
    ("arch", "arch"),
    ("loss", "loss"),
    ("missing_artifacts", "missing artifacts"),
)


def _e(value: Any) -> str:
    return html.escape("" if value is None or value is pd.NA else str(value), quote=True)


def _cell(col: str, value: Any, row: Mapping[str, Any]) -> str:
    missing = value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value))
    if col in _FLOAT_COLUMNS or col in _INT_COLUMNS:
        if missing:
            return '<td class="num" data-v="">—</td>'
        v = float(value)
        text = f"{v:,.0f}" if abs(v) >= 1000 else (f"{v:.4g}" if col != "rank" else f"{v:.0f}")
        return f'<td class="num" data-v="{v!r}">{_e(text)}</td>'
    if col == "run_name":
        label = _e(value or row["run_id"])
        link = row.get("dashboard")
        title = f' title="{_e(row["run_id"])}"'
        if link and link is not pd.NA:
            return f'<td{title}><a href="{_e(link)}">{label}</a></td>'
        href = f"../{row['run_id']}/summary.json"
        return f'<td{title}>{label} <a href="{_e(href)}">(summary)</a></td>'
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
            '<link rel="icon" href="data:,">',  # no favicon request (a 404 on web servers)
            f"<style>{_CSS}</style></head><body>",
            "<h1>geoloc leaderboard</h1>",
            f'<p id="counts">{len(result.ranked)} ranked runs, {len(result.skipped)} skipped. '
            f'Data: <a href="{CSV_NAME}">{CSV_NAME}</a> · '
            f'<a href="{PARQUET_NAME}">{PARQUET_NAME}</a></p>',
            '<p class="formula">score = (w<sub>acc</sub>·acc part + w<sub>p90</sub>·P90 part + '
            "w<sub>median</sub>·median part) / Σw − penalty. Parts are min-max normalised over "
            "the ranked runs, 1 = best (missing metric: 0). "
            f"Weights: acc {w.acc:g}, p90 {w.p90:g}, median {w.median:g}. "
            f"Penalties for missing artifacts: {missing}; for status: {status}. "
            "Click a column to sort.</p>",
            f'<table id="leaderboard"><thead><tr>{head}</tr></thead>',
            f"<tbody>{''.join(body)}</tbody></table>",
            f"<h2>Skipped runs ({len(result.skipped)})</h2>",
            '<table id="skipped"><thead><tr><th>run</th><th>reason</th></tr></thead>',
            f"<tbody>{skipped}</tbody></table>",
            f"<script>{_SORT_JS}</script>",
            "</body></html>",
        ]
    )


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def aggregate_runs(
    root: Path | None = None,
    weights: ScoreWeights | None = None,
    penalties: Penalties | None = None,
    *,
    write: bool = True,
) -> AggregateResult:
    """Rank every run under `root` (default `$GEOLOC_RUNS_DIR`) and write `root/_aggregate/`."""
    root = Path(root) if root is not None else runs_dir()
    if not root.is_dir():
        raise GeolocError(f"runs folder '{root}' does not exist")
    weights = weights or ScoreWeights()
    penalties = penalties or Penalties()
    rows, skipped = read_runs(root)
    ranked = score_runs(rows, weights, penalties)
    table = pd.concat([ranked, skipped_frame(skipped)], ignore_index=True) if skipped else ranked
    result = AggregateResult(ranked, skipped, _typed(table), weights, penalties)
    if write:
        write_outputs(result, aggregate_dir(root))
    log.info("aggregated %d runs (%d skipped) under %s", len(ranked), len(skipped), root)
    return result


def write_outputs(result: AggregateResult, out_dir: Path) -> None:
    """CSV, Parquet and dashboard, each atomically (concurrent aggregations never tear a file)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result.csv_path = out_dir / CSV_NAME
    result.parquet_path = out_dir / PARQUET_NAME
    result.dashboard_path = out_dir / DASHBOARD_NAME
    write_text(result.csv_path, result.table.to_csv(index=False))
    write_parquet(result.parquet_path, result.table)
    write_text(result.dashboard_path, render_leaderboard(result))
    result.paths = [result.csv_path, result.parquet_path, result.dashboard_path]


def score_settings(result: AggregateResult) -> dict[str, Any]:
    """Weights and penalties as plain data (to log next to a published leaderboard)."""
    return json.loads(
        json.dumps(
            {"weights": result.weights.model_dump(), "penalties": result.penalties.model_dump()}
        )
    )
