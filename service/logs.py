"""Logging: one JSON object per line (or plain text), carrying job id, tenant and request id.

The ids come from context variables, set where the work is known: the worker
sets `job_id` / `tenant` for each claimed item, the API sets `request_id` for
each request. asyncio copies the context into every task, so each log line
written while working an item or answering a request carries its ids without
threading them through every call. Messages never contain secrets: the code
that logs passes ids, statuses and error classes, never keys or tokens.
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Final

job_id_var: ContextVar[str | None] = ContextVar("job_id", default=None)
tenant_var: ContextVar[str | None] = ContextVar("tenant", default=None)
request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)

_CONTEXT: Final = (("job_id", job_id_var), ("tenant", tenant_var), ("request_id", request_id_var))


class ContextFilter(logging.Filter):
    """Copies the context's ids onto every record (as attributes both formats can show)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Attach the ids; never drops a record."""
        for name, var in _CONTEXT:
            setattr(record, name, var.get())
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the ids that are set."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name, _ in _CONTEXT:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """Plain lines for a terminal, with the ids that are set appended."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a text line."""
        line = super().format(record)
        ids = " ".join(
            f"{name}={value}"
            for name, _ in _CONTEXT
            if (value := getattr(record, name, None)) is not None
        )
        return f"{line} [{ids}]" if ids else line


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """Log to stderr at `level`, as `json` or `text` lines, with the context ids."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(ContextFilter())
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level if level in logging.getLevelNamesMapping() else "INFO")
    # Access logs would repeat what the API's metrics count, once per request.
    logging.getLogger("uvicorn.access").disabled = True
