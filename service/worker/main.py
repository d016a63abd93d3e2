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
from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from redis.exceptions import RedisError

from service.config import Settings
from service.metrics import WorkerMetrics
from service.runcomfy.client import RunComfyClient, create_upstream_client
from service.store.connection import connect
from service.store.deliveries import DeliveryStore
from service.store.jobs import JobStore
from service.store.keys import Keys
from service.store.limits import Limits
from service.store.schedules import Schedules
from service.tenants_watch import TenantsWatcher
from service.webhooks.delivery import create_webhook_client
from service.worker.dispatcher import CONCURRENCY, Dispatcher
from service.worker.listings import trim_listings
from service.worker.loop import ClaimLoop, Heartbeat
from service.worker.poller import Poller
from service.worker.submitter import Submitter

log = logging.getLogger(__name__)

HEARTBEAT_MAX_AGE_S = 30.0


@dataclass
class HealthServer:
    """The worker's small HTTP port: `/healthz` (loop heartbeat) and `/metrics`."""

    heartbeat: Heartbeat
    schedules: Schedules
    limits: Limits
    metrics: WorkerMetrics

    def app(self) -> web.Application:
        """The aiohttp app serving the two routes."""
        app = web.Application()
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/metrics", self.render_metrics)
        return app

    async def healthz(self, _: web.Request) -> web.Response:
        """200 while every loop beats, 503 naming the ones that stopped."""
        stale = self.heartbeat.stale(HEARTBEAT_MAX_AGE_S)
        if stale or not self.heartbeat.beats:
            return web.json_response({"status": "stalled", "loops": stale}, status=503)
        return web.json_response({"status": "ok", "loops": sorted(self.heartbeat.beats)})

    async def render_metrics(self, _: web.Request) -> web.Response:
        """The worker's metrics in Prometheus text format, depths and pause read now."""
        try:
            depths = await asyncio.wait_for(self.schedules.depths(), 1.0)
            pause = await asyncio.wait_for(self.limits.upstream_pause(), 1.0)
        except (RedisError, OSError, TimeoutError):
            depths, pause = None, None  # the process's own counters are still worth scraping
        self.metrics.set_depths(depths)
        self.metrics.set_pause(pause.reason if pause else None)
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE})


async def run_worker(
    settings: Settings,
    stop: asyncio.Event,
    *,
    keys: Keys | None = None,
    metrics_port: int | None = None,
) -> None:
    """Run the submitter, poller and dispatcher until `stop` is set, then drain and close."""
    keys = keys or Keys()
    metrics = WorkerMetrics()
    redis = connect(settings.redis_url)
    upstream = create_upstream_client(max_connections=256)
    hooks = create_webhook_client(max_connections=CONCURRENCY)
    heartbeat = Heartbeat()
    schedules = Schedules(redis, keys, lease_s=settings.lease_s)
    limits = Limits(redis, keys)
    deliveries = DeliveryStore(redis, keys, retention_s=settings.job_retention_s)
    dispatcher = Dispatcher(settings, deliveries, schedules, hooks, heartbeat, metrics=metrics)

    woken: dict[str, ClaimLoop] = {"deliver": dispatcher}  # and "poll", once it exists

    def item_due(schedule: str, seconds: float) -> None:
        # A poll or webhook this process scheduled: its loop claims it then, not at a tick.
        if (loop := woken.get(schedule)) is not None:
            loop.due_in(seconds)

    jobs = JobStore(
        redis,
        keys,
        retention_s=settings.job_retention_s,
        on_finish=metrics.job_finished,
        on_due=item_due,
        taker=dispatcher,
    )
    client = RunComfyClient(
        upstream,
        settings.runcomfy_base_url,
        settings.runcomfy_token,
        timeout_s=settings.upstream_timeout_s,
        on_call=metrics.upstream_call,
    )
    poller = Poller(settings, jobs, schedules, client, heartbeat)
    woken["poll"] = poller
    loops: list[ClaimLoop] = [
        Submitter(
            settings,
            jobs=jobs,
            schedules=schedules,
            client=client,
            limits=limits,
            heartbeat=heartbeat,
            metrics=metrics,
        ),
        poller,
        dispatcher,
    ]
    tasks = [loop.run(stop) for loop in loops]
    tasks.append(trim_listings(jobs, settings, stop))
    if settings.tenants_file:
        watcher = TenantsWatcher(
            settings.tenants, settings.tenants_file, on_result=metrics.tenants_reloaded
        )
        watcher.install_sighup()
        tasks.append(watcher.run(stop))
    runner: web.AppRunner | None = None
    try:
        if metrics_port is not None:
            health = HealthServer(heartbeat, schedules, limits, metrics)
            runner = web.AppRunner(health.app(), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, "0.0.0.0", metrics_port).start()  # noqa: S104 - a pod port
            log.info("worker: health and metrics on :%d", metrics_port)
        log.info("worker: started (%s)", ", ".join(loop.name for loop in loops))
        await asyncio.gather(*tasks)
    finally:
        if runner is not None:
            await runner.cleanup()
        await upstream.aclose()
        await hooks.aclose()
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
