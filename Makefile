# Stagely. `make demo` runs it; `make test` runs the tests (see README.md).
SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := build

CARGO ?= cargo
DEMO_DIR ?= .demo
# The control plane binaries (etcd, kube-apiserver, kube-controller-manager, kubectl), built once
# per machine by testenv/build.sh into ~/.cache/stagely.
TESTENV_BIN = $(shell testenv/build.sh)

.PHONY: deps build test check crds crds-check fmt fmt-check clippy testenv demo demo-down bench bench-proxy bench-gateway bench-operator

build: ## Build every crate.
	$(CARGO) build --workspace --all-features

deps: ## Install what the tests need and the machine lacks (redis-server, nginx, wrk, moto; idempotent).
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

demo: testenv ## Start a local control plane and the operator, install the CRDs and the examples, and show them.
	@$(CARGO) build -q -p stagely-testenv
	@$(CARGO) run -q -p stagely-testenv -- up "$(DEMO_DIR)"
	@kubectl() { "$(TESTENV_BIN)/kubectl" --kubeconfig "$(DEMO_DIR)/kubeconfig" "$$@"; }; \
	kubectl apply -f crds/ && \
	kubectl wait --for condition=Established --timeout=60s -f crds/ && \
	kubectl apply -f examples/
	@$(CARGO) build -q -p stagely-operator -p stagely-agent
	@target="$${CARGO_TARGET_DIR:-target}/debug"; \
	( KUBECONFIG="$(DEMO_DIR)/kubeconfig" exec nohup "$$target/stagely-operator" \
		--ops-addr 127.0.0.1:18080 --gateway-addr 127.0.0.1:18443 \
		--local-agent-bin "$$(realpath "$$target/stagely-agent")" --local-state-dir "$(DEMO_DIR)/local" \
		</dev/null >"$(DEMO_DIR)/operator.log" 2>&1 & echo $$! >>"$(DEMO_DIR)/pids" )
	@kubectl() { "$(TESTENV_BIN)/kubectl" --kubeconfig "$(DEMO_DIR)/kubeconfig" "$$@"; }; \
	kubectl wait --for condition=Ready --timeout=60s cloudprovider/local && \
	echo && kubectl get proj,cp,env,bj && echo && \
	echo "The operator runs too (log: $(DEMO_DIR)/operator.log); the local CloudProvider is Ready." && \
	echo "The control plane keeps running. Look around with:" && \
	echo "  $(TESTENV_BIN)/kubectl --kubeconfig $(DEMO_DIR)/kubeconfig get env" && \
	echo "Stop it with:" && \
	echo "  make demo-down"

demo-down: ## Stop the demo's control plane.
	@$(CARGO) run -q -p stagely-testenv -- down "$(DEMO_DIR)"

bench-proxy: deps ## Benchmark the edge proxy against nginx on the same upstream (wrk).
	edge-proxy/bench/bench.sh

bench-gateway: ## Benchmark the agent gateway: RSS per idle agent at 10,000 agents, heartbeat ack latency.
	operator/bench/gateway.sh

bench-operator: deps testenv ## Benchmark the operator: N (default 1,000) Environments to Ready against the real control plane.
	operator/bench/operator.sh

bench: bench-proxy bench-gateway bench-operator ## Every benchmark.
