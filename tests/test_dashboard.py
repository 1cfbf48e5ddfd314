"""The Grafana dashboard (dashboards/vllm-e3-grafana.json), without an engine:
it is an importable dashboard over a `${DS_PROMETHEUS}` input, and every
`vllm_e3:` series its queries name is one vllm_e3.metrics emits (a renamed
metric fails here). tests/test_serving.py checks the same names on a live
server's /metrics."""
import json
import os
import re

DASHBOARD = os.path.join(os.path.dirname(__file__), "..", "dashboards", "vllm-e3-grafana.json")
DS = {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}
NAME = re.compile(r"vllm_e3:[a-zA-Z0-9_:]+")


def load() -> dict:
    with open(DASHBOARD) as f:
        return json.load(f)


def panels(dash: dict) -> list[dict]:
    """Every panel, those inside collapsed rows too (rows themselves left out)."""
    out = []
    for p in dash["panels"]:
        if p.get("type") == "row":
            out += p.get("panels", [])
        else:
            out.append(p)
    return out


def exprs(dash: dict) -> list[str]:
    """The PromQL of every panel's targets."""
    return [t["expr"] for p in panels(dash) for t in p["targets"]]


def dashboard_metric_names(dash: dict | None = None) -> set[str]:
    """The `vllm_e3:` metric names the dashboard's PromQL queries."""
    return {n for e in exprs(dash or load()) for n in NAME.findall(e)}


def emitted_names() -> tuple[set[str], set[str]]:
    """(every sample name vllm_e3.metrics' collector can put on /metrics,
    those of the FAMILIES counters): one engine with every counter of
    ExitStats non-zero, audit included, through a Prometheus registry."""
    from prometheus_client import CollectorRegistry, generate_latest

    from vllm_e3.runtime import ExitStats
    from vllm_e3.metrics import FAMILIES, E3Collector

    st = ExitStats(steps=3, decode_tokens=10, exited={8: 3, 15: 2}, layers_run=200, layers_full=300,
                   kv_fill_rows=50, parked=2, resumed=2, park_wait_hist={1: 2}, stage_rows={0: 10, 9: 7},
                   stage_runs={0: 3, 9: 3}, audited={8: 2}, audit_agreed={8: 1})
    collector = E3Collector(model_name="m")

    class Fake:
        def collect(self):
            return collector.families({0: st.as_dict()})

    reg = CollectorRegistry()
    reg.register(Fake())
    text = generate_latest(reg).decode()
    samples = set(re.findall(r"^(vllm_e3:[a-zA-Z0-9_:]+)\{", text, re.M))
    counters = {n for n in samples if any(n == f"vllm_e3:{f[0]}_total" for f in FAMILIES)}
    assert len(counters) == len(FAMILIES), (counters, text)
    return samples, counters


def test_dashboard_is_importable():
    dash = load()
    assert isinstance(dash["schemaVersion"], int) and dash["title"] and dash["uid"]
    inputs = {i["name"]: i for i in dash["__inputs"]}
    assert inputs["DS_PROMETHEUS"]["type"] == "datasource" and inputs["DS_PROMETHEUS"]["pluginId"] == "prometheus"
    ps = panels(dash)
    assert ps and len({p["id"] for p in ps}) == len(ps)
    for p in ps:
        assert p["datasource"] == DS, p["title"]
        assert p["targets"], p["title"]
        assert len({t["refId"] for t in p["targets"]}) == len(p["targets"]), p["title"]
        for t in p["targets"]:
            assert t.get("datasource", DS) == DS and t["expr"].strip(), p["title"]
            # by engine, for the model the template variable picks
            assert "engine" in t["expr"] and 'model_name="$model_name"' in t["expr"], t["expr"]
            for m in re.finditer(r"vllm_e3:[a-zA-Z0-9_:]+(\{[^}]*\})?", t["expr"]):
                assert m.group(1) and 'model_name="$model_name"' in m.group(1), (p["title"], t["expr"])
    var = {v["name"]: v for v in dash["templating"]["list"]}["model_name"]
    assert var["type"] == "query" and var["datasource"] == DS
    assert any(p["title"] == "Decode tokens/s" for p in ps)


def test_dashboard_names_only_metrics_that_exist():
    """Every `vllm_e3:` name in the dashboard (queries and template variable)
    is one the collector emits, and the queries use every FAMILIES counter and
    the audit's derived gauges."""
    dash = load()
    used = dashboard_metric_names(dash)
    anywhere = set(NAME.findall(json.dumps(dash["templating"]))) | used
    samples, counters = emitted_names()
    assert used and anywhere <= samples, anywhere - samples
    assert counters <= used, counters - used
    assert {"vllm_e3:audit_agreement", "vllm_e3:audit_agreement_lower_95"} <= used & samples
