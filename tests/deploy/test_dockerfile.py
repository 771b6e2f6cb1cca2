"""The Dockerfile: linted by hadolint, and its structure (scripts/check-image builds and runs it)."""

import re

import deploylib as d


def test_hadolint_dockerfile():
    proc = d.run(["hadolint", "Dockerfile"], cwd=d.ROOT)
    assert proc.returncode == 0, d.output(proc)


def test_dockerfile_multistage_release_distroless_nonroot_expose_entrypoint():
    """Multi-stage release build; the base images are build arguments defaulting to the public rust (bookworm)
    and distroless/cc-debian12 nonroot images; user 65532, EXPOSE 8000 8001, exec-form ENTRYPOINT.
    (scripts/check-image builds and runs this file with local base images.)"""
    s = (d.ROOT / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", s, re.M))
    assert args.get("BUILDER_IMAGE") == "rust:1.95-slim-bookworm", args
    assert args.get("RUNTIME_IMAGE") == "gcr.io/distroless/cc-debian12:nonroot", args
    froms = re.findall(r"^FROM\s+(\S+)", s, re.M)
    assert froms == ["${BUILDER_IMAGE}", "${RUNTIME_IMAGE}"], froms
    final = s[s.rindex("\nFROM "):]
    assert re.search(r"^USER 65532(:65532)?$", final, re.M), "final stage must run as numeric user 65532"
    assert re.search(r"^EXPOSE 8000 8001$", final, re.M), "EXPOSE 8000 8001 (the public and internal doors)"
    assert re.search(r'^ENTRYPOINT \["/usr/local/bin/agentwire"\]$', final, re.M), "exec-form ENTRYPOINT of the binary"
    assert "cargo build --release --locked" in s, "release build"
    assert s.index("COPY Cargo.toml Cargo.lock") < s.index("COPY src"), "dependency layer before the sources"
    ignore = (d.ROOT / ".dockerignore").read_text().split()
    for need in ("!Cargo.toml", "!Cargo.lock", "!src/"):
        assert need in ignore, ".dockerignore must let " + need[1:] + " in"
