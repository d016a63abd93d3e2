"""A Redis outage in a `worker` process's log: one warning when it starts, one line at its end."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.localredis import LocalRedis, free_port
from service.store.connection import connect
from service.store.jobs import JobStore
from service.store.keys import Keys
from tests.support import (
    NO_PREFLIGHT,
    Process,
    StartEmulator,
    job_record,
    new_tenant,
    wait_for,
    wait_http,
)

pytestmark = pytest.mark.e2e

TENANT = new_tenant("orders")
JOBS = 8
DOWN = "Redis is not answering"
BACK = "Redis is back after"


@pytest.fixture
async def redis() -> AsyncIterator[LocalRedis]:
    """A Redis of this test's own, kept on disk so a restart on its port loses nothing."""
    server = LocalRedis(appendonly=True).start()
    yield server
    server.cleanup()


class HangUpPort:
    """Listens on a port and hangs up on every connection, counting them: Redis half gone."""

    def __init__(self) -> None:
        self.connections = 0

    async def _hang_up(self, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    @contextlib.asynccontextmanager
    async def listening(self, port: int) -> AsyncIterator[HangUpPort]:
        server = await asyncio.start_server(self._hang_up, "127.0.0.1", port)
        try:
            yield self
        finally:
            server.close()
            await server.wait_closed()


async def test_a_redis_outage_logs_one_warning_and_one_recovery_line(
    tmp_path, redis: LocalRedis, emulator: StartEmulator
):
    """Redis down while jobs are in hand: one warning, no traceback, one line when it is back."""
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(TENANT.toml())
    # The jobs stay in_progress and are polled again and again, each poll a second upstream:
    # when Redis goes, the poller has them in hand.
    upstream = await emulator(queue_s=0, run_s=600, latency_ms=1000)
    client = connect(redis.url)
    jobs = JobStore(client, Keys(), retention_s=3600)
    ids = [(await jobs.create(job_record(TENANT.id))).job_id for _ in range(JOBS)]
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis.url,
        "RUNCOMFY_BASE_URL": upstream,
        "RUNCOMFY_API_TOKEN": "t",
        "GATEWAY_TENANTS_FILE": str(tenants),
        "GATEWAY_POLL_INTERVAL_MIN_S": "0.1",
        "GATEWAY_POLL_INTERVAL_MAX_S": "0.2",
        **NO_PREFLIGHT,
    }
    worker = Process(["worker", "--metrics-port", str(port)], env, tmp_path / "worker.log")
    try:
        await asyncio.to_thread(wait_http, f"http://127.0.0.1:{port}/healthz")

        async def all_in_progress() -> bool:
            found = [await jobs.get(job_id) for job_id in ids]
            return all(s is not None and s.record.status == "in_progress" for s in found)

        await wait_for(all_in_progress)
        await client.aclose()
        polled = await _status_polls(port)

        async def polled_again() -> bool:
            return await _status_polls(port) >= polled + 2 * JOBS

        await wait_for(polled_again)

        async def logged(text: str) -> bool:
            return text in worker.output()

        redis.kill()
        await wait_for(lambda: logged(DOWN))
        # The port answers again, Redis does not yet: wait until the worker tried it often.
        async with HangUpPort().listening(redis.port) as hang_up:

            async def tried_again() -> bool:
                return hang_up.connections >= 10

            await wait_for(tried_again)
        redis.start()
        await wait_for(lambda: logged(BACK))
    finally:
        # In a thread: the emulator the worker drains against runs on this event loop.
        await asyncio.to_thread(worker.stop)
    log = worker.output()
    assert log.count(DOWN) == 1, log
    assert log.count(BACK) == 1, log
    assert "Traceback" not in log, log


async def _status_polls(metrics_port: int) -> float:
    """How many status calls the worker has made to RunComfy, from its /metrics."""
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"http://127.0.0.1:{metrics_port}/metrics")).text
    return sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "rcg_upstream_request_duration_seconds_count"
        and sample.labels.get("call") == "status"
    )
