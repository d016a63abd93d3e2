"""Job request validation as pure functions: pointers, messages, defaults, canonical digests."""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.api.validation import (
    InvalidInputError,
    MalformedBodyError,
    decode_object,
    idempotency_key_hash,
    parse_job_request,
    request_digest,
    validate_job_request,
)
from service.models import MAX_METADATA_BYTES, JobRequest

HOSTS = ("hooks.example.com", "*.orders.internal")
VIDEO = "https://example.com/in.mp4"


def body(**extra: Any) -> dict[str, Any]:
    return {"input": {"prompt": "a paper boat", "video_url": VIDEO}, **extra}


def errors_of(data: dict[str, Any]) -> dict[str, str]:
    with pytest.raises(InvalidInputError) as caught:
        validate_job_request(data, callback_hosts=HOSTS)
    return {e.pointer: e.detail for e in caught.value.errors}


def test_minimal_request_gets_every_default():
    """A request with only prompt and video_url is filled with the schema's defaults."""
    request = validate_job_request(body(), callback_hosts=HOSTS)
    video = request.input
    assert (video.pro_mode, video.resolution, video.aspect_ratio) == (False, "720p", "16:9")
    assert (video.num_frames, video.strength) == (129, 0.85)
    assert request.model == "tencent/hunyuan/video-to-video"
    assert request.webhook is None
    assert request.metadata is None


def test_every_offending_field_is_named_at_once():
    """Errors at every level come back together, one pointer per field."""
    data = {
        "input": {"video_url": "ftp://example.com/v.mp4", "seed": 1.5, "steps": 3},
        "webhook": {"url": "https://evil.example.net/h", "events": ["job.done"], "x": 1},
        "metadata": [],
        "extra": True,
    }
    assert set(errors_of(data)) == {
        "#/input/prompt",
        "#/input/video_url",
        "#/input/seed",
        "#/input/steps",
        "#/webhook/url",
        "#/webhook/events/0",
        "#/webhook/x",
        "#/metadata",
        "#/extra",
    }


def test_messages_say_what_is_expected():
    """Details say what a field must be, in plain words."""
    data = body()
    data["input"] |= {"seed": True, "num_frames": 100, "strength": 0, "prompt": ""}
    errors = errors_of(data)
    assert errors["#/input/seed"] == "must be an integer, not a boolean"
    assert errors["#/input/num_frames"] == "must be one of 85, 129"
    assert errors["#/input/strength"] == "must be >= 0.01"
    assert errors["#/input/prompt"] == "must not be empty"


def test_unknown_field_names_are_escaped_as_json_pointers():
    """A field name holding `/` or `~` is escaped per RFC 6901 in its pointer."""
    data = body()
    data["input"]["a/b~c"] = 1
    assert "#/input/a~1b~0c" in errors_of(data)


def test_repeated_webhook_events_are_kept_once():
    """Duplicate events are dropped, so five entries naming four events are fine."""
    events = ["job.failed", "job.failed", "job.completed", "job.started", "job.cancelled"]
    request = validate_job_request(
        body(webhook={"url": "https://hooks.example.com/h", "events": events}),
        callback_hosts=HOSTS,
    )
    assert request.webhook is not None
    assert request.webhook.events == ["job.failed", "job.completed", "job.started", "job.cancelled"]


def test_an_empty_event_list_is_rejected():
    """A webhook must ask for at least one event."""
    errors = errors_of(body(webhook={"url": "https://hooks.example.com/h", "events": []}))
    assert errors == {"#/webhook/events": "must name at least one event"}


def test_metadata_is_measured_as_json():
    """Metadata up to 4 KB of JSON is accepted; one byte more is not."""
    overhead = len('{"k":""}')
    fits = {"k": "x" * (MAX_METADATA_BYTES - overhead)}
    assert validate_job_request(body(metadata=fits), callback_hosts=HOSTS).metadata == fits
    too_big = {"k": "x" * (MAX_METADATA_BYTES - overhead + 1)}
    assert "#/metadata" in errors_of(body(metadata=too_big))


def test_webhook_and_metadata_may_be_null():
    """`null` for the optional objects means the same as leaving them out."""
    request = validate_job_request(body(webhook=None, metadata=None), callback_hosts=HOSTS)
    assert request.webhook is None
    assert request.metadata is None


def test_digest_ignores_formatting_key_order_and_spelled_out_defaults():
    """Two requests that mean the same thing have the same idempotency digest."""
    short = validate_job_request(body(metadata={"a": 1, "b": 2}), callback_hosts=HOSTS)
    spelled = body(metadata={"b": 2, "a": 1}, model="tencent/hunyuan/video-to-video")
    spelled["input"] = {"strength": 0.85, "video_url": VIDEO, "prompt": "a paper boat"}
    long = validate_job_request(spelled, callback_hosts=HOSTS)
    assert request_digest(short) == request_digest(long)
    other = validate_job_request(body(metadata={"a": 1, "b": 3}), callback_hosts=HOSTS)
    assert request_digest(other) != request_digest(short)


def test_idempotency_keys_are_stored_hashed():
    """An Idempotency-Key is kept as its SHA-256 hex digest."""
    digest = idempotency_key_hash("order-4711")
    assert len(digest) == 64
    assert "order-4711" not in digest


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"", "empty"),
        (b"   ", "empty"),
        (b"{not json", "not valid JSON"),
        (b"[1, 2]", "not an array"),
        (b'"text"', "not a string"),
        (b"42", "not a number"),
        (b"null", "not null"),
        (b"\xff\xfe", "not valid JSON"),
    ],
)
def test_a_body_that_is_not_a_json_object_is_malformed(raw, says):
    """Anything but a JSON object is refused before any field is looked at."""
    with pytest.raises(MalformedBodyError, match=says):
        decode_object(raw)


# The fast path of `parse_job_request` against the full way


class Members(list[tuple[str, Any]]):
    """A JSON object written member by member, so a name may come twice."""


def dump(value: Any, escape: st.DataObject) -> str:
    """`value` as JSON text; strings now and then spelled with escapes, colons included."""
    if isinstance(value, Members):
        return "{" + ", ".join(f"{dump(k, escape)}: {dump(v, escape)}" for k, v in value) + "}"
    if isinstance(value, list):
        return "[" + ",".join(dump(v, escape) for v in value) + "]"
    if isinstance(value, str) and escape.draw(st.integers(0, 7)) == 0:
        return json.dumps(value, ensure_ascii=True).replace(":", "\\u003a")
    return json.dumps(value, ensure_ascii=False)


def members(
    fields: dict[str, st.SearchStrategy[Any]], required: tuple[str, ...] = ()
) -> st.SearchStrategy[Members]:
    """Objects naming the required fields and some others, now and then one twice or unknown."""
    optional = [name for name in fields if name not in required]

    def build(names: list[str], more: list[str], data: st.DataObject) -> Members:
        chosen = [*required, *names, *more]
        return Members((name, data.draw(fields.get(name, values))) for name in chosen)

    return st.builds(
        build,
        st.lists(st.sampled_from(optional), unique=True) if optional else st.just([]),
        st.one_of(
            st.just([]),
            st.just([]),
            st.just([]),
            st.lists(st.sampled_from([*fields, "x"]), max_size=2),
        ),
        st.data(),
    )


def mostly(
    valid: st.SearchStrategy[Any], invalid: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """Valid values three times in four, so the fast path gets to accept some bodies."""
    return st.one_of(valid, valid, valid, invalid)


texts = st.text(st.sampled_from("ab:/~\x00\t é\U0001f600"), max_size=6)
scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**65), 2**65), st.floats(allow_nan=False), texts
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(st.tuples(texts, inner), max_size=3).map(Members),
    ),
    max_leaves=8,
)
video_urls = mostly(
    st.sampled_from([VIDEO, "https://example.com:8443/a:b.mp4", "http://93.184.215.14/v"]),
    st.sampled_from(
        ["http://localhost/v.mp4", "ftp://example.com/v.mp4", "https://exa mple.com/v", ""]
    ),
)
hook_urls = mostly(
    st.sampled_from(["https://hooks.example.com/h:1", "https://x.orders.internal:8443/h"]),
    st.sampled_from(["https://evil.example.net/h", "https://u:p@hooks.example.com/h", VIDEO]),
)
video = members(
    {
        "prompt": mostly(st.text(st.sampled_from("ab: é\U0001f600"), min_size=1), texts),
        "video_url": video_urls,
        "seed": mostly(st.integers(-(2**63), 2**64 - 1), st.sampled_from([2**64, -(2**63) - 1])),
        "pro_mode": mostly(st.booleans(), st.just(1)),
        "resolution": st.sampled_from(["480p", "580p", "720p", "1080p"]),
        "aspect_ratio": st.sampled_from(["16:9", "9:16", "4:3"]),
        "num_frames": st.sampled_from([85, 129, 129.0]),
        "strength": mostly(st.floats(0.01, 1), st.sampled_from([0, 1.5, True])),
    },
    ("prompt", "video_url"),
)
event_names = ["job.started", "job.completed", "job.failed", "job.cancelled"]
events = mostly(st.lists(st.sampled_from(event_names), min_size=1), st.lists(st.just("job.x")))
hook = members({"url": hook_urls, "events": events}, ("url",))
request_bodies = members(
    {
        "input": video,
        "webhook": st.one_of(st.none(), hook),
        "metadata": st.one_of(st.none(), values.map(lambda v: Members([("m", v)]))),
        "model": mostly(st.just("tencent/hunyuan/video-to-video"), texts),
    },
    ("input",),
)


def outcome(parse: Any) -> tuple[str, Any]:
    """What a caller sees of a parse: the request, or the error and what it names."""
    try:
        request: JobRequest = parse()
    except InvalidInputError as invalid:
        return "invalid", [(e.pointer, e.detail) for e in invalid.errors]
    except MalformedBodyError as malformed:
        return "malformed", str(malformed)
    return "valid", msgspec.to_builtins(request)


@settings(
    max_examples=600,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(request_bodies, st.data())
def test_the_fast_path_answers_exactly_what_the_full_validation_answers(document, escape):
    """Any body, duplicates and escapes included, parses to what decode-then-validate says."""
    raw = dump(document, escape).encode()
    full = outcome(lambda: validate_job_request(decode_object(raw), callback_hosts=HOSTS))
    assert outcome(lambda: parse_job_request(raw, callback_hosts=HOSTS)) == full


def test_a_valid_body_repeating_a_member_is_still_malformed():
    """A name repeated in `input`, even with the same value, answers malformed, fast path or not."""
    raw = b'{"input": {"prompt": "a:b", "prompt": "a:b", "video_url": "' + VIDEO.encode() + b'"}}'
    with pytest.raises(MalformedBodyError, match="twice"):
        parse_job_request(raw, callback_hosts=HOSTS)


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8000/in.mp4", "http://bench.internal/in.mp4", "http://localhost/in.mp4"],
)
def test_a_video_url_on_an_allowed_host_may_be_private(url):
    """The allow list lets exactly its hosts serve inputs from private addresses."""
    allowed = ("127.0.0.1", "*.internal", "localhost")
    raw = json.dumps(body(input={"prompt": "p", "video_url": url})).encode()
    assert parse_job_request(raw, callback_hosts=HOSTS, input_hosts=allowed).input.video_url == url
    assert (
        validate_job_request(
            json.loads(raw), callback_hosts=HOSTS, input_hosts=allowed
        ).input.video_url
        == url
    )


@pytest.mark.parametrize(
    "url", ["http://127.0.0.2/in.mp4", "http://127.1/in.mp4", "http://169.254.169.254/latest"]
)
def test_an_allowed_host_opens_no_other_private_address(url):
    """Another loopback address, a disguised spelling and the metadata address stay refused."""
    allowed = ("127.0.0.1", "169.254.169.254")
    raw = json.dumps(body(input={"prompt": "p", "video_url": url})).encode()
    with pytest.raises(InvalidInputError) as caught:
        parse_job_request(raw, callback_hosts=HOSTS, input_hosts=allowed)
    assert caught.value.errors[0].pointer == "#/input/video_url"
