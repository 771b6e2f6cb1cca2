"""The alert rules (helm/agentwire/rules/alerts.yaml): valid for promtool, every alert unit-tested both
ways, named and annotated in the mixin style, each with its runbook section."""

import re

import yaml

import deploylib as d

REQUIRED = ["AgentwireDeliveryErrorBudgetBurn", "AgentwireUnresolvedRunIds",
            "AgentwireRunsStalled", "AgentwireDeliveryStuck", "AgentwireDeliveryLatencyHigh",
            "AgentwireSlowConsumerCloses", "AgentwireBrokerDown", "AgentwireLedgerImbalance",
            "AgentwireTargetAbsent", "AgentwireAcceptFdLimit", "AgentwireBrokerOutOfMemory",
            "AgentwireReportsDropped", "AgentwireHistoryEvicting", "AgentwirePendingRefused",
            "AgentwireUpstreamFailing", "AgentwireConnectionsRefused"]


def test_promtool_check_rules():
    proc = d.run(["promtool", "check", "rules", d.RULES])
    assert proc.returncode == 0, d.output(proc)


def test_promtool_test_rules():
    """Every alert fires on a bad series and stays silent on a healthy one."""
    proc = d.run(["promtool", "test", "rules", d.RULE_TESTS])
    assert proc.returncode == 0, d.output(proc)


def test_alerts_mixin_style_tested_both_ways_with_runbooks(rules):
    tests = yaml.safe_load(d.RULE_TESTS.read_text())["tests"]
    sections = set(re.findall(r"^## (\S+)\s*$", d.RUNBOOKS.read_text(), re.M))
    fires, silent, errors = set(), set(), []
    for t in tests:
        for a in t.get("alert_rule_test", []):
            (fires if a.get("exp_alerts") else silent).add(a["alertname"])
    names = {r["alert"] for r in rules}
    for r in rules:
        n = r["alert"]
        if not re.fullmatch(r"Agentwire([A-Z][a-z0-9]+)+", n):
            errors.append(n + ": not CamelCase with the Agentwire prefix")
        if r.get("labels", {}).get("severity") not in ("critical", "warning", "info"):
            errors.append(n + ": severity")
        ann = r.get("annotations", {})
        for k in ("summary", "description", "runbook_url"):
            if not ann.get(k):
                errors.append(n + ": annotation " + k)
        if not ann.get("runbook_url", "").endswith("docs/runbooks.md#" + n.lower()):
            errors.append(n + ": runbook_url anchor")
        if n not in sections:
            errors.append(n + ": no section in docs/runbooks.md")
        if n not in fires:
            errors.append(n + ": no unit test makes it fire")
        if n not in silent:
            errors.append(n + ": no unit test shows it silent on healthy series")
    for s in sorted(sections - names):
        errors.append("runbook section without an alert: " + s)
    for n in REQUIRED:
        if n not in names:
            errors.append("missing alert " + n)
    assert not errors, "\n".join(errors)
