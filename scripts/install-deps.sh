#!/usr/bin/env bash
# Installs what building and testing Stagely needs and the machine lacks. Idempotent: it only
# installs what is missing, so a second run does nothing.
#
# With --demo, only what `make demo` needs: no moto, Prism and the webhook schemas (and Node.js),
# nginx, wrk or arm64 busybox, which only tests and benchmarks use.
set -euo pipefail

demo=false
case "${1:-}" in
  --demo) demo=true ;;
  "") ;;
  *) echo "usage: scripts/install-deps.sh [--demo]" >&2; exit 2 ;;
esac

need_go_minor=26
missing=()

command -v make >/dev/null || missing+=(make)
command -v flock >/dev/null || missing+=(util-linux)
command -v git >/dev/null || missing+=(git)
command -v cc >/dev/null || missing+=(gcc)
command -v curl >/dev/null || missing+=(curl)
# The edge proxy's tests and the demo run a real Redis (redis-cli comes with it).
command -v redis-server >/dev/null || missing+=(redis-server)
command -v redis-cli >/dev/null || missing+=(redis-tools)
# The agent's tests and the demo build, push and run images with podman (FROM scratch, with
# busybox in them).
command -v podman >/dev/null || missing+=(podman)
command -v runc >/dev/null || missing+=(runc)
command -v podman-compose >/dev/null || missing+=(podman-compose)
[ -x /bin/busybox ] || missing+=(busybox-static)
# The demo writes its pull_request webhooks with jq and signs them with openssl.
command -v jq >/dev/null || missing+=(jq)
command -v openssl >/dev/null || missing+=(openssl)
if ! $demo; then
  # The agent's tests run the same images a second time on Docker as production VMs run it:
  # Debian's docker.io (a private dockerd per test, on a bridge of its own made with `ip`).
  { command -v dockerd && command -v docker; } >/dev/null || missing+=(docker.io)
  command -v ip >/dev/null || missing+=(iproute2)
  # testenv's node runs pods: Debian's containerd (with its CRI plugin) and CNI plugins, and
  # nftables for kube-proxy (iptables for the kubelet's own chains).
  command -v containerd >/dev/null || missing+=(containerd)
  [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
  [ -x /usr/sbin/nft ] || missing+=(nftables)
  [ -x /usr/sbin/iptables ] || missing+=(iptables)
  command -v python3 >/dev/null || missing+=(python3)
  python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
  # The edge proxy's benchmark compares with nginx under wrk.
  command -v nginx >/dev/null || missing+=(nginx-light)
  command -v wrk >/dev/null || missing+=(wrk)
  # The observability test scrapes the components with a real Prometheus, evaluates the
  # chart's alerts with it and checks them with promtool (both in Debian's package).
  { command -v prometheus && command -v promtool; } >/dev/null || missing+=(prometheus)
fi

if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

# Toolchains come with the machine; say clearly when one is missing or too old.
if ! command -v go >/dev/null; then
  echo "install-deps: Go 1.${need_go_minor} or newer is required (testenv builds Kubernetes from Go modules)" >&2
  exit 1
fi
go_minor=$(go env GOVERSION | sed -E 's/^go1\.([0-9]+).*/\1/')
if [ "$go_minor" -lt "$need_go_minor" ]; then
  echo "install-deps: Go 1.${need_go_minor} or newer is required, found $(go env GOVERSION)" >&2
  exit 1
fi
command -v cargo >/dev/null || { echo "install-deps: cargo is required (https://rustup.rs)" >&2; exit 1; }

if $demo; then
  exit 0
fi

for tool in rustfmt cargo-clippy; do
  command -v "$tool" >/dev/null || { echo "install-deps: $tool is required (rustup component add rustfmt clippy)" >&2; exit 1; }
done

# `make fuzz` runs the fuzz targets in fuzz/ with cargo-fuzz, kept under the cache.
cargo_fuzz_root=${STAGELY_CACHE:-$HOME/.cache/stagely}/cargo-fuzz
if [ ! -x "$cargo_fuzz_root/bin/cargo-fuzz" ]; then
  echo "install-deps: installing cargo-fuzz"
  cargo install --quiet --locked cargo-fuzz --root "$cargo_fuzz_root"
fi

# The AWS provider's tests run against moto's EC2 server.
if ! command -v moto_server >/dev/null || ! python3 -c 'import flask, moto' 2>/dev/null; then
  echo "install-deps: installing moto[server]"
  # A distribution's own Python refuses pip installs (PEP 668) unless told otherwise.
  python3 -m pip install --quiet 'moto[server]==5.2.1' 2>/dev/null ||
    python3 -m pip install --quiet --break-system-packages 'moto[server]==5.2.1'
fi

need_node() {
  if ! command -v npm >/dev/null || [ "$(node -p 'process.versions.node.split(".")[0]')" -lt 20 ]; then
    echo "install-deps: Node.js 20 or newer with npm is required ($1)" >&2
    exit 1
  fi
}

# The DigitalOcean, Hetzner and GitHub clients' tests run Prism (pinned in tools/prism) in front of
# fakes; GitHub's OpenAPI description comes pinned beside it (@octokit/openapi).
tools_dir="$(cd "$(dirname "$0")/.." && pwd)/tools"
if [ ! -x "$tools_dir/prism/node_modules/.bin/prism" ] ||
  [ ! -f "$tools_dir/prism/node_modules/@octokit/openapi/generated/api.github.com.json" ]; then
  need_node "the provider tests run Prism"
  echo "install-deps: installing Prism"
  npm ci --prefix "$tools_dir/prism" --no-audit --no-fund --silent
fi

# The webhook receiver's tests check every payload they send against GitHub's published webhook
# schemas (@octokit/webhooks-schemas, pinned in tools/webhook-schemas, validated with ajv).
if [ ! -f "$tools_dir/webhook-schemas/node_modules/@octokit/webhooks-schemas/schema.json" ] ||
  [ ! -f "$tools_dir/webhook-schemas/node_modules/ajv-formats/package.json" ]; then
  need_node "the webhook receiver's tests validate payloads against GitHub's schemas"
  echo "install-deps: installing GitHub's webhook schemas"
  npm ci --prefix "$tools_dir/webhook-schemas" --no-audit --no-fund --silent
fi

# The multi-platform pipeline test builds a real arm64 image `FROM scratch` around Debian's
# static arm64 busybox; no emulation is needed to build it, only the binary. It is unpacked
# under the cache, never installed.
arm64_dir=${STAGELY_CACHE:-$HOME/.cache/stagely}/busybox-arm64
if [ ! -x "$arm64_dir/bin/busybox" ]; then
  echo "install-deps: fetching Debian's busybox-static:arm64"
  if ! dpkg --print-foreign-architectures | grep -qx arm64; then
    dpkg --add-architecture arm64
    apt-get update -qq
  fi
  tmp=$(mktemp -d)
  (cd "$tmp" && apt-get download -qq busybox-static:arm64 2>/dev/null) || {
    apt-get update -qq
    (cd "$tmp" && apt-get download -qq busybox-static:arm64)
  }
  mkdir -p "$arm64_dir.tmp"
  dpkg-deb -x "$tmp"/busybox-static_*_arm64.deb "$arm64_dir.tmp"
  rm -rf "$arm64_dir" "$tmp" && mv "$arm64_dir.tmp" "$arm64_dir"
fi

# `docker compose` for the agent's Docker tests: the Compose v2 plugin built from its Go module,
# pinned in tools/compose (go.mod, go.sum), into a directory keyed by those files, so a new pin
# builds once and an unchanged one never. The tests' docker commands find it through a
# DOCKER_CONFIG directory of their own whose cli-plugins/ links here; ~/.docker is not touched.
compose_mod="$(cd "$(dirname "$0")/.." && pwd)/tools/compose"
cache=${STAGELY_CACHE:-$HOME/.cache/stagely}
compose_key=$(cat "$compose_mod/go.mod" "$compose_mod/go.sum" | sha256sum | cut -c1-16)
compose_bin="$cache/compose-$compose_key/docker-compose"
if [ ! -x "$compose_bin" ]; then
  compose_version=$(grep -E '^\s*github.com/docker/compose/v2 v' "$compose_mod/go.mod" | awk '{print $2}')
  echo "install-deps: building the docker compose plugin $compose_version (cold: about 10 minutes)"
  tmp="$(dirname "$compose_bin").tmp.$$"
  mkdir -p "$tmp"
  (
    cd "$compose_mod"
    export GOCACHE=${GOCACHE:-$cache/go-build} GOMODCACHE=${GOMODCACHE:-$cache/go-mod} GOFLAGS=-mod=mod
    go build -trimpath -ldflags "-s -w -X github.com/docker/compose/v2/internal.Version=$compose_version" \
      -o "$tmp/docker-compose" github.com/docker/compose/v2/cmd
  )
  rm -rf "$(dirname "$compose_bin")" && mv "$tmp" "$(dirname "$compose_bin")"
fi
mkdir -p "$cache/docker/cli-plugins"
ln -sfn "$compose_bin" "$cache/docker/cli-plugins/docker-compose"
if ! DOCKER_CONFIG="$cache/docker" docker compose version >/dev/null; then
  echo "install-deps: \`docker compose version\` fails with the plugin in $cache/docker/cli-plugins" >&2
  exit 1
fi

# The chart's tests (operator/tests/chart.rs) run helm, built from its Go module into the cache
# (scripts/install-helm.sh; once per pin, about 4 minutes cold).
"$(cd "$(dirname "$0")" && pwd)/install-helm.sh" >/dev/null
