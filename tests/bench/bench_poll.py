"""C. Poll capacity: how many in-flight jobs one worker process keeps polled every second.

N = 5,000 jobs are put `in_progress` through the store's own state machine
(create, claim, record_submit, submitted, started), each with a real request
id in an emulator that keeps them running for an hour. Then one `worker`
process runs with GATEWAY_POLL_INTERVAL_MIN_S = _MAX_S = 1, so it needs N
status polls per second. The emulator (counted_emulator.py) counts the status
calls it answers; after a warm-up, polls/s over a fixed window / N per second
is the ratio (goal >= 0.95). The ceiling is plain aiohttp GETs of the same
status URLs from another process, as many in flight as the poller's
concurrency (256). Worker CPU per poll and Lua script calls per poll are
shown too: on a shared machine they vary far less than polls/s.
"""

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Iterable

import aiohttp
import redis.asyncio as aioredis
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
    profile,
    redis_pid,
    run_async,
)

from service.runcomfy.emulator import MODEL
from service.store.connection import connect
from service.store.jobs import JobStore, Outcome
from service.store.keys import Keys
from service.store.schedules import Schedules
from tests.support import job_record

JOBS = 5000
INTERVAL_S = 1.0
POLLER_CONCURRENCY = 256  # Poller's default; the ceiling uses as many in flight


async def bounded(calls: Iterable[Awaitable[object]], limit: int = 64) -> list[object]:
    gate = asyncio.Semaphore(limit)

    async def one(call: Awaitable[object]) -> object:
        async with gate:
            return await call

    return await asyncio.gather(*(one(c) for c in calls))


async def upstream_requests(emulator_url: str, count: int) -> list[str]:
    """Create `count` requests in the emulator; their ids."""
    body = json.dumps({"prompt": "p", "video_url": "https://example.com/in.mp4"})
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=50)) as session:

        async def one() -> str:
            async with session.post(f"{emulator_url}/v1/models/{MODEL}", data=body) as answer:
                return str((await answer.json())["request_id"])

        return [str(r) for r in await bounded((one() for _ in range(count)), 50)]


async def in_progress_jobs(redis_url: str, tenant: str, request_ids: list[str]) -> None:
    """Put one job per request id `in_progress`, its next poll due within the next second."""
    redis = connect(redis_url)
    keys = Keys()
    jobs = JobStore(redis, keys, retention_s=604800)
    schedules = Schedules(redis, keys, lease_s=30)
    n = len(request_ids)
    try:
        await bounded(jobs.create(job_record(tenant)) for _ in range(n))
        claims = await schedules.claim_submits(n, global_cap=n, tenant_caps={})
        stored = await jobs.get_many([c.member for c in claims])
        sent = await bounded(
            jobs.record_submit(s, c.lease) for s, c in zip(stored, claims, strict=True) if s
        )
        outcomes = await bounded(
            jobs.submitted(s, c.lease, rid, poll_in_s=0)
            for (_, s), c, rid in zip(sent, claims, request_ids, strict=True)  # type: ignore[misc]
        )
        polls = await schedules.claim("poll", n)
        stored = await jobs.get_many([c.member for c in polls])
        outcomes += await bounded(
            jobs.started(s, c.lease, poll_in_s=INTERVAL_S * i / n)
            for i, (s, c) in enumerate(zip(stored, polls, strict=True))
            if s
        )
        if len(claims) != n or len(polls) != n or any(o is not Outcome.DONE for o in outcomes):
            raise RuntimeError("could not put every job in_progress")
        if await redis.zcard(keys.jobs(tenant, "in_progress")) != n:
            raise RuntimeError("the in_progress index does not hold every job")
    finally:
        await redis.aclose()


async def script_calls(client: aioredis.Redis) -> int:
    """How many Lua script calls the Redis server has run so far."""
    stats = await client.info("commandstats")
    return sum(
        int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval")
    )


async def ceiling(
    emulator_url: str, request_ids: list[str], seconds: float, stack: Stack, emulator_pid: int
) -> tuple[float, str]:
    """Plain aiohttp GET status/s from another process, 256 in flight; and the CPU it took."""
    urls = stack.dir / "status-urls.txt"
    urls.write_text("\n".join(f"{emulator_url}/v1/requests/{r}/status" for r in request_ids))
    args = [PYTHON, str(BENCH / "loadgen.py"), "--urls-file", str(urls)]
    args += ["--concurrency", str(POLLER_CONCURRENCY), "--duration", str(seconds), "--warmup", "1"]
    process = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
    meter = CpuMeter({"emulator": emulator_pid})
    result = json.loads((await process.communicate())[0])
    if set(result["statuses"]) != {"200"}:
        raise RuntimeError(f"the ceiling run saw {result['statuses']}")
    shares = meter.percent()
    cpu = f"load generator {result['cpu_percent']:.0f}%, emulator {shares['emulator']:.0f}%"
    cpu += f", machine {shares['machine']:.0f}% (with warm-up)"
    return float(result["rate"]), cpu


async def run(
    jobs: int = JOBS, *, warmup_s: float = 4.0, window_s: float = 10.0, profile_s: float = 0.0
) -> Section:
    tenant = bench_tenant()
    section = Section(f"C. Poll capacity: {jobs:,} jobs in_progress, one worker, 1 s interval")
    async with Stack() as stack:
        server = stack.redis()
        emulator, emulator_url = await stack.emulator(queue_s=0, run_s=3600)
        built = time.perf_counter()
        request_ids = await upstream_requests(emulator_url, jobs)
        await in_progress_jobs(server.url, tenant.id, request_ids)
        built_s = time.perf_counter() - built
        env = gateway_env(
            server.url,
            emulator_url,
            stack.tenants_file(tenant),
            poll_interval_min_s=INTERVAL_S,
            poll_interval_max_s=INTERVAL_S,
        )
        worker = await stack.worker(env)
        async with aiohttp.ClientSession() as session:
            await asyncio.sleep(warmup_s)
            client = aioredis.Redis(port=server.port)
            scripts_before = await script_calls(client)
            before = await emulator_counts(session, emulator_url)
            meter = CpuMeter(
                {"worker": worker.pid, "emulator": emulator.pid, "redis": redis_pid(server)}
            )
            started = time.perf_counter()
            await asyncio.sleep(window_s)
            after = await emulator_counts(session, emulator_url)
            elapsed = time.perf_counter() - started
            cpu = meter.percent()
            scripts = await script_calls(client) - scripts_before
            seconds, micros = await client.time()
            now_ms = seconds * 1000 + micros // 1000
            waiting = await client.zcount("{rcg}:poll", "-inf", now_ms)
            late = await client.zcount("{rcg}:poll", "-inf", now_ms - 1000)
            await client.aclose()
            profiled: list[str] = []
            if profile_s:
                profiled = await profile(worker.pid, profile_s, PROFILES / "worker")
            stack.check_alive()
        worker.stop()
        raw, raw_cpu = await ceiling(emulator_url, request_ids, 5.0, stack, emulator.pid)

    polls = (after["status"] - before["status"]) / elapsed
    needed = jobs / INTERVAL_S
    ratio = polls / needed
    section.figures = [
        ("status polls achieved", f"{polls:,.0f} /s"),
        ("needed (N / interval)", f"{needed:,.0f} /s"),
        ("ratio achieved / needed", f"{ratio:.2f}"),
        ("ceiling: plain aiohttp GET status", f"{raw:,.0f} /s ({POLLER_CONCURRENCY} in flight)"),
        ("  CPU (% of one core) during the ceiling", raw_cpu),
        ("achieved / ceiling", f"{polls / raw:.2f}"),
        ("due but not yet polled at window end", f"{waiting:,} ({late:,} over 1 s late)"),
        ("Redis script calls (claims, releases) per poll", f"{scripts / (polls * elapsed):.2f}"),
        ("CPU (% of one core) in the window", ", ".join(f"{n} {v:.0f}%" for n, v in cpu.items())),
        ("worker CPU per poll", f"{cpu['worker'] * 10_000 / polls:.0f} µs"),
        ("setup (requests + store transitions)", f"{built_s:.1f} s"),
    ]
    section.summary = [section.figures[i] for i in (0, 2, 3)]
    section.goals = [Goal("C poll capacity ratio", ">= 0.95", f"{ratio:.2f}", ratio >= 0.95)]
    section.notes = [
        f"{warmup_s:g} s warm-up, then a {window_s:g} s window; counts from the emulator."
    ]
    if profiled:
        section.notes += ["", "Profile of the worker process while polling (py-spy):", *profiled]
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=JOBS)
    parser.add_argument("--window", type=float, default=10.0)
    parser.add_argument("--profile", type=float, default=0.0, help="profile the worker for N s")
    args = parser.parse_args()
    started = time.monotonic()
    print(run_async(run(args.jobs, window_s=args.window, profile_s=args.profile)).render())
    print(f"\n({time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    main()
