"""Client for RunComfy's Model API on aiohttp: one HTTP attempt per call, answers decoded.

Every failure is one of three cases, because the caller's next move differs::

    UpstreamError
     ├── UpstreamRejected        RunComfy answered, and the answer is an error (an HTTP
     │                             error status, or HTTP 200 with ``error_code`` and no
     │                             ``request_id``). Definite: no request was created.
     │                             ``kind`` says why, ``retryable`` whether backoff helps,
     │                             ``retry_after_s`` what RunComfy asked for.
     ├── UpstreamUnreachable     no connection was established (refused, DNS, connect
     │                             timeout, no free pooled connection in time). Nothing
     │                             was sent, so even a submit may be retried.
     └── UpstreamOutcomeUnknown  the request was (or may have been) sent and no complete
                                   answer came (read timeout, reset, disconnect, garbage
                                   body). For a submit, a paid request may exist upstream.

Retries, backoff and the unknown-outcome policy belong to the caller: the worker
reschedules through Redis. aiohttp itself re-sends a GET once when a pooled
keep-alive connection turns out to be closed by the server; that is safe for
the idempotent status and result reads, and it never does so for POSTs.
No message or repr of these exceptions contains the Bearer token.
"""

import email.utils
import math
import time
from collections.abc import Callable
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Final, Literal, TypeAlias, TypeVar
from urllib.parse import quote

import aiohttp
import msgspec
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from yarl import URL

from service.runcomfy.wire import (
    CANCEL_DECODER,
    ERROR_DECODER,
    RESULT_DECODER,
    STATUS_DECODER,
    SUBMIT_DECODER,
    CancelAnswer,
    ErrorBody,
    ResultAnswer,
    StatusAnswer,
    SubmitAnswer,
)

__all__ = [
    "RejectionKind",
    "RunComfyClient",
    "UpstreamError",
    "UpstreamOutcomeUnknown",
    "UpstreamRejected",
    "UpstreamUnreachable",
    "create_upstream_session",
]

USER_AGENT: Final = "runcomfy-gateway/0.1"
_MESSAGE_LIMIT: Final = 500
_EXCERPT_WINDOW: Final = 64 * 1024
_INSUFFICIENT_FUNDS_CODE: Final = "10001"
_REDACTED: Final = "***"

RejectionKind: TypeAlias = Literal[
    "rate_limited", "insufficient_funds", "server", "auth", "not_found", "invalid", "other"
]
_KIND_BY_STATUS: Final[dict[int, RejectionKind]] = {
    429: "rate_limited",
    402: "insufficient_funds",
    401: "auth",
    403: "auth",
    404: "not_found",
    400: "invalid",
    422: "invalid",
}
_RETRYABLE_KINDS: Final = frozenset({"rate_limited", "insufficient_funds", "server"})
# 408 Request Timeout and 425 Too Early ask the client to try again later.
_RETRYABLE_STATUSES: Final = frozenset({408, 425})

CallObserver: TypeAlias = Callable[[str, float, str | None], None]
"""Told of every call: its name (submit, status, result, cancel), seconds, error kind or None."""

_Answer = TypeVar("_Answer", SubmitAnswer, StatusAnswer, ResultAnswer, CancelAnswer)


class UpstreamError(Exception):
    """Base of every error the RunComfy client raises."""


class UpstreamRejected(UpstreamError):  # noqa: N818 -- names the outcome, like httpx's
    """RunComfy gave a definite answer that is an error; no request was created by it."""

    def __init__(
        self,
        *,
        http_status: int,
        kind: RejectionKind,
        error_code: str | None,
        message: str,
        retry_after_s: float | None = None,
    ) -> None:
        self.http_status = http_status
        self.kind: RejectionKind = kind
        self.error_code = error_code
        self.message = message
        self.retry_after_s = retry_after_s
        code = "" if error_code is None else f", error_code {error_code}"
        super().__init__(f"RunComfy answered HTTP {http_status} ({kind}{code}): {message}")

    @property
    def retryable(self) -> bool:
        """Whether trying the same call again later (with backoff) can succeed."""
        return self.kind in _RETRYABLE_KINDS or self.http_status in _RETRYABLE_STATUSES

    def __repr__(self) -> str:
        return (
            f"UpstreamRejected(http_status={self.http_status}, kind={self.kind!r}, "
            f"error_code={self.error_code!r}, retry_after_s={self.retry_after_s!r}, "
            f"message={self.message!r})"
        )


class UpstreamUnreachable(UpstreamError):  # noqa: N818 -- names the outcome, like httpx's
    """No connection to RunComfy could be established, so nothing was sent."""


class UpstreamOutcomeUnknown(UpstreamError):  # noqa: N818 -- names the outcome, like httpx's
    """The request was (or may have been) sent and no complete answer came back."""


class _Phase:
    """Per-request note of whether aiohttp got as far as a connection.

    A whole-call timeout that expires while connecting surfaces as a plain
    TimeoutError, the same as one that expires while waiting for the answer;
    only this note tells them apart. ``tracked`` stays False when the session
    was not made by ``create_upstream_session``: then we cannot tell, and
    assume the worse (sent).
    """

    __slots__ = ("connected", "tracked")

    def __init__(self) -> None:
        self.tracked = False
        self.connected = False


# aiohttp connects in the calling task, so the connector finds the caller's note
# here. (A TraceConfig could do the same but costs ~20% of poll throughput.)
_CURRENT_PHASE: ContextVar[_Phase | None] = ContextVar("runcomfy_call_phase", default=None)


class _PhaseNotingConnector(aiohttp.TCPConnector):
    """A TCPConnector that notes on the current call's ``_Phase`` once it has a connection."""

    async def connect(
        self,
        req: aiohttp.ClientRequest,
        traces: list[Trace],
        timeout: aiohttp.ClientTimeout,  # noqa: ASYNC109 -- aiohttp's signature, overridden
    ) -> Connection:
        """Get a pooled or new connection, noting the moment one is in hand."""
        phase = _CURRENT_PHASE.get()
        if phase is not None:
            phase.tracked = True
        connection = await super().connect(req, traces, timeout)
        if phase is not None:
            phase.connected = True
        return connection


def create_upstream_session(max_connections: int = 100) -> aiohttp.ClientSession:
    """Create the pooled aiohttp session the RunComfy client runs on; call inside a running loop."""
    connector = _PhaseNotingConnector(
        limit=max_connections,
        # RunComfy sits behind load balancers whose addresses change; re-resolve every minute.
        ttl_dns_cache=60,
        # Below the usual 60 s idle timeout of load balancers, so we rarely reuse a
        # connection the far end is closing (a POST on one would end as unknown outcome).
        keepalive_timeout=15.0,
    )
    return aiohttp.ClientSession(
        connector=connector,
        # Never pick up proxies or .netrc credentials from the pod's environment.
        trust_env=False,
        # An API answer has no business setting state for later calls.
        cookie_jar=aiohttp.DummyCookieJar(),
        raise_for_status=False,
    )


class RunComfyClient:
    """Calls RunComfy's Model API; each method makes one HTTP attempt and decodes the answer."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 30.0,
        on_call: CallObserver | None = None,
    ) -> None:
        url = URL(base_url)
        if url.scheme not in {"http", "https"} or not url.host:
            raise ValueError("base_url must be an absolute http(s) URL")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._session = session
        self._base_url = str(url).rstrip("/")
        self._token = token
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, connect=min(timeout_s, 10.0))
        self._headers = {
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
            "User-Agent": USER_AGENT,
        }
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        self._on_call = on_call

    def __repr__(self) -> str:
        return f"RunComfyClient(base_url={self._base_url!r})"

    async def submit(self, model: str, payload: bytes) -> SubmitAnswer:
        """Create a request for ``model`` with the JSON-encoded ``payload`` as its input."""
        if not model or model.startswith("/"):
            raise ValueError("model must be a relative model path")
        path = f"/v1/models/{quote(model, safe='/')}"
        return await self._call(
            "submit", "POST", path, SUBMIT_DECODER, payload, require_request_id=True
        )

    async def status(self, request_id: str) -> StatusAnswer:
        """Fetch the status (and queue position) of a request."""
        path = self._request_path(request_id, "status")
        return await self._call("status", "GET", path, STATUS_DECODER)

    async def result(self, request_id: str) -> ResultAnswer:
        """Fetch the result of a request; before it is final only the status is set."""
        path = self._request_path(request_id, "result")
        return await self._call("result", "GET", path, RESULT_DECODER)

    async def cancel(self, request_id: str) -> CancelAnswer:
        """Ask RunComfy to cancel a request; only queued requests can be cancelled."""
        path = self._request_path(request_id, "cancel")
        return await self._call("cancel", "POST", path, CANCEL_DECODER)

    @staticmethod
    def _request_path(request_id: str, action: str) -> str:
        if not request_id:
            raise ValueError("request_id must not be empty")
        return f"/v1/requests/{quote(request_id, safe='')}/{action}"

    async def _call(
        self,
        name: str,
        method: str,
        path: str,
        decoder: msgspec.json.Decoder[_Answer],
        payload: bytes | None = None,
        *,
        require_request_id: bool = False,
    ) -> _Answer:
        """One call, timed and classified for `on_call` (metrics) whatever its outcome."""
        started = time.perf_counter()
        error: str | None = None
        try:
            return await self._call_once(
                method, path, decoder, payload, require_request_id=require_request_id
            )
        except UpstreamRejected as exc:
            error = exc.kind
            raise
        except UpstreamUnreachable:
            error = "unreachable"
            raise
        except UpstreamOutcomeUnknown:
            error = "unknown"
            raise
        finally:
            if self._on_call is not None:
                self._on_call(name, time.perf_counter() - started, error)

    async def _call_once(
        self,
        method: str,
        path: str,
        decoder: msgspec.json.Decoder[_Answer],
        payload: bytes | None = None,
        *,
        require_request_id: bool = False,
    ) -> _Answer:
        status, body, retry_after = await self._exchange(method, path, payload)
        if not 200 <= status < 300:
            raise self._rejection(status, body, retry_after)
        try:
            answer = decoder.decode(body)
        except msgspec.DecodeError:
            # Maybe an error body whose fields clash with the answer's types.
            if (rejection := self._http200_rejection(status, body, retry_after)) is not None:
                raise rejection from None
            raise UpstreamOutcomeUnknown(
                f"{method} {path}: HTTP {status} with an undecodable body: {self._excerpt(body)!r}"
            ) from None
        if answer.request_id is None:
            if (rejection := self._http200_rejection(status, body, retry_after)) is not None:
                raise rejection
            if require_request_id:
                # A definite answer, yet it names no request we could ever follow.
                raise UpstreamRejected(
                    http_status=status,
                    kind="other",
                    error_code=None,
                    message=f"HTTP {status} answer without request_id: {self._excerpt(body)}",
                )
        return answer

    async def _exchange(
        self, method: str, path: str, payload: bytes | None
    ) -> tuple[int, bytes, str | None]:
        phase = _Phase()
        reset_token = _CURRENT_PHASE.set(phase)
        try:
            async with self._session.request(
                method,
                # Both halves are already percent-encoded (`str(URL)`, `quote`): saying so
                # spares yarl re-encoding every poll's URL, a few us each at 5,000 polls/s.
                URL(self._base_url + path, encoded=True),
                data=payload,
                headers=self._headers if payload is None else self._json_headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                body = await response.read()
                return response.status, body, response.headers.get("Retry-After")
        except (
            aiohttp.ClientConnectorError,
            aiohttp.ConnectionTimeoutError,
            aiohttp.InvalidURL,  # refused before any connection was tried
        ) as exc:
            raise UpstreamUnreachable(self._failure(method, path, "cannot connect", exc)) from exc
        except TimeoutError as exc:
            if phase.tracked and not phase.connected:
                raise UpstreamUnreachable(
                    self._failure(method, path, "timed out connecting", exc)
                ) from exc
            raise UpstreamOutcomeUnknown(
                self._failure(method, path, "no complete answer in time", exc)
            ) from exc
        except aiohttp.ClientError as exc:
            raise UpstreamOutcomeUnknown(
                self._failure(method, path, "no complete answer", exc)
            ) from exc
        finally:
            _CURRENT_PHASE.reset(reset_token)

    def _rejection(self, status: int, body: bytes, retry_after: str | None) -> UpstreamRejected:
        try:
            error = ERROR_DECODER.decode(body)
        except msgspec.DecodeError:
            # A proxy's HTML page or an empty body: the status alone is the answer.
            error = ErrorBody(message=self._excerpt(body) or None)
        return self._rejected(status, error, retry_after)

    def _http200_rejection(
        self, status: int, body: bytes, retry_after: str | None
    ) -> UpstreamRejected | None:
        """RunComfy sometimes answers HTTP 200 with only an ``error_code``: still an error."""
        try:
            error = ERROR_DECODER.decode(body)
        except msgspec.DecodeError:
            return None
        if error.error_code is None:
            return None
        return self._rejected(status, error, retry_after)

    def _rejected(self, status: int, error: ErrorBody, retry_after: str | None) -> UpstreamRejected:
        code = None if error.error_code is None else str(error.error_code)
        return UpstreamRejected(
            http_status=status,
            kind=_rejection_kind(status, code),
            error_code=code,
            message=self._scrub(_error_text(error) or f"HTTP {status}")[:_MESSAGE_LIMIT],
            retry_after_s=_parse_retry_after(retry_after),
        )

    def _failure(self, method: str, path: str, what: str, exc: BaseException) -> str:
        detail = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return self._scrub(f"{method} {path}: {what}: {detail}")

    def _excerpt(self, body: bytes) -> str:
        # Scrub before cutting, so a token straddling the cut cannot leak in part.
        text = body[:_EXCERPT_WINDOW].decode("utf-8", "replace")
        return self._scrub(text)[:_MESSAGE_LIMIT]

    def _scrub(self, text: str) -> str:
        # An upstream that echoes the Authorization header must not leak it into logs.
        return text.replace(self._token, _REDACTED) if self._token else text


def _error_text(error: ErrorBody) -> str | None:
    """Pick the message out of whichever field RunComfy used this time."""
    for candidate in (error.message, error.error_message):
        if candidate:
            return candidate
    match error.error:
        case str() as text if text:
            return text
        case dict() as obj:
            found = obj.get("message", obj.get("error_message"))
            return None if found is None else str(found)
        case _:
            return None


def _rejection_kind(http_status: int, error_code: str | None) -> RejectionKind:
    """Classify an error answer by its HTTP status, or by ``error_code`` when that is all it has."""
    if error_code == _INSUFFICIENT_FUNDS_CODE:
        return "insufficient_funds"
    status = http_status
    if 200 <= status < 300 and error_code is not None and len(error_code) == 6:
        # RunComfy's codes are the HTTP status followed by three digits (401001,
        # 500001), so an HTTP-200 error answer still says what kind it is.
        status = int(error_code[:3]) if error_code.isdigit() else status
    if status >= 500:
        return "server"
    return _KIND_BY_STATUS.get(status, "other")


def _parse_retry_after(value: str | None) -> float | None:
    """Read ``Retry-After`` as delay-seconds or an HTTP-date; None when absent or unreadable."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - datetime.now(UTC)).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)
