#!/usr/bin/env bash
# The example game system (root): 1,000 concurrent games of connect four
# played by scripted clients (`hangar-games load`) over the WebSocket API
# through the edge, against the app deployed on 3 machines, with each
# move held by a backup before its acknowledgement, and against the same
# app with replication off, in the same run: move round trip p50/p99 and
# moves/s, and the ratio (the cost of never losing a move). Goal: p99 at
# most 10 ms with replication on.
#
# Then capacity (no think time, replication on and off), and failover:
# the same paced load on the replicated app, one of its machines
# killed (`kill -9` of its server and its init) mid-run: acknowledged moves
# lost (goal 0) and the longest a move waited for its acknowledgement
# (the time until every affected game accepts moves again).
#
# GAMES (1000), THINK_MS (a player's pause before each move, 1000) and
# SECONDS_EACH (20) change the load.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
. scripts/lib.sh
ensure_commands "${MACHINE_COMMANDS[@]}" curl:curl
[ "$(id -u)" = 0 ] || { echo "bench/games.sh runs machines: run it as root" >&2; exit 1; }
cargo build --release -q -p hangar
scripts/games-server --release >/dev/null
hangar=$PWD/target/release/hangar
load=$PWD/examples/games/bin/hangar-games
work=$(mktemp -d)
export HANGAR_HOME=$work/home
games=${GAMES:-1000} think=${THINK_MS:-1000} secs=${SECONDS_EACH:-20}
api=$(free_port) reg=$(free_port) edge=$(free_port) admin=$(free_port)
start_node --listen "127.0.0.1:$api" --registry-listen "127.0.0.1:$reg" --edge-listen "127.0.0.1:$edge" \
    --edge-admin-listen "127.0.0.1:$admin" --stop-machines

# The app twice: as it ships, and with replication off.
for app in games games-norep; do
    mkdir -p "$work/$app/bin"
    cp examples/games/hangar.toml examples/games/.hangarignore "$work/$app/"
    cp "$load" "$work/$app/bin/"
    sed -i "s/^app = \"games\"/app = \"$app\"/" "$work/$app/hangar.toml"
    if [ "$app" = games-norep ]; then
        sed -i 's/^\[env\]/[env]\nGAMES_REPLICATION = "off"/' "$work/$app/hangar.toml"
    fi
    (cd "$work/$app" && "$hangar" launch >/dev/null && "$hangar" deploy --count 3 >/dev/null)
done
# Until each app's machines see their three peers.
for app in games games-norep; do
    for _ in $(seq 100); do
        curl -s -H "Host: $app.localhost" "http://127.0.0.1:$edge/api/status" | grep -q '"peers":\["[^]]*","[^]]*","[^]]*"\]' && break
        sleep 0.2
    done
done

run() { "$load" load --edge "127.0.0.1:$edge" --host "$1.localhost" --games "$games" --think-ms "$think" --seconds "$secs"; }
field() { python3 -c 'import json,sys; print(json.loads(sys.argv[1])[sys.argv[2]])' "$1" "$2"; }

echo "$games concurrent games, a move every ~${think} ms per player, ${secs} s each, 3 machines:"
on=$(run games)
off=$(run games-norep)
for name in on off; do
    r=${!name}
    printf '  replication %-3s  p50 %6s ms  p99 %6s ms  %6s moves/s  (lost %s, setup errors %s)\n' "$name" \
        "$(field "$r" p50_ms)" "$(field "$r" p99_ms)" "$(field "$r" moves_per_s)" "$(field "$r" lost)" "$(field "$r" setup_errors)"
done
echo "  replication on / off: p50 $(ratio "$(field "$on" p50_ms)" "$(field "$off" p50_ms)")x, p99 $(ratio "$(field "$on" p99_ms)" "$(field "$off" p99_ms)")x, moves/s $(ratio "$(field "$on" moves_per_s)" "$(field "$off" moves_per_s)")x"

# Capacity: players that never think, so the moves come as fast as the
# answers (a closed loop: here latency is what the throughput costs).
cap=${CAPACITY_GAMES:-200}
runfast() { "$load" load --edge "127.0.0.1:$edge" --host "$1.localhost" --games "$cap" --think-ms 0 --seconds 10; }
fast_on=$(runfast games)
fast_off=$(runfast games-norep)
echo "capacity: $cap games with no think time, 10 s each:"
for name in fast_on fast_off; do
    r=${!name}
    printf '  replication %-3s  %6s moves/s  p50 %6s ms  p99 %6s ms\n' "${name#fast_}" \
        "$(field "$r" moves_per_s)" "$(field "$r" p50_ms)" "$(field "$r" p99_ms)"
done
echo "  replication on / off: moves/s $(ratio "$(field "$fast_on" moves_per_s)" "$(field "$fast_off" moves_per_s)")x"

echo "failover: the same load, one of the 3 machines killed after $((secs / 2)) s:"
run games > "$work/failover.json" &
loader=$!
sleep $((secs / 2))
victim=""
for p in $(pgrep -f "hangar-games serve"); do
    if tr '\0' '\n' < "/proc/$p/environ" 2>/dev/null | grep -qx "HANGAR_APP_NAME=games"; then victim=$p; break; fi
done
[ -n "$victim" ] || { echo "no server of games to kill" >&2; exit 1; }
init=$(awk '/^PPid:/ {print $2}' "/proc/$victim/status")
kill -9 "$init" "$victim" 2>/dev/null || true
echo "  killed the server $victim and its machine's init $init"
wait "$loader"
r=$(cat "$work/failover.json")
echo "  acknowledged moves lost: $(field "$r" lost); played but not acknowledged: $(field "$r" played_unacknowledged)"
echo "  longest wait for an acknowledgement: $(field "$r" longest_wait_ms) ms; p99 $(field "$r" p99_ms) ms; reconnects $(field "$r" reconnects), retries $(field "$r" retries)"
