"""Measure status-poll throughput of candidate HTTP clients against the emulator.

Run ``python tests/bench/bench_http_clients.py [--requests N] [--concurrency C]``.
The emulator runs in instant mode in its own process (as RunComfy would be
elsewhere), so the figures are the client's cost, not the server's; each
client makes the same bounded number of ``GET /v1/requests/{id}/status``
calls with ``--concurrency`` in flight and must get 200 every time.
"""

import argparse
import asyncio
import contextlib
import importlib.util
import logging
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import httpx

from service.runcomfy.client import RunComfyClient, create_upstream_session
from service.runcomfy.emulator import MODEL

logger = logging.getLogger(__name__)

TOKEN = "bench"  # noqa: S105 -- the emulator runs without a token; any Bearer will do
Call = Callable[[], Awaitable[None]]
EMULATOR_CODE = (
    "import logging; logging.basicConfig(level=logging.INFO);"
    "from service.runcomfy.emulator import EmulatorConfig, run_emulator;"
    "run_emulator(EmulatorConfig(queue_s=0, run_s=0), '127.0.0.1', 0)"
)


@contextlib.asynccontextmanager
async def emulator_process() -> AsyncIterator[str]:
    """Run the emulator in a child process and yield its base URL."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", EMULATOR_CODE, stderr=subprocess.PIPE
    )
    try:
        assert process.stderr is not None
        line = await asyncio.wait_for(process.stderr.readline(), timeout=30)
        found = re.search(rb"listening on (http://\S+)", line)
        if found is None:
            raise RuntimeError(f"emulator did not start: {line!r}")
        yield found.group(1).decode()
    finally:
        process.terminate()
        await process.wait()


async def measure(call: Call, requests: int, concurrency: int) -> float:
    """Make ``requests`` calls with ``concurrency`` in flight; return calls per second."""
    for _ in range(min(200, requests)):  # warm the pool and the code paths
        await call()
    remaining = requests

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await call()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return requests / (time.perf_counter() - started)


def httpx_call(client: httpx.AsyncClient, url: str) -> Call:
    async def call() -> None:
        response = await client.get(url, headers={"Authorization": f"Bearer {TOKEN}"})
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}")

    return call


def aiohttp_call(session: aiohttp.ClientSession, url: str) -> Call:
    async def call() -> None:
        async with session.get(url, headers={"Authorization": f"Bearer {TOKEN}"}) as response:
            await response.read()
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status}")

    return call


def client_call(client: RunComfyClient, request_id: str) -> Call:
    async def call() -> None:
        if (await client.status(request_id)).status != "completed":
            raise RuntimeError("unexpected status")

    return call


async def run(requests: int, concurrency: int) -> list[tuple[str, str]]:
    """Measure every client, each on a fresh pool; return (name, figure or note) rows."""
    rows: list[tuple[str, str]] = []

    async def record(name: str, call: Call) -> None:
        rate = await measure(call, requests, concurrency)
        rows.append((name, f"{rate:,.0f}"))
        logger.info("%s: %.0f req/s", name, rate)

    async with emulator_process() as base_url:
        async with create_upstream_session() as session:
            submitted = await RunComfyClient(session, base_url, TOKEN).submit(
                MODEL, b'{"prompt": "p", "video_url": "https://a/b"}'
            )
        request_id = submitted.request_id
        assert request_id is not None
        status_url = f"{base_url}/v1/requests/{request_id}/status"

        async with httpx.AsyncClient() as httpx_client:
            await record("httpx.AsyncClient (default pool)", httpx_call(httpx_client, status_url))

        if importlib.util.find_spec("httpx_aiohttp") is None:
            rows.append(("httpx + httpx-aiohttp transport", "skipped: not installed"))
        else:
            from httpx_aiohttp import AiohttpTransport  # noqa: PLC0415 -- optional

            async with httpx.AsyncClient(transport=AiohttpTransport()) as bridged:
                await record("httpx + httpx-aiohttp transport", httpx_call(bridged, status_url))

        async with aiohttp.ClientSession() as plain:
            await record("aiohttp.ClientSession (plain)", aiohttp_call(plain, status_url))
        async with create_upstream_session() as session:
            await record("aiohttp, create_upstream_session", aiohttp_call(session, status_url))
        async with create_upstream_session() as session:
            client = RunComfyClient(session, base_url, TOKEN)
            await record("RunComfyClient.status (decoded)", client_call(client, request_id))
    return rows


def main() -> None:
    """Parse arguments, run the benchmark and print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=3000, help="calls per client")
    parser.add_argument("--concurrency", type=int, default=50, help="calls in flight")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    rows = asyncio.run(run(args.requests, args.concurrency))
    width = max(len(name) for name, _ in rows)
    print(f"GET status, {args.requests} calls per client, {args.concurrency} in flight")
    print(f"{'client':<{width}}  req/s")
    print(f"{'-' * width}  ------")
    for name, figure in rows:
        print(f"{name:<{width}}  {figure}")


if __name__ == "__main__":
    main()
