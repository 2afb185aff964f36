#!/usr/bin/env bash
# Apps (root): `hangar deploy` of a change to one layer, end to end (build,
# push to the node's registry, rolling replacement of 2 machines with
# checks) while a client requests through the edge (its errors and slowest
# answer are reported), and the cold start of scale to zero with the
# container driver:
# a request to an app whose machines are all stopped, until its response.
# Medians of $ROUNDS. The issue names no peer for these; the goal for the
# cold start is 300 ms.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
. scripts/lib.sh
ensure_commands "${MACHINE_COMMANDS[@]}" curl:curl
[ "$(id -u)" = 0 ] || { echo "bench/deploy.sh runs machines: run it as root" >&2; exit 1; }
cargo build --release -q -p hangar
hangar=$PWD/target/release/hangar
work=$(mktemp -d)
export HANGAR_HOME=$work/home
rounds=${ROUNDS:-5}
api=$(free_port) reg=$(free_port) edge=$(free_port) admin=$(free_port)
start_node --listen "127.0.0.1:$api" --registry-listen "127.0.0.1:$reg" --edge-listen "127.0.0.1:$edge" \
    --edge-admin-listen "127.0.0.1:$admin" --stop-machines

# The example on a busybox base, as the demo builds it.
busybox_tree "$work/base" sh cat ls httpd echo hostname date printf
"$hangar" image build "$work/base" -t localhost/busybox:demo --cmd /bin/sh >/dev/null
cp -a examples/hello "$work/hello"
cd "$work/hello"
sed -i 's/interval = "2s"/interval = "200ms"/' hangar.toml
"$hangar" launch >/dev/null
"$hangar" deploy --count 2 >/dev/null

echo "hangar deploy of a one-file change (build + push + rolling update of 2 machines), $rounds rounds:"
# A client requesting through the edge all the while: what a user of the
# app sees during the deploys.
python3 - "$edge" "$work/load.stop" > "$work/load.txt" <<'PY' &
import http.client, os, sys, time
port, stop = int(sys.argv[1]), sys.argv[2]
n, failed, worst = 0, 0, 0.0
while not os.path.exists(stop):
    n += 1
    t = time.perf_counter()
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        c.request("GET", "/healthz?load=%d" % n, headers={"Host": "hello.localhost"})
        ok = c.getresponse().status == 200
    except Exception:
        ok = False
    worst = max(worst, time.perf_counter() - t)
    failed += not ok
print(n, failed, round(worst * 1000))
PY
load=$!
for i in $(seq "$rounds"); do
    echo "<p>change $i</p>" >> www/index.html
    t0=$(now); "$hangar" deploy >/dev/null; t1=$(now)
    ms "$t0" "$t1"
done | tee "$work/deploy.txt" | tr '\n' ' '; echo
touch "$work/load.stop"; wait "$load"
echo "  median: $(median < "$work/deploy.txt") ms"
read -r n failed worst < "$work/load.txt"
echo "  meanwhile through the edge: $n requests, $failed not answered 200, slowest $worst ms"

# Scale to zero: stop after 1 s idle, then time a request.
sed -i 's/auto_stop_machines = "off"/auto_stop_machines = "stop"\nidle_timeout = "1s"/; s/min_machines_running = 1/min_machines_running = 0/' hangar.toml
"$hangar" deploy --count 1 >/dev/null
echo "cold start: request to an app with every machine stopped, until the response, $rounds rounds:"
for i in $(seq "$rounds"); do
    for _ in $(seq 200); do
        "$hangar" status --json | grep -q '"state": "started"' || break
        sleep 0.1
    done
    [ -n "${DEBUG:-}" ] && "$hangar" status >&2
    curl -s -o /dev/null -D "$work/head.$i" -w "%{http_code} %{time_total}\n" -H "Host: hello.localhost" "http://127.0.0.1:$edge/healthz?$i"
    [ -n "${DEBUG:-}" ] && grep -i x-hangar-error "$work/head.$i" >&2 || true
done | awk '$1 != 200 {print "  (answered " $1 ")" > "/dev/stderr"} {printf "%.0f\n", $2 * 1000}' | tee "$work/cold.txt" | tr '\n' ' '; echo
echo "  median: $(median < "$work/cold.txt") ms (goal: 300 ms)"
