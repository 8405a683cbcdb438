# Stagely's images, a stage each: `operator` (with the agent binaries it serves to VMs),
# `webhook-receiver` and `edge-proxy`. Each is FROM scratch: its static binary, a CA bundle and
# nothing else (no shell, no package manager), run as 65532, with nothing to write outside the
# volumes the chart mounts (it runs them with a read-only root filesystem).
#
# A release builds everything here, for both platforms (see the README's "Images"):
#   docker buildx build --platform linux/amd64,linux/arm64 --target operator --build-arg VERSION=0.1.0 ...
# `make images` (scripts/images.sh) builds the same runtime stages from static binaries built on
# the host: `--build-arg BINARIES=host`, the directory scripts/images.sh lays out as the context.

# Where the runtime stages take the binaries from: `builder` (compiled below) or `host` (the
# build context). Also written `${BINARIES:-builder}` below: buildah (podman 4.3) works out
# which stages a target needs from the command line's build arguments only, so a default given
# here alone would leave it skipping `builder` and then looking for an image of that name.
ARG BINARIES=builder
ARG VERSION=dev

# rust:1.95.0-bookworm (an image index: linux/amd64, linux/arm64, ...), run on the build
# machine's platform whatever the target's.
FROM --platform=$BUILDPLATFORM docker.io/library/rust:1.95.0-bookworm@sha256:6258907abe69656e41cd992e0b705cdcfabcbbe3db374f92ed2d47121282d4a1 AS builder
ARG TARGETARCH
# The operator image carries the agent for both platforms whatever its own, so one of them is
# always cross-compiled: Debian's cross gcc with its static glibc, and the Rust target.
RUN set -eux; \
    case "$(dpkg --print-architecture)" in \
      amd64) cross="gcc-aarch64-linux-gnu libc6-dev-arm64-cross" ;; \
      arm64) cross="gcc-x86-64-linux-gnu libc6-dev-amd64-cross" ;; \
      *) echo "no cross toolchain for $(dpkg --print-architecture)" >&2; exit 1 ;; \
    esac; \
    apt-get update; \
    apt-get install -y --no-install-recommends $cross; \
    rm -rf /var/lib/apt/lists/*; \
    rustup target add x86_64-unknown-linux-gnu aarch64-unknown-linux-gnu
WORKDIR /src
COPY . .
# The same script and layout as `make images`: /out/stagely-<component>, /out/agents/,
# /out/ca-certificates.crt.
RUN scripts/images.sh binaries /out "$TARGETARCH" amd64 arm64

# What scripts/images.sh laid out on the host, as the builder stage lays it out.
FROM scratch AS host
COPY . /out/

FROM ${BINARIES:-builder} AS binaries

FROM scratch AS base
ARG VERSION
LABEL org.opencontainers.image.version="$VERSION" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.url="https://stagely.dev"
COPY --from=binaries /out/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
USER 65532:65532

FROM base AS operator
LABEL org.opencontainers.image.title="stagely-operator"
# The operator's default --agent-bin-dir.
COPY --from=binaries /out/agents/ /usr/local/lib/stagely/agents/
COPY --from=binaries /out/stagely-operator /usr/local/bin/stagely-operator
ENTRYPOINT ["/usr/local/bin/stagely-operator"]

FROM base AS webhook-receiver
LABEL org.opencontainers.image.title="stagely-webhook-receiver"
COPY --from=binaries /out/stagely-webhook-receiver /usr/local/bin/stagely-webhook-receiver
ENTRYPOINT ["/usr/local/bin/stagely-webhook-receiver"]

FROM base AS edge-proxy
LABEL org.opencontainers.image.title="stagely-edge-proxy"
COPY --from=binaries /out/stagely-edge-proxy /usr/local/bin/stagely-edge-proxy
ENTRYPOINT ["/usr/local/bin/stagely-edge-proxy"]
