#!/usr/bin/env bash
# Metrics (root, Debian's prometheus): a machine exposes $SERIES series
# scraped every 5 s by the node's Prometheus.
#  1. Scrape cost: CPU and resident memory over $WINDOW s of the node
#     (`hangar up`) and of its Prometheus, with the machine scraped, set
#     against the same window with no app metrics at all (before the
#     machine starts).
#  2. Query latency: $ROUNDS instant queries through the per-org endpoint
#     (an org's token; the node confines and forwards the query) against
#     the same confined query sent straight to Prometheus, alternating.
#     Goal: at most 1.2x at p50.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
. scripts/lib.sh
ensure_commands "${MACHINE_COMMANDS[@]}" prometheus:prometheus curl:curl
[ "$(id -u)" = 0 ] || { echo "bench/metrics.sh runs machines: run it as root" >&2; exit 1; }
cargo build --release -q -p hangar
hangar=$PWD/target/release/hangar
work=$(mktemp -d)
export HANGAR_HOME=$work/home
series=${SERIES:-10000} window=${WINDOW:-30} rounds=${ROUNDS:-300}
api=$(free_port) prom=$(free_port)
start_node --listen "127.0.0.1:$api" --no-registry --no-edge --metrics on --prometheus-port "$prom"
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$prom/-/ready" >/dev/null && break; sleep 0.1; done
node_prom=$(cat "$HANGAR_HOME/prometheus/pid")

# CPU seconds (utime + stime) and resident MB of a process.
cpu() { awk '{printf "%.2f", ($14 + $15) / 100}' "/proc/$1/stat"; }
rss() { awk '/VmRSS/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
measure() {
    local n0 p0 n1 p1
    n0=$(cpu "$node") p0=$(cpu "$node_prom")
    sleep "$window"
    n1=$(cpu "$node") p1=$(cpu "$node_prom")
    echo "$(awk -v a="$n0" -v b="$n1" -v w="$window" 'BEGIN {printf "%.2f", (b - a) / w * 100}') $(rss "$node") \
$(awk -v a="$p0" -v b="$p1" -v w="$window" 'BEGIN {printf "%.2f", (b - a) / w * 100}') $(rss "$node_prom")"
}
read -r idle_node_cpu idle_node_rss idle_prom_cpu idle_prom_rss <<<"$(measure)"

busybox_tree "$work/base" sh httpd
mkdir -p "$work/base/www"
python3 - "$series" > "$work/base/www/metrics" <<'PY'
import sys
n = int(sys.argv[1])
print("# TYPE bench_requests_total counter")
for i in range(n):
    print(f'bench_requests_total{{route="/r{i % 100}",shard="{i // 100}"}} {i}')
PY
"$hangar" image build "$work/base" -t localhost/busybox:metrics --cmd /bin/sh >/dev/null
mkdir -p "$work/app"
"$hangar" launch --image localhost/busybox:metrics --name scraped --org acme --path "$work/app" >/dev/null
admin=$(python3 -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["token"])' "$HANGAR_HOME/config.toml")
id=$(curl -sf -H "Authorization: Bearer $admin" -H 'content-type: application/json' \
    -d '{"app": "scraped", "config": {"image": "localhost/busybox:metrics", "metrics": {"port": 9100, "path": "/metrics"}, "init": {"cmd": ["httpd", "-f", "-p", "9100", "-h", "/www"]}}}' \
    "http://127.0.0.1:$api/v1/machines" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
token=$("$hangar" auth token create --org acme | tr -d '\n')
confined='count(bench_requests_total{org="acme"})'
for _ in $(seq 300); do
    got=$(curl -s --data-urlencode "query=$confined" "http://127.0.0.1:$prom/api/v1/query" | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)')
    [ "$got" = "$series" ] && break
    sleep 0.5
done
[ "$got" = "$series" ] || { echo "the machine's $series series never showed in Prometheus (got $got)" >&2; exit 1; }
read -r busy_node_cpu busy_node_rss busy_prom_cpu busy_prom_rss <<<"$(measure)"

echo "scrape cost: $series series scraped every 5 s, ${window} s windows (CPU % of one core, resident MB)"
printf '  hangar up     no app metrics: %6s%% %8s MB   scraped: %6s%% %8s MB   added: %s%% CPU, %s MB\n' \
    "$idle_node_cpu" "$idle_node_rss" "$busy_node_cpu" "$busy_node_rss" \
    "$(awk -v a="$idle_node_cpu" -v b="$busy_node_cpu" 'BEGIN {printf "%.2f", b - a}')" \
    "$(awk -v a="$idle_node_rss" -v b="$busy_node_rss" 'BEGIN {printf "%.1f", b - a}')"
printf '  prometheus    no app metrics: %6s%% %8s MB   scraped: %6s%% %8s MB   added: %s%% CPU, %s MB\n' \
    "$idle_prom_cpu" "$idle_prom_rss" "$busy_prom_cpu" "$busy_prom_rss" \
    "$(awk -v a="$idle_prom_cpu" -v b="$busy_prom_cpu" 'BEGIN {printf "%.2f", b - a}')" \
    "$(awk -v a="$idle_prom_rss" -v b="$busy_prom_rss" 'BEGIN {printf "%.1f", b - a}')"

read -r a50 a99 b50 b99 na nb <<<"$(python3 bench/metrics_query.py "http://127.0.0.1:$api/v1/metrics" "$token" \
    "http://127.0.0.1:$prom" 'count(bench_requests_total)' "$confined" "$rounds")"
[ "$na" = "$series" ] && [ "$nb" = "$series" ] || { echo "the two answers differ: $na, $nb" >&2; exit 1; }
echo "query latency, $rounds rounds of count(bench_requests_total) (both answered $series):"
printf '  per-org endpoint (confined by the node)  p50 %7s ms  p99 %7s ms\n' "$a50" "$a99"
printf '  Prometheus directly (the same query)     p50 %7s ms  p99 %7s ms\n' "$b50" "$b99"
printf '  per-org / direct: p50 %sx (goal: at most 1.2x), p99 %sx\n' "$(ratio "$a50" "$b50")" "$(ratio "$a99" "$b99")"
"$hangar" machine destroy "$id" --force >/dev/null
