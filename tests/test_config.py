"""Configuration: the environment and the tenants file, and the one-line errors for bad ones."""

from __future__ import annotations

import hashlib

import pytest

from service.config import ConfigError, load_settings, parse_tenants
from tests.support import new_tenant

TENANT = new_tenant("orders")


def base_env(tmp_path, toml: str | None = None) -> dict[str, str]:
    path = tmp_path / "tenants.toml"
    path.write_text(toml if toml is not None else TENANT.toml())
    return {
        "REDIS_URL": "redis://localhost:6379/0",
        "RUNCOMFY_API_TOKEN": "rc-secret-token",
        "GATEWAY_TENANTS_FILE": str(path),
    }


def test_defaults_are_those_of_the_contract(tmp_path):
    """With only the required variables set, every knob has its documented default."""
    s = load_settings(base_env(tmp_path))
    assert s.runcomfy_base_url == "https://model-api.runcomfy.net"
    assert (s.poll_interval_min_s, s.poll_interval_max_s) == (2, 15)
    assert s.webhook_retry_schedule == (5, 300, 1800, 7200, 18000, 36000, 36000)
    assert (s.lease_s, s.job_timeout_s, s.upstream_max_in_flight) == (30, 7200, 20)
    assert (s.shutdown_s, s.job_retention_s, s.worker_metrics_port) == (20, 604800, 9091)
    assert s.submit_unknown_policy == "fail"
    assert (s.preflight, s.preflight_allow_hosts, s.input_max_bytes) == (True, (), 104_857_600)
    assert s.preflight_timeout_s + s.upstream_timeout_s < s.lease_s


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("REDIS_URL", "", "REDIS_URL is required"),
        ("REDIS_URL", "http://x", "REDIS_URL must start"),
        ("REDIS_URL", "redis+sentinel://s1:26379", "name the master"),
        ("REDIS_URL", "redis+sentinel://s1:port/m", "not a Sentinel's host[:port]"),
        ("REDIS_URL", "redis+sentinel://s1/m/zero", "not a number"),
        ("RUNCOMFY_API_TOKEN", "", "RUNCOMFY_API_TOKEN is required"),
        ("GATEWAY_TENANTS_FILE", "", "GATEWAY_TENANTS_FILE is required"),
        ("GATEWAY_TENANTS_FILE", "/nonexistent/t.toml", "cannot be read"),
        ("GATEWAY_POLL_INTERVAL_MIN_S", "fast", "must be a number"),
        ("GATEWAY_POLL_INTERVAL_MAX_S", "0.5", "MAX_S must be >="),
        ("GATEWAY_WEBHOOK_RETRY_SCHEDULE", "5,soon", "GATEWAY_WEBHOOK_RETRY_SCHEDULE"),
        ("GATEWAY_UPSTREAM_MAX_IN_FLIGHT", "2.5", "whole number"),
        ("GATEWAY_UPSTREAM_MAX_IN_FLIGHT", "0", ">= 1"),
        ("GATEWAY_UPSTREAM_TIMEOUT_S", "40", "GATEWAY_LEASE_S must be longer"),
        ("GATEWAY_JOB_TIMEOUT_S", "nan", "finite"),
        ("GATEWAY_SUBMIT_UNKNOWN", "maybe", "'fail' or 'retry'"),
        ("GATEWAY_PREFLIGHT", "maybe", "'on' or 'off'"),
        ("GATEWAY_PREFLIGHT_ALLOW_HOSTS", "bench, 169.254.169.254", "metadata address"),
        ("GATEWAY_PREFLIGHT_ALLOW_HOSTS", "[fd00:ec2::254]", "metadata address"),
        ("GATEWAY_PREFLIGHT_ALLOW_HOSTS", "not a host", "not a host name"),
        ("GATEWAY_PREFLIGHT_TIMEOUT_S", "15", "GATEWAY_PREFLIGHT_TIMEOUT_S plus"),
        ("GATEWAY_INPUT_MAX_BYTES", "0", ">= 1"),
    ],
)
def test_a_bad_variable_is_named_in_one_line(tmp_path, name, value, says):
    """Each bad environment variable raises one line naming it."""
    env = base_env(tmp_path) | {name: value}
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    assert says in str(caught.value)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("toml", "says"),
    [
        ("not toml [", "not valid TOML"),
        ("[other]\nx = 1\n", "unknown top-level key"),
        ("[tenants]\n", "no [tenants.<id>]"),
        (TENANT.toml() + "colour = 'red'\n", "unknown key 'colour'"),
        (TENANT.toml().replace("webhook_secret", "#"), "webhook_secret is required"),
        (TENANT.toml().replace(TENANT.whsec, "whsec_%%%"), "webhook_secret"),
        (TENANT.toml().replace(TENANT.whsec, "plain-secret"), "webhook_secret"),
        (TENANT.toml() + "max_in_flight = 0\n", "max_in_flight"),
        (TENANT.toml() + "rate_per_s = -1\n", "rate_per_s"),
    ],
)
def test_a_bad_tenants_file_is_refused(toml, says):
    """Malformed tenants files are refused with a line that says what is wrong."""
    with pytest.raises(ConfigError) as caught:
        parse_tenants(toml)
    assert says in str(caught.value)


def test_a_plain_api_key_is_refused_without_echoing_it():
    """A plain key pasted where its hash belongs is refused, and never shown."""
    toml = TENANT.toml().replace(
        hashlib.sha256(TENANT.api_key.encode()).hexdigest(), "my-plain-key"
    )
    with pytest.raises(ConfigError) as caught:
        parse_tenants(toml)
    assert "sha256" in str(caught.value)
    assert "my-plain-key" not in str(caught.value)


def test_secrets_never_appear_in_errors_or_reprs(tmp_path):
    """Neither the token nor a webhook secret shows in a settings repr or an error."""
    settings = load_settings(base_env(tmp_path))
    shown = repr(settings) + repr(settings.tenants.by_id["orders"])
    assert "rc-secret-token" not in shown
    assert TENANT.whsec not in shown
    bad = TENANT.toml().replace(TENANT.whsec, TENANT.whsec + "!")
    with pytest.raises(ConfigError) as caught:
        parse_tenants(bad)
    assert TENANT.whsec not in str(caught.value)


def test_keys_authenticate_to_their_tenant_with_a_key_id():
    """An API key maps to its tenant and a key id that is not the key; others map to nothing."""
    tenants = parse_tenants(TENANT.toml())
    tenant, key_id = tenants.authenticate(TENANT.api_key)
    assert tenant.id == "orders"
    assert TENANT.api_key not in key_id
    assert tenants.authenticate("wrong") is None


def test_rotation_lists_of_secrets_and_keys_are_accepted():
    """A tenant may list several API key hashes and several webhook secrets."""
    other = new_tenant("orders")
    digest = hashlib.sha256(TENANT.api_key.encode()).hexdigest()
    digest2 = hashlib.sha256(other.api_key.encode()).hexdigest()
    toml = (
        "[tenants.orders]\n"
        f'api_keys = ["{digest}", "{digest2}"]\n'
        f'webhook_secret = ["{TENANT.whsec}", "{other.whsec}"]\n'
        'callback_hosts = ["a.example.com"]\n'
    )
    tenants = parse_tenants(toml)
    assert tenants.authenticate(other.api_key)[0].id == "orders"
    assert len(tenants.by_id["orders"].webhook_secrets) == 2


def test_preflight_settings_are_read_from_the_environment(tmp_path):
    """The pre-flight switch, its allow list (normalised), its timeout and the size limit."""
    env = base_env(tmp_path) | {
        "GATEWAY_PREFLIGHT": "off",
        "GATEWAY_PREFLIGHT_ALLOW_HOSTS": " 127.0.0.1, *.Bench.Internal. ,,",
        "GATEWAY_PREFLIGHT_TIMEOUT_S": "2.5",
        "GATEWAY_INPUT_MAX_BYTES": "1000",
    }
    s = load_settings(env)
    assert s.preflight is False
    assert s.preflight_allow_hosts == ("127.0.0.1", "*.bench.internal")
    assert (s.preflight_timeout_s, s.input_max_bytes) == (2.5, 1000)


def test_with_preflight_off_its_timeout_need_not_fit_the_lease(tmp_path):
    """Only a check that runs has to fit in the lease beside the submit."""
    env = base_env(tmp_path) | {"GATEWAY_PREFLIGHT": "off", "GATEWAY_PREFLIGHT_TIMEOUT_S": "60"}
    assert load_settings(env).preflight_timeout_s == 60
