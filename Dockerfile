# syntax=docker/dockerfile:1
#
# Container images for Tether, one file, two targets (BuildKit):
#
#   docker build --target gateway -t tether/tether-gateway:0.1.0 .   # tether-gateway + tetherctl
#   docker build --target agent   -t tether/tether-agent:0.1.0 .     # tether-agent
#
# Runtime: distroless cc (glibc, libgcc, CA certificates; no shell, no package manager), as the
# non-root user 65532:65532 that the Helm charts pin (runAsUser/runAsGroup 65532). The binaries
# need no OpenSSL and no protoc (aws-lc-rs, protox), so the builder needs nothing beyond the
# Rust image. Binaries live in /usr/local/bin/, where the charts' commands and probes call them.

# === builder ===
FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# The cache mounts keep the registry and target/ between builds; the binaries are copied out
# of the mounted target/ in the same step, since the mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --workspace --bins \
 && mkdir -p /out \
 && cp target/release/tether-gateway target/release/tetherctl target/release/tether-agent /out/

# === gateway ===
FROM gcr.io/distroless/cc-debian12:nonroot AS gateway
LABEL org.opencontainers.image.title="tether-gateway" \
      org.opencontainers.image.description="Tether control-plane gateway and tetherctl" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/tether-gateway /out/tetherctl /usr/local/bin/
USER 65532:65532
# 7443/udp QUIC tunnel (7443/tcp: the TLS fallback, in a later release), 7444 northbound gRPC,
# 9090 ops HTTP.
EXPOSE 7443/udp 7443/tcp 7444/tcp 9090/tcp
ENTRYPOINT ["/usr/local/bin/tether-gateway"]
CMD ["serve", "--config", "/etc/tether/gateway.toml"]

# === agent ===
# Listens on nothing but its ops port (127.0.0.1:9091 by default): no EXPOSE.
FROM gcr.io/distroless/cc-debian12:nonroot AS agent
LABEL org.opencontainers.image.title="tether-agent" \
      org.opencontainers.image.description="Tether data-plane agent: dials out to the gateway" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /out/tether-agent /usr/local/bin/
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/tether-agent"]
CMD ["run", "--config", "/etc/tether/agent.toml"]
