"""The built-in emulator in its own process, counting the calls it answers, for the benchmarks.

`python tests/bench/counted_emulator.py --port P --queue-s 0 --run-s 0` serves
`service.runcomfy.emulator` unchanged, plus `GET /_bench/counts`: how many
submit, status, result and cancel calls it has answered (the emulator itself
counts only submits), and `GET /_bench/gaps`: the time between consecutive
status polls of one request (p50, p99, max, n) and how many requests were
polled at all since the last such call, which tells whether the jobs are
polled on schedule. It runs on uvloop, as `runcomfy-gateway emulator` does.
"""

import argparse
import asyncio
import json
import signal
import time
from collections import Counter

import uvloop
from litestar.types import ASGIApp, Receive, Scope, Send

from service.runcomfy.emulator import EmulatorConfig, create_emulator_app
from service.serving import listen, serve


def kind_of(path: str) -> str:
    """Which RunComfy call a path is."""
    if path.startswith("/v1/models/"):
        return "submit"
    if path.startswith("/v1/requests/"):
        return path.rsplit("/", 1)[-1]
    return "other"


def nearest_rank(ordered: list[float], p: float) -> float:
    """The p-th percentile (nearest rank) of sorted values; 0 for none."""
    if not ordered:
        return 0.0
    return ordered[min(len(ordered), max(1, round(p / 100 * len(ordered) + 0.5))) - 1]


class PollGaps:
    """Seconds between consecutive status polls of each request."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.gaps: list[float] = []
        self.polled_ids: set[str] = set()

    def polled(self, path: str) -> None:
        now = time.monotonic()
        request_id = path.rsplit("/", 2)[-2]
        previous = self.last.get(request_id)
        self.last[request_id] = now
        self.polled_ids.add(request_id)
        if previous is not None:
            self.gaps.append(now - previous)

    def take(self) -> dict[str, float]:
        """Percentiles of the gaps seen since the last call, which starts a new window."""
        ordered = sorted(self.gaps)
        polled = len(self.polled_ids)
        self.gaps, self.polled_ids = [], set()
        summary = {f"p{p}": nearest_rank(ordered, p) for p in (50, 99, 100)}
        return {**summary, "n": len(ordered), "requests": polled}


def counted_app(config: EmulatorConfig) -> ASGIApp:
    """The emulator's app, counting the calls it answers, and answering `/_bench/*`."""
    counts: Counter[str] = Counter()
    gaps = PollGaps()
    app = create_emulator_app(config)

    async def answer(send: Send, value: object) -> None:
        body = json.dumps(value).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def counted(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
        elif scope["path"] == "/_bench/counts":
            await answer(send, counts)
        elif scope["path"] == "/_bench/gaps":
            await answer(send, gaps.take())
        else:
            await app(scope, receive, send)
            kind = kind_of(scope["path"])
            counts[kind] += 1
            if kind == "status":
                gaps.polled(scope["path"])

    return counted


async def run(config: EmulatorConfig, port: int) -> None:
    served = await serve(counted_app(config), listen("127.0.0.1", port), keep_alive_s=75)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await served.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--queue-s", type=float, default=0.0)
    parser.add_argument("--run-s", type=float, default=0.0)
    args = parser.parse_args()
    uvloop.run(run(EmulatorConfig(queue_s=args.queue_s, run_s=args.run_s), args.port))


if __name__ == "__main__":
    main()
