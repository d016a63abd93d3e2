"""The submitter: sends pending jobs to RunComfy, within the shared slot caps.

A submit is paid and RunComfy has no idempotency key, so it is recorded as
`sent` in the job before it is sent. Then:

- RunComfy accepted it: the job is `in_queue` and polled from now on.
- RunComfy answered an error (*definite*: nothing was created) or could not be
  reached: retried with exponential backoff and jitter, honouring
  `Retry-After`, at most `MAX_SUBMIT_RETRIES` times, then `failed`; errors
  that retrying cannot fix (invalid input, auth) fail at once.
- 402 (no funds) and 429 (rate limited) pause submits for every replica
  (`Limits.pause_upstream`) instead of hammering RunComfy; the job waits
  without using up its retries, bounded by its deadline.

Submits also pass a shared GCRA rate limit (`GATEWAY_UPSTREAM_RATE_PER_S`,
`GATEWAY_UPSTREAM_BURST`) before they are sent. The jobs claimed in one turn
come with the claim, and their rate-limit tokens are taken in one round trip
rather than one per job; a job whose token could not be taken with the others
asks for its own.
- No answer came after sending (*unknown*: a paid request may exist), or a
  worker died between sending and recording the answer: by default the job
  fails with `upstream_submit_unknown` rather than risk paying twice
  (`GATEWAY_SUBMIT_UNKNOWN=retry` submits once more instead). Either way every
  submit stays in the job's `submits` log, so a duplicate is visible.

Right before a submit is recorded and sent, the job's `video_url` is checked
(`preflight.check_input`, unless `GATEWAY_PREFLIGHT=off`). An unusable input
fails the job with the check's code and nothing is sent. A busy, failing or
slow input is asked again with backoff, `PREFLIGHT_TRIES` times in all, never
past the job deadline, then fails with `input_unreachable`; those tries are
counted by the worker holding the job (a restart starts again) and use up none
of the upstream submit retries.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

import httpx
import msgspec
from redis.exceptions import RedisError

from service.config import Settings
from service.metrics import WorkerMetrics
from service.models import FINAL_STATUSES, MODEL, JobErrorInfo
from service.runcomfy.client import (
    RunComfyClient,
    UpstreamError,
    UpstreamOutcomeUnknown,
    UpstreamRejected,
    UpstreamUnreachable,
)
from service.store.jobs import JobStore, Outcome, StoredJob
from service.store.limits import Limits
from service.store.schedules import Claim, Schedules
from service.worker.loop import ClaimLoop, Heartbeat, backoff_s
from service.worker.preflight import InputOk, InputRefused, InputRetry, check_input

log = logging.getLogger(__name__)

MAX_SUBMIT_RETRIES: Final = 8
RATE_LIMIT_PAUSE_S: Final = 5.0
PAUSE_CHECK_S: Final = 0.5
STALL_CHECK_S: Final = 5.0
STALLED_AFTER_LEASES: Final = 3
"""Submits are stalled when a claimable job has gone unclaimed for this many leases."""
PREFLIGHT_TRIES: Final = 3
"""Checks of a busy, failing or slow input before its job fails with `input_unreachable`."""
PREFLIGHT_BACKOFF_S: Final = 1.0
PREFLIGHT_BACKOFF_CAP_S: Final = 60.0
_TRIES_KEPT: Final = 10_000
"""Jobs whose input checks this worker counts; a job cancelled while it waits is forgotten."""
_encoder = msgspec.json.Encoder()


@dataclass(frozen=True)
class _Read:
    """A claimed job as read right after its claim, and whether its rate token is taken."""

    stored: StoredJob | None
    rate_granted: bool


class Submitter(ClaimLoop):
    """Claims pending jobs fairly across tenants and submits them upstream."""

    name = "submitter"

    def __init__(
        self,
        settings: Settings,
        *,
        jobs: JobStore,
        schedules: Schedules,
        client: RunComfyClient,
        limits: Limits,
        heartbeat: Heartbeat,
        metrics: WorkerMetrics | None = None,
        inputs: httpx.AsyncClient | None = None,
        concurrency: int = 32,
    ) -> None:
        """`inputs` is the pre-flight client (`create_input_client`); None skips the check."""
        super().__init__(schedules, heartbeat, concurrency=concurrency, drain_s=settings.shutdown_s)
        self.settings = settings
        self.jobs = jobs
        self.client = client
        self.limits = limits
        self.metrics = metrics
        self.inputs = inputs
        self._input_tries: dict[str, int] = {}  # by job id: checks that asked to retry
        self._pause_checked_at = -PAUSE_CHECK_S
        self._stall_checked_at = -STALL_CHECK_S
        self._paused = False
        self._read: dict[str, _Read] = {}  # by the claim's fencing token, until work() takes it

    def _tenant_caps(self) -> dict[str, int]:
        """Every tenant's cap on jobs inside RunComfy (its `max_in_flight`, else the global one).

        Read each time: the tenants file may have been reloaded. A tenant missing here
        was removed from it.
        """
        cap = self.settings.upstream_max_in_flight
        return {
            t.id: cap if t.max_in_flight is None else t.max_in_flight
            for t in self.settings.tenants.by_id.values()
        }

    async def claim(self, max_items: int) -> list[Claim]:
        """Claim pending jobs while RunComfy has free slots for them and no pause is on."""
        now = time.monotonic()
        # During a Redis outage ask again each time: answering from the last check would
        # read as Redis answering.
        if now - self._pause_checked_at >= PAUSE_CHECK_S or self.heartbeat.redis.down:
            self._paused = await self.limits.upstream_pause() is not None
            self._pause_checked_at = now
        if now - self._stall_checked_at >= STALL_CHECK_S:
            await self._check_stall()
            self._stall_checked_at = now
        if self._paused:
            return []
        claims = await self.schedules.claim_submits(
            max_items,
            global_cap=self.settings.upstream_max_in_flight,
            tenant_caps=self._tenant_caps(),
            every_tenant=True,
        )
        if claims:
            await self._read_claimed(claims)
        return claims

    async def _check_stall(self) -> None:
        """Turn the worker's health red while claimable submits go unclaimed for leases."""
        stall_s = await self.schedules.submit_stall_s(
            global_cap=self.settings.upstream_max_in_flight, tenant_caps=self._tenant_caps()
        )
        stuck = stall_s > STALLED_AFTER_LEASES * self.settings.lease_s
        if stuck and self.name not in self.heartbeat.stuck:
            log.error(
                "submitter: a claimable job has waited %.0fs unclaimed; submits stalled", stall_s
            )
        self.heartbeat.set_stuck(self.name, stuck)
        if self.metrics is not None:
            self.metrics.submit_stall.set(stall_s)

    async def _read_claimed(self, claims: list[Claim]) -> None:
        """Take the claimed jobs' rate tokens in one round trip (the claim read the jobs).

        If Redis fails here the claims still stand: work() then asks for each
        job's token itself.
        """
        try:
            # GCRA grants all or nothing, and never more than the burst at once.
            wanted = min(len(claims), self.settings.upstream_burst)
            wait_s = await self.limits.acquire(
                "submit",
                rate_per_s=self.settings.upstream_rate_per_s,
                burst=self.settings.upstream_burst,
                cost=wanted,
            )
        except (RedisError, OSError) as exc:
            self.redis_failed(exc, f"taking rate tokens for {len(claims)} claimed job(s)")
            wait_s = -1.0
        granted = wanted if wait_s == 0 else 0
        for i, claim in enumerate(claims):
            self._read[claim.lease.token] = _Read(claim.job, rate_granted=i < granted)

    async def release_on_stop(self, claim: Claim) -> None:
        """Give a job back at shutdown; its slot too, unless a submit may be upstream."""
        stored = await self.jobs.get(claim.member)
        sent = (
            stored is not None
            and stored.record.submits[-1:] != []
            and (stored.record.submits[-1].outcome == "sent")
        )
        await self.schedules.release(claim, delay_s=0, free_slot=not sent)

    async def work(self, claim: Claim) -> None:
        """Submit one pending job, unless something says not to now."""
        read = self._read.pop(claim.lease.token, None)
        stored = read.stored if read is not None else await self.jobs.get(claim.member)
        if stored is None or stored.record.status != "pending":
            # Cancelled or expired since it was queued; the change that did it cleaned up.
            await self.schedules.release(claim, delay_s=None, free_slot=True)
            return
        record = stored.record
        if record.tenant not in self.settings.tenants.by_id:
            await self._tenant_removed(stored, claim)
            return
        if datetime.now(UTC) >= record.deadline_at:
            error = JobErrorInfo(code="timeout", message="no upstream slot before the job deadline")
            await self.jobs.finish(stored, "failed", lease=claim.lease, error=error)
            return
        if record.submits and record.submits[-1].outcome == "sent":
            await self._unknown(stored, claim, "a worker stopped after sending the submit")
            return
        if not await self._may_send(
            stored, claim, rate_granted=read is not None and read.rate_granted
        ):
            return
        outcome, stored = await self.jobs.record_submit(stored, claim.lease)
        if outcome is not Outcome.DONE:
            return  # changed meanwhile (e.g. cancelled) or the lease was lost: not sent
        await self._send(stored, claim)

    async def _may_send(self, stored: StoredJob, claim: Claim, *, rate_granted: bool) -> bool:
        """Take a rate token if the claim did not, then check the input; False: not now."""
        if not rate_granted:
            wait_s = await self.limits.acquire(
                "submit",
                rate_per_s=self.settings.upstream_rate_per_s,
                burst=self.settings.upstream_burst,
            )
            if wait_s > 0:
                await self.schedules.release(claim, delay_s=wait_s, free_slot=True)
                return False
        return self.inputs is None or await self._input_ready(self.inputs, stored, claim)

    async def _input_ready(
        self, inputs: httpx.AsyncClient, stored: StoredJob, claim: Claim
    ) -> bool:
        """Check the job's input before paying for it: True to submit now, else it was handled."""
        record = stored.record
        verdict = await check_input(
            inputs,
            record.input.video_url,
            max_bytes=self.settings.input_max_bytes,
            deadline_s=self.settings.preflight_timeout_s,
        )
        match verdict:
            case InputOk():
                self._input_tries.pop(record.id, None)
                return True
            case InputRefused(code=code, message=message):
                await self._input_failed(stored, claim, code, message)
            case InputRetry(message=message, retry_after_s=retry_after_s):
                await self._input_later(stored, claim, message, retry_after_s)
        return False

    async def _input_later(
        self, stored: StoredJob, claim: Claim, message: str, retry_after_s: float | None
    ) -> None:
        """Ask a busy or slow input again after a backoff, while tries and the deadline allow."""
        job_id = stored.record.id
        tries = self._input_tries.pop(job_id, 0) + 1
        if tries >= PREFLIGHT_TRIES:
            await self._input_failed(
                stored, claim, "input_unreachable", f"{message} (asked {tries} times)"
            )
            return
        cap_s = PREFLIGHT_BACKOFF_CAP_S
        delay = backoff_s(tries, base_s=PREFLIGHT_BACKOFF_S, cap_s=cap_s, rng=self.rng)
        if retry_after_s is not None:
            delay = max(delay, min(retry_after_s, cap_s))
        left_s = (stored.record.deadline_at - datetime.now(UTC)).total_seconds()
        if delay >= left_s:
            message = f"{message}; the job deadline comes before another try"
            await self._input_failed(stored, claim, "input_unreachable", message)
            return
        while len(self._input_tries) >= _TRIES_KEPT:
            del self._input_tries[next(iter(self._input_tries))]
        self._input_tries[job_id] = tries
        log.info(
            "submitter: %s: input not ready (%s); asking again in %.1fs", job_id, message, delay
        )
        # Nothing about the job changed, so nothing is written to it: only the claim goes back,
        # with its upstream slot, as for a rate-limit wait.
        await self.schedules.release(claim, delay_s=delay, free_slot=True)

    async def _input_failed(self, stored: StoredJob, claim: Claim, code: str, message: str) -> None:
        """The input cannot be used: fail the job before anything is sent upstream."""
        self._input_tries.pop(stored.record.id, None)
        log.info("submitter: %s: input refused, %s: %s", stored.record.id, code, message)
        error = JobErrorInfo(code=code, message=message)
        await self.jobs.finish(stored, "failed", lease=claim.lease, error=error)

    async def _tenant_removed(self, stored: StoredJob, claim: Claim) -> None:
        """The job's tenant left the tenants file: fail it rather than pay for it."""
        sent = stored.record.submits[-1:] != [] and stored.record.submits[-1].outcome == "sent"
        message = "the tenant was removed before this job was sent to RunComfy; nothing was paid"
        if sent:  # a worker stopped after sending it: never sent again
            message = "the tenant was removed; a submit sent before may have created a paid run"
        log.warning(
            "submitter: %s: tenant %s was removed; failing it",
            stored.record.id,
            stored.record.tenant,
        )
        await self.jobs.finish(
            stored,
            "failed",
            lease=claim.lease,
            error=JobErrorInfo(code="tenant_removed", message=message),
            submit_outcome="unknown" if sent else None,
        )

    async def _send(self, stored: StoredJob, claim: Claim) -> None:
        """Send the submit recorded as `sent` and record what RunComfy answered."""
        record = stored.record
        try:
            answer = await self.client.submit(MODEL, _encoder.encode(record.input))
        except UpstreamOutcomeUnknown as exc:
            await self._unknown(stored, claim, str(exc))
        except UpstreamUnreachable as exc:
            await self._later_or_fail(stored, claim, "unreachable", str(exc), None, "unreachable")
        except UpstreamRejected as exc:
            if exc.kind in {"insufficient_funds", "rate_limited"}:
                await self._pause(stored, claim, exc)
            elif exc.retryable:
                kind = f"upstream_{exc.kind}"
                await self._later_or_fail(
                    stored, claim, "rejected", str(exc), exc.retry_after_s, kind
                )
            else:
                error = JobErrorInfo(code=f"upstream_{exc.kind}", message=exc.message or str(exc))
                await self.jobs.finish(
                    stored, "failed", lease=claim.lease, error=error, submit_outcome="rejected"
                )
        else:
            if not answer.request_id:
                await self._unknown(stored, claim, "RunComfy answered without a request_id")
                return
            done = await self.jobs.submitted(
                stored,
                claim.lease,
                answer.request_id,
                poll_in_s=self.settings.poll_interval_min_s,
            )
            if done is Outcome.STALE:
                await self._orphaned(record.id, answer.request_id)
            elif done is not Outcome.DONE:
                log.warning(
                    "submitter: %s was accepted upstream as %s but %s",
                    record.id,
                    answer.request_id,
                    done.name,
                )

    async def _orphaned(self, job_id: str, request_id: str) -> None:
        """The job ended (cancelled) while its submit was on the way: cancel that request too."""
        stored = await self.jobs.get(job_id)
        if stored is None or stored.record.status not in FINAL_STATUSES:
            log.warning("submitter: %s changed while %s was submitted", job_id, request_id)
            return
        try:
            answer = await self.client.cancel(request_id)
            outcome = answer.outcome or answer.status or "unknown"
        except UpstreamError as exc:
            outcome = f"failed ({type(exc).__name__})"
        log.info("submitter: %s ended while submitting; upstream cancel %s", job_id, outcome)
        detail = f"accepted after the job was {stored.record.status}; upstream cancel: {outcome}"
        await self.jobs.late_submit(stored, request_id, detail)

    async def _later_or_fail(  # noqa: PLR0917 - private, called twice
        self,
        stored: StoredJob,
        claim: Claim,
        outcome: str,
        detail: str,
        retry_after_s: float | None,
        code: str,
    ) -> None:
        """A definite failure: retry with backoff while retries remain, else fail the job."""
        retries = stored.record.submit_retries
        if retries >= MAX_SUBMIT_RETRIES:
            log.warning(
                "submitter: giving up on %s after %d retries: %s", stored.record.id, retries, detail
            )
            error = JobErrorInfo(
                code=code, message=f"gave up after {retries + 1} submits: {detail}"
            )
            await self.jobs.finish(
                stored, "failed", lease=claim.lease, error=error, submit_outcome=outcome
            )
            return
        delay = backoff_s(retries + 1, base_s=1.0, cap_s=120.0, rng=self.rng)
        if retry_after_s is not None:
            delay = max(delay, retry_after_s)
        await self.jobs.submit_later(stored, claim.lease, outcome, detail, delay_s=delay)

    async def _pause(self, stored: StoredJob, claim: Claim, exc: UpstreamRejected) -> None:
        """No funds or rate limited: stop every replica's submits for a while, keep the job."""
        if exc.kind == "insufficient_funds":
            seconds = max(self.settings.funds_pause_s, exc.retry_after_s or 0.0)
            log.error("submitter: RunComfy has no funds (402); pausing submits for %.0fs", seconds)
        else:
            seconds = exc.retry_after_s or RATE_LIMIT_PAUSE_S
            log.warning("submitter: RunComfy rate limited us (429); pausing submits %.1fs", seconds)
        await self.limits.pause_upstream(exc.kind, seconds)
        self._paused, self._pause_checked_at = True, time.monotonic()
        await self.jobs.submit_later(
            stored,
            claim.lease,
            "rejected",
            str(exc),
            delay_s=seconds * self.rng.uniform(1.0, 1.2),
            count_retry=False,
        )

    async def _unknown(self, stored: StoredJob, claim: Claim, detail: str) -> None:
        """The submit may have created a paid request: apply the documented policy."""
        if self.settings.submit_unknown_policy == "retry" and not any(
            s.outcome == "unknown" for s in stored.record.submits
        ):
            log.warning(
                "submitter: %s outcome unknown (%s); submitting once more", stored.record.id, detail
            )
            await self.jobs.submit_later(stored, claim.lease, "unknown", detail, delay_s=0)
            return
        log.warning("submitter: %s outcome unknown (%s); failing it", stored.record.id, detail)
        error = JobErrorInfo(
            code="upstream_submit_unknown",
            message="the submit was sent but no answer came; not sent again to avoid paying twice",
        )
        await self.jobs.finish(
            stored, "failed", lease=claim.lease, error=error, submit_outcome="unknown"
        )
