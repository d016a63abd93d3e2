"""The peer of benchmark B: a straightforward arq + aiohttp implementation of the gateway's flow.

`python tests/bench/peer_arq.py api --port P` serves `POST /v1/jobs`: it checks
the Bearer key, validates the body (into the gateway's own `JobRequest`
Struct), enqueues an arq job and answers 202. `python tests/bench/peer_arq.py
worker` runs the arq worker, whose one function does the whole job: submit
to RunComfy, poll the status (sleeping `PEER_POLL_INTERVAL_S` between polls)
until it is final, fetch the result, then POST a Standard-Webhooks-signed
webhook (signed with `standardwebhooks`), retrying a failed delivery with
exponential backoff.

Environment: REDIS_URL, RUNCOMFY_BASE_URL, RUNCOMFY_API_TOKEN, PEER_API_KEY,
PEER_WEBHOOK_SECRET (whsec_...), PEER_POLL_INTERVAL_S (0.1), PEER_MAX_JOBS
(arq's default, 10), PEER_POLL_DELAY_S (arq's default, 0.5), PEER_UVLOOP
(`1`: run on uvloop, as the gateway does; default: asyncio's own loop).
"""

import argparse
import asyncio
import hmac
import json
import logging
import os
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

import aiohttp
import msgspec
from aiohttp import web
from arq import create_pool
from arq.connections import ArqRedis, RedisSettings
from arq.worker import run_worker
from standardwebhooks.webhooks import Webhook

from service.models import MODEL, JobRequest

FINAL = frozenset({"completed", "succeeded", "failed", "cancelled"})
WEBHOOK_TRIES = 6
REDIS_KEY: web.AppKey[ArqRedis] = web.AppKey("arq", ArqRedis)


def now() -> str:
    return datetime.now(UTC).isoformat()


# -- the API ---------------------------------------------------------------------------------


async def submit(request: web.Request) -> web.Response:
    """Validate the job, enqueue it, answer 202."""
    scheme, _, key = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key, os.environ["PEER_API_KEY"]):
        return web.json_response({"title": "unauthorized"}, status=401)
    try:
        job = msgspec.json.decode(await request.read(), type=JobRequest)
    except msgspec.ValidationError as exc:
        return web.json_response({"title": "invalid", "detail": str(exc)}, status=422)
    except msgspec.DecodeError as exc:
        return web.json_response({"title": "malformed", "detail": str(exc)}, status=400)
    job_id = "job_" + uuid.uuid4().hex
    webhook_url = job.webhook.url if job.webhook else None
    created_at = now()
    await request.app[REDIS_KEY].enqueue_job(
        "run_job", job_id, msgspec.to_builtins(job.input), webhook_url, created_at, _job_id=job_id
    )
    return web.json_response({"id": job_id, "status": "pending"}, status=202)


async def healthz(_: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def api_app() -> web.Application:
    app = web.Application()
    app.router.add_post("/v1/jobs", submit)
    app.router.add_get("/healthz", healthz)

    async def pool(app: web.Application) -> Any:
        app[REDIS_KEY] = await create_pool(RedisSettings.from_dsn(os.environ["REDIS_URL"]))
        yield
        await app[REDIS_KEY].aclose()

    app.cleanup_ctx.append(pool)
    return app


# -- the worker ------------------------------------------------------------------------------


async def call(session: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> dict[str, Any]:
    async with session.request(method, url, **kw) as answer:
        answer.raise_for_status()
        result: dict[str, Any] = await answer.json()
        return result


async def run_job(
    ctx: dict[str, Any],
    job_id: str,
    model_input: dict[str, Any],
    webhook_url: str | None,
    created_at: str,
) -> str:
    """Submit, poll until final, fetch the result, deliver the webhook."""
    session: aiohttp.ClientSession = ctx["session"]
    base: str = ctx["base_url"]
    submitted = await call(session, "POST", f"{base}/v1/models/{MODEL}", json=model_input)
    request_id = submitted["request_id"]
    requests = f"{base}/v1/requests/{request_id}"
    while True:
        status = (await call(session, "GET", f"{requests}/status"))["status"]
        if status in FINAL:
            break
        await asyncio.sleep(ctx["poll_interval_s"])
    result = await call(session, "GET", f"{requests}/result")
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
        try:
            async with ctx["session"].post(url, data=body, headers=headers) as answer:
                if 200 <= answer.status < 300:
                    return
        except (aiohttp.ClientError, TimeoutError):
            pass
        await asyncio.sleep(0.5 * 2**attempt)
    logging.getLogger(__name__).warning("webhook %s to %s failed for good", msg_id, url)


async def startup(ctx: dict[str, Any]) -> None:
    ctx["session"] = aiohttp.ClientSession(
        headers={"Authorization": f"Bearer {os.environ['RUNCOMFY_API_TOKEN']}"},
        timeout=aiohttp.ClientTimeout(total=20),
    )
    ctx["base_url"] = os.environ["RUNCOMFY_BASE_URL"].rstrip("/")
    ctx["webhook"] = Webhook(os.environ["PEER_WEBHOOK_SECRET"])
    ctx["poll_interval_s"] = float(os.environ.get("PEER_POLL_INTERVAL_S", "0.1"))


async def shutdown(ctx: dict[str, Any]) -> None:
    await ctx["session"].close()


class WorkerSettings:
    """arq's settings class: the one job function and the worker's life cycle."""

    functions: ClassVar = [run_job]
    on_startup = startup
    on_shutdown = shutdown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("command", choices=["api", "worker"])
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if os.environ.get("PEER_UVLOOP") == "1":
        import uvloop  # noqa: PLC0415 - only when asked for

        uvloop.install()
    if args.command == "api":
        web.run_app(api_app(), host="127.0.0.1", port=args.port, access_log=None, print=None)
    else:
        run_worker(
            WorkerSettings,  # type: ignore[arg-type]
            redis_settings=RedisSettings.from_dsn(os.environ["REDIS_URL"]),
            max_jobs=int(os.environ.get("PEER_MAX_JOBS", "10")),
            poll_delay=float(os.environ.get("PEER_POLL_DELAY_S", "0.5")),
        )


if __name__ == "__main__":
    main()
