"""`geoloc` command line: one sub-module per concern, assembled here.

Library code raises `GeolocError` with a message naming the input and the reason; `main`
turns it into one line on stderr and exit code 1. `print` lives only in this package.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import TracebackType

import typer

from geoloc.errors import (
    DiskFullError,
    GeolocError,
    RedactSecrets,
    is_disk_full,
    redact,
    redacted_output,
)

app = typer.Typer(
    name="geoloc",
    help="Single-image geolocalization on H3 cells: data, training, rerank, reports, flows.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _register() -> None:
    # imported here so that `geoloc --help` stays the single place that lists every verb
    from geoloc.cli import data, mlflow_cmd, report, rerank, s3, serve, sweep, train

    app.add_typer(data.data_app, name="data")
    app.add_typer(data.index_app, name="index")
    train.register(app)
    rerank.register(app)
    report.register(app)
    app.add_typer(mlflow_cmd.mlflow_app, name="mlflow")
    app.add_typer(s3.s3_app, name="s3")
    sweep.register(app)
    serve.register(app)


_register()


class _ProgressHandler(logging.Handler):
    """`geoloc.progress` lines (epochs, run start/end) as plain text on stderr, written above a
    running tqdm bar instead of through it."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


@contextmanager
def _progress_lines() -> Iterator[None]:
    """Show progress lines at the default WARNING level, once each, for one command."""
    from geoloc.progress import progress_log

    handler = _ProgressHandler()
    before = progress_log.propagate
    progress_log.addHandler(handler)
    progress_log.propagate = False
    try:
        yield
    finally:
        progress_log.removeHandler(handler)
        progress_log.propagate = before


_REDACT = RedactSecrets()


def _redacted_excepthook(
    kind: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    """An unexpected error's traceback, with URI passwords masked."""
    import traceback

    sys.stderr.write(redact("".join(traceback.format_exception(kind, exc, tb))))


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one-line reasons, non-zero exits, no tracebacks for user errors."""
    logging.basicConfig(
        level=os.environ.get("GEOLOC_LOG_LEVEL", "WARNING"),
        format="%(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(_REDACT)
    with redacted_output(), _progress_lines():  # libraries print URIs too (MLflow's run links)
        return _main(argv)


def _main(argv: list[str] | None) -> int:
    try:
        rv = app(args=argv, standalone_mode=False)
        if isinstance(rv, int):  # click returns the code of a typer.Exit here
            return rv
    except GeolocError as exc:
        typer.echo(f"error: {redact(str(exc))}", err=True)
        return 1
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        # a write outside the atomic layer (shard tars, decoded images): same one line
        where = exc.filename or os.getcwd()
        typer.echo(f"error: {redact(str(DiskFullError.writing(where)))}", err=True)
        return 1
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    except typer.TyperException as exc:  # usage errors: bad option, missing argument...
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            typer.echo(f"error: {exc}", err=True)
        return int(getattr(exc, "exit_code", 2))
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        return 130
    return 0


def run() -> None:
    """The `geoloc` console script."""
    from geoloc.heap import heap_exec

    env = heap_exec(sys.argv, dict(os.environ))
    if env is not None:  # glibc reads its malloc settings at start: run again with them
        os.execve(sys.executable, [sys.executable, "-m", "geoloc", *sys.argv[1:]], env)
    sys.excepthook = _redacted_excepthook
    sys.exit(main())
