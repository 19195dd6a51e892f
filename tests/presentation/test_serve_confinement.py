"""`geoloc serve` exposes the runs folder and nothing else: no file or folder reached through a
link, no dot-files, no tracking or sweep database; a silent client cannot pin a thread, and a
malformed request never puts a traceback on the console."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from geoloc.presentation.serve import make_server, server_url


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    (root / "run1").mkdir(parents=True)
    (root / "run1" / "dashboard.html").write_text("<p>dashboard</p>")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("outside the runs folder")
    (root / "leak.txt").symlink_to(outside / "secret.txt")
    (root / "leakdir").symlink_to(outside)
    (root / ".env").write_text("TOKEN=1")
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]")
    (root / "mlflow.db").write_bytes(b"SQLite format 3\x00")
    (root / "optuna.db").write_bytes(b"SQLite format 3\x00")
    return root


@pytest.fixture
def served(runs: Path) -> Iterator[str]:
    server = make_server(runs, port=0, idle_timeout=1.0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server_url(server)
    server.shutdown()
    server.server_close()


def test_only_real_paths_inside_the_folder_are_served(served: str) -> None:
    assert httpx.get(f"{served}/run1/dashboard.html").text == "<p>dashboard</p>"
    for path in ("/leak.txt", "/leakdir/", "/leakdir/secret.txt", "/.env", "/.git/config",
                 "/mlflow.db", "/optuna.db", "/%2eenv", "/run1/../mlflow.db"):  # fmt: skip
        r = httpx.get(served + path)
        assert r.status_code == 404, path
        assert "outside" not in r.text and "SQLite" not in r.text and "TOKEN" not in r.text
    listing = httpx.get(f"{served}/").text
    assert "run1/" in listing
    for hidden in (".env", ".git", "mlflow.db", "optuna.db"):
        assert hidden not in listing


def test_a_nul_byte_is_an_error_answer_not_a_traceback(
    served: str, capfd: pytest.CaptureFixture[str]
) -> None:
    for path in ("/%00", "/run1/%00dashboard.html", "/run1%00/"):
        assert httpx.get(served + path).status_code in (400, 404)
    assert httpx.get(f"{served}/run1/dashboard.html").status_code == 200  # still serving
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out


def test_a_silent_connection_is_closed_after_the_idle_timeout(served: str) -> None:
    host, port = served.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as half_sent:
        half_sent.sendall(b"GET /run1/dashboard.html HTTP/1.1\r\nHost: x\r\n")  # never ends
        half_sent.settimeout(10)
        start = time.monotonic()
        assert half_sent.recv(1024) == b""  # the server hung up
        assert time.monotonic() - start < 8
