"""Spend control end to end: two `api` processes, a `worker` and the emulator, one price."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from service.localredis import LocalRedis, free_port
from tests.support import Process, Receiver, gateway_env, new_tenant, wait_for, wait_http

pytestmark = pytest.mark.e2e

CAPPED = new_tenant("capped")  # 1 USD a day: four standard jobs at 0.25
TEAM = new_tenant("team")  # no budget
TOKEN = "spend-token"  # noqa: S105 - the emulator's, not a secret
BODY = {"input": {"prompt": "a paper boat", "video_url": "https://example.com/in.mp4"}}


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Redis, the emulator, two API processes and a worker, pricing a run at 0.25 USD."""
    tmp = tmp_path_factory.mktemp("spend")
    tenants = tmp / "tenants.toml"
    tenants.write_text(CAPPED.toml(budget_usd_per_day=1) + "\n" + TEAM.toml())
    redis = LocalRedis().start()
    ports = {name: free_port() for name in ("emulator", "api1", "api2", "worker")}
    emulator_url = f"http://127.0.0.1:{ports['emulator']}"
    env = gateway_env(redis.url, emulator_url, tenants, token=TOKEN, PRICE_USD="0.25")
    emulator = ["emulator", "--port", str(ports["emulator"]), "--token", TOKEN]
    procs = {
        "emulator": Process([*emulator, "--queue-s", "0.3", "--run-s", "0.3"], env, tmp / "e.log"),
        "worker": Process(["worker", "--metrics-port", str(ports["worker"])], env, tmp / "w.log"),
    }
    for name in ("api1", "api2"):
        args = ["api", "--host", "127.0.0.1", "--port", str(ports[name])]
        procs[name] = Process(args, env, tmp / f"{name}.log")
    try:
        for name, port in ports.items():
            probe = "_emulator/requests" if name == "emulator" else "healthz"
            wait_http(f"http://127.0.0.1:{port}/{probe}")
        yield {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    finally:
        for proc in procs.values():
            proc.stop()
        redis.cleanup()


@pytest.fixture
async def clients(stack) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """A client of each API process per tenant, of the emulator and of the worker."""
    async with contextlib.AsyncExitStack() as opened:

        async def client(base_url: str, api_key: str | None = None) -> httpx.AsyncClient:
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
            new = httpx.AsyncClient(base_url=base_url, headers=headers, timeout=10)
            return await opened.enter_async_context(new)

        yield {
            "capped1": await client(stack["api1"], CAPPED.api_key),
            "capped2": await client(stack["api2"], CAPPED.api_key),
            "team": await client(stack["api1"], TEAM.api_key),
            "emulator": await client(stack["emulator"]),
            "worker": await client(stack["worker"]),
        }


async def final(api: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    async def check() -> dict[str, Any] | None:
        job = (await api.get(f"/v1/jobs/{job_id}")).json()
        return job if job["status"] in {"completed", "failed", "cancelled"} else None

    return await wait_for(check, timeout=20, every=0.05)


async def test_a_daily_budget_admits_exactly_four_of_twelve_concurrent_submits(clients):
    """Twelve submits racing through two API processes: four fit 1 USD at 0.25, eight get 402."""
    apis = [clients["capped1"], clients["capped2"]]
    answers = await asyncio.gather(*(apis[i % 2].post("/v1/jobs", json=BODY) for i in range(12)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [202] * 4 + [402] * 8
    today = datetime.now(UTC).date()
    midnight = datetime(today.year, today.month, today.day, tzinfo=UTC) + timedelta(days=1)
    for answer in answers:
        if answer.status_code != 402:
            continue
        problem = answer.json()
        assert answer.headers["content-type"].startswith("application/problem+json")
        assert problem["type"].endswith("budget-exceeded")
        assert (problem["budget_usd"], problem["period"]) == (1.0, "day")
        # The worker may have finished some meanwhile: holds become charges, the sum stays.
        assert problem["charged_usd"] + problem["held_usd"] == 1.0
        assert datetime.fromisoformat(problem["resets_at"]) == midnight
    admitted = [a.json()["id"] for a in answers if a.status_code == 202]
    listed = (await apis[1].get("/v1/jobs")).json()["items"]
    assert sorted(j["id"] for j in listed) == sorted(admitted)
    for job_id in admitted:
        assert (await final(apis[0], job_id))["cost"] == {"estimate_usd": 0.25, "charged_usd": 0.25}
    usage = (await apis[1].get("/v1/usage")).json()
    assert usage["days"][-1]["charged_usd"] == 1.0
    assert usage["budget"]["day"]["held_usd"] == 0
    assert usage["budget"]["day"]["charged_usd"] == 1.0


async def test_charges_follow_what_runcomfy_ran_and_usage_adds_them_up(clients):
    """Completed jobs are charged (pro_mode double), a job RunComfy refused is charged 0."""
    api, emulator = clients["team"], clients["emulator"]
    receiver = await Receiver().start()
    try:
        pro = {"input": {**BODY["input"], "pro_mode": True}, "webhook": {"url": receiver.url}}
        ran = [(await api.post("/v1/jobs", json=b)).json() for b in (BODY, pro)]
        done = [await final(api, job["id"]) for job in ran]
        await emulator.post("/_emulator/config", json={"token": "another"})
        refused = await final(api, (await api.post("/v1/jobs", json=BODY)).json()["id"])
        await emulator.post("/_emulator/config", json={"token": TOKEN})
        await wait_for(lambda: asyncio.sleep(0, receiver.received))
        event = receiver.received[0].verified_by(TEAM.whsec)
    finally:
        await receiver.stop()
    assert [j["status"] for j in done] == ["completed", "completed"]
    assert [j["cost"] for j in done] == [
        {"estimate_usd": 0.25, "charged_usd": 0.25},
        {"estimate_usd": 0.5, "charged_usd": 0.5},
    ]
    assert event["data"]["cost"] == {"estimate_usd": 0.5, "charged_usd": 0.5}
    assert refused["status"] == "failed"
    assert refused["error"]["code"] == "upstream_auth"
    assert refused["cost"] == {"estimate_usd": 0.25, "charged_usd": 0.0}
    today = (await api.get("/v1/usage")).json()["days"][-1]
    assert today["jobs"] == {"completed": 2, "failed": 1, "cancelled": 0}
    assert (today["charged_usd"], today["held_usd"]) == (0.75, 0.0)
    assert today["charged_usd"] == sum(j["cost"]["charged_usd"] for j in [*done, refused])
    metrics = (await clients["worker"].get("/metrics")).text
    assert 'rcg_charged_usd_total{tenant="team"} 0.75' in metrics
