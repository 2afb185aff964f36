#!/usr/bin/env bash
# The egress proxy against going direct and against Debian's squid as a
# forward proxy (no cache), same run, on loopback: median added latency per
# small request and throughput on 1 MiB responses, for plain HTTP through
# the proxy and for CONNECT tunnels, with ratios hangar/squid. A plain
# socat TCP relay (1 MiB buffers) shows the floor: what the extra hop through
# user space costs on this machine before any proxy work. (The origin
# is allowed with --allow-address: loopback is otherwise refused, as it
# should be.)
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
ensure_commands squid:squid python3:python3 socat:socat
cargo build --release -q -p hangar
free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
origin=$(free) proxy=$(free) squid_port=$(free) relay=$(free)
work=$(mktemp -d)
chmod 755 "$work"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
target/release/hangar egress serve --listen-port "$proxy" --allow-address "127.0.0.1:$origin" 2>/dev/null &
pids+=($!)
socat -b 1048576 "TCP-LISTEN:$relay,bind=127.0.0.1,fork,reuseaddr,nodelay" "TCP:127.0.0.1:$origin,nodelay" 2>"$work/socat.err" &
pids+=($!)
# squid as a plain forward proxy: every client and port allowed, no cache,
# no logs on the request path.
cat > "$work/squid.conf" <<CONF
http_port 127.0.0.1:$squid_port
acl CONNECT method CONNECT
http_access allow all
cache deny all
cache_mem 8 MB
access_log none
cache_store_log none
cache_log $work/cache.log
pid_filename $work/squid.pid
coredump_dir $work
shutdown_lifetime 0 seconds
forwarded_for delete
via off
CONF
squid -N -f "$work/squid.conf" 2>"$work/squid.err" &
pids+=($!)
for port in "$proxy" "$squid_port" "$relay"; do
    for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "a proxy did not start on $port" >&2; cat "$work/squid.err" "$work/cache.log" >&2 2>/dev/null; exit 1; }
done
python3 bench/egress.py "$origin" "$relay" "hangar=$proxy" "squid=$squid_port"
