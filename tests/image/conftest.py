"""Fixtures of the image checks: the chart rendered for this machine, the podman flags derived from it, and
the gateway container running the way the chart's Deployment runs it (scripts/check-image built the image
and names it in CHECK_IMAGE).

The run is derived from the rendered chart, not written next to it: the pod's and the container's
securityContext become podman flags (a setting this run cannot reproduce fails the checks), the ConfigMap
is mounted at the Deployment's mountPath, the Deployment's environment and args are passed as they are.
Only the ports differ: the container shares the host's network (the one podman network mode that works
here), so the chart is rendered with free ports as containerPort and internalPort.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "deploy"))
import deploylib as d  # noqa: E402

IMAGE = os.environ.get("CHECK_IMAGE", "localhost/agentwire:check")
# crun fails on this machine's cgroups; runc with cgroupfs works, with explicit limits (the defaults cannot
# be raised here).
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager=cgroupfs"]
LIMITS = ["--network", "host", "--ulimit", "nofile=20000:20000", "--ulimit", "nproc=1024:1024"]
SECRET = "agentwire-auth"


def podman(*args, timeout=120, env=None):
    return d.run([*PODMAN, *args], timeout=timeout, env=env)


def image_user():
    proc = podman("image", "inspect", "--format", "{{.Config.User}}", IMAGE)
    assert proc.returncode == 0, d.output(proc)
    return proc.stdout.strip()


class Unsupported(Exception):
    """A setting of the chart that this run cannot reproduce, or that the image cannot satisfy."""


def security_flags(pod_sc, sc, user):
    """podman flags for a pod securityContext and a container securityContext (the container's wins), on
    an image whose USER is `user`. Raises Unsupported for anything the image or the run cannot honour."""
    merged = {**(pod_sc or {}), **(sc or {})}
    flags = []
    known = {"runAsUser", "runAsGroup", "runAsNonRoot", "seccompProfile", "allowPrivilegeEscalation",
             "readOnlyRootFilesystem", "capabilities", "fsGroup", "privileged"}
    unknown = set(merged) - known
    if unknown:
        raise Unsupported("securityContext keys this run does not reproduce: %s" % sorted(unknown))
    image_uid, _, image_gid = user.partition(":")
    uid = merged.get("runAsUser")
    gid = merged.get("runAsGroup")
    if uid is None:
        # The kubelet runs the image's USER; runAsNonRoot then needs it numeric to verify it.
        if not image_uid.isdigit():
            raise Unsupported("runAsUser unset and the image's USER %r is not numeric" % user)
        uid = int(image_uid)
    if str(uid) != image_uid:
        raise Unsupported("runAsUser %s is not the image's USER %r (its home and files are that user's)" % (uid, user))
    if gid is not None and image_gid and str(gid) != image_gid:
        raise Unsupported("runAsGroup %s is not the image's group %r" % (gid, user))
    if merged.get("runAsNonRoot") and uid == 0:
        raise Unsupported("runAsNonRoot with user 0: the kubelet refuses to start the container")
    if merged.get("privileged"):
        raise Unsupported("privileged: not reproduced")
    flags += ["--user", "%d:%d" % (uid, gid if gid is not None else int(image_gid or uid))]
    seccomp = (merged.get("seccompProfile") or {}).get("type", "RuntimeDefault")
    if seccomp == "Unconfined":
        flags += ["--security-opt", "seccomp=unconfined"]
    elif seccomp != "RuntimeDefault":
        raise Unsupported("seccompProfile %s: not reproduced" % seccomp)
    if merged.get("allowPrivilegeEscalation") is False:
        flags += ["--security-opt", "no-new-privileges"]
    if merged.get("readOnlyRootFilesystem"):
        # podman would mount writable tmpfs on /tmp, /var/tmp and /run; Kubernetes does not.
        flags += ["--read-only", "--read-only-tmpfs=false"]
    caps = merged.get("capabilities") or {}
    for cap in caps.get("drop", []):
        flags += ["--cap-drop", cap]
    for cap in caps.get("add", []):
        flags += ["--cap-add", cap]
    return flags


def volume_flags(pod_spec, container, rendered_by, work):
    """--volume flags for the container's volumeMounts: a ConfigMap's keys written as files (0644, owned by
    root, as the kubelet projects them) and mounted read-only at the mountPath."""
    volumes = {v["name"]: v for v in pod_spec.get("volumes", [])}
    flags = []
    for mount in container.get("volumeMounts", []):
        vol = volumes[mount["name"]]
        if "configMap" not in vol:
            raise Unsupported("volume %s: only configMap volumes are reproduced" % mount["name"])
        data = rendered_by[("ConfigMap", vol["configMap"]["name"])]["data"]
        src = work / ("volume-" + mount["name"])
        src.mkdir(mode=0o755)
        for key, text in data.items():
            (src / key).write_text(text)
            (src / key).chmod(0o644)
        flags += ["--volume", "%s:%s:%s" % (src, mount["mountPath"], "ro" if mount.get("readOnly") else "rw")]
    return flags


class Chart:
    """The chart rendered for this run: auth.existingSecret (the production setup), free ports."""

    def __init__(self, public, internal):
        self.public, self.internal = public, internal
        proc = d.run(["helm", "template", "agentwire", d.CHART, "--namespace", "chat",
                      "--set", "auth.existingSecret=" + SECRET,
                      "--set", "containerPort=%d" % public, "--set", "internalPort=%d" % internal,
                      "--set", "image.repository=" + IMAGE.rsplit(":", 1)[0],
                      "--set", "image.tag=" + IMAGE.rsplit(":", 1)[1],
                      # More chart settings to try the image with, e.g. "--set podSecurityContext.runAsUser=1000".
                      *os.environ.get("CHECK_IMAGE_HELM_ARGS", "").split()])
        assert proc.returncode == 0, d.output(proc)
        self.docs = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
        self.by = {(doc["kind"], doc["metadata"]["name"]): doc for doc in self.docs}
        self.deployment = self.by[("Deployment", "agentwire")]
        self.pod = self.deployment["spec"]["template"]["spec"]
        self.container = self.pod["containers"][0]
        self.probe_pod = self.by[("Pod", "agentwire-probe")]["spec"]
        self.probe = self.probe_pod["containers"][0]


@pytest.fixture(scope="session")
def work(tmp_path_factory):
    path = tmp_path_factory.mktemp("check-image")
    path.chmod(0o755)  # the volumes under it are read by user 65532
    return path


@pytest.fixture(scope="session")
def chart():
    return Chart(d.free_port(), d.free_port())


@pytest.fixture(scope="session")
def secrets(chart):
    """The Secret auth.existingSecret as `kubectl create secret generic` would hold it: test keys and a probe
    token minted by the image's own `agentwire token` (as the chart's README says)."""
    env = dict(os.environ, AGENTWIRE_AUTH__JWT_SECRET=d.JWT_SECRET)
    proc = podman("run", "--rm", *LIMITS, "--env", "AGENTWIRE_AUTH__JWT_SECRET", IMAGE,
                  "token", "--user", "probe", "--thread", "agentwire-probe-*", "--ttl", "8760h", env=env)
    assert proc.returncode == 0, "agentwire token in the image:\n" + d.output(proc)

    keys = {"producer": json.dumps(d.PRODUCER_KEYS), "operator": json.dumps(d.OPERATOR_KEYS)}
    return {SECRET: {"jwt-secret": d.JWT_SECRET, "producer-keys": keys["producer"],
                     "operator-keys": keys["operator"], "probe-producer-key": d.PRODUCER_KEYS[1],
                     "probe-operator-key": d.OPERATOR_KEYS[0], "probe-token": proc.stdout.strip()}}


def env_flags(container, secrets):
    """The container's environment (values and secretKeyRefs) as `--env NAME` flags, with the values in the
    environment of podman itself (never on its command line)."""
    env = d.pod_env(container, secrets)
    flags = []
    for name in env:
        flags += ["--env", name]
    return flags, dict(os.environ, **env)


class Container:
    def __init__(self, name, chart, flags, log):
        self.name, self.chart, self.flags, self.log = name, chart, flags, log
        self.url = "http://127.0.0.1:%d" % chart.public
        self.api = "http://127.0.0.1:%d" % chart.internal
        self.started = time.monotonic()

    def inspect(self, fmt):
        proc = podman("inspect", "--format", fmt, self.name)
        assert proc.returncode == 0, d.output(proc)
        return proc.stdout.strip()

    def logs(self, n=30):
        proc = podman("logs", "--tail", str(n), self.name)
        return proc.stdout + proc.stderr


@pytest.fixture(scope="session")
def gateway(chart, secrets, work):
    """The gateway's container, run as the Deployment runs it. Removed at the end of the session."""
    name = "agentwire-check-%d" % os.getpid()
    flags = security_flags(chart.pod.get("securityContext"), chart.container.get("securityContext"), image_user())
    flags += volume_flags(chart.pod, chart.container, chart.by, work)
    envs, env = env_flags(chart.container, secrets)
    assert chart.pod.get("enableServiceLinks") is False  # else Kubernetes would add AGENTWIRE_* variables
    assert "command" not in chart.container, "the chart overrides the image's ENTRYPOINT"
    proc = podman("run", "-d", "--name", name, *LIMITS, *flags, *envs, IMAGE, *chart.container["args"], env=env)
    assert proc.returncode == 0, "podman run:\n" + d.output(proc)
    c = Container(name, chart, flags, work / "gateway.log")
    c.ready = d.wait_http(c.api + "/healthz", 20) and d.wait_http(c.url + "/healthz", 5)
    yield c
    podman("rm", "-f", "-t", "0", name)


def pytest_configure(config):
    # Fail early and clearly when scripts/check-image has not built the image.
    if subprocess.run([*PODMAN, "image", "exists", IMAGE]).returncode != 0:
        raise pytest.UsageError("no image %s: run scripts/check-image" % IMAGE)
