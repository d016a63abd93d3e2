"""The job state machine: every change of a job is one compare-and-set Lua script.

A job moves `pending → in_queue → in_progress → completed | failed | cancelled`
(or straight from `pending`/`in_queue` to `cancelled`/`failed`). Each change
checks the job's version (optimistic concurrency) and, when given, the fencing
token of the caller's claim; then writes the job, moves it between indexes and
schedules, frees its upstream slot, and creates its webhook delivery (the
outbox) in the same script. So there is no final state without its webhook and
no webhook for a state that did not happen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from enum import Enum
from typing import Any, Literal

import msgspec
import redis.asyncio as aioredis

from service.models import (
    FINAL_STATUSES,
    EventType,
    JobErrorInfo,
    JobRecord,
    JobStatus,
    SubmitAttempt,
    UpstreamRef,
    WebhookEvent,
    WebhookState,
    utcnow,
)
from service.store.connection import eval_many, text, time_prefix
from service.store.keys import LUA_PRELUDE, Keys

_record_decoder = msgspec.json.Decoder(JobRecord)
_encoder = msgspec.json.Encoder()

_CREATE = (
    LUA_PRELUDE
    + """
local id, tenant, doc, idem, body_hash = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local retention = tonumber(ARGV[6])
local cutoff_id = ARGV[7]
if idem ~= '' then
  local existing = redis.call('GET', k_idem(tenant, idem))
  if existing then return {0, existing} end
  redis.call('SET', k_idem(tenant, idem), id .. ' ' .. body_hash, 'EX', retention)
end
local now = now_ms()
redis.call('HSET', k_job(id), 'doc', doc, 'status', 'pending', 'ver', 1, 'tenant', tenant,
  'wh_state', 'pending', 'wh_attempts', 0)
-- Indexes are trimmed here, by id (ids sort by time), so they never outgrow retention.
for _, key in ipairs({k_jobs(tenant), k_jobs_status(tenant, 'completed'),
                      k_jobs_status(tenant, 'failed'), k_jobs_status(tenant, 'cancelled')}) do
  redis.call('ZREMRANGEBYLEX', key, '-', '(' .. cutoff_id)
end
redis.call('ZADD', k_jobs(tenant), 0, id)
redis.call('ZADD', k_jobs_status(tenant, 'pending'), 0, id)
redis.call('ZADD', k_submit(tenant), now, id)
redis.call('ZADD', k_submit_tenants(), 'NX', 0, tenant)
redis.call('ZADD', k_backlog(), now, id)
return {1, id}
"""
)

_TRANSITION = (
    LUA_PRELUDE
    + """
local op = cjson.decode(ARGV[1])
local jk = k_job(op.id)
local cur = redis.call('HMGET', jk, 'ver', 'status')
if not cur[1] then return -2 end
if tonumber(cur[1]) ~= op.ver then return 0 end
if op.lease_schedule then
  if redis.call('HGET', k_lease(op.lease_schedule), op.id) ~= op.lease_token then return -1 end
end
local now = now_ms()
local old = cur[2]
redis.call('HSET', jk, 'doc', op.doc, 'status', op.status, 'ver', op.ver + 1)
if old ~= op.status then
  redis.call('ZREM', k_jobs_status(op.tenant, old), op.id)
  redis.call('ZADD', k_jobs_status(op.tenant, op.status), 0, op.id)
  if old == 'pending' then redis.call('ZREM', k_backlog(), op.id) end
end
if op.leave_submit then
  redis.call('ZREM', k_submit(op.tenant), op.id)
  redis.call('HDEL', k_lease('submit'), op.id)
end
if op.leave_poll then
  redis.call('ZREM', k_schedule('poll'), op.id)
  redis.call('HDEL', k_lease('poll'), op.id)
end
if op.submit_in_ms then
  redis.call('ZADD', k_submit(op.tenant), now + op.submit_in_ms, op.id)
  redis.call('ZADD', k_submit_tenants(), 'NX', 0, op.tenant)
  redis.call('HDEL', k_lease('submit'), op.id)
end
if op.poll_in_ms then
  redis.call('ZADD', k_schedule('poll'), now + op.poll_in_ms, op.id)
  redis.call('HDEL', k_lease('poll'), op.id)
end
if op.release_slot then
  redis.call('SREM', k_inflight(), op.id)
  redis.call('SREM', k_inflight_t(op.tenant), op.id)
end
if op.event_id then
  local dk = k_delivery(op.event_id)
  redis.call('HSET', dk, 'job', op.id, 'tenant', op.tenant, 'type', op.event_type,
    'url', op.event_url, 'body', op.event_body, 'state', 'pending', 'attempts', 0, 'base', 0,
    'created', now)
  redis.call('EXPIRE', dk, op.retention_s)
  redis.call('ZADD', k_schedule('deliver'), now, op.event_id)
  if op.final then redis.call('HSET', jk, 'wh_id', op.event_id) end
end
if op.wh_state then redis.call('HSET', jk, 'wh_state', op.wh_state) end
if op.final then redis.call('EXPIRE', jk, op.retention_s) end
return 1
"""
)


class Outcome(Enum):
    """What a state change came to."""

    DONE = 1
    STALE = 0  # the job changed since it was read: read it again and decide again
    LEASE_LOST = -1  # another worker holds the item now: drop it
    GONE = -2  # the job expired or never existed


class _Op(msgspec.Struct, omit_defaults=True):
    """One state change, as the transition script reads it (omitted = not done)."""

    id: str
    tenant: str
    ver: int
    status: str
    doc: str
    retention_s: int
    lease_schedule: str | None = None
    lease_token: str | None = None
    leave_submit: bool = False
    leave_poll: bool = False
    submit_in_ms: int | None = None
    poll_in_ms: int | None = None
    release_slot: bool = False
    final: bool = False
    event_id: str | None = None
    event_type: str | None = None
    event_url: str | None = None
    event_body: str | None = None
    wh_state: str | None = None


@dataclass(frozen=True)
class StoredJob:
    """A job as read from Redis, with the version a change must compare against."""

    record: JobRecord
    ver: int
    webhook_state: WebhookState
    webhook_attempts: int

    def view_json(self) -> bytes:
        """The job as its tenant sees it, encoded."""
        return _encoder.encode(self.record.view(self.webhook_state, self.webhook_attempts))


@dataclass(frozen=True)
class Lease:
    """A claim on a schedule item: its schedule and fencing token."""

    schedule: Literal["submit", "poll", "deliver"]
    token: str


@dataclass(frozen=True)
class Created:
    """The answer of `JobStore.create`: the new job, or the one an Idempotency-Key names."""

    job_id: str
    created: bool
    same_body: bool = True


@dataclass
class _Change:
    """The schedule and slot side of a state change (the record side is the new JobRecord)."""

    leave_submit: bool = False
    leave_poll: bool = False
    submit_in_s: float | None = None
    poll_in_s: float | None = None
    release_slot: bool = False


def delivery_id(job_id: str, event: EventType) -> str:
    """The delivery id, which is also the event's `webhook-id`: stable across retries."""
    return f"msg_{job_id.removeprefix('job_')}_{event.removeprefix('job.')}"


def body_hash(body: bytes) -> str:
    """The digest an Idempotency-Key replay is compared with."""
    return hashlib.sha256(body).hexdigest()


class JobStore:
    """Jobs in Redis: create, read, list, and every state change of the state machine."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        retention_s: int,
        on_finish: Callable[[str, str], None] | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._retention_s = retention_s
        self._on_finish = on_finish  # (status, tenant), once per job reaching a final state
        self._create = redis.register_script(_CREATE)
        self._transition = redis.register_script(_TRANSITION)

    async def create(
        self, record: JobRecord, *, idempotency: tuple[str, str] | None = None
    ) -> Created:
        """Store a new pending job and queue it for submission, unless the key was used.

        `idempotency` is `(sha256 of the Idempotency-Key, sha256 of the body)`.
        """
        [created] = await self.create_many([(record, idempotency)])
        return created

    async def create_many(
        self, items: list[tuple[JobRecord, tuple[str, str] | None]]
    ) -> list[Created]:
        """Create several jobs in one round trip, each as `create` would, answers in order.

        The creates are pipelined, not a transaction: each is atomic on its own,
        and one job's Idempotency-Key never affects another's.
        """
        if not items:
            return []
        cutoff_id = "job_" + time_prefix(utcnow() - timedelta(seconds=self._retention_s))
        arg_lists = []
        for record, idempotency in items:
            key_hash, digest = idempotency or ("", "")
            arg_lists.append(
                [
                    record.id,
                    record.tenant,
                    _encoder.encode(record),
                    key_hash,
                    digest,
                    self._retention_s,
                    cutoff_id,
                ]
            )
        answers = await eval_many(self._redis, self._create, self._keys.prefix, arg_lists)
        results = []
        for (_, idempotency), answer in zip(items, answers, strict=True):
            created, value = int(answer[0]), text(answer[1])
            if created:
                results.append(Created(job_id=value, created=True))
                continue
            job_id, _, stored_digest = value.partition(" ")
            digest = idempotency[1] if idempotency else ""
            results.append(Created(job_id=job_id, created=False, same_body=stored_digest == digest))
        return results

    async def get(self, job_id: str) -> StoredJob | None:
        """The job with this id, or None."""
        jobs = await self.get_many([job_id])
        return jobs[0]

    async def get_many(self, job_ids: list[str]) -> list[StoredJob | None]:
        """Several jobs in one round trip, None where a job is gone."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for job_id in job_ids:
                pipe.hmget(self._keys.job(job_id), "doc", "ver", "wh_state", "wh_attempts")
            rows = await pipe.execute()
        jobs: list[StoredJob | None] = []
        for doc, ver, wh_state, wh_attempts in rows:
            if doc is None:
                jobs.append(None)
                continue
            jobs.append(
                StoredJob(
                    record=_record_decoder.decode(doc),
                    ver=int(ver),
                    webhook_state=text(wh_state or b"pending"),  # type: ignore[arg-type]
                    webhook_attempts=int(wh_attempts or 0),
                )
            )
        return jobs

    async def page(
        self, tenant: str, *, status: JobStatus | None, limit: int, cursor: str | None
    ) -> tuple[list[StoredJob], str | None]:
        """A page of the tenant's jobs, newest first, and the cursor of the next page."""
        index = self._keys.jobs(tenant, status)
        start = f"({cursor}" if cursor else "+"
        jobs: list[StoredJob] = []
        while True:
            ids = [
                text(i)
                for i in await self._redis.zrevrangebylex(index, start, "-", 0, limit - len(jobs))
            ]
            if not ids:
                return jobs, None
            # Entries whose job expired are skipped; the index is trimmed on create.
            jobs.extend(job for job in await self.get_many(ids) if job is not None)
            start = f"({ids[-1]}"
            if len(jobs) == limit:
                more = await self._redis.zrevrangebylex(index, start, "-", 0, 1)
                return jobs, ids[-1] if more else None

    async def _apply(
        self,
        stored: StoredJob,
        new: JobRecord,
        change: _Change,
        *,
        lease: Lease | None,
        event: EventType | None,
    ) -> Outcome:
        """Write `new` over `stored` if nothing changed it meanwhile, with `change` and `event`."""
        final = new.status in FINAL_STATUSES
        op = _Op(
            id=new.id,
            tenant=new.tenant,
            ver=stored.ver,
            status=new.status,
            doc=_encoder.encode(new).decode(),
            retention_s=self._retention_s,
            lease_schedule=lease.schedule if lease else None,
            lease_token=lease.token if lease else None,
            leave_submit=change.leave_submit,
            leave_poll=change.leave_poll,
            submit_in_ms=_ms(change.submit_in_s),
            poll_in_ms=_ms(change.poll_in_s),
            release_slot=change.release_slot,
            final=final,
        )
        if event is not None and new.webhook is not None and event in new.webhook.events:
            body = _encoder.encode(
                WebhookEvent(type=event, timestamp=utcnow(), data=new.view("pending", 0))
            )
            op.event_id = delivery_id(new.id, event)
            op.event_type = event
            op.event_url = new.webhook.url
            op.event_body = body.decode()
        elif final and new.webhook is not None and stored.record.status not in FINAL_STATUSES:
            op.wh_state = "skipped"
        answer = await self._transition(keys=[self._keys.prefix], args=[_encoder.encode(op)])
        outcome = Outcome(int(answer))
        ended = final and stored.record.status not in FINAL_STATUSES
        if outcome is Outcome.DONE and ended and self._on_finish is not None:
            self._on_finish(new.status, new.tenant)
        return outcome

    # The state machine. Each method names one edge; all go through `_apply`.

    async def record_submit(self, stored: StoredJob, lease: Lease) -> tuple[Outcome, StoredJob]:
        """Note a paid submit as `sent` before it is sent, so a crash leaves a trace."""
        new = msgspec.structs.replace(
            stored.record, submits=[*stored.record.submits, SubmitAttempt(at=utcnow())]
        )
        outcome = await self._apply(stored, new, _Change(), lease=lease, event=None)
        return outcome, StoredJob(
            new, stored.ver + 1, stored.webhook_state, stored.webhook_attempts
        )

    async def submitted(
        self, stored: StoredJob, lease: Lease, request_id: str, *, poll_in_s: float
    ) -> Outcome:
        """RunComfy accepted the job: `pending → in_queue`, polled from now on."""
        new = msgspec.structs.replace(
            stored.record,
            status="in_queue",
            upstream=UpstreamRef(request_id=request_id),
            submitted_at=utcnow(),
            submits=_settle_last(stored.record, "accepted", request_id=request_id),
        )
        change = _Change(leave_submit=True, poll_in_s=poll_in_s)
        return await self._apply(stored, new, change, lease=lease, event=None)

    async def submit_later(
        self,
        stored: StoredJob,
        lease: Lease,
        outcome: str,
        detail: str,
        *,
        delay_s: float,
        count_retry: bool = True,
    ) -> Outcome:
        """RunComfy definitely created nothing: record why, free the slot and retry later.

        `count_retry=False` is for waits that say nothing about the job (no
        funds, rate limited): those are bounded by the job deadline instead.
        """
        new = msgspec.structs.replace(
            stored.record,
            submits=_settle_last(stored.record, outcome, detail=detail),
            submit_retries=stored.record.submit_retries + int(count_retry),
        )
        change = _Change(submit_in_s=delay_s, release_slot=True)
        return await self._apply(stored, new, change, lease=lease, event=None)

    async def queue_position(
        self, stored: StoredJob, lease: Lease, position: int | None, *, poll_in_s: float
    ) -> Outcome:
        """Still queued upstream: keep the latest queue position and poll again."""
        upstream = stored.record.upstream
        new = msgspec.structs.replace(
            stored.record,
            upstream=UpstreamRef(
                request_id=upstream.request_id if upstream else "", queue_position=position
            ),
        )
        return await self._apply(stored, new, _Change(poll_in_s=poll_in_s), lease=lease, event=None)

    async def started(self, stored: StoredJob, lease: Lease, *, poll_in_s: float) -> Outcome:
        """RunComfy is running the job: `in_queue → in_progress`."""
        upstream = stored.record.upstream
        new = msgspec.structs.replace(
            stored.record,
            status="in_progress",
            started_at=utcnow(),
            cancel_requested_at=None,
            upstream=UpstreamRef(request_id=upstream.request_id) if upstream else None,
        )
        return await self._apply(
            stored, new, _Change(poll_in_s=poll_in_s), lease=lease, event="job.started"
        )

    async def cancel_requested(self, stored: StoredJob) -> Outcome:
        """A caller asked to cancel a queued job: poll it now so a worker cancels upstream."""
        new = msgspec.structs.replace(stored.record, cancel_requested_at=utcnow())
        return await self._apply(stored, new, _Change(poll_in_s=0), lease=None, event=None)

    async def cancel_refused(self, stored: StoredJob, lease: Lease, *, poll_in_s: float) -> Outcome:
        """RunComfy answered `not_cancellable`: the job carries on."""
        new = msgspec.structs.replace(stored.record, cancel_requested_at=None)
        return await self._apply(stored, new, _Change(poll_in_s=poll_in_s), lease=lease, event=None)

    async def late_submit(self, stored: StoredJob, request_id: str, detail: str) -> Outcome:
        """Record on an already final job that a submit sent before it ended was accepted.

        A caller may cancel a pending job while its paid submit is on the way;
        the request RunComfy then creates belongs to no live job. The job keeps
        its final state, and its submit log says what became of that request.
        """
        new = msgspec.structs.replace(
            stored.record,
            upstream=UpstreamRef(request_id=request_id),
            submits=_settle_last(stored.record, "accepted", request_id=request_id, detail=detail),
        )
        return await self._apply(stored, new, _Change(), lease=None, event=None)

    async def finish(
        self,
        stored: StoredJob,
        status: Literal["completed", "failed", "cancelled"],
        *,
        lease: Lease | None,
        output: dict[str, Any] | None = None,
        error: JobErrorInfo | None = None,
        submit_outcome: str | None = None,
    ) -> Outcome:
        """End the job: final status, slot freed, out of every schedule, webhook queued."""
        record = stored.record
        submits = record.submits
        if submit_outcome is not None:
            submits = _settle_last(record, submit_outcome, detail=error.message if error else None)
        new = msgspec.structs.replace(
            record,
            status=status,
            output=output,
            error=error,
            finished_at=utcnow(),
            submits=submits,
            upstream=UpstreamRef(request_id=record.upstream.request_id)
            if record.upstream
            else None,
        )
        change = _Change(leave_submit=True, leave_poll=True, release_slot=True)
        event: EventType = {
            "completed": "job.completed",
            "failed": "job.failed",
            "cancelled": "job.cancelled",
        }[status]  # type: ignore[assignment]
        return await self._apply(stored, new, change, lease=lease, event=event)


def _ms(seconds: float | None) -> int | None:
    return None if seconds is None else max(0, round(seconds * 1000))


def _settle_last(
    record: JobRecord,
    outcome: str,
    *,
    request_id: str | None = None,
    detail: str | None = None,
) -> list[SubmitAttempt]:
    """The submit log with its last `sent` entry settled to `outcome`."""
    submits = list(record.submits)
    if submits and submits[-1].outcome == "sent":
        submits[-1] = msgspec.structs.replace(
            submits[-1],
            outcome=outcome,
            request_id=request_id,
            detail=detail[:300] if detail else None,
        )
    return submits
