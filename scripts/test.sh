#!/usr/bin/env bash
# Runs every test of the workspace, the ones against real lab clusters included.
# Installs what is missing first: Debian packages (as root) and the Go-built lab binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[test] %s\n' "$*" >&2; }

command -v cargo >/dev/null || { log "cargo is needed: install Rust from https://rustup.rs"; exit 1; }
command -v go >/dev/null || { log "go is needed to build the lab's Kubernetes binaries: https://go.dev/dl"; exit 1; }

# Debian packages the tests use (command -> package).
declare -A pkgs=(
  [setpriv]=util-linux [ip]=iproute2 [ping]=iputils-ping [sysctl]=procps [nft]=nftables
  [wireguard-go]=wireguard-go [wg]=wireguard-tools [iperf3]=iperf3
  [avahi-daemon]=avahi-daemon [avahi-browse]=avahi-utils [dbus-daemon]=dbus [dnsmasq]=dnsmasq-base
  [containerd]=containerd [runc]=runc [busybox]=busybox-static
)
missing=()
for cmd in "${!pkgs[@]}"; do command -v "$cmd" >/dev/null || missing+=("${pkgs[$cmd]}"); done
# The lab's real nodes run the CNI bridge plugin.
[ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
if ((${#missing[@]})); then
  if [ "$(id -u)" != 0 ]; then log "please install: ${missing[*]} (apt-get install ${missing[*]})"; exit 1; fi
  log "installing ${missing[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# Build the lab binaries (cached after the first time) while cargo compiles the tests.
bins_log=$(mktemp)
scripts/lab-binaries.sh >"$bins_log.out" 2>"$bins_log" &
bins_pid=$!
cargo test --workspace --no-run --locked
if ! wait "$bins_pid"; then
  log "building the lab binaries failed:"; tail -n 40 "$bins_log" >&2; exit 1
fi
LIQO_LAB_BIN_DIR=$(tail -n 1 "$bins_log.out")
export LIQO_LAB_BIN_DIR
rm -f "$bins_log" "$bins_log.out"
log "lab binaries: $LIQO_LAB_BIN_DIR"

out=$(mktemp)
trap 'rm -f "$out"' EXIT
status=0
cargo test --workspace --locked "$@" 2>&1 | tee "$out" || status=$?
# One closing line for the whole workspace (cargo prints one per test binary).
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d passed, %d failed\n", p, f }' "$out"
exit "$status"
