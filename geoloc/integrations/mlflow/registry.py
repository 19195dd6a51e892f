"""The `geoloc` registered model: logging it (the `pyfunc_model` pyfunc) once per packed
content, registering it when that is a decision (`should_register`), and the `champion` alias
that points at the best registered run (leaderboard score against a fixed reference)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoloc.integrations.mlflow.contents import FINAL_STEP, final_metrics, run_description
from geoloc.integrations.mlflow.store import (
    TAG_MODEL_SHA,
    TAG_MODEL_VERSION,
    TAG_RUN_ID,
    TAG_RUN_NAME,
    TAG_STATUS,
    global_tracking_uri,
)
from geoloc.presentation.leaderboard_score import reference_score
from geoloc.progress import progress_log
from geoloc.runfolder.summary import finite_or_none

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

MODEL_NAME = "geoloc"
CHAMPION_ALIAS = "champion"
MODEL_ARTIFACT = "model"


_REQUIREMENTS = ("mlflow", "torch", "torchvision", "numpy", "pandas", "pillow", "h3", "pydantic")


def _model_requirements() -> list[str]:
    """geoloc's runtime libraries, pinned from this environment (inferring them would load the
    model in a subprocess). geoloc itself is not on PyPI: serve from its venv."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for name in _REQUIREMENTS:
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return reqs


def sync_model(
    client: MlflowClient, uri: str, run: Run, run_dir: Path, register: bool | str,
    summary: Mapping[str, Any] | None = None,
) -> str | None:  # fmt: skip
    """Log the run as the `geoloc` pyfunc (`geoloc predict` packed with its checkpoint, rerank
    params and gallery: `pyfunc_model`) and register it as `geoloc` when `register` says so
    (`True`; `"auto"`: the run beats the current champion, `should_register`), once per packed
    content.

    The model is a LoggedModel of the run in the run's experiment, with the run's params, its
    test metrics and its dataset (the runs table's Models column links it); a registered
    version gets a description and tags that say what it is without opening the run.
    Returns the new registered version, or None when nothing was registered.
    """
    from geoloc.integrations.mlflow.pyfunc_model import log_pyfunc, packed_digest

    digest = packed_digest(run_dir)
    if digest is None:
        return None
    run = client.get_run(run.info.run_id)  # read again: its params and metrics were just synced
    tags = run.data.tags
    logged = tags.get(TAG_MODEL_SHA) == digest
    if logged and TAG_MODEL_VERSION in tags:
        return None
    decided = register is True or (register == "auto" and should_register(client, run))
    if logged and not decided:
        return None
    with global_tracking_uri(uri):
        info = log_pyfunc(
            client, run, run_dir, name=MODEL_ARTIFACT,
            registered_model_name=MODEL_NAME if decided else None,
            pip_requirements=_model_requirements(), metadata=_model_metadata(run),
        )  # fmt: skip
    _log_model_metrics(client, run, getattr(info, "model_id", None), summary or {})
    version = getattr(info, "registered_model_version", None)
    tags = {TAG_MODEL_SHA: digest}
    if version is not None:
        tags[TAG_MODEL_VERSION] = str(version)
        describe_version(client, str(version), run, summary or {})
    for key, value in tags.items():
        client.set_tag(run.info.run_id, key, value)
    if version is not None:
        outcome = f"registered as {MODEL_NAME} version {version}"
    elif register == "auto":
        outcome = "not registered: it does not beat the champion (--register registers it)"
    else:
        outcome = "not registered (tracking.register_model=false)"
    progress_log.info("model of %s logged, %s", run_dir.name, outcome)  # a decision: say it
    return str(version) if version is not None else None


def run_score(run: Run) -> float | None:
    """The run's leaderboard score against the fixed reference (None without its metrics)."""
    return reference_score(run.data.metrics)


def should_register(client: MlflowClient, run: Run) -> bool:
    """`register_model: auto`: a completed run is registered when there is no champion yet, when
    it is the champion's run (a new rerank of it), or when its leaderboard score beats the
    champion's. A sweep's weaker trials and a run that got worse stay unregistered."""
    from mlflow.exceptions import MlflowException

    if run.data.tags.get(TAG_STATUS) != "completed":
        return False
    try:
        champion = client.get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS)
        holder = client.get_run(champion.run_id)
    except MlflowException:
        return True
    if holder.info.run_id == run.info.run_id:
        return True
    mine, theirs = run_score(run), run_score(holder)
    return mine is not None and (theirs is None or mine > theirs)


def describe_version(
    client: MlflowClient, version: str, run: Run, summary: Mapping[str, Any]
) -> None:
    """A version's description (run, preset, data, result) and tags (run name, preset, data
    digest, test P90 and GeoScore), so the registry page answers "which run is this?"."""
    tags = run.data.tags
    test = summary.get("test") or {}
    rerank = (summary.get("rerank") or {}).get("metrics") or {}
    p90 = finite_or_none(rerank.get("p90_km", test.get("test_p90_km")))
    geoscore = finite_or_none(rerank.get("geoscore", test.get("test_geoscore")))
    preset = tags.get(TAG_RUN_NAME) or ""  # presets name their runs after themselves
    digest = str(tags.get("geoloc.dataset_fingerprint") or "")[:16]
    values = {"geoloc.run_name": tags.get(TAG_RUN_NAME), "geoloc.preset": preset,
              "geoloc.run_id": tags.get(TAG_RUN_ID), "geoloc.data_digest": digest,
              "test_p90_km": None if p90 is None else f"{p90:.1f}",
              "test_geoscore": None if geoscore is None else f"{geoscore:.0f}"}  # fmt: skip
    for key, value in values.items():
        if value:
            client.set_model_version_tag(MODEL_NAME, version, key, str(value))
    serve = f"Serve: mlflow models serve -m models:/{MODEL_NAME}@{CHAMPION_ALIAS}."
    description = f"{run_description(summary)} {serve}"
    client.update_model_version(MODEL_NAME, version, description=description)


def _log_model_metrics(
    client: MlflowClient, run: Run, model_id: str | None, summary: Mapping[str, Any]
) -> None:
    """The test numbers on the LoggedModel itself, linked to the dataset the run logged, so the
    model page shows them (MLflow 3: metrics with a `model_id`)."""
    if not model_id:
        return

    dataset = next(iter(run.inputs.dataset_inputs), None) if run.inputs else None
    name = dataset.dataset.name if dataset else None
    digest = dataset.dataset.digest if dataset else None
    for key, value in final_metrics(summary).items():
        if key.startswith(("test_", "rerank_")):  # a value, not a series: see FINAL_STEP
            client.log_metric(run.info.run_id, key, value, step=FINAL_STEP, model_id=model_id,
                              dataset_name=name, dataset_digest=digest)  # fmt: skip


def _model_metadata(run: Run) -> dict[str, str]:
    """Where the model came from: serving it needs this geoloc code (version, commit)."""
    tags = run.data.tags
    keys = {"geoloc_run_id": TAG_RUN_ID, "geoloc_version": "geoloc.version",
            "git_commit": "geoloc.git_commit"}  # fmt: skip
    return {k: tags[t] for k, t in keys.items() if tags.get(t)}


def update_champion(client: MlflowClient) -> str | None:
    """Point the `champion` alias of `geoloc` at the best registered run: completed, highest
    leaderboard score against the fixed reference (`run_score`), then lowest `best_p90_km`,
    then newest. Only each run's newest version competes. Returns the champion version (None:
    no candidate)."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name='{MODEL_NAME}'")
    except MlflowException:
        return None
    newest: dict[str, Any] = {}
    for v in versions:
        if v.run_id and (v.run_id not in newest or int(v.version) > int(newest[v.run_id].version)):
            newest[v.run_id] = v
    ranked: list[tuple[tuple[float, float, int], str]] = []
    for run_id, v in newest.items():
        try:
            run = client.get_run(run_id)
        except MlflowException:
            continue
        score = run_score(run)
        p90 = finite_or_none(run.data.metrics.get("best_p90_km"))
        if run.data.tags.get(TAG_STATUS) != "completed" or score is None:
            continue
        key = (-score, p90 if p90 is not None else float("inf"), -int(v.version))
        ranked.append((key, str(v.version)))
    try:
        current = client.get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS).version
    except MlflowException:
        current = None
    # the best one that loads: a champion users cannot serve is no champion (the current one
    # loaded when it was promoted)
    best_version = next(
        (ver for _, ver in sorted(ranked) if ver == str(current) or _loads(client, ver)), None
    )
    if best_version is None:
        return None
    if str(current) != best_version:
        client.set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, best_version)
        log.info("%s@%s -> version %s", MODEL_NAME, CHAMPION_ALIAS, best_version)
    return best_version


def _loads(client: MlflowClient, version: str) -> bool:
    """Whether model version `version` of `geoloc` loads as users load it (`load_model`)."""
    import mlflow.pyfunc

    try:
        with global_tracking_uri(client.tracking_uri):
            mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}/{version}")
    except Exception as exc:  # noqa: BLE001 - any failure to load disqualifies it
        log.warning("%s version %s does not load (%s): not promoted to %s", MODEL_NAME, version,
                    str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__,
                    CHAMPION_ALIAS)  # fmt: skip
        return False
    return True
