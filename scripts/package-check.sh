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

# A user's agent outside this workspace (examples/own-agent: one provider of its own, the others
# from the SDK), built against the packages just made and nothing else of this tree: crates.io's
# `liqo-*` are replaced by the unpacked packages, so only the published API is used.
target=$(cargo metadata --no-deps --format-version 1 --locked | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
own=$(mktemp -d)
trap 'rm -rf "$own"' EXIT
cp -r examples/own-agent/. "$own/"
cp Cargo.lock "$own/Cargo.lock" # the workspace's versions of everything else, when they fit
{
  echo
  echo '[patch.crates-io]'
  for dir in "$target"/package/liqo-*/; do
    dir=${dir%/}
    [ -f "$dir/Cargo.toml" ] || continue
    name=$(sed -n 's/^name *= *"\(.*\)"/\1/p' "$dir/Cargo.toml" | head -n 1)
    echo "$name = { path = \"$dir\" }"
  done
} >>"$own/Cargo.toml"
start=$SECONDS
CARGO_TARGET_DIR="$target/own-agent" cargo build --manifest-path "$own/Cargo.toml" \
  --config 'profile.dev.debug="line-tables-only"' \
  --config 'profile.dev.package."*".debug=false'
log "examples/own-agent built from the packages alone in $((SECONDS - start)) s"
