"""Built-in stand-in for RunComfy's Model API, with fault injection; a Litestar app on uvicorn.

Part of the product, not a test helper: ``runcomfy-gateway emulator`` and ``dev``
serve it for local development, callers' CI and load tests. It answers like
RunComfy: submit, status, result and cancel for ``tencent/hunyuan/video-to-video``,
with a time-driven life cycle (``in_queue`` for ``queue_s``, ``in_progress`` for
``run_s``, then ``completed`` or ``failed``; both 0 completes a request at once),
and serves each output video itself under ``/outputs/<id>.mp4``.

Run lengths follow the input as RunComfy's do (``input_scaling``): ``run_s`` is
the run of the default input (720p, 129 frames, standard mode); 580p takes 0.65
of it, 480p 0.45, 85 frames 0.66, ``pro_mode`` 1.8 times it. Each request's
queue and run times are then spread uniformly by ``±spread`` (0.2: ±20%) and
divided by ``speed`` (0.5: everything takes twice as long; changed at run time
through ``POST /_emulator/config``, it applies to requests submitted after).

With ``capacity`` N > 0 RunComfy runs at most N requests at once, first come first
served: a request starts ``queue_s`` after its submit, or when a run ends and frees
its slot if all N are taken then, and never before a request submitted earlier;
its ``queue_s`` is then the whole wait, so queue positions say how far back it is.
Starts are fixed at submit: a request cancelled while queued keeps the slot it
would have taken. 0 (the default) is unlimited: every request starts ``queue_s``
after its submit, whatever its position.

Faults are independent probabilities per ``/v1`` call, drawn in this order and
the first that fires decides: ``drop_rate`` (a submit creates the request and
then the connection closes before the answer is complete: the unknown-outcome
case, where the request was sent and no answer came), ``rate_429``,
``error_5xx_rate``, ``http200_error_rate`` (none of these three creates a
request). ``fail_rate`` dooms a created request to end ``failed``;
``funds_exhausted`` answers every submit 402 / 10001; ``latency_ms`` delays
every ``/v1`` answer. With a ``seed`` the faults repeat run after run.

Environment read by ``EmulatorConfig.from_env`` (each optional; a bad value
raises ValueError naming the variable):

===========================================  =====================================  =======
variable                                     meaning                                default
===========================================  =====================================  =======
``RUNCOMFY_EMULATOR_QUEUE_S``                seconds a request stays ``in_queue``   1
``RUNCOMFY_EMULATOR_RUN_S``                  seconds it then stays ``in_progress``  5
``RUNCOMFY_EMULATOR_SPREAD``                 each request's times spread ±this      0
``RUNCOMFY_EMULATOR_SPEED``                  times are divided by this              1
``RUNCOMFY_EMULATOR_CAPACITY``               requests run at once, first come       0
                                             first served (0: unlimited)
``RUNCOMFY_EMULATOR_INPUT_SCALING``          ``run_s`` follows resolution, frames   true
``RUNCOMFY_EMULATOR_FAIL_RATE``              share of requests that end ``failed``  0
``RUNCOMFY_EMULATOR_ERROR_5XX_RATE``         share of calls answered 500/502/503    0
``RUNCOMFY_EMULATOR_RATE_429``               share of calls answered 429            0
``RUNCOMFY_EMULATOR_RETRY_AFTER_S``          ``Retry-After`` sent with a 429        1
``RUNCOMFY_EMULATOR_HTTP200_ERROR_RATE``     share answered HTTP 200 + error_code   0
``RUNCOMFY_EMULATOR_DROP_RATE``              share of calls dropped unanswered      0
``RUNCOMFY_EMULATOR_LATENCY_MS``             delay added to every ``/v1`` call      0
``RUNCOMFY_EMULATOR_FUNDS_EXHAUSTED``        ``true``: every submit answers 402     false
``RUNCOMFY_EMULATOR_FAULTS_ON_SUBMIT_ONLY``  ``true``: faults spare other calls     false
``RUNCOMFY_EMULATOR_TOKEN``                  Bearer token to require                (any)
``RUNCOMFY_EMULATOR_SEED``                   integer seed: reproducible faults      (none)
``RUNCOMFY_EMULATOR_OUTPUT_BYTES``           size of each output video (0: a tiny   0
                                             MP4 header)
``RUNCOMFY_EMULATOR_OUTPUT_BYTES_PER_S``     how fast outputs are sent (0: at once) 0
``RUNCOMFY_EMULATOR_OUTPUT_HOST``            host named in output URLs instead of   (none)
                                             the one the submit came to
``RUNCOMFY_EMULATOR_OUTPUT_FAILURES``        the first N GETs of each output answer 0
                                             503 (a passing failure)
===========================================  =====================================  =======

Test and ops endpoints, not part of RunComfy and unauthenticated (the emulator
is for local and CI use): ``GET /_emulator/requests`` lists every created
request (with its queue and run times and when each status call of it came),
counts submits (each one paid at RunComfy) and the requests each input
file answered, ``POST /_emulator/config`` changes any config fields at run
time, ``POST /_emulator/reset`` forgets all requests and counts.

Input files, for a job's ``video_url`` (the gateway checks it before paying):
``GET`` or ``HEAD /_emulator/inputs/<name>`` answers a file of ``size`` bytes
(default: a tiny MP4 header) streamed in chunks, never held whole, with
``Content-Type`` ``type`` (default ``video/mp4``; empty: none) and
``Content-Length``. A ``Range: bytes=a-b`` answers 206 with ``Content-Range``.
The query string changes the answer: ``status=N`` (that status, no body),
``head=N`` (HEAD alone answers N, e.g. 405 as servers that refuse HEAD),
``retry_after=V`` (a ``Retry-After`` on a non-2xx answer),
``redirect=<url>`` (302 to it), ``delay_s=S`` (wait before answering).
"""

import array
import asyncio
import hashlib
import heapq
import hmac
import logging
import math
import os
import random
import re
import signal
import time
import urllib.parse
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Annotated, Any, Final, Literal, Self, TypeAlias

import msgspec
from litestar import Litestar, MediaType, Request, Response, asgi, get, post
from litestar.params import FromPath, RawBody
from litestar.response import Stream
from litestar.response.base import ASGIResponse
from litestar.types import HTTPResponseBodyEvent, HTTPResponseStartEvent, Receive, Scope, Send

from service.serving import Served, freeze_what_startup_made, listen, serve

__all__ = [
    "MODEL",
    "EmulatorConfig",
    "create_emulator_app",
    "output_chunks",
    "run_emulator",
    "start_emulator",
]

logger = logging.getLogger(__name__)

MODEL: Final = "tencent/hunyuan/video-to-video"
ENV_PREFIX: Final = "RUNCOMFY_EMULATOR_"
# The smallest valid MP4 header (an ``ftyp`` box): enough for a caller to fetch
# and sniff, never meant to play.
OUTPUT_BYTES: Final = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2"
# Oldest requests are forgotten beyond this, as RunComfy expires old requests;
# it bounds memory during long load tests.
MAX_REQUESTS: Final = 100_000
MAX_POLLS_KEPT: Final = 256
"""Status call times kept per request, for `/_emulator/requests` (the latest ones)."""
# How the default input's run time scales with the input (`input_scaling`): RunComfy's
# runs take longer with more pixels, more frames and pro_mode.
RESOLUTION_SCALE: Final = {"480p": 0.45, "580p": 0.65, "720p": 1.0}
FRAMES_SCALE: Final = {85: 0.66, 129: 1.0}
PRO_MODE_SCALE: Final = 1.8
_SHUTDOWN_S: Final = 2.0

# RunComfy's clients pool connections for longer than uvicorn's 5 s default keep-alive; a
# server closing an idle connection as the client reuses it would fake a dropped answer.
_KEEP_ALIVE_S: Final = 75
_INPUT_CHUNK: Final = 64 * 1024
_RANGE: Final = re.compile(r"bytes=(\d+)-(\d*)")
_OUTPUT_BLOCK: Final = hashlib.shake_256(b"runcomfy-gateway emulator output").digest(_INPUT_CHUNK)

_Fault: TypeAlias = Literal["drop", "429", "5xx", "http200"]
_RATE_FIELDS: Final = (
    "fail_rate",
    "error_5xx_rate",
    "rate_429",
    "http200_error_rate",
    "drop_rate",
    "spread",
)
_DURATION_FIELDS: Final = ("queue_s", "run_s", "retry_after_s", "latency_ms")


class EmulatorConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How the emulator behaves: life-cycle timing, token and fault probabilities."""

    queue_s: float = 1.0
    run_s: float = 5.0
    fail_rate: float = 0.0
    error_5xx_rate: float = 0.0
    rate_429: float = 0.0
    retry_after_s: float = 1.0
    http200_error_rate: float = 0.0
    drop_rate: float = 0.0
    latency_ms: float = 0.0
    funds_exhausted: bool = False
    faults_on_submit_only: bool = False
    token: str | None = None
    seed: int | None = None
    spread: float = 0.0
    """Each request's queue and run times are drawn uniformly within ±spread of theirs."""
    speed: float = 1.0
    """Queue and run times are divided by this: 0.5 makes every new request take twice as long."""
    input_scaling: bool = True
    """`run_s` is the default input's run; other resolutions, frames and pro_mode scale it."""
    capacity: int = 0
    """Requests RunComfy runs at once, first come first served; 0: unlimited."""
    output_bytes: int = 0
    """Size of each output video, generated and streamed (`output_chunks`); 0: a tiny MP4."""
    output_bytes_per_s: float = 0.0
    """How fast an output is sent, so a copy can be caught mid-way; 0: as fast as it goes."""
    output_host: str = ""
    """Host (and no port) put in output URLs instead of the submit's: a host not allowed."""
    output_failures: int = 0
    """The first this many GETs of each output answer 503, as a store-side hiccup would."""

    def __post_init__(self) -> None:
        for name in _RATE_FIELDS:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        if not (math.isfinite(self.speed) and self.speed > 0.0):
            raise ValueError("speed must be a finite number > 0")
        for name in _DURATION_FIELDS:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be a finite number >= 0")
        if self.token == "":
            self.token = None
        if self.output_bytes < 0 or self.output_failures < 0 or self.capacity < 0:
            raise ValueError("output_bytes, output_failures and capacity must be >= 0")
        if not (math.isfinite(self.output_bytes_per_s) and self.output_bytes_per_s >= 0.0):
            raise ValueError("output_bytes_per_s must be a finite number >= 0")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Self:
        """Read ``RUNCOMFY_EMULATOR_<FIELD>`` variables; unset or empty ones keep the default."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in msgspec.structs.fields(cls):
            variable = ENV_PREFIX + field.name.upper()
            raw = env.get(variable, "").strip()
            if not raw:
                continue
            try:
                value = msgspec.convert(raw, field.type, strict=False)
                cls(**{field.name: value})  # checks this one value's range
            except ValueError as exc:  # msgspec.ValidationError is a ValueError
                raise ValueError(f"{variable}={raw!r}: {exc}") from None
            values[field.name] = value
        return cls(**values)

    def redacted(self) -> dict[str, Any]:
        """Return the fields as a dict, with the token masked, for answers and logs."""
        fields = msgspec.structs.asdict(self)
        if self.token is not None:
            fields["token"] = "***"  # noqa: S105 -- a mask, not a password
        return fields


# -- the answers, as RunComfy sends them (fields left UNSET are not sent; None is null) --------


class SubmitAnswer(msgspec.Struct, kw_only=True):
    """Answer to a submit: the new request and where to follow it."""

    request_id: str
    status_url: str
    result_url: str
    cancel_url: str


class StatusAnswer(msgspec.Struct, kw_only=True):
    """Answer to a status call; ``queue_position`` only while queued."""

    request_id: str
    status: str
    queue_position: int | msgspec.UnsetType = msgspec.UNSET


class Output(msgspec.Struct, kw_only=True):
    """The outputs of a completed request: one video, served by the emulator itself."""

    video: str


class ErrorDetail(msgspec.Struct, kw_only=True):
    """A failed request's error in its object form (RunComfy also sends a plain string)."""

    code: str
    message: str


class ResultAnswer(msgspec.Struct, kw_only=True):
    """Answer to a result call: only the status before the request is final, then all of it."""

    request_id: str
    status: str
    output: Output | msgspec.UnsetType | None = msgspec.UNSET
    created_at: str | msgspec.UnsetType = msgspec.UNSET
    finished_at: str | msgspec.UnsetType = msgspec.UNSET
    error: str | ErrorDetail | msgspec.UnsetType | None = msgspec.UNSET


class CancelAnswer(msgspec.Struct, kw_only=True):
    """Answer to a cancel call: ``cancelled`` or ``not_cancellable``."""

    request_id: str
    outcome: str


class ErrorAnswer(msgspec.Struct, kw_only=True):
    """An error answer, with RunComfy's numeric ``error_code``."""

    error_code: int
    message: str


class RequestItem(msgspec.Struct, kw_only=True):
    """One created request, as ``GET /_emulator/requests`` lists it.

    ``queue_s`` and ``run_s`` are this request's own (spread, scaled);
    ``finished_at`` is when it ends (or ended), unless cancelled; ``status_polls``
    the unix times of its latest status calls (at most 256).
    """

    request_id: str
    model: str
    input: dict[str, Any]
    status: str
    submitted_at: str
    queue_s: float = 0.0
    run_s: float = 0.0
    finished_at: str = ""
    status_polls: list[float] = msgspec.field(default_factory=list)
    output_gets: int = 0


class RequestList(msgspec.Struct, kw_only=True):
    """Every request created, how many submits created one, and what each input file answered."""

    submits: int
    items: list[RequestItem]
    input_requests: dict[str, int] = msgspec.field(default_factory=dict)


# -- what the emulator holds -----------------------------------------------------------------


class _UpstreamRequest(msgspec.Struct, kw_only=True):
    """One request RunComfy would hold; its status follows from the clock."""

    request_id: str
    model: str
    input: dict[str, Any]
    base_url: str
    submitted_mono: float
    submitted_at: float
    queue_s: float
    run_s: float
    fails: bool
    error_as_string: bool
    output_bytes: int = 0
    output_bytes_per_s: float = 0.0
    output_host: str = ""
    output_failures: int = 0
    output_gets: int = 0
    cancelled_mono: float | None = None
    cancelled_at: float | None = None
    polls: "array.array[float]" = msgspec.field(default_factory=lambda: array.array("d"))
    """Unix times of the latest status calls (a compact array: load tests make millions)."""

    def polled(self, at: float) -> None:
        """Note a status call at unix time `at`, keeping the latest ones."""
        if len(self.polls) >= MAX_POLLS_KEPT:
            del self.polls[: MAX_POLLS_KEPT // 2]
        self.polls.append(at)

    def status(self, now: float) -> str:
        """Return the status at monotonic time ``now``."""
        if self.cancelled_mono is not None:
            return "cancelled"
        elapsed = now - self.submitted_mono
        if elapsed < self.queue_s:
            return "in_queue"
        if elapsed < self.queue_s + self.run_s:
            return "in_progress"
        return "failed" if self.fails else "completed"

    def finished_at(self) -> float:
        """Return the wall-clock time it became final (or will)."""
        if self.cancelled_at is not None:
            return self.cancelled_at
        return self.submitted_at + self.queue_s + self.run_s


class Refused(Exception):  # noqa: N818 -- an answer, not a failure of the emulator
    """Ends a call with an error answer: an HTTP status and RunComfy's error_code."""

    def __init__(
        self, status: int, error_code: int, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(status, error_code, message)
        self.answer = Response(
            ErrorAnswer(error_code=error_code, message=message),
            status_code=status,
            headers=dict(headers or {}),
        )


class ConnectionDropped(Exception):  # noqa: N818 -- a fault injected on purpose, not a bug
    """Ends a call with its answer cut short: the client sent it and gets no complete answer."""


class _Emulator:
    """State and route handlers of one emulator app; single-threaded, so no locks."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)  # noqa: S311 -- fault injection, not crypto
        # Run times draw from their own generator, so a spread never shifts the faults.
        self._timing_rng = random.Random(config.seed)  # noqa: S311
        self._requests: dict[str, _UpstreamRequest] = {}
        # Requests possibly still queued, in submit order: queue positions count these.
        self._queued: dict[str, _UpstreamRequest] = {}
        # With a capacity: when each run holding a slot ends (a min-heap, monotonic
        # seconds), and the latest start given, so starts keep submit order.
        self._slots: list[float] = []
        self._last_start = 0.0
        self._submits = 0
        self._input_requests: Counter[str] = Counter()

    # -- RunComfy's API ------------------------------------------------------------

    async def submit(
        self, model: FromPath[str], body: RawBody, request: Request[Any, Any, Any]
    ) -> SubmitAnswer:
        """``POST /v1/models/{model}``: create a request."""
        # Litestar has read the whole body before this runs, as RunComfy has it once the
        # client is done sending: a client that gives up during the latency still creates one.
        await self._preamble(request)
        model = model.removeprefix("/")
        if model != MODEL:
            raise Refused(404, 404001, f"model {model!r} not found")
        fault = self._draw_fault(submit=True)
        if fault is not None and fault != "drop":
            raise self._fault_answer(fault)
        if self.config.funds_exhausted:
            raise Refused(402, 10001, "insufficient funds")
        record = self._create(str(request.base_url).rstrip("/"), model, _read_input(body))
        if fault == "drop":
            raise ConnectionDropped
        prefix = f"{record.base_url}/v1/requests/{record.request_id}"
        return SubmitAnswer(
            request_id=record.request_id,
            status_url=f"{prefix}/status",
            result_url=f"{prefix}/result",
            cancel_url=f"{prefix}/cancel",
        )

    async def status(
        self, request_id: FromPath[str], request: Request[Any, Any, Any]
    ) -> StatusAnswer:
        """``GET /v1/requests/{id}/status``: the current status and queue position."""
        record = await self._lookup(request_id, request)
        record.polled(time.time())
        now = time.monotonic()
        status = record.status(now)
        if status == "in_queue":
            position = self._queue_position(record, now)
            return StatusAnswer(request_id=request_id, status=status, queue_position=position)
        return StatusAnswer(request_id=request_id, status=status)

    async def result(
        self, request_id: FromPath[str], request: Request[Any, Any, Any]
    ) -> ResultAnswer:
        """``GET /v1/requests/{id}/result``: the outcome, or the status before it is final."""
        record = await self._lookup(request_id, request)
        status = record.status(time.monotonic())
        if status in {"in_queue", "in_progress"}:
            return ResultAnswer(request_id=request_id, status=status)
        answer = ResultAnswer(
            request_id=request_id,
            status=status,
            output=None,
            created_at=_rfc3339(record.submitted_at),
            finished_at=_rfc3339(record.finished_at()),
            error=None,
        )
        if status == "completed":
            base = record.base_url
            if record.output_host:
                parts = urllib.parse.urlsplit(base)
                port = f":{parts.port}" if parts.port else ""
                base = parts._replace(netloc=f"{record.output_host}{port}").geturl()
            answer.output = Output(video=f"{base}/outputs/{request_id}.mp4")
        elif status == "failed":
            # RunComfy's clients see both shapes; the emulator alternates them.
            message = "the model failed to render the video"
            answer.error = (
                message
                if record.error_as_string
                else ErrorDetail(code="generation_failed", message=message)
            )
        return answer

    async def cancel(
        self, request_id: FromPath[str], request: Request[Any, Any, Any]
    ) -> CancelAnswer:
        """``POST /v1/requests/{id}/cancel``: only a queued request can be cancelled."""
        record = await self._lookup(request_id, request)
        if record.status(time.monotonic()) != "in_queue":
            return CancelAnswer(request_id=request_id, outcome="not_cancellable")
        record.cancelled_mono = time.monotonic()
        record.cancelled_at = time.time()
        self._queued.pop(request_id, None)
        return CancelAnswer(request_id=request_id, outcome="cancelled")

    async def output(self, name: FromPath[str]) -> Response[bytes] | Stream:
        """``GET /outputs/{id}.mp4``: the video of a completed request, streamed.

        Tiny and fixed by default; with ``output_bytes`` that many bytes of
        ``output_chunks``, sent at ``output_bytes_per_s`` when set; the first
        ``output_failures`` GETs answer 503 (all three as they were when the request
        was created).
        """
        record = self._requests.get(name.removesuffix(".mp4")) if name.endswith(".mp4") else None
        if record is None or record.status(time.monotonic()) != "completed":
            raise Refused(404, 404001, "no such output")
        record.output_gets += 1
        if record.output_gets <= record.output_failures:
            raise Refused(503, 503001, "output temporarily unavailable")
        if not record.output_bytes:
            return Response(OUTPUT_BYTES, media_type="video/mp4")
        return Stream(
            _paced(output_chunks(record.output_bytes), record.output_bytes_per_s),
            media_type="video/mp4",
            headers={"Content-Length": str(record.output_bytes)},
        )

    # -- test and ops endpoints ------------------------------------------------------

    async def list_requests(self) -> RequestList:
        """``GET /_emulator/requests``: every request created, and how many submits did so."""
        now = time.monotonic()
        items = [
            RequestItem(
                request_id=record.request_id,
                model=record.model,
                input=record.input,
                status=record.status(now),
                submitted_at=_rfc3339(record.submitted_at),
                queue_s=record.queue_s,
                run_s=record.run_s,
                finished_at=""
                if record.cancelled_at is not None
                else _rfc3339(record.finished_at()),
                status_polls=list(record.polls),
                output_gets=record.output_gets,
            )
            for record in self._requests.values()
        ]
        return RequestList(
            submits=self._submits, items=items, input_requests=dict(self._input_requests)
        )

    async def update_config(self, body: RawBody) -> dict[str, Any]:
        """``POST /_emulator/config``: change some config fields; answers the new config."""
        try:
            changes = msgspec.json.decode(body, type=dict[str, Any])
            config = msgspec.convert(
                {**msgspec.structs.asdict(self.config), **changes}, EmulatorConfig
            )
        except ValueError as exc:  # msgspec.ValidationError and DecodeError are ValueErrors
            raise Refused(422, 422001, f"expected a JSON object of config fields: {exc}") from None
        self.config = config
        if "seed" in changes:
            self._rng.seed(config.seed)
            self._timing_rng.seed(config.seed)
        logger.info("emulator config changed: %s", config.redacted())
        return config.redacted()

    async def reset(self) -> RequestList:
        """``POST /_emulator/reset``: forget every request and restart the fault sequence."""
        self._requests.clear()
        self._queued.clear()
        self._slots.clear()
        self._last_start = 0.0
        self._submits = 0
        self._input_requests.clear()
        self._rng.seed(self.config.seed)
        self._timing_rng.seed(self.config.seed)
        return RequestList(submits=0, items=[])

    async def input_file(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: ARG002
        """``GET``/``HEAD /_emulator/inputs/<name>``: an input file as the query string asks."""
        # A mount's scope keeps the full path only in raw_path.
        raw_path = scope.get("raw_path") or b""
        name = urllib.parse.unquote(bytes(raw_path).decode("latin-1")).rsplit("/", 1)[-1]
        self._input_requests[name] += 1
        method = scope.get("method", "GET")
        query = dict(
            urllib.parse.parse_qsl(scope.get("query_string", b"").decode(), keep_blank_values=True)
        )
        try:
            answer = _InputAnswer.from_query(query)
        except ValueError as exc:
            await _send_head(send, 400, [(b"content-type", b"text/plain")], body=str(exc).encode())
            return
        if answer.delay_s > 0:
            await asyncio.sleep(answer.delay_s)
        if answer.redirect:
            await _send_head(send, 302, [(b"location", answer.redirect.encode())])
            return
        status = answer.head if method == "HEAD" and answer.head else answer.status
        if not 200 <= status < 300:
            wait = [(b"retry-after", answer.retry_after.encode())] if answer.retry_after else []
            await _send_head(send, status, wait)
            return
        headers = [(b"content-type", answer.type.encode())] if answer.type else []
        start, end = 0, answer.size - 1
        ranged = _RANGE.fullmatch(_header(scope, b"range"))
        if ranged and int(ranged[1]) < answer.size:
            status, start = 206, int(ranged[1])
            end = min(end, int(ranged[2])) if ranged[2] else end
            headers.append((b"content-range", f"bytes {start}-{end}/{answer.size}".encode()))
        headers.append((b"content-length", str(end + 1 - start).encode()))
        await _send_start(send, status, headers)
        if method == "HEAD":
            await _send_body(send, b"")
            return
        for offset in range(start, end + 1, _INPUT_CHUNK):
            chunk = _input_bytes(offset, min(end + 1, offset + _INPUT_CHUNK))
            await _send_body(send, chunk, more=True)
        await _send_body(send, b"")

    # -- helpers -----------------------------------------------------------------------

    async def _preamble(self, request: Request[Any, Any, Any]) -> None:
        """Apply the latency and the token check every ``/v1`` call shares."""
        if self.config.latency_ms > 0:
            await asyncio.sleep(self.config.latency_ms / 1000)
        if not self._authorized(request):
            raise Refused(401, 401001, "invalid or missing API token")

    async def _lookup(self, request_id: str, request: Request[Any, Any, Any]) -> _UpstreamRequest:
        """Run the shared preamble and faults, then find the request named in the path."""
        await self._preamble(request)
        if (fault := self._draw_fault(submit=False)) is not None:
            raise ConnectionDropped if fault == "drop" else self._fault_answer(fault)
        record = self._requests.get(request_id)
        if record is None:
            raise Refused(404, 404001, "request not found")
        return record

    def _authorized(self, request: Request[Any, Any, Any]) -> bool:
        token = self.config.token
        if token is None:
            return True  # without reading the headers: load tests poll thousands a second
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            presented.strip().encode(), token.encode()
        )

    def _chance(self, rate: float) -> bool:
        # No draw for a zero rate, so enabling one fault does not shift the others.
        return rate > 0.0 and self._rng.random() < rate

    def _draw_fault(self, *, submit: bool) -> _Fault | None:
        config = self.config
        if config.faults_on_submit_only and not submit:
            return None
        if self._chance(config.drop_rate):
            return "drop"
        if self._chance(config.rate_429):
            return "429"
        if self._chance(config.error_5xx_rate):
            return "5xx"
        if self._chance(config.http200_error_rate):
            return "http200"
        return None

    def _fault_answer(self, fault: _Fault) -> Refused:
        if fault == "429":
            # RFC 9110 delay-seconds are whole seconds: round up, never shorten the wait.
            retry_after = str(math.ceil(self.config.retry_after_s))
            return Refused(429, 429001, "rate limited", headers={"Retry-After": retry_after})
        if fault == "5xx":
            return Refused(self._rng.choice((500, 502, 503)), 500001, "internal server error")
        return Refused(200, 500001, "internal server error (answered with HTTP 200)")

    def _create(self, base_url: str, model: str, body: dict[str, Any]) -> _UpstreamRequest:
        config = self.config
        # Timing is fixed at submit time, so a config change affects only new requests.
        queue_s, run_s = self._times(body)
        submitted = time.monotonic()
        if config.capacity > 0:
            queue_s = self._take_slot(submitted, queue_s, run_s, config.capacity)
        record = _UpstreamRequest(
            request_id=str(uuid.uuid4()),
            model=model,
            input=body,
            base_url=base_url,
            submitted_mono=submitted,
            submitted_at=time.time(),
            queue_s=queue_s,
            run_s=run_s,
            fails=self._chance(config.fail_rate),
            error_as_string=self._rng.random() < 0.5,
            output_bytes=config.output_bytes,
            output_bytes_per_s=config.output_bytes_per_s,
            output_host=config.output_host,
            output_failures=config.output_failures,
        )
        self._submits += 1
        self._requests[record.request_id] = record
        if record.queue_s > 0:
            self._queued[record.request_id] = record
        while len(self._requests) > MAX_REQUESTS:
            oldest = next(iter(self._requests))
            del self._requests[oldest]
            self._queued.pop(oldest, None)
        return record

    def _take_slot(self, submitted: float, queue_s: float, run_s: float, capacity: int) -> float:
        """The whole queue time of a request submitted now, when `capacity` runs fit at once.

        It starts `queue_s` after its submit, or later: when the earliest run holding a
        slot ends if every slot is taken then, and never before the start of a request
        submitted earlier (first come, first served).
        """
        start = max(submitted + queue_s, self._last_start)
        slots = self._slots
        while slots and slots[0] <= start:
            heapq.heappop(slots)  # ended by then: its slot is free
        while len(slots) >= capacity:
            start = max(start, heapq.heappop(slots))
        heapq.heappush(slots, start + run_s)
        self._last_start = start
        return start - submitted

    def _times(self, body: dict[str, Any]) -> tuple[float, float]:
        """A new request's queue and run seconds: scaled by its input, spread, over the speed."""
        config = self.config
        run_s = config.run_s
        if config.input_scaling:
            run_s *= RESOLUTION_SCALE.get(str(body.get("resolution", "720p")), 1.0)
            run_s *= FRAMES_SCALE.get(_int_or_none(body.get("num_frames", 129)) or 0, 1.0)
            run_s *= PRO_MODE_SCALE if body.get("pro_mode") is True else 1.0
        times = []
        for base_s in (config.queue_s, run_s):
            drawn_s = base_s
            if config.spread > 0 and base_s > 0:
                drawn_s *= self._timing_rng.uniform(1 - config.spread, 1 + config.spread)
            times.append(drawn_s / config.speed)
        return times[0], times[1]

    def _queue_position(self, target: _UpstreamRequest, now: float) -> int:
        """Count earlier requests still queued, forgetting those that have left the queue."""
        position = 0
        left: list[str] = []
        for request_id, record in self._queued.items():
            if record is target:
                break
            if record.status(now) == "in_queue":
                position += 1
            else:
                left.append(request_id)
        for request_id in left:
            del self._queued[request_id]
        return position


def _int_or_none(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _read_input(raw: bytes) -> dict[str, Any]:
    """Decode a submit body with RunComfy's minimal checks: prompt and video_url strings."""
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        body = None
    if not isinstance(body, dict):
        raise Refused(422, 422001, "body must be a JSON object")
    for name in ("prompt", "video_url"):
        if not isinstance(body.get(name), str):
            raise Refused(422, 422001, f"{name} is required and must be a string")
    return body


class _InputAnswer(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """How ``/_emulator/inputs/<name>`` answers, from its query string."""

    type: str = "video/mp4"
    size: Annotated[int, msgspec.Meta(ge=0)] = len(OUTPUT_BYTES)
    status: Annotated[int, msgspec.Meta(ge=200, le=599)] = 200
    head: Annotated[int, msgspec.Meta(ge=200, le=599)] | None = None
    redirect: str = ""
    retry_after: str = ""
    delay_s: Annotated[float, msgspec.Meta(ge=0, le=600)] = 0.0

    @classmethod
    def from_query(cls, query: dict[str, str]) -> Self:
        """Read the query string's parameters; ValueError names a bad one."""
        return msgspec.convert(query, cls, strict=False)


def output_chunks(size: int) -> Iterator[bytes]:
    """An output video of `size` bytes, 64 KiB at a time: the MP4 header, then a pattern.

    Deterministic and never held whole: each 64 KiB block is its number (8 bytes,
    big-endian) then the same pseudo-random bytes, so a byte copied to the wrong place or
    a block copied twice changes the checksum; made at the cost of a copy of each block.
    """
    for number, start in enumerate(range(0, size, _INPUT_CHUNK)):
        block = number.to_bytes(8, "big") + _OUTPUT_BLOCK[8:]
        if number == 0:
            block = OUTPUT_BYTES + block[len(OUTPUT_BYTES) :]
        yield block[: size - start]


async def _paced(chunks: Iterator[bytes], bytes_per_s: float) -> AsyncIterator[bytes]:
    """`chunks` as an async stream, sent no faster than `bytes_per_s` (0: no limit)."""
    started, sent = time.monotonic(), 0
    for part in chunks:
        yield part
        sent += len(part)
        if bytes_per_s > 0:
            ahead = sent / bytes_per_s - (time.monotonic() - started)
            if ahead > 0:
                await asyncio.sleep(ahead)


def _input_bytes(start: int, stop: int) -> bytes:
    """Bytes ``start`` to ``stop`` of an input file: the MP4 header, then zeros."""
    head = OUTPUT_BYTES[start:stop]
    return head + bytes(stop - start - len(head))


def _header(scope: Scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return bytes(value).decode("latin-1").strip()
    return ""


async def _send_head(
    send: Send, status: int, headers: list[tuple[bytes, bytes]], body: bytes = b""
) -> None:
    """Answer with `status`, `headers` and a short body in one go."""
    await _send_start(send, status, [*headers, (b"content-length", str(len(body)).encode())])
    await _send_body(send, body)


async def _send_body(send: Send, body: bytes, *, more: bool = False) -> None:
    await send(HTTPResponseBodyEvent(type="http.response.body", body=body, more_body=more))


async def _send_start(send: Send, status: int, headers: list[tuple[bytes, bytes]]) -> None:
    await send(HTTPResponseStartEvent(type="http.response.start", status=status, headers=headers))


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


# -- a dropped connection ----------------------------------------------------------------------
#
# An ASGI server answers 500 for an app that fails before it starts its answer, and closes
# the connection for one that fails after: so a drop starts an answer whose headers promise
# a body, then fails. The client has sent its request and gets an answer cut short, which
# every HTTP client reports as a transport error (httpx: RemoteProtocolError).


class _CutShort(Response[bytes]):
    """The answer to a dropped call: its status line and headers, then nothing."""

    def to_asgi_response(
        self,
        app: Litestar | None,  # noqa: ARG002 -- Litestar's signature
        request: Request[Any, Any, Any],  # noqa: ARG002
        **_: object,
    ) -> ASGIResponse:
        """Headers that promise a small JSON body, which never comes."""
        return _StartThenFail(body=b"{}", status_code=200, media_type=MediaType.JSON)


class _StartThenFail(ASGIResponse):
    async def send_body(self, send: Send, receive: Receive) -> None:  # noqa: ARG002
        """Send no body: fail, after the status line and headers went out."""
        raise ConnectionDropped


def _cut_short(_: Request[Any, Any, Any], __: ConnectionDropped) -> Response[bytes]:
    return _CutShort(b"")


def _refused(_: Request[Any, Any, Any], refused: Refused) -> Response[ErrorAnswer]:
    return refused.answer


class _DropsAreNotErrors(logging.Filter):
    """Keeps uvicorn from logging an injected drop as a failure of the app, with a traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        while exc is not None:
            if isinstance(exc, ConnectionDropped):
                return False
            exc = exc.__cause__ or exc.__context__
        return True


_DROPS_ARE_NOT_ERRORS: Final = _DropsAreNotErrors()


# -- the app and serving it --------------------------------------------------------------------


def create_emulator_app(config: EmulatorConfig) -> Litestar:
    """Build the emulator's Litestar application for ``config``."""
    emulator = _Emulator(config)
    return Litestar(
        route_handlers=[
            post("/v1/models/{model:path}", status_code=200)(emulator.submit),
            get("/v1/requests/{request_id:str}/status")(emulator.status),
            get("/v1/requests/{request_id:str}/result")(emulator.result),
            post("/v1/requests/{request_id:str}/cancel", status_code=200)(emulator.cancel),
            get("/outputs/{name:str}")(emulator.output),
            get("/_emulator/requests")(emulator.list_requests),
            post("/_emulator/config", status_code=200)(emulator.update_config),
            post("/_emulator/reset", status_code=200)(emulator.reset),
            asgi("/_emulator/inputs", is_mount=True, copy_scope=False)(emulator.input_file),
        ],
        exception_handlers={Refused: _refused, ConnectionDropped: _cut_short},
        openapi_config=None,
        logging_config=None,  # the process configures logging
        debug=False,
    )


async def start_emulator(config: EmulatorConfig, host: str = "127.0.0.1", port: int = 0) -> Served:
    """Serve the emulator in the running loop until ``stop()`` (port 0: any free one)."""
    logging.getLogger("uvicorn.error").addFilter(_DROPS_ARE_NOT_ERRORS)
    return await serve(
        create_emulator_app(config),
        listen(host, port),
        keep_alive_s=_KEEP_ALIVE_S,
        shutdown_s=_SHUTDOWN_S,
    )


def run_emulator(config: EmulatorConfig, host: str, port: int) -> None:
    """Serve the emulator until SIGINT or SIGTERM; blocks, logging one line with the URL."""
    with asyncio.Runner(loop_factory=_fast_loop_factory()) as runner:
        runner.run(_serve_until_signalled(config, host, port))


async def _serve_until_signalled(config: EmulatorConfig, host: str, port: int) -> None:
    served = await start_emulator(config, host, port)
    freeze_what_startup_made()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    logger.info("RunComfy emulator listening on %s (config %s)", served.url, config.redacted())
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await served.stop()
        logger.info("RunComfy emulator stopped")


def _fast_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Use uvloop when it is installed (it comes with uvicorn[standard]): load tests need speed."""
    try:
        import uvloop  # noqa: PLC0415 -- optional dependency, looked up only when serving
    except ImportError:
        return None
    return uvloop.new_event_loop
