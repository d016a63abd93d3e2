"""F. Recovery of failed webhooks: 500 re-sent by one call, and another tenant meanwhile.

The gateway runs as processes (API, one worker, a private Redis, an instant
emulator, B's settings, `GATEWAY_WEBHOOK_RETRY_SCHEDULE=0.2`). Tenant `orders`
submits 500 jobs whose receiver answers 503: each webhook fails for good after
two attempts. Tenant `billing` then submits 100 jobs at 20 a second to a
receiver that is up, alone: its webhook latency (the event's `finished_at` to
the arrival) is the baseline. Then `orders`' receiver comes back, answering in
200 ms (a slow endpoint, so the recovery lasts seconds), `POST
/v1/deliveries/recover` re-queues the 500, and `billing` submits 100 more at 20
a second while they are sent: its latency during the recovery, and how long the
recovery took, whether each of the 500 arrived exactly once.
"""

import argparse
import asyncio
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import redis.asyncio as aioredis
from harness import (
    FAST_FLOW,
    Goal,
    Receiver,
    Section,
    Stack,
    gateway_env,
    parse_rfc3339,
    percentile,
    run_async,
    submit_jobs,
)
from litestar import Request, Response
from litestar.params import RawBody

from tests.support import new_tenant

RECOVERED = 500
OTHERS = 100
PER_SECOND = 20.0
SLOW_S = 0.2


class Endpoint(Receiver):
    """The harness's verifying receiver, which can be down (503) or slow."""

    down = False
    delay_s = 0.0
    answered_503 = 0

    async def _receive(self, request: Request[Any, Any, Any], body: RawBody) -> Response[str]:
        if self.down:
            self.answered_503 += 1
            return Response("down", status_code=503)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        return await super()._receive(request, body)


def latencies_ms(endpoint: Receiver, since: float) -> list[float]:
    """Event (`finished_at`) to arrival of each webhook that arrived after `since`, in ms."""
    return [
        (a.at - parse_rfc3339(a.event["data"]["finished_at"])) * 1000
        for a in endpoint.arrivals.values()
        if a.at >= since
    ]


async def failed_count(client: aioredis.Redis, tenant: str) -> int:
    return int(await client.zcard(f"{{rcg}}:failed:{tenant}"))


async def wait_until(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not happen within {timeout:g}s")
        await asyncio.sleep(0.1)


async def run() -> Section:
    """Run F; its figures."""
    orders, billing = new_tenant("orders"), new_tenant("billing")
    async with Stack() as stack:
        server = stack.redis()
        tenants = Path(stack.dir) / "tenants.toml"
        tenants.write_text(orders.toml() + billing.toml())
        _, upstream = await stack.emulator(queue_s=0, run_s=0)
        env = gateway_env(server.url, upstream, tenants, webhook_retry_schedule="0.2", **FAST_FLOW)
        _, api = await stack.api(env)
        await stack.worker(env)
        down, other = Endpoint(orders), Endpoint(billing)
        down.down = True
        client = aioredis.Redis.from_url(server.url)
        async with down.serving(), other.serving():
            await submit_jobs(api, orders.api_key, RECOVERED, webhook_url=down.url)
            await wait_until(
                lambda: _equal(failed_count(client, "orders"), RECOVERED),
                120,
                f"{RECOVERED} failed webhooks",
            )
            quiet_from = time.time()
            await submit_jobs(
                api, billing.api_key, OTHERS, webhook_url=other.url, per_second=PER_SECOND
            )
            await other.wait_for(OTHERS, 60)
            alone = latencies_ms(other, quiet_from)

            down.down, down.delay_s = False, SLOW_S
            since = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
            busy_from = time.time()
            async with httpx.AsyncClient(timeout=30) as http:
                answer = await http.post(
                    f"{api}/v1/deliveries/recover",
                    json={"since": since},
                    headers={"Authorization": f"Bearer {orders.api_key}"},
                )
            recovering = answer.json()["recovering"]
            await submit_jobs(
                api, billing.api_key, OTHERS, webhook_url=other.url, per_second=PER_SECOND
            )
            await other.wait_for(2 * OTHERS, 60)
            others_done = time.time()
            await down.wait_for(RECOVERED, 120)
            recovered_at = [a.at for a in down.arrivals.values()]
            during = latencies_ms(other, busy_from)
        await client.aclose()
    took = max(recovered_at) - busy_from
    once = f"{len(recovered_at)}, duplicates {down.duplicates}"
    in_time = others_done < max(recovered_at)
    p99_during, p99_alone = percentile(during, 99), percentile(alone, 99)
    section = Section(f"F. Recovery of {RECOVERED} failed webhooks, another tenant meanwhile")
    section.figures += [
        ("webhooks answered 503 while down", str(down.answered_503)),
        ("recover answered", f"{answer.status_code} {{'recovering': {recovering}}}"),
        (f"recovered, each exactly once ({SLOW_S * 1000:.0f} ms endpoint)", once),
        ("recovery took (call to last arrival)", f"{took:.1f} s"),
        ("other tenant's webhooks all arrived before the recovery ended", str(in_time)),
        ("other tenant, alone: p50 / p99 / max", _spread(alone)),
        ("other tenant, during recovery: p50 / p99 / max", _spread(during)),
    ]
    section.goals.append(
        Goal(
            "F: recovered once each, other tenant not held up",
            f"{RECOVERED} once; p99 during <= 2 x alone + 50 ms",
            f"{once}; p99 {p99_during:.0f} vs {p99_alone:.0f} ms",
            len(recovered_at) == RECOVERED
            and down.duplicates == 0
            and p99_during <= 2 * p99_alone + 50,
        )
    )
    section.summary += [
        ("other tenant's webhook p50/p99 alone", _spread(alone, with_max=False)),
        ("... during a recovery of 500", _spread(during, with_max=False)),
    ]
    return section


def _spread(values: list[float], *, with_max: bool = True) -> str:
    figures = [percentile(values, 50), percentile(values, 99)]
    if with_max:
        figures.append(max(values))
    return " / ".join(f"{v:.0f}" for v in figures) + " ms"


async def _equal(value: Any, expected: int) -> bool:
    return await value == expected


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    print(run_async(run()).render())
