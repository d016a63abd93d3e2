"""Typed settings, loaded once at start from the environment and the tenants file.

Nothing here is a module-level singleton: `load_settings` builds a `Settings`
that the CLI passes to the API, the worker and `dev`. A bad configuration raises
`ConfigError` with one line that says what is wrong; the CLI exits 2 with it.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import tomllib
from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Final, Literal, cast

import msgspec

from service.store.connection import SENTINEL_SCHEME, parse_sentinel_url
from service.webhooks.delivery import parse_retry_schedule
from service.webhooks.guard import is_forbidden_address, normalise_host, parse_host_address
from service.webhooks.signing import parse_secret

DEFAULT_BASE_URL: Final = "https://model-api.runcomfy.net"
DEFAULT_RETRY_SCHEDULE: Final = "5,300,1800,7200,18000,36000,36000"
DEFAULT_INPUT_MAX_BYTES: Final = 104_857_600
MAX_PREFLIGHT_TIMEOUT_S: Final = 10.0
DEFAULT_OUTPUT_HOSTS: Final = "*.runcomfy.net,*.runcomfy.com"
DEFAULT_OUTPUT_MAX_BYTES: Final = 2 * 1024**3
MAX_PRESIGN_S: Final = 604_800
"""SigV4 presigned URLs live at most 7 days."""

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_TENANT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_TENANT_KEYS: Final = frozenset(
    {
        "api_keys",
        "webhook_secret",
        "callback_hosts",
        "max_in_flight",
        "rate_per_s",
        "budget_usd_per_day",
        "budget_usd_per_month",
        "output_store",
    }
)
_OUTPUT_STORE_KEYS: Final = frozenset({"url", "endpoint_url", "region", "presign_s"})
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_REGION = re.compile(r"^[a-z0-9-]{1,32}$")
_MICROS: Final = Decimal(1_000_000)


class ConfigError(Exception):
    """The configuration cannot be used; the message is one line and holds no secret."""


class OutputStore(msgspec.Struct, frozen=True, kw_only=True):
    """A tenant's S3-compatible store for durable outputs (`[tenants.<id>.output_store]`).

    No credentials: the worker's AWS environment or web identity supplies them.
    """

    bucket: str
    prefix: str = ""
    endpoint_url: str | None = None
    region: str | None = None
    presign_s: int | None = None
    """Answer presigned GET URLs valid this long; None: `s3://bucket/key` URLs."""


class Tenant(msgspec.Struct, frozen=True):
    """A calling service: its API key hashes, webhook secrets and limits."""

    id: str
    api_key_hashes: tuple[str, ...]
    webhook_secrets: tuple[bytes, ...]
    callback_hosts: tuple[str, ...]
    max_in_flight: int | None = None
    rate_per_s: float | None = None
    budget_micros_per_day: int | None = None
    budget_micros_per_month: int | None = None
    output_store: OutputStore | None = None

    def __repr__(self) -> str:
        return f"Tenant(id={self.id!r}, keys={len(self.api_key_hashes)})"


class Tenants(msgspec.Struct):
    """All tenants, with a lookup from an API key to its tenant and key id.

    The one mutable piece of configuration: `replace_with` swaps in a freshly
    read tenants file, and every holder of this object sees it at once.
    """

    by_id: dict[str, Tenant]
    admin_key_hashes: tuple[str, ...] = ()
    """`[admins] api_keys`: keys of the operators' admin API (`/v1/admin`), never a tenant's."""

    def replace_with(self, other: Tenants) -> None:
        """Take `other`'s tenants and admins (callers never see half a file)."""
        self.by_id, self.admin_key_hashes = other.by_id, other.admin_key_hashes

    def authenticate(self, api_key: str) -> tuple[Tenant, str] | None:
        """The tenant and key id (a hash prefix, never the key) for `api_key`, or None.

        Every stored hash is compared in constant time, so the answer's timing
        says nothing about which tenant or how much of a hash matched.
        """
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        found: tuple[Tenant, str] | None = None
        for tenant in self.by_id.values():
            for stored in tenant.api_key_hashes:
                if hmac.compare_digest(stored, digest):
                    found = (tenant, "key_" + stored[:12])
        return found

    def authenticate_admin(self, api_key: str) -> str | None:
        """The key id (a hash prefix) of `api_key` if it is an admin key, else None.

        Compared in constant time, as `authenticate` does.
        """
        digest = hashlib.sha256(api_key.encode()).hexdigest()
        found: str | None = None
        for stored in self.admin_key_hashes:
            if hmac.compare_digest(stored, digest):
                found = "key_" + stored[:12]
        return found


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    """Everything the processes need, read from the environment (README, Configuration)."""

    redis_url: str
    runcomfy_base_url: str = DEFAULT_BASE_URL
    runcomfy_token: str
    tenants: Tenants
    tenants_file: str | None = None
    poll_interval_min_s: float = 2.0
    poll_interval_max_s: float = 15.0
    poll_policy: Literal["learned", "interval"] = "learned"
    """`GATEWAY_POLL_POLICY`: time polls by learned run lengths, or by the interval rule alone."""
    poll_learn_samples: int = 24
    """`GATEWAY_POLL_LEARN_SAMPLES`: recent jobs kept per input class and phase."""
    poll_learn_min_samples: int = 8
    """`GATEWAY_POLL_LEARN_MIN_SAMPLES`: fewer recent jobs than this: the interval rule."""
    poll_learn_max_age_s: float = 1800.0
    """`GATEWAY_POLL_LEARN_MAX_AGE_S`: samples older than this are forgotten."""
    poll_learn_refresh_s: float = 5.0
    """`GATEWAY_POLL_LEARN_REFRESH_S`: how often a worker reads what was learned."""
    webhook_retry_schedule: tuple[float, ...] = (5, 300, 1800, 7200, 18000, 36000, 36000)
    lease_s: float = 30.0
    job_timeout_s: float = 7200.0
    upstream_max_in_flight: int = 20
    shutdown_s: float = 20.0
    job_retention_s: int = 604800
    worker_metrics_port: int = 9091
    webhook_deadline_s: float = 15.0
    upstream_timeout_s: float = 20.0
    submit_unknown_policy: Literal["fail", "retry"] = "fail"
    upstream_rate_per_s: float = 10.0
    upstream_burst: int = 20
    funds_pause_s: float = 60.0
    preflight: bool = True
    """`GATEWAY_PREFLIGHT`: check each job's video_url before its paid submit."""
    preflight_allow_hosts: tuple[str, ...] = ()
    """`GATEWAY_PREFLIGHT_ALLOW_HOSTS`: hosts whose private addresses inputs may come from."""
    preflight_timeout_s: float = 5.0
    """`GATEWAY_PREFLIGHT_TIMEOUT_S`: one check's deadline; it and the submit share a lease."""
    input_max_bytes: int = DEFAULT_INPUT_MAX_BYTES
    """`GATEWAY_INPUT_MAX_BYTES`: the largest input accepted, when it states its size."""
    price_micros: int = 0
    """One standard run's price in micro-dollars; 0 = unknown (no costs, no budgets)."""
    output_hosts: tuple[str, ...] = ("*.runcomfy.net", "*.runcomfy.com")
    """`GATEWAY_OUTPUT_HOSTS`: the only hosts outputs are copied from."""
    output_max_bytes: int = DEFAULT_OUTPUT_MAX_BYTES
    """`GATEWAY_OUTPUT_MAX_BYTES`: the largest output copied into a tenant's store."""

    def __repr__(self) -> str:
        tenants = list(self.tenants.by_id)
        return f"Settings(base_url={self.runcomfy_base_url!r}, tenants={tenants})"


def _number(env: Mapping[str, str], name: str, default: float, *, minimum: float = 0) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum or not math.isfinite(value):
        raise ConfigError(f"{name} must be a finite number >= {minimum:g}, got {raw!r}")
    return value


def _integer(env: Mapping[str, str], name: str, default: int, *, minimum: int = 1) -> int:
    value = _number(env, name, default, minimum=minimum)
    if value != int(value):
        raise ConfigError(f"{name} must be a whole number, got {env[name]!r}")
    return int(value)


def _allow_hosts(
    env: Mapping[str, str], name: str = "GATEWAY_PREFLIGHT_ALLOW_HOSTS", default: str = ""
) -> tuple[str, ...]:
    """A comma list of host names, `*.suffix` wildcards or addresses (`name`, else `default`).

    A link-local or metadata address is refused here too: no setting may open those.
    """
    hosts: list[str] = []
    for entry in (item.strip() for item in (env.get(name) or default).split(",")):
        if not entry:
            continue
        bare = entry.removeprefix("*.")
        address = parse_host_address(bare)
        if address is not None and is_forbidden_address(address):
            raise ConfigError(f"{name}: {entry!r} is a link-local or metadata address")
        if normalise_host(bare) is None:
            raise ConfigError(f"{name}: {entry!r} is not a host name or address")
        hosts.append(entry.lower().rstrip("."))
    return tuple(hosts)


def _preflight_settings(
    env: Mapping[str, str], *, lease_s: float, upstream_timeout_s: float
) -> dict[str, Any]:
    """The input pre-flight's settings (README, Input pre-flight), as `Settings` fields."""
    switch = (env.get("GATEWAY_PREFLIGHT") or "on").strip().lower()
    if switch not in {"on", "off"}:
        raise ConfigError(f"GATEWAY_PREFLIGHT must be 'on' or 'off', got {switch!r}")
    # The check and the paid submit happen under one lease, so both must fit in it.
    timeout_s = _number(
        env,
        "GATEWAY_PREFLIGHT_TIMEOUT_S",
        min(MAX_PREFLIGHT_TIMEOUT_S, (lease_s - upstream_timeout_s) / 2),
        minimum=0.1,
    )
    if switch == "on" and timeout_s + upstream_timeout_s >= lease_s:
        raise ConfigError(
            "GATEWAY_LEASE_S must be longer than GATEWAY_PREFLIGHT_TIMEOUT_S "
            "plus GATEWAY_UPSTREAM_TIMEOUT_S"
        )
    return {
        "preflight": switch == "on",
        "preflight_allow_hosts": _allow_hosts(env),
        "preflight_timeout_s": timeout_s,
        "input_max_bytes": _integer(env, "GATEWAY_INPUT_MAX_BYTES", DEFAULT_INPUT_MAX_BYTES),
    }


def _poll_learn_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """The poll policy's settings (README, Poll timing), as `Settings` fields."""
    policy = (env.get("GATEWAY_POLL_POLICY") or "learned").strip().lower()
    if policy not in {"learned", "interval"}:
        raise ConfigError(f"GATEWAY_POLL_POLICY must be 'learned' or 'interval', got {policy!r}")
    samples = _integer(env, "GATEWAY_POLL_LEARN_SAMPLES", 24, minimum=2)
    min_samples = _integer(env, "GATEWAY_POLL_LEARN_MIN_SAMPLES", 8, minimum=1)
    if min_samples > samples:
        raise ConfigError("GATEWAY_POLL_LEARN_MIN_SAMPLES must be <= GATEWAY_POLL_LEARN_SAMPLES")
    return {
        "poll_policy": policy,
        "poll_learn_samples": samples,
        "poll_learn_min_samples": min_samples,
        "poll_learn_max_age_s": _number(env, "GATEWAY_POLL_LEARN_MAX_AGE_S", 1800.0, minimum=1),
        "poll_learn_refresh_s": _number(env, "GATEWAY_POLL_LEARN_REFRESH_S", 5.0, minimum=0.05),
    }


def _output_settings(env: Mapping[str, str]) -> dict[str, Any]:
    """The durable outputs' settings (README, Durable outputs), as `Settings` fields."""
    hosts = _allow_hosts(env, "GATEWAY_OUTPUT_HOSTS", DEFAULT_OUTPUT_HOSTS)
    if not hosts:
        raise ConfigError("GATEWAY_OUTPUT_HOSTS must name at least one host")
    return {
        "output_hosts": hosts,
        "output_max_bytes": _integer(env, "GATEWAY_OUTPUT_MAX_BYTES", DEFAULT_OUTPUT_MAX_BYTES),
    }


def _output_store(table: object, where: str) -> OutputStore:  # noqa: C901 - one flat check per field
    """A tenant's `output_store` table; `where` names it (`tenants.<id>.output_store`)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    unknown = sorted(set(table) - _OUTPUT_STORE_KEYS)
    if unknown:
        # Never echo a value: a credential pasted here would end up in a log.
        raise ConfigError(
            f"{where} has unknown key {unknown[0]!r} (credentials come from the worker's "
            "environment or web identity, never from the tenants file)"
        )
    url = table.get("url")
    if not isinstance(url, str) or not url.startswith("s3://"):
        raise ConfigError(f"{where}.url must be an s3://bucket/prefix URL")
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise ConfigError(f"{where}.url: {bucket!r} is not a valid bucket name")
    prefix = prefix.strip("/")
    if prefix and any(part in {"", ".", ".."} for part in prefix.split("/")):
        raise ConfigError(f"{where}.url: the key prefix {prefix!r} has an empty or dot segment")
    endpoint = table.get("endpoint_url")
    if endpoint is not None:
        if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"{where}.endpoint_url must be an http(s) URL")
        if "@" in endpoint.partition("://")[2].partition("/")[0]:
            raise ConfigError(f"{where}.endpoint_url must not carry user:password")
    region = table.get("region")
    if region is not None and (not isinstance(region, str) or not _REGION.match(region)):
        raise ConfigError(f"{where}.region must be a region name like 'eu-west-1'")
    presign = table.get("presign_s")
    if presign is not None and (
        isinstance(presign, bool)
        or not isinstance(presign, int)
        or not 1 <= presign <= MAX_PRESIGN_S
    ):
        raise ConfigError(f"{where}.presign_s must be a whole number of seconds, 1-{MAX_PRESIGN_S}")
    return OutputStore(
        bucket=bucket,
        prefix=prefix,
        endpoint_url=endpoint.rstrip("/") if endpoint else None,
        region=region,
        presign_s=presign,
    )


def usd_to_micros(value: object) -> int | None:
    """A dollar amount (TOML or environment) as whole micro-dollars, or None if it is not one.

    Read as a decimal, so `0.1` is exactly 100000 micro-dollars; more than six
    decimals, a negative or a non-finite amount is not an amount.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        amount = Decimal(str(value).strip()) * _MICROS
    except InvalidOperation:
        return None
    if not amount.is_finite() or amount < 0 or amount != amount.to_integral_value():
        return None
    return int(amount)


def _budget(table: dict[str, object], name: str, where: str) -> int | None:
    """A tenant's `budget_usd_per_<period>`, in micro-dollars; None when it has none."""
    if name not in table:
        return None
    micros = usd_to_micros(table[name])
    if micros is None or micros <= 0:
        raise ConfigError(f"{where}: {name} must be an amount in USD > 0 with at most 6 decimals")
    return micros


def _tenant(tenant_id: str, table: object, where: str) -> Tenant:  # noqa: C901, PLR0912 - one flat check per field reads best
    """One `[tenants.<id>]` table, checked field by field."""
    if not _TENANT_ID.match(tenant_id):
        raise ConfigError(f"{where}: tenant id {tenant_id!r} must match {_TENANT_ID.pattern}")
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: tenants.{tenant_id} must be a table")
    unknown = sorted(set(table) - _TENANT_KEYS)
    if unknown:
        raise ConfigError(f"{where}: tenants.{tenant_id} has unknown key {unknown[0]!r}")
    keys = table.get("api_keys")
    if not isinstance(keys, list) or not keys:
        raise ConfigError(f"{where}: tenants.{tenant_id}.api_keys must be a non-empty list")
    hashes: list[str] = []
    for key in keys:
        if not isinstance(key, str) or not _SHA256_HEX.match(key.lower()):
            # Never echo the value: it might be a plain key pasted by mistake.
            raise ConfigError(
                f"{where}: tenants.{tenant_id}.api_keys must hold sha256 hex digests "
                "(64 hex characters), not plain keys"
            )
        hashes.append(key.lower())
    raw_secrets = table.get("webhook_secret")
    if isinstance(raw_secrets, str):
        raw_secrets = [raw_secrets]
    if not isinstance(raw_secrets, list) or not raw_secrets:
        raise ConfigError(f"{where}: tenants.{tenant_id}.webhook_secret is required")
    secrets: list[bytes] = []
    for secret in raw_secrets:
        try:
            secrets.append(parse_secret(secret if isinstance(secret, str) else ""))
        except ValueError as exc:
            raise ConfigError(f"{where}: tenants.{tenant_id}.webhook_secret: {exc}") from None
    hosts = table.get("callback_hosts", [])
    if not isinstance(hosts, list) or not all(isinstance(h, str) and h for h in hosts):
        raise ConfigError(f"{where}: tenants.{tenant_id}.callback_hosts must be a list of hosts")
    max_in_flight = table.get("max_in_flight")
    if max_in_flight is not None and (
        isinstance(max_in_flight, bool) or not isinstance(max_in_flight, int) or max_in_flight < 1
    ):
        raise ConfigError(f"{where}: tenants.{tenant_id}.max_in_flight must be an integer >= 1")
    rate = table.get("rate_per_s")
    if rate is not None and (
        isinstance(rate, bool) or not isinstance(rate, int | float) or rate <= 0
    ):
        raise ConfigError(f"{where}: tenants.{tenant_id}.rate_per_s must be a number > 0")
    store = table.get("output_store")
    return Tenant(
        id=tenant_id,
        api_key_hashes=tuple(hashes),
        webhook_secrets=tuple(secrets),
        callback_hosts=tuple(h.lower().rstrip(".") for h in hosts),
        max_in_flight=max_in_flight,
        rate_per_s=float(rate) if rate is not None else None,
        budget_micros_per_day=_budget(table, "budget_usd_per_day", f"{where}: tenants.{tenant_id}"),
        budget_micros_per_month=_budget(
            table, "budget_usd_per_month", f"{where}: tenants.{tenant_id}"
        ),
        output_store=None
        if store is None
        else _output_store(store, f"{where}: tenants.{tenant_id}.output_store"),
    )


def parse_tenants(
    text: str, where: str = "tenants file", *, budgets_allowed: bool = True
) -> Tenants:
    """Parse the tenants TOML (README, Tenants file) into `Tenants`, or raise `ConfigError`.

    `budgets_allowed=False` (no price of a run is set) refuses a file with a budget:
    a budget is counted in the price's units.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: not valid TOML ({exc})") from None
    unknown = sorted(set(document) - {"tenants", "admins"})
    if unknown:
        raise ConfigError(f"{where}: unknown top-level key {unknown[0]!r}")
    tables = document.get("tenants")
    if not isinstance(tables, dict) or not tables:
        raise ConfigError(f"{where}: no [tenants.<id>] table")
    tenants = {tid: _tenant(tid, table, where) for tid, table in tables.items()}
    seen: dict[str, str] = {}
    for tenant in tenants.values():
        for digest in tenant.api_key_hashes:
            if digest in seen and seen[digest] != tenant.id:
                raise ConfigError(f"{where}: one API key hash is listed for two tenants")
            seen[digest] = tenant.id
        if not budgets_allowed and (tenant.budget_micros_per_day or tenant.budget_micros_per_month):
            raise ConfigError(
                f"{where}: tenants.{tenant.id} has a budget but GATEWAY_PRICE_USD is not set: "
                "a budget needs the price of a run"
            )
    admins = _admin_key_hashes(document.get("admins", {}), where)
    if set(admins) & set(seen):
        raise ConfigError(f"{where}: one API key hash is listed for a tenant and an admin")
    return Tenants(by_id=tenants, admin_key_hashes=admins)


def _admin_key_hashes(table: object, where: str) -> tuple[str, ...]:
    """The `[admins]` table: `api_keys`, sha256 hex digests of the operators' keys."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: admins must be a table")
    unknown = sorted(set(table) - {"api_keys"})
    if unknown:
        raise ConfigError(f"{where}: admins has unknown key {unknown[0]!r}")
    keys = table.get("api_keys", [])
    if not isinstance(keys, list) or not all(
        isinstance(key, str) and _SHA256_HEX.match(key.lower()) for key in keys
    ):
        # Never echo the value: it might be a plain key pasted by mistake.
        raise ConfigError(
            f"{where}: admins.api_keys must hold sha256 hex digests (64 hex characters), "
            "not plain keys"
        )
    return tuple(key.lower() for key in keys)


def load_tenants(path: str, *, budgets_allowed: bool = True) -> Tenants:
    """Read and parse the tenants file at `path` (`parse_tenants`)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"GATEWAY_TENANTS_FILE {path!r} cannot be read: {exc.strerror}") from None
    return parse_tenants(text, where=path, budgets_allowed=budgets_allowed)


def load_settings(  # noqa: C901 - one flat check per variable reads best
    env: Mapping[str, str], *, tenants: Tenants | None = None
) -> Settings:
    """Build `Settings` from `env`; `tenants` given (by `dev`) replaces the tenants file."""
    redis_url = env.get("REDIS_URL", "")
    if not redis_url:
        raise ConfigError("REDIS_URL is required (e.g. redis://localhost:6379/0)")
    if not redis_url.startswith(("redis://", "rediss://", "unix://", SENTINEL_SCHEME)):
        raise ConfigError(
            f"REDIS_URL must start with redis://, rediss://, unix:// or {SENTINEL_SCHEME}"
        )
    if redis_url.startswith(SENTINEL_SCHEME):
        try:
            parse_sentinel_url(redis_url)
        except ValueError as exc:
            raise ConfigError(f"REDIS_URL: {exc}") from None
    token = env.get("RUNCOMFY_API_TOKEN", "")
    if not token:
        raise ConfigError("RUNCOMFY_API_TOKEN is required")
    base_url = env.get("RUNCOMFY_BASE_URL") or DEFAULT_BASE_URL
    if not base_url.startswith(("http://", "https://")):
        raise ConfigError("RUNCOMFY_BASE_URL must be an http(s) URL")
    path = env.get("GATEWAY_TENANTS_FILE") or None
    price_micros = _price(env)
    if tenants is None:
        if not path:
            raise ConfigError("GATEWAY_TENANTS_FILE is required (a TOML file of tenants)")
        tenants = load_tenants(path, budgets_allowed=price_micros > 0)
    poll_min = _number(env, "GATEWAY_POLL_INTERVAL_MIN_S", 2.0, minimum=0.05)
    poll_max = _number(env, "GATEWAY_POLL_INTERVAL_MAX_S", 15.0, minimum=0.05)
    if poll_max < poll_min:
        raise ConfigError("GATEWAY_POLL_INTERVAL_MAX_S must be >= GATEWAY_POLL_INTERVAL_MIN_S")
    try:
        schedule = parse_retry_schedule(
            env.get("GATEWAY_WEBHOOK_RETRY_SCHEDULE") or DEFAULT_RETRY_SCHEDULE
        )
    except ValueError as exc:
        raise ConfigError(f"GATEWAY_WEBHOOK_RETRY_SCHEDULE: {exc}") from None
    lease_s = _number(env, "GATEWAY_LEASE_S", 30.0, minimum=1)
    upstream_timeout_s = _number(
        env, "GATEWAY_UPSTREAM_TIMEOUT_S", min(20.0, lease_s * 2 / 3), minimum=0.1
    )
    webhook_deadline_s = _number(
        env, "GATEWAY_WEBHOOK_TIMEOUT_S", min(15.0, lease_s * 2 / 3), minimum=0.1
    )
    # An item's lease must outlive the call made while holding it, or a slow
    # call would let a second worker take the same item.
    if max(upstream_timeout_s, webhook_deadline_s) >= lease_s:
        raise ConfigError(
            "GATEWAY_LEASE_S must be longer than GATEWAY_UPSTREAM_TIMEOUT_S "
            "and GATEWAY_WEBHOOK_TIMEOUT_S"
        )
    policy = env.get("GATEWAY_SUBMIT_UNKNOWN") or "fail"
    if policy not in {"fail", "retry"}:
        raise ConfigError(f"GATEWAY_SUBMIT_UNKNOWN must be 'fail' or 'retry', got {policy!r}")
    return Settings(
        submit_unknown_policy=cast('Literal["fail", "retry"]', policy),
        redis_url=redis_url,
        runcomfy_base_url=base_url.rstrip("/"),
        runcomfy_token=token,
        tenants=tenants,
        tenants_file=path,
        poll_interval_min_s=poll_min,
        poll_interval_max_s=poll_max,
        **_poll_learn_settings(env),
        webhook_retry_schedule=schedule,
        lease_s=lease_s,
        job_timeout_s=_number(env, "GATEWAY_JOB_TIMEOUT_S", 7200.0, minimum=1),
        upstream_max_in_flight=_integer(env, "GATEWAY_UPSTREAM_MAX_IN_FLIGHT", 20),
        shutdown_s=_number(env, "GATEWAY_SHUTDOWN_S", 20.0),
        job_retention_s=_integer(env, "GATEWAY_JOB_RETENTION_S", 604800, minimum=60),
        worker_metrics_port=_integer(env, "GATEWAY_WORKER_METRICS_PORT", 9091, minimum=0),
        webhook_deadline_s=webhook_deadline_s,
        upstream_timeout_s=upstream_timeout_s,
        upstream_rate_per_s=_number(env, "GATEWAY_UPSTREAM_RATE_PER_S", 10.0, minimum=0.01),
        upstream_burst=_integer(env, "GATEWAY_UPSTREAM_BURST", 20),
        funds_pause_s=_number(env, "GATEWAY_FUNDS_PAUSE_S", 60.0, minimum=0.1),
        **_preflight_settings(env, lease_s=lease_s, upstream_timeout_s=upstream_timeout_s),
        price_micros=price_micros,
        **_output_settings(env),
    )


def _price(env: Mapping[str, str]) -> int:
    """`GATEWAY_PRICE_USD` in micro-dollars (0, the default, means unknown)."""
    raw = env.get("GATEWAY_PRICE_USD") or "0"
    micros = usd_to_micros(raw)
    if micros is None:
        raise ConfigError(
            f"GATEWAY_PRICE_USD must be an amount in USD >= 0 with at most 6 decimals, got {raw!r}"
        )
    return micros
