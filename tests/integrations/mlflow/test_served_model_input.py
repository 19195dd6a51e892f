"""The served model reads only what a client may make it read: photo bytes (or base64), files
only from the one folder the operator names (off by default), regular files only, never more
than the size limit; one bad row costs only its own answer, and a bad request gets one line
without a stack trace or a server path."""

from __future__ import annotations

import base64
import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import requests
from mlflow.exceptions import MlflowException

from geoloc.data.imagestore import ImageLocations
from geoloc.errors import GeolocError
from geoloc.integrations.mlflow.pyfunc_model import (
    FILES_DIR_ENV,
    MAX_INPUT_BYTES_ENV,
    RUN_ARTIFACT,
    SERVED_MODEL_CODE,
    GeolocModel,
    InputLimits,
    images_from_frame,
    input_example,
    model_signature,
    pack_run,
)
from geoloc.paths import DataPaths


@pytest.fixture(scope="module")
def photo(demo_index: DataPaths) -> bytes:
    manifest = pd.read_parquet(demo_index.processed_manifest).sort_values("sha256")
    return ImageLocations(manifest.reset_index(drop=True), demo_index.root).read(0)


@pytest.fixture
def model(reranked_run: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> GeolocModel:
    served = tmp_path / "served"
    served.mkdir()
    monkeypatch.setenv(FILES_DIR_ENV, str(served))
    loaded = GeolocModel()
    loaded.load_context(SimpleNamespace(artifacts={RUN_ARTIFACT: str(reranked_run)}))
    return loaded


def test_file_paths_are_refused_unless_the_operator_names_a_folder(tmp_path: Path) -> None:
    secret = tmp_path / "secret.jpg"
    secret.write_bytes(b"\xff\xd8 anything")
    images, _, errors = images_from_frame(pd.DataFrame({"path": [str(secret)]}), InputLimits())
    assert images == [None]
    assert "'path' is off on this server" in errors[0]


def test_a_served_folder_never_reads_outside_it_nor_tells_what_exists_there(
    tmp_path: Path,
) -> None:
    served, outside = tmp_path / "served", tmp_path / "outside"
    served.mkdir()
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0")
    (served / "ok.jpg").write_bytes(b"photo")
    (served / "link.jpg").symlink_to(outside / "passwd")
    (served / "dir").mkdir()
    os.mkfifo(served / "fifo.jpg")  # would block a plain open() forever
    limits = InputLimits(served.resolve(), max_bytes=1000)
    asked = ["ok.jpg", str(served / "ok.jpg"), str(outside / "passwd"), str(outside / "nothing"),
             "../outside/passwd", "link.jpg", "dir", "fifo.jpg", "missing.jpg"]  # fmt: skip
    images, names, errors = images_from_frame(pd.DataFrame({"path": asked}), limits)
    assert images[:2] == [b"photo", b"photo"] and names == asked
    reasons = [errors[i].split(": ", 1)[1] for i in range(2, len(asked))]
    exists, missing = reasons[0], reasons[1]
    assert exists.replace("passwd", "nothing") == missing  # same answer: existence not told
    assert all("outside the folder" in r for r in reasons[:4])
    assert "not a regular file" in reasons[4] and "not a regular file" in reasons[5]
    assert "cannot be opened" in reasons[6]
    assert not any(str(tmp_path) in r for r in reasons[2:])  # relative names: no server path


def test_every_input_is_measured_before_it_is_read(tmp_path: Path) -> None:
    (tmp_path / "big.jpg").write_bytes(b"x" * 2001)
    limits = InputLimits(tmp_path.resolve(), max_bytes=2000)
    frame = pd.DataFrame({
        "image": [b"y" * 2001, base64.b64encode(b"z" * 3000).decode(), None, "@@not base64@@",
                  b"small"],
        "path": [None, None, "big.jpg", None, None],
    })  # fmt: skip
    images, _, errors = images_from_frame(frame, limits)
    assert images == [None, None, None, None, b"small"]
    assert all("2000-byte limit" in errors[i] for i in range(3))
    assert "not base64" in errors[3]


def test_the_size_limit_defaults_to_32_mib_and_is_configurable(tmp_path: Path) -> None:
    assert InputLimits.from_env({}).max_bytes == 32 * 1024 * 1024
    assert InputLimits.from_env({}).files_dir is None
    assert InputLimits.from_env({MAX_INPUT_BYTES_ENV: "1000"}).max_bytes == 1000
    with pytest.raises(GeolocError, match=MAX_INPUT_BYTES_ENV):
        InputLimits.from_env({MAX_INPUT_BYTES_ENV: "-1"})
    with pytest.raises(GeolocError, match="not a folder"):
        InputLimits.from_env({FILES_DIR_ENV: str(tmp_path / "none")})


def test_one_bad_row_costs_only_its_own_answer(model: GeolocModel, photo: bytes) -> None:
    frame = pd.DataFrame({"image": ["!!bad base64!!", base64.b64encode(photo).decode(), photo]})
    answer = model.predict(None, frame)
    assert len(answer) == 3
    assert "not base64" in answer["error"].iloc[0] and pd.isna(answer["cell"].iloc[0])
    assert answer["error"].iloc[1:].isna().all()
    assert answer["cell"].iloc[1] == answer["cell"].iloc[2]


@pytest.mark.parametrize("top_k", [-1, 0, 10**9, 2.5, "3", True])
def test_a_bad_top_k_is_one_line_without_stack_trace(
    model: GeolocModel, photo: bytes, top_k: object
) -> None:
    with pytest.raises(MlflowException, match="top_k") as caught:
        model.predict(None, pd.DataFrame({"image": [photo]}), params={"top_k": top_k})
    body = caught.value.serialize_as_json()
    assert "stack_trace" not in body and "Traceback" not in body
    assert model.predict(None, pd.DataFrame({"image": [photo]}), params={"top_k": 2})[
        "topk_cells"
    ].map(len).tolist() == [2]


def test_an_unexpected_failure_answers_one_line_and_no_server_path(
    model: GeolocModel, monkeypatch: pytest.MonkeyPatch, photo: bytes, reranked_run: Path
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(f"boom in {reranked_run}/checkpoints")

    monkeypatch.setattr(model.predictor, "predict_images", broken)
    with pytest.raises(MlflowException) as caught:
        model.predict(None, pd.DataFrame({"image": [photo]}))
    body = caught.value.serialize_as_json()
    assert "stack_trace" not in body and str(reranked_run) not in body
    assert "see its log" in caught.value.message


@pytest.fixture
def scoring_server(reranked_run: Path, tmp_path: Path) -> Iterator[str]:
    """MLflow's own scoring server (what `mlflow models serve` runs) for the geoloc model as it
    is logged (code, signature, packed run), in-process on a loopback port; its URL."""
    import threading

    import mlflow.pyfunc
    import uvicorn
    from fixtures.mlflow_server import free_port
    from mlflow.pyfunc import scoring_server

    saved = tmp_path / "model"
    packed = pack_run(reranked_run, tmp_path / "packed")
    mlflow.pyfunc.save_model(
        saved, python_model=str(SERVED_MODEL_CODE), artifacts={RUN_ARTIFACT: str(packed)},
        signature=model_signature(), input_example=input_example(),
    )  # fmt: skip
    app = scoring_server.init(mlflow.pyfunc.load_model(str(saved)))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline, "scoring server did not start"
        time.sleep(0.05)
    yield url
    server.should_exit = True
    thread.join(timeout=10)


def test_one_malformed_base64_row_in_a_json_request_costs_only_that_row(
    scoring_server: str, photo: bytes
) -> None:
    good = base64.b64encode(photo).decode()
    wrapped = base64.encodebytes(photo).decode()  # MLflow's own clients wrap at 76 characters
    rows = [[good], ["!!not base64!!"], [wrapped], ["abc"], [None]]
    body = {"dataframe_split": {"columns": ["image"], "data": rows}}
    answer = requests.post(f"{scoring_server}/invocations", json=body, timeout=120)
    assert answer.status_code == 200, answer.text[:500]
    served = pd.DataFrame(answer.json()["predictions"])
    assert served["error"].isna().tolist() == [True, False, True, False, False]
    assert served["cell"].iloc[0] == served["cell"].iloc[2]
    assert "not base64" in served["error"].iloc[1] and "not base64" in served["error"].iloc[3]
    assert "neither 'image' nor 'path'" in served["error"].iloc[4]
