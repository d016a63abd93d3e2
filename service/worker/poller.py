"""The poller: follows jobs inside RunComfy until they end, and cancels queued ones.

Each job in `in_queue` or `in_progress` is a member of the poll schedule. When
its next poll is due comes from `service/worker/timing.py`: with
`GATEWAY_POLL_POLICY=learned` (the default) sparse polls while recent jobs of its
input class say it cannot have ended yet, dense ones where they ended, and the
interval rule (a tenth of the time since the job's last change, clamped to
`GATEWAY_POLL_INTERVAL_MIN_S`..`_MAX_S`) before anything is learned or once the
job outlives what was; `interval` is that rule alone. A queued job whose
`queue_position` RunComfy gives is timed instead by how long recent jobs seen at
a position of the same bucket waited per place from there to their start
(`Queued`), once enough are known: far back that is long, so its polls are few;
at the head, short. Every completed job adds its queue and run lengths to what
is learned (`service/store/runlengths.py`), and its polls and detection delay to
the metrics; every started one, its waits from the positions it was seen at.
Unknown upstream statuses keep polling until the job deadline (its `timeout_s`, by default
`GATEWAY_JOB_TIMEOUT_S`). Upstream errors back off, jittered, and never end a
job by themselves: only its deadline does.

A completed job whose tenant keeps its outputs (`output_store`) is not completed here:
it moves to the copy schedule, still `in_progress`, and the copier completes it.

The deadline fails the job with `timeout`: a queued one is cancelled upstream
first (nothing paid), a running one is left to RunComfy (it cannot be stopped)
and its error says so. A poll is never due after the deadline, and a pending
job sits in the poll schedule at its deadline (`JobStore.create`), so a job
waiting for an upstream slot fails on time too.

Polls keep their cadence: a job whose status did not change is due again one
interval after it was last due (never earlier than now), so the time a poll
waits and takes does not stretch the interval. The jobs of a claimed batch are
read together right after the claim, in one round trip.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import RedisError

from service.config import Settings
from service.metrics import WorkerMetrics
from service.models import UPSTREAM_STATUSES, JobErrorInfo, JobRecord
from service.outputs import output_urls
from service.runcomfy.client import RunComfyClient, UpstreamError
from service.runcomfy.wire import ResultAnswer
from service.store.jobs import JobStore, Outcome, StoredJob
from service.store.runlengths import ANY_CLASS, Phase, RunLengths, input_class, position_phase
from service.store.schedules import Claim, Schedules
from service.worker.loop import ClaimLoop, Heartbeat, backoff_s
from service.worker.timing import LearnedTiming, next_poll_s, scaled

log = logging.getLogger(__name__)

QUEUED = frozenset({"in_queue", "queued", "pending", "submitted"})
RUNNING = frozenset({"in_progress", "running", "processing", "started"})
COMPLETED = frozenset({"completed", "succeeded", "success"})
FAILED = frozenset({"failed", "error", "errored"})
CANCELLED = frozenset({"cancelled", "canceled"})
MAX_TRACKED_FAILURES = 10_000


class Poller(ClaimLoop):
    """Polls RunComfy for jobs in its queue and moves them along the state machine."""

    name = "poller"

    def __init__(
        self,
        settings: Settings,
        jobs: JobStore,
        schedules: Schedules,
        client: RunComfyClient,
        heartbeat: Heartbeat,
        *,
        concurrency: int = 32,
        runs: RunLengths | None = None,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        super().__init__(
            schedules, heartbeat, concurrency=concurrency, batch=200, drain_s=settings.shutdown_s
        )
        self.settings = settings
        self.jobs = jobs
        self.client = client
        self.runs = runs
        self.metrics = metrics
        # What recent jobs took, per input class: only the learned policy times polls by it.
        self.timing: LearnedTiming | None = None
        if runs is not None and settings.poll_policy == "learned":
            self.timing = LearnedTiming(
                runs,
                min_s=settings.poll_interval_min_s,
                max_s=settings.poll_interval_max_s,
                min_samples=settings.poll_learn_min_samples,
                refresh_s=settings.poll_learn_refresh_s,
                on_refresh=metrics.set_learned if metrics is not None else None,
            )
        # Consecutive poll failures per job, for its backoff. Bounded: another
        # replica may end a job this worker failed on, and the entry is never popped.
        self._errors: dict[str, int] = {}
        # The jobs of claimed polls, read together when claimed and taken by `work`.
        self._read: dict[str, StoredJob | None] = {}
        # Each job's poll count as its latest poll left it, taken when the job ends.
        self._polls: dict[str, int] = {}
        # What polls saw of each queued job's position; taken when it starts. Lost when
        # the job moves to another worker, which then starts over from its next poll.
        self._queued: dict[str, Queued] = {}

    async def claim(self, max_items: int) -> list[Claim]:
        """Claim jobs whose next poll is due; the claim reads them too."""
        if self.timing is not None:
            await self.timing.refresh_if_due()
        claims = await self.schedules.claim("poll", max_items, read_jobs=True)
        for claim in claims:
            self._read[claim.member] = claim.job
        return claims

    async def release_on_stop(self, claim: Claim) -> None:
        """Give an unfinished poll back at shutdown, due at once."""
        self._read.pop(claim.member, None)
        await super().release_on_stop(claim)

    async def _requeue(self, claim: Claim, delay_s: float | None, *, cadence: bool = False) -> None:
        """Give the poll back: due after `delay_s` (see `Schedules.release`), or removed."""
        await self.schedules.release(claim, delay_s=delay_s, cadence=cadence)

    def interval_s(self, stored: StoredJob) -> float:
        """How long until the next poll (`service/worker/timing.py`), never past the deadline."""
        record = stored.record
        since = record.started_at or record.submitted_at or record.created_at
        phase: Phase = "run" if record.started_at is not None else "queue"
        now = datetime.now(UTC)
        age = (now - since).total_seconds()
        low, high = self.settings.poll_interval_min_s, self.settings.poll_interval_max_s
        queued = self._queued.get(record.id)
        window = None
        if self.timing is not None and queued is not None and phase == "queue":
            window = self.timing.window(ANY_CLASS, position_phase(queued.position))
        if window is not None and queued is not None:
            # Its wait is about one per-place wait for each job ahead and one for itself.
            interval = next_poll_s(
                time.monotonic() - queued.since,
                scaled(window, queued.position + 1),
                min_s=low,
                max_s=high,
                age_s=age,
            )
        elif self.timing is not None:
            interval = self.timing.next_poll_s(input_class(record.input), phase, age)
        else:
            interval = next_poll_s(age, None, min_s=low, max_s=high)
        return min(interval, max(0.0, (record.deadline_at - now).total_seconds()))

    def _seen_queued(self, job_id: str, position: int | None) -> None:
        """Note the queue position a poll just saw the job at (None: RunComfy gave none)."""
        if position is None:
            self._queued.pop(job_id, None)
            return
        now = time.monotonic()
        queued = self._queued.get(job_id)
        if queued is None:
            if len(self._queued) >= MAX_TRACKED_FAILURES:
                del self._queued[next(iter(self._queued))]  # the oldest: ended elsewhere
            queued = self._queued[job_id] = Queued(position, now)
        queued.seen(position, now)

    async def _learn_waits(self, job_id: str) -> None:
        """A job just seen running: add its waits per place from the positions it was seen at."""
        queued = self._queued.pop(job_id, None)
        if self.runs is None or queued is None:
            return
        try:
            await self.runs.record_waits(job_id, queued.waits_per_place(time.monotonic()))
        except (RedisError, OSError) as exc:
            log.warning("poller: %s: queue waits not recorded (%s)", job_id, exc)

    def _first_run_poll_s(self, stored: StoredJob) -> float:
        """When to poll a job just seen started: the learned run's first poll, else the min."""
        if self.timing is None:
            return self.settings.poll_interval_min_s
        return self.timing.next_poll_s(input_class(stored.record.input), "run", 0.0)

    async def work(self, claim: Claim) -> None:
        """Poll one job and record what changed."""
        if claim.member in self._read:
            stored = self._read.pop(claim.member)
        else:
            stored = await self.jobs.get(claim.member)
        if stored is not None and stored.record.status == "pending":
            await self._pending_deadline(stored, claim)
            return
        if stored is None or stored.record.status not in UPSTREAM_STATUSES:
            self._errors.pop(claim.member, None)
            self._queued.pop(claim.member, None)
            await self._requeue(claim, None)
            return
        record = stored.record
        if datetime.now(UTC) >= record.deadline_at:
            self._errors.pop(record.id, None)
            await self._timeout(stored, claim)
            return
        try:
            if record.cancel_requested_at is not None and record.status == "in_queue":
                await self._cancel(stored, claim)
            else:
                await self._poll(stored, claim)
            self._errors.pop(record.id, None)
        except UpstreamError as exc:
            failures = self._errors.pop(record.id, 0) + 1
            if len(self._errors) >= MAX_TRACKED_FAILURES:
                del self._errors[next(iter(self._errors))]  # the oldest entry
            self._errors[record.id] = failures
            delay = max(
                backoff_s(failures, base_s=self.interval_s(stored), cap_s=60.0, rng=self.rng),
                getattr(exc, "retry_after_s", None) or 0.0,
            )
            log.warning(
                "poller: %s: %s (%s), polling again in %.1fs",
                record.id,
                type(exc).__name__,
                exc,
                delay,
            )
            await self._requeue(claim, delay)

    async def _poll(self, stored: StoredJob, claim: Claim) -> None:
        record = stored.record
        if self.runs is not None:
            polls = await self.runs.count_poll(record.id)
            if record.id not in self._polls and len(self._polls) >= MAX_TRACKED_FAILURES:
                del self._polls[next(iter(self._polls))]  # the oldest: another worker ended it
            self._polls[record.id] = polls
        answer = await self.client.status(_request_id(stored))
        status = (answer.status or "").lower()
        if status in QUEUED:
            self._seen_queued(record.id, answer.queue_position)
        interval = self.interval_s(stored)
        if status in QUEUED:
            if record.upstream is None or answer.queue_position != record.upstream.queue_position:
                await self.jobs.queue_position(
                    stored, claim.lease, answer.queue_position, poll_in_s=interval
                )
            else:
                await self._requeue(claim, interval, cadence=True)
        elif status in RUNNING:
            if record.status == "in_queue":
                await self._learn_waits(record.id)
                await self.jobs.started(
                    stored, claim.lease, poll_in_s=self._first_run_poll_s(stored)
                )
            else:
                await self._requeue(claim, interval, cadence=True)
        elif status in COMPLETED | FAILED:
            self._queued.pop(record.id, None)
            await self._finish(stored, claim, self._polls.pop(record.id, 0))
        elif status in CANCELLED:
            await self.jobs.finish(stored, "cancelled", lease=claim.lease)
        else:
            # Unknown statuses must not end the job: keep polling until its deadline.
            log.info("poller: %s: unknown upstream status %r", record.id, answer.status)
            await self._requeue(claim, interval, cadence=True)

    async def _finish(self, stored: StoredJob, claim: Claim, polls: int) -> None:
        """Fetch the result of an ended request and end the job with it."""
        seen_at = datetime.now(UTC)
        result = await self.client.result(_request_id(stored))
        status = (result.status or "").lower()
        if status in COMPLETED and self._keeps_outputs(stored, result.output):
            if stored.record.status == "in_queue":
                # A job is copied while `in_progress`: start it, and see the result again.
                await self.jobs.started(stored, claim.lease, poll_in_s=0)
            else:
                done = await self.jobs.copy_outputs(stored, claim.lease, result.output or {})
                if done is Outcome.DONE:
                    await self._learn(stored.record, result, seen_at, polls)
        elif status in COMPLETED:
            done = await self.jobs.finish(
                stored, "completed", lease=claim.lease, output=result.output
            )
            if done is Outcome.DONE:
                await self._learn(stored.record, result, seen_at, polls)
        elif status in FAILED:
            code, message = result.error_parts()
            error = JobErrorInfo(
                code=f"upstream_{code}" if code else "upstream_failed",
                message=message or "RunComfy reported the request failed",
            )
            await self.jobs.finish(stored, "failed", lease=claim.lease, error=error)
        elif status in CANCELLED:
            await self.jobs.finish(stored, "cancelled", lease=claim.lease)
        else:
            # The result lags the status: look again soon.
            await self._requeue(claim, self.settings.poll_interval_min_s)

    async def _learn(
        self, record: JobRecord, result: ResultAnswer, seen_at: datetime, polls: int
    ) -> None:
        """Add a completed job's queue and run lengths to what is learned, and to the metrics.

        RunComfy gives when the run ended (`finished_at`), not when it started: the
        start is when a poll first saw it running, so the run learned is from then.
        """
        klass = input_class(record.input)
        ended = _upstream_time(result.finished_at)
        if self.metrics is not None:
            delay = (seen_at - ended).total_seconds() if ended is not None else None
            self.metrics.job_detected(klass, polls, delay)
        if self.runs is None or record.submitted_at is None or record.started_at is None:
            return  # never seen running: its queue and run cannot be told apart
        if ended is not None and ended < record.started_at:
            return  # started only to copy its outputs, after RunComfy had ended it
        run_end = ended or seen_at
        try:
            await self.runs.record(
                klass,
                record.id,
                queue_s=(record.started_at - record.submitted_at).total_seconds(),
                run_s=(run_end - record.started_at).total_seconds(),
            )
        except (RedisError, OSError) as exc:
            # The job is done and its webhook queued: one lost sample only slows learning.
            log.warning("poller: %s: run lengths not recorded (%s)", record.id, exc)

    def _keeps_outputs(self, stored: StoredJob, output: dict[str, Any] | None) -> bool:
        """Whether the job's outputs are to be copied into its tenant's store (the copier)."""
        tenant = self.settings.tenants.by_id.get(stored.record.tenant)
        return tenant is not None and tenant.output_store is not None and bool(output_urls(output))

    async def _cancel(self, stored: StoredJob, claim: Claim) -> None:
        """A caller asked to cancel this queued job: ask RunComfy, record what it said."""
        answer = await self.client.cancel(_request_id(stored))
        outcome = (answer.outcome or answer.status or "").lower()
        log.info("poller: %s: upstream cancel answered %r", stored.record.id, outcome)
        if outcome in CANCELLED:
            await self.jobs.finish(stored, "cancelled", lease=claim.lease)
        elif outcome == "not_cancellable":
            await self.jobs.cancel_refused(stored, claim.lease, poll_in_s=0)
        else:
            # `cancellation_requested` or unknown: the status will tell; the poll continues.
            await self.jobs.cancel_refused(
                stored, claim.lease, poll_in_s=self.settings.poll_interval_min_s
            )

    async def _pending_deadline(self, stored: StoredJob, claim: Claim) -> None:
        """A pending job's deadline came before any upstream slot: fail it, nothing was paid."""
        record = stored.record
        left_s = (record.deadline_at - datetime.now(UTC)).total_seconds()
        if left_s > 0:
            await self._requeue(claim, left_s)
            return
        if record.submits and record.submits[-1].outcome == "sent":
            # A submit is on its way: its answer decides; look again after it.
            await self._requeue(claim, self.settings.poll_interval_min_s)
            return
        message = f"{_limit(record)}; no upstream slot came free: nothing was sent to RunComfy"
        error = JobErrorInfo(code="timeout", message=message)
        done = await self.jobs.finish(stored, "failed", lease=claim.lease, error=error)
        if done is Outcome.STALE:  # changed meanwhile (e.g. just submitted): decide again
            await self._requeue(claim, 0)

    async def _timeout(self, stored: StoredJob, claim: Claim) -> None:
        """The job reached its deadline: cancel it upstream while queued, then fail it."""
        record = stored.record
        message = f"{_limit(record)}; the RunComfy run went on (RunComfy cannot stop it)"
        if record.status == "in_queue":
            try:
                answer = await self.client.cancel(_request_id(stored))
                outcome = (answer.outcome or answer.status or "unknown").lower()
            except UpstreamError as exc:
                outcome = f"failed ({type(exc).__name__})"
            if outcome in CANCELLED:
                message = f"{_limit(record)}; cancelled in RunComfy's queue: nothing was paid"
            else:
                message = f"{_limit(record)}; RunComfy's cancel {outcome}: the run may go on"
            log.info("poller: %s timed out in_queue; upstream cancel: %s", record.id, outcome)
        error = JobErrorInfo(code="timeout", message=message)
        await self.jobs.finish(stored, "failed", lease=claim.lease, error=error)


@dataclass
class Queued:
    """What polls saw of a queued job's position in RunComfy's queue (monotonic times).

    A job's wait at a position counts from the poll that first saw it there
    (`since`), as the samples it is timed by do. The first sighting in each
    position bucket is kept, and when the job starts, each gives a sample: its
    wait per place (the jobs ahead and itself), what the bucket learns.
    """

    position: int
    since: float
    first: dict[str, tuple[int, float]] = field(default_factory=dict)

    def seen(self, position: int, now: float) -> None:
        """A poll saw the job at `position` at `now`."""
        if position != self.position or not self.first:
            self.position, self.since = position, now
        self.first.setdefault(position_phase(position), (position, now))

    def waits_per_place(self, started: float) -> dict[str, float]:
        """Per bucket, the wait from its first sighting to `started`, over the places it took."""
        return {at: (started - since) / (ahead + 1) for at, (ahead, since) in self.first.items()}


def _limit(record: JobRecord) -> str:
    return f"not finished within its timeout_s of {record.timeout_s}s"


def _upstream_time(value: str | float | None) -> datetime | None:
    """RunComfy's timestamp (RFC 3339, or unix seconds) as a datetime; None if unreadable."""
    try:
        if isinstance(value, str):
            parsed = datetime.fromisoformat(value)
            return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
        if isinstance(value, int | float):
            return datetime.fromtimestamp(value, UTC)
    except (ValueError, OverflowError, OSError):
        pass
    return None


def _request_id(stored: StoredJob) -> str:
    """The upstream request id; every job in `in_queue` or `in_progress` has one."""
    upstream = stored.record.upstream
    return upstream.request_id if upstream is not None else ""
