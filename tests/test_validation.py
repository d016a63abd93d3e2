"""Job request validation as pure functions: pointers, messages, defaults, canonical digests."""

from __future__ import annotations

from typing import Any

import pytest

from service.api.validation import (
    InvalidInputError,
    MalformedBodyError,
    decode_object,
    idempotency_key_hash,
    request_digest,
    validate_job_request,
)
from service.models import MAX_METADATA_BYTES

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
