"""End to end: a queued job's polls timed by its queue position, seen from the emulator.

One stack (Redis, emulator, API, worker as processes) in scaled time, where
RunComfy runs one request at a time (`--capacity 1`, runs of about 0.6 s), so a
batch submitted at once queues up and each job's position says how long it will
wait. The tests run in order on it: a cold gateway polls queued jobs by the
interval rule and learns the waits from each position; after that, a job far
back in the queue is polled a few times until it nears the head, and its start
is still seen soon after it happens.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from service.worker.timing import rule_polls
from tests.support import (
    gateway_clients,
    gateway_stack,
    metric_samples,
    new_tenant,
    unix,
    wait_for,
)

pytestmark = pytest.mark.e2e

TENANT = new_tenant("orders")
MIN_S, MAX_S = 0.1, 1.5
RUN_S, SPREAD = 0.6, 0.2
BATCH = 12
FAR_BACK = 6
"""Jobs with at least this many ahead of them when submitted count as far back."""


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A cold gateway in front of a RunComfy that runs one request at a time."""
    emulator_args = ["--queue-s", "0", "--run-s", str(RUN_S), "--spread", str(SPREAD)]
    emulator_args += ["--capacity", "1", "--seed", "7"]
    with gateway_stack(
        tmp_path_factory.mktemp("queue"),
        TENANT,
        emulator_args,
        POLL_INTERVAL_MIN_S=str(MIN_S),
        POLL_INTERVAL_MAX_S=str(MAX_S),
        POLL_LEARN_SAMPLES="24",
        POLL_LEARN_MIN_SAMPLES="4",
        POLL_LEARN_REFRESH_S="0.2",
        UPSTREAM_MAX_IN_FLIGHT="100",
    ) as urls:
        yield urls


@pytest.fixture
async def clients(stack) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    async with gateway_clients(stack, TENANT) as clients:
        yield clients


async def run_batch(clients: dict[str, httpx.AsyncClient]) -> list[dict[str, Any]]:
    """Submit BATCH jobs at once and wait until all completed; RunComfy's side of each.

    In the order RunComfy ran them, with `ahead` (runs before it) and `queued_polls` added.
    """
    api = clients["api"]
    body = {"input": {"prompt": "a paper boat", "video_url": "https://example.com/in.mp4"}}
    ids = [(await api.post("/v1/jobs", json=body)).json()["id"] for _ in range(BATCH)]

    async def completed() -> list[dict[str, Any]] | None:
        jobs = [(await api.get(f"/v1/jobs/{job_id}")).json() for job_id in ids]
        return jobs if all(j["status"] == "completed" for j in jobs) else None

    jobs: list[dict[str, Any]] = await wait_for(completed, timeout=60, every=0.2)
    items = (await clients["emulator"].get("/_emulator/requests")).json()["items"]
    requests = {item["request_id"]: item for item in items}
    mine = []
    for job in jobs:
        request = requests[job["upstream"]["request_id"]]
        request["start"] = unix(request["submitted_at"]) + request["queue_s"]
        # None when no poll saw it running (a cold gateway can miss a short run).
        request["seen_started"] = job["started_at"] and unix(job["started_at"])
        mine.append(request)
    mine.sort(key=lambda r: r["start"])
    for ahead, request in enumerate(mine):
        request["ahead"] = ahead
        request["queued_polls"] = sum(1 for at in request["status_polls"] if at < request["start"])
    return mine


async def learned_waits(clients: dict[str, httpx.AsyncClient]) -> dict[str, float]:
    """The worker's learned median wait per place from each position bucket (its metrics)."""
    exposition = (await clients["worker"].get("/metrics")).text
    return {
        labels["phase"]: value
        for labels, value in metric_samples(exposition, "rcg_poll_learned_seconds")
        if labels.get("resolution") == "any" and labels["quantile"] == "0.5"
    }


async def test_a_cold_gateway_polls_queued_jobs_by_the_rule_and_learns_the_waits(clients):
    """Nothing learned: a queued job is polled as the rule polls it; then the waits are known."""
    assert await learned_waits(clients) == {}
    far = [r for r in await run_batch(clients) if r["ahead"] >= FAR_BACK]
    rule = sum(rule_polls(r["queue_s"], MIN_S, MAX_S) for r in far)
    # Polls land a little late on a busy machine, and a late poll sees the change earlier.
    assert 0.6 * rule <= sum(r["queued_polls"] for r in far) <= rule + 3 * len(far)
    await run_batch(clients)  # the furthest buckets need a second batch to reach min_samples

    async def known() -> dict[str, float] | None:
        waits = await learned_waits(clients)
        return waits if {"queue_at_0", "queue_at_4-7"} <= waits.keys() else None

    waits = await wait_for(known, timeout=10)
    # One run at a time: a job waits about one run per place (those ahead and its own),
    # plus, counted from the poll before it was seen there, up to a poll gap.
    for phase in ("queue_at_1", "queue_at_2-3", "queue_at_4-7"):
        assert 0.7 * RUN_S <= waits[phase] <= RUN_S + MAX_S / 2, waits


async def test_a_job_far_back_is_polled_a_few_times_and_its_start_is_seen_soon(clients):
    """After learning, far-back jobs get fewer queued polls than the rule, starts seen in time."""
    batch = await run_batch(clients)
    far = [r for r in batch if r["ahead"] >= FAR_BACK]
    assert far
    polls = sum(r["queued_polls"] for r in far)
    rule = sum(rule_polls(r["queue_s"], MIN_S, MAX_S) for r in far)
    assert polls <= 0.5 * rule, (polls, rule)
    # Near the head polls are dense: most starts are seen within a few min intervals. Some
    # come before the learned 5th percentile, and a run this short can then pass unseen.
    late = sorted(r["seen_started"] - r["start"] if r["seen_started"] else math.inf for r in batch)
    assert late[BATCH * 3 // 4] <= 4 * MIN_S + 0.3, late
