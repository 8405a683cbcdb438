# Stagely. `make demo` runs it; `make test` runs the tests (see README.md).
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := build

CARGO ?= cargo
DEMO_DIR ?= .demo
# The control plane binaries (etcd, kube-apiserver, kube-controller-manager, kubectl), built once
# per machine by testenv/build.sh into ~/.cache/stagely.
TESTENV_BIN = $(shell testenv/build.sh)

.PHONY: deps build test check crds crds-check fmt fmt-check clippy testenv demo demo-down bench bench-proxy bench-gateway bench-operator bench-webhook

build: ## Build every crate.
	$(CARGO) build --workspace --all-features

deps: ## Install what the tests need and the machine lacks (redis-server, podman, Docker and its compose plugin, nginx, wrk, moto, Prism, webhook schemas; idempotent).
	@scripts/install-deps.sh

testenv: ## Build the test control plane (cold: 10-20 minutes; then cached).
	@testenv/build.sh >/dev/null

test: deps testenv ## Run every test, unit and integration, against the real control plane.
	STAGELY_TESTENV_BIN="$(TESTENV_BIN)" $(CARGO) test --workspace --all-features --no-fail-fast

check: fmt-check clippy crds-check ## Formatting, lints, and CRD drift.

crds: ## Regenerate crds/ from the api/ types.
	$(CARGO) run -q -p stagely-api --bin crdgen -- crds

crds-check:
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(CARGO) run -q -p stagely-api --bin crdgen -- "$$tmp"; \
	if ! diff -ru crds "$$tmp"; then echo "crds/ is out of date with api/: run 'make crds' and commit the result" >&2; exit 1; fi

fmt: ## Format the code.
	$(CARGO) fmt --all

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --workspace --all-targets --all-features -- -D warnings

demo: ## Preview a sample app's pull request on this machine, end to end (scripts/demo.sh; leaves it running).
	@DEMO_DIR="$(DEMO_DIR)" CARGO="$(CARGO)" scripts/demo.sh up

demo-down: ## Stop the demo and remove everything it started (idempotent).
	@DEMO_DIR="$(DEMO_DIR)" CARGO="$(CARGO)" scripts/demo.sh down

bench-proxy: deps ## Benchmark the edge proxy against nginx on the same upstream (wrk).
	edge-proxy/bench/bench.sh

bench-gateway: ## Benchmark the agent gateway: RSS per idle agent at 10,000 agents, heartbeat ack latency.
	operator/bench/gateway.sh

bench-operator: deps testenv ## Benchmark the operator: N (default 1,000) Environments to Ready against the real control plane.
	operator/bench/operator.sh

bench-webhook: testenv ## Benchmark the webhook receiver: its maximum rate of signed deliveries, then ack latency at 70% of it.
	webhook-receiver/bench/webhook.sh

bench: bench-proxy bench-gateway bench-operator bench-webhook ## Every benchmark.
