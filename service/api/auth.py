"""Bearer API keys: who is calling, as a `Caller` every `/v1` handler receives.

The key is looked up by its SHA-256 among the tenants' configured hashes
(`Tenants.authenticate`); it is never logged or echoed. A missing or unknown
key answers 401 with `WWW-Authenticate: Bearer` and the same body either way.

Admin keys (`[admins]`) and tenant keys are two realms: each is unknown to the
other's routes, so an admin key on `/v1/jobs` and a tenant key on `/v1/admin`
both answer that same 401.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from service.api.problems import ProblemError
from service.config import Tenant, Tenants

_REALM: Final = 'Bearer realm="runcomfy-gateway"'
_MAX_KEY_CHARS: Final = 512


@dataclass(frozen=True)
class Caller:
    """The authenticated tenant and the id of the key it used (a hash prefix, never the key)."""

    tenant: Tenant
    key_id: str


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None when there is none."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or len(token) > _MAX_KEY_CHARS:
        return None
    return token


def authenticate(tenants: Tenants, authorization: str | None) -> Caller:
    """The caller this `Authorization` header proves, or a 401 problem."""
    token = bearer_token(authorization)
    found = tenants.authenticate(token) if token is not None else None
    if found is None:
        raise _unauthorized(authorization)
    tenant, key_id = found
    return Caller(tenant=tenant, key_id=key_id)


def authenticate_admin(tenants: Tenants, authorization: str | None) -> str:
    """The key id of the admin key this `Authorization` header holds, or a 401 problem."""
    token = bearer_token(authorization)
    key_id = tenants.authenticate_admin(token) if token is not None else None
    if key_id is None:
        raise _unauthorized(authorization)
    return key_id


def _unauthorized(authorization: str | None) -> ProblemError:
    challenge = _REALM if authorization is None else f'{_REALM}, error="invalid_token"'
    return ProblemError(
        401,
        "send a valid API key as `Authorization: Bearer <key>`",
        headers={"WWW-Authenticate": challenge},
    )
