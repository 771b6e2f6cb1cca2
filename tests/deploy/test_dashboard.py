"""The Grafana dashboard (dashboards/agentwire.json), checked statically; its queries are evaluated
against a live Prometheus in test_live.py."""

import os
import re
import tarfile

import deploylib as d

# Grafana unit ids used here (valueFormats categories)
UNITS = {"short", "none", "s", "ms", "bytes", "percentunit", "eps", "ops", "cps", "reqps", "bool_yes_no"}
ROWS = ["Delivery health", "Runs", "Latency", "Connections", "Broker", "Budgets and refusals", "Process"]


def test_dashboard_uid_datasource_units_rate_intervals(dashboard):
    """Parses, fixed uid, a datasource variable and a unit on every panel, $__rate_interval in rates."""
    errors = []
    assert dashboard.get("uid") == "agentwire", "fixed uid"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables.get("datasource", {}).get("type") == "datasource" and variables["datasource"]["query"] == "prometheus"
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    if rows != ROWS:
        errors.append("rows %s, want %s" % (rows, ROWS))
    for p in dashboard["panels"]:
        if p["type"] == "row":
            continue
        t = p.get("title", "?")
        if p.get("datasource", {}).get("uid") != "${datasource}":
            errors.append(t + ": panel datasource is not ${datasource}")
        if p.get("fieldConfig", {}).get("defaults", {}).get("unit") not in UNITS:
            errors.append(t + ": unit")
        if not p.get("description"):
            errors.append(t + ": description")
        if not p.get("targets"):
            errors.append(t + ": no query")
        for q in p.get("targets", []):
            if q.get("datasource", {}).get("uid") != "${datasource}":
                errors.append(t + ": target datasource")
            for fn, win in re.findall(r"\b(rate|irate|increase)\([^\[]*\[([^\]]+)\]", q["expr"]):
                if win not in ("$__rate_interval", "$__range"):
                    errors.append(t + ": %s over [%s]" % (fn, win))
    ids = [p["id"] for p in dashboard["panels"]]
    if len(ids) != len(set(ids)):
        errors.append("duplicate panel ids")
    assert not errors, "\n".join(errors)


def test_dashboard_one_source(work):
    """dashboards/agentwire.json is the only copy: the chart's file is a symbolic link to it, and the
    packaged chart carries it byte for byte."""
    copies = []
    for top, dirs, files in os.walk(d.ROOT):
        rel = os.path.relpath(top, d.ROOT)
        if rel == ".":
            dirs[:] = [x for x in dirs if x not in ("target", ".git")]
        copies += [os.path.normpath(os.path.join(rel, f)) for f in files if f == "agentwire.json"]
    want = sorted([str(d.DASHBOARD.relative_to(d.ROOT)), str(d.CHART_DASHBOARD.relative_to(d.ROOT))])
    assert sorted(copies) == want, "agentwire.json found at %s, want only %s" % (sorted(copies), want)
    assert d.CHART_DASHBOARD.is_symlink(), "%s is not a symbolic link" % d.CHART_DASHBOARD
    assert d.CHART_DASHBOARD.resolve() == d.DASHBOARD.resolve(), "%s resolves to %s" % (
        d.CHART_DASHBOARD, d.CHART_DASHBOARD.resolve())
    out = work / "package"
    proc = d.run(["helm", "package", d.CHART, "-d", out])
    assert proc.returncode == 0, d.output(proc)
    (tgz,) = out.glob("*.tgz")
    with tarfile.open(tgz) as t:
        shipped = t.extractfile("agentwire/dashboards/agentwire.json").read()
    assert shipped == d.DASHBOARD.read_bytes(), "the packaged chart's dashboard differs from dashboards/agentwire.json"
