"""Per-minute counts of what happened, for the dashboard's charts of the last hours.

One hash (`P:activity`) is a ring of 1440 one-minute slots: field `<slot>:at` says
which minute (Redis clock, minutes since the epoch) a slot holds, `<slot>:<counter>`
its counts. The scripts that create jobs, end them and end deliveries count with
`count_activity` (`LUA_ACTIVITY`) in the same step; a slot meeting a new minute is
emptied first, so the hash never holds more than a day and needs no expiry.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Final

import redis.asyncio as aioredis

from service.store.keys import Keys

COUNTERS: Final = ("created", "completed", "failed", "cancelled", "delivered", "delivery_failed")
"""What is counted: jobs created and ended by status, final deliveries ended by outcome."""
RING_MINUTES: Final = 1440

LUA_ACTIVITY: Final = f"""
local ACTIVITY = {{'{"', '".join(COUNTERS)}'}}
local function count_activity(activity, name, n, now)
  local minute = math.floor(now / 60000)
  local slot = minute % {RING_MINUTES}
  if redis.call('HGET', activity, slot .. ':at') ~= tostring(minute) then
    local stale = {{}}
    for i, counter in ipairs(ACTIVITY) do stale[i] = slot .. ':' .. counter end
    redis.call('HDEL', activity, unpack(stale))
    redis.call('HSET', activity, slot .. ':at', tostring(minute))
  end
  redis.call('HINCRBY', activity, slot .. ':' .. name, n)
end
"""
"""`count_activity(key, counter, n, now_ms)`: add `n` to a counter of the minute of `now_ms`."""


class ActivityStore:
    """Reads the per-minute counts."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def minutes(self, count: int) -> list[tuple[datetime, dict[str, int]]]:
        """The last `count` minutes (the current one last, by Redis's clock) and their counts."""
        count = max(1, min(count, RING_MINUTES))
        seconds, _ = await self._redis.time()
        now = seconds // 60
        wanted = list(range(now - count + 1, now + 1))
        fields = [
            f"{minute % RING_MINUTES}:{name}" for minute in wanted for name in ("at", *COUNTERS)
        ]
        values = await self._redis.hmget(self._keys.activity(), fields)
        width = len(COUNTERS) + 1
        out: list[tuple[datetime, dict[str, int]]] = []
        for n, minute in enumerate(wanted):
            row = values[n * width : (n + 1) * width]
            current = row[0] is not None and int(row[0]) == minute
            counts = {
                name: int(value or 0) if current else 0
                for name, value in zip(COUNTERS, row[1:], strict=True)
            }
            out.append((datetime.fromtimestamp(minute * 60, UTC), counts))
        return out
