"""Hostile input and schema fuzzing against the API served by uvicorn on a free port.

Every answer to input that is not a valid request is a 4xx `application/problem+json`:
never a 5xx, never a traceback, and nothing is logged as an unexpected error. The
second half runs schemathesis against the checked-in `openapi/openapi.json`: no 5xx,
and every answer conforms to the document (status codes, content types, schemas).
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from service.api.server import embedded_api
from service.config import load_settings
from service.localredis import LocalRedis, free_port
from service.models import MAX_METADATA_BYTES
from service.store.keys import Keys
from tests.support import admins_toml, new_tenant

TENANT = new_tenant("orders")
ADMIN_KEY = "adm_fuzz_" + "7" * 24
HOSTS = ("hooks.example.com",)
VIDEO = "https://example.com/in.mp4"
PROBLEM = "application/problem+json"
JSON = {"Content-Type": "application/json"}
ONE_MB = 1_000_000
DOCUMENT = Path(__file__).parent.parent / "openapi" / "openapi.json"


@dataclass
class Gateway:
    """The API in a uvicorn server on a thread of its own, and what it logged at ERROR.

    `cases` counts the schemathesis cases it answered, `server_errors` those answered 5xx.
    """

    url: str
    errors: list[logging.LogRecord] = field(default_factory=list)
    cases: int = 0
    server_errors: int = 0

    def client(self, api_key: str | None = TENANT.api_key) -> httpx.Client:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=10)

    def count(self, status: int) -> None:
        self.cases += 1
        self.server_errors += status >= 500


class _Collect(logging.Handler):
    def __init__(self, into: list[logging.LogRecord]) -> None:
        super().__init__(logging.ERROR)
        self.into = into

    def emit(self, record: logging.LogRecord) -> None:
        self.into.append(record)


@pytest.fixture(scope="module")
def gateway(redis_server: LocalRedis, tmp_path_factory) -> Iterator[Gateway]:
    """`runcomfy-gateway api` as uvicorn serves it, on a free port, with a real Redis."""
    tenants = tmp_path_factory.mktemp("fuzz") / "tenants.toml"
    tenants.write_text(TENANT.toml(hosts=HOSTS) + admins_toml(ADMIN_KEY))
    env = {
        "REDIS_URL": redis_server.url,
        "RUNCOMFY_API_TOKEN": "fuzz-token",
        "GATEWAY_TENANTS_FILE": str(tenants),
    }
    port = free_port()
    keys = Keys(prefix="{f" + uuid.uuid4().hex[:12] + "}")
    server = embedded_api(load_settings(env), host="127.0.0.1", port=port, keys=keys)
    gateway = Gateway(url=f"http://127.0.0.1:{port}")
    collect = _Collect(gateway.errors)
    logging.getLogger().addHandler(collect)
    thread = threading.Thread(target=asyncio.run, args=(server.serve(),), daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive(), "the API server stopped while starting"
        assert time.monotonic() < deadline, "the API server did not start within 15 s"
        time.sleep(0.01)
    try:
        yield gateway
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        logging.getLogger().removeHandler(collect)


@pytest.fixture
def api(gateway: Gateway) -> Iterator[httpx.Client]:
    """A tenant's client; after the test, nothing may have been logged as an error."""
    before = len(gateway.errors)
    with gateway.client() as client:
        yield client
    logged = [record.getMessage() for record in gateway.errors[before:]]
    assert not logged, logged


def job_body(**extra: Any) -> dict[str, Any]:
    return {"input": {"prompt": "a paper boat", "video_url": VIDEO}, **extra}


def encoded(**extra: Any) -> bytes:
    return json.dumps(job_body(**extra)).encode()


def with_input(**fields: Any) -> bytes:
    body = job_body()
    body["input"].update(fields)
    return json.dumps(body).encode()


def with_input_raw(fields: str) -> bytes:
    """A body whose input carries `fields`, written as raw JSON text after the required two."""
    return (
        '{"input": {"prompt": "a paper boat", "video_url": "' + VIDEO + '", ' + fields + "}}"
    ).encode()


def nested(depth: int, *, closed: bool = True) -> bytes:
    """A valid request whose metadata holds arrays nested `depth` levels deep."""
    inner = "[" * depth + ("]" * depth if closed else "")
    tail = "}}" if closed else ""
    prefix = json.dumps(job_body())[:-1]
    return f'{prefix}, "metadata": {{"x": {inner}{tail}'.encode()


def assert_problem(answer: httpx.Response, status: int) -> dict[str, Any]:
    """`answer` is the problem+json of `status`, with every RFC 9457 member and no traceback."""
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith(PROBLEM), answer.headers
    assert "Traceback" not in answer.text
    assert 'File "' not in answer.text
    problem = answer.json()
    assert problem["status"] == status
    assert problem["type"].startswith("urn:runcomfy-gateway:problem:")
    assert problem["title"]
    assert problem["detail"]
    return problem


def assert_rejects(answer: httpx.Response, status: int, pointer: str | None = None) -> None:
    problem = assert_problem(answer, status)
    if pointer is not None:
        assert [error["pointer"] for error in problem["errors"]] == [pointer], problem


# Input limits


def test_a_body_over_one_megabyte_answers_413(api):
    """A body of 1 MB and one byte answers 413, however long its JSON would be."""
    body = with_input_raw('"x": "' + "a" * ONE_MB + '"')
    assert_rejects(api.post("/v1/jobs", content=body, headers=JSON), 413)


def test_a_chunked_body_over_one_megabyte_answers_413(api):
    """A body sent in chunks, with no Content-Length, is cut off at 1 MB with 413."""

    def chunks() -> Iterator[bytes]:
        yield b'{"input": {"prompt": "'
        for _ in range(20):
            yield b"a" * 65536
        yield b'"}}'

    assert_rejects(api.post("/v1/jobs", content=chunks(), headers=JSON), 413)


def test_a_body_of_exactly_one_megabyte_is_read_and_judged(api):
    """A body of exactly 1 MB is read: its over-long prompt answers 422, not 413."""
    head = '{"input": {"video_url": "' + VIDEO + '", "prompt": "'
    tail = '"}}'
    body = (head + "p" * (ONE_MB - len(head) - len(tail)) + tail).encode()
    assert len(body) == ONE_MB
    assert_rejects(api.post("/v1/jobs", content=body, headers=JSON), 422, "#/input/prompt")


HOSTILE_BODIES = [
    # Broken JSON
    pytest.param(b"", 400, None, id="empty"),
    pytest.param(b" \r\n\t ", 400, None, id="whitespace"),
    pytest.param(b'{"input":', 400, None, id="truncated"),
    pytest.param(b"{'input': {}}", 400, None, id="single-quotes"),
    pytest.param(b'{"input": {},}', 400, None, id="trailing-comma"),
    pytest.param(b"{} {}", 400, None, id="two-documents"),
    pytest.param(b'{"input": {}} // comment', 400, None, id="comment"),
    pytest.param(b"\xef\xbb\xbf" + encoded(), 400, None, id="utf8-bom"),
    pytest.param(b'{"input": {"prompt": "a\x00b"}}', 400, None, id="raw-nul-in-string"),
    pytest.param(b'{"input": {"prompt": "tab\there"}}', 400, None, id="raw-control-in-string"),
    # Not an object
    pytest.param(b"[]", 400, None, id="array"),
    pytest.param(b"[" + encoded() + b"]", 400, None, id="array-of-the-request"),
    pytest.param(b'"input"', 400, None, id="string"),
    pytest.param(b"42", 400, None, id="number"),
    pytest.param(b"null", 400, None, id="null"),
    pytest.param(b"true", 400, None, id="boolean"),
    pytest.param(b'{"input": []}', 422, "#/input", id="input-array"),
    pytest.param(b'{"input": [{"prompt": "a"}]}', 422, "#/input", id="input-array-of-object"),
    pytest.param(encoded(webhook=[]), 422, "#/webhook", id="webhook-array"),
    pytest.param(encoded(metadata=[]), 422, "#/metadata", id="metadata-array"),
    pytest.param(
        encoded(webhook={"url": "https://hooks.example.com/h", "events": {"a": 1}}),
        422,
        "#/webhook/events",
        id="events-object",
    ),
    # Deep nesting
    pytest.param(nested(10_000), 400, None, id="10000-levels"),
    pytest.param(nested(10_000, closed=False), 400, None, id="10000-levels-unclosed"),
    pytest.param(b'{"a":' * 10_000 + b"1" + b"}" * 10_000, 400, None, id="10000-objects"),
    pytest.param(nested(900), 422, "#/metadata", id="900-levels"),
    pytest.param(nested(32), 422, "#/metadata", id="33-levels-of-metadata"),
    # Huge numbers
    pytest.param(with_input_raw('"seed": ' + str(2**70)), 422, "#/input/seed", id="seed-2**70"),
    pytest.param(with_input_raw('"seed": ' + str(2**64)), 422, "#/input/seed", id="seed-2**64"),
    pytest.param(
        with_input_raw('"seed": ' + str(-(2**63) - 1)), 422, "#/input/seed", id="seed-below-int64"
    ),
    pytest.param(with_input_raw('"seed": 1' + "0" * 5000), 400, None, id="seed-5000-digits"),
    pytest.param(with_input_raw('"seed": 1e400'), 400, None, id="seed-1e400"),
    pytest.param(with_input_raw('"seed": 1e3'), 422, "#/input/seed", id="seed-exponent"),
    pytest.param(with_input_raw('"strength": 1e400'), 400, None, id="strength-1e400"),
    pytest.param(with_input_raw('"strength": 1e308'), 422, "#/input/strength", id="strength-1e308"),
    pytest.param(with_input_raw('"strength": -0.0'), 422, "#/input/strength", id="strength--0"),
    pytest.param(with_input_raw('"strength": 5e-324'), 422, "#/input/strength", id="strength-tiny"),
    pytest.param(
        with_input_raw('"num_frames": 129.0000000000000001'),
        422,
        "#/input/num_frames",
        id="num-frames-float",
    ),
    # NaN and Infinity are not JSON
    pytest.param(with_input_raw('"strength": NaN'), 400, None, id="NaN"),
    pytest.param(with_input_raw('"strength": Infinity'), 400, None, id="Infinity"),
    pytest.param(with_input_raw('"strength": -Infinity'), 400, None, id="-Infinity"),
    pytest.param(encoded()[:-1] + b', "metadata": {"x": NaN}}', 400, None, id="NaN-in-metadata"),
    # Invalid UTF-8, lone surrogates
    pytest.param(b'{"input": {"prompt": "\xff\xfe"}}', 400, None, id="invalid-utf8"),
    pytest.param(b'{"input": {"prompt": "\xc0\xaf"}}', 400, None, id="overlong-utf8"),
    pytest.param(b'{"input": {"prompt": "\xed\xa0\x80"}}', 400, None, id="utf8-surrogate"),
    pytest.param(b'{"input": {"prompt": "caf\xe9"}}', 400, None, id="latin-1"),
    pytest.param(b'{"\xff": 1}', 400, None, id="invalid-utf8-key"),
    pytest.param(with_input_raw('"x": "\\ud800"'), 400, None, id="lone-surrogate"),
    pytest.param(with_input_raw('"x": "\\udc00\\ud800"'), 400, None, id="swapped-surrogates"),
    # NUL characters in strings
    pytest.param(
        b'{"input": {"prompt": "a\\u0000b", "video_url": "' + VIDEO.encode() + b'"}}',
        422,
        "#/input/prompt",
        id="nul-in-prompt",
    ),
    pytest.param(
        b'{"input": {"prompt": "a", "video_url": "' + VIDEO.encode() + b'\\u0000"}}',
        422,
        "#/input/video_url",
        id="nul-in-video-url",
    ),
    pytest.param(
        encoded(webhook={"url": "https://hooks.example.com/h\x00"}),
        422,
        "#/webhook/url",
        id="nul-in-webhook-url",
    ),
    pytest.param(
        encoded(metadata={"a": [1, {"b": "x\x00"}]}), 422, "#/metadata/a/1/b", id="nul-in-metadata"
    ),
    pytest.param(encoded(metadata={"a\x00": 1}), 422, "#/metadata", id="nul-in-metadata-key"),
    pytest.param(
        encoded(webhook={"url": "https://hooks.example.com/h", "events": ["job.failed\x00"]}),
        422,
        "#/webhook/events/0",
        id="nul-in-event",
    ),
    pytest.param(
        with_input_raw('"resolution": "720p\\u0000"'), 422, "#/input/resolution", id="nul-in-enum"
    ),
    # Control characters that URL parsers drop silently
    pytest.param(
        with_input(video_url="https://exa\tmple.com/v.mp4"),
        422,
        "#/input/video_url",
        id="tab-in-video-url",
    ),
    pytest.param(
        with_input(video_url="https://example.com/v.mp4\x7f"),
        422,
        "#/input/video_url",
        id="del-in-video-url",
    ),
    # Duplicate member names: parsers disagree on which one counts
    pytest.param(
        with_input_raw('"strength": 0.5, "strength": 0.6'), 400, None, id="duplicate-strength"
    ),
    pytest.param(
        b'{"input": {"prompt": "a", "video_url": "' + VIDEO.encode() + b'"}, "input": {}}',
        400,
        None,
        id="duplicate-input",
    ),
    pytest.param(
        encoded()[:-1] + b', "metadata": {"a": [{"b": 1, "b": 1}]}}',
        400,
        None,
        id="duplicate-in-metadata",
    ),
    # Size limits inside the body
    pytest.param(
        encoded(metadata={"k": "x" * MAX_METADATA_BYTES}), 422, "#/metadata", id="metadata-4kb"
    ),
    pytest.param(
        encoded(metadata={f"k{i}": i for i in range(50_000)}),
        422,
        "#/metadata",
        id="metadata-50000-keys",
    ),
    pytest.param(
        with_input_raw('"prompt": "' + "\\ud83d\\ude00" * 4001 + '"'),
        400,
        None,
        id="prompt-twice",
    ),
]


@pytest.mark.parametrize(("body", "status", "pointer"), HOSTILE_BODIES)
def test_hostile_bodies_answer_a_4xx_problem(api, body, status, pointer):
    """Each hostile body answers its 4xx problem+json (naming the field for a 422)."""
    assert_rejects(api.post("/v1/jobs", content=body, headers=JSON), status, pointer)


def test_an_over_long_prompt_of_emoji_names_the_prompt(api):
    """4,001 astral characters are counted as characters: the prompt is named, 422."""
    body = with_input(prompt="\U0001f600" * 4001)
    assert_rejects(api.post("/v1/jobs", content=body, headers=JSON), 422, "#/input/prompt")


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "",
        "application/json; charset=utf-16",
        "application/json; charset=latin-1",
        "application/" + "j" * 16_384,
    ],
)
def test_a_body_not_sent_as_utf8_json_answers_415(api, content_type):
    """A body declared as anything but UTF-8 JSON answers 415, whatever it holds."""
    answer = api.post("/v1/jobs", content=encoded(), headers={"Content-Type": content_type})
    assert_rejects(answer, 415)
    assert answer.headers["accept-post"] == "application/json"


@pytest.mark.parametrize(
    "content_type",
    [None, "application/json", "APPLICATION/JSON", 'application/json; charset="UTF-8"'],
)
def test_json_declared_as_such_or_not_at_all_is_accepted(api, content_type):
    """JSON is accepted with no Content-Type, or one saying JSON in UTF-8 in any spelling."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    assert api.post("/v1/jobs", content=encoded(), headers=headers).status_code == 202


LONG = "h" * 16_384  # long, within the 32 KiB a request head may take


@pytest.mark.parametrize(
    ("headers", "status", "pointer"),
    [
        ({"Authorization": "Bearer " + LONG}, 401, None),
        ({"Authorization": LONG}, 401, None),
        ({"Idempotency-Key": LONG}, 400, "#/Idempotency-Key"),
        ({"Idempotency-Key": ""}, 400, "#/Idempotency-Key"),
        ({"Idempotency-Key": "k" * 256}, 400, "#/Idempotency-Key"),
        ({"Authorization": b"Bearer \xff\xfe"}, 401, None),
        ({"Authorization": "Basic dXNlcjpwYXNz"}, 401, None),
        ({"Authorization": "Bearer"}, 401, None),
        ({"Authorization": "Bearer " + TENANT.api_key + " extra"}, 401, None),
    ],
    ids=[
        "long-bearer",
        "long-authorization",
        "long-idempotency-key",
        "empty-idempotency-key",
        "idempotency-key-256",
        "authorization-not-utf8",
        "basic-auth",
        "bearer-without-key",
        "key-and-more",
    ],
)
def test_hostile_headers_answer_a_4xx_problem(api, headers, status, pointer):
    """Over-long, empty and non-UTF-8 header values answer their 4xx problem+json."""
    answer = api.post("/v1/jobs", content=encoded(), headers={**JSON, **headers})
    assert_rejects(answer, status, pointer)


def test_long_headers_the_api_does_not_read_do_not_matter(api):
    """Three headers of 8 KB each that the API ignores change nothing about the answer."""
    padding = {f"X-Padding-{i}": "h" * 8192 for i in range(3)}
    answer = api.post("/v1/jobs", content=b"[]", headers={**JSON, **padding})
    assert_rejects(answer, 400)


@pytest.mark.parametrize(
    "headers",
    [{"X-Padding": "h" * 40_000}, {f"X-H{i}": "v" for i in range(101)}],
    ids=["40-kb-header", "101-headers"],
)
def test_a_head_over_its_limits_answers_431(api, headers):
    """A request head over 32 KiB or 100 header fields answers a 431 problem, unread."""
    assert_rejects(api.post("/v1/jobs", content=encoded(), headers={**JSON, **headers}), 431)


def test_an_idempotency_key_that_is_not_utf8_is_an_opaque_key(api):
    """An Idempotency-Key of arbitrary bytes is hashed as sent: a replay answers the same job."""
    headers = {**JSON, "Idempotency-Key": b"\xff\xfe key \x80"}
    first = api.post("/v1/jobs", content=encoded(), headers=headers)
    assert first.status_code == 202, first.text
    replay = api.post("/v1/jobs", content=encoded(), headers=headers)
    assert (replay.status_code, replay.json()["id"]) == (200, first.json()["id"])


@pytest.mark.parametrize(
    ("query", "pointer"),
    [
        ("limit=0", "#/limit"),
        ("limit=101", "#/limit"),
        ("limit=-1", "#/limit"),
        ("limit=abc", "#/limit"),
        ("limit=1e3", "#/limit"),
        ("limit=1.5", "#/limit"),
        ("limit=" + "9" * 5000, "#/limit"),
        ("limit=", "#/limit"),
        ("limit=%00", "#/limit"),
        ("status=bogus", "#/status"),
        ("status=%ff", "#/status"),
        ("status=pending%00", "#/status"),
        ("cursor=job_x", "#/cursor"),
        ("cursor=" + "c" * 10_000, "#/cursor"),
    ],
)
def test_hostile_query_parameters_answer_422_naming_them(api, query, pointer):
    """A bad `limit`, `status` or `cursor` answers 422 naming exactly that parameter."""
    assert_rejects(api.get(f"/v1/jobs?{query}"), 422, pointer)


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/job_%00",
        "/v1/jobs/%ff%fe",
        "/v1/jobs/" + "j" * 10_000,
        "/v1/jobs/../../etc/passwd",
        "/v1/jobs/job_01M85C69CZ3V1WRAEQA912FQCJ/deliveries",
        "/v1/jobs/%2e%2e%2f",
        "/v1/nothing-here",
        "/" + "x" * 10_000,
    ],
)
def test_unknown_paths_and_ids_answer_404_problems(api, path):
    """Ids that are no job and paths that are no route answer a 404 problem."""
    assert_rejects(api.get(path), 404)


@pytest.mark.parametrize(
    ("method", "path"),
    [("DELETE", "/v1/jobs"), ("PUT", "/v1/jobs"), ("PATCH", "/v1/jobs/x"), ("POST", "/healthz")],
)
def test_other_methods_answer_405_problems(api, method, path):
    """A method a route does not take answers 405 problem+json with an Allow header."""
    answer = api.request(method, path, content=b"{}", headers=JSON)
    assert_rejects(answer, 405)
    assert answer.headers["allow"]


@pytest.mark.parametrize(
    ("path", "allow"),
    [
        ("/v1/jobs", "GET, OPTIONS, POST"),
        ("/v1/jobs/x", "GET, OPTIONS"),
        ("/v1/jobs/x/cancel", "OPTIONS, POST"),
        ("/v1/jobs/x/deliveries", "GET, OPTIONS, POST"),
        ("/healthz", "GET, OPTIONS"),
    ],
)
def test_options_names_every_method_of_the_path(api, path, allow):
    """OPTIONS answers 204 with an Allow naming every method of the path, not only the first."""
    answer = api.options(path)
    assert (answer.status_code, answer.headers["allow"]) == (204, allow)


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Nul: a\x00b\r\n\r\n",
        b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nX-Bad Name: a\r\n\r\n",
        b"GET /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
        b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n{}",
        b"GET /v1/jobs HTTP/9.9\r\nHost: x\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
    ],
    ids=["nul-in-header", "space-in-name", "negative-length", "two-lengths", "http-9", "tls"],
)
def test_requests_that_are_not_http_answer_400_from_the_server(gateway, request_bytes):
    """Malformed HTTP never reaches the app: uvicorn answers 400 (or closes), never a 5xx."""
    with socket.create_connection(("127.0.0.1", int(gateway.url.rsplit(":", 1)[1])), 5) as conn:
        conn.sendall(request_bytes)
        conn.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := conn.recv(65_536):
            answer += chunk
    if answer:  # uvicorn may also just close the connection: that is fine too
        status = int(answer.split(b" ", 2)[1])
        assert 400 <= status < 500, answer
        assert b"Traceback" not in answer
    with gateway.client() as client:  # and the server still serves
        assert client.get("/healthz").status_code == 200


# Schemathesis: the checked-in document, fuzzed against the running API

SCHEMA = schemathesis.openapi.from_path(DOCUMENT)
SCHEMA.config.generation.update(
    modes=[schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE],
    with_security_parameters=False,  # the tenant's key is sent instead
    database="none",
)
FUZZ_EXAMPLES = 40


@pytest.fixture(scope="module")
def fuzz_totals(gateway: Gateway) -> Iterator[Gateway]:
    yield gateway
    print(f"\nschemathesis: {gateway.cases} cases, {gateway.server_errors} answered 5xx")


@pytest.fixture(scope="module")
def a_job(gateway: Gateway) -> str:
    """A real job with a webhook, so the job routes answer more than 404."""
    with gateway.client() as client:
        answer = client.post(
            "/v1/jobs", json=job_body(webhook={"url": "https://hooks.example.com/h"})
        )
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["id"]
    return job_id


BEYOND_THE_DOCUMENT = (
    "#/input/video_url",
    "#/webhook/url",
    "#/metadata",
    "#/from",
    "#/to",
    "#/since",
    "#/until",
)
"""Fields with a rule no JSON Schema can state: a public address, the tenant's callback
hosts, metadata's size as JSON and its depth, usage's range (`from` not after `to`,
at most 92 days: a rule between two parameters) and a recovery's window (`until` not
before `since`, both with a time zone offset)."""
WRITTEN_AS_A_FRACTION = "must be an integer, not a number"
"""JSON Schema counts 129.0 as an integer; the API, like RunComfy, wants it written 129."""


def beyond_the_document(error: dict[str, str]) -> bool:
    return error["pointer"].startswith(BEYOND_THE_DOCUMENT) or error["detail"] == (
        WRITTEN_AS_A_FRACTION
    )


def valid_data_is_accepted(ctx, response, case):
    """Schemathesis' `positive_data_acceptance`, but for a 422 naming only such errors."""
    if response.status_code == 422:
        errors = json.loads(response.content).get("errors", [])
        if errors and all(beyond_the_document(error) for error in errors):
            return None
    return positive_data_acceptance(ctx, response, case)


@SCHEMA.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_conforms_to_the_document(case, fuzz_totals, a_job):
    """No generated request gets a 5xx, and every answer is what the document says."""
    if "job_id" in (case.path_parameters or {}) and case.meta.generation.mode.is_positive:
        # A random id only ever answers 404; a real one gets the job, 409s, a re-send.
        case.path_parameters["job_id"] = a_job
    # The admin routes are fuzzed with the admin key (a tenant's answers them 401 only).
    key = ADMIN_KEY if case.path.startswith("/v1/admin/") else TENANT.api_key
    response = case.call_and_validate(
        base_url=fuzz_totals.url,
        headers={"Authorization": f"Bearer {key}"},
        excluded_checks=[positive_data_acceptance],
        additional_checks=[valid_data_is_accepted],
    )
    fuzz_totals.count(response.status_code)
    assert not fuzz_totals.errors, [record.getMessage() for record in fuzz_totals.errors]
