"""`geoloc serve`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def _cmd(
        port: Annotated[int, typer.Option("--port", "-p", min=0, max=65535,
                                          help="TCP port (0: any free one).")] = 8765,
        host: Annotated[str, typer.Option(
            "--host", help="Address to bind; 0.0.0.0 shares it on the network.")] = "127.0.0.1",
        directory: Annotated[Path | None, typer.Option(
            "--dir", help="Folder to serve (default: $GEOLOC_RUNS_DIR).")] = None,
        idle_timeout: Annotated[float, typer.Option(
            "--idle-timeout", min=1.0,
            help="Seconds a silent connection is kept before it is closed.")] = 30.0,
    ) -> None:  # fmt: skip
        """Serve the runs folder (dashboards, leaderboard, reports) read-only over HTTP, so
        links from the Prefect UI open in a browser; set GEOLOC_DASHBOARD_URL to the printed
        address where flows run. Stops on Ctrl-C."""
        from geoloc.paths import runs_dir
        from geoloc.presentation.serve import make_server, server_url

        root = (directory or runs_dir()).resolve()
        server = make_server(root, host, port, idle_timeout=idle_timeout)
        url = server_url(server)
        typer.echo(f"serving {root} read-only at {url}/ (Ctrl-C to stop)")
        typer.echo(f"  leaderboard: {url}/_aggregate/dashboard.html")
        typer.echo(f"  run pages:   {url}/<run_id>/dashboard.html")
        typer.echo(f"  for links in Prefect artifacts: export GEOLOC_DASHBOARD_URL={url}")
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            typer.echo("stopped")
        finally:
            server.server_close()
