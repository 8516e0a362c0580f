#!/usr/bin/env bash
# Throughput between two pods on one node, vswitch against a Linux bridge, on the
# same topology, in one run (run by hand as root; not part of CI).
#
#   scripts/bench-net.sh [SECONDS]     (default 5 s per measurement)
#   VSWITCH_OFFLOAD=true scripts/bench-net.sh   (TAP offloads: vnet header, TSO)
#
# Measures TCP throughput with 1 and 4 streams and the UDP packet rate with 64-byte
# payloads (iperf3), then prints the ratios. Open vSwitch's userspace datapath is
# not measured yet (issue 4). Everything it creates is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
need=()
command -v iperf3 >/dev/null || need+=(iperf3)
command -v ip >/dev/null || need+=(iproute2)
[ -x /usr/lib/cni/host-local ] || [ -x /opt/cni/bin/host-local ] || need+=(containernetworking-plugins)
if [ "${#need[@]}" -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
cargo build --release --quiet -p vswitch
bin="$PWD/target/release"
tag="vsb$$"
work=$(mktemp -d /tmp/vswitch-bench.XXXXXX)
daemon_pid=""

cni() { # cni COMMAND POD
    printf '{"cniVersion":"1.0.0","name":"bench","type":"vswitch-cni","socket":"%s","ipam":{"type":"host-local","ranges":[[{"subnet":"10.92.0.0/24"}]],"dataDir":"%s"}}' \
        "$work/vswitchd.sock" "$work/ipam" |
        CNI_COMMAND=$1 CNI_CONTAINERID="$tag-$2" CNI_NETNS="/var/run/netns/$tag-v$2" CNI_IFNAME=eth0 \
            CNI_ARGS="K8S_POD_NAMESPACE=bench;K8S_POD_NAME=$2" CNI_PATH=/usr/lib/cni:/opt/cni/bin "$bin/vswitch-cni"
}

cleanup() {
    set +e
    pkill -f "iperf3 -s -p 52" 2>/dev/null
    for p in a b; do cni DEL "$p" >/dev/null 2>&1; ip netns del "$tag-v$p" 2>/dev/null; ip netns del "$tag-l$p" 2>/dev/null; done
    [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
    ip link del "$tag-br" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# Linux bridge with veth pairs.
ip link add "$tag-br" type bridge
ip link set "$tag-br" up
n=1
for p in a b; do
    ip netns add "$tag-l$p"
    ip link add "$tag-l$p" type veth peer name eth0 netns "$tag-l$p"
    ip link set "$tag-l$p" master "$tag-br" up
    ip -n "$tag-l$p" addr add "10.93.0.$n/24" dev eth0
    ip -n "$tag-l$p" link set eth0 up
    ip -n "$tag-l$p" link set lo up
    n=$((n + 1))
done

# vswitch: vswitchd and two pods through vswitch-cni (no policy: pure forwarding
# through the full pipeline, conntrack included).
mkdir -p "$work/manifests"
printf 'socket = "%s"\nstate_dir = "%s"\nmanifests = "%s"\noffload = %s\n' "$work/vswitchd.sock" "$work/state" "$work/manifests" "${VSWITCH_OFFLOAD:-false}" >"$work/vswitchd.toml"
"$bin/vswitchd" --config "$work/vswitchd.toml" 2>/dev/null &
daemon_pid=$!
for _ in $(seq 100); do [ -S "$work/vswitchd.sock" ] && break; sleep 0.05; done
declare -A vip
for p in a b; do
    ip netns add "$tag-v$p"
    ip -n "$tag-v$p" link set lo up
    vip[$p]=$(cni ADD "$p" | sed -n 's/.*"address":"\([0-9.]*\)\/.*/\1/p')
done

# measure NETNS_PREFIX SERVER_IP ARGS... -> prints one number
measure() {
    local prefix=$1 server=$2
    shift 2
    ip netns exec "${prefix}b" iperf3 -s -p 5201 -1 -D >/dev/null 2>&1
    sleep 0.3
    ip netns exec "${prefix}a" iperf3 -c "$server" -p 5201 -t "$secs" -J "$@" 2>/dev/null |
        python3 -c 'import json,sys
d=json.load(sys.stdin)["end"]
s=d.get("sum", {})
if "lost_packets" in s:  # UDP: packets that arrived, per second (thousands)
    print(round(s["packets"]*(1-s["lost_percent"]/100)/s["seconds"]/1e3,1))
else:  # TCP: received throughput, Gbit/s
    print(round(d["sum_received"]["bits_per_second"]/1e9,2))'
}

printf '\n%-32s %14s %14s %8s\n' "measurement" "linux bridge" "vswitch" "ratio"
row() { # row NAME ARGS...
    local name=$1
    shift
    local br vs
    br=$(measure "$tag-l" 10.93.0.2 "$@")
    vs=$(measure "$tag-v" "${vip[b]}" "$@")
    printf '%-32s %14s %14s %8s\n' "$name" "$br" "$vs" "$(python3 -c "print(round($vs/$br,3) if $br else 0)")"
}
row "TCP, 1 stream (Gbit/s)"
row "TCP, 4 streams (Gbit/s)" -P 4
row "UDP 64 B, received (kpps)" -u -l 64 -b 0
