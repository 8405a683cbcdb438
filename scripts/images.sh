#!/usr/bin/env bash
# Stagely's images, from the Dockerfile: the operator (with the agent binaries it serves to VMs),
# the webhook receiver and the edge proxy, each FROM scratch with a CA bundle, run as 65532.
#
#   scripts/images.sh
#       `make images`: static release binaries built here for x86_64, then the three images
#       built with podman from them (the Dockerfile's `host` binaries), tagged
#       $IMAGE_REPO/<component>:<workspace version>. The operator image carries the amd64 agent
#       only: no aarch64 standard library is installed here (see the README for a release).
#   scripts/images.sh binaries OUT ARCH [AGENT_ARCH...]
#       The static release binaries for ARCH (amd64 or arm64) and the agent for each AGENT_ARCH
#       (default: ARCH), laid out in OUT as the Dockerfile's runtime stages copy them. The
#       Dockerfile's builder stage runs this; an ARCH other than the machine's is cross-compiled
#       with <arch>-linux-gnu-gcc.
#
# Environment: IMAGE_REPO (default docker.io/stagely, as the chart names the images), CARGO
# (default cargo); podman's own (CONTAINERS_CONF, CONTAINERS_STORAGE_CONF).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO="${CARGO:-cargo}"
IMAGE_REPO="${IMAGE_REPO:-docker.io/stagely}"
# Where cargo puts what it builds (CARGO_TARGET_DIR, a configured target-dir, or target/).
TARGET_DIR=$("$CARGO" metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
COMPONENTS=(operator webhook-receiver edge-proxy)

die() {
  echo "images: $*" >&2
  exit 1
}

need() {
  for tool in "$@"; do
    command -v "$tool" >/dev/null || die "$tool is not installed: run scripts/install-deps.sh (make deps)"
  done
}

triple() {
  case "$1" in
    amd64) echo x86_64-unknown-linux-gnu ;;
    arm64) echo aarch64-unknown-linux-gnu ;;
    *) die "unknown architecture '$1' (amd64 or arm64)" ;;
  esac
}

# Release binaries of PACKAGE... for TRIPLE, statically linked (glibc's crt-static: nothing to
# load at run time, so they run FROM scratch).
build() {
  local triple=$1
  shift
  local packages=()
  for package in "$@"; do packages+=(-p "$package"); done
  local gnu=${triple%%-*}-linux-gnu
  if [ "${triple%%-*}" != "$(uname -m)" ]; then
    # A cross build: C code (jemalloc, aws-lc, ring) and the link go through the target's gcc.
    local var
    var=$(echo "$triple" | tr 'a-z-' 'A-Z_')
    export "CARGO_TARGET_${var}_LINKER=$gnu-gcc" "CC_${triple//-/_}=$gnu-gcc" "AR_${triple//-/_}=$gnu-ar"
  fi
  RUSTFLAGS='-C target-feature=+crt-static' \
    "$CARGO" build --release --locked --target "$triple" "${packages[@]}"
}

# Fails unless FILE is a statically linked executable (no program interpreter to load).
check_static() {
  if readelf -lW "$1" | grep -q 'program interpreter'; then
    die "$1 is dynamically linked: $(readelf -lW "$1" | grep 'program interpreter')"
  fi
}

# binaries OUT ARCH [AGENT_ARCH...]: see the header.
binaries() {
  [ $# -ge 2 ] || die "usage: scripts/images.sh binaries OUT ARCH [AGENT_ARCH...]"
  local out=$1 arch=$2
  shift 2
  local agent_archs=("${@:-$arch}")
  need "$CARGO" readelf
  [ -f "$CA_BUNDLE" ] || die "$CA_BUNDLE is missing: install ca-certificates"
  local triple
  triple=$(triple "$arch")
  build "$triple" stagely-operator stagely-webhook-receiver stagely-edge-proxy stagely-agent
  rm -rf "$out"
  mkdir -p "$out/agents"
  for component in "${COMPONENTS[@]}"; do
    install -m 0755 "$TARGET_DIR/$triple/release/stagely-$component" "$out/stagely-$component"
  done
  for agent_arch in "${agent_archs[@]}"; do
    local agent_triple
    agent_triple=$(triple "$agent_arch")
    [ "$agent_triple" = "$triple" ] || build "$agent_triple" stagely-agent
    install -m 0755 "$TARGET_DIR/$agent_triple/release/stagely-agent" "$out/agents/stagely-agent-linux-$agent_arch"
  done
  for file in "$out"/stagely-* "$out"/agents/*; do check_static "$file"; done
  install -m 0644 "$CA_BUNDLE" "$out/ca-certificates.crt"
}

# The workspace's version: every crate has it, and the chart's appVersion is it.
version() {
  local id
  id=$("$CARGO" pkgid -p stagely-operator)
  echo "${id##*[#@]}"
}

images() {
  need "$CARGO" podman readelf
  [ "$(uname -m)" = x86_64 ] || die "make images builds on x86_64 only (use the Dockerfile's builder stage elsewhere)"
  # A directory per run: two runs at once (two test processes sharing a target directory)
  # must not build from each other's half-written binaries.
  local version
  mkdir -p "$TARGET_DIR/images"
  context=$(mktemp -d "$TARGET_DIR/images/context.XXXXXX")
  trap 'rm -rf "$context"' EXIT
  binaries "$context" amd64
  version=$(version)
  for component in "${COMPONENTS[@]}"; do
    # TARGETARCH for the skipped builder stage's ARG, which buildah warns about otherwise.
    podman build --quiet --build-arg BINARIES=host --build-arg TARGETARCH=amd64 --build-arg "VERSION=$version" \
      --target "$component" --tag "$IMAGE_REPO/$component:$version" --file Dockerfile "$context" >/dev/null
    echo "$IMAGE_REPO/$component:$version"
  done
}

case "${1:-}" in
  binaries) shift && binaries "$@" ;;
  "") images ;;
  *) die "usage: scripts/images.sh [binaries OUT ARCH [AGENT_ARCH...]]" ;;
esac
