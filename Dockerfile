# syntax=docker/dockerfile:1
# agentwire container image.
#   docker build -t agentwire:0.1.0 .
# Stage 1 compiles the dependencies against stub sources, so the (slow) dependency layer is cached
# until Cargo.toml or Cargo.lock change; stage 2 compiles the real sources on top of it.
# The runtime is distroless/cc: glibc and libgcc_s (which a Rust binary built for gnu links against),
# CA certificates and tzdata, no shell and no package manager, running as the numeric user 65532.

FROM rust:1.95-slim-bookworm AS build
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

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /agentwire /usr/local/bin/agentwire
# The nonroot user of distroless, numeric so that Kubernetes can check runAsNonRoot.
USER 65532:65532
# One listener (default listen = 0.0.0.0:8000): HTTP API, /ws (WebSocket) and /metrics. No ENV here:
# AGENTWIRE_* variables would override a mounted --config file.
EXPOSE 8000
ENTRYPOINT ["/usr/local/bin/agentwire"]
