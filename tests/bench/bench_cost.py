"""D. Cost per job: Redis memory per kept finished job, and webhook latency.

500 jobs run through the gateway (API and worker processes, a private Redis,
an instant emulator, B's settings), submitted at a steady 25 per second, each
to a verified webhook. Then:

- memory: Redis `INFO memory` before the first submit and once every webhook
  has arrived, the dataset has stopped changing and Redis has trimmed the idle
  clients' buffers, divided by the jobs (used_memory, and used_memory_dataset,
  which leaves out client buffers). Nothing here reads the store's layout: the
  keys of a sampled job are found by its id (SCAN MATCH *<id>*) and sized with
  MEMORY USAGE, whatever they hold;
- webhook latency, upstream completion to receipt: the emulator runs instantly
  (queue_s = run_s = 0), so a request completes when it is created; that time
  comes from the emulator's `/_emulator/requests` (submitted_at, ms). The
  receiver notes the arrival of each verified webhook; the event's own
  `finished_at` (when the gateway recorded the final state) splits the latency
  into detection (polling) and delivery (dispatcher).
"""

import argparse
import asyncio
import random
import time

import redis.asyncio as aioredis
from harness import (
    FAST_FLOW,
    Goal,
    Receiver,
    Section,
    Stack,
    bench_tenant,
    emulator_counts,
    gateway_env,
    parse_rfc3339,
    percentile,
    run_async,
    submit_jobs,
    upstream_finished_at,
)

JOBS = 500
PER_SECOND = 25.0


async def settled(client: aioredis.Redis) -> None:
    """Wait until the dataset has stopped changing for a second: every attempt is recorded."""
    deadline = time.monotonic() + 30
    last = None
    steady_since = time.monotonic()
    while time.monotonic() - steady_since < 1.0:
        now = ((await client.info("memory"))["used_memory_dataset"], await client.dbsize())
        if now != last:
            last, steady_since = now, time.monotonic()
        if time.monotonic() > deadline:
            raise RuntimeError("the dataset did not settle within 30 s")
        await asyncio.sleep(0.1)


async def idle_buffers_shrunk(client: aioredis.Redis) -> None:
    """Wait until Redis has shrunk the idle clients' buffers (its cron does, ~1 s after a burst).

    The API and worker open more connections under load, and each keeps the
    query and reply buffers of its largest command until the cron trims them:
    memory of the burst, not of the jobs kept for retention.
    """
    deadline = time.monotonic() + 10
    last = (await client.memory_stats())["clients.normal"]
    steady_since = time.monotonic()
    while time.monotonic() - steady_since < 1.0 and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        now = (await client.memory_stats())["clients.normal"]
        if now < last:
            steady_since = time.monotonic()
        last = now


async def job_key_bytes(client: aioredis.Redis, sample: list[str]) -> tuple[float, float]:
    """Mean keys named by each sampled job's id, and their mean MEMORY USAGE in all."""
    keys = 0
    size = 0
    for job_id in sample:
        async for key in client.scan_iter(f"*{job_id}*", count=1000):
            keys += 1
            size += await client.memory_usage(key, samples=0) or 0
    return keys / len(sample), size / len(sample)


async def run(count: int = JOBS, per_second: float = PER_SECOND) -> Section:
    tenant = bench_tenant()
    section = Section(f"D. Cost per job: {count:,} jobs at {per_second:g}/s to verified webhooks")
    async with Stack() as stack:
        server = stack.redis()
        _, emulator_url = await stack.emulator(queue_s=0, run_s=0)
        env = gateway_env(server.url, emulator_url, stack.tenants_file(tenant), **FAST_FLOW)
        _, api_url = await stack.api(env)
        await stack.worker(env)
        client = aioredis.Redis(port=server.port, decode_responses=True)
        receiver = Receiver(tenant)
        async with receiver.serving():
            await settled(client)
            memory_before = await client.info("memory")
            keys_before = await client.dbsize()
            ids = await submit_jobs(
                api_url, tenant.api_key, count, webhook_url=receiver.url, per_second=per_second
            )
            await receiver.wait_for(count, 120)
            await settled(client)
            stack.check_alive()
            burst_used = (await client.info("memory"))["used_memory"]
            await idle_buffers_shrunk(client)
            memory_after = await client.info("memory")
            finished = await upstream_finished_at(emulator_url)
            upstream = await emulator_counts(emulator_url)
            sample = random.sample(ids, min(50, len(ids)))
            keys_per_job, job_bytes = await job_key_bytes(client, sample)
            keys_after = await client.dbsize()
        await client.aclose()

    used = (memory_after["used_memory"] - memory_before["used_memory"]) / count
    dataset = (memory_after["used_memory_dataset"] - memory_before["used_memory_dataset"]) / count
    total = [
        a.at - finished[a.event["data"]["upstream"]["request_id"]]
        for a in receiver.arrivals.values()
    ]
    detect = [
        parse_rfc3339(a.event["data"]["finished_at"])
        - finished[a.event["data"]["upstream"]["request_id"]]
        for a in receiver.arrivals.values()
    ]
    deliver = [
        a.at - parse_rfc3339(a.event["data"]["finished_at"]) for a in receiver.arrivals.values()
    ]

    def ms(values: list[float]) -> str:
        p50, p99, top = (1000 * percentile(values, p) for p in (50, 99, 100))
        return f"p50 {p50:,.0f} ms, p99 {p99:,.0f} ms, max {top:,.0f} ms"

    section.figures = [
        ("Redis used_memory per job", f"{used:,.0f} B"),
        (
            "  before Redis trimmed idle client buffers",
            f"{(burst_used - memory_before['used_memory']) / count:,.0f} B",
        ),
        ("Redis used_memory_dataset per job", f"{dataset:,.0f} B"),
        ("Redis keys per job (DBSIZE)", f"{(keys_after - keys_before) / count:.2f}"),
        (
            "  keys named by the job's id, their MEMORY USAGE",
            f"{keys_per_job:.2f} keys, {job_bytes:,.0f} B",
        ),
        ("webhook latency, upstream done -> receipt", ms(total)),
        ("  detection: upstream done -> job final", ms(detect)),
        ("  delivery: job final -> receipt", ms(deliver)),
        (
            "RunComfy calls per job",
            ", ".join(f"{k} {upstream[k] / count:.2f}" for k in ("submit", "status", "result")),
        ),
        ("duplicate webhooks", str(receiver.duplicates)),
    ]
    section.summary = [section.figures[i] for i in (0, 2, 5)]
    section.goals = [
        Goal("D Redis memory per finished job", "<= 2 KB", f"{used / 1024:.2f} KB", used <= 2048)
    ]
    section.notes = [
        "Latency: upstream completion = the emulator's creation time of the request (instant",
        "mode); receipt = when the receiver verified the webhook; the event's `finished_at`",
        "(the gateway's final state) splits the two. Memory is measured with the jobs retained",
        "(GATEWAY_JOB_RETENTION_S, 7 days): what a finished job costs until it expires.",
    ]
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=JOBS)
    parser.add_argument("--per-second", type=float, default=PER_SECOND)
    args = parser.parse_args()
    started = time.monotonic()
    print(run_async(run(args.jobs, args.per_second)).render())
    print(f"\n({time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    main()
