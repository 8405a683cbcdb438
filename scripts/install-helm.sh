#!/usr/bin/env bash
# Builds helm from its Go module (helm.sh/helm/v4, pinned below) into the cache, for the chart's
# tests. Idempotent: a built pin is never built again. Prints the binary's path last.
#
# `go install` through the Go module proxy; nothing is downloaded from release pages.
set -euo pipefail

helm_version=v4.3.1
cache=${STAGELY_CACHE:-$HOME/.cache/stagely}
dir="$cache/helm-$helm_version"
bin="$dir/bin/helm"
if [ ! -x "$bin" ]; then
  command -v go >/dev/null || { echo "install-helm: Go is required to build helm" >&2; exit 1; }
  echo "install-helm: building helm $helm_version from its Go module (cold: about 4 minutes)" >&2
  tmp="$dir.tmp.$$"
  rm -rf "$tmp"
  mkdir -p "$tmp/bin"
  (
    export GOCACHE=${GOCACHE:-$cache/go-build} GOMODCACHE=${GOMODCACHE:-$cache/go-mod}
    GOBIN="$tmp/bin" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" \
      "helm.sh/helm/v4/cmd/helm@$helm_version"
  )
  rm -rf "$dir" && mv "$tmp" "$dir"
fi
echo "$bin"
