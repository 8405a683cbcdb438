# Stagely. `make demo` runs it; `make test` runs the tests (see README.md).
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := build

CARGO ?= cargo
DEMO_DIR ?= .demo
# Seconds `make fuzz` runs each fuzz target for.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS = stagely_yaml agent_protocol webhook_payload proxy_head
CARGO_FUZZ ?= $(or $(STAGELY_CACHE),$(HOME)/.cache/stagely)/cargo-fuzz/bin/cargo-fuzz
# The control plane binaries (etcd, kube-apiserver, kube-controller-manager, kubectl), built once
# per machine by testenv/build.sh into ~/.cache/stagely.
TESTENV_BIN = $(shell testenv/build.sh)

.PHONY: deps build test canary check crds crds-check fmt fmt-check clippy testenv demo demo-down bench bench-proxy bench-gateway bench-operator bench-webhook fuzz fault-test images

build: ## Build every crate.
	$(CARGO) build --workspace --all-features

images: ## Build the operator, webhook receiver and edge proxy images with podman from static binaries built here (scripts/images.sh; amd64).
	@CARGO="$(CARGO)" scripts/images.sh

deps: ## Install what the tests need and the machine lacks (redis-server, podman, Docker and its compose plugin, nginx, wrk, moto, Prism, webhook schemas; idempotent).
	@scripts/install-deps.sh

testenv: ## Build the test control plane (cold: 10-20 minutes; then cached).
	@testenv/build.sh >/dev/null

test: deps testenv ## Run every test, unit and integration, against the real control plane.
	STAGELY_TESTENV_BIN="$(TESTENV_BIN)" $(CARGO) test --workspace --all-features --no-fail-fast

canary: deps testenv ## The canary secret test alone (it runs in `make test` too): a Secret value through the whole flow, then searched for everywhere but the app container; prints canary_hits=0.
	STAGELY_TESTENV_BIN="$(TESTENV_BIN)" $(CARGO) test -p stagely-operator --test canary -- --nocapture

# Environments `make fault-test` creates while it SIGKILLs the operator.
N ?= 1000

fault-test: deps testenv ## The fault suite at N (default 1,000) Environments: the operator SIGKILLed at random while they are created, against moto, the DigitalOcean and Hetzner fakes and local; prints fault_creates=… fault_kills=… duplicates=… leaked=… last.
	STAGELY_TESTENV_BIN="$(TESTENV_BIN)" STAGELY_FAULT_N="$(N)" $(CARGO) test -p stagely-operator --test fault -- --nocapture

fuzz: ## Run each fuzz target (fuzz/) for FUZZ_SECONDS (default 60); crashes go to fuzz/artifacts/<target>/.
	@[ -x "$(CARGO_FUZZ)" ] || scripts/install-deps.sh
	$(CARGO_FUZZ) build -s none
	@logs=$$(mktemp -d); trap 'rm -rf "$$logs"' EXIT; \
	for target in $(FUZZ_TARGETS); do \
	  echo "fuzz: $$target for $(FUZZ_SECONDS) s"; \
	  $(CARGO_FUZZ) run -s none "$$target" -- -max_total_time=$(FUZZ_SECONDS) -print_final_stats=1 \
	    >"$$logs/$$target" 2>&1 || { tail -n 40 "$$logs/$$target" >&2; exit 1; }; \
	done; \
	for target in $(FUZZ_TARGETS); do \
	  echo "fuzz_$${target}_execs=$$(sed -n 's/^stat::number_of_executed_units: *//p' "$$logs/$$target")"; \
	done

check: fmt-check clippy crds-check ## Formatting, lints, and CRD drift.

crds: ## Regenerate crds/ from the api/ types, and the chart's copy (charts/stagely/crds/).
	$(CARGO) run -q -p stagely-api --bin crdgen -- crds
	rm -f charts/stagely/crds/*.yaml && cp crds/*.yaml charts/stagely/crds/

crds-check:
	@tmp=$$(mktemp -d); trap 'rm -rf "$$tmp"' EXIT; \
	$(CARGO) run -q -p stagely-api --bin crdgen -- "$$tmp"; \
	if ! diff -ru crds "$$tmp"; then echo "crds/ is out of date with api/: run 'make crds' and commit the result" >&2; exit 1; fi; \
	if ! diff -ru crds charts/stagely/crds; then echo "charts/stagely/crds/ differs from crds/: run 'make crds' and commit the result" >&2; exit 1; fi

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
