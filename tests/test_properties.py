"""Property tests of input validation, driven by the model input schema (docs/runcomfy.md).

The schema is written out here from the design, not read from `models.py`, so the
code is checked against the contract rather than against itself. Whatever the schema
allows is accepted with every default filled in exactly; each way of breaking one
field is rejected with a 422 naming exactly that field. Most properties call the
validation function directly (fast); one goes through HTTP to the job answer.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from litestar.testing import TestClient

from service.api.app import create_app
from service.api.validation import (
    InvalidInputError,
    MalformedBodyError,
    decode_object,
    validate_job_request,
)
from service.config import load_settings
from service.store.keys import Keys
from tests.support import inet_aton_spelling, new_tenant

TENANT = new_tenant("orders")
HOSTS = ("hooks.example.com", "*.orders.internal")
MODEL = "tencent/hunyuan/video-to-video"

BOUNDED = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# docs/runcomfy.md: the model input's schema, field by field.
DEFAULTS: dict[str, Any] = {
    "pro_mode": False,
    "resolution": "720p",
    "aspect_ratio": "16:9",
    "num_frames": 129,
    "strength": 0.85,
}
ENUMS: dict[str, list[Any]] = {
    "resolution": ["480p", "580p", "720p"],
    "aspect_ratio": ["16:9", "9:16"],
    "num_frames": [85, 129],
}
REQUIRED = ("prompt", "video_url")
FIELDS = (*REQUIRED, "seed", *DEFAULTS)
EVENTS = ["job.started", "job.completed", "job.failed", "job.cancelled"]
SEED_RANGE = (-(2**63), 2**64 - 1)  # any 64-bit seed, signed or unsigned

# Strategies for what the schema allows

no_nul = st.characters(codec="utf-8", exclude_characters="\x00")  # what JSON can carry
prompts = st.one_of(
    st.text(no_nul, min_size=1, max_size=80),
    st.text(no_nul, min_size=1, max_size=3).map(lambda s: (s * 4000)[:4000]),
)
labels = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?", fullmatch=True)
dns_hosts = st.builds(
    lambda names, tld: ".".join([*names, tld]),
    st.lists(labels, min_size=1, max_size=3),
    st.sampled_from(["com", "net", "io", "example", "video"]),
)
global_ipv4 = st.ip_addresses(v=4).filter(lambda ip: ip.is_global).map(str)
url_paths = st.text(
    st.characters(codec="ascii", exclude_categories=["Cc"], exclude_characters=" "),
    max_size=60,
).map(lambda path: "/" + path)
public_urls = st.builds(
    lambda scheme, host, port, path: f"{scheme}://{host}{port}{path}",
    st.sampled_from(["http", "https", "HTTPS"]),
    st.one_of(dns_hosts, global_ipv4),
    st.one_of(st.just(""), st.integers(1, 65535).map(lambda p: f":{p}")),
    url_paths,
).filter(lambda url: len(url) <= 2048)
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(no_nul, max_size=20),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(no_nul, max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
metadata = st.dictionaries(st.text(no_nul, max_size=10), json_values, max_size=6)

optional_fields = st.fixed_dictionaries(
    {},
    optional={
        "seed": st.integers(*SEED_RANGE),
        "pro_mode": st.booleans(),
        "resolution": st.sampled_from(ENUMS["resolution"]),
        "aspect_ratio": st.sampled_from(ENUMS["aspect_ratio"]),
        "num_frames": st.sampled_from(ENUMS["num_frames"]),
        "strength": st.one_of(st.floats(0.01, 1.0), st.just(1)),
    },
)
inputs = st.builds(
    lambda prompt, url, optional: {"prompt": prompt, "video_url": url, **optional},
    prompts,
    public_urls,
    optional_fields,
)
webhook_urls = st.builds(
    lambda host, path: f"https://{host}{path}",
    st.one_of(st.just("hooks.example.com"), labels.map(lambda label: f"{label}.orders.internal")),
    url_paths,
)
webhooks = st.fixed_dictionaries(
    {"url": webhook_urls},
    optional={"events": st.lists(st.sampled_from(EVENTS), min_size=1, max_size=4)},
)
requests = st.builds(
    lambda input_, optional: {"input": input_, **optional},
    inputs,
    st.fixed_dictionaries(
        {},
        optional={
            "model": st.just(MODEL),
            "webhook": st.one_of(st.none(), webhooks),
            "metadata": st.one_of(st.none(), metadata),
        },
    ),
).filter(lambda body: len(json.dumps(body.get("metadata"))) <= 4096)


def expected_input(sent: dict[str, Any]) -> dict[str, Any]:
    """The input as the job must hold it: what was sent, every absent default filled in."""
    return {**DEFAULTS, **sent}


def validate(body: dict[str, Any]) -> Any:
    return validate_job_request(body, callback_hosts=HOSTS)


def pointers_of(body: dict[str, Any]) -> list[str]:
    """The pointers the 422 names, in order (the request must be refused)."""
    with pytest.raises(InvalidInputError) as refused:
        validate(body)
    return [error.pointer for error in refused.value.errors]


def escaped(name: str) -> str:
    return name.replace("~", "~0").replace("/", "~1")


# Whatever the schema allows is accepted, with defaults filled in exactly


@BOUNDED
@given(requests)
def test_every_request_the_schema_allows_is_accepted_with_its_defaults(body):
    """A request the seed schema allows validates, and its input is what was sent plus defaults."""
    request = validate(body)
    assert msgspec.to_builtins(request.input) == expected_input(body["input"])
    assert request.model == MODEL
    assert request.metadata == body.get("metadata")
    webhook = body.get("webhook")
    if webhook is None:
        assert request.webhook is None
    else:
        assert request.webhook is not None
        assert request.webhook.url == webhook["url"]
        events = webhook.get("events", ["job.completed", "job.failed", "job.cancelled"])
        assert request.webhook.events == list(dict.fromkeys(events))


@BOUNDED
@given(inputs)
def test_an_absent_seed_stays_absent(fields):
    """No seed means none is sent upstream: the schema gives it no default."""
    fields.pop("seed", None)
    assert "seed" not in msgspec.to_builtins(validate({"input": fields}).input)


# Anything else is rejected, naming exactly the offending field

JSON_TYPES: dict[str, st.SearchStrategy[Any]] = {
    "null": st.none(),
    "boolean": st.booleans(),
    "integer": st.integers(-(2**63), 2**63 - 1),
    "fraction": st.floats(allow_nan=False, allow_infinity=False).filter(
        lambda x: not x.is_integer()
    ),
    "integral float": st.integers(-(2**53), 2**53).map(float),
    "string": st.text(no_nul, max_size=10),
    "array": st.lists(json_scalars, max_size=3),
    "object": st.dictionaries(st.text(no_nul, max_size=5), json_scalars, max_size=3),
}
ALLOWED_TYPES: dict[str, set[str]] = {
    "prompt": {"string"},
    "video_url": {"string"},
    "seed": {"integer"},
    "pro_mode": {"boolean"},
    "resolution": {"string"},
    "aspect_ratio": {"string"},
    "num_frames": {"integer"},
    "strength": {"integer", "fraction", "integral float"},
}


@st.composite
def wrongly_typed(draw: st.DrawFn) -> tuple[str, Any]:
    """A field of the input and a value of a JSON type the schema does not allow for it."""
    name = draw(st.sampled_from(FIELDS))
    kind = draw(st.sampled_from(sorted(set(JSON_TYPES) - ALLOWED_TYPES[name])))
    return name, draw(JSON_TYPES[kind])


@BOUNDED
@given(inputs, wrongly_typed())
def test_a_field_of_the_wrong_type_is_named(fields, wrong):
    """A value of the wrong JSON type (booleans are not numbers) is named by its pointer."""
    name, value = wrong
    fields[name] = value
    assert pointers_of({"input": fields}) == [f"#/input/{name}"]


@BOUNDED
@given(
    inputs,
    st.one_of(
        st.floats(max_value=0.01, exclude_max=True, allow_nan=False),
        st.floats(min_value=1.0, exclude_min=True, allow_nan=False),
        st.integers(max_value=0),
        st.integers(min_value=2),
    ),
)
def test_a_strength_out_of_range_is_named(fields, strength):
    """A strength below 0.01 or above 1 is named; infinities too."""
    fields["strength"] = strength
    assert pointers_of({"input": fields}) == ["#/input/strength"]


@BOUNDED
@given(inputs, st.sampled_from(sorted(ENUMS)), st.data())
def test_any_other_enum_value_is_named(fields, name, data):
    """A value outside the field's enum (other strings, other integers) is named."""
    allowed = ENUMS[name]
    other = st.integers() if isinstance(allowed[0], int) else st.text(max_size=8)
    fields[name] = data.draw(other.filter(lambda value: value not in allowed))
    assert pointers_of({"input": fields}) == [f"#/input/{name}"]


@BOUNDED
@given(
    inputs,
    st.one_of(
        st.integers(max_value=SEED_RANGE[0] - 1),
        st.integers(min_value=SEED_RANGE[1] + 1),
        st.integers(65, 4000).map(lambda bits: 2**bits),
    ),
)
def test_a_seed_beyond_64_bits_is_named(fields, seed):
    """A seed no 64-bit integer holds is named rather than sent upstream."""
    fields["seed"] = seed
    assert pointers_of({"input": fields}) == ["#/input/seed"]


KNOWN = {"": {"input", "model", "webhook", "metadata"}, "/input": set(FIELDS)}


@BOUNDED
@given(requests, st.sampled_from(sorted(KNOWN)), st.text(max_size=12), json_values)
def test_an_unknown_field_is_named(body, where, name, value):
    """An unknown member, at the top or in `input`, is named by its escaped pointer."""
    assume(name not in KNOWN[where])
    target = body if where == "" else body["input"]
    target[name] = value
    assert pointers_of(body) == [f"#{where}/{escaped(name)}"]


@BOUNDED
@given(requests, webhooks, st.text(max_size=12).filter(lambda n: n not in {"url", "events"}))
def test_an_unknown_webhook_field_is_named(body, webhook, name):
    """An unknown member of `webhook` is named too."""
    body["webhook"] = {**webhook, name: 1}
    assert pointers_of(body) == [f"#/webhook/{escaped(name)}"]


@BOUNDED
@given(requests, st.sampled_from(REQUIRED))
def test_a_missing_required_field_is_named(body, name):
    """A request without prompt or video_url names the one missing."""
    del body["input"][name]
    assert pointers_of(body) == [f"#/input/{name}"]


@BOUNDED
@given(requests)
def test_a_request_without_input_names_it(body):
    """A request without `input` names `#/input`, whatever else it holds."""
    del body["input"]
    assert pointers_of(body) == ["#/input"]


OTHER_SCHEMES = ["ftp", "file", "gopher", "ws", "wss", "data", "javascript", "s3", "rtmp", "httpx"]


@BOUNDED
@given(
    inputs,
    st.one_of(
        st.builds(
            lambda scheme, host, path: f"{scheme}://{host}{path}",
            st.one_of(
                st.sampled_from(OTHER_SCHEMES),
                st.from_regex(r"[a-z][a-z0-9+.-]{0,8}", fullmatch=True).filter(
                    lambda scheme: scheme not in {"http", "https"}
                ),
            ),
            dns_hosts,
            url_paths,
        ),
        st.builds(lambda host, path: f"//{host}{path}", dns_hosts, url_paths),
        st.builds(lambda host, path: f"{host}{path}", dns_hosts, url_paths),
        url_paths,
    ),
)
def test_a_video_url_that_is_not_http_is_named(fields, url):
    """A video_url with another scheme, or none, is named."""
    fields["video_url"] = url
    assert pointers_of({"input": fields}) == ["#/input/video_url"]


@BOUNDED
@given(
    inputs,
    st.one_of(
        st.sampled_from(["localhost", "video.localhost", "[::1]", "[fe80::1]"]),
        st.ip_addresses(v=4).filter(lambda ip: not ip.is_global).map(str),
        st.ip_addresses(v=6).filter(lambda ip: not ip.is_global).map(lambda ip: f"[{ip}]"),
        st.builds(
            inet_aton_spelling,
            st.ip_addresses(v=4).filter(lambda ip: not ip.is_global).map(int),
            st.integers(1, 4),
            st.lists(st.sampled_from([8, 10, 16]), min_size=4, max_size=4),
        ),
    ),
    url_paths,
)
def test_a_video_url_that_is_not_public_is_named(fields, host, path):
    """A video_url on localhost or a non-public address, however spelled, is named."""
    fields["video_url"] = f"https://{host}{path}"
    assert pointers_of({"input": fields}) == ["#/input/video_url"]


@BOUNDED
@given(
    inputs,
    st.sampled_from(["prompt", "video_url"]),
    st.text(no_nul, min_size=1, max_size=4),
    st.integers(1, 300),
)
def test_an_over_long_string_is_named(fields, name, unit, extra):
    """A prompt over 4,000 characters, or a video_url over 2,048, is named."""
    limit = 4000 if name == "prompt" else 2048
    if name == "prompt":
        fields["prompt"] = (unit * (limit + extra))[: limit + extra]
    else:
        fields["video_url"] = "https://example.com/" + "v" * (limit + extra)
    assert pointers_of({"input": fields}) == [f"#/input/{name}"]


@BOUNDED
@given(inputs, st.sampled_from(["prompt", "video_url"]), st.integers(0, 30))
def test_a_nul_character_is_named(fields, name, at):
    """A NUL character anywhere in a string is named: much downstream cannot store it."""
    value = fields[name]
    at = min(at, len(value))
    fields[name] = value[:at] + "\x00" + value[at:]
    assert pointers_of({"input": fields}) == [f"#/input/{name}"]


@BOUNDED
@given(
    requests,
    st.lists(st.sampled_from(EVENTS), max_size=4),
    st.text(max_size=12).filter(lambda event: event not in EVENTS),
    st.data(),
)
def test_an_unknown_webhook_event_is_named_by_its_index(body, events, unknown, data):
    """An unknown event is named by its index in `events`: webhook.events are a closed set."""
    at = data.draw(st.integers(0, len(events)))
    events.insert(at, unknown)
    body["webhook"] = {"url": "https://hooks.example.com/h", "events": events}
    assert pointers_of(body) == [f"#/webhook/events/{at}"]


# Nothing else ever escapes


@BOUNDED
@given(st.dictionaries(st.text(max_size=10), json_values, max_size=5), st.data())
def test_validation_only_ever_accepts_or_names_fields(body, data):
    """Any JSON object validates, or raises InvalidInputError naming pointers: nothing else."""
    if data.draw(st.booleans()):
        body["input"] = data.draw(st.one_of(json_values, inputs))
    try:
        validate(body)
    except InvalidInputError as refused:
        errors = refused.errors
        assert errors
    else:
        errors = []
    assert all(error.pointer.startswith("#/") and error.detail for error in errors)


@BOUNDED
@given(st.one_of(st.binary(max_size=200), json_values.map(lambda v: json.dumps(v).encode())))
def test_decoding_only_ever_answers_an_object_or_malformed(raw):
    """Any bytes decode to a JSON object or raise MalformedBodyError, nothing else."""
    try:
        decoded: object = decode_object(raw)
    except MalformedBodyError as malformed:
        decoded = str(malformed)
    assert isinstance(decoded, dict) or decoded


# Through HTTP


@pytest.fixture(scope="module")
def http(redis_server, tmp_path_factory) -> Iterator[TestClient[Any]]:
    tenants = tmp_path_factory.mktemp("properties") / "tenants.toml"
    tenants.write_text(TENANT.toml(hosts=HOSTS))
    env = {
        "REDIS_URL": redis_server.url,
        "RUNCOMFY_API_TOKEN": "properties-token",
        "GATEWAY_TENANTS_FILE": str(tenants),
    }
    app = create_app(load_settings(env), keys=Keys(prefix="{p" + uuid.uuid4().hex[:12] + "}"))
    with TestClient(app) as client:
        client.headers["Authorization"] = f"Bearer {TENANT.api_key}"
        yield client


@settings(BOUNDED, max_examples=60)
@given(body=requests)
def test_an_allowed_request_answers_202_with_its_defaults(http, body):
    """Over HTTP, an allowed request answers 202 and the job holds its input with defaults."""
    answer = http.post("/v1/jobs", json=body)
    assert answer.status_code == 202, answer.text
    assert answer.json()["input"] == expected_input(body["input"])


@settings(BOUNDED, max_examples=60)
@given(fields=inputs, wrong=wrongly_typed())
def test_a_wrongly_typed_field_answers_422_naming_it(http, fields, wrong):
    """Over HTTP, a field of the wrong type answers a 422 problem naming exactly that field."""
    name, value = wrong
    fields[name] = value
    answer = http.post("/v1/jobs", json={"input": fields})
    assert answer.status_code == 422, answer.text
    assert answer.headers["content-type"].startswith("application/problem+json")
    assert [error["pointer"] for error in answer.json()["errors"]] == [f"#/input/{name}"]
