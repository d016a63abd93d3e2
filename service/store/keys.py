"""Every Redis key the gateway uses, for Python and for the Lua scripts alike.

All keys share one hash tag (`{rcg}` by default) so a Redis Cluster keeps them
in one slot and every script may touch any of them. Scripts receive the prefix
as KEYS[1] and build names with the `LUA_PRELUDE` functions below, so a key's
name is written once, here.

| key | type | holds |
| --- | --- | --- |
| `P:job:<id>` | hash | `doc` (JobRecord JSON), `status`, `ver`, `tenant`, `wh_*` (webhook) |
| `P:idem:<tenant>:<sha256(key)>` | string | `<job id> <sha256(body)>`, expires with retention |
| `P:jobs:<tenant>` | zset | job ids, all score 0, ordered by the (time-sortable) id |
| `P:jobs:<tenant>:<status>` | zset | the same, per status |
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
| `P:dlv:<id>` | hash | one delivery: `job`, `tenant`, `type`, `url`, `body`, `state`, ... |
| `P:dlv:<id>:log` | list | its attempt log (DeliveryAttempt JSON) |
"""

from __future__ import annotations

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

    def jobs(self, tenant: str, status: str | None = None) -> str:
        """A tenant's job index, optionally by status."""
        base = f"{self.prefix}:jobs:{tenant}"
        return base if status is None else f"{base}:{status}"

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

    def delivery_log(self, delivery_id: str) -> str:
        """One webhook delivery's attempt log."""
        return f"{self.prefix}:dlv:{delivery_id}:log"


LUA_PRELUDE: Final = """
local P = KEYS[1]
local function k_job(id) return P .. ':job:' .. id end
local function k_idem(t, h) return P .. ':idem:' .. t .. ':' .. h end
local function k_jobs(t) return P .. ':jobs:' .. t end
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
local function k_delivery_log(id) return P .. ':dlv:' .. id .. ':log' end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""
