"""Standard Webhooks signing: parse a tenant's `whsec_` secret and sign the exact body bytes.

A signature is `v1,<base64 HMAC-SHA256(key, "<id>.<timestamp>.<body>")>`; during a secret
rotation the header carries one signature per secret, space-separated, so a receiver holding
either the old or the new secret accepts the message.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import TYPE_CHECKING

from service.outbound import USER_AGENT

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["parse_secret", "sign", "webhook_headers"]

_WHSEC = "whsec_"

# Never interpolate the value: this message ends up in logs and startup errors.
_MALFORMED = "webhook secret must be 'whsec_' followed by base64"


def parse_secret(value: str) -> bytes:
    """Return the raw key bytes of a `whsec_<base64>` secret; ValueError when malformed or empty.

    Padding may be omitted (receivers' libraries accept both), the alphabet is checked strictly.
    """
    if not value.startswith(_WHSEC):
        raise ValueError(_MALFORMED)
    encoded = value.removeprefix(_WHSEC).rstrip("=")
    # One leftover character can never be valid base64; any other remainder just lacks padding.
    if not encoded or len(encoded) % 4 == 1:
        raise ValueError(_MALFORMED)
    padded = encoded + "=" * (-len(encoded) % 4)
    try:
        key = base64.b64decode(padded, validate=True)
    except binascii.Error:
        # `from None`: the decoder's own message could quote part of the secret.
        raise ValueError(_MALFORMED) from None
    if not key:
        raise ValueError(_MALFORMED)
    return key


def sign(secrets: Sequence[bytes], msg_id: str, timestamp: int, body: bytes) -> str:
    """Return the `webhook-signature` value: one `v1,<sig>` per secret, space-separated."""
    if not secrets:
        raise ValueError("at least one webhook secret is needed to sign")
    signed_content = f"{msg_id}.{timestamp}.".encode() + body
    return " ".join(
        "v1," + base64.b64encode(hmac.digest(key, signed_content, "sha256")).decode()
        for key in secrets
    )


def webhook_headers(
    secrets: Sequence[bytes], msg_id: str, timestamp: int, body: bytes
) -> dict[str, str]:
    """Return the full header set for one delivery of `body` (signature, id, timestamp, type)."""
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secrets, msg_id, timestamp, body),
        "content-type": "application/json",
        "user-agent": USER_AGENT,
    }
