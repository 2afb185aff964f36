# Shared by the benchmarks. Needs $hangar (the release binary), $work and
# $HANGAR_HOME set by the caller.

# build_image MIN_MB: an image of real trees from this machine, one layer
# per tree, until it passes MIN_MB uncompressed. Sets $image, $layers, $total.
build_image() {
    local min=$1 src dir size base=()
    total=0 layers=0
    for src in /usr/lib/gcc /usr/lib/python3.11 /usr/share/perl /usr/share/doc /usr/share/locale \
        /usr/bin /usr/lib/x86_64-linux-gnu /usr/share; do
        [ -d "$src" ] || continue
        dir=$work/src/$layers
        mkdir -p "$dir$(dirname "$src")"
        cp -a "$src" "$dir$(dirname "$src")/"
        size=$(du -sm "$dir" | cut -f1)
        total=$((total + size))
        "$hangar" image build "$dir" -t "bench/big:$layers" "${base[@]}" >/dev/null
        base=(--base "bench/big:$layers")
        layers=$((layers + 1))
        [ "$total" -ge "$min" ] && break
    done
    image=bench/big:$((layers - 1))
    rm -rf "$work/src"
    echo "image: $layers layers, $total MB uncompressed"
}

now() { date +%s%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
ms() { echo $(( ($2 - $1) / 1000000 )); }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.2f", a / b}'; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; return 1; }

# docker_registry PORT DIR: Debian's docker-registry on 127.0.0.1:PORT, data in DIR; sets $reg_pid.
docker_registry() {
    cat > "$2.yml" <<YAML
version: 0.1
log: {level: error, accesslog: {disabled: true}}
storage: {filesystem: {rootdirectory: $2}, delete: {enabled: true}}
http: {addr: 127.0.0.1:$1}
YAML
    docker-registry serve "$2.yml" >"$2.log" 2>&1 &
    reg_pid=$!
    wait_port "$1"
}

# start_node ARGS...: `hangar up ARGS` in the background with $HANGAR_HOME,
# waits until its API answers; on exit destroys its machines, stops it and
# removes $work. Sets $node.
start_node() {
    "$hangar" up "$@" 2>"$work/up.log" &
    node=$!
    trap stop_node EXIT
    for _ in $(seq 100); do grep -q "Machines API" "$work/up.log" && break; sleep 0.1; done
}
stop_node() {
    for m in $("$hangar" machine list --json 2>/dev/null | python3 -c 'import json,sys; print(" ".join(m["id"] for m in json.load(sys.stdin)))'); do
        "$hangar" machine destroy "$m" --force >/dev/null 2>&1 || true
    done
    kill "$node" 2>/dev/null; wait "$node" 2>/dev/null || true; rm -rf "$work"
}

# busybox_tree DIR APPLET...: a root filesystem of this host's busybox.
busybox_tree() {
    local dir=$1 a; shift
    mkdir -p "$dir/bin"
    cp "$(command -v busybox)" "$dir/bin/"
    for a in "$@"; do ln -s busybox "$dir/bin/$a"; done
}
