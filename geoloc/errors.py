"""Errors that the CLI turns into a one-line reason and a non-zero exit, and the redaction that
keeps credentials out of those lines (and of logs and files)."""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import unquote, urlsplit, urlunsplit


class GeolocError(Exception):
    """A user-facing failure: the message names the input and the reason."""


class ConfigError(GeolocError):
    """A config file or override is invalid (unknown key, bad value)."""


class DataError(GeolocError):
    """Input data as a whole is unusable (missing folder, manifest without coordinates...)."""


class IndexMissingError(DataError):
    """The canonical index is missing or empty."""


class TrialPruned(GeolocError):  # noqa: N818 - mirrors optuna's name on purpose
    """Raised by an epoch callback to stop a run early; the run ends with status `pruned`."""


class TrainingError(GeolocError):
    """Training cannot go on (NaN loss, incompatible checkpoint...); the message says why."""


DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class DiskFullError(GeolocError):
    """A write found its disk (or quota) full: the message names the folder, what was being
    written and the bytes it needs, so the user knows what to free. Nothing half-written stays."""

    @classmethod
    def writing(cls, path: str | os.PathLike[str], needed: int | None = None,
                written: int | None = None) -> DiskFullError:  # fmt: skip
        """For a write of `path` that ran out of space: `needed` bytes when known, else at
        least the `written` bytes it got through before the disk filled."""
        path = Path(path)
        folder = path.parent if path.suffix or not path.is_dir() else path
        try:
            free = f"{shutil.disk_usage(_existing(folder)).free:,} bytes free"
        except OSError:
            free = "free space unknown"
        if needed is not None:
            need = f"needs {needed:,} bytes"
        elif written:
            need = f"needs more than the {written:,} bytes written before it stopped"
        else:
            need = "needs more space"
        return cls(f"no space left in '{folder}': writing '{path.name}' {need} ({free}); free "
                   "some space and rerun (nothing half-written was kept)")  # fmt: skip


def _existing(folder: Path) -> Path:
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return folder


def is_disk_full(exc: BaseException, folder: str | os.PathLike[str] | None = None) -> bool:
    """Whether `exc` (or an error it was raised from) is the disk or quota being full; with
    `folder`, also a library's own error (torch: "unexpected pos") raised while that folder's
    disk has less than 1 MiB free."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in DISK_FULL_ERRNOS:
            return True
        seen = seen.__cause__ or seen.__context__
    if folder is None or not isinstance(exc, RuntimeError | OSError):
        return False
    try:
        return shutil.disk_usage(_existing(Path(folder))).free < 1 << 20
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# Secrets in URIs: what may reach a message, a log or a file
# --------------------------------------------------------------------------------------------

_USERINFO_PASSWORD = re.compile(
    # scheme://user:password@host -- the password runs to the authority's last '@'
    r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s/?#@:]*:)(?P<password>[^\s/?#]*)@"
)
_SECRET_QUERY = re.compile(r"(?i)(?P<head>[?&](?:access_token|token|password|api_key)=)[^&\s#]+")
MASK = "***"


def redact(text: str) -> str:
    """`text` with the password of every `scheme://user:password@host` URI (and token query
    values) replaced by `***`: apply it to anything that may reach a message, a log or a file."""
    text = _USERINFO_PASSWORD.sub(lambda m: f"{m['head']}{MASK}@", str(text))
    return _SECRET_QUERY.sub(lambda m: f"{m['head']}{MASK}", text)


def split_password(uri: str) -> tuple[str, str | None, str | None]:
    """(`uri` without its password, user name, password), both credentials percent-decoded;
    the password is None when the URI has none. The first may be saved; the others may not."""
    try:
        parts = urlsplit(uri)
        password = parts.password
    except ValueError:  # unparseable (a bad IPv6 literal...): mask it, keep it usable as text
        return redact(uri), None, None
    if password is None:
        return uri, parts.username, None
    host = parts.netloc.rpartition("@")[2]
    netloc = f"{parts.username}@{host}" if parts.username else host
    user = unquote(parts.username or "")
    return urlunsplit(parts._replace(netloc=netloc)), user, unquote(password)


class RedactingStream:
    """A text stream that passes every write through `redact`: third-party libraries print URIs
    of their own (MLflow's `View run ... at: http://user:password@host/...` goes straight to
    `sys.stdout`), so the process's streams themselves are masked, not only our messages.

    Each `write` is masked whole; a library that splits one URI over several writes would slip
    through, which MLflow, tqdm and logging do not do (they write a line at a time)."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        if not isinstance(text, str):  # click probes with b"": answer as the stream would
            return self._stream.write(text)
        self._stream.write(redact(text))
        return len(text)  # what the caller handed over, as `TextIO.write` promises

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, encoding, fileno...
        return getattr(self._stream, name)


class RedactSecrets(logging.Filter):
    """Masks URI passwords in every log line and traceback (MLflow's errors name the request
    URL, credentials included). Put it on handlers: a handler's filters see the records of every
    logger that reaches it (the CLI's console handler, Prefect's API and console handlers)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if (clean := redact(message)) != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        return True


def mask_process_output() -> None:
    """Mask this whole process's output from now on: `sys.stdout`/`sys.stderr` become
    `RedactingStream`s and every handler already attached to a logger gets `RedactSecrets`.
    For processes that run geoloc without its CLI (a Prefect flow run); idempotent."""
    if not isinstance(sys.stdout, RedactingStream):
        sys.stdout = RedactingStream(sys.stdout)  # type: ignore[assignment]
    if not isinstance(sys.stderr, RedactingStream):
        sys.stderr = RedactingStream(sys.stderr)  # type: ignore[assignment]
    loggers = [logging.getLogger(), *(logging.getLogger(name) for name in
                                      list(logging.Logger.manager.loggerDict))]  # fmt: skip
    for logger in loggers:
        for handler in logger.handlers:
            if not any(isinstance(f, RedactSecrets) for f in handler.filters):
                handler.addFilter(RedactSecrets())


@contextmanager
def redacted_output() -> Iterator[None]:
    """`sys.stdout` and `sys.stderr` masked by `RedactingStream` for the duration (a command)."""
    before = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = RedactingStream(before[0]), RedactingStream(before[1])  # type: ignore[assignment]
    try:
        yield
    finally:
        sys.stdout, sys.stderr = before
