"""`train_run(cfg) -> run_dir`: the one entry point that turns the index into a run.

config -> index check -> datasets -> model/loss -> `fit` -> best checkpoint on val/test ->
predictions, metrics.csv, summary.json -> report -> MLflow mirror. A failure anywhere leaves
`summary.json` with `status: failed` and the reason before the exception goes on; a pruning
callback leaves `status: pruned`. `load_trained` is the way back from a run to its model.
"""

from __future__ import annotations

import csv
import io
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geoloc.atomic import write_parquet, write_text
from geoloc.config import RunConfig, save_config
from geoloc.data.dataset import (
    EmptySplitError,
    GeoDataset,
    build_transforms,
    check_index,
    index_files,
    make_loader,
)
from geoloc.errors import ConfigError, DataError, GeolocError, TrialPruned
from geoloc.geo import LabelSpace
from geoloc.paths import DataPaths, runs_dir
from geoloc.runs.layout import RunPaths, new_run_id
from geoloc.runs.summary import (
    finite_or_none,
    new_summary,
    read_summary,
    update_summary,
    write_summary,
)
from geoloc.train.distributed import current_context
from geoloc.train.loop import (
    EvalResult,
    FitState,
    TrainingError,
    evaluate,
    fit,
    is_better,
    load_checkpoint,
    resolve_device,
    seed_everything,
)

log = logging.getLogger(__name__)

EpochCallback = Callable[[int, dict[str, Any]], None]

METRIC_COLUMNS = (
    "epoch", "train_loss", "val_loss", "val_top1", "val_top5", "val_parent_acc", "val_median_km",
    "val_p90_km", "val_p95_km", "val_acc_1km", "val_acc_25km", "val_acc_200km", "val_acc_750km",
    "val_acc_2500km", "val_geoscore", "lr", "epoch_time_s",
)  # fmt: skip
"""metrics.csv columns, in order (docs/ARCHITECTURE.md, "Metric names")."""


# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def resolve_index_dir(cfg: RunConfig) -> Path:
    """`cfg.index_dir`, or `$GEOLOC_DATA_DIR/index`."""
    return Path(cfg.index_dir).resolve() if cfg.index_dir else DataPaths.default().index


def check_run_config(cfg: RunConfig) -> None:
    """Reject settings the loop cannot honour, before any file is written."""
    if cfg.train.early_stopping_metric not in METRIC_COLUMNS[1:-2]:
        raise ConfigError(
            f"train.early_stopping_metric '{cfg.train.early_stopping_metric}' is not a metric; "
            f"valid: {', '.join(METRIC_COLUMNS[1:-2])}"
        )
    from geoloc.model.modeling import model_names

    if cfg.model.arch not in model_names():
        raise ConfigError(
            f"model.arch '{cfg.model.arch}' is not a registered model; "
            f"valid: {', '.join(model_names())}"
        )
    if cfg.train.batch_size % cfg.train.nproc:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is the global batch and must split evenly "
            f"over train.nproc={cfg.train.nproc} processes"
        )


@dataclass
class RunData:
    """The index as a run sees it: label space and the three splits (test may be absent)."""

    index_dir: Path
    label_space: LabelSpace
    train: GeoDataset
    val: GeoDataset
    test: GeoDataset | None


def load_run_data(cfg: RunConfig, index_dir: Path) -> RunData:
    """Check the index and open its splits; train and val must have images, test may not."""
    check_index(index_dir)
    label_space = LabelSpace.from_json(index_files(index_dir)["labels"])
    train_tf = build_transforms(cfg.train, train=True)
    eval_tf = build_transforms(cfg.train, train=False)
    train = GeoDataset(index_dir, "train", train_tf)
    val = GeoDataset(index_dir, "val", eval_tf)
    try:
        test: GeoDataset | None = GeoDataset(index_dir, "test", eval_tf)
    except EmptySplitError as exc:
        log.warning("%s: no test metrics for this run", exc)
        test = None
    for ds in (train, val, test):
        if ds is None:
            continue
        bad = (ds.labels < 0) | (ds.labels >= label_space.num_classes)
        if bad.any():
            raise DataError(
                f"split '{ds.split}' of '{index_dir}' has labels outside 0.."
                f"{label_space.num_classes - 1}: splits.parquet and labels.json disagree"
            )
    return RunData(index_dir, label_space, train, val, test)


def check_resumable(
    ckpt: dict[str, Any], cfg: RunConfig, label_space: LabelSpace, path: Path
) -> None:
    """An incompatible checkpoint (other model or label space) is an error naming it."""
    saved = ckpt.get("config") or {}
    if saved.get("model") != cfg.model.model_dump(mode="json"):
        diff = sorted(
            k
            for k, v in cfg.model.model_dump(mode="json").items()
            if (saved.get("model") or {}).get(k) != v
        )
        raise TrainingError(
            f"checkpoint '{path}' was trained with another model config (differs in: "
            f"{', '.join(diff) or 'model'}); resume with the run's own config.json"
        )
    saved_labels = ckpt.get("label_space") or {}
    if (
        saved_labels.get("fingerprint") != label_space.fingerprint
        or len(saved_labels.get("classes", [])) != label_space.num_classes
    ):
        raise TrainingError(
            f"checkpoint '{path}' was trained on another index (fingerprint "
            f"{saved_labels.get('fingerprint')!r}, {len(saved_labels.get('classes', []))} classes) "
            f"than the current one ({label_space.fingerprint!r}, {label_space.num_classes})"
        )
    if saved.get("seed") != cfg.seed or saved.get("train") != cfg.train.model_dump(mode="json"):
        log.warning("resuming '%s' with a changed train config or seed: results will differ "
                    "from an uninterrupted run", path)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Outputs
# --------------------------------------------------------------------------------------------

def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
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
        "last": _clean({k: last.get(k) for k in METRIC_COLUMNS}),
        "best": _clean({k: best.get(k) for k in METRIC_COLUMNS}),
    }


class _Recorder:
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


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def build_model_and_loss(
    cfg: RunConfig, label_space: LabelSpace, splits_parquet: Path
) -> tuple[nn.Module, nn.Module]:
    """The model and the child-head loss the config names (registries in `geoloc.model.modeling`)."""
    from geoloc.model.modeling import compute_class_weights_from_parquet, create_loss, create_model

    model = create_model(cfg.model, label_space.num_classes, label_space.num_parents)
    weights = None
    if cfg.train.class_weighting != "none":
        weights = compute_class_weights_from_parquet(
            splits_parquet,
            label_space.num_classes,
            cfg.train.class_weighting,
            cfg.train.class_weight_beta,
        )
    return model, create_loss(cfg.train, label_space, weights)


def train_run(
    cfg: RunConfig,
    *,
    run_dir: Path | None = None,
    resume: Path | None = None,
    callbacks: Sequence[EpochCallback] = (),
    progress: bool = True,
) -> Path:
    """Train `cfg` into `runs/<run_id>/` (or `run_dir`); `resume` continues that run's last.pt.

    Returns the run directory. Bad input (missing/empty index, empty split, incompatible
    checkpoint) raises a `GeolocError` before a run directory is created. `TrialPruned` from a
    callback ends the run with status `pruned` and is re-raised; any other exception ends it with
    status `failed` and its reason, and is re-raised.
    """
    check_run_config(cfg)
    data = load_run_data(cfg, resolve_index_dir(cfg))
    resume_ckpt = None
    if resume is not None:
        run_dir = Path(resume)
        ckpt_path = RunPaths(run_dir).last_checkpoint
        resume_ckpt = load_checkpoint(ckpt_path)
        check_resumable(resume_ckpt, cfg, data.label_space, ckpt_path)
    if cfg.train.nproc > 1 and current_context() is None:  # inputs checked: start the ranks
        from geoloc.train.distributed import launch

        return launch(cfg, run_dir=run_dir, resume=resume, callbacks=callbacks, progress=progress)
    paths = RunPaths(Path(run_dir) if run_dir else runs_dir() / new_run_id(cfg.name)).make()
    save_config(cfg, paths.config)
    _start_summary(paths, cfg, data.label_space, resumed=resume_ckpt is not None)
    log.info("run %s: %s", paths.run_id, paths.root)

    mirror = _start_mirror(paths, cfg)
    recorder = _Recorder(
        paths, cfg, FitState.from_checkpoint(resume_ckpt) if resume_ckpt else FitState()
    )
    recorder.flush()
    hooks: list[EpochCallback] = [recorder]
    if mirror is not None:
        hooks.append(mirror.on_epoch_end)
    hooks.extend(callbacks)
    outcome: BaseException | None = None
    try:
        _train_and_evaluate(cfg, paths, data, hooks, resume_ckpt, progress)
    except TrialPruned as exc:
        outcome = exc
        update_summary(paths.root, status="pruned", failure_reason=str(exc) or "pruned")
    except BaseException as exc:
        outcome = exc
        reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        _record_failure(paths, reason)
    _write_report(paths)
    if mirror is not None:
        _finish_mirror(mirror, paths)
    if outcome is not None:
        raise outcome
    return paths.root


def _train_and_evaluate(
    cfg: RunConfig,
    paths: RunPaths,
    data: RunData,
    hooks: Sequence[EpochCallback],
    resume_ckpt: dict[str, Any] | None,
    progress: bool,
) -> None:
    seed_everything(cfg.seed)
    dist = current_context()
    device = dist.device if dist is not None else resolve_device(cfg.train.device)
    model, criterion = build_model_and_loss(
        cfg, data.label_space, index_files(data.index_dir)["splits"]
    )
    criterion.to(device)
    result = fit(
        model, data.train, data.val, criterion, data.label_space, cfg, device, paths.checkpoints,
        callbacks=hooks, resume_from=resume_ckpt, progress=progress, dist=dist,
    )  # fmt: skip

    # final numbers come from the best checkpoint (last.pt when no epoch improved)
    best_path = paths.best_checkpoint if paths.best_checkpoint.is_file() else paths.last_checkpoint
    model.load_state_dict(load_checkpoint(best_path, map_location=device)["model"])
    val = _evaluate_split(model, data.val, criterion, data.label_space, cfg, device, "val",
                          progress)  # fmt: skip
    write_parquet(paths.val_predictions, val.predictions)
    test_metrics = None
    if data.test is not None:
        test = _evaluate_split(model, data.test, criterion, data.label_space, cfg, device, "test",
                               progress)  # fmt: skip
        write_parquet(paths.test_predictions, test.predictions)
        test_metrics = _clean(test.metrics)
    write_metrics_csv(paths.metrics_csv, result.state.history)
    update_summary(
        paths.root,
        status="completed",
        failure_reason=None,
        test=test_metrics,
        **epoch_summary(result.state.history, result.state.best_epoch),
    )


def _evaluate_split(
    model: nn.Module,
    dataset: GeoDataset,
    criterion: nn.Module,
    label_space: LabelSpace,
    cfg: RunConfig,
    device: torch.device,
    prefix: str,
    progress: bool,
) -> EvalResult:
    loader = make_loader(dataset, cfg.train.batch_size, shuffle=False, seed=cfg.seed,
                         num_workers=cfg.train.num_workers)  # fmt: skip
    return evaluate(
        model, loader, criterion, label_space, device, prefix=prefix,
        parent_loss_weight=cfg.train.parent_loss_weight,
        hier_topk_parents=cfg.train.hier_topk_parents,
        amp=cfg.train.amp and device.type == "cuda", progress=progress,
    )  # fmt: skip


def _start_summary(paths: RunPaths, cfg: RunConfig, label_space: LabelSpace, resumed: bool) -> None:
    summary = new_summary(paths.run_id, cfg.name, config_subset(cfg))
    if resumed and paths.summary.is_file():
        try:
            old = read_summary(paths.root)
            summary.update({k: old[k] for k in ("created_at", "tracking") if k in old})
        except GeolocError as exc:
            log.warning("previous summary of %s unreadable (%s); starting a fresh one", paths, exc)
    summary["dataset"] = dataset_info(label_space)
    write_summary(paths.root, summary)


def _record_failure(paths: RunPaths, reason: str) -> None:
    try:
        update_summary(paths.root, status="failed", failure_reason=reason[:2000])
    except Exception:  # noqa: BLE001 - the original error matters more than this one
        log.exception("could not record the failure in %s", paths.summary)


def _write_report(paths: RunPaths) -> None:
    """REPORT.md and dashboard.html; a reporting failure is logged, never hides the result."""
    try:
        from geoloc.runs.report import write_report

        write_report(paths.root)
    except Exception as exc:  # noqa: BLE001
        log.warning("report for %s failed: %s", paths.root, exc)
    try:  # refresh the artifact flags the report just created
        update_summary(paths.root)
    except GeolocError as exc:
        log.warning("could not refresh %s: %s", paths.summary, exc)


def _start_mirror(paths: RunPaths, cfg: RunConfig) -> Any | None:
    if not cfg.tracking.enabled:
        return None
    try:
        from geoloc.integrations.mlflow import LiveMirror
    except ImportError as exc:
        log.warning("MLflow mirroring unavailable: %s", exc)
        update_summary(paths.root, tracking={"mirrored": False, "mlflow_run_id": None,
                                             "error": f"tracking unavailable: {exc}"})  # fmt: skip
        return None
    return LiveMirror.start(paths.root, cfg)


def _finish_mirror(mirror: Any, paths: RunPaths) -> None:
    try:
        mirror.finish(paths.root)
    except Exception as exc:  # noqa: BLE001 - LiveMirror promises not to raise; belt and braces
        log.warning("MLflow mirror of %s failed: %s", paths.root, exc)
