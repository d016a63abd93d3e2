"""Upstream slots belong to a job's claim: a worker that dies holding them never stalls submits."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.localredis import LocalRedis, free_port
from tests.support import Process, gateway_env, new_tenant, wait_for, wait_http

pytestmark = pytest.mark.e2e

TENANT = new_tenant("slots")
CAP = 4
JOBS = 10
FINAL = {"completed", "failed", "cancelled"}


async def _jobs(api: httpx.AsyncClient, ids: list[str]) -> list[dict[str, Any]]:
    return [(await api.get(f"/v1/jobs/{i}")).json() for i in ids]


@pytest.mark.parametrize(
    "stop_signal", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"]
)
async def test_a_worker_stopped_while_every_slot_is_held_does_not_stall_submits(
    tmp_path: Path, stop_signal: signal.Signals
) -> None:
    """Jobs whose submits were in flight when their worker died are taken up by the next worker.

    Every upstream slot is held by a job whose paid submit is on the way when the
    worker is killed (or stopped); a fresh worker must still end those jobs and
    submit every other pending job.
    """
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(TENANT.toml())
    ports = {name: free_port() for name in ("emulator", "api", "w1", "w2")}
    emulator_url = f"http://127.0.0.1:{ports['emulator']}"
    with LocalRedis() as redis:
        env = gateway_env(
            redis.url,
            emulator_url,
            tenants,
            LEASE_S="3",
            UPSTREAM_TIMEOUT_S="2.5",
            UPSTREAM_MAX_IN_FLIGHT=str(CAP),
            SHUTDOWN_S="0.5",
        )
        procs = {
            "emulator": Process(
                [
                    "emulator",
                    "--port",
                    str(ports["emulator"]),
                    "--latency-ms",
                    "2000",
                    "--run-s",
                    "1",
                ],
                env,
                tmp_path / "emulator.log",
            ),
            "api": Process(
                ["api", "--host", "127.0.0.1", "--port", str(ports["api"])], env, tmp_path / "a.log"
            ),
            "w1": Process(["worker", "--metrics-port", str(ports["w1"])], env, tmp_path / "w1.log"),
        }
        headers = {"Authorization": f"Bearer {TENANT.api_key}"}
        try:
            wait_http(f"{emulator_url}/_emulator/requests")
            wait_http(f"http://127.0.0.1:{ports['api']}/healthz")
            async with httpx.AsyncClient(
                base_url=f"http://127.0.0.1:{ports['api']}", headers=headers, timeout=10
            ) as api:
                body = {"input": {"prompt": "p", "video_url": "https://example.com/v.mp4"}}
                ids = [(await api.post("/v1/jobs", json=body)).json()["id"] for _ in range(JOBS)]

                async def every_slot_sending() -> bool:
                    jobs = await _jobs(api, ids)
                    return sum(j["upstream_submits"] == 1 for j in jobs) == CAP

                await wait_for(every_slot_sending, timeout=20)
                procs["w1"].stop(stop_signal)
                async with httpx.AsyncClient(base_url=emulator_url) as emulator:
                    await emulator.post("/_emulator/config", json={"latency_ms": 0})
                procs["w2"] = Process(
                    ["worker", "--metrics-port", str(ports["w2"])], env, tmp_path / "w2.log"
                )

                async def all_final() -> list[dict[str, Any]] | None:
                    jobs = await _jobs(api, ids)
                    return jobs if all(j["status"] in FINAL for j in jobs) else None

                jobs = await wait_for(all_final, timeout=45, every=0.2)
        finally:
            for proc in procs.values():
                proc.stop()
    outcomes = sorted((j["status"], (j["error"] or {}).get("code")) for j in jobs)
    # The jobs caught mid-submit end as the documented unknown-outcome policy says (not sent
    # twice); a submit the stopped worker did see answered may have completed instead.
    stranded = [o for o in outcomes if o != ("completed", None)]
    assert all(o == ("failed", "upstream_submit_unknown") for o in stranded), outcomes
    assert len(stranded) <= CAP
    assert sum(o == ("completed", None) for o in outcomes) >= JOBS - CAP
