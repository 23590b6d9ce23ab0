# syntax=docker/dockerfile:1
# The Holdfast image: holdfast-capture and holdfast-operator in one small,
# non-root runtime. Build it with any OCI builder:
#
#   docker build -t holdfast/holdfast:0.1.0 .
#   scripts/image.sh          # daemonless: buildah, base images made locally
#
# BASE_IMAGE is a Debian bookworm root file system (the official
# debian:bookworm-slim, or the minbase one scripts/image.sh assembles with
# debootstrap when no registry is reachable). BUILDER_IMAGE is the same
# Debian release (scripts/image.sh adds the build host's CA certificates to
# it, for a TLS-intercepting proxy, and to it only), so the binaries run
# against exactly the libraries they were linked with.
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim
ARG BUILDER_IMAGE=docker.io/library/debian:bookworm-slim

# ---- builder: a pinned Rust toolchain and what librdkafka's bundled build needs
FROM ${BUILDER_IMAGE} AS builder
ARG RUST_VERSION=1.95.0
ARG CARGO_PROFILE=release
ENV DEBIAN_FRONTEND=noninteractive \
    RUSTUP_HOME=/usr/local/rustup \
    CARGO_HOME=/usr/local/cargo \
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates curl build-essential cmake pkg-config perl python3 \
      libssl-dev zlib1g-dev libzstd-dev \
 && rm -rf /var/lib/apt/lists/*
# rustup-init straight from static.rust-lang.org (no pipe into sh: a failed
# download must fail the step).
RUN curl --proto '=https' --tlsv1.2 -sSfo /tmp/rustup-init \
      "https://static.rust-lang.org/rustup/dist/$(uname -m)-unknown-linux-gnu/rustup-init" \
 && chmod +x /tmp/rustup-init \
 && /tmp/rustup-init -y --no-modify-path --profile minimal --default-toolchain "${RUST_VERSION}" \
 && rm /tmp/rustup-init \
 && cargo --version
WORKDIR /src
COPY . .
# Only the two shipped binaries; the e2e crate stays a workspace member but
# is not built. -j follows the builder's CPUs.
RUN cargo build --locked --profile "${CARGO_PROFILE}" \
      -p holdfast-capture -p holdfast-operator \
 && mkdir -p /out \
 && cp "target/${CARGO_PROFILE}/holdfast-capture" "target/${CARGO_PROFILE}/holdfast-operator" /out/ \
 && strip /out/holdfast-capture /out/holdfast-operator

# ---- runtime: the two binaries, TLS roots, libssl and zlib; nothing else
FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="holdfast" \
      org.opencontainers.image.description="Holdfast: HTTP event capture with a durable on-disk buffer, forwarded to Kafka; and its Kubernetes operator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV DEBIAN_FRONTEND=noninteractive
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates libssl3 zlib1g \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /usr/share/doc/* /usr/share/man/* \
 && groupadd --gid 65532 holdfast \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin holdfast \
 && mkdir -p /var/lib/holdfast \
 && chown 65532:65532 /var/lib/holdfast
COPY --from=builder /out/holdfast-capture /out/holdfast-operator /usr/local/bin/
# Non-root by default; the chart and the operator also set runAsNonRoot and a
# read-only root file system (the buffer is a volume at /var/lib/holdfast,
# scratch space an emptyDir at /var/tmp).
USER 65532:65532
VOLUME ["/var/lib/holdfast"]
EXPOSE 8080 8081
ENTRYPOINT ["holdfast-capture"]
CMD ["serve"]
