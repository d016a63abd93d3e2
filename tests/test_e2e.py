"""End to end: `api`, `worker` and `emulator` as processes, driven only through the contract."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.localredis import LocalRedis, free_port
from tests.support import (
    CLI,
    Process,
    api_client,
    gateway_env,
    gateway_processes,
    new_tenant,
    wait_for,
    wait_http,
)

pytestmark = pytest.mark.e2e

TENANT = new_tenant("orders")
OTHER = new_tenant("billing")


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Its own Redis, the emulator, the API and one worker, as separate processes."""
    tmp = tmp_path_factory.mktemp("e2e")
    tenants = tmp / "tenants.toml"
    tenants.write_text(TENANT.toml() + "\n" + OTHER.toml())
    redis = LocalRedis().start()
    ports = {name: free_port() for name in ("emulator", "api", "worker")}
    emulator_url = f"http://127.0.0.1:{ports['emulator']}"
    env = gateway_env(redis.url, emulator_url, tenants, token="e2e-token", SHUTDOWN_S="5")  # noqa: S106
    emulator_args = ["--queue-s", "0.5", "--run-s", "0.5", "--token", "e2e-token"]
    procs = gateway_processes(ports, env, tmp, emulator_args)
    try:
        yield {
            "api": f"http://127.0.0.1:{ports['api']}",
            "emulator": f"http://127.0.0.1:{ports['emulator']}",
            "worker": f"http://127.0.0.1:{ports['worker']}",
            "procs": procs,
            "env": env,
            "tmp": tmp,
        }
    finally:
        for proc in procs.values():
            proc.stop()
        redis.cleanup()


@pytest.fixture
async def api(stack) -> AsyncIterator[httpx.AsyncClient]:
    async with api_client(stack["api"], TENANT) as client:
        yield client


@pytest.fixture
async def emulator(stack) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=stack["emulator"], timeout=10) as client:
        yield client
        await client.post("/_emulator/config", json={"queue_s": 0.5, "run_s": 0.5, "fail_rate": 0})


def job_body(**extra: Any) -> dict[str, Any]:
    return {"input": {"prompt": "a paper boat", "video_url": "https://example.com/in.mp4"}, **extra}


async def final_job(api: httpx.AsyncClient, job_id: str, timeout: float = 20) -> dict[str, Any]:
    seen: list[str] = []

    async def check() -> dict[str, Any] | None:
        job = (await api.get(f"/v1/jobs/{job_id}")).json()
        if not seen or seen[-1] != job["status"]:
            seen.append(job["status"])
        return job if job["status"] in {"completed", "failed", "cancelled"} else None

    job = await wait_for(check, timeout=timeout, every=0.02)
    job["_seen"] = seen
    return job


async def test_a_job_goes_through_every_state_to_a_verified_webhook(api, receiver):
    """Submit → pending, in_queue, in_progress, completed, and a verified job.completed webhook."""
    answer = await api.post("/v1/jobs", json=job_body(webhook={"url": receiver.url}))
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert answer.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["status"] == "pending"
    assert job["input"]["num_frames"] == 129
    final = await final_job(api, job["id"])
    assert final["status"] == "completed"
    assert [s for s in final["_seen"] if s != "pending"] == ["in_queue", "in_progress", "completed"]
    assert final["output"]["video"].startswith("http")
    await wait_for(lambda: _async(len(receiver.received) >= 1))
    event = receiver.received[0].verified_by(TENANT.whsec)
    assert event["type"] == "job.completed"
    assert event["data"]["output"]["video"] == final["output"]["video"]

    async def logged() -> list[dict[str, Any]]:
        # The receiver has the webhook before the worker has its answer and logs it.
        return (await api.get(f"/v1/jobs/{job['id']}/deliveries")).json()["items"]

    deliveries = await wait_for(logged)
    assert deliveries[0]["status_code"] == 200


async def test_a_failed_upstream_job_sends_job_failed(api, emulator, receiver):
    """An upstream failure ends failed with RunComfy's error and a job.failed webhook."""
    await emulator.post("/_emulator/config", json={"fail_rate": 1.0})
    answer = await api.post("/v1/jobs", json=job_body(webhook={"url": receiver.url}))
    final = await final_job(api, answer.json()["id"])
    assert final["status"] == "failed"
    assert final["error"]["code"]
    assert final["error"]["message"]
    await wait_for(lambda: _async(len(receiver.received) >= 1))
    assert receiver.received[0].verified_by(TENANT.whsec)["type"] == "job.failed"


async def test_cancelling_a_queued_job_answers_202_then_cancels(api, emulator, receiver):
    """Cancel on an in_queue job answers 202 and the job ends cancelled with its webhook."""
    await emulator.post("/_emulator/config", json={"queue_s": 60})
    job = (await api.post("/v1/jobs", json=job_body(webhook={"url": receiver.url}))).json()
    await wait_for(lambda: _status_is(api, job["id"], "in_queue"))
    answer = await api.post(f"/v1/jobs/{job['id']}/cancel")
    assert answer.status_code == 202, answer.text
    final = await final_job(api, job["id"])
    assert final["status"] == "cancelled"
    await wait_for(lambda: _async(len(receiver.received) >= 1))
    assert receiver.received[0].verified_by(TENANT.whsec)["type"] == "job.cancelled"


async def test_cancelling_a_running_job_answers_409(api, emulator):
    """Cancel on an in_progress job answers 409: RunComfy cannot cancel running requests."""
    await emulator.post("/_emulator/config", json={"queue_s": 0, "run_s": 60})
    job = (await api.post("/v1/jobs", json=job_body())).json()
    await wait_for(lambda: _status_is(api, job["id"], "in_progress"))
    answer = await api.post(f"/v1/jobs/{job['id']}/cancel")
    assert answer.status_code == 409
    assert answer.headers["content-type"].startswith("application/problem+json")


async def test_invalid_input_is_rejected_and_never_reaches_runcomfy(api, emulator):
    """Invalid input answers 422 naming each field, and RunComfy sees no submit."""
    before = (await emulator.get("/_emulator/requests")).json()["submits"]
    body = {
        "input": {
            "prompt": "x",
            "video_url": "https://example.com/a.mp4",
            "num_frames": 100,
            "strength": 2,
        }
    }
    answer = await api.post("/v1/jobs", json=body)
    assert answer.status_code == 422
    pointers = {e["pointer"] for e in answer.json()["errors"]}
    assert pointers == {"#/input/num_frames", "#/input/strength"}
    assert (await emulator.get("/_emulator/requests")).json()["submits"] == before


async def test_another_tenants_job_is_not_found(api, stack):
    """A job id of another tenant answers 404, exactly like an unknown id."""
    job = (await api.post("/v1/jobs", json=job_body())).json()
    headers = {"Authorization": f"Bearer {OTHER.api_key}"}
    async with httpx.AsyncClient(base_url=stack["api"], headers=headers) as other:
        assert (await other.get(f"/v1/jobs/{job['id']}")).status_code == 404
        assert (await other.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 404


def test_worker_health_port_answers(stack):
    """The worker serves /healthz (loop heartbeat) and /metrics on its own port."""
    assert httpx.get(f"{stack['worker']}/healthz").status_code == 200
    assert "rcg_schedule_depth" in httpx.get(f"{stack['worker']}/metrics").text


def test_a_bad_configuration_exits_2_with_one_line(tmp_path):
    """A missing REDIS_URL or a malformed webhook secret stops the process with exit code 2."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "GATEWAY_"))}
    done = subprocess.run(
        [*CLI, "api"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2
    assert "REDIS_URL" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    bad = tmp_path / "t.toml"
    bad.write_text(TENANT.toml().replace(TENANT.whsec, "whsec_not base64!"))
    env["REDIS_URL"] = "redis://127.0.0.1:1"
    env["RUNCOMFY_API_TOKEN"] = "t"  # noqa: S105 - a dummy
    env["GATEWAY_TENANTS_FILE"] = str(bad)
    done = subprocess.run(
        [*CLI, "worker"], env=env, capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 2
    assert "webhook_secret" in done.stderr
    assert "not base64" not in done.stderr  # the secret itself is never echoed


def test_sigterm_drains_the_worker_and_exits_0(stack):
    """SIGTERM makes a worker stop claiming, release what it holds and exit 0 in time."""
    port = free_port()
    proc = Process(["worker", "--metrics-port", str(port)], stack["env"], stack["tmp"] / "w2.log")
    wait_http(f"http://127.0.0.1:{port}/healthz")
    started = time.monotonic()
    assert proc.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 5 + 2
    assert "Traceback" not in proc.output()


def test_dev_runs_everything_from_one_command(tmp_path):
    """`dev` runs everything; its curl, on the sample input it serves, gets a verified webhook.

    Pre-flight is on (the default): the sample passes it.
    """
    port = free_port()
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "GATEWAY_", "RUNCOMFY_"))
    }
    env["RUNCOMFY_EMULATOR_QUEUE_S"] = "0.2"
    env["RUNCOMFY_EMULATOR_RUN_S"] = "0.2"
    proc = Process(["dev", "--port", str(port)], env, tmp_path / "dev.log")
    try:
        banner = wait_sync(lambda: "Ctrl-C" in proc.output() and proc.output())
        key = re.search(r"Authorization: Bearer (\S+?)'", banner).group(1)
        body = re.search(r"-d '(\{.*\})'", banner).group(1)
        sample = json.loads(body)["input"]["video_url"]
        assert httpx.head(sample).headers["content-type"] == "video/mp4"
        answer = httpx.post(
            f"http://127.0.0.1:{port}/v1/jobs",
            content=body,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
        assert answer.status_code == 202, answer.text
        wait_sync(lambda: "webhook job.completed" in proc.output())
        assert re.search(
            r"webhook job.completed for \S+: signature verified .*video", proc.output()
        )
        redis_pids = _children(proc.proc.pid)
        assert redis_pids, "dev should run a private redis-server"
    finally:
        assert proc.stop(signal.SIGINT) == 0
    assert all(not _alive(pid) for pid in redis_pids)


def wait_sync(check: Any, timeout: float = 30) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def _children(pid: int) -> list[int]:
    found = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in found.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split()[2] != "Z"


async def _status_is(api: httpx.AsyncClient, job_id: str, status: str) -> bool:
    return (await api.get(f"/v1/jobs/{job_id}")).json()["status"] == status


async def _async(value: Any) -> Any:
    return value


async def test_sighup_reloads_the_tenants_file_and_a_bad_one_is_refused(stack):
    """SIGHUP makes the API take a new key from the file; an invalid file keeps the old keys."""
    added = new_tenant("late")
    tenants = Path(stack["env"]["GATEWAY_TENANTS_FILE"])
    original = tenants.read_text()
    api_proc = stack["procs"]["api"].proc

    async def status_for(key: str) -> int:
        async with httpx.AsyncClient(base_url=stack["api"]) as client:
            answer = await client.get("/v1/jobs", headers={"Authorization": f"Bearer {key}"})
            return answer.status_code

    assert await status_for(added.api_key) == 401
    tenants.write_text(original + "\n" + added.toml())
    api_proc.send_signal(signal.SIGHUP)
    await wait_for(lambda: _is(status_for(added.api_key), 200))
    tenants.write_text("this is [not toml")
    api_proc.send_signal(signal.SIGHUP)
    await wait_for(lambda: _async("reload refused" in stack["procs"]["api"].output()))
    assert await status_for(TENANT.api_key) == 200
    assert await status_for(added.api_key) == 200
    async with httpx.AsyncClient(base_url=stack["api"]) as client:
        assert "rcg_tenants_config_ok 0.0" in (await client.get("/metrics")).text
    tenants.write_text(original)


async def _is(coro: Any, expected: Any) -> bool:
    return await coro == expected


def test_sigterm_lets_the_api_finish_a_request_in_flight(stack, tmp_path):
    """A request still arriving when the API gets SIGTERM is answered before it exits."""
    port = free_port()
    proc = Process(
        ["api", "--host", "127.0.0.1", "--port", str(port)], stack["env"], tmp_path / "a.log"
    )
    wait_http(f"http://127.0.0.1:{port}/healthz")
    body = json.dumps(job_body()).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        head = (
            f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TENANT.api_key}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        conn.sendall(head.encode() + body[:10])  # the request is now in flight
        wait_sync(lambda: _has_connection(proc.proc.pid))
        proc.proc.send_signal(signal.SIGTERM)
        conn.sendall(body[10:])
        answer = conn.recv(65536).decode()
    assert answer.startswith("HTTP/1.1 202"), answer[:200]
    proc.stop()
    assert "Traceback" not in proc.output()


def _has_connection(pid: int) -> bool:
    found = subprocess.run(
        ["ss", "-tnp", "state", "established"], capture_output=True, text=True, check=False
    )
    return f"pid={pid}," in found.stdout
