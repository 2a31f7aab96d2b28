#!/usr/bin/env bash
# The main job of liqo-rs, on one machine, as root:
#
#   scripts/demo.sh [up]   builds what is missing, starts three real lab clusters (rome and milan
#                          share pod CIDR 10.244.0.0/16, turin has 10.245.0.0/16) with a real
#                          network data plane, runs one liqo-agent per cluster, peers rome with
#                          milan and turin, offloads namespace `demo` (Deployment, Service,
#                          ConfigMap), prints where every pod runs, and sends an HTTP request from
#                          a pod in rome to each offloaded pod, through the WireGuard tunnel and
#                          the double NAT. Leaves everything up and prints the kubeconfigs.
#   scripts/demo.sh burst  cloud bursting on the running demo: a LocalAndRemote namespace fills
#                          rome's own (small) nodes first, overflows onto the virtual nodes when
#                          scaled up, and shrinks back home first when scaled down.
#   scripts/demo.sh restart [rome|milan|turin]
#                          kill -9 of that cluster's agent on the running demo: seconds until
#                          its restart is ready and every tunnel handshakes again, and whether
#                          credentials, remote pods or tunnel keys were made again.
#   scripts/demo.sh status the lab, the agents (with how often each was restarted) and the peerings.
#   scripts/demo.sh down   stops the agents (whatever started them) and the lab and removes
#                          everything (idempotent).
#
# Each agent runs under a small supervisor, as kubelet runs a container: `kill -9` it and it is
# started again (back-off 1 s doubling to 30 s), and resumes from the cluster's objects.
#
# Everything lives in $LIQO_DEMO_DIR (default ~/.local/state/liqo-demo).
set -euo pipefail
SELF=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
cd "$(dirname "$0")/.."

log() { printf '\n\033[1;34m==>\033[0m \033[1m%s\033[0m\n' "$*" >&2; }
note() { printf '    %s\n' "$*" >&2; }
die() { printf '\033[1;31merror:\033[0m %s\n' "$*" >&2; exit 1; }

DEMO_DIR=${LIQO_DEMO_DIR:-${XDG_STATE_HOME:-$HOME/.local/state}/liqo-demo}
export LIQO_LAB_STATE_DIR=$DEMO_DIR/lab
AGENTS=$DEMO_DIR/agents
BIN=${CARGO_TARGET_DIR:-$PWD/target}/debug
CLUSTERS=(rome milan turin)
declare -A POD_CIDR=([rome]=10.244.0.0/16 [milan]=10.244.0.0/16 [turin]=10.245.0.0/16)
declare -A SLOT=([rome]=0 [milan]=1 [turin]=2)

lab() { "$BIN/liqo-lab" "$@"; }
kc() { echo "$LIQO_LAB_STATE_DIR/$1/admin.kubeconfig"; }
k() { local c=$1; shift; "$KUBECTL" --kubeconfig "$(kc "$c")" "$@"; }
liqoctl() { local c=$1; shift; "$BIN/liqoctl" --kubeconfig "$(kc "$c")" "$@"; }

prerequisites() {
  [ "$(id -u)" = 0 ] || die "the demo makes network namespaces, veths and WireGuard interfaces: run it as root"
  command -v cargo >/dev/null || die "cargo is needed: https://rustup.rs"
  declare -A pkgs=([setpriv]=util-linux [ip]=iproute2 [nft]=nftables [wireguard-go]=wireguard-go
                   [wg]=wireguard-tools [jq]=jq [ping]=iputils-ping)
  local missing=() cmd
  for cmd in "${!pkgs[@]}"; do command -v "$cmd" >/dev/null || missing+=("${pkgs[$cmd]}"); done
  if ((${#missing[@]})); then
    log "installing ${missing[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

build() {
  log "building the lab's Kubernetes binaries (cached after the first time) and liqo-rs"
  if command -v kubectl >/dev/null; then
    LIQO_LAB_BIN_DIR=${LIQO_LAB_BIN_DIR:-$(scripts/lab-binaries.sh)}
    KUBECTL=$(command -v kubectl)
  else
    LIQO_LAB_BIN_DIR=${LIQO_LAB_BIN_DIR:-$(scripts/lab-binaries.sh --kubectl)}
    KUBECTL=$LIQO_LAB_BIN_DIR/kubectl
  fi
  export LIQO_LAB_BIN_DIR
  cargo build --locked -q -p liqo-lab -p liqo-agent -p liqoctl
}

find_kubectl() {
  if command -v kubectl >/dev/null; then KUBECTL=$(command -v kubectl)
  elif [ -x "${LIQO_LAB_BIN_DIR:-}/kubectl" ]; then KUBECTL=$LIQO_LAB_BIN_DIR/kubectl
  else KUBECTL=$(scripts/lab-binaries.sh --kubectl)/kubectl; fi
}

# GET http://127.0.0.1:PORT/PATH with bash alone; prints the status code.
http_status() {
  local port=$1 path=$2 line
  { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null || { echo 000; return; }
  printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n' "$path" >&3
  IFS= read -r -t 5 line <&3 2>/dev/null || line=""
  exec 3<&- 3>&-
  set -- $line
  echo "${2:-000}"
}

agent_config() {
  local c=$1 s=${SLOT[$1]} status=$2 netns wan
  netns=$(jq -r --arg c "$c" '.clusters[] | select(.name == $c) | .gateway.netnsPath' <<<"$status")
  wan=$(jq -r --arg c "$c" '.clusters[] | select(.name == $c) | .gateway.wanAddress' <<<"$status")
  [ -n "$netns" ] && [ "$netns" != null ] || die "the lab reports no gateway network namespace for $c"
  cat <<EOF
# liqo-agent configuration of cluster $c, written by scripts/demo.sh.
kubeconfig: $(kc "$c")
metricsAddr: 127.0.0.1:$((19090 + s))
cluster:
  name: $c
  id: $c
  podCidr: ${POD_CIDR[$c]}
  serviceCidr: 10.96.0.0/16
discovery:
  mdns: {enabled: false}
  foreignClusters: true
peering:
  listen: 127.0.0.1:$((18443 + s))
  endpoint: https://127.0.0.1:$((18443 + s))
  # Only the consumer of this demo may peer (the default, Manual, waits for an admin).
  policy: AllowList
  allowList: [rome]
  offer: {cpu: "4", memory: 8Gi, pods: 20}
network:
  enabled: true
  backend: userspace
  implementation: wireguard-go
  interface: liqo-$c
  listenPort: 51820
  endpoint: $wan:51820
  netns: $netns
virtualKubelet:
  consumer:
    enabled: true
    webhook: 127.0.0.1:$((19443 + s))
    heartbeatSeconds: 5
  provider:
    enabled: true
EOF
}

# Runs the agent of cluster $1 like kubelet runs a container: started again whenever it exits,
# after a back-off that doubles from 1 s to 30 s (reset once it ran for a minute), until
# $AGENTS/$1.stop exists. Started detached by start_agents (`demo.sh __supervise <cluster>`).
supervise() {
  local c=$1 delay=1 started pid code restarts=0
  echo $$ >"$AGENTS/$c.supervisor"
  echo 0 >"$AGENTS/$c.restarts"
  trap 'touch "$AGENTS/$c.stop"; [ -n "${pid:-}" ] && kill -TERM "$pid" 2>/dev/null' TERM INT
  # Ends when told to stop, or when `down` removed the demo's directory.
  while [ -f "$AGENTS/$c.yaml" ] && [ ! -e "$AGENTS/$c.stop" ]; do
    started=$(date +%s)
    "$BIN/liqo-agent" --config "$AGENTS/$c.yaml" >>"$AGENTS/$c.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" >"$AGENTS/$c.pid"
    code=0
    wait "$pid" || code=$?
    # A trapped signal interrupts `wait`: the agent may still be stopping.
    while kill -0 "$pid" 2>/dev/null; do wait "$pid" || true; done
    { [ -e "$AGENTS/$c.stop" ] || [ ! -f "$AGENTS/$c.yaml" ]; } && break
    if (( $(date +%s) - started >= 60 )); then delay=1; fi
    restarts=$((restarts + 1))
    echo "$restarts" >"$AGENTS/$c.restarts"
    printf '%s demo supervisor: liqo-agent exited (status %s); restart %s in %ss\n' \
      "$(date -Is)" "$code" "$restarts" "$delay" >>"$AGENTS/$c.log"
    sleep "$delay"
    delay=$(( delay * 2 > 30 ? 30 : delay * 2 ))
  done
  rm -f "$AGENTS/$c.pid" "$AGENTS/$c.supervisor"
}

start_agents() {
  local status c s pid
  status=$(lab status -o json)
  mkdir -p "$AGENTS"
  for c in "${CLUSTERS[@]}"; do
    agent_config "$c" "$status" >"$AGENTS/$c.yaml"
    "$BIN/liqo-agent" --config "$AGENTS/$c.yaml" --check >/dev/null
    rm -f "$AGENTS/$c.stop" "$AGENTS/$c.pid"
    setsid "$SELF" __supervise "$c" </dev/null >/dev/null 2>&1 &
  done
  for c in "${CLUSTERS[@]}"; do
    s=${SLOT[$c]}
    for _ in $(seq 1 120); do
      [ "$(http_status $((19090 + s)) /readyz)" = 200 ] && {
        note "$c: liqo-agent pid $(cat "$AGENTS/$c.pid"), supervised (config $AGENTS/$c.yaml, log $AGENTS/$c.log)"
        continue 2
      }
      if [ "$(cat "$AGENTS/$c.restarts" 2>/dev/null || echo 0)" -gt 0 ]; then
        tail -n 30 "$AGENTS/$c.log" >&2; die "the agent of $c exited (its supervisor restarts it; log above)"
      fi
      sleep 0.5
    done
    tail -n 30 "$AGENTS/$c.log" >&2
    die "the agent of $c is not ready after 60 s (log above)"
  done
  note "all agents ready (/readyz 200); each restarts by itself if it dies (demo.sh status shows restarts)"
}

# Stops every agent of this demo, whatever started it: supervisors first (so nothing restarts),
# then any liqo-agent running with one of this demo's configurations.
stop_agents() {
  local c pid sups=()
  [ -d "$AGENTS" ] || return 0
  for c in "${CLUSTERS[@]}"; do touch "$AGENTS/$c.stop"; done
  for c in "${CLUSTERS[@]}"; do
    pid=$(cat "$AGENTS/$c.supervisor" 2>/dev/null || true)
    [ -n "$pid" ] && kill -TERM "$pid" 2>/dev/null && sups+=("$pid")
  done
  pkill -TERM -f -- "liqo-agent --config $AGENTS/" 2>/dev/null || true
  for _ in $(seq 1 40); do
    pgrep -f -- "liqo-agent --config $AGENTS/" >/dev/null || break
    sleep 0.25
  done
  pkill -KILL -f -- "liqo-agent --config $AGENTS/" 2>/dev/null || true
  for pid in "${sups[@]}"; do
    for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    kill -KILL "$pid" 2>/dev/null || true
  done
  for c in "${CLUSTERS[@]}"; do
    rm -f "$AGENTS/$c.pid" "$AGENTS/$c.supervisor"
    # wireguard-go keeps its control socket in the host's /run/wireguard.
    rm -f "/run/wireguard/liqo-$c.sock"
  done
}

sample_app() {
  cat <<'EOF'
apiVersion: v1
kind: ConfigMap
metadata: {name: hello-config, namespace: demo}
data: {GREETING: "ciao from liqo-rs"}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: hello, namespace: demo}
spec:
  replicas: 4
  selector: {matchLabels: {app: hello}}
  template:
    metadata:
      # lab.liqo.io/netns: the lab gives the pod a real network namespace and an HTTP server.
      labels: {app: hello, lab.liqo.io/netns: "true"}
    spec:
      containers:
        - name: hello
          image: ghcr.io/liqo-rs/hello:demo
          ports: [{containerPort: 8080}]
          envFrom: [{configMapRef: {name: hello-config}}]
          resources: {requests: {cpu: 100m, memory: 64Mi}}
---
apiVersion: v1
kind: Service
metadata: {name: hello, namespace: demo}
spec:
  selector: {app: hello}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: default, labels: {lab.liqo.io/netns: "true"}}
spec:
  containers: [{name: client, image: ghcr.io/liqo-rs/client:demo}]
EOF
}

up() {
  prerequisites
  build
  if lab status >/dev/null 2>&1; then
    die "a demo is already up ($DEMO_DIR): run scripts/demo.sh down first"
  fi
  log "starting three lab clusters with a network data plane"
  RUST_LOG=${RUST_LOG:-warn} lab up --names "$(IFS=,; echo "${CLUSTERS[*]}")" \
    --pod-cidrs "${POD_CIDR[rome]},${POD_CIDR[milan]},${POD_CIDR[turin]}" \
    --service-cidr 10.96.0.0/16 --workers 2 --worker-cpu 2 --worker-memory 8Gi --dataplane

  log "starting one liqo-agent per cluster"
  start_agents

  log "peering rome with milan and turin (rome consumes, they provide)"
  liqoctl rome peer --provider-kubeconfig "$(kc milan)"
  liqoctl rome peer --provider-kubeconfig "$(kc turin)"
  k rome get nodes -L liqo.io/type

  log "offloading namespace demo (pods may run only on the providers)"
  k rome create namespace demo >/dev/null
  liqoctl rome offload namespace demo --pod-offloading-strategy Remote
  sample_app | k rome apply -f - >/dev/null
  k rome -n demo rollout status deployment/hello --timeout=180s >/dev/null
  k rome wait pod/client --for=condition=Ready --timeout=120s >/dev/null

  log "where every pod runs"
  note "rome (the pods' home; IPs as rome sees them):"
  k rome -n demo get pods -o wide
  for c in milan turin; do
    note "$c (twin namespace demo-rome; real IPs):"
    k "$c" -n demo-rome get pods -o wide
  done
  note "reflected into milan: ConfigMap, Service and the EndpointSlice"
  k milan -n demo-rome get configmap/hello-config service/hello
  k milan -n demo-rome get endpointslices

  log "HTTP from pod default/client in rome to each offloaded pod, through tunnel and NAT"
  local client_ip ip name
  client_ip=$(k rome get pod client -o jsonpath='{.status.podIP}')
  note "client pod in rome: $client_ip"
  while read -r name ip; do
    printf '    rome:client -> %-24s %-12s  ' "$name" "$ip"
    lab http --cluster rome --pod default/client "http://$ip:8080/"
  done < <(k rome -n demo get pods -l app=hello \
             -o jsonpath='{range .items[*]}{.metadata.name} {.status.podIP}{"\n"}{end}')
  note "(ip= is the pod's real address in its cluster, client= how it saw rome's client)"

  log "peerings as liqoctl sees them"
  liqoctl rome info

  log "the demo is up"
  for c in "${CLUSTERS[@]}"; do note "export KUBECONFIG=$(kc "$c")   # $c"; done
  note "agents: $AGENTS/<cluster>.log, metrics: http://127.0.0.1:19090/metrics (rome)"
  note "next: scripts/demo.sh burst | scripts/demo.sh status | scripts/demo.sh down"
}

# kill -9 of one agent on the running demo, and what its restart costs: seconds until its
# supervisor's new process is ready and until every tunnel of rome has a fresh handshake, and
# whether anything was made again (the credentials, the remote pods, the gateway's key).
restart() {
  local c=${1:-rome} s p before_pods after_pods before_keys after_keys before_creds after_creds
  find_kubectl
  lab status >/dev/null 2>&1 || die "no demo is up: run scripts/demo.sh first"
  [ -n "${SLOT[$c]:-}" ] || die "no cluster $c (rome, milan or turin)"
  s=${SLOT[$c]}
  remote_pods() { for p in milan turin; do k "$p" -n demo-rome get pods -o jsonpath='{range .items[*]}{.metadata.name}={.metadata.uid}{"\n"}{end}'; done | sort; }
  creds() { for p in milan turin; do k rome -n "liqo-tenant-$p" get secret "liqo-kubeconfig-$p" -o jsonpath='{.metadata.resourceVersion}{" "}'; done; }
  keys() { for p in milan turin; do k rome -n "liqo-tenant-$p" get tunnel "$p" -o jsonpath='{.status.localPublicKey}/{.spec.peerPublicKey}{" "}' 2>/dev/null; done; }
  # What rome's WireGuard device says (its control socket is on this machine); the Tunnel
  # objects' status is refreshed less often.
  # The tunnels the restart broke: all of rome's, or rome's tunnel to that provider.
  handshakes_after() {
    local since=$1 want=2 key=
    if [ "$c" != rome ]; then want=1; key=$(wg show "liqo-$c" public-key 2>/dev/null); fi
    [ "$(wg show liqo-rome latest-handshakes 2>/dev/null \
      | awk -v t="$since" -v k="$key" '$2 >= t && (k == "" || $1 == k)' | wc -l)" -ge "$want" ]
  }
  before_pods=$(remote_pods); before_creds=$(creds); before_keys=$(keys)
  log "kill -9 of the agent of $c (pid $(cat "$AGENTS/$c.pid"))"
  local t0 t_ready= t_tunnels=
  t0=$(date +%s.%N)
  kill -9 "$(cat "$AGENTS/$c.pid")"
  for _ in $(seq 1 600); do
    if [ -z "$t_ready" ] && [ "$(http_status $((19090 + s)) /readyz)" = 200 ] \
        && [ "$(cat "$AGENTS/$c.restarts")" -gt 0 ]; then t_ready=$(date +%s.%N); fi
    if [ -n "$t_ready" ] && handshakes_after "${t0%.*}"; then t_tunnels=$(date +%s.%N); break; fi
    sleep 0.2
  done
  [ -n "$t_tunnels" ] || die "the tunnels did not handshake again within 120 s (see $AGENTS/$c.log)"
  after_pods=$(remote_pods); after_creds=$(creds); after_keys=$(keys)
  secs() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.1f", a - b }'; }
  note "ready (/readyz 200) $(secs "$t_ready" "$t0") s after the kill, tunnels handshaking again $(secs "$t_tunnels" "$t0") s after"
  note "remote pods: $([ "$before_pods" = "$after_pods" ] && echo "the same ($(echo "$after_pods" | grep -c =) pods, same uids)" || echo "CHANGED")"
  note "rome's credentials: $([ "$before_creds" = "$after_creds" ] && echo "untouched" || echo "rewritten ($before_creds -> $after_creds)")"
  note "tunnel keys: $([ "$before_keys" = "$after_keys" ] && echo "the same" || echo "CHANGED")"
  note "supervisor restarts of $c: $(cat "$AGENTS/$c.restarts")"
}

burst() {
  find_kubectl
  lab status >/dev/null 2>&1 || die "no demo is up: run scripts/demo.sh first"
  log "cloud bursting: namespace burst, LocalAndRemote; rome has 2 workers of 2 CPUs"
  k rome create namespace burst >/dev/null 2>&1 || true
  liqoctl rome offload namespace burst --pod-offloading-strategy LocalAndRemote
  cat <<'EOF' | k rome apply -f - >/dev/null
apiVersion: apps/v1
kind: Deployment
metadata: {name: burst, namespace: burst}
spec:
  replicas: 4
  selector: {matchLabels: {app: burst}}
  template:
    metadata: {labels: {app: burst}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - name: work
          image: ghcr.io/liqo-rs/work:demo
          resources: {requests: {cpu: "1", memory: 256Mi}}
EOF
  show() {
    k rome -n burst rollout status deployment/burst --timeout=180s >/dev/null
    k rome -n burst get pods -o custom-columns=POD:.metadata.name,NODE:.spec.nodeName,IP:.status.podIP,DELETION-COST:'.metadata.annotations.controller\.kubernetes\.io/pod-deletion-cost' --sort-by=.spec.nodeName
  }
  log "4 replicas (1 CPU each): rome's own nodes are enough"
  show
  log "scaled to 8: rome's nodes are full, the overflow lands on the virtual nodes"
  k rome -n burst scale deployment/burst --replicas=8 >/dev/null
  show
  log "scaled back to 4: the remote pods go first (pod-deletion-cost)"
  k rome -n burst scale deployment/burst --replicas=4 >/dev/null
  for _ in $(seq 1 120); do
    [ "$(k rome -n burst get pods --no-headers 2>/dev/null | wc -l)" = 4 ] && break
    sleep 0.5
  done
  show
}

status() {
  find_kubectl
  lab status || true
  local c pid restarts
  for c in "${CLUSTERS[@]}"; do
    pid=$(cat "$AGENTS/$c.pid" 2>/dev/null || true)
    restarts=$(cat "$AGENTS/$c.restarts" 2>/dev/null || echo 0)
    if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
      note "agent $c: running (pid $pid, up $(ps -o etime= -p "$pid" | tr -d ' '), restarts $restarts)"
    elif [ -f "$AGENTS/$c.supervisor" ]; then note "agent $c: restarting (restarts $restarts; see $AGENTS/$c.log)"
    else note "agent $c: not running (restarts $restarts)"; fi
  done
  [ -f "$(kc rome)" ] && liqoctl rome info || true
}

down() {
  # Always build: a binary left from an older checkout may not know what this one set up
  # (seen: network namespaces left behind by a stale liqo-lab).
  cargo build --locked -q -p liqo-lab
  stop_agents
  lab down
  rm -rf "$DEMO_DIR"
}

cmd=${1:-up}
shift || true
case "$cmd" in
  up) up "$@" ;;
  burst) burst ;;
  restart) restart "$@" ;;
  status) status ;;
  down) down ;;
  __supervise) supervise "$@" ;;
  *) echo "usage: scripts/demo.sh [up|burst|restart [CLUSTER]|status|down]" >&2; exit 2 ;;
esac
