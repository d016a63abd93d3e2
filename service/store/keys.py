"""Every Redis key the gateway uses: the one place a key's name is written.

All keys share one hash tag (`{rcg}` by default) so a Redis Cluster keeps them
in one slot. Every script is given the names of the keys it touches as KEYS,
built by `Keys` below; a script never builds a key name itself.

| key | type | holds |
| --- | --- | --- |
| `P:job:<id>` | hash | the job (fields below); a final job expires with retention |
| `P:idem:<tenant>:<sha256(key)>` | string | `<job id> <sha256(body)>`, expires with retention |
| `P:jobs:<tenant>:<status>` | zset | a tenant's job ids in one status, score 0, by id (time) |
| `P:submit:<tenant>` | zset | pending job ids by due time (ms) |
| `P:backlog` | zset | every pending job, all tenants (KEDA scales workers on its ZCARD) |
| `P:submit-tenants` | zset | tenants with pending work, least recently served first |
| `P:rr` | counter | round-robin ticket for `submit-tenants` |
| `P:poll` / `P:deliver` | zset | job ids (pending: at deadline) / delivery ids, by due time (ms) |
| `P:copy` | zset | jobs RunComfy completed whose outputs are being copied, by due time (ms) |
| `P:lease:<schedule>` | hash | member -> fencing token of its current claim |
| `P:fence` | counter | fencing tokens |
| `P:inflight`, `P:inflight:<tenant>` | set | jobs holding an upstream slot |
| `P:rate:<name>` | string | a GCRA limit's theoretical arrival time (ms) |
| `P:upstream-pause` | hash | `reason`, `until` (ms), `count`; expires with the pause |
| `P:dlv:<id>` | hash | a non-final event's delivery (`job.started`), fields below |
| `P:spend:<tenant>:<YYYY-MM-DD>` | hash | a UTC day's spend and jobs (below); expires in 95 days |
| `P:spend:<tenant>:<YYYY-MM>` | hash | a calendar month's `held` and `charged`; the same |
| `P:changes:<tenant>` | channel | `{"id", "status", "ver"}` after each change of a tenant's job |
| `P:runlen:<class>:<phase>` | zset | recent queue or run lengths (ms) of an input class, by time |
| `P:failed:<tenant>` | zset | jobs whose final webhook failed, by when the job finished (ms) |
| `P:request:<request id>` | string | the job of a RunComfy request id; expires after the job |
| `P:activity` | hash | per-minute counts of the last day, a ring of 1440 slots (`activity.py`) |

A job is a hash; read one with `redis-cli HGETALL '{rcg}:job:<id>'`:

| field | holds |
| --- | --- |
| `status` | the job's status, as in `record` |
| `ver` | its version: every state change compares it, then adds one |
| `record` | the `JobRecord` as JSON |
| `webhook_id` | the final event's delivery id, its `webhook-id` (once there is one) |
| `webhook_state` | that delivery's state: `pending`, `delivered`, `failed`, `skipped` |
| `webhook_attempts` | how many attempts it made, all told |
| `webhook_base` | the attempt count its retry schedule last started from (a re-send) |
| `webhook_created_ms` | when it was created (Redis clock, ms) |
| `event_zlib` | the final event's body, zlib-compressed (plain zlib, no preset dictionary) |
| `attempt_log` | the latest attempts, one `DeliveryAttempt` JSON object a line, oldest first |
| `hold` | `<YYYY-MM-DD> <micro-dollars>`: the day its cost counts in, what it holds; until final |
| `polls` | how many status polls it has had (the poller counts them) |

The final event's delivery lives in its job (no key of its own; its id names
the job, see `jobs.delivery_id`), so a finished job costs one key. The event
body is encoded once and those bytes are what every attempt sends; it is the
one field compressed (`python -c 'import sys, zlib;
sys.stdout.buffer.write(zlib.decompress(sys.stdin.buffer.read()))'` reads it
from `redis-cli --raw HGET ... event_zlib`). A field not yet written reads as
its zero: no delivery, `pending`, 0 attempts.

A day's spend (`P:spend:<tenant>:<YYYY-MM-DD>`) counts the jobs submitted that UTC
day (Redis's clock): `held` and `charged` in micro-dollars, and `completed`, `failed`,
`cancelled` as they end (`spend.py`).

A non-final event's delivery (`P:dlv:<id>`) is a short-lived hash with the same
`webhook_*`, `event_zlib` and `attempt_log` fields; its body is dropped once the
delivery ends (only a final event can be sent again).
"""

from __future__ import annotations

import re
from typing import Final

DEFAULT_PREFIX: Final = "{rcg}"
_GLOB: Final = re.compile(r"[*?\[\]\\]")
"""What a Redis pattern reads as glob syntax, escaped in a prefix."""


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
        """The `poll`, `deliver` or `copy` schedule."""
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

    def spend_day(self, tenant: str, day: str) -> str:
        """A tenant's jobs and spend of one UTC day (`YYYY-MM-DD`)."""
        return f"{self.prefix}:spend:{tenant}:{day}"

    def spend_month(self, tenant: str, month: str) -> str:
        """A tenant's spend of one calendar month (`YYYY-MM`)."""
        return f"{self.prefix}:spend:{tenant}:{month}"

    def changes(self, tenant: str) -> str:
        """The pub/sub channel of a tenant's job changes."""
        return f"{self.prefix}:changes:{tenant}"

    def all_changes(self) -> str:
        """The pattern (PSUBSCRIBE) of every tenant's changes channel."""
        return _GLOB.sub(r"\\\g<0>", self.prefix) + ":changes:*"

    def run_lengths(self, input_class: str, phase: str) -> str:
        """Recent queue (`phase` queue) or run (`run`) seconds of one input class."""
        return f"{self.prefix}:runlen:{input_class}:{phase}"

    def failed_deliveries(self, tenant: str) -> str:
        """A tenant's jobs whose final-event delivery failed, scored by their finish (ms).

        Kept by the scripts that end and re-send deliveries; what recovery reads.
        """
        return f"{self.prefix}:failed:{tenant}"

    def upstream_request(self, request_id: str) -> str:
        """The job a RunComfy request id belongs to: the admin search by request id."""
        return f"{self.prefix}:request:{request_id}"

    def activity(self) -> str:
        """Per-minute counts of jobs and deliveries (the dashboard's charts)."""
        return f"{self.prefix}:activity"

    def round_robin(self) -> str:
        """The counter of turns that orders `submit-tenants` (least recently served first)."""
        return f"{self.prefix}:rr"


LUA_NOW: Final = """
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""
"""Redis's clock in ms, for every script: replicas with skewed clocks still agree."""
