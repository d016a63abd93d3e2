"""Durable outputs end to end: `api`, `worker`, `emulator` and an S3 server (moto) as processes."""

from __future__ import annotations

import asyncio
import hashlib
import re
import signal
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from service.localredis import LocalRedis, free_port
from tests.support import (
    Process,
    S3Server,
    api_client,
    emulator_output,
    gateway_processes,
    new_tenant,
    outputs_env,
    process_rss_bytes,
    wait_for,
    wait_http,
)

pytestmark = pytest.mark.e2e

KEPT = new_tenant("kept")  # presigned URLs
PLAIN_S3 = new_tenant("plain_s3")  # s3:// URLs
TODAY = new_tenant("today")  # no output_store: RunComfy's URLs, as before
MB = 1024 * 1024
MAX_BYTES = 600 * MB


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_server: S3Server) -> Iterator[dict[str, Any]]:
    """Redis, the emulator, the API and a worker (lease 3 s) as processes, and a bucket."""
    tmp = tmp_path_factory.mktemp("outputs")
    bucket = s3_server.create_bucket()
    tenants = tmp / "tenants.toml"
    tenants.write_text(
        KEPT.toml()
        + f"[tenants.{KEPT.id}.output_store]\n"
        + s3_server.store_toml(bucket, "runcomfy/kept", presign_s=3600)
        + PLAIN_S3.toml()
        + f"[tenants.{PLAIN_S3.id}.output_store]\n"
        + s3_server.store_toml(bucket, "plain")
        + TODAY.toml()
    )
    redis = LocalRedis().start()
    ports = {name: free_port() for name in ("emulator", "api", "worker")}
    env = outputs_env(
        redis.url,
        f"http://127.0.0.1:{ports['emulator']}",
        tenants,
        LEASE_S="3",
        OUTPUT_MAX_BYTES=str(MAX_BYTES),
    )
    procs = gateway_processes(ports, env, tmp, ["--queue-s", "0.2", "--run-s", "0.2"])
    try:
        yield {
            "api": f"http://127.0.0.1:{ports['api']}",
            "emulator": f"http://127.0.0.1:{ports['emulator']}",
            "worker": f"http://127.0.0.1:{ports['worker']}",
            "procs": procs,
            "env": env,
            "tmp": tmp,
            "bucket": bucket,
        }
    finally:
        for proc in procs.values():
            proc.stop()
        redis.cleanup()


@pytest.fixture
async def emulator(stack) -> AsyncIterator[httpx.AsyncClient]:
    """The emulator's ops API; its output knobs are put back after each test."""
    async with httpx.AsyncClient(base_url=stack["emulator"], timeout=10) as client:
        yield client
        await client.post(
            "/_emulator/config",
            json={
                "output_bytes": 0,
                "output_bytes_per_s": 0,
                "output_host": "",
                "output_failures": 0,
            },
        )


async def submit(stack, tenant, receiver) -> str:
    async with api_client(stack["api"], tenant) as api:
        body = {
            "input": {"prompt": "a paper boat", "video_url": "https://example.com/in.mp4"},
            "webhook": {"url": receiver.url},
        }
        answer = await api.post("/v1/jobs", json=body)
        assert answer.status_code == 202, answer.text
        return str(answer.json()["id"])


async def final_job(stack, tenant, job_id: str, timeout: float = 30) -> dict[str, Any]:
    async with api_client(stack["api"], tenant) as api:

        async def check() -> dict[str, Any] | None:
            job = (await api.get(f"/v1/jobs/{job_id}")).json()
            return job if job["status"] in {"completed", "failed", "cancelled"} else None

        return await wait_for(check, timeout=timeout, every=0.05)  # type: ignore[no-any-return]


async def webhook_of(receiver, tenant, job_id: str) -> dict[str, Any]:
    async def arrived() -> dict[str, Any] | None:
        for delivery in receiver.received:
            event = delivery.verified_by(tenant.whsec)
            if event["data"]["id"] == job_id:
                return event  # type: ignore[no-any-return]
        return None

    return await wait_for(arrived)  # type: ignore[no-any-return]


async def copied_bytes(stack) -> float:
    """What the worker's metrics say it has streamed into stores so far, all tenants."""
    async with httpx.AsyncClient(timeout=5) as client:
        text = (await client.get(f"{stack['worker']}/metrics")).text
    return sum(
        float(v)
        for v in re.findall(r"^rcg_output_copy_bytes_total\{.*\} (\S+)$", text, re.MULTILINE)
    )


async def test_outputs_are_stored_before_the_webhook_which_points_at_them(
    stack, emulator, receiver, s3_server
):
    """A completed job's output is in the tenant's bucket, checksummed, and the webhook links it."""
    await emulator.post("/_emulator/config", json={"output_bytes": 5 * MB + 3})
    job_id = await submit(stack, KEPT, receiver)
    job = await final_job(stack, KEPT, job_id)
    assert job["status"] == "completed", job["error"]
    sha, size = emulator_output(5 * MB + 3)
    [file] = job["output_files"]
    assert file["bytes"] == size
    assert file["sha256"] == sha
    assert file["content_type"] == "video/mp4"
    assert (
        file["upstream_url"]
        == f"{stack['emulator']}/outputs/{file['upstream_url'].rsplit('/', 1)[1]}"
    )
    assert job["output"]["video"] == file["url"]
    assert file["url"].startswith(
        f"{s3_server.url}/{stack['bucket']}/runcomfy/kept/{job_id}/0.mp4?"
    )
    key = f"runcomfy/kept/{job_id}/0.mp4"
    assert await s3_server.objects(stack["bucket"], f"runcomfy/kept/{job_id}") == {key: size}
    assert await s3_server.sha256(stack["bucket"], key) == sha

    event = await webhook_of(receiver, KEPT, job_id)
    assert event["type"] == "job.completed"
    assert event["data"]["output"]["video"] == file["url"]
    assert event["data"]["output_files"] == job["output_files"]
    async with httpx.AsyncClient(timeout=30) as client:  # the presigned URL, as a receiver would
        answer = await client.get(event["data"]["output"]["video"])
    assert answer.status_code == 200
    assert len(answer.content) == size
    assert hashlib.sha256(answer.content).hexdigest() == sha


async def test_without_presign_the_output_is_an_s3_url(stack, receiver, s3_server):
    """A store without presign_s answers s3://bucket/key URLs."""
    job_id = await submit(stack, PLAIN_S3, receiver)
    job = await final_job(stack, PLAIN_S3, job_id)
    assert job["status"] == "completed", job["error"]
    key = f"plain/{job_id}/0.mp4"
    assert job["output"] == {"video": f"s3://{stack['bucket']}/{key}"}
    assert job["output_files"][0]["url"] == job["output"]["video"]
    assert key in await s3_server.objects(stack["bucket"], "plain/")


async def test_a_tenant_without_a_store_keeps_runcomfys_urls(stack, receiver):
    """No output_store: the job completes with RunComfy's URL and no output_files."""
    job_id = await submit(stack, TODAY, receiver)
    job = await final_job(stack, TODAY, job_id)
    assert job["status"] == "completed"
    assert job["output"]["video"].startswith(f"{stack['emulator']}/outputs/")
    assert job["output_files"] is None


@pytest.mark.parametrize(
    ("config", "reason"),
    [
        ({"output_bytes": MAX_BYTES + 1}, "GATEWAY_OUTPUT_MAX_BYTES"),
        ({"output_host": "localhost"}, "GATEWAY_OUTPUT_HOSTS"),
    ],
    ids=["over-the-cap", "host-not-allowed"],
)
async def test_an_output_that_cannot_be_copied_fails_the_job_at_once(
    stack, emulator, receiver, config, reason
):
    """Over the size cap, or on a host not allowed: output_copy_failed, RunComfy's URL kept."""
    await emulator.post("/_emulator/config", json=config)
    job_id = await submit(stack, KEPT, receiver)
    job = await final_job(stack, KEPT, job_id, timeout=15)
    assert job["status"] == "failed"
    assert job["error"]["code"] == "output_copy_failed"
    assert reason in job["error"]["message"]
    [file] = job["output_files"]
    assert file["url"] is None
    assert file["upstream_url"].endswith(".mp4")
    assert file["upstream_url"] in job["error"]["message"]
    event = await webhook_of(receiver, KEPT, job_id)
    assert event["type"] == "job.failed"
    assert event["data"]["output_files"][0]["upstream_url"] == file["upstream_url"]


async def test_an_output_that_fails_for_a_while_is_copied_on_a_later_try(
    stack, emulator, receiver, s3_server
):
    """RunComfy's output answers 503 twice: the copier backs off, tries again, stores it."""
    await emulator.post("/_emulator/config", json={"output_bytes": MB, "output_failures": 2})
    job_id = await submit(stack, KEPT, receiver)
    job = await final_job(stack, KEPT, job_id)
    assert job["status"] == "completed", job["error"]
    [file] = job["output_files"]
    assert file["sha256"] == emulator_output(MB)[0]
    request_id = job["upstream"]["request_id"]
    requests = (await emulator.get("/_emulator/requests")).json()["items"]
    [request] = [r for r in requests if r["request_id"] == request_id]
    assert request["output_gets"] == 3  # two 503s, then the copy
    key = f"runcomfy/kept/{job_id}/0.mp4"
    assert await s3_server.objects(stack["bucket"], f"runcomfy/kept/{job_id}/") == {key: MB}
    assert (await webhook_of(receiver, KEPT, job_id))["type"] == "job.completed"


async def test_a_worker_killed_mid_copy_leaves_it_to_another(stack, emulator, receiver, s3_server):
    """SIGKILL during a 100 MB copy: another worker copies it after the lease; one object."""
    size = 100 * MB
    await emulator.post(
        "/_emulator/config", json={"output_bytes": size, "output_bytes_per_s": 40 * MB}
    )
    job_id = await submit(stack, KEPT, receiver)
    await wait_for(lambda: _more_than(copied_bytes(stack), 10 * MB), timeout=20)
    stack["procs"]["worker"].stop(signal.SIGKILL)
    assert (await _get_job(stack, KEPT, job_id))["status"] == "in_progress"
    port = free_port()
    second = Process(["worker", "--metrics-port", str(port)], stack["env"], stack["tmp"] / "w2.log")
    stack["procs"]["worker"] = second
    stack["worker"] = f"http://127.0.0.1:{port}"
    await asyncio.to_thread(wait_http, f"{stack['worker']}/healthz")

    job = await final_job(stack, KEPT, job_id, timeout=40)
    assert job["status"] == "completed", job["error"]
    sha, _ = emulator_output(size)
    assert job["output_files"][0]["sha256"] == sha
    assert job["output_files"][0]["bytes"] == size
    key = f"runcomfy/kept/{job_id}/0.mp4"
    assert await s3_server.objects(stack["bucket"], f"runcomfy/kept/{job_id}/") == {key: size}
    assert await s3_server.sha256(stack["bucket"], key) == sha
    event = await webhook_of(receiver, KEPT, job_id)
    assert event["type"] == "job.completed"


async def test_a_500_mb_copy_keeps_the_worker_memory_flat(stack, emulator, receiver, s3_server):
    """The worker streams a 500 MB output: its RSS grows by far less than the output."""
    size = 500 * MB
    await emulator.post("/_emulator/config", json={"output_bytes": size})
    pid = stack["procs"]["worker"].proc.pid
    before = process_rss_bytes(pid)
    peak = before
    job_id = await submit(stack, KEPT, receiver)

    async def done() -> bool:
        nonlocal peak
        peak = max(peak, process_rss_bytes(pid))
        job = await _get_job(stack, KEPT, job_id)
        return job["status"] in {"completed", "failed"}

    await wait_for(done, timeout=60, every=0.02)
    job = await _get_job(stack, KEPT, job_id)
    assert job["status"] == "completed", job["error"]
    assert job["output_files"][0]["bytes"] == size
    growth = peak - before
    print(f"worker RSS before {before / MB:.1f} MiB, peak {peak / MB:.1f} MiB (500 MB copy)")
    assert growth < 100 * MB
    await s3_server.delete(stack["bucket"], f"runcomfy/kept/{job_id}/0.mp4")


async def _get_job(stack, tenant, job_id: str) -> dict[str, Any]:
    async with api_client(stack["api"], tenant) as api:
        return (await api.get(f"/v1/jobs/{job_id}")).json()  # type: ignore[no-any-return]


async def _more_than(value: Any, threshold: float) -> bool:
    return await value > threshold
