# Shared by scripts/test, scripts/demo and bench/: install Debian packages
# for commands that are missing. Usage: ensure_commands cmd:package ...
ensure_commands() {
    local need=() pair cmd pkg
    for pair in "$@"; do
        cmd=${pair%%:*}
        pkg=${pair#*:}
        command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
    done
    [ ${#need[@]} -eq 0 ] && return 0
    if [ "$(id -u)" != 0 ]; then
        echo "missing ${need[*]}: run this as root, or: sudo apt-get install ${need[*]}" >&2
        return 1
    fi
    echo "installing ${need[*]} from Debian" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}
