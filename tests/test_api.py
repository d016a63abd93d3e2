"""The HTTP API against a real Redis: the documented contract, answer by answer."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import httpx
import msgspec
import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from service.api.app import create_app
from service.batching import Coalescer
from service.config import Settings, load_settings
from service.localredis import free_port
from service.models import MAX_METADATA_BYTES, DeliveryAttempt, utcnow
from service.store.jobs import JobStore, Outcome
from service.store.limits import Limits
from service.store.schedules import Claim
from tests.support import BILLING, ORDERS, assert_problem, new_tenant, serve_api, wait_for

TENANT = ORDERS
OTHER = BILLING
HOSTS = ("hooks.example.com", "*.orders.internal")
VIDEO = "https://example.com/in.mp4"


def job_body(**extra: Any) -> dict[str, Any]:
    return {"input": {"prompt": "a paper boat", "video_url": VIDEO}, **extra}


def with_input(**fields: Any) -> dict[str, Any]:
    body = job_body()
    body["input"].update(fields)
    return body


def without_input(name: str) -> dict[str, Any]:
    body = job_body()
    del body["input"][name]
    return body


def with_webhook(**webhook: Any) -> dict[str, Any]:
    return job_body(webhook={"url": "https://hooks.example.com/rc", **webhook})


@pytest.fixture
def settings(tmp_path, redis_server) -> Settings:
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(TENANT.toml(hosts=HOSTS) + "\n" + OTHER.toml(hosts=HOSTS))
    env = {
        "REDIS_URL": redis_server.url,
        "RUNCOMFY_API_TOKEN": "test-token",
        "GATEWAY_TENANTS_FILE": str(tenants),
    }
    return load_settings(env)


async def submit(api, body: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
    answer = await api.post("/v1/jobs", json=body or job_body(), **kwargs)
    assert answer.status_code == 202, answer.text
    return answer.json()


def pointers(answer: httpx.Response) -> set[str]:
    return {error["pointer"] for error in assert_problem(answer, 422)["errors"]}


async def to_in_queue(jobs, schedules, job_id: str) -> Claim:
    """Move a pending job to in_queue the way the submitter does; return its submit claim."""
    claims = await schedules.claim_submits(100, global_cap=100, tenant_caps={})
    [claim] = [c for c in claims if c.member == job_id]
    stored = await jobs.get(job_id)
    outcome, stored = await jobs.record_submit(stored, claim.lease)
    assert outcome is Outcome.DONE
    assert await jobs.submitted(stored, claim.lease, "req-1", poll_in_s=0) is Outcome.DONE
    return claim


async def to_in_progress(jobs, schedules, job_id: str) -> Claim:
    """Move a pending job on to in_progress, as the poller does; return its poll claim."""
    await to_in_queue(jobs, schedules, job_id)
    [poll] = [c for c in await schedules.claim("poll", 100) if c.member == job_id]
    assert await jobs.started(await jobs.get(job_id), poll.lease, poll_in_s=0) is Outcome.DONE
    [poll] = [c for c in await schedules.claim("poll", 100) if c.member == job_id]
    return poll


async def to_completed(jobs, schedules, job_id: str) -> None:
    poll = await to_in_progress(jobs, schedules, job_id)
    stored = await jobs.get(job_id)
    output = {"video": "https://cdn.example.com/out.mp4"}
    assert await jobs.finish(stored, "completed", lease=poll.lease, output=output) is Outcome.DONE


# Submitting


async def test_a_new_job_answers_202_with_location_and_every_default(api):
    """POST /v1/jobs answers 202, the pending job with defaults filled, and its Location."""
    answer = await api.post("/v1/jobs", json=job_body(metadata={"order": 4711}))
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert answer.headers["location"] == f"/v1/jobs/{job['id']}"
    assert job["id"].startswith("job_")
    assert job["status"] == "pending"
    assert job["model"] == "tencent/hunyuan/video-to-video"
    assert job["input"] == {
        "prompt": "a paper boat",
        "video_url": VIDEO,
        "pro_mode": False,
        "resolution": "720p",
        "aspect_ratio": "16:9",
        "num_frames": 129,
        "strength": 0.85,
    }
    assert job["metadata"] == {"order": 4711}
    assert job["webhook"] is None
    assert job["output"] is None
    assert job["error"] is None
    assert job["upstream"] is None
    assert job["created_at"].endswith("Z")
    assert job["submitted_at"] is None
    assert (await api.get(answer.headers["location"])).json() == job


async def test_a_webhook_is_answered_with_its_default_events_and_state(api):
    """A webhook without events gets the three final ones, state pending, no attempts."""
    job = await submit(api, with_webhook())
    assert job["webhook"] == {
        "url": "https://hooks.example.com/rc",
        "events": ["job.completed", "job.failed", "job.cancelled"],
        "state": "pending",
        "attempts": 0,
    }


@pytest.mark.parametrize(
    "body",
    [
        with_input(seed=0),
        with_input(seed=-7),
        with_input(seed=2**40),
        with_input(pro_mode=True),
        with_input(resolution="480p"),
        with_input(resolution="580p"),
        with_input(aspect_ratio="9:16"),
        with_input(num_frames=85),
        with_input(strength=0.01),
        with_input(strength=1),
        with_input(prompt="p" * 4000),
        with_input(video_url="https://example.com/" + "v" * 2020),
        job_body(model="tencent/hunyuan/video-to-video"),
        with_webhook(url="https://a.orders.internal/hook"),
        with_webhook(events=["job.started", "job.completed"]),
        job_body(webhook=None, metadata=None),
        job_body(metadata={"nested": {"list": [1, 2.5, None, True]}}),
    ],
)
async def test_every_valid_variant_of_the_schema_is_accepted(api, body):
    """Each allowed value of each field is accepted and kept as sent."""
    job = await submit(api, body)
    for name, value in body["input"].items():
        assert job["input"][name] == value


@pytest.mark.parametrize(
    ("body", "pointer"),
    [
        (without_input("prompt"), "#/input/prompt"),
        (without_input("video_url"), "#/input/video_url"),
        ({"model": "tencent/hunyuan/video-to-video"}, "#/input"),
        (job_body(input="a paper boat"), "#/input"),
        (with_input(prompt=5), "#/input/prompt"),
        (with_input(prompt=""), "#/input/prompt"),
        (with_input(prompt="p" * 4001), "#/input/prompt"),
        (with_input(video_url=5), "#/input/video_url"),
        (with_input(video_url="ftp://example.com/v.mp4"), "#/input/video_url"),
        (with_input(video_url="http://localhost/v.mp4"), "#/input/video_url"),
        (with_input(video_url="http://127.0.0.1/v.mp4"), "#/input/video_url"),
        (with_input(video_url="http://10.1.2.3/v.mp4"), "#/input/video_url"),
        (with_input(video_url="not a url"), "#/input/video_url"),
        (with_input(video_url="https://example.com/" + "v" * 2048), "#/input/video_url"),
        (with_input(seed=1.5), "#/input/seed"),
        (with_input(seed=True), "#/input/seed"),
        (with_input(seed="7"), "#/input/seed"),
        (with_input(seed=None), "#/input/seed"),
        (with_input(pro_mode="true"), "#/input/pro_mode"),
        (with_input(pro_mode=1), "#/input/pro_mode"),
        (with_input(resolution="1080p"), "#/input/resolution"),
        (with_input(resolution=720), "#/input/resolution"),
        (with_input(aspect_ratio="4:3"), "#/input/aspect_ratio"),
        (with_input(num_frames=100), "#/input/num_frames"),
        (with_input(num_frames="129"), "#/input/num_frames"),
        (with_input(num_frames=129.0), "#/input/num_frames"),
        (with_input(strength=0), "#/input/strength"),
        (with_input(strength=1.01), "#/input/strength"),
        (with_input(strength="0.5"), "#/input/strength"),
        (with_input(strength=True), "#/input/strength"),
        (with_input(steps=30), "#/input/steps"),
        (job_body(model="tencent/hunyuan/text-to-video"), "#/model"),
        (job_body(priority="high"), "#/priority"),
        (job_body(webhook="https://hooks.example.com/rc"), "#/webhook"),
        (job_body(webhook={}), "#/webhook/url"),
        (with_webhook(url="https://evil.example.net/rc"), "#/webhook/url"),
        (with_webhook(url="https://orders.internal/rc"), "#/webhook/url"),
        (with_webhook(url="https://user:pass@hooks.example.com/rc"), "#/webhook/url"),
        (with_webhook(url="ftp://hooks.example.com/rc"), "#/webhook/url"),
        (with_webhook(url="http://169.254.169.254/latest"), "#/webhook/url"),
        (with_webhook(url="https://hooks.example.com/" + "h" * 2048), "#/webhook/url"),
        (with_webhook(events=["job.done"]), "#/webhook/events/0"),
        (with_webhook(events=["job.completed", "job.exploded"]), "#/webhook/events/1"),
        (with_webhook(events=[]), "#/webhook/events"),
        (with_webhook(events="job.completed"), "#/webhook/events"),
        (with_webhook(signing_key="k"), "#/webhook/signing_key"),
        (job_body(metadata=["order", 4711]), "#/metadata"),
        (job_body(metadata={"blob": "x" * MAX_METADATA_BYTES}), "#/metadata"),
    ],
)
async def test_each_schema_violation_answers_422_naming_the_field(api, body, pointer):
    """An invalid field answers 422 problem+json whose errors name exactly that field."""
    answer = await api.post("/v1/jobs", json=body)
    assert pointers(answer) == {pointer}
    assert (await api.get("/v1/jobs")).json()["items"] == []  # nothing was stored


@pytest.mark.parametrize(
    "url",
    [
        "http://127.1/v.mp4",  # two parts: 127.0.0.1
        "http://2130706433/v.mp4",  # one decimal part
        "http://0x7f000001/v.mp4",  # one hex part
        "http://0X7F.1/v.mp4",
        "http://0177.0.0.1/v.mp4",  # octal
        "http://017700000001/v.mp4",
        "http://127.000.000.001/v.mp4",
        "http://127.0.0.1./v.mp4",
        "http://localhost./v.mp4",
        "http://LocalHost/v.mp4",
        "http://LOCALHOST./v.mp4",
        "http://0/v.mp4",  # 0.0.0.0
        "http://0x0.0/v.mp4",
        "http://10.1/v.mp4",  # 10.0.0.1
        "http://0xc0.0xa8.1/v.mp4",  # 192.168.0.1
        "http://0251.0376.0251.0376/latest",  # 169.254.169.254, octal
        "http://0xa9fea9fe/latest",
        "http://169.254.43518/latest",
        "http://100.100.100.200/latest",  # Alibaba's metadata service
        "http://168.63.129.16/machine",  # Azure's WireServer, a global address
        "http://[::ffff:127.0.0.1]/v.mp4",
        "http://[64:ff9b::a9fe:a9fe]/latest",  # NAT64 of 169.254.169.254
        "http://[2002:7f00:1::]/v.mp4",  # 6to4 of 127.0.0.1
        "http://[fd00:ec2::254]/latest",
        "http://%31%32%37.0.0.1/v.mp4",  # percent-encoded, decoded by WHATWG parsers
        "http://\uff11\uff12\uff17.0.0.1/v.mp4",  # fullwidth digits, mapped by IDNA
        "http://example.0x1/v.mp4",  # ends like an address, is none
        "http://1.2.3.4.5/v.mp4",
    ],
)
async def test_a_video_url_on_a_disguised_private_address_answers_422(api, url):
    """Every spelling of a loopback, private, link-local or metadata host is named as video_url."""
    answer = await api.post("/v1/jobs", json=with_input(video_url=url))
    assert pointers(answer) == {"#/input/video_url"}


@pytest.mark.parametrize(
    "url",
    [
        "https://cdn1.example.com/v.mp4",
        "https://1.example.com/v.mp4",
        "http://93.184.215.14/v.mp4",
        "http://0x5db8d70e/v.mp4",  # the same public address, in hex
        "https://example.com./v.mp4",
        "https://b\u00fccher.example/v.mp4",
    ],
)
async def test_a_video_url_on_a_public_host_is_accepted(api, url):
    """Public names and public addresses, however spelled, are accepted as video_url."""
    await submit(api, with_input(video_url=url))


async def test_several_bad_fields_are_all_named_in_one_answer(api):
    """Every offending field is named at once, not one per round trip."""
    body = {
        "input": {"prompt": "", "num_frames": 100, "strength": 2, "seed": "x", "steps": 1},
        "webhook": {"url": "https://evil.example.net/", "events": ["nope"]},
        "metadata": "not an object",
    }
    assert pointers(await api.post("/v1/jobs", json=body)) == {
        "#/input/prompt",
        "#/input/video_url",
        "#/input/num_frames",
        "#/input/strength",
        "#/input/seed",
        "#/input/steps",
        "#/webhook/url",
        "#/webhook/events/0",
        "#/metadata",
    }


async def test_a_422_says_what_each_field_must_be(api):
    """Each error's detail says what is wrong in words a caller can act on."""
    answer = await api.post("/v1/jobs", json=with_input(seed=1.5, resolution="1080p"))
    details = {e["pointer"]: e["detail"] for e in assert_problem(answer, 422)["errors"]}
    assert details == {
        "#/input/seed": "must be an integer, not a number",
        "#/input/resolution": 'must be one of "480p", "580p", "720p"',
    }


@pytest.mark.parametrize(
    "raw", [b"{not json", b"[1, 2, 3]", b'"a paper boat"', b"", b"null", b"\xff"]
)
async def test_a_body_that_is_not_a_json_object_answers_400(api, raw):
    """Broken JSON, an array or any non-object body answers 400 problem+json."""
    answer = await api.post("/v1/jobs", content=raw, headers={"Content-Type": "application/json"})
    assert_problem(answer, 400)


async def test_a_body_over_1_mb_answers_413(api):
    """A body larger than 1 MB answers 413 problem+json and is not stored."""
    body = job_body(metadata={"pad": "x" * 1_000_000})
    answer = await api.post("/v1/jobs", json=body)
    assert_problem(answer, 413)


async def test_a_body_declared_as_another_type_answers_415(api):
    """A body sent as form data rather than JSON answers 415 problem+json."""
    answer = await api.post(
        "/v1/jobs",
        content=msgspec.json.encode(job_body()),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert_problem(answer, 415)


async def test_a_json_body_without_content_type_is_accepted(api):
    """A JSON body with no Content-Type at all is read as JSON."""
    answer = await api.post("/v1/jobs", content=msgspec.json.encode(job_body()))
    assert answer.status_code == 202, answer.text


async def test_submissions_over_the_tenant_rate_answer_429(tmp_path, redis_server, keys):
    """A tenant with rate_per_s = 1 gets 429 with Retry-After for a second submit at once."""
    limited = new_tenant("limited")
    tenants = tmp_path / "limited.toml"
    tenants.write_text(limited.toml(hosts=HOSTS) + "rate_per_s = 1\n")
    env = {
        "REDIS_URL": redis_server.url,
        "RUNCOMFY_API_TOKEN": "test-token",
        "GATEWAY_TENANTS_FILE": str(tenants),
    }
    async with serve_api(load_settings(env), keys, limited.api_key) as api:
        await submit(api)
        answer = await api.post("/v1/jobs", json=job_body())
        assert_problem(answer, 429)
        assert int(answer.headers["retry-after"]) >= 1


async def test_concurrent_submissions_over_the_tenant_rate_answer_429(tmp_path, redis_server, keys):
    """Ten submits at once from a tenant allowed one per two seconds: one 202, nine 429."""
    limited = new_tenant("limited")
    tenants = tmp_path / "limited.toml"
    tenants.write_text(limited.toml(hosts=HOSTS) + "rate_per_s = 0.5\n")
    env = {
        "REDIS_URL": redis_server.url,
        "RUNCOMFY_API_TOKEN": "test-token",
        "GATEWAY_TENANTS_FILE": str(tenants),
    }
    async with serve_api(load_settings(env), keys, limited.api_key) as api:
        answers = await asyncio.gather(*(api.post("/v1/jobs", json=job_body()) for _ in range(10)))
        assert sorted(answer.status_code for answer in answers) == [202] + [429] * 9
        for answer in answers:
            if answer.status_code == 429:
                assert_problem(answer, 429)
                assert int(answer.headers["retry-after"]) >= 1
        assert len((await api.get("/v1/jobs")).json()["items"]) == 1


async def test_an_invalid_submission_takes_nothing_from_the_tenant_rate(
    tmp_path, redis_server, keys
):
    """Only jobs count against rate_per_s: a 422 first, then a valid submit is still 202."""
    limited = new_tenant("limited")
    tenants = tmp_path / "limited.toml"
    tenants.write_text(limited.toml(hosts=HOSTS) + "rate_per_s = 0.5\n")
    env = {
        "REDIS_URL": redis_server.url,
        "RUNCOMFY_API_TOKEN": "test-token",
        "GATEWAY_TENANTS_FILE": str(tenants),
    }
    async with serve_api(load_settings(env), keys, limited.api_key) as api:
        assert_problem(await api.post("/v1/jobs", json=with_input(num_frames=1)), 422)
        await submit(api)
        assert_problem(await api.post("/v1/jobs", json=job_body()), 429)


# Idempotency


async def test_an_idempotent_replay_answers_200_with_the_same_job(api):
    """The same Idempotency-Key and body answer 200 with the first job, not a new one."""
    headers = {"Idempotency-Key": "order-4711"}
    first = await api.post("/v1/jobs", json=job_body(), headers=headers)
    assert first.status_code == 202
    replay = await api.post("/v1/jobs", json=job_body(), headers=headers)
    assert replay.status_code == 200, replay.text
    assert replay.json()["id"] == first.json()["id"]
    assert replay.headers["location"] == first.headers["location"]
    assert len((await api.get("/v1/jobs")).json()["items"]) == 1


async def test_a_replay_that_only_spells_defaults_out_is_the_same_body(api):
    """A replay differing only in key order and spelled-out defaults is the same request."""
    headers = {"Idempotency-Key": "order-4712"}
    first = await submit(api, job_body(), headers=headers)
    spelled = {
        "model": "tencent/hunyuan/video-to-video",
        "input": {"video_url": VIDEO, "num_frames": 129, "prompt": "a paper boat"},
    }
    replay = await api.post("/v1/jobs", json=spelled, headers=headers)
    assert replay.status_code == 200, replay.text
    assert replay.json()["id"] == first["id"]


async def test_the_same_key_with_another_body_answers_409(api):
    """An Idempotency-Key reused with a different body answers 409 problem+json."""
    headers = {"Idempotency-Key": "order-4713"}
    await submit(api, job_body(), headers=headers)
    answer = await api.post("/v1/jobs", json=with_input(seed=1), headers=headers)
    assert assert_problem(answer, 409)["type"].endswith(":idempotency-conflict")


async def test_concurrent_submits_each_get_their_own_job(api):
    """Fifty submits at once all answer 202, each with a job of its own that is stored."""
    bodies = [job_body(metadata={"n": n}) for n in range(50)]
    answers = await asyncio.gather(*(api.post("/v1/jobs", json=body) for body in bodies))
    assert [answer.status_code for answer in answers] == [202] * 50
    jobs = [answer.json() for answer in answers]
    assert [job["metadata"] for job in jobs] == [{"n": n} for n in range(50)]
    assert len({job["id"] for job in jobs}) == 50
    stored = await asyncio.gather(*(api.get(f"/v1/jobs/{job['id']}") for job in jobs))
    assert [answer.json() for answer in stored] == jobs


async def test_concurrent_submits_with_one_key_create_one_job(api):
    """The same Idempotency-Key sent ten times at once: one 202, nine 200 with the same job."""
    headers = {"Idempotency-Key": "order-4714"}
    answers = await asyncio.gather(
        *(api.post("/v1/jobs", json=job_body(), headers=headers) for _ in range(10))
    )
    assert sorted(answer.status_code for answer in answers) == [200] * 9 + [202]
    assert len({answer.json()["id"] for answer in answers}) == 1
    assert len((await api.get("/v1/jobs")).json()["items"]) == 1


async def test_concurrent_submits_with_one_key_and_other_bodies_answer_409(api):
    """Of submits sent at once with one key and different bodies, one wins; the rest get 409."""
    headers = {"Idempotency-Key": "order-4715"}
    answers = await asyncio.gather(
        *(api.post("/v1/jobs", json=with_input(seed=n), headers=headers) for n in range(5))
    )
    assert sorted(answer.status_code for answer in answers) == [202] + [409] * 4
    assert len((await api.get("/v1/jobs")).json()["items"]) == 1


async def test_idempotency_keys_are_per_tenant(api, other):
    """Two tenants using the same Idempotency-Key get two different jobs."""
    headers = {"Idempotency-Key": "shared-key"}
    mine = await submit(api, job_body(), headers=headers)
    theirs = await submit(other, job_body(), headers=headers)
    assert mine["id"] != theirs["id"]


async def test_an_idempotency_key_over_255_characters_answers_400(api):
    """An overlong Idempotency-Key answers 400 problem+json and stores nothing."""
    answer = await api.post("/v1/jobs", json=job_body(), headers={"Idempotency-Key": "k" * 256})
    assert (
        assert_problem(answer, 400)["detail"] == "Idempotency-Key must have at most 255 characters"
    )
    assert (await api.get("/v1/jobs")).json()["items"] == []


# Authentication and tenancy


async def test_a_request_without_an_api_key_answers_401(settings, keys):
    """No Authorization header answers 401 problem+json with a Bearer challenge."""
    async with serve_api(settings, keys, api_key=None) as anonymous:
        answer = await anonymous.post("/v1/jobs", json=job_body())
        assert_problem(answer, 401)
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert_problem(await anonymous.get("/v1/jobs"), 401)


async def test_a_wrong_api_key_answers_401_without_echoing_it(settings, keys):
    """An unknown key answers 401 with a Bearer challenge and never repeats the key."""
    async with serve_api(settings, keys, api_key="key_not-a-real-one") as stranger:
        answer = await stranger.get("/v1/jobs")
        assert_problem(answer, 401)
        assert answer.headers["www-authenticate"].startswith("Bearer")
        assert "not-a-real-one" not in answer.text


async def test_authentication_comes_before_validation(settings, keys):
    """An invalid body without a key answers 401, not 422: nothing is read first."""
    async with serve_api(settings, keys, api_key=None) as anonymous:
        assert_problem(await anonymous.post("/v1/jobs", content=b"{broken"), 401)


async def test_another_tenants_job_is_not_found_like_an_unknown_one(api, other):
    """Another tenant's job id answers 404 on every route, exactly like an unknown id."""
    job = await submit(api, with_webhook())
    unknown = "job_" + "0" * 26
    for path in (f"/v1/jobs/{job['id']}", f"/v1/jobs/{unknown}", "/v1/jobs/not-an-id"):
        assert_problem(await other.get(path), 404)
    foreign = [
        await other.get(f"/v1/jobs/{job['id']}"),
        await other.post(f"/v1/jobs/{job['id']}/cancel"),
        await other.get(f"/v1/jobs/{job['id']}/deliveries"),
        await other.post(f"/v1/jobs/{job['id']}/deliveries"),
    ]
    missing = await other.get(f"/v1/jobs/{unknown}")
    for answer in foreign:
        assert assert_problem(answer, 404) == assert_problem(missing, 404)
    assert (await other.get("/v1/jobs")).json()["items"] == []
    assert (await api.get(f"/v1/jobs/{job['id']}")).json()["status"] == "pending"


# Listing


async def test_jobs_are_listed_newest_first_a_page_at_a_time(api):
    """GET /v1/jobs pages through the tenant's jobs newest first with next_cursor."""
    ids = [(await submit(api))["id"] for _ in range(5)]
    first = (await api.get("/v1/jobs", params={"limit": 2})).json()
    assert [job["id"] for job in first["items"]] == ids[:-3:-1]
    second = (await api.get("/v1/jobs", params={"limit": 2, "cursor": first["next_cursor"]})).json()
    assert [job["id"] for job in second["items"]] == ids[2:0:-1]
    last = (await api.get("/v1/jobs", params={"limit": 2, "cursor": second["next_cursor"]})).json()
    assert [job["id"] for job in last["items"]] == ids[:1]
    assert last["next_cursor"] is None


async def test_the_list_defaults_to_20_jobs(api):
    """Without ?limit= a page holds 20 jobs and points at the next."""
    for _ in range(21):
        await submit(api)
    page = (await api.get("/v1/jobs")).json()
    assert len(page["items"]) == 20
    assert page["next_cursor"] is not None


async def test_the_list_filters_by_status(api, jobs):
    """?status= lists only jobs with that status."""
    kept = await submit(api)
    cancelled = await submit(api)
    assert (await api.post(f"/v1/jobs/{cancelled['id']}/cancel")).status_code == 200
    pending = (await api.get("/v1/jobs", params={"status": "pending"})).json()
    assert [job["id"] for job in pending["items"]] == [kept["id"]]
    done = (await api.get("/v1/jobs", params={"status": "cancelled"})).json()
    assert [job["id"] for job in done["items"]] == [cancelled["id"]]


@pytest.mark.parametrize(
    ("params", "pointer"),
    [
        ({"status": "done"}, "#/status"),
        ({"limit": "0"}, "#/limit"),
        ({"limit": "101"}, "#/limit"),
        ({"limit": "ten"}, "#/limit"),
        ({"cursor": "not-a-job-id"}, "#/cursor"),
    ],
)
async def test_bad_list_parameters_answer_422_naming_them(api, params, pointer):
    """An unknown status, a limit outside 1-100 or a malformed cursor answers 422."""
    assert pointers(await api.get("/v1/jobs", params=params)) == {pointer}


async def test_an_unknown_status_filter_lists_the_allowed_ones(api):
    """The 422 for ?status= says which statuses exist."""
    answer = await api.get("/v1/jobs", params={"status": "done"})
    [error] = assert_problem(answer, 422)["errors"]
    assert error["detail"].startswith('must be one of "pending", "in_queue"')


# Cancelling


async def test_cancelling_a_pending_job_answers_200_cancelled(api):
    """A pending job is cancelled at once: 200 with the cancelled job."""
    job = await submit(api)
    answer = await api.post(f"/v1/jobs/{job['id']}/cancel")
    assert answer.status_code == 200, answer.text
    assert answer.json()["status"] == "cancelled"
    assert answer.json()["finished_at"] is not None
    assert (await api.get(f"/v1/jobs/{job['id']}")).json()["status"] == "cancelled"


async def test_cancelling_a_queued_job_answers_202_and_asks_a_worker(api, jobs, schedules):
    """An in_queue job answers 202 and is due for a poll that cancels it upstream."""
    job = await submit(api)
    await to_in_queue(jobs, schedules, job["id"])
    await schedules.claim("poll", 100)  # hold the poll, as a busy worker would
    answer = await api.post(f"/v1/jobs/{job['id']}/cancel")
    assert answer.status_code == 202, answer.text
    assert answer.json()["status"] == "in_queue"
    stored = await jobs.get(job["id"])
    assert stored.record.cancel_requested_at is not None
    assert [c.member for c in await schedules.claim("poll", 100)] == [job["id"]]


async def test_cancelling_a_queued_job_twice_answers_202_again(api, jobs, schedules):
    """A second cancel of a job whose upstream cancel is under way answers 202 again."""
    job = await submit(api)
    await to_in_queue(jobs, schedules, job["id"])
    assert (await api.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 202
    assert (await api.post(f"/v1/jobs/{job['id']}/cancel")).status_code == 202


async def test_cancelling_a_running_job_answers_409(api, jobs, schedules):
    """An in_progress job cannot be cancelled: 409 problem+json."""
    job = await submit(api)
    await to_in_progress(jobs, schedules, job["id"])
    assert_problem(await api.post(f"/v1/jobs/{job['id']}/cancel"), 409)
    assert (await api.get(f"/v1/jobs/{job['id']}")).json()["status"] == "in_progress"


async def test_cancelling_a_final_job_answers_409(api, jobs, schedules):
    """A completed or cancelled job cannot be cancelled again: 409 problem+json."""
    done = await submit(api)
    await to_completed(jobs, schedules, done["id"])
    assert_problem(await api.post(f"/v1/jobs/{done['id']}/cancel"), 409)
    cancelled = await submit(api)
    assert (await api.post(f"/v1/jobs/{cancelled['id']}/cancel")).status_code == 200
    assert_problem(await api.post(f"/v1/jobs/{cancelled['id']}/cancel"), 409)


# Webhook deliveries


async def test_the_attempt_log_is_empty_until_the_final_event_exists(api):
    """A job without a final delivery yet has an empty attempt log."""
    job = await submit(api, with_webhook())
    answer = await api.get(f"/v1/jobs/{job['id']}/deliveries")
    assert answer.status_code == 200
    assert answer.json() == {"items": []}


async def test_the_attempt_log_lists_each_attempt(api, jobs, schedules, deliveries):
    """GET deliveries lists the attempts the dispatcher recorded for the final event."""
    job = await submit(api, with_webhook())
    await to_completed(jobs, schedules, job["id"])
    [claim] = await schedules.claim("deliver", 100)
    attempt = DeliveryAttempt(
        attempt=1,
        at=utcnow(),
        status_code=503,
        latency_ms=12,
        error="http_503",
        response_excerpt="busy",
        next_attempt_at=None,
    )
    await deliveries.record_attempt(
        claim.member, claim.lease, attempt, tenant=TENANT.id, state="failed", retry_in_s=None
    )
    items = (await api.get(f"/v1/jobs/{job['id']}/deliveries")).json()["items"]
    assert items == [msgspec.to_builtins(attempt)]
    assert (await api.get(f"/v1/jobs/{job['id']}")).json()["webhook"]["state"] == "failed"


async def test_resending_a_final_event_answers_202_and_queues_it(api, jobs, schedules):
    """POST deliveries on a final job answers 202 and queues the same delivery again."""
    job = await submit(api, with_webhook())
    await to_completed(jobs, schedules, job["id"])
    [first] = await schedules.claim("deliver", 100)
    answer = await api.post(f"/v1/jobs/{job['id']}/deliveries")
    assert answer.status_code == 202, answer.text
    assert answer.json()["webhook"]["state"] == "pending"
    [again] = await schedules.claim("deliver", 100)
    assert again.member == first.member


async def test_resending_before_the_job_is_final_answers_409(api):
    """POST deliveries on a job that is not final answers 409 problem+json."""
    job = await submit(api, with_webhook())
    assert_problem(await api.post(f"/v1/jobs/{job['id']}/deliveries"), 409)


async def test_resending_for_a_job_without_a_webhook_answers_404(api, jobs, schedules):
    """POST deliveries on a job that has no webhook answers 404 problem+json."""
    job = await submit(api)
    await to_completed(jobs, schedules, job["id"])
    assert_problem(await api.post(f"/v1/jobs/{job['id']}/deliveries"), 404)


# Probes, metrics and errors


async def test_healthz_answers_ok_without_auth(settings, keys):
    """/healthz answers 200 {"status": "ok"} with no API key."""
    async with serve_api(settings, keys, api_key=None) as anonymous:
        answer = await anonymous.get("/healthz")
        assert answer.status_code == 200
        assert answer.json() == {"status": "ok"}


async def test_readyz_answers_ready_while_redis_answers(api):
    """/readyz answers 200 {"status": "ready"} when Redis answers PING."""
    answer = await api.get("/readyz")
    assert answer.status_code == 200
    assert answer.json() == {"status": "ready"}


async def test_without_redis_readyz_and_jobs_answer_503_problems(settings, keys, caplog):
    """With Redis unreachable, /readyz and job calls answer 503 problem+json, no traceback."""
    dead = msgspec.structs.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    caplog.set_level(logging.INFO)
    async with serve_api(dead, keys, TENANT.api_key) as api:
        assert (await api.get("/healthz")).status_code == 200
        ready = await api.get("/readyz")
        assert_problem(ready, 503)
        assert int(ready.headers["retry-after"]) > 0
        submitted = await api.post("/v1/jobs", json=job_body())
        assert_problem(submitted, 503)
        assert int(submitted.headers["retry-after"]) > 0
        assert_problem(await api.get("/v1/jobs"), 503)
        assert (await api.get("/metrics")).status_code == 200
    assert not [record for record in caplog.records if record.exc_info]
    assert "Traceback" not in caplog.text


async def test_without_redis_concurrent_submits_each_answer_503(settings, keys):
    """Submits sent at once while Redis is unreachable each answer 503 with Retry-After."""
    dead = msgspec.structs.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    async with serve_api(dead, keys, TENANT.api_key) as api:
        answers = await asyncio.gather(*(api.post("/v1/jobs", json=job_body()) for _ in range(5)))
    for answer in answers:
        assert_problem(answer, 503)
        assert int(answer.headers["retry-after"]) > 0


async def test_metrics_count_requests_and_accepted_jobs(api):
    """/metrics shows requests by route and status, and jobs accepted per tenant."""
    await submit(api)
    await api.get("/v1/jobs/job_" + "0" * 26)
    await api.get("/no/such/route")
    answer = await api.get("/metrics")
    assert answer.headers["content-type"] == CONTENT_TYPE_LATEST  # one charset, not two
    text = answer.text
    assert 'rcg_api_requests_total{method="GET",route="unmatched",status="404"} 1.0' in text
    assert 'rcg_jobs_accepted_total{tenant="orders"} 1.0' in text
    assert 'route="/v1/jobs",status="202"' in text
    assert 'route="/v1/jobs/{job_id}",status="404"' in text
    assert "rcg_api_request_duration_seconds_bucket" in text
    assert "rcg_redis_up 1.0" in text
    assert 'rcg_schedule_depth{schedule="inflight"}' in text


async def test_an_unexpected_error_answers_500_problem_without_details(api, monkeypatch):
    """A bug answers 500 problem+json that names nothing internal."""

    async def broken(self, job_id):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(JobStore, "get", broken)
    answer = await api.get("/v1/jobs/job_" + "0" * 26)
    assert_problem(answer, 500)
    assert "secret internals" not in answer.text


async def test_unknown_routes_and_methods_answer_problems(api):
    """An unknown path answers 404 and a wrong method 405, both problem+json."""
    assert_problem(await api.get("/v2/nothing"), 404)
    answer = await api.delete("/v1/jobs")
    assert_problem(answer, 405)
    assert "GET" in answer.headers["allow"]


async def test_the_api_serves_its_openapi_document(api):
    """GET /openapi.json answers the generated OpenAPI 3.1 document."""
    answer = await api.get("/openapi.json")
    assert answer.status_code == 200
    assert answer.json()["openapi"].startswith("3.1")


async def test_readyz_and_metrics_report_an_upstream_pause(api, redis, keys):
    """While submits are paused (402), /readyz stays 200 but says why, and metrics show it."""
    await Limits(redis, keys).pause_upstream("insufficient_funds", 30)
    answer = await api.get("/readyz")
    assert answer.status_code == 200
    pause = answer.json()["upstream_pause"]
    assert pause["reason"] == "insufficient_funds"
    assert 0 < pause["remaining_s"] <= 30
    text = (await api.get("/metrics")).text
    assert 'rcg_upstream_paused{reason="insufficient_funds"} 1.0' in text
    assert 'rcg_upstream_paused{reason="rate_limited"} 0.0' in text
    assert 'rcg_schedule_depth{schedule="backlog"}' in text


# Coalescing Redis work


class Recorder:
    """A batch sender that records each batch and answers each item doubled, when let go."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.go = asyncio.Event()
        self.go.set()

    def sent(self, count: int) -> Callable[[], Awaitable[bool]]:
        async def check() -> bool:
            return len(self.batches) >= count

        return check

    async def send(self, items: list[int]) -> list[int]:
        self.batches.append(items)
        await self.go.wait()
        if -1 in items:
            raise ConnectionError("Redis went away")
        return [item * 2 for item in items]


def queued(coalescer: Coalescer[int, int], count: int) -> Callable[[], Awaitable[bool]]:
    """Whether `count` calls wait in the queue, not yet sent."""

    async def check() -> bool:
        return len(coalescer._queue) == count  # noqa: SLF001 - what no caller can see yet

    return check


async def test_calls_made_together_share_one_batch_and_get_their_own_results():
    """Calls made in one turn of the loop go out as one batch; each caller gets its result."""
    sender = Recorder()
    coalescer = Coalescer(sender.send)
    assert await asyncio.gather(*(coalescer(n) for n in range(5))) == [0, 2, 4, 6, 8]
    assert sender.batches == [[0, 1, 2, 3, 4]]


async def test_calls_made_while_batches_are_out_wait_for_the_next_batch():
    """With the allowed batches on their way, new calls queue and go out together next."""
    sender = Recorder()
    sender.go.clear()
    coalescer = Coalescer(sender.send, max_in_flight=1)
    first = asyncio.gather(*(coalescer(n) for n in range(2)))
    await wait_for(sender.sent(1), timeout=5)
    second = asyncio.gather(*(coalescer(n) for n in range(2, 5)))
    await wait_for(queued(coalescer, 3), timeout=5)
    assert sender.batches == [[0, 1]]
    sender.go.set()
    assert (await first, await second) == ([0, 2], [4, 6, 8])
    assert sender.batches == [[0, 1], [2, 3, 4]]


async def test_an_error_reaches_every_caller_of_its_batch_only():
    """A failed batch raises its error in each of its callers; the next batch is unaffected."""
    sender = Recorder()
    coalescer = Coalescer(sender.send)
    failed = await asyncio.gather(coalescer(1), coalescer(-1), return_exceptions=True)
    assert [type(outcome) for outcome in failed] == [ConnectionError, ConnectionError]
    assert await coalescer(3) == 6


async def test_a_cancelled_caller_leaves_the_others_their_results():
    """A caller that gives up does not disturb the rest of its batch."""
    sender = Recorder()
    sender.go.clear()
    coalescer = Coalescer(sender.send)
    gone, kept = asyncio.ensure_future(coalescer(1)), asyncio.ensure_future(coalescer(2))
    await wait_for(sender.sent(1), timeout=5)
    gone.cancel()
    sender.go.set()
    assert await kept == 4
    assert gone.cancelled()


async def test_closing_waits_for_every_batch_on_its_way():
    """Aclose returns only once every call already sent has its answer."""
    sender = Recorder()
    sender.go.clear()
    coalescer = Coalescer(sender.send)
    calls = [asyncio.ensure_future(coalescer(n)) for n in range(3)]
    await wait_for(sender.sent(1), timeout=5)
    closing = asyncio.ensure_future(coalescer.aclose())
    await asyncio.wait({closing}, timeout=0.05)
    assert not closing.done()
    sender.go.set()
    await closing
    assert [call.result() for call in calls] == [0, 2, 4]


async def asgi_post(
    app: Any, messages: list[dict[str, Any]], headers: list[tuple[bytes, bytes]]
) -> tuple[int, bytes]:
    """POST /v1/jobs straight to the ASGI app, its body as `messages`; the status and body."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/jobs",
        "raw_path": b"/v1/jobs",
        "root_path": "",
        "query_string": b"",
        "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.1", 50000),
        "headers": [(b"authorization", f"Bearer {TENANT.api_key}".encode()), *headers],
        "state": {},
    }
    pending = list(messages)
    answer: dict[str, Any] = {"body": b""}

    async def receive() -> dict[str, Any]:
        if pending:
            return pending.pop(0)
        await asyncio.Event().wait()  # nothing more comes, as from a server
        return {}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        else:
            answer["body"] += message.get("body", b"")

    await app(scope, receive, send)
    return answer["status"], answer["body"]


@asynccontextmanager
async def started(settings, keys) -> AsyncIterator[Any]:
    app = create_app(settings, keys=keys)
    async with app.lifespan():
        yield app


def in_parts(body: bytes, size: int) -> list[dict[str, Any]]:
    parts = [body[i : i + size] for i in range(0, len(body), size)]
    return [
        {"type": "http.request", "body": part, "more_body": i < len(parts) - 1}
        for i, part in enumerate(parts)
    ]


async def test_a_body_sent_in_parts_is_read_whole(settings, keys, jobs):
    """A submit whose body comes in several parts (chunked, no length) is stored whole."""
    body = msgspec.json.encode(job_body(metadata={"note": "x" * 300}))
    async with started(settings, keys) as app:
        status, content = await asgi_post(app, in_parts(body, 100), [])
    assert status == 202, content
    stored = await jobs.get(msgspec.json.decode(content)["id"])
    assert stored.record.metadata == {"note": "x" * 300}


async def test_a_body_in_parts_over_1_mb_answers_413_and_stores_nothing(settings, keys, jobs):
    """A body over 1 MB sent in parts without Content-Length answers 413; no job is stored."""
    body = msgspec.json.encode(job_body(metadata={"pad": "x" * 1_100_000}))
    async with started(settings, keys) as app:
        status, content = await asgi_post(app, in_parts(body, 64_000), [])
    assert status == 413, content
    assert msgspec.json.decode(content)["status"] == 413
    assert await jobs.page(TENANT.id, status=None, limit=10, cursor=None) == ([], None)


async def test_a_submit_cut_short_stores_nothing(settings, keys, jobs):
    """A client that goes away in the middle of its body gets no job stored."""
    body = msgspec.json.encode(job_body())
    messages = [*in_parts(body, 20)[:2], {"type": "http.disconnect"}]
    async with started(settings, keys) as app:
        with contextlib.suppress(Exception):
            await asgi_post(app, messages, [])
    assert await jobs.page(TENANT.id, status=None, limit=10, cursor=None) == ([], None)


async def test_an_invalid_host_header_answers_400(settings, keys):
    """A submit whose Host header is not a host name answers 400 problem+json."""
    body = msgspec.json.encode(job_body())
    async with started(settings, keys) as app:
        status, content = await asgi_post(app, in_parts(body, 1000), [(b"host", b"a b/c")])
    assert status == 400
    assert msgspec.json.decode(content)["status"] == 400


async def test_an_unexpected_error_storing_a_job_answers_500_and_is_logged(
    api, monkeypatch, caplog
):
    """A bug while storing a submit answers 500 problem+json naming nothing internal."""

    async def broken(self, items, *, limits=(), budgets=()):
        raise RuntimeError("secret internals")

    monkeypatch.setattr(JobStore, "create_many", broken)
    answer = await api.post("/v1/jobs", json=job_body())
    assert_problem(answer, 500)
    assert "secret internals" not in answer.text
    assert [r.exc_info[0] for r in caplog.records if r.exc_info] == [RuntimeError]


@pytest.mark.parametrize("timeout_s", [9, 86_401, 60.5, "60"])
async def test_a_timeout_s_out_of_range_answers_422_naming_it(api, timeout_s):
    """timeout_s must be a whole number of seconds from 10 to 86,400."""
    answer = await api.post("/v1/jobs", json=job_body(timeout_s=timeout_s))
    assert pointers(answer) == {"#/timeout_s"}


async def test_a_job_carries_its_timeout_s_or_the_default(api):
    """The job answers the timeout_s it was given, else GATEWAY_JOB_TIMEOUT_S."""
    given = await api.post("/v1/jobs", json=job_body(timeout_s=600))
    default = await api.post("/v1/jobs", json=job_body())
    assert given.json()["timeout_s"] == 600
    assert default.json()["timeout_s"] == 7200
