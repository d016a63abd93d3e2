"""G. Poll timing (issue 17): detection delay and polls per job, learned policy vs interval rule.

Three scales of run, each scaled down in time by a factor, with the poll bounds
(2 s and 15 s) scaled by the same factor so every ratio is kept: runs of ~40 s
(4 s queue + 36 s run, time / 5), of ~5 min (20 s + 280 s, time / 10), and of
~40 s where RunComfy runs 4 at once (`--capacity 4`) and submits outpace it,
so a queue builds and each job's queue position says how long it will wait.
All run at once, each as two gateways side by side, each with its own Redis,
emulator (`runcomfy-gateway emulator`, queue and run times ±20%), API and
worker: `GATEWAY_POLL_POLICY=learned` and `=interval` (today's rule). Both get
the same jobs: a learning batch, then a measured batch, submitted at a steady
pace. At the 40 s scale the emulator's speed then halves (runs take twice as
long) and a stream of jobs follows.

Per job, from the emulator (RunComfy's side) and a verifying receiver:
*poll delay* is from the run's end (`finished_at`) to the first status poll at
or after it, unscaled (x factor); *to webhook* is that plus the gateway's own
work from that poll to the verified webhook (result call, state change,
delivery), which is not scaled: in production it takes the same milliseconds.
*Polls per job* counts the status calls the emulator answered for the job,
and how many of them came before its run started (queued).
The worker looks for due polls at least every 0.1 s of real time, which the
factor multiplies: up to 0.5 s (x5) or 1 s (x10) of an unscaled poll delay, on
average half that, is this bench's scaling, not the policy (in production it
is 0.1 s), for both policies alike.

Recovery after the speed change: how many jobs completed at the new speed
before every window of 8 consecutive jobs from there on has a median delay to
webhook within target (the goal, or 1.25x the policy's own p50 before the
change when that is higher).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import httpx
from harness import (
    GATEWAY,
    Goal,
    Receiver,
    Section,
    Stack,
    bench_tenant,
    gateway_env,
    get_json,
    parse_rfc3339,
    percentile,
    run_async,
    submit_jobs,
    wait_http,
)

from service.localredis import free_port
from tests.support import TestTenant

GOAL_P50_S = 1.0
RECOVERY_WINDOW = 8
MIN_S, MAX_S = 2.0, 15.0
SPREAD = 0.2
POLICIES = ("learned", "interval")


@dataclass(frozen=True)
class Scale:
    """One shape of run, and how far it is scaled down."""

    name: str
    queue_s: float
    run_s: float
    factor: float
    learning_jobs: int = 16
    measured_jobs: int = 30
    speed_jobs: int = 0
    """Jobs submitted after the emulator's speed halves (0: no speed change)."""
    capacity: int = 0
    """Runs RunComfy (the emulator) holds at once; 0: unlimited, every job waits `queue_s`."""
    pace_per_s: float | None = None
    """Submits per second (scaled time); None: about half a batch in flight at once."""


SCALES = (
    Scale("~40 s runs", queue_s=4, run_s=36, factor=5, speed_jobs=32),
    Scale("~5 min runs", queue_s=20, run_s=280, factor=10),
    # Submits outpace what 4 slots run (0.56 jobs/s), so a queue builds up to about
    # 13 deep and a job's queue position tells how long it will wait.
    Scale(
        "~40 s runs, 4 at once",
        queue_s=4,
        run_s=36,
        factor=5,
        learning_jobs=30,
        capacity=4,
        pace_per_s=1.0,
    ),
)


@dataclass
class JobFigure:
    """One job's poll delay (unscaled), delay to the verified webhook (unscaled), polls."""

    finished_at: float
    poll_delay_s: float
    webhook_delay_s: float
    polls: int
    queue_polls: int
    """Of `polls`, those before RunComfy started the run."""


@dataclass
class Gateway:
    """One policy's stack: its URLs and receiver."""

    policy: str
    api_url: str
    emulator_url: str
    receiver: Receiver
    worker_url: str = ""
    batches: dict[str, list[str]] = field(default_factory=dict)


async def start_gateway(
    stack: Stack, policy: str, scale: Scale, tenant: TestTenant, receiver: Receiver
) -> Gateway:
    """Redis, emulator, API and worker for one policy at one scale."""
    server = stack.redis()
    port = free_port()
    emulator_args = [*GATEWAY, "emulator", "--port", str(port), "--seed", "17"]
    emulator_args += ["--queue-s", f"{scale.queue_s / scale.factor:g}"]
    emulator_args += ["--run-s", f"{scale.run_s / scale.factor:g}", "--spread", str(SPREAD)]
    emulator_args += ["--capacity", str(scale.capacity)]
    emulator = stack.child(f"emulator-{policy}", emulator_args, os.environ)
    emulator_url = f"http://127.0.0.1:{port}"
    await wait_http(f"{emulator_url}/_emulator/requests", emulator)
    env = gateway_env(
        server.url,
        emulator_url,
        stack.tenants_file(tenant),
        poll_policy=policy,
        poll_interval_min_s=MIN_S / scale.factor,
        poll_interval_max_s=MAX_S / scale.factor,
        poll_learn_refresh_s=max(0.1, 5 / scale.factor),
        upstream_max_in_flight=10_000,
        upstream_rate_per_s=10_000,
        upstream_burst=10_000,
    )
    api_port = free_port()
    api_args = [*GATEWAY, "api", "--host", "127.0.0.1", "--port", str(api_port)]
    api = stack.child(f"api-{policy}", api_args, env)
    api_url = f"http://127.0.0.1:{api_port}"
    await wait_http(f"{api_url}/healthz", api)
    worker_port = free_port()
    worker_args = [*GATEWAY, "worker", "--metrics-port", str(worker_port)]
    worker = stack.child(f"worker-{policy}", worker_args, env)
    await wait_http(f"http://127.0.0.1:{worker_port}/healthz", worker, ok_below=600)
    return Gateway(policy, api_url, emulator_url, receiver, f"http://127.0.0.1:{worker_port}")


async def batch(
    gateways: Sequence[Gateway], tenant: TestTenant, name: str, jobs: int, per_second: float
) -> None:
    """Submit `jobs` to every gateway at the same pace; wait for every webhook."""

    async def one(gateway: Gateway) -> None:
        before = len(gateway.receiver.arrivals)
        gateway.batches[name] = await submit_jobs(
            gateway.api_url,
            tenant.api_key,
            jobs,
            webhook_url=gateway.receiver.url,
            per_second=per_second,
        )
        deadline = time.monotonic() + 600
        while len(gateway.receiver.arrivals) < before + jobs:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{gateway.policy}: batch {name} did not finish in 600 s")
            await asyncio.sleep(0.1)

    await asyncio.gather(*(one(g) for g in gateways))


async def figures(gateway: Gateway, scale: Scale, name: str) -> list[JobFigure]:
    """Each job of batch `name`: delays from RunComfy's end (unscaled) and polls."""
    items = (await get_json(f"{gateway.emulator_url}/_emulator/requests"))["items"]
    requests = {item["request_id"]: item for item in items}
    wanted = set(gateway.batches[name])
    out = []
    for arrival in gateway.receiver.arrivals.values():
        job = arrival.event["data"]
        if job["id"] not in wanted or job["status"] != "completed":
            continue
        request = requests[job["upstream"]["request_id"]]
        finished = parse_rfc3339(request["finished_at"])
        seen = min((at for at in request["status_polls"] if at >= finished), default=None)
        if seen is None:
            continue  # the poll list was cut short (never with these run lengths)
        own_work = max(0.0, arrival.at - seen)
        poll_delay = (seen - finished) * scale.factor
        started = parse_rfc3339(request["submitted_at"]) + request["queue_s"]
        polls = request["status_polls"]
        queued = sum(1 for at in polls if at < started)
        out.append(JobFigure(finished, poll_delay, poll_delay + own_work, len(polls), queued))
    return sorted(out, key=lambda f: f.finished_at)


def summary(jobs: Sequence[JobFigure]) -> str:
    """p50/p95 of both delays and mean polls, in one line."""
    polls = statistics.mean(j.polls for j in jobs) if jobs else float("nan")
    queued = statistics.mean(j.queue_polls for j in jobs) if jobs else float("nan")
    poll = [j.poll_delay_s for j in jobs]
    hook = [j.webhook_delay_s for j in jobs]
    return (
        f"to webhook p50 {percentile(hook, 50):.2f} s, p95 {percentile(hook, 95):.2f} s; "
        f"poll delay p50 {percentile(poll, 50):.2f} s, p95 {percentile(poll, 95):.2f} s; "
        f"{polls:.1f} polls/job, {queued:.1f} of them queued ({len(jobs)} jobs)"
    )


def recovery(jobs: Sequence[JobFigure], target_s: float) -> int | None:
    """Jobs completed before every later window of RECOVERY_WINDOW has its median within target."""
    delays = [j.webhook_delay_s for j in jobs]
    last = len(delays) - RECOVERY_WINDOW
    for start in range(max(0, last + 1)):
        windows = (delays[i : i + RECOVERY_WINDOW] for i in range(start, last + 1))
        if all(statistics.median(w) <= target_s for w in windows):
            return start
    return None


async def run_scale(scale: Scale, tenant: TestTenant, section: Section) -> None:
    """Both policies side by side at one scale; add its figures and goals to `section`."""
    async with Stack() as stack:
        receivers = [Receiver(tenant) for _ in POLICIES]
        async with receivers[0].serving(), receivers[1].serving():
            gateways = [
                await start_gateway(stack, policy, scale, tenant, receiver)
                for policy, receiver in zip(POLICIES, receivers, strict=True)
            ]
            total_s = (scale.queue_s + scale.run_s) / scale.factor
            pace = scale.pace_per_s or scale.learning_jobs / (total_s / 2)
            await batch(gateways, tenant, "learning", scale.learning_jobs, pace)
            await batch(gateways, tenant, "measured", scale.measured_jobs, pace)
            measured = {g.policy: await figures(g, scale, "measured") for g in gateways}
            changed: dict[str, list[JobFigure]] = {}
            if scale.speed_jobs:
                async with httpx.AsyncClient(timeout=10) as client:
                    for gateway in gateways:
                        await client.post(
                            f"{gateway.emulator_url}/_emulator/config", json={"speed": 0.5}
                        )
                # Runs now take twice as long: the same number in flight at half the pace.
                await batch(gateways, tenant, "slower", scale.speed_jobs, pace / 2)
                changed = {g.policy: await figures(g, scale, "slower") for g in gateways}
            stack.check_alive()
    _report(scale, measured, changed, section)


def _report(
    scale: Scale,
    measured: dict[str, list[JobFigure]],
    changed: dict[str, list[JobFigure]],
    section: Section,
) -> None:
    bounds = f"{MIN_S / scale.factor:g}-{MAX_S / scale.factor:g} s"
    label = f"{scale.name} (time / {scale.factor:g}, polls {bounds})"
    for policy in POLICIES:
        section.figures.append((f"{label}, {policy}", summary(measured[policy])))
    learned, rule = measured["learned"], measured["interval"]
    p50 = percentile([j.webhook_delay_s for j in learned], 50)
    polls = statistics.mean(j.polls for j in learned)
    rule_polls = statistics.mean(j.polls for j in rule)
    section.summary.append(
        (f"{scale.name}: learned p50 to webhook / polls per job", f"{p50:.2f} s / {polls:.1f}")
    )
    section.summary.append(
        (
            f"{scale.name}: interval p50 to webhook / polls per job",
            f"{percentile([j.webhook_delay_s for j in rule], 50):.2f} s / {rule_polls:.1f}",
        )
    )
    section.goals.append(
        Goal(
            f"G {scale.name}: p50 to webhook",
            f"<= {GOAL_P50_S:g} s",
            f"{p50:.2f} s",
            p50 <= GOAL_P50_S,
        )
    )
    section.goals.append(
        Goal(
            f"G {scale.name}: polls per job",
            f"<= interval's {rule_polls:.1f}",
            f"{polls:.1f}",
            polls <= rule_polls,
        )
    )
    if not changed:
        return
    for policy in POLICIES:
        section.figures.append((f"{scale.name}, speed halved, {policy}", summary(changed[policy])))
    target = max(GOAL_P50_S, 1.25 * p50)
    back = recovery(changed["learned"], target)
    verdict = f"after {back} jobs" if back is not None else "not within the run"
    within = f"learned back within {target:.2f} s (median of {RECOVERY_WINDOW})"
    section.figures.append((f"{scale.name}, speed halved: {within}", verdict))
    section.summary.append((f"{scale.name}: jobs until back in goal after speed halves", str(back)))
    section.goals.append(
        Goal(
            f"G {scale.name}: back in goal after the speed halves",
            f"<= {scale.speed_jobs // 2} jobs",
            verdict,
            back is not None and back <= scale.speed_jobs // 2,
        )
    )


async def run(scales: Sequence[Scale] = SCALES) -> Section:
    """Every scale, one after the other."""
    tenant = bench_tenant()
    section = Section("G. Poll timing: delay from RunComfy's end, and polls per job")
    started = time.monotonic()
    parts = [Section(section.title) for _ in scales]
    await asyncio.gather(*(run_scale(s, tenant, p) for s, p in zip(scales, parts, strict=True)))
    for part in parts:
        section.figures += part.figures
        section.goals += part.goals
        section.summary += part.summary
    section.notes = [
        "Unscaled: poll delay x the time factor, plus the gateway's own (unscaled) work from",
        "that poll to the verified webhook. Both policies ran at once, on the same jobs.",
        "Up to 0.1 s x factor of each delay is the worker's claim loop, scaled (docstring).",
        f"({time.monotonic() - started:.0f} s)",
    ]
    return section


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.parse_args()
    print(run_async(run()).render())


if __name__ == "__main__":
    main()
