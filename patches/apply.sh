#!/usr/bin/env bash
# Builds the patched mistralrs-core 0.8.1 that the workspace's [patch.crates-io] points at.
#
# 1. obtains the pristine crate through cargo itself (a throwaway manifest + `cargo fetch`);
# 2. copies it to a staging directory and applies the series patches/NNNN-*.patch in order
#    (sorted by name, `patch -p1`, no fuzz, no backup files); fails loudly, naming the
#    patch, if one does not apply;
# 3. records the sha256 of the series (the patch files concatenated in that order) in
#    <out>/.attncache-patch.sha256, so a second run with the same series changes nothing
#    (and cargo does not rebuild mistralrs-core). If the series changed but the staged tree
#    is byte-identical to the existing <out> (the stamp aside), only the stamp is updated
#    and <out> is kept as is (file mtimes unchanged: no rebuild); otherwise <out> is
#    replaced by the staged tree.
#
# <out> is patches/.applied/mistralrs-core-0.8.1 (git-ignored), or $ATTNCACHE_PATCH_OUT if
# set (to try the series without touching the real one). See patches/README.md.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
crate=mistralrs-core
version=0.8.1
out="${ATTNCACHE_PATCH_OUT:-$here/.applied/$crate-$version}"
stamp_name=.attncache-patch.sha256
stamp="$out/$stamp_name"

series=()
while IFS= read -r p; do
    series+=("$p")
done < <(find "$here" -maxdepth 1 -type f -name '[0-9][0-9][0-9][0-9]-*.patch' | LC_ALL=C sort)
if ((${#series[@]} == 0)); then
    echo "patches: no patch series (NNNN-*.patch) in $here" >&2
    exit 1
fi

want=$(cat "${series[@]}" | sha256sum | cut -d' ' -f1)
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
for p in "${series[@]}"; do
    if ! patch --directory "$stage" -p1 --forward --batch --silent --fuzz=0 \
        --no-backup-if-mismatch < "$p"; then
        echo "patches: $(basename "$p") does NOT apply to pristine $crate $version" \
            "+ the patches before it" >&2
        exit 1
    fi
done
echo "$want" > "$stage/$stamp_name"

if [[ -d "$out" ]] && diff -r -q --no-dereference -x "$stamp_name" "$stage" "$out" > /dev/null; then
    echo "$want" > "$stamp"
    echo "patches: $crate $version in $out already matches the series; stamp updated, tree kept"
    exit 0
fi
rm -rf "$out"
mkdir -p "$(dirname "$out")"
mv "$stage" "$out"
echo "patches: $crate $version patched into $out (${#series[@]} patches)"
