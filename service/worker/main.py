"""The worker process: its loops, its health port, and graceful shutdown.

SIGTERM or SIGINT stops claiming; each loop finishes what it holds within
`GATEWAY_SHUTDOWN_S` and releases the rest (due at once, for another replica),
then the process exits 0. `/healthz` on the worker's own port answers 200 while
every loop has completed a turn recently, so a wedged loop gets the pod restarted.
That port is a small Litestar app on uvicorn, bound before anything else starts:
a port already taken is a configuration error (one line, exit 2), not a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
from dataclasses import dataclass

import msgspec
from litestar import Litestar, Response, get
from redis.exceptions import RedisError

from service.config import ConfigError, Settings
from service.metrics import PROMETHEUS_MEDIA_TYPE, WorkerMetrics
from service.runcomfy.client import RunComfyClient, create_upstream_client
from service.serving import Served, listen, serve
from service.storage.objects import OutputStores
from service.store.connection import connect
from service.store.deliveries import DeliveryStore
from service.store.jobs import JobStore
from service.store.keys import Keys
from service.store.limits import Limits
from service.store.runlengths import RunLengths
from service.store.schedules import Schedules
from service.tenants_watch import TenantsWatcher
from service.webhooks.delivery import create_webhook_client
from service.worker.copier import Copier, create_output_client
from service.worker.dispatcher import CONCURRENCY, Dispatcher
from service.worker.listings import trim_listings
from service.worker.loop import ClaimLoop, Heartbeat
from service.worker.poller import Poller
from service.worker.preflight import create_input_client
from service.worker.submitter import Submitter

log = logging.getLogger(__name__)

UPSTREAM_CONNECTIONS = 32
"""RunComfy calls in flight from one worker at most: the poller's and submitter's concurrency."""
HEARTBEAT_MAX_AGE_S = 30.0


class Health(msgspec.Struct, frozen=True):
    """`/healthz`'s answer: `ok` with the loops that beat, or `stalled` with those that stopped."""

    status: str
    loops: list[str]


@dataclass
class HealthServer:
    """The worker's small HTTP port: `/healthz` (loop heartbeat) and `/metrics`."""

    heartbeat: Heartbeat
    schedules: Schedules
    limits: Limits
    metrics: WorkerMetrics

    def app(self) -> Litestar:
        """The Litestar app serving the two routes."""
        return Litestar(
            route_handlers=[get("/healthz")(self.healthz), get("/metrics")(self.render_metrics)],
            openapi_config=None,
            logging_config=None,  # the process configures logging
            debug=False,
        )

    async def healthz(self) -> Response[Health]:
        """200 while every loop beats, 503 naming the ones that stopped."""
        stale = self.heartbeat.stale(HEARTBEAT_MAX_AGE_S)
        if stale or not self.heartbeat.beats:
            return Response(Health(status="stalled", loops=stale), status_code=503)
        return Response(Health(status="ok", loops=sorted(self.heartbeat.beats)))

    async def render_metrics(self) -> Response[bytes]:
        """The worker's metrics in Prometheus text format, depths and pause read now."""
        try:
            depths = await asyncio.wait_for(self.schedules.depths(), 1.0)
            pause = await asyncio.wait_for(self.limits.upstream_pause(), 1.0)
        except (RedisError, OSError, TimeoutError):
            depths, pause = None, None  # the process's own counters are still worth scraping
        self.metrics.set_depths(depths)
        self.metrics.set_pause(pause.reason if pause else None)
        return Response(self.metrics.render(), media_type=PROMETHEUS_MEDIA_TYPE)


def listen_for_health(port: int) -> socket.socket:
    """The health and metrics port, bound on every address; ConfigError when it is taken."""
    try:
        return listen("0.0.0.0", port)  # noqa: S104 - a pod port, probed from outside the pod
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(
            f"cannot serve /healthz and /metrics on port {port}: {reason} "
            "(choose another with --metrics-port or GATEWAY_WORKER_METRICS_PORT)"
        ) from None


async def run_worker(
    settings: Settings,
    stop: asyncio.Event,
    *,
    keys: Keys | None = None,
    metrics_port: int | None = None,
) -> None:
    """Run the worker loops until `stop` is set, then drain and close."""
    health_socket = listen_for_health(metrics_port) if metrics_port is not None else None
    keys = keys or Keys()
    metrics = WorkerMetrics()
    redis = connect(settings.redis_url)
    # Few connections on purpose: httpcore's pool walks every connection on every request,
    # so a pool of 256 cost the worker more CPU than the calls (bench B: 21-25 s vs 7-11 s
    # for 1,000 jobs). Real load is a few RunComfy calls a second.
    upstream = create_upstream_client(max_connections=UPSTREAM_CONNECTIONS)
    hooks = create_webhook_client(max_connections=CONCURRENCY)
    inputs = (
        create_input_client(allow_hosts=settings.preflight_allow_hosts)
        if settings.preflight
        else None
    )
    outputs = create_output_client(allow_private_hosts=settings.preflight_allow_hosts)
    heartbeat = Heartbeat()
    schedules = Schedules(redis, keys, lease_s=settings.lease_s)
    limits = Limits(redis, keys)
    deliveries = DeliveryStore(redis, keys, retention_s=settings.job_retention_s)
    dispatcher = Dispatcher(settings, deliveries, schedules, hooks, heartbeat, metrics=metrics)

    jobs = JobStore(
        redis,
        keys,
        retention_s=settings.job_retention_s,
        on_finish=metrics.job_finished,
        on_charge=metrics.job_charged,
    )
    client = RunComfyClient(
        upstream,
        settings.runcomfy_base_url,
        settings.runcomfy_token,
        timeout_s=settings.upstream_timeout_s,
        on_call=metrics.upstream_call,
    )
    runs = RunLengths(
        redis,
        keys,
        keep=settings.poll_learn_samples,
        max_age_s=settings.poll_learn_max_age_s,
    )
    poller = Poller(settings, jobs, schedules, client, heartbeat, runs=runs, metrics=metrics)
    loops: list[ClaimLoop] = [
        Submitter(
            settings,
            jobs=jobs,
            schedules=schedules,
            client=client,
            limits=limits,
            heartbeat=heartbeat,
            metrics=metrics,
            inputs=inputs,
        ),
        poller,
        Copier(
            settings,
            jobs=jobs,
            schedules=schedules,
            stores=OutputStores(),
            client=outputs,
            heartbeat=heartbeat,
            metrics=metrics,
        ),
        dispatcher,
    ]
    tasks = [loop.run(stop) for loop in loops]
    tasks.append(trim_listings(jobs, settings, stop))
    if settings.tenants_file:
        watcher = TenantsWatcher(
            settings.tenants,
            settings.tenants_file,
            on_result=metrics.tenants_reloaded,
            budgets_allowed=settings.price_micros > 0,
        )
        watcher.install_sighup()
        tasks.append(watcher.run(stop))
    health: Served | None = None
    try:
        if health_socket is not None:
            app = HealthServer(heartbeat, schedules, limits, metrics).app()
            health = await serve(app, health_socket)
            log.info("worker: health and metrics on :%d", metrics_port)
        log.info("worker: started (%s)", ", ".join(loop.name for loop in loops))
        await asyncio.gather(*tasks)
    finally:
        if health is not None:
            await health.stop()
        elif health_socket is not None:
            health_socket.close()
        await upstream.aclose()
        await hooks.aclose()
        await outputs.aclose()
        if inputs is not None:
            await inputs.aclose()
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
