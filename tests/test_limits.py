"""Shared limits in Redis: the GCRA rate limiter and the upstream pause."""

from __future__ import annotations

from datetime import timedelta

import pytest

from service.models import JobRecord, VideoInput, utcnow
from service.store.connection import new_id
from service.store.jobs import JobStore, body_hash
from service.store.limits import Limits, Take
from tests.support import wait_for


@pytest.fixture
def limits(redis, keys):
    return Limits(redis, keys)


async def test_a_burst_is_granted_then_callers_are_told_how_long_to_wait(limits):
    """GCRA grants `burst` calls at once, then answers the wait until the next one."""
    grants = [await limits.acquire("t", rate_per_s=10, burst=3) for _ in range(3)]
    assert grants == [0, 0, 0]
    wait = await limits.acquire("t", rate_per_s=10, burst=3)
    assert 0.05 < wait <= 0.1


async def test_a_refused_call_takes_nothing_from_the_limit(limits):
    """Asking while over the limit does not push the next grant further away."""
    await limits.acquire("t", rate_per_s=2, burst=1)
    first = await limits.acquire("t", rate_per_s=2, burst=1)
    second = await limits.acquire("t", rate_per_s=2, burst=1)
    assert first > 0
    assert second <= first


async def test_limits_are_independent_by_name(limits):
    """Two named limits do not share their budget."""
    assert await limits.acquire("a", rate_per_s=1, burst=1) == 0
    assert await limits.acquire("b", rate_per_s=1, burst=1) == 0
    assert await limits.acquire("a", rate_per_s=1, burst=1) > 0


async def test_takes_in_one_call_are_granted_as_if_made_in_a_row(limits):
    """Several takes in one round trip: each limit grants its burst, then answers the wait."""
    takes = [Take("a", 10, burst=2)] * 3 + [Take("b", 10, burst=1)] * 2
    waits = await limits.acquire_many(takes)
    assert waits[:2] == [0, 0]
    assert 0.05 < waits[2] <= 0.1
    assert waits[3] == 0
    assert 0.05 < waits[4] <= 0.1


async def test_the_limit_refills_with_time(limits):
    """After the interval passes, a call is granted again."""
    await limits.acquire("t", rate_per_s=20, burst=1)
    assert await limits.acquire("t", rate_per_s=20, burst=1) > 0
    assert await wait_for(lambda: _granted(limits), timeout=2)


async def _granted(limits):
    return await limits.acquire("t", rate_per_s=20, burst=1) == 0


async def test_a_pause_is_seen_until_it_expires(limits):
    """A pause is visible with its reason and ends by itself."""
    assert await limits.upstream_pause() is None
    await limits.pause_upstream("insufficient_funds", 0.3)
    pause = await limits.upstream_pause()
    assert pause.reason == "insufficient_funds"
    assert 0 < pause.remaining_s <= 0.3
    await wait_for(lambda: _no_pause(limits), timeout=3)


async def test_a_shorter_pause_never_shortens_a_longer_one(limits):
    """A 429's short pause does not cut a 402's long one."""
    await limits.pause_upstream("insufficient_funds", 30)
    count = await limits.pause_upstream("rate_limited", 1)
    pause = await limits.upstream_pause()
    assert pause.reason == "insufficient_funds"
    assert pause.remaining_s > 20
    assert count == 2


async def _no_pause(limits):
    return await limits.upstream_pause() is None


# Job creates taking from a tenant's submission limit in the same script.


def new_record(tenant: str) -> JobRecord:
    now = utcnow()
    return JobRecord(
        id=new_id("job_"),
        tenant=tenant,
        key_id="key_test",
        input=VideoInput(prompt="a cat", video_url="https://example.com/v.mp4"),
        created_at=now,
        deadline_at=now + timedelta(hours=2),
    )


@pytest.fixture
def jobs(redis, keys):
    return JobStore(redis, keys, retention_s=3600)


async def test_creates_over_a_tenants_limit_are_refused_and_not_stored(jobs):
    """In one batch, a tenant's burst is created and the rest refused, other tenants unaffected."""
    limit = Take("api-submit:a", 10, burst=2)
    records = [new_record("a"), new_record("a"), new_record("a"), new_record("b")]
    answers = await jobs.create_many(
        [(r, None) for r in records], limits=[limit, limit, limit, None]
    )
    assert [a.created for a in answers] == [True, True, False, True]
    assert 0.05 < answers[2].retry_after_s <= 0.1
    assert [a.retry_after_s for a in answers[:2] + answers[3:]] == [0, 0, 0]
    stored = await jobs.get_many([r.id for r in records])
    assert [job is not None for job in stored] == [True, True, False, True]


async def test_a_create_takes_from_the_same_limit_as_acquire(jobs, limits):
    """A submission limit is one budget, whether taken by a create or by `acquire`."""
    await limits.acquire("api-submit:a", rate_per_s=1, burst=1)
    [refused] = await jobs.create_many(
        [(new_record("a"), None)], limits=[Take("api-submit:a", 1, 1)]
    )
    assert refused.retry_after_s > 0
    assert await limits.acquire("api-submit:b", rate_per_s=1, burst=1) == 0


async def test_a_refused_create_keeps_no_idempotency_key(jobs):
    """A job the limit refused leaves its Idempotency-Key unused: a later retry creates it."""
    limit = Take("api-submit:a", 20, burst=1)
    key = ("k" * 64, body_hash(b"body"))
    first, retried = new_record("a"), new_record("a")
    await jobs.create_many([(new_record("a"), None)], limits=[limit])
    [refused] = await jobs.create_many([(first, key)], limits=[limit])
    assert refused.retry_after_s > 0
    assert await wait_for(lambda: _created(jobs, retried, key, limit), timeout=2)
    assert await jobs.get(first.id) is None


async def _created(jobs, record, key, limit):
    [answer] = await jobs.create_many([(record, key)], limits=[limit])
    return answer.created
