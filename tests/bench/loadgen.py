"""A load generator in its own process, so its CPU is not the measured process's.

`python tests/bench/loadgen.py --url U [--urls-file F] [--method POST --body-file B
--header 'K: V'] --concurrency C --duration S --warmup W [--requests N] [--ids-out F]
[--client aiohttp|httpx]` keeps C requests in flight for W seconds (not counted),
then for S seconds (or, with `--requests`, until N requests were answered: a
burst), cycling through the URLs, and prints one JSON line: requests, seconds,
rate, latency p50/p99 (ms), its own CPU use (% of one core) and the answers'
statuses. `--ids-out` writes the `id` of each 2xx JSON answer to F (a burst of
submits whose webhooks are then awaited).

aiohttp is the default client because httpx would bound the figures: against
the bare Litestar app of benchmark A, 50 connections, httpx sends about 200
requests/s at a full core where aiohttp sends thousands (A prints both).
"""

import argparse
import asyncio
import contextlib
import itertools
import json
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import httpx
import uvloop

Send = Callable[[str, bytes | None], Awaitable[tuple[int, bytes]]]
"""Send one request (URL, body) and read the whole answer; its status and body."""


@contextlib.asynccontextmanager
async def aiohttp_sender(
    method: str, headers: dict[str, str], concurrency: int
) -> AsyncIterator[Send]:
    import aiohttp  # noqa: PLC0415 - only with --client aiohttp (the `bench` extra)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send(url: str, body: bytes | None) -> tuple[int, bytes]:
            async with session.request(method, url, data=body, headers=headers) as answer:
                return answer.status, await answer.read()

        yield send


@contextlib.asynccontextmanager
async def httpx_sender(
    method: str, headers: dict[str, str], concurrency: int
) -> AsyncIterator[Send]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=30, trust_env=False) as client:

        async def send(url: str, body: bytes | None) -> tuple[int, bytes]:
            answer = await client.request(method, url, content=body, headers=headers)
            return answer.status_code, answer.content

        yield send


SENDERS = {"aiohttp": aiohttp_sender, "httpx": httpx_sender}


async def load(args: argparse.Namespace) -> dict[str, object]:
    urls = [args.url] if args.url else Path(args.urls_file).read_text().split()
    next_url = itertools.cycle(urls).__next__
    body = Path(args.body_file).read_bytes() if args.body_file else None
    headers = dict(h.split(": ", 1) for h in args.header)
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    ids: list[str] = []
    counting = False
    left = args.requests or -1  # requests still to send in a burst; -1: no count, a duration
    async with SENDERS[args.client](args.method, headers, args.concurrency) as send:

        async def worker(until: float) -> None:
            nonlocal left
            while time.monotonic() < until and left != 0:
                if counting and left > 0:
                    left -= 1
                sent = time.perf_counter()
                status, answer = await send(next_url(), body)
                if counting:
                    latencies.append(time.perf_counter() - sent)
                    statuses[status] += 1
                    if args.ids_out and status < 300:
                        ids.append(json.loads(answer)["id"])

        warm_until = time.monotonic() + args.warmup
        await asyncio.gather(*(worker(warm_until) for _ in range(args.concurrency)))
        counting = True
        started = time.monotonic()
        cpu_started = time.process_time()
        until = started + (3600 if args.requests else args.duration)
        await asyncio.gather(*(worker(until) for _ in range(args.concurrency)))
        seconds = time.monotonic() - started
        cpu = time.process_time() - cpu_started
    total = sum(statuses.values())
    latencies.sort()
    if args.ids_out:
        Path(args.ids_out).write_text("\n".join(ids))
    return {
        "requests": total,
        "seconds": seconds,
        "rate": total / seconds,
        "p50_ms": 1000 * _nearest_rank(latencies, 50),
        "p99_ms": 1000 * _nearest_rank(latencies, 99),
        "cpu_percent": 100 * cpu / seconds,
        "statuses": {str(k): v for k, v in statuses.items()},
        "max_ms": 1000 * latencies[-1] if latencies else None,
    }


def _nearest_rank(ordered: list[float], p: float) -> float:
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered), max(1, round(p / 100 * len(ordered) + 0.5))) - 1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url")
    parser.add_argument("--urls-file")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--body-file")
    parser.add_argument("--header", action="append", default=[])
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--requests", type=int, default=0, help="a burst: stop after N requests")
    parser.add_argument("--client", choices=sorted(SENDERS), default="aiohttp")
    parser.add_argument("--ids-out", help="write the `id` of each 2xx JSON answer here")
    args = parser.parse_args()
    result = uvloop.run(load(args))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
