"""Shared fixtures: one private redis-server per test session, a key prefix per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from service.config import Settings
from service.localredis import LocalRedis, free_port
from service.runcomfy.emulator import EmulatorConfig, start_emulator
from service.serving import Served
from service.store.connection import connect
from service.store.deliveries import DeliveryStore
from service.store.jobs import JobStore
from service.store.keys import Keys
from service.store.schedules import Schedules
from tests.support import BILLING, ORDERS, Receiver, S3Server, StartEmulator, serve_api


@pytest.fixture(scope="session")
def redis_server() -> Iterator[LocalRedis]:
    """A real redis-server on a free port, never the shared one on 6379."""
    with LocalRedis() as server:
        yield server


@pytest.fixture
def keys() -> Keys:
    """A key prefix of this test's own, so tests never see each other's data."""
    return Keys(prefix="{t" + uuid.uuid4().hex[:12] + "}")


@pytest.fixture
async def redis(redis_server: LocalRedis) -> AsyncIterator[aioredis.Redis]:
    client = connect(redis_server.url)
    yield client
    await client.aclose()


# The in-process API and its stores, for a module that defines `settings` (tenants
# `ORDERS` and `BILLING` among them).


@pytest.fixture
async def api(settings: Settings, keys: Keys) -> AsyncIterator[Any]:
    """The API in this process, called as `ORDERS`."""
    async with serve_api(settings, keys, ORDERS.api_key) as client:
        yield client


@pytest.fixture
async def other(settings: Settings, keys: Keys) -> AsyncIterator[Any]:
    """The same API, called as `BILLING`."""
    async with serve_api(settings, keys, BILLING.api_key) as client:
        yield client


@pytest.fixture
def jobs(redis: aioredis.Redis, keys: Keys, settings: Settings) -> JobStore:
    return JobStore(redis, keys, retention_s=settings.job_retention_s)


@pytest.fixture
def deliveries(redis: aioredis.Redis, keys: Keys, settings: Settings) -> DeliveryStore:
    return DeliveryStore(redis, keys, retention_s=settings.job_retention_s)


@pytest.fixture
def schedules(redis: aioredis.Redis, keys: Keys) -> Schedules:
    return Schedules(redis, keys, lease_s=30)


@pytest.fixture
async def emulator() -> AsyncIterator[StartEmulator]:
    """Start real emulator servers on free ports (fast timings by default); stop them after."""
    servers: list[Served] = []

    async def start(**fields: Any) -> str:
        config = EmulatorConfig(**{"queue_s": 0.2, "run_s": 0.2, "seed": 7, **fields})
        served = await start_emulator(config)
        servers.append(served)
        return served.url

    yield start
    for served in servers:
        await served.stop()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A real webhook receiver on 127.0.0.1 that answers 200."""
    r = await Receiver().start()
    yield r
    await r.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """A real S3-compatible HTTP server (moto's) as a process on a free port."""
    server = S3Server(port=free_port(), log=tmp_path_factory.mktemp("s3") / "moto.log").start()
    yield server
    server.stop()
