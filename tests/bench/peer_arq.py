"""The peer of benchmarks B and C: a straightforward arq implementation of the gateway's flow.

`python tests/bench/peer_arq.py api --port P --client C` serves `POST /v1/jobs`:
it checks the Bearer key, validates the body (into the gateway's own
`JobRequest` Struct), enqueues an arq job and answers 202. `python
tests/bench/peer_arq.py worker --client C` runs the arq worker, whose one
function does the whole job: submit to RunComfy, poll the status until it is
final, fetch the result, then POST a Standard-Webhooks-signed webhook (signed
with `standardwebhooks`), retrying a failed delivery with exponential backoff.

`--client` picks the HTTP stack, so the peer can be measured on either:
- `httpx`: the gateway's own libraries. The API is a Litestar app served with
  the gateway's uvicorn options (as bare_api.py is); the worker calls out with
  one `httpx.AsyncClient`.
- `aiohttp`: an aiohttp.web API and one `aiohttp.ClientSession` (the `bench`
  extra), the stack an arq user would most likely reach for.

The poll interval follows the gateway's policy: a tenth of the time since the
status last changed, clamped to [PEER_POLL_INTERVAL_MIN_S, _MAX_S].

Environment: REDIS_URL, RUNCOMFY_BASE_URL, RUNCOMFY_API_TOKEN, PEER_API_KEY,
PEER_WEBHOOK_SECRET (whsec_...), PEER_POLL_INTERVAL_MIN_S and _MAX_S (0.1),
PEER_MAX_JOBS (arq's default, 10), PEER_POLL_DELAY_S (arq's default, 0.5),
PEER_UVLOOP (`1`: run on uvloop, as the gateway does; default: asyncio's own loop).
"""

import argparse
import asyncio
import hmac
import json
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, ClassVar

import httpx
import msgspec
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.worker import run_worker
from litestar import Litestar, Request, Response, get, post
from litestar.datastructures import State
from litestar.params import RawBody
from standardwebhooks.webhooks import Webhook

from service.models import MODEL, JobRequest

FINAL = frozenset({"completed", "succeeded", "failed", "cancelled"})
WEBHOOK_TRIES = 6
CLIENTS = ("httpx", "aiohttp")


def now() -> str:
    return datetime.now(UTC).isoformat()


# -- the API, the same on both stacks ------------------------------------------------------


async def accept(pool: ArqRedis, authorization: str, body: bytes) -> tuple[int, dict[str, Any]]:
    """Check the key, validate the job, enqueue it: the status and JSON body to answer."""
    scheme, _, key = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key, os.environ["PEER_API_KEY"]):
        return 401, {"title": "unauthorized"}
    try:
        job = msgspec.json.decode(body, type=JobRequest)
    except msgspec.ValidationError as exc:
        return 422, {"title": "invalid", "detail": str(exc)}
    except msgspec.DecodeError as exc:
        return 400, {"title": "malformed", "detail": str(exc)}
    job_id = "job_" + uuid.uuid4().hex
    webhook_url = job.webhook.url if job.webhook else None
    model_input = msgspec.to_builtins(job.input)
    await pool.enqueue_job("run_job", job_id, model_input, webhook_url, now(), _job_id=job_id)
    return 202, {"id": job_id, "status": "pending"}


def redis_settings() -> RedisSettings:
    return RedisSettings.from_dsn(os.environ["REDIS_URL"])


@post("/v1/jobs")
async def submit(request: Request[Any, Any, Any], body: RawBody, state: State) -> Response[Any]:
    """Validate the job, enqueue it, answer 202."""
    status, answer = await accept(state.pool, request.headers.get("Authorization", ""), body)
    return Response(answer, status_code=status)


@get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@asynccontextmanager
async def arq_pool(app: Litestar) -> AsyncIterator[None]:
    app.state.pool = await create_pool(redis_settings())
    try:
        yield
    finally:
        await app.state.pool.aclose()


def serve_litestar(port: int) -> None:
    """The API on Litestar, with the gateway's own uvicorn options."""
    from service.api.server import _config, run_server  # noqa: PLC0415
    from service.config import Settings, Tenants  # noqa: PLC0415

    settings = Settings(
        redis_url=os.environ["REDIS_URL"],
        runcomfy_token="unused",  # noqa: S106 - not a secret: only the server options are read
        tenants=Tenants(by_id={}),
    )
    config = _config(settings, "127.0.0.1", port, None)
    config.app = Litestar(
        route_handlers=[submit, healthz],
        lifespan=[arq_pool],
        openapi_config=None,
        logging_config=None,
    )
    run_server(config)


def serve_aiohttp(port: int) -> None:
    """The API on aiohttp.web."""
    from aiohttp import web  # noqa: PLC0415 - the `bench` extra, only for this stack

    pool_key = web.AppKey("arq", ArqRedis)

    async def submit(request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        status, answer = await accept(request.app[pool_key], authorization, await request.read())
        return web.json_response(answer, status=status)

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def pool(app: web.Application) -> AsyncIterator[None]:
        app[pool_key] = await create_pool(redis_settings())
        yield
        await app[pool_key].aclose()

    app = web.Application()
    app.router.add_post("/v1/jobs", submit)
    app.router.add_get("/healthz", healthz)
    app.cleanup_ctx.append(pool)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# -- the worker ------------------------------------------------------------------------------


@dataclass
class Http:
    """The two calls the job makes, on one of the two stacks."""

    call: Callable[..., Awaitable[dict[str, Any]]]
    """(method, url, json=None) -> the answer's JSON; raises on a non-2xx."""
    post: Callable[[str, str, dict[str, str]], Awaitable[int | None]]
    """(url, body, headers) -> the status, None when no answer came."""
    close: Callable[[], Awaitable[None]]


def httpx_stack(token: str) -> Http:
    client = httpx.AsyncClient(timeout=20, trust_env=False)
    auth = {"Authorization": f"Bearer {token}"}

    async def call(method: str, url: str, json: Any = None) -> dict[str, Any]:
        answer = await client.request(method, url, json=json, headers=auth)
        answer.raise_for_status()
        result: dict[str, Any] = answer.json()
        return result

    async def post(url: str, body: str, headers: dict[str, str]) -> int | None:
        try:
            answer = await client.post(url, content=body, headers=headers)
        except httpx.HTTPError:
            return None
        return answer.status_code

    return Http(call, post, client.aclose)


def aiohttp_stack(token: str) -> Http:
    import aiohttp  # noqa: PLC0415 - the `bench` extra, only for this stack

    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20))
    auth = {"Authorization": f"Bearer {token}"}

    async def call(method: str, url: str, json: Any = None) -> dict[str, Any]:
        async with session.request(method, url, json=json, headers=auth) as answer:
            answer.raise_for_status()
            result: dict[str, Any] = await answer.json()
            return result

    async def post(url: str, body: str, headers: dict[str, str]) -> int | None:
        try:
            async with session.post(url, data=body, headers=headers) as answer:
                await answer.read()
                return answer.status
        except (aiohttp.ClientError, TimeoutError):
            return None

    return Http(call, post, session.close)


def poll_interval_s(ctx: dict[str, Any], changed_at: float) -> float:
    """A tenth of the time since the status last changed, clamped, as the gateway polls."""
    low, high = ctx["poll_interval_s"]
    return float(min(high, max(low, (time.monotonic() - changed_at) / 10)))


async def run_job(
    ctx: dict[str, Any],
    job_id: str,
    model_input: dict[str, Any],
    webhook_url: str | None,
    created_at: str,
) -> str:
    """Submit, poll until final, fetch the result, deliver the webhook."""
    http: Http = ctx["http"]
    base: str = ctx["base_url"]
    submitted = await http.call("POST", f"{base}/v1/models/{MODEL}", json=model_input)
    request_id = submitted["request_id"]
    requests = f"{base}/v1/requests/{request_id}"
    status, changed_at = "", time.monotonic()
    while True:
        seen = (await http.call("GET", f"{requests}/status"))["status"]
        if seen != status:
            status, changed_at = seen, time.monotonic()
        if status in FINAL:
            break
        await asyncio.sleep(poll_interval_s(ctx, changed_at))
    result = await http.call("GET", f"{requests}/result")
    status = "completed" if status == "succeeded" else status
    if webhook_url is None:
        return status
    event = {
        "type": f"job.{status}",
        "timestamp": now(),
        "data": {
            "id": job_id,
            "status": status,
            "model": MODEL,
            "input": model_input,
            "output": result.get("output"),
            "error": result.get("error"),
            "upstream": {"request_id": request_id},
            "created_at": created_at,
            "finished_at": now(),
        },
    }
    await deliver(ctx, webhook_url, f"msg_{job_id}", json.dumps(event))
    return status


async def deliver(ctx: dict[str, Any], url: str, msg_id: str, body: str) -> None:
    """POST the signed event; retry with exponential backoff until a 2xx or out of tries."""
    signer: Webhook = ctx["webhook"]
    for attempt in range(WEBHOOK_TRIES):
        sent_at = datetime.now(UTC)
        headers = {
            "webhook-id": msg_id,
            "webhook-timestamp": str(int(sent_at.timestamp())),
            "webhook-signature": signer.sign(msg_id, sent_at, body),
            "content-type": "application/json",
        }
        status = await ctx["http"].post(url, body, headers)
        if status is not None and 200 <= status < 300:
            return
        await asyncio.sleep(0.5 * 2**attempt)
    logging.getLogger(__name__).warning("webhook %s to %s failed for good", msg_id, url)


async def startup(ctx: dict[str, Any]) -> None:
    token = os.environ["RUNCOMFY_API_TOKEN"]
    stack = httpx_stack if os.environ["PEER_CLIENT"] == "httpx" else aiohttp_stack
    ctx["http"] = stack(token)
    ctx["base_url"] = os.environ["RUNCOMFY_BASE_URL"].rstrip("/")
    ctx["webhook"] = Webhook(os.environ["PEER_WEBHOOK_SECRET"])
    ctx["poll_interval_s"] = (
        float(os.environ.get("PEER_POLL_INTERVAL_MIN_S", "0.1")),
        float(os.environ.get("PEER_POLL_INTERVAL_MAX_S", "0.1")),
    )


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["http"].close()


class WorkerSettings:
    """arq's settings class: the one job function and the worker's life cycle."""

    functions: ClassVar = [run_job]
    on_startup = startup
    on_shutdown = shutdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("command", choices=["api", "worker"])
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--client", choices=CLIENTS, default="httpx")
    args = parser.parse_args()
    os.environ["PEER_CLIENT"] = args.client
    logging.basicConfig(level=logging.WARNING)
    if os.environ.get("PEER_UVLOOP") == "1":
        import uvloop  # noqa: PLC0415 - only when asked for

        uvloop.install()
    if args.command == "api" and args.client == "httpx":
        serve_litestar(args.port)
    elif args.command == "api":
        serve_aiohttp(args.port)
    else:
        run_worker(
            WorkerSettings,  # type: ignore[arg-type]
            redis_settings=redis_settings(),
            max_jobs=int(os.environ.get("PEER_MAX_JOBS", "10")),
            poll_delay=float(os.environ.get("PEER_POLL_DELAY_S", "0.5")),
        )


if __name__ == "__main__":
    main()
