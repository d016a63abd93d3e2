"""What operators read across tenants: counts for the overview, and the search by request id.

Reads only, each a pipeline of counts over the indexes the state machine keeps
(`jobs.py`, `deliveries.py`): nothing here scans jobs.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from datetime import date

import redis.asyncio as aioredis

from service.models import JobStatus
from service.store.activity import ActivityStore
from service.store.connection import text
from service.store.keys import Keys

STATUSES: typing.Final[tuple[JobStatus, ...]] = typing.get_args(JobStatus)


@dataclass(frozen=True)
class TenantCounts:
    """One tenant's jobs by status, upstream slots held, failed deliveries, charged today."""

    jobs: dict[str, int]
    upstream_slots: int
    failed_deliveries: int
    charged_today_micros: int


@dataclass(frozen=True)
class GatewayCounts:
    """The whole gateway: the backlog, deliveries scheduled, upstream slots in use."""

    backlog: int
    deliveries_scheduled: int
    upstream_slots: int


class AdminStore:
    """Cross-tenant reads for the admin API."""

    def __init__(self, redis: aioredis.Redis, keys: Keys) -> None:
        self._redis = redis
        self._keys = keys
        self.activity = ActivityStore(redis, keys)

    async def counts(
        self, tenants: list[str], today: date
    ) -> tuple[GatewayCounts, dict[str, TenantCounts]]:
        """The gateway's and each tenant's counts, in one round trip."""
        keys = self._keys
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.zcard(keys.backlog())
            pipe.zcard(keys.schedule("deliver"))
            pipe.scard(keys.inflight())
            for tenant in tenants:
                for status in STATUSES:
                    pipe.zcard(keys.jobs(tenant, status))
                pipe.scard(keys.inflight(tenant))
                pipe.zcard(keys.failed_deliveries(tenant))
                pipe.hget(keys.spend_day(tenant, today.isoformat()), "charged")
            found = await pipe.execute()
        gateway = GatewayCounts(
            backlog=found[0], deliveries_scheduled=found[1], upstream_slots=found[2]
        )
        width = len(STATUSES) + 3
        by_tenant: dict[str, TenantCounts] = {}
        for n, tenant in enumerate(tenants):
            row = found[3 + n * width : 3 + (n + 1) * width]
            by_tenant[tenant] = TenantCounts(
                jobs=dict(zip(STATUSES, (int(c) for c in row[: len(STATUSES)]), strict=True)),
                upstream_slots=int(row[-3]),
                failed_deliveries=int(row[-2]),
                charged_today_micros=int(row[-1] or 0),
            )
        return gateway, by_tenant

    async def job_of_request(self, request_id: str) -> str | None:
        """The id of the job a RunComfy request id belongs to, while both are kept."""
        job_id = await self._redis.get(self._keys.upstream_request(request_id))
        return None if job_id is None else text(job_id)
