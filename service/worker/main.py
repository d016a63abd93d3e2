"""The worker process: its three loops, its health port, and graceful shutdown.

SIGTERM or SIGINT stops claiming; each loop finishes what it holds within
`GATEWAY_SHUTDOWN_S` and releases the rest (due at once, for another replica),
then the process exits 0. `/healthz` on the worker's own port answers 200 while
every loop has completed a turn recently, so a wedged loop gets the pod restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import dataclass

from aiohttp import web

from service.config import Settings
from service.runcomfy.client import RunComfyClient, create_upstream_session
from service.store.connection import connect
from service.store.deliveries import DeliveryStore
from service.store.jobs import JobStore
from service.store.keys import Keys
from service.store.limits import Limits
from service.store.schedules import Schedules
from service.webhooks.delivery import create_webhook_session
from service.worker.dispatcher import Dispatcher
from service.worker.loop import Heartbeat
from service.worker.poller import Poller
from service.worker.submitter import Submitter

log = logging.getLogger(__name__)

HEARTBEAT_MAX_AGE_S = 30.0


@dataclass
class HealthServer:
    """The worker's small HTTP port: `/healthz` (loop heartbeat) and `/metrics`."""

    heartbeat: Heartbeat
    schedules: Schedules

    def app(self) -> web.Application:
        """The aiohttp app serving the two routes."""
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def healthz(self, _: web.Request) -> web.Response:
        """200 while every loop beats, 503 naming the ones that stopped."""
        stale = self.heartbeat.stale(HEARTBEAT_MAX_AGE_S)
        if stale or not self.heartbeat.beats:
            return web.json_response({"status": "stalled", "loops": stale}, status=503)
        return web.json_response({"status": "ok", "loops": sorted(self.heartbeat.beats)})

    async def metrics(self, _: web.Request) -> web.Response:
        """Schedule depths in Prometheus text format."""
        try:
            depths = await self.schedules.depths()
        except (OSError, ConnectionError) as exc:
            return web.Response(status=503, text=f"# redis unavailable: {type(exc).__name__}\n")
        lines = ["# TYPE rcg_schedule_depth gauge"]
        lines += [f'rcg_schedule_depth{{schedule="{name}"}} {n}' for name, n in depths.items()]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")


async def run_worker(
    settings: Settings,
    stop: asyncio.Event,
    *,
    keys: Keys | None = None,
    metrics_port: int | None = None,
) -> None:
    """Run the submitter, poller and dispatcher until `stop` is set, then drain and close."""
    keys = keys or Keys()
    redis = connect(settings.redis_url)
    upstream = create_upstream_session(max_connections=256)
    hooks = create_webhook_session()
    heartbeat = Heartbeat()
    schedules = Schedules(redis, keys, lease_s=settings.lease_s)
    jobs = JobStore(redis, keys, retention_s=settings.job_retention_s)
    deliveries = DeliveryStore(redis, keys, retention_s=settings.job_retention_s)
    client = RunComfyClient(
        upstream,
        settings.runcomfy_base_url,
        settings.runcomfy_token,
        timeout_s=settings.upstream_timeout_s,
    )
    loops = [
        Submitter(
            settings,
            jobs=jobs,
            schedules=schedules,
            client=client,
            limits=Limits(redis, keys),
            heartbeat=heartbeat,
        ),
        Poller(settings, jobs, schedules, client, heartbeat),
        Dispatcher(settings, deliveries, schedules, hooks, heartbeat),
    ]
    runner: web.AppRunner | None = None
    try:
        if metrics_port is not None:
            runner = web.AppRunner(HealthServer(heartbeat, schedules).app(), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "0.0.0.0", metrics_port).start()  # noqa: S104 - a pod port
            log.info("worker: health and metrics on :%d", metrics_port)
        log.info("worker: started (%s)", ", ".join(loop.name for loop in loops))
        await asyncio.gather(*(loop.run(stop) for loop in loops))
    finally:
        if runner is not None:
            await runner.cleanup()
        await upstream.close()
        await hooks.close()
        await redis.aclose()
        log.info("worker: stopped")


def install_stop_signals(stop: asyncio.Event) -> None:
    """Set `stop` on SIGTERM and SIGINT."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)


async def worker_main(settings: Settings, metrics_port: int) -> None:
    """The `worker` command: run until SIGTERM, then drain and exit."""
    stop = asyncio.Event()
    install_stop_signals(stop)
    await run_worker(settings, stop, metrics_port=metrics_port)
