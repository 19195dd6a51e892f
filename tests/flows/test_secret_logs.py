"""A flow run never shows a tracking password: the lines Prefect stores for the run (what its
UI shows: `print`s of `log_prints` flows, task and `geoloc` log records) and what the flow-run
process writes to its console (MLflow writes `View run ... at: <uri>` straight to stdout) are
masked by the same `geoloc.errors.redact` as the CLI's."""

from __future__ import annotations

import logging
import sys
import time
from uuid import UUID

import pytest
from prefect import flow, get_run_logger, task
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

from flows._logging import mask_secrets

pytestmark = [pytest.mark.server, pytest.mark.usefixtures("prefect_harness")]

PASSWORD = "s3cr3t-Pa55"
URI = f"http://alice:{PASSWORD}@127.0.0.1:5999"


@task
def mirror_step() -> None:
    print(f"tracking to {URI}")  # a `print` in a task of a log_prints flow
    sys.stdout.write(f"View run demo at: {URI}/#/experiments/1/runs/abc\n")  # as MLflow does
    logging.getLogger("geoloc.integrations.mlflow").warning("mirror to %s failed", URI)
    get_run_logger().info("task logger: %s", URI)


@flow(name="secret-logs", log_prints=True)
def secret_logs() -> None:
    print(f"flow print: {URI}")
    get_run_logger().warning(f"flow logger: {URI}")
    mirror_step()


def _logs(flow_run_id: UUID, expected: int, timeout_s: float = 60) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(
                log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                limit=200,
            )
        messages = [log.message for log in logs]
        if sum("alice:" in m for m in messages) >= expected or time.monotonic() > deadline:
            return messages
        time.sleep(0.5)


def test_no_line_of_a_flow_run_shows_a_tracking_password(capfd: pytest.CaptureFixture) -> None:
    mask_secrets()  # what `import flows` did, again: pytest swapped stdout for its capture since
    state = secret_logs(return_state=True)
    assert state.is_completed(), state.message
    messages = _logs(state.state_details.flow_run_id, expected=5)
    shown = [m for m in messages if "alice:" in m]
    assert len(shown) >= 5, messages
    assert all("alice:***@127.0.0.1" in m for m in shown), shown
    assert not any(PASSWORD in m for m in messages)
    out, err = capfd.readouterr()
    assert "View run demo at: http://alice:***@" in out
    assert PASSWORD not in out + err
