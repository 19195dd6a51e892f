"""The `index-sharded` flow on a real Prefect server and a local two-worker Dask cluster."""

from __future__ import annotations

import asyncio
from pathlib import Path
from uuid import UUID

import pytest
from fixtures.demo_data import DEMO_FIXTURE_CONFIG
from fixtures.shards import N_IMAGES, assert_same_index, make_shards, sequential_index
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

from flows.index_sharded import index_sharded
from geoloc.config import IndexConfig
from geoloc.paths import DataPaths

pytestmark = [pytest.mark.server, pytest.mark.usefixtures("prefect_harness")]


def _shard_task_states(flow_run_id: UUID) -> list[str]:
    async def read() -> list[str]:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        return [r.state.name for r in runs if r.name.startswith("process-shard")]

    return asyncio.run(read())


def test_dask_fan_out_builds_the_index_of_the_sequential_ingest(tmp_path: Path) -> None:
    shards = make_shards(tmp_path / "shards")
    state = index_sharded(
        shards=shards, index_preset=None, overrides=DEMO_FIXTURE_CONFIG, return_state=True
    )
    assert state.is_completed(), state.message
    out = state.result()
    assert out["accepted"] == N_IMAGES

    assert _shard_task_states(state.state_details.flow_run_id) == ["Completed"] * len(shards)
    plain = sequential_index(shards, tmp_path / "plain", IndexConfig(**DEMO_FIXTURE_CONFIG))
    assert_same_index(DataPaths.default(), plain)
