"""Helpers shared by the deployment checks: paths, processes, HTTP, and the Prometheus text format."""

import base64
import json
import os
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "agentwire"
RULES = CHART / "rules" / "alerts.yaml"
RULE_TESTS = CHART / "rules" / "alerts.test.yaml"
DASHBOARD = ROOT / "dashboards" / "agentwire.json"
CHART_DASHBOARD = CHART / "dashboards" / "agentwire.json"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
CI_VALUES = sorted(p.stem for p in (CHART / "ci").glob("*.yaml"))
K8S_VERSION = "1.30.0"  # kubernetes-validate ships the schemas offline; 1.30 is the chart's kubeVersion floor

# What users put in the Secret auth.existingSecret, made up for the checks: an HMAC secret, an Ed25519
# public key (PEM), and the key lists as JSON lists of keys (two producer keys, as during a rotation).
JWT_SECRET = "check-deploy-hmac-secret-0123456789abcdef"
JWT_PUBLIC_KEY = """-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEAxZEJDMqaX5I1hBT9CQsDccKbp5WktxPWTqyu6MRBktQ=
-----END PUBLIC KEY-----
"""
PRODUCER_KEYS = ["producer-key-check-deploy-old", "producer-key-check-deploy-new"]
OPERATOR_KEYS = ["operator-key-check-deploy-0001"]


def run(args, timeout=120, **kw):
    """Runs a command, never raising on its exit status; returns the CompletedProcess (text mode)."""
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kw)


def output(proc):
    """A command's output for an assertion message: the last 40 lines of stdout and stderr."""
    lines = (proc.stdout + proc.stderr).rstrip().split("\n")
    return "\n".join(lines[-40:])


def gateway_env(**config):
    """The environment for a gateway process: the caller's, without any AGENTWIRE_* (the gateway reads
    them all as configuration) or RUST_LOG, plus the given AGENTWIRE_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTWIRE_") and k != "RUST_LOG"}
    env.update(config)
    return env


def pod_env(container, secrets):
    """The environment Kubernetes would give `container`: its `value`s, and each `secretKeyRef` looked up in
    `secrets` ({secret name: {key: text}}). A missing optional key leaves its variable out; a missing
    required one raises KeyError (the pod would not start: CreateContainerConfigError)."""
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = e["value"]
            continue
        ref = e["valueFrom"]["secretKeyRef"]
        text = secrets.get(ref["name"], {}).get(ref["key"])
        if text is None:
            if ref.get("optional"):
                continue
            raise KeyError("%s: no key %r in Secret %r" % (e["name"], ref["key"], ref["name"]))
        env[e["name"]] = text
    return env


def secrets_of(rendered, test_secrets):
    """test_secrets plus the Secrets the chart itself rendered (decoded)."""
    out = dict(test_secrets)
    for (kind, name), doc in rendered.by.items():
        if kind == "Secret":
            out[name] = {k: base64.b64decode(v).decode() for k, v in doc.get("data", {}).items()}
    return out


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http_ok(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return 200 <= r.status < 300
    except (urllib.error.URLError, OSError):
        return False


def wait_http(url, seconds):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if http_ok(url):
            return True
        time.sleep(0.1)
    return False


def get_text(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def get_json(url):
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return json.load(r)
    except urllib.error.HTTPError as e:  # Prometheus answers 400/422 with a JSON error body
        return json.load(e)


def prom_query(prom, expr, at=None):
    """The whole answer of Prometheus' instant query API."""
    params = {"query": expr}
    if at is not None:
        params["time"] = at
    return get_json(prom + "/api/v1/query?" + urllib.parse.urlencode(params))


def prom_value(prom, expr):
    """The value of a query with at most one series, or None when it has none."""
    result = prom_query(prom, expr)["data"]["result"]
    return float(result[0]["value"][1]) if result else None


# ------------------------------------------------------------------------------ Prometheus text format

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)(?: (-?\d+))?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(,|$)')


def _labels(text):
    labels, pos = {}, 0
    while pos < len(text):
        m = _LABEL.match(text, pos)
        if not m:
            raise ValueError("bad label set {%s}" % text)
        value = re.sub(r"\\(.)", lambda e: {"n": "\n"}.get(e.group(1), e.group(1)), m.group(2))
        labels[m.group(1)] = value
        pos = m.end()
    return labels


class Exposition:
    """A parsed /metrics answer: every sample as (name, labels) -> value, where labels is a frozenset of
    (label, value) pairs, and the declared types. Every line must parse: a malformed line raises."""

    def __init__(self, text):
        self.text = text
        self.samples = {}
        self.types = {}
        for n, line in enumerate(text.split("\n"), 1):
            if not line:
                continue
            if line.startswith("#"):
                m = re.match(r"^# TYPE (\S+) (\S+)$", line)
                if m:
                    self.types[m.group(1)] = m.group(2)
                continue
            m = _SAMPLE.match(line)
            if not m:
                raise ValueError("line %d is not a sample: %r" % (n, line))
            key = (m.group(1), frozenset(_labels(m.group(2) or "").items()))
            if key in self.samples:
                raise ValueError("line %d: sample %r appears twice" % (n, line))
            self.samples[key] = float(m.group(3))

    def value(self, name, **labels):
        """The sample with exactly this name and exactly these labels, or None when there is none."""
        return self.samples.get((name, frozenset(labels.items())))

    def names(self):
        """Every series name a query may use: the samples' names, histograms' _bucket/_sum/_count too."""
        names = {name for name, _ in self.samples}
        for name, kind in self.types.items():
            names.add(name)
            if kind == "histogram":
                names.update(name + s for s in ("_bucket", "_sum", "_count"))
        return names
