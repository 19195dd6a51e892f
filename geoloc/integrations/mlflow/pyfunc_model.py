"""The registered `geoloc` model: `geoloc predict` as an MLflow pyfunc.

A user who serves `models:/geoloc@champion` (`mlflow models serve`) posts photos and gets what
`geoloc predict` prints: cell, lat/lon, calibrated probability, top-k cells, conformal set,
error radius, and the out-of-distribution score and flag (`ood_score`, `ood_flag`). Nothing is
re-implemented here: the model's one artifact is a minimal run folder
(`checkpoints/best.pt` with config and label space, `artifacts/data/rerank_params.json` and
`gallery.npz` when the run was reranked, `config.json`), and `load_context` opens it with
`geoloc.infer.predict.Predictor`, so decode, preprocessing, scoring, rerank and calibration are
the same code path as the CLI's.

Input: a DataFrame with a column `image` (encoded photo bytes, or their base64 text: the
signature says `string`, so the scoring server hands JSON strings over as they are and each row
is decoded here, where a malformed one is that row's error instead of MLflow refusing the whole
batch) and/or `path` (a file, only when the operator names a folder in `GEOLOC_MODEL_FILES_DIR`,
and only regular files whose real path lies inside it); a row with both uses `image`. Every
photo is refused over `GEOLOC_MODEL_MAX_INPUT_BYTES` (default 32 MiB) before it is read or
decoded; a row that cannot be read gets an `error` row and the others are answered. A bad
request (no usable column, `top_k` outside [1, number of cells]) is one line, never a stack
trace.

Output: one row per input, the columns of `geoloc.infer.predict.OUTPUT_COLUMNS` (`path` holds
the file or `image-<i>`); a photo that does not decode gets a row with `error` set, like a broken
file in `geoloc predict`. Param `top_k` (default 5) sets the length of `topk_cells` / `topk_probs`.

Serving needs geoloc importable (its venv: `mlflow models serve --env-manager local`); the
model's metadata records the geoloc version and git commit it was logged from.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import os
import shutil
import stat
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow.pyfunc
import numpy as np
import pandas as pd

from geoloc.errors import GeolocError
from geoloc.runfolder.layout import RunPaths

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
FILES_DIR_ENV = "GEOLOC_MODEL_FILES_DIR"
"""The one folder whose files a client may name in `path`; unset (the default): no files."""
MAX_INPUT_BYTES_ENV = "GEOLOC_MODEL_MAX_INPUT_BYTES"
DEFAULT_MAX_INPUT_BYTES = 32 * 1024 * 1024
"""Per photo, bytes or file, checked before it is decoded or read."""
log = logging.getLogger(__name__)
_MODEL_TAGS = ("mlflow.source.name", "mlflow.source.type", "mlflow.user", "geoloc.run_id")
"""Run tags the LoggedModel repeats, so its page says where it came from (geoloc train...)."""


def _data_files(run_dir: Path) -> list[str]:
    """What `Predictor` reads besides the checkpoint, relative to the run folder."""
    rp = RunPaths(run_dir)
    files = [rp.rerank_params, rp.gallery, rp.config]
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
    """Inputs `image` and/or `path`; param `top_k`; outputs the columns of
    `geoloc.infer.predict.OUTPUT_COLUMNS`, named and typed, so the registry page says what the
    model answers. `image` is declared `string`, not `binary`: for a `binary` column MLflow's
    scoring server base64-decodes the whole column before the model runs, and one malformed row
    fails every row of the request; as `string` it reaches `predict` as sent (bytes from Python
    pass MLflow's check as well), and `images_from_frame` decodes it row by row."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Array

    from geoloc.infer.predict import OUTPUT_COLUMNS

    text, number = DataType.string, DataType.double
    kinds = {"lat": number, "lon": number, "prob": number, "conformal_coverage": number,
             "radius_km": number, "radius_coverage": number, "ood_score": number,
             "ood_flag": DataType.boolean,
             "topk_cells": Array(text), "topk_lats": Array(number), "topk_lons": Array(number),
             "topk_probs": Array(number), "conformal_set": Array(text)}  # fmt: skip
    return ModelSignature(
        inputs=Schema([
            ColSpec(DataType.string, IMAGE_COLUMN, required=False),
            ColSpec(DataType.string, PATH_COLUMN, required=False),
        ]),
        outputs=Schema([
            ColSpec(kinds.get(col, text), col, required=col in ("path", "variant"))
            for col in OUTPUT_COLUMNS
        ]),
        params=ParamSchema([ParamSpec("top_k", DataType.long, DEFAULT_TOP_K)]),
    )  # fmt: skip


def input_example() -> Any:
    """One small photo, as base64 text the way a JSON client sends it, as the model's input
    example (the registry shows it; MLflow checks the model answers it when logging)."""
    import io

    from PIL import Image

    photo = io.BytesIO()
    Image.new("RGB", (64, 64), (70, 110, 160)).save(photo, format="JPEG")
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(photo.getvalue()).decode("ascii")]})


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(value != value)  # NaN
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class InputLimits:
    """What a client may make the serving process read: `max_bytes` per photo (checked before
    it is decoded or read), and files only under `files_dir`, the one folder the operator names
    (None: the `path` column is refused)."""

    files_dir: Path | None = None
    max_bytes: int = DEFAULT_MAX_INPUT_BYTES

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> InputLimits:
        """From `GEOLOC_MODEL_FILES_DIR` and `GEOLOC_MODEL_MAX_INPUT_BYTES`, set by the operator
        before `mlflow models serve`; a bad value is a one-line error at load time."""
        env = os.environ if environ is None else environ
        raw_max = env.get(MAX_INPUT_BYTES_ENV, "").strip()
        try:
            max_bytes = int(raw_max) if raw_max else DEFAULT_MAX_INPUT_BYTES
        except ValueError:
            max_bytes = 0
        if max_bytes < 1:
            raise GeolocError(f"{MAX_INPUT_BYTES_ENV}={raw_max!r}: must be a whole number of "
                              "bytes >= 1")  # fmt: skip
        raw_dir = env.get(FILES_DIR_ENV, "").strip()
        if not raw_dir:
            return cls(None, max_bytes)
        files_dir = Path(raw_dir).resolve()
        if not files_dir.is_dir():
            raise GeolocError(f"{FILES_DIR_ENV}={raw_dir!r}: not a folder")
        return cls(files_dir, max_bytes)


class _RowError(Exception):
    """One input row that cannot be read; its answer row carries the reason."""


def _decoded(data: Any, limits: InputLimits) -> bytes:
    """Photo bytes of an `image` value (bytes, or base64 text: what JSON requests carry),
    refused before decoding when over `limits.max_bytes`. Line breaks in the text are allowed
    (MLflow's own clients wrap base64 at 76 characters); any other stray character is not."""
    if isinstance(data, str):
        text = data.replace("\n", "").replace("\r", "")
        if len(text) // 4 * 3 > limits.max_bytes:  # base64: 3 bytes per 4 characters
            raise _RowError(f"'{IMAGE_COLUMN}' is over the {limits.max_bytes}-byte limit")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise _RowError(f"'{IMAGE_COLUMN}' is not base64") from None
    if not isinstance(data, bytes | bytearray | memoryview):
        raise _RowError(f"'{IMAGE_COLUMN}' is {type(data).__name__}, not photo bytes")
    if len(data) > limits.max_bytes:
        raise _RowError(f"'{IMAGE_COLUMN}' is {len(data)} bytes, over the "
                        f"{limits.max_bytes}-byte limit")  # fmt: skip
    return bytes(data)


def _read_file(name: str, limits: InputLimits) -> bytes:
    """The bytes of file `name` (relative to, or absolute under, `limits.files_dir`): its real
    path must lie inside that folder and be a regular file within the size limit. Messages
    name what the client sent, never a server path, and do not tell an outside file that
    exists from one that does not."""
    if limits.files_dir is None:
        raise _RowError(f"'{PATH_COLUMN}' is off on this server: send the photo in "
                        f"'{IMAGE_COLUMN}' (the operator enables files with {FILES_DIR_ENV})")
    if "\x00" in name:
        raise _RowError(f"'{PATH_COLUMN}' holds a NUL byte")
    real = Path(os.path.realpath(limits.files_dir / name))  # links resolved, '..' folded
    if not real.is_relative_to(limits.files_dir):
        raise _RowError(f"'{PATH_COLUMN}' {name!r} is outside the folder this server reads")
    try:  # O_NONBLOCK: a FIFO opens at once and is refused below instead of hanging
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise _RowError(f"'{PATH_COLUMN}' {name!r} cannot be opened: {exc.strerror}") from None
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise _RowError(f"'{PATH_COLUMN}' {name!r} is not a regular file")
    with os.fdopen(fd, "rb") as fh:
        if info.st_size > limits.max_bytes:
            raise _RowError(f"'{PATH_COLUMN}' {name!r} is {info.st_size} bytes, over the "
                            f"{limits.max_bytes}-byte limit")  # fmt: skip
        data = fh.read(limits.max_bytes + 1)  # a file that grew meanwhile is still bounded
    if len(data) > limits.max_bytes:
        raise _RowError(f"'{PATH_COLUMN}' {name!r} is over the {limits.max_bytes}-byte limit")
    return data


def images_from_frame(
    frame: Any, limits: InputLimits | None = None
) -> tuple[list[bytes | None], list[str], dict[int, str]]:
    """(photo bytes, names, reasons) from the model input, one entry per row: bytes from
    `image`, file contents from `path` (see `InputLimits`); a row that cannot be read has
    `None` and its reason in the dict, so one bad row never fails the others."""
    import pandas as pd

    limits = InputLimits() if limits is None else limits
    if not isinstance(frame, pd.DataFrame):
        frame = pd.DataFrame(frame)
    cols = [c for c in (IMAGE_COLUMN, PATH_COLUMN) if c in frame.columns]
    if not cols:
        raise GeolocError(
            f"model input: needs a column '{IMAGE_COLUMN}' (photo bytes, base64 in JSON) or "
            f"'{PATH_COLUMN}' (a file); got columns {[str(c)[:40] for c in frame.columns][:10]}"
        )
    images: list[bytes | None] = []
    names: list[str] = []
    errors: dict[int, str] = {}
    for i, row in enumerate(frame[cols].itertuples(index=False, name=None)):
        value = dict(zip(cols, row, strict=True))
        data, path = value.get(IMAGE_COLUMN), value.get(PATH_COLUMN)
        names.append(str(path)[:300] if not _is_missing(path) else f"image-{i}")
        try:
            if not _is_missing(data):
                images.append(_decoded(data, limits))
            elif not _is_missing(path):
                images.append(_read_file(str(path), limits))
            else:
                raise _RowError(f"neither '{IMAGE_COLUMN}' nor '{PATH_COLUMN}' is set")
        except _RowError as exc:
            images.append(None)
            errors[i] = f"model input row {i}: {exc}"
    return images, names, errors


def checked_top_k(params: Mapping[str, Any] | None, num_classes: int) -> int:
    """The `top_k` param as a whole number in [1, num_classes]; anything else is refused."""
    value = (params or {}).get("top_k")
    if value is None:
        return min(DEFAULT_TOP_K, num_classes)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise GeolocError(f"param top_k={str(value)[:40]!r}: must be a whole number")
    if not 1 <= int(value) <= num_classes:
        raise GeolocError(f"param top_k={int(value)}: must be between 1 and {num_classes} "
                          "(the model's number of cells)")  # fmt: skip
    return int(value)


class GeolocModel(mlflow.pyfunc.PythonModel):
    """`geoloc predict` of the packed run (see the module docstring for input and output)."""

    def load_context(self, context: Any) -> None:
        from geoloc.infer.predict import Predictor

        self.limits = InputLimits.from_env()
        self.predictor = Predictor(Path(context.artifacts[RUN_ARTIFACT]), rerank=True,
                                   top_k=DEFAULT_TOP_K)  # fmt: skip

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        # a DataFrame hint: MLflow validates against the signature's schema, derives none
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE

        # MLflow's scoring server answers any other exception with its stack trace (server
        # paths, code): a bad request gets its one line, anything else a line and the log
        try:
            return self._answer(model_input, params)
        except GeolocError as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None
        except Exception:
            log.exception("geoloc model: prediction failed")
            raise MlflowException("prediction failed on the server (see its log)",
                                  error_code=INTERNAL_ERROR) from None  # fmt: skip

    def _answer(self, model_input: Any, params: Mapping[str, Any] | None) -> pd.DataFrame:
        from geoloc.infer.predict import OUTPUT_COLUMNS, error_row

        top_k = checked_top_k(params, self.predictor.label_space.num_classes)
        limits = getattr(self, "limits", None) or InputLimits.from_env()
        images, names, errors = images_from_frame(model_input, limits)
        ok = [i for i, data in enumerate(images) if data is not None]
        table = self.predictor.predict_images([images[i] for i in ok], [names[i] for i in ok],
                                              top_k=top_k)  # fmt: skip
        answered = dict(zip(ok, table.to_dict("records"), strict=True))
        rows = [answered.get(i) or {"path": names[i],
                                    **error_row(errors[i], self.predictor.variant)}
                for i in range(len(images))]  # fmt: skip
        return pd.DataFrame(rows, columns=list(OUTPUT_COLUMNS))


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
