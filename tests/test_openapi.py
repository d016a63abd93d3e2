"""The checked-in OpenAPI document is exactly what the code generates, and says what it must."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from service.api.openapi import openapi_document, render

CHECKED_IN = Path(__file__).parent.parent / "openapi" / "openapi.json"
REGENERATE = (
    "python -c 'from service.api.openapi import openapi_document, render; "
    'open("openapi/openapi.json", "w").write(render(openapi_document()))\''
)


@pytest.fixture(scope="module")
def document():
    return openapi_document()


def test_the_checked_in_document_matches_the_code(document):
    """openapi/openapi.json is the generated document, byte for byte; regenerate it if not."""
    assert CHECKED_IN.read_text(encoding="utf-8") == render(document), (
        f"openapi/openapi.json is stale; regenerate it with:\n  {REGENERATE}"
    )


def test_the_document_is_openapi_3_1_with_every_route(document):
    """The document is OpenAPI 3.1 and lists every route of the HTTP API."""
    assert document["openapi"].startswith("3.1")
    paths = document["paths"]
    assert set(paths["/v1/jobs"]) == {"get", "post"}
    assert "get" in paths["/v1/jobs/{job_id}"]
    assert "post" in paths["/v1/jobs/{job_id}/cancel"]
    assert set(paths["/v1/jobs/{job_id}/deliveries"]) == {"get", "post"}
    assert {"/healthz", "/readyz", "/metrics"} <= set(paths)
    assert "post" in paths["/v1/deliveries/recover"]
    admin = {p for p in paths if p.startswith("/v1/admin/")}
    assert {"/v1/admin/overview", "/v1/admin/jobs", "/v1/admin/jobs/{job_id}"} <= admin
    assert {"/v1/admin/jobs/{job_id}/cancel", "/v1/admin/deliveries/recover"} <= admin
    assert not [path for path in paths if path.startswith("/_")]


def test_submitting_documents_the_job_request_body(document):
    """POST /v1/jobs documents its JSON body as the closed JobRequest schema."""
    post = document["paths"]["/v1/jobs"]["post"]
    body = post["requestBody"]["content"]["application/json"]["schema"]
    assert body == {"$ref": "#/components/schemas/JobRequest"}
    schemas = document["components"]["schemas"]
    for name in ("JobRequest", "VideoInput", "WebhookSpec"):
        assert schemas[name]["additionalProperties"] is False
    assert schemas["VideoInput"]["properties"]["num_frames"]["enum"] == [85, 129]
    assert set(post["responses"]) >= {"200", "202", "400", "401", "409", "413", "422", "503"}


def test_v1_routes_need_the_bearer_scheme_and_answer_problems(document):
    """Every /v1 operation requires the bearer key, and every error is problem+json."""
    scheme = document["components"]["securitySchemes"]["apiKey"]
    assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
    for path, item in document["paths"].items():
        for method, operation in item.items():
            if path.startswith("/v1"):
                scheme = "adminKey" if path.startswith("/v1/admin/") else "apiKey"
                assert operation["security"] == [{scheme: []}], (path, method)
                assert "401" in operation["responses"], (path, method)
            for status, answer in operation["responses"].items():
                if int(status) >= 400:
                    assert list(answer["content"]) == ["application/problem+json"], (path, status)


def test_the_document_builds_without_redis_or_settings():
    """Generating the document needs neither Redis nor settings, and is JSON."""
    assert json.loads(render(openapi_document()))["info"]["title"] == "runcomfy-gateway"


def test_the_document_has_valid_examples_of_a_request_and_a_webhook():
    """The request example is a valid job request and the webhook example a valid event."""
    import msgspec  # noqa: PLC0415

    from service.api.openapi import openapi_document  # noqa: PLC0415
    from service.models import Job, JobRequest  # noqa: PLC0415

    document = openapi_document()
    body = document["paths"]["/v1/jobs"]["post"]["requestBody"]["content"]["application/json"]
    msgspec.convert(body["example"], JobRequest)
    hook = document["webhooks"]["job-event"]["post"]
    example = hook["requestBody"]["content"]["application/json"]["example"]
    assert example["type"] in {"job.completed", "job.failed", "job.cancelled"}
    msgspec.convert(example["data"], Job)
    headers = {p["name"] for p in hook["parameters"]}
    assert headers == {"webhook-id", "webhook-timestamp", "webhook-signature"}
