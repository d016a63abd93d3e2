"""What keeps many jobs polled cheaply: batched claims and releases, cadence, and fencing."""

from __future__ import annotations

import pytest

from service.store.schedules import Requeue, Schedules


@pytest.fixture
def schedules(redis, keys):
    return Schedules(redis, keys, lease_s=30)


async def redis_ms(redis) -> int:
    seconds, micros = await redis.time()
    return int(seconds) * 1000 + int(micros) // 1000


async def due_at(redis, keys, member: str) -> int | None:
    score = await redis.zscore(keys.schedule("poll"), member)
    return None if score is None else int(score)


async def test_a_batched_release_moves_only_members_whose_claim_still_holds(redis, keys, schedules):
    """A stale fencing token's member stays with its new holder; the rest of the batch moves."""
    await redis.zadd(keys.schedule("poll"), {"job_a": 0, "job_b": 0})
    stale, held = sorted(await schedules.claim("poll", 10), key=lambda c: c.member)
    assert await schedules.release(stale, delay_s=0)
    [current] = await schedules.claim("poll", 10)
    assert current.member == "job_a"

    answers = await schedules.release_many("poll", [Requeue(stale, 0), Requeue(held, 0)])

    assert answers == [False, True]
    assert [c.member for c in await schedules.claim("poll", 10)] == ["job_b"]
    assert await schedules.release_many("poll", [Requeue(current, None)]) == [True]
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
    await schedules.release_many("poll", [Requeue(cadenced, 60, cadence=True), Requeue(plain, 60)])
    after = await redis_ms(redis)

    assert await due_at(redis, keys, "job_a") == due + 60_000
    assert before + 60_000 <= (await due_at(redis, keys, "job_b") or 0) <= after + 60_000


async def test_a_cadenced_release_of_a_late_member_is_never_due_before_now(redis, keys, schedules):
    """A member more than an interval late is due now, not in the past."""
    due = await redis_ms(redis) - 3_600_000
    await redis.zadd(keys.schedule("poll"), {"job_a": due})
    [claim] = await schedules.claim("poll", 10)

    before = await redis_ms(redis)
    await schedules.release_many("poll", [Requeue(claim, 60, cadence=True)])
    after = await redis_ms(redis)

    assert before <= (await due_at(redis, keys, "job_a") or 0) <= after
