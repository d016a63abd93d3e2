"""The OpenAPI 3.1 document, generated from the route handlers and the Structs in `models.py`.

Litestar generates the document from the same route tree the app serves. One
thing it cannot see: `POST /v1/jobs` reads its body raw (so validation can name
every bad field), so the generated operation has no request body. A
documentation-only twin handler that takes `data: JobRequest` makes Litestar
generate that body and its schemas; it is moved onto `POST /v1/jobs` and the
twin dropped. Building the document needs no Redis and no settings.
"""

from __future__ import annotations

import functools
import inspect
import json
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final, get_args

import msgspec
from litestar import Litestar, get, post
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme, Tag
from litestar.params import JSONBody

from service import models
from service.api import routes
from service.api.admin import admin_router
from service.api.problems import PROBLEM_JSON
from service.api.routes import route_handlers
from service.api.validation import MAX_METADATA_DEPTH, MAX_SEED, MIN_SEED
from service.models import (
    DEFAULT_EVENTS,
    MAX_METADATA_BYTES,
    MODEL,
    Cost,
    EventType,
    Job,
    JobRequest,
    JobStatus,
    UpstreamRef,
    VideoInput,
    WebhookEvent,
    WebhookSpec,
    WebhookView,
)

_TWIN_PATH: Final = "/_openapi/job-request"
_DESCRIPTION: Final = """\
An internal gateway in front of RunComfy's `tencent/hunyuan/video-to-video` model. \
Submit a job, get a signed Standard Webhooks callback when it completes, fails or is \
cancelled. Every `/v1` call needs `Authorization: Bearer <api key>`; a tenant sees only \
its own jobs. Every error is `application/problem+json` (RFC 9457)."""


def _version() -> str:
    try:
        return version("runcomfy-gateway")
    except PackageNotFoundError:
        return "0.0.0"


def openapi_config() -> OpenAPIConfig:
    """The document's header: title, version, tags and the bearer security scheme."""
    return OpenAPIConfig(
        title="runcomfy-gateway",
        version=_version(),
        description=_DESCRIPTION,
        tags=[
            Tag(name="jobs", description="Video-to-video jobs and their webhooks."),
            Tag(name="operations", description="Probes and metrics; no API key needed."),
            Tag(
                name="admin",
                description="For operators: every tenant's jobs, actions, recovery. Admin key.",
            ),
        ],
        components=Components(
            security_schemes={
                "apiKey": SecurityScheme(
                    type="http",
                    scheme="bearer",
                    description="A tenant's API key, as `Authorization: Bearer <key>`.",
                ),
                "adminKey": SecurityScheme(
                    type="http",
                    scheme="bearer",
                    description=(
                        "An operator's key (`[admins] api_keys`), as `Authorization: Bearer "
                        "<key>`; a tenant's key is refused here, as an admin key is on `/v1/jobs`."
                    ),
                ),
            }
        ),
        use_handler_docstrings=False,
        create_examples=False,
    )


@post(_TWIN_PATH, sync_to_thread=False)
def _job_request_twin(data: JSONBody[JobRequest]) -> None:
    """Never served: only lets Litestar generate the JobRequest body schema."""
    del data


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the HTTP API, as a JSON-ready dict."""
    app = Litestar(
        route_handlers=[*route_handlers(), admin_router(), _job_request_twin],
        openapi_config=openapi_config(),
        logging_config=None,
    )
    document = app.openapi_schema.to_schema()
    paths: dict[str, Any] = document["paths"]
    body = paths.pop(_TWIN_PATH)["post"]["requestBody"]
    body["description"] = (
        "The job. `input` follows the model's schema exactly; unknown fields are rejected "
        "at every level."
    )
    body["content"]["application/json"]["example"] = msgspec.to_builtins(_EXAMPLE_REQUEST)
    paths["/v1/jobs"]["post"]["requestBody"] = body
    document["webhooks"] = _webhooks()
    _describe_event_stream(paths["/v1/jobs/{job_id}/events"]["get"]["responses"]["200"])
    for path_item in paths.values():
        for operation in path_item.values():
            if isinstance(operation, dict) and "responses" in operation:
                _drop_generic_400(operation["responses"])
    _describe_structs(document["components"]["schemas"])
    _state_validation_rules(document["components"]["schemas"])
    return document


_EXAMPLE_AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
_EXAMPLE_REQUEST = JobRequest(
    input=VideoInput(
        prompt="a paper boat drifting down a rainy street, cinematic",
        video_url="https://media.example.com/input.mp4",
        seed=42,
        resolution="580p",
    ),
    webhook=WebhookSpec(url="https://orders.internal/hooks/runcomfy"),
    metadata={"order": 4711},
)
_EXAMPLE_JOB = Job(
    id="job_01KAWJ6X3Z8Q4N5R7T9V2W4Y6A",
    status="completed",
    model=MODEL,
    input=_EXAMPLE_REQUEST.input,
    output={"video": "https://cdn.runcomfy.example/outputs/5b1c.mp4"},
    error=None,
    upstream=UpstreamRef(request_id="5b1c9f0e-2d4a-4c4e-9a57-0b8e1f6d2c3a"),
    webhook=WebhookView(
        url="https://orders.internal/hooks/runcomfy",
        events=list(DEFAULT_EVENTS),
        state="pending",
        attempts=0,
    ),
    metadata={"order": 4711},
    created_at=_EXAMPLE_AT,
    submitted_at=_EXAMPLE_AT,
    started_at=_EXAMPLE_AT,
    finished_at=_EXAMPLE_AT,
    cost=Cost(estimate_usd=0.4, charged_usd=0.4),
    upstream_submits=1,
)


def _webhooks() -> dict[str, Any]:
    """The webhook the gateway sends, as OpenAPI 3.1 `webhooks` (README, Verifying the webhook)."""
    headers = {
        "webhook-id": "One per event; the same on every retry and re-send.",
        "webhook-timestamp": "Unix seconds of this attempt (verify within ±5 minutes).",
        "webhook-signature": (
            "`v1,<base64 HMAC-SHA256 of id.timestamp.body>` with the tenant's secret; "
            "several, space-separated, during a secret rotation."
        ),
    }
    event = WebhookEvent(type="job.completed", timestamp=_EXAMPLE_AT, data=_EXAMPLE_JOB)
    return {
        "job-event": {
            "post": {
                "summary": "A job event, signed per Standard Webhooks",
                "description": (
                    "Sent to `webhook.url` for the events in `webhook.events` (default: the "
                    "three final ones). Any 2xx ends the delivery; 410 stops retrying; "
                    "anything else, timeouts and 3xx (never followed) are retried on "
                    "GATEWAY_WEBHOOK_RETRY_SCHEDULE. Delivery is at least once: "
                    "de-duplicate on `webhook-id`."
                ),
                "parameters": [
                    {
                        "name": name,
                        "in": "header",
                        "required": True,
                        "description": text,
                        "schema": {"type": "string"},
                    }
                    for name, text in headers.items()
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["type", "timestamp", "data"],
                                "properties": {
                                    "type": {"type": "string", "enum": list(get_args(EventType))},
                                    "timestamp": {"type": "string", "format": "date-time"},
                                    "data": {"$ref": "#/components/schemas/Job"},
                                },
                            },
                            "example": msgspec.to_builtins(event),
                        }
                    },
                },
                "responses": {"2XX": {"description": "Delivered: no more attempts."}},
            }
        }
    }


def _describe_event_stream(answer: dict[str, Any]) -> None:
    """Say what the event stream carries: Litestar knows only its media type."""
    running = msgspec.structs.replace(
        _EXAMPLE_JOB, status="in_progress", output=None, finished_at=None
    )
    lines = [
        "id: 3",
        "event: job.in_progress",
        "data: " + msgspec.json.encode(running).decode(),
        "",
        ": keep-alive",
        "",
    ]
    answer["description"] = (
        "Server-sent events: `event: job.<status>`, `id: <n>`, `data: <the job>`, one per "
        "status change; `: keep-alive` comments; the stream ends after a final event."
    )
    statuses = get_args(JobStatus)
    answer["content"]["text/event-stream"] = {
        # One event, as OpenAPI 3.2 (`itemSchema`) and schemathesis read an event stream.
        "schema": {
            "type": "object",
            "required": ["event", "id", "data"],
            "properties": {
                "event": {"type": "string", "enum": [f"job.{s}" for s in statuses]},
                "id": {"type": "string", "pattern": "^[1-4]$"},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": "#/components/schemas/Job"},
                },
            },
        },
        "example": "\r\n".join(lines) + "\r\n",
    }


def _drop_generic_400(responses: dict[str, Any]) -> None:
    """Drop Litestar's generic 400 (its own error shape), which this API never answers."""
    answer = responses.get("400")
    if answer is not None and PROBLEM_JSON not in answer.get("content", {}):
        del responses["400"]


def _describe_structs(schemas: dict[str, Any]) -> None:
    """Give each Struct's schema its docstring, and close the ones that reject unknown fields."""
    for name, schema in schemas.items():
        struct = getattr(models, name, None) or getattr(routes, name, None)
        if not (isinstance(struct, type) and issubclass(struct, msgspec.Struct)):
            continue
        doc = inspect.getdoc(struct)
        if doc and "description" not in schema:
            schema["description"] = doc.split("\n\n")[0].replace("\n", " ")
        if struct.__struct_config__.forbid_unknown_fields:
            schema["additionalProperties"] = False


_NO_NUL: Final = r"^[^\x00]*$"
_HTTP_URL: Final = r"^https?://[^\x00-\x20\x7f]+$"


def _state_validation_rules(schemas: dict[str, Any]) -> None:
    """Say in the schemas what `validation.py` checks beyond the Structs' own types.

    Rules a schema can state are stated exactly (seed bounds, no NUL, http(s) without
    whitespace); the rest (a public address, the tenant's callback hosts, metadata's
    size and depth) are described.
    """
    video = schemas["VideoInput"]["properties"]
    video["seed"] = {"type": "integer", "minimum": MIN_SEED, "maximum": MAX_SEED}
    video["prompt"]["pattern"] = _NO_NUL
    video["video_url"] |= {
        "pattern": _HTTP_URL,
        "description": "A public http(s) URL RunComfy can fetch: not localhost, not a "
        "private or reserved address.",
    }
    schemas["WebhookSpec"]["properties"]["url"] |= {
        "pattern": _HTTP_URL,
        "description": "An http(s) URL without user:password, on a host in the tenant's "
        "`callback_hosts`.",
    }
    # The defaults are for log entries stored before a field existed: an answer has them all.
    attempt = schemas["DeliveryAttempt"]
    attempt["required"] = sorted(attempt["properties"])
    for field in attempt["properties"].values():
        field.pop("default", None)
    schemas["JobRequest"]["properties"]["metadata"]["description"] = (
        f"Any JSON object, kept and answered as sent: at most {MAX_METADATA_BYTES} bytes as "
        f"JSON, nested at most {MAX_METADATA_DEPTH} levels, no NUL (U+0000) in any string."
    )


def render(document: dict[str, Any]) -> str:
    """The document as checked in under `openapi/`: sorted keys, indent 2, final newline."""
    return json.dumps(document, indent=2, sort_keys=True) + "\n"


@functools.cache
def _served() -> bytes:
    # Built once per process on first request: the document depends only on the code.
    return json.dumps(openapi_document(), sort_keys=True).encode()


@get("/openapi.json", include_in_schema=False, media_type="application/json", sync_to_thread=False)
def serve_openapi() -> bytes:
    """The OpenAPI document, served by the API itself."""
    return _served()
