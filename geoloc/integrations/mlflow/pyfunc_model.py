"""The registered `geoloc` model: `geoloc predict` as an MLflow pyfunc.

A user who serves `models:/geoloc@champion` (`mlflow models serve`) posts photos and gets what
`geoloc predict` prints: cell, lat/lon, calibrated probability, top-k cells, conformal set and
error radius. Nothing is re-implemented here: the model's one artifact is a minimal run folder
(`checkpoints/best.pt` with config and label space, `artifacts/data/rerank_params.json` and
`gallery.npz` when the run was reranked, `config.json`), and `load_context` opens it with
`geoloc.infer.predict.Predictor`, so decode, preprocessing, scoring, rerank and calibration are
the same code path as the CLI's.

Input: a DataFrame with a column `image` (encoded photo bytes; the scoring server base64-decodes
JSON strings into bytes because the signature says `binary`) and/or `path` (files readable by the
serving process); a row with both uses `image`. Output: one row per input, the columns of
`geoloc.infer.predict.OUTPUT_COLUMNS` (`path` holds the file or `image-<i>`); a photo that does
not decode gets a row with `error` set, like a broken file in `geoloc predict`. Param `top_k`
(default 5) sets the length of `topk_cells` / `topk_probs`.

Serving needs geoloc importable (its venv: `mlflow models serve --env-manager local`); the
model's metadata records the geoloc version and git commit it was logged from.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import pandas as pd

from geoloc.errors import GeolocError
from geoloc.runs.layout import RunPaths

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

SERVED_MODEL_CODE = Path(__file__).with_name("served_model.py")
"""The file MLflow loads the model from (`set_model(GeolocModel())`)."""
RUN_ARTIFACT = "run"
"""Key of the packed run folder in the model's artifacts."""
IMAGE_COLUMN = "image"
PATH_COLUMN = "path"
DEFAULT_TOP_K = 5
_MODEL_TAGS = ("mlflow.source.name", "mlflow.source.type", "mlflow.user", "geoloc.run_id")
"""Run tags the LoggedModel repeats, so its page says where it came from (geoloc train...)."""


def _data_files(run_dir: Path) -> list[str]:
    """What `Predictor` reads besides the checkpoint, relative to the run folder."""
    from geoloc.infer.evaluation import gallery_path, params_path

    rp = RunPaths(run_dir)
    files = [params_path(rp), gallery_path(rp), rp.config]
    return [p.relative_to(rp.root).as_posix() for p in files if p.is_file()]


def model_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint the model serves: best.pt, else last.pt (a run without a best epoch)."""
    rp = RunPaths(Path(run_dir))
    for path in (rp.best_checkpoint, rp.last_checkpoint):
        if path.is_file():
            return path
    return None


def packed_digest(run_dir: Path) -> str | None:
    """sha256 over what the model packs (checkpoint, rerank params, gallery, config): a change
    of any of them (e.g. `geoloc rerank` after training) is a new model version."""
    from geoloc.atomic import file_sha256

    run_dir = Path(run_dir)
    ckpt = model_checkpoint(run_dir)
    if ckpt is None:
        return None
    digest = hashlib.sha256(f"checkpoint:{file_sha256(ckpt)}".encode())
    for rel in _data_files(run_dir):
        digest.update(f"{rel}:{file_sha256(run_dir / rel)}".encode())
    return digest.hexdigest()


def pack_run(run_dir: Path, dest: Path) -> Path:
    """Copy what `Predictor` needs into `dest` in the run folder's layout; returns `dest`."""
    run_dir = Path(run_dir)
    ckpt = model_checkpoint(run_dir)
    if ckpt is None:
        raise GeolocError(f"run '{run_dir}' has no checkpoint (checkpoints/best.pt or last.pt)")
    packed = RunPaths(Path(dest))
    packed.best_checkpoint.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ckpt, packed.best_checkpoint)  # Predictor serves `best`
    for rel in _data_files(run_dir):
        (packed.root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run_dir / rel, packed.root / rel)
    return packed.root


def model_signature() -> Any:
    """Inputs `image` (binary) and/or `path` (string); param `top_k`; outputs the columns of
    `geoloc.infer.predict.OUTPUT_COLUMNS`, named and typed, so the registry page says what the
    model answers."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    from geoloc.infer.predict import OUTPUT_COLUMNS

    text, number = DataType.string, DataType.double
    kinds = {"lat": number, "lon": number, "prob": number, "conformal_coverage": number,
             "radius_km": number, "radius_coverage": number,
             "topk_cells": Array(text), "topk_lats": Array(number), "topk_lons": Array(number),
             "topk_probs": Array(number), "conformal_set": Array(text)}  # fmt: skip
    return ModelSignature(
        inputs=Schema([
            ColSpec(DataType.binary, IMAGE_COLUMN, required=False),
            ColSpec(DataType.string, PATH_COLUMN, required=False),
        ]),
        outputs=Schema([
            ColSpec(kinds.get(col, text), col, required=col in ("path", "variant"))
            for col in OUTPUT_COLUMNS
        ]),
        params=ParamSchema([ParamSpec("top_k", DataType.long, DEFAULT_TOP_K)]),
    )  # fmt: skip


def input_example() -> Any:
    """One small photo as the model's input example (the registry shows it; MLflow checks the
    model answers it when logging)."""
    import io

    from PIL import Image

    photo = io.BytesIO()
    Image.new("RGB", (64, 64), (70, 110, 160)).save(photo, format="JPEG")
    return pd.DataFrame({IMAGE_COLUMN: [photo.getvalue()]})


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN
    except (TypeError, ValueError):
        return False


def images_from_frame(frame: Any) -> tuple[list[bytes | Path], list[str]]:
    """(photos, names) from the model input: bytes from `image`, files from `path`."""
    import pandas as pd

    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    cols = [c for c in (IMAGE_COLUMN, PATH_COLUMN) if c in frame.columns]
    if not cols:
        raise GeolocError(
            f"model input: needs a column '{IMAGE_COLUMN}' (photo bytes, base64 in JSON) or "
            f"'{PATH_COLUMN}' (a file); got columns {list(frame.columns)}"
        )
    images: list[bytes | Path] = []
    names: list[str] = []
    for i, row in enumerate(frame[cols].itertuples(index=False, name=None)):
        value = dict(zip(cols, row, strict=True))
        data, path = value.get(IMAGE_COLUMN), value.get(PATH_COLUMN)
        if not _is_missing(data):
            if isinstance(data, str):  # a caller that skipped the signature's base64 decoding
                import base64
                import binascii

                try:
                    data = base64.b64decode(data, validate=True)
                except binascii.Error as exc:
                    raise GeolocError(f"model input row {i}: '{IMAGE_COLUMN}' is not base64: "
                                      f"{exc}") from exc  # fmt: skip
            images.append(bytes(data))
            names.append(str(path) if not _is_missing(path) else f"image-{i}")
        elif not _is_missing(path):
            images.append(Path(str(path)))
            names.append(str(path))
        else:
            raise GeolocError(
                f"model input row {i}: neither '{IMAGE_COLUMN}' nor '{PATH_COLUMN}' is set"
            )
    return images, names


class GeolocModel(mlflow.pyfunc.PythonModel):
    """`geoloc predict` of the packed run (see the module docstring for input and output)."""

    def load_context(self, context: Any) -> None:
        from geoloc.infer.predict import Predictor

        self.predictor = Predictor(Path(context.artifacts[RUN_ARTIFACT]), rerank=True,
                                   top_k=DEFAULT_TOP_K)  # fmt: skip

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        # a DataFrame hint: MLflow validates against the signature's schema, derives none
        images, names = images_from_frame(model_input)
        top_k = int((params or {}).get("top_k") or DEFAULT_TOP_K)
        return self.predictor.predict_images(images, names, top_k=top_k)


@contextmanager
def _bars_on_terminal_only() -> Iterator[None]:
    """MLflow's "Downloading artifacts" bar (validating the input example) only on a terminal:
    in a log file or a flow run's log it is hundreds of carriage-return lines."""
    import os

    from geoloc.progress import use_bars

    key = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(key)
    os.environ[key] = "true" if use_bars(None) and before != "false" else "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


def log_pyfunc(
    client: MlflowClient, run: Run, run_dir: Path, *, name: str,
    registered_model_name: str | None, pip_requirements: Sequence[str], metadata: dict[str, Any],
) -> Any:  # fmt: skip
    """Log (and register) the pyfunc on MLflow run `run` as LoggedModel `name`; its `ModelInfo`.
    Call under `store.global_tracking_uri`: MLflow resolves the store globally.

    The LoggedModel is created here, in the run's experiment: `Model.log` alone files it under
    the process's active experiment (the default one, "0"), where the experiment page's runs
    table, which searches its own experiment's LoggedModels, never finds it (Models column "-").
    """
    import tempfile

    from mlflow.models import Model

    with tempfile.TemporaryDirectory(prefix="geoloc-model-") as tmp, _bars_on_terminal_only():
        packed = pack_run(Path(run_dir), Path(tmp) / RUN_ARTIFACT)
        tags = run.data.tags
        model = client.create_logged_model(
            experiment_id=run.info.experiment_id, name=name, source_run_id=run.info.run_id,
            params=dict(run.data.params),
            tags={k: tags[k] for k in _MODEL_TAGS if tags.get(k)},
        )  # fmt: skip
        return Model.log(
            None,  # artifact_path: deprecated for `name`, still positional
            name=name,
            flavor=mlflow.pyfunc,
            run_id=run.info.run_id,
            model_id=model.model_id,
            python_model=str(SERVED_MODEL_CODE),  # models from code: nothing pickled
            artifacts={RUN_ARTIFACT: str(packed)},
            signature=model_signature(),
            input_example=input_example(),
            registered_model_name=registered_model_name,
            pip_requirements=list(pip_requirements),
            metadata=metadata,
            await_registration_for=60,
        )
