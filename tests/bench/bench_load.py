"""C1. Worker CPU per finished job at real load: the gateway vs the arq + httpx peer.

Real load is small: about 20 jobs inside RunComfy at once, each minutes long,
so a worker makes a few upstream calls a second. Both systems run at the same
time, each on its own Redis and emulator (jobs queue 2 s, then run 20 s: real
lengths scaled down), with default settings (polls every 2 s, growing to a
tenth of the job's age, at most 15 s; 20 jobs upstream at most) and the peer
(peer_arq.py on httpx, uvloop, max_jobs=20) on the same poll policy. Jobs are
submitted at a steady 20 per (queue + run + 1 s), so by Little's law about 20
are in flight. After a warm-up long enough for the first jobs to finish, each
worker's CPU time over a fixed window is divided by the jobs it finished
(verified webhooks received) in that window.
"""

import argparse
import asyncio
import time
from dataclasses import dataclass

from harness import (
    CpuMeter,
    Goal,
    Receiver,
    Section,
    Stack,
    TestTenant,
    bench_tenant,
    emulator_counts,
    gateway_env,
    peer_env,
    redis_pid,
    run_async,
    submit_jobs,
)

QUEUE_S = 2.0
RUN_S = 20.0
IN_FLIGHT = 20
WARMUP_S = 26.0
WINDOW_S = 40.0


@dataclass
class Load:
    """One system's window."""

    finished: int
    cpu_s: float
    status_calls: int
    redis_cpu_s: float

    @property
    def cpu_ms_per_job(self) -> float:
        return 1000 * self.cpu_s / self.finished if self.finished else float("inf")

    def line(self) -> str:
        per_job = self.status_calls / self.finished if self.finished else float("nan")
        return (
            f"{self.cpu_ms_per_job:.1f} ms ({self.finished} jobs finished in the window, "
            f"{per_job:.1f} status polls per job, Redis {self.redis_cpu_s * 1000:.0f} ms)"
        )


async def measure(
    stack: Stack, *, api_url: str, emulator_url: str, tenant: TestTenant, pids: dict[str, int]
) -> Load:
    """Submit at the steady rate; the worker's CPU and finished jobs over the window."""
    receiver = Receiver(tenant)
    per_second = IN_FLIGHT / (QUEUE_S + RUN_S + 1)
    count = round(per_second * (WARMUP_S + WINDOW_S + 2))
    async with receiver.serving():
        submitting = asyncio.create_task(
            submit_jobs(
                api_url,
                tenant.api_key,
                count,
                webhook_url=receiver.url,
                per_second=per_second,
                concurrency=4,
            )
        )
        await asyncio.sleep(WARMUP_S)
        before = await emulator_counts(emulator_url)
        meter = CpuMeter(pids)
        start = time.time()
        await asyncio.sleep(WINDOW_S)
        end = time.time()
        cpu = meter.percent()
        after = await emulator_counts(emulator_url)
        stack.check_alive()
        submitting.cancel()
    return Load(
        finished=receiver.arrived_between(start, end),
        cpu_s=cpu["worker"] / 100 * (end - start),
        status_calls=after["status"] - before["status"],
        redis_cpu_s=cpu["redis"] / 100 * (end - start),
    )


async def gateway(tenant: TestTenant) -> Load:
    async with Stack() as stack:
        server = stack.redis()
        _, emulator_url = await stack.emulator(queue_s=QUEUE_S, run_s=RUN_S)
        env = gateway_env(server.url, emulator_url, stack.tenants_file(tenant))
        _, api_url = await stack.api(env)
        worker = await stack.worker(env)
        pids = {"worker": worker.pid, "redis": redis_pid(server)}
        return await measure(
            stack, api_url=api_url, emulator_url=emulator_url, tenant=tenant, pids=pids
        )


async def peer(tenant: TestTenant) -> Load:
    from bench_e2e import start_peer  # noqa: PLC0415 - B's module, only when the peer runs

    async with Stack() as stack:
        server = stack.redis()
        _, emulator_url = await stack.emulator(queue_s=QUEUE_S, run_s=RUN_S)
        env = peer_env(
            server.url,
            emulator_url,
            tenant,
            poll_interval_min_s=2,
            poll_interval_max_s=15,
            max_jobs=IN_FLIGHT,
            uvloop="1",
        )
        api_url, _, worker = await start_peer(stack, env, "httpx", server.port)
        pids = {"worker": worker.pid, "redis": redis_pid(server)}
        return await measure(
            stack, api_url=api_url, emulator_url=emulator_url, tenant=tenant, pids=pids
        )


async def run() -> Section:
    """Both systems at once: the load is light, and CPU time is counted per process."""
    tenant = bench_tenant()
    section = Section(
        f"C1. Worker CPU per finished job: ~{IN_FLIGHT} in flight, jobs of "
        f"{QUEUE_S:g} s queue + {RUN_S:g} s run"
    )
    ours, theirs = await asyncio.gather(gateway(tenant), peer(tenant))
    ratio = ours.cpu_ms_per_job / theirs.cpu_ms_per_job
    section.figures = [
        ("gateway worker CPU per finished job", ours.line()),
        ("arq + httpx peer worker CPU per finished job", theirs.line()),
        ("ratio gateway / peer", f"{ratio:.2f}"),
    ]
    section.summary = [
        ("gateway worker CPU per job", f"{ours.cpu_ms_per_job:.1f} ms"),
        ("arq + httpx peer", f"{theirs.cpu_ms_per_job:.1f} ms"),
        ("ratio gateway / peer", f"{ratio:.2f}"),
    ]
    section.goals = [Goal("C1 worker CPU per job vs peer", "<= 1.0", f"{ratio:.2f}", ratio <= 1)]
    section.notes = [
        f"{WARMUP_S:g} s warm-up, then a {WINDOW_S:g} s window; both systems run at once.",
        "The gateway's worker CPU includes its idle claiming (each loop asks Redis for due work);",
        "the peer's includes arq's queue polling (poll_delay 0.5 s).",
    ]
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.parse_args()
    started = time.monotonic()
    print(run_async(run()).render())
    print(f"\n({time.monotonic() - started:.0f}s)")


if __name__ == "__main__":
    main()
