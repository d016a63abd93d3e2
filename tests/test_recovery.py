"""Recovery at scale: 500 failed webhooks re-sent by one call, paced, not delaying others.

The real dispatcher (its per-tenant and per-host slots), a real Redis, real
receivers on 127.0.0.1 and the API in this process: a tenant's receiver is down
while 500 of its jobs end, so their webhooks fail for good; it comes back, one
`POST /v1/deliveries/recover` queues them all, and another tenant's jobs end
meanwhile. The test prints the other tenant's delivery latency with and without
the recovery running (README, Operating it).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from datetime import timedelta
from typing import Any

import pytest
from litestar import Request, Response
from litestar.params import RawBody

from service.config import load_settings
from service.models import utcnow
from service.store.connection import connect
from service.store.deliveries import DeliveryStore
from service.store.jobs import JobStore
from service.store.schedules import Schedules
from service.webhooks.delivery import create_webhook_client
from service.worker.dispatcher import CONCURRENCY, Dispatcher
from service.worker.loop import Heartbeat
from tests.support import (
    NO_PREFLIGHT,
    Receiver,
    job_record,
    new_tenant,
    serve_api,
    tenants_of,
    wait_for,
)

TENANT = new_tenant("orders")
OTHER = new_tenant("billing")
RECOVERED = 500
OTHERS = 100


class SlowReceiver(Receiver):
    """A receiver that takes `delay_s` to answer, like a real endpoint doing some work."""

    delay_s: float = 0.04

    async def _receive(self, request: Request[Any, Any, Any], body: RawBody) -> Response[bytes]:
        await asyncio.sleep(self.delay_s)
        return await super()._receive(request, body)


async def end_jobs(jobs: JobStore, tenant: str, url: str, count: int) -> dict[str, float]:
    """Create and cancel `count` jobs of `tenant` with a webhook to `url`; when each ended."""
    records = [job_record(tenant, webhook_url=url) for _ in range(count)]
    await jobs.create_many([(record, None) for record in records])
    ended: dict[str, float] = {}
    for stored in await jobs.get_many([r.id for r in records]):
        assert stored is not None
        ended[stored.record.id] = time.time()
        await jobs.finish(stored, "cancelled", lease=None)
    return ended


def latencies_ms(receiver: Receiver, ended: dict[str, float]) -> list[float]:
    """Milliseconds from each job's end to its webhook's arrival."""
    arrived = {}
    for received in receiver.received:
        job_id = "job_" + received.headers["webhook-id"].removeprefix("msg_").rpartition("_")[0]
        arrived.setdefault(job_id, received.at)
    return sorted((arrived[job_id] - at) * 1000 for job_id, at in ended.items())


def p(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


@pytest.fixture
async def receivers():
    down = await SlowReceiver(statuses=[503] * (RECOVERED * 10)).start()
    other = await SlowReceiver().start()
    yield down, other
    await down.stop()
    await other.stop()


@pytest.fixture
async def gateway(redis_server, keys):
    """The real dispatcher on its own (nothing else sends webhooks), and the stores."""
    env = {
        "REDIS_URL": redis_server.url,
        "RUNCOMFY_API_TOKEN": "test-token",
        "GATEWAY_WEBHOOK_RETRY_SCHEDULE": "0.05",
        "GATEWAY_LEASE_S": "5",
        "GATEWAY_WEBHOOK_TIMEOUT_S": "2",
        "GATEWAY_SHUTDOWN_S": "2",
        **NO_PREFLIGHT,
    }
    settings = load_settings(env, tenants=tenants_of(TENANT.tenant(), OTHER.tenant()))
    redis = connect(redis_server.url)
    retention = settings.job_retention_s
    jobs = JobStore(redis, keys, retention_s=retention)
    deliveries = DeliveryStore(redis, keys, retention_s=retention)
    schedules = Schedules(redis, keys, lease_s=settings.lease_s)
    client = create_webhook_client(max_connections=CONCURRENCY)
    dispatcher = Dispatcher(settings, deliveries, schedules, client, Heartbeat())
    stop = asyncio.Event()
    running = asyncio.create_task(dispatcher.run(stop))
    yield settings, jobs, deliveries
    stop.set()
    await asyncio.wait_for(running, 10)
    await client.aclose()
    await redis.aclose()


async def test_500_failed_webhooks_are_recovered_once_while_another_tenant_is_served(
    gateway, keys, receivers
):
    """One recover call re-sends each of 500 failed webhooks exactly once.

    Another tenant's webhooks ending meanwhile all arrive before the recovery is done.
    """
    down, other = receivers
    settings, jobs, deliveries = gateway
    since = (utcnow() - timedelta(seconds=5)).isoformat()
    failing = await end_jobs(jobs, TENANT.id, down.url, RECOVERED)

    async def all_failed() -> bool:
        counts = await deliveries.failed_counts([TENANT.id])
        return counts[TENANT.id] == RECOVERED

    await wait_for(all_failed, timeout=60)
    sent_while_down = len(down.received)
    assert sent_while_down == 2 * RECOVERED  # the first attempt and the one retry

    # The other tenant alone: its webhooks' latency with nothing else going on.
    quiet = await end_jobs(jobs, OTHER.id, other.url, OTHERS)
    await wait_for(lambda: _true(len(other.received) >= OTHERS), timeout=30)
    baseline = latencies_ms(other, quiet)
    other.received.clear()

    down.statuses.clear()  # the receiver is back: it answers 200 from now on
    async with serve_api(settings, keys, TENANT.api_key) as api:
        answer = await api.post("/v1/deliveries/recover", json={"since": since})
    assert (answer.status_code, answer.json()) == (202, {"recovering": RECOVERED})
    busy = await end_jobs(jobs, OTHER.id, other.url, OTHERS)

    async def recovered() -> bool:
        return len(down.received) >= sent_while_down + RECOVERED

    await wait_for(recovered, timeout=60)
    await wait_for(lambda: _true(len(other.received) >= OTHERS), timeout=30)
    during = latencies_ms(other, busy)

    resent = down.received[sent_while_down:]
    ids = Counter(r.headers["webhook-id"] for r in resent)
    assert len(ids) == RECOVERED
    assert set(ids.values()) == {1}
    assert {i.removeprefix("msg_").rpartition("_")[0] for i in ids} == {
        job_id.removeprefix("job_") for job_id in failing
    }
    for received in resent[:5]:
        received.verified_by(TENANT.whsec)
    # Every webhook of the other tenant arrived while the recovery was still sending.
    assert max(r.at for r in other.received) < max(r.at for r in resent)

    async def all_delivered() -> bool:
        found = await jobs.get_many(list(failing))
        return all(s is not None and s.webhook_state == "delivered" for s in found)

    await wait_for(all_delivered, timeout=30)
    assert len(down.received) == sent_while_down + RECOVERED
    assert (await deliveries.failed_counts([TENANT.id]))[TENANT.id] == 0
    took = max(r.at for r in resent) - min(r.at for r in resent)
    print(
        f"\nrecovery: {RECOVERED} webhooks re-sent in {took:.2f} s; the other tenant's "
        f"webhook latency, ms: alone p50 {p(baseline, 0.5):.0f} p99 {p(baseline, 0.99):.0f} "
        f"max {baseline[-1]:.0f}; during recovery p50 {p(during, 0.5):.0f} "
        f"p99 {p(during, 0.99):.0f} max {during[-1]:.0f} "
        f"(mean {statistics.mean(during):.0f} vs {statistics.mean(baseline):.0f})"
    )


async def _true(value: bool) -> bool:
    return value
