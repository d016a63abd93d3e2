"""End to end: polls timed by learned run lengths, seen from the emulator (RunComfy's side).

One stack (Redis, emulator, API, worker as processes) in scaled time: runs of
about 2.5 s (±20%), polls between 0.1 and 1.5 s. The tests run in order on it: a
cold gateway learns from its first jobs, then polls learned jobs near their
end, keeps polling a job that outlives what was learned, and follows a change
of RunComfy's speed.
"""

from __future__ import annotations

import itertools
import statistics
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
QUEUE_S, RUN_S, SPREAD = 0.3, 2.5, 0.2
BASE = {"queue_s": QUEUE_S, "run_s": RUN_S, "spread": SPREAD, "speed": 1.0}
LEARNING_JOBS = 12
CLASS = {"resolution": "720p", "num_frames": "129", "pro_mode": "false"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[dict[str, str]]:
    """A cold gateway: its own Redis, the emulator, the API and one worker."""
    emulator_args = ["--queue-s", str(QUEUE_S), "--run-s", str(RUN_S), "--spread", str(SPREAD)]
    emulator_args += ["--seed", "5"]
    with gateway_stack(
        tmp_path_factory.mktemp("learn"),
        TENANT,
        emulator_args,
        POLL_INTERVAL_MIN_S=str(MIN_S),
        POLL_INTERVAL_MAX_S=str(MAX_S),
        POLL_LEARN_SAMPLES="12",
        POLL_LEARN_MIN_SAMPLES="4",
        POLL_LEARN_REFRESH_S="0.2",
        UPSTREAM_MAX_IN_FLIGHT="100",
    ) as urls:
        yield urls


@pytest.fixture
async def clients(stack) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    async with gateway_clients(stack, TENANT) as clients:
        yield clients
        await clients["emulator"].post("/_emulator/config", json=BASE)


async def run_jobs(clients: dict[str, httpx.AsyncClient], count: int) -> list[dict[str, Any]]:
    """Submit `count` jobs at once and wait until every one completed; each with its request."""
    api = clients["api"]
    body = {"input": {"prompt": "a paper boat", "video_url": "https://example.com/in.mp4"}}
    ids = [(await api.post("/v1/jobs", json=body)).json()["id"] for _ in range(count)]

    async def completed() -> list[dict[str, Any]] | None:
        jobs = [(await api.get(f"/v1/jobs/{job_id}")).json() for job_id in ids]
        return jobs if all(j["status"] == "completed" for j in jobs) else None

    jobs: list[dict[str, Any]] = await wait_for(completed, timeout=60, every=0.2)
    items = (await clients["emulator"].get("/_emulator/requests")).json()["items"]
    requests = {item["request_id"]: item for item in items}
    for job in jobs:
        job["_request"] = requests[job["upstream"]["request_id"]]
    return jobs


async def metric(clients: dict[str, httpx.AsyncClient], name: str, **labels: str) -> float | None:
    """The worker's sample `name` for the jobs' class and `labels`, None when it has none."""
    wanted = {**CLASS, **labels}
    exposition = (await clients["worker"].get("/metrics")).text
    return next((v for found, v in metric_samples(exposition, name) if found == wanted), None)


async def learned(clients: dict[str, httpx.AsyncClient], quantile: str) -> float | None:
    """The worker's learned run length of the jobs' class at `quantile`, from its metrics."""
    return await metric(clients, "rcg_poll_learned_seconds", phase="run", quantile=quantile)


async def test_a_cold_gateway_polls_by_the_interval_rule_and_learns(clients):
    """With nothing learned, jobs are polled as the interval rule polls; then the worker knows."""
    assert await learned(clients, "0.5") is None
    jobs = await run_jobs(clients, LEARNING_JOBS)
    for job in jobs:
        request = job["_request"]
        expected = rule_polls(request["queue_s"], MIN_S, MAX_S)
        expected += rule_polls(request["run_s"], MIN_S, MAX_S)
        # Polls land a little late on a busy machine, and a late poll sees the change earlier.
        assert 0.6 * expected <= len(request["status_polls"]) <= expected + 3, (expected, request)
    median = await wait_for(lambda: learned(clients, "0.5"), timeout=10)
    assert 0.8 * RUN_S * 0.9 <= median <= 1.2 * RUN_S
    assert await metric(clients, "rcg_polls_per_job_count") == LEARNING_JOBS
    assert await metric(clients, "rcg_poll_detection_delay_seconds_count") == LEARNING_JOBS


async def test_a_learned_job_is_polled_sparsely_then_densely_where_runs_end(clients):
    """After learning, polls are far apart until the learned 5th percentile, close after it."""
    low = await learned(clients, "0.05")
    assert low is not None
    jobs = await run_jobs(clients, 6)
    sparse: list[float] = []
    dense: list[float] = []
    for job in jobs:
        request = job["_request"]
        started, polls = unix(job["started_at"]), request["status_polls"]
        # The last sparse poll aims at the window's start (`low`), as the gateway saw it start.
        window = started + low - MIN_S
        for before, at in itertools.pairwise(polls):
            if before >= started:
                (dense if before >= window else sparse).append(at - before)
        cold = rule_polls(request["queue_s"], MIN_S, MAX_S)
        cold += rule_polls(request["run_s"], MIN_S, MAX_S)
        assert len(polls) < cold, (len(polls), cold)
    assert sparse, "no poll before the window"
    assert dense, "no poll inside the window"
    assert statistics.median(sparse) >= 5 * statistics.median(dense), (sparse, dense)


async def test_a_job_longer_than_anything_learned_is_polled_every_max_and_completes(clients):
    """A run three times the learned ones is still polled at least every max, and completes."""
    high = await learned(clients, "0.95")
    assert high is not None
    await clients["emulator"].post("/_emulator/config", json={"speed": 1 / 3, "spread": 0})
    (job,) = await run_jobs(clients, 1)
    polls = job["_request"]["status_polls"]
    started = unix(job["started_at"])
    late = [at for at in polls if at > started + high]
    assert len(late) >= (job["_request"]["run_s"] - high) / MAX_S - 1
    gaps = [b - a for a, b in itertools.pairwise(polls)]
    assert max(gaps) <= MAX_S + 0.5  # the max interval, plus what a loaded machine adds


async def test_a_change_of_speed_is_followed(clients):
    """When RunComfy slows to half speed, the learned run follows within five jobs."""
    await clients["emulator"].post("/_emulator/config", json={"speed": 0.5})
    await run_jobs(clients, 5)
    longest_before = (1 + SPREAD) * RUN_S

    async def followed() -> float | None:
        median = await learned(clients, "0.5")
        return median if median is not None and median > longest_before else None

    # Longer than any run at the old speed: only the runs since the change count.
    median = await wait_for(followed, timeout=10)
    assert median <= 3 * RUN_S
