#!/usr/bin/env bash
# The egress proxy against going direct, same run, on loopback: median added
# latency per small request and throughput on 1 MB responses, for plain HTTP
# through the proxy and for CONNECT tunnels. (The origin is allowed with
# --allow-address: loopback is otherwise refused, as it should be.)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p hangar
free() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
origin=$(free) proxy=$(free)
target/release/hangar egress serve --listen-port "$proxy" --allow-address "127.0.0.1:$origin" 2>/dev/null &
pid=$!
trap 'kill $pid 2>/dev/null' EXIT
for _ in $(seq 50); do (exec 3<>"/dev/tcp/127.0.0.1/$proxy") 2>/dev/null && break; sleep 0.1; done
python3 bench/egress.py "$origin" "$proxy"
