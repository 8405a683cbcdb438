#!/usr/bin/env bash
# make bench-proxy: wrk against the Stagely edge proxy and against nginx configured as the
# equivalent reverse proxy (upstream keepalive, as many workers as the proxy has threads), both
# in front of the same upstream, in one run. Prints the comparison last.
#
# Needs wrk, nginx and redis-server (scripts/install-deps.sh installs them).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
duration=${BENCH_DURATION:-10}
connections=${BENCH_CONNECTIONS:-64}
threads=${BENCH_PROXY_THREADS:-$(nproc)}

for tool in wrk nginx redis-server; do
  command -v "$tool" >/dev/null || { echo "bench-proxy: $tool is not installed (run scripts/install-deps.sh)" >&2; exit 1; }
done

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() {
  for _ in $(seq 1 200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "bench-proxy: nothing listens on port $1" >&2; exit 1
}

upstream_port=$(port); nginx_port=$(port); proxy_port=$(port); ops_port=$(port); redis_port=$(port)

# The upstream: nginx answering a small static body, one worker, its own process tree.
mkdir -p "$work/upstream" "$work/proxy"
cat > "$work/upstream/nginx.conf" <<CONF
worker_processes 1;
pid $work/upstream/nginx.pid;
error_log $work/upstream/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  server {
    listen 127.0.0.1:$upstream_port backlog=4096;
    location / { return 200 "hello from the preview\n"; }
  }
}
CONF
nginx -c "$work/upstream/nginx.conf" -p "$work/upstream" -g 'daemon off;' & pids+=($!)

# nginx as the reverse proxy under comparison: same headers as Stagely sets.
cat > "$work/proxy/nginx.conf" <<CONF
worker_processes $threads;
pid $work/proxy/nginx.pid;
error_log $work/proxy/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  keepalive_requests 1000000;
  upstream preview { server 127.0.0.1:$upstream_port; keepalive 256; }
  server {
    listen 127.0.0.1:$nginx_port backlog=4096;
    location / {
      proxy_pass http://preview;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host \$host;
      proxy_set_header X-Forwarded-For \$remote_addr;
      proxy_set_header X-Forwarded-Proto \$scheme;
      proxy_set_header X-Forwarded-Host \$host;
      proxy_set_header X-Stagely-Project shop;
      proxy_set_header X-Stagely-PR 42;
      proxy_set_header X-Stagely-Environment team-a/shop-pr-42;
    }
  }
}
CONF
nginx -c "$work/proxy/nginx.conf" -p "$work/proxy" -g 'daemon off;' & pids+=($!)

redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no >/dev/null & pids+=($!)
wait_port "$redis_port"
route=$(printf '{"status":"ready","ip":"127.0.0.1","port":%s,"project":"shop","namespace":"team-a","environment":"shop-pr-42","pr":42}' "$upstream_port")
redis-cli -p "$redis_port" SET route:bench1 "$route" >/dev/null

echo "bench-proxy: building the proxy (release)" >&2
(cd "$root" && cargo build -q --release -p stagely-edge-proxy)
bin="${CARGO_TARGET_DIR:-$root/target}/release/stagely-edge-proxy"
TOKIO_WORKER_THREADS=$threads RUST_LOG=warn "$bin" --domain bench.test --redis-url "redis://127.0.0.1:$redis_port" \
  --http-addr "127.0.0.1:$proxy_port" --ops-addr "127.0.0.1:$ops_port" --rate-limit 0 & pids+=($!)
wait_port "$upstream_port"; wait_port "$nginx_port"; wait_port "$proxy_port"

host="bench1.bench.test"
curl -sf -H "Host: $host" "http://127.0.0.1:$proxy_port/" | grep -q "hello from the preview" || { echo "bench-proxy: the proxy does not answer" >&2; exit 1; }
curl -sf -H "Host: $host" "http://127.0.0.1:$nginx_port/" | grep -q "hello from the preview" || { echo "bench-proxy: nginx does not answer" >&2; exit 1; }

# wrk prints "Requests/sec: N" and, with --latency, "99% Xms|Xus|Xs".
run() {
  local port=$1 out
  wrk -t2 -c"$connections" -d2s -H "Host: $host" "http://127.0.0.1:$port/" >/dev/null  # warm up
  out=$(wrk -t2 -c"$connections" -d"${duration}s" --latency -H "Host: $host" "http://127.0.0.1:$port/")
  echo "$out" >&2
  local rps p99
  rps=$(echo "$out" | awk '/^Requests\/sec:/ {print $2}')
  p99=$(echo "$out" | awk '$1 == "99%" {print $2}')
  p99_ms=$(python3 -c "
v='$p99'
for unit, f in (('us', 0.001), ('ms', 1.0), ('s', 1000.0)):
    if v.endswith(unit):
        print(round(float(v[:-len(unit)]) * f, 3)); break
")
  echo "$rps $p99_ms"
}

# Interleaved rounds, medians reported: this machine's neighbours make single runs noisy.
rounds=${BENCH_ROUNDS:-3}
nginx_results=(); proxy_results=()
for round in $(seq 1 "$rounds"); do
  echo "bench-proxy: round $round/$rounds: nginx" >&2
  nginx_results+=("$(run "$nginx_port")")
  echo "bench-proxy: round $round/$rounds: stagely-edge-proxy" >&2
  proxy_results+=("$(run "$proxy_port")")
done
median() { python3 -c "import statistics, sys; print(statistics.median(float(x) for x in sys.argv[1:]))" "$@"; }
field() { local i=$1; shift; for r in "$@"; do echo "$r" | awk -v i="$i" '{print $i}'; done; }
nginx_rps=$(median $(field 1 "${nginx_results[@]}")); nginx_p99=$(median $(field 2 "${nginx_results[@]}"))
proxy_rps=$(median $(field 1 "${proxy_results[@]}")); proxy_p99=$(median $(field 2 "${proxy_results[@]}"))
echo "bench-proxy: nginx rounds (rps p99_ms): ${nginx_results[*]}" >&2
echo "bench-proxy: proxy rounds (rps p99_ms): ${proxy_results[*]}" >&2
non2xx=$(curl -s "http://127.0.0.1:$ops_port/metrics" | awk '/^stagely_edge_proxy_requests_total/ && $1 !~ /code="200"/ {n += $2} END {print n + 0}')

echo "proxy_non_200_responses=$non2xx"
echo "proxy_rps=$proxy_rps"
echo "nginx_rps=$nginx_rps"
echo "proxy_vs_nginx_rps_ratio=$(python3 -c "print(round($proxy_rps / $nginx_rps, 3))")"
echo "proxy_p99_ms=$proxy_p99"
echo "nginx_p99_ms=$nginx_p99"
