"""`geoloc` log lines (epochs, run start/end, progress of long steps) in the flow run's logs.

Prefect sends its own loggers to the API; `PREFECT_LOGGING_EXTRA_LOGGERS=geoloc` (set by
`make demo` and `infra/stack.sh`) adds the library's. This does the same when that variable is
not set, so `python -m flows.pipeline`, a worker started by hand or a test harness show the
same lines. Records outside a flow or task run have no run to attach to and stay local.

`mask_secrets` masks URI passwords (`geoloc.errors.redact`) in everything a flow-run process
shows: Prefect's handlers (the run logs the UI shows, the console) and the process's stdout and
stderr (MLflow writes `View run ... at: <tracking URI>` straight to stdout), as the CLI does.
"""

from __future__ import annotations

import logging

from prefect.context import FlowRunContext, TaskRunContext
from prefect.logging.handlers import APILogHandler

from geoloc.errors import mask_process_output


class _InRunOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def send_geoloc_logs_to_prefect() -> None:
    """Attach an API log handler to the `geoloc` logger unless one is there already."""
    target = logging.getLogger("geoloc")
    if any(isinstance(h, APILogHandler) for h in target.handlers):
        return  # PREFECT_LOGGING_EXTRA_LOGGERS=geoloc did it
    handler = APILogHandler()
    handler.addFilter(_InRunOnly())
    target.addHandler(handler)


def mask_secrets() -> None:
    """Every handler Prefect configured when it was imported (and ours) masks passwords; so do
    stdout and stderr."""
    mask_process_output()
