"""Waiters and streams follow job changes through one subscription (real Redis, in process)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from service.api import watching
from service.api.watching import preferred_wait_s, until_final
from service.store.changes import JobChanges
from service.store.jobs import JobStore
from tests.support import job_record, wait_for


@pytest.fixture
async def jobs(redis, keys) -> JobStore:
    return JobStore(redis, keys, retention_s=3600)


@pytest.fixture
async def changes(redis, keys) -> AsyncIterator[JobChanges]:
    followed = JobChanges(redis, keys)
    following = asyncio.create_task(followed.run())
    yield followed
    followed.close()
    await following


async def stored_job(jobs: JobStore):
    record = job_record("orders")
    await jobs.create(record)
    return await jobs.get(record.id)


@pytest.mark.parametrize(
    ("prefer", "seconds"),
    [
        ("wait=5", 5),
        ("wait", 60),
        ("respond-async, wait=10", 10),
        ('WAIT="7"', 7),
        ("wait=0", None),
        ("wait=61", None),
        ("wait=-1", None),
        ("wait=٣", None),
        ("handling=lenient", None),
        (None, None),
    ],
)
def test_prefer_wait_is_read_as_rfc_7240_says(prefer, seconds):
    """`wait` alone is 60, `wait=N` is N from 1 to 60, anything else is no wait."""
    assert preferred_wait_s(prefer) == seconds


async def test_a_thousand_waiters_cost_no_redis_calls_while_nothing_changes(jobs, changes, redis):
    """1,000 waits on one process make no Redis call in a quiet second; a change ends one."""
    stored = [await stored_job(jobs) for _ in range(1000)]
    waits = [asyncio.create_task(until_final(changes, jobs, s, 30)) for s in stored]
    await wait_for(lambda: _true(_watches(changes) == 1000))
    calls = await _commands(redis)
    await asyncio.sleep(1)  # the quiet second being measured, not a settling delay
    # The two INFO calls, maybe a health-check PING: nothing per waiter.
    assert await _commands(redis) - calls < 10
    latest = await jobs.get(stored[0].record.id)
    await jobs.finish(latest, "cancelled", lease=None)
    finished = await asyncio.wait_for(waits[0], 1)
    assert finished.record.status == "cancelled"
    assert not any(wait.done() for wait in waits[1:])
    changes.stop()
    answered = await asyncio.wait_for(asyncio.gather(*waits[1:]), 5)
    assert {job.record.status for job in answered} == {"pending"}


async def test_a_quiet_stream_sends_keep_alive_comments(jobs, changes, monkeypatch):
    """With nothing to say a stream sends `: keep-alive` (every KEEP_ALIVE_S)."""
    monkeypatch.setattr(watching, "KEEP_ALIVE_S", 0.05)
    stored = await stored_job(jobs)
    stream = watching.job_events(changes, jobs, stored, None)
    chunks = aiter(stream.iterator)
    received = b""
    while b": keep-alive" not in received:
        received += await asyncio.wait_for(anext(chunks), 1)
    assert b"event: job.pending" in received


async def _true(value: object) -> object:
    return value


def _watches(changes: JobChanges) -> int:
    return sum(len(held) for held in changes._watches.values())  # noqa: SLF001 - what is held


async def _commands(redis) -> int:
    stats = await redis.info("commandstats")
    return sum(entry["calls"] for entry in stats.values())
