"""The `geoloc` registered model: what it serves, logging it once per checkpoint, and the
`champion` alias that points at the best registered run."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from geoloc.atomic import file_sha256
from geoloc.integrations.mlflow.store import (
    TAG_MODEL_SHA,
    TAG_MODEL_VERSION,
    TAG_STATUS,
    global_tracking_uri,
)
from geoloc.runs.layout import RunPaths
from geoloc.runs.summary import finite_or_none

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

log = logging.getLogger(__name__)

MODEL_NAME = "geoloc"
CHAMPION_ALIAS = "champion"
MODEL_ARTIFACT = "model"


class GeolocScorer(nn.Module):
    """What the registry serves: (B, 3, S, S) eval-transformed images -> (B, K) class
    probabilities, hierarchy-aware exactly as in evaluation (the raw model returns a dict)."""

    def __init__(self, model: nn.Module, parent_of: Any, hier_topk_parents: int) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("parent_of", torch.as_tensor(parent_of, dtype=torch.long))
        self.hier_topk_parents = int(hier_topk_parents)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from geoloc.model.scores import class_scores

        return class_scores(self.model(x), self.parent_of, self.hier_topk_parents)


def _model_requirements() -> list[str]:
    """Pinned from this environment: inferring them would load the model in a subprocess."""
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for name in ("torch", "numpy"):
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            continue
    return reqs


def _model_checkpoint(run_dir: Path) -> Path | None:
    rp = RunPaths(Path(run_dir))
    for path in (rp.best_checkpoint, rp.last_checkpoint):
        if path.is_file():
            return path
    return None


def sync_model(
    client: MlflowClient, uri: str, run: Run, run_dir: Path, register: bool
) -> str | None:
    """Log the run's best model with `mlflow.pytorch.log_model` and register it as `geoloc`, once
    per checkpoint content.

    MLflow 3 saves it as a `torch.export` program (pt2): self-contained, so serving it needs
    torch but not geoloc. The input example has a batch of 2 because export specialises a
    batch dimension of 1 into a constant. `log_model` resolves MLflow's global tracking URI, so
    it runs under `global_tracking_uri`.

    Returns the new registered version, or None when nothing was logged.
    """
    import mlflow.pytorch
    import numpy as np

    from geoloc.infer.trained import load_trained

    ckpt = _model_checkpoint(run_dir)
    if ckpt is None:
        return None
    digest = file_sha256(ckpt)
    tags = run.data.tags
    if tags.get(TAG_MODEL_SHA) == digest and (not register or TAG_MODEL_VERSION in tags):
        return None
    trained = load_trained(run_dir, "best" if ckpt.stem == "best" else "last", device="cpu")
    scorer = GeolocScorer(
        trained.model, trained.label_space.parent_of, trained.config.train.hier_topk_parents
    ).eval()
    size = trained.config.train.image_size
    example = np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)
    with global_tracking_uri(uri):
        info = mlflow.pytorch.log_model(
            scorer,
            name=MODEL_ARTIFACT,
            input_example=example,
            run_id=run.info.run_id,
            registered_model_name=MODEL_NAME if register else None,
            pip_requirements=_model_requirements(),
            await_registration_for=60,
        )
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
    best_key, best_version = None, None
    for run_id, v in newest.items():
        try:
            run = client.get_run(run_id)
        except MlflowException:
            continue
        p90 = run.data.metrics.get("best_p90_km")
        if run.data.tags.get(TAG_STATUS) != "completed" or finite_or_none(p90) is None:
            continue
        key = (p90, -(run.data.metrics.get("best_val_acc") or 0.0), -int(v.version))
        if best_key is None or key < best_key:
            best_key, best_version = key, str(v.version)
    if best_version is None:
        return None
    try:
        current = client.get_model_version_by_alias(MODEL_NAME, CHAMPION_ALIAS).version
    except MlflowException:
        current = None
    if str(current) != best_version:
        client.set_registered_model_alias(MODEL_NAME, CHAMPION_ALIAS, best_version)
        log.info("%s@%s -> version %s", MODEL_NAME, CHAMPION_ALIAS, best_version)
    return best_version
