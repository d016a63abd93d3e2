"""Opening Redis: one pool per process, with timeouts and keepalive on every socket."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final, TypeAlias

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError
from redis.exceptions import TimeoutError as RedisTimeoutError

try:
    from redis.driver_info import DriverInfo

    # Built once: left to redis-py, every new connection looks its version up
    # in the package metadata again (0.4-2 ms each, felt in a burst).
    _DRIVER: dict[str, Any] = {"driver_info": DriverInfo()}
except ImportError:  # redis-py before 7.1 has no DriverInfo
    _DRIVER = {}

_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Ids made in one process are strictly increasing even within a millisecond.
_last_id = 0


def connect(url: str, *, max_connections: int = 64, pool_timeout_s: float = 5.0) -> aioredis.Redis:
    """A client for `url` whose sockets time out and keep alive, so a dead peer is noticed.

    A command retries a few times with jittered backoff on a dropped
    connection; past that the caller sees the error (the API answers 503, the
    worker loops back off). The pool is a blocking one: a burst of requests
    waits up to `pool_timeout_s` for a free connection rather than failing.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=pool_timeout_s,
        socket_timeout=5.0,
        socket_connect_timeout=3.0,
        socket_keepalive=True,
        health_check_interval=15,
        retry=Retry(EqualJitterBackoff(cap=1.0, base=0.05), retries=2),
        retry_on_error=[RedisConnectionError, RedisTimeoutError],
        decode_responses=False,
        **_DRIVER,
    )
    return aioredis.Redis(connection_pool=pool)


async def eval_many(
    redis: aioredis.Redis, script: AsyncScript, prefix: str, arg_lists: list[list[Any]]
) -> list[Any]:
    """Run `script` once per argument list in one pipelined round trip; answers in order.

    Any error a call answered is raised (the other calls of the batch did run).
    """
    replies = await send_pipelined(redis, [(script, (1, prefix, *args)) for args in arg_lists])
    for reply in replies:
        if isinstance(reply, Exception):
            raise reply
    return replies


Call = tuple[AsyncScript | None, tuple[Any, ...]]
"""One call of a pipeline: a script and its `numkeys, *keys, *args`, or None and a command."""
Reply: TypeAlias = Any
"""What Redis answered; its shape depends on the command or script that was sent."""


async def send_pipelined(redis: aioredis.Redis, calls: Sequence[Call]) -> list[Any]:
    """Send `calls` in one pipelined round trip; each one's reply, or the error it answered.

    redis-py's own pipelined scripts ask SCRIPT EXISTS first, a second round
    trip on every call; here EVALSHA goes straight out, and only the calls a
    flushed script cache refused (NOSCRIPT: they did not run) are sent again
    after loading their scripts. A connection error is raised: then some of
    the calls may have run, as with a single call.
    """
    replies: list[Any] = [None] * len(calls)
    todo = list(range(len(calls)))
    for _ in range(2):
        async with redis.pipeline(transaction=False) as pipe:
            for i in todo:
                script, args = calls[i]
                if script is None:
                    pipe.execute_command(*args)
                else:
                    pipe.execute_command("EVALSHA", script.sha, *args)
            answered = await pipe.execute(raise_on_error=False)
        refused: list[int] = []
        for i, reply in zip(todo, answered, strict=True):
            if isinstance(reply, NoScriptError):
                refused.append(i)
            else:
                replies[i] = reply
        if not refused:
            return replies
        for script in {id(s): s for s, _ in (calls[i] for i in refused) if s is not None}.values():
            script.sha = await redis.script_load(script.script)
        todo = refused
    for i in todo:
        replies[i] = NoScriptError("the script cache kept refusing a script")
    return replies


class Pipeliner:
    """Redis calls made during one turn of the event loop go out together, as one pipeline.

    Each call costs redis-py a pooled connection taken and given back, a
    timeout armed, a write and a read; a worker makes several per job, and
    its concurrent jobs make them at about the same moments. Calls queue here
    until the loop comes round, then go out as one pipeline (a lone call as a
    plain call, which is cheaper); while `max_in_flight` pipelines are on
    their way, new calls wait for the next one. Each call gets its own reply
    or error; a connection error goes to every call of its pipeline.
    Calls from one task run in the order it made them, as it awaits each.
    """

    def __init__(
        self, redis: aioredis.Redis, *, max_in_flight: int = 4, max_batch: int = 256
    ) -> None:
        self.redis = redis
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._queue: list[tuple[Call, asyncio.Future[Any]]] = []
        self._in_flight = 0
        self._flush_due = False
        self._sending: set[asyncio.Task[None]] = set()  # held so they are not collected mid-way

    async def script(self, script: AsyncScript, keys: Sequence[Any], args: Sequence[Any]) -> Reply:
        """Run `script` (EVALSHA, reloaded after NOSCRIPT) with the next pipeline."""
        return await self._call((script, (len(keys), *keys, *args)))

    async def command(self, *args: str | bytes | float) -> Reply:
        """Run one command (`"MGET", key, ...`) with the next pipeline."""
        return await self._call((None, args))

    async def _call(self, call: Call) -> Reply:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._queue.append((call, future))
        if not self._flush_due and self._in_flight < self._max_in_flight:
            # At the end of this turn, not now: let the other tasks woken in it add theirs.
            self._flush_due = True
            loop.call_soon(self._flush)
        return await future

    def _flush(self) -> None:
        self._flush_due = False
        while self._queue and self._in_flight < self._max_in_flight:
            batch = self._queue[: self._max_batch]
            del self._queue[: self._max_batch]
            self._in_flight += 1
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[Call, asyncio.Future[Any]]]) -> None:
        try:
            if len(batch) == 1:
                (script, args), future = batch[0]
                replies = [await self._send_one(script, args)]
            else:
                replies = await send_pipelined(self.redis, [call for call, _ in batch])
        except asyncio.CancelledError:
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:  # noqa: BLE001 - handed to every caller of the batch
            replies = [exc] * len(batch)
        finally:
            self._in_flight -= 1
            if self._queue and not self._flush_due:
                self._flush_due = True
                asyncio.get_running_loop().call_soon(self._flush)
        for (_, future), reply in zip(batch, replies, strict=True):
            if future.done():  # its caller was cancelled meanwhile
                continue
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _send_one(self, script: AsyncScript | None, args: tuple[Any, ...]) -> Reply:
        if script is None:
            return await self.redis.execute_command(*args)  # type: ignore[no-untyped-call]
        numkeys = args[0]
        # AsyncScript reloads itself after NOSCRIPT.
        return await script(keys=list(args[1 : 1 + numkeys]), args=list(args[1 + numkeys :]))

    async def aclose(self) -> None:
        """Wait until every queued call is answered (before the Redis client is closed)."""
        while self._sending or self._flush_due or self._queue:
            if self._sending:
                await asyncio.gather(*self._sending, return_exceptions=True)
            else:
                await asyncio.sleep(0)  # a flush is due this turn: let it start its batch


def new_id(prefix: str) -> str:
    """A ULID-style id: 48 bits of milliseconds then 80 random bits, Crockford base32.

    Ids sort by creation time as plain strings, which is what lets the job
    indexes be lexicographic sorted sets with stable cursors.
    """
    global _last_id  # noqa: PLW0603 - the generator's own state, as ULID's monotonic mode has
    value = max((time.time_ns() // 1_000_000) << 80 | secrets.randbits(80), _last_id + 1)
    _last_id = value
    return prefix + _base32(value, 26)


def time_prefix(moment: datetime) -> str:
    """The first 10 characters of every id made at `moment`: ids made before sort below it."""
    return _base32(int(moment.timestamp() * 1000), 10)


def _base32(value: int, width: int) -> str:
    chars = []
    for _ in range(width):
        chars.append(_CROCKFORD[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def text(value: bytes | str | int | None) -> str:
    """A Redis reply as text (the pool does not decode, so bodies stay exact bytes)."""
    if value is None:
        return ""
    return value.decode() if isinstance(value, bytes) else str(value)
