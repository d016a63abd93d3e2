"""Every Redis key the gateway uses, for Python and for the Lua scripts alike.

All keys share one hash tag (`{rcg}` by default) so a Redis Cluster keeps them
in one slot. A script is given the names of the keys it touches as KEYS, built
by `Keys` below, so a key's name is written once, here. The scripts that reach
keys they only discover inside (the state change, the submit claim, delivery
attempts) still receive the prefix as KEYS[1] and build names with the
`LUA_PRELUDE` functions, which mirror `Keys`.

| key | type | holds |
| --- | --- | --- |
| `P:job:<id>` | string | the job, packed (below); a final job expires with retention |
| `P:idem:<tenant>:<sha256(key)>` | string | `<job id> <sha256(body)>`, expires with retention |
| `P:jobs:<tenant>:<status>` | zset | a tenant's job ids in one status, score 0, by id (time) |
| `P:submit:<tenant>` | zset | pending job ids by due time (ms) |
| `P:backlog` | zset | every pending job, all tenants (KEDA scales workers on its ZCARD) |
| `P:submit-tenants` | zset | tenants with pending work, least recently served first |
| `P:rr` | counter | round-robin ticket for `submit-tenants` |
| `P:poll` / `P:deliver` | zset | job ids / delivery ids by due time (ms) |
| `P:lease:<schedule>` | hash | member -> fencing token of its current claim |
| `P:fence` | counter | fencing tokens |
| `P:inflight`, `P:inflight:<tenant>` | set | jobs holding an upstream slot |
| `P:rate:<name>` | string | a GCRA limit's theoretical arrival time (ms) |
| `P:upstream-pause` | hash | `reason`, `until` (ms), `count`; expires with the pause |
| `P:dlv:<id>` | string | a non-final event's delivery (`job.started`), packed (below) |

A job is one string, so a finished job costs one key. It is a header line, a
compressed blob and the attempt log of its final-event delivery, which lives in
the job (no key of its own; its id names the job, see `jobs.delivery_id`):

    J1 <status> <ver> <wh_state> <wh_attempts> <wh_base> <wh_created> <wh_id> <body_len> <blob_len>
    <blob: deflate(final event body + JobRecord JSON)><log: one attempt JSON array per line>

The blob is raw deflate with a preset dictionary (`jobs.pack`). The event body
comes first in it and is `body_len` bytes long (0 before the job ends): kept
beside the record it compresses to almost nothing, and a retry sends exactly
those bytes. `wh_*` is the final delivery: its state,
attempts, the attempt count its schedule restarted from (a re-send), when it
was created (ms) and its id (`-` while there is none). A non-final event's
delivery is its own short-lived string:

    D1 <state> <attempts> <base> <created_ms> <body_len>
    <body><log>

whose body is dropped once the delivery ends. Scripts read and write both with
the `LUA_VALUES` functions below, Python with `parse_job`/`parse_delivery`;
`jobs.describe` prints a job's value as text, e.g. for
`redis-cli --raw GET '{rcg}:job:<id>'`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

DEFAULT_PREFIX: Final = "{rcg}"


class Keys:
    """Key names under one prefix; tests give each run its own prefix."""

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix

    def job(self, job_id: str) -> str:
        """The job's hash."""
        return f"{self.prefix}:job:{job_id}"

    def idempotency(self, tenant: str, key_hash: str) -> str:
        """An Idempotency-Key's record."""
        return f"{self.prefix}:idem:{tenant}:{key_hash}"

    def jobs(self, tenant: str, status: str) -> str:
        """A tenant's index of jobs in one status."""
        return f"{self.prefix}:jobs:{tenant}:{status}"

    def submit(self, tenant: str) -> str:
        """A tenant's submit schedule."""
        return f"{self.prefix}:submit:{tenant}"

    def schedule(self, name: str) -> str:
        """The `poll` or `deliver` schedule."""
        return f"{self.prefix}:{name}"

    def backlog(self) -> str:
        """Every pending job, all tenants: what KEDA's redis scaler measures (ZCARD)."""
        return f"{self.prefix}:backlog"

    def submit_tenants(self) -> str:
        """Tenants with pending work."""
        return f"{self.prefix}:submit-tenants"

    def inflight(self, tenant: str | None = None) -> str:
        """Jobs holding an upstream slot, all or one tenant's."""
        return f"{self.prefix}:inflight" if tenant is None else f"{self.prefix}:inflight:{tenant}"

    def lease(self, schedule: str) -> str:
        """Fencing tokens of a schedule's current claims."""
        return f"{self.prefix}:lease:{schedule}"

    def rate(self, name: str) -> str:
        """A GCRA rate limit's theoretical arrival time."""
        return f"{self.prefix}:rate:{name}"

    def pause(self) -> str:
        """The upstream pause everyone honours (402, 429)."""
        return f"{self.prefix}:upstream-pause"

    def delivery(self, delivery_id: str) -> str:
        """One webhook delivery."""
        return f"{self.prefix}:dlv:{delivery_id}"

    def fence(self) -> str:
        """The counter fencing tokens are drawn from."""
        return f"{self.prefix}:fence"


LUA_NOW: Final = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""
"""Redis's clock in ms, for every script: replicas with skewed clocks still agree."""


LUA_PRELUDE: Final = (
    """
local P = KEYS[1]
local function k_job(id) return P .. ':job:' .. id end
local function k_idem(t, h) return P .. ':idem:' .. t .. ':' .. h end
local function k_jobs_status(t, s) return P .. ':jobs:' .. t .. ':' .. s end
local function k_submit(t) return P .. ':submit:' .. t end
local function k_schedule(name) return P .. ':' .. name end
local function k_submit_tenants() return P .. ':submit-tenants' end
local function k_backlog() return P .. ':backlog' end
local function k_rr() return P .. ':rr' end
local function k_inflight() return P .. ':inflight' end
local function k_inflight_t(t) return P .. ':inflight:' .. t end
local function k_lease(s) return P .. ':lease:' .. s end
local function k_fence() return P .. ':fence' end
local function k_delivery(id) return P .. ':dlv:' .. id end
local function k_pause() return P .. ':upstream-pause' end
"""
    + LUA_NOW
)

LUA_VALUES: Final = """
local function job_get(key)
  local v = redis.call('GET', key)
  if not v then return nil end
  local nl = string.find(v, '\\n', 1, true)
  local f = {}
  for w in string.gmatch(string.sub(v, 1, nl - 1), '%S+') do f[#f + 1] = w end
  local blob_end = nl + tonumber(f[10])
  return {status = f[2], ver = tonumber(f[3]), wh_state = f[4], wh_attempts = tonumber(f[5]),
    wh_base = tonumber(f[6]), wh_created = tonumber(f[7]), wh_id = f[8],
    body_len = tonumber(f[9]), blob = string.sub(v, nl + 1, blob_end),
    log = string.sub(v, blob_end + 1)}
end
-- ttl: seconds to expire in, or nil to keep the key's current expiry.
local function job_set(key, j, ttl)
  local v = string.format('J1 %s %d %s %d %d %d %s %d %d\\n', j.status, j.ver, j.wh_state,
    j.wh_attempts, j.wh_base, j.wh_created, j.wh_id, j.body_len, #j.blob) .. j.blob .. j.log
  if ttl then redis.call('SET', key, v, 'EX', ttl) else redis.call('SET', key, v, 'KEEPTTL') end
end
local function dlv_get(key)
  local v = redis.call('GET', key)
  if not v then return nil end
  local nl = string.find(v, '\\n', 1, true)
  local f = {}
  for w in string.gmatch(string.sub(v, 1, nl - 1), '%S+') do f[#f + 1] = w end
  local body_end = nl + tonumber(f[6])
  return {state = f[2], attempts = tonumber(f[3]), base = tonumber(f[4]),
    created = tonumber(f[5]), body = string.sub(v, nl + 1, body_end),
    log = string.sub(v, body_end + 1)}
end
local function dlv_set(key, d, ttl)
  local v = string.format('D1 %s %d %d %d %d\\n', d.state, d.attempts, d.base, d.created,
    #d.body) .. d.body .. d.log
  redis.call('SET', key, v, 'EX', ttl)
end
-- The log with `entry` appended, its oldest entries dropped beyond `max`.
local function log_append(log, entry, max)
  log = log .. entry .. '\\n'
  local _, n = string.gsub(log, '\\n', '')
  while n > max do
    log = string.sub(log, string.find(log, '\\n', 1, true) + 1)
    n = n - 1
  end
  return log
end
"""


@dataclass(frozen=True)
class JobValue:
    """A job's string split into its parts, as `LUA_VALUES.job_get` does."""

    status: str
    ver: int
    wh_state: str
    wh_attempts: int
    wh_base: int
    wh_created_ms: int
    wh_id: str | None
    body_len: int
    blob: bytes
    log: bytes


@dataclass(frozen=True)
class DeliveryValue:
    """A non-final delivery's string split into its parts, as `LUA_VALUES.dlv_get` does."""

    state: str
    attempts: int
    base: int
    created_ms: int
    body: bytes
    log: bytes


def _raw(value: bytes | str) -> bytes:
    if not isinstance(value, bytes):  # a decoded reply would have mangled the blob
        msg = "job values are read from a pool that does not decode replies"
        raise TypeError(msg)
    return value


def parse_job(value: bytes | str) -> JobValue:
    """The parts of a job's string (see the layout above)."""
    head, _, rest = _raw(value).partition(b"\n")
    _, status, ver, wh_state, attempts, base, created, wh_id, body_len, blob_len = (
        head.decode().split(" ")
    )
    end = int(blob_len)
    return JobValue(
        status=status,
        ver=int(ver),
        wh_state=wh_state,
        wh_attempts=int(attempts),
        wh_base=int(base),
        wh_created_ms=int(created),
        wh_id=None if wh_id == "-" else wh_id,
        body_len=int(body_len),
        blob=rest[:end],
        log=rest[end:],
    )


def parse_delivery(value: bytes | str) -> DeliveryValue:
    """The parts of a non-final delivery's string (see the layout above)."""
    head, _, rest = _raw(value).partition(b"\n")
    _, state, attempts, base, created, body_len = head.decode().split(" ")
    end = int(body_len)
    return DeliveryValue(
        state=state,
        attempts=int(attempts),
        base=int(base),
        created_ms=int(created),
        body=rest[:end],
        log=rest[end:],
    )
