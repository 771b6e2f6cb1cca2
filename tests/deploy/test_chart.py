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
        assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert c["startupProbe"]["httpGet"]["path"] == "/healthz"
        assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
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
        assert conf["log_format"] == "json" and conf["listen"].endswith(":%d" % c["ports"][0]["containerPort"])
        svc = r.by[("Service", "agentwire")]
        assert svc["spec"]["ports"][0]["appProtocol"], "appProtocol"
        probe = r.by[("Pod", "agentwire-probe")]
        assert probe["metadata"]["annotations"]["helm.sh/hook"] == "test"
        pc = probe["spec"]["containers"][0]
        assert pc["args"] == ["probe", "--url", "http://agentwire:%d" % svc["spec"]["ports"][0]["port"]], pc["args"]
        assert pc["securityContext"]["readOnlyRootFilesystem"] is True


def _env(r):
    c = r.by[("Deployment", "agentwire")]["spec"]["template"]["spec"]["containers"][0]
    return {e["name"]: e for e in c.get("env", [])}


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
    svc = docs[("Service", "agentwire")]
    sel = svc["metadata"]["labels"]
    sm = docs[("ServiceMonitor", "agentwire")]
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert all(sel.get(k) == v for k, v in sm["spec"]["selector"]["matchLabels"].items()), "ServiceMonitor selects the Service"
    ep = sm["spec"]["endpoints"][0]
    assert ep["port"] in [p["name"] for p in svc["spec"]["ports"]] and ep["path"] == "/metrics"
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
    peers = np["spec"]["ingress"][0]["from"]
    assert {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "agentwire",
                                            "app.kubernetes.io/component": "test"}}} in peers
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
    the chart sets on purpose; every gateway key is rendered (but broker.*: from the Secret)."""
    proc = gateway_cmd("config")
    assert proc.returncode == 0, d.output(proc)
    builtin = _flat(tomllib.loads(proc.stdout))
    chart = _flat(tomllib.loads(rendered["default-values"].toml()))
    on_purpose = {"listen", "log_format", "shutdown.drain_delay", "shutdown.close_window", "shutdown.timeout"}
    errors = []
    for k in sorted(set(builtin) - set(chart)):
        if not k.startswith("broker."):
            errors.append("gateway key not rendered by the chart: " + k)
    for k in sorted(set(chart) - set(builtin)):
        errors.append("chart renders a key the gateway does not print: " + k)
    for k in sorted(set(builtin) & set(chart) - on_purpose):
        if builtin[k] != chart[k]:
            errors.append("%s: chart default %r, gateway default %r" % (k, chart[k], builtin[k]))
    assert not errors, "\n".join(errors)
