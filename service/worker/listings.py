"""Keeping each tenant's job listing to jobs that still exist.

A finished job expires with its retention (a key expiry, Redis's own clock);
its id stays in the tenant's status index until something drops it. A listing
drops the ids it finds gone as it reads them, and every worker trims every
tenant's indexes about once a minute, so neither a quiet tenant nor a replica's
clock decides how long an id outlives its job.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random

from redis.exceptions import RedisError

from service.config import Settings
from service.store.jobs import JobStore

log = logging.getLogger(__name__)

TRIM_EVERY_S = 60.0


async def trim_listings(
    jobs: JobStore,
    settings: Settings,
    stop: asyncio.Event,
    *,
    every_s: float = TRIM_EVERY_S,
    rng: random.Random | None = None,
) -> None:
    """Until `stop` is set, drop expired jobs' ids from every tenant's indexes now and then."""
    rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
    failing = False
    while not stop.is_set():
        try:
            for tenant in list(settings.tenants.by_id):  # the file may be reloaded meanwhile
                removed = await jobs.trim_indexes(tenant)
                if removed:
                    log.info("listings: dropped %d expired job(s) of %s", removed, tenant)
            failing = False
        except (RedisError, OSError) as exc:
            if not failing:  # once per outage; the next round tries again
                log.warning("listings: trimming failed (%s); trying again later", exc)
            failing = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s * rng.uniform(0.5, 1.5))
