"""An aiohttp load generator in its own process, so its CPU is not the measured process's.

`python tests/bench/loadgen.py --url U [--urls-file F] [--method POST --body-file B
--header 'K: V'] --concurrency C --duration S --warmup W` keeps C requests in
flight for W seconds (not counted), then for S seconds, cycling through the
URLs, and prints one JSON line: requests, seconds, rate, its own CPU use
(% of one core), the answers' statuses and latency percentiles (ms). With
`--requests N` it sends exactly N requests after the warm-up instead (a burst).
Used where `wrk` is not installed, and for the raw status-poll ceiling of
benchmark C.
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
    left = args.requests
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(until: float) -> None:
            nonlocal left
            while time.monotonic() < until:
                if counting and args.requests:
                    if not left:
                        return
                    left -= 1
                sent = time.perf_counter()
                async with session.request(
                    args.method, next_url(), data=body, headers=headers
                ) as answer:
                    await answer.read()
                if counting:
                    statuses[answer.status] += 1
                    latencies.append(time.perf_counter() - sent)

        warm_until = time.monotonic() + args.warmup
        await asyncio.gather(*(worker(warm_until) for _ in range(args.concurrency)))
        counting = True
        started = time.monotonic()
        cpu_started = time.process_time()
        until = started + (args.duration if not args.requests else 3600.0)
        await asyncio.gather(*(worker(until) for _ in range(args.concurrency)))
        seconds = time.monotonic() - started
        cpu = time.process_time() - cpu_started
    total = sum(statuses.values())
    latencies.sort()
    return {
        "requests": total,
        "seconds": seconds,
        "rate": total / seconds,
        "cpu_percent": 100 * cpu / seconds,
        "statuses": {str(k): v for k, v in statuses.items()},
        **{
            f"p{p}_ms": 1000 * latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))]
            for p in (50, 99)
            if latencies
        },
        "max_ms": 1000 * latencies[-1] if latencies else None,
    }


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
    parser.add_argument("--requests", type=int, default=0, help="send exactly N, then stop")
    args = parser.parse_args()
    result = uvloop.run(load(args))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
