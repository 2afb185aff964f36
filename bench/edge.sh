#!/usr/bin/env bash
# The edge against nginx (proxy_cache, proxy_cache_lock on) and Varnish, in
# the same run, on the same origin and machine:
#  1. cached hits of 1 KiB and 100 KiB objects with wrk (fixed connections):
#     requests/s and p99, and the ratios hangar/peer;
#  2. miss storms: many clients at once on a cold URL of a slow origin:
#     p50/p99 latency and origin requests (nginx's lock waiters poll every
#     500 ms; Hangar and Varnish wake theirs when the response arrives);
#  3. purge latency: 10,000 objects cached, one surrogate key (100 of them)
#     purged through the admin API, timed from request to answer.
# Needs wrk, nginx and varnish (scripts/test installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
. scripts/lib.sh
ensure_commands wrk:wrk nginx:nginx-light varnishd:varnish curl:curl
cargo build --release -q -p hangar
hangar=$PWD/target/release/hangar
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; sleep 0.2; rm -rf "$work"; }
trap cleanup EXIT
conns=${CONNS:-50} secs=${SECS:-10} delay=${DELAY_MS:-200} rounds=${ROUNDS:-10} clients=${CLIENTS:-100}

origin=$(free_port) edge=$(free_port) admin=$(free_port) ngx=$(free_port) varn=$(free_port)
python3 bench/edge_origin.py "$origin" "$delay" & pids+=($!)
wait_port "$origin"

cat > "$work/edge.toml" <<TOML
listen = "127.0.0.1:$edge"
[admin]
listen = "127.0.0.1:$admin"
token = "bench"
[[hosts]]
name = "bench.localhost"
backends = ["127.0.0.1:$origin"]
TOML
"$hangar" edge serve -c "$work/edge.toml" 2>/dev/null & pids+=($!)

mkdir -p "$work/nginx"
cat > "$work/nginx.conf" <<NGINX
daemon off;
user root;
worker_processes auto;
pid $work/nginx/pid;
error_log $work/nginx/error.log;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/nginx; proxy_temp_path $work/nginx; fastcgi_temp_path $work/nginx;
  uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;
  proxy_cache_path $work/nginx/cache keys_zone=c:10m max_size=1g;
  upstream origin { server 127.0.0.1:$origin; keepalive 32; }
  server {
    listen 127.0.0.1:$ngx;
    location / {
      proxy_pass http://origin; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_cache c; proxy_cache_lock on; proxy_cache_lock_timeout 5s;
      add_header Cache-Status \$upstream_cache_status;
    }
  }
}
NGINX
nginx -c "$work/nginx.conf" & pids+=($!)

varnishd -F -j none -n "$work/varnish" -a "127.0.0.1:$varn" -b "127.0.0.1:$origin" -s malloc,256m >/dev/null 2>&1 & pids+=($!)
for p in $edge $ngx $varn; do wait_port "$p"; done

# wrk PORT PATH -> "requests/s p99_ms"
bench() {
    curl -s -o /dev/null -H "Host: bench.localhost" "http://127.0.0.1:$1$2"   # warm the cache
    wrk -t2 -c"$conns" -d"${secs}s" --latency -H "Host: bench.localhost" "http://127.0.0.1:$1$2" |
        awk '/Requests\/sec/ {rps=$2} / 99%/ {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; p99=v} END {printf "%.0f %.2f\n", rps, p99}'
}

echo "cached hits: wrk -t2 -c$conns -d${secs}s (requests/s, p99 ms)"
for obj in /1k /100k; do
    read -r h_rps h_p99 <<<"$(bench "$edge" "$obj")"
    read -r n_rps n_p99 <<<"$(bench "$ngx" "$obj")"
    read -r v_rps v_p99 <<<"$(bench "$varn" "$obj")"
    printf '  %-6s hangar %8s req/s p99 %6s ms | nginx %8s req/s p99 %6s ms | varnish %8s req/s p99 %6s ms\n' \
        "$obj" "$h_rps" "$h_p99" "$n_rps" "$n_p99" "$v_rps" "$v_p99"
    printf '  %-6s ratio hangar/nginx: %sx req/s, p99 %sx | hangar/varnish: %sx req/s, p99 %sx\n' \
        "$obj" "$(ratio "$h_rps" "$n_rps")" "$(ratio "$h_p99" "$n_p99")" "$(ratio "$h_rps" "$v_rps")" "$(ratio "$h_p99" "$v_p99")"
done

echo "miss storms: $rounds rounds x $clients clients on a cold URL, origin answers in ${delay} ms (p50, p99, max ms; origin requests per round)"
count() { curl -s "http://127.0.0.1:$origin/count"; }
for peer in hangar:$edge nginx:$ngx varnish:$varn; do
    name=${peer%%:*} port=${peer##*:}
    before=$(count)
    read -r p50 p99 max errs <<<"$(python3 bench/edge_storm.py "$port" bench.localhost "$rounds" "$clients")"
    after=$(count)
    printf '  %-8s p50 %7s  p99 %7s  max %7s  errors %s  origin requests/round %s\n' "$name" "$p50" "$p99" "$max" "$errs" \
        "$(awk -v a="$before" -v b="$after" -v r="$rounds" 'BEGIN {printf "%.1f", (b - a) / r}')"
    eval "${name}_storm=$p99"
done
echo "  ratio p99 hangar/nginx: $(ratio "$hangar_storm" "$nginx_storm")x, hangar/varnish: $(ratio "$hangar_storm" "$varnish_storm")x"

echo "purge: 10,000 objects cached, one surrogate key (100 objects) purged"
python3 - "$edge" <<'PY'
import http.client, sys
c = http.client.HTTPConnection("127.0.0.1", int(sys.argv[1]))
for i in range(10000):
    c.request("GET", "/obj/%d" % i, headers={"Host": "bench.localhost"})
    c.getresponse().read()
PY
for tag in 1 2 3 4 5; do
    curl -s -o /dev/null -w '%{time_total}\n' -X POST -H "Authorization: Bearer bench" \
        -d "{\"tag\":\"tag-$tag\"}" "http://127.0.0.1:$admin/purge"
done | awk '{ms = $1 * 1000; print ms}' | median | awk '{printf "  median purge request, end to end: %.2f ms\n", $1}'
echo "  (tag-6: $(curl -s -X POST -H "Authorization: Bearer bench" -d '{"tag":"tag-6"}' "http://127.0.0.1:$admin/purge"))"
