# syntax=docker/dockerfile:1
# agentwire container image, built from source:
#   docker build -t agentwire:0.1.0 .        (or: podman build -t agentwire:0.1.0 .)
# The two base images are build arguments, defaulting to the public images below; scripts/check-image
# builds this same file on local stand-ins made from Debian bookworm packages (no registry there).
ARG BUILDER_IMAGE=rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# Stage 1 compiles the dependencies against stub sources, so the (slow) dependency layer is cached
# until Cargo.toml or Cargo.lock change; stage 2 compiles the real sources on top of it.
FROM ${BUILDER_IMAGE} AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
# Stubs for every target the manifest names, so that only the dependencies are built here.
RUN mkdir -p src tests/it \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs tests/it/main.rs \
    && cargo build --release --locked \
    && rm -rf src
COPY src ./src
# touch: the stub build left newer artifacts for this crate; force cargo to rebuild it from the real sources.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked \
    && cp target/release/agentwire /agentwire

# The runtime is distroless/cc (Debian 12): glibc and libgcc_s (which a Rust binary built for gnu links
# against), CA certificates and tzdata, no shell and no package manager. The builder must be of the same
# Debian release, so that the binary asks for no newer glibc than the runtime has (bookworm: 2.36).
FROM ${RUNTIME_IMAGE}
COPY --from=build /agentwire /usr/local/bin/agentwire
# The nonroot user of distroless, numeric so that Kubernetes can check runAsNonRoot; the Helm chart's
# podSecurityContext runs as the same user (runAsUser/runAsGroup 65532).
USER 65532:65532
# Two listeners, the gateway's two doors (docs/operations.md): public 8000 (/ws, /healthz) and internal
# 8001 (/v1/*, /metrics, /readyz, /healthz; on 127.0.0.1 by default: the chart's agentwire.toml, mounted
# at /etc/agentwire and passed by --config, puts it on 0.0.0.0). No ENV here: AGENTWIRE_* variables would
# override a mounted --config file.
EXPOSE 8000 8001
ENTRYPOINT ["/usr/local/bin/agentwire"]
