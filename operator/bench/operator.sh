#!/usr/bin/env bash
# Benchmarks the operator: its real controllers, in a release build, against testenv's real
# control plane, driving N Environments (default 1,000) to Ready through a fake cloud whose
# instances are simulated agents speaking the real protocol to the gateway. Prints last:
#   operator_envs=… operator_until=Ready operator_seconds_to_ready=… operator_rss_mib=… apiserver_429=…
# (or operator_until=BuildsSucceeded operator_seconds_to_built=… for an operator without a Ready
# phase). Targets (ARCHITECTURE.md): 1,000 Ready in ≤ 60 s on 2 cores, RSS ≤ 100 MiB at 5,000,
# no 429.
# Knobs: N (Environments), PER_NAMESPACE (Environments per team), UNTIL (ready|built|auto),
# KEEP (a directory to keep the operator's and the control plane's logs in), OPERATOR_WRAPPER (a
# profiler to run the operator under, e.g. `heaptrack -o /tmp/operator`; its RSS is then not the
# operator's, and the process the wrapper starts outlives the bench: kill it when the bench ends).
set -euo pipefail
cd "$(dirname "$0")/../.."

N=${N:-1000}
PER_NAMESPACE=${PER_NAMESPACE:-500}
UNTIL=${UNTIL:-auto}

# The driver holds a connection per simulated agent (builders and previews), and so does the
# operator.
ulimit -n "$(ulimit -Hn)"
if [ "$(ulimit -n)" -lt $((2 * N + 1000)) ]; then
    echo "ulimit -n is $(ulimit -n); $((2 * N + 1000)) descriptors are needed" >&2
    exit 1
fi
command -v redis-server >/dev/null || { echo "redis-server is missing: run make deps" >&2; exit 1; }
STAGELY_TESTENV_BIN=${STAGELY_TESTENV_BIN:-$(testenv/build.sh)}
export STAGELY_TESTENV_BIN

cargo build -q --release -p stagely-operator --example operator-bench
bin="${CARGO_TARGET_DIR:-target}/release/examples/operator-bench"

"$bin" run --envs "$N" --per-namespace "$PER_NAMESPACE" --until "$UNTIL" ${KEEP:+--keep "$KEEP"}
