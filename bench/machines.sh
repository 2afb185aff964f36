#!/usr/bin/env bash
# Time from the Machines API's create call to the app's first output:
# (a) the first machine of an image (snapshots unpacked), (b) a second
# machine of the same image, against (c) `runc run` of an equivalent
# prepared bundle, same run. Prints medians and (b)/(c). Needs root.
# Usage: bench/machines.sh [rounds]   (default 10)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_commands "${MACHINE_COMMANDS[@]}"
rounds=${1:-10}
cargo build --release -q -p hangar
work=$(mktemp -d /var/tmp/hangar-bench.XXXXXX)
node_pid=
cleanup() {
    [ -n "$node_pid" ] && kill "$node_pid" 2>/dev/null
    python3 bench/machines.py cleanup "$work" || true
    rm -rf "$work"
}
trap cleanup EXIT
export HANGAR_HOME=$work/home
port=$(free_port 2>/dev/null || python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
target/release/hangar up --listen "127.0.0.1:$port" --no-registry 2>"$work/up.log" &
node_pid=$!
for _ in $(seq 100); do grep -q "Machines API" "$work/up.log" 2>/dev/null && break; sleep 0.1; done
python3 bench/machines.py run "$work" "$rounds" "$PWD/target/release/hangar"
