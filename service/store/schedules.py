"""Claiming due work with leases and fencing tokens, and the shared upstream slots.

A schedule is a sorted set of members scored by due time (ms, Redis clock). A
claim pushes a member's score to now + lease and hands out a fencing token,
kept in `lease:<schedule>`; every later change of that member checks the token.
A worker that dies simply stops: its members fall due again when the lease
runs out and another worker claims them, with a new token that makes any late
write of the dead worker's fail. No sweeper is needed.

A claim also hands back the member's due time, so a periodic member (a job's
status poll) can be given back due one period after it was due rather than
after now: the time it spent waiting and being worked does not stretch the
period (`release(..., cadence=True)`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, cast

import redis.asyncio as aioredis

from service.store.connection import text
from service.store.jobs import Lease, StoredJob, stored_jobs
from service.store.keys import LUA_NOW, Keys

# KEYS: the schedule, its lease hash, the fencing counter. ARGV: lease_ms, max. The answer:
# the claims, each {member, fencing token, due (ms)}.
_CLAIM_DUE = (
    LUA_NOW
    + """
local sched, lease, fence = KEYS[1], KEYS[2], KEYS[3]
local lease_ms, max = tonumber(ARGV[1]), tonumber(ARGV[2])
local now = now_ms()
local due = redis.call('ZRANGEBYSCORE', sched, '-inf', now, 'WITHSCORES', 'LIMIT', 0, max)
local claims = {}
for i = 1, #due, 2 do
  local member = due[i]
  local token = redis.call('INCR', fence)
  redis.call('ZADD', sched, now + lease_ms, member)
  redis.call('HSET', lease, member, token)
  claims[#claims + 1] = {member, token, tonumber(due[i + 1])}
end
return claims
"""
)

# The tenants a submit script was given, each {name, submit, inflight}, and their caps.
# After `argc` arguments of its own come the number of tenants, their names, then tenant,
# cap pairs; after `keyc` keys of its own, each tenant's submit schedule and in-flight set.
_LUA_TENANTS = """
local function read_tenants(argc, keyc)
  local n = tonumber(ARGV[argc + 1])
  local tenants, caps = {}, {}
  for i = 1, n do
    tenants[i] = {name = ARGV[argc + 1 + i], submit = KEYS[keyc + 2 * i - 1],
      inflight = KEYS[keyc + 2 * i]}
  end
  for i = argc + n + 2, #ARGV, 2 do caps[ARGV[i]] = tonumber(ARGV[i + 1]) end
  return tenants, caps
end
"""

# Fair claiming: tenants with due work are served round robin (least recently
# served first), one job per turn, while the global and the tenant's cap on jobs
# inside RunComfy allow. A claimed job takes its upstream slot at once, so two
# workers can never overfill RunComfy between a claim and the submit.
#
# A slot belongs to its job's claim: a due job that already holds one (its worker
# died or stopped with the submit on the way) is claimed first, whatever the caps,
# or the very jobs holding every slot could never be claimed again. So are the due
# jobs of a tenant removed from the tenants file, when the caller names every
# tenant it knows (its `tenant_caps` then has every tenant): the submitter fails
# them unsent.
#
# KEYS: the fencing counter, the submit lease, the global in-flight set, submit-tenants,
# the round-robin counter, then each tenant's submit schedule and in-flight set. ARGV:
# lease_ms, max, global_cap, '1' when the caps name every tenant, the number of tenants,
# the tenants (in KEYS' order), then tenant, cap pairs. The tenants are those of
# submit-tenants when the caller read it: one that has left it since (no pending work) is
# skipped, one that has joined is served on the next call. The answer: tenant, job id,
# fencing token of each claim.
_CLAIM_SUBMITS = (
    LUA_NOW
    + _LUA_TENANTS
    + """
local fence, lease, inflight_all, submit_tenants, rr = unpack(KEYS, 1, 5)
local lease_ms, max, global_cap = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local known = ARGV[4] == '1'
local given, caps = read_tenants(4, 5)
local tenants = {}
for _, t in ipairs(given) do
  local turn = redis.call('ZSCORE', submit_tenants, t.name)
  if turn then
    t.turn = tonumber(turn)
    tenants[#tenants + 1] = t
  end
end
-- Least recently served first, ties by name: the order of ZRANGE.
table.sort(tenants, function(a, b)
  return a.turn < b.turn or (a.turn == b.turn and a.name < b.name)
end)
local now = now_ms()
local inflight = redis.call('SCARD', inflight_all)
local out = {}
local function claim(t, id)
  local token = redis.call('INCR', fence)
  redis.call('ZADD', t.submit, now + lease_ms, id)
  redis.call('HSET', lease, id, token)
  if redis.call('SADD', inflight_all, id) == 1 then inflight = inflight + 1 end
  redis.call('SADD', t.inflight, id)
  redis.call('ZADD', submit_tenants, redis.call('INCR', rr), t.name)
  out[#out + 1] = t.name
  out[#out + 1] = id
  out[#out + 1] = token
end
for _, t in ipairs(tenants) do
  for _, id in ipairs(redis.call('SMEMBERS', t.inflight)) do
    if #out >= max * 3 then break end
    local due = redis.call('ZSCORE', t.submit, id)
    if due and tonumber(due) <= now then claim(t, id) end
  end
  -- A tenant no longer in the tenants file: its jobs are claimed at once, to be failed unpaid.
  if known and not caps[t.name] and #out < max * 3 then
    local left = max - #out / 3
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', t.submit, '-inf', now, 'LIMIT', 0, left)) do
      claim(t, id)
    end
  end
end
local progress = true
while progress and #out < max * 3 and inflight < global_cap do
  progress = false
  for _, t in ipairs(tenants) do
    if #out >= max * 3 or inflight >= global_cap then break end
    local cap = caps[t.name] or global_cap
    if redis.call('SCARD', t.inflight) < cap then
      local due = redis.call('ZRANGEBYSCORE', t.submit, '-inf', now, 'LIMIT', 0, 1)
      local id = due[1]
      if id then
        claim(t, id)
        progress = true
      elseif redis.call('ZCARD', t.submit) == 0 then
        redis.call('ZREM', submit_tenants, t.name)
      end
    end
  end
end
return out
"""
)

# How long the oldest claimable submit has been due (ms), 0 when none: a job that
# holds a slot already, or whose tenant has room under both caps. Claims move a job's
# due time past now, so a claimable job stays due only while no worker claims it. An
# upstream pause (402, 429) holds submits on purpose: nothing is stalled then. Read only.
#
# KEYS: the upstream pause, the global in-flight set, then each tenant's submit schedule
# and in-flight set. ARGV: global_cap, the number of tenants, the tenants, then tenant,
# cap pairs (as `_CLAIM_SUBMITS`).
_SUBMIT_STALL = (
    LUA_NOW
    + _LUA_TENANTS
    + """
local pause, inflight_all = KEYS[1], KEYS[2]
local global_cap = tonumber(ARGV[1])
local tenants, caps = read_tenants(1, 2)
if redis.call('EXISTS', pause) == 1 then return 0 end
local now = now_ms()
local oldest = now
local room = redis.call('SCARD', inflight_all) < global_cap
for _, t in ipairs(tenants) do
  for _, id in ipairs(redis.call('SMEMBERS', t.inflight)) do
    local due = tonumber(redis.call('ZSCORE', t.submit, id))
    if due and due < oldest then oldest = due end
  end
  if room and redis.call('SCARD', t.inflight) < (caps[t.name] or global_cap) then
    local first = redis.call('ZRANGE', t.submit, 0, 0, 'WITHSCORES')
    if first[2] and tonumber(first[2]) < oldest then oldest = tonumber(first[2]) end
  end
end
return now - oldest
"""
)

# KEYS: the lease hash, the schedule. ARGV: member, token, lease_ms. Pushes a held claim's
# due time to now + lease_ms (a long piece of work keeps its claim); 0 when it was lost.
_EXTEND = (
    LUA_NOW
    + """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return 0 end
redis.call('ZADD', KEYS[2], 'XX', now_ms() + tonumber(ARGV[3]), ARGV[1])
return 1
"""
)

# KEYS: the lease hash, the schedule, then (to free an upstream slot) the global and the
# tenant's in-flight sets. ARGV: member, token, delay_ms (-1: remove it), base_ms (due
# delay_ms after it, never before now; -1: after now). 0 when the claim was lost.
_RELEASE = (
    LUA_NOW
    + """
local lease, sched = KEYS[1], KEYS[2]
local member, token, delay_ms, base = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('HGET', lease, member) ~= token then return 0 end
redis.call('HDEL', lease, member)
if delay_ms < 0 then
  redis.call('ZREM', sched, member)
else
  local now = now_ms()
  if base < 0 then base = now end
  redis.call('ZADD', sched, math.max(now, base + delay_ms), member)
end
if KEYS[3] then
  redis.call('SREM', KEYS[3], member)
  redis.call('SREM', KEYS[4], member)
end
return 1
"""
)


def _tenant_args(tenants: list[str], caps: Mapping[str, int]) -> list[str | int]:
    """The submit scripts' tenant arguments: how many, the tenants, then tenant, cap pairs."""
    args: list[str | int] = [len(tenants), *tenants]
    for tenant, cap in caps.items():
        args += [tenant, cap]
    return args


@dataclass(frozen=True)
class Claim:
    """A claimed member of a schedule; `tenant` is set for submit claims.

    `due_ms` is when the member was due (Redis clock, ms) as the claim found it;
    0 where unknown (submit claims).
    """

    member: str
    lease: Lease
    tenant: str = ""
    due_ms: int = 0
    job: StoredJob | None = field(default=None, repr=False, compare=False)
    """The job as read once claimed (submit claims, and poll claims asked to); None if gone."""


class Schedules:
    """The `submit`, `poll` and `deliver` schedules: claim due members, release them."""

    def __init__(self, redis: aioredis.Redis, keys: Keys, *, lease_s: float) -> None:
        self._redis = redis
        self._keys = keys
        self._lease_ms = round(lease_s * 1000)
        self._claim_due = redis.register_script(_CLAIM_DUE)
        self._claim_submits = redis.register_script(_CLAIM_SUBMITS)
        self._release = redis.register_script(_RELEASE)
        self._submit_stall = redis.register_script(_SUBMIT_STALL)
        self._extend = redis.register_script(_EXTEND)

    async def claim(
        self, name: Literal["poll", "deliver", "copy"], max_items: int, *, read_jobs: bool = False
    ) -> list[Claim]:
        """Claim up to `max_items` due members of the poll, deliver or copy schedule.

        With `read_jobs` (members are job ids) each claim carries its job,
        read in one round trip once claimed.
        """
        keys = [self._keys.schedule(name), self._keys.lease(name), self._keys.fence()]
        found = await self._claim_due(keys=keys, args=[self._lease_ms, max_items])
        members = [text(member) for member, _, _ in found]
        jobs: list[StoredJob | None] = [None] * len(members)
        if read_jobs and members:
            jobs = await stored_jobs(self._redis, self._keys, members)
        return [
            Claim(member=member, lease=Lease(name, text(token)), due_ms=int(due_ms), job=job)
            for member, (_, token, due_ms), job in zip(members, found, jobs, strict=True)
        ]

    async def claim_submits(
        self,
        max_items: int,
        *,
        global_cap: int,
        tenant_caps: Mapping[str, int],
        every_tenant: bool = False,
    ) -> list[Claim]:
        """Claim up to `max_items` pending jobs, fairly across tenants, within the slot caps.

        With `every_tenant`, `tenant_caps` names every tenant there is, and the
        due jobs of any other tenant (one removed) are claimed whatever the caps.
        Each claim carries its job (`Claim.job`), read once claimed.
        """
        tenants = await self._submit_tenants()
        if not tenants:
            return []
        keys = [
            self._keys.fence(),
            self._keys.lease("submit"),
            self._keys.inflight(),
            self._keys.submit_tenants(),
            self._keys.round_robin(),
            *self._tenant_keys(tenants),
        ]
        args: list[str | int] = [self._lease_ms, max_items, global_cap, int(every_tenant)]
        flat = await self._claim_submits(keys=keys, args=args + _tenant_args(tenants, tenant_caps))
        members = [text(flat[i + 1]) for i in range(0, len(flat), 3)]
        jobs = await stored_jobs(self._redis, self._keys, members)
        return [
            Claim(
                tenant=text(flat[3 * n]),
                member=member,
                lease=Lease("submit", text(flat[3 * n + 2])),
                job=job,
            )
            for n, (member, job) in enumerate(zip(members, jobs, strict=True))
        ]

    async def _submit_tenants(self) -> list[str]:
        """The tenants with pending work, as the submit scripts are then given them."""
        tenants = await self._redis.zrange(self._keys.submit_tenants(), 0, -1)
        return [text(t) for t in cast("list[bytes]", tenants)]

    def _tenant_keys(self, tenants: list[str]) -> list[str]:
        """Each tenant's submit schedule and in-flight set, as the submit scripts take them."""
        return [name for t in tenants for name in (self._keys.submit(t), self._keys.inflight(t))]

    async def submit_stall_s(self, *, global_cap: int, tenant_caps: Mapping[str, int]) -> float:
        """How long the oldest job a submit claim could take has gone unclaimed (0: none).

        Well past a lease, no worker is claiming submits: the worker's health says so.
        """
        tenants = await self._submit_tenants()
        if not tenants:
            return 0.0
        keys = [self._keys.pause(), self._keys.inflight(), *self._tenant_keys(tenants)]
        args = [global_cap, *_tenant_args(tenants, tenant_caps)]
        return int(await self._submit_stall(keys=keys, args=args)) / 1000

    async def release(
        self,
        claim: Claim,
        *,
        delay_s: float | None,
        cadence: bool = False,
        free_slot: bool = False,
    ) -> bool:
        """Give a claimed member back: due again after `delay_s`, or removed (None).

        With `cadence` it is due `delay_s` after the time it was due when claimed
        (never earlier than now), so a periodic member keeps its period.
        `free_slot` also gives back the upstream slot a submit claim took. False
        when the claim was lost (its lease ran out and another worker took it).
        """
        schedule = claim.lease.schedule
        keys = [
            self._keys.lease(schedule),
            self._keys.submit(claim.tenant)
            if schedule == "submit"
            else self._keys.schedule(schedule),
        ]
        if free_slot:
            keys += [self._keys.inflight(), self._keys.inflight(claim.tenant)]
        delay_ms = -1 if delay_s is None else max(0, round(delay_s * 1000))
        base_ms = claim.due_ms if cadence and claim.due_ms > 0 else -1
        done = await self._release(
            keys=keys, args=[claim.member, claim.lease.token, delay_ms, base_ms]
        )
        return bool(done)

    async def extend(self, claim: Claim) -> bool:
        """Keep holding a claim for another lease from now; False when it was lost."""
        schedule = claim.lease.schedule
        keys = [self._keys.lease(schedule), self._keys.schedule(schedule)]
        return bool(
            await self._extend(keys=keys, args=[claim.member, claim.lease.token, self._lease_ms])
        )

    async def depths(self) -> dict[str, int]:
        """How many members each schedule holds, and how many jobs hold upstream slots."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcard(self._keys.schedule("poll"))
            pipe.zcard(self._keys.schedule("deliver"))
            pipe.scard(self._keys.inflight())
            pipe.zcard(self._keys.backlog())
            pipe.zcard(self._keys.schedule("copy"))
            poll, deliver, inflight, backlog, copy = await pipe.execute()
        return {
            "poll": poll,
            "deliver": deliver,
            "inflight": inflight,
            "backlog": backlog,
            "copy": copy,
        }
