"""The worker's loops against a real Redis, the real emulator and a real webhook receiver."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import httpx
import msgspec
import pytest
from prometheus_client import CONTENT_TYPE_LATEST

from service.config import Settings, Tenant, load_settings
from service.localredis import free_port
from service.models import JobErrorInfo
from service.runcomfy.emulator import EmulatorConfig, start_emulator
from service.store.connection import connect
from service.store.deliveries import DeliveryStore, Resend
from service.store.jobs import JobStore, Outcome, StoredJob
from service.store.keys import Keys
from service.store.limits import Limits
from service.store.schedules import Schedules
from service.worker.dispatcher import (
    CONCURRENCY,
    PER_DESTINATION,
    PER_TENANT,
    AttemptSlots,
    Destination,
)
from service.worker.main import run_worker
from tests.support import (
    CLI,
    NO_PREFLIGHT,
    HangingReceiver,
    Receiver,
    gateway_env,
    job_record,
    new_tenant,
    tenants_of,
    wait_for,
)

TENANT = new_tenant("orders")
PREFLIGHT_ON = {"GATEWAY_PREFLIGHT": "on", "GATEWAY_PREFLIGHT_ALLOW_HOSTS": "127.0.0.1"}


@dataclass
class Gateway:
    settings: Settings
    jobs: JobStore
    deliveries: DeliveryStore
    schedules: Schedules
    limits: Limits
    emulator: str
    receiver: Receiver
    stop: asyncio.Event
    task: asyncio.Task[None]

    async def submit(self, tenant: str = TENANT.id, **kwargs: Any) -> str:
        kwargs.setdefault("webhook_url", self.receiver.url)
        record = job_record(tenant, **kwargs)
        await self.jobs.create(record)
        return record.id

    async def final(self, job_id: str, timeout: float = 15) -> StoredJob:
        async def check() -> StoredJob | None:
            stored = await self.jobs.get(job_id)
            done = stored and stored.record.status in {"completed", "failed", "cancelled"}
            return stored if done else None

        return await wait_for(check, timeout=timeout)

    async def emulator_state(self) -> dict[str, Any]:
        url = f"{self.emulator}/_emulator/requests"
        async with httpx.AsyncClient() as http:
            return (await http.get(url)).json()  # type: ignore[no-any-return]

    async def configure_emulator(self, **config: Any) -> None:
        url = f"{self.emulator}/_emulator/config"
        async with httpx.AsyncClient() as http:
            answer = await http.post(url, json=config)
        assert answer.status_code == 200, answer.text

    async def webhooks(self, count: int) -> list[dict[str, Any]]:
        async def check() -> bool:
            return len(self.receiver.received) >= count

        await wait_for(check)
        return [r.verified_by(TENANT.whsec) for r in self.receiver.received]


@pytest.fixture
async def gateway_factory(redis_server, keys: Keys) -> AsyncIterator[Any]:
    started: list[tuple[Gateway, Any]] = []

    async def start(
        emulator: EmulatorConfig | None = None,
        *,
        env: dict[str, str] | None = None,
        statuses: list[int] | None = None,
        hosts: tuple[str, ...] = ("127.0.0.1",),
        metrics_port: int | None = None,
        others: tuple[Tenant, ...] = (),
        **limits: Any,
    ) -> Gateway:
        upstream = await start_emulator(emulator or EmulatorConfig(queue_s=0.2, run_s=0.2))
        url = upstream.url
        receiver = await Receiver(statuses=list(statuses or [])).start()
        settings = load_settings(
            {
                "REDIS_URL": redis_server.url,
                "RUNCOMFY_BASE_URL": url,
                "RUNCOMFY_API_TOKEN": "test-token",
                "GATEWAY_POLL_INTERVAL_MIN_S": "0.05",
                "GATEWAY_POLL_INTERVAL_MAX_S": "0.2",
                "GATEWAY_WEBHOOK_RETRY_SCHEDULE": "0.05,0.05,0.05",
                "GATEWAY_LEASE_S": "5",
                "GATEWAY_UPSTREAM_TIMEOUT_S": "1",
                "GATEWAY_WEBHOOK_TIMEOUT_S": "2",
                "GATEWAY_SHUTDOWN_S": "3",
                **NO_PREFLIGHT,
                **(env or {}),
            },
            tenants=tenants_of(TENANT.tenant(hosts=hosts, **limits), *others),
        )
        redis = connect(redis_server.url)
        stop = asyncio.Event()
        gateway = Gateway(
            settings=settings,
            jobs=JobStore(redis, keys, retention_s=settings.job_retention_s),
            deliveries=DeliveryStore(redis, keys, retention_s=settings.job_retention_s),
            schedules=Schedules(redis, keys, lease_s=settings.lease_s),
            limits=Limits(redis, keys),
            emulator=url,
            receiver=receiver,
            stop=stop,
            task=asyncio.create_task(
                run_worker(settings, stop, keys=keys, metrics_port=metrics_port)
            ),
        )
        started.append((gateway, (upstream, redis)))
        return gateway

    yield start
    for gateway, (upstream, redis) in started:
        gateway.stop.set()
        await asyncio.wait_for(gateway.task, 10)
        await gateway.receiver.stop()
        await upstream.stop()
        await redis.aclose()


async def test_a_job_completes_with_output_and_one_verified_webhook(gateway_factory):
    """A job runs to completed, carries the emulator's output video, and its webhook verifies."""
    gw = await gateway_factory()
    job_id = await gw.submit()
    final = await gw.final(job_id)
    assert final.record.status == "completed"
    video = final.record.output["video"]
    async with httpx.AsyncClient() as http:
        assert (await http.get(video)).status_code == 200
    assert final.record.submitted_at
    assert final.record.started_at
    assert final.record.finished_at
    [event] = await gw.webhooks(1)
    assert event["type"] == "job.completed"
    assert event["data"]["id"] == job_id
    assert event["data"]["output"]["video"] == video
    assert (await gw.emulator_state())["submits"] == 1
    stored = await wait_for(
        lambda: _when(gw.jobs.get(job_id), lambda s: s.webhook_state == "delivered")
    )
    assert stored.webhook_attempts == 1


async def test_a_job_whose_input_is_not_a_video_fails_unpaid_with_a_webhook(gateway_factory):
    """With pre-flight on, an HTML input fails the job as input_not_video; nothing is submitted."""
    gw = await gateway_factory(env=PREFLIGHT_ON)
    job_id = await gw.submit(video_url=f"{gw.emulator}/_emulator/inputs/page.html?type=text/html")
    final = await gw.final(job_id)
    assert final.record.status == "failed"
    assert final.record.error is not None
    assert final.record.error.code == "input_not_video"
    assert final.record.submits == []
    [event] = await gw.webhooks(1)
    assert (event["type"], event["data"]["error"]["code"]) == ("job.failed", "input_not_video")
    assert (await gw.emulator_state())["submits"] == 0


async def test_a_busy_input_is_not_asked_again_past_the_job_deadline(gateway_factory):
    """A 503 asking to come back after the job deadline fails the job now, unpaid."""
    gw = await gateway_factory(env=PREFLIGHT_ON)
    url = f"{gw.emulator}/_emulator/inputs/busy.mp4?status=503&retry_after=30"
    final = await gw.final(await gw.submit(video_url=url, timeout_s=10))
    assert final.record.status == "failed"
    assert final.record.error == JobErrorInfo(
        code="input_unreachable",
        message="video_url answered HTTP 503; the job deadline comes before another try",
    )
    state = await gw.emulator_state()
    assert (state["submits"], state["input_requests"]) == (0, {"busy.mp4": 1})


async def test_with_preflight_off_the_input_is_not_checked(gateway_factory):
    """GATEWAY_PREFLIGHT=off sends a job upstream without asking its input anything."""
    gw = await gateway_factory(env={**PREFLIGHT_ON, "GATEWAY_PREFLIGHT": "off"})
    job_id = await gw.submit(video_url=f"{gw.emulator}/_emulator/inputs/gone.mp4?status=404")
    assert (await gw.final(job_id)).record.status == "completed"
    state = await gw.emulator_state()
    assert (state["submits"], state["input_requests"]) == (1, {})


async def test_a_failed_upstream_job_ends_failed_with_its_error(gateway_factory):
    """RunComfy reporting failure ends the job failed, with the upstream error and a webhook."""
    gw = await gateway_factory(EmulatorConfig(queue_s=0.1, run_s=0.1, fail_rate=1.0))
    job_id = await gw.submit()
    final = await gw.final(job_id)
    assert final.record.status == "failed"
    assert final.record.error is not None
    assert final.record.error.code.startswith("upstream_")
    assert final.record.error.message
    [event] = await gw.webhooks(1)
    assert event["type"] == "job.failed"
    assert event["data"]["error"]["code"] == final.record.error.code


async def test_cancelling_a_queued_job_cancels_it_upstream(gateway_factory):
    """A cancel request on an in_queue job makes the worker cancel it at RunComfy."""
    gw = await gateway_factory(EmulatorConfig(queue_s=30, run_s=1))
    job_id = await gw.submit()
    stored = await wait_for(
        lambda: _when(gw.jobs.get(job_id), lambda s: s.record.status == "in_queue")
    )
    await gw.jobs.cancel_requested(stored)
    final = await gw.final(job_id)
    assert final.record.status == "cancelled"
    [event] = await gw.webhooks(1)
    assert event["type"] == "job.cancelled"
    items = (await gw.emulator_state())["items"]
    assert [i["status"] for i in items] == ["cancelled"]


async def test_started_event_is_sent_only_when_subscribed(gateway_factory):
    """A job subscribed to job.started gets it before job.completed."""
    gw = await gateway_factory()
    await gw.submit(events=["job.started", "job.completed"])
    events = await gw.webhooks(2)
    assert [e["type"] for e in events] == ["job.started", "job.completed"]
    assert events[0]["data"]["status"] == "in_progress"


async def test_rate_limited_submits_are_retried_and_recorded(gateway_factory):
    """429 answers are definite: retried, each try recorded, one paid submit counted."""
    gw = await gateway_factory(
        EmulatorConfig(queue_s=0.1, run_s=0.1, rate_429=1.0, retry_after_s=0.1)
    )
    job_id = await gw.submit()
    await wait_for(lambda: _when(gw.jobs.get(job_id), lambda s: len(s.record.submits) >= 2))
    await gw.configure_emulator(rate_429=0.0)
    final = await gw.final(job_id, timeout=30)
    assert final.record.status == "completed"
    outcomes = [s.outcome for s in final.record.submits]
    assert outcomes[-1] == "accepted"
    assert set(outcomes[:-1]) == {"rejected"}
    assert (await gw.emulator_state())["submits"] == 1
    assert msgspec.json.decode(final.view_json())["upstream_submits"] == 1


async def test_submits_reach_runcomfy_no_faster_than_the_shared_rate_limit(gateway_factory):
    """With rate 5/s and burst 2, no window of submits holds more than 2 + 5/s x its length."""
    rate, burst = 5.0, 2
    gw = await gateway_factory(
        EmulatorConfig(queue_s=0, run_s=0),
        env={"GATEWAY_UPSTREAM_RATE_PER_S": str(rate), "GATEWAY_UPSTREAM_BURST": str(burst)},
    )
    ids = [await gw.submit(webhook_url=None) for _ in range(8)]
    finals = [await gw.final(job_id) for job_id in ids]
    assert {f.record.status for f in finals} == {"completed"}
    items = (await gw.emulator_state())["items"]
    sent = sorted(datetime.fromisoformat(i["submitted_at"]).timestamp() for i in items)
    assert len(sent) == len(ids)
    for first in range(len(sent)):
        for last in range(first, len(sent)):
            window = sent[last] - sent[first] + 0.01  # the emulator's clock has ms resolution
            assert last - first + 1 <= burst + rate * window


async def test_a_submit_with_unknown_outcome_is_not_repeated(gateway_factory):
    """A submit answered by a dropped connection fails the job instead of paying twice."""
    gw = await gateway_factory(
        EmulatorConfig(queue_s=0.1, run_s=0.1, drop_rate=1.0, faults_on_submit_only=True)
    )
    job_id = await gw.submit()
    final = await gw.final(job_id)
    assert final.record.status == "failed"
    assert final.record.error.code == "upstream_submit_unknown"
    assert [s.outcome for s in final.record.submits] == ["unknown"]
    assert (await gw.emulator_state())["submits"] == 1  # the paid request does exist upstream


async def test_unknown_outcome_retry_policy_submits_once_more_and_says_so(gateway_factory):
    """With GATEWAY_SUBMIT_UNKNOWN=retry the job is submitted again and both submits are logged."""
    gw = await gateway_factory(
        EmulatorConfig(queue_s=0.1, run_s=0.1, drop_rate=1.0, faults_on_submit_only=True),
        env={"GATEWAY_SUBMIT_UNKNOWN": "retry"},
    )
    job_id = await gw.submit()
    await wait_for(lambda: _when(gw.jobs.get(job_id), lambda s: len(s.record.submits) >= 1))
    await gw.configure_emulator(drop_rate=0.0)
    final = await gw.final(job_id)
    assert [s.outcome for s in final.record.submits] in (
        ["unknown", "accepted"],
        ["unknown", "unknown"],
    )
    assert final.view_json().count(b'"upstream_submits":2') == 1


async def test_a_job_past_its_deadline_fails_with_timeout(gateway_factory):
    """A job still queued upstream at its deadline ends failed with code timeout."""
    gw = await gateway_factory(EmulatorConfig(queue_s=60, run_s=1))
    job_id = await gw.submit(timeout_s=1.0)
    final = await gw.final(job_id)
    assert final.record.status == "failed"
    assert final.record.error.code == "timeout"


async def test_jobs_in_runcomfy_never_exceed_the_tenant_cap(gateway_factory):
    """With max_in_flight 2, RunComfy never holds more than 2 of the tenant's jobs."""
    gw = await gateway_factory(EmulatorConfig(queue_s=0.3, run_s=0.3), max_in_flight=2)
    ids = [await gw.submit(webhook_url=None) for _ in range(6)]
    peak = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        items = (await gw.emulator_state())["items"]
        live = sum(1 for i in items if i["status"] in {"in_queue", "in_progress"})
        peak = max(peak, live)
        stored = await gw.jobs.get_many(ids)
        if all(s.record.status == "completed" for s in stored):
            break
        await asyncio.sleep(0.02)
    assert all(s.record.status == "completed" for s in await gw.jobs.get_many(ids))
    print(f"\npeak jobs inside RunComfy for a tenant with max_in_flight 2: {peak}")
    assert 1 <= peak <= 2


async def test_webhooks_are_retried_with_the_same_id_until_delivered(gateway_factory):
    """A receiver failing twice gets the same webhook-id three times; the third ends it."""
    gw = await gateway_factory(statuses=[500, 503])
    job_id = await gw.submit()
    events = await gw.webhooks(3)
    ids = {r.headers["webhook-id"] for r in gw.receiver.received}
    assert len(ids) == 1
    assert {e["type"] for e in events} == {"job.completed"}
    bodies = {r.body for r in gw.receiver.received}
    assert len(bodies) == 1  # the exact same bytes every time
    stored = await wait_for(
        lambda: _when(gw.jobs.get(job_id), lambda s: s.webhook_state == "delivered")
    )
    assert stored.webhook_attempts == 3
    log = await gw.deliveries.log(await gw.deliveries.final_delivery_id(job_id))
    assert [a.status_code for a in log] == [500, 503, 200]
    assert log[0].next_attempt_at is not None
    assert log[-1].next_attempt_at is None


async def test_a_delivery_that_exhausts_its_schedule_is_failed_and_kept(gateway_factory):
    """After the last retry the delivery is failed, logged, and can be re-sent."""
    gw = await gateway_factory(statuses=[500] * 4)
    job_id = await gw.submit()
    stored = await wait_for(
        lambda: _when(gw.jobs.get(job_id), lambda s: s.webhook_state == "failed"), timeout=20
    )
    assert stored.webhook_attempts == 4
    await gw.deliveries.resend(job_id, TENANT.id)
    stored = await wait_for(
        lambda: _when(gw.jobs.get(job_id), lambda s: s.webhook_state == "delivered")
    )
    assert stored.webhook_attempts == 5
    assert len({r.headers["webhook-id"] for r in gw.receiver.received}) == 1


async def test_stopping_the_worker_returns_within_the_shutdown_budget(gateway_factory):
    """Setting stop makes the worker drain and return within GATEWAY_SHUTDOWN_S."""
    gw = await gateway_factory(EmulatorConfig(queue_s=30, run_s=1))
    await gw.submit()
    started = time.monotonic()
    gw.stop.set()
    await asyncio.wait_for(gw.task, 10)
    assert time.monotonic() - started < gw.settings.shutdown_s + 1


async def _when(coro: Any, predicate: Any) -> Any:
    value = await coro
    return value if value is not None and predicate(value) else None


async def test_no_funds_pauses_submits_then_resumes_without_failing_jobs(gateway_factory):
    """A 402 pauses every submit; when funds are back, the waiting jobs complete."""
    gw = await gateway_factory(
        EmulatorConfig(queue_s=0.1, run_s=0.1, funds_exhausted=True),
        env={"GATEWAY_FUNDS_PAUSE_S": "0.5"},
    )
    ids = [await gw.submit(webhook_url=None) for _ in range(3)]
    pause = await wait_for(gw.limits.upstream_pause)
    assert pause.reason == "insufficient_funds"
    stored = await gw.jobs.get_many(ids)
    assert all(s.record.status == "pending" for s in stored)
    await gw.configure_emulator(funds_exhausted=False)
    finals = [await gw.final(job_id) for job_id in ids]
    assert {f.record.status for f in finals} == {"completed"}
    assert all(f.record.submit_retries == 0 for f in finals)


# Upstream never holds jobs back: the tests below are about webhooks only.
NO_UPSTREAM_LIMITS = {
    # Hundreds of jobs' RunComfy calls share this process with the receivers: a loaded
    # machine must not turn them into timeouts.
    "GATEWAY_UPSTREAM_TIMEOUT_S": "10",
    "GATEWAY_UPSTREAM_RATE_PER_S": "10000",
    "GATEWAY_UPSTREAM_BURST": "1000",
    "GATEWAY_UPSTREAM_MAX_IN_FLIGHT": "1000",
}
# An attempt at a hanging receiver outlasts any test, so what has arrived there still hangs.
HANGING_ENV = {"GATEWAY_LEASE_S": "120", "GATEWAY_WEBHOOK_TIMEOUT_S": "60", **NO_UPSTREAM_LIMITS}
MEDIA = new_tenant("media")  # a second tenant, whose receivers hang
# However many of one tenant's webhooks hang, another's arrive within this (it takes ms).
UNDELAYED_S = 2.0


async def _all_completed(gw: Gateway, job_ids: list[str]) -> bool:
    return all(s and s.record.status == "completed" for s in await gw.jobs.get_many(job_ids))


async def _hang(gw: Gateway, tenant: str, hanging: HangingReceiver, count: int) -> list[str]:
    """`count` jobs of `tenant`, their webhooks spread over `hanging`'s URLs, all hanging."""
    stuck = [
        await gw.submit(tenant, webhook_url=hanging.urls[i % len(hanging.urls)])
        for i in range(count)
    ]
    await wait_for(lambda: _all_completed(gw, stuck))
    # Each destination holds as many attempts as the tenant may run there, or its share is full.
    most = min(PER_DESTINATION * len(hanging.urls), PER_TENANT)
    await wait_for(lambda: _async(hanging.arrived >= most))
    return stuck


async def _seconds_to_webhook(gw: Gateway, count: int) -> list[float]:
    """Submit `count` jobs of TENANT; the seconds from each job's end to its webhook's arrival."""
    fast = [await gw.submit() for _ in range(count)]
    events = await gw.webhooks(count)
    assert {e["data"]["id"] for e in events} == set(fast)
    return [
        received.at - datetime.fromisoformat(event["data"]["finished_at"]).timestamp()
        for received, event in zip(gw.receiver.received, events, strict=True)
    ]


async def test_a_hanging_receiver_does_not_delay_deliveries_to_others(gateway_factory):
    """While one receiver never answers, webhooks to another port of its host arrive at once."""
    hanging = await HangingReceiver(hosts=("127.0.0.1",)).start()
    try:
        gw = await gateway_factory(EmulatorConfig(queue_s=0, run_s=0), env=HANGING_ENV)
        stuck = await _hang(gw, TENANT.id, hanging, CONCURRENCY + 50)  # more than all slots
        latencies = await _seconds_to_webhook(gw, 5)
        assert max(latencies) < UNDELAYED_S, latencies
        # They did not wait for a slot freed by the hanging host: none of its attempts ended.
        assert all(s.webhook_attempts == 0 for s in await gw.jobs.get_many(stuck))
        assert hanging.arrived <= PER_DESTINATION  # never more attempts there at once
    finally:
        await hanging.stop()


async def test_a_tenants_hanging_receiver_does_not_delay_another_tenant_on_the_same_host(
    gateway_factory,
):
    """150 of a tenant's webhooks hanging at a host:port do not delay another's to another port."""
    hanging = await HangingReceiver(hosts=("127.0.0.1",)).start()
    try:
        gw = await gateway_factory(
            EmulatorConfig(queue_s=0, run_s=0), env=HANGING_ENV, others=(MEDIA.tenant(),)
        )
        await _hang(gw, MEDIA.id, hanging, 150)
        latencies = await _seconds_to_webhook(gw, 5)
        assert max(latencies) < UNDELAYED_S, latencies
    finally:
        await hanging.stop()


async def test_a_tenant_spreading_hanging_receivers_over_hosts_does_not_delay_another(
    gateway_factory,
):
    """A tenant's webhooks hanging on three host names, many ports each, do not delay another's."""
    hosts = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
    # More destinations than the dispatcher has slots for, were each to fill.
    hanging = await HangingReceiver(hosts=hosts, ports=6).start()
    try:
        gw = await gateway_factory(
            EmulatorConfig(queue_s=0, run_s=0),
            env=HANGING_ENV,
            others=(MEDIA.tenant(hosts=hosts),),
        )
        await _hang(gw, MEDIA.id, hanging, 450)  # more than the dispatcher's slots
        latencies = await _seconds_to_webhook(gw, 5)
        assert max(latencies) < UNDELAYED_S, latencies
        assert hanging.arrived <= PER_TENANT  # the tenant never ran more than its share
    finally:
        await hanging.stop()


async def _async(value: Any) -> Any:
    return value


async def test_a_job_cancelled_while_its_submit_is_in_flight_cancels_that_request(
    gateway_factory,
):
    """Cancelling during a slow submit cancels the request it created and records it."""
    gw = await gateway_factory(EmulatorConfig(queue_s=60, run_s=1, latency_ms=400))
    job_id = await gw.submit(webhook_url=None)
    sending = await wait_for(
        lambda: _when(gw.jobs.get(job_id), lambda s: s.record.submits[-1:] != [])
    )
    assert await gw.jobs.finish(sending, "cancelled", lease=None) is Outcome.DONE
    final = await wait_for(
        lambda: _when(gw.jobs.get(job_id), lambda s: s.record.submits[-1].outcome == "accepted")
    )
    assert final.record.status == "cancelled"
    assert "upstream cancel: cancelled" in final.record.submits[-1].detail
    items = (await gw.emulator_state())["items"]
    assert [i["status"] for i in items] == ["cancelled"]


async def test_worker_metrics_count_calls_jobs_and_deliveries(gateway_factory):
    """After a job, the worker's /metrics shows its upstream calls, the job and its webhook."""
    port = free_port()
    gw = await gateway_factory(metrics_port=port)
    job_id = await gw.submit()
    await wait_for(lambda: _when(gw.jobs.get(job_id), lambda s: s.webhook_state == "delivered"))
    async with httpx.AsyncClient() as http:
        answer = await http.get(f"http://127.0.0.1:{port}/metrics")
    assert answer.headers["content-type"] == CONTENT_TYPE_LATEST  # one charset, not two
    text = answer.text
    assert 'rcg_upstream_request_duration_seconds_count{call="submit"} 1.0' in text
    assert 'rcg_jobs_finished_total{status="completed",tenant="orders"} 1.0' in text
    assert 'rcg_webhook_attempts_total{outcome="delivered",tenant="orders"} 1.0' in text
    assert 'rcg_webhook_delivery_seconds_count{tenant="orders"} 1.0' in text
    assert 'rcg_schedule_depth{schedule="backlog"} 0.0' in text
    assert "rcg_tenants_config_ok 1.0" in text


async def test_a_410_stops_retrying_at_once(gateway_factory):
    """A receiver answering 410 Gone ends the delivery as failed after one attempt."""
    gw = await gateway_factory(statuses=[410, 200, 200])
    job_id = await gw.submit()
    stored = await wait_for(
        lambda: _when(gw.jobs.get(job_id), lambda s: s.webhook_state == "failed")
    )
    assert stored.webhook_attempts == 1
    log = await gw.deliveries.log(await gw.deliveries.final_delivery_id(job_id))
    assert [(a.status_code, a.next_attempt_at) for a in log] == [(410, None)]
    assert len(gw.receiver.received) == 1


async def test_a_worker_whose_submits_stall_turns_its_health_red(gateway_factory, monkeypatch):
    """Claimable jobs left unclaimed for three leases make /healthz answer 503 and name it."""

    async def claims_nothing(*_: Any, **__: Any) -> list[Any]:
        return []  # as the slot leak did: every slot held, nothing claimable by the cap

    monkeypatch.setattr(Schedules, "claim_submits", claims_nothing)
    monkeypatch.setattr("service.worker.submitter.STALL_CHECK_S", 0.2)
    port = free_port()
    fast = {"GATEWAY_LEASE_S": "1", "GATEWAY_UPSTREAM_TIMEOUT_S": "0.5"}
    gw = await gateway_factory(metrics_port=port, env={**fast, "GATEWAY_WEBHOOK_TIMEOUT_S": "0.5"})
    await gw.submit()

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
        # A worker whose loops have not beaten yet answers 503 naming none: wait for this one.
        red = await wait_for(
            lambda: _when(
                http.get("/healthz"),
                lambda r: r.status_code == 503 and "submitter" in r.json()["loops"],
            ),
            timeout=30,
        )
        assert red.json()["loops"] == ["submitter"]
        metrics = (await http.get("/metrics")).text
    stall = re.search(r"^rcg_submit_stall_seconds (\S+)$", metrics, re.MULTILINE)
    assert stall is not None
    assert float(stall[1]) > 3


async def test_a_hostile_receiver_cannot_grow_a_job_past_its_cap(gateway_factory, redis, keys):
    """20 KB of NULs answered to 120 attempts and 3 re-sends: the job stays under 256 KB."""
    retries = ",".join(["0.01"] * 40)
    gw = await gateway_factory(env={"GATEWAY_WEBHOOK_RETRY_SCHEDULE": retries})
    gw.receiver.statuses = [500] * 1000
    gw.receiver.failure_body = b"\0" * 20_000
    job_id = await gw.submit()
    for sends in range(1, 4):
        await wait_for(
            lambda n=sends: _when(
                gw.jobs.get(job_id),
                lambda s, n=n: s.webhook_state == "failed" and s.webhook_attempts == 41 * n,
            ),
            timeout=30,
        )
        if sends < 3:
            assert await gw.deliveries.resend(job_id, TENANT.id) is Resend.QUEUED
    stored = await gw.jobs.get(job_id)
    assert stored.webhook_attempts == 3 * 41
    log = await gw.deliveries.log(await gw.deliveries.final_delivery_id(job_id))
    assert [a.attempt for a in log] == list(range(3 * 41 - 49, 3 * 41 + 1))
    assert {len(a.response_excerpt.encode()) for a in log} == {2048}
    assert await redis.memory_usage(keys.job(job_id)) < 256 * 1024


async def test_a_removed_tenants_jobs_fail_unpaid_and_its_webhooks_are_skipped(gateway_factory):
    """Queued jobs fail with tenant_removed unsent, a running one ends, no webhook is signed."""
    gw = await gateway_factory(
        EmulatorConfig(queue_s=0.1, run_s=1.5), env={"GATEWAY_UPSTREAM_MAX_IN_FLIGHT": "1"}
    )
    running = await gw.submit()
    await wait_for(lambda: _when(gw.jobs.get(running), lambda s: s.record.status != "pending"))
    queued = [await gw.submit() for _ in range(3)]
    gw.settings.tenants.replace_with(tenants_of())  # as a reloaded tenants file would
    for job_id in queued:
        final = await gw.final(job_id, timeout=5)
        assert final.record.status == "failed"
        assert final.record.error.code == "tenant_removed"
        assert final.record.submits == []
    assert (await gw.final(running)).record.status == "completed"
    assert (await gw.emulator_state())["submits"] == 1
    for job_id in [running, *queued]:
        stored = await wait_for(
            lambda j=job_id: _when(gw.jobs.get(j), lambda s: s.webhook_state != "pending")
        )
        assert stored.webhook_state == "skipped"
    assert gw.receiver.received == []


def test_a_destination_is_a_tenants_host_and_port_with_the_schemes_default():
    """An explicit default port is the same destination; another port or tenant is another."""
    same = {Destination.of("a", "https://h.test/x"), Destination.of("a", "https://H.test:443/y")}
    assert same == {Destination("a", "h.test", 443)}
    assert Destination.of("a", "http://h.test/x") == Destination("a", "h.test", 80)
    assert Destination.of("a", "http://h.test:8080/x") != Destination.of("a", "http://h.test/x")
    assert Destination.of("a", "http://h.test:99999/x").port is None  # the attempt says invalid_url


def test_a_tenants_share_bounds_its_attempts_over_all_its_destinations():
    """A tenant full across several hosts leaves another tenant's slots, at the same host, free."""
    slots = AttemptSlots(per_tenant=3, per_destination=2)
    hosts = [Destination("a", host, 443) for host in ("x.test", "y.test")]
    assert [slots.take(hosts[0]), slots.take(hosts[0]), slots.take(hosts[0])] == [True, True, False]
    assert slots.take(hosts[1])
    assert not slots.take(hosts[1])  # the share is used up, though y.test has a slot left
    assert slots.take(Destination("b", "x.test", 443))
    slots.give_back(hosts[0])
    assert slots.take(hosts[1])


def test_a_worker_whose_metrics_port_is_taken_says_so_in_one_line_and_exits_2(
    redis_server, tmp_path
):
    """A worker that cannot bind its metrics port prints one line, no traceback, and exits 2."""
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(TENANT.toml())
    env = gateway_env(redis_server.url, "http://127.0.0.1:9", tenants)  # it never gets that far
    # Every address, as the worker binds: a socket on 127.0.0.1 alone would conflict too.
    with socket.create_server(("0.0.0.0", 0)) as taken:  # noqa: S104
        port = taken.getsockname()[1]
        done = subprocess.run(
            [*CLI, "worker", "--metrics-port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    [line] = done.stderr.splitlines()
    assert str(port) in line
