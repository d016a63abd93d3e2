"""D. Cost per job: Redis memory, Redis round trips and webhook latency, for finished jobs.

1,000 jobs run through the gateway (API and worker processes, a private Redis,
an instant emulator, B's settings), submitted at a steady 100 per second, each
to a verified webhook. Then:

- memory: Redis `INFO memory` before the first submit and once every delivery
  is recorded and Redis has trimmed the idle clients' buffers, divided by the
  jobs (used_memory, and used_memory_dataset, which leaves out client buffers:
  the API and worker open more connections under load; used_memory before the
  trim is shown too), with MEMORY USAGE of the jobs' keys as the breakdown;
- round trips: `MONITOR` on the private Redis tells commands sent by clients
  (a script call is one, whatever it runs) from those run inside scripts; the
  worker's idle claiming is measured first, for 2 s, and reported apart;
- webhook latency, upstream completion to receipt: the emulator runs instantly
  (queue_s = run_s = 0), so a request completes when it is created; that time
  comes from the emulator's `/_emulator/requests` (submitted_at, ms). The
  receiver notes the arrival of each verified webhook; the event's own
  `finished_at` (when the gateway recorded the final state) splits the latency
  into detection (polling) and delivery (dispatcher).
"""

import argparse
import asyncio
import hashlib
import os
import random
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import aiohttp
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
    table,
    upstream_finished_at,
)

from service.store import deliveries, jobs, limits, schedules
from service.store.keys import LUA_NOW

JOBS = 1000
PER_SECOND = 100.0
IDLE_S = 2.0


def script_names() -> dict[str, str]:
    """SHA1 of every Lua script of the store -> a readable name (EVALSHA's first argument)."""
    names = {}
    for module in (jobs, schedules, deliveries, limits):
        for attr, value in vars(module).items():
            if isinstance(value, str) and value.startswith(LUA_NOW):
                sha = hashlib.sha1(value.encode(), usedforsecurity=False).hexdigest()
                names[sha] = (
                    f"script {module.__name__.rsplit('.', 1)[-1]}.{attr.strip('_').lower()}"
                )
    return names


@dataclass
class Commands:
    """Commands MONITOR saw in one time window: sent by clients, and run inside scripts."""

    sent: Counter[str]
    in_scripts: Counter[str]


def read_monitor(path: Path, start: float, end: float, names: dict[str, str]) -> Commands:
    sent: Counter[str] = Counter()
    inner: Counter[str] = Counter()
    for line in path.read_text(errors="replace").splitlines():
        stamp, _, rest = line.partition(" ")
        try:
            at = float(stamp)
        except ValueError:
            continue
        if not start <= at < end:
            continue
        client, _, args = rest.partition("] ")
        words = args.split('" "')
        command = words[0].strip('"').lower()
        if client.endswith(" lua"):
            inner[command] += 1
        elif command == "evalsha" and len(words) > 1:
            sent[names.get(words[1].strip('"'), "script (unknown)")] += 1
        else:
            sent[command] += 1
    return Commands(sent, inner)


async def settled(client: aioredis.Redis) -> None:
    """Wait until no delivery or poll is scheduled or leased: every attempt is recorded."""
    deadline = time.monotonic() + 30
    while True:
        async with client.pipeline(transaction=False) as pipe:
            pipe.zcard("{rcg}:deliver").zcard("{rcg}:poll")
            pipe.hlen("{rcg}:lease:deliver").hlen("{rcg}:lease:poll")
            if not any(await pipe.execute()):
                return
        if time.monotonic() > deadline:
            raise RuntimeError("deliveries did not settle within 30 s")
        await asyncio.sleep(0.05)


@dataclass
class Parts:
    """Mean sizes of the sampled jobs' hash fields (see service/store/keys.py)."""

    fields: dict[str, float]
    event_plain: float


async def job_parts(port: int, sample: list[str]) -> Parts:
    """The sampled jobs' field sizes, and their final event bodies' size uncompressed."""
    raw = aioredis.Redis(port=port)
    stored = [h for i in sample if (h := await raw.hgetall(f"{{rcg}}:job:{i}"))]
    await raw.aclose()
    n = len(stored)
    names = sorted({name.decode() for h in stored for name in h})
    sizes = {name: sum(len(h.get(name.encode(), b"")) for h in stored) / n for name in names}
    events = [len(zlib.decompress(h[b"event_zlib"])) for h in stored if b"event_zlib" in h]
    return Parts(sizes, sum(events) / max(1, len(events)))


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


async def key_bytes(client: aioredis.Redis, pattern: str, sample: list[str]) -> float:
    """Mean MEMORY USAGE of the keys `pattern.format(id)` for the sampled ids."""
    sizes = [await client.memory_usage(pattern.format(i), samples=0) or 0 for i in sample]
    return sum(sizes) / len(sizes)


async def run(count: int = JOBS, per_second: float = PER_SECOND) -> Section:  # noqa: PLR0915 - one linear story
    tenant = bench_tenant()
    section = Section(f"D. Cost per job: {count:,} jobs at {per_second:g}/s to verified webhooks")
    names = script_names()
    async with Stack() as stack:
        server = stack.redis()
        _, emulator_url = await stack.emulator(queue_s=0, run_s=0)
        env = gateway_env(server.url, emulator_url, stack.tenants_file(tenant), **FAST_FLOW)
        _, api_url = await stack.api(env)
        await stack.worker(env)
        client = aioredis.Redis(port=server.port, decode_responses=True)
        receiver = Receiver(tenant)
        async with receiver.serving(), aiohttp.ClientSession() as session:
            await asyncio.sleep(1.0)
            memory_before = await client.info("memory")
            keys_before = await client.dbsize()
            stats_before = await client.memory_stats()
            monitor = stack.child(
                "monitor", ["redis-cli", "-p", str(server.port), "monitor"], os.environ
            )
            await asyncio.sleep(0.5)
            idle_start = time.time()
            await asyncio.sleep(IDLE_S)
            busy_start = time.time()
            ids = await submit_jobs(
                api_url, tenant.api_key, count, webhook_url=receiver.url, per_second=per_second
            )
            await receiver.wait_for(count, 120)
            await settled(client)
            busy_end = time.time()
            await asyncio.sleep(0.3)
            monitor.stop()
            stack.check_alive()
            burst_used = (await client.info("memory"))["used_memory"]
            await idle_buffers_shrunk(client)
            memory_after = await client.info("memory")
            stats_after = await client.memory_stats()
            clients_after = await client.info("clients")
            finished = await upstream_finished_at(session, emulator_url)
            upstream = await emulator_counts(session, emulator_url)
            sample = random.sample(ids, min(50, len(ids)))
            job_bytes = await key_bytes(client, "{{rcg}}:job:{}", sample)
            parts = await job_parts(server.port, sample)
            encoding = await client.object("encoding", f"{{rcg}}:job:{sample[0]}")
            keys_after = await client.dbsize()
            index_bytes = 0.0
            async for key in client.scan_iter(f"{{rcg}}:jobs:{tenant.id}*"):
                index_bytes += (await client.memory_usage(key, samples=0) or 0) / count
            idle = read_monitor(monitor.log, idle_start, busy_start, names)
            busy = read_monitor(monitor.log, busy_start, busy_end, names)
        await client.aclose()

    used = (memory_after["used_memory"] - memory_before["used_memory"]) / count
    dataset = (memory_after["used_memory_dataset"] - memory_before["used_memory_dataset"]) / count
    busy_s = busy_end - busy_start
    idle_rate = sum(idle.sent.values()) / IDLE_S
    sent = sum(busy.sent.values())
    attributable = sent - idle_rate * busy_s
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
        ("  MEMORY USAGE: job (with its final delivery)", f"{job_bytes:,.0f} B"),
        (
            f"  job hash fields ({encoding}), total",
            f"{sum(parts.fields.values()):,.0f} B in {len(parts.fields)} fields",
        ),
        *((f"    {name}", f"{size:,.0f} B") for name, size in parts.fields.items()),
        ("    event_zlib uncompressed", f"{parts.event_plain:,.0f} B"),
        ("  MEMORY USAGE: job indexes, per job", f"{index_bytes:,.0f} B"),
        ("  MEMORY USAGE: job + its index entries", f"{job_bytes + index_bytes:,.0f} B"),
        ("Redis keys per job", f"{(keys_after - keys_before) / count:.2f}"),
        ("Redis commands sent per job", f"{sent / count:.1f}"),
        (
            "  less the worker's idle claiming",
            f"{attributable / count:.1f} ({idle_rate:.0f}/s idle)",
        ),
        ("Redis commands run in scripts per job", f"{sum(busy.in_scripts.values()) / count:.1f}"),
        ("webhook latency, upstream done -> receipt", ms(total)),
        ("  detection: upstream done -> job final", ms(detect)),
        ("  delivery: job final -> receipt", ms(deliver)),
        (
            "RunComfy calls per job",
            ", ".join(f"{k} {upstream[k] / count:.2f}" for k in ("submit", "status", "result")),
        ),
        ("duplicate webhooks", str(receiver.duplicates)),
    ]
    summary = {
        "Redis used_memory per job",
        "Redis used_memory_dataset per job",
        "Redis commands sent per job",
        "webhook latency, upstream done -> receipt",
    }
    section.summary = [figure for figure in section.figures if figure[0] in summary]
    section.goals = [
        Goal("D Redis memory per finished job", "<= 2 KB", f"{used / 1024:.2f} KB", used <= 2048)
    ]
    overhead = [
        (name, f"{(stats_after[name] - stats_before.get(name, 0)) / count:,.0f} B")
        for name in stats_after
        if isinstance(stats_after[name], int)
        and name.startswith(("clients.", "overhead.", "db.", "lua", "functions"))
    ]
    overhead.append(("connected_clients after", str(clients_after["connected_clients"])))
    rows = [(name, f"{n / count:.2f}") for name, n in busy.sent.most_common()]
    inner = [(name, f"{n / count:.2f}") for name, n in busy.in_scripts.most_common(10)]
    section.notes = [
        "Latency: upstream completion = the emulator's creation time of the request (instant",
        "mode); receipt = when the receiver verified the webhook; the event's `finished_at`",
        "(the gateway's final state) splits the two. Memory is measured with the jobs retained",
        "(GATEWAY_JOB_RETENTION_S, 7 days): what a finished job costs until it expires.",
        "",
        "Redis MEMORY STATS, growth per job (used_memory less the dataset):",
        *table(["item", "per job"], overhead),
        "",
        "Commands sent to Redis per job, by command or script (run included idle claiming):",
        *table(["command", "per job"], rows),
        "",
        "Commands run inside those scripts per job (the ten most frequent):",
        *table(["command", "per job"], inner),
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
