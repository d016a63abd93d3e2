"""`REDIS_URL=redis+sentinel://…`: the master is found through a real Sentinel."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from service.localredis import LocalRedis, find_redis_server, free_port
from service.store.connection import SentinelAddress, connect, parse_sentinel_url
from tests.support import wait_for


@pytest.fixture(scope="module")
async def sentinel_port(redis_server: LocalRedis, tmp_path_factory) -> AsyncIterator[int]:
    """A `redis-server --sentinel` watching the session's server as master `rcg`."""
    port = free_port()
    folder: Path = tmp_path_factory.mktemp("sentinel")
    conf = folder / "sentinel.conf"  # Sentinel rewrites its own config file: a private copy
    conf.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {folder}\n"
        f"sentinel monitor rcg 127.0.0.1 {redis_server.port} 1\n"
    )
    process = await asyncio.create_subprocess_exec(
        find_redis_server(),
        str(conf),
        "--sentinel",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    client = aioredis.Redis(host="127.0.0.1", port=port, socket_timeout=1)

    async def answers() -> bool:
        assert process.returncode is None, "redis-server --sentinel exited"
        try:
            return bool(await client.ping())
        except RedisConnectionError:
            return False

    try:
        await wait_for(answers, timeout=10)
        yield port
    finally:
        await client.aclose()
        process.terminate()
        await process.wait()


async def test_a_sentinel_url_reaches_the_master_it_names(redis, keys, sentinel_port):
    """Writes through `redis+sentinel://host:port/rcg` land on the master Sentinel names."""
    client = connect(f"redis+sentinel://127.0.0.1:{sentinel_port}/rcg")
    try:
        await client.set(f"{keys.prefix}:via-sentinel", "yes")
        assert await redis.get(f"{keys.prefix}:via-sentinel") == b"yes"
    finally:
        await client.aclose()


async def test_a_master_sentinel_does_not_know_is_a_connection_error(sentinel_port):
    """An unknown master fails as Redis being down does (the API answers 503, loops back off)."""
    client = connect(f"redis+sentinel://127.0.0.1:{sentinel_port}/nosuchmaster")
    try:
        with pytest.raises(RedisConnectionError):
            await client.ping()
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("url", "address"),
    [
        ("redis+sentinel://s1/m", SentinelAddress([("s1", 26379)], "m")),
        (
            "redis+sentinel://:pw@s1:5000,[::1]:5001,s3/m/2",
            SentinelAddress([("s1", 5000), ("::1", 5001), ("s3", 26379)], "m", 2, None, "pw"),
        ),
        ("redis+sentinel://u:p%40ss@s1/m", SentinelAddress([("s1", 26379)], "m", 0, "u", "p@ss")),
    ],
)
def test_a_sentinel_url_names_its_sentinels_master_database_and_credentials(url, address):
    """Hosts default to port 26379; user, password and database are the master's."""
    assert parse_sentinel_url(url) == address
