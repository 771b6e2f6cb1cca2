"""A live gateway scraped by a real Prometheus: the runs drive.py causes must show, exactly, in the
gateway's /metrics, in Prometheus, in every dashboard query and in the alerts; and the helm test pod's
command must pass against a gateway on the chart's configuration. Producers, Prometheus and every /metrics,
/readyz and /v1 request use the gateway's internal door; the WebSocket client its public door."""

import re
import time
import urllib.error
import urllib.request

import pytest

import deploylib as d

# What the gateway exports that the dashboard and the alerts rely on.
NEEDED = ["agentwire_" + x for x in """events_ingested_total events_rejected_total events_duplicate_total
events_emitted_total events_delivered_total events_acked_total events_lost_total events_pending
events_pending_oldest_age_seconds events_pending_resolution unresolved_run_ids_total runs_registered_total
live_delivery_latency_seconds_bucket replay_age_seconds_bucket fanout_frames_sent_total channels connections connections_opened_total
connections_closed_total subscriptions resumes_total slow_consumer_closes_total client_errors_total broker_up
build_info runs_active runs_started_total runs_stalled_total runs_completed_total run_duration_seconds_bucket
lifecycle_violations_total runs_evicted_total event_age_seconds_bucket deadletter_events broker_errors_total
broker_latency_seconds_bucket""".split()] + ["process_cpu_seconds_total", "process_resident_memory_bytes",
                                             "process_open_fds"]

KEYWORDS = {"sum", "min", "max", "avg", "count", "stddev", "stdvar", "topk", "bottomk", "quantile", "count_values",
            "group", "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
            "offset", "inf", "nan", "le", "atan2"}


def metric_names(expr):
    """The metric names a PromQL expression reads."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)           # strings
    e = re.sub(r"\{[^}]*\}", "", e)                         # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)                        # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        word, after = m.group(0), e[m.end():].lstrip()
        if after.startswith("(") or word.lower() in KEYWORDS or word.startswith("$"):
            continue
        before = e[m.start() - 1] if m.start() else " "
        if before == "$" or before.isdigit() or before == ".":  # a variable, a duration (5m), 1e3
            continue
        names.add(word)
    return names


def substitute(expr):
    """A dashboard query as Grafana would send it: every variable matches everything, and the whole test
    fits in 5 minutes, so rates and ranges over 5m cover every event it caused."""
    for var in ("namespace", "job", "instance"):
        expr = expr.replace("$" + var, ".*")
    return expr.replace("$__rate_interval", "5m").replace("$__range", "5m").replace("$__interval", "5s")


def all_queries(dashboard, rules):
    """(where, expr) for every panel query, every query variable and every alert expression."""
    queries = []
    for p in dashboard["panels"]:
        for t in p.get("targets", []):
            queries.append(("panel %r %s" % (p["title"], t["refId"]), t["expr"]))
    for v in dashboard["templating"]["list"]:
        if v["type"] == "query":
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", v["query"]["query"])
            assert m, v["query"]
            queries.append(("variable %s" % v["name"], m.group(1)))
    for r in rules:
        queries.append(("alert %s/%s" % (r["alert"], r["labels"]["severity"]), r["expr"]))
    return queries


def test_gateway_serves_healthz(gateway):
    assert gateway.ready, "no answer on /healthz of both doors within 20 s\n" + gateway.tail()


def _status(url):
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def test_public_door_serves_only_ws_and_healthz(gateway):
    """What the chart's public Service, Ingress and HTTPRoute expose: /ws and /healthz; the API, /metrics and
    /readyz are 404 there and 200 on the internal door, which has no /ws."""
    if not gateway.ready:
        pytest.fail("gateway not ready\n" + gateway.tail())
    got = {(door, path): _status(base + path)
           for door, base in (("public", gateway.url), ("internal", gateway.api))
           for path in ("/healthz", "/readyz", "/metrics", "/v1/ledger", "/v1/deadletter")}
    want = {(door, path): 200 if door == "internal" or path == "/healthz" else 404
            for door, path in got}
    assert got == want, got
    import drive  # needs websockets, which only the live checks use
    status, _ = drive.upgrade_status(gateway.api)
    assert status == 404, "internal door answered /ws with %s" % status


def test_prometheus_is_ready(prometheus):
    assert prometheus.ready, "no answer on /-/ready within 30 s\n" + prometheus.tail()


def test_prometheus_scrapes_gateway_before_traffic(baseline):
    assert baseline, "no sample of agentwire_events_emitted_total == 0 after 30 s"


def test_drive_runs_over_http_and_websocket(driven):
    assert driven["delivered"] > 0, driven


def test_gateway_metrics_count_what_the_test_caused(driven, final_metrics):
    """The gateway's own totals say what the client saw: delivered = frames the client saw, 1 generated,
    1 expired_unseen, 1 unresolved, 2 pending; each compared as one whole sample (name and exact labels).
    The upgrade of a foreign origin is one whole exposition line, and nothing was refused for protected mode
    (the client is on loopback)."""
    m = final_metrics
    lines = m.text.split("\n")
    for line in ('agentwire_upgrades_refused_total{reason="origin"} %d' % driven["refused_origin"],
                 'agentwire_upgrades_refused_total{reason="not_loopback"} 0'):
        assert line in lines, "no line %r in /metrics:\n%s" % (
            line, "\n".join(x for x in lines if x.startswith("agentwire_upgrades_refused_total")))
    driven = {k: v for k, v in driven.items() if k != "refused_origin"}
    got = {"delivered": m.value("agentwire_events_delivered_total"),
           "emitted": m.value("agentwire_events_emitted_total"),
           "ingested": m.value("agentwire_events_ingested_total"),
           "generated": m.value("agentwire_events_generated_total"),
           "expired_unseen": m.value("agentwire_events_lost_total", reason="expired_unseen"),
           "unresolved": m.value("agentwire_events_lost_total", reason="unresolved"),
           "pending": m.value("agentwire_events_pending")}
    assert got == {k: float(v) for k, v in driven.items()}, "gateway %s, test caused %s" % (got, driven)
    assert m.value("agentwire_events_lost_total", reason="expired_subscribed") == 0
    assert (m.value("agentwire_runs_stalled_total") or 0) >= 1, "one stalled run"


def test_prometheus_scraped_the_final_values(live, driven, prom_final):
    _, _, prom = live
    assert prom_final, "prometheus did not get the final values: delivered=%s, caused %s" % (
        d.prom_value(prom, "agentwire_events_delivered_total"), driven["delivered"])


def test_gateway_exports_every_metric_dashboard_and_alerts_use(exported):
    missing = [n for n in NEEDED if n not in exported]
    assert not missing, "not exported (yet): " + " ".join(missing)


def test_dashboard_and_alert_queries_name_only_exported_metrics(dashboard, rules, exported):
    failures = []
    for where, expr in all_queries(dashboard, rules):
        unknown = sorted(n for n in metric_names(expr) if n not in exported)
        if unknown:
            failures.append("%s: not exported by the gateway: %s" % (where, ", ".join(unknown)))
    assert not failures, "\n".join(failures)


def test_dashboard_and_alert_queries_evaluate_and_show_what_the_test_caused(live, driven, prom_final, dashboard, rules):
    """Every dashboard query and alert expression parses and evaluates in Prometheus; the delivery and
    loss panels show what the test caused; loss, unresolved and stalled alerts fire, the others (the budget
    and refusal alerts included: the test refuses one foreign origin, nothing at a budget) do not."""
    _, _, prom = live
    exp = driven
    # Evaluate at the time of the last scrape: increase() then has no extrapolation past the last sample,
    # and its values are the exact counts.
    at = d.prom_query(prom, "timestamp(agentwire_events_emitted_total)")["data"]["result"][0]["value"][1]
    failures, results = [], {}
    for where, expr in all_queries(dashboard, rules):
        body = d.prom_query(prom, substitute(expr), at)
        if body.get("status") != "success":
            failures.append("%s: %s" % (where, body.get("error")))
        else:
            results[where] = body["data"]["result"]

    def vals(where, key=None):
        return {s["metric"].get(key) if key else None: float(s["value"][1]) for s in results.get(where, [])}

    def near(got, want):
        return got is not None and abs(got - want) <= max(0.5, 0.05 * want)

    def want(cond, msg):
        if not cond:
            failures.append(msg)

    p = "panel 'Events in range' "
    want(near(vals(p + "A").get(None), exp["emitted"]), "Events in range: emitted %s, caused %s" % (vals(p + "A"), exp["emitted"]))
    want(near(vals(p + "B").get(None), exp["delivered"]), "Events in range: delivered %s, caused %s" % (vals(p + "B"), exp["delivered"]))
    lost = vals("panel 'Lost in range by reason' A", "reason")
    want(near(lost.get("expired_unseen"), 1) and near(lost.get("unresolved"), 1)
         and lost.get("expired_subscribed", 0) < 0.5 and lost.get("internal", 0) < 0.5,
         "Lost in range by reason: %s, caused expired_unseen 1, unresolved 1" % lost)
    ratio = vals("panel 'Delivery ratio (SLI)' A").get(None)
    want(ratio is not None and abs(ratio - 1) < 1e-9,
         "Delivery ratio: %s, caused 1 (the unresolved event is the producer's, not the objective's)" % ratio)
    want(vals("panel 'Ledger imbalance' A").get(None) == 0, "Ledger imbalance: %s" % vals("panel 'Ledger imbalance' A"))
    want(vals("panel 'Pending events' A").get(None) == exp["pending"] and vals("panel 'Pending events' B").get(None) == 0,
         "Pending events: %s / %s, caused %s / 0" % (vals("panel 'Pending events' A"), vals("panel 'Pending events' B"), exp["pending"]))
    rates = {k: vals("panel 'Events emitted vs delivered' " + k).get(None, 0) for k in "ABC"}
    want(all(v > 0 for v in rates.values()), "Events emitted vs delivered: rates %s" % rates)
    lr = vals("panel 'Events lost by reason' A", "reason")
    want(lr.get("unresolved", 0) > 0 and lr.get("expired_unseen", 0) > 0 and lr.get("expired_subscribed") == 0,
         "Events lost by reason: %s" % lr)
    want(near(vals("panel 'Unresolved run ids and dead letters' A").get(None), 1),
         "Unresolved run ids: %s" % vals("panel 'Unresolved run ids and dead letters' A"))
    outcomes = vals("panel 'Runs started and completed by outcome' B", "outcome")
    want(all(outcomes.get(k, 0) > 0 for k in ("completed", "error", "stalled")), "Runs completed by outcome: %s" % outcomes)
    want(vals("panel 'Lifecycle violations by kind' A", "kind").get("tool_completed_without_executing", 0) > 0,
         "Lifecycle violations: %s" % vals("panel 'Lifecycle violations by kind' A", "kind"))
    want(near(vals("panel 'Stalled runs' A").get(None), 1), "Stalled runs: %s" % vals("panel 'Stalled runs' A"))
    for name, firing in (("AgentwireDeliveryErrorBudgetBurn", False), ("AgentwireUnresolvedRunIds", True), ("AgentwireRunsStalled", True),
                         ("AgentwireLedgerImbalance", False), ("AgentwireBrokerDown", False), ("AgentwireTargetAbsent", False),
                         ("AgentwireAcceptFdLimit", False), ("AgentwireBrokerOutOfMemory", False),
                         ("AgentwireReportsDropped", False), ("AgentwireHistoryEvicting", False),
                         ("AgentwirePendingRefused", False), ("AgentwireUpstreamFailing", False),
                         ("AgentwireConnectionsRefused", False)):
        got = [s for w, r in results.items() if w.startswith("alert %s/" % name) for s in r]
        want(bool(got) == firing, "alert %s: expression %s, expected %s" % (
            name, "true" if got else "empty", "true" if firing else "empty"))
    assert not failures, "\n".join(failures)


def test_prometheus_loaded_the_rules_and_unresolved_run_ids_fires(live, driven, final_metrics):
    """Prometheus loaded the rules (health ok) and AgentwireUnresolvedRunIds (the producer team's warning, no
    page) fires on the unresolved event."""
    _, _, prom = live
    deadline = time.monotonic() + 10
    while True:
        groups = d.get_json(prom + "/api/v1/rules")["data"]["groups"]
        rules = [r for g in groups for r in g["rules"]]
        alerts = d.get_json(prom + "/api/v1/alerts")["data"]["alerts"]
        firing = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
        if (rules and all(r["health"] == "ok" for r in rules) and "AgentwireUnresolvedRunIds" in firing) \
                or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    bad = [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"]
    assert rules and not bad, bad
    assert "AgentwireUnresolvedRunIds" in firing, firing


def test_probe_passes_against_a_gateway_on_the_charts_config(probe_gateway, gateway_bin, rendered):
    """`agentwire probe --url <public> --api-url <internal>` (the helm test pod's command, with the two
    Services' URLs replaced by the two doors of a local gateway) exits 0 against a gateway on the chart's
    default agentwire.toml."""
    if not probe_gateway.ready:
        pytest.fail("the gateway on the chart's agentwire.toml did not serve /healthz\n" + probe_gateway.tail())
    args = rendered["default-values"].require().by[("Pod", "agentwire-probe")]["spec"]["containers"][0]["args"]
    assert args == ["probe", "--url", "http://agentwire:8000", "--api-url", "http://agentwire-internal:8001"], args
    args = [a.replace("http://agentwire:8000", probe_gateway.url).replace("http://agentwire-internal:8001", probe_gateway.api)
            for a in args]
    proc = d.run([gateway_bin, *args], timeout=30, env=d.gateway_env())
    assert proc.returncode == 0, d.output(proc)


def test_probe_passes_with_the_keys_and_token_of_the_existing_secret(secret_gateway, secret_rendered, test_secrets,
                                                                     gateway_bin):
    """With auth.existingSecret the gateway runs on the chart's agentwire.toml and the environment its
    Deployment takes from the Secret (HMAC secret, both key lists), so browsers need a token and the API a
    key. The helm test pod's command, with the environment the pod takes from the same Secret (a producer
    key, an operator key, a token minted by `agentwire token --user probe --thread 'agentwire-probe-*'`),
    exits 0; without the token, or without the keys, it fails."""
    if not secret_gateway.ready:
        pytest.fail("the gateway on the chart's config with auth.existingSecret did not serve /healthz\n"
                    + secret_gateway.tail())
    r = secret_rendered.require()
    pod = r.by[("Pod", "agentwire-probe")]["spec"]["containers"][0]
    args = [a.replace("http://agentwire:8000", secret_gateway.url).replace("http://agentwire-internal:8001", secret_gateway.api)
            for a in pod["args"]]
    env = d.pod_env(pod, d.secrets_of(r, test_secrets))
    assert set(env) == {"AGENTWIRE_PROBE_PRODUCER_KEY", "AGENTWIRE_PROBE_OPERATOR_KEY", "AGENTWIRE_PROBE_TOKEN"}, env
    proc = d.run([gateway_bin, *args], timeout=30, env=d.gateway_env(**env))
    assert proc.returncode == 0, d.output(proc) + "\n" + secret_gateway.tail()
    for left_out, why in (("AGENTWIRE_PROBE_TOKEN", "browsers must authenticate"),
                          ("AGENTWIRE_PROBE_PRODUCER_KEY", "POST /v1/events needs a producer key"),
                          ("AGENTWIRE_PROBE_OPERATOR_KEY", "the ledger needs an operator key")):
        partial = {k: v for k, v in env.items() if k != left_out}
        proc = d.run([gateway_bin, *args], timeout=30, env=d.gateway_env(**partial))
        assert proc.returncode == 1, "passed without %s (%s): %s" % (left_out, why, d.output(proc))
