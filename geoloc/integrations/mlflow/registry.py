"""The `geoloc` registered model: logging it (the `pyfunc_model` pyfunc) once per packed
content, and the `champion` alias that points at the best registered run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from geoloc.integrations.mlflow.store import (
    TAG_MODEL_SHA,
    TAG_MODEL_VERSION,
    TAG_RUN_ID,
    TAG_STATUS,
    global_tracking_uri,
)
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
    client: MlflowClient, uri: str, run: Run, run_dir: Path, register: bool
) -> str | None:
    """Log the run as the `geoloc` pyfunc (`geoloc predict` packed with its checkpoint, rerank
    params and gallery: `pyfunc_model`) and register it as `geoloc`, once per packed content.

    The model is a LoggedModel of the run in the run's experiment, with the run's params (the
    runs table's Models column links it). `run` is read again: its params were just synced.
    Returns the new registered version, or None when nothing was logged.
    """
    from geoloc.integrations.mlflow.pyfunc_model import log_pyfunc, packed_digest

    digest = packed_digest(run_dir)
    if digest is None:
        return None
    tags = run.data.tags
    if tags.get(TAG_MODEL_SHA) == digest and (not register or TAG_MODEL_VERSION in tags):
        return None
    with global_tracking_uri(uri):
        info = log_pyfunc(
            client, client.get_run(run.info.run_id), run_dir, name=MODEL_ARTIFACT,
            registered_model_name=MODEL_NAME if register else None,
            pip_requirements=_model_requirements(), metadata=_model_metadata(run),
        )  # fmt: skip
    version = getattr(info, "registered_model_version", None)
    tags = {TAG_MODEL_SHA: digest}
    if version is not None:
        tags[TAG_MODEL_VERSION] = str(version)
    for key, value in tags.items():
        client.set_tag(run.info.run_id, key, value)
    log.info(
        "model of %s logged (%s)", run_dir, f"version {version}" if version else "unregistered"
    )
    return str(version) if version is not None else None


def _model_metadata(run: Run) -> dict[str, str]:
    """Where the model came from: serving it needs this geoloc code (version, commit)."""
    tags = run.data.tags
    keys = {"geoloc_run_id": TAG_RUN_ID, "geoloc_version": "geoloc.version",
            "git_commit": "geoloc.git_commit"}  # fmt: skip
    return {k: tags[t] for k, t in keys.items() if tags.get(t)}


def update_champion(client: MlflowClient) -> str | None:
    """Point the `champion` alias of `geoloc` at the best registered run: completed, lowest
    `best_p90_km` (the leaderboard's tail ingredient), then highest `best_val_acc`, then newest.

    Only each run's newest version competes. Returns the champion version (None: no candidate).
    """
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
        p90 = run.data.metrics.get("best_p90_km")
        if run.data.tags.get(TAG_STATUS) != "completed" or finite_or_none(p90) is None:
            continue
        key = (p90, -(run.data.metrics.get("best_val_acc") or 0.0), -int(v.version))
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
