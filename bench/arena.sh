#!/usr/bin/env bash
# The arena (issue #19): games per second with AI players behind
# OpenAI-compatible endpoints over HTTP (the scripted model server on
# loopback: first-legal against random), tic-tac-toe and connect four,
# against the same two strategies as built-in engines in the same run
# (the ratio is what asking over HTTP costs); then the rating fit for
# 100 players and 100,000 games against choix (PyPI), the usual Python
# Bradley-Terry library, on the same games: its MM (the algorithm Hangar
# uses) and its ILSR, with the correlation of the fitted strengths.
#
# GAMES (2000 per game and kind of player) and CONCURRENCY (16) change the load.
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
. scripts/lib.sh
ensure_python_modules choix:choix==0.4.1
cargo build --release -q -p hangar-games
bin=$PWD/target/release/hangar-games
work=$(mktemp -d)
trap 'kill $model 2>/dev/null; rm -rf "$work"' EXIT
games=${GAMES:-2000} conc=${CONCURRENCY:-16}

"$bin" scripted-model --listen 127.0.0.1:0 >"$work/model.out" &
model=$!
for _ in $(seq 50); do [ -s "$work/model.out" ] && break; sleep 0.1; done
addr=$(awk '{print $3}' "$work/model.out")

# rate KIND PLAYERS: games/s of one tournament of two players.
rate() {
    local kind=$1 players=$2 dir
    dir=$work/$kind-$RANDOM
    mkdir -p "$dir"
    { printf 'name = "bench"\ngames = ["%s"]\nper_pair = %s\nconcurrency = %s\nbootstrap = 10\n' "$kind" "$games" "$conc"
      printf '%b' "$players"; } >"$dir/t.toml"
    "$bin" arena run "$dir/t.toml" --out "$dir/res" | sed -n 's/.*(\([0-9.]*\) games\/s).*/\1/p'
}
http="[[player]]\nname = \"first\"\nbase_url = \"http://$addr/v1\"\nmodel = \"first-legal\"\n[[player]]\nname = \"random\"\nbase_url = \"http://$addr/v1\"\nmodel = \"random\"\n"
local_="[[player]]\nname = \"first\"\nengine = \"first-legal\"\n[[player]]\nname = \"random\"\nengine = \"random\"\n"

echo "games per second, $games games each, $conc at once:"
for kind in tic-tac-toe connect-four; do
    over=$(rate "$kind" "$http")
    inproc=$(rate "$kind" "$local_")
    echo "  $kind: endpoints over HTTP $over games/s, in-process engines $inproc games/s, ratio $(ratio "$over" "$inproc")x"
done

echo "rating fit, 100 players, 100,000 games:"
ours=$("$bin" arena fit-bench --players 100 --games 100000 --pairs "$work/pairs.json")
peer=$(python3 bench/arena_fit.py "$work/pairs.json" "$ours")
python3 - "$ours" "$peer" <<'PY'
import json, sys
ours, peer = json.loads(sys.argv[1]), json.loads(sys.argv[2])
o = ours["fit_ms"]
print(f"  hangar (MM) {o:.1f} ms")
for name in ["mm", "ilsr"]:
    p = peer[name]
    print(f"  choix {name.upper()} {p['ms']:.1f} ms: hangar is {p['ms'] / o:.1f}x faster; correlation of strengths {p['corr']:.6f}")
PY
