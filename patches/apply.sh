#!/usr/bin/env bash
# Builds the patched mistralrs-core 0.8.1 that the workspace's [patch.crates-io] points at.
#
# 1. obtains the pristine crate through cargo itself (a throwaway manifest + `cargo fetch`);
# 2. copies it to patches/.applied/mistralrs-core-0.8.1 (git-ignored) and applies
#    patches/mistralrs-core-0.8.1.patch;
# 3. records the patch's sha256, so a second run with the same patch changes nothing
#    (and cargo does not rebuild mistralrs-core).
# Fails loudly if the patch does not apply.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
crate=mistralrs-core
version=0.8.1
patch_file="$here/$crate-$version.patch"
out="$here/.applied/$crate-$version"
stamp="$out/.attncache-patch.sha256"

want=$(sha256sum "$patch_file" | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "patches: $crate $version already patched ($out)"
    exit 0
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/fetch/src"
cat > "$tmp/fetch/Cargo.toml" <<TOML
[package]
name = "attncache-fetch-pristine"
version = "0.0.0"
edition = "2021"
publish = false

[dependencies]
$crate = "=$version"

[workspace]
TOML
: > "$tmp/fetch/src/lib.rs"
echo "patches: fetching pristine $crate $version through cargo"
cargo fetch --manifest-path "$tmp/fetch/Cargo.toml" --quiet
manifest=$(cargo metadata --manifest-path "$tmp/fetch/Cargo.toml" --format-version 1 --offline \
    | grep -o "\"manifest_path\":\"[^\"]*/$crate-$version/Cargo.toml\"" | head -n 1 | cut -d'"' -f4)
if [[ -z "$manifest" ]]; then
    echo "patches: could not locate $crate $version in cargo's registry" >&2
    exit 1
fi
src=$(dirname "$manifest")

stage="$tmp/stage"
cp -a "$src" "$stage"
if ! patch --directory "$stage" -p1 --forward --batch --silent < "$patch_file"; then
    echo "patches: $patch_file does NOT apply to pristine $crate $version" >&2
    exit 1
fi
echo "$want" > "$stage/.attncache-patch.sha256"
rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$stage" "$out"
echo "patches: $crate $version patched into $out"
