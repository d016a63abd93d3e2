"""What the three worker loops share: claim due items, work them concurrently, drain on stop.

A loop keeps up to `concurrency` items in hand. It claims only as many as it
has free slots, so a claimed item is always being worked and its lease is
never wasted waiting in a local queue. When Redis fails the loop backs off
(exponential, jittered, capped); it never dies. An outage is logged once for the
whole worker, when it starts and when it ends (`RedisOutage`), however many
items were in hand and however often the loops retried. On stop it claims
nothing more, gives the items in hand `drain_s` to finish, then cancels the
rest, and each cancelled item is released so another worker takes it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from abc import ABC, abstractmethod
from typing import Any, Final

from redis.exceptions import RedisError

from service.logs import job_id_var, tenant_var
from service.store.connection import REDIS_UNAVAILABLE
from service.store.schedules import Claim, Schedules

log = logging.getLogger(__name__)

_OUTAGE: Final = (*REDIS_UNAVAILABLE, OSError)
"""What a Redis call raises when Redis cannot be reached or used now: an outage, not a bug."""


def backoff_s(failures: int, *, base_s: float, cap_s: float, rng: random.Random) -> float:
    """Exponential backoff with jitter: uniform(0.5, 1.5) * min(cap, base * 2^(n-1))."""
    return float(min(cap_s, base_s * 2 ** max(0, failures - 1)) * rng.uniform(0.5, 1.5))


class Heartbeat:
    """When each loop last completed a turn, which are stuck, and whether Redis answers them.

    The worker's `/healthz` reads the beats and the stuck loops.
    """

    def __init__(self) -> None:
        self.beats: dict[str, float] = {}
        self.stuck: set[str] = set()
        self.redis = RedisOutage()

    def beat(self, name: str) -> None:
        """Record that loop `name` is alive now."""
        self.beats[name] = time.monotonic()

    def set_stuck(self, name: str, stuck: bool) -> None:
        """Record whether loop `name`, alive or not, is making no progress."""
        if stuck:
            self.stuck.add(name)
        else:
            self.stuck.discard(name)

    def stale(self, max_age_s: float) -> list[str]:
        """The loops that have not beaten within `max_age_s`, or are stuck."""
        now = time.monotonic()
        late = {name for name, at in self.beats.items() if now - at > max_age_s}
        return sorted(late | self.stuck)


class RedisOutage:
    """Whether Redis is failing the worker: one warning when an outage starts, one line at its end.

    The worker's loops share one, and report every failed Redis call to it and every
    claim Redis answered: a blip logs two lines, not a traceback per item in hand.
    """

    def __init__(self) -> None:
        self._since: float | None = None

    @property
    def down(self) -> bool:
        """True from a failed Redis call until Redis answers again."""
        return self._since is not None

    def failed(self, exc: Exception) -> None:
        """A Redis call failed; the first failure of an outage logs a warning, the rest nothing."""
        if self._since is None:
            self._since = time.monotonic()
            log.warning(
                "Redis is not answering (%s: %s); retrying with backoff until it is back",
                type(exc).__name__,
                exc,
            )

    def answered(self) -> None:
        """Redis answered a call; the first answer after an outage logs how long it lasted."""
        if self._since is not None:
            log.info("Redis is back after %.1f s", time.monotonic() - self._since)
            self._since = None


class ClaimLoop(ABC):
    """A loop over one schedule; subclasses say how to claim and how to work one item."""

    name: str = "loop"

    def __init__(
        self,
        schedules: Schedules,
        heartbeat: Heartbeat,
        *,
        concurrency: int,
        batch: int = 50,
        idle_s: float = 0.1,
        drain_s: float = 20.0,
        rng: random.Random | None = None,
    ) -> None:
        self.schedules = schedules
        self.heartbeat = heartbeat
        self.concurrency = concurrency
        self.batch = batch
        self.idle_s = idle_s
        self.drain_s = drain_s
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._in_hand: dict[asyncio.Task[None], Claim] = {}
        self._slot_freed = asyncio.Event()

    def _start(self, claim: Claim) -> None:
        task = asyncio.create_task(self._guarded(claim))
        self._in_hand[task] = claim
        task.add_done_callback(self._done)

    @abstractmethod
    async def claim(self, max_items: int) -> list[Claim]:
        """Claim up to `max_items` due items."""

    @abstractmethod
    async def work(self, claim: Claim) -> None:
        """Work one claimed item to its next state; errors are handled by the caller."""

    async def release_on_stop(self, claim: Claim) -> None:
        """Give an unfinished item back at shutdown, due at once."""
        await self.schedules.release(claim, delay_s=0)

    async def retry_later(self, claim: Claim, delay_s: float) -> None:
        """Give an item back after a failure nobody could act on, due after `delay_s`."""
        await self.schedules.release(claim, delay_s=delay_s)

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and work items until `stop` is set, then drain.

        The loop claims as many due items as it has free slots (at most `batch`
        at a time). When it got all it asked for and has room, more may be due:
        it claims again at once. Otherwise it looks again when an item in hand
        is done or after `idle_s`, whichever comes first.
        """
        failures = 0
        stopping = asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                asked = min(self.concurrency - len(self._in_hand), self.batch)
                claims: list[Claim] = []
                if asked > 0:
                    try:
                        claims = await self.claim(asked)
                        failures = 0
                        self.heartbeat.redis.answered()
                    except (RedisError, OSError) as exc:
                        failures += 1
                        delay = backoff_s(failures, base_s=0.1, cap_s=5.0, rng=self.rng)
                        self.redis_failed(exc, f"claiming (again in {delay:.2f}s)")
                        await _wait_any(stopping, seconds=delay)
                        continue
                for claim in claims:
                    self._start(claim)
                self.heartbeat.beat(self.name)
                more_due = asked <= 0 or len(claims) == asked
                if more_due and len(self._in_hand) < self.concurrency:
                    continue
                # Full, or nothing more due now: look again when an item in hand is done (its
                # change may have made more due) or after `idle_s`, whichever comes first.
                self._slot_freed.clear()
                freed = asyncio.ensure_future(self._slot_freed.wait())
                await _wait_any(stopping, freed, seconds=self.idle_s)
        finally:
            stopping.cancel()
            await self._drain()

    def redis_failed(self, exc: Exception, doing: str) -> None:
        """Log a failed Redis call: an outage once for the worker, anything else every time."""
        if isinstance(exc, _OUTAGE):
            self.heartbeat.redis.failed(exc)
            log.debug("%s: %s failed (%s)", self.name, doing, type(exc).__name__)
        else:
            log.warning("%s: %s failed (%s: %s)", self.name, doing, type(exc).__name__, exc)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._in_hand.pop(task, None)
        self._slot_freed.set()

    async def _guarded(self, claim: Claim) -> None:
        """Work one item; what fails is logged and retried later, never lost."""
        # This task's own context: every log line while working the item names it.
        job_id_var.set(claim.member)
        tenant_var.set(claim.tenant or None)
        try:
            await self.work(claim)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            delay = backoff_s(2, base_s=1.0, cap_s=30.0, rng=self.rng)
            if isinstance(exc, _OUTAGE):
                # Said once for the whole outage, not with a traceback per item in hand.
                self.redis_failed(exc, f"working {claim.member}")
            else:
                log.exception("%s: %s failed, due again in %.1fs", self.name, claim.member, delay)
            with contextlib.suppress(RedisError, OSError):
                await self.retry_later(claim, delay)

    async def _drain(self) -> None:
        """Let the items in hand finish within `drain_s`, then release the rest."""
        if not self._in_hand:
            return
        log.info("%s: draining %d item(s)", self.name, len(self._in_hand))
        _, pending = await asyncio.wait(set(self._in_hand), timeout=self.drain_s)
        leftover = [self._in_hand[task] for task in pending if task in self._in_hand]
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        released = 0
        for claim in leftover:
            try:
                await self.release_on_stop(claim)
                released += 1
            except (RedisError, OSError) as exc:
                # Its lease runs out and another worker takes it: nothing is lost.
                self.redis_failed(exc, f"releasing {claim.member}")
        if leftover:
            log.info("%s: released %d of %d unfinished item(s)", self.name, released, len(leftover))


async def _wait_any(
    stopping: asyncio.Future[Any], *others: asyncio.Future[Any], seconds: float
) -> None:
    """Wait until stop is set, one of `others` is done, or `seconds` pass."""
    await asyncio.wait({stopping, *others}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    for waiter in others:
        waiter.cancel()
