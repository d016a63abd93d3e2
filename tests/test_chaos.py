"""Chaos: faults upstream, a worker SIGKILLed mid-flight, Redis restarted; nothing is lost.

120 jobs go through the emulator injecting about 30% faults (5xx, 429, HTTP-200
errors, dropped connections, failed jobs) to a receiver that refuses 20% of
deliveries. Two worker processes share the work; one is SIGKILLed mid-flight
and replaced; Redis (AOF, fsync always) is killed and restarted on the same
port. Every job must reach a final state, every final state's webhook must be
delivered and verify, and no paid submit may be repeated without the job
saying so. The figures are printed (run with `-s` to see them).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.localredis import LocalRedis, free_port
from tests.support import NO_PREFLIGHT, Process, Received, Receiver, new_tenant, wait_for, wait_http

pytestmark = pytest.mark.e2e

JOBS = 120
TENANT = new_tenant("chaos")
FINAL = {"completed", "failed", "cancelled"}


class FlakyReceiver(Receiver):
    """A receiver that answers 500 to a fifth of deliveries, at random."""

    def answer(self, delivery: Received) -> int:
        if random.random() < 0.2:
            return 500
        return super().answer(delivery)


async def test_no_job_or_webhook_is_lost_under_faults_crashes_and_restarts(tmp_path):  # noqa: PLR0915 - one scenario, told in order
    """Every job ends final with a verified webhook despite faults, a crash and a Redis restart."""
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(TENANT.toml())
    redis = LocalRedis(appendonly=True).start()
    receiver = await FlakyReceiver().start()
    ports = {name: free_port() for name in ("emulator", "api", "w1", "w2", "w3")}
    env = _env(redis.url, ports["emulator"], tenants)
    procs = _start(env, ports, tmp_path)
    api_url = f"http://127.0.0.1:{ports['api']}"
    headers = {"Authorization": f"Bearer {TENANT.api_key}"}
    try:
        wait_http(f"http://127.0.0.1:{ports['emulator']}/_emulator/requests")
        for name in ("api", "w1", "w2"):
            wait_http(f"http://127.0.0.1:{ports[name]}/healthz")
        async with httpx.AsyncClient(base_url=api_url, headers=headers, timeout=10) as api:
            ids = await asyncio.gather(*(_submit(api, receiver, n) for n in range(JOBS)))
            started = time.monotonic()

            await wait_for(lambda: _finished_at_least(api, ids, JOBS // 4), timeout=60)
            procs["w1"].stop(signal.SIGKILL)  # mid-flight: no drain, no release
            procs["w3"] = Process(
                ["worker", "--metrics-port", str(ports["w3"])], env, tmp_path / "w3.log"
            )

            await wait_for(lambda: _finished_at_least(api, ids, JOBS // 2), timeout=60)
            redis.kill()
            outage = await api.post("/v1/jobs", json=_body(receiver, -1))
            redis.start()

            jobs = await wait_for(lambda: _all_final(api, ids), timeout=120, every=0.2)
            elapsed = time.monotonic() - started
            await wait_for(lambda: _all_delivered(api, ids), timeout=60, every=0.2)

        delivered: dict[str, set[str]] = {}
        for item in receiver.received:
            event = item.verified_by(TENANT.whsec)  # raises unless the signature verifies
            delivered.setdefault(event["data"]["id"], set()).add(event["type"])
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports['emulator']}") as emu:
            upstream = (await emu.get("/_emulator/requests")).json()["items"]
    finally:
        for proc in procs.values():
            proc.stop()
        await receiver.stop()
        redis.cleanup()

    statuses = Counter(job["status"] for job in jobs)
    errors = Counter(job["error"]["code"] for job in jobs if job["error"])
    per_prompt = Counter(item["input"]["prompt"] for item in upstream)
    duplicated = {prompt: n for prompt, n in per_prompt.items() if n > 1}
    recorded = {job["input"]["prompt"]: job["upstream_submits"] for job in jobs}
    print(
        f"\nchaos: {JOBS} jobs final in {elapsed:.1f}s: {dict(statuses)} {dict(errors)}; "
        f"webhook deliveries received {len(receiver.received)} for {len(delivered)} jobs; "
        f"upstream submits {len(upstream)}, duplicated {len(duplicated)}; "
        f"503 during the Redis outage: {outage.status_code}"
    )
    assert set(statuses) <= FINAL
    assert sum(statuses.values()) == JOBS
    assert set(delivered) == set(ids)
    for job in jobs:
        expected = {"completed": "job.completed", "failed": "job.failed"}.get(job["status"])
        assert expected in delivered[job["id"]]
    # A paid submit is never repeated silently: any duplicate shows in the job.
    for prompt, n in duplicated.items():
        assert recorded[prompt] >= n
    assert outage.status_code == 503
    assert outage.headers["content-type"].startswith("application/problem+json")
    assert "Traceback" not in procs["api"].output()


def _start(env: dict[str, str], ports: dict[str, int], tmp: Path) -> dict[str, Process]:
    """The emulator (with ~30% faults), the API and two workers, as processes."""
    faults = [
        "--queue-s", "0.3", "--run-s", "0.3", "--seed", "7", "--token", "chaos-token",
        "--error-5xx-rate", "0.08", "--rate-429", "0.04", "--retry-after-s", "1",
        "--http200-error-rate", "0.06", "--drop-rate", "0.04", "--fail-rate", "0.08",
    ]  # fmt: skip
    return {
        "emulator": Process(
            ["emulator", "--port", str(ports["emulator"]), *faults], env, tmp / "emu.log"
        ),
        "api": Process(
            ["api", "--host", "127.0.0.1", "--port", str(ports["api"])], env, tmp / "api.log"
        ),
        "w1": Process(["worker", "--metrics-port", str(ports["w1"])], env, tmp / "w1.log"),
        "w2": Process(["worker", "--metrics-port", str(ports["w2"])], env, tmp / "w2.log"),
    }


def _env(redis_url: str, emulator_port: int, tenants: Path) -> dict[str, str]:
    return {
        **os.environ,
        "REDIS_URL": redis_url,
        "RUNCOMFY_BASE_URL": f"http://127.0.0.1:{emulator_port}",
        "RUNCOMFY_API_TOKEN": "chaos-token",
        "GATEWAY_TENANTS_FILE": str(tenants),
        "GATEWAY_POLL_INTERVAL_MIN_S": "0.1",
        "GATEWAY_POLL_INTERVAL_MAX_S": "0.5",
        "GATEWAY_WEBHOOK_RETRY_SCHEDULE": "0.2,0.5,1,1,1,1,1,1",
        "GATEWAY_LEASE_S": "3",
        "GATEWAY_UPSTREAM_TIMEOUT_S": "1",
        "GATEWAY_WEBHOOK_TIMEOUT_S": "1",
        "GATEWAY_SHUTDOWN_S": "2",
        "GATEWAY_UPSTREAM_MAX_IN_FLIGHT": "30",
        **NO_PREFLIGHT,
        "GATEWAY_UPSTREAM_RATE_PER_S": "200",
        "GATEWAY_UPSTREAM_BURST": "50",
        "GATEWAY_FUNDS_PAUSE_S": "1",
    }


def _body(receiver: Receiver, n: int) -> dict[str, Any]:
    return {
        "input": {"prompt": f"chaos job {n}", "video_url": "https://example.com/in.mp4"},
        "webhook": {"url": receiver.url},
    }


async def _submit(api: httpx.AsyncClient, receiver: Receiver, n: int) -> str:
    answer = await api.post("/v1/jobs", json=_body(receiver, n))
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


async def _jobs(api: httpx.AsyncClient, ids: list[str]) -> list[dict[str, Any]] | None:
    try:
        answers = await asyncio.gather(*(api.get(f"/v1/jobs/{i}") for i in ids))
    except httpx.TransportError:
        return None
    if any(a.status_code != 200 for a in answers):
        return None  # Redis is restarting: the API answers 503 meanwhile
    return [a.json() for a in answers]


async def _finished_at_least(api: httpx.AsyncClient, ids: list[str], n: int) -> bool:
    jobs = await _jobs(api, ids)
    return jobs is not None and sum(j["status"] in FINAL for j in jobs) >= n


async def _all_final(api: httpx.AsyncClient, ids: list[str]) -> list[dict[str, Any]] | None:
    jobs = await _jobs(api, ids)
    return jobs if jobs is not None and all(j["status"] in FINAL for j in jobs) else None


async def _all_delivered(api: httpx.AsyncClient, ids: list[str]) -> bool:
    jobs = await _jobs(api, ids)
    return jobs is not None and all(j["webhook"]["state"] == "delivered" for j in jobs)
