"""Webhook deliveries in Redis: the delivery record, its attempt log, and re-sending.

A delivery is created by the job's state change (the outbox, see `jobs.py`)
with the event body encoded once; every attempt sends those exact bytes. Each
attempt is recorded by one script that checks the claim's fencing token,
appends to the log, and either reschedules or ends the delivery, mirroring the
state of the job's final-event delivery onto the job.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal, cast

import msgspec
import redis.asyncio as aioredis

from service.models import FINAL_STATUSES, DeliveryAttempt, response_excerpt
from service.store.jobs import Lease, job_of_delivery, unpack
from service.store.keys import LUA_PRELUDE, LUA_VALUES, Keys, parse_delivery, parse_job

# A log entry is an attempt's fields as a JSON array, in DeliveryAttempt's order:
# a line of a job's value, half the size of the object with its names.
_entry_decoder: msgspec.json.Decoder[tuple[Any, ...]] = msgspec.json.Decoder(
    tuple[tuple(f.type for f in msgspec.structs.fields(DeliveryAttempt))]  # type: ignore[misc]
)
_encoder = msgspec.json.Encoder()

MAX_LOG_ENTRIES = 50
"""The attempt log keeps the latest attempts; the job's `webhook.attempts` counts them all."""

# ARGV[8] is the job of a final event's delivery (kept in the job), '' for another's.
_RECORD_ATTEMPT = (
    LUA_PRELUDE
    + LUA_VALUES
    + """
local id, token, entry, state = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local delay_ms, retention, max_log = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
local job_id = ARGV[8]
if redis.call('HGET', k_lease('deliver'), id) ~= token then return -1 end
redis.call('HDEL', k_lease('deliver'), id)
local attempts
if job_id ~= '' then
  local jk = k_job(job_id)
  local job = job_get(jk)
  if job and job.wh_id == id then
    job.wh_attempts, job.wh_state = job.wh_attempts + 1, state
    job.log = log_append(job.log, entry, max_log)
    job_set(jk, job, nil)
    attempts = job.wh_attempts
  end
else
  local dk = k_delivery(id)
  local d = dlv_get(dk)
  if d then
    d.attempts, d.state = d.attempts + 1, state
    d.log = log_append(d.log, entry, max_log)
    -- Only a final event can be sent again: another's body goes once it is done.
    if state ~= 'pending' then d.body = '' end
    dlv_set(dk, d, retention)
    attempts = d.attempts
  end
end
if not attempts then
  redis.call('ZREM', k_schedule('deliver'), id)
  return -2
end
if delay_ms >= 0 then
  redis.call('ZADD', k_schedule('deliver'), now_ms() + delay_ms, id)
else
  redis.call('ZREM', k_schedule('deliver'), id)
end
return attempts
"""
)

_RESEND = (
    LUA_PRELUDE
    + LUA_VALUES
    + """
local jk = k_job(ARGV[1])
local job = job_get(jk)
if not job then return -2 end
local s = job.status
if s ~= 'completed' and s ~= 'failed' and s ~= 'cancelled' then return 0 end
if job.wh_id == '-' then return -1 end
-- The retry schedule starts over from this attempt; the count and the log go on.
job.wh_state, job.wh_base = 'pending', job.wh_attempts
job_set(jk, job, nil)
redis.call('ZADD', k_schedule('deliver'), now_ms(), job.wh_id)
return 1
"""
)


class Resend(Enum):
    """What `POST /v1/jobs/{id}/deliveries` came to."""

    QUEUED = 1
    NOT_FINAL = 0
    NO_WEBHOOK = -1
    GONE = -2


@dataclass(frozen=True)
class Delivery:
    """A delivery as the dispatcher needs it."""

    id: str
    job_id: str
    tenant: str
    event_type: str
    url: str
    body: bytes
    attempts: int
    base: int
    created_ms: int

    @property
    def attempts_since_resend(self) -> int:
        """Attempts made since the schedule last started (creation or a re-send)."""
        return self.attempts - self.base


def _is_final(event: str) -> bool:
    return event.removeprefix("job.") in FINAL_STATUSES


def _delivery(delivery_id: str, own: bytes | None, job_raw: bytes | None) -> Delivery | None:
    """A delivery from its job's value and, for a non-final event, its own value."""
    if job_raw is None:
        return None
    job_id, event = job_of_delivery(delivery_id)
    if _is_final(event):
        job = parse_job(job_raw)
        if job.wh_id != delivery_id:
            return None
        record, body = unpack(job)
        state = (job.wh_attempts, job.wh_base, job.wh_created_ms)
    else:
        if own is None:
            return None
        delivery = parse_delivery(own)
        record, _ = unpack(parse_job(job_raw))
        body = delivery.body
        state = (delivery.attempts, delivery.base, delivery.created_ms)
    if record.webhook is None or not body:
        return None
    attempts, base, created_ms = state
    return Delivery(
        id=delivery_id,
        job_id=job_id,
        tenant=record.tenant,
        event_type=event,
        url=record.webhook.url,
        body=body,
        attempts=attempts,
        base=base,
        created_ms=created_ms,
    )


class DeliveryStore:
    """Webhook deliveries: read, record an attempt, re-send, and the attempt log."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, *, retention_s: int) -> None:
        self._redis = redis
        self._keys = keys
        self._retention_s = retention_s
        self._record = redis.register_script(_RECORD_ATTEMPT)
        self._resend = redis.register_script(_RESEND)

    async def get(self, delivery_id: str) -> Delivery | None:
        """The delivery, or None when it expired."""
        [delivery] = await self.get_many([delivery_id])
        return delivery

    async def get_many(self, delivery_ids: list[str]) -> list[Delivery | None]:
        """Several deliveries in one round trip, None where one expired."""
        if not delivery_ids:
            return []
        # A final event's delivery lives in its job; another's is its own key, read with the job.
        names: list[str] = []
        for delivery_id in delivery_ids:
            job_id, event = job_of_delivery(delivery_id)
            if not _is_final(event):
                names.append(self._keys.delivery(delivery_id))
            names.append(self._keys.job(job_id))
        # The pool does not decode replies (`connection.connect`): values are bytes.
        raws = iter(cast("list[bytes | None]", await self._redis.mget(names)))
        found: list[Delivery | None] = []
        for delivery_id in delivery_ids:
            own = None if _is_final(job_of_delivery(delivery_id)[1]) else next(raws)
            found.append(_delivery(delivery_id, own, next(raws)))
        return found

    async def record_attempt(
        self,
        delivery_id: str,
        lease: Lease,
        attempt: DeliveryAttempt,
        *,
        state: Literal["pending", "delivered", "failed", "skipped"],
        retry_in_s: float | None,
    ) -> bool:
        """Append `attempt` to the log and retry after `retry_in_s`, or end the delivery.

        The log keeps the latest `MAX_LOG_ENTRIES` attempts, each with at most
        `MAX_EXCERPT_BYTES` of the answer, so one job stays well under 256 KB.

        False when the claim was lost and nothing was written.
        """
        delay_ms = -1 if retry_in_s is None else max(0, round(retry_in_s * 1000))
        job_id, event = job_of_delivery(delivery_id)
        # Bounded here, whatever the caller read: a receiver never grows a job past its cap.
        attempt = msgspec.structs.replace(
            attempt, response_excerpt=response_excerpt(attempt.response_excerpt)
        )
        args: list[str | bytes | int] = [
            delivery_id,
            lease.token,
            _encoder.encode(msgspec.structs.astuple(attempt)),
            state,
            delay_ms,
            self._retention_s,
            MAX_LOG_ENTRIES,
            job_id if _is_final(event) else "",
        ]
        answer = await self._record(keys=[self._keys.prefix], args=args)
        return int(answer) > 0

    async def resend(self, job_id: str) -> Resend:
        """Queue the job's final event again, with the same `webhook-id`."""
        return Resend(int(await self._resend(keys=[self._keys.prefix], args=[job_id])))

    async def log(self, delivery_id: str) -> list[DeliveryAttempt]:
        """Every attempt of the delivery, oldest first."""
        job_id, event = job_of_delivery(delivery_id)
        if _is_final(event):
            raw = await self._redis.get(self._keys.job(job_id))
            job = parse_job(raw) if raw is not None else None
            lines = job.log if job is not None and job.wh_id == delivery_id else b""
        else:
            raw = await self._redis.get(self._keys.delivery(delivery_id))
            lines = parse_delivery(raw).log if raw is not None else b""
        return [DeliveryAttempt(*_entry_decoder.decode(line)) for line in lines.splitlines()]

    async def final_delivery_id(self, job_id: str) -> str | None:
        """The id of the job's final-event delivery, once it exists."""
        raw = await self._redis.get(self._keys.job(job_id))
        return parse_job(raw).wh_id if raw is not None else None
