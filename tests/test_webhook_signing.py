import base64
import os
import time

import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from service.webhooks.signing import parse_secret, sign, webhook_headers

BODY = b'{"type":"job.completed","timestamp":"2026-01-01T00:00:00Z","data":{"id":"job_1"}}'


def make_secret() -> tuple[str, bytes]:
    key = os.urandom(32)
    return "whsec_" + base64.b64encode(key).decode(), key


def test_parse_secret_returns_the_key_bytes():
    """A whsec_ secret decodes to the raw key bytes."""
    text, key = make_secret()
    assert parse_secret(text) == key


def test_parse_secret_accepts_missing_padding():
    """A secret whose base64 lost its padding still parses, as receivers' libraries accept it."""
    key = os.urandom(31)  # 31 bytes need one padding character
    text = "whsec_" + base64.b64encode(key).decode().rstrip("=")
    assert parse_secret(text) == key


@pytest.mark.parametrize(
    "value",
    [
        "",
        "whsec_",
        "whsec_====",
        "c2VjcmV0c2VjcmV0",  # base64 without the prefix
        "WHSEC_c2VjcmV0c2VjcmV0",
        "whsec_c2Vj!!cmV0",
        "whsec_c2VjcmV0c",  # one dangling character is never base64
        "whsec_c2Vj cmV0",
    ],
)
def test_parse_secret_rejects_malformed_values_without_echoing_them(value):
    """A malformed or empty secret raises ValueError whose message never contains the secret."""
    with pytest.raises(ValueError, match="webhook secret must be 'whsec_' followed by base64") as e:
        parse_secret(value)
    secret_part = value.removeprefix("whsec_")
    assert not secret_part or secret_part not in str(e.value)
    assert e.value.__cause__ is None


def test_sign_matches_the_standard_webhooks_reference_vector():
    """Signing reproduces the published Standard Webhooks example signature."""
    key = parse_secret("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw")
    signature = sign([key], "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, b'{"test": 2432232314}')
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_sign_puts_one_signature_per_secret():
    """Two secrets give two space-separated v1 signatures, in the order given."""
    _, first = make_secret()
    _, second = make_secret()
    both = sign([first, second], "msg_1", 1700000000, BODY)
    assert both.split(" ") == [
        sign([first], "msg_1", 1700000000, BODY),
        sign([second], "msg_1", 1700000000, BODY),
    ]


def test_sign_without_secrets_is_refused():
    """Signing with no secret at all is a programming error."""
    with pytest.raises(ValueError, match="at least one"):
        sign([], "msg_1", 1700000000, BODY)


def test_headers_verify_with_the_standardwebhooks_library():
    """A receiver using the stock standardwebhooks library accepts our headers and body."""
    text, key = make_secret()
    headers = webhook_headers([key], "msg_abc", int(time.time()), BODY)
    assert Webhook(text).verify(BODY, headers) == {
        "type": "job.completed",
        "timestamp": "2026-01-01T00:00:00Z",
        "data": {"id": "job_1"},
    }


def test_rotation_signature_verifies_with_either_secret_alone():
    """During a rotation, a receiver holding only the old or only the new secret verifies."""
    old_text, old_key = make_secret()
    new_text, new_key = make_secret()
    headers = webhook_headers([old_key, new_key], "msg_rot", int(time.time()), BODY)
    Webhook(old_text).verify(BODY, headers)
    Webhook(new_text).verify(BODY, headers)
    other_text, _ = make_secret()
    with pytest.raises(WebhookVerificationError):
        Webhook(other_text).verify(BODY, headers)


def test_a_changed_body_fails_verification():
    """The signature covers the exact bytes: one changed byte fails verification."""
    text, key = make_secret()
    headers = webhook_headers([key], "msg_abc", int(time.time()), BODY)
    with pytest.raises(WebhookVerificationError):
        Webhook(text).verify(BODY.replace(b"job_1", b"job_2"), headers)


def test_headers_carry_id_timestamp_type_and_user_agent():
    """The header set names the event, its time, JSON content and our user agent."""
    _, key = make_secret()
    headers = webhook_headers([key], "msg_abc", 1700000000, BODY)
    assert headers["webhook-id"] == "msg_abc"
    assert headers["webhook-timestamp"] == "1700000000"
    assert headers["webhook-signature"].startswith("v1,")
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"] == "runcomfy-gateway/0.1"
