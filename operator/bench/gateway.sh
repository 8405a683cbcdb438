#!/usr/bin/env bash
# Benchmarks the agent gateway: N idle agents (default 10,000) against a release build, the
# gateway's RSS per connection, then heartbeat→ack latency at a steady rate. Prints last:
#   gateway_rss_kib_per_conn=…  gateway_heartbeat_ack_p50_ms=…  gateway_heartbeat_ack_p99_ms=…
# Targets (ARCHITECTURE.md): ≤ 16 KiB per idle agent, p99 ≤ 10 ms.
# Knobs: AGENTS, RATE (heartbeats/s in total), DURATION (seconds), SOURCES (loopback source addresses).
set -euo pipefail
cd "$(dirname "$0")/../.."

AGENTS=${AGENTS:-10000}
RATE=${RATE:-1000}
DURATION=${DURATION:-20}
SOURCES=${SOURCES:-4}

# Each side holds one descriptor per agent.
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" -lt $((AGENTS + 100)) ]; then
    echo "ulimit -n is $(ulimit -n); $((AGENTS + 100)) descriptors are needed" >&2
    exit 1
fi

cargo build -q --release -p stagely-operator --example gateway-bench
bin="${CARGO_TARGET_DIR:-target}/release/examples/gateway-bench"

work=$(mktemp -d)
trap 'kill "$gateway_pid" 2>/dev/null || true; wait "$gateway_pid" 2>/dev/null || true; rm -rf "$work"' EXIT
head -c 32 /dev/urandom >"$work/key"

"$bin" serve --key-file "$work/key" >"$work/addr" 2>"$work/gateway.log" &
gateway_pid=$!
for _ in $(seq 100); do
    [ -s "$work/addr" ] && break
    sleep 0.1
done
addr=$(head -n1 "$work/addr")
[ -n "$addr" ] || { echo "the gateway did not start:" >&2; cat "$work/gateway.log" >&2; exit 1; }

"$bin" load --pid "$gateway_pid" --addr "$addr" --key-file "$work/key" \
    --agents "$AGENTS" --rate "$RATE" --seconds "$DURATION" --sources "$SOURCES"
