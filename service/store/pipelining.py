"""Many tasks' Redis calls sent together: one write per turn of the event loop, one connection.

redis-py spends ~150 us of CPU on a lone call and ~35 us on each call of a
pipeline (a pooled connection taken and given back, a timeout armed for each
reply, each reply passed up through several layers), and a worker makes
several calls per job. A `Pipeliner` keeps one connection of its own: every
call queued during a turn of the event loop goes out in one write, replies
are parsed in C (hiredis) as they arrive and handed to their callers in
order, so a call costs a few us. Redis runs the calls of one connection in
the order they were written, so one task's calls run in the order it made them.

Failures reach callers as redis-py's do, so the loops' handling is unchanged:

    ResponseError        Redis answered this call with an error (only this call:
                          the others of its write are unaffected)
     └── NoScriptError   NOSCRIPT: `script` loads the script and sends the call again
    ConnectionError      no connection, or it was lost: every call written on it
                          and not yet answered; the next call opens a new one
    TimeoutError         no reply within the socket timeout: the connection is
                          dropped, as above

A call that was written may have run even when its caller sees an error (as
with any client); one whose caller was cancelled before the write is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections import deque
from collections.abc import Sequence
from typing import Any, Final, TypeAlias

import hiredis
import redis.asyncio as aioredis
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.commands.core import AsyncScript
from redis.exceptions import AuthenticationError, NoScriptError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

Reply: TypeAlias = Any
"""What Redis answered; its shape depends on the command or script that was sent."""
Arg: TypeAlias = str | bytes | float
DEFAULT_TIMEOUT_S: Final = 5.0
_PENDING: Final = object()  # hiredis' answer while a reply is incomplete


class _Connection(asyncio.Protocol):
    """One connection: writes packed commands, resolves one future per reply, in order."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader(replyError=ResponseError, notEnoughData=_PENDING)
        self.transport: asyncio.Transport | None = None
        self.waiting: deque[asyncio.Future[Reply]] = deque()
        self.lost = False
        self.progress_at = 0.0  # loop time of the last reply, or of a write after a quiet spell

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport to write to."""
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        """Hand each complete reply to the oldest waiting call."""
        self._reader.feed(data)
        answered = False
        while self.waiting:
            reply = self._reader.gets()
            if reply is _PENDING:
                break
            answered = True
            future = self.waiting.popleft()
            if not future.done():  # its caller was cancelled meanwhile
                future.set_result(reply)
        if answered:
            self.progress_at = asyncio.get_running_loop().time()

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail every call still waiting for its reply."""
        self.fail(RedisConnectionError(f"connection to Redis lost ({exc or 'closed'})"))

    def send(self, packed: bytes, futures: list[asyncio.Future[Reply]]) -> None:
        """Write commands whose replies go to `futures`, in order."""
        if not self.waiting:
            self.progress_at = asyncio.get_running_loop().time()
        self.waiting.extend(futures)
        if self.transport is not None:
            self.transport.write(packed)

    def fail(self, error: RedisError) -> None:
        """Drop the connection and give `error` to every call waiting on it."""
        self.lost = True
        if self.transport is not None:
            self.transport.abort()
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(error)


class Pipeliner:
    """Redis calls of concurrent tasks, sent together on one connection of its own.

    It takes the server, credentials, database, TLS and timeouts of `redis`'s
    pool (the client built by `connection.connect`) and opens its connection
    on first use. Call `aclose` before the event loop ends.
    """

    def __init__(self, redis: aioredis.Redis) -> None:
        pool = redis.connection_pool
        self._connection_class = pool.connection_class
        self._settings: dict[str, Any] = dict(pool.connection_kwargs)
        self._timeout_s = float(self._settings.get("socket_timeout") or DEFAULT_TIMEOUT_S)
        self._connect_timeout_s = float(
            self._settings.get("socket_connect_timeout") or self._timeout_s
        )
        self._queue: list[tuple[bytes, asyncio.Future[Reply]]] = []
        self._flush_due = False
        self._connection: _Connection | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._watchdog: asyncio.TimerHandle | None = None

    async def script(self, script: AsyncScript, keys: Sequence[Arg], args: Sequence[Arg]) -> Reply:
        """Run `script` by its digest; after NOSCRIPT (a flushed cache) load it and run it again."""
        command = ("EVALSHA", script.sha, len(keys), *keys, *args)
        try:
            return await self._call(command)
        except NoScriptError:
            # NOSCRIPT means it did not run: sending it again cannot run it twice.
            source = script.script
            await self._call(
                ("SCRIPT", "LOAD", source if isinstance(source, str) else bytes(source))
            )
            return await self._call(command)

    async def command(self, *args: Arg) -> Reply:
        """Run one command, e.g. `command("MGET", key, ...)`."""
        return await self._call(args)

    async def _call(self, command: tuple[Arg, ...]) -> Reply:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._queue.append((hiredis.pack_command(command), future))  # type: ignore[arg-type]
        if not self._flush_due:
            # At the end of this turn, not now: the other tasks woken in it add theirs first.
            self._flush_due = True
            loop.call_soon(self._flush)
        reply = await future
        if isinstance(reply, ResponseError):
            if str(reply).startswith("NOSCRIPT"):
                raise NoScriptError(str(reply))
            raise reply
        return reply

    def _flush(self) -> None:
        self._flush_due = False
        connection = self._connection
        if connection is None or connection.lost:
            if self._connecting is None:
                self._connecting = asyncio.get_running_loop().create_task(self._connect())
            return  # the connection, once open, sends what is queued
        # A call whose caller was cancelled before its write is not sent at all.
        batch = [(packed, future) for packed, future in self._queue if not future.done()]
        self._queue = []
        if batch:
            connection.send(b"".join(packed for packed, _ in batch), [f for _, f in batch])
            if self._watchdog is None:
                self._watchdog = asyncio.get_running_loop().call_later(
                    self._timeout_s, self._check_progress
                )

    def _check_progress(self) -> None:
        """Drop the connection when calls wait and no reply came for the socket timeout."""
        self._watchdog = None
        connection = self._connection
        if connection is None or connection.lost or not connection.waiting:
            return
        loop = asyncio.get_running_loop()
        quiet_s = loop.time() - connection.progress_at
        if quiet_s >= self._timeout_s:
            connection.fail(RedisTimeoutError(f"no reply from Redis within {self._timeout_s:g}s"))
        else:
            self._watchdog = loop.call_later(self._timeout_s - quiet_s, self._check_progress)

    async def _connect(self) -> None:
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                connection = await self._open()
        except (OSError, TimeoutError, RedisError) as exc:
            error = RedisConnectionError(f"cannot connect to Redis ({type(exc).__name__}: {exc})")
            queued, self._queue = self._queue, []
            for _, future in queued:
                if not future.done():
                    future.set_exception(error)
        else:
            self._connection = connection
            self._flush()
        finally:
            self._connecting = None

    async def _open(self) -> _Connection:
        """A new connection, authenticated and on the right database."""
        loop = asyncio.get_running_loop()
        settings = self._settings
        if issubclass(self._connection_class, UnixDomainSocketConnection):
            _, connection = await loop.create_unix_connection(_Connection, settings["path"])
        else:
            host, port = settings.get("host", "localhost"), settings.get("port", 6379)
            tls = None
            if issubclass(self._connection_class, SSLConnection):
                tls = self._connection_class(**settings).ssl_context.get()
            _, connection = await loop.create_connection(
                _Connection, host, port, ssl=tls, server_hostname=host if tls else None
            )
            sock = connection.transport.get_extra_info("socket") if connection.transport else None
            if sock is not None and settings.get("socket_keepalive"):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        try:
            await self._handshake(connection)
        except BaseException:
            connection.fail(RedisConnectionError("handshake failed"))
            raise
        return connection

    async def _handshake(self, connection: _Connection) -> None:
        settings = self._settings
        commands: list[tuple[Arg, ...]] = []
        if settings.get("password"):
            user = (settings["username"],) if settings.get("username") else ()
            commands.append(("AUTH", *user, settings["password"]))
        if settings.get("db"):
            commands.append(("SELECT", settings["db"]))
        if not commands:
            return
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Reply]] = [loop.create_future() for _ in commands]
        connection.send(b"".join(hiredis.pack_command(c) for c in commands), futures)  # type: ignore[arg-type]
        for (name, *_), reply in zip(commands, await asyncio.gather(*futures), strict=True):
            if isinstance(reply, ResponseError):
                kind = AuthenticationError if name == "AUTH" else RedisConnectionError
                raise kind(f"Redis refused {name!s}: {reply}")

    async def aclose(self) -> None:
        """Wait for the calls made so far to be answered, then close the connection."""
        while True:
            if self._connecting is not None:
                await asyncio.gather(self._connecting, return_exceptions=True)
            elif self._queue or self._flush_due:
                await asyncio.sleep(0)  # a flush is due this turn: let it write them
            else:
                break
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(RedisError):
                await asyncio.gather(*connection.waiting, return_exceptions=True)
            if connection.transport is not None:
                connection.transport.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
