#!/usr/bin/env bash
# Builds etcd, kube-apiserver, kube-controller-manager and kubectl from testenv/k8s (Go modules) into a
# cache directory keyed by the module's content, and prints that directory. A second run on the
# same machine finds the binaries there and builds nothing. The image registry (testenv/registry)
# is built into a directory keyed by its own module's content and linked into the same directory,
# so changing one module never rebuilds the other.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${STAGELY_CACHE:-$HOME/.cache/stagely}
key=$(cd "$here/k8s" && cat go.mod go.sum $(find cmd -name '*.go' | sort) | sha256sum | cut -c1-16)
out="$cache/testenv/$key/bin"
registry_key=$(cd "$here/registry" && cat go.mod go.sum | sha256sum | cut -c1-16)
registry="$cache/testenv/registry-$registry_key/registry"
k8s_built() { [ -x "$out/etcd" ] && [ -x "$out/kube-apiserver" ] && [ -x "$out/kube-controller-manager" ] && [ -x "$out/kubectl" ]; }
registry_linked() { [ -x "$out/registry" ] && [ "$(readlink "$out/registry")" = "$registry" ]; }
if k8s_built && registry_linked; then
  echo "$out"
  exit 0
fi
# Concurrent test binaries may all ask for the binaries at once: one builds, the others wait.
mkdir -p "$cache/testenv"
exec 9>"$cache/testenv/.lock"
flock 9
if k8s_built && registry_linked; then
  echo "$out"
  exit 0
fi
command -v go >/dev/null || { echo "testenv/build.sh: go is not installed (need Go >= 1.26)" >&2; exit 1; }
export GOCACHE=${GOCACHE:-$cache/go-build}
export GOMODCACHE=${GOMODCACHE:-$cache/go-mod}
export GOFLAGS=-mod=mod
if ! k8s_built; then
  echo "testenv/build.sh: building the control plane into $out (cold: 10-20 minutes)" >&2
  tmp="$out.tmp.$$"
  mkdir -p "$tmp"
  version=$(grep -E '^\s*k8s.io/kubernetes v' "$here/k8s/go.mod" | awk '{print $2}')
  minor=$(echo "$version" | cut -d. -f2)
  ldflags="-s -w -X k8s.io/component-base/version.gitVersion=$version -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
  (cd "$here/k8s" && go build -trimpath -ldflags "$ldflags" -o "$tmp/" ./cmd/etcd ./cmd/kube-apiserver ./cmd/kube-controller-manager ./cmd/kubectl) >&2
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
echo "$out"
