"""What a training run records while it trains: metrics.csv and summary.json, kept current.

The composer and reports read these files; nothing downstream re-derives what they record.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from geoloc.atomic import write_text
from geoloc.compute import determinism_settings
from geoloc.config import RunConfig
from geoloc.errors import GeolocError
from geoloc.geo import LabelSpace
from geoloc.runfolder.layout import RunPaths
from geoloc.runfolder.summary import (
    finite_or_none,
    new_summary,
    read_summary,
    rerun_differences,
    update_summary,
    write_summary,
)
from geoloc.train.loop import FitState, is_better

log = logging.getLogger(__name__)

METRIC_COLUMNS = (
    "epoch", "train_loss", "train_margin_loss", "val_loss", "val_top1", "val_top5",
    "val_parent_acc", "val_median_km", "val_p90_km", "val_p95_km", "val_acc_1km", "val_acc_25km",
    "val_acc_200km", "val_acc_750km", "val_acc_2500km", "val_geoscore", "lr", "epoch_time_s",
)  # fmt: skip
"""metrics.csv columns, in order (docs/ARCHITECTURE.md, "Metric names"). `train_margin_loss`
(the part of `train_loss` that `hardneg.mode=margin` adds) is empty for other runs."""


def clean_metrics(metrics: dict[str, Any]) -> dict[str, Any]:
    """Metrics as summary.json stores them (non-finite values become null)."""
    return {k: finite_or_none(v) for k, v in metrics.items()}


def write_metrics_csv(path: Path, history: Sequence[dict[str, Any]]) -> None:
    """Rewrite metrics.csv whole from the run's history (atomic; a resume never duplicates)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(METRIC_COLUMNS), extrasaction="ignore")
    writer.writeheader()
    for row in history:
        writer.writerow({k: row.get(k) for k in METRIC_COLUMNS})
    write_text(path, buf.getvalue())


def config_subset(cfg: RunConfig) -> dict[str, Any]:
    """The few settings that tell runs apart on a leaderboard."""
    return {
        "arch": cfg.model.arch,
        "loss": cfg.train.loss,
        "hierarchy": cfg.model.hierarchy,
        "hardneg": cfg.hardneg.enabled,
        "epochs": cfg.train.epochs,
        "batch_size": cfg.train.batch_size,
        "lr": cfg.train.lr,
        "weight_decay": cfg.train.weight_decay,
        "image_size": cfg.train.image_size,
        "tau_km": cfg.train.tau_km,
        "hier_topk_parents": cfg.train.hier_topk_parents,
        "class_weighting": cfg.train.class_weighting,
        "sampling": cfg.train.sampling,
        "seed": cfg.seed,
    }


def dataset_info(label_space: LabelSpace) -> dict[str, Any]:
    return {
        "fingerprint": label_space.fingerprint or None,
        "num_classes": label_space.num_classes,
        "num_parents": label_space.num_parents,
        "resolution": label_space.resolution,
        "parent_resolution": label_space.parent_resolution,
    }


def epoch_summary(history: Sequence[dict[str, Any]], best_epoch: int | None) -> dict[str, Any]:
    """The per-epoch part of summary.json (last, best, best_val_acc, best_p90_km...)."""
    if not history:
        return {"epochs_completed": 0}
    last = history[-1]
    best = next((h for h in history if h["epoch"] == best_epoch), last)
    acc = [h["val_top1"] for h in history if math.isfinite(h["val_top1"])]
    p90 = [h["val_p90_km"] for h in history if math.isfinite(h["val_p90_km"])]
    return {
        "epochs_completed": int(last["epoch"]),
        "best_epoch": best_epoch,
        "best_val_acc": max(acc) if acc else None,
        "best_p90_km": min(p90) if p90 else None,
        "last_geo_median_km": finite_or_none(last["val_median_km"]),
        "last": clean_metrics({k: last.get(k) for k in METRIC_COLUMNS}),
        "best": clean_metrics({k: best.get(k) for k in METRIC_COLUMNS}),
    }


class Recorder:
    """Epoch callback that keeps metrics.csv and summary.json current while the run trains.

    It runs first among the callbacks, so an epoch that a later callback aborts (pruning, a
    crash) is still on disk, like the checkpoint `fit` wrote before calling it.
    """

    def __init__(self, paths: RunPaths, cfg: RunConfig, start: FitState) -> None:
        self.paths = paths
        self.metric = cfg.train.early_stopping_metric
        self.mode = cfg.train.early_stopping_mode
        self.history = list(start.history)
        self.best_value, self.best_epoch = start.best_value, start.best_epoch

    def __call__(self, epoch: int, metrics: dict[str, Any]) -> None:
        self.history = [h for h in self.history if h["epoch"] < epoch] + [metrics]
        if is_better(metrics.get(self.metric), self.best_value, self.mode):
            self.best_value, self.best_epoch = metrics[self.metric], epoch
        self.flush()

    def flush(self) -> None:
        write_metrics_csv(self.paths.metrics_csv, self.history)
        update_summary(self.paths.root, **epoch_summary(self.history, self.best_epoch))


def start_summary(
    paths: RunPaths, cfg: RunConfig, label_space: LabelSpace, resumed: bool, world_size: int = 1
) -> None:
    """A fresh `running` summary.json with what a rerun needs (code, libraries, determinism
    settings); a resumed run keeps its start time and tracking, and one warning line names
    what differs from the settings it started under (its numbers will differ then)."""
    summary = new_summary(paths.run_id, cfg.name, config_subset(cfg))
    summary["determinism"] = determinism_settings(cfg, world_size)
    if resumed and paths.summary.is_file():
        try:
            old = read_summary(paths.root)
            summary.update({k: old[k] for k in ("created_at", "tracking") if k in old})
            if diffs := rerun_differences(old, summary):
                log.warning(
                    "resuming %s under other settings than it ran with (%s): its numbers will "
                    "differ from an uninterrupted run", paths.root, ", ".join(diffs),
                )  # fmt: skip
        except GeolocError as exc:
            log.warning("previous summary of %s unreadable (%s); starting a fresh one", paths, exc)
    summary["dataset"] = dataset_info(label_space)
    write_summary(paths.root, summary)
