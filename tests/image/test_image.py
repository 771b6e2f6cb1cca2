"""The image built from the repository's Dockerfile, run the way the Helm chart runs it (conftest.py): it
serves, the helm test pod's probe passes against it, the running process has exactly the chart's
securityContext, it cannot write outside its volumes, its binary needs no newer glibc than the public
runtime base has, and `podman stop` drains it to exit 0 within the documented bound. The drain runs last."""

import re
import threading
import time
import urllib.error
import urllib.request

import pytest

import conftest as c
import deploylib as d


def status(url):
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except (urllib.error.URLError, OSError):
        return None


def proc_status(pid):
    """/proc/PID/status as {field: value}."""
    out = {}
    for line in open("/proc/%s/status" % pid).read().splitlines():
        key, _, value = line.partition(":")
        out[key] = value.strip()
    return out


def test_image_user_is_the_charts_user(chart):
    """The image's USER is the numeric user the chart runs as (runAsUser, runAsGroup), and every setting of
    the chart's securityContext is one the run reproduces (security_flags raises otherwise)."""
    user = c.image_user()
    assert re.fullmatch(r"\d+:\d+", user), "USER must be numeric uid:gid for runAsNonRoot, not %r" % user
    flags = c.security_flags(chart.pod.get("securityContext"), chart.container.get("securityContext"), user)
    assert ["--user", user] == flags[:2]
    for flag in ("--read-only", "no-new-privileges", "ALL"):
        assert flag in flags, (flag, flags)


@pytest.mark.parametrize("pod_sc, sc, why", [
    ({"runAsUser": 1000}, {}, "not the image's USER"),
    ({"runAsNonRoot": True, "runAsUser": 0}, {}, "not the image's USER"),
    ({}, {"windowsOptions": {}}, "does not reproduce"),
    ({}, {"privileged": True}, "privileged"),
    ({}, {"seccompProfile": {"type": "Localhost"}}, "seccompProfile"),
])
def test_a_setting_the_image_cannot_satisfy_is_refused(pod_sc, sc, why):
    """The derivation refuses what it cannot honour instead of running without it."""
    with pytest.raises(c.Unsupported, match=why):
        c.security_flags(pod_sc, sc, "65532:65532")


def test_healthz_and_readyz(gateway):
    """The public door's /healthz (the startup and liveness probes) and the internal door's /readyz (the
    readiness probe), on the ports the chart's agentwire.toml names, as the kubelet asks them."""
    assert gateway.ready, "the container did not serve /healthz on both doors\n" + gateway.logs()
    assert status(gateway.url + "/healthz") == 200
    assert status(gateway.api + "/readyz") == 200, gateway.logs()
    assert status(gateway.api + "/healthz") == 200
    assert status(gateway.url + "/readyz") == 404, "the public door must not serve /readyz"
    assert gateway.inspect("{{.State.Status}}") == "running"


def test_helm_test_probe_passes(gateway, chart, secrets):
    """The helm test pod, run from the same image with its own securityContext and the Secret's keys and
    token: `agentwire probe` publishes five events on the internal door and reads them on the public one, in
    order, ledger balanced. Only the Services' names become this machine's addresses."""
    probe = chart.probe
    flags = c.security_flags(chart.probe_pod.get("securityContext"), probe.get("securityContext"), c.image_user())
    envs, env = c.env_flags(probe, secrets)
    assert set(d.pod_env(probe, secrets)) == {"AGENTWIRE_PROBE_PRODUCER_KEY", "AGENTWIRE_PROBE_OPERATOR_KEY",
                                              "AGENTWIRE_PROBE_TOKEN"}
    args = probe["args"]
    public = "http://agentwire:%d" % chart.by[("Service", "agentwire")]["spec"]["ports"][0]["port"]
    internal = "http://agentwire-internal:%d" % chart.by[("Service", "agentwire-internal")]["spec"]["ports"][0]["port"]
    assert args == ["probe", "--url", public, "--api-url", internal], args
    args = ["probe", "--url", gateway.url, "--api-url", gateway.api]
    proc = c.podman("run", "--rm", *c.LIMITS, *flags, *envs, c.IMAGE, *args, env=env, timeout=60)
    assert proc.returncode == 0, d.output(proc) + "\n" + gateway.logs()
    assert "agentwire probe: ok: 5/5 events in order" in proc.stdout, proc.stdout


def test_running_process_has_the_charts_security_context(gateway):
    """The gateway process itself, seen from the host: user and group 65532 (real, effective, saved, fs; no
    supplementary group but its own), no capability at all (drop ALL: effective, permitted, bounding, ambient), no new
    privileges, a seccomp filter (RuntimeDefault)."""
    pid = gateway.inspect("{{.State.Pid}}")
    s = proc_status(pid)
    assert s["Name"] == "agentwire", s["Name"]
    assert s["Uid"].split() == ["65532"] * 4, s["Uid"]
    assert s["Gid"].split() == ["65532"] * 4, s["Gid"]
    assert set(s["Groups"].split()) <= {"65532"}, s["Groups"]
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert int(s[cap], 16) == 0, (cap, s[cap])
    assert s["NoNewPrivs"] == "1"
    assert s["Seccomp"] == "2", "no seccomp filter"


def test_root_filesystem_is_read_only(gateway, work):
    """podman ran the container with a read-only root (ReadonlyRootfs), the process's own mount table says
    so for / and the config volume, and nothing it could write to is mounted but the kernel's pseudo file
    systems. Then a write is tried everywhere a program would: the image has no shell, so the host's
    `touch` (bookworm's, which runs on the image's glibc) is mounted in and run with the same flags; a run
    without --read-only shows that the attempt would succeed on a writable root."""
    assert gateway.inspect("{{.HostConfig.ReadonlyRootfs}}") == "true"
    pid = gateway.inspect("{{.State.Pid}}")
    writable = []
    root_opts = None
    for line in open("/proc/%s/mountinfo" % pid).read().splitlines():
        fields = line.split()
        point, opts = fields[4], fields[5].split(",")
        if point == "/":
            root_opts = opts
        if point == "/etc/agentwire":
            assert "ro" in opts, line
        # The kernel's file systems (/proc, /sys, /dev: podman masks parts of /proc with /dev/null and puts
        # a root-owned tmpfs at /sys/fs/cgroup) aside, nothing is writable.
        if "rw" in opts and not any(point == p or point.startswith(p + "/") for p in ("/proc", "/sys", "/dev")):
            writable.append(line)
    assert root_opts is not None and "ro" in root_opts, root_opts
    assert writable == [], "writable mounts:\n" + "\n".join(writable)

    targets = ["/probe", "/tmp/probe", "/home/nonroot/probe", "/etc/agentwire/probe", "/usr/local/bin/probe"]
    flags = gateway.flags
    touch = ["--volume", "/usr/bin/touch:/check/touch:ro", "--entrypoint", "/check/touch"]
    proc = c.podman("run", "--rm", *c.LIMITS, *flags, *touch, c.IMAGE, *targets)
    assert proc.returncode != 0
    for t in targets:
        assert re.search(r"cannot touch '%s': Read-only file system" % re.escape(t), proc.stderr), proc.stderr
    # The control: the same attempt on a writable root succeeds where user 65532 may write (/tmp, its home).
    writable_flags = [f for f in flags if f not in ("--read-only", "--read-only-tmpfs=false")]
    proc = c.podman("run", "--rm", *c.LIMITS, *writable_flags, *touch, c.IMAGE, "/tmp/probe", "/home/nonroot/probe")
    assert proc.returncode == 0, "the control write failed, so the check above proves nothing:\n" + d.output(proc)


def test_binary_needs_no_newer_glibc_than_the_runtime_base(work):
    """The binary's dynamic needs, read from the image: only libraries distroless/cc has (glibc's and
    libgcc_s), and GLIBC_ symbol versions no newer than the runtime base's glibc, which is bookworm's 2.36,
    the glibc of gcr.io/distroless/cc-debian12."""
    cid = c.podman("create", c.IMAGE).stdout.strip()
    try:
        for path in ("/usr/local/bin/agentwire", "/usr/lib/x86_64-linux-gnu/libc.so.6"):
            proc = c.podman("cp", "%s:%s" % (cid, path), work / path.rsplit("/", 1)[1])
            assert proc.returncode == 0, d.output(proc)
    finally:
        c.podman("rm", cid)
    dyn = d.run(["objdump", "-p", work / "agentwire"]).stdout
    needed = set(re.findall(r"NEEDED\s+(\S+)", dyn))
    assert needed <= {"libc.so.6", "libm.so.6", "libgcc_s.so.1", "libpthread.so.0", "libdl.so.2", "librt.so.1",
                      "ld-linux-x86-64.so.2"}, needed

    def version(v):
        return tuple(int(x) for x in v.split("."))
    wanted = {version(v) for v in re.findall(r"GLIBC_(\d+(?:\.\d+)+)", d.run(["objdump", "-T", work / "agentwire"]).stdout)}
    defined = {version(v) for v in re.findall(r"GLIBC_(\d+(?:\.\d+)+)", d.run(["objdump", "-p", work / "libc.so.6"]).stdout)}
    assert max(defined) == (2, 36), "the runtime base's glibc is %s, not bookworm's 2.36" % (max(defined),)
    assert max(wanted) <= max(defined), "the binary needs GLIBC_%s" % ".".join(map(str, max(wanted)))
    print("needs GLIBC_%s (runtime base: %s)" % (".".join(map(str, max(wanted))), ".".join(map(str, max(defined)))))


def test_podman_stop_drains_and_exits_0_within_the_bound(gateway, chart):
    """`podman stop` sends SIGTERM to the container's process 1, the gateway: /readyz turns 503 at once (the
    signal reached it), and it exits 0, by itself, within drain_delay + close_window + timeout + 4 s
    (docs/operations.md, Shutdown), below the chart's terminationGracePeriodSeconds; podman's own deadline
    is that grace period, as the kubelet's is."""
    assert gateway.ready, gateway.logs()
    grace = chart.pod["terminationGracePeriodSeconds"]
    toml = chart.by[("ConfigMap", "agentwire")]["data"]["agentwire.toml"]
    shutdown = dict(re.findall(r'^(drain_delay|close_window|timeout) = "(\d+)s"$',
                               toml.split("[shutdown]")[1].split("[")[0], re.M))
    bound = int(shutdown["drain_delay"]) + int(shutdown["close_window"]) + int(shutdown["timeout"]) + 4
    assert bound < grace, (bound, grace)
    started = time.monotonic()
    result = {}
    stopper = threading.Thread(target=lambda: result.update(proc=c.podman("stop", "--time", str(grace), gateway.name,
                                                                          timeout=grace + 30)))
    stopper.start()
    seen_503 = None
    while stopper.is_alive() and seen_503 is None:
        if status(gateway.api + "/readyz") == 503:
            seen_503 = time.monotonic() - started
        time.sleep(0.05)
    stopper.join()
    took = time.monotonic() - started
    assert result["proc"].returncode == 0, d.output(result["proc"])
    assert seen_503 is not None and seen_503 < 2, "/readyz never answered 503 during the drain\n" + gateway.logs()
    code = gateway.inspect("{{.State.ExitCode}}")
    assert code == "0", "exit code %s\n%s" % (code, gateway.logs())
    assert took < bound, "stopped in %.1f s, bound %d s\n%s" % (took, bound, gateway.logs())
    logs = gateway.logs(100)
    assert "SIGKILL" not in logs
    print("podman stop: /readyz 503 after %.2f s, exit 0 after %.1f s (bound %d s, grace %d s)"
          % (seen_503, took, bound, grace))
