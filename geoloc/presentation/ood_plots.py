"""The reliability of the error radius against the out-of-distribution score (issue 25).

Drawn only for a run whose per-image answers carry an `ood_score` (`geoloc rerank` since the
OOD step, `geoloc.infer.ood`); an older run's report simply has no such plot. The test answers
(`rerank_test_predictions.parquet`) and those of every photo folder `geoloc evaluate` scored
(`rerank_<name>_predictions.parquet`, e.g. the uniform-land shift split) are binned by score on
common edges; each bin shows the share of truths inside the radius against the asked coverage,
and the median radius: a radius that is honest off the map widens where the score rises.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pandas as pd

from geoloc.presentation.inputs import RunInputs
from geoloc.presentation.plots import MissingInput, PlotOutcome, PlotSpec, draw_plot

__all__ = ["OOD_PLOTS", "draw_optional_plots", "draw_ood_reliability", "ood_answer_sets"]

BINS = 6
"""Score bins (quantiles of all the answers' scores)."""


def ood_answer_sets(inputs: RunInputs) -> dict[str, pd.DataFrame]:
    """{"test": ..., "<name>": ...}: per-image answers with an OOD score, by split or folder."""
    found: dict[str, pd.DataFrame] = {}
    need = {"ood_score", "within_radius", "radius_km"}
    test = inputs.rerank_predictions
    if test is not None and need <= set(test.columns):
        found["test"] = test
    for path in sorted(inputs.paths.data.glob("rerank_*_predictions.parquet")):
        name = path.name.removeprefix("rerank_").removesuffix("_predictions.parquet")
        if name == "test":
            continue
        try:
            df = pd.read_parquet(path)
        except (OSError, ValueError):
            continue
        if need <= set(df.columns):
            found[name] = df
    return {k: v[np.isfinite(v["ood_score"].to_numpy(dtype=float))] for k, v in found.items()}


def _thresholds(inputs: RunInputs) -> dict[str, float]:
    """The flag and widening thresholds chosen on val (rerank_params.json), when readable."""
    try:
        ood = json.loads(inputs.paths.rerank_params.read_text()).get("ood") or {}
    except (OSError, ValueError, AttributeError):
        return {}
    named = {"flag": ood.get("threshold"), "widen": ood.get("widen_threshold")}
    return {k: float(v) for k, v in named.items() if isinstance(v, int | float)}


def draw_ood_reliability(fig: Any, inputs: RunInputs) -> None:
    """Radius coverage (bars' markers) and median radius (dashed) per OOD-score bin."""
    sets = ood_answer_sets(inputs)
    if not sets:
        raise MissingInput("no per-image OOD scores (rerank this run again)")
    pooled = np.concatenate([df["ood_score"].to_numpy(dtype=float) for df in sets.values()])
    edges = np.unique(np.quantile(pooled, np.linspace(0, 1, BINS + 1)))
    if edges.size < 2:
        raise MissingInput("every OOD score is the same")
    mids = np.arange(edges.size - 1)
    ax = fig.add_subplot(1, 1, 1)
    ax2 = ax.twinx()
    for i, (name, df) in enumerate(sets.items()):
        b = np.clip(np.searchsorted(edges, df["ood_score"], side="right") - 1, 0, mids.size - 1)
        grouped = df.assign(bin=b).groupby("bin")
        cov = grouped["within_radius"].mean().reindex(mids)
        rad = grouped["radius_km"].median().reindex(mids)
        n = grouped.size().reindex(mids, fill_value=0)
        ax.plot(mids, cov, marker="o", color=f"C{i}", label=f"{name}: coverage ({len(df):,})")
        ax2.plot(mids, rad, ls="--", color=f"C{i}", alpha=0.6, label=f"{name}: median radius")
        for x, c, k in zip(mids, cov, n, strict=True):
            if np.isfinite(c):
                ax.annotate(f"{k}", (x, c), textcoords="offset points", xytext=(0, 5),
                            fontsize=6, ha="center", color=f"C{i}")  # fmt: skip
    level = next(iter(sets.values()))["radius_coverage"].iloc[0] if len(pooled) else np.nan
    if np.isfinite(level):
        ax.axhline(level, color="grey", lw=0.8, ls=":", label=f"asked {level:.0%}")
    for name, t in _thresholds(inputs).items():
        x = np.interp(t, edges, np.arange(edges.size)) - 0.5
        ax.axvline(x, color="black", lw=0.6, ls="-." if name == "flag" else ":")
        ax.text(x, 0.02, f" {name}", fontsize=7, rotation=90, va="bottom")
    ax.set_xticks(mids, [f"{a:.1f}..{b:.1f}" for a, b in zip(edges[:-1], edges[1:], strict=True)],
                  fontsize=7)  # fmt: skip
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("OOD score bin (0: a typical val photo; higher: further from training photos)")
    ax.set_ylabel("share of truths inside the radius")
    ax2.set_yscale("log")
    ax2.set_ylabel("median radius (km)")
    lines = ax.get_legend_handles_labels()
    more = ax2.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], fontsize=7, loc="lower left")
    ax.set_title("Error radius against the OOD score: coverage per bin", fontsize=9)


OOD_PLOTS: tuple[PlotSpec, ...] = (
    PlotSpec("ood_reliability", "Error radius against the OOD score", draw_ood_reliability,
             size=(8.0, 4.5), margins=(0.09, 0.14, 0.9, 0.92)),
)  # fmt: skip


def draw_optional_plots(inputs: RunInputs) -> list[PlotOutcome]:
    """The plots a run only has when its inputs exist: drawn ones only, no "not available"."""
    if not ood_answer_sets(inputs):
        return []
    out_dir = inputs.paths.plots
    out_dir.mkdir(parents=True, exist_ok=True)
    return [draw_plot(spec, inputs, out_dir) for spec in OOD_PLOTS]
