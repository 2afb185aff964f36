# The one set-up step that scripts/test, scripts/demo and bench/ share:
# make sure commands exist, installing their Debian packages (as root),
# then check every command again.
#
# Usage: ensure_commands cmd:package ...
#
# - Packages are installed in one apt-get run, so their versions agree.
# - apt is asked first (a simulation) what it would remove; a package it
#   would remove (for example qemu-utils from bookworm-backports when
#   qemu-system-x86 comes from bookworm) is installed in the same run at
#   the archive's version instead. Anything still to be removed stops the
#   set-up before apt changes anything.
# - Afterwards every command is looked up again; one still missing stops
#   the script with a line naming the command, its package and what apt
#   said about that package.

# The commands a node needs to run machines (containers and micro-VMs).
MACHINE_COMMANDS=(busybox:busybox-static runc:runc ip:iproute2 iptables:iptables
    qemu-system-x86_64:qemu-system-x86 qemu-img:qemu-utils mkfs.ext4:e2fsprogs mount:mount
    losetup:mount)

ensure_commands() {
    local need=() pair cmd pkg
    local log
    log=$(mktemp)
    for pair in "$@"; do
        cmd=${pair%%:*}
        pkg=${pair#*:}
        command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
    done
    if [ ${#need[@]} -gt 0 ]; then
        if [ "$(id -u)" != 0 ]; then
            echo "setup: missing ${need[*]}: run this as root, or: sudo apt-get install ${need[*]}" >&2
            rm -f "$log"
            return 1
        fi
        echo "setup: installing ${need[*]} from Debian" >&2
        export DEBIAN_FRONTEND=noninteractive
        if ! apt-get update -qq >"$log" 2>&1; then
            echo "setup: apt-get update failed: $(grep -E '^(E|W):' "$log" | head -1)" >&2
            rm -f "$log"
            return 1
        fi
        _apt_keep_installed need || { rm -f "$log"; return 1; }
        if ! apt-get install -y -q --no-install-recommends --allow-downgrades "${need[@]}" >"$log" 2>&1; then
            echo "setup: apt-get install ${need[*]} failed: $(grep -E '^E:' "$log" | head -1)" >&2
            rm -f "$log"
            return 1
        fi
    fi
    local missing=0 said
    for pair in "$@"; do
        cmd=${pair%%:*}
        pkg=${pair#*:}
        hash -r
        if ! command -v "$cmd" >/dev/null 2>&1; then
            said=$(grep -F "$pkg" "$log" 2>/dev/null | tail -1 | sed 's/^ *//')
            echo "setup: $cmd is still missing after the install: package $pkg (apt: ${said:-said nothing of $pkg}); install it by hand (apt-get install $pkg) and run this again" >&2
            missing=1
        fi
    done
    rm -f "$log"
    return $missing
}

# _apt_keep_installed ARRAY: add to the named array of packages to install
# every installed package that apt would remove to install them, at the
# archive's version, so nothing is removed; fail (naming it) if apt still
# would remove something.
_apt_keep_installed() {
    local -n _pkgs=$1
    local sim removed ver round
    for round in 1 2 3; do
        sim=$(apt-get install -s --no-install-recommends --allow-downgrades "${_pkgs[@]}" 2>&1) || {
            echo "setup: apt-get cannot install ${_pkgs[*]}: $(grep -E '^E:' <<<"$sim" | head -1)" >&2
            return 1
        }
        removed=$(awk '/^Remv / {print $2}' <<<"$sim")
        [ -z "$removed" ] && return 0
        [ "$round" = 3 ] && break
        for pkg in $removed; do
            ver=$(apt-cache madison "$pkg" | awk -F'|' 'NR == 1 {gsub(/ /, "", $2); print $2}')
            if [ -z "$ver" ]; then
                echo "setup: installing ${_pkgs[*]} would remove $pkg, which no configured Debian suite has; install ${_pkgs[*]} by hand" >&2
                return 1
            fi
            echo "setup: $pkg is installed at a version apt would remove; reinstalling it at $ver, the version the other packages come with" >&2
            _pkgs+=("$pkg=$ver")
        done
    done
    echo "setup: installing ${_pkgs[*]} would remove $(tr '\n' ' ' <<<"$removed"); install them by hand" >&2
    return 1
}

# ensure_python_modules module:package==version ...: Python modules the
# tests drive (real clients from PyPI), installed with pip when missing,
# then imported again; one still missing stops the set-up naming it.
ensure_python_modules() {
    local need=() pair module pkg log
    for pair in "$@"; do
        module=${pair%%:*}
        python3 -c "import $module" >/dev/null 2>&1 || need+=("${pair#*:}")
    done
    if [ ${#need[@]} -gt 0 ]; then
        echo "setup: installing ${need[*]} from PyPI" >&2
        log=$(mktemp)
        if ! python3 -m pip install -q --disable-pip-version-check --root-user-action=ignore "${need[@]}" >"$log" 2>&1; then
            echo "setup: pip install ${need[*]} failed: $(grep -E 'ERROR' "$log" | head -1)" >&2
            rm -f "$log"
            return 1
        fi
        rm -f "$log"
    fi
    local missing=0
    for pair in "$@"; do
        module=${pair%%:*}
        pkg=${pair#*:}
        if ! python3 -c "import $module" >/dev/null 2>&1; then
            echo "setup: Python module $module is still missing after the install: package $pkg; install it by hand (python3 -m pip install $pkg) and run this again" >&2
            missing=1
        fi
    done
    return $missing
}
