"""Structured logs: JSON lines carrying job id, tenant and request id; request ids echoed."""

from __future__ import annotations

import asyncio
import json
import logging

from service.logs import (
    ContextFilter,
    JsonFormatter,
    TextFormatter,
    job_id_var,
    request_id_var,
    tenant_var,
)
from tests.support import serve_api
from tests.test_api import TENANT
from tests.test_tenants import settings_for


def record(msg: str = "hello %s", *args: object) -> logging.LogRecord:
    rec = logging.LogRecord("service.test", logging.WARNING, __file__, 1, msg, args or ("x",), None)
    ContextFilter().filter(rec)
    return rec


async def test_json_lines_carry_the_ids_of_the_work_in_hand():
    """A line logged while a job is worked names its job id and tenant, as JSON."""

    async def work() -> str:
        job_id_var.set("job_01ABC")
        tenant_var.set("orders")
        return JsonFormatter().format(record())

    entry = json.loads(await asyncio.create_task(work()))
    assert entry["msg"] == "hello x"
    assert entry["level"] == "warning"
    assert (entry["job_id"], entry["tenant"]) == ("job_01ABC", "orders")
    assert "request_id" not in entry
    outside = json.loads(JsonFormatter().format(record()))
    assert "job_id" not in outside  # the task's context did not leak out


def test_text_lines_append_the_ids():
    """Plain text lines end with the ids that are set."""
    token = request_id_var.set("req-1")
    try:
        line = TextFormatter("%(message)s").format(record())
    finally:
        request_id_var.reset(token)
    assert line == "hello x [request_id=req-1]"


async def test_the_api_echoes_a_request_id_or_makes_one(tmp_path, redis_server, keys):
    """A sane X-Request-Id is echoed back; a missing or hostile one is replaced by a new id."""
    async with serve_api(settings_for(tmp_path, redis_server), keys, TENANT.api_key) as api:
        given = await api.get("/healthz", headers={"X-Request-Id": "abc-123"})
        made = await api.get("/healthz")
        hostile = await api.get("/healthz", headers={"X-Request-Id": "<script> " + "x" * 100})
    assert given.headers["x-request-id"] == "abc-123"
    assert len(made.headers["x-request-id"]) == 32
    assert hostile.headers["x-request-id"] != "<script> " + "x" * 100
