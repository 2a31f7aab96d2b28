#!/usr/bin/env bash
# The main job. Today: builds what is missing and starts two real lab clusters that kubectl can
# use (`scripts/demo.sh`), shows them (`scripts/demo.sh status`) and removes them
# (`scripts/demo.sh down`). Peering and offloading join the demo as their issues land.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v cargo >/dev/null || { echo "cargo is needed: https://rustup.rs" >&2; exit 1; }
command -v setpriv >/dev/null || { echo "setpriv (Debian: util-linux) is needed" >&2; exit 1; }
cmd=${1:-up}
shift || true
case "$cmd" in
  up)
    LIQO_LAB_BIN_DIR=${LIQO_LAB_BIN_DIR:-$(scripts/lab-binaries.sh)}
    export LIQO_LAB_BIN_DIR
    cargo run -q --locked -p liqo-lab -- up --clusters 2 "$@"
    ;;
  status | down)
    cargo run -q --locked -p liqo-lab -- "$cmd" "$@"
    ;;
  *)
    echo "usage: scripts/demo.sh [up|status|down] [liqo-lab options]" >&2
    exit 2
    ;;
esac
