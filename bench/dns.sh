#!/usr/bin/env bash
# `.internal` DNS (root): a node with $MACHINES machines of one app answers
# Fly's names for them on its org network's gateway; Debian's dnsmasq,
# started beside it on the same gateway address (another port, bound to
# the same bridge), serves a hosts file and TXT records of the same names
# with the same answers (checked first). dnsperf runs inside one of the
# machines' network namespace against each in turn, the same query file:
# answers/s at full load ($SECONDS_EACH s each, 100 queries outstanding),
# then p50/p99 latency at a steady 2000 queries/s (so queueing in the
# client does not count). Prints both and the ratios, hangar / dnsmasq.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
. scripts/lib.sh
ensure_commands "${MACHINE_COMMANDS[@]}" dnsperf:dnsperf dnsmasq:dnsmasq-base dig:bind9-dnsutils \
    nsenter:util-linux
[ "$(id -u)" = 0 ] || { echo "bench/dns.sh runs machines: run it as root" >&2; exit 1; }
cargo build --release -q -p hangar
hangar=$PWD/target/release/hangar
work=$(mktemp -d)
export HANGAR_HOME=$work/home
machines=${MACHINES:-8}
each=${SECONDS_EACH:-10}
api=$(free_port)
start_node --listen "127.0.0.1:$api" --no-registry --no-edge
dnsmasq_pid=
finish() {
    [ -n "$dnsmasq_pid" ] && kill "$dnsmasq_pid" 2>/dev/null
    stop_node
}
trap finish EXIT

busybox_tree "$work/base" sh sleep
"$hangar" image build "$work/base" -t localhost/busybox:dns --cmd /bin/sh >/dev/null
mkdir -p "$work/app"
"$hangar" launch --image localhost/busybox:dns --name bench --org acme --path "$work/app" >/dev/null
ids=()
for _ in $(seq "$machines"); do
    ids+=("$("$hangar" machine run localhost/busybox:dns --app bench -- sleep 100000 | tail -n1)")
done
first=${ids[0]}
ns=/var/run/netns/hangar-${first:0:12}
json() { "$hangar" machine status "$1" --json | python3 -c "import json,sys; print(json.load(sys.stdin)[\"$2\"])"; }
v4=$(json "$first" ipv4)
gw=${v4%.*}.1
bridge=$(ip -o addr show | awk -v gw="$gw/24" '$4 == gw {print $2}')
region=$(json "$first" region)
# The machine's side of the network: where every query is sent from.
inside() { nsenter --net="$ns" "$@"; }

# The same names for dnsmasq: addresses in a hosts file, texts as records.
hosts=$work/hosts
: > "$hosts"
vms=()
for id in "${ids[@]}"; do
    a4=$(json "$id" ipv4) a6=$(json "$id" private_ip)
    printf '%s bench.internal %s.bench.internal %s.vm.bench.internal\n%s bench.internal %s.bench.internal %s.vm.bench.internal\n' \
        "$a4" "$region" "$id" "$a6" "$region" "$id" >> "$hosts"
    vms+=("$id $region")
done
near4=$(inside dig +short "@$gw" A top1.nearest.of.bench.internal) near6=$(inside dig +short "@$gw" AAAA top1.nearest.of.bench.internal)
printf '%s top1.nearest.of.bench.internal\n%s top1.nearest.of.bench.internal\n' "$near4" "$near6" >> "$hosts"
# One string, as hangar answers it: ids in order, quoted in a config file
# (dnsmasq splits an unquoted text at its commas, and only its config files
# read quotes).
vms_txt=$(printf '%s\n' "${vms[@]}" | sort | paste -sd,)
cat > "$work/dnsmasq.conf" <<CONF
txt-record=_apps.internal,bench
txt-record=vms.bench.internal,"$vms_txt"
txt-record=regions.bench.internal,$region
CONF
port=5353
dnsmasq -k --user=root --no-resolv --no-hosts --addn-hosts="$hosts" --listen-address="$gw" --port=$port \
    --bind-interfaces --local=/internal/ --cache-size=10000 --log-facility="$work/dnsmasq.log" \
    --conf-file="$work/dnsmasq.conf" &
dnsmasq_pid=$!
for _ in $(seq 50); do grep -q "read $hosts" "$work/dnsmasq.log" 2>/dev/null && break; sleep 0.1; done
kill -0 "$dnsmasq_pid" 2>/dev/null || { echo "dnsmasq did not start:" >&2; cat "$work/dnsmasq.log" >&2; exit 1; }

queries=$work/queries
{
    echo "bench.internal A"; echo "bench.internal AAAA"
    echo "$region.bench.internal AAAA"; echo "top1.nearest.of.bench.internal AAAA"
    for id in "${ids[@]}"; do echo "$id.vm.bench.internal AAAA"; done
    echo "_apps.internal TXT"; echo "vms.bench.internal TXT"; echo "regions.bench.internal TXT"
    echo "nope.internal A"; echo "gone.vm.bench.internal AAAA"
} > "$queries"

# Both must give the same answers to every query before either is timed.
while read -r name type; do
    a=$(inside dig +short "@$gw" "$type" "$name" | sort) b=$(inside dig +short "@$gw" -p $port "$type" "$name" | sort)
    sa=$(inside dig "@$gw" "$type" "$name" | grep -o 'status: [A-Z]*') sb=$(inside dig "@$gw" -p $port "$type" "$name" | grep -o 'status: [A-Z]*')
    if [ "$a" != "$b" ] || [ "$sa" != "$sb" ]; then
        echo "answers differ for $name $type: hangar [$sa $a] dnsmasq [$sb $b]" >&2
        cat "$hosts" "$work/dnsmasq.log" >&2
        exit 1
    fi
done < "$queries"

# CPU time (user + system, in clock ticks) of the server: hangar's threads
# serving this net, dnsmasq's process.
net=$(echo "$v4" | cut -d. -f3)
ticks() {
    if [ "$1" = hangar ]; then
        for t in /proc/$node/task/*; do
            if [ "$(cat "$t/comm")" = "dns-udp-$net" ]; then awk '{print $14 + $15}' "$t/stat"; fi
        done | awk '{s += $1} END {print s}'
    else
        awk '{print $14 + $15}' "/proc/$dnsmasq_pid/stat"
    fi
}
port_of() { [ "$1" = hangar ] && echo 53 || echo $port; }
hz=$(getconf CLK_TCK)
# Full load: answers/s, and the server's CPU microseconds per answer.
load() {
    local before out after
    before=$(ticks "$1")
    out=$(inside dnsperf -s "$gw" -p "$(port_of "$1")" -d "$queries" -l "$each" -q 100 2>&1)
    after=$(ticks "$1")
    echo "$out" | awk -v t=$((after - before)) -v hz="$hz" '
        /Queries completed:/ {n = $3} /Queries per second:/ {q = $4}
        END {printf "%d %.2f\n", q, t * 1000000 / hz / n}'
}
# p50 and p99 latency in microseconds at a steady 2000 queries/s.
latency() {
    inside dnsperf -s "$gw" -p "$(port_of "$1")" -d "$queries" -l "$each" -Q 2000 -v 2>/dev/null |
        awk '/^> / {print $NF * 1000000}' | sort -n |
        awk '{a[NR]=$1} END {printf "%d %d\n", a[int(NR*0.5)], a[int(NR*0.99)]}'
}
rounds=${ROUNDS:-3}
echo "$machines machines of one app; $(wc -l < "$queries") names (addresses, TXT, NXDOMAIN), on $gw ($bridge); $rounds rounds of ${each}s each, the two alternating which goes first:"
for r in $(seq "$rounds"); do
    order="hangar dnsmasq"; [ $((r % 2)) = 0 ] && order="dnsmasq hangar"
    for who in $order; do
        read -r q cpu < <(load "$who")
        read -r p50 p99 < <(latency "$who")
        echo "$q $cpu $p50 $p99" >> "$work/$who.runs"
        printf '  round %d %-8s %7d answers/s  %6s us CPU/answer  p50 %4d us  p99 %4d us\n' "$r" "$who" "$q" "$cpu" "$p50" "$p99"
    done
done
med() { awk -v c="$2" '{print $c}' "$work/$1.runs" | median; }
for who in hangar dnsmasq; do
    printf '  median   %-8s %7s answers/s  %6s us CPU/answer  p50 %4s us  p99 %4s us\n' "$who" "$(med "$who" 1)" "$(med "$who" 2)" "$(med "$who" 3)" "$(med "$who" 4)"
done
echo "  hangar / dnsmasq: answers/s $(ratio "$(med hangar 1)" "$(med dnsmasq 1)")x," \
    "CPU per answer $(ratio "$(med hangar 2)" "$(med dnsmasq 2)")x, p99 $(ratio "$(med hangar 4)" "$(med dnsmasq 4)")x"
