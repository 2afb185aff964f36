#!/usr/bin/env bash
# Hangar's registry against Debian's docker-registry 2.8, same run, same
# client: skopeo pushes a multi-layer image of over 500 MB (from an OCI
# layout) to each, then pulls it back (into a fresh OCI layout). Prints
# median wall times, their ratio (Hangar / docker-registry; below 1.0 means
# Hangar is faster) and each server's peak resident memory (VmHWM).
# Usage: bench/registry.sh [rounds]   (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
. bench/lib.sh
ensure_commands docker-registry:docker-registry skopeo:skopeo
rounds=${1:-3}
cargo build --release -q -p hangar
hangar=$PWD/target/release/hangar
work=$(mktemp -d /var/tmp/hangar-bench.XXXXXX)
reg_pid= ours_pid=
cleanup() {
    [ -n "$reg_pid" ] && kill "$reg_pid" 2>/dev/null
    [ -n "$ours_pid" ] && kill "$ours_pid" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
export HANGAR_HOME=$work/home

build_image 520
"$hangar" image save "$image" -o "$work/layout" >/dev/null
tag=${image##*:}

their_port=$(free_port)
docker_registry "$their_port" "$work/docker-registry"
our_port=$(free_port)
HANGAR_HOME=$work/registry-home "$hangar" registry serve --listen "127.0.0.1:$our_port" 2>"$work/ours.log" &
ours_pid=$!
wait_port "$our_port"
token=$(HANGAR_HOME=$work/registry-home "$hangar" registry token create --org bench)

push_ours=() push_theirs=() pull_ours=() pull_theirs=()
# skopeo remembers where it has seen blobs and would mount them from an
# earlier round's repository instead of uploading: forget before each copy.
copy() {
    rm -f /var/lib/containers/cache/blob-info-cache-v1.boltdb "$HOME/.local/share/containers/cache/blob-info-cache-v1.boltdb"
    skopeo copy -q --src-tls-verify=false --dest-tls-verify=false "$@" >/dev/null
}
for i in $(seq "$rounds"); do
    # A new repository each round, so nothing is skipped as already there.
    sync; t0=$(now); copy --dest-creds "x:$token" "oci:$work/layout:$tag" "docker://127.0.0.1:$our_port/bench/r$i:1"; t1=$(now)
    push_ours+=("$(ms "$t0" "$t1")")
    sync; t0=$(now); copy "oci:$work/layout:$tag" "docker://127.0.0.1:$their_port/bench/r$i:1"; t1=$(now)
    push_theirs+=("$(ms "$t0" "$t1")")
    sync; t0=$(now); copy --src-creds "x:$token" "docker://127.0.0.1:$our_port/bench/r$i:1" "oci:$work/pull-ours-$i:1"; t1=$(now)
    pull_ours+=("$(ms "$t0" "$t1")")
    sync; t0=$(now); copy "docker://127.0.0.1:$their_port/bench/r$i:1" "oci:$work/pull-theirs-$i:1"; t1=$(now)
    pull_theirs+=("$(ms "$t0" "$t1")")
    rm -rf "$work/pull-ours-$i" "$work/pull-theirs-$i"
done
hwm() { awk '/VmHWM/ {print int($2 / 1024)}' "/proc/$1/status"; }
mem_ours=$(hwm "$ours_pid")
mem_theirs=$(hwm "$reg_pid")

for op in push pull; do
    o=$(eval 'printf "%s\n" "${'$op'_ours[@]}"' | median)
    t=$(eval 'printf "%s\n" "${'$op'_theirs[@]}"' | median)
    printf '%-5s hangar %6d ms   docker-registry %6d ms   ratio %sx (goal <= 1.0)\n' "$op" "$o" "$t" "$(ratio "$o" "$t")"
done
printf 'peak memory: hangar %d MiB, docker-registry %d MiB (ratio %sx; goal < 1.0)\n' \
    "$mem_ours" "$mem_theirs" "$(ratio "$mem_ours" "$mem_theirs")"
