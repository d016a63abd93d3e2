"""RFC 9457 problem details: every error the API answers is `application/problem+json`.

Handlers raise `ProblemError` (or the validation errors of `validation.py`);
the exception handlers here turn those, Litestar's own HTTP errors, Redis
outages (503 with `Retry-After`) and anything unexpected (500, logged) into a
problem body. No answer is ever a traceback.

Exception tree mapped here:

    ProblemError                      its own status (401, 402, 404, 409, 415, 429, 503, ...)
    validation.MalformedBodyError          400
    validation.InvalidInputError           422, with `errors` naming every field
    litestar ValidationException      422 for query parameters, else 400
    litestar HTTPException            its status (404, 405, 413, ...)
    redis ConnectionError, TimeoutError (BusyLoadingError is a ConnectionError),
        ReadOnlyError, TryAgainError, ClusterDownError, MasterDownError
                                      503 + Retry-After
    any other Exception               500, logged with its traceback
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, Final

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.types import ExceptionHandlersMap

from service.api.validation import InvalidInputError, MalformedBodyError, readable_error
from service.models import BudgetProblem, FieldError, Problem
from service.store.connection import REDIS_UNAVAILABLE

log = logging.getLogger(__name__)

PROBLEM_JSON: Final = "application/problem+json"
RETRY_AFTER_S: Final = 2
"""What a 503 asks a caller to wait: long enough for a Redis failover's reconnect."""

TYPE_PREFIX: Final = "urn:runcomfy-gateway:problem:"
"""Problem `type` URIs are stable names, not links: callers may branch on them."""

_KINDS: Final[Mapping[int, str]] = {
    400: "bad-request",
    401: "unauthorized",
    402: "payment-required",
    403: "forbidden",
    404: "not-found",
    405: "method-not-allowed",
    409: "conflict",
    413: "body-too-large",
    415: "unsupported-media-type",
    422: "invalid-input",
    429: "rate-limited",
    500: "internal-error",
    503: "unavailable",
}

_encoder = msgspec.json.Encoder()


class ProblemError(Exception):
    """An error answer: raise it from a handler and the client gets this problem."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        kind: str | None = None,
        errors: Sequence[FieldError] | None = None,
        headers: Mapping[str, str] | None = None,
        extensions: Mapping[str, Any] | None = None,
    ) -> None:
        """`extensions` are the problem's own members, at the top level beside `detail`."""
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.kind = kind
        self.errors = list(errors) if errors is not None else None
        self.headers = dict(headers or {})
        self.extensions = dict(extensions or {})


def problem_response(
    status: int,
    detail: str,
    *,
    kind: str | None = None,
    errors: Sequence[FieldError] | None = None,
    headers: Mapping[str, str] | None = None,
    extensions: Mapping[str, Any] | None = None,
) -> Response[bytes]:
    """An `application/problem+json` answer with this status and detail (and `extensions`)."""
    problem = Problem(
        type=TYPE_PREFIX + (kind or _KINDS.get(status, "error")),
        title=_title(status),
        status=status,
        detail=detail,
        errors=list(errors) if errors is not None else msgspec.UNSET,
    )
    body = _encoder.encode(
        {**msgspec.to_builtins(problem), **extensions} if extensions else problem
    )
    return Response(
        content=body,
        status_code=status,
        media_type=PROBLEM_JSON,
        headers=dict(headers or {}),
    )


def _title(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def _from_problem_error(_: Request[Any, Any, Any], exc: ProblemError) -> Response[bytes]:
    return problem_response(
        exc.status,
        exc.detail,
        kind=exc.kind,
        errors=exc.errors,
        headers=exc.headers,
        extensions=exc.extensions,
    )


def _from_malformed_body(_: Request[Any, Any, Any], exc: MalformedBodyError) -> Response[bytes]:
    return problem_response(400, str(exc), kind="malformed-body")


def _from_invalid_input(_: Request[Any, Any, Any], exc: InvalidInputError) -> Response[bytes]:
    count = len(exc.errors)
    detail = f"{count} field{'s are' if count != 1 else ' is'} invalid; see `errors`"
    return problem_response(422, detail, errors=exc.errors)


def _from_parameter_error(
    request: Request[Any, Any, Any], exc: ValidationException
) -> Response[bytes]:
    """Litestar validated a query or header parameter: name each offending one."""
    extra = exc.extra if isinstance(exc.extra, list) else []
    items = [item for item in extra if isinstance(item, dict) and item.get("key")]
    handler = request.scope.get("route_handler")
    parameters = handler.parsed_fn_signature.parameters if handler is not None else {}
    errors: list[FieldError] = []
    sources: set[str] = set()
    for item in items:
        key = str(item["key"])
        source = item.get("source")
        sources.add(str(getattr(source, "value", source)))
        field = parameters.get(key)
        # Name the parameter as it is sent (`Idempotency-Key`), not as the handler calls it.
        name = (getattr(field.kwarg_definition, "name", None) if field else None) or key
        annotation = field.annotation if field else None
        detail = readable_error(str(item.get("message") or "is invalid"), annotation)
        errors.append(FieldError(pointer=f"#/{name}", detail=detail))
    if errors and sources == {"query"}:
        return _from_invalid_input(request, InvalidInputError(errors))
    detail = "; ".join(f"{e.pointer[2:]} {e.detail}" for e in errors) or "the request is invalid"
    return problem_response(400, detail, errors=errors or None)


def _from_http_exception(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
    status = exc.status_code
    if status >= 500:
        # Litestar's 5xx details can name internals; say only what the status says.
        log.warning("api: answered %d: %s", status, type(exc).__name__)
        return problem_response(status, _title(status), headers=exc.headers)
    detail = exc.detail if exc.detail and exc.detail != _title(status) else _default_detail(status)
    return problem_response(status, detail, headers=exc.headers)


def _default_detail(status: int) -> str:
    return {
        404: "no such resource",
        405: "this method is not allowed here; see the Allow header",
        413: "the request body is larger than 1 MB",
    }.get(status, _title(status))


def _from_redis_outage(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    # One line, no traceback: an outage is an expected condition, not a bug.
    log.warning(
        "api: %s %s: Redis unavailable (%s)", request.method, request.url.path, type(exc).__name__
    )
    return problem_response(
        503,
        "the job store is unavailable; retry shortly",
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def _from_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    log.error("api: %s %s failed unexpectedly", request.method, request.url.path, exc_info=exc)
    return problem_response(500, "an unexpected error occurred; it has been logged")


def exception_handlers() -> ExceptionHandlersMap:
    """The app's exception handlers: every error becomes a problem, none a traceback."""
    handlers: ExceptionHandlersMap = {
        ProblemError: _from_problem_error,
        MalformedBodyError: _from_malformed_body,
        InvalidInputError: _from_invalid_input,
        ValidationException: _from_parameter_error,
        HTTPException: _from_http_exception,
        Exception: _from_unexpected,
    }
    for error in REDIS_UNAVAILABLE:
        handlers[error] = _from_redis_outage
    return handlers


_DESCRIPTIONS: Final[Mapping[int, str]] = {
    400: "The body is not a JSON object, or a header is malformed.",
    401: "No API key, or not a valid one (`WWW-Authenticate: Bearer`).",
    402: (
        "The job would take the tenant over a budget (type ending `budget-exceeded`); "
        "nothing was stored. `budget_usd`, `charged_usd`, `held_usd`, `period` and "
        "`resets_at` say which budget and when it resets."
    ),
    404: "No such job for this tenant (another tenant's job answers the same).",
    409: "The request conflicts with the job's current state.",
    413: "The request body is larger than 1 MB.",
    415: "The body is not sent as `application/json`.",
    422: "Invalid input; `errors` names every offending field with a JSON pointer.",
    429: "Too many job submissions for this tenant; see `Retry-After`.",
    500: "An unexpected error; it was logged.",
    503: "Redis is unavailable; retry after `Retry-After` seconds.",
}


def problem_responses(*statuses: int, **descriptions: str) -> dict[int, ResponseSpec]:
    """OpenAPI answers for these error statuses, each an `application/problem+json` Problem.

    `descriptions` overrides a status's text: `s409="..."`.
    """
    return {
        status: ResponseSpec(
            data_container=BudgetProblem if status == 402 else Problem,
            media_type=PROBLEM_JSON,
            description=descriptions.get(f"s{status}", _DESCRIPTIONS.get(status, _title(status))),
            generate_examples=False,
        )
        for status in statuses
    }
