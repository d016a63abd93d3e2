"""Operating it: admin keys, the admin API and recovery of failed deliveries."""

from __future__ import annotations

import base64
from datetime import timedelta
from typing import Any

import pytest

from service.config import ConfigError, Settings, load_settings, parse_tenants
from service.models import DeliveryAttempt, utcnow
from service.store.jobs import Outcome
from tests.support import BILLING, ORDERS, admins_toml, assert_problem, serve_api

TENANT = ORDERS
OTHER = BILLING
ADMIN_KEY = "adm_" + "5" * 32
HOSTS = ("hooks.example.com",)
HOOK = "https://hooks.example.com/rc?token=hunter2"
VIDEO = "https://example.com/in.mp4"


def job_body(**extra: Any) -> dict[str, Any]:
    return {"input": {"prompt": "a paper boat", "video_url": VIDEO}, **extra}


@pytest.fixture
def settings(tmp_path, redis_server) -> Settings:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(TENANT.toml(hosts=HOSTS) + OTHER.toml(hosts=HOSTS) + admins_toml(ADMIN_KEY))
    env = {
        "REDIS_URL": redis_server.url,
        "RUNCOMFY_API_TOKEN": "token-never-shown",
        "GATEWAY_TENANTS_FILE": str(tenants),
        "GATEWAY_PRICE_USD": "0.25",
    }
    return load_settings(env)


@pytest.fixture
async def admin(settings, keys):
    async with serve_api(settings, keys, ADMIN_KEY) as client:
        yield client


async def submit(client, **extra: Any) -> dict[str, Any]:
    answer = await client.post("/v1/jobs", json=job_body(**extra))
    assert answer.status_code == 202, answer.text
    return answer.json()


async def failed_webhook(client, deliveries, schedules, tenant: str) -> str:
    """A job cancelled at once whose `job.cancelled` webhook then failed for good; its id."""
    job = await submit(client, webhook={"url": HOOK})
    assert (await client.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 200
    claims = await schedules.claim("deliver", 100)
    [claim] = [c for c in claims if c.member.startswith("msg_" + job["id"][4:])]
    attempt = DeliveryAttempt(attempt=1, at=utcnow(), status_code=503, error="http_error")
    recorded = await deliveries.record_attempt(
        claim.member, claim.lease, attempt, tenant=tenant, state="failed", retry_in_s=None
    )
    assert recorded
    return str(job["id"])


# Keys


def test_admin_keys_parse_as_sha256_digests_never_plain_keys():
    """`[admins] api_keys` takes sha256 digests; a plain key is refused without echoing it."""
    tenants = parse_tenants(TENANT.toml() + admins_toml(ADMIN_KEY))
    assert tenants.authenticate_admin(ADMIN_KEY) is not None
    assert tenants.authenticate(ADMIN_KEY) is None
    assert tenants.authenticate_admin(TENANT.api_key) is None
    with pytest.raises(ConfigError) as error:
        parse_tenants(TENANT.toml() + '[admins]\napi_keys = ["plain-admin-key"]\n')
    assert "plain-admin-key" not in str(error.value)
    with pytest.raises(ConfigError, match="tenant and an admin"):
        parse_tenants(TENANT.toml() + admins_toml(TENANT.api_key))


async def test_an_admin_key_on_tenant_routes_and_a_tenant_key_on_admin_routes_answer_401(
    api, admin
):
    """Each kind of key is unknown to the other's routes: both answer 401, as no key does."""
    assert_problem(await admin.get("/v1/jobs"), 401)
    assert_problem(await admin.post("/v1/jobs", json=job_body()), 401)
    assert_problem(
        await admin.post("/v1/deliveries/recover", json={"since": "2026-01-01T00:00:00Z"}), 401
    )
    assert_problem(await api.get("/v1/admin/overview"), 401)
    assert_problem(await api.get("/v1/admin/jobs"), 401)
    assert_problem(
        await api.post("/v1/admin/deliveries/recover", json={"since": "2026-01-01T00:00:00Z"}), 401
    )
    assert (await admin.get("/v1/admin/overview")).status_code == 200


# The admin API


async def test_the_overview_counts_each_tenants_jobs_and_the_backlog(api, other, admin):
    """Two pending jobs of one tenant and one of another show in the overview and the backlog."""
    await submit(api)
    await submit(api)
    await submit(other)
    overview = (await admin.get("/v1/admin/overview")).json()
    tenants = {t["tenant"]: t for t in overview["tenants"]}
    assert set(tenants) == {"orders", "billing"}
    assert tenants["orders"]["jobs"]["pending"] == 2
    assert tenants["billing"]["jobs"]["pending"] == 1
    assert tenants["orders"]["charged_today_usd"] == 0
    assert tenants["orders"]["failed_deliveries"] == 0
    assert overview["backlog"] == 3
    assert overview["upstream_slots"] == {"used": 0, "limit": 20}
    assert overview["pause"] is None


async def test_the_activity_counts_jobs_created_this_minute(api, admin):
    """A job created shows in the current minute of the activity."""
    await submit(api)
    minutes = (await admin.get("/v1/admin/activity", params={"minutes": 5})).json()["minutes"]
    assert len(minutes) == 5
    assert minutes[-1]["created"] >= 1


async def test_admin_lists_every_tenants_jobs_filters_by_tenant_and_finds_by_id(api, other, admin):
    """Jobs of all tenants newest first; `tenant=` filters; `q=` finds one job by its id."""
    first = await submit(api)
    second = await submit(other)
    listed = (await admin.get("/v1/admin/jobs")).json()
    assert [(i["tenant"], i["job"]["id"]) for i in listed["items"]] == [
        ("billing", second["id"]),
        ("orders", first["id"]),
    ]
    only = (await admin.get("/v1/admin/jobs", params={"tenant": "orders"})).json()["items"]
    assert [i["job"]["id"] for i in only] == [first["id"]]
    found = (await admin.get("/v1/admin/jobs", params={"q": second["id"]})).json()["items"]
    assert [i["job"]["id"] for i in found] == [second["id"]]
    none = await admin.get("/v1/admin/jobs", params={"q": second["id"], "tenant": "orders"})
    assert none.json()["items"] == []


async def test_admin_finds_a_job_by_its_runcomfy_request_id(api, admin, jobs, schedules):
    """Once RunComfy accepted a job, its request id finds it."""
    job = await submit(api)
    [claim] = await schedules.claim_submits(10, global_cap=10, tenant_caps={})
    outcome, stored = await jobs.record_submit(await jobs.get(job["id"]), claim.lease)
    assert outcome is Outcome.DONE
    assert await jobs.submitted(stored, claim.lease, "req-4711", poll_in_s=60) is Outcome.DONE
    found = (await admin.get("/v1/admin/jobs", params={"q": "req-4711"})).json()["items"]
    assert [i["job"]["id"] for i in found] == [job["id"]]
    assert found[0]["job"]["status"] == "in_queue"
    assert (await admin.get("/v1/admin/jobs", params={"q": "req-none"})).json()["items"] == []


async def test_admin_reads_any_job_with_its_submits_and_attempt_log(
    api, admin, deliveries, schedules
):
    """A tenant's job, read by an admin, carries its tenant, submits and attempt log."""
    job_id = await failed_webhook(api, deliveries, schedules, "orders")
    detail = (await admin.get(f"/v1/admin/jobs/{job_id}")).json()
    assert detail["tenant"] == "orders"
    assert detail["job"]["status"] == "cancelled"
    assert detail["job"]["webhook"]["state"] == "failed"
    assert detail["submits"] == []
    assert [a["status_code"] for a in detail["attempts"]] == [503]
    assert detail["webhook_id"].startswith("msg_")
    assert_problem(await admin.get("/v1/admin/jobs/job_01KAWJ6X3Z8Q4N5R7T9V2W4Y6A"), 404)


async def test_admin_answers_and_the_dashboard_hold_no_secret(api, admin, deliveries, schedules):
    """No API key, webhook secret, token or webhook URL query is in any admin answer."""
    job_id = await failed_webhook(api, deliveries, schedules, "orders")
    answers = [
        await admin.get("/v1/admin/overview"),
        await admin.get("/v1/admin/jobs"),
        await admin.get(f"/v1/admin/jobs/{job_id}"),
        await admin.get("/v1/admin/deliveries/failed"),
        await admin.post(f"/v1/admin/jobs/{job_id}/deliveries"),
        await admin.get("/ui"),
        await admin.get("/ui/app.js"),
    ]
    secrets = [
        TENANT.api_key,
        OTHER.api_key,
        ADMIN_KEY,
        TENANT.whsec,
        base64.b64encode(TENANT.secret).decode(),
        "token-never-shown",
        "hunter2",
    ]
    for answer in answers:
        assert answer.status_code < 300, answer.text
        for secret in secrets:
            assert secret not in answer.text, (answer.request.url, secret)
    detail = answers[2].json()
    assert detail["job"]["webhook"]["url"] == "https://hooks.example.com/rc?…"


async def test_admin_cancels_any_tenants_pending_job(api, admin):
    """An admin cancels a tenant's pending job: 200 and cancelled, as the tenant would."""
    job = await submit(api)
    answer = await admin.post(f"/v1/admin/jobs/{job['id']}/cancel")
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "cancelled"
    assert_problem(await admin.post(f"/v1/admin/jobs/{job['id']}/cancel"), 409)
    assert (await api.get(f"/v1/jobs/{job['id']}")).json()["status"] == "cancelled"


async def test_admin_resends_a_webhook_with_the_same_delivery(api, admin, deliveries, schedules):
    """An admin re-send puts the failed webhook back to pending; a pending job answers 409."""
    job_id = await failed_webhook(api, deliveries, schedules, "orders")
    answer = await admin.post(f"/v1/admin/jobs/{job_id}/deliveries")
    assert answer.status_code == 202, answer.text
    assert answer.json()["webhook"]["state"] == "pending"
    pending = await submit(api, webhook={"url": HOOK})
    assert_problem(await admin.post(f"/v1/admin/jobs/{pending['id']}/deliveries"), 409)
    failed = (await admin.get("/v1/admin/deliveries/failed")).json()["items"]
    assert failed == []


# Recovery


@pytest.fixture
def due(redis, keys):
    async def read() -> set[str]:
        """The jobs (ids without `job_`) whose deliveries are in the deliver schedule."""
        members = await redis.zrange(keys.schedule("deliver"), 0, -1)
        return {m.decode().removeprefix("msg_").rpartition("_")[0] for m in members}

    return read


async def test_failed_deliveries_are_listed_and_counted_per_tenant(
    api, other, admin, deliveries, schedules
):
    """Failed webhooks show per tenant in the overview and in the failed deliveries."""
    mine = [await failed_webhook(api, deliveries, schedules, "orders") for _ in range(2)]
    await failed_webhook(other, deliveries, schedules, "billing")
    listed = (await admin.get("/v1/admin/deliveries/failed", params={"tenant": "orders"})).json()
    assert [i["job"]["id"] for i in listed["items"]] == mine[::-1]
    overview = (await admin.get("/v1/admin/overview")).json()
    counts = {t["tenant"]: t["failed_deliveries"] for t in overview["tenants"]}
    assert counts == {"orders": 2, "billing": 1}


async def test_a_tenant_recovers_its_failed_deliveries_of_a_window_once(
    api, other, deliveries, schedules, due
):
    """Recover queues each of the tenant's failed webhooks in the window once, no other's."""
    since = (utcnow() - timedelta(minutes=1)).isoformat()
    mine = [await failed_webhook(api, deliveries, schedules, "orders") for _ in range(3)]
    theirs = await failed_webhook(other, deliveries, schedules, "billing")
    later = (utcnow() + timedelta(minutes=1)).isoformat()
    answer = await api.post("/v1/deliveries/recover", json={"since": later})
    assert (answer.status_code, answer.json()) == (202, {"recovering": 0})
    answer = await api.post("/v1/deliveries/recover", json={"since": since})
    assert (answer.status_code, answer.json()) == (202, {"recovering": 3})
    again = await api.post("/v1/deliveries/recover", json={"since": since, "until": later})
    assert again.json() == {"recovering": 0}
    assert await due() == {job_id.removeprefix("job_") for job_id in mine}
    for job_id in mine:
        job = (await api.get(f"/v1/jobs/{job_id}")).json()
        assert job["webhook"]["state"] == "pending"
    assert (await other.get(f"/v1/jobs/{theirs}")).json()["webhook"]["state"] == "failed"


async def test_an_admin_recovers_one_tenant_or_every_tenant(
    api, other, admin, deliveries, schedules
):
    """Admin recovery takes `tenant`, or every tenant without it; an unknown tenant is 404."""
    since = (utcnow() - timedelta(minutes=1)).isoformat()
    await failed_webhook(api, deliveries, schedules, "orders")
    await failed_webhook(other, deliveries, schedules, "billing")
    await failed_webhook(other, deliveries, schedules, "billing")
    path = "/v1/admin/deliveries/recover"
    assert_problem(await admin.post(path, json={"since": since, "tenant": "nobody"}), 404)
    one = await admin.post(path, json={"since": since, "tenant": "billing"})
    assert (one.status_code, one.json()) == (202, {"recovering": 2})
    every = await admin.post(path, json={"since": since})
    assert every.json() == {"recovering": 1}


async def test_recovery_refuses_a_window_that_is_not_one(api):
    """`until` before `since`, a time without offset or no `since` answer 4xx problems."""
    path = "/v1/deliveries/recover"
    problem = assert_problem(
        await api.post(
            path, json={"since": "2026-01-02T00:00:00Z", "until": "2026-01-01T00:00:00Z"}
        ),
        422,
    )
    assert [e["pointer"] for e in problem["errors"]] == ["#/until"]
    assert_problem(await api.post(path, json={"since": "2026-01-02T00:00:00"}), 422)
    answer = await api.post(path, json={})
    assert answer.status_code in {400, 422}
    assert answer.headers["content-type"].startswith("application/problem+json")


def test_a_reloaded_tenants_file_brings_its_admin_keys():
    """Replacing the tenants (a reload) replaces the admin keys too: a removed one stops."""
    tenants = parse_tenants(TENANT.toml() + admins_toml(ADMIN_KEY))
    tenants.replace_with(parse_tenants(TENANT.toml() + admins_toml("adm_other_key")))
    assert tenants.authenticate_admin(ADMIN_KEY) is None
    assert tenants.authenticate_admin("adm_other_key") is not None


async def test_the_dashboard_is_served_with_its_assets_and_a_strict_policy(api):
    """/ui and its two assets answer without a key, from this origin only; others are 404."""
    page = await api.get("/ui", headers={"Authorization": ""})
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self'" in policy
    assert '<script src="/ui/app.js"' in page.text
    for name, kind in (("app.js", "text/javascript"), ("app.css", "text/css")):
        asset = await api.get(f"/ui/{name}")
        assert asset.status_code == 200
        assert asset.headers["content-type"].startswith(kind)
    assert "http" not in (await api.get("/ui/app.js")).text.replace("http://www.w3.org", "")
    assert_problem(await api.get("/ui/secrets.txt"), 404)
    assert_problem(await api.get("/ui/index.html"), 404)


async def test_admin_routes_answer_options_with_every_method(admin):
    """OPTIONS names every method of an admin path, as on the tenant routes."""
    answer = await admin.options("/v1/admin/jobs/job_01KAWJ6X3Z8Q4N5R7T9V2W4Y6A/deliveries")
    assert answer.status_code == 204
    assert answer.headers["allow"] == "OPTIONS, POST"
