"""End to end: the input pre-flight, with `api`, `worker` and `emulator` as processes.

The emulator serves the inputs; the gateway may reach it on 127.0.0.1 because it is the one
allowed host (`GATEWAY_PREFLIGHT_ALLOW_HOSTS`). Every failing input must fail its job with
the right code and a job.failed webhook, and never reach RunComfy: no paid submit.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from service.localredis import LocalRedis, free_port
from tests.support import (
    Process,
    Receiver,
    api_client,
    gateway_env,
    new_tenant,
    redirects_to,
    wait_for,
    wait_http,
)

pytestmark = pytest.mark.e2e

TENANT = new_tenant("orders")
MAX_BYTES = 1_000_000
TIMEOUT_S = 0.5
FINAL = {"completed", "failed", "cancelled"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict[str, str]]:
    """Its own Redis, the emulator, the API and one worker, pre-flight on."""
    tmp = tmp_path_factory.mktemp("preflight")
    tenants = tmp / "tenants.toml"
    tenants.write_text(TENANT.toml())
    ports = {name: free_port() for name in ("emulator", "api", "worker")}
    emulator = f"http://127.0.0.1:{ports['emulator']}"
    with LocalRedis() as redis:
        env = gateway_env(
            redis.url,
            emulator,
            tenants,
            PREFLIGHT="on",
            PREFLIGHT_ALLOW_HOSTS="127.0.0.1",
            PREFLIGHT_TIMEOUT_S=str(TIMEOUT_S),
            INPUT_MAX_BYTES=str(MAX_BYTES),
        )
        emulator_args = ["--port", str(ports["emulator"]), "--queue-s", "0.2", "--run-s", "0.2"]
        procs = [
            Process(["emulator", *emulator_args], env, tmp / "emulator.log"),
            Process(
                ["api", "--host", "127.0.0.1", "--port", str(ports["api"])], env, tmp / "a.log"
            ),
            Process(["worker", "--metrics-port", str(ports["worker"])], env, tmp / "w.log"),
        ]
        try:
            wait_http(f"{emulator}/_emulator/requests")
            wait_http(f"http://127.0.0.1:{ports['api']}/healthz")
            wait_http(f"http://127.0.0.1:{ports['worker']}/healthz")
            yield {"api": f"http://127.0.0.1:{ports['api']}", "emulator": emulator}
        finally:
            for proc in procs:
                proc.stop()


@pytest.fixture
async def api(stack) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(stack["api"], TENANT) as client:
        yield client


async def run_job(
    api: httpx.AsyncClient, receiver: Receiver, video_url: str
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """Submit a job with its own prompt; its final state, its final webhook and the prompt."""
    prompt = f"a paper boat {uuid.uuid4().hex}"
    body = {"input": {"prompt": prompt, "video_url": video_url}, "webhook": {"url": receiver.url}}
    answer = await api.post("/v1/jobs", json=body)
    assert answer.status_code == 202, answer.text
    job_id = answer.json()["id"]

    async def final() -> dict[str, Any] | None:
        job = (await api.get(f"/v1/jobs/{job_id}")).json()
        return job if job["status"] in FINAL else None

    async def delivered() -> bool:
        return bool(receiver.received)

    job = await wait_for(final, timeout=20)
    await wait_for(delivered)
    return job, receiver.received[-1].verified_by(TENANT.whsec), prompt


async def emulator_state(stack: dict[str, str]) -> dict[str, Any]:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{stack['emulator']}/_emulator/requests")).json()  # type: ignore[no-any-return]


async def paid_submits(stack: dict[str, str], prompt: str) -> int:
    """The submits RunComfy (the emulator) took for the job with `prompt`."""
    items = (await emulator_state(stack))["items"]
    return sum(item["input"]["prompt"] == prompt for item in items)


async def assert_failed_unpaid(
    stack: dict[str, str], ran: tuple[dict[str, Any], dict[str, Any], str], code: str, says: str
) -> None:
    """The job and its webhook say failed with `code` (message saying `says`); nothing paid."""
    job, event, prompt = ran
    assert job["status"] == "failed"
    assert job["error"]["code"] == code
    assert says in job["error"]["message"]
    assert event["type"] == "job.failed"
    assert event["data"]["error"] == job["error"]
    assert await paid_submits(stack, prompt) == 0


async def test_a_valid_input_runs_to_completed(stack, api, receiver):
    """A video input within the limit is checked once, then submitted and completed."""
    name = f"ok-{uuid.uuid4().hex}.mp4"
    url = f"{stack['emulator']}/_emulator/inputs/{name}?size={MAX_BYTES}"
    job, event, prompt = await run_job(api, receiver, url)
    assert job["status"] == "completed", job
    assert event["type"] == "job.completed"
    assert await paid_submits(stack, prompt) == 1
    assert (await emulator_state(stack))["input_requests"][name] == 1


@pytest.mark.parametrize(
    "case",
    [
        ("status=404", "input_unreachable", "HTTP 404"),
        ("type=text/html", "input_not_video", "text/html"),
        (f"size={MAX_BYTES + 1}", "input_too_large", str(MAX_BYTES + 1)),
    ],
    ids=["missing", "html", "oversized"],
)
async def test_an_unusable_input_fails_its_job_unpaid(stack, api, receiver, case):
    """A 404, an HTML page or a too large input fails the job with its code; nothing is paid."""
    query, code, says = case
    name = f"bad-{uuid.uuid4().hex}"
    ran = await run_job(api, receiver, f"{stack['emulator']}/_emulator/inputs/{name}?{query}")
    await assert_failed_unpaid(stack, ran, code, says)
    assert (await emulator_state(stack))["input_requests"][name] == 1  # refused: not asked again


async def test_a_redirect_to_the_metadata_address_fails_unpaid_without_a_connection(
    stack, api, receiver
):
    """A redirect to 169.254.169.254 is refused by the guard at once, though 127.0.0.1 is allowed.

    Had the worker dialled it, nothing would answer and the check would time out and be
    asked again; it is asked once and refused for the address.
    """
    inputs = f"{stack['emulator']}/_emulator/inputs"
    url = redirects_to("http://169.254.169.254/latest/meta-data/", inputs, 1)
    ran = await run_job(api, receiver, url)
    await assert_failed_unpaid(stack, ran, "input_unreachable", "may not reach")
    assert (await emulator_state(stack))["input_requests"]["hop0"] == 1


async def test_a_slow_input_is_asked_three_times_then_fails_unpaid(stack, api, receiver):
    """An input slower than the check's deadline is retried with backoff, then input_unreachable."""
    name = f"slow-{uuid.uuid4().hex}.mp4"
    url = f"{stack['emulator']}/_emulator/inputs/{name}?delay_s={TIMEOUT_S * 3}"
    ran = await run_job(api, receiver, url)
    await assert_failed_unpaid(stack, ran, "input_unreachable", "asked 3 times")
    assert (await emulator_state(stack))["input_requests"][name] == 3
