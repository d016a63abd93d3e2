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
import typing
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal, Protocol, cast

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
from service.store.connection import text
from service.store.keys import LUA_PRELUDE, LUA_VALUES, JobValue, Keys, parse_job
from service.store.limits import LUA_GCRA, Take

_record_decoder = msgspec.json.Decoder(JobRecord)
_encoder = msgspec.json.Encoder()
# A job's blob is raw deflate with this preset dictionary: a typical final event
# and record, so even a job's first copy of every field name and common value
# costs a back-reference (a finished job's ~1.8 KB of JSON packs to ~260 B, not
# ~580 B, in ~10 µs; memLevel 4 sets up in a fraction of the default's time).
# Stored blobs need exactly these bytes to unpack: never edit it; a new one
# needs a new layout version in keys.py, with this one kept for reading.
_ZDICT = (
    b'"error":{"code":"upstream_failed","message":""},"job.started","in_queue","in_progres'
    b's","pending","outcome":"sent","rejected","unreachable","unknown","queue_position":1,'
    b'"videos":["https://{"type":"job.completed","timestamp":"2025-01-01T00:00:00.123000Z"'
    b',"data":{"id":"job_01J0000000000000000000000","status":"completed","model":"tencent/'
    b'hunyuan/video-to-video","input":{"prompt":"a","video_url":"https://","pro_mode":fals'
    b'e,"resolution":"720p","aspect_ratio":"16:9","num_frames":129,"strength":0.85},"outpu'
    b't":{"video":"https://"},"error":null,"upstream":{"request_id":"00000000-0000-0000-00'
    b'00-000000000000","queue_position":null},"webhook":{"url":"https://","events":["job.c'
    b'ompleted","job.failed","job.cancelled"],"state":"pending","attempts":0},"metadata":n'
    b'ull,"created_at":"2025-01-01T00:00:00.123000Z","submitted_at":"2025-01-01T00:00:00.1'
    b'23000Z","started_at":"2025-01-01T00:00:00.123000Z","finished_at":"2025-01-01T00:00:0'
    b'0.123000Z","upstream_submits":1}}{"id":"job_01J0000000000000000000000","tenant":"ten'
    b'ant","key_id":"key_000000000000","status":"completed","input":{"prompt":"a","video_u'
    b'rl":"https://","pro_mode":false,"resolution":"720p","aspect_ratio":"16:9","num_frame'
    b's":129,"strength":0.85},"webhook":{"url":"https://","events":["job.completed","job.f'
    b'ailed","job.cancelled"]},"metadata":null,"output":{"video":"https://"},"error":null,'
    b'"upstream":{"request_id":"00000000-0000-0000-0000-000000000000","queue_position":nul'
    b'l},"created_at":"2025-01-01T00:00:00.123000Z","submitted_at":"2025-01-01T00:00:00.12'
    b'3000Z","started_at":"2025-01-01T00:00:00.123000Z","finished_at":"2025-01-01T00:00:00'
    b'.123000Z","deadline_at":"2025-01-01T00:00:00.123000Z","submits":[{"at":"2025-01-01T0'
    b'0:00:00.123000Z","outcome":"accepted","request_id":"00000000-0000-0000-0000-00000000'
    b'0000"}],"submit_retries":0,"cancel_requested_at":null}'
)

# A batch of creates, each as a create alone would do it, in order. ARGV: retention_s, and
# the jobs in one string, each a line of nine words then its blob (`_create_entry`): one
# argument rather than nine per job, which redis-py would encode one by one. The answer
# is one line per job: `C` created, `I <job id> <body hash>` its Idempotency-Key was used
# already (nothing stored), or `R <ms>` its submission limit refused it for that long
# (nothing taken, nothing stored).
_CREATE = (
    LUA_PRELUDE
    + LUA_VALUES
    + LUA_GCRA
    + """
local retention, batch = tonumber(ARGV[1]), ARGV[2]
local now = now_ms()
local answers, at = {}, 1
while at <= #batch do
  local eol = string.find(batch, '\\n', at, true)
  local id, tenant, idem, body_hash, limit, interval_ms, burst, cost, size = string.match(
    string.sub(batch, at, eol - 1), '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%d+)$')
  local blob = string.sub(batch, eol + 1, eol + tonumber(size))
  at = eol + tonumber(size) + 1
  local wait, existing = 0, false
  if limit ~= '-' then
    wait = gcra_take(limit, tonumber(interval_ms), tonumber(burst), tonumber(cost), now)
  end
  if wait == 0 and idem ~= '-' then existing = redis.call('GET', k_idem(tenant, idem)) end
  if wait > 0 then
    answers[#answers + 1] = 'R ' .. wait
  elseif existing then
    answers[#answers + 1] = 'I ' .. existing
  else
    if idem ~= '-' then
      redis.call('SET', k_idem(tenant, idem), id .. ' ' .. body_hash, 'EX', retention)
    end
    job_set(k_job(id), {status = 'pending', ver = 1, wh_state = 'pending', wh_attempts = 0,
      wh_base = 0, wh_created = 0, wh_id = '-', body_len = 0, blob = blob, log = ''}, nil)
    redis.call('ZADD', k_submit_tenants(), 'NX', 0, tenant)
    redis.call('ZADD', k_jobs_status(tenant, 'pending'), 0, id)
    redis.call('ZADD', k_submit(tenant), now, id)
    redis.call('ZADD', k_backlog(), now, id)
    answers[#answers + 1] = 'C'
  end
end
return table.concat(answers, '\\n')
"""
)

# ARGV[2] is the job's new blob, ARGV[3] the body of a non-final event's delivery.
_TRANSITION = (
    LUA_PRELUDE
    + LUA_VALUES
    + """
local op = cjson.decode(ARGV[1])
local jk = k_job(op.id)
local job = job_get(jk)
if not job then return -2 end
if job.ver ~= op.ver then return 0 end
if op.lease_schedule then
  if redis.call('HGET', k_lease(op.lease_schedule), op.id) ~= op.lease_token then return -1 end
end
local now
local function clock()
  now = now or now_ms()
  return now
end
local old = job.status
local claimed
job.status, job.ver, job.blob, job.body_len = op.status, op.ver + 1, ARGV[2], op.body_len or 0
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
  redis.call('ZADD', k_submit(op.tenant), clock() + op.submit_in_ms, op.id)
  redis.call('ZADD', k_submit_tenants(), 'NX', 0, op.tenant)
  redis.call('HDEL', k_lease('submit'), op.id)
end
if op.poll_in_ms then
  redis.call('ZADD', k_schedule('poll'), clock() + op.poll_in_ms, op.id)
  redis.call('HDEL', k_lease('poll'), op.id)
end
if op.release_slot then
  redis.call('SREM', k_inflight(), op.id)
  redis.call('SREM', k_inflight_t(op.tenant), op.id)
end
if op.event_id then
  if op.final then
    -- The final event's delivery lives in the job, its body at the head of the blob.
    job.wh_id, job.wh_state, job.wh_attempts, job.wh_base = op.event_id, 'pending', 0, 0
    job.wh_created = clock()
  else
    dlv_set(k_delivery(op.event_id), {state = 'pending', attempts = 0, base = 0,
      created = clock(), body = ARGV[3], log = ''}, op.retention_s)
  end
  if op.claim_lease_ms then
    -- Claimed at once for the process making the change, which sends it itself.
    local token = redis.call('INCR', k_fence())
    redis.call('ZADD', k_schedule('deliver'), clock() + op.claim_lease_ms, op.event_id)
    redis.call('HSET', k_lease('deliver'), op.event_id, token)
    claimed = token
  else
    redis.call('ZADD', k_schedule('deliver'), clock(), op.event_id)
  end
end
if op.wh_state then job.wh_state = op.wh_state end
job_set(jk, job, op.final and op.retention_s or nil)
if claimed then return {1, claimed} end
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
    retention_s: int
    body_len: int = 0
    lease_schedule: str | None = None
    lease_token: str | None = None
    leave_submit: bool = False
    leave_poll: bool = False
    submit_in_ms: int | None = None
    poll_in_ms: int | None = None
    release_slot: bool = False
    final: bool = False
    event_id: str | None = None
    claim_lease_ms: int | None = None
    wh_state: str | None = None


@dataclass(frozen=True)
class StoredJob:
    """A job as read from Redis, with the version a change must compare against."""

    record: JobRecord
    ver: int
    webhook_state: WebhookState
    webhook_attempts: int
    final_body: bytes = field(default=b"", repr=False, compare=False)
    """The final event's body as stored: a later change of a final job keeps it."""

    def view_json(self) -> bytes:
        """The job as its tenant sees it, encoded."""
        return _encoder.encode(self.record.view(self.webhook_state, self.webhook_attempts))


@dataclass(frozen=True)
class Lease:
    """A claim on a schedule item: its schedule and fencing token."""

    schedule: Literal["submit", "poll", "deliver"]
    token: str


@dataclass(frozen=True)
class HandedOver:
    """A delivery a change created and claimed in the same script, for this process to send."""

    id: str
    lease: Lease
    job_id: str
    tenant: str
    event_type: EventType
    url: str
    body: bytes


class DeliveryTaker(Protocol):
    """Where a change's new webhook delivery goes when the process making it sends it itself.

    Saves the claim and the read another dispatcher would make; a worker that
    dies with it lets the lease run out, and the delivery is claimed again.
    """

    def lease_ms_if_free(self) -> int | None:
        """The lease (ms) to claim one more delivery for, or None to leave it to the schedule."""

    def take(self, delivery: HandedOver) -> None:
        """Send `delivery`, claimed for this process (as if claimed from the schedule)."""


@dataclass(frozen=True)
class Created:
    """The answer of `JobStore.create`: the new job, or the one an Idempotency-Key names.

    Or, when `retry_after_s > 0`, no job: a submission limit refused it for that long.
    """

    job_id: str
    created: bool
    same_body: bool = True
    retry_after_s: float = 0.0


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


def job_of_delivery(delivery: str) -> tuple[str, EventType]:
    """The job and event a delivery id names: `delivery_id` backwards."""
    ulid, _, event = delivery.removeprefix("msg_").rpartition("_")
    return f"job_{ulid}", f"job.{event}"  # type: ignore[return-value]


def pack(body: bytes, doc: bytes) -> bytes:
    """A job's blob: its final event body (or nothing) then its record, compressed together."""
    packer = zlib.compressobj(6, zlib.DEFLATED, -15, 4, zdict=_ZDICT)
    return packer.compress(body + doc) + packer.flush()


def inflate(blob: bytes) -> bytes:
    """What a job's blob holds: its final event body (if any) then its record, as JSON."""
    return zlib.decompressobj(-15, zdict=_ZDICT).decompress(blob)


def unpack(value: JobValue) -> tuple[JobRecord, bytes]:
    """The record and the final event body (empty before the job ended) of a job's value."""
    data = inflate(value.blob)
    return _record_decoder.decode(data[value.body_len :]), data[: value.body_len]


def stored_job(raw: bytes) -> StoredJob:
    """A job as stored (`GET` of its key, or what a claim read) ready to change."""
    value = parse_job(raw)
    record, body = unpack(value)
    return StoredJob(
        record=record,
        ver=value.ver,
        webhook_state=value.wh_state,  # type: ignore[arg-type]
        webhook_attempts=value.wh_attempts,
        final_body=body,
    )


def describe(raw: bytes) -> str:
    """A job's stored value as text: its header, final event body, record and attempt log.

    For debugging: `redis-cli --raw GET '{rcg}:job:<id>' | python -c "import sys;
    from service.store.jobs import describe; print(describe(sys.stdin.buffer.read()))"`.
    """
    head = raw.partition(b"\n")[0].decode()
    value = parse_job(raw)
    data = inflate(value.blob)
    parts = [head, data[: value.body_len].decode(), data[value.body_len :].decode()]
    return "\n".join([*parts, *value.log.decode().splitlines()])


def body_hash(body: bytes) -> str:
    """The digest an Idempotency-Key replay is compared with."""
    return hashlib.sha256(body).hexdigest()


def _pack_pending(doc: bytes) -> bytes:
    """A new job's blob: its record in deflate's stored (uncompressed) blocks.

    `inflate` reads it as any other blob. Compressing costs the API 8-15 us a
    submit, for a blob that lives only until the worker's first change of the
    job packs it again with `pack`; a pending job costs ~480 bytes more meanwhile.
    """
    packer = zlib.compressobj(0, zlib.DEFLATED, -15, 1)
    return packer.compress(doc) + packer.flush()


def _create_entry(
    record: JobRecord, idempotency: tuple[str, str] | None, limit: Take | None, keys: Keys
) -> bytes:
    """One job of `_CREATE`'s batch: id, tenant, key hash, body hash, limit, blob size; blob.

    Every word is free of whitespace: ids, tenant ids (`config`), hex digests, key names.
    """
    key_hash, digest = idempotency or ("-", "-")
    limit_words = " ".join(map(str, limit.script_args(keys))) if limit else "- 0 0 0"
    blob = _pack_pending(_encoder.encode(record))
    head = f"{record.id} {record.tenant} {key_hash} {digest} {limit_words} {len(blob)}\n"
    return head.encode() + blob


class JobStore:
    """Jobs in Redis: create, read, list, and every state change of the state machine."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        retention_s: int,
        on_finish: Callable[[str, str], None] | None = None,
        on_due: Callable[[Literal["poll", "deliver"], float], None] | None = None,
        taker: DeliveryTaker | None = None,
    ) -> None:
        """`on_due(schedule, seconds)` hears of each poll or delivery a change schedules.

        `taker` is handed the deliveries changes create, claimed, while it has
        room (the worker's).
        """
        self._redis = redis
        self._on_due = on_due
        self._taker = taker
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
        self,
        items: Sequence[tuple[JobRecord, tuple[str, str] | None]],
        *,
        limits: Sequence[Take | None] = (),
    ) -> list[Created]:
        """Create several jobs in one script call, each as `create` would, answers in order.

        `limits[i]`, when given, is taken from first (the tenant's submission
        rate): a job it refuses is not stored and answers `retry_after_s`. The
        batch is one script: nothing else runs between its creates, which run in
        list order (a key used twice in a batch answers the first job the second
        time). An error raised here may leave the batch created or not, as a lost
        connection may with `create`.
        """
        if not items:
            return []
        batch = b"".join(
            _create_entry(record, idempotency, limits[i] if i < len(limits) else None, self._keys)
            for i, (record, idempotency) in enumerate(items)
        )
        answer = await self._create(keys=[self._keys.prefix], args=[self._retention_s, batch])
        results = []
        for (record, idempotency), line in zip(items, answer.split(b"\n"), strict=True):
            kind, _, value = line.decode().partition(" ")
            if kind == "C":
                results.append(Created(job_id=record.id, created=True))
            elif kind == "R":
                results.append(
                    Created(job_id=record.id, created=False, retry_after_s=float(value) / 1000)
                )
            else:
                job_id, _, stored_digest = value.partition(" ")
                digest = idempotency[1] if idempotency else ""
                same = stored_digest == digest
                results.append(Created(job_id=job_id, created=False, same_body=same))
        return results

    async def get(self, job_id: str) -> StoredJob | None:
        """The job with this id, or None."""
        jobs = await self.get_many([job_id])
        return jobs[0]

    async def get_many(self, job_ids: list[str]) -> list[StoredJob | None]:
        """Several jobs in one round trip, None where a job is gone."""
        if not job_ids:
            return []
        names = [self._keys.job(i) for i in job_ids]
        # The pool does not decode replies (`connection.connect`): values are bytes.
        raws = cast("list[bytes | None]", await self._redis.mget(names))
        return [None if raw is None else stored_job(raw) for raw in raws]

    async def page(
        self, tenant: str, *, status: JobStatus | None, limit: int, cursor: str | None
    ) -> tuple[list[StoredJob], str | None]:
        """A page of the tenant's jobs, newest first, and the cursor of the next page."""
        indexes = [self._keys.jobs(tenant, s) for s in ([status] if status else _STATUSES)]
        start = f"({cursor}" if cursor else "+"
        jobs: list[StoredJob] = []
        while True:
            want = limit - len(jobs)
            ids = await self._newest(indexes, start, want + 1)
            batch = ids[:want]
            if not batch:
                return jobs, None
            found = await self.get_many(batch)
            jobs.extend(job for job in found if job is not None)
            gone = [job_id for job_id, job in zip(batch, found, strict=True) if job is None]
            if gone:  # expired since they were listed: read once, then never again
                await self._forget(tenant, gone)
            start = f"({batch[-1]}"
            if len(ids) <= want:
                return jobs, None
            if len(jobs) == limit:
                return jobs, batch[-1]

    async def _forget(self, tenant: str, job_ids: list[str]) -> None:
        """Drop expired jobs' ids from the tenant's indexes (only final jobs expire).

        An id never comes back once its job is gone, so this needs no script.
        """
        async with self._redis.pipeline(transaction=False) as pipe:
            for status in FINAL_STATUSES:
                pipe.zrem(self._keys.jobs(tenant, status), *job_ids)
            await pipe.execute()

    async def trim_indexes(self, tenant: str, *, batch: int = 200, most: int = 5000) -> int:
        """Drop the ids of expired jobs from the tenant's final-status indexes; how many went.

        Jobs expire by Redis's own clock (their retention is a key expiry), so
        whatever a replica's clock says, only gone jobs leave the listing. The
        oldest ids are looked at first, `batch` at a time, until a batch finds
        none gone or `most` ids were looked at.
        """
        removed = 0
        for status in FINAL_STATUSES:
            index, start, seen = self._keys.jobs(tenant, status), "-", 0
            while seen < most:
                ids = [text(i) for i in await self._redis.zrangebylex(index, start, "+", 0, batch)]
                if not ids:
                    break
                seen += len(ids)
                async with self._redis.pipeline(transaction=False) as pipe:
                    for job_id in ids:
                        pipe.exists(self._keys.job(job_id))
                    alive = await pipe.execute()
                gone = [job_id for job_id, n in zip(ids, alive, strict=True) if not n]
                if not gone:
                    break
                removed += await self._redis.zrem(index, *gone)
                start = f"({ids[-1]}"
        return removed

    async def _newest(self, indexes: list[str], start: str, count: int) -> list[str]:
        """The `count` greatest ids below `start` in any of the indexes, greatest first.

        There is no index of all a tenant's jobs (it would cost as much memory
        as all the status indexes together): listing them all merges those,
        read at one instant (MULTI) so a job changing status is seen once.
        """
        async with self._redis.pipeline(transaction=len(indexes) > 1) as pipe:
            for index in indexes:
                pipe.zrevrangebylex(index, start, "-", 0, count)
            found = {text(i) for ids in await pipe.execute() for i in ids}
        return sorted(found, reverse=True)[:count]

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
        body = stored.final_body if final else b""
        event_body = b""
        op = _Op(
            id=new.id,
            tenant=new.tenant,
            ver=stored.ver,
            status=new.status,
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
            event_body = _encoder.encode(
                WebhookEvent(type=event, timestamp=utcnow(), data=new.view("pending", 0))
            )
            op.event_id = delivery_id(new.id, event)
            if self._taker is not None:
                op.claim_lease_ms = self._taker.lease_ms_if_free()
            if final:
                body, event_body = event_body, b""
        elif final and new.webhook is not None and stored.record.status not in FINAL_STATUSES:
            op.wh_state = "skipped"
        op.body_len = len(body)
        args = [_encoder.encode(op), pack(body, _encoder.encode(new)), event_body]
        answer = await self._transition(keys=[self._keys.prefix], args=args)
        outcome = Outcome(int(answer[0] if isinstance(answer, list) else answer))
        if outcome is Outcome.DONE:
            if final and stored.record.status not in FINAL_STATUSES and self._on_finish:
                self._on_finish(new.status, new.tenant)
            token = text(answer[1]) if isinstance(answer, list) else None
            self._scheduled(op, new, token, body or event_body)
        return outcome

    def _scheduled(self, op: _Op, new: JobRecord, token: str | None, body: bytes) -> None:
        """Tell the worker of the poll and the delivery a change scheduled (or claimed for it)."""
        if token is not None and op.event_id is not None and self._taker is not None:
            self._taker.take(
                HandedOver(
                    id=op.event_id,
                    lease=Lease("deliver", token),
                    job_id=new.id,
                    tenant=new.tenant,
                    event_type=job_of_delivery(op.event_id)[1],
                    url=new.webhook.url if new.webhook else "",
                    body=body,
                )
            )
        elif op.event_id is not None and self._on_due is not None:
            self._on_due("deliver", 0.0)
        if op.poll_in_ms is not None and self._on_due is not None:
            self._on_due("poll", op.poll_in_ms / 1000)

    # The state machine. Each method names one edge; all go through `_apply`.

    async def record_submit(self, stored: StoredJob, lease: Lease) -> tuple[Outcome, StoredJob]:
        """Note a paid submit as `sent` before it is sent, so a crash leaves a trace."""
        new = msgspec.structs.replace(
            stored.record, submits=[*stored.record.submits, SubmitAttempt(at=utcnow())]
        )
        outcome = await self._apply(stored, new, _Change(), lease=lease, event=None)
        return outcome, StoredJob(
            new, stored.ver + 1, stored.webhook_state, stored.webhook_attempts, stored.final_body
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


_STATUSES: tuple[JobStatus, ...] = typing.get_args(JobStatus)


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
