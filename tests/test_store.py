"""The Redis store: job creation, the state machine's compare-and-set, claims and fencing."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta

import msgspec
import pytest

from service.config import load_settings
from service.models import (
    DeliveryAttempt,
    EventType,
    JobErrorInfo,
    JobRecord,
    VideoInput,
    WebhookSpec,
    utcnow,
)
from service.store.connection import new_id
from service.store.deliveries import MAX_LOG_ENTRIES, DeliveryStore, Resend
from service.store.jobs import (
    REQUEST_INDEX_EXTRA_S,
    JobStore,
    Lease,
    Outcome,
    body_hash,
    delivery_id,
)
from service.store.limits import Limits
from service.store.schedules import Schedules
from service.store.spend import LEDGER_TTL_S
from service.worker.listings import trim_listings
from tests.support import new_tenant, tenants_of, wait_for

RETENTION = 3600


def make_record(
    tenant: str = "orders", *, webhook: bool = True, events: list[EventType] | None = None
) -> JobRecord:
    now = utcnow()
    spec = WebhookSpec(url="https://hooks.example.com/rc")
    if events is not None:
        spec = WebhookSpec(url=spec.url, events=events)
    return JobRecord(
        id=new_id("job_"),
        tenant=tenant,
        key_id="key_test",
        input=VideoInput(prompt="a cat", video_url="https://example.com/v.mp4"),
        webhook=spec if webhook else None,
        created_at=now,
        deadline_at=now + timedelta(hours=2),
    )


@pytest.fixture
def jobs(redis, keys):
    return JobStore(redis, keys, retention_s=RETENTION)


@pytest.fixture
def schedules(redis, keys):
    return Schedules(redis, keys, lease_s=30)


@pytest.fixture
def deliveries(redis, keys):
    return DeliveryStore(redis, keys, retention_s=RETENTION)


async def test_job_runs_through_every_state_and_queues_one_webhook(jobs, schedules, deliveries):
    """A job goes pending → in_queue → in_progress → completed and its final event is queued."""
    record = make_record()
    assert (await jobs.create(record)).created
    [claim] = await schedules.claim_submits(10, global_cap=5, tenant_caps={})
    assert (claim.member, claim.tenant) == (record.id, "orders")
    stored = await jobs.get(record.id)
    outcome, _ = await jobs.record_submit(stored, claim.lease)
    assert outcome is Outcome.DONE
    stored = await jobs.get(record.id)
    assert stored.record.submits[-1].outcome == "sent"
    assert await jobs.submitted(stored, claim.lease, "req-1", poll_in_s=0) is Outcome.DONE
    [poll] = await schedules.claim("poll", 10)
    stored = await jobs.get(record.id)
    assert stored.record.status == "in_queue"
    assert stored.record.submits[-1].outcome == "accepted"
    assert await jobs.started(stored, poll.lease, poll_in_s=0) is Outcome.DONE
    [poll] = await schedules.claim("poll", 10)
    stored = await jobs.get(record.id)
    done = await jobs.finish(stored, "completed", lease=poll.lease, output={"video": "https://x"})
    assert done is Outcome.DONE
    final = await jobs.get(record.id)
    assert final.record.status == "completed"
    assert final.record.finished_at is not None
    assert await schedules.claim("poll", 10) == []
    [delivery_claim] = await schedules.claim("deliver", 10)
    delivery = await deliveries.get(delivery_claim.member)
    assert delivery.event_type == "job.completed"
    assert b'"status":"completed"' in delivery.body
    assert (await schedules.depths())["inflight"] == 0


async def test_the_backlog_holds_exactly_the_pending_jobs(redis, keys, jobs, schedules):
    """The KEDA backlog counts pending jobs and drops each as it leaves pending."""
    records = [make_record() for _ in range(3)]
    for record in records:
        await jobs.create(record)
    assert await redis.zcard(keys.backlog()) == 3
    [claim] = await schedules.claim_submits(1, global_cap=5, tenant_caps={})
    stored = await jobs.get(claim.member)
    _, stored = await jobs.record_submit(stored, claim.lease)
    assert await redis.zcard(keys.backlog()) == 3  # still pending while it is being sent
    await jobs.submitted(stored, claim.lease, "r-1", poll_in_s=1)
    other = await jobs.get(next(r.id for r in records if r.id != claim.member))
    await jobs.finish(other, "cancelled", lease=None)
    assert await redis.zcard(keys.backlog()) == 1


async def test_a_stale_version_or_a_lost_lease_changes_nothing(jobs, schedules):
    """A change made from an old read, or with another worker's token, is refused."""
    record = make_record()
    await jobs.create(record)
    [claim] = await schedules.claim_submits(1, global_cap=5, tenant_caps={})
    stale = await jobs.get(record.id)
    await jobs.record_submit(stale, claim.lease)
    assert await jobs.submitted(stale, claim.lease, "r", poll_in_s=1) is Outcome.STALE
    fresh = await jobs.get(record.id)
    wrong = Lease("submit", "999999")
    assert await jobs.submitted(fresh, wrong, "r", poll_in_s=1) is Outcome.LEASE_LOST
    assert (await jobs.get(record.id)).record.status == "pending"


async def test_submit_claims_respect_global_and_tenant_caps_and_alternate_tenants(jobs, schedules):
    """Claims stop at the caps on jobs inside RunComfy and take tenants in turn."""
    for _ in range(5):
        await jobs.create(make_record("big"))
    await jobs.create(make_record("small"))
    claims = await schedules.claim_submits(10, global_cap=3, tenant_caps={"big": 2})
    assert sorted(c.tenant for c in claims) == ["big", "big", "small"]
    assert await schedules.claim_submits(10, global_cap=3, tenant_caps={"big": 2}) == []


async def test_cancelled_pending_job_frees_its_slot_and_leaves_the_queue(jobs, schedules):
    """Finishing a claimed pending job removes it from the submit queue and frees its slot."""
    record = make_record(webhook=False)
    await jobs.create(record)
    [_claim] = await schedules.claim_submits(1, global_cap=1, tenant_caps={})
    stored = await jobs.get(record.id)
    assert await jobs.finish(stored, "cancelled", lease=None) is Outcome.DONE
    assert (await schedules.depths())["inflight"] == 0
    assert (await jobs.get(record.id)).webhook_state == "pending"  # no webhook: state unused


async def test_idempotency_key_returns_the_first_job(jobs):
    """The same Idempotency-Key answers the first job and tells whether the body matches."""
    first, second = make_record(), make_record()
    key = ("k" * 64, body_hash(b"body"))
    assert (await jobs.create(first, idempotency=key)).created
    replay = await jobs.create(second, idempotency=key)
    assert (replay.job_id, replay.created, replay.same_body) == (first.id, False, True)
    other = await jobs.create(second, idempotency=("k" * 64, body_hash(b"other")))
    assert other.same_body is False
    assert await jobs.get(second.id) is None


async def test_create_many_creates_each_job_as_create_would(jobs, schedules):
    """Several jobs created at once are each stored, queued, and answer their own key."""
    used = make_record()
    key = ("u" * 64, body_hash(b"body"))
    await jobs.create(used, idempotency=key)
    fresh, replayed, plain, twin = make_record(), make_record(), make_record("other"), make_record()
    fresh_key = ("f" * 64, body_hash(b"f"))
    answers = await jobs.create_many(
        [(fresh, fresh_key), (replayed, key), (plain, None), (twin, fresh_key)]
    )
    assert [(a.job_id, a.created, a.same_body) for a in answers] == [
        (fresh.id, True, True),
        (used.id, False, True),
        (plain.id, True, True),
        (fresh.id, False, True),  # the same key twice in one batch: the first one wins
    ]
    assert await jobs.get_many([replayed.id, twin.id]) == [None, None]
    assert [j.record.status for j in await jobs.get_many([fresh.id, plain.id])] == ["pending"] * 2
    claims = await schedules.claim_submits(10, global_cap=10, tenant_caps={})
    assert {c.member for c in claims} == {used.id, fresh.id, plain.id}


async def test_create_many_reloads_a_flushed_script_and_creates_each_job_once(redis, jobs):
    """After SCRIPT FLUSH a batch of creates still stores every job exactly once."""
    await redis.script_flush()
    records = [make_record() for _ in range(3)]
    answers = await jobs.create_many([(r, None) for r in records])
    assert [a.job_id for a in answers] == [r.id for r in records]
    page, _ = await jobs.page("orders", status=None, limit=10, cursor=None)
    assert sorted(j.record.id for j in page) == sorted(r.id for r in records)


async def test_pages_list_newest_first_with_a_cursor(jobs):
    """Listing answers newest first, page by page, and filters by status."""
    ids = []
    for _ in range(5):
        record = make_record()
        await jobs.create(record)
        ids.append(record.id)
    page1, cursor = await jobs.page("orders", status=None, limit=2, cursor=None)
    page2, cursor2 = await jobs.page("orders", status=None, limit=2, cursor=cursor)
    page3, cursor3 = await jobs.page("orders", status=None, limit=2, cursor=cursor2)
    listed = [j.record.id for j in page1 + page2 + page3]
    assert listed == list(reversed(ids))
    assert cursor3 is None
    pending, _ = await jobs.page("orders", status="pending", limit=10, cursor=None)
    assert len(pending) == 5
    failed, _ = await jobs.page("orders", status="failed", limit=10, cursor=None)
    assert failed == []


async def test_listing_all_jobs_merges_every_status_newest_first(jobs, schedules):
    """Without a status filter, jobs of every status come newest first, page by page."""
    records = [make_record() for _ in range(5)]
    for record in records:
        await jobs.create(record)
    await jobs.finish(await jobs.get(records[1].id), "cancelled", lease=None)
    [claim] = await schedules.claim_submits(1, global_cap=5, tenant_caps={})
    _, stored = await jobs.record_submit(await jobs.get(claim.member), claim.lease)
    await jobs.submitted(stored, claim.lease, "req-1", poll_in_s=60)
    newest_first = [r.id for r in reversed(records)]
    listed, cursor = [], None
    for _ in range(3):
        page, cursor = await jobs.page("orders", status=None, limit=2, cursor=cursor)
        listed.extend(j.record.id for j in page)
    assert (listed, cursor) == (newest_first, None)
    statuses = [
        j.record.status for j in (await jobs.page("orders", status=None, limit=9, cursor=None))[0]
    ]
    assert sorted(statuses) == ["cancelled", "in_queue", "pending", "pending", "pending"]


async def test_resend_requeues_the_final_event(jobs, schedules, deliveries):
    """A final job's event can be queued again; a job that is not final cannot."""
    record = make_record()
    await jobs.create(record)
    assert await deliveries.resend(record.id, record.tenant) is Resend.NOT_FINAL
    stored = await jobs.get(record.id)
    error = JobErrorInfo(code="upstream_error", message="boom")
    await jobs.finish(stored, "failed", lease=None, error=error)
    [claim] = await schedules.claim("deliver", 10)
    assert await schedules.claim("deliver", 10) == []
    assert await deliveries.resend(record.id, record.tenant) is Resend.QUEUED
    assert [c.member for c in await schedules.claim("deliver", 10)] == [claim.member]


async def test_an_expired_lease_lets_another_worker_claim_and_fences_the_first(redis, keys, jobs):
    """After its lease runs out an item is claimed again, and the first holder's writes fail."""
    short = Schedules(redis, keys, lease_s=0.2)
    record = make_record()
    await jobs.create(record)
    [first] = await short.claim_submits(1, global_cap=5, tenant_caps={})
    assert await short.claim_submits(1, global_cap=5, tenant_caps={}) == []
    [second] = await wait_for(lambda: short.claim_submits(1, global_cap=5, tenant_caps={}))
    assert second.member == first.member
    assert second.lease.token != first.lease.token
    stored = await jobs.get(record.id)
    assert (await jobs.record_submit(stored, first.lease))[0] is Outcome.LEASE_LOST
    assert (await jobs.record_submit(stored, second.lease))[0] is Outcome.DONE


async def test_concurrent_claimers_never_get_the_same_item(redis, keys, jobs):
    """Many workers claiming at once each get different items, and all items are claimed."""
    for _ in range(40):
        await jobs.create(make_record())
    workers = [Schedules(redis, keys, lease_s=30) for _ in range(4)]
    batches = await asyncio.gather(
        *(w.claim_submits(7, global_cap=100, tenant_caps={}) for w in workers for _ in range(2))
    )
    claimed = [c.member for batch in batches for c in batch]
    assert len(claimed) == len(set(claimed)) == 40


async def test_scripts_survive_a_script_cache_flush(redis, jobs, schedules):
    """After SCRIPT FLUSH (as after a failover) every script is loaded again on use."""
    record = make_record()
    await redis.script_flush()
    await jobs.create(record)
    await redis.script_flush()
    [claim] = await schedules.claim_submits(1, global_cap=5, tenant_caps={})
    await redis.script_flush()
    stored = await jobs.get(record.id)
    assert (await jobs.record_submit(stored, claim.lease))[0] is Outcome.DONE


async def test_claims_carry_the_claimed_jobs_as_stored(jobs, schedules):
    """A submit claim, and a poll claim asked to, hand over each job as a read would."""
    record = make_record()
    await jobs.create(record)
    [claim] = await schedules.claim_submits(1, global_cap=5, tenant_caps={})
    assert claim.job == await jobs.get(record.id)
    _, stored = await jobs.record_submit(claim.job, claim.lease)
    await jobs.submitted(stored, claim.lease, "req-1", poll_in_s=0)
    [poll] = await schedules.claim("poll", 5, read_jobs=True)
    assert poll.job == await jobs.get(record.id)
    assert poll.job.record.status == "in_queue"


async def test_a_change_leaves_its_new_webhook_due_at_once_for_any_dispatcher(
    jobs, schedules, deliveries
):
    """The delivery a final change creates is due at once, for whichever dispatcher claims it."""
    record = make_record()
    await jobs.create(record)
    await jobs.finish(await jobs.get(record.id), "cancelled", lease=None)
    [claim] = await schedules.claim("deliver", 10)
    assert (await deliveries.get(claim.member)).event_type == "job.cancelled"


async def test_deliveries_are_read_together_and_a_gone_one_reads_as_none(
    jobs, schedules, deliveries
):
    """One read returns each claimed delivery, final or not, and None for one that is gone."""
    record = make_record(events=["job.started", "job.completed"])
    await jobs.create(record)
    await run_to_completion(jobs, schedules, record)
    started, completed = (delivery_id(record.id, e) for e in ("job.started", "job.completed"))
    gone = delivery_id(make_record().id, "job.completed")
    found = await deliveries.get_many([completed, gone, started])
    assert [d.event_type if d else None for d in found] == ["job.completed", None, "job.started"]
    assert found[0] == await deliveries.get(completed)
    assert found[2] == await deliveries.get(started)


async def run_to_completion(jobs, schedules, record, *, deliveries=None):
    """Submit, start and complete `record`; deliver each event it queues when `deliveries`."""
    [claim] = await schedules.claim_submits(1, global_cap=5, tenant_caps={})
    _, stored = await jobs.record_submit(await jobs.get(record.id), claim.lease)
    await jobs.submitted(stored, claim.lease, "req-1", poll_in_s=0)
    [poll] = await schedules.claim("poll", 1)
    await jobs.started(await jobs.get(record.id), poll.lease, poll_in_s=0)
    [poll] = await schedules.claim("poll", 1)
    stored = await jobs.get(record.id)
    await jobs.finish(stored, "completed", lease=poll.lease, output={"video": "https://x"})
    if deliveries is not None:
        for claim in await schedules.claim("deliver", 10):
            await deliveries.record_attempt(
                claim.member,
                claim.lease,
                attempt(1),
                tenant="orders",
                state="delivered",
                retry_in_s=None,
            )


def attempt(number: int, status_code: int | None = 200) -> DeliveryAttempt:
    return DeliveryAttempt(
        attempt=number,
        at=utcnow(),
        status_code=status_code,
        latency_ms=12,
        error=None if status_code == 200 else "http_error",
        response_excerpt='{"ok": true}\nline two',
        next_attempt_at=None,
    )


async def test_a_finished_job_leaves_nothing_that_never_expires(
    redis, keys, jobs, schedules, deliveries
):
    """Once a job is final and its webhooks sent, every key it left carries the retention TTL.

    Only the shared schedules, leases, counters and the indexes (trimmed by
    the worker and by listings) have no expiry, nor the activity ring (bounded: a
    day of minutes); the tenant's spend of the day and month is kept longer, for
    usage, and the RunComfy request id's index a day longer; both expire too.
    """
    record = make_record(events=["job.started", "job.completed"])
    await jobs.create(record, idempotency=("i" * 64, body_hash(b"b")))
    assert await redis.ttl(keys.job(record.id)) == -1  # live jobs never expire
    await run_to_completion(jobs, schedules, record, deliveries=deliveries)
    shared = {
        *(keys.jobs("orders", s) for s in ("pending", "in_queue", "in_progress", "completed")),
        keys.submit("orders"),
        *(keys.schedule(n) for n in ("poll", "deliver", "rr", "fence")),
        *(keys.lease(n) for n in ("submit", "poll", "deliver")),
        keys.backlog(),
        keys.submit_tenants(),
        keys.inflight(),
        keys.inflight("orders"),
        keys.activity(),
    }
    left = {k.decode(): await redis.ttl(k) async for k in redis.scan_iter(f"{keys.prefix}:*")}
    request_ttl = left.pop(keys.upstream_request("req-1"))
    assert RETENTION < request_ttl <= RETENTION + REQUEST_INDEX_EXTRA_S
    assert keys.job(record.id) in left
    assert keys.idempotency("orders", "i" * 64) in left
    ledger = {k: left.pop(k) for k in list(left) if k.startswith(f"{keys.prefix}:spend:")}
    assert ledger
    assert all(0 < ttl <= LEDGER_TTL_S for ttl in ledger.values())
    assert {k for k, ttl in left.items() if not 0 < ttl <= RETENTION} <= shared
    assert await redis.scard(keys.inflight()) == 0
    assert await redis.hlen(keys.lease("submit")) == 0


async def test_every_attempt_of_the_final_event_sends_the_same_bytes(jobs, schedules, deliveries):
    """Retries and a re-send carry the first body, even after the job record changed."""
    record = make_record()
    await jobs.create(record)
    stored = await jobs.get(record.id)
    await jobs.finish(stored, "failed", lease=None, error=JobErrorInfo(code="x", message="boom"))
    [claim] = await schedules.claim("deliver", 10)
    first = await deliveries.get(claim.member)
    assert (first.job_id, first.tenant, first.event_type) == (record.id, "orders", "job.failed")
    assert first.url == "https://hooks.example.com/rc"
    failed = attempt(1, status_code=500)
    assert await deliveries.record_attempt(
        claim.member, claim.lease, failed, tenant="orders", state="pending", retry_in_s=0
    )
    await jobs.late_submit(await jobs.get(record.id), "req-late", "accepted after the cancel")
    assert (await jobs.get(record.id)).record.upstream.request_id == "req-late"
    [claim] = await schedules.claim("deliver", 10)
    retry = await deliveries.get(claim.member)
    assert (retry.body, retry.attempts) == (first.body, 1)
    delivered = attempt(2)
    await deliveries.record_attempt(
        claim.member, claim.lease, delivered, tenant="orders", state="delivered", retry_in_s=None
    )
    assert await deliveries.resend(record.id, record.tenant) is Resend.QUEUED
    [claim] = await schedules.claim("deliver", 10)
    resent = await deliveries.get(claim.member)
    assert (resent.body, resent.attempts_since_resend) == (first.body, 0)
    assert await deliveries.log(claim.member) == [failed, delivered]
    job = await jobs.get(record.id)
    assert (job.webhook_state, job.webhook_attempts) == ("pending", 2)


async def test_a_non_final_event_is_delivered_and_logged_apart_from_the_final_one(
    jobs, schedules, deliveries
):
    """`job.started` has its own delivery and log; the job's webhook state follows the final one."""
    record = make_record(events=["job.started", "job.completed"])
    await jobs.create(record)
    await run_to_completion(jobs, schedules, record)
    claims = {c.member: c for c in await schedules.claim("deliver", 10)}
    started, completed = (delivery_id(record.id, e) for e in ("job.started", "job.completed"))
    assert set(claims) == {started, completed}
    started_delivery = await deliveries.get(started)
    assert b'"type":"job.started"' in started_delivery.body
    assert b'"status":"in_progress"' in started_delivery.body
    ok = attempt(1)
    await deliveries.record_attempt(
        started, claims[started].lease, ok, tenant="orders", state="delivered", retry_in_s=None
    )
    assert await deliveries.log(started) == [ok]
    assert await deliveries.get(started) is None  # sent: its body is gone, only its log stays
    assert await deliveries.log(completed) == []
    assert await deliveries.final_delivery_id(record.id) == completed
    assert (await jobs.get(record.id)).webhook_state == "pending"


async def test_a_job_read_with_plain_hgetall_shows_its_status_record_and_attempts(
    redis, keys, jobs, schedules, deliveries
):
    """`HGETALL` of a finished job's key shows its status, record JSON and attempt log as text."""
    record = make_record()
    await jobs.create(record)
    await run_to_completion(jobs, schedules, record, deliveries=deliveries)
    fields = {k.decode(): v for k, v in (await redis.hgetall(keys.job(record.id))).items()}
    assert fields["status"].decode() == "completed"
    stored = json.loads(fields["record"].decode())
    assert (stored["id"], stored["status"], stored["output"]) == (
        record.id,
        "completed",
        {"video": "https://x"},
    )
    [entry] = [json.loads(line) for line in fields["attempt_log"].decode().splitlines()]
    assert (entry["attempt"], entry["status_code"]) == (1, 200)
    assert entry["response_excerpt"] == '{"ok": true}\nline two'
    assert fields["webhook_state"].decode() == "delivered"
    assert fields["webhook_attempts"].decode() == "1"


async def test_an_attempt_stored_before_a_field_existed_still_reads(
    redis, keys, jobs, schedules, deliveries
):
    """A log entry lacking fields added since (all but `attempt` and `at`) reads with defaults."""
    record = make_record()
    await jobs.create(record)
    await run_to_completion(jobs, schedules, record, deliveries=deliveries)
    final = await deliveries.final_delivery_id(record.id)
    older = b'{"attempt":2,"at":"2025-01-01T00:00:00.123Z","status_code":503}'
    log = await redis.hget(keys.job(record.id), "attempt_log")
    await redis.hset(keys.job(record.id), "attempt_log", log + older + b"\n")
    first, second = await deliveries.log(final)
    assert first == msgspec.structs.replace(attempt(1), at=first.at)
    assert (second.attempt, second.status_code, second.error) == (2, 503, None)
    assert (second.latency_ms, second.response_excerpt, second.next_attempt_at) == (0, "", None)


async def test_the_attempt_log_keeps_the_latest_attempts_and_counts_them_all(
    jobs, schedules, deliveries
):
    """Past `MAX_LOG_ENTRIES` attempts the oldest leave the log; the count goes on."""
    record = make_record()
    await jobs.create(record)
    await jobs.finish(await jobs.get(record.id), "failed", lease=None)
    total = MAX_LOG_ENTRIES + 3
    for number in range(1, total + 1):
        [claim] = await schedules.claim("deliver", 1)
        await deliveries.record_attempt(
            claim.member,
            claim.lease,
            attempt(number, 503),
            tenant="orders",
            state="pending",
            retry_in_s=0,
        )
    log = await deliveries.log(claim.member)
    assert [a.attempt for a in log] == list(range(4, total + 1))
    assert (await jobs.get(record.id)).webhook_attempts == total


async def _expired_job(jobs: JobStore, redis, keys, tenant: str = "orders") -> JobRecord:
    """A cancelled job whose key is gone, as its retention makes it."""
    record = make_record(tenant)
    await jobs.create(record)
    await jobs.finish(await jobs.get(record.id), "cancelled", lease=None)
    await redis.delete(keys.job(record.id))
    return record


async def test_a_listing_drops_the_ids_of_expired_jobs_it_meets(redis, keys, jobs):
    """An expired job is not listed, and its id is gone from the index after one listing."""
    for _ in range(3):
        await _expired_job(jobs, redis, keys)
    alive = make_record()
    await jobs.create(alive)
    listed, cursor = await jobs.page("orders", status=None, limit=10, cursor=None)
    assert [j.record.id for j in listed] == [alive.id]
    assert cursor is None
    assert await redis.zrange(keys.jobs("orders", "cancelled"), 0, -1) == []


async def test_a_replica_with_a_fast_clock_removes_nobodys_jobs_from_the_listing(
    redis, keys, jobs, monkeypatch
):
    """A submit through an API whose clock is 8 days ahead leaves finished jobs listed."""
    finished = make_record()
    await jobs.create(finished)
    await jobs.finish(await jobs.get(finished.id), "completed", lease=None)
    ahead = utcnow() + timedelta(days=8)
    monkeypatch.setattr("service.store.jobs.utcnow", lambda: ahead)
    monkeypatch.setattr("service.models.utcnow", lambda: ahead)
    await jobs.create(make_record())
    listed, _ = await jobs.page("orders", status="completed", limit=10, cursor=None)
    assert [j.record.id for j in listed] == [finished.id]


async def test_trimming_drops_only_expired_jobs_whatever_their_age(redis, keys, jobs):
    """The worker's trim removes the ids whose job is gone and keeps every live one."""
    old_alive = make_record()
    old_alive.id = "job_00000000000000000000000000"  # an id from 1970, its job still kept
    await jobs.create(old_alive)
    await jobs.finish(await jobs.get(old_alive.id), "completed", lease=None)
    expired = [await _expired_job(jobs, redis, keys) for _ in range(5)]
    other = await _expired_job(jobs, redis, keys, tenant="billing")
    assert await jobs.trim_indexes("orders", batch=2) == len(expired)
    assert await redis.zrange(keys.jobs("orders", "cancelled"), 0, -1) == []
    assert await redis.zrange(keys.jobs("orders", "completed"), 0, -1) == [old_alive.id.encode()]
    assert await redis.zrange(keys.jobs("billing", "cancelled"), 0, -1) == [other.id.encode()]


async def test_one_tenants_thousand_jobs_hold_back_anothers_single_job_by_one_turn(jobs, schedules):
    """With 1,000 jobs of one tenant queued first, another tenant's job is the second claimed."""
    for _ in range(1000):
        await jobs.create(make_record("flood"))
    single = make_record("quiet")
    await jobs.create(single)
    first = await schedules.claim_submits(1, global_cap=100, tenant_caps={})
    second = await schedules.claim_submits(1, global_cap=100, tenant_caps={})
    assert single.id in {c.member for c in first + second}


@pytest.mark.parametrize("tenant_caps", [{}, {"orders": 2}])
async def test_jobs_holding_every_slot_are_claimed_again_when_their_leases_run_out(
    redis, keys, jobs, tenant_caps
):
    """A lapsed claim's slot goes with its job: the job is claimable again whatever the caps."""
    short = Schedules(redis, keys, lease_s=0.2)
    for _ in range(3):
        await jobs.create(make_record())
    held = await short.claim_submits(10, global_cap=2, tenant_caps=tenant_caps)
    assert len(held) == 2
    # The worker holding them dies: nothing is released, the slots stay taken.
    again = await wait_for(lambda: short.claim_submits(10, global_cap=2, tenant_caps=tenant_caps))
    assert sorted(c.member for c in again) == sorted(c.member for c in held)
    assert (await short.depths())["inflight"] == 2


async def test_the_submit_stall_is_how_long_a_claimable_job_went_unclaimed(redis, keys, jobs):
    """A due job with room or holding its slot counts; a claimed, capped or paused one does not."""
    short = Schedules(redis, keys, lease_s=0.2)
    limits = Limits(redis, keys)
    assert await short.submit_stall_s(global_cap=1, tenant_caps={}) == 0
    await jobs.create(make_record())
    await jobs.create(make_record())
    await wait_for(lambda: _stall_over(short, 0.05))
    [_claim] = await short.claim_submits(1, global_cap=1, tenant_caps={})
    # The other job has no room under the cap: waiting for a slot is not a stall.
    assert await short.submit_stall_s(global_cap=1, tenant_caps={}) == 0
    # The claim lapses (its worker died): the job holding the slot is stalled now.
    await wait_for(lambda: _stall_over(short, 0.05))
    await limits.pause_upstream("rate_limited", 5)
    assert await short.submit_stall_s(global_cap=1, tenant_caps={}) == 0


async def _stall_over(schedules: Schedules, seconds: float) -> bool:
    return await schedules.submit_stall_s(global_cap=1, tenant_caps={}) > seconds


async def test_the_workers_trim_loop_drops_expired_ids_without_any_listing(redis, keys, jobs):
    """A tenant nobody lists still loses its expired jobs' ids: the worker trims them."""
    settings = load_settings(
        {"REDIS_URL": "redis://unused", "RUNCOMFY_API_TOKEN": "t"},
        tenants=tenants_of(new_tenant("orders").tenant()),
    )
    await _expired_job(jobs, redis, keys)
    stop = asyncio.Event()
    trimming = asyncio.create_task(trim_listings(jobs, settings, stop, every_s=0.05))
    try:
        await wait_for(lambda: _is_empty(redis, keys.jobs("orders", "cancelled")))
    finally:
        stop.set()
        await trimming


async def _is_empty(redis, key: str) -> bool:
    return await redis.zcard(key) == 0
