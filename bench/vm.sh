#!/usr/bin/env bash
# Micro-VMs (root): create -> the app's first output for an image whose base
# disk exists (the second VM of an image), and the VMM's own memory per VM,
# against a container machine of the same image in the same run. Prints the
# accelerator in use: here software emulation; the same script runs on KVM
# hosts (goal there: 150 ms to the app, 10 MiB overhead).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
. scripts/lib.sh
ensure_commands "${MACHINE_COMMANDS[@]}"
[ "$(id -u)" = 0 ] || { echo "bench/vm.sh runs machines: run it as root" >&2; exit 1; }
cargo build --release -q -p hangar
scripts/fetch-kernel
hangar=$PWD/target/release/hangar
work=$(mktemp -d)
export HANGAR_HOME=$work/home
rounds=${ROUNDS:-5}
api=$(free_port)
start_node --listen "127.0.0.1:$api" --no-registry --no-edge
busybox_tree "$work/img" sh echo sleep
"$hangar" image build "$work/img" -t localhost/bench:vm --cmd /bin/sh >/dev/null
# The first VM builds the image's base disk.
first=$("$hangar" machine run localhost/bench:vm --driver vm --restart no -- sh -c 'echo up')
for _ in $(seq 600); do "$hangar" machine logs "$first" | grep -q up && break; sleep 0.1; done
for _ in $(seq 100); do grep -q "micro-VMs run under" "$work/up.log" && break; sleep 0.1; done
grep "micro-VMs run under" "$work/up.log" | sed 's/.*micro-VMs run under/mode: micro-VMs run under/'

# start DRIVER -> ms from the create call to the app's first output line
start() {
    local t0 t1 id
    t0=$(now)
    id=$("$hangar" machine run localhost/bench:vm --driver "$1" -- sh -c 'echo first-output; sleep 1000')
    until "$hangar" machine logs "$id" | grep -q first-output; do sleep 0.01; done
    t1=$(now)
    echo "$(ms "$t0" "$t1") $id"
}
for driver in vm container; do
    for i in $(seq "$rounds"); do
        read -r took id <<<"$(start "$driver")"
        echo "$took" >> "$work/$driver.txt"
        if [ "$driver" = vm ]; then
            "$hangar" machine status "$id" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["vmm"]["overhead_kib"])' >> "$work/overhead.txt"
        fi
        "$hangar" machine destroy "$id" --force >/dev/null
    done
done
vm=$(median < "$work/vm.txt") ctr=$(median < "$work/container.txt") oh=$(median < "$work/overhead.txt")
echo "create -> first output, cached image, median of $rounds: vm $vm ms, container $ctr ms (vm/container $(ratio "$vm" "$ctr")x)"
echo "VMM memory overhead per VM, median: $((oh / 1024)) MiB (QEMU's resident memory outside the guest's RAM)"
