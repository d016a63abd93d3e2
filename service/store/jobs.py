"""The job state machine: every change of a job is one compare-and-set Lua script.

A job moves `pending → in_queue → in_progress → completed | failed | cancelled`
(or straight from `pending`/`in_queue` to `cancelled`/`failed`). Each change
checks the job's version (optimistic concurrency) and, when given, the fencing
token of the caller's claim; then writes the job, moves it between indexes and
schedules, frees its upstream slot, and creates its webhook delivery (the
outbox) in the same script. So there is no final state without its webhook and
no webhook for a state that did not happen. A job is a hash (see `keys.py`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import Enum
from typing import Any, Literal

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from service.models import (
    FINAL_STATUSES,
    EventType,
    JobErrorInfo,
    JobRecord,
    JobStatus,
    OutputFile,
    SubmitAttempt,
    UpstreamRef,
    WebhookEvent,
    WebhookState,
    usd,
    utcnow,
)
from service.store.activity import LUA_ACTIVITY
from service.store.changes import JobChange, publish_change
from service.store.connection import text
from service.store.keys import LUA_NOW, Keys
from service.store.limits import LUA_GCRA, Take
from service.store.spend import (
    LEDGER_TTL_S,
    LUA_HOLD,
    LUA_SETTLE,
    NO_PERIOD,
    BudgetRefusal,
    Periods,
)

_record_decoder = msgspec.json.Decoder(JobRecord)
_encoder = msgspec.json.Encoder()

# A batch of creates, each as a create alone would do it, in order. KEYS: submit-tenants,
# the backlog, the poll schedule (a new job is due there at its deadline), then each job's
# own in order: its hash, its tenant's pending index and
# submit schedule, its Idempotency-Key's record (when it has a key), its submission
# limit (when it has one), and its tenant's spend of each offered day, then month
# (`spend.Periods.keys`). ARGV: retention_s, the jobs in one string, each a line of
# twelve words then its record JSON (`_create_entry`): one argument rather than twelve
# per job, which redis-py would encode one by one; the offered periods
# (`spend.Periods.script_arg`) and the spend ledger's ttl_s. The answer is one line per
# job: `C` created, `I <job id> <body hash>` its Idempotency-Key was used already
# (nothing stored), `R <ms>` its submission limit refused it for that long (nothing
# taken, nothing stored), or `B <period> <budget> <charged> <held> <resets ms>` it would
# go over that budget (nothing stored). The last key is the activity counts (`activity.py`).
_CREATE = (
    LUA_NOW
    + LUA_GCRA
    + LUA_HOLD
    + LUA_ACTIVITY
    + """
local retention, batch, ledger_ttl = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[4])
local submit_tenants, backlog, poll = KEYS[1], KEYS[2], KEYS[3]
local now = now_ms()
local days, months = periods_of(ARGV[3])
local d, day = period_at(days, now)
local m, month = period_at(months, now)
local answers, at, k, created = {}, 1, 4, 0
while at <= #batch do
  local eol = string.find(batch, '\\n', at, true)
  local id, tenant, idem, body_hash, interval_ms, burst, cost, estimate, day_budget,
    month_budget, deadline_ms, size = string.match(string.sub(batch, at, eol - 1),
    '^(%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%S+) (%d+) (%S+) (%S+) (%d+) (%d+)$')
  local record = string.sub(batch, eol + 1, eol + tonumber(size))
  at = eol + tonumber(size) + 1
  local job, pending, submit = KEYS[k], KEYS[k + 1], KEYS[k + 2]
  k = k + 3
  local idem_key, limit
  if idem ~= '-' then idem_key, k = KEYS[k], k + 1 end
  if interval_ms ~= '-' then limit, k = KEYS[k], k + 1 end
  local day_key, month_key = KEYS[k + d - 1], KEYS[k + #days + m - 1]
  k = k + #days + #months
  estimate = tonumber(estimate)
  local wait, existing, refused = 0, false, nil
  if limit then
    wait = gcra_take(limit, tonumber(interval_ms), tonumber(burst), tonumber(cost), now)
  end
  if wait == 0 and idem_key then existing = redis.call('GET', idem_key) end
  if wait == 0 and not existing then
    refused = over_budget(day_key, day_budget, estimate, 'day', day.after)
      or over_budget(month_key, month_budget, estimate, 'month', month.after)
  end
  if wait > 0 then
    answers[#answers + 1] = 'R ' .. wait
  elseif existing then
    answers[#answers + 1] = 'I ' .. existing
  elseif refused then
    answers[#answers + 1] = refused
  else
    if idem_key then redis.call('SET', idem_key, id .. ' ' .. body_hash, 'EX', retention) end
    hold(day_key, estimate, ledger_ttl)
    hold(month_key, estimate, ledger_ttl)
    redis.call('HSET', job, 'status', 'pending', 'ver', 1, 'record', record,
      'hold', day.name .. ' ' .. estimate)
    redis.call('ZADD', submit_tenants, 'NX', 0, tenant)
    redis.call('ZADD', pending, 0, id)
    redis.call('ZADD', submit, now, id)
    redis.call('ZADD', backlog, now, id)
    -- Looked at by the poller at its deadline, in case no upstream slot frees before then.
    redis.call('ZADD', poll, tonumber(deadline_ms), id)
    answers[#answers + 1] = 'C'
    created = created + 1
  end
end
if created > 0 then count_activity(KEYS[#KEYS], 'created', created, now) end
return table.concat(answers, '\\n')
"""
)

# KEYS: see `_transition_keys`. ARGV: the change (`_Op`, JSON), the new record JSON, and
# the new event's body, zlib-compressed ('' when there is none).
_TRANSITION = (
    LUA_NOW
    + LUA_SETTLE
    + LUA_ACTIVITY
    + """
local job, old_index, new_index, backlog, submit, submit_tenants, inflight, tenant_inflight,
  poll, deliver, fence = unpack(KEYS, 1, 11)
local leases = {submit = KEYS[12], poll = KEYS[13], deliver = KEYS[14], copy = KEYS[15]}
local copy = KEYS[16]
-- A non-final event has a delivery of its own; a change to a final status settles the
-- job's hold in its day's and month's spend instead. Never both.
local delivery, spend_day, spend_month = KEYS[17], KEYS[17], KEYS[18]
local op = cjson.decode(ARGV[1])
local current = redis.call('HMGET', job, 'ver', 'status')
if not current[1] then return -2 end
-- The indexes in KEYS are those of the status read with this version.
if tonumber(current[1]) ~= op.ver or current[2] ~= op.old_status then return 0 end
if op.lease_schedule then
  if redis.call('HGET', leases[op.lease_schedule], op.id) ~= op.lease_token then return -1 end
end
local now
local function clock()
  now = now or now_ms()
  return now
end
redis.call('HSET', job, 'status', op.status, 'ver', op.ver + 1, 'record', ARGV[2])
if op.old_status ~= op.status then
  redis.call('ZREM', old_index, op.id)
  redis.call('ZADD', new_index, 0, op.id)
  if op.old_status == 'pending' then redis.call('ZREM', backlog, op.id) end
end
-- Leaving a schedule, or falling due on it, ends any claim on the job there.
local function leave(name, schedule)
  redis.call('ZREM', schedule, op.id)
  redis.call('HDEL', leases[name], op.id)
end
local function due_in(name, schedule, ms)
  redis.call('ZADD', schedule, clock() + ms, op.id)
  redis.call('HDEL', leases[name], op.id)
end
if op.leave_submit then leave('submit', submit) end
if op.leave_poll then leave('poll', poll) end
if op.leave_copy then leave('copy', copy) end
if op.copy_in_ms then due_in('copy', copy, op.copy_in_ms) end
if op.submit_in_ms then
  due_in('submit', submit, op.submit_in_ms)
  redis.call('ZADD', submit_tenants, 'NX', 0, op.tenant)
end
if op.poll_in_ms then due_in('poll', poll, op.poll_in_ms) end
if op.release_slot then
  redis.call('SREM', inflight, op.id)
  redis.call('SREM', tenant_inflight, op.id)
end
if op.event_id then
  -- The final event's delivery lives in the job; another's is a hash of its own.
  local holder = op.final and job or delivery
  redis.call('HSET', holder, 'webhook_id', op.event_id, 'webhook_state', 'pending',
    'webhook_attempts', 0, 'webhook_created_ms', clock(), 'event_zlib', ARGV[3])
  redis.call('HDEL', holder, 'webhook_base')
  if not op.final then redis.call('EXPIRE', delivery, op.retention_s) end
  redis.call('ZADD', deliver, clock(), op.event_id)
end
if op.webhook_state then redis.call('HSET', job, 'webhook_state', op.webhook_state) end
if op.settle then settle(job, spend_day, spend_month, op.status, op.charge, op.ledger_ttl_s) end
if op.final then redis.call('EXPIRE', job, op.retention_s) end
-- The last keys: the job's RunComfy request id (when it got one), then the activity counts.
if op.request_ttl_s then redis.call('SET', KEYS[#KEYS - 1], op.id, 'EX', op.request_ttl_s) end
if op.ends then count_activity(KEYS[#KEYS], op.status, 1, clock()) end
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
    old_status: str
    retention_s: int
    lease_schedule: str | None = None
    lease_token: str | None = None
    leave_submit: bool = False
    leave_poll: bool = False
    submit_in_ms: int | None = None
    poll_in_ms: int | None = None
    leave_copy: bool = False
    copy_in_ms: int | None = None
    release_slot: bool = False
    final: bool = False
    event_id: str | None = None
    webhook_state: str | None = None
    settle: bool = False
    charge: bool = False
    ledger_ttl_s: int | None = None
    request_ttl_s: int | None = None
    """Set when the job got a RunComfy request id: index it (for the admin search) this long."""
    ends: bool = False
    """The job reaches a final state now: count it in the activity."""


REQUEST_INDEX_EXTRA_S: typing.Final = 86_400
"""How much longer than retention a request id stays findable: a job's longest timeout."""


@dataclass(frozen=True)
class StoredJob:
    """A job as read from Redis, with the version a change must compare against."""

    record: JobRecord
    ver: int
    webhook_state: WebhookState
    webhook_attempts: int
    hold_day: str | None = None
    """The day (`YYYY-MM-DD`) the job's cost counts in, while it holds its estimate."""

    def view_json(self) -> bytes:
        """The job as its tenant sees it, encoded."""
        return _encoder.encode(self.record.view(self.webhook_state, self.webhook_attempts))


@dataclass(frozen=True)
class Lease:
    """A claim on a schedule item: its schedule and fencing token."""

    schedule: Literal["submit", "poll", "deliver", "copy"]
    token: str


@dataclass(frozen=True)
class Created:
    """The answer of `JobStore.create`: the new job, or the one an Idempotency-Key names.

    Or, when `retry_after_s > 0`, no job: a submission limit refused it for that long;
    or, with `over_budget`, no job: it would have gone over that budget.
    """

    job_id: str
    created: bool
    same_body: bool = True
    retry_after_s: float = 0.0
    over_budget: BudgetRefusal | None = None


@dataclass
class _Change:
    """The schedule and slot side of a state change (the record side is the new JobRecord)."""

    leave_submit: bool = False
    leave_poll: bool = False
    submit_in_s: float | None = None
    poll_in_s: float | None = None
    release_slot: bool = False
    leave_copy: bool = False
    copy_in_s: float | None = None


def delivery_id(job_id: str, event: EventType) -> str:
    """The delivery id, which is also the event's `webhook-id`: stable across retries."""
    return f"msg_{job_id.removeprefix('job_')}_{event.removeprefix('job.')}"


def job_of_delivery(delivery: str) -> tuple[str, EventType]:
    """The job and event a delivery id names: `delivery_id` backwards."""
    ulid, _, event = delivery.removeprefix("msg_").rpartition("_")
    return f"job_{ulid}", f"job.{event}"  # type: ignore[return-value]


def decode_record(stored: bytes) -> JobRecord:
    """A job's record from its `record` field."""
    return _record_decoder.decode(stored)


def event_body(stored: bytes) -> bytes:
    """An event's body as every attempt sends it, from its `event_zlib` field."""
    return zlib.decompress(stored)


_JOB_FIELDS: typing.Final = ("ver", "record", "webhook_state", "webhook_attempts", "hold")


def _stored_job(fields: list[bytes | None]) -> StoredJob | None:
    """A job from its `_JOB_FIELDS`, or None when it is gone."""
    ver, record, state, attempts, hold = fields
    if ver is None or record is None:
        return None
    return StoredJob(
        record=decode_record(record),
        ver=int(ver),
        webhook_state=text(state or b"pending"),  # type: ignore[arg-type]
        webhook_attempts=int(attempts or 0),
        hold_day=text(hold).partition(" ")[0] if hold else None,
    )


async def stored_jobs(
    redis: aioredis.Redis, keys: Keys, job_ids: Sequence[str]
) -> list[StoredJob | None]:
    """Several jobs in one round trip, None where a job is gone."""
    if not job_ids:
        return []
    async with redis.pipeline(transaction=False) as pipe:
        for job_id in job_ids:
            pipe.hmget(keys.job(job_id), _JOB_FIELDS)
        rows = await pipe.execute()
    return [_stored_job(row) for row in rows]


def body_hash(body: bytes) -> str:
    """The digest an Idempotency-Key replay is compared with."""
    return hashlib.sha256(body).hexdigest()


Budgets = tuple[int | None, int | None]
"""A tenant's `(day, month)` budgets in micro-dollars, None where it has none."""


def _create_entry(  # noqa: PLR0917 - one job's create and what it checks first
    record: JobRecord,
    idempotency: tuple[str, str] | None,
    limit: Take | None,
    budgets: Budgets,
    periods: Periods,
    keys: Keys,
) -> tuple[bytes, list[str]]:
    """One job of `_CREATE`'s batch: its line and record JSON, and the keys it adds to KEYS.

    The line's words (id, tenant, key hash, body hash, limit, estimate, budgets, deadline
    in ms, record size) are free of whitespace: ids, tenant ids (`config`), hex digests, numbers.
    """
    key_hash, digest = idempotency or ("-", "-")
    limit_words = " ".join(map(str, limit.script_args())) if limit else "- 0 0"
    budget_words = " ".join("-" if b is None else str(b) for b in budgets)
    doc = _encoder.encode(record)
    head = (
        f"{record.id} {record.tenant} {key_hash} {digest} {limit_words} "
        f"{record.estimate_micros or 0} {budget_words} "
        f"{int(record.deadline_at.timestamp() * 1000)} {len(doc)}\n"
    )
    names = [keys.job(record.id), keys.jobs(record.tenant, "pending"), keys.submit(record.tenant)]
    if idempotency:
        names.append(keys.idempotency(record.tenant, key_hash))
    if limit:
        names.append(keys.rate(limit.name))
    names += periods.keys(keys, record.tenant)
    return head.encode() + doc, names


def _transition_keys(  # noqa: PLR0917 - the script's optional keys, each from its own fact
    keys: Keys,
    old_status: str,
    new: JobRecord,
    event_id: str | None,
    hold_day: str | None,
    request_id: str | None,
) -> list[str]:
    """`_TRANSITION`'s KEYS, in the order the script names them."""
    names = [
        keys.job(new.id),
        keys.jobs(new.tenant, old_status),
        keys.jobs(new.tenant, new.status),
        keys.backlog(),
        keys.submit(new.tenant),
        keys.submit_tenants(),
        keys.inflight(),
        keys.inflight(new.tenant),
        keys.schedule("poll"),
        keys.schedule("deliver"),
        keys.fence(),
        keys.lease("submit"),
        keys.lease("poll"),
        keys.lease("deliver"),
        keys.lease("copy"),
        keys.schedule("copy"),
    ]
    if event_id is not None and new.status not in FINAL_STATUSES:
        names.append(keys.delivery(event_id))
    elif hold_day is not None and new.status in FINAL_STATUSES:
        names += [keys.spend_day(new.tenant, hold_day), keys.spend_month(new.tenant, hold_day[:7])]
    if request_id is not None:
        names.append(keys.upstream_request(request_id))
    names.append(keys.activity())
    return names


class JobStore:
    """Jobs in Redis: create, read, list, and every state change of the state machine."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        *,
        retention_s: int,
        on_finish: Callable[[str, str], None] | None = None,
        on_charge: Callable[[str, float], None] | None = None,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._retention_s = retention_s
        self._on_finish = on_finish  # (status, tenant), once per job reaching a final state
        self._on_charge = on_charge  # (tenant, usd), once per job charged
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
        budgets: Sequence[Budgets] = (),
    ) -> list[Created]:
        """Create several jobs in one script call, each as `create` would, answers in order.

        `limits[i]`, when given, is taken from first (the tenant's submission
        rate): a job it refuses is not stored and answers `retry_after_s`. Each
        job holds its estimate in its tenant's spend of the day and month (Redis's
        clock); `budgets[i]` are its tenant's, and a job that would go over one is
        not stored and answers `over_budget`. The batch is one script: nothing
        else runs between its creates, which run in list order (a key used twice
        in a batch answers the first job the second time). An error raised here
        may leave the batch created or not, as a lost connection may with `create`.
        """
        if not items:
            return []
        try:
            answer = await self._create_batch(items, limits, budgets, Periods.around(utcnow()))
        except ResponseError as exc:
            if NO_PERIOD not in str(exc):
                raise
            # This replica's clock is far from Redis's: offer the periods around Redis's
            # own time instead (the script refused before it changed anything).
            seconds, micros = await self._redis.time()
            redis_now = datetime.fromtimestamp(seconds + micros / 1e6, UTC)
            answer = await self._create_batch(items, limits, budgets, Periods.around(redis_now))
        results: list[Created] = []
        for (record, idempotency), line in zip(items, answer.split(b"\n"), strict=True):
            kind, _, value = line.decode().partition(" ")
            if kind == "C":
                results.append(Created(job_id=record.id, created=True))
            elif kind == "R":
                results.append(
                    Created(job_id=record.id, created=False, retry_after_s=float(value) / 1000)
                )
            elif kind == "B":
                refusal = _refusal(value)
                results.append(Created(job_id=record.id, created=False, over_budget=refusal))
            else:
                job_id, _, stored_digest = value.partition(" ")
                digest = idempotency[1] if idempotency else ""
                same = stored_digest == digest
                results.append(Created(job_id=job_id, created=False, same_body=same))
        return results

    async def _create_batch(
        self,
        items: Sequence[tuple[JobRecord, tuple[str, str] | None]],
        limits: Sequence[Take | None],
        budgets: Sequence[Budgets],
        periods: Periods,
    ) -> bytes:
        """`create_many`'s one call of `_CREATE`, offering `periods`; its raw answer."""
        names = [self._keys.submit_tenants(), self._keys.backlog(), self._keys.schedule("poll")]
        entries = []
        for i, (record, idempotency) in enumerate(items):
            limit = limits[i] if i < len(limits) else None
            budget = budgets[i] if i < len(budgets) else (None, None)
            entry, entry_keys = _create_entry(
                record, idempotency, limit, budget, periods, self._keys
            )
            entries.append(entry)
            names += entry_keys
        names.append(self._keys.activity())
        args: list[int | bytes | str] = [
            self._retention_s,
            b"".join(entries),
            periods.script_arg(),
            LEDGER_TTL_S,
        ]
        answer: bytes = await self._create(keys=names, args=args)
        return answer

    async def get(self, job_id: str) -> StoredJob | None:
        """The job with this id, or None."""
        jobs = await self.get_many([job_id])
        return jobs[0]

    async def get_many(self, job_ids: list[str]) -> list[StoredJob | None]:
        """Several jobs in one round trip, None where a job is gone."""
        return await stored_jobs(self._redis, self._keys, job_ids)

    async def page(
        self,
        tenant: str | Sequence[str],
        *,
        status: JobStatus | None,
        limit: int,
        cursor: str | None,
    ) -> tuple[list[StoredJob], str | None]:
        """A page of the tenant's jobs (or several tenants'), newest first, and the next cursor."""
        tenants = [tenant] if isinstance(tenant, str) else list(tenant)
        statuses = [status] if status else _STATUSES
        indexes = [self._keys.jobs(t, s) for t in tenants for s in statuses]
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
                await self._forget(tenants, gone)
            start = f"({batch[-1]}"
            if len(ids) <= want:
                return jobs, None
            if len(jobs) == limit:
                return jobs, batch[-1]

    async def _forget(self, tenants: list[str], job_ids: list[str]) -> None:
        """Drop expired jobs' ids from the tenants' indexes (only final jobs expire).

        An id never comes back once its job is gone, so this needs no script.
        """
        async with self._redis.pipeline(transaction=False) as pipe:
            for tenant in tenants:
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
        body = b""
        op = _Op(
            id=new.id,
            tenant=new.tenant,
            ver=stored.ver,
            status=new.status,
            old_status=stored.record.status,
            retention_s=self._retention_s,
            lease_schedule=lease.schedule if lease else None,
            lease_token=lease.token if lease else None,
            leave_submit=change.leave_submit,
            leave_poll=change.leave_poll,
            submit_in_ms=_ms(change.submit_in_s),
            poll_in_ms=_ms(change.poll_in_s),
            release_slot=change.release_slot,
            leave_copy=change.leave_copy,
            copy_in_ms=_ms(change.copy_in_s),
            final=final,
        )
        if event is not None and new.webhook is not None and event in new.webhook.events:
            body = _encoder.encode(
                WebhookEvent(type=event, timestamp=utcnow(), data=new.view("pending", 0))
            )
            op.event_id = delivery_id(new.id, event)
        elif final and new.webhook is not None and stored.record.status not in FINAL_STATUSES:
            op.webhook_state = "skipped"
        if final and stored.hold_day is not None:
            op.settle, op.charge = True, bool(new.charge_micros())
            op.ledger_ttl_s = LEDGER_TTL_S
        ends_now = final and stored.record.status not in FINAL_STATUSES
        op.ends = ends_now
        request_id = _new_request_id(stored.record, new)
        if request_id is not None:
            op.request_ttl_s = self._retention_s + REQUEST_INDEX_EXTRA_S
        args = [_encoder.encode(op), _encoder.encode(new), zlib.compress(body) if body else b""]
        names = _transition_keys(
            self._keys,
            stored.record.status,
            new,
            op.event_id,
            stored.hold_day if op.settle else None,
            request_id,
        )
        answer = await self._transition(keys=names, args=args)
        outcome = Outcome(int(answer))
        if outcome is Outcome.DONE:
            published = JobChange(id=new.id, status=new.status, ver=stored.ver + 1)
            await publish_change(self._redis, self._keys, new.tenant, published)
        if outcome is Outcome.DONE and ends_now and self._on_finish is not None:
            self._on_finish(new.status, new.tenant)
        if outcome is Outcome.DONE and op.charge and self._on_charge is not None:
            self._on_charge(new.tenant, usd(new.charge_micros() or 0))
        return outcome

    # The state machine. Each method names one edge; all go through `_apply`.

    async def record_submit(self, stored: StoredJob, lease: Lease) -> tuple[Outcome, StoredJob]:
        """Note a paid submit as `sent` before it is sent, so a crash leaves a trace."""
        new = msgspec.structs.replace(
            stored.record, submits=[*stored.record.submits, SubmitAttempt(at=utcnow())]
        )
        outcome = await self._apply(stored, new, _Change(), lease=lease, event=None)
        return outcome, dataclasses.replace(stored, record=new, ver=stored.ver + 1)

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

    async def copy_outputs(
        self, stored: StoredJob, lease: Lease, upstream_output: dict[str, Any]
    ) -> Outcome:
        """RunComfy completed the job: keep its output and queue the copy into the store.

        The job stays `in_progress` until every output is stored (`finish`); it leaves
        the poll schedule for the copy schedule, due at once.
        """
        new = msgspec.structs.replace(stored.record, upstream_output=upstream_output)
        change = _Change(leave_poll=True, copy_in_s=0)
        return await self._apply(stored, new, change, lease=lease, event=None)

    async def copy_later(
        self, stored: StoredJob, lease: Lease, reason: str, *, delay_s: float
    ) -> Outcome:
        """A copy failed for a passing reason: count it, keep why, copy again after `delay_s`."""
        new = msgspec.structs.replace(
            stored.record,
            copy_attempts=stored.record.copy_attempts + 1,
            copy_error=reason[:500],
        )
        change = _Change(copy_in_s=delay_s)
        return await self._apply(stored, new, change, lease=lease, event=None)

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
        output_files: list[OutputFile] | None = None,
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
            output_files=output_files,
            upstream_output=None,
            upstream=UpstreamRef(request_id=record.upstream.request_id)
            if record.upstream
            else None,
        )
        change = _Change(leave_submit=True, leave_poll=True, release_slot=True, leave_copy=True)
        event: EventType = {
            "completed": "job.completed",
            "failed": "job.failed",
            "cancelled": "job.cancelled",
        }[status]  # type: ignore[assignment]
        return await self._apply(stored, new, change, lease=lease, event=event)


_STATUSES: tuple[JobStatus, ...] = typing.get_args(JobStatus)


def _refusal(answer: str) -> BudgetRefusal:
    """A `B` answer of `_CREATE` (after the `B`): the budget a create would have gone over."""
    period, budget, charged, held, resets_ms = answer.split()
    return BudgetRefusal(
        period=period,  # type: ignore[arg-type]
        budget_micros=int(budget),
        charged_micros=int(charged),
        held_micros=int(held),
        resets_at=datetime.fromtimestamp(int(resets_ms) / 1000, UTC),
    )


def _new_request_id(old: JobRecord, new: JobRecord) -> str | None:
    """The RunComfy request id `new` carries and `old` did not, if any."""
    request_id = new.upstream.request_id if new.upstream else ""
    if not request_id or (old.upstream and old.upstream.request_id == request_id):
        return None
    return request_id


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
