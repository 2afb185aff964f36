#!/usr/bin/env bash
# `hangar proxy` against a direct connection to the machine's address,
# same run, same machine and services (root): a stream of $MB MB to a
# sink inside the machine (best of 3, MB/s), and $ROUNDS one-byte round
# trips to an echo service (p50/p99). Goal: at least 80% of the direct
# throughput. Prints both and the ratios, proxy / direct.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
. scripts/lib.sh
ensure_commands "${MACHINE_COMMANDS[@]}"
[ "$(id -u)" = 0 ] || { echo "bench/proxy.sh runs machines: run it as root" >&2; exit 1; }
cargo build --release -q -p hangar
hangar=$PWD/target/release/hangar
work=$(mktemp -d)
export HANGAR_HOME=$work/home
mb=${MB:-512} rounds=${ROUNDS:-2000}
api=$(free_port)
start_node --listen "127.0.0.1:$api" --no-registry --no-edge --metrics off
proxies=()
finish() {
    for p in "${proxies[@]}"; do kill "$p" 2>/dev/null || true; done
    stop_node
}
trap finish EXIT

busybox_tree "$work/base" sh nc wc cat printf chmod
"$hangar" image build "$work/base" -t localhost/busybox:proxy --cmd /bin/sh >/dev/null
mkdir -p "$work/app"
"$hangar" launch --image localhost/busybox:proxy --name tunnel --org acme --path "$work/app" >/dev/null
script='printf "#!/bin/sh\nexec wc -c\n" > /sink; chmod +x /sink; nc -ll -p 7000 -e /sink & exec nc -ll -p 7001 -e /bin/cat'
id=$("$hangar" machine run localhost/busybox:proxy --app tunnel -- sh -c "$script" | tail -n1)
v4=$("$hangar" machine status "$id" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["ipv4"])')
for _ in $(seq 100); do (exec 3<>"/dev/tcp/$v4/7001") 2>/dev/null && break; sleep 0.1; done

sink_port=$(free_port) echo_port=$(free_port)
"$hangar" proxy "$sink_port:7000" -a tunnel 2>>"$work/proxy.log" >/dev/null & proxies+=($!)
"$hangar" proxy "$echo_port:7001" -a tunnel 2>>"$work/proxy.log" >/dev/null & proxies+=($!)
wait_port "$sink_port"; wait_port "$echo_port"

read -r d_rate d_p50 d_p99 <<<"$(python3 bench/proxy_load.py "$v4" 7000 7001 "$mb" "$rounds")"
read -r p_rate p_p50 p_p99 <<<"$(python3 bench/proxy_load.py 127.0.0.1 "$sink_port" "$echo_port" "$mb" "$rounds")"
echo "a machine's TCP port, direct and through hangar proxy ($mb MB streams, best of 3; $rounds one-byte round trips):"
printf '  direct         %8s MB/s   round trip p50 %6s us  p99 %6s us\n' "$d_rate" "$d_p50" "$d_p99"
printf '  hangar proxy   %8s MB/s   round trip p50 %6s us  p99 %6s us\n' "$p_rate" "$p_p50" "$p_p99"
printf '  proxy / direct: throughput %sx (goal: at least 0.80x), round trip p50 +%s us\n' \
    "$(ratio "$p_rate" "$d_rate")" "$(awk -v a="$p_p50" -v b="$d_p50" 'BEGIN {printf "%.0f", a - b}')"
