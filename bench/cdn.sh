#!/usr/bin/env bash
# The CDN's cache ratio as a cluster: the same Zipf-distributed workload
# (10,000 objects of 1 KiB, REQUESTS requests, exponent ZIPF_S) from
# clients in 3 regions with 2 edge nodes each, against
#   (a) independent caches per node (the seed's naive start: 6 Hangar edges, no mesh),
#   (b) the seed's design rebuilt with Debian's nginx: per region, a front
#       that hashes `$request_uri consistent` over the region's two caches,
#   (c) Hangar sharded (a mesh: each key owned by one edge per region),
#   (d) Hangar sharded with a shield region (fra) in front of the origin.
# Reports hit ratio (requests the origin did not see) and origin requests
# per distinct object, and the ratios against (b). Counts, not times: the
# machine's noise does not move them.
# Then failover: the app has machines in ams and fra, $DELAY injected
# between regions; clients in ams send requests while ams's machines are
# all killed: errors seen (goal: none), when answers stopped coming from
# ams, and when the latency settled.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
. scripts/lib.sh
ensure_commands nginx:nginx-light curl:curl
cargo build --release -q -p hangar
hangar=$PWD/target/release/hangar
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.2; rm -rf "$work"; }
trap cleanup EXIT
requests=${REQUESTS:-30000} zipf=${ZIPF_S:-0.9} seed=${SEED:-7}
names=(a1 a2 f1 f2 l1 l2) regions=(ams ams fra fra lon lon)

origin=$(free_port)
python3 bench/cdn_load.py origin "$origin" & pids+=($!)
wait_port "$origin"

# edges MESH SHIELD: six `hangar edge serve`; MESH=1 joins them; sets $ports, $edge_pids.
edges() {
    local mesh=$1 shield=$2 i j
    ports=() edge_pids=()
    for i in 0 1 2 3 4 5; do ports+=("$(free_port)"); done
    for i in 0 1 2 3 4 5; do
        {
            echo "listen = \"127.0.0.1:${ports[$i]}\""
            echo "[[hosts]]"
            echo "name = \"bench.localhost\""
            echo "backends = [\"127.0.0.1:$origin\"]"
            [ -n "$shield" ] && echo "cache.shield = \"$shield\""
            if [ "$mesh" = 1 ]; then
                echo "[mesh]"
                echo "node = \"${names[$i]}\""
                echo "region = \"${regions[$i]}\""
                echo "token = \"bench-mesh-token-0123456789\""
                for j in 0 1 2 3 4 5; do
                    [ "$i" = "$j" ] && continue
                    printf '[[mesh.peers]]\nname = "%s"\nregion = "%s"\naddr = "127.0.0.1:%s"\n' "${names[$j]}" "${regions[$j]}" "${ports[$j]}"
                done
            fi
        } > "$work/edge-$i.toml"
        "$hangar" edge serve -c "$work/edge-$i.toml" 2>/dev/null & edge_pids+=($!) pids+=($!)
    done
    for i in 0 1 2 3 4 5; do wait_port "${ports[$i]}"; done
    sleep 1.5 # every edge has pinged the others
}
stop_edges() { for p in "${edge_pids[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.3; }

# run NAME REGIONS: the workload; prints the line and sets ${NAME}_hit, ${NAME}_per.
run() {
    curl -s "http://127.0.0.1:$origin/reset" >/dev/null
    read -r total distinct errors <<<"$(python3 bench/cdn_load.py load "$seed" "$requests" "$zipf" "$2")"
    read -r fetched objects <<<"$(curl -s "http://127.0.0.1:$origin/stats")"
    local hit per
    hit=$(awk -v f="$fetched" -v t="$total" 'BEGIN {printf "%.4f", 1 - f / t}')
    per=$(awk -v f="$fetched" -v d="$distinct" 'BEGIN {printf "%.3f", f / d}')
    printf '  %-34s hit ratio %s  origin requests %6s  per distinct object %s  errors %s\n' "$1" "$hit" "$fetched" "$per" "$errors"
    eval "${3}_hit=$hit ${3}_per=$per"
}
groups() { echo "${ports[0]},${ports[1]};${ports[2]},${ports[3]};${ports[4]},${ports[5]}"; }

echo "cdn: $requests requests, Zipf s=$zipf over 10,000 objects, 3 regions x 2 edges, 4 clients per region"
edges 0 ""
run "(a) independent caches (hangar)" "$(groups)" a
stop_edges

# (b) nginx: one process, six nodes (a cache zone each), a front per node.
mkdir -p "$work/nginx"
fronts=() caches=()
for i in 0 1 2 3 4 5; do fronts+=("$(free_port)"); caches+=("$(free_port)"); done
{
    echo "daemon off; user root; worker_processes 2; pid $work/nginx/pid; error_log $work/nginx/error.log;"
    echo "events { worker_connections 4096; }"
    echo "http { access_log off;"
    echo "  client_body_temp_path $work/nginx; proxy_temp_path $work/nginx; fastcgi_temp_path $work/nginx; uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;"
    echo "  upstream origin { server 127.0.0.1:$origin; keepalive 32; }"
    for r in 0 1 2; do
        echo "  upstream region$r { hash \$request_uri consistent; server 127.0.0.1:${caches[$((r * 2))]}; server 127.0.0.1:${caches[$((r * 2 + 1))]}; keepalive 32; }"
    done
    for i in 0 1 2 3 4 5; do
        echo "  proxy_cache_path $work/nginx/cache$i keys_zone=c$i:10m max_size=1g;"
        echo "  server { listen 127.0.0.1:${caches[$i]}; location / { proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_cache c$i; proxy_cache_lock on; proxy_cache_lock_timeout 5s; } }"
        echo "  server { listen 127.0.0.1:${fronts[$i]}; location / { proxy_pass http://region$((i / 2)); proxy_http_version 1.1; proxy_set_header Connection \"\"; proxy_set_header Host \$host; } }"
    done
    echo "}"
} > "$work/nginx.conf"
nginx -c "$work/nginx.conf" & ngx=$! pids+=($!)
for p in "${fronts[@]}" "${caches[@]}"; do wait_port "$p"; done
run "(b) nginx, hash \$request_uri consistent" "${fronts[0]},${fronts[1]};${fronts[2]},${fronts[3]};${fronts[4]},${fronts[5]}" b
kill "$ngx" 2>/dev/null || true

edges 1 ""
run "(c) hangar sharded" "$(groups)" c
stop_edges
edges 1 fra
run "(d) hangar sharded, shield fra" "$(groups)" d
stop_edges

echo "  hit ratio against (b): (a) $(ratio "$a_hit" "$b_hit")x  (c) $(ratio "$c_hit" "$b_hit")x  (d) $(ratio "$d_hit" "$b_hit")x"
echo "  origin requests per distinct object against (b): (a) $(ratio "$a_per" "$b_per")x  (c) $(ratio "$c_per" "$b_per")x  (d) $(ratio "$d_per" "$b_per")x"
echo "  goal: (d) at most 1.05 per distinct object (it is $d_per), hit ratio at least (b)'s"

# Failover: ams's and fra's machines (origins), ams's killed mid-run.
delay=${DELAY:-20ms}
ams_o=$(free_port) fra_o=$(free_port)
python3 bench/cdn_load.py origin "$ams_o" ams & ams_pid=$! pids+=($!)
python3 bench/cdn_load.py origin "$fra_o" fra & pids+=($!)
wait_port "$ams_o"; wait_port "$fra_o"
ports=() edge_pids=()
for i in 0 1 2 3 4 5; do ports+=("$(free_port)"); done
for i in 0 1 2 3 4 5; do
    case ${regions[$i]} in
        ams) backends="\"127.0.0.1:$ams_o\"" elsewhere='["f1", "f2"]' ;;
        fra) backends="\"127.0.0.1:$fra_o\"" elsewhere='["a1", "a2"]' ;;
        *) backends="" elsewhere='["a1", "a2", "f1", "f2"]' ;;
    esac
    {
        echo "listen = \"127.0.0.1:${ports[$i]}\""
        printf '[[hosts]]\nname = "bench.localhost"\nbackends = [%s]\nelsewhere = %s\n' "$backends" "$elsewhere"
        printf '[mesh]\nnode = "%s"\nregion = "%s"\ntoken = "bench-mesh-token-0123456789"\n' "${names[$i]}" "${regions[$i]}"
        for j in 0 1 2 3 4 5; do
            [ "$i" = "$j" ] && continue
            d=0ms; [ "${regions[$i]}" != "${regions[$j]}" ] && d=$delay
            printf '[[mesh.peers]]\nname = "%s"\nregion = "%s"\naddr = "127.0.0.1:%s"\ndelay = "%s"\n' "${names[$j]}" "${regions[$j]}" "${ports[$j]}" "$d"
        done
    } > "$work/fail-$i.toml"
    "$hangar" edge serve -c "$work/fail-$i.toml" 2>/dev/null & edge_pids+=($!) pids+=($!)
done
for i in 0 1 2 3 4 5; do wait_port "${ports[$i]}"; done
sleep 1.5
( sleep 2; kill -9 "$ams_pid" ) &
read -r n errors switch settle before after <<<"$(python3 bench/cdn_load.py failover 6 2 "${ports[0]},${ports[1]}")"
echo "failover: ams's machines killed under 4 clients in ams ($delay injected between regions), $n requests"
echo "  errors seen by clients: $errors (goal: none); answers from ams stopped ${switch} ms after the kill; latency settled after ${settle} ms"
echo "  p50 before ${before} ms (ams), after ${after} ms (fra): $(ratio "$after" "$before")x"
stop_edges
