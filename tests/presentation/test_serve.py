"""`geoloc serve`: dashboards reachable from a browser (Prefect links them over HTTP)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from geoloc.cli import main
from geoloc.errors import GeolocError
from geoloc.paths import runs_dir, runs_url
from geoloc.presentation.report import write_report
from geoloc.presentation.serve import make_server, server_url
from geoloc.runfolder.layout import RunPaths


@pytest.fixture
def served() -> Iterator[str]:
    """`geoloc serve`'s server on a free port over $GEOLOC_RUNS_DIR; its base URL."""
    runs_dir().mkdir(parents=True, exist_ok=True)
    (runs_dir().parent / "secret.txt").write_text("outside the runs folder")
    server = make_server(runs_dir(), port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server_url(server)
    server.shutdown()
    server.server_close()


def test_dashboard_links_resolve_on_the_server(
    make_run: Callable[..., Path], served: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = make_run("served", with_predictions=False)
    write_report(run)
    dashboard = RunPaths(run).dashboard
    assert runs_url(dashboard) is None  # no link without a published address
    monkeypatch.setenv("GEOLOC_DASHBOARD_URL", served + "/")
    url = runs_url(dashboard)
    assert url == f"{served}/{run.name}/dashboard.html"
    page = httpx.get(url)
    assert page.status_code == 200 and run.name in page.text
    assert httpx.get(f"{served}/{run.name}/summary.json").json()["run_id"] == run.name
    assert runs_url(Path("/elsewhere/dashboard.html")) is None  # not under the runs folder


def test_the_server_is_read_only_and_stays_in_its_folder(served: str) -> None:
    assert httpx.post(f"{served}/x", content=b"data").status_code == 501
    assert httpx.put(f"{served}/x", content=b"data").status_code == 501
    for path in ("/../secret.txt", "/%2e%2e/secret.txt", "/..%2fsecret.txt"):
        r = httpx.get(served + path)
        assert r.status_code == 404 and "outside" not in r.text


def test_bad_folder_or_busy_port_is_a_one_line_error(
    served: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(GeolocError, match="does not exist"):
        make_server(Path("no-such-folder"))
    port = int(served.rsplit(":", 1)[1])
    assert main(["serve", "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot serve on 127.0.0.1:{port}") and "\n" not in err
