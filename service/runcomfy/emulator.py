"""Built-in stand-in for RunComfy's Model API (DESIGN §1), with fault injection.

Part of the product, not a test helper: ``runcomfy-gateway emulator`` and ``dev``
serve it for local development, callers' CI and load tests. It answers like
RunComfy: submit, status, result and cancel for ``tencent/hunyuan/video-to-video``,
with a time-driven life cycle (``in_queue`` for ``queue_s``, ``in_progress`` for
``run_s``, then ``completed`` or ``failed``; both 0 completes a request at once),
and serves each output video itself under ``/outputs/<id>.mp4``.

Faults are independent probabilities per ``/v1`` call, drawn in this order and
the first that fires decides: ``drop_rate`` (a submit creates the request and
then closes the connection unanswered: the unknown-outcome case), ``rate_429``,
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
===========================================  =====================================  =======

Test and ops endpoints, not part of RunComfy and unauthenticated (the emulator
is for local and CI use): ``GET /_emulator/requests`` lists every created
request and counts submits, ``POST /_emulator/config`` changes any config
fields at run time, ``POST /_emulator/reset`` forgets all requests.
"""

import asyncio
import functools
import hmac
import logging
import math
import os
import random
import signal
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Final, Literal, Self, TypeAlias

import msgspec
from aiohttp import web

__all__ = [
    "MODEL",
    "EmulatorConfig",
    "create_emulator_app",
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
_SHUTDOWN_S: Final = 2.0

_Fault: TypeAlias = Literal["drop", "429", "5xx", "http200"]
_Handler: TypeAlias = Callable[[web.Request], Awaitable[web.StreamResponse]]
_RATE_FIELDS: Final = ("fail_rate", "error_5xx_rate", "rate_429", "http200_error_rate", "drop_rate")
_DURATION_FIELDS: Final = ("queue_s", "run_s", "retry_after_s", "latency_ms")
_ENCODER: Final = msgspec.json.Encoder()


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

    def __post_init__(self) -> None:
        for name in _RATE_FIELDS:
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1")
        for name in _DURATION_FIELDS:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{name} must be a finite number >= 0")
        if self.token == "":
            self.token = None

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
    cancelled_mono: float | None = None
    cancelled_at: float | None = None

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


class _Emulator:
    """State and handlers of one emulator app; single-threaded, so no locks."""

    def __init__(self, config: EmulatorConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)  # noqa: S311 -- fault injection, not crypto
        self._requests: dict[str, _UpstreamRequest] = {}
        # Requests possibly still queued, in submit order: queue positions count these.
        self._queued: dict[str, _UpstreamRequest] = {}
        self._submits = 0

    # -- RunComfy's API ------------------------------------------------------------

    async def submit(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/models/{model}``: create a request."""
        # Take the whole body before the latency, as RunComfy has it once the client
        # is done sending: a client that gives up while waiting must still create one.
        raw = await request.read()
        await self._preamble(request)
        model = request.match_info["model"]
        if model != MODEL:
            return _error(404, 404001, f"model {model!r} not found")
        fault = self._draw_fault(submit=True)
        if fault is not None and fault != "drop":
            return self._fault_answer(fault)
        if self.config.funds_exhausted:
            return _error(402, 10001, "insufficient funds")
        record = self._create(request, model, _read_input(raw))
        if fault == "drop":
            return _drop(request)
        prefix = f"{record.base_url}/v1/requests/{record.request_id}"
        return _json(
            200,
            {
                "request_id": record.request_id,
                "status_url": f"{prefix}/status",
                "result_url": f"{prefix}/result",
                "cancel_url": f"{prefix}/cancel",
            },
        )

    async def status(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/requests/{id}/status``: the current status and queue position."""
        record = await self._lookup(request)
        now = time.monotonic()
        status = record.status(now)
        answer: dict[str, Any] = {"request_id": record.request_id, "status": status}
        if status == "in_queue":
            answer["queue_position"] = self._queue_position(record, now)
        return _json(200, answer)

    async def result(self, request: web.Request) -> web.StreamResponse:
        """``GET /v1/requests/{id}/result``: the outcome, or the status before it is final."""
        record = await self._lookup(request)
        status = record.status(time.monotonic())
        answer: dict[str, Any] = {"request_id": record.request_id, "status": status}
        if status in {"in_queue", "in_progress"}:
            return _json(200, answer)
        answer["output"] = None
        answer["created_at"] = _rfc3339(record.submitted_at)
        answer["finished_at"] = _rfc3339(record.finished_at())
        answer["error"] = None
        if status == "completed":
            answer["output"] = {"video": f"{record.base_url}/outputs/{record.request_id}.mp4"}
        elif status == "failed":
            # RunComfy's clients see both shapes; the emulator alternates them.
            message = "the model failed to render the video"
            answer["error"] = (
                message
                if record.error_as_string
                else {"code": "generation_failed", "message": message}
            )
        return _json(200, answer)

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        """``POST /v1/requests/{id}/cancel``: only a queued request can be cancelled."""
        record = await self._lookup(request)
        if record.status(time.monotonic()) != "in_queue":
            return _json(200, {"request_id": record.request_id, "outcome": "not_cancellable"})
        record.cancelled_mono = time.monotonic()
        record.cancelled_at = time.time()
        self._queued.pop(record.request_id, None)
        return _json(200, {"request_id": record.request_id, "outcome": "cancelled"})

    async def output(self, request: web.Request) -> web.StreamResponse:
        """``GET /outputs/{id}.mp4``: the (tiny, fixed) video of a completed request."""
        name = request.match_info["name"]
        record = self._requests.get(name.removesuffix(".mp4")) if name.endswith(".mp4") else None
        if record is None or record.status(time.monotonic()) != "completed":
            return _error(404, 404001, "no such output")
        return web.Response(body=OUTPUT_BYTES, content_type="video/mp4")

    # -- test and ops endpoints ------------------------------------------------------

    async def list_requests(self, _request: web.Request) -> web.StreamResponse:
        """``GET /_emulator/requests``: every request created, and how many submits did so."""
        now = time.monotonic()
        items = [
            {
                "request_id": record.request_id,
                "model": record.model,
                "input": record.input,
                "status": record.status(now),
                "submitted_at": _rfc3339(record.submitted_at),
            }
            for record in self._requests.values()
        ]
        return _json(200, {"submits": self._submits, "items": items})

    async def update_config(self, request: web.Request) -> web.StreamResponse:
        """``POST /_emulator/config``: change some config fields; answers the new config."""
        try:
            changes = msgspec.json.decode(await request.read(), type=dict[str, Any])
            config = msgspec.convert(
                {**msgspec.structs.asdict(self.config), **changes}, EmulatorConfig
            )
        except ValueError as exc:  # msgspec.ValidationError and DecodeError are ValueErrors
            return _error(422, 422001, f"expected a JSON object of config fields: {exc}")
        self.config = config
        if "seed" in changes:
            self._rng.seed(config.seed)
        logger.info("emulator config changed: %s", config.redacted())
        return _json(200, config.redacted())

    async def reset(self, _request: web.Request) -> web.StreamResponse:
        """``POST /_emulator/reset``: forget every request and restart the fault sequence."""
        self._requests.clear()
        self._queued.clear()
        self._submits = 0
        self._rng.seed(self.config.seed)
        return _json(200, {"submits": 0, "items": []})

    # -- helpers -----------------------------------------------------------------------

    async def _preamble(self, request: web.Request) -> None:
        """Apply the latency and the token check every ``/v1`` call shares."""
        if self.config.latency_ms > 0:
            await asyncio.sleep(self.config.latency_ms / 1000)
        if not self._authorized(request):
            raise _Answered(_error(401, 401001, "invalid or missing API token"))

    async def _lookup(self, request: web.Request) -> _UpstreamRequest:
        """Run the shared preamble and faults, then find the request named in the path."""
        await self._preamble(request)
        if (fault := self._draw_fault(submit=False)) is not None:
            raise _Answered(_drop(request) if fault == "drop" else self._fault_answer(fault))
        record = self._requests.get(request.match_info["request_id"])
        if record is None:
            raise _Answered(_error(404, 404001, "request not found"))
        return record

    def _authorized(self, request: web.Request) -> bool:
        token = self.config.token
        if token is None:
            return True
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

    def _fault_answer(self, fault: _Fault) -> web.StreamResponse:
        if fault == "429":
            # RFC 9110 delay-seconds are whole seconds: round up, never shorten the wait.
            retry_after = str(math.ceil(self.config.retry_after_s))
            return _error(429, 429001, "rate limited", headers={"Retry-After": retry_after})
        if fault == "5xx":
            return _error(self._rng.choice((500, 502, 503)), 500001, "internal server error")
        return _error(200, 500001, "internal server error (answered with HTTP 200)")

    def _create(self, request: web.Request, model: str, body: dict[str, Any]) -> _UpstreamRequest:
        config = self.config
        # Timing is fixed at submit time, so a config change affects only new requests.
        record = _UpstreamRequest(
            request_id=str(uuid.uuid4()),
            model=model,
            input=body,
            base_url=f"{request.scheme}://{request.host}",
            submitted_mono=time.monotonic(),
            submitted_at=time.time(),
            queue_s=config.queue_s,
            run_s=config.run_s,
            fails=self._chance(config.fail_rate),
            error_as_string=self._rng.random() < 0.5,
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


class _Answered(Exception):  # noqa: N818 -- not an error: the answer is already decided
    """Raised by a helper that has settled the answer (an error, a fault, a drop)."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__(response.status)
        self.response = response


def _answering(handler: _Handler) -> _Handler:
    """Wrap a handler so helpers deep inside it can settle the answer by raising."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except _Answered as answered:
            return answered.response

    return wrapper


def _read_input(raw: bytes) -> dict[str, Any]:
    """Decode a submit body with RunComfy's minimal checks: prompt and video_url strings."""
    try:
        body = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        body = None
    if not isinstance(body, dict):
        raise _Answered(_error(422, 422001, "body must be a JSON object"))
    for name in ("prompt", "video_url"):
        if not isinstance(body.get(name), str):
            raise _Answered(_error(422, 422001, f"{name} is required and must be a string"))
    return body


def _json(status: int, body: object, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        body=_ENCODER.encode(body), status=status, content_type="application/json", headers=headers
    )


def _error(
    status: int, error_code: int, message: str, headers: Mapping[str, str] | None = None
) -> web.Response:
    return _json(status, {"error_code": error_code, "message": message}, headers)


def _drop(request: web.Request) -> web.StreamResponse:
    """Close the connection without answering; aiohttp then skips writing the response."""
    if (transport := request.transport) is not None:
        transport.abort()
    return web.Response(status=204)


def _rfc3339(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


EMULATOR_KEY: Final = web.AppKey("emulator", _Emulator)


def create_emulator_app(config: EmulatorConfig) -> web.Application:
    """Build the emulator's aiohttp application for ``config``."""
    emulator = _Emulator(config)
    app = web.Application()
    app[EMULATOR_KEY] = emulator
    app.add_routes(
        [
            web.post("/v1/models/{model:.+}", _answering(emulator.submit)),
            web.get("/v1/requests/{request_id}/status", _answering(emulator.status)),
            web.get("/v1/requests/{request_id}/result", _answering(emulator.result)),
            web.post("/v1/requests/{request_id}/cancel", _answering(emulator.cancel)),
            web.get("/outputs/{name}", emulator.output),
            web.get("/_emulator/requests", emulator.list_requests),
            web.post("/_emulator/config", emulator.update_config),
            web.post("/_emulator/reset", emulator.reset),
        ]
    )
    return app


async def start_emulator(
    config: EmulatorConfig, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve the emulator in the running loop; returns the runner and base URL (port 0: any)."""
    # Access logs would cost more than the answers at benchmark rates.
    runner = web.AppRunner(
        create_emulator_app(config),
        access_log=None,
        handle_signals=False,
        shutdown_timeout=_SHUTDOWN_S,
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    return runner, f"http://{_reachable_host(host)}:{bound_port}"


def _reachable_host(host: str) -> str:
    """Turn a listen address into one a local client can connect to."""
    if host in {"", "0.0.0.0"}:  # noqa: S104 -- recognising, not binding, the wildcard
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def run_emulator(config: EmulatorConfig, host: str, port: int) -> None:
    """Serve the emulator until SIGINT or SIGTERM; blocks, logging one line with the URL."""
    with asyncio.Runner(loop_factory=_fast_loop_factory()) as runner:
        runner.run(_serve_until_signalled(config, host, port))


async def _serve_until_signalled(config: EmulatorConfig, host: str, port: int) -> None:
    app_runner, url = await start_emulator(config, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    logger.info("RunComfy emulator listening on %s (config %s)", url, config.redacted())
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        await app_runner.cleanup()
        logger.info("RunComfy emulator stopped")


def _fast_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """Use uvloop when it is installed (it comes with uvicorn[standard]): load tests need speed."""
    try:
        import uvloop  # noqa: PLC0415 -- optional dependency, looked up only when serving
    except ImportError:
        return None
    return uvloop.new_event_loop
