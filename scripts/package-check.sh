#!/usr/bin/env bash
# Checks that every SDK crate can be published: packages each one as crates.io would receive it
# and builds the packaged library (dev-dependencies, hence liqo-lab, are dropped from packages).
# `cargo package --workspace` verifies inter-dependent unpublished crates against a local
# registry holding the others' packages, so this runs offline of crates.io's contents.
# Arguments go to `cargo package` (e.g. --no-verify, --allow-dirty).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[package-check] %s\n' "$*" >&2; }

# Only the lab and the examples may stay unpublished; any other crate marked `publish = false`
# would silently drop out of the check, so it fails instead.
excludes=()
bad=()
while read -r manifest; do
  grep -Eq '^publish *= *false' "$manifest" || continue
  dir=${manifest%/Cargo.toml}
  dir=${dir#"$PWD"/}
  name=$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$manifest" | head -n 1)
  case "$dir" in
    liqo-lab | examples/*) excludes+=(--exclude "$name") ;;
    *) bad+=("$name ($dir)") ;;
  esac
done < <(cargo metadata --no-deps --format-version 1 --locked | grep -o '"manifest_path":"[^"]*"' | cut -d'"' -f4)
if ((${#bad[@]})); then
  log "library crates must be publishable, remove publish = false from: ${bad[*]}"
  exit 1
fi

# Cargo unpacks the local registry's packages once per registry path under its home and never
# again: a second check from the same checkout path would build the crates of the first (seen:
# a function added since was "not found"). Remove those copies of our crates first.
cargo_home=${CARGO_HOME:-$HOME/.cargo}
for stale in "$cargo_home"/registry/src/-*/liqo-*; do
  [ -e "$stale" ] && rm -rf "$stale"
done

# The packaged crates are built outside this workspace, so its profile would not apply: give it
# again, so that they reuse the dependencies the workspace built and keep debug info small.
start=$SECONDS
cargo package --workspace "${excludes[@]}" --locked \
  --config 'profile.dev.debug="line-tables-only"' \
  --config 'profile.dev.package."*".debug=false' \
  "$@"
log "all publishable crates packaged and built in $((SECONDS - start)) s"
