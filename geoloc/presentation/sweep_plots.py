"""Plots of an Optuna sweep: `sweep_history.png` and `sweep_params.png`.

Called by `geoloc.integrations.optuna`; the study is read duck-typed, so optuna is not imported.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from geoloc.atomic import atomic_path
from geoloc.presentation.plots import MissingInput, pyplot

log = logging.getLogger(__name__)


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
    plt = pyplot()
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
