"""Durable outputs: the tenants file's table, settings, helpers, the copy claim, a dead store.

The dead store's test runs a real worker in this process, with the emulator and real Redis.
"""

from __future__ import annotations

import asyncio
import hashlib
from datetime import timedelta

import httpx
import pytest
from obstore.exceptions import GenericError

from service.config import ConfigError, OutputStore, load_settings, parse_tenants
from service.localredis import free_port
from service.models import utcnow
from service.outputs import object_path, output_urls, replace_urls
from service.storage.objects import describe_store_error
from service.store.connection import connect
from service.store.jobs import JobStore
from service.store.schedules import Schedules
from service.worker.main import run_worker
from tests.support import (
    NO_PREFLIGHT,
    S3_ENV,
    emulator_output,
    job_record,
    new_tenant,
    tenants_of,
    wait_for,
)

TENANT = new_tenant("kept")
BASE_ENV = {"REDIS_URL": "redis://localhost:6379/0", "RUNCOMFY_API_TOKEN": "t"}


def tenants_with(store: str) -> str:
    return TENANT.toml() + f"[tenants.{TENANT.id}.output_store]\n" + store


def test_an_output_store_is_read_from_the_tenants_file():
    """url, endpoint_url, region and presign_s become the tenant's OutputStore."""
    tenants = parse_tenants(
        tenants_with(
            'url = "s3://media-bucket/runcomfy/orders/"\n'
            'endpoint_url = "https://s3.eu-west-1.amazonaws.com/"\n'
            'region = "eu-west-1"\npresign_s = 86400\n'
        )
    )
    assert tenants.by_id[TENANT.id].output_store == OutputStore(
        bucket="media-bucket",
        prefix="runcomfy/orders",
        endpoint_url="https://s3.eu-west-1.amazonaws.com",
        region="eu-west-1",
        presign_s=86400,
    )
    assert parse_tenants(TENANT.toml()).by_id[TENANT.id].output_store is None


@pytest.mark.parametrize(
    ("table", "field"),
    [
        ('endpoint_url = "https://s3.example.com"\n', "output_store.url"),
        ('url = "https://bucket/prefix"\n', "output_store.url"),
        ('url = "s3://Bad_Bucket/x"\n', "output_store.url"),
        ('url = "s3://bucket/a//b"\n', "output_store.url"),
        ('url = "s3://bucket/x"\nendpoint_url = "ftp://s3.example.com"\n', "endpoint_url"),
        ('url = "s3://bucket/x"\nendpoint_url = "https://k:s@s3.example.com"\n', "endpoint_url"),
        ('url = "s3://bucket/x"\nregion = "EU WEST"\n', "region"),
        ('url = "s3://bucket/x"\npresign_s = 0\n', "presign_s"),
        ('url = "s3://bucket/x"\npresign_s = 604801\n', "presign_s"),
        ('url = "s3://bucket/x"\npresign_s = true\n', "presign_s"),
    ],
)
def test_a_bad_output_store_is_refused_naming_the_field(table, field):
    """Each malformed field stops the configuration with a message that names it."""
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        parse_tenants(tenants_with(table))


def test_credentials_in_the_tenants_file_are_refused_without_echoing_them():
    """An access key in output_store is refused; the message names the key, never its value."""
    with pytest.raises(ConfigError) as refused:
        parse_tenants(
            tenants_with('url = "s3://bucket/x"\nsecret_access_key = "wJalrXUtnFEMI-SECRET"\n')
        )
    assert "secret_access_key" in str(refused.value)
    assert "wJalrXUtnFEMI" not in str(refused.value)
    assert "environment" in str(refused.value)


def test_output_settings_have_their_defaults_and_are_checked():
    """GATEWAY_OUTPUT_HOSTS and GATEWAY_OUTPUT_MAX_BYTES: defaults, values, refusals."""
    tenants = tenants_of(TENANT.tenant())
    settings = load_settings(BASE_ENV, tenants=tenants)
    assert settings.output_hosts == ("*.runcomfy.net", "*.runcomfy.com")
    assert settings.output_max_bytes == 2 * 1024**3
    custom = {**BASE_ENV, "GATEWAY_OUTPUT_HOSTS": "cdn.example.com, *.Example.org"}
    custom["GATEWAY_OUTPUT_MAX_BYTES"] = "1000"
    settings = load_settings(custom, tenants=tenants)
    assert settings.output_hosts == ("cdn.example.com", "*.example.org")
    assert settings.output_max_bytes == 1000
    with pytest.raises(ConfigError, match="GATEWAY_OUTPUT_HOSTS"):
        load_settings({**BASE_ENV, "GATEWAY_OUTPUT_HOSTS": "169.254.169.254"}, tenants=tenants)
    with pytest.raises(ConfigError, match="GATEWAY_OUTPUT_MAX_BYTES"):
        load_settings({**BASE_ENV, "GATEWAY_OUTPUT_MAX_BYTES": "lots"}, tenants=tenants)


def test_outputs_are_every_url_in_order_and_are_replaced_in_place():
    """Every http(s) URL of RunComfy's output is a file; stored URLs replace them in its shape."""
    output = {
        "video": "https://a.runcomfy.net/v.mp4",
        "images": ["https://a.runcomfy.net/1.png", "https://a.runcomfy.net/2"],
        "seed": 7,
    }
    urls = output_urls(output)
    assert urls == [
        "https://a.runcomfy.net/v.mp4",
        "https://a.runcomfy.net/1.png",
        "https://a.runcomfy.net/2",
    ]
    stored = replace_urls(output, {url: f"s3://b/{n}" for n, url in enumerate(urls)})
    assert stored == {"video": "s3://b/0", "images": ["s3://b/1", "s3://b/2"], "seed": 7}
    assert object_path("job_1", 0, urls[0], "video/mp4") == "job_1/0.mp4"
    assert object_path("job_1", 2, urls[2], "image/png") == "job_1/2.png"
    assert object_path("job_1", 3, "https://x/y", "application/x-unknown") == "job_1/3.bin"


async def test_a_lost_copy_claim_cannot_be_extended(redis, keys):
    """Once a copy claim's lease ran out and another worker took it, the first cannot keep it."""
    first = Schedules(redis, keys, lease_s=0.2)
    second = Schedules(redis, keys, lease_s=5)
    await redis.zadd(keys.schedule("copy"), {"job_a": 0})
    [claim] = await first.claim("copy", 10)
    assert await first.extend(claim)
    [taken] = await wait_for(lambda: second.claim("copy", 10), timeout=5)
    assert taken.member == "job_a"
    assert not await first.extend(claim)
    assert await second.extend(taken)


async def test_the_emulator_serves_an_output_of_the_chosen_size(emulator):
    """output_bytes: a completed request's video is that many generated bytes, streamed."""
    url = await emulator(queue_s=0, run_s=0, output_bytes=3 * 1024 * 1024 + 1)
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        body = {"prompt": "a boat", "video_url": "https://example.com/v.mp4"}
        submitted = await client.post("/v1/models/tencent/hunyuan/video-to-video", json=body)
        request_id = submitted.json()["request_id"]
        result = (await client.get(f"/v1/requests/{request_id}/result")).json()
        answer = await client.get(result["output"]["video"])
    assert answer.headers["content-length"] == str(3 * 1024 * 1024 + 1)
    assert answer.headers["content-type"] == "video/mp4"
    assert (hashlib.sha256(answer.content).hexdigest(), len(answer.content)) == emulator_output(
        3 * 1024 * 1024 + 1
    )


async def test_a_store_that_stays_down_fails_the_job_after_retries(
    redis_server, keys, emulator, monkeypatch
):
    """A store no one answers for: the copy is tried again with backoff, then output_copy_failed."""
    for name, value in S3_ENV.items():
        monkeypatch.setenv(name, value)
    upstream = await emulator()
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    tenants = parse_tenants(
        tenants_with(f'url = "s3://bucket/x"\nendpoint_url = "{dead}"\nregion = "us-east-1"\n')
    )
    settings = load_settings(
        {
            "REDIS_URL": redis_server.url,
            "RUNCOMFY_BASE_URL": upstream,
            "RUNCOMFY_API_TOKEN": "t",
            "GATEWAY_POLL_INTERVAL_MIN_S": "0.05",
            "GATEWAY_POLL_INTERVAL_MAX_S": "0.2",
            "GATEWAY_OUTPUT_HOSTS": "127.0.0.1",
            "GATEWAY_PREFLIGHT_ALLOW_HOSTS": "127.0.0.1",
            "GATEWAY_SHUTDOWN_S": "1",
            **NO_PREFLIGHT,
        },
        tenants=tenants,
    )
    redis = connect(redis_server.url)
    jobs = JobStore(redis, keys, retention_s=600)
    record = job_record(TENANT.id, timeout_s=6)
    await jobs.create(record)
    stop = asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, stop, keys=keys))
    try:

        async def failed():
            stored = await jobs.get(record.id)
            return stored if stored and stored.record.status == "failed" else None

        stored = await wait_for(failed, timeout=15)
    finally:
        stop.set()
        await asyncio.wait_for(worker, 10)
        await redis.aclose()
    assert stored.record.error.code == "output_copy_failed"
    assert "output store" in stored.record.error.message
    [file] = stored.record.output_files
    assert file.url is None
    assert file.upstream_url.startswith(f"{upstream}/outputs/")
    assert file.upstream_url in stored.record.error.message
    assert stored.record.copy_attempts >= 1  # tried again before giving up
    assert stored.record.finished_at <= record.deadline_at + timedelta(seconds=3)
    assert utcnow() >= stored.record.finished_at


def test_a_store_error_keeps_its_s3_code_and_masks_access_key_ids():
    """What a store answered is kept as its code; an access key id in it is masked."""
    answer = (
        "Generic S3 error: Error performing PUT http://s3/b/k for AKIAIOSFODNN7EXAMPLE: "
        "Client error with status 403 Forbidden: <?xml version='1.0'?><Error>"
        "<Code>InvalidAccessKeyId</Code><AWSAccessKeyId>AKIAIOSFODNN7EXAMPLE</AWSAccessKeyId>"
        "</Error>"
    )
    described = describe_store_error(GenericError(answer))
    assert "AKIAIOSFODNN7EXAMPLE" not in described
    assert described.startswith("GenericError: Generic S3 error")
    assert described.endswith("(S3 InvalidAccessKeyId)")
