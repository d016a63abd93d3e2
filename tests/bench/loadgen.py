"""An aiohttp load generator in its own process, so its CPU is not the measured process's.

`python tests/bench/loadgen.py --url U [--urls-file F] [--method POST --body-file B
--header 'K: V'] --concurrency C --duration S --warmup W` keeps C requests in
flight for W seconds (not counted), then for S seconds, cycling through the
URLs, and prints one JSON line: requests, seconds, rate, its own CPU use
(% of one core) and the answers' statuses. Used where
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
    counting = False
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(until: float) -> None:
            while time.monotonic() < until:
                async with session.request(
                    args.method, next_url(), data=body, headers=headers
                ) as answer:
                    await answer.read()
                if counting:
                    statuses[answer.status] += 1

        warm_until = time.monotonic() + args.warmup
        await asyncio.gather(*(worker(warm_until) for _ in range(args.concurrency)))
        counting = True
        started = time.monotonic()
        cpu_started = time.process_time()
        until = started + args.duration
        await asyncio.gather(*(worker(until) for _ in range(args.concurrency)))
        seconds = time.monotonic() - started
        cpu = time.process_time() - cpu_started
    total = sum(statuses.values())
    return {
        "requests": total,
        "seconds": seconds,
        "rate": total / seconds,
        "cpu_percent": 100 * cpu / seconds,
        "statuses": {str(k): v for k, v in statuses.items()},
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
    args = parser.parse_args()
    result = uvloop.run(load(args))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
