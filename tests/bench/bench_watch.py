"""E. Waiting and watching: 1,000 `Prefer: wait=60` reads and 1,000 event streams on one API.

One `api` process, one `worker` and the counted emulator (each job 1 s in
RunComfy's queue, then 1 s running). 1,000 jobs are submitted with no worker
running, so they stay `pending`; then a load process (this file with
`--load`, aiohttp, its own process) opens, for each job, one
`GET /v1/jobs/{id}` with `Prefer: wait=60` and one `GET /v1/jobs/{id}/events`,
2,000 connections to the one API process. Once every stream has its first
event, the worker starts and takes the jobs through `in_queue`, `in_progress`
and `completed` while they are watched.

Figures: waiters answered with the final job; streams that saw their statuses
in order and ended after the final one (a stream may merge two changes closer
together than one read, so "saw all four" is shown beside it); wake-up latency,
from the job's `finished_at` (the worker's state change) to the load process
receiving the answer or the final event; the API process's CPU over the
watched run and its resident memory before, with everything open, and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import uvloop
from harness import (
    BENCH,
    FAST_FLOW,
    PYTHON,
    Goal,
    Section,
    Stack,
    bench_tenant,
    cpu_seconds,
    gateway_env,
    percentile,
    run_async,
    submit_jobs,
)

JOBS = 1000
WAIT_S = 60
QUEUE_S = 1.0
RUN_S = 1.0
POLL_S = 0.5
"""Worker polls every 0.5 s (min = max), so a 1 s status is usually seen before it ends."""
FINAL = {"completed", "failed", "cancelled"}
RANK = {"pending": 1, "in_queue": 2, "in_progress": 3, "completed": 4, "failed": 4, "cancelled": 4}


def rss_kib(pid: int) -> int:
    """Resident memory of `pid` in KiB, from /proc/<pid>/status (psutil is not needed)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def finished_at(job: dict[str, Any]) -> float | None:
    """Unix time of the job's `finished_at`, if it has one."""
    value = job.get("finished_at")
    return datetime.fromisoformat(value).timestamp() if value else None


# -- the load side (its own process) ---------------------------------------------------------


async def sse_jobs(lines: AsyncIterable[bytes]) -> AsyncIterator[tuple[dict[str, Any], float]]:
    """Each event's job (its `data`) and the unix time it was read; comments are skipped."""
    data: list[str] = []
    async for raw in lines:
        line = raw.decode().rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            yield json.loads("\n".join(data)), time.time()
            data = []


@dataclass
class Watched:
    """What the load side saw of one job."""

    waiter_final: bool = False
    waiter_latency_s: float | None = None
    statuses: tuple[str, ...] = ()
    stream_ended: bool = False
    stream_latency_s: float | None = None
    ran: bool = False
    """The final job has `started_at`: it was `in_progress` in the store, not only upstream."""


async def load(api_url: str, api_key: str, ids: list[str]) -> dict[str, Any]:
    """Open a waiter and a stream per job; say `ready` once every stream has its first event."""
    import aiohttp  # noqa: PLC0415 - the `bench` extra, only in the load process

    auth = {"Authorization": f"Bearer {api_key}"}
    seen = {job_id: Watched() for job_id in ids}
    first_events = 0
    all_open = asyncio.Event()
    errors: list[str] = []
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=WAIT_S + 30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def waiter(job_id: str) -> None:
            headers = {**auth, "Prefer": f"wait={WAIT_S}"}
            async with session.get(f"{api_url}/v1/jobs/{job_id}", headers=headers) as answer:
                body = await answer.read()
                at = time.time()
            job = json.loads(body)
            if answer.status == 200 and job.get("status") in FINAL:
                seen[job_id].waiter_final = True
                done = finished_at(job)
                seen[job_id].waiter_latency_s = None if done is None else at - done

        async def stream(job_id: str) -> None:
            nonlocal first_events
            statuses: list[str] = []
            url = f"{api_url}/v1/jobs/{job_id}/events"
            async with session.get(url, headers=auth) as answer:
                async for job, at in sse_jobs(answer.content):
                    statuses.append(job["status"])
                    if len(statuses) == 1:
                        first_events += 1
                        if first_events == len(ids):
                            all_open.set()
                    if job["status"] in FINAL:
                        done = finished_at(job)
                        seen[job_id].stream_latency_s = None if done is None else at - done
                        seen[job_id].ran = job.get("started_at") is not None
            seen[job_id].statuses = tuple(statuses)
            seen[job_id].stream_ended = True

        async def guarded(one: Any, job_id: str) -> None:
            try:
                await one(job_id)
            except (aiohttp.ClientError, TimeoutError, ValueError) as error:
                errors.append(f"{type(error).__name__}: {error}")

        tasks = [asyncio.create_task(guarded(waiter, i)) for i in ids]
        tasks += [asyncio.create_task(guarded(stream, i)) for i in ids]
        await asyncio.wait_for(all_open.wait(), 30)
        sys.stdout.write("ready\n")
        sys.stdout.flush()
        await asyncio.gather(*tasks)
    return {
        "jobs": {
            job_id: [
                w.waiter_final,
                w.waiter_latency_s,
                w.statuses,
                w.stream_ended,
                w.stream_latency_s,
                w.ran,
            ]
            for job_id, w in seen.items()
        },
        "errors": errors[:5],
        "error_count": len(errors),
    }


# -- the benchmark ---------------------------------------------------------------------------


def in_order(statuses: list[str]) -> bool:
    """Statuses strictly forward in their one-way order, the last one final."""
    ranks = [RANK[s] for s in statuses]
    return bool(ranks) and ranks == sorted(set(ranks)) and statuses[-1] in FINAL


async def start_load(
    api_url: str, api_key: str, ids_file: Path
) -> tuple[asyncio.subprocess.Process, asyncio.StreamReader]:
    """The load process, once it says every stream has its first event; its output."""
    args = [PYTHON, str(BENCH / "bench_watch.py"), "--load", api_url, "--ids-file"]
    args += [str(ids_file), "--key", api_key]
    process = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, limit=2**26
    )
    if process.stdout is None:
        raise RuntimeError("the load process has no stdout")
    ready = await asyncio.wait_for(process.stdout.readline(), 40)
    if ready.strip() != b"ready":
        await process.wait()
        raise RuntimeError(f"the load process did not open every stream: {ready!r}")
    return process, process.stdout


async def run(jobs: int = JOBS) -> Section:
    """Submit, open the waiters and streams, start the worker, wait for every answer."""
    tenant = bench_tenant()
    section = Section("E. Waiting and watching: 1,000 waits and 1,000 event streams, one API")
    async with Stack() as stack:
        server = stack.redis()
        _, emulator_url = await stack.emulator(queue_s=QUEUE_S, run_s=RUN_S)
        env = gateway_env(
            server.url,
            emulator_url,
            stack.tenants_file(tenant),
            **{**FAST_FLOW, "poll_interval_min_s": POLL_S, "poll_interval_max_s": POLL_S},
        )
        api, api_url = await stack.api(env)
        ids = await submit_jobs(api_url, tenant.api_key, jobs)
        ids_file = stack.dir / "ids.txt"
        ids_file.write_text("\n".join(ids))
        rss_before = rss_kib(api.pid)
        cpu_before = cpu_seconds(api.pid)
        started = time.monotonic()
        process, stdout = await start_load(api_url, tenant.api_key, ids_file)
        opened_s = time.monotonic() - started
        rss_open = rss_kib(api.pid)
        await stack.worker(env)
        result = json.loads(await asyncio.wait_for(stdout.read(), WAIT_S + 40))
        await process.wait()
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(api.pid) - cpu_before
        rss_after = rss_kib(api.pid)
        stack.check_alive()

    seen = result["jobs"].values()
    answered = sum(1 for w in seen if w[0])
    ordered = sum(1 for w in seen if w[3] and in_order(w[2]))
    all_four = sum(1 for w in seen if w[3] and [RANK[s] for s in w[2]] == [1, 2, 3, 4])
    ran = sum(1 for w in seen if w[5])
    every = sum(1 for w in seen if w[3] and in_order(w[2]) and len(w[2]) == 3 + w[5])
    sequences = Counter(" > ".join(w[2]) for w in seen)
    waits = [w[1] for w in seen if w[1] is not None]
    streams = [w[4] for w in seen if w[4] is not None]

    def ms(values: list[float]) -> str:
        p50, p99 = percentile(values, 50), percentile(values, 99)
        return f"p50 {1000 * p50:,.1f} ms, p99 {1000 * p99:,.1f} ms (n {len(values):,})"

    cpu_share = f"{100 * cpu / elapsed:.0f}% of a core ({cpu:.1f} CPU s over {elapsed:.1f} s)"
    memory = f"{rss_before / 1024:.1f} / {rss_open / 1024:.1f} / {rss_after / 1024:.1f} MiB"
    section.figures = [
        ("waiters answered with the final job", f"{answered:,} of {jobs:,}"),
        ("streams in order, ending with the final status", f"{ordered:,} of {jobs:,}"),
        ("streams that saw all four statuses", f"{all_four:,} of {jobs:,}"),
        ("jobs that were in_progress in the store (started_at)", f"{ran:,} of {jobs:,}"),
        ("streams that saw every status their job had", f"{every:,} of {jobs:,}"),
        ("wake-up, finished_at to the wait's answer", ms(waits)),
        ("wake-up, finished_at to the stream's final event", ms(streams)),
        ("API CPU, streams opening to the last answer", cpu_share),
        ("API RSS before / all 2,000 open / after", memory),
        ("every stream had its first event after", f"{opened_s:.1f} s"),
        *((f"streams that saw {seq}", f"{n:,}") for seq, n in sequences.most_common(4)),
    ]
    if result["error_count"]:
        section.figures.append(("load side errors", f"{result['error_count']}"))
        section.notes += ["Load side errors (first five):", *result["errors"]]
    section.summary = [section.figures[i] for i in (0, 1, 2, 5, 6, 7)]
    section.goals = [
        Goal("E waiters answered final", f"{jobs:,}", f"{answered:,}", answered == jobs),
        Goal("E streams ended with the final", f"{jobs:,}", f"{ordered:,}", ordered == jobs),
    ]
    section.notes += [
        f"{jobs:,} jobs (RunComfy emulator: {QUEUE_S:g} s queued, {RUN_S:g} s running, the worker",
        f"polling every {POLL_S:g} s), submitted with no worker; one aiohttp process then opens",
        f"a `Prefer: wait={WAIT_S}` read and an event stream per job, and the worker starts once",
        "every stream has its first event. Latency is the load process's clock minus the job's",
        "finished_at (same machine). CPU and RSS of the API process, from /proc. A job the",
        "worker did not poll during its 1 s run goes in_queue -> completed in the store (no",
        "started_at): its stream has three statuses to see, not four.",
    ]
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=JOBS)
    parser.add_argument("--load", metavar="API_URL", help="(internal) be the load side")
    parser.add_argument("--ids-file")
    parser.add_argument("--key")
    args = parser.parse_args()
    if args.load:
        ids = Path(args.ids_file).read_text().split()
        result = uvloop.run(load(args.load, args.key, ids))
        sys.stdout.write(json.dumps(result) + "\n")
        return
    started = time.monotonic()
    print(run_async(run(args.jobs)).render())
    print(f"\n({time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    main()
