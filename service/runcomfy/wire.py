"""Shapes of RunComfy Model API answers, decoded tolerantly (docs/runcomfy.md).

RunComfy's answers vary between what its page documents and what its own
clients see, so every field is optional, unknown fields are ignored and the
decoders run with ``strict=False`` (a number sent as a string still decodes).
Callers decide what a missing field means; nothing here raises for it.
"""

from typing import Any, Final

import msgspec

__all__ = [
    "CANCEL_DECODER",
    "ERROR_DECODER",
    "RESULT_DECODER",
    "STATUS_DECODER",
    "SUBMIT_DECODER",
    "CancelAnswer",
    "ErrorBody",
    "ResultAnswer",
    "StatusAnswer",
    "SubmitAnswer",
]


class _Answer(msgspec.Struct, kw_only=True):
    """Base of every upstream answer.

    Unlike our own shapes (which forbid unknown fields), these accept anything
    extra: RunComfy adds fields without notice and must not break us.
    """


class SubmitAnswer(_Answer):
    """Answer to ``POST /v1/models/{model}``: the new request and where to follow it."""

    request_id: str | None = None
    status_url: str | None = None
    result_url: str | None = None
    cancel_url: str | None = None


class StatusAnswer(_Answer):
    """Answer to ``GET /v1/requests/{id}/status``; ``status`` may be any string."""

    request_id: str | None = None
    status: str | None = None
    queue_position: int | None = None


class ResultAnswer(_Answer):
    """Answer to ``GET /v1/requests/{id}/result``; before completion only the status is set."""

    request_id: str | None = None
    status: str | None = None
    output: dict[str, Any] | None = None
    # Seen as RFC 3339 strings; tolerate unix timestamps too.
    created_at: str | float | None = None
    finished_at: str | float | None = None
    error: str | dict[str, Any] | None = None

    def error_parts(self) -> tuple[str | None, str | None]:
        """Return ``(code, message)`` from ``error``, sent as a string or as an object."""
        match self.error:
            case None:
                return None, None
            case str() as text:
                return None, text
            case dict() as obj:
                code = obj.get("code", obj.get("error_code"))
                message = obj.get("message", obj.get("error_message", obj.get("detail")))
                return (
                    None if code is None else str(code),
                    None if message is None else str(message),
                )


class CancelAnswer(_Answer):
    """Answer to ``POST /v1/requests/{id}/cancel``: ``outcome`` is e.g. ``not_cancellable``."""

    request_id: str | None = None
    outcome: str | None = None
    status: str | None = None


class ErrorBody(_Answer):
    """An error answer: ``error_code`` (e.g. 401001, 10001) and a message under one of 3 names."""

    error_code: int | str | None = None
    message: str | None = None
    error_message: str | None = None
    error: str | dict[str, Any] | None = None


# Decoders are stateless and cheap to reuse; building them once saves the
# type analysis on every answer of the hot poll path.
SUBMIT_DECODER: Final = msgspec.json.Decoder(SubmitAnswer, strict=False)
STATUS_DECODER: Final = msgspec.json.Decoder(StatusAnswer, strict=False)
RESULT_DECODER: Final = msgspec.json.Decoder(ResultAnswer, strict=False)
CANCEL_DECODER: Final = msgspec.json.Decoder(CancelAnswer, strict=False)
ERROR_DECODER: Final = msgspec.json.Decoder(ErrorBody, strict=False)
