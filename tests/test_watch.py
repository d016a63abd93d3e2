"""End to end: waiting (`Prefer: wait`), event streams and per-job timeouts, with processes."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from service.localredis import LocalRedis, free_port
from tests.support import (
    Process,
    gateway_env,
    gateway_processes,
    job_stream,
    new_tenant,
    wait_for,
    wait_http,
)

pytestmark = pytest.mark.e2e

TENANT = new_tenant("orders")
OTHER = new_tenant("billing")
SOLO = new_tenant("solo")  # one upstream slot: its second job waits for it
FAST = {"queue_s": 0.5, "run_s": 0.5, "latency_ms": 0}


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """A Redis that keeps its data over a restart, the emulator, the API and a worker."""
    tmp = tmp_path_factory.mktemp("watch")
    tenants = tmp / "tenants.toml"
    solo = SOLO.toml() + "max_in_flight = 1\n"
    tenants.write_text(f"{TENANT.toml()}\n{OTHER.toml()}\n{solo}")
    redis = LocalRedis(appendonly=True).start()
    ports = {name: free_port() for name in ("emulator", "api", "worker")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    env = gateway_env(redis.url, urls["emulator"], tenants)
    procs = gateway_processes(ports, env, tmp, ["--queue-s", "0.5", "--run-s", "0.5"])
    try:
        yield {**urls, "redis": redis, "env": env, "tmp": tmp}
    finally:
        for proc in procs.values():
            proc.stop()
        redis.cleanup()


def client(stack: dict[str, Any], tenant=TENANT) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {tenant.api_key}"}
    return httpx.AsyncClient(base_url=stack["api"], headers=headers, timeout=90)


@pytest.fixture
async def api(stack) -> AsyncIterator[httpx.AsyncClient]:
    async with client(stack) as api:
        yield api


@pytest.fixture
async def emulator(stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack["emulator"], timeout=10) as emulator:
        yield emulator
        await emulator.post("/_emulator/config", json=FAST)


def job_body(**extra: Any) -> dict[str, Any]:
    return {"input": {"prompt": "a paper boat", "video_url": "https://example.com/in.mp4"}, **extra}


async def submitted(api: httpx.AsyncClient, **extra: Any) -> dict[str, Any]:
    answer = await api.post("/v1/jobs", json=job_body(**extra))
    assert answer.status_code == 202, answer.text
    return answer.json()


async def upstream_requests(emulator: httpx.AsyncClient, prompt: str) -> list[dict[str, Any]]:
    """The requests RunComfy created for jobs with this prompt (each one a paid submit)."""
    items = (await emulator.get("/_emulator/requests")).json()["items"]
    return [item for item in items if item["input"]["prompt"] == prompt]


# -- Prefer: wait ------------------------------------------------------------------------


async def test_a_submit_that_waits_answers_the_final_job(api):
    """POST with `Prefer: wait=30` answers 202 with the completed job and Preference-Applied."""
    answer = await api.post("/v1/jobs", json=job_body(), headers={"Prefer": "wait=30"})
    assert answer.status_code == 202
    assert answer.json()["status"] == "completed"
    assert answer.headers["preference-applied"] == "wait=30"
    assert answer.headers["location"] == f"/v1/jobs/{answer.json()['id']}"


async def test_a_wait_ends_after_n_seconds_with_the_job_as_it_stands(api, emulator):
    """A wait of 1 s on a job queued for 30 s answers after about 1 s, job not final."""
    await emulator.post("/_emulator/config", json={"queue_s": 30})
    started = time.monotonic()
    answer = await api.post("/v1/jobs", json=job_body(), headers={"Prefer": "wait=1"})
    posted_s = time.monotonic() - started
    job = answer.json()
    started = time.monotonic()
    read = await api.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=1"})
    read_s = time.monotonic() - started
    assert (answer.status_code, answer.headers["preference-applied"]) == (202, "wait=1")
    assert job["status"] in {"pending", "in_queue"}
    assert 1 <= posted_s < 3
    assert (read.status_code, read.headers["preference-applied"]) == (200, "wait=1")
    assert read.json()["status"] == "in_queue"
    assert 1 <= read_s < 3
    await api.post(f"/v1/jobs/{job['id']}/cancel")


async def test_a_final_job_answers_a_wait_at_once(api):
    """A bare `Prefer: wait` (60 s) on a completed job answers at once."""
    job = (await api.post("/v1/jobs", json=job_body(), headers={"Prefer": "wait=30"})).json()
    started = time.monotonic()
    answer = await api.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait"})
    assert time.monotonic() - started < 0.5
    assert answer.json()["status"] == "completed"
    assert answer.headers["preference-applied"] == "wait=60"


@pytest.mark.parametrize("prefer", ["wait=0", "wait=61", "wait=soon", "wait=1.5"])
async def test_an_invalid_wait_is_ignored(api, emulator, prefer):
    """An invalid `Prefer: wait` answers at once, without Preference-Applied."""
    await emulator.post("/_emulator/config", json={"queue_s": 30})
    job = await submitted(api)
    started = time.monotonic()
    answer = await api.get(f"/v1/jobs/{job['id']}", headers={"Prefer": prefer})
    assert time.monotonic() - started < 0.5
    assert answer.status_code == 200
    assert "preference-applied" not in answer.headers
    await api.post(f"/v1/jobs/{job['id']}/cancel")


async def test_a_waiter_wakes_within_100ms_of_the_workers_change(api, emulator):
    """The answer of a wait leaves the API within 100 ms of the worker finishing the job."""
    await emulator.post("/_emulator/config", json={"queue_s": 0.2, "run_s": 1.0})
    job = await submitted(api)
    answer = await api.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=20"})
    answered_at = time.time()
    finished = answer.json()
    assert finished["status"] == "completed"
    finished_at = datetime.fromisoformat(finished["finished_at"]).timestamp()
    assert answered_at - finished_at < 0.1


# -- event streams -------------------------------------------------------------------------


async def test_a_stream_sees_every_status_in_order_and_ends(api, emulator):
    """pending, in_queue, in_progress, completed, ids 1-4, each with the job; then the end."""
    await emulator.post("/_emulator/config", json={"latency_ms": 300})  # a visible pending
    job = await submitted(api)
    async with job_stream(api, job["id"]) as events:
        seen = [event async for event in events]
    assert [e.event for e in seen] == [
        "job.pending",
        "job.in_queue",
        "job.in_progress",
        "job.completed",
    ]
    assert [e.id for e in seen] == ["1", "2", "3", "4"]
    assert [e.data["status"] for e in seen] == ["pending", "in_queue", "in_progress", "completed"]
    assert {e.data["id"] for e in seen} == {job["id"]}


async def test_a_resumed_stream_sends_only_newer_events(api, emulator):
    """Last-Event-ID: 2 skips pending and in_queue; a final job resumed answers its end."""
    await emulator.post("/_emulator/config", json={"queue_s": 1.0, "run_s": 1.0})
    job = await submitted(api)
    async with job_stream(api, job["id"], **{"Last-Event-ID": "2"}) as events:
        resumed = [event.event async for event in events]
    async with job_stream(api, job["id"], **{"Last-Event-ID": "4"}) as events:
        after_the_end = [event.event async for event in events]
    assert resumed == ["job.in_progress", "job.completed"]
    assert after_the_end == ["job.completed"]


async def test_a_stream_sees_the_final_event_across_a_redis_restart(api, emulator, stack):
    """Redis restarts while a job runs: the stream still ends with job.completed."""
    await emulator.post("/_emulator/config", json={"queue_s": 0.2, "run_s": 4.0})
    job = await submitted(api)
    seen = []
    async with job_stream(api, job["id"], **{"Last-Event-ID": "2"}) as events:
        async for event in events:
            seen.append(event.event)
            if event.event == "job.in_progress":
                await asyncio.to_thread(stack["redis"].stop)
                await asyncio.to_thread(stack["redis"].start)
    assert seen == ["job.in_progress", "job.completed"]


async def test_another_tenants_job_has_no_stream(api, stack):
    """Another tenant's job answers 404 problem+json, not a stream."""
    job = await submitted(api)
    async with client(stack, OTHER) as other:
        answer = await other.get(f"/v1/jobs/{job['id']}/events")
    assert answer.status_code == 404
    assert answer.headers["content-type"].startswith("application/problem+json")


# -- per-job timeouts ----------------------------------------------------------------------


async def test_a_pending_job_fails_at_its_timeout_without_a_submit(emulator, stack):
    """A job waiting 10 s for its tenant's only slot fails with `timeout`; nothing was sent."""
    await emulator.post("/_emulator/config", json={"queue_s": 60})
    async with client(stack, SOLO) as solo:
        holder = await submitted(solo, timeout_s=60)
        await wait_for(lambda: solo_status(solo, holder["id"], "in_queue"))
        job = await submitted(solo, timeout_s=10, input={**job_body()["input"], "prompt": "late"})
        answer = await solo.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=20"})
        await solo.post(f"/v1/jobs/{holder['id']}/cancel")
    failed = answer.json()
    assert (failed["status"], failed["error"]["code"]) == ("failed", "timeout")
    assert failed["timeout_s"] == 10
    assert failed["upstream_submits"] == 0
    assert await upstream_requests(emulator, "late") == []


async def test_a_queued_job_is_cancelled_upstream_at_its_timeout(api, emulator):
    """A job still in RunComfy's queue at 10 s is cancelled there, then fails with `timeout`."""
    failed, request = await timed_out(api, emulator, "queued too long", queue_s=60)
    assert "nothing was paid" in failed["error"]["message"]
    assert request["status"] == "cancelled"


async def test_a_running_job_fails_at_its_timeout_and_says_the_run_went_on(api, emulator):
    """A job running at 10 s fails with `timeout`; RunComfy's run carries on, submitted once."""
    failed, request = await timed_out(api, emulator, "running too long", queue_s=0.2, run_s=60)
    assert "the RunComfy run went on" in failed["error"]["message"]
    assert request["status"] == "in_progress"


async def timed_out(
    api: httpx.AsyncClient, emulator: httpx.AsyncClient, prompt: str, **config: float
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A job with a 10 s timeout_s, once failed with `timeout`, and its one upstream request."""
    await emulator.post("/_emulator/config", json=config)
    job = await submitted(api, timeout_s=10, input={**job_body()["input"], "prompt": prompt})
    failed = (await api.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=20"})).json()
    assert (failed["status"], failed["error"]["code"]) == ("failed", "timeout")
    assert failed["upstream_submits"] == 1
    [request] = await upstream_requests(emulator, prompt)
    return failed, request


async def solo_status(api: httpx.AsyncClient, job_id: str, status: str) -> bool:
    return (await api.get(f"/v1/jobs/{job_id}")).json()["status"] == status


# -- shutdown ----------------------------------------------------------------------------------


async def test_sigterm_answers_waits_and_ends_streams(emulator, stack):
    """At SIGTERM a 60 s wait answers the job as it stands, a stream ends, the API exits."""
    await emulator.post("/_emulator/config", json={"queue_s": 60})
    port = free_port()
    api_process = Process(
        ["api", "--host", "127.0.0.1", "--port", str(port)], stack["env"], stack["tmp"] / "api2.log"
    )
    try:
        wait_http(f"http://127.0.0.1:{port}/healthz")
        async with client({**stack, "api": f"http://127.0.0.1:{port}"}) as api:
            job = await submitted(api)
            waiting = asyncio.create_task(
                api.get(f"/v1/jobs/{job['id']}", headers={"Prefer": "wait=60"})
            )
            async with job_stream(api, job["id"]) as events:
                first = await anext(events)
                api_process.proc.send_signal(signal.SIGTERM)
                started = time.monotonic()
                rest = [event async for event in events]
                answer = await waiting
                ended_s = time.monotonic() - started
        # It exits by itself (uvicorn ends by raising the signal it caught again).
        exit_code = await asyncio.to_thread(api_process.proc.wait, 5)
    finally:
        api_process.stop()
    async with client(stack) as api:
        await api.post(f"/v1/jobs/{job['id']}/cancel")
    assert first.event in {"job.pending", "job.in_queue"}
    assert rest == []
    assert (answer.status_code, answer.headers["preference-applied"]) == (200, "wait=60")
    assert answer.json()["status"] in {"pending", "in_queue"}
    assert ended_s < 2
    assert exit_code in {0, -signal.SIGTERM}
