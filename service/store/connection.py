"""Opening Redis: one pool per process, with timeouts and keepalive on every socket."""

from __future__ import annotations

import secrets
import time
from typing import Any, Final

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import EqualJitterBackoff
from redis.exceptions import (
    ClusterDownError,
    MasterDownError,
    ReadOnlyError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

try:
    from redis.driver_info import DriverInfo

    # Built once: left to redis-py, every new connection looks its version up
    # in the package metadata again (0.4-2 ms each, felt in a burst).
    _DRIVER: dict[str, Any] = {"driver_info": DriverInfo()}
except ImportError:  # redis-py before 7.1 has no DriverInfo
    _DRIVER = {}

REDIS_UNAVAILABLE: Final = (
    RedisConnectionError,  # refused, reset, closed; also BusyLoadingError after a restart
    RedisTimeoutError,
    ReadOnlyError,  # a replica during a failover
    TryAgainError,
    ClusterDownError,
    MasterDownError,
)
"""Redis errors that mean "not now" (outage, failover, loading), not a bug: the API answers
them 503, the worker logs an outage once."""

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


def new_id(prefix: str) -> str:
    """A ULID-style id: 48 bits of milliseconds then 80 random bits, Crockford base32.

    Ids sort by creation time as plain strings, which is what lets the job
    indexes be lexicographic sorted sets with stable cursors.
    """
    global _last_id  # noqa: PLW0603 - the generator's own state, as ULID's monotonic mode has
    value = max((time.time_ns() // 1_000_000) << 80 | secrets.randbits(80), _last_id + 1)
    _last_id = value
    return prefix + _base32(value, 26)


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
