"""`train_run(cfg) -> run_dir`: the one entry point that turns the index into a run.

config -> index check -> datasets -> model/loss -> `fit` -> best checkpoint on val/test ->
predictions, metrics.csv, summary.json. A failure anywhere leaves `summary.json` with
`status: failed` and the reason before the exception goes on; a pruning callback leaves
`status: pruned`. Rerank, report and MLflow come after, in the composer (`geoloc.compose`);
`geoloc.infer.trained.load_trained` is the way back from a run to its model.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from geoloc.atomic import write_parquet
from geoloc.compute import resolve_compute, resolve_device, seed_everything, under_torchrun
from geoloc.config import RunConfig, save_config
from geoloc.data.dataset import GeoDataset, index_files
from geoloc.data.run_data import RunData, load_run_data, resolve_index_dir
from geoloc.data.streaming import eval_loader
from geoloc.errors import ConfigError, TrainingError, TrialPruned
from geoloc.formatting import fmt_km, fmt_share
from geoloc.geo import LabelSpace
from geoloc.paths import runs_dir
from geoloc.progress import EpochCallback, progress_log
from geoloc.runfolder.layout import RunPaths, new_run_id
from geoloc.runfolder.summary import (
    failure_text,
    hold_training_lock,
    record_failure,
    reserved_space,
    update_summary,
)
from geoloc.train.checkpoint import load_checkpoint
from geoloc.train.distributed import (
    DistContext,
    agree_run_dir,
    current_context,
    init_process_group,
    joined_group,
    launch,
)
from geoloc.train.loop import FitState, fit
from geoloc.train.records import (
    METRIC_COLUMNS,
    Recorder,
    clean_metrics,
    epoch_summary,
    start_summary,
    write_metrics_csv,
)
from geoloc.train.steps import EvalResult, evaluate

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------


def check_run_config(cfg: RunConfig) -> None:
    """Reject settings the loop cannot honour, before any file is written."""
    if cfg.train.early_stopping_metric not in METRIC_COLUMNS[1:-2]:
        raise ConfigError(
            f"train.early_stopping_metric '{cfg.train.early_stopping_metric}' is not a metric; "
            f"valid: {', '.join(METRIC_COLUMNS[1:-2])}"
        )
    from geoloc.model import head_names, model_names
    from geoloc.model.losses import check_loss_for_head

    if cfg.model.arch not in model_names():
        raise ConfigError(
            f"model.arch '{cfg.model.arch}' is not a registered model; "
            f"valid: {', '.join(model_names())}"
        )
    if cfg.model.head not in head_names():
        raise ConfigError(
            f"model.head '{cfg.model.head}' is not a registered head; "
            f"valid: {', '.join(head_names())}"
        )
    check_loss_for_head(cfg.train, cfg.model.head)
    if cfg.train.batch_size % cfg.train.nproc:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is the global batch and must split evenly "
            f"over train.nproc={cfg.train.nproc} processes"
        )
    if cfg.train.embeddings == "cache" and (cfg.train.nproc > 1 or under_torchrun()):
        raise ConfigError(
            "train.embeddings=cache trains the heads on stored embeddings in one process; set "
            "train.nproc=1 (and run without torchrun)"
        )
    from geoloc.model.backbones import check_pretrained

    check_pretrained(cfg.model)  # missing weights fail here, not after the run folder exists


def _with_defaults(model_section: dict[str, Any]) -> dict[str, Any]:
    from geoloc.config import ModelConfig

    try:
        return ModelConfig.model_validate(model_section).model_dump(mode="json")
    except ValueError:  # pydantic's ValidationError: compare as saved
        return dict(model_section)


def check_resumable(
    ckpt: dict[str, Any], cfg: RunConfig, label_space: LabelSpace, path: Path
) -> None:
    """An incompatible checkpoint (other model or label space) is an error naming it."""
    saved = ckpt.get("config") or {}
    saved_model = _with_defaults(saved.get("model") or {})  # keys added since default to old ways
    if saved_model != cfg.model.model_dump(mode="json"):
        diff = sorted(
            k for k, v in cfg.model.model_dump(mode="json").items() if saved_model.get(k) != v
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
            f"than the index at '{resolve_index_dir(cfg)}' ({label_space.fingerprint!r}, "
            f"{label_space.num_classes} classes): resume with the run's own index "
            "(index_dir in its config.json), or start a new run"
        )
    if saved.get("seed") != cfg.seed or saved.get("train") != cfg.train.model_dump(mode="json"):
        log.warning("resuming '%s' with a changed train config or seed: results will differ "
                    "from an uninterrupted run", path)  # fmt: skip


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def build_model_and_loss(
    cfg: RunConfig, label_space: LabelSpace, splits_parquet: Path
) -> tuple[nn.Module, nn.Module]:
    """The model and the child-head loss the config names (registries in `geoloc.model`)."""
    from geoloc.model import compute_class_weights_from_parquet, create_loss, create_model

    model = create_model(cfg.model, label_space.num_classes, label_space.num_parents,
                         parent_of=label_space.parent_of,
                         topk_parents=cfg.train.hier_topk_parents)  # fmt: skip
    weights = None
    if cfg.train.class_weighting != "none":
        weights = compute_class_weights_from_parquet(
            splits_parquet,
            label_space.num_classes,
            cfg.train.class_weighting,
            cfg.train.class_weight_beta,
        )
    return model, create_loss(cfg.train, label_space, weights, head=cfg.model.head)


def train_run(
    cfg: RunConfig,
    *,
    run_dir: Path | None = None,
    resume: Path | None = None,
    callbacks: Sequence[EpochCallback] = (),
    on_start: Callable[[Path], None] | None = None,
    progress: bool = True,
) -> Path:
    """Train `cfg` into `runs/<run_id>/` (or `run_dir`); `resume` continues that run's last.pt.

    Returns the run directory, with checkpoints, predictions, metrics.csv and summary.json;
    reports and MLflow are the composer's (`geoloc.compose`). `on_start(run_dir)` runs once the
    folder and its summary exist, before the first epoch (the composer starts its live mirror
    there). Bad input (missing/empty index, empty split, incompatible checkpoint) raises a
    `GeolocError` before a run directory is created. `TrialPruned` from a callback ends the run
    with status `pruned` and is re-raised; any other exception ends it with status `failed` and
    its reason, and is re-raised. With `train.nproc > 1` it starts the ranks on this host; under
    torchrun this process is one of them.
    """
    check_run_config(cfg)
    data = load_run_data(cfg, resolve_index_dir(cfg), progress)
    resume_ckpt = None
    if resume is not None:
        run_dir = Path(resume)
        ckpt_path = RunPaths(run_dir).last_checkpoint
        resume_ckpt = load_checkpoint(ckpt_path)
        check_resumable(resume_ckpt, cfg, data.label_space, ckpt_path)
    if current_context() is None and (cfg.train.nproc > 1 or under_torchrun()):
        if callbacks or on_start is not None:
            raise ConfigError(
                f"train.nproc={cfg.train.nproc}: epoch callbacks (pruning, live mirroring) need "
                "train.nproc=1"
            )
        target = Path(run_dir) if run_dir else runs_dir() / new_run_id(cfg.name)
        if under_torchrun():  # this process is one of torchrun's ranks
            return run_rank(cfg, target, resume, progress)
        return launch(run_rank, cfg, run_dir=target, resume=resume, progress=progress)
    paths = RunPaths(Path(run_dir) if run_dir else runs_dir() / new_run_id(cfg.name)).make()
    lock = hold_training_lock(paths.root)  # held until the end: a killed run is told apart
    save_config(cfg, paths.config)
    dist = current_context()
    start_summary(paths, cfg, data.label_space, resumed=resume_ckpt is not None,
                  world_size=1 if dist is None else dist.world_size)  # fmt: skip
    progress_log.info("run %s: writing %s", paths.run_id, paths.root)
    if on_start is not None:
        on_start(paths.root)
    recorder = Recorder(
        paths, cfg, FitState.from_checkpoint(resume_ckpt) if resume_ckpt else FitState()
    )
    recorder.flush()
    try:
        with reserved_space(paths.root):  # a full disk must not keep the run `running`
            _train_and_evaluate(cfg, paths, data, [recorder, *callbacks], resume_ckpt, progress)
    except TrialPruned as exc:
        update_summary(paths.root, status="pruned", failure_reason=str(exc) or "pruned")
        raise
    except BaseException as exc:
        record_failure(paths.root, failure_text(exc))
        raise
    finally:
        lock.close()
    return paths.root


def run_rank(cfg: RunConfig, run_dir: Path, resume: Path | None, progress: bool) -> Path:
    """One rank of a distributed run: rank 0 runs `train_run` (and writes), the others `fit`."""
    with joined_group(init_process_group(cfg.train.device)) as ctx:
        run_dir = agree_run_dir(ctx, Path(resume or run_dir))
        if ctx.is_main:
            return train_run(cfg, run_dir=None if resume else run_dir, resume=resume,
                             progress=progress)  # fmt: skip
        _train_follower(ctx, cfg, run_dir, resume)
        return run_dir


def _train_follower(ctx: DistContext, cfg: RunConfig, run_dir: Path, resume: Path | None) -> None:
    """What a rank other than 0 does: the same model and data, `fit` without writing anything."""
    progress_log.setLevel(logging.WARNING)  # rank 0 reports progress for the whole run
    data = load_run_data(cfg, resolve_index_dir(cfg), progress=False)
    paths = RunPaths(run_dir)
    resume_ckpt = load_checkpoint(paths.last_checkpoint) if resume is not None else None
    seed_everything(cfg.seed, ctx.rank, cfg.train.deterministic)
    model, criterion = build_model_and_loss(
        cfg, data.label_space, index_files(data.index_dir)["splits"]
    )
    criterion.to(ctx.device)
    fit(model, data.train, data.val, criterion, data.label_space, cfg, ctx.device,
        paths.checkpoints, resume_from=resume_ckpt, progress=False, dist=ctx)  # fmt: skip


def _train_and_evaluate(
    cfg: RunConfig,
    paths: RunPaths,
    data: RunData,
    hooks: Sequence[EpochCallback],
    resume_ckpt: dict[str, Any] | None,
    progress: bool,
) -> None:
    seed_everything(cfg.seed, deterministic=cfg.train.deterministic)
    dist = current_context()
    device = dist.device if dist is not None else resolve_device(cfg.train.device)
    model, criterion = build_model_and_loss(
        cfg, data.label_space, index_files(data.index_dir)["splits"]
    )
    criterion.to(device)
    if cfg.train.embeddings == "cache":
        data = _stored_features(model, data, cfg, device, progress)
    progress_log.info(
        "run %s: %s, %s loss, %s train / %s val images, %s classes, %d epochs on %s",
        paths.run_id, cfg.model.arch, cfg.train.loss, f"{len(data.train):,}", f"{len(data.val):,}",
        f"{data.label_space.num_classes:,}", cfg.train.epochs, device,
    )  # fmt: skip
    result = fit(
        model, data.train, data.val, criterion, data.label_space, cfg, device, paths.checkpoints,
        callbacks=hooks, resume_from=resume_ckpt, progress=progress, dist=dist,
    )  # fmt: skip

    # final numbers come from the best checkpoint (last.pt when no epoch improved); when the
    # last epoch was the best, the model in memory is it and its val pass is reused
    val = result.best_val if dist is None else None
    if val is None:
        best = paths.best_checkpoint if paths.best_checkpoint.is_file() else paths.last_checkpoint
        model.load_state_dict(load_checkpoint(best, map_location=device)["model"])
        val = _evaluate_split(model, data.val, criterion, data.label_space, cfg, device, "val",
                              progress)  # fmt: skip
    write_parquet(paths.val_predictions, val.predictions)
    test_metrics = None
    skipped = {"train": getattr(data.train, "skipped", 0) + result.skipped_train,
               "val": getattr(data.val, "skipped", 0) + val.skipped, "test": 0}  # fmt: skip
    if data.test is not None:
        test = _evaluate_split(model, data.test, criterion, data.label_space, cfg, device, "test",
                               progress)  # fmt: skip
        write_parquet(paths.test_predictions, test.predictions)
        test_metrics = clean_metrics(test.metrics)
        skipped["test"] = getattr(data.test, "skipped", 0) + test.skipped
        progress_log.info(
            "run %s: test top-1 %s, median %s, P90 %s (best epoch %s)", paths.run_id,
            fmt_share(test_metrics.get("test_top1")), fmt_km(test_metrics.get("test_median_km")),
            fmt_km(test_metrics.get("test_p90_km")), result.state.best_epoch,
        )  # fmt: skip
    write_metrics_csv(paths.metrics_csv, result.state.history)
    update_summary(
        paths.root,
        status="completed",
        failure_reason=None,
        test=test_metrics,
        # unreadable images left out (damaged shards): a degraded run says so and by how much
        skipped_images=skipped,
        degraded=any(skipped.values()),
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
    loader = eval_loader(dataset, cfg.train.batch_size, cfg.train.num_workers,
                         pin_memory=device.type == "cuda")
    return evaluate(
        model, loader, criterion, label_space, device, prefix=prefix,
        parent_loss_weight=cfg.train.parent_loss_weight,
        hier_topk_parents=cfg.train.hier_topk_parents,
        compute=resolve_compute(cfg.train, device, model), progress=progress,
    )  # fmt: skip


def _stored_features(
    model: nn.Module, data: RunData, cfg: RunConfig, device: torch.device, progress: bool
) -> RunData:
    """`train.embeddings=cache`: every split as the frozen backbone's stored features."""
    from geoloc.train.embeddings import embed_split

    def stored(ds: GeoDataset) -> Any:
        return embed_split(model, ds, cfg, device, data.index_dir, progress=progress)

    test = stored(data.test) if data.test is not None else None
    return replace(data, train=stored(data.train), val=stored(data.val), test=test)
