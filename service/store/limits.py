"""Limits shared by every replica: a GCRA rate limiter and a global upstream pause.

Both live in Redis and use Redis's clock (`TIME`), so replicas with skewed
clocks still agree. The rate limiter is GCRA (the generic cell rate
algorithm): one key per limit holding the theoretical arrival time, which is
exact, O(1), and needs no background refill. The pause is set when RunComfy
says to stop everyone (402: no funds; 429 with Retry-After) and read by the
submitter before it claims.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import redis.asyncio as aioredis

from service.store.connection import text
from service.store.keys import LUA_NOW, Keys

LUA_GCRA: Final = """
-- Take `cost` from the GCRA limit at `key` at time `now` (ms): 0 when granted, else the ms
-- to wait first (and nothing is taken).
local function gcra_take(key, interval_ms, burst, cost, now)
  local tat = tonumber(redis.call('GET', key) or now)
  if tat < now then tat = now end
  local new_tat = tat + interval_ms * cost
  local allow_at = new_tat - interval_ms * burst
  if allow_at > now then return allow_at - now end
  redis.call('SET', key, new_tat, 'PX', math.ceil(new_tat - now) + 1000)
  return 0
end
"""
"""The rate limiter itself, for every script that takes from a limit (`jobs.create_many` too)."""

# Several limits taken at once (KEYS: the limits; ARGV: interval_ms, burst, cost of each),
# one after the other, exactly as that many single calls in a row would take them.
_GCRA = (
    LUA_NOW
    + LUA_GCRA
    + """
local now = now_ms()
local waits = {}
for i, key in ipairs(KEYS) do
  local at = 3 * i - 2
  waits[i] = gcra_take(key, tonumber(ARGV[at]), tonumber(ARGV[at + 1]), tonumber(ARGV[at + 2]),
    now)
end
return waits
"""
)

# KEYS: the pause. ARGV: reason, ms.
_PAUSE = (
    LUA_NOW
    + """
local key, reason, ms = KEYS[1], ARGV[1], tonumber(ARGV[2])
local now = now_ms()
local until_ms = tonumber(redis.call('HGET', key, 'until') or 0)
if now + ms > until_ms then
  redis.call('HSET', key, 'reason', reason, 'until', now + ms)
  redis.call('PEXPIRE', key, ms)
end
return redis.call('HINCRBY', key, 'count', 1)
"""
)

# KEYS: the pause.
_CURRENT = (
    LUA_NOW
    + """
local row = redis.call('HMGET', KEYS[1], 'reason', 'until')
if not row[1] then return false end
return {row[1], tonumber(row[2]) - now_ms()}
"""
)


@dataclass(frozen=True, slots=True)
class Take:
    """One call of `Limits.acquire`: take `cost` from the limit `name`."""

    name: str
    rate_per_s: float
    burst: int
    cost: int = 1

    def script_args(self) -> tuple[float, int, int]:
        """What `gcra_take` (`LUA_GCRA`) takes but the key and the time: interval, burst, cost."""
        return 1000.0 / self.rate_per_s, max(1, self.burst), self.cost


@dataclass(frozen=True)
class Pause:
    """Upstream calls are paused for everyone: why, and for how much longer."""

    reason: str
    remaining_s: float


class Limits:
    """The shared rate limits and the upstream pause."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._keys = keys
        self._gcra = redis.register_script(_GCRA)
        self._pause = redis.register_script(_PAUSE)
        self._current = redis.register_script(_CURRENT)

    async def acquire(self, name: str, *, rate_per_s: float, burst: int, cost: int = 1) -> float:
        """Take `cost` from limit `name`: 0 when granted, else the seconds to wait first."""
        [wait_s] = await self.acquire_many([Take(name, rate_per_s, burst, cost)])
        return wait_s

    async def acquire_many(self, takes: list[Take]) -> list[float]:
        """`acquire` for each of `takes` in one round trip, in order; the waits in that order."""
        args: list[float | int] = []
        for take in takes:
            args += take.script_args()
        waits_ms = await self._gcra(keys=[self._keys.rate(t.name) for t in takes], args=args)
        return [float(wait_ms) / 1000.0 for wait_ms in waits_ms]

    async def pause_upstream(self, reason: str, seconds: float) -> int:
        """Pause upstream submits for everyone for `seconds` (never shortening a longer pause).

        Returns how many times a pause was asked for while one was in force,
        which callers use to grow the next pause.
        """
        return int(
            await self._pause(
                keys=[self._keys.pause()], args=[reason, max(1, round(seconds * 1000))]
            )
        )

    async def upstream_pause(self) -> Pause | None:
        """The pause in force, if any."""
        row = await self._current(keys=[self._keys.pause()])
        if not row:
            return None
        remaining_ms = int(row[1])
        if remaining_ms <= 0:
            return None
        return Pause(reason=text(row[0]), remaining_s=remaining_ms / 1000.0)
