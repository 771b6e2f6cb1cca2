"""Fixtures of the deployment checks: the gateway binary, the chart rendered once per ci values file, and
a live gateway scraped by a real Prometheus, driven once by a WebSocket client and a producer.

Every fixture is built on first use, so any single check runs alone
(`python3 -m pytest tests/deploy -k dashboard`); everything started is stopped at the end of the session.
"""

import json
import os
import shutil
import subprocess
import time

import pytest
import yaml

import deploylib as d


# ------------------------------------------------------------------------------------------ processes

class Process:
    """A background process with its output in a log file."""

    def __init__(self, name, args, log, **kw):
        self.name, self.log = name, log
        self.out = open(log, "w")
        self.proc = subprocess.Popen([str(a) for a in args], stdout=self.out, stderr=subprocess.STDOUT, **kw)

    def tail(self, n=20):
        self.out.flush()
        lines = open(self.log).read().rstrip().split("\n")
        return "\n".join("%s: %s" % (self.name, line) for line in lines[-n:])

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("check-deploy")


@pytest.fixture(scope="session")
def gateway_bin(work):
    """A private copy of the gateway (CHECK_DEPLOY_BIN, or target/debug/agentwire): a concurrent cargo
    build may replace the original while the checks run."""
    src = os.environ.get("CHECK_DEPLOY_BIN") or str(d.ROOT / "target" / "debug" / "agentwire")
    if not os.access(src, os.X_OK):
        pytest.fail("no gateway binary at %s (build it, or set CHECK_DEPLOY_BIN)" % src)
    dst = work / "agentwire"
    shutil.copy2(src, dst)
    return dst


@pytest.fixture(scope="session")
def gateway_cwd(work):
    """An empty working directory for gateway commands: no stray agentwire.toml is picked up."""
    path = work / "cwd"
    path.mkdir()
    return path


@pytest.fixture(scope="session")
def gateway_cmd(gateway_bin, gateway_cwd):
    """Runs `agentwire ARGS...` to completion, without the caller's AGENTWIRE_* variables, with the given
    environment variables (`env`) added."""
    def cmd(*args, env=None):
        return d.run([gateway_bin, *args], cwd=gateway_cwd, env=d.gateway_env(**(env or {})))
    return cmd


# ------------------------------------------------------------------------------------------ test Secrets

@pytest.fixture(scope="session")
def test_secrets(gateway_cmd):
    """The Secrets the ci values files and the checks name, as `kubectl create secret generic` would hold
    them ({name: {key: text}}): agentwire-auth with the default key names (the HMAC secret, and a probe
    token minted by `agentwire token` as the chart's README says), chat-gateway-auth with the key names of
    all-enabled-values (a PEM public key), agentwire-redis with ha-redis-values' URL, research-agent with the
    headers of all-enabled-values' AG-UI agent."""
    proc = gateway_cmd("token", "--user", "probe", "--thread", "agentwire-probe-*", "--ttl", "8760h",
                       env={"AGENTWIRE_AUTH__JWT_SECRET": d.JWT_SECRET})
    if proc.returncode != 0:
        pytest.fail("agentwire token failed:\n" + d.output(proc))
    keys = {"producer": json.dumps(d.PRODUCER_KEYS), "operator": json.dumps(d.OPERATOR_KEYS)}
    return {
        "agentwire-auth": {"jwt-secret": d.JWT_SECRET, "producer-keys": keys["producer"],
                           "operator-keys": keys["operator"], "probe-producer-key": d.PRODUCER_KEYS[1],
                           "probe-operator-key": d.OPERATOR_KEYS[0], "probe-token": proc.stdout.strip()},
        "chat-gateway-auth": {"jwt.pem": d.JWT_PUBLIC_KEY, "producers.json": keys["producer"],
                              "operators.json": keys["operator"], "probe.producer": d.PRODUCER_KEYS[0],
                              "probe.operator": d.OPERATOR_KEYS[0]},
        "agentwire-redis": {"url": "redis://redis-master.redis.svc:6379/0"},
        "research-agent": {"headers": '{x-api-key="research-agent-key-1"}'},
    }


# ------------------------------------------------------------------------------------------ the chart

class Rendered:
    """`helm template` of the chart with one ci values file."""

    def __init__(self, name, proc):
        self.name, self.proc = name, proc
        self.ok = proc.returncode == 0
        self.text = proc.stdout
        self.docs = [doc for doc in yaml.safe_load_all(proc.stdout) if doc] if self.ok else []
        self.by = {(doc["kind"], doc["metadata"]["name"]): doc for doc in self.docs}

    def require(self):
        if not self.ok:
            pytest.fail("helm template (%s) failed:\n%s" % (self.name, d.output(self.proc)))
        return self

    def toml(self):
        """The agentwire.toml the chart's ConfigMap carries."""
        return self.require().by[("ConfigMap", "agentwire")]["data"]["agentwire.toml"]


@pytest.fixture(scope="session")
def rendered():
    """Every ci values file rendered once: name -> Rendered."""
    out = {}
    for name in d.CI_VALUES:
        proc = d.run(["helm", "template", "agentwire", d.CHART, "-f", d.CHART / "ci" / (name + ".yaml"),
                      "--namespace", "chat"])
        out[name] = Rendered(name, proc)
    return out


@pytest.fixture(scope="session")
def helm():
    """`helm template` of the chart with --set overrides (release agentwire, the chart's defaults plus
    auth.insecure=true, without which the chart renders nothing; insecure=False leaves it out)."""
    def template(*args, insecure=True):
        base = ["--set", "auth.insecure=true"] if insecure else []
        return d.run(["helm", "template", "agentwire", d.CHART, *base, *args])
    return template


@pytest.fixture(scope="session")
def secret_rendered():
    """The chart's defaults with auth.existingSecret=agentwire-auth (and no auth.insecure): what a production
    install with browser authentication renders."""
    proc = d.run(["helm", "template", "agentwire", d.CHART, "--set", "auth.existingSecret=agentwire-auth",
                  "--namespace", "chat"])
    return Rendered("auth.existingSecret=agentwire-auth", proc)


# ------------------------------------------------------------------------------------------ live

def start_gateway(name, gateway_bin, gateway_cwd, log, args, seconds, **config):
    """A gateway with both doors on free loopback ports: .url is the public door (/ws, /healthz), .api
    the internal door (/v1/*, /metrics, /readyz, /healthz); .ready when both answered /healthz."""
    public, internal = d.free_port(), d.free_port()
    env = d.gateway_env(AGENTWIRE_LISTEN="127.0.0.1:%d" % public,
                        AGENTWIRE_INTERNAL_LISTEN="127.0.0.1:%d" % internal, **config)
    proc = Process(name, [gateway_bin, *args], log, env=env, cwd=gateway_cwd)
    proc.url = "http://127.0.0.1:%d" % public
    proc.api = "http://127.0.0.1:%d" % internal
    proc.ready = d.wait_http(proc.api + "/healthz", seconds) and d.wait_http(proc.url + "/healthz", 5)
    return proc


@pytest.fixture(scope="session")
def gateway(gateway_bin, gateway_cwd, work):
    """A gateway made to show every kind of outcome quickly: grace 1s (the unresolved event is
    dead-lettered quickly), history 2 (the third event on a thread nobody watches leaves history unseen),
    idle timeout 2s (one run stalls). Yields the process, with .url (public door) and .api (internal)."""
    proc = start_gateway("gateway", gateway_bin, gateway_cwd, work / "gateway.log", ["--config", "/dev/null"], 20,
                         AGENTWIRE_RESOLVE__GRACE="1s", AGENTWIRE_HISTORY__MAX_EVENTS="2",
                         AGENTWIRE_WATCHDOG__RUN_IDLE_TIMEOUT="2s", AGENTWIRE_LOG_LEVEL="warn")
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def prometheus(gateway, work):
    """A real Prometheus scraping the gateway's internal door (/metrics) every second, with the chart's alert
    rules loaded."""
    port = d.free_port()
    (work / "tsdb").mkdir()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(d.RULES)],
        "scrape_configs": [{"job_name": "agentwire",
                            "static_configs": [{"targets": [gateway.api.removeprefix("http://")]}]}],
    }
    (work / "prometheus.yml").write_text(yaml.safe_dump(config))
    proc = Process("prometheus", ["prometheus", "--config.file=%s" % (work / "prometheus.yml"),
                                  "--web.listen-address=127.0.0.1:%d" % port,
                                  "--storage.tsdb.path=%s" % (work / "tsdb")], work / "prometheus.log")
    proc.url = "http://127.0.0.1:%d" % port
    proc.ready = d.wait_http(proc.url + "/-/ready", 30)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def live(gateway, prometheus):
    """Both processes up, or the check fails with their logs. Returns the gateway's public and internal
    base URLs and Prometheus' URL."""
    if not (gateway.ready and prometheus.ready):
        pytest.fail("gateway ready: %s, prometheus ready: %s\n%s\n%s"
                    % (gateway.ready, prometheus.ready, gateway.tail(), prometheus.tail()))
    return gateway.url, gateway.api, prometheus.url


@pytest.fixture(scope="session")
def baseline(live):
    """Counters must be scraped at 0 before the traffic, or increase() and rate() have nothing to compare
    with: waits (at most 30 s) for Prometheus to hold a sample of agentwire_events_emitted_total == 0."""
    _, _, prom = live
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if prom_has(prom, "agentwire_events_emitted_total == 0"):
            return True
        time.sleep(0.1)
    return False


def prom_has(prom, expr):
    return bool(d.prom_query(prom, expr)["data"]["result"])


@pytest.fixture(scope="session")
def driven(live, baseline, gateway):
    """Drives runs over HTTP and WebSocket (see drive.py) once; returns what the gateway must count."""
    if not baseline:
        pytest.fail("no sample of agentwire_events_emitted_total == 0 in Prometheus before the traffic")
    import drive  # needs websockets, which only the live checks use

    public, internal, _ = live
    try:
        return drive.run(public, internal)
    except Exception as e:  # noqa: BLE001: the failure is the check's message
        pytest.fail("driving the gateway failed: %r\n%s" % (e, gateway.tail()))


@pytest.fixture(scope="session")
def final_metrics(live, driven, work):
    """The gateway's /metrics (internal door) once the unresolved event is dead-lettered, the stalled run
    counted (resolve.grace is 1 s: at most 10 s) and the ledger series show the test's traffic (they come
    from a snapshot at most ledger.snapshot_interval old), parsed."""
    _, internal, _ = live
    deadline = time.monotonic() + 10
    while True:
        text = d.get_text(internal + "/metrics")
        m = d.Exposition(text)
        if (m.value("agentwire_events_lost_total", reason="unresolved") or 0) >= 1 and \
                (m.value("agentwire_runs_stalled_total") or 0) >= 1 and \
                m.value("agentwire_events_emitted_total") == driven["emitted"] and \
                m.value("agentwire_events_lost_total", reason="expired_unseen") == driven["expired_unseen"]:
            break
        if time.monotonic() > deadline:
            break
        time.sleep(0.1)
    (work / "metrics.txt").write_text(text)
    return m


@pytest.fixture(scope="session")
def prom_final(live, driven, final_metrics):
    """Waits (at most 15 s) until Prometheus holds the final values; returns whether it did."""
    _, _, prom = live
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if (d.prom_value(prom, "agentwire_events_delivered_total") == driven["delivered"]
                and d.prom_value(prom, 'agentwire_events_lost_total{reason="unresolved"}') == 1
                and d.prom_value(prom, "agentwire_events_pending") == driven["pending"]):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="session")
def exported(final_metrics):
    """The names the gateway exports, from the live scrape (histograms add _bucket, _sum, _count), and
    `up`, which Prometheus adds."""
    return final_metrics.names() | {"up"}


@pytest.fixture(scope="session")
def probe_gateway(gateway_bin, gateway_cwd, rendered, work):
    """A gateway on the chart's default agentwire.toml (the live one keeps 2 events of history, which a
    five-event probe run posted at once rightly overflows), its two doors moved to free loopback ports.
    Yields the process, with .url (public door) and .api (internal)."""
    toml = work / "default-values.toml"
    toml.write_text(rendered["default-values"].toml())
    proc = start_gateway("gateway2", gateway_bin, gateway_cwd, work / "gateway2.log", ["--config", toml], 10)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def secret_gateway(gateway_bin, gateway_cwd, secret_rendered, test_secrets, work):
    """A gateway on the agentwire.toml and the environment the chart renders with auth.existingSecret (the
    Deployment's secretKeyRefs resolved against the test Secret agentwire-auth: the HMAC secret and both
    key lists), its two doors moved to free loopback ports. Yields the process, with .url and .api."""
    r = secret_rendered.require()
    toml = work / "existing-secret.toml"
    toml.write_text(r.toml())
    container = r.by[("Deployment", "agentwire")]["spec"]["template"]["spec"]["containers"][0]
    env = d.pod_env(container, d.secrets_of(r, test_secrets))
    proc = start_gateway("gateway3", gateway_bin, gateway_cwd, work / "gateway3.log", ["--config", toml], 10, **env)
    yield proc
    proc.stop()


@pytest.fixture(scope="session")
def dashboard():
    return json.loads(d.DASHBOARD.read_text())


@pytest.fixture(scope="session")
def rules():
    return [r for g in yaml.safe_load(d.RULES.read_text())["groups"] for r in g["rules"]]
