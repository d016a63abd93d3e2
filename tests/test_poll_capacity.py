"""What keeps many jobs polled cheaply: batched claims, cadence, and fencing."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import unquote

import pytest

from service.config import Settings
from service.runcomfy.client import RunComfyClient, create_upstream_client
from service.runcomfy.emulator import MODEL
from service.store.jobs import JobStore, Outcome
from service.store.schedules import Claim, Schedules
from service.worker.loop import ClaimLoop, Heartbeat
from service.worker.poller import Poller
from tests.support import (
    job_record,
    new_tenant,
    read_http_request,
    tcp_server,
    tenants_of,
    wait_for,
)

TENANT = new_tenant("orders")
INTERVAL_S = 5.0


@pytest.fixture
def schedules(redis, keys):
    return Schedules(redis, keys, lease_s=30)


@pytest.fixture
def jobs(redis, keys):
    return JobStore(redis, keys, retention_s=3600)


async def redis_ms(redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def due_at(redis, keys, member: str) -> int | None:
    score = await redis.zscore(keys.schedule("poll"), member)
    return None if score is None else int(score)


@pytest.fixture
async def poller(redis_server, jobs, schedules, emulator) -> AsyncIterator[Poller]:
    """A poller with a fixed interval, against an emulator whose requests run for an hour."""
    url = await emulator(queue_s=0, run_s=3600)
    settings = Settings(
        redis_url=redis_server.url,
        runcomfy_base_url=url,
        runcomfy_token="test-token",  # noqa: S106 - the emulator accepts any token
        tenants=tenants_of(TENANT.tenant()),
        poll_interval_min_s=INTERVAL_S,
        poll_interval_max_s=INTERVAL_S,
    )
    async with create_upstream_client() as session:
        client = RunComfyClient(session, url, "test-token")
        yield Poller(settings, jobs, schedules, client, Heartbeat())


async def running_job(poller: Poller) -> str:
    """A job `in_progress` upstream and in the store, its next poll due in an hour."""
    jobs, schedules = poller.jobs, poller.schedules
    record = job_record(TENANT.id)
    await jobs.create(record)
    [submit] = await schedules.claim_submits(1, global_cap=100, tenant_caps={})
    stored = await jobs.get(record.id)
    assert stored is not None
    outcome, stored = await jobs.record_submit(stored, submit.lease)
    answer = await poller.client.submit(MODEL, b'{"prompt": "p", "video_url": "https://e.com/v"}')
    assert answer.request_id is not None
    assert await jobs.submitted(stored, submit.lease, answer.request_id, poll_in_s=0) is outcome
    [poll] = await schedules.claim("poll", 1)
    stored = await jobs.get(record.id)
    assert stored is not None
    assert await jobs.started(stored, poll.lease, poll_in_s=3600) is Outcome.DONE
    return record.id


async def test_a_release_moves_a_member_only_while_its_claim_still_holds(redis, keys, schedules):
    """A stale fencing token's member stays with its new holder; a current one moves."""
    await redis.zadd(keys.schedule("poll"), {"job_a": 0})
    [stale] = await schedules.claim("poll", 10)
    assert await schedules.release(stale, delay_s=0)
    [current] = await schedules.claim("poll", 10)

    assert not await schedules.release(stale, delay_s=None)
    assert await due_at(redis, keys, "job_a") is not None
    assert await schedules.release(current, delay_s=None)
    assert await due_at(redis, keys, "job_a") is None


async def test_a_cadenced_release_is_due_one_interval_after_the_previous_due_time(
    redis, keys, schedules
):
    """Time spent waiting and working does not stretch the period: due = previous due + delay."""
    due = await redis_ms(redis) - 400
    await redis.zadd(keys.schedule("poll"), {"job_a": due, "job_b": due})
    claims = await schedules.claim("poll", 10)
    assert [c.due_ms for c in claims] == [due, due]
    cadenced, plain = sorted(claims, key=lambda c: c.member)

    before = await redis_ms(redis)
    await schedules.release(cadenced, delay_s=60, cadence=True)
    await schedules.release(plain, delay_s=60)
    after = await redis_ms(redis)

    assert await due_at(redis, keys, "job_a") == due + 60_000
    assert before + 60_000 <= (await due_at(redis, keys, "job_b") or 0) <= after + 60_000


async def test_a_cadenced_release_of_a_late_member_is_never_due_before_now(redis, keys, schedules):
    """A member more than an interval late is due now, not in the past."""
    due = await redis_ms(redis) - 3_600_000
    await redis.zadd(keys.schedule("poll"), {"job_a": due})
    [claim] = await schedules.claim("poll", 10)

    before = await redis_ms(redis)
    await schedules.release(claim, delay_s=60, cadence=True)
    after = await redis_ms(redis)

    assert before <= (await due_at(redis, keys, "job_a") or 0) <= after


async def test_an_unchanged_job_is_polled_again_one_interval_after_it_was_due(redis, keys, poller):
    """The poller keeps a job's cadence: its next poll is due exactly one interval later."""
    job_id = await running_job(poller)
    due = await redis_ms(redis) - 300
    await redis.zadd(keys.schedule("poll"), {job_id: due}, xx=True)

    [claim] = await poller.claim(10)
    await poller.work(claim)

    assert await due_at(redis, keys, job_id) == due + round(INTERVAL_S * 1000)
    stored = await poller.jobs.get(job_id)
    assert stored is not None
    assert stored.record.status == "in_progress"


async def test_a_gone_job_in_a_claimed_batch_leaves_the_schedule_and_the_rest_are_polled(
    redis, keys, poller
):
    """Jobs read together for a batch: one that no longer exists is dropped, others go on."""
    live = [await running_job(poller) for _ in range(2)]
    await redis.zadd(keys.schedule("poll"), {live[0]: 0, live[1]: 0, "job_gone": 0})

    claims = await poller.claim(10)
    assert sorted(c.member for c in claims) == sorted([*live, "job_gone"])
    await asyncio.gather(*(poller.work(c) for c in claims))

    assert await due_at(redis, keys, "job_gone") is None
    for job_id in live:
        assert (await due_at(redis, keys, job_id) or 0) > await redis_ms(redis)


class _Recorder(ClaimLoop):
    """A loop over the poll schedule that notes each member it works and drops it."""

    def __init__(self, schedules: Schedules, **options: Any) -> None:
        super().__init__(schedules, Heartbeat(), **options)
        self.worked: list[str] = []

    async def claim(self, max_items: int) -> list[Claim]:
        return await self.schedules.claim("poll", max_items)

    async def work(self, claim: Claim) -> None:
        await asyncio.sleep(0)
        self.worked.append(claim.member)
        await self.schedules.release(claim, delay_s=None)


async def _worked(loop: _Recorder, members: list[str]) -> None:
    async def all_worked() -> bool:
        return sorted(loop.worked) == sorted(members)

    await wait_for(all_worked, timeout=10)


async def test_an_idle_loop_claims_an_item_soon_after_it_falls_due(redis, keys, schedules):
    """An item due in 0.3 s is worked at its next look after that, `idle_s` apart."""
    loop = _Recorder(schedules, concurrency=4, idle_s=0.05)
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))
    await wait_for(lambda: _async(bool(loop.heartbeat.beats)))  # its first, empty, claim
    await redis.zadd(keys.schedule("poll"), {"job_later": await redis_ms(redis) + 300})
    await _worked(loop, ["job_later"])
    stop.set()
    await running


async def _async(value: Any) -> Any:
    return value


async def test_a_loop_that_claims_in_batches_still_works_every_due_item_once(
    redis, keys, schedules
):
    """Items beyond the free slots are worked as slots free up, each once."""
    members = {f"job_{i:02}": 0 for i in range(23)}
    await redis.zadd(keys.schedule("poll"), members)
    loop = _Recorder(schedules, concurrency=4, batch=4, idle_s=0.05)
    stop = asyncio.Event()
    running = asyncio.create_task(loop.run(stop))

    async def all_worked() -> bool:
        return len(loop.worked) == len(members)

    await wait_for(all_worked)
    stop.set()
    await running
    assert sorted(loop.worked) == sorted(members)


async def test_a_request_id_with_reserved_characters_is_sent_percent_encoded():
    """The status URL is built pre-encoded: an id with '/', '?', '#', '%' still arrives intact."""
    seen: list[str] = []

    async def status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_http_request(reader)
        raw_path = request.split(b" ", 2)[1].decode()
        seen.append(raw_path)
        rid = unquote(raw_path.removeprefix("/v1/requests/").removesuffix("/status"))
        body = json.dumps({"request_id": rid, "status": "in_queue"}).encode()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
        writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    async with tcp_server(status) as url, create_upstream_client() as session:
        answer = await RunComfyClient(session, url, "test-token").status("a/b?c#d%e ü")
    assert seen == ["/v1/requests/a%2Fb%3Fc%23d%25e%20%C3%BC/status"]
    assert answer.request_id == "a/b?c#d%e ü"
