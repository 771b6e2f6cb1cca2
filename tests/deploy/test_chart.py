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


def test_refuses_to_render_without_existing_secret_or_insecure(helm):
    """Without auth.existingSecret (the JWT key and both key lists) or an explicit auth.insecure=true the
    chart renders nothing: the gateway would refuse to start on the pod's address without keys, and let
    only loopback peers open /ws without a JWT key. The message names both ways out and what the Secret
    holds; the old "not available" wording is gone. jwtKeyType=none needs auth.jwksUrl or insecure, and a JWKS with a Secret key is two sources of keys."""
    for args in ((), ("--set", "auth.insecure=false"), ("--set", "auth.existingSecret=")):
        proc = helm(*args, insecure=False)
        assert proc.returncode != 0, "rendered with %s" % (args,)
        out = proc.stdout + proc.stderr
        for want in ("auth.existingSecret", "auth.insecure: true", "JWT key", "both key lists",
                     "producer-keys, operator-keys", "jwt-secret, or jwt-public-key",
                     "behind an authenticating proxy or on a trusted network", "auth.allowedOrigins"):
            assert want in out, "%r not in:\n%s" % (want, d.output(proc))
        assert "not available" not in out, d.output(proc)
    proc = helm("--set-string", "auth.insecure=true", insecure=False)
    assert proc.returncode != 0, "the string \"true\" is not true"
    proc = helm("--set", "auth.existingSecret=agentwire-auth,auth.jwtKeyType=none", insecure=False)
    assert proc.returncode != 0, "rendered jwtKeyType=none without insecure"
    assert "auth.jwtKeyType=none needs auth.jwksUrl or auth.insecure: true" in proc.stdout + proc.stderr, d.output(proc)
    proc = helm("--set", "auth.existingSecret=agentwire-auth,auth.jwtKeyType=secret,auth.jwksUrl=https://idp.example/jwks",
                insecure=False)
    assert proc.returncode != 0, "rendered two sources of keys"
    for ok in (("--set", "auth.existingSecret=agentwire-auth"),
               ("--set", "auth.existingSecret=agentwire-auth,auth.jwtKeyType=none,auth.insecure=true"),
               ("--set", "auth.existingSecret=agentwire-auth,auth.jwtKeyType=none,auth.jwksUrl=https://idp.example/jwks"),
               ("--set", "auth.insecure=true")):
        proc = helm(*ok, insecure=False)
        assert proc.returncode == 0, "%s: %s" % (ok, d.output(proc))
    for bad in ("auth.jwtKeyType=hmac", "auth.existingSecret=Not_A_Name", "auth.jwtLeeway=soon",
                "auth.existingSecretKeys.producerKeys=a/b"):
        proc = helm("--set", bad)
        assert proc.returncode != 0, "rendered %s" % bad


def test_auth_rendered_from_values(helm, gateway_cmd, work):
    """[auth] of agentwire.toml: insecure, jwt_issuer, jwt_audience (only when set), jwt_leeway, the
    subscribe webhook's timeout and cache and allowed_origins from auth.*, loaded by the gateway as given; an origin with a path or a trailing slash
    (which never matches an Origin header) is refused."""
    origins = ["https://app.example.com", "https://*.agents.example.com", "http://localhost:3000"]
    proc = helm("--set-json", "auth.allowedOrigins=%s" % json.dumps(origins), "--show-only", "templates/configmap.yaml")
    assert proc.returncode == 0, d.output(proc)
    text = yaml.safe_load(proc.stdout)["data"]["agentwire.toml"]
    subscribe = {"subscribe_webhook_timeout": "2s", "subscribe_cache_ttl": "1m", "jwks_refresh": "5m"}
    want = dict({"insecure": True, "jwt_leeway": "30s", "allowed_origins": origins}, **subscribe)
    assert tomllib.loads(text)["auth"] == want
    path = work / "auth.toml"
    path.write_text(text)
    proc = gateway_cmd("config", "--config", path)
    assert proc.returncode == 0, d.output(proc)
    shown = tomllib.loads(proc.stdout)["auth"]
    assert shown == dict(want, producer_keys=[], operator_keys=[]), proc.stdout
    proc = helm("--set", "auth.jwtIssuer=https://auth.example.com/,auth.jwtAudience=agentwire,auth.jwtLeeway=1m 30s",
                "--show-only", "templates/configmap.yaml")
    assert proc.returncode == 0, d.output(proc)
    text = yaml.safe_load(proc.stdout)["data"]["agentwire.toml"]
    want = dict({"insecure": True, "jwt_issuer": "https://auth.example.com/", "jwt_audience": "agentwire",
                 "jwt_leeway": "1m 30s", "allowed_origins": []}, **subscribe)
    assert tomllib.loads(text)["auth"] == want, text
    path.write_text(text)
    proc = gateway_cmd("config", "--config", path)
    assert proc.returncode == 0, d.output(proc)
    shown = tomllib.loads(proc.stdout)["auth"]
    assert (shown["jwt_issuer"], shown["jwt_audience"], shown["jwt_leeway"]) == (
        "https://auth.example.com/", "agentwire", "1m 30s"), proc.stdout
    for bad in ("https://app.example.com/", "app.example.com", "https://app.example.com/chat"):
        proc = helm("--set-json", "auth.allowedOrigins=%s" % json.dumps([bad]))
        assert proc.returncode != 0, "rendered allowedOrigins %r" % bad


# The secrets of [auth]: what the ConfigMap must never hold.
SECRET_AUTH_KEYS = {"jwt_secret", "jwt_public_key", "producer_keys", "operator_keys"}
JWT_ENV = {"secret": "AGENTWIRE_AUTH__JWT_SECRET", "publicKey": "AGENTWIRE_AUTH__JWT_PUBLIC_KEY"}


def _auth_values(values):
    """auth.* as the chart sees it for a ci values file: values.yaml's defaults under the file's."""
    default = yaml.safe_load((d.CHART / "values.yaml").read_text())["auth"]
    given = (yaml.safe_load((d.CHART / "ci" / (values + ".yaml")).read_text()) or {}).get("auth", {})
    return default | given | {"existingSecretKeys": default["existingSecretKeys"] | given.get("existingSecretKeys", {})}


def _secret_refs(container):
    """{variable: secretKeyRef} of a container's env; a secret variable given as a plain value fails."""
    refs = {}
    for e in container.get("env", []):
        if e["name"].startswith(("AGENTWIRE_AUTH__", "AGENTWIRE_PROBE_")):
            assert "value" not in e, "%s given as a plain value" % e["name"]
            refs[e["name"]] = e["valueFrom"]["secretKeyRef"]
    return refs


def _check_existing_secret(r, auth):
    """The Deployment takes the JWT key of auth.jwtKeyType and both key lists from auth.existingSecret
    (required keys), the helm test pod its keys and token (optional keys); the ConfigMap holds no secret
    and the chart makes no Secret of them. Returns the errors."""
    errors = []
    name, keys = auth["existingSecret"], auth["existingSecretKeys"]
    want = {"AGENTWIRE_AUTH__PRODUCER_KEYS": {"name": name, "key": keys["producerKeys"]},
            "AGENTWIRE_AUTH__OPERATOR_KEYS": {"name": name, "key": keys["operatorKeys"]}}
    if auth["jwtKeyType"] != "none":
        key = keys["jwtSecret"] if auth["jwtKeyType"] == "secret" else keys["jwtPublicKey"]
        want[JWT_ENV[auth["jwtKeyType"]]] = {"name": name, "key": key}
    got = _secret_refs(_container(r))
    if got != want:
        errors.append("Deployment env: %s, want %s" % (got, want))
    probe = r.by[("Pod", "agentwire-probe")]["spec"]["containers"][0]
    want = {"AGENTWIRE_PROBE_PRODUCER_KEY": {"name": name, "key": keys["probeProducerKey"], "optional": True},
            "AGENTWIRE_PROBE_OPERATOR_KEY": {"name": name, "key": keys["probeOperatorKey"], "optional": True},
            "AGENTWIRE_PROBE_TOKEN": {"name": name, "key": keys["probeToken"], "optional": True}}
    got = _secret_refs(probe)
    if got != want:
        errors.append("helm test pod env: %s, want %s" % (got, want))
    conf = tomllib.loads(r.toml())["auth"]
    if SECRET_AUTH_KEYS & set(conf):
        errors.append("the ConfigMap holds %s" % sorted(SECRET_AUTH_KEYS & set(conf)))
    cm = json.dumps(r.by[("ConfigMap", "agentwire")])
    for needle in ("BEGIN PUBLIC KEY", "producer-key-", "operator-key-"):
        if needle in cm:
            errors.append("the ConfigMap contains %r" % needle)
    if any(kind == "Secret" and doc_name == name for kind, doc_name in r.by):
        errors.append("the chart renders the Secret %s the user creates" % name)
    return errors


def test_auth_secrets_come_from_the_existing_secret(rendered, secret_rendered):
    """With auth.existingSecret the Deployment's env takes the JWT key and both key lists from that Secret
    (secretKeyRef, under the configured key names), the helm test pod its producer key, operator key and
    token (optional), and the ConfigMap holds no secret: the chart's defaults with the Secret, and every ci
    values file that names one (at least one does; at least one stays on auth.insecure)."""
    errors = ["defaults: " + e for e in _check_existing_secret(secret_rendered.require(), _auth_values("default-values")
                                                               | {"existingSecret": "agentwire-auth", "insecure": False})]
    with_secret = [v for v in d.CI_VALUES if _auth_values(v)["existingSecret"]]
    insecure = [v for v in d.CI_VALUES if _auth_values(v)["insecure"] is True]
    assert with_secret and insecure, "ci values: existingSecret in %s, insecure in %s" % (with_secret, insecure)
    for values in with_secret:
        errors += ["%s: %s" % (values, e) for e in _check_existing_secret(rendered[values].require(), _auth_values(values))]
    for values in sorted(set(d.CI_VALUES) - set(with_secret)):
        r = rendered[values].require()
        refs = {**_secret_refs(_container(r)), **_secret_refs(r.by[("Pod", "agentwire-probe")]["spec"]["containers"][0])}
        if refs:
            errors.append("%s: no auth.existingSecret, yet %s" % (values, refs))
    assert not errors, "\n".join(errors)


def test_same_port_for_both_doors_refused(helm):
    proc = helm("--set", "internalPort=8000")
    assert proc.returncode != 0, "rendered"
    assert "need a port each" in proc.stdout + proc.stderr, d.output(proc)


PUBLIC_ROUTES = [("/ws", "Exact"), ("/v1/threads", "Prefix"), ("/agui", "Prefix")]


def _routes_only_the_public_door(ing, hr):
    errors = []
    for rule in ing["spec"]["rules"]:
        routed = [(p["path"], p["pathType"]) for p in rule["http"]["paths"]]
        if routed != PUBLIC_ROUTES:
            errors.append("Ingress routes %s" % routed)
        for p in rule["http"]["paths"]:
            if p["backend"] != {"service": {"name": "agentwire", "port": {"name": "http"}}}:
                errors.append("Ingress backend %s" % p["backend"])
    for rule in hr["spec"]["rules"]:
        matches = [(m["path"]["value"], m["path"]["type"].replace("PathPrefix", "Prefix")) for m in rule["matches"]]
        if matches != PUBLIC_ROUTES:
            errors.append("HTTPRoute matches %s" % rule["matches"])
        if [b["name"] for b in rule["backendRefs"]] != ["agentwire"]:
            errors.append("HTTPRoute backends %s" % rule["backendRefs"])
    return errors


def test_ingress_and_httproute_route_only_the_public_door(rendered, helm):
    """The Ingress and the HTTPRoute route /ws exactly, the event streams and the AG-UI proxy to the public
    Service and nothing else; the internal Service is routed by nothing (with the chart's defaults and with
    every part on)."""
    proc = helm("--set", "ingress.enabled=true,httpRoute.enabled=true",
                "--set-json", 'httpRoute.parentRefs=[{"name":"public"}]',
                "--show-only", "templates/ingress.yaml", "--show-only", "templates/httproute.yaml")
    assert proc.returncode == 0, d.output(proc)
    docs = {doc["kind"]: doc for doc in yaml.safe_load_all(proc.stdout) if doc}
    errors = _routes_only_the_public_door(docs["Ingress"], docs["HTTPRoute"])
    r = rendered["all-enabled-values"].require()
    ing, hr = r.by[("Ingress", "agentwire")], r.by[("HTTPRoute", "agentwire")]
    errors += ["all-enabled: " + e for e in _routes_only_the_public_door(ing, hr)]
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


# The chart's probe pods (the helm test pod, the probe CronJob's), as the NetworkPolicy names them.
PROBE_PODS = {"podSelector": {"matchLabels": {"app.kubernetes.io/instance": "agentwire",
                                              "app.kubernetes.io/name": "agentwire-probe"}}}
# networkPolicy.prometheusFrom's default, added to the internal door with serviceMonitor.enabled.
PROMETHEUS = [{"namespaceSelector": {}, "podSelector": {"matchLabels": {"app.kubernetes.io/name": "prometheus"}}}]


def test_networkpolicy_restricts_the_internal_port(rendered, helm):
    """The public port is open to anywhere (or networkPolicy.publicFrom); the internal port only to
    networkPolicy.internalFrom (default: the pods of the release's namespace), Prometheus with the
    ServiceMonitor on, and the chart's probe pods, never to any source; no rule opens a port it does not
    name."""
    proc = helm("--set", "networkPolicy.enabled=true", "--show-only", "templates/networkpolicy.yaml")
    assert proc.returncode == 0, d.output(proc)
    rules = _policy_rules(yaml.safe_load(proc.stdout))
    assert set(rules) == {"http", "internal"}, rules
    assert rules["http"] is None, "public door: any source by default"
    assert rules["internal"] == [{"podSelector": {}}, PROBE_PODS], rules["internal"]
    proc = helm("--set", "networkPolicy.enabled=true", "--set-json", "networkPolicy.internalFrom=[]",
                "--show-only", "templates/networkpolicy.yaml")
    assert proc.returncode == 0, d.output(proc)
    assert _policy_rules(yaml.safe_load(proc.stdout))["internal"] == [PROBE_PODS], "empty internalFrom: the probe pods only"
    r = rendered["all-enabled-values"].require()
    values = yaml.safe_load((d.CHART / "ci" / "all-enabled-values.yaml").read_text())["networkPolicy"]
    rules = _policy_rules(r.by[("NetworkPolicy", "agentwire")])
    assert rules == {"http": values["publicFrom"] + [PROBE_PODS],
                     "internal": values["internalFrom"] + PROMETHEUS + [PROBE_PODS]}, rules


def _matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _probe_pods(r):
    """{name: labels} of the chart's probe pods as rendered: the helm test pod, the CronJob's pod."""
    pods = {"helm test": r.by[("Pod", "agentwire-probe")]["metadata"]["labels"]}
    cron = r.by.get(("CronJob", "agentwire-probe"))
    if cron:
        pods["probeCronJob"] = cron["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    return pods


def _allows(peers, labels):
    """Whether a rule's `from` lets in a pod of the release's namespace with these labels."""
    if peers is None:
        return True
    for peer in peers:
        if "namespaceSelector" in peer or "ipBlock" in peer:
            continue
        selector = peer.get("podSelector", {})
        if selector == {} or _matches(selector.get("matchLabels"), labels):
            return True
    return False


@pytest.mark.parametrize("values", d.CI_VALUES)
def test_probe_pods_are_not_gateway_pods(rendered, values):
    """The helm test pod and the probe CronJob's pods carry labels of their own: no selector of the gateway's
    pods (Deployment, Services, PDB, the NetworkPolicy's podSelector, topologySpreadConstraints) matches
    them, so a lingering failed test pod blocks no node drain, counts in no spread and is not subject to the
    egress policy; and the NetworkPolicy still lets them reach both doors."""
    r = rendered[values].require()
    dep = r.by[("Deployment", "agentwire")]
    gateway_pod = dep["spec"]["template"]["metadata"]["labels"]
    selectors = {"Deployment": dep["spec"]["selector"]["matchLabels"]}
    for name in ("agentwire", "agentwire-internal"):
        selectors["Service " + name] = r.by[("Service", name)]["spec"]["selector"]
    for n, t in enumerate(dep["spec"]["template"]["spec"]["topologySpreadConstraints"]):
        selectors["topologySpreadConstraints[%d]" % n] = t["labelSelector"]["matchLabels"]
    if ("PodDisruptionBudget", "agentwire") in r.by:
        selectors["PodDisruptionBudget"] = r.by[("PodDisruptionBudget", "agentwire")]["spec"]["selector"]["matchLabels"]
    np = r.by.get(("NetworkPolicy", "agentwire"))
    if np:
        selectors["NetworkPolicy"] = np["spec"]["podSelector"]["matchLabels"]
    probes = _probe_pods(r)
    errors = []
    for what, selector in selectors.items():
        if not _matches(selector, gateway_pod):
            errors.append("%s does not select the gateway's pods: %s" % (what, selector))
        for pod, labels in probes.items():
            if _matches(selector, labels):
                errors.append("%s selects the %s pod: %s" % (what, pod, selector))
    if np:
        rules = _policy_rules(np)
        for pod, labels in probes.items():
            for port in ("http", "internal"):
                if not _allows(rules[port], labels):
                    errors.append("the NetworkPolicy keeps the %s pod from port %s" % (pod, port))
    assert not errors, "\n".join(errors)
    if values == "all-enabled-values":
        assert set(probes) == {"helm test", "probeCronJob"} and np, "all-enabled renders the CronJob and the policy"


def test_egress_opens_the_ports_of_the_urls_the_gateway_calls(rendered, helm):
    """With egress restricted, the ports of config.upstream.webhook_url, auth.subscribeWebhook,
    auth.jwksUrl and the AG-UI agents' URLs are open (the URL's port, else 443 / 80), to networkPolicy.egress.webhookTo when set; none
    without those URLs."""
    def egress(*args):
        proc = helm("--set", "networkPolicy.enabled=true,networkPolicy.egress.enabled=true", *args,
                    "--show-only", "templates/networkpolicy.yaml")
        assert proc.returncode == 0, d.output(proc)
        return yaml.safe_load(proc.stdout)["spec"]["egress"]

    def ports(rules):
        return sorted(p["port"] for rule in rules for p in rule["ports"])
    assert ports(egress()) == [53, 53], "DNS only by default"
    rules = egress("--set", "config.upstream.webhook_url=http://backend.agents:9000/hlink",
                   "--set", "auth.subscribeWebhook=https://app.example.com/allow",
                   "--set", "auth.jwtKeyType=none,auth.jwksUrl=https://idp.example.com:8443/jwks")
    assert ports(rules) == [53, 53, 443, 8443, 9000], rules
    assert all("to" not in rule for rule in rules), "no webhookTo: any destination"
    rules = egress("--set", "config.upstream.webhook_url=http://backend.agents/hlink")
    assert ports(rules) == [53, 53, 80], rules
    rules = egress("--set", "config.agui.agents.research.url=http://langgraph.agents:8123/agent")
    assert ports(rules) == [53, 53, 8123], rules
    r = rendered["all-enabled-values"].require()
    values = yaml.safe_load((d.CHART / "ci" / "all-enabled-values.yaml").read_text())["networkPolicy"]["egress"]
    rules = r.by[("NetworkPolicy", "agentwire")]["spec"]["egress"]
    hooks = [rule for rule in rules if {p["port"] for p in rule["ports"]} == {443, 4000, 8123, 9000}]
    assert len(hooks) == 1 and hooks[0]["to"] == values["webhookTo"], rules


def test_probe_cronjob_off_by_default_and_runs_the_helm_test_probe(rendered):
    """probeCronJob: nothing by default; when on, the helm test pod's container on a schedule, one attempt
    per Job, within a deadline."""
    for name in d.CI_VALUES:
        r = rendered[name].require()
        values = yaml.safe_load((d.CHART / "ci" / (name + ".yaml")).read_text()) or {}
        on = values.get("probeCronJob", {}).get("enabled", False)
        assert (("CronJob", "agentwire-probe") in r.by) == on, name
    r = rendered["all-enabled-values"].require()
    cron = r.by[("CronJob", "agentwire-probe")]
    assert cron["spec"]["schedule"] == "*/2 * * * *" and cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    assert job["backoffLimit"] == 0 and job["activeDeadlineSeconds"] > 0, job
    pod = job["template"]["spec"]
    test_pod = r.by[("Pod", "agentwire-probe")]["spec"]
    assert pod["containers"] == test_pod["containers"], "the same probe as helm test"
    assert pod["restartPolicy"] == "Never" and pod["automountServiceAccountToken"] is False
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in pod["containers"][0]["env"]}
    assert env["AGENTWIRE_PROBE_TOKEN"] == {"name": "chat-gateway-auth", "key": "probe.jwt", "optional": True}, env


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
    assert "AgentwireSlowConsumerCloses" not in text, "disabledAlerts"
    assert all(rule["labels"]["team"] == "chat" for rule in rules)
    assert 'job=\\"agentwire-prod\\",namespace=\\"' in text and 'service=\\"agentwire-internal\\"' in text, \
        "jobName, the release's namespace and internal Service substituted"
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
    assert all(PROBE_PODS in rule["from"] for rule in np["spec"]["ingress"]), "the probe pods reach both doors"
    assert docs[("Pod", "agentwire-probe")]["metadata"]["labels"]["app.kubernetes.io/component"] == "test"
    dcm = docs[("ConfigMap", "agentwire-dashboards")]
    assert dcm["metadata"]["labels"]["grafana_dashboard"] == "1"
    want = d.DASHBOARD.read_text().replace('"value": 0.999', '"value": 0.995')
    assert dcm["data"]["agentwire.json"] == want, \
        "the ConfigMap carries the dashboard file with only the delivery ratio's threshold set to prometheusRule.objective"
    ratio = next(p for p in json.loads(dcm["data"]["agentwire.json"])["panels"] if p["title"] == "Delivery ratio (SLI)")
    steps = ratio["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps] == [None, 0.995], steps


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
def test_gateway_loads_rendered_agentwire_toml(rendered, gateway_cmd, test_secrets, work, values):
    """The rendered agentwire.toml and the Deployment's environment (its Secrets filled in as a user
    would: the test_secrets fixture) are the gateway's to judge: they must load (unknown keys, a short
    secret or missing keys on the pod's address exit 64). With auth.existingSecret, the JWT key and the key
    lists must come from that environment: without it the gateway refuses to start."""
    r = rendered[values].require()
    path = work / ("%s.toml" % values)
    path.write_text(r.toml())
    env = d.pod_env(_container(r), d.secrets_of(r, test_secrets))
    proc = gateway_cmd("config", "--config", path, env=env)
    assert proc.returncode == 0, d.output(proc)
    shown = tomllib.loads(proc.stdout)["auth"]
    auth = _auth_values(values)
    if auth["existingSecret"]:
        assert shown["producer_keys"] == ["***"] * len(d.PRODUCER_KEYS), proc.stdout
        assert shown["operator_keys"] == ["***"] * len(d.OPERATOR_KEYS), proc.stdout
        if auth["jwtKeyType"] == "publicKey":
            assert shown["jwt_public_key"].strip() == d.JWT_PUBLIC_KEY.strip() and "jwt_secret" not in shown
        else:
            assert shown["jwt_secret"] == "***" and "jwt_public_key" not in shown, proc.stdout
        agents = tomllib.loads(proc.stdout).get("agui", {}).get("agents", {})
        for name, agent in agents.items():
            # An agent's headers come from its Secret and are shown hidden.
            assert set(agent.get("headers", {}).values()) <= {"***"}, proc.stdout
        if "research" in agents:
            assert agents["research"]["headers"] == {"x-api-key": "***"}, proc.stdout
            assert "research-agent-key-1" not in r.text, "an agent's headers in the manifests"
        bare = {k: v for k, v in env.items() if not k.startswith("AGENTWIRE_AUTH__")}
        proc = gateway_cmd("config", "--config", path, env=bare)
        assert proc.returncode == 64 and "auth.producer_keys" in proc.stderr, d.output(proc)


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
    the chart sets on purpose (internal_listen on the pod's address rather than loopback, auth.insecure in
    default-values, trusted_proxies on the private ranges where an ingress controller's pods live); every gateway key is rendered, auth.* included, but those that come from a Secret as
    environment variables: broker.* (the Redis URL) and auth.producer_keys / auth.operator_keys
    (auth.existingSecret), which must not be rendered."""
    proc = gateway_cmd("config")
    assert proc.returncode == 0, d.output(proc)
    builtin = _flat(tomllib.loads(proc.stdout))
    chart = _flat(tomllib.loads(rendered["default-values"].toml()))
    on_purpose = {"listen", "internal_listen", "log_format", "auth.insecure", "trusted_proxies",
                  "shutdown.drain_delay", "shutdown.close_window", "shutdown.timeout"}
    errors = []
    from_secret = {"auth.producer_keys", "auth.operator_keys"}
    for k in sorted(set(builtin) - set(chart)):
        if not (k.startswith("broker.") or k in from_secret):
            errors.append("gateway key not rendered by the chart: " + k)
    for k in sorted(from_secret & set(chart)):
        errors.append("a secret rendered into the ConfigMap: " + k)
    for k in sorted(set(chart) - set(builtin)):
        errors.append("chart renders a key the gateway does not print: " + k)
    for k in sorted(set(builtin) & set(chart) - on_purpose):
        if builtin[k] != chart[k]:
            errors.append("%s: chart default %r, gateway default %r" % (k, chart[k], builtin[k]))
    assert chart["internal_listen"] == "0.0.0.0:8001" and chart["auth.insecure"] is True, chart
    assert chart.get("auth.jwt_leeway") == builtin["auth.jwt_leeway"], "auth.jwt_leeway %r, gateway default %r" % (
        chart.get("auth.jwt_leeway"), builtin["auth.jwt_leeway"])
    assert not errors, "\n".join(errors)
