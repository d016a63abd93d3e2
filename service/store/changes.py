"""Job changes over Redis pub/sub: what waiters and event streams follow.

`JobStore` publishes `{"id", "status", "ver"}` on the job's tenant channel
(`Keys.changes`) after each change it made. An API process holds one
`JobChanges`: a single pattern subscription over every tenant's channel, which
wakes the `Watch`es of the changed job held in this process. A waiter then
reads its job once; nobody polls Redis while nothing changes.

A message published while the subscription is down is lost, so every time the
subscription is (re)established every watch is woken with no status: each
reads its job again and sees what it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Final

import msgspec
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from service.models import JobStatus
from service.store.keys import Keys

log = logging.getLogger(__name__)

LISTEN_S: Final = 0.25
"""How long one read of the subscription waits for a message before it checks for `close`.

Not cancellation: redis-py may swallow a cancel that lands while it (re)connects,
which would leave the loop reading forever.
"""
RESUBSCRIBE_S: Final = (0.1, 2.0)
"""The first and the longest wait between attempts to subscribe again while Redis is away."""


class JobChange(msgspec.Struct):
    """What a change message says: the job, its new status, its new version."""

    id: str
    status: JobStatus
    ver: int


_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder(JobChange).decode


async def publish_change(redis: aioredis.Redis, keys: Keys, tenant: str, change: JobChange) -> None:
    """Tell the API processes that a job changed (best effort: they re-read after an outage)."""
    try:
        await redis.publish(keys.changes(tenant), _encode(change))
    except (RedisError, OSError) as exc:
        # The change itself is stored; a waiter still sees it at its next read or resync.
        log.warning("changes: could not publish %s %s: %s", change.id, change.status, exc)


class Watch:
    """One waiter's interest in one job: woken each time the job may have changed."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id
        self.status: JobStatus | None = None
        """The status the last message announced; None after a resync (read the job)."""
        self._woken = asyncio.Event()

    def wake(self, status: JobStatus | None) -> None:
        """The job changed (to `status`), or may have (None)."""
        self.status = status
        self._woken.set()

    async def changed(self, timeout_s: float) -> bool:
        """Whether the job may have changed within `timeout_s` seconds."""
        if timeout_s <= 0 and not self._woken.is_set():
            return False
        try:
            await asyncio.wait_for(self._woken.wait(), timeout_s)
        except TimeoutError:
            return False
        self._woken.clear()
        return True


class JobChanges:
    """One subscription to every job change, shared by all the watches of a process."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._pattern = keys.all_changes()
        self._watches: dict[str, set[Watch]] = {}
        self.stopping = False
        """Set by `stop`: waiters answer now and streams end."""
        self._closed = asyncio.Event()

    @contextlib.contextmanager
    def watch(self, job_id: str) -> Iterator[Watch]:
        """Follow `job_id` for the duration of the block (read the job after entering it)."""
        watch = Watch(job_id)
        self._watches.setdefault(job_id, set()).add(watch)
        try:
            yield watch
        finally:
            held = self._watches.get(job_id)
            if held is not None:
                held.discard(watch)
                if not held:
                    del self._watches[job_id]

    def stop(self) -> None:
        """The process is shutting down: wake every watch to answer what it has."""
        self.stopping = True
        self._wake_all()

    def _wake_all(self) -> None:
        for held in self._watches.values():
            for watch in held:
                watch.wake(None)

    def _received(self, message: dict[str, object]) -> None:
        if message["type"] == "psubscribe":
            # (Re)subscribed: anything published meanwhile was lost, so everyone reads again.
            self._wake_all()
            return
        if message["type"] != "pmessage":
            return
        try:
            change = _decode(message["data"])  # type: ignore[arg-type]
        except msgspec.DecodeError:
            log.warning("changes: ignored a malformed message %r", message["data"])
            return
        for watch in self._watches.get(change.id, ()):
            watch.wake(change.status)

    def close(self) -> None:
        """End `run` (within `LISTEN_S`)."""
        self._closed.set()

    async def run(self) -> None:
        """Follow the changes until `close`, subscribing again after each Redis outage."""
        delay = RESUBSCRIBE_S[0]
        while not self._closed.is_set():
            pubsub = self._redis.pubsub()
            try:
                await pubsub.psubscribe(self._pattern)
                while not self._closed.is_set():
                    message = await pubsub.get_message(timeout=LISTEN_S)
                    if message is not None:
                        self._received(message)
                        delay = RESUBSCRIBE_S[0]
            except (RedisError, OSError) as exc:
                log.warning("changes: subscription lost (%s); subscribing again", exc)
            finally:
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), delay)
            delay = min(RESUBSCRIBE_S[1], delay * 2)
