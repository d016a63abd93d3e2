"""`runcomfy-gateway dev`: the whole gateway in one process, for a laptop or a fresh machine.

With no `REDIS_URL` it starts a private redis-server on a free port; with no
`RUNCOMFY_API_TOKEN` it starts the built-in emulator and points at it; with no
`GATEWAY_TENANTS_FILE` it makes a demo tenant with a fresh API key and a local
webhook receiver that verifies every signature and prints each event. It serves a
sample input video itself (`/inputs/sample.mp4`, beside the receiver in one small
Litestar app) and allows its own host in `GATEWAY_PREFLIGHT_ALLOW_HOSTS`, so a job
on that sample passes the input pre-flight. Then it serves the API and runs the
worker, prints how to submit a job, and on Ctrl-C stops everything it started.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import sys
import time
from collections.abc import Mapping
from contextlib import AsyncExitStack
from typing import Any

import msgspec
from litestar import Litestar, Request, Response, post, route
from litestar.params import RawBody

from service.config import Tenant, Tenants, load_settings
from service.localredis import LocalRedis
from service.runcomfy.emulator import OUTPUT_BYTES, EmulatorConfig, start_emulator
from service.serving import listen, serve
from service.webhooks.signing import sign
from service.worker.main import install_stop_signals, run_worker

DEMO_TENANT = "demo"
LOCAL_HOST = "127.0.0.1"
SAMPLE_PATH = "/inputs/sample.mp4"


def verify_signature(secrets_: tuple[bytes, ...], headers: Mapping[str, str], body: bytes) -> bool:
    """Check a Standard Webhooks signature as a receiver would (timestamp within 5 minutes)."""
    msg_id = headers.get("webhook-id", "")
    try:
        timestamp = int(headers.get("webhook-timestamp", ""))
    except ValueError:
        return False
    if abs(time.time() - timestamp) > 300:
        return False
    expected = set(sign(secrets_, msg_id, timestamp, body).split())
    given = headers.get("webhook-signature", "").split()
    return any(hmac.compare_digest(g, e) for g in given for e in expected)


class Received(msgspec.Struct, frozen=True):
    """The receiver's answer: whether the delivery's signature verified."""

    ok: bool


@route(SAMPLE_PATH, http_method=["GET", "HEAD"])
async def sample_input() -> Response[bytes]:
    """A tiny MP4 (an `ftyp` box) for demo jobs: it passes the input pre-flight."""
    return Response(OUTPUT_BYTES, media_type="video/mp4")


def _local_app(secrets_: tuple[bytes, ...] | None) -> Litestar:
    """The sample input, and with the demo tenant's `secrets_` a receiver of its webhooks.

    The receiver verifies each delivery and prints one line for it.
    """

    @post("/webhook")
    async def receive(request: Request[Any, Any, Any], body: RawBody) -> Response[Received]:
        ok = verify_signature(secrets_ or (), request.headers, body)
        event = msgspec.json.decode(body)
        data = event.get("data", {})
        detail = data.get("output") or data.get("error") or ""
        line = (
            f"webhook {event.get('type')} for {data.get('id')}: signature "
            f"{'verified' if ok else 'INVALID'} {msgspec.json.encode(detail).decode()}"
        )
        sys.stdout.write(line + "\n")
        sys.stdout.flush()
        return Response(Received(ok=ok), status_code=200 if ok else 400)

    handlers = [sample_input, receive] if secrets_ is not None else [sample_input]
    return Litestar(route_handlers=handlers, openapi_config=None, logging_config=None, debug=False)


def _demo_tenant(host: str, port: int, notes: list[str]) -> tuple[Tenants, str]:
    """The demo tenant and its API key, and an admin key for the dashboard (in `notes`)."""
    api_key = "rcg_demo_" + secrets.token_urlsafe(18)
    admin_key = "rcg_admin_" + secrets.token_urlsafe(18)
    shown = "127.0.0.1" if host in {"0.0.0.0", ""} else host  # noqa: S104 - shown, not bound
    notes.append(f"Dashboard http://{shown}:{port}/ui (admin key {admin_key})")
    tenant = Tenant(
        id=DEMO_TENANT,
        api_key_hashes=(hashlib.sha256(api_key.encode()).hexdigest(),),
        webhook_secrets=(secrets.token_bytes(24),),
        callback_hosts=("127.0.0.1", "localhost"),
    )
    admins = (hashlib.sha256(admin_key.encode()).hexdigest(),)
    return Tenants(by_id={DEMO_TENANT: tenant}, admin_key_hashes=admins), api_key


def _banner(
    api: str, api_key: str | None, notes: list[str], hook_url: str | None, video_url: str
) -> str:
    key = api_key or "<one of your tenants' API keys>"
    events = '["job.started", "job.completed", "job.failed", "job.cancelled"]'
    webhook = f', "webhook": {{"url": "{hook_url}", "events": {events}}}' if hook_url else ""
    body = (
        '{"input": {"prompt": "a paper boat drifting down a rainy street", '
        f'"video_url": "{video_url}"}}{webhook}}}'
    )
    lines = [
        "",
        "runcomfy-gateway dev is running",
        f"  API       {api}",
        f"  API key   {key}",
        *(f"  {note}" for note in notes),
        "",
        "Submit a job:",
        (
            f"  curl -sS -X POST {api}/v1/jobs -H 'Authorization: Bearer {key}' "
            f"-H 'Content-Type: application/json' -d '{body}'"
        ),
        "",
        "Watch it (use the id from the answer):",
        f"  curl -sS {api}/v1/jobs/JOB_ID -H 'Authorization: Bearer {key}'",
        "",
        "Ctrl-C stops everything.",
        "",
    ]
    return "\n".join(lines)


async def dev_main(env: Mapping[str, str], *, host: str, port: int) -> None:
    """Start what is missing, serve the API, run the worker; stop all on Ctrl-C."""
    from service.api.server import embedded_api  # noqa: PLC0415 - keeps `dev --help` light

    stop = asyncio.Event()
    install_stop_signals(stop)
    overrides = dict(env)
    notes: list[str] = []
    async with AsyncExitStack() as stack:
        if not env.get("REDIS_URL"):
            local = LocalRedis()
            await asyncio.to_thread(local.start)
            stack.callback(local.cleanup)
            overrides["REDIS_URL"] = local.url
            notes.append(f"Redis     {local.url} (private, removed on exit)")
        if not env.get("RUNCOMFY_API_TOKEN"):
            emulator = await start_emulator(EmulatorConfig.from_env(env), host="127.0.0.1")
            stack.push_async_callback(emulator.stop)
            overrides["RUNCOMFY_BASE_URL"] = emulator.url
            overrides["RUNCOMFY_API_TOKEN"] = "dev-emulator-token"  # noqa: S105 - not a secret
            notes.append(f"RunComfy  emulator at {emulator.url}")
        # The sample input is served on this host: the pre-flight (and the API) may reach it.
        allowed = env.get("GATEWAY_PREFLIGHT_ALLOW_HOSTS", "")
        overrides["GATEWAY_PREFLIGHT_ALLOW_HOSTS"] = ",".join(filter(None, [allowed, LOCAL_HOST]))
        overrides.setdefault("GATEWAY_POLL_INTERVAL_MIN_S", "0.5")
        overrides.setdefault("GATEWAY_POLL_INTERVAL_MAX_S", "2")
        api_key: str | None = None
        secrets_: tuple[bytes, ...] | None = None
        if env.get("GATEWAY_TENANTS_FILE"):
            settings = load_settings(overrides)
        else:
            tenants, api_key = _demo_tenant(host, port, notes)
            settings = load_settings(overrides, tenants=tenants)
            secrets_ = tenants.by_id[DEMO_TENANT].webhook_secrets
        sample_url, hook_url = await _start_local(stack, secrets_, notes)
        # RunComfy itself cannot fetch a video from this machine: only the emulator can.
        video_url = "https://example.com/input.mp4" if env.get("RUNCOMFY_API_TOKEN") else sample_url
        server = embedded_api(settings, host=host, port=port)
        api_task = asyncio.create_task(server.serve())
        worker_task = asyncio.create_task(run_worker(settings, stop))
        while not server.started and not api_task.done():  # noqa: ASYNC110 - uvicorn has no event
            await asyncio.sleep(0.05)
        if api_task.done():
            stop.set()
            await worker_task
            api_task.result()
            return
        shown = "127.0.0.1" if host in {"0.0.0.0", ""} else host  # noqa: S104 - shown, not bound
        banner = _banner(f"http://{shown}:{port}", api_key, notes, hook_url, video_url)
        sys.stdout.write(banner + "\n")
        sys.stdout.flush()
        await stop.wait()
        server.should_exit = True
        await asyncio.gather(api_task, worker_task, return_exceptions=True)
        sys.stdout.write("stopped\n")


async def _start_local(
    stack: AsyncExitStack, secrets_: tuple[bytes, ...] | None, notes: list[str]
) -> tuple[str, str | None]:
    """Serve the sample input (and the demo receiver): its URL and the receiver's, if any."""
    served = await serve(_local_app(secrets_), listen(LOCAL_HOST, 0))
    stack.push_async_callback(served.stop)
    sample_url = f"{served.url}{SAMPLE_PATH}"
    notes.append(f"Input     {sample_url} (a sample video)")
    if secrets_ is None:
        return sample_url, None
    hook_url = f"{served.url}/webhook"
    notes.append(f"Webhooks  {hook_url} (verifies and prints each event)")
    return sample_url, hook_url
