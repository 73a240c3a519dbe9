"""The generated Grafana dashboards: fresh, deterministic, import-ready for Grafana 10+.

Every panel must query the `${datasource}` variable, carry a unit and read
only metrics from the contract (dashboards/metrics.py). Whether every query
returns data against a live agent is tests/test_e2e_prometheus.py's job.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest

from dashboards import generate, metrics
from dashboards.params import DEFAULT

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = ROOT / "dashboards"
JSON_FILES = sorted((DASHBOARDS / "json").glob("*.json"))
DS = {"type": "prometheus", "uid": "${datasource}"}


def load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def panels(dash: dict) -> list[dict]:
    """Every non-row panel, including those nested in collapsed rows."""
    out = []
    for p in dash["panels"]:
        if p.get("type") == "row":
            out.extend(p.get("panels") or [])
        else:
            out.append(p)
    return out


def all_panels():
    return [pytest.param(path.stem, p, id=f"{path.stem}:{p['id']}:{p['title']}")
            for path in JSON_FILES for p in panels(load(path))]


def test_one_json_per_source_and_four_dashboards():
    sources = {p.name[: -len(".dashboard.py")] for p in DASHBOARDS.glob("*.dashboard.py")}
    assert {p.stem for p in JSON_FILES} == sources
    assert sources >= {"capacity_overview", "process_detail", "kernel_limits", "agent_health"}


def test_committed_files_are_fresh(tmp_path):
    """Regenerate into a temp dir with the real CLI and diff against the committed files."""
    r = subprocess.run([sys.executable, "-m", "dashboards.generate", "--out-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert generated == sorted([Path("alerts/connwatch.rules.yml"), *(Path("json") / p.name for p in JSON_FILES)])
    for rel in generated:
        assert (tmp_path / rel).read_bytes() == (DASHBOARDS / rel).read_bytes(), \
            f"dashboards/{rel} is stale: run `make dashboards` and commit"


def test_check_mode_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "dashboards.generate", "--check"], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    generate.write(tmp_path)
    stale = tmp_path / "json" / "kernel_limits.json"
    stale.write_text(stale.read_text().replace("Kernel limits", "Kernel limitz"))
    r = subprocess.run([sys.executable, "-m", "dashboards.generate", "--check", "--out-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "json/kernel_limits.json is stale" in r.stderr
    (tmp_path / "json" / "orphan.json").write_text("{}")
    assert any("orphan.json" in p for p in generate.check(tmp_path))


def test_generation_is_deterministic():
    assert generate.outputs() == generate.outputs()


@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: p.stem)
def test_dashboard_is_grafana10_import_ready(path):
    d = load(path)
    assert d["schemaVersion"] >= 36 and d["id"] is None
    assert d["uid"].startswith("connwatch-") and d["title"].startswith("connwatch / ")
    variables = {v["name"]: v for v in d["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    assert "instance" in variables
    for v in variables.values():
        if v["type"] == "query":
            assert v["datasource"] == DS, v["name"]
    ids = [p["id"] for p in d["panels"]]
    assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
    for p in d["panels"]:
        pos = p["gridPos"]
        assert 0 <= pos["x"] and pos["x"] + pos["w"] <= 24 and pos["h"] > 0, p["title"]
    for a in d["annotations"]["list"]:
        if not a.get("builtIn"):
            assert a["datasource"] == DS


def test_uids_are_unique():
    uids = [load(p)["uid"] for p in JSON_FILES]
    assert len(uids) == len(set(uids))


def test_template_variables_for_instance_process_and_port():
    overview = {v["name"] for v in load(DASHBOARDS / "json/capacity_overview.json")["templating"]["list"]}
    detail = {v["name"] for v in load(DASHBOARDS / "json/process_detail.json")["templating"]["list"]}
    assert overview >= {"datasource", "instance", "port"}
    assert detail >= {"datasource", "instance", "comm", "pid", "port"}


@pytest.mark.parametrize("dash,panel", all_panels())
def test_panel_has_unit_datasource_and_queries(dash, panel):
    assert panel["datasource"] == DS
    unit = panel["fieldConfig"]["defaults"].get("unit")
    assert unit, f"panel {panel['title']!r} has no unit"
    assert panel["targets"], "panel without queries"
    refs = [t["refId"] for t in panel["targets"]]
    assert len(refs) == len(set(refs)) and all(refs)
    for t in panel["targets"]:
        assert t["datasource"] == DS
        assert t["expr"].strip()
    assert panel.get("description"), "every panel explains what it shows"


@pytest.mark.parametrize("dash,panel", all_panels())
def test_panel_queries_use_only_contract_metrics(dash, panel):
    for t in panel["targets"]:
        names = metrics.referenced(t["expr"])
        assert names, t["expr"]
        assert names <= metrics.CONTRACT, f"{names - metrics.CONTRACT} not in the metric contract"


@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: p.stem)
def test_variable_and_annotation_queries_use_only_contract_metrics(path):
    d = load(path)
    exprs = [v["query"] for v in d["templating"]["list"] if v["type"] == "query"]
    exprs += [a["expr"] for a in d["annotations"]["list"] if "expr" in a]
    for e in exprs:
        assert metrics.referenced(e) <= metrics.CONTRACT, e


def test_emfile_and_listen_drop_annotations():
    for name in ("capacity_overview", "process_detail"):
        ann = {a["name"]: a for a in load(DASHBOARDS / f"json/{name}.json")["annotations"]["list"]}
        assert metrics.FD_ALLOC_FAILURES in ann["EMFILE / ENFILE"]["expr"]
        assert metrics.LISTEN_OVERFLOW_DROPS in ann["Listen drops"]["expr"]
        assert metrics.LISTEN_DROPS in ann["Listen drops"]["expr"]


def test_duration_histogram_is_a_heatmap():
    heat = [p for p in panels(load(DASHBOARDS / "json/process_detail.json")) if p["type"] == "heatmap"]
    assert len(heat) == 1
    (h,) = heat
    assert h["options"]["calculate"] is False and h["fieldConfig"]["defaults"]["unit"] == "s"
    (t,) = h["targets"]
    assert t["format"] == "heatmap" and metrics.CONNECTION_DURATION_BUCKET in t["expr"] and "by (le)" in t["expr"]


def test_thresholds_drawn_at_the_alert_limits():
    """Fd-usage panels colour at the alert thresholds from params, limits are dashed red lines."""
    want = [DEFAULT.fd_usage_warning, DEFAULT.fd_usage_critical]
    found = 0
    for path in (DASHBOARDS / "json/capacity_overview.json", DASHBOARDS / "json/process_detail.json"):
        for p in panels(load(path)):
            if "Fd usage" in p["title"]:
                steps = [s["value"] for s in p["fieldConfig"]["defaults"]["thresholds"]["steps"]]
                assert steps[1:] == want, p["title"]
                found += 1
            if "fd soft limit" in json.dumps(p["targets"]):
                override = p["fieldConfig"]["overrides"][0]
                assert {"id": "custom.lineStyle", "value": {"dash": [10, 10], "fill": "dash"}} \
                    in override["properties"]
    assert found >= 3


def test_thresholds_follow_params():
    params = dataclasses.replace(DEFAULT, fd_usage_warning=0.7, fd_usage_critical=0.9)
    d = json.loads(generate.dashboard_json(
        generate.load_dashboard(DASHBOARDS / "process_detail.dashboard.py", params)))
    usage = next(p for p in panels(d) if p["title"] == "Fd usage" and p["type"] == "timeseries")
    assert [s["value"] for s in usage["fieldConfig"]["defaults"]["thresholds"]["steps"]][1:] == [0.7, 0.9]


def test_required_panels_exist():
    def titles(name):
        return {p["title"] for p in panels(load(DASHBOARDS / f"json/{name}.json"))}

    assert titles("capacity_overview") >= {
        "WebSocket connections", "TCP connections", "Headroom to each limit", "Busiest processes",
        "Busiest ports", "WebSocket upgrade outcomes", "EMFILE / ENFILE failures", "Listen drops"}
    assert titles("process_detail") >= {
        "Connections by port and kind", "File descriptors vs soft limit", "Accept queue vs effective backlog",
        "Requested vs effective backlog", "Connection duration", "Top peers"}
    assert titles("kernel_limits") >= {
        "Conntrack entries vs nf_conntrack_max", "Ephemeral ports", "TIME_WAIT vs tcp_max_tw_buckets",
        "Orphans vs tcp_max_orphans", "TCP memory vs tcp_mem", "Open files vs fs.file-max"}
    assert titles("agent_health") >= {"Probes enabled", "Map fill", "Map-full drops", "BPF program CPU"}


def test_metric_name_extraction():
    r = metrics.referenced
    assert r('sum by (instance, pid) (rate(a_total{x="y"}[$__rate_interval])) / on(instance) group_left() b') \
        == {"a_total", "b"}
    assert r("label_values(connwatch_connections{instance=~\"$instance\"}, comm)") == {"connwatch_connections"}
    assert r("histogram_quantile(0.99, sum by (le) (rate(h_bucket[5m]))) > 1e-3") == {"h_bucket"}
    assert r("x unless x offset 5m or time() - y") == {"x", "y"}


@pytest.mark.parametrize("path", JSON_FILES, ids=lambda p: p.stem)
def test_panel_titles_are_unique(path):
    titles = [p["title"] for p in panels(load(path))]
    assert len(titles) == len(set(titles))
