"""The composer: one chain from a config to a published run, shared by the CLI and the flows.

train (the MLflow live mirror as an epoch callback) -> rerank evaluation -> report (REPORT.md,
dashboard.html) -> MLflow sync. The layers below produce artifacts and return them; only here
is a report written and a run mirrored, once, after everything else. An orchestrator passes
`step` to run each stage as its own unit (Prefect tasks in `flows/train.py`, with retries on
the `RETRYABLE_STEPS`); the CLI runs them as plain calls.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from geoloc.compute import torchrun_env, under_torchrun
from geoloc.config import RerankConfig, RunConfig
from geoloc.errors import DiskFullError, GeolocError
from geoloc.paths import runs_dir
from geoloc.progress import EpochCallback, progress_log, use_bars
from geoloc.runfolder.layout import RunPaths, new_run_id
from geoloc.train.run import train_run

log = logging.getLogger(__name__)

T = TypeVar("T")
StepRunner = Callable[..., Any]
"""`step(name, fn, *args, **kwargs) -> fn(*args, **kwargs)`, maybe as an orchestrator's unit."""

RETRYABLE_STEPS = frozenset({"sync-mlflow"})
"""Steps that talk to a remote service: an orchestrator may retry these, and only these."""


def call(name: str, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """The plain step runner (the CLI's): call `fn` in this process."""
    return fn(*args, **kwargs)


def is_main_process() -> bool:
    """False on torchrun's ranks other than 0: they train, and leave the rest to rank 0."""
    return torchrun_env().rank == 0


def run_training(
    cfg: RunConfig,
    *,
    run_dir: Path | None = None,
    resume: Path | None = None,
    callbacks: Sequence[EpochCallback] = (),
    progress: bool | None = None,
    step: StepRunner = call,
) -> Path:
    """Train `cfg`, then rerank, report and mirror the run; returns the run directory.

    `progress`: tqdm bars (True), log lines (False), or bars only when stderr is a terminal
    (None: `geoloc train` and `geoloc sweep`, so `geoloc sweep > log 2>&1` logs lines, not bars).

    An exception from training (bad input, a NaN loss, a pruned trial) is re-raised after the
    failed run's report and mirror were written (a run refused before its folder existed has
    neither). A report or tracking failure never fails a finished run: it is logged, and
    summary.json `tracking.error` says why (`geoloc mlflow sync` catches up later).
    """
    progress = use_bars(progress)
    target = Path(resume or run_dir or runs_dir() / new_run_id(cfg.name))
    mirror = _live_mirror(cfg)
    began: list[Path] = []  # set once training wrote its folder: a refused input publishes nothing

    def on_start(path: Path) -> None:
        began.append(path)
        if mirror is not None:
            mirror.begin(path)

    one_process = cfg.train.nproc == 1 and not under_torchrun()
    hooks = [mirror, *callbacks] if mirror is not None else list(callbacks)
    try:
        if resume is not None and training_done(target, cfg):
            progress_log.info("run %s: training already completed; resuming at rerank", target.name)
        else:
            step("train-model", train_run, cfg, run_dir=target, resume=resume, callbacks=hooks,
                 on_start=on_start if one_process else None, progress=progress)  # fmt: skip
        began.append(target)
        if cfg.rerank.enabled and is_main_process():
            with recorded_stage(target, "evaluate-rerank"):
                step("evaluate-rerank", rerank, target, cfg.rerank, progress=progress)
    finally:
        if mirror is not None:
            mirror.close()  # waits a few seconds at most; the sync below catches up on the rest
        if began and is_main_process():
            publish(target, mirror=cfg.tracking.enabled, step=step)
    return target


@contextmanager
def recorded_stage(run_dir: Path, stage: str, *, refusals_pass: bool = False) -> Iterator[None]:
    """A stage that writes into a trained run (rerank): its failure leaves summary.json
    `status: failed`, `failure_reason: <stage>: ...`, never `completed`, also on a full disk
    (space is reserved while it runs); when a rerun of it succeeds the run is `completed` again.
    `refusals_pass`: a bad input refused in one line (a `GeolocError` other than a full disk,
    e.g. `geoloc rerank --index-dir` of another index) leaves the run as it was."""
    from geoloc.runfolder.summary import (
        clear_stage_failure,
        failure_text,
        record_failure,
        reserved_space,
    )

    with reserved_space(run_dir):
        try:
            yield
        except BaseException as exc:
            if not (refusals_pass and isinstance(exc, GeolocError)
                    and not isinstance(exc, DiskFullError)):  # fmt: skip
                record_failure(run_dir, failure_text(exc), stage=stage)
            raise
    clear_stage_failure(run_dir, stage)


def training_done(run_dir: Path, cfg: RunConfig) -> bool:
    """Whether `run_dir` finished training all of `cfg`'s epochs (a run killed in rerank, report
    or mirror): `--resume` then picks up after training instead of evaluating the model again."""
    from geoloc.runfolder.summary import SummaryError, read_summary

    try:
        summary = read_summary(run_dir)
    except SummaryError:
        return False
    paths = RunPaths(run_dir)
    has_model = paths.best_checkpoint.is_file() or paths.last_checkpoint.is_file()
    done = int(summary.get("epochs_completed") or 0) >= cfg.train.epochs
    ended = summary.get("status") == "completed" or (
        summary.get("status") == "failed"
        and str(summary.get("failure_reason")).startswith("evaluate-rerank: ")
    )  # a rerank that failed (a full disk) reruns alone
    return ended and done and has_model


def rerank(run_dir: Path, cfg: RerankConfig | None = None, **kwargs: Any) -> str:
    """Rerank evaluation of a trained run (`geoloc.infer`); returns the best variant on val."""
    from geoloc.infer.evaluation import rerank_run

    return rerank_run(run_dir, cfg=cfg, **kwargs).best_variant


def rerank_and_publish(
    run_dir: Path,
    *,
    cfg: RerankConfig | None = None,
    index_dir: Path | None = None,
    use_cache: bool = True,
    step: StepRunner = call,
) -> Any:
    """`geoloc rerank RUN_DIR`: rerank evaluation, then the run's report and mirror again."""
    from geoloc.infer.evaluation import rerank_run

    with recorded_stage(run_dir, "evaluate-rerank", refusals_pass=True):
        result = step("evaluate-rerank", rerank_run, run_dir, index_dir=index_dir, cfg=cfg,
                      use_cache=use_cache, progress=use_bars(None))  # fmt: skip
    publish(run_dir, mirror=_tracking_enabled(run_dir), step=step)
    return result


def publish(run_dir: Path, *, mirror: bool, step: StepRunner = call) -> None:
    """REPORT.md and dashboard.html, then (when `mirror`) the run's MLflow sync; never raises."""
    if not RunPaths(run_dir).summary.is_file():
        return  # refused before its folder existed: nothing to show
    try:
        step("write-report", write_report, run_dir)
    except Exception as exc:  # noqa: BLE001 - a reporting failure never hides the result
        log.warning("report for %s failed: %s", run_dir, exc)
    if not mirror:
        return
    try:
        step("sync-mlflow", sync_mlflow, run_dir)
    except Exception as exc:  # noqa: BLE001 - the outage is in summary.json `tracking.error`
        log.warning("MLflow mirror of %s incomplete (run `geoloc mlflow sync`): %s", run_dir, exc)


def write_report(run_dir: Path) -> Path:
    """The run's REPORT.md and dashboard.html, and summary.json's artifact flags to match."""
    from geoloc.presentation.report import write_report as _write_report
    from geoloc.runfolder.summary import update_summary

    _write_report(run_dir)
    update_summary(Path(run_dir))
    return Path(run_dir)


def sync_mlflow(run_dir: Path) -> str | None:
    """Mirror the finished run into MLflow (idempotent); its MLflow run id."""
    from geoloc.integrations.mlflow import sync_run

    return sync_run(run_dir).mlflow_run_id


def _live_mirror(cfg: RunConfig) -> Any | None:
    """The live MLflow mirror for a one-process run (ranks cannot call back into this one)."""
    if not cfg.tracking.enabled or cfg.train.nproc > 1 or under_torchrun():
        return None
    try:
        from geoloc.integrations.mlflow import LiveMirror
    except ImportError as exc:  # MLflow missing: train anyway, say so once
        log.warning("MLflow mirroring unavailable: %s", exc)
        return None
    return LiveMirror(cfg)


def _tracking_enabled(run_dir: Path) -> bool:
    """Whether the run's own config.json asks for MLflow mirroring."""
    try:
        return RunConfig.model_validate_json(RunPaths(run_dir).config.read_text()).tracking.enabled
    except (OSError, ValueError) as exc:
        raise GeolocError(f"run '{run_dir}' has no readable config.json: {exc}") from exc
