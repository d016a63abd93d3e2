"""C2. Poll capacity: the most in-flight jobs one worker process keeps polled every second.

A ramp through the real flow: jobs are submitted to the API in steps (100,
200, ... 8,000 in flight), and one `worker` submits them to an emulator
that keeps them running for an hour, then polls each with
GATEWAY_POLL_INTERVAL_MIN_S = _MAX_S = 1 (upstream limits raised out of the
way). At each step, once every job of the step is upstream and a short settle
has passed, the emulator (counted_emulator.py) measures a window: status polls
per second, and the time between consecutive polls of each request.

A step is **on schedule** when, over its window, every job in flight was
polled and the 99th percentile of the gaps between two polls of one job is at
most 1.5 s (the 1 s interval plus half). Polls per second are shown beside it. The ramp stops at
the first step that is not; the figure is the last step that was. The ceiling
is plain aiohttp GETs of the same status URLs from another process, 256 in
flight (the poller's concurrency): the polls per second the emulator answers
when nothing else asks.
"""

import argparse
import asyncio
import json
import time
from dataclasses import dataclass

from harness import (
    BENCH,
    PROFILES,
    PYTHON,
    CpuMeter,
    Goal,
    Section,
    Stack,
    bench_tenant,
    emulator_counts,
    gateway_env,
    get_json,
    poll_gaps,
    profile,
    redis_pid,
    run_async,
    submit_jobs,
)

STEPS = (100, 200, 300, 400, 500, 750, 1000, 1500, 2000, 3000, 4000, 5000, 6000, 8000)
INTERVAL_S = 1.0
MAX_GAP_P99_S = 1.5
GOAL_JOBS = 5000
"""Issue 7's figure: 5,000 jobs kept polled every second by one worker."""
POLLER_CONCURRENCY = 256  # the Poller's default; the ceiling keeps as many in flight


@dataclass
class Step:
    """One step of the ramp."""

    jobs: int
    polled: int  # distinct jobs polled in the window
    polls_per_s: float
    gap_p50_s: float
    gap_p99_s: float
    worker_cpu: float  # % of one core

    @property
    def on_schedule(self) -> bool:
        return self.polled >= self.jobs and self.gap_p99_s <= MAX_GAP_P99_S

    def row(self) -> tuple[str, str]:
        verdict = "on schedule" if self.on_schedule else "NOT on schedule"
        return (
            f"{self.jobs:,} jobs in flight",
            (
                f"{self.polled:,} polled, {self.polls_per_s:,.0f} polls/s "
                f"({self.polls_per_s / self.jobs:.2f} per job), "
                f"gap p50 {self.gap_p50_s:.2f} s, p99 {self.gap_p99_s:.2f} s, "
                f"worker CPU {self.worker_cpu:.0f}%: {verdict}"
            ),
        )


async def upstream(emulator_url: str, count: int, timeout: float = 120.0) -> None:
    """Wait until the emulator has `count` requests: every job is submitted upstream."""
    deadline = time.monotonic() + timeout
    while (await emulator_counts(emulator_url))["submit"] < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"the worker did not submit {count} jobs within {timeout:g} s")
        await asyncio.sleep(0.2)


async def ceiling(emulator_url: str, seconds: float, stack: Stack) -> float:
    """Plain aiohttp GET status/s from another process, 256 in flight."""
    items = (await get_json(f"{emulator_url}/_emulator/requests"))["items"]
    urls = stack.dir / "status-urls.txt"
    urls.write_text(
        "\n".join(f"{emulator_url}/v1/requests/{i['request_id']}/status" for i in items)
    )
    args = [PYTHON, str(BENCH / "loadgen.py"), "--urls-file", str(urls)]
    args += ["--concurrency", str(POLLER_CONCURRENCY), "--duration", str(seconds), "--warmup", "1"]
    process = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
    result = json.loads((await process.communicate())[0])
    if set(result["statuses"]) != {"200"}:
        raise RuntimeError(f"the ceiling run saw {result['statuses']}")
    return float(result["rate"])


async def run(
    steps: tuple[int, ...] = STEPS,
    *,
    settle_s: float = 2.0,
    window_s: float = 4.0,
    profile_s: float = 0.0,
) -> Section:
    """Ramp the jobs in flight until a step is not on schedule."""
    tenant = bench_tenant()
    section = Section("C2. Poll capacity: jobs one worker keeps polled every second")
    done: list[Step] = []
    profiled: list[str] = []
    async with Stack() as stack:
        server = stack.redis()
        _, emulator_url = await stack.emulator(queue_s=0, run_s=3600)
        env = gateway_env(
            server.url,
            emulator_url,
            stack.tenants_file(tenant),
            poll_interval_min_s=INTERVAL_S,
            poll_interval_max_s=INTERVAL_S,
            upstream_rate_per_s=100_000,
            upstream_burst=100_000,
            upstream_max_in_flight=100_000,
        )
        _, api_url = await stack.api(env)
        worker = await stack.worker(env)
        in_flight = 0
        for jobs in steps:
            await submit_jobs(api_url, tenant.api_key, jobs - in_flight)
            in_flight = jobs
            await upstream(emulator_url, jobs)
            await asyncio.sleep(settle_s)
            await poll_gaps(emulator_url)  # starts the window
            before = await emulator_counts(emulator_url)
            meter = CpuMeter({"worker": worker.pid, "redis": redis_pid(server)})
            started = time.perf_counter()
            await asyncio.sleep(window_s)
            after = await emulator_counts(emulator_url)
            gaps = await poll_gaps(emulator_url)
            elapsed = time.perf_counter() - started
            cpu = meter.percent()
            polls = (after["status"] - before["status"]) / elapsed
            done.append(
                Step(jobs, int(gaps["requests"]), polls, gaps["p50"], gaps["p99"], cpu["worker"])
            )
            stack.check_alive()
            if not done[-1].on_schedule:
                if profile_s:
                    profiled = await profile(worker.pid, profile_s, PROFILES / "worker")
                break
        worker.stop()
        raw = await ceiling(emulator_url, 4.0, stack)

    kept = max((s.jobs for s in done if s.on_schedule), default=0)
    ratio = kept / raw
    section.figures = [
        ("most jobs kept on schedule at 1 s polls", f"{kept:,}"),
        ("ceiling: plain aiohttp GET status", f"{raw:,.0f} /s ({POLLER_CONCURRENCY} in flight)"),
        ("ratio kept / ceiling", f"{ratio:.2f}"),
        *(step.row() for step in done),
    ]
    last = done[-1]
    if last.polls_per_s:
        cost = last.worker_cpu * 10_000 / last.polls_per_s
        section.figures.append(("worker CPU per poll at the last step", f"{cost:,.0f} µs"))
    section.summary = section.figures[:3]
    section.goals = [
        Goal("C2 jobs on schedule at 1 s", f">= {GOAL_JOBS:,}", f"{kept:,}", kept >= GOAL_JOBS)
    ]
    section.notes = [
        "On schedule: every job polled, and the p99 gap between two polls of a job",
        f"<= {MAX_GAP_P99_S:g} s, over a {window_s:g} s window after a {settle_s:g} s settle;",
        "counts and gaps from the emulator. The ramp stops at the first step that misses.",
    ]
    if profiled:
        section.notes += ["", "Profile of the worker at the step it missed (py-spy):", *profiled]
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--window", type=float, default=4.0)
    parser.add_argument("--profile", type=float, default=0.0, help="profile the worker for N s")
    args = parser.parse_args()
    started = time.monotonic()
    print(run_async(run(window_s=args.window, profile_s=args.profile)).render())
    print(f"\n({time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    main()
