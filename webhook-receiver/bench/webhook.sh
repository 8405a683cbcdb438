#!/usr/bin/env bash
# Benchmarks the webhook receiver: a release build against testenv's real control plane, fed
# signed pull_request synchronize deliveries over kept-alive connections. Measures its throughput
# back to back, then finds its maximum rate on this machine's cores (the highest it keeps up with
# on a fixed schedule, by bisection), then holds 70% of it and measures the ack latency. Prints
# last:
#   webhook_max_rps=… webhook_ack_p99_ms=…
# Target (ARCHITECTURE.md): p99 ≤ 10 ms at 70% of the maximum rate.
# Knobs: SECONDS_EACH (the back-to-back and held measurements), TRIAL_SECONDS (each step of the
# search), CONNECTIONS (in every measurement), PULL_REQUESTS (the deliveries are about; each
# one's Environment is written at most once a second), FRACTION (of the maximum held), KEEP (a
# directory to keep the receiver's log in).
set -euo pipefail
cd "$(dirname "$0")/../.."

SECONDS_EACH=${SECONDS_EACH:-15}
TRIAL_SECONDS=${TRIAL_SECONDS:-5}
CONNECTIONS=${CONNECTIONS:-64}
PULL_REQUESTS=${PULL_REQUESTS:-16}
FRACTION=${FRACTION:-0.7}

STAGELY_TESTENV_BIN=${STAGELY_TESTENV_BIN:-$(testenv/build.sh)}
export STAGELY_TESTENV_BIN

cargo build -q --release -p stagely-webhook-receiver --bin stagely-webhook-receiver --example webhook-bench
target="${CARGO_TARGET_DIR:-target}/release"

# PIN=1: the receiver on core 0, this load generator and the control plane on core 1, so that the
# load generator's own CPU does not queue the receiver's answers (as wrk is kept apart from the
# server it measures).
pin=()
if [ "${PIN:-0}" = 1 ]; then
  command -v taskset >/dev/null || { echo "bench-webhook: PIN=1 needs taskset (util-linux)" >&2; exit 1; }
  export RECEIVER_CPUS=0
  pin=(taskset -c 1)
fi

"${pin[@]}" "$target/examples/webhook-bench" --receiver-bin "$target/stagely-webhook-receiver" \
    --seconds "$SECONDS_EACH" --trial-seconds "$TRIAL_SECONDS" --connections "$CONNECTIONS" --pull-requests "$PULL_REQUESTS" \
    --fraction "$FRACTION" ${KEEP:+--keep "$KEEP"}
