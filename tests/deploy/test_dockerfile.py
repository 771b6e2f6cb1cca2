"""The Dockerfile: linted by hadolint, and built the way the docs say (no container engine runs here)."""

import re

import deploylib as d


def test_hadolint_dockerfile():
    proc = d.run(["hadolint", "Dockerfile"], cwd=d.ROOT)
    assert proc.returncode == 0, d.output(proc)


def test_dockerfile_multistage_release_distroless_nonroot_expose_entrypoint():
    """Multi-stage release build, distroless/cc nonroot 65532, EXPOSE 8000, exec-form ENTRYPOINT."""
    s = (d.ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", s, re.M)
    assert len(froms) >= 2, "not multi-stage"
    assert froms[-1] == "gcr.io/distroless/cc-debian12:nonroot", froms[-1]
    final = s[s.rindex("\nFROM "):]
    assert re.search(r"^USER 65532(:65532)?$", final, re.M), "final stage must run as numeric user 65532"
    assert re.search(r"^EXPOSE 8000$", final, re.M), "EXPOSE 8000"
    assert re.search(r'^ENTRYPOINT \["/usr/local/bin/agentwire"\]$', final, re.M), "exec-form ENTRYPOINT of the binary"
    assert "cargo build --release --locked" in s, "release build"
    assert s.index("COPY Cargo.toml Cargo.lock") < s.index("COPY src"), "dependency layer before the sources"
    ignore = (d.ROOT / ".dockerignore").read_text().split()
    for need in ("!Cargo.toml", "!Cargo.lock", "!src/"):
        assert need in ignore, ".dockerignore must let " + need[1:] + " in"
