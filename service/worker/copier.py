"""The copier: streams a completed job's outputs from RunComfy into its tenant's store.

When RunComfy completes a job whose tenant has an `output_store`, the poller keeps
RunComfy's output in the job and moves it from the poll schedule to the `copy` schedule
(`JobStore.copy_outputs`); the job stays `in_progress`. A copier claims it there with a
lease and a fencing token, keeps the claim alive while it copies (`Schedules.extend`,
every third of a lease), and streams each output through httpx into the store, hashing
it on the way (sha256) and never holding it whole. Only once every output is stored does
it complete the job, with its fencing token, and so queue `job.completed`. A worker killed
mid-copy stops extending: the claim falls due again after its lease and another worker
copies anew; the half-made multipart upload never became an object, and a late write of
the dead worker's fails its token check.

    CopyRefused     cannot succeed (a host not in GATEWAY_OUTPUT_HOSTS, over
                    GATEWAY_OUTPUT_MAX_BYTES, a 4xx, a forbidden address, too many
                    redirects): the job fails at once with `output_copy_failed`
    CopyFailed      a passing failure (the network, a 5xx or 429, the store): copied again
                    with backoff and jitter, at most `MAX_ATTEMPTS` times and never past
                    the job's deadline, then the job fails with `output_copy_failed`

A failed job keeps RunComfy's URLs in its error's message and in `output_files[].upstream_url`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal

import httpx
from redis.exceptions import RedisError

from service.config import OutputStore, Settings
from service.metrics import WorkerMetrics
from service.models import JobErrorInfo, JobRecord, OutputFile
from service.outputs import object_path, output_urls, replace_urls
from service.storage.objects import OutputStores, StoreError
from service.store.jobs import JobStore, Outcome, StoredJob
from service.store.schedules import Claim, Schedules
from service.webhooks.delivery import error_class
from service.webhooks.guard import AddressPolicy, host_listed
from service.webhooks.transport import create_guarded_client
from service.worker.loop import ClaimLoop, Heartbeat, backoff_s

__all__ = ["MAX_ATTEMPTS", "Copier", "CopyFailed", "CopyRefused", "create_output_client"]

log = logging.getLogger(__name__)

MAX_ATTEMPTS: Final = 8
"""Copies of one job's outputs tried in all (each after a passing failure), within its deadline."""
MAX_REDIRECTS: Final = 3
_CONCURRENCY: Final = 4
_REFUSED_STATUSES: Final = frozenset(range(400, 500)) - {408, 425, 429}
_TIMEOUT: Final = httpx.Timeout(connect=10.0, read=60.0, write=30.0, pool=10.0)


@dataclass
class _Tally:
    """What of one output has streamed past: its size and running sha256."""

    size: int = 0
    digest: Any = field(default_factory=hashlib.sha256)


class CopyRefused(Exception):  # noqa: N818 - a verdict on the output, like httpx's names
    """The output cannot be copied, now or later; the message names the upstream URL."""


class CopyFailed(Exception):  # noqa: N818
    """The copy failed for a passing reason; another try may succeed."""


def create_output_client(
    *, allow_private_hosts: Sequence[str] = (), max_connections: int = _CONCURRENCY
) -> httpx.AsyncClient:
    """The client outputs are read with: public addresses only, but for `allow_private_hosts`."""
    policy = AddressPolicy(public_only=True, private_hosts=tuple(allow_private_hosts))
    return create_guarded_client(max_connections=max_connections, policy=policy)


class Copier(ClaimLoop):
    """Copies completed jobs' outputs into their tenants' stores, then completes the jobs."""

    name = "copier"

    def __init__(
        self,
        settings: Settings,
        *,
        jobs: JobStore,
        schedules: Schedules,
        stores: OutputStores,
        client: httpx.AsyncClient,
        heartbeat: Heartbeat,
        metrics: WorkerMetrics,
        concurrency: int = _CONCURRENCY,
    ) -> None:
        super().__init__(
            schedules,
            heartbeat,
            concurrency=concurrency,
            batch=concurrency,
            drain_s=settings.shutdown_s,
        )
        self.settings = settings
        self.jobs = jobs
        self.stores = stores
        self.client = client
        self.metrics = metrics

    async def claim(self, max_items: int) -> list[Claim]:
        """Claim jobs whose copy is due; the claim reads them too."""
        return await self.schedules.claim("copy", max_items, read_jobs=True)

    async def work(self, claim: Claim) -> None:
        """Copy one job's outputs and complete it, or fail it, or try again later."""
        stored = claim.job or await self.jobs.get(claim.member)
        if stored is None or stored.record.status != "in_progress":
            await self.schedules.release(claim, delay_s=None)  # gone or ended meanwhile
            return
        record = stored.record
        upstream = record.upstream_output or {}
        tenant = self.settings.tenants.by_id.get(record.tenant)
        config = tenant.output_store if tenant is not None else None
        if config is None:
            # The tenant dropped its store (or left) since: complete with RunComfy's URLs.
            log.warning(
                "copier: %s: its tenant has no output_store now; RunComfy's URLs kept", record.id
            )
            await self._end(stored, claim, "completed", output=upstream)
            return
        left_s = (record.deadline_at - datetime.now(UTC)).total_seconds()
        if left_s <= 0:
            message = _late(record)
            await self._fail(stored, claim, message, [])
            return
        done: list[OutputFile] = []
        copy = asyncio.create_task(self._copy_all(stored, config, done))
        held, refused, failed = False, None, None
        try:
            async with asyncio.timeout(left_s):
                held = await self._hold(claim, copy)
        except TimeoutError:
            refused = _late(record)
        except CopyRefused as exc:
            refused = str(exc)
        except CopyFailed as exc:
            failed = str(exc)
        finally:
            copy.cancel()
            with contextlib.suppress(BaseException):
                await copy
        if refused is not None:
            await self._fail(stored, claim, refused, done)
        elif failed is not None:
            await self._retry(stored, claim, failed, done)
        elif not held:
            log.warning(
                "copier: %s: its claim was lost mid-copy; another worker copies it", record.id
            )
        else:
            stored_urls = {f.upstream_url: f.url for f in done if f.url is not None}
            output = replace_urls(upstream, stored_urls)
            await self._end(stored, claim, "completed", output=output, output_files=done)

    async def _hold(self, claim: Claim, copy: asyncio.Task[None]) -> bool:
        """Keep the claim while `copy` runs; True when it ended, False when the claim was lost.

        `copy`'s own exception comes out. A Redis failure while extending is logged and
        tried again: should the lease run out meanwhile, the job's final write fails its
        token check and nothing is recorded twice.
        """
        every_s = self.settings.lease_s / 3
        while True:
            finished, _ = await asyncio.wait({copy}, timeout=every_s)
            if finished:
                copy.result()
                return True
            try:
                if not await self.schedules.extend(claim):
                    return False
            except (RedisError, OSError) as exc:
                self.redis_failed(exc, f"extending the claim on {claim.member}")

    async def _copy_all(
        self, stored: StoredJob, config: OutputStore, done: list[OutputFile]
    ) -> None:
        """Copy every output of the job in turn, appending each stored one to `done`."""
        record = stored.record
        for n, url in enumerate(output_urls(record.upstream_output)):
            started = time.monotonic()
            try:
                done.append(await self._copy_one(record.id, record.tenant, config, n, url))
            except CopyRefused:
                self.metrics.output_copied(record.tenant, time.monotonic() - started, "failed")
                raise
            except CopyFailed:
                self.metrics.output_copied(record.tenant, time.monotonic() - started, "retry")
                raise
            self.metrics.output_copied(record.tenant, time.monotonic() - started, "stored")

    async def _copy_one(
        self, job_id: str, tenant: str, config: OutputStore, n: int, url: str
    ) -> OutputFile:
        """Stream one output into the store; what was stored, with its size and sha256."""
        response = await self._open(url)
        try:
            content_type = (
                response.headers.get("Content-Type", "").partition(";")[0].strip().lower()
                or "application/octet-stream"
            )
            path = object_path(job_id, n, url, content_type)
            tally = _Tally()
            chunks = self._chunks(response, url, tenant, tally)
            try:
                await self.stores.put(config, path, chunks, content_type)
            except StoreError as exc:
                raise CopyFailed(f"the output store did not take {url}: {exc}") from None
            except httpx.HTTPError as exc:
                raise _network_failure(url, exc) from None
            try:
                stored_url = await self.stores.url(config, path)
            except StoreError as exc:
                raise CopyFailed(f"the output store could not sign {url}'s copy: {exc}") from None
        finally:
            await response.aclose()
        return OutputFile(
            url=stored_url,
            upstream_url=url,
            bytes=tally.size,
            sha256=tally.digest.hexdigest(),
            content_type=content_type,
        )

    async def _open(self, url: str) -> httpx.Response:
        """GET `url` (following at most `MAX_REDIRECTS`, each checked), its body unread."""
        for _ in range(MAX_REDIRECTS + 1):
            try:
                target = httpx.URL(url)
            except httpx.InvalidURL:
                raise CopyRefused(f"{url} is not a URL the gateway can fetch") from None
            if target.scheme not in {"http", "https"} or not host_listed(
                target.host, self.settings.output_hosts
            ):
                raise CopyRefused(f"{url}: its host is not in GATEWAY_OUTPUT_HOSTS")
            try:
                request = self.client.build_request("GET", target, timeout=_TIMEOUT)
                response = await self.client.send(request, stream=True)
            except httpx.HTTPError as exc:
                raise _network_failure(url, exc) from None
            if response.next_request is not None:
                await response.aclose()
                url = str(response.next_request.url)
                continue
            status = response.status_code
            if not 200 <= status < 300:
                await response.aclose()
                if status in _REFUSED_STATUSES:
                    raise CopyRefused(f"{url} answered HTTP {status}")
                raise CopyFailed(f"{url} answered HTTP {status}")
            length = response.headers.get("Content-Length", "").strip()
            if length.isdigit() and int(length) > self.settings.output_max_bytes:
                await response.aclose()
                raise CopyRefused(_too_large(url, self.settings.output_max_bytes, int(length)))
            return response
        raise CopyRefused(f"{url} redirects more than {MAX_REDIRECTS} times")

    async def _chunks(
        self,
        response: httpx.Response,
        url: str,
        tenant: str,
        tally: _Tally,
    ) -> AsyncIterator[bytes]:
        """The body as it arrives, hashed and counted, refused once past the size cap."""
        limit = self.settings.output_max_bytes
        bytes_copied = self.metrics.output_copy_bytes.labels(tenant=tenant)
        async for chunk in response.aiter_raw():
            tally.size += len(chunk)
            if tally.size > limit:
                raise CopyRefused(_too_large(url, limit, None))
            tally.digest.update(chunk)
            bytes_copied.inc(len(chunk))
            yield chunk

    async def _retry(
        self, stored: StoredJob, claim: Claim, reason: str, done: list[OutputFile]
    ) -> None:
        """A passing failure: copy again after a backoff, unless tries or time ran out."""
        record = stored.record
        attempts = record.copy_attempts + 1
        delay = backoff_s(attempts, base_s=1.0, cap_s=60.0, rng=self.rng)
        left_s = (record.deadline_at - datetime.now(UTC)).total_seconds()
        if attempts >= MAX_ATTEMPTS or delay >= left_s:
            log.warning("copier: %s: giving up after %d tries: %s", record.id, attempts, reason)
            await self._fail(stored, claim, f"{reason} (gave up after {attempts} tries)", done)
            return
        log.warning("copier: %s: %s; copying again in %.1fs", record.id, reason, delay)
        await self.jobs.copy_later(stored, claim.lease, reason, delay_s=delay)

    async def _fail(
        self, stored: StoredJob, claim: Claim, reason: str, done: Sequence[OutputFile]
    ) -> None:
        """End the job `failed` with `output_copy_failed`, keeping every RunComfy URL."""
        upstream = output_urls(stored.record.upstream_output)
        copied = {f.upstream_url: f for f in done}
        files = [copied.get(url) or OutputFile(url=None, upstream_url=url) for url in upstream]
        message = f"{reason}; RunComfy's outputs: {', '.join(upstream)}"
        log.warning("copier: %s: output copy failed: %s", stored.record.id, reason)
        error = JobErrorInfo(code="output_copy_failed", message=message)
        await self._end(stored, claim, "failed", error=error, output_files=files)

    async def _end(
        self,
        stored: StoredJob,
        claim: Claim,
        status: Literal["completed", "failed"],
        *,
        output: dict[str, Any] | None = None,
        error: JobErrorInfo | None = None,
        output_files: list[OutputFile] | None = None,
    ) -> None:
        """Make the job final with this claim's token; a job changed meanwhile is read again."""
        for _ in range(3):
            outcome = await self.jobs.finish(
                stored,
                status,
                lease=claim.lease,
                output=output,
                error=error,
                output_files=output_files,
            )
            if outcome is not Outcome.STALE:
                break
            fresh = await self.jobs.get(stored.record.id)
            if fresh is None or fresh.record.status != "in_progress":
                break
            stored = fresh
        if outcome is Outcome.LEASE_LOST:
            log.warning(
                "copier: %s: claim lost before the job could end; another worker has it",
                stored.record.id,
            )


def _network_failure(url: str, exc: httpx.HTTPError) -> CopyFailed | CopyRefused:
    """A transport failure reading `url`: a forbidden address cannot succeed, the rest may."""
    kind = error_class(exc)
    if kind in {"forbidden_address", "invalid_url"}:
        return CopyRefused(f"{url} leads to an address the gateway may not reach")
    return CopyFailed(f"reading {url} failed ({kind}: {type(exc).__name__})")


def _late(record: JobRecord) -> str:
    """Why a copy ended at the job's deadline, with the last passing failure if there was one."""
    late = f"not copied within the job's timeout_s of {record.timeout_s}s"
    if record.copy_error:
        late += f" (tried {record.copy_attempts} times; the last: {record.copy_error})"
    return late


def _too_large(url: str, limit: int, size: int | None) -> str:
    stated = f" is {size} bytes" if size is not None else " is larger than that"
    return f"{url}{stated}; GATEWAY_OUTPUT_MAX_BYTES is {limit}"
