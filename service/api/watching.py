"""Waiting for a job (`Prefer: wait=N`) and watching it (`GET /v1/jobs/{id}/events`).

Both follow the job through the process's one `JobChanges` subscription: a
waiter reads its job once when registered and again only when a change of it
is announced (or after the subscription came back), never on a timer.

An event's id is the rank of the job's status in its one-way order (pending 1,
in_queue 2, in_progress 3, final 4): it grows with each status change, and a
reconnecting client's `Last-Event-ID` says which statuses it saw without the
gateway keeping anything per stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Final

from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from service.models import FINAL_STATUSES, JobStatus
from service.store.changes import JobChanges
from service.store.connection import REDIS_UNAVAILABLE
from service.store.jobs import JobStore, StoredJob

MAX_WAIT_S: Final = 60
KEEP_ALIVE_S: Final = 10.0
"""A stream with nothing to say sends a `: keep-alive` comment this often (at most 15 s)."""

STATUS_RANK: Final[dict[JobStatus, int]] = {
    "pending": 1,
    "in_queue": 2,
    "in_progress": 3,
    "completed": 4,
    "failed": 4,
    "cancelled": 4,
}


def preferred_wait_s(prefer: str | None) -> int | None:
    """The seconds of a valid `Prefer: wait[=N]` (RFC 7240), None when absent or invalid.

    `wait` alone means 60; `N` must be a whole number from 1 to 60. Other
    preferences in the header are ignored, and so is an invalid `wait`.
    """
    if not prefer:
        return None
    for preference in prefer.split(","):
        token = preference.split(";", 1)[0]  # `wait` defines no parameters
        name, equals, value = token.partition("=")
        if name.strip().lower() != "wait":
            continue
        value = value.strip().strip('"')
        if not equals:
            return MAX_WAIT_S
        if value.isascii() and value.isdigit() and 1 <= int(value) <= MAX_WAIT_S:
            return int(value)
        return None
    return None


async def until_final(
    changes: JobChanges, jobs: JobStore, stored: StoredJob, wait_s: float
) -> StoredJob:
    """The job once final, or as it stands after `wait_s` seconds or at shutdown."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    with changes.watch(stored.record.id) as watch:
        stored = await _read(jobs, stored)  # it may have changed before the watch began
        while stored.record.status not in FINAL_STATUSES and not changes.stopping:
            if not await watch.changed(deadline - loop.time()):
                break
            if watch.status is not None and watch.status not in FINAL_STATUSES:
                continue  # only the final state ends a wait: no need to read this one
            stored = await _read(jobs, stored)
    return stored


def job_events(
    changes: JobChanges, jobs: JobStore, stored: StoredJob, last_event_id: str | None
) -> ServerSentEvent:
    """The job's event stream, resumed after `last_event_id` when it is a number we sent."""
    seen = int(last_event_id) if last_event_id and last_event_id.isdigit() else 0
    return ServerSentEvent(_events(changes, jobs, stored, seen))


async def _events(
    changes: JobChanges, jobs: JobStore, stored: StoredJob, seen: int
) -> AsyncIterator[ServerSentEventMessage]:
    """The job as it stands (unless seen), each later status, keep-alives; ends when final."""
    with changes.watch(stored.record.id) as watch:
        stored = await _read(jobs, stored)
        if stored.record.status in FINAL_STATUSES:
            yield _event(stored)  # even when seen: a client resuming learns it is over
            return
        while not changes.stopping:
            rank = STATUS_RANK[stored.record.status]
            if rank > seen:
                yield _event(stored)
                seen = rank
            if rank == STATUS_RANK["completed"]:
                return
            if not await watch.changed(KEEP_ALIVE_S):
                yield ServerSentEventMessage(data=None, comment="keep-alive")
            elif watch.status is None or STATUS_RANK[watch.status] > seen:
                stored = await _read(jobs, stored)


def _event(stored: StoredJob) -> ServerSentEventMessage:
    status = stored.record.status
    return ServerSentEventMessage(
        data=stored.view_json().decode(), event=f"job.{status}", id=STATUS_RANK[status]
    )


async def _read(jobs: JobStore, stored: StoredJob) -> StoredJob:
    """The job read again; as it was when Redis is away (the subscription wakes us after)."""
    try:
        return await jobs.get(stored.record.id) or stored
    except REDIS_UNAVAILABLE:
        return stored


def preference_applied(wait_s: int) -> dict[str, str]:
    """The header that says a wait was honoured."""
    return {"Preference-Applied": f"wait={wait_s}"}
