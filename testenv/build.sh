#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and kubectl, and for the test node
# kube-scheduler, kubelet, kube-proxy, the sandbox ("pause") image and CoreDNS (testenv/coredns,
# keyed and linked like the registry), from testenv/k8s (Go
# modules) into a cache directory keyed by the module's content, and prints that directory. A
# second run on the same machine finds them there and builds nothing. The image registry
# (testenv/registry) is built into a directory keyed by its own module's content and linked into
# the same directory, so changing one module never rebuilds the other.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${STAGELY_CACHE:-$HOME/.cache/stagely}
key=$(cd "$here/k8s" && cat go.mod go.sum $(find cmd -name '*.go' | sort) | sha256sum | cut -c1-16)
out="$cache/testenv/$key/bin"
registry_key=$(cd "$here/registry" && cat go.mod go.sum | sha256sum | cut -c1-16)
registry="$cache/testenv/registry-$registry_key/registry"
coredns_key=$(cd "$here/coredns" && cat go.mod go.sum main.go | sha256sum | cut -c1-16)
coredns="$cache/testenv/coredns-$coredns_key/coredns"
binaries=(etcd kube-apiserver kube-controller-manager kubectl kube-scheduler kubelet kube-proxy)
k8s_built() {
  for binary in "${binaries[@]}"; do [ -x "$out/$binary" ] || return 1; done
  [ -f "$out/pause.tar" ]
}
registry_linked() { [ -x "$out/registry" ] && [ "$(readlink "$out/registry")" = "$registry" ]; }
coredns_linked() { [ -x "$out/coredns" ] && [ "$(readlink "$out/coredns")" = "$coredns" ]; }
if k8s_built && registry_linked && coredns_linked; then
  echo "$out"
  exit 0
fi
# Concurrent test binaries may all ask for the binaries at once: one builds, the others wait.
mkdir -p "$cache/testenv"
exec 9>"$cache/testenv/.lock"
flock 9
if k8s_built && registry_linked && coredns_linked; then
  echo "$out"
  exit 0
fi
command -v go >/dev/null || { echo "testenv/build.sh: go is not installed (need Go >= 1.26)" >&2; exit 1; }
export GOCACHE=${GOCACHE:-$cache/go-build}
export GOMODCACHE=${GOMODCACHE:-$cache/go-mod}
export GOFLAGS=-mod=mod
# The node's sandbox image, an OCI archive FROM scratch holding only the static pause binary
# (testenv/k8s/cmd/pause), named by its `io.containerd.image.name` annotation for `ctr images
# import`. Written byte for byte here, so it needs no image builder and no registry.
pause_image() {
  local dir=$1 work
  work=$(mktemp -d)
  mkdir -p "$work/root" "$work/oci/blobs/sha256"
  (cd "$here/k8s" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$work/root/pause" ./cmd/pause)
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf "$work/layer.tar" -C "$work/root" pause
  blob() { # file -> its digest, the file moved into the layout
    local digest
    digest=$(sha256sum "$1" | cut -c1-64)
    mv "$1" "$work/oci/blobs/sha256/$digest"
    echo "$digest"
  }
  local layer layer_size config config_size manifest manifest_size
  layer_size=$(stat -c %s "$work/layer.tar")
  layer=$(blob "$work/layer.tar")
  printf '{"architecture":"%s","os":"linux","config":{"Entrypoint":["/pause"]},"rootfs":{"type":"layers","diff_ids":["sha256:%s"]}}' \
    "$(go env GOARCH)" "$layer" >"$work/config.json"
  config_size=$(stat -c %s "$work/config.json")
  config=$(blob "$work/config.json")
  printf '{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:%s","size":%s},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"sha256:%s","size":%s}]}' \
    "$config" "$config_size" "$layer" "$layer_size" >"$work/manifest.json"
  manifest_size=$(stat -c %s "$work/manifest.json")
  manifest=$(blob "$work/manifest.json")
  printf '{"schemaVersion":2,"manifests":[{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"sha256:%s","size":%s,"annotations":{"io.containerd.image.name":"%s","org.opencontainers.image.ref.name":"%s"}}]}' \
    "$manifest" "$manifest_size" "stagely.dev/testenv/pause:1" "1" >"$work/oci/index.json"
  printf '{"imageLayoutVersion":"1.0.0"}' >"$work/oci/oci-layout"
  tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -cf "$dir/pause.tar" -C "$work/oci" .
  rm -rf "$work"
}
if ! k8s_built; then
  echo "testenv/build.sh: building the control plane into $out (cold: 10-20 minutes)" >&2
  tmp="$out.tmp.$$"
  mkdir -p "$tmp"
  version=$(grep -E '^\s*k8s.io/kubernetes v' "$here/k8s/go.mod" | awk '{print $2}')
  minor=$(echo "$version" | cut -d. -f2)
  ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  (cd "$here/k8s" && go build -trimpath -ldflags "$ldflags" -o "$tmp/" "${binaries[@]/#/./cmd/}") >&2
  pause_image "$tmp" >&2
  rm -rf "$out" && mv "$tmp" "$out"
fi
if [ ! -x "$registry" ]; then
  echo "testenv/build.sh: building the image registry into $(dirname "$registry") (cold: 1-3 minutes)" >&2
  tmp="$(dirname "$registry").tmp.$$"
  mkdir -p "$tmp"
  (cd "$here/registry" && go build -trimpath -ldflags "-s -w" -o "$tmp/registry" github.com/distribution/distribution/v3/cmd/registry) >&2
  rm -rf "$(dirname "$registry")" && mv "$tmp" "$(dirname "$registry")"
fi
ln -sfn "$registry" "$out/registry"
# The node's cluster DNS: CoreDNS from its Go module, with the plugins testenv/coredns/main.go names.
if [ ! -x "$coredns" ]; then
  echo "testenv/build.sh: building CoreDNS into $(dirname "$coredns") (cold: 2-4 minutes)" >&2
  tmp="$(dirname "$coredns").tmp.$$"
  mkdir -p "$tmp"
  (cd "$here/coredns" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$tmp/coredns" .) >&2
  rm -rf "$(dirname "$coredns")" && mv "$tmp" "$(dirname "$coredns")"
fi
ln -sfn "$coredns" "$out/coredns"
echo "$out"
