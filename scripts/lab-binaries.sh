#!/usr/bin/env bash
# Builds (once) and caches the binaries the lab runs: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kwok, and kubelet and kube-proxy for the lab's real nodes, all from Go modules. Prints the directory that holds them on stdout.
#
# Skips the build when:
#   - LIQO_LAB_BIN_DIR points at a directory that already has all the binaries, or
#   - the cache (LIQO_LAB_CACHE, default ~/.cache/liqo-lab) has binaries of the pinned versions.
# KUBEBUILDER_ASSETS (envtest) may supply etcd and kube-apiserver; the rest are built.
#
# `--kubectl` also makes sure a kubectl of the same version is there (the demo uses it when the
# machine has none); it is not needed by the tests.
set -euo pipefail

WITH_KUBECTL=0
[ "${1:-}" = "--kubectl" ] && WITH_KUBECTL=1

K8S_VERSION="${LIQO_LAB_K8S_VERSION:-v1.34.4}"
ETCD_VERSION="${LIQO_LAB_ETCD_VERSION:-v3.6.16}"
KWOK_VERSION="${LIQO_LAB_KWOK_VERSION:-v0.8.0}"
BINS=(etcd kube-apiserver kube-controller-manager kube-scheduler kwok kubelet kube-proxy)

log() { printf '[lab-binaries] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

have_all() {
  local d=$1 b
  for b in "${BINS[@]}"; do [ -x "$d/$b" ] || return 1; done
}

if [ -n "${LIQO_LAB_BIN_DIR:-}" ]; then
  have_all "$LIQO_LAB_BIN_DIR" || die "LIQO_LAB_BIN_DIR=$LIQO_LAB_BIN_DIR lacks one of: ${BINS[*]}"
  [ "$WITH_KUBECTL" = 0 ] || [ -x "$LIQO_LAB_BIN_DIR/kubectl" ] || die "LIQO_LAB_BIN_DIR=$LIQO_LAB_BIN_DIR lacks kubectl"
  log "using binaries in LIQO_LAB_BIN_DIR=$LIQO_LAB_BIN_DIR"
  echo "$LIQO_LAB_BIN_DIR"; exit 0
fi

CACHE="${LIQO_LAB_CACHE:-$HOME/.cache/liqo-lab}"
OUT="$CACHE/bin/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-kwok-$KWOK_VERSION"
if have_all "$OUT" && { [ "$WITH_KUBECTL" = 0 ] || [ -x "$OUT/kubectl" ]; }; then
  log "cached: $OUT"; echo "$OUT"; exit 0
fi

command -v go >/dev/null || die "the Go toolchain is needed to build the lab binaries (https://go.dev/dl)"
mkdir -p "$OUT" "$CACHE/src"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod
# The checksum database may be unreachable where only the module proxy is.
if ! go env GOSUMDB | grep -q off; then
  timeout 20 go mod download -json golang.org/x/text@v0.20.0 >/dev/null 2>&1 || export GOSUMDB=off
fi

# envtest's asset directory can stand in for etcd and kube-apiserver.
if [ -n "${KUBEBUILDER_ASSETS:-}" ]; then
  for b in etcd kube-apiserver; do
    [ -x "$KUBEBUILDER_ASSETS/$b" ] && ln -sf "$KUBEBUILDER_ASSETS/$b" "$OUT/$b" && log "$b from KUBEBUILDER_ASSETS"
  done
fi

build_kube() {
  local minor src gomod
  minor=$(echo "$K8S_VERSION" | cut -d. -f2)
  src="$CACHE/src/kubernetes-$K8S_VERSION"
  mkdir -p "$src"
  gomod=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",*/\1/p')
  [ -f "$gomod" ] || die "could not download k8s.io/kubernetes@$K8S_VERSION from the module proxy"
  # k8s.io/kubernetes maps its staging modules to ./staging, which a dependent module ignores:
  # replace each with the published v0.<minor>.<patch> release instead.
  local stagever="v0.${K8S_VERSION#v1.}"
  {
    echo "module liqo.lab/kubebuild"
    grep -E '^(go|godebug) ' "$gomod"
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo "tool ("
    echo "  k8s.io/kubernetes/cmd/kube-apiserver"
    echo "  k8s.io/kubernetes/cmd/kube-controller-manager"
    echo "  k8s.io/kubernetes/cmd/kube-scheduler"
    echo "  k8s.io/kubernetes/cmd/kubelet"
    echo "  k8s.io/kubernetes/cmd/kube-proxy"
    echo "  k8s.io/kubernetes/cmd/kubectl"
    echo ")"
    grep -oE '^\s*k8s\.io/[a-z0-9-]+ => \./staging' "$gomod" | awk -v v="$stagever" '{print "replace " $1 " => " $1 " " v}'
  } >"$src/go.mod"
  printf 'package main\n' >/dev/null
  (cd "$src" && go mod tidy >&2)
  local pkg=k8s.io/component-base/version cpkg=k8s.io/client-go/pkg/version ld
  ld="-s -w"
  for p in $pkg $cpkg; do
    ld="$ld -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor -X $p.gitTreeState=clean"
  done
  local bins=(kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy)
  [ "$WITH_KUBECTL" = 1 ] && bins+=(kubectl)
  for b in "${bins[@]}"; do
    [ -x "$OUT/$b" ] && continue
    log "building $b $K8S_VERSION (slow the first time)"
    (cd "$src" && go build -trimpath -tags selinux,notest -ldflags "$ld" -o "$OUT/$b.tmp" "k8s.io/kubernetes/cmd/$b" >&2)
    mv "$OUT/$b.tmp" "$OUT/$b"
  done
}

build_etcd() {
  [ -x "$OUT/etcd" ] && return
  local src="$CACHE/src/etcd-$ETCD_VERSION"
  mkdir -p "$src"
  printf 'module liqo.lab/etcdbuild\n\ngo 1.24\n\nrequire go.etcd.io/etcd/server/v3 %s\n\ntool go.etcd.io/etcd/server/v3\n' "$ETCD_VERSION" >"$src/go.mod"
  (cd "$src" && go mod tidy >&2)
  log "building etcd $ETCD_VERSION"
  (cd "$src" && go build -trimpath -ldflags "-s -w" -o "$OUT/etcd.tmp" go.etcd.io/etcd/server/v3 >&2)
  mv "$OUT/etcd.tmp" "$OUT/etcd"
}

build_kwok() {
  [ -x "$OUT/kwok" ] && return
  log "building kwok $KWOK_VERSION"
  GOBIN="$OUT/.kwok" go install "sigs.k8s.io/kwok/cmd/kwok@$KWOK_VERSION" >&2
  mv "$OUT/.kwok/kwok" "$OUT/kwok"; rmdir "$OUT/.kwok"
}

# kwok ships its stage definitions in the module, not in the binary: keep a copy beside it.
copy_stages() {
  local dir
  dir=$(go mod download -json "sigs.k8s.io/kwok@$KWOK_VERSION" | sed -n 's/.*"Dir": "\(.*\)",*/\1/p')
  mkdir -p "$OUT/kwok-stages"
  for f in node/fast/node-initialize.yaml node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
           pod/fast/pod-ready.yaml pod/fast/pod-complete.yaml pod/fast/pod-delete.yaml; do
    cp "$dir/kustomize/stage/$f" "$OUT/kwok-stages/"
  done
}

build_etcd
build_kwok
copy_stages
build_kube
have_all "$OUT" || die "build finished but a binary is missing in $OUT"
log "ready: $OUT"
echo "$OUT"
