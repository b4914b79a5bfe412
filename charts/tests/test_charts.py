"""Tests of the Helm charts in charts/: rendered with Helm's own Go SDK (helm-python-sdk), checked
against the Kubernetes OpenAPI schemas (kubernetes-validate), and run through the real
`tether-agent` and `tether-gateway` binaries, so a chart that drifts from the binaries fails here.

Run: .venv/bin/python -m pytest charts/tests -q   (scripts/test does, after cargo nextest)
The binaries come from target/debug: `cargo build --workspace --bins` builds them.
"""

from __future__ import annotations

import base64
import copy
import ipaddress
import json
import os
import re
import signal
import socket
import subprocess
import time
import tomllib
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

try:
    import helm_python as helm
    import kubernetes_validate
    import yaml
except ImportError as e:  # pragma: no cover - the message is the point
    raise ImportError(
        f"{e}: the chart tests need the packages in requirements-test.txt "
        "(scripts/test installs them into .venv)"
    ) from e

ROOT = Path(__file__).resolve().parents[2]
CHARTS = ROOT / "charts"
AGENT_CHART = CHARTS / "tether-agent"
GATEWAY_CHART = CHARTS / "tether-gateway"
VALUES = CHARTS / "tests" / "values"
BIN = ROOT / "target" / "debug"

# The charts declare kubeVersion >= 1.26 (agent) and >= 1.30 (gateway: the preStop sleep action);
# check against the oldest the gateway takes and a recent release.
KUBERNETES_VERSIONS = ("1.30", "1.34")
# prometheus-operator kinds: kubernetes-validate has no schema for CRDs; checked by hand below.
CRD_KINDS = {"PodMonitor", "ServiceMonitor"}

AGENT_VALUES = sorted(p.name for p in VALUES.glob("agent-*.yaml"))
GATEWAY_VALUES = sorted(p.name for p in VALUES.glob("gateway-*.yaml"))
RELEASE = "tether"
NAMESPACE = "tether-system"

helm.disable_logging()


# === rendering ===


def load_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((VALUES / name).read_text()) or {}


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


class Rendered:
    """One chart rendered with one set of values: the parsed objects and the NOTES text."""

    def __init__(self, chart: Path, values: dict[str, Any]):
        self.values = values
        with helm.Chart.load(chart) as c:
            files = c.render(values, name=RELEASE, namespace=NAMESPACE)
        self.notes = ""
        self.objects: list[dict[str, Any]] = []
        for path, text in sorted(files.items()):
            if path.endswith("NOTES.txt"):
                self.notes = text
                continue
            for doc in yaml.safe_load_all(text):
                if doc is not None:
                    self.objects.append(doc)

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict[str, Any]:
        # The agent's ConfigMap without a name: its config, not the kill switch's `-control`.
        found = [o for o in self.of_kind(kind) if (o["metadata"]["name"] == name if name is not None
                 else not (kind == "ConfigMap" and o["metadata"]["name"].endswith("-control")))]
        assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
        return found[0]

    def pod_specs(self) -> list[tuple[str, dict[str, Any]]]:
        """Every pod spec: Deployment templates and bare Pods (the helm test hooks)."""
        specs = []
        for o in self.objects:
            if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
                specs.append((f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]))
            elif o["kind"] == "Pod":
                specs.append((f"Pod/{o['metadata']['name']}", o["spec"]))
        return specs


def render(chart: Path, values: dict[str, Any]) -> Rendered:
    return Rendered(chart, values)


def render_file(chart: Path, name: str, extra: dict[str, Any] | None = None) -> Rendered:
    return render(chart, deep_merge(load_values(name), extra or {}))


def all_renders() -> list[tuple[Path, str]]:
    return [(AGENT_CHART, v) for v in AGENT_VALUES] + [(GATEWAY_CHART, v) for v in GATEWAY_VALUES]


def render_id(p: tuple[Path, str]) -> str:
    return f"{p[0].name}:{p[1]}"


def test_the_value_files_the_tests_rely_on_exist():
    assert set(AGENT_VALUES) >= {
        "agent-required.yaml",
        "agent-existing-secret.yaml",
        "agent-proxy.yaml",
        "agent-metrics-no-netpol.yaml",
        "agent-aws-secretsmanager.yaml",
        "agent-registry.yaml",
    }, AGENT_VALUES
    assert set(GATEWAY_VALUES) >= {
        "gateway-required.yaml",
        "gateway-postgres.yaml",
        "gateway-postgres-dsn-only.yaml",
        "gateway-postgres-one-secret.yaml",
    }, GATEWAY_VALUES


# === lint and schema ===


@pytest.mark.parametrize("chart", [AGENT_CHART, GATEWAY_CHART], ids=lambda p: p.name)
def test_chart_lints_without_errors_or_warnings_with_its_defaults(chart):
    report = helm.lint(chart, strict=True)
    assert report["total_charts_linted"] == 1
    assert report["errors"] == [], report
    bad = [m for m in report["messages"] if m["severity"] >= 2]
    assert bad == [], bad


@pytest.mark.parametrize("case", all_renders(), ids=render_id)
def test_chart_lints_without_errors_or_warnings_with_each_values_file(case):
    chart, name = case
    report = helm.lint(chart, load_values(name), strict=True)
    assert report["total_charts_linted"] == 1
    assert report["errors"] == [], report
    bad = [m for m in report["messages"] if m["severity"] >= 2]
    assert bad == [], bad


@pytest.mark.parametrize(
    "chart,values,expected",
    [
        (AGENT_CHART, {}, "gateway.addresses is required"),
        (AGENT_CHART, {"gateway": {"addresses": ["gw:443"]}}, "identity is required"),
        (
            AGENT_CHART,
            {"gateway": {"addresses": ["gw:443"]}, "identity": {"certificate": "c", "privateKey": "k"}},
            "gateway.caBundle is required",
        ),
        (
            AGENT_CHART,
            {"gateway": {"addresses": ["gw:443"]}, "identity": {"existingSecret": "s"}},
            "networkPolicy.gatewayCIDRs is required",
        ),
        (
            AGENT_CHART,
            {
                "gateway": {"addresses": ["gw:443"]},
                "identity": {"existingSecret": "s", "certificate": "c"},
                "networkPolicy": {"enabled": False},
            },
            "not both",
        ),
        (
            AGENT_CHART,
            {
                "gateway": {"addresses": ["gw:443"]},
                "identity": {"awsSecretsManager": "tether/agent", "existingSecret": "s"},
                "networkPolicy": {"enabled": False},
            },
            "identity.awsSecretsManager cannot be combined with identity.existingSecret: the agent reads",
        ),
        (
            AGENT_CHART,
            {
                "gateway": {"addresses": ["gw:443"]},
                "identity": {"awsSecretsManager": "tether/agent", "certificate": "c", "privateKey": "k"},
                "networkPolicy": {"enabled": False},
            },
            "identity.awsSecretsManager cannot be combined with identity.certificate, identity.privateKey",
        ),
        (
            AGENT_CHART,
            {
                "gateway": {"addresses": ["gw:443"]},
                "identity": {"existingSecret": "s"},
                "networkPolicy": {"enabled": False},
                "metrics": {"podMonitor": {"enabled": True}},
            },
            "metrics.podMonitor.enabled needs metrics.enabled",
        ),
        (
            AGENT_CHART,
            {
                "gateway": {"addresses": ["gw:443"]},
                "identity": {"existingSecret": "s"},
                "networkPolicy": {"enabled": False},
                "environments": {"egressAllow": [{"cidr": "10.0.0.0/8"}]},
            },
            "environments.egressAllow is used only with environments.egress=deny",
        ),
        (GATEWAY_CHART, {}, "trustDomain is required"),
        (GATEWAY_CHART, {"trustDomain": "t.example"}, "tls.existingSecret is required"),
        (
            GATEWAY_CHART,
            {"trustDomain": "t.example", "tls": {"existingSecret": "pki"}, "store": {"type": "postgres"}},
            "store.postgres.existingSecret is required when store.type is postgres: create a Secret whose key "
            "\"dsn\" holds the DSN (kubectl create secret generic tether-gateway-db --from-literal=dsn=",
        ),
        (
            GATEWAY_CHART,
            {"trustDomain": "t.example", "tls": {"existingSecret": "pki"}, "replicaCount": 2},
            "replicaCount is 2 but store.type is embedded, which allows 1: its store is one ReadWriteOnce volume "
            "that one gateway process holds. Set replicaCount: 1, or run replicas on PostgreSQL: store.type: "
            "postgres with store.postgres.existingSecret",
        ),
        (
            GATEWAY_CHART,
            {"trustDomain": "t.example", "tls": {"existingSecret": "pki"}, "replicaCount": 3,
             "store": {"type": "embedded", "postgres": {"existingSecret": "db"}}},
            "replicaCount is 3 but store.type is embedded",
        ),
        (
            GATEWAY_CHART,
            {"trustDomain": "t.example", "tls": {"existingSecret": "pki"},
             "store": {"type": "postgres", "postgres": {"existingSecret": "db", "ca": {"existingSecret": "a", "existingConfigMap": "b"}}}},
            "store.postgres.ca: set existingSecret or existingConfigMap, not both",
        ),
        (
            GATEWAY_CHART,
            {"trustDomain": "t.example", "tls": {"existingSecret": "pki"},
             "store": {"type": "postgres", "postgres": {"existingSecret": "db", "sslmode": "disable", "ca": {"existingConfigMap": "b"}}}},
            "store.postgres.ca is set but store.postgres.sslmode is disable, which never uses it: set sslmode to verify-full",
        ),
        (
            GATEWAY_CHART,
            {
                "trustDomain": "t.example",
                "tls": {"existingSecret": "pki"},
                "tunnel": {"drainTimeout": "1m"},
                "terminationGracePeriodSeconds": 60,
            },
            "terminationGracePeriodSeconds (60) must exceed tunnel.drainTimeout (1m)",
        ),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_missing_or_contradictory_values_fail_the_render_naming_the_value(chart, values, expected):
    """The defaults alone do not render: a gateway address and an identity have no sensible
    default, and an agent that crash-loops on install is worse than a clear refusal."""
    with pytest.raises(helm.HelmRenderError) as e:
        render(chart, values)
    assert expected in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "chart,base,bad,field",
    [
        (AGENT_CHART, "agent-required.yaml", {"replicaCount": "two"}, "/replicaCount"),
        (AGENT_CHART, "agent-required.yaml", {"replicaCoutn": 2}, "'replicaCoutn'"),
        (AGENT_CHART, "agent-required.yaml", {"gateway": {"addresses": ["gw.example.com"]}}, "/gateway/addresses/0"),
        (AGENT_CHART, "agent-required.yaml", {"image": {"tagg": "1"}}, "'tagg'"),
        (AGENT_CHART, "agent-required.yaml", {"services": {"db": {"address": "db:5432", "kind": "http"}}}, "/services/db/kind"),
        (AGENT_CHART, "agent-required.yaml", {"config": {"reconnect": {"maxBackoff": "soon"}}}, "/config/reconnect/maxBackoff"),
        (AGENT_CHART, "agent-required.yaml", {"networkPolicy": {"gatewayCIDRs": ["gw.example.com"]}}, "/networkPolicy/gatewayCIDRs/0"),
        (AGENT_CHART, "agent-required.yaml", {"identity": {"awsSecretManager": "tether/agent"}}, "'awsSecretManager'"),
        (AGENT_CHART, "agent-aws-secretsmanager.yaml", {"identity": {"awsSecretsManager": "tether/agent identity"}}, "/identity/awsSecretsManager"),
        (AGENT_CHART, "agent-aws-secretsmanager.yaml", {"aws": {"regoin": "eu-west-1"}}, "'regoin'"),
        (AGENT_CHART, "agent-aws-secretsmanager.yaml", {"aws": {"endpointUrl": "vpce.example.com"}}, "/aws/endpointUrl"),
        (AGENT_CHART, "agent-aws-secretsmanager.yaml", {"aws": {"maxAttempts": 0}}, "/aws/maxAttempts"),
        (AGENT_CHART, "agent-aws-secretsmanager.yaml", {"kubernetes": {"kubeconfig": "/root/.kube/config"}}, "'kubeconfig'"),
        (AGENT_CHART, "agent-aws-secretsmanager.yaml", {"kubernetes": {"rolloutTimeout": "ten minutes"}}, "/kubernetes/rolloutTimeout"),
        (AGENT_CHART, "agent-required.yaml", {"secrets": {"allow": ["tether/apps/ *"]}}, "/secrets/allow/0"),
        (AGENT_CHART, "agent-required.yaml", {"secrets": {"allow": "tether/apps/*"}}, "/secrets/allow"),
        (AGENT_CHART, "agent-required.yaml", {"secrets": {"allowed": ["x"]}}, "'allowed'"),
        (AGENT_CHART, "agent-required.yaml", {"environments": {"egress": "block"}}, "/environments/egress"),
        (AGENT_CHART, "agent-required.yaml", {"environments": {"egress": "deny", "egressAllow": [{"cidr": "10.0.0.0"}]}}, "/environments/egressAllow/0/cidr"),
        (AGENT_CHART, "agent-required.yaml", {"environments": {"egress": "deny", "egressAllow": [{"cidr": "10.0.0.0/8", "port": 5432}]}}, "'port'"),
        (AGENT_CHART, "agent-required.yaml", {"environments": {"egress": "deny", "egressAllow": [{"cidr": "10.0.0.0/8", "ports": [0]}]}}, "/environments/egressAllow/0/ports/0"),
        (AGENT_CHART, "agent-registry.yaml", {"registry": {"namePrefix": "Tether/"}}, "/registry/namePrefix"),
        (AGENT_CHART, "agent-registry.yaml", {"registry": {"pullPrincipals": ["arn:aws:iam::123456789012:role/*"]}}, "/registry/pullPrincipals/0"),
        (AGENT_CHART, "agent-registry.yaml", {"registry": {"pullPrincipal": []}}, "'pullPrincipal'"),
        (GATEWAY_CHART, "gateway-required.yaml", {"replicaCount": "two"}, "/replicaCount"),
        (GATEWAY_CHART, "gateway-required.yaml", {"storeType": "postgres"}, "'storeType'"),
        (GATEWAY_CHART, "gateway-required.yaml", {"store": {"type": "sqlite"}}, "/store/type"),
        (GATEWAY_CHART, "gateway-required.yaml", {"tunnel": {"drainTimeout": "1h30m"}}, "/tunnel/drainTimeout"),
        (GATEWAY_CHART, "gateway-required.yaml", {"replicaCount": -1}, "/replicaCount"),
        (GATEWAY_CHART, "gateway-required.yaml", {"agents": {"minVersion": "1.2"}}, "/agents/minVersion"),
        (GATEWAY_CHART, "gateway-postgres.yaml", {"store": {"postgres": {"sslmode": "verify"}}}, "/store/postgres/sslmode"),
        (GATEWAY_CHART, "gateway-postgres.yaml", {"store": {"postgres": {"poolSize": 1}}}, "/store/postgres/poolSize"),
        (GATEWAY_CHART, "gateway-postgres.yaml", {"store": {"postgres": {"connectTimeout": "30"}}}, "/store/postgres/connectTimeout"),
        (GATEWAY_CHART, "gateway-postgres.yaml", {"store": {"postgres": {"passwordFile": "/pw"}}}, "'passwordFile'"),
        (GATEWAY_CHART, "gateway-postgres.yaml", {"store": {"postgres": {"password": {"secret": "pw"}}}}, "'secret'"),
        (GATEWAY_CHART, "gateway-postgres.yaml", {"store": {"postgres": {"ca": {"existingSecret": "RDS_CA"}}}}, "/store/postgres/ca/existingSecret"),
        (GATEWAY_CHART, "gateway-postgres.yaml", {"store": {"postgres": {"ca": {"key": "ca crt"}}}}, "/store/postgres/ca/key"),
        (GATEWAY_CHART, "gateway-postgres.yaml", {"cluster": {"podIPFamily": "v6"}}, "/cluster/podIPFamily"),
        (GATEWAY_CHART, "gateway-postgres.yaml", {"cluster": {"replicaId": "gw-1"}}, "'replicaId'"),
        (GATEWAY_CHART, "gateway-postgres.yaml", {"cluster": {"livenessTimeout": "soon"}}, "/cluster/livenessTimeout"),
        (GATEWAY_CHART, "gateway-postgres.yaml", {"podDisruptionBudget": {"maxUnavailable": 0}}, "/podDisruptionBudget/maxUnavailable"),
        (GATEWAY_CHART, "gateway-postgres.yaml", {"podDisruptionBudget": {"minAvailable": 2}}, "'minAvailable'"),
        (GATEWAY_CHART, "gateway-postgres.yaml", {"topologySpread": {"whenUnsatisfiable": "Never"}}, "/topologySpread/whenUnsatisfiable"),
    ],
    ids=lambda x: x if isinstance(x, str) and x.startswith(("/", "'")) else None,
)
def test_schema_rejects_bad_values_naming_the_field(chart, base, bad, field):
    values = deep_merge(load_values(base), bad)
    with helm.Chart.load(chart) as c:
        with pytest.raises(helm.HelmValuesError) as e:
            c.validate_schema(values)
        assert field in str(e.value), str(e.value)
        # helm install/template run the same check before rendering.
        with pytest.raises(helm.HelmValuesError) as e:
            c.render(values, name=RELEASE, namespace=NAMESPACE)
        assert field in str(e.value), str(e.value)


def _schema_walk(schema: dict[str, Any], path: str, out: list[tuple[str, dict[str, Any]]]):
    out.append((path, schema))
    for k, sub in schema.get("properties", {}).items():
        _schema_walk(sub, f"{path}.{k}" if path else k, out)
    ap = schema.get("additionalProperties")
    if isinstance(ap, dict):
        _schema_walk(ap, f"{path}.*", out)
    items = schema.get("items")
    if isinstance(items, dict):
        _schema_walk(items, f"{path}[]", out)


def _values_leaves(values: Any, path: str, out: set[str]):
    if isinstance(values, dict) and values:
        for k, v in values.items():
            _values_leaves(v, f"{path}.{k}" if path else k, out)
    else:
        out.add(path)


PASSTHROUGH = {
    AGENT_CHART: {"affinity", "tolerations[]", "extraEnv[]", "extraVolumes[]", "extraVolumeMounts[]", "networkPolicy.extraEgress[]", "ledger.volume"},
    GATEWAY_CHART: {"affinity", "tolerations[]", "extraEnv[]", "extraVolumes[]", "extraVolumeMounts[]",
                    "networkPolicy.northboundFrom[]", "networkPolicy.opsFrom[]"},
}


@pytest.mark.parametrize("chart", [AGENT_CHART, GATEWAY_CHART], ids=lambda p: p.name)
def test_schema_closes_every_object_and_covers_every_value(chart):
    schema = json.loads((chart / "values.schema.json").read_text())
    nodes: list[tuple[str, dict[str, Any]]] = []
    _schema_walk(schema, "", nodes)
    open_objects = set()
    for path, node in nodes:
        if node.get("type") == "object" or "properties" in node:
            assert "additionalProperties" in node, f"{chart.name}: {path or '(top)'} does not say additionalProperties"
            if node["additionalProperties"] is True:
                open_objects.add(path)
    # Only Kubernetes objects passed through verbatim stay open; the API server checks those.
    assert open_objects == PASSTHROUGH[chart], open_objects
    assert schema["additionalProperties"] is False
    # Every default in values.yaml is declared, and every declared property has a default.
    defaults = yaml.safe_load((chart / "values.yaml").read_text())
    leaves: set[str] = set()
    _values_leaves(defaults, "", leaves)
    declared = {p for p, n in nodes if p and "*" not in p and "[]" not in p}
    # Maps (labels, annotations, resources.requests, ...) declare their entries' type, not names.
    maps = {p for p, n in nodes if n.get("additionalProperties") not in (None, False)}
    for leaf in leaves:
        parts = leaf.split(".")
        in_map = any(".".join(parts[:i]) in maps for i in range(1, len(parts)))
        assert leaf in declared or in_map, f"{chart.name}: values.yaml key {leaf} is not in values.schema.json"
    parents = {p for p, n in nodes if n.get("properties")}
    for p in declared - parents:
        assert p in leaves or any(leaf.startswith(p + ".") for leaf in leaves), (
            f"{chart.name}: schema property {p} has no default in values.yaml")
    with helm.Chart.load(chart) as c:
        c.validate_schema(defaults)


# === every manifest against the Kubernetes schema ===


@pytest.mark.parametrize("case", all_renders(), ids=render_id)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_manifest_is_valid_kubernetes(case, version):
    chart, name = case
    r = render_file(chart, name)
    assert r.objects, "nothing rendered"
    checked = 0
    for obj in r.objects:
        if obj["kind"] in CRD_KINDS:
            assert obj["apiVersion"] == "monitoring.coreos.com/v1", obj
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} invalid for Kubernetes {version}: {e}")
        checked += 1
        assert obj["metadata"].get("namespace", NAMESPACE) == NAMESPACE
    assert checked >= 4


@pytest.mark.parametrize("case", all_renders(), ids=render_id)
def test_objects_carry_the_standard_labels(case):
    chart, name = case
    r = render_file(chart, name)
    for obj in r.objects:
        labels = obj["metadata"].get("labels", {})
        for key in (
            "app.kubernetes.io/name",
            "app.kubernetes.io/instance",
            "app.kubernetes.io/version",
            "app.kubernetes.io/component",
            "app.kubernetes.io/part-of",
            "app.kubernetes.io/managed-by",
        ):
            assert key in labels, f"{obj['kind']}/{obj['metadata']['name']} lacks {key}"
        assert labels["app.kubernetes.io/name"] == chart.name
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/part-of"] == "tether"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"


# === hardening ===


@pytest.mark.parametrize("case", all_renders(), ids=render_id)
def test_every_container_is_non_root_read_only_and_drops_all_capabilities(case):
    chart, name = case
    r = render_file(chart, name)
    specs = r.pod_specs()
    # The workload and the `helm test` hook pod, at least.
    assert len(specs) >= 2, [s for s, _ in specs]
    assert any(o["kind"] == "Pod" and o["metadata"]["annotations"]["helm.sh/hook"] == "test" for o in r.objects)
    containers = 0
    for where, spec in specs:
        pod_sc = spec.get("securityContext", {})
        assert pod_sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
        assert "hostNetwork" not in spec and "hostPID" not in spec, where
        for kind in ("initContainers", "containers", "ephemeralContainers"):
            for c in spec.get(kind, []):
                containers += 1
                sc = c.get("securityContext", {})
                what = f"{where} {kind}/{c['name']}"
                assert sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True, what
                uid = sc.get("runAsUser", pod_sc.get("runAsUser"))
                assert uid == 65532, f"{what}: runAsUser {uid}"
                assert sc.get("runAsGroup", pod_sc.get("runAsGroup")) == 65532, what
                assert sc.get("readOnlyRootFilesystem") is True, what
                assert sc.get("allowPrivilegeEscalation") is False, what
                assert sc.get("privileged", False) is False, what
                assert sc.get("capabilities", {}).get("drop") == ["ALL"], what
                assert not sc.get("capabilities", {}).get("add"), what
    assert containers >= 2


@pytest.mark.parametrize("name", AGENT_VALUES)
def test_agent_renders_no_service_no_ingress_and_listens_only_on_loopback(name):
    r = render_file(AGENT_CHART, name)
    assert r.of_kind("Service") == []
    assert r.of_kind("Ingress") == []
    agent = r.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    toml = tomllib.loads(r.one("ConfigMap")["data"]["agent.toml"])
    if r.values.get("metrics", {}).get("enabled"):
        assert agent["ports"] == [{"name": "ops", "containerPort": 9091, "protocol": "TCP"}]
        assert toml["ops"]["listen"] == "0.0.0.0:9091"
    else:
        assert "ports" not in agent
        assert toml["ops"]["listen"] == "127.0.0.1:9091"


def test_agent_deployment_shape():
    r = render_file(AGENT_CHART, "agent-required.yaml")
    d = r.one("Deployment")
    assert d["spec"]["replicas"] == 2
    assert d["spec"]["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    pod = d["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 30
    assert pod["enableServiceLinks"] is False
    assert pod["automountServiceAccountToken"] is True
    anti = pod["affinity"]["podAntiAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in anti
    assert anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
    spread = pod["topologySpreadConstraints"]
    assert {s["topologyKey"] for s in spread} == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    assert all(s["whenUnsatisfiable"] == "ScheduleAnyway" for s in spread)
    c = pod["containers"][0]
    assert c["command"] == ["/usr/local/bin/tether-agent", "run", "--config", "/etc/tether/agent.toml"]
    assert c["livenessProbe"]["exec"]["command"] == [
        "/usr/local/bin/tether-agent", "probe", "--config", "/etc/tether/agent.toml"]
    assert c["readinessProbe"]["exec"]["command"] == [
        "/usr/local/bin/tether-agent", "probe", "--config", "/etc/tether/agent.toml", "--ready"]
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/tether"]["readOnly"] is True
    state = next(v for v in pod["volumes"] if v["name"] == mounts["/var/lib/tether"]["name"])
    assert "emptyDir" in state
    pdb = r.one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"] == d["spec"]["selector"]


def test_agent_scheduling_and_extension_values_reach_the_pod():
    r = render_file(AGENT_CHART, "agent-metrics-no-netpol.yaml")
    v = r.values
    d = r.one("Deployment")
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert d["spec"]["replicas"] == 3
    assert c["image"] == "registry.example.com/tether/tether-agent:0.1.0-rc1"
    assert c["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "registry-creds"}]
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["nodeSelector"] == v["nodeSelector"]
    assert pod["tolerations"] == v["tolerations"]
    assert pod["affinity"] == v["affinity"], "affinity must replace the default anti-affinity"
    assert pod["terminationGracePeriodSeconds"] == 20
    assert d["spec"]["template"]["metadata"]["annotations"]["example.com/team"] == "platform"
    assert d["spec"]["template"]["metadata"]["labels"]["team"] == "platform"
    assert {"name": "RUST_BACKTRACE", "value": "1"} in c["env"]
    assert v["extraVolumes"][0] in pod["volumes"]
    assert v["extraVolumeMounts"][0] in c["volumeMounts"]
    assert r.one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 2
    assert r.of_kind("NetworkPolicy") == []
    pm = r.one("PodMonitor")
    assert pm["metadata"]["labels"]["release"] == "prometheus"
    assert pm["spec"]["podMetricsEndpoints"] == [{"port": "ops", "path": "/metrics", "interval": "15s"}]
    pod_labels = d["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_agent_service_account_carries_cloud_identity():
    r = render_file(AGENT_CHART, "agent-existing-secret.yaml")
    sa = r.one("ServiceAccount")
    ann = sa["metadata"]["annotations"]
    assert ann["eks.amazonaws.com/role-arn"] == "arn:aws:iam::123456789012:role/tether-agent"
    assert ann["azure.workload.identity/client-id"] == "00000000-0000-0000-0000-000000000000"
    d = r.one("Deployment")
    assert d["spec"]["template"]["metadata"]["labels"]["azure.workload.identity/use"] == "true"
    assert d["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    plain = render_file(AGENT_CHART, "agent-required.yaml")
    assert "annotations" not in plain.one("ServiceAccount")["metadata"]
    assert "azure.workload.identity/use" not in plain.one("Deployment")["spec"]["template"]["metadata"]["labels"]


def test_agent_proxy_is_passed_as_environment_and_services_are_rendered_as_the_allow_list():
    r = render_file(AGENT_CHART, "agent-proxy.yaml")
    c = r.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["HTTPS_PROXY"] == "http://proxy.internal:3128"
    assert env["NO_PROXY"] == ".svc,.cluster.local,10.0.0.0/8"
    cm = r.one("ConfigMap")["data"]
    cfg = tomllib.loads(cm["agent.toml"])
    assert cfg["default_service"] == "orders-api"
    assert cfg["services"] == {
        "orders-api": {"address": "https://orders.shop.svc:9000", "ca": "/etc/tether/service-orders-api-ca.crt"},
        "postgres": {"address": "db.internal:5432", "kind": "tcp"},
    }
    assert "MIIBplaceholderUpstreamCA" in cm["service-orders-api-ca.crt"]
    items = [i["path"] for src in r.one("Deployment")["spec"]["template"]["spec"]["volumes"][0]["projected"]["sources"]
             if "configMap" in src for i in src["configMap"]["items"]]
    assert "service-orders-api-ca.crt" in items
    assert "Allow-listed services: orders-api, postgres" in r.notes
    assert "does not use a proxy yet" in r.notes
    plain = render_file(AGENT_CHART, "agent-required.yaml")
    assert "env" not in plain.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "services" not in tomllib.loads(plain.one("ConfigMap")["data"]["agent.toml"])


def test_a_tcp_service_with_a_ca_and_the_reserved_name_are_refused_with_the_key_named():
    with pytest.raises(Exception) as e:
        render(AGENT_CHART, deep_merge(load_values("agent-required.yaml"),
                                       {"services": {"db": {"address": "db:5432", "kind": "tcp", "ca": "x"}}}))
    assert "services.db.ca" in str(e.value)
    with pytest.raises(Exception) as e:
        render(AGENT_CHART, deep_merge(load_values("agent-required.yaml"),
                                       {"services": {"agent": {"address": "x:1"}}}))
    assert "services.agent" in str(e.value)


def test_agent_toml_holds_exactly_the_keys_the_agent_knows():
    r = render_file(AGENT_CHART, "agent-existing-secret.yaml")
    cfg = tomllib.loads(r.one("ConfigMap")["data"]["agent.toml"])
    assert cfg == {
        "gateways": ["gw-1.tether.example.com:443", "gw-2.tether.example.com:8443"],
        "server_name": "gw.tether.example.com",
        "default_service": "default",
        "state_dir": "/var/lib/tether",
        "labels": {"region": "eu-west-1", "cluster": 'prod "blue"'},
        "tls": {
            "ca": "/etc/tether/identity/ca.crt",
            "cert": "/etc/tether/identity/tls.crt",
            "key": "/etc/tether/identity/tls.key",
        },
        "identity": {"source": "files"},
        "aws": {"max_attempts": 5},
        "kubernetes": {"poll_interval": "2s", "rollout_timeout": "10m"},
        "secrets": {"allow": []},
        "environments": {"egress": "allow", "dns_namespace": "kube-system", "dns_pod_labels": {"k8s-app": "kube-dns"}},
        "reconnect": {"initial_backoff": "1s", "max_backoff": "1m", "connect_timeout": "10s"},
        "ops": {"listen": "127.0.0.1:9091"},
        "log": {"format": "text", "level": "info,tether_agent=debug"},
        "control_file": "/etc/tether-control/control.toml",
        "ledger": {"enabled": True, "max_file_bytes": 16777216, "max_files": 8,
                   "checkpoint_records": 1000, "checkpoint_interval": "60s", "stdout": True},
    }
    inline = tomllib.loads(render_file(AGENT_CHART, "agent-required.yaml").one("ConfigMap")["data"]["agent.toml"])
    assert inline["tls"]["ca"] == "/etc/tether/gateway-ca.crt"
    assert "server_name" not in inline and "instance_id" not in inline



def test_agent_connections_reaches_agent_toml_only_when_set():
    unset = tomllib.loads(render_file(AGENT_CHART, "agent-required.yaml").one("ConfigMap")["data"]["agent.toml"])
    assert "connections" not in unset
    three = render_file(AGENT_CHART, "agent-required.yaml", {"gateway": {"connections": 3}})
    assert tomllib.loads(three.one("ConfigMap")["data"]["agent.toml"])["connections"] == 3
    for bad in (0, 17, "2"):
        with pytest.raises(Exception) as e:
            render_file(AGENT_CHART, "agent-required.yaml", {"gateway": {"connections": bad}})
        assert "connections" in str(e.value), e.value

SM_SECRET = "arn:aws:secretsmanager:eu-west-1:123456789012:secret:tether/agent-identity-AbCdEf"


def test_agent_identity_from_aws_secrets_manager_and_the_aws_and_kubernetes_values_reach_agent_toml():
    r = render_file(AGENT_CHART, "agent-aws-secretsmanager.yaml")
    cfg = tomllib.loads(r.one("ConfigMap")["data"]["agent.toml"])
    # No [tls] at all: no cert/key (the agent refuses them with this source), and no ca without
    # gateway.caBundle (the secret's `ca` is used).
    assert cfg == {
        "gateways": ["gw.tether.example.com:443"],
        "default_service": "default",
        "state_dir": "/var/lib/tether",
        "labels": {},
        "identity": {"source": f"aws-secretsmanager:{SM_SECRET}"},
        "aws": {
            "region": "eu-west-1",
            "endpoint_url": "https://vpce-0123-abcd.secretsmanager.eu-west-1.vpce.amazonaws.com",
            "max_attempts": 8,
        },
        "kubernetes": {"poll_interval": "500ms", "rollout_timeout": "15m"},
        "secrets": {"allow": ["tether/apps/*", "arn:aws:secretsmanager:eu-west-1:123456789012:secret:tether/apps/*"]},
        "environments": {
            "egress": "deny",
            "dns_namespace": "kube-system",
            "dns_pod_labels": {"k8s-app": "kube-dns"},
            "egress_allow": [
                {"cidr": "10.0.0.0/16", "ports": [5432, 6432]},
                {"cidr": "10.1.0.0/16", "protocol": "UDP"},
            ],
        },
        "reconnect": {"initial_backoff": "500ms", "max_backoff": "30s", "connect_timeout": "5s"},
        "ops": {"listen": "127.0.0.1:9091"},
        "log": {"format": "json", "level": "info"},
        "control_file": "/etc/tether-control/control.toml",
        "ledger": {"enabled": True, "max_file_bytes": 16777216, "max_files": 8,
                   "checkpoint_records": 1000, "checkpoint_interval": "60s", "stdout": True},
    }
    with_ca = render_file(AGENT_CHART, "agent-aws-secretsmanager.yaml", {"gateway": {"caBundle": "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"}})
    assert tomllib.loads(with_ca.one("ConfigMap")["data"]["agent.toml"])["tls"] == {"ca": "/etc/tether/gateway-ca.crt"}
    # Only the keys that are set reach [aws].
    plain = render_file(AGENT_CHART, "agent-aws-secretsmanager.yaml", {"aws": {"region": "", "endpointUrl": ""}})
    assert tomllib.loads(plain.one("ConfigMap")["data"]["agent.toml"])["aws"] == {"max_attempts": 8}
    assert "Identity comes from the AWS Secrets Manager secret" in r.notes
    assert SM_SECRET in r.notes


def test_secret_sync_is_refused_for_every_secret_and_egress_left_to_commands_by_default():
    defaults = yaml.safe_load((AGENT_CHART / "values.yaml").read_text())
    assert defaults["secrets"] == {"allow": []}
    assert defaults["environments"] == {"egress": "allow", "egressAllow": []}
    r = render_file(AGENT_CHART, "agent-required.yaml")
    cfg = tomllib.loads(r.one("ConfigMap")["data"]["agent.toml"])
    # Rendered explicitly, so a reviewer reading agent.toml sees the deny.
    assert cfg["secrets"] == {"allow": []}
    assert cfg["environments"]["egress"] == "allow" and "egress_allow" not in cfg["environments"]
    assert "secret.sync is refused for every secret: secrets.allow is empty" in r.notes
    assert "Environments' egress is the control plane's choice" in r.notes


def test_environments_egress_follows_the_charts_dns_values_and_notes_say_what_is_allowed():
    r = render_file(AGENT_CHART, "agent-aws-secretsmanager.yaml", {
        "networkPolicy": {"dns": {"namespace": "dns", "podLabels": {"k8s-app": "coredns", "tier": "node"}}}})
    env = tomllib.loads(r.one("ConfigMap")["data"]["agent.toml"])["environments"]
    assert env["dns_namespace"] == "dns"
    assert env["dns_pod_labels"] == {"k8s-app": "coredns", "tier": "node"}
    assert "tether/apps/*, arn:aws:secretsmanager:eu-west-1:123456789012:secret:tether/apps/* (secrets.allow)" in r.notes
    assert "egress is denied except to the cluster DNS and 2 destination(s)" in r.notes


def test_agent_refuses_a_secret_pattern_the_schema_lets_through_naming_the_key(pki, tmp_path):
    """The schema checks characters; the agent checks an ARN pattern's shape and exits 64 naming
    the entry, which the chart's helm test hook shows before any pod runs the agent."""
    values = deep_merge(load_values("agent-aws-secretsmanager.yaml"), {
        "gateway": {"caBundle": pki["ca"]},
        "secrets": {"allow": ["tether/apps/*", "arn:aws:ssm:eu-west-1:123456789012:parameter:x"]}})
    r = render(AGENT_CHART, values)
    etc = materialize(r, tmp_path, {})
    bad = run(in_pod(hook_pod(r, "config")["spec"]["containers"][0]["command"], etc))
    assert bad.returncode == 64, bad
    assert "secrets.allow[1]" in bad.stderr and "an ARN pattern is" in bad.stderr, bad.stderr


def documented_registry_actions() -> list[str]:
    """The Allow actions of the first JSON policy under "IAM for the registry commands" in
    docs/install-agent.md (e2e/tests/registry.rs checks them against what the commands call)."""
    section = (ROOT / "docs" / "install-agent.md").read_text().split("### IAM for the registry commands", 1)[1]
    block = section.split("```json", 1)[1].split("```", 1)[0]
    return sorted(a for s in json.loads(block)["Statement"] if s["Effect"] == "Allow" for a in s["Action"])


def test_agent_registry_values_reach_agent_toml_and_the_notes_list_the_documented_iam_actions():
    r = render_file(AGENT_CHART, "agent-registry.yaml")
    cfg = tomllib.loads(r.one("ConfigMap")["data"]["agent.toml"])
    assert cfg["registry"] == {
        "name_prefix": "tether/",
        "pull_principals": ["arn:aws:iam::123456789012:role/eks-nodes", "arn:aws:iam::123456789012:role/karpenter-nodes"],
    }
    assert cfg["aws"] == {"region": "eu-west-1", "max_attempts": 5}
    # The NOTES name exactly the actions of the install guide's policy, scoped to the prefix.
    notes_actions = sorted(set(re.findall(r"ecr:[A-Za-z]+", r.notes)))
    assert notes_actions == documented_registry_actions(), r.notes
    assert "repository/tether/*" in r.notes
    assert "serviceAccount.awsRoleArn is empty" not in r.notes
    assert "no egress to ECR" not in r.notes
    only_prefix = render_file(AGENT_CHART, "agent-registry.yaml", {"registry": {"pullPrincipals": []}})
    assert tomllib.loads(only_prefix.one("ConfigMap")["data"]["agent.toml"])["registry"] == {"name_prefix": "tether/"}
    bare = render_file(AGENT_CHART, "agent-registry.yaml",
                       {"serviceAccount": {"awsRoleArn": ""}, "networkPolicy": {"extraEgressCIDRs": []}})
    assert "serviceAccount.awsRoleArn is empty" in bare.notes and "no egress to ECR" in bare.notes, bare.notes
    # Unset: no [registry] at all, and no registry notes.
    unset = render_file(AGENT_CHART, "agent-required.yaml")
    assert "registry" not in tomllib.loads(unset.one("ConfigMap")["data"]["agent.toml"])
    assert "ecr:" not in unset.notes


def test_agent_identity_from_aws_secrets_manager_mounts_no_identity_secret_and_uses_irsa():
    r = render_file(AGENT_CHART, "agent-aws-secretsmanager.yaml", {"gateway": {"caBundle": "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n"}})
    assert r.of_kind("Secret") == [], "the chart must create no identity Secret"
    for where, spec in r.pod_specs():
        for volume in spec["volumes"]:
            assert "secret" not in volume, f"{where} mounts a Secret: {volume}"
            for source in volume.get("projected", {}).get("sources", []):
                assert "secret" not in source, f"{where} mounts a Secret: {source}"
                if "configMap" in source:
                    assert [i["path"] for i in source["configMap"]["items"]] == ["agent.toml", "gateway-ca.crt"]
    sa = r.one("ServiceAccount")
    assert sa["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:aws:iam::123456789012:role/tether-agent"}
    assert r.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"]
    assert "serviceAccount.awsRoleArn is empty" not in r.notes
    without_role = render_file(AGENT_CHART, "agent-aws-secretsmanager.yaml", {"serviceAccount": {"awsRoleArn": ""}})
    assert "annotations" not in without_role.one("ServiceAccount")["metadata"]
    assert "serviceAccount.awsRoleArn is empty" in without_role.notes

    def identity_checksum(secret_id):
        r = render_file(AGENT_CHART, "agent-aws-secretsmanager.yaml", {"identity": {"awsSecretsManager": secret_id}})
        return r.one("Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/identity"]

    assert identity_checksum(SM_SECRET) == identity_checksum(SM_SECRET)
    assert identity_checksum("tether/other-identity") != identity_checksum(SM_SECRET)


def test_checksums_roll_the_pods_when_config_or_identity_change():
    def checksums(extra):
        r = render_file(AGENT_CHART, "agent-required.yaml", extra)
        ann = r.one("Deployment")["spec"]["template"]["metadata"]["annotations"]
        return ann["checksum/config"], ann["checksum/identity"]

    base = checksums({})
    relabelled = checksums({"config": {"labels": {"region": "us-east-1"}}})
    rekeyed = checksums({"identity": {"privateKey": "-----BEGIN PRIVATE KEY-----\nother\n-----END PRIVATE KEY-----\n"}})
    assert relabelled[0] != base[0] and relabelled[1] == base[1]
    assert rekeyed[1] != base[1] and rekeyed[0] == base[0]
    assert checksums({})[0] == base[0], "checksums must be deterministic"


def test_notes_tell_how_to_check_the_agent_is_connected():
    notes = render_file(AGENT_CHART, "agent-required.yaml").notes
    assert "kubectl -n tether-system logs deployment/tether-tether-agent" in notes
    assert "tether-agent probe --config /etc/tether/agent.toml --ready" in notes
    assert "tetherctl agents get <tenant>/<agent>" in notes
    assert "Bootstrap-token enrollment is" in notes


# === NetworkPolicy ===


def _egress_by_ports(np: dict[str, Any]) -> dict[tuple, list]:
    return {tuple(sorted((p["protocol"], p["port"]) for p in rule["ports"])): rule["to"] for rule in np["spec"]["egress"]}


def test_agent_network_policy_denies_all_ingress_and_allows_only_the_listed_egress():
    r = render_file(AGENT_CHART, "agent-required.yaml")
    np = r.one("NetworkPolicy")
    spec = np["spec"]
    assert sorted(spec["policyTypes"]) == ["Egress", "Ingress"]
    assert spec["ingress"] == []
    pod_labels = r.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert spec["podSelector"]["matchLabels"].items() <= pod_labels.items()
    for rule in spec["egress"]:
        # A rule without `to` or `ports` would allow every destination or every port.
        assert rule.get("to"), rule
        assert rule.get("ports"), rule
    rules = _egress_by_ports(np)
    assert rules == {
        (("TCP", 443), ("UDP", 443)): [{"ipBlock": {"cidr": "203.0.113.10/32"}}],
        (("TCP", 53), ("UDP", 53)): [
            {
                "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
                "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
            }
        ],
    }
    assert "kubernetesAPICIDRs is empty" in r.notes


def test_agent_network_policy_opens_each_gateway_port_and_the_api_server():
    np = render_file(AGENT_CHART, "agent-existing-secret.yaml").one("NetworkPolicy")
    assert np["spec"]["ingress"] == []
    rules = _egress_by_ports(np)
    gw = rules[(("TCP", 443), ("TCP", 8443), ("UDP", 443), ("UDP", 8443))]
    assert gw == [{"ipBlock": {"cidr": "203.0.113.0/28"}}, {"ipBlock": {"cidr": "198.51.100.7/32"}}]
    assert rules[(("TCP", 443), ("TCP", 6443))] == [{"ipBlock": {"cidr": "10.0.0.0/24"}}]


def test_agent_network_policy_extra_egress():
    np = render_file(AGENT_CHART, "agent-proxy.yaml").one("NetworkPolicy")
    assert np["spec"]["ingress"] == []
    rules = _egress_by_ports(np)
    assert rules[(("TCP", 443),)] == [{"ipBlock": {"cidr": "10.0.200.0/24"}}]
    assert rules[(("TCP", 3128),)] == [{"ipBlock": {"cidr": "10.0.50.10/32"}}]
    assert rules[(("TCP", 443), ("TCP", 6443))] == [{"ipBlock": {"cidr": "10.0.0.0/24"}}, {"ipBlock": {"cidr": "10.0.1.0/24"}}]
    assert len(rules) == 5


# === RBAC ===


def rbac_table(path: Path, heading: str) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) triples from the first table under `heading` in `path`."""
    text = path.read_text()
    m = re.search(rf"^{re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert m, f"{path.name} has no '{heading}' section"
    lines = m.group(1).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    assert rows[0].lower().replace(" ", "") == "|apigroups|resources|verbs|", rows[0]
    triples = set()
    for row in rows[2:]:
        groups_cell, resources_cell, verbs_cell = [c.strip() for c in row.strip("|").split("|")]
        groups = re.findall(r"`([^`]*)`", groups_cell)
        groups = ["" if g == '""' else g for g in groups]
        resources = re.findall(r"`([^`]*)`", resources_cell)
        verbs = [v.strip() for v in verbs_cell.split(",")]
        assert groups and resources and verbs, row
        for g in groups:
            for res in resources:
                for v in verbs:
                    triples.add((g, res, v))
    assert len(triples) > 10
    return triples


def architecture_rbac() -> set[tuple[str, str, str]]:
    return rbac_table(ROOT / "ARCHITECTURE.md", "## Kubernetes RBAC (agent)")


def test_install_guide_shows_the_same_rbac_as_architecture():
    guide = rbac_table(ROOT / "docs" / "install-agent.md", "## What the agent can and cannot do in your cluster")
    assert guide == architecture_rbac()


def test_agent_cluster_role_grants_exactly_the_architecture_table():
    r = render_file(AGENT_CHART, "agent-required.yaml")
    role = r.one("ClusterRole")
    granted = set()
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule and "resourceNames" not in rule, rule
        for field in ("apiGroups", "resources", "verbs"):
            assert not any("*" in x for x in rule[field]), f"wildcard in {rule}"
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
        for g in rule["apiGroups"]:
            for res in rule["resources"]:
                for v in rule["verbs"]:
                    granted.add((g, res, v))
    expected = architecture_rbac()
    assert granted == expected, f"extra: {sorted(granted - expected)} missing: {sorted(expected - granted)}"
    binding = r.one("ClusterRoleBinding")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role["metadata"]["name"]}
    sa = r.one("ServiceAccount")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": NAMESPACE}]
    assert r.of_kind("Role") == [] and r.of_kind("RoleBinding") == []


def test_agent_rbac_can_be_left_out():
    r = render_file(AGENT_CHART, "agent-required.yaml", {"rbac": {"create": False}})
    assert r.of_kind("ClusterRole") == [] and r.of_kind("ClusterRoleBinding") == []


# === gateway ===


def test_gateway_services_expose_quic_and_tcp_fallback_and_the_northbound_api():
    r = render_file(GATEWAY_CHART, "gateway-required.yaml")
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    ports = {p["name"]: (p["containerPort"], p["protocol"]) for p in pod["containers"][0]["ports"]}
    assert ports == {"tunnel-udp": (7443, "UDP"), "tunnel-tcp": (7443, "TCP"), "northbound": (7444, "TCP"), "ops": (9090, "TCP")}
    tunnel = r.one("Service", "tether-tether-gateway-tunnel")
    assert tunnel["spec"]["type"] == "LoadBalancer"
    exposed = {(p["port"], p["protocol"], ports[p["targetPort"]]) for p in tunnel["spec"]["ports"]}
    assert exposed == {(443, "UDP", (7443, "UDP")), (443, "TCP", (7443, "TCP"))}
    ann = tunnel["metadata"]["annotations"]
    assert ann["service.beta.kubernetes.io/aws-load-balancer-type"] == "external"
    assert ann["service.beta.kubernetes.io/aws-load-balancer-nlb-target-type"] == "ip"
    assert ann["service.beta.kubernetes.io/aws-load-balancer-scheme"] == "internet-facing"
    nb = r.one("Service", "tether-tether-gateway-northbound")
    assert nb["spec"]["type"] == "ClusterIP"
    assert [(p["port"], ports[p["targetPort"]]) for p in nb["spec"]["ports"]] == [(7444, (7444, "TCP"))]
    pod_labels = r.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    for svc in r.of_kind("Service"):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
    assert len(r.of_kind("Service")) == 2, "the ops port is in no Service unless the ServiceMonitor is on"
    assert r.of_kind("ServiceMonitor") == []


def test_gateway_probes_config_and_embedded_store():
    r = render_file(GATEWAY_CHART, "gateway-required.yaml")
    d = r.one("Deployment")
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["command"] == ["/usr/local/bin/tether-gateway", "serve", "--config", "/etc/tether/gateway.toml"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    assert d["spec"]["strategy"] == {"type": "Recreate"}
    assert pod["terminationGracePeriodSeconds"] == 30
    assert pod["automountServiceAccountToken"] is False
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    data = next(v for v in pod["volumes"] if v["name"] == mounts["/var/lib/tether"])
    pvc = r.one("PersistentVolumeClaim")
    assert data["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "1Gi"
    assert "env" not in c
    cfg = tomllib.loads(r.one("ConfigMap")["data"]["gateway.toml"])
    assert cfg == {
        "trust_domain": "tether.example.com",
        "data_dir": "/var/lib/tether",
        "tls": {"ca": "/etc/tether/tls/ca.crt", "cert": "/etc/tether/tls/tls.crt", "key": "/etc/tether/tls/tls.key"},
        "tunnel": {
            "listen": "0.0.0.0:7443",
            "heartbeat_interval": "10s",
            "handshake_timeout": "10s",
            "drain_timeout": "15s",
            "max_concurrent_streams": 1024,
        },
        "northbound": {"listen": "0.0.0.0:7444"},
        "ops": {"listen": "0.0.0.0:9090"},
        "log": {"format": "json", "level": "info"},
    }


def test_gateway_agents_min_version_renders_only_when_set_and_must_be_a_semantic_version():
    cfg = tomllib.loads(render_file(GATEWAY_CHART, "gateway-required.yaml", {"agents": {"minVersion": "0.4.0"}})
                        .one("ConfigMap")["data"]["gateway.toml"])
    assert cfg["agents"] == {"min_version": "0.4.0"}
    bare = tomllib.loads(render_file(GATEWAY_CHART, "gateway-required.yaml").one("ConfigMap")["data"]["gateway.toml"])
    assert "agents" not in bare


def test_gateway_replica_count_defaults_to_1_embedded_and_3_on_postgres():
    def replicas(name, extra=None):
        return render_file(GATEWAY_CHART, name, extra).one("Deployment")["spec"]["replicas"]

    assert replicas("gateway-required.yaml") == 1
    assert replicas("gateway-postgres-dsn-only.yaml") == 3
    assert replicas("gateway-postgres-dsn-only.yaml", {"replicaCount": 1}) == 1
    assert replicas("gateway-postgres-one-secret.yaml") == 5
    assert replicas("gateway-required.yaml", {"replicaCount": 0}) == 0, "scaling to zero stays possible"


def test_gateway_embedded_mode_ignores_the_postgres_and_replica_settings():
    """One replica, Recreate, the PVC, and nothing of PostgreSQL mode: its values change no object."""
    plain = render_file(GATEWAY_CHART, "gateway-required.yaml")
    tuned = render_file(GATEWAY_CHART, "gateway-required.yaml", {
        "store": {"postgres": {"existingSecret": "db", "password": {"existingSecret": "pw"}, "sslmode": "verify-full",
                               "ca": {"existingConfigMap": "ca"}, "poolSize": 4}},
        "cluster": {"heartbeatInterval": "3s", "livenessTimeout": "20s", "podIPFamily": "IPv6",
                    "advertise": "podIP", "clusterDomain": "example.internal"},
        "preStop": {"sleepSeconds": 25},
        "podDisruptionBudget": {"maxUnavailable": 2},
        "topologySpread": {"whenUnsatisfiable": "DoNotSchedule"},
    })
    assert tuned.objects == plain.objects
    assert plain.of_kind("PodDisruptionBudget") == []
    pod = plain.one("Deployment")["spec"]["template"]["spec"]
    assert "topologySpreadConstraints" not in pod
    assert "startupProbe" not in pod["containers"][0]
    assert "Store: embedded (redb) on the PVC tether-tether-gateway-data" in plain.notes
    assert "rolled with Recreate" in plain.notes


def test_gateway_postgres_mode_rolls_one_pod_at_a_time_with_a_budget_and_soft_spread():
    r = render_file(GATEWAY_CHART, "gateway-postgres.yaml")
    d = r.one("Deployment")
    spec = d["spec"]
    pod = spec["template"]["spec"]
    pod_labels = spec["template"]["metadata"]["labels"]
    assert spec["replicas"] == 3
    assert spec["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 1}}
    pdb = r.one("PodDisruptionBudget")
    assert pdb["metadata"]["name"] == d["metadata"]["name"]
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": spec["selector"]}
    assert spec["selector"]["matchLabels"].items() <= pod_labels.items()
    # The budget and the spread count gateway pods only, not the `helm test` pod.
    assert not spec["selector"]["matchLabels"].items() <= r.one("Pod")["metadata"]["labels"].items()
    spread = pod["topologySpreadConstraints"]
    assert [c["topologyKey"] for c in spread] == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    for c in spread:
        assert c["maxSkew"] == 1 and c["whenUnsatisfiable"] == "ScheduleAnyway", c
        assert c["labelSelector"] == spec["selector"], c
        assert c["matchLabelKeys"] == ["pod-template-hash"], c
    assert "affinity" not in pod
    c = pod["containers"][0]
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
    # Liveness waits for a start that waits for PostgreSQL (connectTimeout 45s here) and migrations.
    startup = c["startupProbe"]
    assert startup["httpGet"] == {"path": "/healthz", "port": "ops"}
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300
    assert "RollingUpdate, maxUnavailable 1, maxSurge 1); PodDisruptionBudget maxUnavailable 1; spread over zones and nodes (ScheduleAnyway)" in r.notes

    # One replica on PostgreSQL: its replacement is Ready before it stops; drains may still move it.
    one = render_file(GATEWAY_CHART, "gateway-postgres.yaml", {"replicaCount": 1})
    assert one.one("Deployment")["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert one.one("PodDisruptionBudget")["spec"]["maxUnavailable"] == 1
    assert "One replica: a crash or a lost node stops the gateway" in one.notes
    assert "One replica" not in r.notes

    hard = render_file(GATEWAY_CHART, "gateway-postgres-one-secret.yaml")
    assert hard.one("PodDisruptionBudget")["spec"]["maxUnavailable"] == "40%"
    hard_spread = hard.one("Deployment")["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert [c["whenUnsatisfiable"] for c in hard_spread] == ["DoNotSchedule", "DoNotSchedule"]

    off = render_file(GATEWAY_CHART, "gateway-postgres.yaml",
                      {"podDisruptionBudget": {"enabled": False}, "topologySpread": {"enabled": False}})
    assert off.of_kind("PodDisruptionBudget") == []
    assert "topologySpreadConstraints" not in off.one("Deployment")["spec"]["template"]["spec"]
    mine = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
        "topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"app": "x"}}}]}}
    custom = render_file(GATEWAY_CHART, "gateway-postgres.yaml", {"affinity": mine})
    assert custom.one("Deployment")["spec"]["template"]["spec"]["affinity"] == mine


def test_gateway_postgres_store_takes_the_dsn_the_password_and_the_ca_from_their_objects():
    r = render_file(GATEWAY_CHART, "gateway-postgres.yaml")
    d = r.one("Deployment")
    pod = d["spec"]["template"]["spec"]
    c = pod["containers"][0]
    assert c["env"] == [
        {"name": "TETHER_STORE_DSN", "valueFrom": {"secretKeyRef": {"name": "tether-gateway-db", "key": "dsn"}}},
        {"name": "TETHER_CLUSTER_REPLICA_ID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "TETHER_CLUSTER_ADVERTISE",
         "value": "$(TETHER_CLUSTER_REPLICA_ID).tether-tether-gateway-peers.tether-system.svc.cluster.local:7445"},
    ]
    cfg = tomllib.loads(r.one("ConfigMap")["data"]["gateway.toml"])
    assert cfg["store"] == {
        "password_file": "/etc/tether/postgres/password",
        "sslmode": "verify-full",
        "ca_file": "/etc/tether/postgres/ca.crt",
        "pool_size": 12,
        "connect_timeout": "45s",
        "statement_timeout": "3s",
    }
    assert cfg["cluster"] == {"peer_listen": "0.0.0.0:7445", "heartbeat_interval": "2s", "liveness_timeout": "10s",
                              "peer_ca_key": "/etc/tether/peer/ca.key"}
    config = next(v for v in pod["volumes"] if v["name"] == "config")["projected"]["sources"]
    assert {"secret": {"name": "tether-gateway-db-password", "items": [{"key": "password", "path": "postgres/password"}]}} in config
    assert {"configMap": {"name": "rds-ca-bundle", "items": [{"key": "global-bundle.pem", "path": "postgres/ca.crt"}]}} in config
    # The password reaches a pod only as that file: never through the environment.
    for where, spec in r.pod_specs():
        for container in spec["containers"]:
            assert "envFrom" not in container, where
            for e in container.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef", {})
                assert ref.get("name") != "tether-gateway-db-password", f"{where}: {e}"
    assert r.of_kind("PersistentVolumeClaim") == []
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == mounts["/var/lib/tether"])
    assert pod["terminationGracePeriodSeconds"] == 75
    assert cfg["tunnel"]["drain_timeout"] == "1m"
    sm = r.one("ServiceMonitor")
    metrics = r.one("Service", "tether-tether-gateway-metrics")
    assert sm["spec"]["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    assert [e["port"] for e in sm["spec"]["endpoints"]] == [p["name"] for p in metrics["spec"]["ports"]] == ["ops"]
    for svc in r.of_kind("Service"):
        if svc is not metrics:
            assert not sm["spec"]["selector"]["matchLabels"].items() <= svc["metadata"]["labels"].items(), (
                f"the ServiceMonitor would also scrape {svc['metadata']['name']}")
    assert "Store: PostgreSQL, shared by 3 replica(s)" in r.notes
    assert "DSN:      Secret tether-gateway-db, key dsn (TETHER_STORE_DSN)" in r.notes
    assert "Password: Secret tether-gateway-db-password, key password, mounted as /etc/tether/postgres/password" in r.notes
    assert "TLS:      sslmode verify-full, CA from ConfigMap rds-ca-bundle key global-bundle.pem" in r.notes
    assert "A replica is Ready only while it reaches PostgreSQL (/readyz)" in r.notes

    # The least: the DSN alone, everything else the gateway's defaults.
    bare = render_file(GATEWAY_CHART, "gateway-postgres-dsn-only.yaml")
    bare_cfg = tomllib.loads(bare.one("ConfigMap")["data"]["gateway.toml"])
    assert bare_cfg["store"] == {"pool_size": 16, "connect_timeout": "30s", "statement_timeout": "5s"}
    assert bare_cfg["cluster"] == {"peer_listen": "0.0.0.0:7445", "heartbeat_interval": "1s", "liveness_timeout": "6s"}
    bare_sources = next(v for v in bare.one("Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == "config")
    assert [list(s.values())[0]["name"] for s in bare_sources["projected"]["sources"]] == ["tether-tether-gateway", "tether-gateway-pki"]
    assert "Password: the DSN's" in bare.notes and "CA: the image's system roots" in bare.notes

    # One Secret for all three, a CA from a Secret, IPv6 pod addresses.
    one = render_file(GATEWAY_CHART, "gateway-postgres-one-secret.yaml")
    one_pod = one.one("Deployment")["spec"]["template"]["spec"]
    assert one_pod["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "tether-db-app", "key": "uri"}
    assert one_pod["containers"][0]["env"][3] == {"name": "TETHER_CLUSTER_ADVERTISE", "value": "[$(POD_IP)]:7445"}
    one_sources = next(v for v in one_pod["volumes"] if v["name"] == "config")["projected"]["sources"]
    assert {"secret": {"name": "tether-db-app", "items": [{"key": "ca.crt", "path": "postgres/ca.crt"}]}} in one_sources
    assert tomllib.loads(one.one("ConfigMap")["data"]["gateway.toml"])["store"]["sslmode"] == "verify-ca"


def test_gateway_replicas_find_each_other_through_a_headless_service_and_advertise_their_dns_name():
    r = render_file(GATEWAY_CHART, "gateway-postgres.yaml")
    d = r.one("Deployment")
    pod = d["spec"]["template"]["spec"]
    peers = r.one("Service", "tether-tether-gateway-peers")
    assert peers["spec"]["clusterIP"] == "None"
    # A starting or draining pod (not Ready) keeps its DNS name: peers still reach it.
    assert peers["spec"]["publishNotReadyAddresses"] is True
    assert peers["spec"]["selector"] == d["spec"]["selector"]["matchLabels"]
    assert peers["spec"]["ports"] == [{"name": "peer", "protocol": "UDP", "port": 7445, "targetPort": "peer"}]
    # The pod's hostname (its name) under this subdomain is what cluster DNS answers for.
    assert pod["subdomain"] == "tether-tether-gateway-peers"
    ports = {p["name"]: p for p in pod["containers"][0]["ports"]}
    assert ports["peer"] == {"name": "peer", "containerPort": 7445, "protocol": "UDP"}
    env = pod_env(pod["containers"][0], gateway_externals({"ca": "", "gateway_cert": "", "gateway_key": "", "ca_key": ""})[0],
                  "tether-tether-gateway-7d9f8b6c5d-x2x4q", "10.42.0.7")
    assert env["TETHER_CLUSTER_REPLICA_ID"] == "tether-tether-gateway-7d9f8b6c5d-x2x4q"
    assert env["TETHER_CLUSTER_ADVERTISE"] == (
        "tether-tether-gateway-7d9f8b6c5d-x2x4q.tether-tether-gateway-peers.tether-system.svc.cluster.local:7445")
    # Each label of the advertised name is a valid DNS label.
    host = env["TETHER_CLUSTER_ADVERTISE"].rpartition(":")[0]
    assert all(re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", label) for label in host.split(".")), host
    assert "tether-tether-gateway-peers.tether-system.svc.cluster.local:7445 (headless Service tether-tether-gateway-peers)" in r.notes

    other = render_file(GATEWAY_CHART, "gateway-postgres.yaml", {"cluster": {"clusterDomain": "k8s.example"}})
    other_env = other.one("Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert other_env[-1]["value"].endswith(".tether-tether-gateway-peers.tether-system.svc.k8s.example:7445")

    # The pod IP instead: no name needed, the Service still groups the peers.
    ip = render_file(GATEWAY_CHART, "gateway-postgres.yaml", {"cluster": {"advertise": "podIP"}})
    ip_env = ip.one("Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert ip_env[-2:] == [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "TETHER_CLUSTER_ADVERTISE", "value": "$(POD_IP):7445"},
    ]

    # A pod name is the Deployment's name + a 10-character hash + 5 characters: past 46 characters
    # it would not fit a DNS label, and its name would not resolve.
    with pytest.raises(Exception) as e:
        render_file(GATEWAY_CHART, "gateway-postgres.yaml", {"fullnameOverride": "g" * 47})
    assert "cluster.advertise is dns" in str(e.value) and "fullnameOverride" in str(e.value), e.value
    assert render_file(GATEWAY_CHART, "gateway-postgres.yaml", {"fullnameOverride": "g" * 46}).one("Deployment")
    assert render_file(GATEWAY_CHART, "gateway-postgres.yaml",
                       {"fullnameOverride": "g" * 47, "cluster": {"advertise": "podIP"}}).one("Deployment")

    # One embedded replica has no peers: no headless Service, no subdomain, no peer port.
    one = render_file(GATEWAY_CHART, "gateway-required.yaml")
    assert [s["metadata"]["name"] for s in one.of_kind("Service")] == [
        "tether-tether-gateway-tunnel", "tether-tether-gateway-northbound"]
    one_pod = one.one("Deployment")["spec"]["template"]["spec"]
    assert "subdomain" not in one_pod
    assert "peer" not in {p["name"] for p in one_pod["containers"][0]["ports"]}


def _ingress_by_port(np: dict[str, Any]) -> dict[tuple[str, int], list]:
    """(protocol, port) → the `from` of the rule opening it (None: from anywhere)."""
    out: dict[tuple[str, int], list] = {}
    for rule in np["spec"]["ingress"]:
        for p in rule["ports"]:
            key = (p["protocol"], p["port"])
            assert key not in out, f"{key} opened by two rules"
            out[key] = rule.get("from")
    return out


def test_gateway_network_policy_opens_the_peer_port_to_gateway_pods_only():
    r = render_file(GATEWAY_CHART, "gateway-postgres.yaml")
    d = r.one("Deployment")
    np = r.one("NetworkPolicy")
    assert np["spec"]["podSelector"] == d["spec"]["selector"]
    assert np["spec"]["policyTypes"] == ["Ingress"]
    rules = _ingress_by_port(np)
    assert rules == {
        ("UDP", 7443): None,
        ("TCP", 7443): None,
        ("TCP", 7444): None,
        ("TCP", 9090): None,
        ("UDP", 7445): [{"podSelector": d["spec"]["selector"]}],
    }
    # Exactly the ports the pod listens on, nothing more.
    pod_ports = {(p["protocol"], p["containerPort"]) for p in d["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert set(rules) == pod_ports
    # Only gateway pods match the peer rule: not the `helm test` pod, not an agent.
    peer_selector = rules[("UDP", 7445)][0]["podSelector"]["matchLabels"]
    assert peer_selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
    assert not peer_selector.items() <= r.one("Pod")["metadata"]["labels"].items()
    agent = render_file(AGENT_CHART, "agent-required.yaml").one("Deployment")
    assert not peer_selector.items() <= agent["spec"]["template"]["metadata"]["labels"].items()

    # The control plane and the scrapers can be narrowed.
    cp = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "control-plane"}}}]
    mon = [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}},
           {"ipBlock": {"cidr": "10.0.0.0/16"}}]
    narrow = render_file(GATEWAY_CHART, "gateway-postgres.yaml",
                         {"networkPolicy": {"northboundFrom": cp, "opsFrom": mon}})
    narrow_rules = _ingress_by_port(narrow.one("NetworkPolicy"))
    assert narrow_rules[("TCP", 7444)] == cp and narrow_rules[("TCP", 9090)] == mon
    assert narrow_rules[("UDP", 7443)] is None and narrow_rules[("UDP", 7445)] == rules[("UDP", 7445)]

    # One embedded replica: no peer port to open.
    one = _ingress_by_port(render_file(GATEWAY_CHART, "gateway-required.yaml").one("NetworkPolicy"))
    assert set(one) == {("UDP", 7443), ("TCP", 7443), ("TCP", 7444), ("TCP", 9090)}
    assert render_file(GATEWAY_CHART, "gateway-postgres.yaml",
                       {"networkPolicy": {"enabled": False}}).of_kind("NetworkPolicy") == []


def test_gateway_pods_sleep_before_draining_and_their_grace_period_covers_sleep_and_drain():
    r = render_file(GATEWAY_CHART, "gateway-postgres.yaml")
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    c = pod["containers"][0]
    # The load balancer deregisters the pod during the sleep, before SIGTERM starts the drain.
    assert c["lifecycle"] == {"preStop": {"sleep": {"seconds": 10}}}
    drain = tomllib.loads(r.one("ConfigMap")["data"]["gateway.toml"])["tunnel"]["drain_timeout"]
    assert drain == "1m"
    assert pod["terminationGracePeriodSeconds"] == 75 > 10 + 60
    assert "sleeps 10s (preStop" in r.notes and "drains for up to tunnel.drainTimeout (1m)" in r.notes
    # The defaults hold together: 10 s + 15 s < 30 s.
    defaults = render_file(GATEWAY_CHART, "gateway-postgres-dsn-only.yaml")
    dpod = defaults.one("Deployment")["spec"]["template"]["spec"]
    assert dpod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"] == 10
    assert dpod["terminationGracePeriodSeconds"] == 30
    # A grace period that does not cover the sleep and the drain is refused, naming both.
    with pytest.raises(Exception) as e:
        render_file(GATEWAY_CHART, "gateway-postgres.yaml", {"terminationGracePeriodSeconds": 70})
    assert ("terminationGracePeriodSeconds (70) must exceed preStop.sleepSeconds (10) + tunnel.drainTimeout (1m) = 70s"
            in str(e.value)), e.value
    assert render_file(GATEWAY_CHART, "gateway-postgres.yaml", {"terminationGracePeriodSeconds": 71}).one("Deployment")
    # 0: no hook, and only the drain counts.
    none = render_file(GATEWAY_CHART, "gateway-postgres.yaml",
                       {"preStop": {"sleepSeconds": 0}, "terminationGracePeriodSeconds": 61})
    assert "lifecycle" not in none.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    # One embedded replica has nowhere else for agents to go: no sleep.
    one = render_file(GATEWAY_CHART, "gateway-required.yaml")
    assert "lifecycle" not in one.one("Deployment")["spec"]["template"]["spec"]["containers"][0]


# === the real binaries ===


def binary(name: str) -> Path:
    path = BIN / name
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(f"{path} is missing: run `cargo build --workspace --bins` first (scripts/test builds it)")
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """The test's environment without TETHER_* variables (they would override config keys)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
    env.update(extra)
    return env


def run(args: list[str | Path], timeout: float = 30, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, env=env or clean_env())


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> dict[str, str]:
    """A real CA, gateway certificate and agent certificate from `tether-gateway pki`."""
    d = tmp_path_factory.mktemp("pki")
    gw = binary("tether-gateway")
    out = run([gw, "pki", "init", "--dir", d, "--trust-domain", "t.example", "--gateway-name", "localhost"])
    assert out.returncode == 0, out.stderr
    out = run([gw, "pki", "issue-agent", "--dir", d, "--tenant", "acme", "--agent", "eu-1", "--out", d / "agent", "--ttl", "1h"])
    assert out.returncode == 0, out.stderr
    return {
        "ca": (d / "ca.pem").read_text(),
        "gateway_cert": (d / "gateway.pem").read_text(),
        "gateway_key": (d / "gateway-key.pem").read_text(),
        "ca_key": (d / "ca-key.pem").read_text(),
        "agent_cert": (d / "agent" / "agent.pem").read_text(),
        "agent_key": (d / "agent" / "agent-key.pem").read_text(),
    }


def materialize(r: Rendered, root: Path, external_secrets: dict[str, dict[str, str]],
                external_config_maps: dict[str, dict[str, str]] | None = None) -> Path:
    """Lay out the Deployment's /etc/tether volume under root the way the kubelet would: each
    projected item from the rendered ConfigMap or Secret, or from `external_secrets` and
    `external_config_maps` for those the chart does not create. A missing key fails, as it would
    keep the pod from starting. Returns the directory that stands for /etc/tether."""
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == "/etc/tether")
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    etc = root / "etc" / "tether"
    for source in volume["projected"]["sources"]:
        if "configMap" in source:
            ref = source["configMap"]
            created = [c for c in r.of_kind("ConfigMap") if c["metadata"]["name"] == ref["name"]]
            if created:
                data = created[0]["data"]
            else:
                assert ref["name"] in (external_config_maps or {}), f"ConfigMap {ref['name']} is neither rendered nor provided"
                data = external_config_maps[ref["name"]]
        else:
            ref = source["secret"]
            created = [s for s in r.of_kind("Secret") if s["metadata"]["name"] == ref["name"]]
            if created:
                data = {k: base64.b64decode(v).decode() for k, v in created[0]["data"].items()}
            else:
                assert ref["name"] in external_secrets, f"Secret {ref['name']} is neither rendered nor provided"
                data = external_secrets[ref["name"]]
        for item in ref["items"]:
            assert item["key"] in data, f"{ref['name']} has no key {item['key']}: the pod would not start"
            dest = etc / item["path"]
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_text(data[item["key"]])
    # The config refers to files by their in-pod path: point it at this directory instead, and
    # the pod's writable volume (/var/lib/tether) at a directory of the test's own.
    state = root / "var-lib-tether"
    state.mkdir(exist_ok=True)
    for conf in etc.glob("*.toml"):
        text = conf.read_text().replace('"/etc/tether/', f'"{etc}/').replace('"/var/lib/tether"', f'"{state}"')
        assert "/var/lib/tether" not in text, "an in-pod path the test did not remap"
        conf.write_text(text)
    return etc


def agent_values(name: str, pki: dict[str, str], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    values = load_values(name)
    if not {"existingSecret", "awsSecretsManager"} & {k for k, v in values.get("identity", {}).items() if v}:
        values = deep_merge(values, {
            "identity": {"certificate": pki["agent_cert"], "privateKey": pki["agent_key"]},
            "gateway": {"caBundle": pki["ca"]},
        })
    return deep_merge(values, extra or {})


def agent_secrets(values: dict[str, Any], pki: dict[str, str]) -> dict[str, dict[str, str]]:
    name = values.get("identity", {}).get("existingSecret")
    if not name:
        return {}
    return {name: {"tls.crt": pki["agent_cert"], "tls.key": pki["agent_key"], "ca.crt": pki["ca"]}}


def hook_pod(r: "Rendered", test: str) -> dict[str, Any]:
    """The `helm test` Pod named `<fullname>-test-<test>`."""
    found = [o for o in r.of_kind("Pod") if o["metadata"]["name"].endswith(f"-test-{test}")]
    assert len(found) == 1, f"expected one helm test pod -test-{test}, got {[o['metadata']['name'] for o in r.of_kind('Pod')]}"
    return found[0]


def in_pod(cmd: list[str], etc: Path) -> list[str]:
    """A command from the rendered manifests, run here: binaries from target/debug, files from etc."""
    assert cmd[0].startswith("/usr/local/bin/"), cmd
    return [str(binary(Path(cmd[0]).name))] + [a.replace("/etc/tether", str(etc)) for a in cmd[1:]]


@pytest.mark.parametrize("name", AGENT_VALUES)
def test_rendered_agent_config_passes_the_agent_binarys_check(name, pki, tmp_path):
    values = agent_values(name, pki)
    r = render(AGENT_CHART, values)
    etc = materialize(r, tmp_path, agent_secrets(values, pki))
    for path in tomllib.loads((etc / "agent.toml").read_text()).get("tls", {}).values():
        assert Path(path).is_file(), path
    # The same command as the chart's `helm test` hook pod.
    hook = hook_pod(r, "config")["spec"]["containers"][0]["command"]
    assert hook[-1] == "--check-config"
    out = run(in_pod(hook, etc))
    assert out.returncode == 0, f"tether-agent rejected the chart's agent.toml:\n{out.stderr}"
    assert "config ok" in out.stdout
    # The check can fail: a key this agent does not know exits 64 naming it.
    (etc / "agent.toml").write_text("relay_everything = true\n" + (etc / "agent.toml").read_text())
    bad = run(in_pod(hook, etc))
    assert bad.returncode == 64 and "relay_everything" in bad.stderr, bad


def test_agent_helm_test_runs_the_doctor_from_a_pod_like_the_agents_and_it_names_the_fault(pki, tmp_path):
    """The `helm test` doctor pod has the agent's image, config, identity, proxy settings and
    service account, the agent's NetworkPolicy selects it (and the Deployment does not), and its
    command, run here on the rendered files, exits 1 naming what is wrong: the example gateway's
    name does not resolve from this machine."""
    values = agent_values("agent-required.yaml", pki, {"proxy": {"noProxy": ".internal"}})
    r = render(AGENT_CHART, values)
    pod = hook_pod(r, "doctor")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    d = r.one("Deployment")
    agent, doctor = d["spec"]["template"]["spec"], pod["spec"]
    assert doctor["serviceAccountName"] == agent["serviceAccountName"]
    assert doctor["automountServiceAccountToken"] == agent["automountServiceAccountToken"]
    a, c = agent["containers"][0], doctor["containers"][0]
    assert c["image"] == a["image"]
    assert c["command"] == ["/usr/local/bin/tether-agent", "doctor", "--config", "/etc/tether/agent.toml"]
    assert c.get("env") == a.get("env")
    # The agent's mounts but its ledger (the doctor writes none).
    agent_mounts = {m["mountPath"] for m in a["volumeMounts"]} - {"/var/lib/tether/ledger"}
    assert {m["mountPath"] for m in c["volumeMounts"]} == agent_mounts
    # The NetworkPolicy covers it, the Deployment's selector does not (no adoption).
    np = r.one("NetworkPolicy")["spec"]["podSelector"]
    labels = pod["metadata"]["labels"]
    assert np["matchLabels"].items() <= labels.items()
    assert all(labels.get(e["key"]) in e["values"] for e in np["matchExpressions"]), np
    assert not d["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Its command, on the rendered files: the report names the unresolvable gateway, exit 1.
    etc = materialize(r, tmp_path, agent_secrets(values, pki))
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    cmd = in_pod(c["command"], etc) + ["--set", f'state_dir="{state}"']
    out = run(cmd, timeout=60)
    assert out.returncode == 1, out
    assert "dns" in out.stdout and "cannot resolve" in out.stdout, out.stdout
    assert "result: the agent cannot connect" in out.stdout, out.stdout


def test_agent_identity_from_aws_secrets_manager_with_a_ca_bundle_passes_the_agent_binarys_check(pki, tmp_path):
    """With gateway.caBundle the config keeps tls.ca (used when the secret holds no `ca`); the
    agent accepts it without contacting AWS, and refuses a tls.cert next to this source, which is
    why the chart renders none."""
    values = deep_merge(load_values("agent-aws-secretsmanager.yaml"), {"gateway": {"caBundle": pki["ca"]}})
    r = render(AGENT_CHART, values)
    etc = materialize(r, tmp_path, {})
    assert sorted(p.name for p in etc.iterdir()) == ["agent.toml", "gateway-ca.crt"]
    hook = hook_pod(r, "config")["spec"]["containers"][0]["command"]
    out = run(in_pod(hook, etc))
    assert out.returncode == 0, f"tether-agent rejected the chart's agent.toml:\n{out.stderr}"
    assert "config ok" in out.stdout
    conf = etc / "agent.toml"
    conf.write_text(conf.read_text().replace("[tls]\n", f'[tls]\ncert = "{etc}/tls.crt"\n'))
    bad = run(in_pod(hook, etc))
    assert bad.returncode == 64 and "tls.cert" in bad.stderr and "remove it" in bad.stderr, bad


def gateway_secrets(values: dict[str, Any], pki: dict[str, str]) -> dict[str, dict[str, str]]:
    return {values["tls"]["existingSecret"]: {
        "ca.crt": pki["ca"], "tls.crt": pki["gateway_cert"], "tls.key": pki["gateway_key"]}}


DB_PASSWORD = "pw-from-its-own-secret"


def gateway_externals(pki: dict[str, str]) -> tuple[dict[str, dict[str, str]], dict[str, dict[str, str]]]:
    """The Secrets and ConfigMaps the gateway values files name, as an operator would create
    them (docs/install-gateway.md): the PKI, DSNs, a password kept apart, CA bundles."""
    secrets = {
        "tether-gateway-pki": {"ca.crt": pki["ca"], "tls.crt": pki["gateway_cert"], "tls.key": pki["gateway_key"]},
        # With the password in its own Secret the DSN carries none.
        "tether-gateway-db": {"dsn": "postgres://tether@db.example.com:5432/tether?sslmode=verify-full"},
        "tether-gateway-db-password": {"password": DB_PASSWORD + "\n"},
        # The CA each replica issues its peer certificate with (cluster.peerCA).
        "tether-gateway-peer-ca": {"ca.key": pki["ca_key"]},
        # One Secret with everything, keyed as operators such as CloudNativePG write them.
        "tether-db-app": {
            "uri": "postgresql://tether:pw-in-the-uri@tether-db-rw.db.svc:5432/tether",
            "password": DB_PASSWORD,
            "ca.crt": pki["ca"],
        },
    }
    config_maps = {"rds-ca-bundle": {"global-bundle.pem": pki["ca"]}}
    return secrets, config_maps


POD_IPS = {"IPv4": "10.42.0.7", "IPv6": "fd00:42::7"}


def pod_env(container: dict[str, Any], secrets: dict[str, dict[str, str]], pod_name: str, pod_ip: str) -> dict[str, str]:
    """The container's environment as the kubelet sets it: secretKeyRef from `secrets` (a missing
    Secret or key keeps the pod from starting), fieldRef from the downward API, and `$(VAR)` in a
    value expanded from variables defined before it (`$$` is a literal `$`)."""
    env: dict[str, str] = {}

    def expand(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, e["value"])
            continue
        source = e["valueFrom"]
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            assert ref["key"] in secrets.get(ref["name"], {}), (
                f"Secret {ref['name']} has no key {ref['key']} for {e['name']}: the pod would not start")
            env[e["name"]] = secrets[ref["name"]][ref["key"]]
        elif "fieldRef" in source:
            fields = {"metadata.name": pod_name, "status.podIP": pod_ip}
            path = source["fieldRef"]["fieldPath"]
            assert path in fields, f"{e['name']}: the test does not model fieldRef {path}"
            env[e["name"]] = fields[path]
        else:
            pytest.fail(f"{e['name']}: the test does not model {source}")
    return env


def gateway_check(values: dict[str, Any], pki: dict[str, str], tmp_path: Path,
                  secrets: dict[str, dict[str, str]] | None = None,
                  drop_env: tuple[str, ...] = ()) -> tuple[Rendered, Path, dict[str, str], subprocess.CompletedProcess]:
    """Renders the gateway chart, lays out the `helm test` pod's files and environment from the
    operator's objects, and runs its command (`serve --check-config`) with the real binary."""
    r = render(GATEWAY_CHART, values)
    ext_secrets, ext_config_maps = gateway_externals(pki)
    etc = materialize(r, tmp_path, secrets or ext_secrets, ext_config_maps)
    hook = r.one("Pod")
    container = hook["spec"]["containers"][0]
    assert container["command"][-1] == "--check-config"
    family = values.get("cluster", {}).get("podIPFamily", "IPv4")
    env = pod_env(container, secrets or ext_secrets, hook["metadata"]["name"], POD_IPS[family])
    for k in drop_env:
        env.pop(k)
    out = run(in_pod(container["command"], etc), env=clean_env(**env))
    return r, etc, env, out


@pytest.mark.parametrize("name", GATEWAY_VALUES)
def test_rendered_gateway_config_passes_the_gateway_binarys_check(name, pki, tmp_path):
    r, etc, env, out = gateway_check(load_values(name), pki, tmp_path)
    assert out.returncode == 0, f"tether-gateway rejected the chart's gateway.toml:\n{out.stderr}"
    # The hook checks what the gateway runs with: the same files and the same environment.
    hook = r.one("Pod")["spec"]
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    assert hook["volumes"] == [v for v in pod["volumes"] if v["name"] == "config"]
    assert hook["containers"][0].get("env") == pod["containers"][0].get("env")
    # Every file the config names is where the volume put it.
    cfg = tomllib.loads((etc / "gateway.toml").read_text())
    files = [*cfg["tls"].values(), *(v for k, v in cfg.get("store", {}).items() if k.endswith("_file")),
             *(v for k, v in cfg.get("cluster", {}).items() if k == "peer_ca_key")]
    for path in files:
        assert Path(path).is_file(), path
    if "store" in cfg:
        host, _, port = env["TETHER_CLUSTER_ADVERTISE"].rpartition(":")
        assert port == "7445", env
        if r.values.get("cluster", {}).get("advertise", "dns") == "dns":
            # The pod's name in the headless Service, as cluster DNS answers for it.
            assert host == "tether-tether-gateway-test-config.tether-tether-gateway-peers.tether-system.svc.cluster.local", env
        else:
            # The pod IP and the peer port, as a socket address.
            assert ipaddress.ip_address(host.removeprefix("[").removesuffix("]")), env
            assert (host.startswith("[") and host.endswith("]")) == (":" in host.strip("[]")), env
        assert env["TETHER_CLUSTER_REPLICA_ID"] == "tether-tether-gateway-test-config"
    # --check-config loads the TLS files: a broken key fails it.
    (etc / "tls" / "tls.key").write_text("not a key\n")
    bad = run(in_pod(r.one("Pod")["spec"]["containers"][0]["command"], etc), env=clean_env(**env))
    assert bad.returncode == 64, bad


def test_gateway_check_reads_the_dsn_from_its_secret_and_never_shows_its_password(pki, tmp_path):
    """The `helm test` hook gets the DSN the way the gateway does: a DSN Secret holding something
    else than a PostgreSQL URL fails the check naming store.dsn, without the password in it."""
    secrets, _ = gateway_externals(pki)
    secrets["tether-gateway-db"] = {"dsn": "mysql://tether:hunter2@db.example.com:3306/tether"}
    _, _, env, out = gateway_check(load_values("gateway-postgres-dsn-only.yaml"), pki, tmp_path, secrets)
    assert env["TETHER_STORE_DSN"].startswith("mysql://")
    assert out.returncode == 64, out
    assert "store.dsn" in out.stderr and "postgres://" in out.stderr, out.stderr
    assert "hunter2" not in out.stderr + out.stdout, out


def test_gateway_store_section_needs_the_dsn_from_the_environment(pki, tmp_path):
    """The [store] the chart renders (password file, sslmode, CA) is valid only with the DSN,
    which comes from the Secret through TETHER_STORE_DSN and nowhere else: without the
    variable the same files fail the check."""
    _, etc, env, out = gateway_check(load_values("gateway-postgres.yaml"), pki, tmp_path, drop_env=("TETHER_STORE_DSN",))
    assert "dsn" not in tomllib.loads((etc / "gateway.toml").read_text())["store"]
    assert out.returncode == 64, out
    assert "store.password_file" in out.stderr and "store.dsn is not" in out.stderr, out.stderr


def documented_gateway_values() -> dict[str, Any]:
    """The values block under "### Values" in docs/install-gateway.md (PostgreSQL mode)."""
    section = (ROOT / "docs" / "install-gateway.md").read_text().split("### Values", 1)[1]
    return yaml.safe_load(section.split("```yaml", 1)[1].split("```", 1)[0])


def test_the_install_guides_postgres_values_render_and_pass_the_gateway_binarys_check(pki, tmp_path):
    """What docs/install-gateway.md tells an operator to write, with the Secrets and ConfigMap it
    tells them to create, installs and passes the chart's `helm test`."""
    values = documented_gateway_values()
    assert values["store"]["type"] == "postgres"
    r, etc, env, out = gateway_check(values, pki, tmp_path)
    assert out.returncode == 0, f"tether-gateway rejected the documented config:\n{out.stderr}"
    assert r.one("Deployment")["spec"]["replicas"] == 3
    assert (etc / "postgres" / "password").read_text().strip() == DB_PASSWORD
    assert (etc / "postgres" / "ca.crt").is_file()
    userinfo = env["TETHER_STORE_DSN"].split("://", 1)[1].split("@", 1)[0]
    assert ":" not in userinfo, "with the password in its own Secret, the DSN carries none"


def free_port(kind: int) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        ok, last = check()
        if ok:
            return last
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout}s waiting for {what}; last: {last}")


def http_status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def stop(proc: subprocess.Popen):
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_rendered_agent_and_gateway_connect_and_the_charts_probes_tell_the_truth(pki, tmp_path):
    """Both charts rendered, their files laid out as the kubelet would, the real binaries run
    with them (listen addresses moved to free loopback ports), and the charts' own probe commands
    asked: the agent's liveness holds while no gateway is reachable, its readiness follows the
    session, and the gateway's httpGet paths answer."""
    agent_bin = binary("tether-agent")
    help_out = run([agent_bin, "probe", "--help"])
    if help_out.returncode != 0:
        pytest.fail(
            f"{agent_bin} has no `probe` subcommand, which the chart's liveness and readiness probes "
            f"run: rebuild it with `cargo build --workspace --bins`.\n{help_out.stderr}")

    tunnel, northbound, gw_ops, agent_ops = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)

    gw_values = deep_merge(load_values("gateway-required.yaml"), {"trustDomain": "t.example", "tunnel": {"drainTimeout": "1s"}})
    gw = render(GATEWAY_CHART, gw_values)
    gw_etc = materialize(gw, tmp_path / "gateway", gateway_secrets(gw_values, pki))
    conf = gw_etc / "gateway.toml"
    conf.write_text(conf.read_text()
                    .replace('"0.0.0.0:7443"', f'"127.0.0.1:{tunnel}"')
                    .replace('"0.0.0.0:7444"', f'"127.0.0.1:{northbound}"')
                    .replace('"0.0.0.0:9090"', f'"127.0.0.1:{gw_ops}"'))
    gw_container = gw.one("Deployment")["spec"]["template"]["spec"]["containers"][0]

    ag_values = agent_values("agent-required.yaml", pki, {
        "gateway": {"addresses": [f"127.0.0.1:{tunnel}"], "serverName": "localhost"},
        "config": {"reconnect": {"initialBackoff": "100ms", "maxBackoff": "1s"}, "log": {"level": "debug"}},
    })
    ag = render(AGENT_CHART, ag_values)
    ag_etc = materialize(ag, tmp_path / "agent", agent_secrets(ag_values, pki))
    conf = ag_etc / "agent.toml"
    conf.write_text(conf.read_text().replace('"127.0.0.1:9091"', f'"127.0.0.1:{agent_ops}"'))
    ag_container = ag.one("Deployment")["spec"]["template"]["spec"]["containers"][0]
    liveness = in_pod(ag_container["livenessProbe"]["exec"]["command"], ag_etc)
    readiness = in_pod(ag_container["readinessProbe"]["exec"]["command"], ag_etc)

    def probe(cmd):
        out = run(cmd, timeout=10)
        return out.returncode, out.stderr.strip()

    def probe_until(cmd, code):
        def check():
            got = probe(cmd)
            return got[0] == code, got
        return check

    logs = tmp_path / "logs"
    logs.mkdir()
    env = clean_env(HOSTNAME="tether-tether-agent-5d9c7-abcde")
    agent = subprocess.Popen(in_pod(ag_container["command"], ag_etc), env=env,
                             stdout=open(logs / "agent.out", "w"), stderr=subprocess.STDOUT)
    gateway = None
    try:
        # No gateway yet: alive, not ready.
        wait_for("agent liveness with no gateway", probe_until(liveness, 0))
        code, err = probe(readiness)
        assert code == 1, (code, err)

        gateway = subprocess.Popen(in_pod(gw_container["command"], gw_etc), env=clean_env(),
                                   stdout=open(logs / "gateway.out", "w"), stderr=subprocess.STDOUT)
        ready_url = f"http://127.0.0.1:{gw_ops}{gw_container['readinessProbe']['httpGet']['path']}"
        live_url = f"http://127.0.0.1:{gw_ops}{gw_container['livenessProbe']['httpGet']['path']}"
        wait_for("gateway /readyz", lambda: (lambda s: (s == 200, s))(http_status(ready_url)))
        assert http_status(live_url) == 200

        wait_for("agent readiness once connected", probe_until(readiness, 0))
        assert probe(liveness)[0] == 0

        # The gateway goes away: readiness drops, liveness must not (no restarts in an outage).
        stop(gateway)
        assert gateway.returncode == 0, (logs / "gateway.out").read_text()
        wait_for("agent readiness to drop", probe_until(readiness, 1))
        assert probe(liveness) == (0, ""), "liveness must not depend on the gateway"
        assert agent.poll() is None, "the agent exited"
    except BaseException:
        print("--- agent log ---\n", (logs / "agent.out").read_text()[-4000:])
        if gateway is not None:
            print("--- gateway log ---\n", (logs / "gateway.out").read_text()[-4000:])
        raise
    finally:
        if gateway is not None:
            stop(gateway)
        stop(agent)
    assert agent.returncode == 0, (logs / "agent.out").read_text()[-4000:]


def test_gateway_replicas_issue_their_peer_certificates_with_the_peer_ca_and_warn_without_it(pki, tmp_path):
    """With cluster.peerCA the pods get the CA key at /etc/tether/peer/ca.key and the config names
    it (each replica issues itself its peer certificate, checked by the binary); without it the
    notes warn that calls cannot be forwarded. A key that is no CA of ca.crt fails the check
    naming cluster.peer_ca_key."""
    r, etc, env, out = gateway_check(load_values("gateway-postgres.yaml"), pki, tmp_path)
    assert out.returncode == 0, out.stderr
    cfg = tomllib.loads((etc / "gateway.toml").read_text())
    assert cfg["cluster"]["peer_ca_key"] == str(etc / "peer" / "ca.key")
    assert "Peer links on" in r.notes and "tether-gateway-peer-ca" in r.notes
    (etc / "peer" / "ca.key").write_text(pki["gateway_key"])
    bad = run(in_pod(r.one("Pod")["spec"]["containers"][0]["command"], etc), env=clean_env(**env))
    assert bad.returncode == 64 and "cluster.peer_ca_key" in bad.stderr, bad
    off = render_file(GATEWAY_CHART, "gateway-postgres-dsn-only.yaml")
    assert "peer_ca_key" not in tomllib.loads(off.one("ConfigMap")["data"]["gateway.toml"])["cluster"]
    assert "WARNING: peer links off" in off.notes


# === customer controls: the kill switch's ConfigMap and the ledger (issue 21) ===


def test_agent_kill_switch_configmap_is_mounted_watched_and_paused_only_on_request():
    r = render_file(AGENT_CHART, "agent-required.yaml")
    control = r.one("ConfigMap", f"{RELEASE}-tether-agent-control")
    assert tomllib.loads(control["data"]["control.toml"]) == {"paused": False, "reason": ""}
    cfg = tomllib.loads(r.one("ConfigMap")["data"]["agent.toml"])
    assert cfg["control_file"] == "/etc/tether-control/control.toml"
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    vol = next(v for v in pod["volumes"] if v["name"] == "control")
    assert vol["configMap"]["name"] == control["metadata"]["name"]
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "control")
    assert (mount["mountPath"], mount["readOnly"]) == ("/etc/tether-control", True)
    # Editing it must reload, not restart: it is not in the pod template's checksums.
    annotations = r.one("Deployment")["spec"]["template"]["metadata"].get("annotations", {})
    assert not any("control" in k for k in annotations), annotations

    paused = render_file(AGENT_CHART, "agent-required.yaml",
                         {"control": {"paused": True, "reason": "audit \"Q3\""}})
    text = paused.one("ConfigMap", f"{RELEASE}-tether-agent-control")["data"]["control.toml"]
    assert tomllib.loads(text) == {"paused": True, "reason": 'audit "Q3"'}
    with pytest.raises(Exception) as e:
        render_file(AGENT_CHART, "agent-required.yaml", {"control": {"paused": "yes"}})
    assert "paused" in str(e.value)


def test_agent_approvals_reach_agent_toml_only_when_set():
    r = render_file(AGENT_CHART, "agent-required.yaml")
    cfg = tomllib.loads(r.one("ConfigMap")["data"]["agent.toml"])
    assert "approvals" not in cfg
    r = render_file(AGENT_CHART, "agent-required.yaml",
                    {"approvals": {"kinds": ["deploy", "environment.delete"]}})
    cfg = tomllib.loads(r.one("ConfigMap")["data"]["agent.toml"])
    assert cfg["approvals"] == {"kinds": ["deploy", "environment.delete"]}
    # The agent keeps the waits in state_dir, which the chart always sets.
    assert cfg["state_dir"] == "/var/lib/tether"


def test_agent_ledger_values_reach_agent_toml_and_its_volume():
    r = render_file(AGENT_CHART, "agent-required.yaml")
    cfg = tomllib.loads(r.one("ConfigMap")["data"]["agent.toml"])
    assert cfg["ledger"] == {
        "enabled": True,
        "max_file_bytes": 16777216,
        "max_files": 8,
        "checkpoint_records": 1000,
        "checkpoint_interval": "60s",
        "stdout": True,
    }
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    ledger = next(v for v in pod["volumes"] if v["name"] == "ledger")
    assert ledger == {"name": "ledger", "emptyDir": {"sizeLimit": "160Mi"}}
    mount = next(m for m in pod["containers"][0]["volumeMounts"] if m["name"] == "ledger")
    assert mount["mountPath"] == "/var/lib/tether/ledger" and "subPathExpr" not in mount

    pvc = render_file(AGENT_CHART, "agent-required.yaml", {"ledger": {
        "volume": {"persistentVolumeClaim": {"claimName": "tether-ledger"}},
        "maxFiles": 4, "maxFileBytes": 1048576}})
    pod = pvc.one("Deployment")["spec"]["template"]["spec"]
    assert next(v for v in pod["volumes"] if v["name"] == "ledger") == {
        "name": "ledger", "persistentVolumeClaim": {"claimName": "tether-ledger"}}
    c = pod["containers"][0]
    mount = next(m for m in c["volumeMounts"] if m["name"] == "ledger")
    # Replicas write their own chains, each in the pod's own directory.
    assert mount["subPathExpr"] == "$(POD_NAME)"
    env = {e["name"]: e for e in c["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    cfg = tomllib.loads(pvc.one("ConfigMap")["data"]["agent.toml"])
    assert (cfg["ledger"]["max_files"], cfg["ledger"]["max_file_bytes"]) == (4, 1048576)

    off = render_file(AGENT_CHART, "agent-required.yaml", {"ledger": {"enabled": False}})
    pod = off.one("Deployment")["spec"]["template"]["spec"]
    assert not any(v["name"] == "ledger" for v in pod["volumes"])
    assert tomllib.loads(off.one("ConfigMap")["data"]["agent.toml"])["ledger"]["enabled"] is False
    with pytest.raises(Exception) as e:
        render_file(AGENT_CHART, "agent-required.yaml", {"ledger": {"maxFiles": 1}})
    assert "maxFiles" in str(e.value)
