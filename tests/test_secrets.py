"""Secrets never leak: not into logs at DEBUG, not into any answer, whatever fails.

One run of the real commands as processes (the emulator requiring a token, `api`,
`worker`, two webhook receivers) goes through success and every failure within
reach: wrong API keys (among them the secrets themselves), a bad Idempotency-Key,
upstream 5xx, 429 and HTTP-200 errors, a revoked upstream token, a failed upstream
job, a receiver answering 500 and a re-send, a tenants file reloaded with a plain key
in it. Then the processes' complete logs, every answer the API and the worker gave
and every webhook are searched for the RunComfy token, every plain API key and every
webhook secret, as `whsec_…` and as its base64 part.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
import signal
import subprocess
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.localredis import LocalRedis, free_port
from tests.support import CLI, NO_PREFLIGHT, Process, Receiver, wait_for, wait_http

pytestmark = pytest.mark.e2e

TOKEN = "rc_live_" + secrets.token_hex(16)
REVOKED_TOKEN = "rc_live_" + secrets.token_hex(16)


@dataclass(frozen=True)
class Caller:
    """A tenant as its operators hold it: plain API key and webhook secrets."""

    id: str
    api_key: str = field(default_factory=lambda: "gw_" + secrets.token_urlsafe(24))
    # Two secrets: a rotation in progress signs with both.
    secrets: tuple[bytes, ...] = field(
        default_factory=lambda: (secrets.token_bytes(32), secrets.token_bytes(32))
    )

    @property
    def whsecs(self) -> list[str]:
        return ["whsec_" + base64.b64encode(secret).decode() for secret in self.secrets]

    def toml(self, *, plain_key: bool = False) -> str:
        key = self.api_key if plain_key else hashlib.sha256(self.api_key.encode()).hexdigest()
        whsecs = ", ".join(f'"{whsec}"' for whsec in self.whsecs)
        return (
            f"[tenants.{self.id}]\n"
            f'api_keys = ["{key}"]\n'
            f"webhook_secret = [{whsecs}]\n"
            f'callback_hosts = ["127.0.0.1"]\n'
        )


ORDERS = Caller("orders")
BILLING = Caller("billing")


def secret_forms() -> dict[str, str]:
    """Every secret in every form it could leak in, by a name that says which it is."""
    forms = {"RunComfy token": TOKEN, "revoked RunComfy token": REVOKED_TOKEN}
    for caller in (ORDERS, BILLING):
        forms[f"{caller.id} API key"] = caller.api_key
        for i, whsec in enumerate(caller.whsecs):
            forms[f"{caller.id} webhook secret {i}"] = whsec
            forms[f"{caller.id} webhook secret {i}, base64"] = whsec.removeprefix("whsec_")
    return forms


def leaks(text: str) -> list[str]:
    """The names of the secrets `text` holds."""
    return [name for name, value in secret_forms().items() if value in text]


@dataclass
class Run:
    """What one run left behind: logs, answers, webhooks, and what it went through."""

    logs: dict[str, str] = field(default_factory=dict)
    answers: list[str] = field(default_factory=list)
    webhooks: list[str] = field(default_factory=list)
    statuses: set[int] = field(default_factory=set)
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)


def recorder(run: Run) -> Callable[[httpx.Response], Any]:
    async def record(response: httpx.Response) -> None:
        await response.aread()
        head = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        run.answers.append(f"{response.status_code}\n{head}\n\n{response.text}")
        run.statuses.add(response.status_code)

    return record


def job_body(receiver: Receiver | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "input": {"prompt": "a paper boat", "video_url": "https://example.com/in.mp4"}
    }
    if receiver is not None:
        body["webhook"] = {"url": receiver.url}
    return body


@pytest.fixture(scope="module")
async def run(tmp_path_factory) -> Run:
    """The whole story, processes stopped at the end so their logs are complete."""
    tmp = tmp_path_factory.mktemp("secrets")
    tenants = tmp / "tenants.toml"
    tenants.write_text(ORDERS.toml() + "\n" + BILLING.toml())
    redis = LocalRedis().start()
    ports = {name: free_port() for name in ("emulator", "api", "worker")}
    env = {
        **os.environ,
        "REDIS_URL": redis.url,
        "RUNCOMFY_BASE_URL": f"http://127.0.0.1:{ports['emulator']}",
        "RUNCOMFY_API_TOKEN": TOKEN,
        "GATEWAY_TENANTS_FILE": str(tenants),
        "GATEWAY_LOG_LEVEL": "DEBUG",
        "GATEWAY_POLL_INTERVAL_MIN_S": "0.1",
        "GATEWAY_POLL_INTERVAL_MAX_S": "0.2",
        "GATEWAY_WEBHOOK_RETRY_SCHEDULE": "0.1,0.1",
        "GATEWAY_SHUTDOWN_S": "3",
        **NO_PREFLIGHT,
    }
    emulator_args = ["--port", str(ports["emulator"]), "--token", TOKEN, "--seed", "7"]
    emulator_args += ["--queue-s", "0.2", "--run-s", "0.2"]
    procs = {
        "emulator": Process(["emulator", *emulator_args], env, tmp / "emulator.log"),
        "api": Process(
            ["api", "--host", "127.0.0.1", "--port", str(ports["api"])], env, tmp / "api.log"
        ),
        "worker": Process(
            ["worker", "--metrics-port", str(ports["worker"])], env, tmp / "worker.log"
        ),
    }
    result = Run()
    hooks = {"response": [recorder(result)]}
    receiver, failing = await Receiver().start(), await Receiver(statuses=[500] * 50).start()
    try:
        wait_http(f"http://127.0.0.1:{ports['emulator']}/_emulator/requests")
        wait_http(f"http://127.0.0.1:{ports['api']}/healthz")
        wait_http(f"http://127.0.0.1:{ports['worker']}/healthz")
        base = f"http://127.0.0.1:{ports['api']}"
        worker_url = f"http://127.0.0.1:{ports['worker']}"
        async with (
            httpx.AsyncClient(base_url=base, event_hooks=hooks, timeout=10) as anonymous,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['emulator']}") as emulator,
            httpx.AsyncClient(base_url=worker_url, event_hooks=hooks, timeout=10) as worker,
        ):
            orders = httpx.AsyncClient(
                base_url=base,
                event_hooks=hooks,
                timeout=10,
                headers={"Authorization": f"Bearer {ORDERS.api_key}"},
            )
            billing = httpx.AsyncClient(
                base_url=base,
                event_hooks=hooks,
                timeout=10,
                headers={"Authorization": f"Bearer {BILLING.api_key}"},
            )
            async with orders, billing:
                receivers = (receiver, failing)
                await _story(result, anonymous, orders, billing, emulator, worker, receivers)
                await _reload_a_plain_key(tenants, procs)
            await worker.get("/healthz")
            await worker.get("/metrics")
    finally:
        for proc in procs.values():
            proc.stop()
        await receiver.stop()
        await failing.stop()
        redis.cleanup()
    result.logs = {name: proc.output() for name, proc in procs.items()}
    for received in receiver.received + failing.received:
        head = "\n".join(f"{k}: {v}" for k, v in received.headers.items())
        result.webhooks.append(f"{head}\n\n{received.body.decode()}")
    return result


async def _story(  # noqa: PLR0917 - the cast of the story
    run: Run,
    anonymous: httpx.AsyncClient,
    orders: httpx.AsyncClient,
    billing: httpx.AsyncClient,
    emulator: httpx.AsyncClient,
    worker: httpx.AsyncClient,
    receivers: tuple[Receiver, Receiver],
) -> None:
    """Success and every failure within reach, each checked as it happens."""
    receiver, failing = receivers
    # Wrong API keys, the secrets themselves among them: 401, and none echoed.
    for credential in [
        "Bearer " + TOKEN,
        "Bearer " + ORDERS.whsecs[0],
        "Bearer " + ORDERS.api_key[:-1],
        "Bearer " + ORDERS.api_key + "x",
        "Basic " + base64.b64encode(f"{BILLING.id}:{BILLING.api_key}".encode()).decode(),
        ORDERS.api_key,
    ]:
        answer = await anonymous.post(
            "/v1/jobs", json=job_body(), headers={"Authorization": credential}
        )
        assert answer.status_code == 401, answer.text
    # A bad Idempotency-Key, and a good one reused with another body.
    for key in ["", "k" * 256]:
        answer = await orders.post("/v1/jobs", json=job_body(), headers={"Idempotency-Key": key})
        assert answer.status_code == 400, answer.text
    first = await orders.post("/v1/jobs", json=job_body(), headers={"Idempotency-Key": "order-1"})
    other = {"input": {**job_body()["input"], "seed": 7}}
    again = await orders.post("/v1/jobs", json=other, headers={"Idempotency-Key": "order-1"})
    assert (first.status_code, again.status_code) == (202, 409), again.text

    # Success with a verified webhook, for both tenants.
    done = await _final(orders, await _submit(orders, job_body(receiver)))
    assert done["status"] == "completed", done
    await _final(billing, await _submit(billing, job_body()))
    await wait_for(lambda: _now(receiver.received))
    receiver.received[0].verified_by(ORDERS.whsecs[0])
    receiver.received[0].verified_by(ORDERS.whsecs[1])
    # Another tenant's job answers 404.
    assert (await billing.get(f"/v1/jobs/{done['id']}")).status_code == 404

    # A receiver answering 500 until the delivery fails; then a re-send.
    job_id = await _submit(orders, job_body(failing))
    await _final(orders, job_id)
    await wait_for(lambda: _webhook_state(orders, job_id, "failed"))
    assert (await orders.post(f"/v1/jobs/{job_id}/deliveries")).status_code == 202
    await wait_for(lambda: _now(len(failing.received) >= 4))
    assert (await orders.get(f"/v1/jobs/{job_id}/deliveries")).json()["items"]

    # A job RunComfy fails.
    await _configure(emulator, fail_rate=1.0)
    failed = await _final(orders, await _submit(orders, job_body(receiver)))
    assert failed["status"] == "failed", failed
    run.jobs["failed upstream"] = failed
    await _configure(emulator, fail_rate=0.0)

    # Submits answered 5xx, 429 and HTTP 200 with an error_code, then let through.
    for fault in ("error_5xx_rate", "rate_429", "http200_error_rate"):
        refused = await _submits_refused(worker)
        await _configure(emulator, faults_on_submit_only=True, **{fault: 1.0})
        job_id = await _submit(orders, job_body())
        await wait_for(lambda refused=refused: _more(_submits_refused(worker), refused))
        await _configure(emulator, **{fault: 0.0})
        run.jobs[fault] = await _final(orders, job_id, timeout=30)
        assert run.jobs[fault]["status"] == "completed", run.jobs[fault]

    # RunComfy stops taking our token: the job fails, saying why, without the token.
    await _configure(emulator, token=REVOKED_TOKEN)
    revoked = await _final(orders, await _submit(orders, job_body(receiver)))
    assert revoked["status"] == "failed", revoked
    run.jobs["token revoked"] = revoked
    await _configure(emulator, token=TOKEN)

    # Everything else a caller or an operator reads.
    for client in (orders, billing):
        await client.get("/v1/jobs")
        await client.get("/v1/jobs?status=failed")
    await orders.get("/readyz")
    await orders.get("/metrics")
    await orders.get("/openapi.json")


async def _reload_a_plain_key(tenants: Path, procs: dict[str, Process]) -> None:
    """A tenants file with a plain key pasted in is refused on SIGHUP, without echoing it."""
    tenants.write_text(ORDERS.toml(plain_key=True) + "\n" + BILLING.toml())
    for name in ("api", "worker"):
        procs[name].proc.send_signal(signal.SIGHUP)
    for name in ("api", "worker"):
        await wait_for(lambda name=name: _now("reload refused" in procs[name].output()))


async def _configure(emulator: httpx.AsyncClient, **config: Any) -> None:
    answer = await emulator.post("/_emulator/config", json=config)
    assert answer.status_code == 200, answer.text


async def _submit(client: httpx.AsyncClient, body: dict[str, Any]) -> str:
    answer = await client.post("/v1/jobs", json=body)
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["id"]
    return job_id


async def _final(client: httpx.AsyncClient, job_id: str, timeout: float = 20) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        job: dict[str, Any] = (await client.get(f"/v1/jobs/{job_id}")).json()
        return job if job["status"] in {"completed", "failed", "cancelled"} else None

    job: dict[str, Any] = await wait_for(check, timeout=timeout)
    return job


async def _submits_refused(worker: httpx.AsyncClient) -> float:
    """How many submits RunComfy refused, as the worker's metrics count them."""
    text = (await worker.get("/metrics")).text
    prefix = 'rcg_upstream_errors_total{call="submit",'
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(prefix)
    )


async def _more(count: Awaitable[float], than: float) -> bool:
    return await count > than


async def _webhook_state(client: httpx.AsyncClient, job_id: str, state: str) -> bool:
    job = (await client.get(f"/v1/jobs/{job_id}")).json()
    return bool(job["webhook"]["state"] == state)


async def _now(value: Any) -> Any:
    return value


# What the run left behind, searched


def test_the_search_finds_a_secret_where_there_is_one():
    """The search is not blind: a tenants file with a plain key shows the key and both secrets."""
    found = set(leaks(ORDERS.toml(plain_key=True)))
    assert found == {
        "orders API key",
        "orders webhook secret 0",
        "orders webhook secret 0, base64",
        "orders webhook secret 1",
        "orders webhook secret 1, base64",
    }


def test_the_run_went_through_every_failure(run):
    """The run saw 401, 400, 409, 404, failed jobs, a failing receiver, faults and DEBUG logs."""
    assert {200, 202, 400, 401, 404, 409} <= run.statuses
    assert run.jobs["failed upstream"]["error"]["code"]
    assert run.jobs["token revoked"]["error"]["code"] == "upstream_auth"
    for fault in ("error_5xx_rate", "rate_429", "http200_error_rate"):
        # Each fault is a definite answer: retried, and only the accepted submit was paid.
        assert run.jobs[fault]["upstream_submits"] == 1, run.jobs[fault]
    assert "rate limited us (429)" in run.logs["worker"]
    assert "reload refused" in run.logs["api"]
    assert "reload refused" in run.logs["worker"]
    assert any("DEBUG" in log for log in run.logs.values())
    assert len(run.webhooks) >= 7


@pytest.mark.parametrize("process", ["api", "worker", "emulator"])
def test_no_secret_is_in_a_process_log(run, process):
    """A process's complete log, at DEBUG, holds no token, API key or webhook secret."""
    assert run.logs[process]
    assert leaks(run.logs[process]) == []


def test_no_secret_is_in_any_answer(run):
    """No answer of the API or the worker, headers or body, holds a secret."""
    assert len(run.answers) > 40
    found = {name for answer in run.answers for name in leaks(answer)}
    assert found == set()


def test_no_secret_is_in_a_webhook(run):
    """Webhooks carry signatures made with the secrets, never the secrets themselves."""
    found = {name for webhook in run.webhooks for name in leaks(webhook)}
    assert found == set()


@pytest.mark.parametrize(
    "tenants_file",
    [
        ORDERS.toml(plain_key=True),
        ORDERS.toml().replace("callback_hosts", "webhook_secret = 1\ncallback_hosts"),
        ORDERS.toml() + f'\n[tenants.orders]\napi_keys = ["{ORDERS.api_key}"]\n',
        ORDERS.toml().replace(ORDERS.whsecs[1] + '"', ORDERS.whsecs[1]),
        ORDERS.toml().replace(ORDERS.whsecs[0], ORDERS.whsecs[0][:-3] + "*=="),
    ],
    ids=["plain-key", "repeated-secret-key", "repeated-table", "unterminated", "not-base64"],
)
def test_a_bad_tenants_file_is_refused_without_echoing_it(tmp_path, tenants_file):
    """A tenants file that does not parse stops the API (exit 2) without showing a secret of it."""
    path = tmp_path / "tenants.toml"
    path.write_text(tenants_file)
    env = {
        **os.environ,
        "REDIS_URL": "redis://127.0.0.1:1",
        "RUNCOMFY_API_TOKEN": TOKEN,
        "GATEWAY_TENANTS_FILE": str(path),
        "GATEWAY_LOG_LEVEL": "DEBUG",
    }
    done = subprocess.run(
        [*CLI, "api"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2, done.stderr
    assert leaks(done.stdout + done.stderr) == []
