"""The built-in emulator in its own process, counting the calls it answers, for the benchmarks.

`python tests/bench/counted_emulator.py --port P --queue-s 0 --run-s 0` serves
`service.runcomfy.emulator` unchanged, plus `GET /_bench/counts`: how many
submit, status, result and cancel calls it has answered (the emulator itself
counts only submits). It runs on uvloop, as `runcomfy-gateway emulator` does.
"""

import argparse
import asyncio
import signal
from collections import Counter
from collections.abc import Awaitable, Callable

import uvloop
from aiohttp import web

from service.runcomfy.emulator import EmulatorConfig, create_emulator_app

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def kind_of(path: str) -> str:
    """Which RunComfy call a path is."""
    if path.startswith("/v1/models/"):
        return "submit"
    if path.startswith("/v1/requests/"):
        return path.rsplit("/", 1)[-1]
    return "other"


def counted_app(config: EmulatorConfig) -> web.Application:
    """The emulator's app with a counting middleware and the `/_bench/counts` route."""
    counts: Counter[str] = Counter()

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        answer = await handler(request)
        counts[kind_of(request.path)] += 1
        return answer

    async def report(_: web.Request) -> web.Response:
        return web.json_response(dict(counts))

    app = create_emulator_app(config)
    app.middlewares.append(count)
    app.router.add_get("/_bench/counts", report)
    return app


async def serve(config: EmulatorConfig, port: int) -> None:
    runner = web.AppRunner(counted_app(config), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--queue-s", type=float, default=0.0)
    parser.add_argument("--run-s", type=float, default=0.0)
    args = parser.parse_args()
    uvloop.run(serve(EmulatorConfig(queue_s=args.queue_s, run_s=args.run_s), args.port))


if __name__ == "__main__":
    main()
