#!/usr/bin/env bash
# `make demo` and `make demo-down`: Stagely's main job on one machine.
#
#   scripts/demo.sh up     starts the whole stack on loopback (control plane, redis-server, the
#                          registry with token auth, the edge proxy, the operator, the webhook
#                          receiver), delivers a signed `pull_request` `opened` webhook for pull
#                          request #1 of a sample app, which is previewed through the `local`
#                          CloudProvider with podman, shows it served, then pushes a second
#                          commit, delivers `synchronize` and shows it redeployed. Everything
#                          keeps running for you to look around.
#   scripts/demo.sh down   stops and removes everything `up` started. Safe to run twice.
#
# Everything lives in $DEMO_DIR (default .demo): the control plane's files, the processes' logs
# and pids, the podman storage (its own containers.conf and storage.conf), the registry's data,
# the app's git repository and the agents' state. The ports are fixed (below) and can be moved
# with the DEMO_*_PORT variables; `up` refuses to start when one is taken.
set -euo pipefail

repo_root=$(cd "$(dirname "$0")/.." && pwd)
demo_dir=$(realpath -m "${DEMO_DIR:-$repo_root/.demo}")
target_dir=$(realpath -m "${CARGO_TARGET_DIR:-$repo_root/target}")/debug
cargo=${CARGO:-cargo}

operator_ops_port=${DEMO_OPERATOR_OPS_PORT:-18080}
gateway_port=${DEMO_GATEWAY_PORT:-18443}
proxy_port=${DEMO_PROXY_PORT:-18000}
proxy_ops_port=${DEMO_PROXY_OPS_PORT:-18090}
redis_port=${DEMO_REDIS_PORT:-18379}
registry_port=${DEMO_REGISTRY_PORT:-18500}
webhook_port=${DEMO_WEBHOOK_PORT:-18088}
webhook_ops_port=${DEMO_WEBHOOK_OPS_PORT:-18091}
domain=preview.localhost
env_name=hello-pr-1
# The repository the demo's Project is bound to (examples/demo/project.yaml), which its webhooks name.
repository=stagely-demo/hello
# Deadline for each preview to become Ready, in seconds.
timeout=${DEMO_TIMEOUT:-600}

started_at=$(date +%s)

if [ -t 1 ]; then bold=$'\033[1m' red=$'\033[1;31m' plain=$'\033[0m'; else bold="" red="" plain=""; fi
# Each step's header says how long the demo has run.
say() { printf '\n%s==> [%s] %s%s\n' "$bold" "$(elapsed "$started_at")" "$*" "$plain"; }
note() { printf '    %s\n' "$*"; }

kubectl() { "$testenv_bin/kubectl" --kubeconfig "$demo_dir/kubeconfig" "$@"; }

# Podman as the tests run it here (cgroupfs, runc, low ulimits), with storage, networks and libpod
# tmp dir of the demo's own: `down` resets exactly this and nothing else on the host, and no
# other podman's reset makes this one think the machine rebooted.
podman_env() {
  export CONTAINERS_CONF="$demo_dir/podman/containers.conf"
  export CONTAINERS_STORAGE_CONF="$demo_dir/podman/storage.conf"
}

write_podman_config() {
  mkdir -p "$demo_dir/podman/networks"
  cat >"$demo_dir/podman/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=1024:1024"]

[engine]
cgroup_manager = "cgroupfs"
runtime = "runc"
tmp_dir = "$demo_dir/podman/tmp"

[network]
network_config_dir = "$demo_dir/podman/networks"
EOF
  cat >"$demo_dir/podman/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$demo_dir/podman/graph"
runroot = "$demo_dir/podman/run"
EOF
}

port_taken() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Starts a long-running process detached from this shell (its own session, so Ctrl-C on make
# leaves it alone), its output in $demo_dir/<name>.log, its pid in $demo_dir/pids (which
# `stagely-testenv down` stops) and in $demo_dir/<name>.pid.
start_detached() {
  local name=$1
  shift
  setsid "$@" </dev/null >"$demo_dir/$name.log" 2>&1 &
  echo $! >"$demo_dir/$name.pid"
  echo $! >>"$demo_dir/pids"
}

# wait_until DESCRIPTION SECONDS COMMAND...: runs COMMAND every second until it succeeds.
wait_until() {
  local what=$1 seconds=$2
  shift 2
  local deadline=$(($(date +%s) + seconds))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      fail "timed out after ${seconds}s waiting for $what"
    fi
    sleep 1
  done
}

healthy() { curl -fsS --max-time 2 "http://127.0.0.1:$1/healthz"; }
ready() { curl -fsS --max-time 2 "http://127.0.0.1:$1/readyz"; }

tail_log() {
  local file=$1 lines=${2:-20}
  [ -f "$file" ] || return 0
  printf -- '--- last %s lines of %s ---\n' "$lines" "${file#"$repo_root"/}"
  tail -n "$lines" "$file"
}

# What went wrong, as far as the demo can tell: the Environment's conditions, its BuildJobs, the
# logs of the operator and of each agent.
diagnose() {
  {
    echo
    echo "--- Environment $env_name ---"
    kubectl get env "$env_name" 2>&1 || true
    kubectl get env "$env_name" -o jsonpath='{range .status.conditions[*]}{.type}={.status} ({.reason}): {.message}{"\n"}{end}' 2>&1 || true
    echo "--- BuildJobs ---"
    kubectl get bj -o custom-columns='NAME:.metadata.name,PHASE:.status.phase,MESSAGE:.status.message' 2>&1 || true
    tail_log "$demo_dir/operator.log" 30
    tail_log "$demo_dir/webhook-receiver.log" 10
    local log
    find "$demo_dir/local" -name agent.log 2>/dev/null | while read -r log; do tail_log "$log" 15; done
    echo
    echo "The demo keeps running so you can look around (kubeconfig: ${demo_dir#"$repo_root"/}/kubeconfig)."
    echo "Stop it with: make demo-down"
  } >&2
}

fail() {
  printf '\n%sdemo: %s%s\n' "$red" "$*" "$plain" >&2
  if [ -f "$demo_dir/kubeconfig" ]; then
    diagnose
  fi
  exit 1
}

elapsed() {
  local s=$(($(date +%s) - $1))
  printf '%dm%02ds' $((s / 60)) $((s % 60))
}

env_field() { kubectl get env "$env_name" -o jsonpath="$1" 2>/dev/null; }

condition_message() {
  env_field "{.status.conditions[?(@.type==\"$1\")].message}"
}

# Shows the Environment's phase each time it changes until the run of `sha` is Ready; fails on
# Failed or at the deadline. It follows a watch (`kubectl get -w`), so that a phase that lasts
# less than a second (Pending, while stagely.yaml is read) shows too.
watch_until_ready() {
  local sha=$1 since shown="" phase="" run_sha url watch watch_pid left
  since=$(date +%s)
  local deadline=$((since + timeout))
  printf '    %-7s %-12s %-4s %-11s %s\n' TIME NAME PR PHASE URL
  while :; do
    # A watch ends after a while on the apiserver's side: start another where it stopped.
    exec {watch}< <(kubectl get env "$env_name" --watch \
      -o jsonpath='{.status.phase}|{.status.run.sha}|{.status.url}{"\n"}' 2>/dev/null)
    watch_pid=$!
    while left=$((deadline - $(date +%s))) && [ "$left" -gt 0 ] &&
      IFS='|' read -r -t "$left" -u "$watch" phase run_sha url; do
      # Until the operator has seen the new head, the phase is the previous run's.
      [ "$run_sha" = "$sha" ] || continue
      if [ -n "$phase" ] && [ "$phase" != "$shown" ]; then
        printf '    %-7s %-12s %-4s %-11s %s\n' "$(elapsed "$since")" "$env_name" 1 "$phase" "$url"
        case "$phase" in
          Building)
            kubectl get bj -l "stagely.dev/environment=$env_name" --no-headers \
              -o custom-columns='NAME:.metadata.name,COMMIT:.spec.commit' 2>/dev/null |
              awk -v sha="$sha" '$2 == sha {print "                    BuildJob " $1}' || true
            ;;
          Deploying) note "                BuildsSucceeded: $(condition_message BuildsSucceeded)" ;;
        esac
        shown=$phase
      fi
      case "$phase" in
        Ready | Failed) break ;;
      esac
    done
    kill "$watch_pid" 2>/dev/null || true
    exec {watch}<&-
    case "$shown" in
      Ready) return 0 ;;
      Failed) fail "the run of ${sha:0:7} failed" ;;
    esac
    if [ "$(date +%s)" -ge "$deadline" ]; then
      fail "the preview of ${sha:0:7} was not Ready within ${timeout}s (its phase: ${shown:-none yet})"
    fi
    sleep 1
  done
}

# Fetches the preview through the edge proxy until the page shows `version`, and prints it.
fetch_until() {
  local version=$1 host=$2 body="" deadline=$(($(date +%s) + 120))
  note "\$ curl -H 'Host: $host' http://127.0.0.1:$proxy_port/"
  while :; do
    body=$(curl -sS --max-time 5 -H "Host: $host" "http://127.0.0.1:$proxy_port/" 2>&1) || true
    if grep -q "version: <b>$version</b>" <<<"$body"; then
      sed 's/^/    | /' <<<"$body"
      return 0
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      printf '%s\n' "$body" | sed 's/^/    | /' >&2
      fail "the edge proxy did not serve version $version at $host within 120s (its last answer is above)"
    fi
    sleep 1
  done
}

# One build of every binary the demo runs (always the same set, so that cargo's feature
# unification never makes `up` and `down` rebuild each other's dependencies).
build() {
  "$cargo" build -q -p stagely-testenv -p stagely-operator -p stagely-agent -p stagely-edge-proxy \
    -p stagely-webhook-receiver
}

git_demo() { git -C "$demo_dir/repo" -c user.name="Stagely demo" -c user.email=demo@stagely.invalid "$@"; }

# post_webhook EVENT FILE: posts FILE to the receiver as GitHub delivers an EVENT webhook: signed
# with the webhook secret (X-Hub-Signature-256), with a fresh delivery id. Succeeds on a 2xx and
# leaves the answer in $webhook_answer.
post_webhook() {
  local event=$1 file=$2 signature
  signature="sha256=$(openssl dgst -sha256 -hmac "$(cat "$demo_dir/webhook-secret")" -r <"$file" | cut -d' ' -f1)"
  webhook_delivery=$(cat /proc/sys/kernel/random/uuid)
  webhook_answer=$(curl -sS --max-time 10 -w ' %{http_code}' -X POST "http://127.0.0.1:$webhook_port/v1/webhooks/github" \
    -H 'Content-Type: application/json' -H "X-GitHub-Event: $event" \
    -H "X-GitHub-Delivery: $webhook_delivery" -H "X-Hub-Signature-256: $signature" \
    --data-binary "@$file") || return 1
  [[ "${webhook_answer##* }" == 2* ]]
}

# The webhooks' payloads, from examples/webhook/pull-request-opened.json (a complete payload as
# GitHub sends it), made about the demo's repository and pull request #1.
payload() {
  jq -c --arg repo "$repository" --arg updated "$(date -u +%Y-%m-%dT%H:%M:%SZ)" '
    .number = 1 | .repository.full_name = $repo | .repository.name = ($repo | split("/")[1])
    | .pull_request.number = 1 | .pull_request.updated_at = $updated
    | .pull_request.html_url = "https://github.com/\($repo)/pull/1" | .pull_request.head.ref = "demo"
    | .pull_request.head.repo.full_name = $repo | .pull_request.base.repo.full_name = $repo
    | .pull_request.user.login = "octocat"' "$repo_root/examples/webhook/pull-request-opened.json"
}

# GitHub pings a webhook when it is added; the demo pings until the receiver's caches hold the
# new Project and Secret.
ping_webhook() {
  payload | jq -c '{zen: "Keep it logically awesome.", hook_id: 1,
    hook: {type: "Repository", id: 1, name: "web", active: true, events: ["pull_request"],
      config: {content_type: "json", insecure_ssl: "0", url: "http://127.0.0.1/v1/webhooks/github"}},
    repository, sender}' >"$demo_dir/webhook-ping.json"
  post_webhook ping "$demo_dir/webhook-ping.json"
}

# deliver_pull_request ACTION SHA [BEFORE]: delivers pull request #1's ACTION webhook at SHA, and
# shows it and the receiver's answer.
deliver_pull_request() {
  local action=$1 sha=$2 before=${3:-} file="$demo_dir/webhook-$1.json"
  payload | jq -c --arg action "$action" --arg sha "$sha" --arg before "$before" '.action = $action | .pull_request.head.sha = $sha
      | if $action == "synchronize" then .before = $before | .after = $sha else . end' >"$file"
  post_webhook pull_request "$file" || fail "the webhook receiver refused the $action delivery: $webhook_answer"
  note "\$ curl -X POST http://127.0.0.1:$webhook_port/v1/webhooks/github --data-binary @${file#"$repo_root"/}"
  note "    -H 'X-GitHub-Event: pull_request' -H 'X-GitHub-Delivery: $webhook_delivery' -H 'X-Hub-Signature-256: sha256=…'"
  note "    | ${webhook_answer##* } ${webhook_answer% *}"
}

up() {
  say "Checking what the demo needs"
  "$repo_root/scripts/install-deps.sh" --demo
  testenv_bin=$("$repo_root/testenv/build.sh")

  say "Building Stagely's binaries (the first time takes a few minutes)"
  build

  if [ -e "$demo_dir" ]; then
    note "a demo already runs (or was left) in ${demo_dir#"$repo_root"/}: stopping it first"
    down >/dev/null
  fi
  local port
  for port in "$operator_ops_port" "$gateway_port" "$proxy_port" "$proxy_ops_port" "$redis_port" "$registry_port" \
    "$webhook_port" "$webhook_ops_port"; do
    if port_taken "$port"; then
      echo "demo: port $port on 127.0.0.1 is taken; free it or move the demo (DEMO_*_PORT, see scripts/demo.sh)" >&2
      exit 1
    fi
  done

  say "Starting the control plane, redis-server and the image registry (token auth)"
  mkdir -p "$demo_dir"
  "$target_dir/stagely-testenv" up "$demo_dir" \
    --redis-port "$redis_port" \
    --registry-port "$registry_port" \
    --registry-realm "http://127.0.0.1:$gateway_port/v1/registry/token" | sed 's/^/    /'
  kubectl apply -f "$repo_root/crds/" >/dev/null
  kubectl wait --for condition=Established --timeout=60s -f "$repo_root/crds/" >/dev/null
  note "CRDs installed: $(kubectl api-resources --api-group=stagely.dev -o name | sed 's/\..*//' | paste -sd ' ')"

  say "Starting the edge proxy (http://127.0.0.1:$proxy_port, *.$domain), the operator and the webhook receiver"
  write_podman_config
  podman_env
  (umask 077 && head -c 48 /dev/urandom | base64 >"$demo_dir/gateway.key")
  # Logs go to files: no colour codes in them.
  export NO_COLOR=1
  start_detached edge-proxy "$target_dir/stagely-edge-proxy" \
    --domain "$domain" \
    --redis-url "redis://127.0.0.1:$redis_port" \
    --http-addr "127.0.0.1:$proxy_port" \
    --ops-addr "127.0.0.1:$proxy_ops_port" \
    --threads 1
  wait_until "the edge proxy's /healthz" 30 healthy "$proxy_ops_port"
  # The agents the operator starts as "VMs" inherit its environment: KUBECONFIG is the
  # operator's alone, CONTAINERS_CONF and CONTAINERS_STORAGE_CONF are for their podman.
  start_detached operator env KUBECONFIG="$demo_dir/kubeconfig" RUST_LOG="${RUST_LOG:-info}" \
    "$target_dir/stagely-operator" \
    --ops-addr "127.0.0.1:$operator_ops_port" \
    --gateway-addr "127.0.0.1:$gateway_port" \
    --gateway-signing-key-file "$demo_dir/gateway.key" \
    --redis-url "redis://127.0.0.1:$redis_port" \
    --registry "127.0.0.1:$registry_port" \
    --registry-token-key-file "$demo_dir/registry/token.key" \
    --registry-token-cert-file "$demo_dir/registry/token.crt" \
    --local-agent-bin "$target_dir/stagely-agent" \
    --local-state-dir "$demo_dir/local" \
    --allow-local-provider \
    --github-api-url off \
    --source-cache-dir "$demo_dir/source" \
    --vm-check-interval-secs 5
  wait_until "the operator's /readyz (it leads)" 60 ready "$operator_ops_port"
  start_detached webhook-receiver env KUBECONFIG="$demo_dir/kubeconfig" RUST_LOG="${RUST_LOG:-info}" \
    "$target_dir/stagely-webhook-receiver" \
    --listen-addr "127.0.0.1:$webhook_port" \
    --ops-addr "127.0.0.1:$webhook_ops_port"
  wait_until "the webhook receiver's /readyz" 60 ready "$webhook_ops_port"
  note "webhooks: http://127.0.0.1:$webhook_port/v1/webhooks/github"
  note "logs: ${demo_dir#"$repo_root"/}/edge-proxy.log, ${demo_dir#"$repo_root"/}/operator.log, ${demo_dir#"$repo_root"/}/webhook-receiver.log"

  say "Creating the demo app's git repository from examples/app"
  mkdir -p "$demo_dir/repo"
  cp -r "$repo_root/examples/app/." "$demo_dir/repo/"
  cp /bin/busybox "$demo_dir/repo/busybox"
  git -C "$demo_dir/repo" init -q -b main
  git_demo add -A
  git_demo commit -q -m "Hello app, version v1"
  local sha1
  sha1=$(git_demo rev-parse HEAD)
  note "${demo_dir#"$repo_root"/}/repo at ${sha1:0:7}: $(git_demo ls-files | grep -v '^busybox$\|\.keep$' | paste -sd ' ') and busybox"

  say "Applying the local CloudProvider and the Project (with its Secrets and a new webhook secret)"
  kubectl apply -f "$repo_root/examples/cloudprovider-local.yaml" | sed 's/^/    /'
  (umask 077 && head -c 32 /dev/urandom | base64 | tr -d '/+=\n' >"$demo_dir/webhook-secret")
  kubectl create secret generic hello-github --from-file=webhookSecret="$demo_dir/webhook-secret" | sed 's/^/    /'
  sed "s|\${DEMO_REPO}|$demo_dir/repo|" "$repo_root/examples/demo/project.yaml" | kubectl apply -f - | sed 's/^/    /'
  note "GitHub feedback (the PR comment and deployment statuses) is off: the operator runs with"
  note "--github-api-url off, the demo has no GitHub credentials, only the webhook secret (its Project"
  note "says so: GitHubSecretIncomplete), and its repository is local."

  say "Delivering pull request #1's opened webhook to the receiver, signed as GitHub signs it"
  wait_until "the webhook receiver to answer a signed ping for $repository" 30 ping_webhook
  note "ping: ${webhook_answer##* } ${webhook_answer% *}"
  deliver_pull_request opened "$sha1"

  say "Watching pull request #1 go to Ready (its phase as kubectl get env shows it; deadline ${timeout}s)"
  watch_until_ready "$sha1"
  echo
  kubectl get env | sed 's/^/    /'
  local hash url
  hash=$(env_field '{.status.subdomainHash}')
  url=$(env_field '{.status.url}')
  note "route in Redis: $(redis-cli -p "$redis_port" get "route:$hash")"

  say "Opening $url through the edge proxy"
  fetch_until v1 "$hash.$domain"

  say "Pushing a new commit (version v2) and delivering its synchronize webhook"
  echo v2 >"$demo_dir/repo/VERSION"
  git_demo commit -q -am "Hello app, version v2"
  local sha2
  sha2=$(git_demo rev-parse HEAD)
  deliver_pull_request synchronize "$sha2" "$sha1"
  watch_until_ready "$sha2"
  fetch_until v2 "$hash.$domain"

  local dir=${demo_dir#"$repo_root"/}
  say "Done. Everything keeps running; look around:"
  cat <<EOF
    kubectl       alias kubectl='$testenv_bin/kubectl --kubeconfig $demo_dir/kubeconfig'
                  kubectl get env,bj,proj,cp
                  kubectl describe env $env_name       (conditions, run, VM, events)
    the app       curl -H 'Host: $hash.$domain' http://127.0.0.1:$proxy_port/
                  or http://$hash.$domain:$proxy_port/ in a browser (*.localhost is this machine)
    its route     redis-cli -p $redis_port get route:$hash
    logs          $dir/operator.log, $dir/webhook-receiver.log, $dir/edge-proxy.log,
                  $dir/local/default/local/*/agent.log
    webhooks      $dir/webhook-*.json, signed with $dir/webhook-secret;
                  curl http://127.0.0.1:$webhook_ops_port/metrics | grep stagely_webhook_deliveries
    another run   commit in $dir/repo, then
                  kubectl patch env $env_name --type merge -p '{"spec":{"pullRequest":{"headSha":"<commit>"}}}'
    teardown      kubectl delete env $env_name

    Stop everything with: make demo-down
EOF
}

# Stops the process whose pid `file` holds, if it runs.
stop_pidfile() {
  local file=$1 pid
  [ -f "$file" ] || return 0
  pid=$(cat "$file")
  stop_pids "$pid"
}

# TERM, then KILL after 10 s, for each pid that runs.
stop_pids() {
  local pid left deadline=$(($(date +%s) + 10))
  for pid in "$@"; do kill -TERM "$pid" 2>/dev/null || true; done
  while :; do
    left=()
    for pid in "$@"; do
      if [ -e "/proc/$pid" ] && ! grep -q '^[0-9]* ([^)]*) Z' "/proc/$pid/stat" 2>/dev/null; then left+=("$pid"); fi
    done
    [ ${#left[@]} -eq 0 ] && return 0
    if [ "$(date +%s)" -ge "$deadline" ]; then
      for pid in "${left[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
      return 0
    fi
    sleep 0.2
  done
}

down() {
  if [ ! -e "$demo_dir" ]; then
    echo "no demo runs from ${demo_dir#"$repo_root"/}"
    return 0
  fi
  # The webhook receiver, then the operator, so that neither starts anything new.
  stop_pidfile "$demo_dir/webhook-receiver.pid"
  stop_pidfile "$demo_dir/operator.pid"
  # The local provider's "VMs": agent processes, each started with its instance's agent.json
  # (local/<namespace>/<CloudProvider>/<instance>/).
  local record pid agents=()
  while read -r record; do
    pid=$(grep -o '"pid":[0-9]*' "$record" | cut -d: -f2)
    if [ -n "$pid" ] && tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | grep -qxF "$(dirname "$record")/agent.json"; then
      agents+=("$pid")
    fi
  done < <(find "$demo_dir/local" -name instance.json 2>/dev/null)
  [ ${#agents[@]} -eq 0 ] || stop_pids "${agents[@]}"
  # The containers the agents ran and the images they built, in the demo's own podman storage.
  if [ -f "$demo_dir/podman/containers.conf" ] && command -v podman >/dev/null; then
    podman_env
    podman rm -af -t 0 >/dev/null 2>&1 || true
    podman system reset -f >/dev/null 2>&1 || true
  fi
  # Whatever podman left mounted under the demo directory, deepest first.
  local mount
  awk '{print $2}' /proc/mounts | { grep -F "$demo_dir/" || true; } | sort -r | while read -r mount; do
    umount -l "$mount" 2>/dev/null || true
  done
  # The control plane, redis-server (and with it the routes), the registry (and its data), the
  # edge proxy; then the directory.
  if [ -f "$demo_dir/pids" ]; then
    "$target_dir/stagely-testenv" down "$demo_dir" | sed 's/^/    /'
  fi
  rm -rf "$demo_dir"
  echo "demo stopped; ${demo_dir#"$repo_root"/} removed"
}

case "${1:-}" in
  up) up ;;
  down)
    [ -x "$target_dir/stagely-testenv" ] || build
    down
    ;;
  *)
    echo "usage: scripts/demo.sh up|down" >&2
    exit 2
    ;;
esac
