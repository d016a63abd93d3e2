"""An aiohttp load generator in its own process, so its CPU is not the measured process's.

`python tests/bench/loadgen.py --url U [--urls-file F] [--method POST --body-file B
--header 'K: V'] --concurrency C --duration S --warmup W [--requests N]` keeps C
requests in flight for W seconds (not counted), then for S seconds (or, with
`--requests`, until N requests were answered: a burst), cycling through the
URLs, and prints one JSON line: requests, seconds, rate, latency p50/p99 (ms),
its own CPU use (% of one core) and the answers' statuses. Used where
`wrk` is not installed, and for the raw status-poll ceiling of benchmark C.
"""

import argparse
import asyncio
import itertools
import json
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import uvloop


async def load(args: argparse.Namespace) -> dict[str, object]:
    urls = [args.url] if args.url else Path(args.urls_file).read_text().split()
    next_url = itertools.cycle(urls).__next__
    body = Path(args.body_file).read_bytes() if args.body_file else None
    headers = dict(h.split(": ", 1) for h in args.header)
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    counting = False
    left = args.requests or -1  # requests still to send in a burst; -1: no count, a duration
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(until: float) -> None:
            nonlocal left
            while time.monotonic() < until and left != 0:
                if counting and left > 0:
                    left -= 1
                sent = time.perf_counter()
                async with session.request(
                    args.method, next_url(), data=body, headers=headers
                ) as answer:
                    await answer.read()
                if counting:
                    latencies.append(time.perf_counter() - sent)
                    statuses[answer.status] += 1
                    latencies.append(time.perf_counter() - sent)

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
    return {
        "requests": total,
        "seconds": seconds,
        "rate": total / seconds,
        "p50_ms": 1000 * _nearest_rank(latencies, 50),
        "p99_ms": 1000 * _nearest_rank(latencies, 99),
        "cpu_percent": 100 * cpu / seconds,
        "statuses": {str(k): v for k, v in statuses.items()},
        **{
            f"p{p}_ms": 1000 * latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))]
            for p in (50, 99)
            if latencies
        },
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
    args = parser.parse_args()
    result = uvloop.run(load(args))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
