"""Client for RunComfy's Model API on httpx: one HTTP attempt per call, answers decoded.

Every failure is one of three cases, because the caller's next move differs::

    UpstreamError
     ├── UpstreamRejected        RunComfy answered, and the answer is an error (an HTTP
     │                             error status, or HTTP 200 with ``error_code`` and no
     │                             ``request_id``). Definite: no request was created.
     │                             ``kind`` says why, ``retryable`` whether backoff helps,
     │                             ``retry_after_s`` what RunComfy asked for.
     ├── UpstreamUnreachable     nothing was sent: httpx.ConnectError (refused, DNS,
     │                             TLS handshake), httpx.ConnectTimeout, httpx.PoolTimeout
     │                             (no free pooled connection in time), or a URL refused
     │                             before connecting. Even a submit may be retried.
     └── UpstreamOutcomeUnknown  the request was (or may have been) sent and no complete
                                   answer came: every later transport error (ReadTimeout,
                                   WriteTimeout and WriteError, since some bytes may have
                                   left, ReadError, RemoteProtocolError, the whole-call
                                   deadline), or a garbage body. For a submit, a paid
                                   request may exist upstream.

The split rests on httpx's own transport, whose exceptions name the phase that failed
(a transport borrowed from another HTTP library may report a connection dropped after
the request as ConnectTimeout, which would pay twice). Pool and connect timeouts are
kept short enough that the whole-call deadline can only fire once a connection is in hand.
Retries, backoff and the unknown-outcome policy belong to the caller: the worker
reschedules through Redis; nothing is re-sent here, not even an idempotent GET.
No message or repr of these exceptions contains the Bearer token.
"""

import asyncio
import time
from collections.abc import Callable
from typing import Final, Literal, TypeAlias, TypeVar
from urllib.parse import quote

import httpx
import msgspec

from service.outbound import USER_AGENT, cookieless_jar, parse_retry_after
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
    "create_upstream_client",
]

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
# Transport errors raised before a byte of the request could leave: safe to send again.
_NOTHING_SENT: Final = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)

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


def create_upstream_client(
    max_connections: int = 100, *, transport: httpx.AsyncBaseTransport | None = None
) -> httpx.AsyncClient:
    """Create the pooled httpx client the RunComfy client runs on.

    `transport` replaces the network (an `httpx.MockTransport` in tests); by default it is
    httpx's own `AsyncHTTPTransport`, whose exceptions keep "nothing sent" exact.
    """
    limits = httpx.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        # Below the usual 60 s idle timeout of load balancers, so we rarely reuse a
        # connection the far end is closing (a POST on one would end as unknown outcome).
        keepalive_expiry=15.0,
    )
    return httpx.AsyncClient(
        # Never pick up proxies or .netrc credentials from the pod's environment.
        transport=transport or httpx.AsyncHTTPTransport(limits=limits, trust_env=False),
        trust_env=False,
        cookies=cookieless_jar(),
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
    )


class RunComfyClient:
    """Calls RunComfy's Model API; each method makes one HTTP attempt and decodes the answer."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: str,
        token: str,
        *,
        timeout_s: float = 30.0,
        on_call: CallObserver | None = None,
    ) -> None:
        try:
            url = httpx.URL(base_url)
        except httpx.InvalidURL:
            raise ValueError("base_url must be an absolute http(s) URL") from None
        if url.scheme not in {"http", "https"} or not url.host:
            raise ValueError("base_url must be an absolute http(s) URL")
        if timeout_s <= 0:
            raise ValueError("timeout_s must be positive")
        self._client = client
        self._base_url = str(url).rstrip("/")
        self._token = token
        self._deadline_s = timeout_s
        # Waiting for a pooled connection, then TCP and TLS (each up to `connect`), end well
        # inside the deadline: when the deadline fires, the request has been (or is being) sent.
        wait = min(timeout_s / 4, 10.0)
        self._timeout = httpx.Timeout(timeout_s, connect=wait, pool=wait)
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
        try:
            async with asyncio.timeout(self._deadline_s):
                response = await self._client.request(
                    method,
                    # Both halves are already percent-encoded (`httpx.URL`, `quote`).
                    self._base_url + path,
                    content=payload,
                    headers=self._headers if payload is None else self._json_headers,
                    timeout=self._timeout,
                    follow_redirects=False,
                )
        except _NOTHING_SENT as exc:
            what = "timed out connecting" if isinstance(exc, httpx.TimeoutException) else None
            raise UpstreamUnreachable(
                self._failure(method, path, what or "cannot connect", exc)
            ) from exc
        except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
            # Refused while building the request, before any connection was tried.
            raise UpstreamUnreachable(self._failure(method, path, "cannot connect", exc)) from exc
        except (TimeoutError, httpx.TimeoutException) as exc:
            raise UpstreamOutcomeUnknown(
                self._failure(method, path, "no complete answer in time", exc)
            ) from exc
        except httpx.TransportError as exc:
            raise UpstreamOutcomeUnknown(
                self._failure(method, path, "no complete answer", exc)
            ) from exc
        return response.status_code, response.content, response.headers.get("Retry-After")

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
            retry_after_s=parse_retry_after(retry_after),
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
