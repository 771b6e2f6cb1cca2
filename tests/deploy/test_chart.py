"""The Helm chart: values and schema, lint, the rendered manifests of every ci values file validated
offline against Kubernetes' schemas, what the templates promise, and the agentwire.toml they render
judged by the gateway itself."""

import base64
import json
import re
import tomllib

import jsonschema
import pytest
import yaml

import deploylib as d

# kubernetes-validate has no schema for these CRDs and only warns for them; the CRD check below validates
# them as far as possible without their CRDs.
CRD_WARNINGS = re.compile(r"^WARN .*kind (ServiceMonitor|PrometheusRule) with api version monitoring.coreos.com/v1 "
                          r"|^WARN .*kind HTTPRoute with api version gateway.networking.k8s.io/v1 ")


def test_values_yaml_has_a_comment_on_every_key():
    lines = (d.CHART / "values.yaml").read_text().split("\n")
    missing = []
    for n, line in enumerate(lines):
        if not re.match(r"^\s*(- )?[\w./-]+:", line):
            continue
        j = n - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j < 0 or not lines[j].strip().startswith("#"):
            missing.append("%d: %s" % (n + 1, line.strip()))
    assert not missing, "keys without a comment:\n" + "\n".join(missing)


def test_values_schema_draft07_closed_defaults_valid():
    """values.schema.json: draft-07, additionalProperties false at the top, the defaults valid."""
    schema = json.loads((d.CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    values = yaml.safe_load((d.CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)
    missing = sorted(set(values) - set(schema["properties"]))
    assert not missing, missing


@pytest.mark.parametrize("values", d.CI_VALUES)
def test_helm_lint_strict(values):
    proc = d.run(["helm", "lint", "--strict", d.CHART, "-f", d.CHART / "ci" / (values + ".yaml")])
    assert proc.returncode == 0, d.output(proc)


@pytest.mark.parametrize("values", d.CI_VALUES)
def test_helm_template(rendered, values):
    rendered[values].require()


@pytest.mark.parametrize("values", d.CI_VALUES)
def test_kubernetes_validate_strict(rendered, values):
    """Every built-in kind against the Kubernetes OpenAPI schema (--strict: unknown fields are errors);
    warnings only for the CRD kinds it has no schema for."""
    text = rendered[values].require().text
    proc = d.run(["kubernetes-validate", "--strict", "-k", d.K8S_VERSION, "--quiet", "-"], input=text)
    assert proc.returncode == 0, d.output(proc)
    unexpected = [line for line in proc.stdout.split("\n") if line and not CRD_WARNINGS.match(line)]
    assert not unexpected, "unexpected: " + "\n".join(unexpected)


def test_deployment_probes_security_config_drain(rendered):
    """Deployment: probes, restricted securityContext, read-only root, config mount, drain timings (all
    ci values)."""
    for name in d.CI_VALUES:
        r = rendered[name].require()
        dep = r.by[("Deployment", "agentwire")]
        pod = dep["spec"]["template"]["spec"]
        c = pod["containers"][0]
        assert c["args"] == ["--config", "/etc/agentwire/agentwire.toml"], c["args"]
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}, c["livenessProbe"]
        assert c["startupProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}, c["startupProbe"]
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "internal"}, c["readinessProbe"]
        sc, psc = c["securityContext"], pod["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]
        assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 65532
        assert psc["seccompProfile"]["type"] == "RuntimeDefault"
        assert pod["automountServiceAccountToken"] is False
        # no writable volume at all: only the ConfigMap, read-only
        assert [v for v in pod["volumes"] if "configMap" not in v] == [], pod["volumes"]
        assert all(m["readOnly"] for m in c["volumeMounts"])
        assert pod["topologySpreadConstraints"] and all("labelSelector" in t for t in pod["topologySpreadConstraints"])
        ann = dep["spec"]["template"]["metadata"]["annotations"]
        assert "checksum/config" in ann and "checksum/secret" in ann
        assert "limits" in c["resources"] and "requests" in c["resources"]
        # drain: grace period > preStop + drain_delay + close_window + timeout
        conf = tomllib.loads(r.toml())
        sd = conf["shutdown"]

        def secs(v):
            return int(v.rstrip("s"))
        pre = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        need = pre + secs(sd["drain_delay"]) + secs(sd["close_window"]) + secs(sd["timeout"])
        grace = pod["terminationGracePeriodSeconds"]
        assert grace > need, "%s: terminationGracePeriodSeconds %s <= drain sequence %s" % (name, grace, need)
        assert conf["log_format"] == "json"
        svc, isvc = r.by[("Service", "agentwire")], r.by[("Service", "agentwire-internal")]
        assert svc["spec"]["ports"][0]["appProtocol"] and isvc["spec"]["ports"][0]["appProtocol"], "appProtocol"
        probe = r.by[("Pod", "agentwire-probe")]
        assert probe["metadata"]["annotations"]["helm.sh/hook"] == "test"
        pc = probe["spec"]["containers"][0]
        assert pc["args"] == ["probe", "--url", "http://agentwire:%d" % svc["spec"]["ports"][0]["port"],
                              "--api-url", "http://agentwire-internal:%d" % isvc["spec"]["ports"][0]["port"]], pc["args"]
        assert pc["securityContext"]["readOnlyRootFilesystem"] is True


def _container(r):
    return r.by[("Deployment", "agentwire")]["spec"]["template"]["spec"]["containers"][0]


def _env(r):
    return {e["name"]: e for e in _container(r).get("env", [])}


def _port(address):
    """The port of a listen address ("0.0.0.0:8000")."""
    host, _, port = address.rpartition(":")
    assert host == "0.0.0.0", "%s: the pod's doors must listen on the pod's address" % address
    return int(port)


def _doors(r):
    """{container port name: containerPort}, {the same names: the port agentwire.toml listens on}."""
    conf = tomllib.loads(r.toml())
    ports = {p["name"]: p["containerPort"] for p in _container(r)["ports"]}
    return ports, {"http": _port(conf["listen"]), "internal": _port(conf["internal_listen"])}


@pytest.mark.parametrize("values", d.CI_VALUES)
def test_two_doors_two_services(rendered, values):
    """The public door (listen, port `http`) behind the Service agentwire; the internal door
    (internal_listen, port `internal`) behind the ClusterIP Service agentwire-internal, a port each; the
    defaults are 8000 and 8001."""
    r = rendered[values].require()
    ports, listens = _doors(r)
    assert ports == listens, "container ports %s, agentwire.toml listens on %s" % (ports, listens)
    assert ports["http"] != ports["internal"], ports
    svc, isvc = r.by[("Service", "agentwire")], r.by[("Service", "agentwire-internal")]
    assert [(p["name"], p["targetPort"]) for p in svc["spec"]["ports"]] == [("http", "http")], svc["spec"]["ports"]
    assert [(p["name"], p["targetPort"]) for p in isvc["spec"]["ports"]] == [("internal", "internal")], isvc["spec"]["ports"]
    assert isvc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["selector"] == isvc["spec"]["selector"]
    pod_labels = r.by[("Deployment", "agentwire")]["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in isvc["spec"]["selector"].items()), "selects the gateway's pods"
    values_file = yaml.safe_load((d.CHART / "ci" / (values + ".yaml")).read_text()) or {}
    want = (values_file.get("service", {}).get("port", 8000), values_file.get("internalService", {}).get("port", 8001))
    assert (svc["spec"]["ports"][0]["port"], isvc["spec"]["ports"][0]["port"]) == want
    if values == "default-values":
        assert ports == {"http": 8000, "internal": 8001} and want == (8000, 8001), ports


@pytest.mark.parametrize("values", d.CI_VALUES)
def test_readiness_probe_on_the_internal_door(rendered, values):
    """/readyz is served by the internal door only: the readiness probe's port is the container port the
    rendered internal_listen binds; liveness and startup ask /healthz of the public door."""
    r = rendered[values].require()
    c = _container(r)
    ports, listens = _doors(r)

    def resolve(port):
        return ports[port] if isinstance(port, str) else port
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert resolve(c["readinessProbe"]["httpGet"]["port"]) == listens["internal"], c["readinessProbe"]
    for probe in ("livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] == "/healthz"
        assert resolve(c[probe]["httpGet"]["port"]) == listens["http"], c[probe]


def test_redis_url_from_a_secret(rendered):
    """Redis: the URL from the chart's Secret or an existing secret, as AGENTWIRE_BROKER__REDIS_URL."""
    default = rendered["default-values"].require()
    assert "AGENTWIRE_BROKER__REDIS_URL" not in _env(default)
    assert not any(kind == "Secret" for kind, _ in default.by)
    ha = rendered["ha-redis-values"].require()
    ref = _env(ha)["AGENTWIRE_BROKER__REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert ref == {"name": "agentwire-redis", "key": "url"}, ref
    assert ha.by[("Deployment", "agentwire")]["spec"]["replicas"] == 3
    full = rendered["all-enabled-values"].require()
    ref = _env(full)["AGENTWIRE_BROKER__REDIS_URL"]["valueFrom"]["secretKeyRef"]
    secret = full.by[("Secret", ref["name"])]
    assert base64.b64decode(secret["data"][ref["key"]]).decode().startswith("redis://")
    assert "replicas" not in full.by[("Deployment", "agentwire")]["spec"], "the HPA owns replicas"


def test_several_replicas_without_redis_refused(helm):
    """replicaCount > 1 (or an HPA) without Redis is refused at template time."""
    proc = helm("--set", "replicaCount=2")
    assert proc.returncode != 0, "rendered"
    assert "replicaCount=2 needs the Redis broker" in proc.stdout + proc.stderr, d.output(proc)
    proc = helm("--set", "autoscaling.enabled=true")
    assert proc.returncode != 0, "HPA rendered"
    assert "needs the Redis broker" in proc.stdout + proc.stderr, d.output(proc)


def test_refuses_to_render_without_auth_insecure(helm):
    """Browser authentication is not in the gateway yet: without an explicit auth.insecure=true the chart
    renders nothing (the gateway would admit loopback WebSocket clients only), and says why and what to do."""
    for args in ((), ("--set", "auth.insecure=false")):
        proc = helm(*args, insecure=False)
        assert proc.returncode != 0, "rendered with %s" % (args,)
        out = proc.stdout + proc.stderr
        for want in ("browser authentication is not available in this gateway yet", "auth.insecure: true",
                     "behind an authenticating proxy or on a trusted network", "auth.allowedOrigins"):
            assert want in out, "%r not in:\n%s" % (want, d.output(proc))
    proc = helm("--set-string", "auth.insecure=true", insecure=False)
    assert proc.returncode != 0, "the string \"true\" is not true"


def test_auth_rendered_from_values(helm, gateway_cmd, work):
    """[auth] of agentwire.toml: insecure and allowed_origins from auth.*, loaded by the gateway as given;
    an origin with a path or a trailing slash (which never matches an Origin header) is refused."""
    origins = ["https://app.example.com", "https://*.agents.example.com", "http://localhost:3000"]
    proc = helm("--set-json", "auth.allowedOrigins=%s" % json.dumps(origins), "--show-only", "templates/configmap.yaml")
    assert proc.returncode == 0, d.output(proc)
    text = yaml.safe_load(proc.stdout)["data"]["agentwire.toml"]
    assert tomllib.loads(text)["auth"] == {"insecure": True, "allowed_origins": origins}
    path = work / "auth.toml"
    path.write_text(text)
    proc = gateway_cmd("config", "--config", path)
    assert proc.returncode == 0, d.output(proc)
    assert tomllib.loads(proc.stdout)["auth"] == {"insecure": True, "allowed_origins": origins}, proc.stdout
    for bad in ("https://app.example.com/", "app.example.com", "https://app.example.com/chat"):
        proc = helm("--set-json", "auth.allowedOrigins=%s" % json.dumps([bad]))
        assert proc.returncode != 0, "rendered allowedOrigins %r" % bad


def test_same_port_for_both_doors_refused(helm):
    proc = helm("--set", "internalPort=8000")
    assert proc.returncode != 0, "rendered"
    assert "need a port each" in proc.stdout + proc.stderr, d.output(proc)


def _routes_only_ws_to_the_public_service(ing, hr):
    errors = []
    for rule in ing["spec"]["rules"]:
        for p in rule["http"]["paths"]:
            if (p["path"], p["pathType"]) != ("/ws", "Exact"):
                errors.append("Ingress routes %s %s" % (p["pathType"], p["path"]))
            if p["backend"] != {"service": {"name": "agentwire", "port": {"name": "http"}}}:
                errors.append("Ingress backend %s" % p["backend"])
    for rule in hr["spec"]["rules"]:
        if rule["matches"] != [{"path": {"type": "Exact", "value": "/ws"}}]:
            errors.append("HTTPRoute matches %s" % rule["matches"])
        if [b["name"] for b in rule["backendRefs"]] != ["agentwire"]:
            errors.append("HTTPRoute backends %s" % rule["backendRefs"])
    return errors


def test_ingress_and_httproute_route_only_ws(rendered, helm):
    """The Ingress and the HTTPRoute route /ws, exactly, to the public Service and nothing else; the
    internal Service is routed by nothing (with the chart's defaults and with every part on)."""
    proc = helm("--set", "ingress.enabled=true,httpRoute.enabled=true",
                "--set-json", 'httpRoute.parentRefs=[{"name":"public"}]',
                "--show-only", "templates/ingress.yaml", "--show-only", "templates/httproute.yaml")
    assert proc.returncode == 0, d.output(proc)
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(proc.stdout) if doc}
    errors = _routes_only_ws_to_the_public_service(docs["Ingress"], docs["HTTPRoute"])
    r = rendered["all-enabled-values"].require()
    ing, hr = r.by[("Ingress", "agentwire")], r.by[("HTTPRoute", "agentwire")]
    errors += ["all-enabled: " + e for e in _routes_only_ws_to_the_public_service(ing, hr)]
    svc = r.by[("Service", "agentwire")]
    assert hr["spec"]["rules"][0]["backendRefs"][0]["port"] == svc["spec"]["ports"][0]["port"]
    assert "agentwire-internal" not in json.dumps([ing, hr]), "the internal Service is routed"
    assert not errors, "\n".join(errors)


def _policy_rules(np):
    """{container port name: the rule's `from` (None: any source)}; every rule must name its ports."""
    rules = {}
    for rule in np["spec"]["ingress"]:
        assert rule.get("ports"), "a rule without ports opens every port: %s" % rule
        for p in rule["ports"]:
            assert p["port"] not in rules, "port %s in two rules" % p["port"]
            rules[p["port"]] = rule.get("from")
    return rules


TEST_POD = {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "agentwire",
                                            "app.kubernetes.io/component": "test"}}}


def test_networkpolicy_restricts_the_internal_port(rendered, helm):
    """The public port is open to anywhere (or networkPolicy.publicFrom); the internal port only to
    networkPolicy.internalFrom (default: the pods of the release's namespace) and the helm test pod, never
    to any source; no rule opens a port it does not name."""
    proc = helm("--set", "networkPolicy.enabled=true", "--show-only", "templates/networkpolicy.yaml")
    assert proc.returncode == 0, d.output(proc)
    rules = _policy_rules(yaml.safe_load(proc.stdout))
    assert set(rules) == {"http", "internal"}, rules
    assert rules["http"] is None, "public door: any source by default"
    assert rules["internal"] == [{"podSelector": {}}, TEST_POD], rules["internal"]
    proc = helm("--set", "networkPolicy.enabled=true", "--set-json", "networkPolicy.internalFrom=[]",
                "--show-only", "templates/networkpolicy.yaml")
    assert proc.returncode == 0, d.output(proc)
    assert _policy_rules(yaml.safe_load(proc.stdout))["internal"] == [TEST_POD], "empty internalFrom: the test pod only"
    r = rendered["all-enabled-values"].require()
    values = yaml.safe_load((d.CHART / "ci" / "all-enabled-values.yaml").read_text())["networkPolicy"]
    rules = _policy_rules(r.by[("NetworkPolicy", "agentwire")])
    assert rules == {"http": values["publicFrom"] + [TEST_POD], "internal": values["internalFrom"] + [TEST_POD]}, rules


def test_grace_period_shorter_than_drain_refused(helm):
    proc = helm("--set", "drain.terminationGracePeriodSeconds=10")
    assert proc.returncode != 0, "rendered"
    assert "shorter than the drain sequence" in proc.stdout + proc.stderr, d.output(proc)


def test_typo_in_values_refused_by_schema(helm):
    proc = helm("--set", "config.resolve.gracee=1s")
    assert proc.returncode != 0, "rendered"
    assert "gracee" in proc.stdout + proc.stderr, d.output(proc)


def test_config_change_rolls_the_pods(helm):
    """A change of config.* changes the pod template's checksum/config annotation."""
    def checksum(*args):
        proc = helm("--show-only", "templates/deployment.yaml", *args)
        assert proc.returncode == 0, d.output(proc)
        return yaml.safe_load(proc.stdout)["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    a, b = checksum(), checksum("--set", "config.log_level=debug")
    assert a and a != b, (a, b)


def test_crd_manifests_and_optional_objects(rendered, work):
    """ServiceMonitor, PrometheusRule and HTTPRoute (no schema offline), and the optional objects, as
    rendered with every part on (all-enabled-values)."""
    r = rendered["all-enabled-values"].require()
    docs = r.by
    svc, isvc = docs[("Service", "agentwire")], docs[("Service", "agentwire-internal")]
    sm = docs[("ServiceMonitor", "agentwire")]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    def selects(service):
        return all(service["metadata"]["labels"].get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert selects(isvc) and not selects(svc), "the ServiceMonitor selects the internal Service only"
    ep = sm["spec"]["endpoints"][0]
    assert ep["port"] == "internal" and ep["path"] == "/metrics", ep
    assert ep["port"] in [p["name"] for p in isvc["spec"]["ports"]]
    assert {"action": "replace", "targetLabel": "job", "replacement": "agentwire-prod"} in ep["relabelings"]
    pr = docs[("PrometheusRule", "agentwire")]
    assert pr["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    rules = [rule for g in pr["spec"]["groups"] for rule in g["rules"]]
    text = json.dumps(rules)
    assert "(1 - 0.995)" in text and "(1 - 0.999)" not in text, "objective 0.995 substituted"
    assert all(rule["annotations"]["runbook_url"].startswith("https://runbooks.example.com/agentwire.md#") for rule in rules)
    assert "AgentwirePendingEventsOld" not in text, "disabledAlerts"
    assert all(rule["labels"]["team"] == "chat" for rule in rules)
    assert 'job=\\"agentwire-prod\\"' in text, "jobName substituted"
    hr = docs[("HTTPRoute", "agentwire")]
    assert hr["apiVersion"] == "gateway.networking.k8s.io/v1" and hr["spec"]["parentRefs"][0]["name"] == "public"
    rule = hr["spec"]["rules"][0]
    assert rule["backendRefs"][0] == {"name": "agentwire", "port": svc["spec"]["ports"][0]["port"]}
    assert rule["timeouts"]["request"] == "0s", "no request timeout for WebSockets"
    ing = docs[("Ingress", "agentwire")]
    assert int(ing["metadata"]["annotations"]["nginx.ingress.kubernetes.io/proxy-read-timeout"]) >= 3600
    hpa = docs[("HorizontalPodAutoscaler", "agentwire")]
    kinds = sorted(m["type"] for m in hpa["spec"]["metrics"])
    assert kinds == ["Pods", "Resource"], kinds
    assert ("PodDisruptionBudget", "agentwire") in docs
    np = docs[("NetworkPolicy", "agentwire")]
    assert all(TEST_POD in rule["from"] for rule in np["spec"]["ingress"]), "the helm test pod reaches both doors"
    assert docs[("Pod", "agentwire-probe")]["metadata"]["labels"]["app.kubernetes.io/component"] == "test"
    dcm = docs[("ConfigMap", "agentwire-dashboards")]
    assert dcm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dcm["data"]["agentwire.json"] == d.DASHBOARD.read_text(), "the ConfigMap carries the dashboard file byte for byte"


def test_promtool_check_rendered_rules(rendered, work):
    """promtool check rules on the rules as the PrometheusRule renders them (objective 0.995)."""
    pr = rendered["all-enabled-values"].require().by[("PrometheusRule", "agentwire")]
    path = work / "rendered-rules.yaml"
    path.write_text(yaml.safe_dump({"groups": pr["spec"]["groups"]}))
    proc = d.run(["promtool", "check", "rules", path])
    assert proc.returncode == 0, d.output(proc)


def test_prometheusrule_with_defaults_is_the_rules_file(helm):
    """PrometheusRule with default values = rules/alerts.yaml (one source)."""
    proc = helm("--set", "prometheusRule.enabled=true", "--show-only", "templates/prometheusrule.yaml")
    assert proc.returncode == 0, d.output(proc)
    pr = yaml.safe_load(proc.stdout)
    src = yaml.safe_load(d.RULES.read_text())
    assert pr["spec"]["groups"] == src["groups"], "rendered rules differ from the source file"


@pytest.mark.parametrize("values", d.CI_VALUES)
def test_gateway_loads_rendered_agentwire_toml(rendered, gateway_cmd, work, values):
    """The rendered agentwire.toml is the gateway's to judge: it must load (unknown keys exit 64)."""
    path = work / ("%s.toml" % values)
    path.write_text(rendered[values].toml())
    proc = gateway_cmd("config", "--config", path)
    assert proc.returncode == 0, d.output(proc)


def _flat(table, prefix=""):
    out = {}
    for k, v in table.items():
        if isinstance(v, dict):
            out.update(_flat(v, prefix + k + "."))
        else:
            out[prefix + k] = v
    return out


def test_chart_config_defaults_are_gateway_defaults(rendered, gateway_cmd):
    """With the chart's defaults, agentwire.toml says what the gateway's own defaults say, but for the keys
    the chart sets on purpose (internal_listen on the pod's address rather than loopback, auth.insecure
    required); every gateway key is rendered (but broker.*: from the Secret), auth.* included."""
    proc = gateway_cmd("config")
    assert proc.returncode == 0, d.output(proc)
    builtin = _flat(tomllib.loads(proc.stdout))
    chart = _flat(tomllib.loads(rendered["default-values"].toml()))
    on_purpose = {"listen", "internal_listen", "log_format", "auth.insecure",
                  "shutdown.drain_delay", "shutdown.close_window", "shutdown.timeout"}
    errors = []
    for k in sorted(set(builtin) - set(chart)):
        if not k.startswith("broker."):
            errors.append("gateway key not rendered by the chart: " + k)
    for k in sorted(set(chart) - set(builtin)):
        errors.append("chart renders a key the gateway does not print: " + k)
    for k in sorted(set(builtin) & set(chart) - on_purpose):
        if builtin[k] != chart[k]:
            errors.append("%s: chart default %r, gateway default %r" % (k, chart[k], builtin[k]))
    assert chart["internal_listen"] == "0.0.0.0:8001" and chart["auth.insecure"] is True, chart
    assert not errors, "\n".join(errors)
