"""Tenants under pressure: one tenant's flood is throttled without slowing another's submits."""

from __future__ import annotations

import asyncio
import hashlib
import time

from service.config import load_settings
from service.store.jobs import JobStore
from tests.support import new_tenant, serve_api
from tests.test_api import HOSTS, job_body

FLOOD = new_tenant("flood")
QUIET = new_tenant("quiet")


def settings_for(tmp_path, redis_server):
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(
        FLOOD.toml(hosts=HOSTS)
        + "rate_per_s = 20\n\n"
        + QUIET.toml(hosts=HOSTS)
        + "rate_per_s = 20\n"
    )
    return load_settings(
        {
            "REDIS_URL": redis_server.url,
            "RUNCOMFY_API_TOKEN": "test-token",
            "GATEWAY_TENANTS_FILE": str(tenants),
        }
    )


async def test_a_flood_from_one_tenant_is_throttled_and_another_is_not_slowed(
    tmp_path, redis_server, keys
):
    """300 concurrent submits of one tenant get 429s; the other tenant's submits all pass."""
    settings = settings_for(tmp_path, redis_server)
    async with serve_api(settings, keys, FLOOD.api_key) as flood:
        quiet_headers = {"Authorization": f"Bearer {QUIET.api_key}"}

        async def quiet_submit() -> tuple[int, float]:
            started = time.perf_counter()
            answer = await flood.post("/v1/jobs", json=job_body(), headers=quiet_headers)
            return answer.status_code, time.perf_counter() - started

        flood_answers, quiet_answers = await asyncio.gather(
            asyncio.gather(*(flood.post("/v1/jobs", json=job_body()) for _ in range(300))),
            asyncio.gather(*(quiet_submit() for _ in range(10))),
        )
    flood_codes = [a.status_code for a in flood_answers]
    accepted, throttled = flood_codes.count(202), flood_codes.count(429)
    print(
        f"\nflood: 300 submits -> {accepted} accepted, {throttled} answered 429; "
        f"quiet tenant: {[c for c, _ in quiet_answers]}"
    )
    assert accepted + throttled == 300
    assert 1 <= accepted <= 40  # a one-second burst of 20, and what refills meanwhile
    assert all(a.headers.get("retry-after") for a in flood_answers if a.status_code == 429)
    assert [code for code, _ in quiet_answers] == [202] * 10


async def test_each_job_records_its_tenant_and_key_id_never_the_key(
    tmp_path, redis_server, keys, redis
):
    """The stored job names its tenant and a key id derived from the key's hash, not the key."""
    settings = settings_for(tmp_path, redis_server)
    async with serve_api(settings, keys, QUIET.api_key) as api:
        answer = await api.post("/v1/jobs", json=job_body())
        assert answer.status_code == 202
        job_id = answer.json()["id"]
        assert QUIET.api_key not in answer.text
    stored = await JobStore(redis, keys, retention_s=60).get(job_id)
    assert stored.record.tenant == "quiet"
    digest = hashlib.sha256(QUIET.api_key.encode()).hexdigest()
    assert stored.record.key_id == "key_" + digest[:12]
    stored_text = str(await redis.hgetall(keys.job(job_id)))
    assert stored.record.key_id in stored_text
    assert QUIET.api_key not in stored_text


async def test_another_tenants_job_is_404_on_every_route(tmp_path, redis_server, keys):
    """Every route that takes a job id answers the same 404 for another tenant's job."""
    settings = settings_for(tmp_path, redis_server)
    async with serve_api(settings, keys, QUIET.api_key) as api:
        job_id = (await api.post("/v1/jobs", json=job_body())).json()["id"]
        headers = {"Authorization": f"Bearer {FLOOD.api_key}"}
        answers = [
            await api.get(f"/v1/jobs/{job_id}", headers=headers),
            await api.post(f"/v1/jobs/{job_id}/cancel", headers=headers),
            await api.get(f"/v1/jobs/{job_id}/deliveries", headers=headers),
            await api.post(f"/v1/jobs/{job_id}/deliveries", headers=headers),
            await api.get("/v1/jobs/job_00000000000000000000000000", headers=headers),
        ]
        listed = (await api.get("/v1/jobs", headers=headers)).json()["items"]
    assert [a.status_code for a in answers] == [404] * 5
    bodies = {a.json()["detail"] for a in answers}
    assert len(bodies) == 1  # an unknown id and a foreign id read the same
    assert listed == []
