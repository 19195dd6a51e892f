"""A tracking password never reaches the terminal, even in lines third-party libraries print:
MLflow ends every run it touches with `View run <name> at: <tracking uri>/#/...`, straight to
`sys.stdout`, with whatever credentials the URI carries."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from geoloc.cli import main
from geoloc.errors import RedactingStream

PASSWORD = "pw-in-the-link-5Tq-long-enough"


@pytest.mark.server
def test_mlflow_run_links_printed_by_a_command_mask_the_password(
    make_run: Callable[..., Path], mlflow_server_factory, tmp_path: Path, capsys, monkeypatch
) -> None:
    server = mlflow_server_factory(
        f"sqlite:///{tmp_path / 'auth-backend.db'}", args=["--app-name", "basic-auth"],
        env={"MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD, "MLFLOW_FLASK_SERVER_SECRET_KEY": "test"},
    )  # fmt: skip
    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(var, raising=False)
    run_dir = make_run("linked", with_checkpoints=False)
    uri = server.url.replace("//", f"//admin:{PASSWORD}@")
    assert main(["mlflow", "sync", str(run_dir), "--no-model", "--tracking-uri", uri]) == 0
    out = capsys.readouterr()
    printed = out.out + out.err
    assert "View run" in printed  # MLflow's own line was printed, and masked
    assert "admin:***@127.0.0.1" in printed
    assert PASSWORD not in printed


def test_every_write_to_a_masked_stream_loses_its_password(capsys) -> None:
    import sys

    stream = RedactingStream(sys.stdout)
    assert stream.write("at: http://u:secret@h/x\n") == len("at: http://u:secret@h/x\n")
    stream.writelines(["https://v:other@h2 ok\n"])
    stream.flush()
    assert capsys.readouterr().out == "at: http://u:***@h/x\nhttps://v:***@h2 ok\n"
