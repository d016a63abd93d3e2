"""B. End to end: 1,000 jobs from submit to a verified webhook, the gateway vs arq peers.

Each system gets its own Redis and an instant emulator (queue_s = run_s = 0),
runs as separate processes (API, worker), and is driven the same way: 1,000
submits, 50 at a time, to `POST /v1/jobs` (loadgen.py in its own process),
each naming a receiver here that verifies every signature with
`standardwebhooks`. The figure is the wall time from the first submit to the
1,000th distinct verified webhook. The gateway runs with default settings
except GATEWAY_POLL_INTERVAL_MIN_S=0.1 and upstream limits raised out of the
way; the peer (peer_arq.py) polls every 0.1 s too, on each HTTP stack (httpx,
the gateway's own; aiohttp), once with arq's defaults and once tuned (more
jobs at once, uvloop). The goals are against arq's defaults, the
straightforward peer; the tuned peers are shown beside them.
"""

import argparse
import asyncio
import importlib.util
import time
from collections import Counter
from dataclasses import dataclass

import redis.asyncio as aioredis
from harness import (
    BENCH,
    FAST_FLOW,
    PYTHON,
    Child,
    CpuMeter,
    Goal,
    Receiver,
    Section,
    Stack,
    TestTenant,
    bench_tenant,
    emulator_counts,
    free_port,
    gateway_env,
    peer_env,
    redis_pid,
    run_async,
    submit_jobs,
    wait_http,
)

JOBS = 1000
TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Peer:
    """One configuration of the arq peer."""

    client: str
    tuned: bool

    @property
    def max_jobs(self) -> int:
        return 256 if self.tuned else 10

    @property
    def poll_delay_s(self) -> float:
        return 0.1 if self.tuned else 0.5

    @property
    def short(self) -> str:
        return f"arq + {self.client}, {'tuned' if self.tuned else 'defaults'}"

    @property
    def name(self) -> str:
        loop = "uvloop" if self.tuned else "asyncio loop"
        settings = f"max_jobs={self.max_jobs}, poll_delay={self.poll_delay_s:g} s, {loop} worker"
        return f"{self.short}: {settings}"


PEERS = (
    Peer("httpx", tuned=False),
    Peer("aiohttp", tuned=False),
    Peer("httpx", tuned=True),
    Peer("aiohttp", tuned=True),
)


@dataclass
class Outcome:
    """One system's run."""

    wall_s: float
    accepted_s: float
    upstream: Counter[str]
    duplicates: int
    cpu: dict[str, float]

    def line(self, jobs: int) -> str:
        calls = ", ".join(
            f"{k} {self.upstream[k] / jobs:.2f}" for k in ("submit", "status", "result")
        )
        cpu = ", ".join(f"{n} {v:.0f}%" for n, v in self.cpu.items())
        return f"RunComfy calls/job: {calls}; CPU: {cpu}; duplicate webhooks: {self.duplicates}"


async def drive(
    stack: Stack,
    *,
    api_url: str,
    emulator_url: str,
    tenant: TestTenant,
    pids: dict[str, int],
    jobs: int,
) -> Outcome:
    """Submit `jobs` jobs and time them to the last verified webhook."""
    receiver = Receiver(tenant)
    async with receiver.serving():
        meter = CpuMeter(pids)
        started = time.perf_counter()
        ids = await submit_jobs(api_url, tenant.api_key, jobs, webhook_url=receiver.url)
        accepted = time.perf_counter() - started
        await receiver.wait_for(jobs, TIMEOUT_S)
        wall = receiver.last_at - started
        cpu = meter.percent()
        stack.check_alive()
        if {a.event["data"]["id"] for a in receiver.arrivals.values()} != set(ids):
            raise RuntimeError("the webhooks do not match the submitted jobs")
        counts = await emulator_counts(emulator_url)
    return Outcome(wall, accepted, counts, receiver.duplicates, cpu)


async def gateway(tenant: TestTenant, jobs: int) -> Outcome:
    async with Stack() as stack:
        server = stack.redis()
        emulator, emulator_url = await stack.emulator(queue_s=0, run_s=0)
        env = gateway_env(server.url, emulator_url, stack.tenants_file(tenant), **FAST_FLOW)
        api, api_url = await stack.api(env)
        worker = await stack.worker(env)
        pids = {"api": api.pid, "worker": worker.pid, "emulator": emulator.pid}
        pids["redis"] = redis_pid(server)
        return await drive(
            stack, api_url=api_url, emulator_url=emulator_url, tenant=tenant, pids=pids, jobs=jobs
        )


async def peer(tenant: TestTenant, jobs: int, config: Peer) -> Outcome:
    async with Stack() as stack:
        server = stack.redis()
        emulator, emulator_url = await stack.emulator(queue_s=0, run_s=0)
        fast = FAST_FLOW["poll_interval_min_s"]
        env = peer_env(
            server.url,
            emulator_url,
            tenant,
            poll_interval_min_s=fast,
            poll_interval_max_s=fast,
            max_jobs=config.max_jobs,
            poll_delay_s=config.poll_delay_s,
            uvloop="1" if config.tuned else "0",
        )
        api_url, api, worker = await start_peer(stack, env, config.client, server.port)
        pids = {"api": api.pid, "worker": worker.pid, "emulator": emulator.pid}
        pids["redis"] = redis_pid(server)
        return await drive(
            stack, api_url=api_url, emulator_url=emulator_url, tenant=tenant, pids=pids, jobs=jobs
        )


async def start_peer(
    stack: Stack, env: dict[str, str], client: str, redis_port: int
) -> tuple[str, Child, Child]:
    """The peer's API and worker on `client`'s stack; the API's URL and both processes."""
    port = free_port()
    script = [PYTHON, str(BENCH / "peer_arq.py")]
    api = stack.child("peer-api", [*script, "api", "--port", str(port), "--client", client], env)
    api_url = f"http://127.0.0.1:{port}"
    await wait_http(f"{api_url}/healthz", api)
    worker = stack.child("peer-worker", [*script, "worker", "--client", client], env)
    await arq_started(redis_port, worker)
    return api_url, api, worker


async def arq_started(port: int, worker: Child) -> None:
    """Wait for arq's health-check key, which its worker writes once its poll loop runs."""
    client = aioredis.Redis(port=port)
    deadline = time.monotonic() + 30
    try:
        while not await client.exists("arq:queue:health-check"):
            worker.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError("the arq worker did not start")
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def run(jobs: int = JOBS) -> Section:
    """The gateway, then each peer, each on its own Redis, emulator and processes."""
    tenant = bench_tenant()
    section = Section(f"B. End to end: {jobs:,} jobs, first submit to last verified webhook")
    ours = await gateway(tenant, jobs)
    rows = [("gateway", ours)]
    if importlib.util.find_spec("arq") is None:
        section.notes.append("arq peers skipped: arq is not installed (make bench installs it)")
    else:
        rows += [(config.name, await peer(tenant, jobs, config)) for config in PEERS]
    for name, outcome in rows:
        rate = jobs / outcome.wall_s
        section.figures.append((name, f"{outcome.wall_s:.2f} s ({rate:,.0f} jobs/s)"))
    for config, (_, outcome) in zip(PEERS, rows[1:], strict=False):
        speedup = outcome.wall_s / ours.wall_s
        figure = f"{outcome.wall_s:.2f} s / {ours.wall_s:.2f} s = {speedup:.2f}x"
        section.figures.append((f"speed-up vs {config.short} (peer / gateway)", figure))
        section.summary.append((f"speed-up vs {config.short}", f"{speedup:.2f}x"))
        if not config.tuned:
            goal = Goal(f"B speed-up vs {config.short}", ">= 2x", f"{speedup:.2f}x", speedup >= 2)
            section.goals.append(goal)
    for name, outcome in rows:
        section.notes += [
            f"{name.split(':')[0]}: all {jobs} accepted after {outcome.accepted_s:.2f} s",
            f"  {outcome.line(jobs)}",
        ]
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--jobs", type=int, default=JOBS)
    args = parser.parse_args()
    started = time.monotonic()
    print(run_async(run(args.jobs)).render())
    print(f"\n({time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    main()
