"""Spend: what each tenant's jobs hold and were charged, by UTC day and calendar month.

A job's cost counts in the day (and month) it was submitted, by Redis's clock:
the create script holds its estimate there, checking the tenant's budgets in
the same script (`jobs._CREATE`, with `LUA_HOLD`), and the transition that
makes the job final turns the hold into a charge or releases it
(`jobs._TRANSITION`, with `LUA_SETTLE`). So a budget caps what the jobs
submitted in its period can cost, exactly, whatever the number of API replicas.
Amounts are whole micro-dollars in Redis; `models.usd` turns them into dollars.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Final

import redis.asyncio as aioredis

from service.models import BudgetPeriod
from service.store.keys import Keys

LEDGER_TTL_S: Final = 95 * 86400
"""How long a day's or month's spend is kept: the longest usage range (92 days) and a margin."""

MAX_CLOCK_SKEW: Final = timedelta(hours=1)
"""How far a replica's clock may be from Redis's for its first offer of periods to be right."""

NO_PERIOD: Final = "no offered period holds Redis time"
"""The create script's error when none of the offered periods holds Redis's time."""

LUA_HOLD: Final = """
-- The periods a create may fall in (ARGV: `D|M <name> <first ms> <after ms>` each): the one
-- holding Redis's `now` is the job's. Answers its index in `list` and the period.
local function periods_of(text)
  local days, months = {}, {}
  for kind, name, first, after in string.gmatch(text, '(%u) (%S+) (%d+) (%d+)') do
    local list = kind == 'D' and days or months
    list[#list + 1] = {name = name, first = tonumber(first), after = tonumber(after)}
  end
  return days, months
end
local function period_at(list, now)
  for i, period in ipairs(list) do
    if period.first <= now and now < period.after then return i, period end
  end
  error('no offered period holds Redis time ' .. now)
end
-- The refusal of holding `estimate` more in `key`'s period when that would go over `budget`
-- (micro-dollars, '-' for none): `B <period> <budget> <charged> <held> <resets ms>`, or nil.
local function over_budget(key, budget, estimate, period, resets_ms)
  if budget == '-' then return nil end
  local row = redis.call('HMGET', key, 'charged', 'held')
  local charged, held = tonumber(row[1]) or 0, tonumber(row[2]) or 0
  if charged + held + estimate > tonumber(budget) then
    return string.format('B %s %s %d %d %d', period, budget, charged, held, resets_ms)
  end
  return nil
end
local function hold(key, estimate, ttl_s)
  redis.call('HINCRBY', key, 'held', estimate)
  redis.call('EXPIRE', key, ttl_s)
end
"""
"""The create script's part: find the day and month by Redis's clock, check budgets, hold."""

LUA_SETTLE: Final = """
-- The job leaves its hold: charged it (`charge`) or released, counted in its day by status.
local function settle(job, day_key, month_key, status, charge, ttl_s)
  local hold = redis.call('HGET', job, 'hold')
  if not hold then return end
  local amount = tonumber(string.match(hold, ' (%d+)$'))
  for _, key in ipairs({day_key, month_key}) do
    if amount > 0 then  -- (an unpriced job holds 0, and Lua would send -0 as "-0")
      redis.call('HINCRBY', key, 'held', -amount)
      if charge then redis.call('HINCRBY', key, 'charged', amount) end
    end
    redis.call('EXPIRE', key, ttl_s)
  end
  redis.call('HINCRBY', day_key, status, 1)
  redis.call('HDEL', job, 'hold')
end
"""
"""The transition script's part: a final job's hold becomes a charge or is released."""


@dataclass(frozen=True, slots=True)
class Period:
    """A UTC day (`YYYY-MM-DD`) or calendar month (`YYYY-MM`) and its bounds in epoch ms."""

    name: str
    first_ms: int
    after_ms: int

    @property
    def resets_at(self) -> datetime:
        """When the next period starts."""
        return datetime.fromtimestamp(self.after_ms / 1000, UTC)


def _ms(at: datetime) -> int:
    return int(at.timestamp() * 1000)


def day_period(day: date) -> Period:
    """The UTC day `day`."""
    first = datetime(day.year, day.month, day.day, tzinfo=UTC)
    return Period(day.isoformat(), _ms(first), _ms(first + timedelta(days=1)))


def month_period(day: date) -> Period:
    """The calendar month holding `day`."""
    first = datetime(day.year, day.month, 1, tzinfo=UTC)
    after = datetime(day.year + day.month // 12, day.month % 12 + 1, 1, tzinfo=UTC)
    return Period(first.strftime("%Y-%m"), _ms(first), _ms(after))


@dataclass(frozen=True)
class Periods:
    """The days and months a create may fall in by Redis's clock, offered to the script.

    Redis's clock decides, so replicas with skewed clocks still agree; each replica
    offers the periods within `MAX_CLOCK_SKEW` of its own time.
    """

    days: tuple[Period, ...]
    months: tuple[Period, ...]

    @classmethod
    def around(cls, now: datetime) -> Periods:
        """The periods within `MAX_CLOCK_SKEW` of `now`."""
        moments = [(now + MAX_CLOCK_SKEW * n).date() for n in (-1, 0, 1)]
        days = dict.fromkeys(day_period(d) for d in moments)
        months = dict.fromkeys(month_period(d) for d in moments)
        return cls(tuple(days), tuple(months))

    def script_arg(self) -> str:
        """The periods as `LUA_HOLD`'s `periods_of` reads them."""
        rows = [("D", p) for p in self.days] + [("M", p) for p in self.months]
        return "".join(f"{kind} {p.name} {p.first_ms} {p.after_ms}\n" for kind, p in rows)

    def keys(self, keys: Keys, tenant: str) -> list[str]:
        """The tenant's spend keys of these periods, days then months, as the script reads them."""
        return [keys.spend_day(tenant, p.name) for p in self.days] + [
            keys.spend_month(tenant, p.name) for p in self.months
        ]


@dataclass(frozen=True, slots=True)
class BudgetRefusal:
    """A create refused because it would go over a budget: the figures of that budget."""

    period: BudgetPeriod
    budget_micros: int
    charged_micros: int
    held_micros: int
    resets_at: datetime


@dataclass(frozen=True, slots=True)
class Spend:
    """What a day or month holds and was charged, and (days) its jobs by final status."""

    held_micros: int = 0
    charged_micros: int = 0
    completed: int = 0
    failed: int = 0
    cancelled: int = 0


_FIELDS: Final = ("held", "charged", "completed", "failed", "cancelled")


class SpendStore:
    """Reads of the spend ledger: usage by day, and the periods' totals budgets count against."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys

    async def today(self) -> date:
        """Today in UTC by Redis's clock, the one the create script counts by."""
        seconds, _ = await self._redis.time()
        return datetime.fromtimestamp(seconds, UTC).date()

    async def days(self, tenant: str, first: date, last: date) -> list[tuple[date, Spend]]:
        """The tenant's spend of each day from `first` to `last`, inclusive, in one round trip."""
        dates = [first + timedelta(days=n) for n in range((last - first).days + 1)]
        names = [self._keys.spend_day(tenant, d.isoformat()) for d in dates]
        return list(zip(dates, await self._read(names), strict=True))

    async def current(self, tenant: str, today: date) -> tuple[Spend, Spend]:
        """The tenant's spend of `today` and of its month."""
        day, month = await self._read(
            [
                self._keys.spend_day(tenant, today.isoformat()),
                self._keys.spend_month(tenant, month_period(today).name),
            ]
        )
        return day, month

    async def _read(self, names: list[str]) -> list[Spend]:
        async with self._redis.pipeline(transaction=False) as pipe:
            for name in names:
                pipe.hmget(name, _FIELDS)
            rows = await pipe.execute()
        return [Spend(*(int(value or 0) for value in row)) for row in rows]
