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
# against exactly the libraries they were linked with (the runtime stage is
# FROM scratch with those libraries copied in).
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

# ---- the runtime root file system: the two binaries, exactly the shared
# libraries they load (glibc, libssl, zlib, libgcc), Debian's CA bundle (not
# the build host's extra CAs), a passwd entry for uid 65532, and the
# directories the pods mount over. No shell, no package manager.
RUN rm -f /usr/local/share/ca-certificates/* \
 && update-ca-certificates --fresh >/dev/null \
 && mkdir -p /rootfs/usr/local/bin /rootfs/etc/ssl/certs /rootfs/usr/lib/ssl \
      /rootfs/tmp /rootfs/var/tmp /rootfs/var/lib/holdfast \
 && cp /out/holdfast-capture /out/holdfast-operator /rootfs/usr/local/bin/ \
 && for lib in $(ldd /out/holdfast-capture /out/holdfast-operator \
        | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// && $1 !~ /:$/ { print $1 }' | sort -u); do \
      cp --parents -L "$lib" /rootfs/; \
    done \
 && cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ \
 && ln -s /etc/ssl/certs /rootfs/usr/lib/ssl/certs \
 && ln -s /etc/ssl/certs/ca-certificates.crt /rootfs/usr/lib/ssl/cert.pem \
 && echo 'holdfast:x:65532:65532:holdfast:/nonexistent:/usr/sbin/nologin' >/rootfs/etc/passwd \
 && echo 'holdfast:x:65532:' >/rootfs/etc/group \
 && chown 65532:65532 /rootfs/var/lib/holdfast \
 && chmod 1777 /rootfs/tmp /rootfs/var/tmp

# ---- runtime: that root file system and nothing else
FROM scratch
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="holdfast" \
      org.opencontainers.image.description="Holdfast: HTTP event capture with a durable on-disk buffer, forwarded to Kafka; and its Kubernetes operator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /rootfs/ /
# COPY makes files root's: the buffer directory must be the user's.
COPY --from=builder --chown=65532:65532 /rootfs/var/lib/holdfast /var/lib/holdfast
ENV PATH=/usr/local/bin \
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
# Non-root by default; the chart and the operator also set runAsNonRoot and a
# read-only root file system (the buffer is a volume at /var/lib/holdfast,
# scratch space an emptyDir at /var/tmp).
USER 65532:65532
VOLUME ["/var/lib/holdfast"]
EXPOSE 8080 8081
ENTRYPOINT ["holdfast-capture"]
CMD ["serve"]
