#!/usr/bin/env bash
# Benchmarks of `hangar image` against its peers, same run, printed as ratios
# (Hangar's median wall time over the peer's; below 1.0 means Hangar is faster):
#   unpack: `hangar image unpack` vs `umoci unpack`, same multi-layer image
#   pull:   `hangar image pull` vs `skopeo copy docker://... oci:...`, both
#           from one docker-registry on 127.0.0.1
# The image (over 200 MB, several layers) is built from files on this machine.
# Usage: bench/image.sh [rounds]   (default 3)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
. bench/lib.sh
ensure_commands docker-registry:docker-registry skopeo:skopeo umoci:umoci
rounds=${1:-3}
cargo build --release -q -p hangar
hangar=$PWD/target/release/hangar
work=$(mktemp -d /var/tmp/hangar-bench.XXXXXX)
reg_pid=
cleanup() { [ -n "$reg_pid" ] && kill "$reg_pid" 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT
export HANGAR_HOME=$work/home

build_image 220

# unpack
"$hangar" image save "$image" -o "$work/layout" >/dev/null
tag=${image##*:}
# Every round unpacks into new directories; trees are deleted only at the end,
# because ext4 scans recently freed inodes when creating files right after a
# big delete, which would charge one tool for the other's cleanup.
ours=() theirs=()
for i in $(seq "$rounds"); do
    sync
    t0=$(now); "$hangar" image unpack "$image" "$work/rootfs-$i" >/dev/null; t1=$(now)
    ours+=("$(ms "$t0" "$t1")")
    sync
    t0=$(now); umoci unpack --image "$work/layout:$tag" "$work/bundle-$i" >/dev/null 2>&1; t1=$(now)
    theirs+=("$(ms "$t0" "$t1")")
done
u_ours=$(printf '%s\n' "${ours[@]}" | median)
u_theirs=$(printf '%s\n' "${theirs[@]}" | median)

# pull
port=$(free_port)
docker_registry "$port" "$work/registry"
remote=127.0.0.1:$port/bench/big:1
"$hangar" image push "$image" "$remote" >/dev/null
ours=() theirs=()
for i in $(seq "$rounds"); do
    sync
    t0=$(now); HANGAR_HOME=$work/pull-home-$i "$hangar" image pull "$remote" >/dev/null; t1=$(now)
    ours+=("$(ms "$t0" "$t1")")
    sync
    t0=$(now); skopeo copy -q --src-tls-verify=false "docker://$remote" "oci:$work/oci-$i:1" >/dev/null; t1=$(now)
    theirs+=("$(ms "$t0" "$t1")")
done
p_ours=$(printf '%s\n' "${ours[@]}" | median)
p_theirs=$(printf '%s\n' "${theirs[@]}" | median)

printf '%-7s hangar %6d ms   %-6s %6d ms   ratio %sx (goal <= %s)\n' \
    unpack "$u_ours" umoci "$u_theirs" "$(ratio "$u_ours" "$u_theirs")" 0.5 \
    pull "$p_ours" skopeo "$p_theirs" "$(ratio "$p_ours" "$p_theirs")" 1.0
