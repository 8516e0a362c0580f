#!/usr/bin/env bash
# Two pods on one node: vswitch against Open vSwitch's userspace datapath and a
# Linux bridge, on the same topology, in one run (run by hand as root; not in CI).
#
#   scripts/bench-net.sh [SECONDS]        (default 5 s per throughput measurement)
#   VSWITCH_OFFLOAD=false scripts/bench-net.sh   (vswitch without TAP offloads)
#   VSWITCH_BUSY_POLL_US=N scripts/bench-net.sh  (vswitchd's busy_poll_us; default: its own)
#   VSWITCH_CONFIG=$'[recent]\nmax_tuples = 0' scripts/bench-net.sh  (appended to vswitchd's config)
#   SWITCHES="bridge vswitch" scripts/bench-net.sh (measure only these)
#   MEASURES="rtt50 crr" scripts/bench-net.sh   (only these measurements)
#   SWITCHES=svc scripts/bench-net.sh           (only the Service run)
#   BENCH_CLUSTER=DIR scripts/bench-net.sh      (vswitchd also loads the manifests in DIR)
#   SWITCHES=scale scripts/bench-net.sh         (only the scaling run; SCALE_PAIRS="1 2 4 8")
#   CHURN=10 scripts/bench-net.sh               (10 unrelated policy changes/s during the vswitch run)
#   CHURN=10 CHURN_LOCAL=1 scripts/bench-net.sh (the same, a policy on the bench's server pod: tables change)
#   VSWITCH_BIN=DIR scripts/bench-net.sh        (vswitchd, vswitch-cni, flowctl, examples/crr from DIR; no build)
#
# Switches under test, each with two pod namespaces a and b:
#   bridge   Linux bridge, veth pairs
#   ovs      Open vSwitch, datapath_type=netdev, TAP ports moved into the pods
#   ovs-tso  the same with other_config:userspace-tso-enable=true (its best)
#   vswitch  vswitchd, pods attached through vswitch-cni, a NetworkPolicy in force
#            (b admits ingress only from pods labelled role=client; a is one)
# Measurements: TCP throughput 1 and 4 streams (iperf3), UDP 64-byte packet rate
# (iperf3, received), ping RTT p50/p99 (1000 pings, 2 ms apart), sequential TCP
# connections per second (vswitch/examples/crr.rs); over IPv6 too (every pod is
# dual-stack): TCP 1 stream and RTT p50. Ratios are vswitch over each baseline.
#
# The Service run (svc) measures a ClusterIP path: vswitchd in a node namespace
# with a gateway, pod a connecting to pod b through a Service, once with
# services = "kube-proxy" (iptables DNAT in the node namespace, as kube-proxy
# sets it up: the packet goes to the node and comes back translated) and once
# with services = "switch" (translated in the datapath); sequential TCP
# connections/s and the round trip of a one-byte TCP request/response (ICMP
# does not cross a ClusterIP), p50 and p99.
# The scaling run (scale) puts N client/server pod pairs (N in SCALE_PAIRS) on
# the bridge and on vswitch, each pair running its own iperf3 at once: the
# aggregate TCP throughput (1 stream per pair) and UDP 64-byte packet rate,
# the busy share of all CPUs over the run, and for vswitch the CPU its packet
# threads used.
#
# CHURN=N (vswitch run) rewrites a policy file N times a second while it
# measures: a policy whose pod is on another node, so the switch's tables do
# not change; the microflow cache's hit rate over the run is printed with the
# results. With CHURN_LOCAL=1 the policy selects the bench's server pod (an
# extra allowed port each time: verdicts stay, the tables change).
# Everything it creates is removed on exit, also when interrupted.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-5}
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }
need=()
command -v iperf3 >/dev/null || need+=(iperf3)
command -v ip >/dev/null || need+=(iproute2)
command -v ping >/dev/null || need+=(iputils-ping)
command -v ovs-vswitchd >/dev/null || need+=(openvswitch-switch)
[ -x /usr/lib/cni/host-local ] || [ -x /opt/cni/bin/host-local ] || need+=(containernetworking-plugins)
if [ "${#need[@]}" -gt 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi
if [ -n "${VSWITCH_BIN:-}" ]; then
    bin=$VSWITCH_BIN # another build's binaries (an A/B run)
else
    cargo build --release --quiet -p vswitch -p flowctl --bins --example crr
    bin="$PWD/target/release"
fi
crr="$bin/examples/crr"
tag="vsb$$"
work=$(mktemp -d /tmp/vswitch-bench.XXXXXX)
daemon_pid=""
churn_pid=""
namespaces=()

cni_pods=(a b)
cni() { # cni COMMAND POD
    printf '{"cniVersion":"1.0.0","name":"bench","type":"vswitch-cni","socket":"%s","ipam":{"type":"host-local","ranges":[[{"subnet":"10.92.0.0/24"}],[{"subnet":"fd00:92::/64"}]],"dataDir":"%s"}}' \
        "$work/vswitchd.sock" "$work/ipam" |
        CNI_COMMAND=$1 CNI_CONTAINERID="$tag-$2" CNI_NETNS="/var/run/netns/$tag-v$2" CNI_IFNAME=eth0 \
            CNI_ARGS="K8S_POD_NAMESPACE=bench;K8S_POD_NAME=$2" CNI_PATH=/usr/lib/cni:/opt/cni/bin "$bin/vswitch-cni"
}

ovs_stop() { # ovs_stop DIR
    local d=$1
    for p in ovs-vswitchd ovsdb-server; do
        [ -f "$d/$p.pid" ] && kill "$(cat "$d/$p.pid")" 2>/dev/null
    done
    sleep 0.3
    return 0
}

svc_pids=()
cleanup() {
    set +e
    for p in "${svc_pids[@]}"; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    for ns in "${namespaces[@]}"; do
        ip netns pids "$ns" 2>/dev/null | xargs -r kill 2>/dev/null
    done
    [ -n "$churn_pid" ] && kill "$churn_pid" 2>/dev/null
    for p in "${cni_pods[@]}"; do cni DEL "$p" >/dev/null 2>&1; done
    for m in kp sw; do for p in a b; do svc_cni "$m" DEL "$p" >/dev/null 2>&1; done; done
    [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
    for d in "$work"/ovs-*; do [ -d "$d" ] && ovs_stop "$d"; done
    for ns in "${namespaces[@]}"; do ip netns del "$ns" 2>/dev/null; done
    ip link del "$tag-br" 2>/dev/null
    ip link del "$tag-sb" 2>/dev/null
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

newns() { # newns NAME
    ip netns add "$1"
    namespaces+=("$1")
    ip -n "$1" link set lo up
}

declare -A server  # switch -> IPv4 address of pod b
declare -A server6 # switch -> IPv6 address of pod b

# Linux bridge with veth pairs.
setup_bridge() {
    ip link add "$tag-br" type bridge
    ip link set "$tag-br" up
    local n=1
    for p in a b; do
        newns "$tag-l$p"
        ip link add "$tag-l$p" type veth peer name eth0 netns "$tag-l$p"
        ip link set "$tag-l$p" master "$tag-br" up
        ip -n "$tag-l$p" addr add "10.93.0.$n/24" dev eth0
        ip -n "$tag-l$p" addr add "fd00:93::$n/64" dev eth0 nodad
        ip -n "$tag-l$p" link set eth0 up
        n=$((n + 1))
    done
    server[bridge]=10.93.0.2
    server6[bridge]=fd00:93::2
}

# Open vSwitch, userspace datapath, in its own run directory. TSO: $2 = true|false.
setup_ovs() { # setup_ovs NAME TSO SUBNET LETTER (LETTER: unique, for device names)
    local name=$1 tso=$2 subnet=$3 letter=$4 d="$work/ovs-$1"
    mkdir -p "$d"
    export OVS_RUNDIR=$d OVS_DBDIR=$d OVS_LOGDIR=$d
    ovsdb-tool create "$d/conf.db" /usr/share/openvswitch/vswitch.ovsschema
    ovsdb-server "$d/conf.db" --remote="punix:$d/db.sock" --pidfile="$d/ovsdb-server.pid" \
        --detach --log-file="$d/ovsdb-server.log" 2>/dev/null
    local vsctl=(ovs-vsctl --db="unix:$d/db.sock")
    "${vsctl[@]}" --no-wait init
    "${vsctl[@]}" --no-wait set Open_vSwitch . "other_config:userspace-tso-enable=$tso"
    ovs-vswitchd "unix:$d/db.sock" --pidfile="$d/ovs-vswitchd.pid" --detach --log-file="$d/ovs-vswitchd.log" 2>/dev/null
    local br="${tag}o$name"
    br=${br:0:15}
    "${vsctl[@]}" add-br "$br" -- set bridge "$br" datapath_type=netdev
    local n=1
    for p in a b; do
        local ns="$tag-$name-$p" dev="${tag}$letter$p"
        "${vsctl[@]}" add-port "$br" "$dev" -- set interface "$dev" type=tap
        for _ in $(seq 50); do ip link show "$dev" >/dev/null 2>&1 && break; sleep 0.05; done
        newns "$ns"
        ip link set "$dev" netns "$ns"
        ip -n "$ns" addr add "$subnet.$n/24" dev "$dev"
        ip -n "$ns" addr add "fd00:${subnet:3:2}::$n/64" dev "$dev" nodad
        ip -n "$ns" link set "$dev" up
        n=$((n + 1))
    done
    ip link set "$br" up
    unset OVS_RUNDIR OVS_DBDIR OVS_LOGDIR
    server[$name]="$subnet.2"
    server6[$name]="fd00:${subnet:3:2}::2"
}

# The two bench pods, and a NetworkPolicy admitting only the client to b.
bench_manifests() {
    cat <<'EOF'
apiVersion: v1
kind: Namespace
metadata: {name: bench}
---
apiVersion: v1
kind: Pod
metadata: {name: a, namespace: bench, labels: {role: client}}
spec: {containers: [{name: c, image: x}]}
---
apiVersion: v1
kind: Pod
metadata: {name: b, namespace: bench, labels: {role: server}}
spec: {containers: [{name: c, image: x}]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: clients-only, namespace: bench}
spec:
  podSelector: {matchLabels: {role: server}}
  ingress: [{from: [{podSelector: {matchLabels: {role: client}}}]}]
EOF
}

scale_max=8
# The scaling run's pods on vswitch: pairs cN (client) and sN (server).
scale_manifests() {
    for i in $(seq "$scale_max"); do
        for r in c:client s:server; do
            printf -- '---\napiVersion: v1\nkind: Pod\nmetadata: {name: %s%s, namespace: bench, labels: {role: %s}}\nspec: {containers: [{name: c, image: x}]}\n' \
                "${r%%:*}" "$i" "${r#*:}"
        done
    done
}

# A policy on a pod of another node, rewritten every 1/N s: churn in the
# cluster that the switch's tables do not depend on.
churn() { # churn N
    local f="$work/manifests/zz-churn.yaml" n=0 pause
    pause=$(python3 -c "print(1/$1)")
    while :; do
        n=$((n + 1))
        if [ -n "${CHURN_LOCAL:-}" ]; then
            printf 'apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: churn, namespace: bench}\nspec:\n  podSelector: {matchLabels: {role: server}}\n  ingress: [{from: [{podSelector: {matchLabels: {role: client}}}], ports: [{port: %d}]}]\n' \
                $((1024 + n % 60000)) >"$f.tmp"
        else
            printf 'apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: churn, namespace: elsewhere}\nspec:\n  podSelector: {matchLabels: {app: far}}\n  ingress: [{ports: [{port: %d}]}]\n' \
                $((1024 + n % 60000)) >"$f.tmp"
        fi
        mv "$f.tmp" "$f"
        sleep "$pause"
    done
}

# vswitchd and two pods through vswitch-cni, with a NetworkPolicy in force.
setup_vswitch() {
    mkdir -p "$work/manifests"
    bench_manifests >"$work/manifests/bench.yaml"
    if want scale; then scale_manifests >"$work/manifests/scale.yaml"; fi
    if [ -n "${CHURN:-}" ]; then
        # The churned policy's namespace and pod, on another node.
        printf 'apiVersion: v1\nkind: Namespace\nmetadata: {name: elsewhere}\n---\napiVersion: v1\nkind: Pod\nmetadata: {name: far, namespace: elsewhere, labels: {app: far}}\nspec: {nodeName: other, containers: [{name: c, image: x}]}\nstatus: {podIP: 10.92.9.9}\n' \
            >"$work/manifests/zz-elsewhere.yaml"
    fi
    # A cluster loaded beside the two pods (BENCH_CLUSTER: a manifest directory,
    # e.g. written by `cargo run --release -p policy --example synthetic-cluster`).
    [ -n "${BENCH_CLUSTER:-}" ] && cp "$BENCH_CLUSTER"/*.yaml "$work/manifests/"
    # The per-pod conntrack limit (16,384 by default) would cap the connection
    # loop (TIME_WAIT connections stay tracked 30 s): lifted, as for Services.
    printf 'socket = "%s"\nstate_dir = "%s"\nmanifests = "%s"\noffload = %s\nnode_name = "bench"\nconntrack_max_per_pod = 262144\nconntrack_max_per_namespace = 262144\n' \
        "$work/vswitchd.sock" "$work/state" "$work/manifests" "${VSWITCH_OFFLOAD:-true}" >"$work/vswitchd.toml"
    [ -n "${VSWITCH_BUSY_POLL_US:-}" ] && echo "busy_poll_us = $VSWITCH_BUSY_POLL_US" >>"$work/vswitchd.toml"
    [ -n "${VSWITCH_CONFIG:-}" ] && printf '%s\n' "$VSWITCH_CONFIG" >>"$work/vswitchd.toml"
    "$bin/vswitchd" --config "$work/vswitchd.toml" 2>"$work/vswitchd.log" &
    daemon_pid=$!
    for _ in $(seq 600); do [ -S "$work/vswitchd.sock" ] && break; sleep 0.05; done
    local pods=(a b)
    if want scale; then for i in $(seq "$scale_max"); do pods+=("c$i" "s$i"); done; fi
    cni_pods=("${pods[@]}")
    for p in "${pods[@]}"; do
        newns "$tag-v$p"
        local result
        result=$(cni ADD "$p")
        [[ $p == s* ]] && server["vswitch $p"]=$(printf '%s' "$result" | sed -n 's/.*"address":"\([0-9.]*\)\/.*/\1/p')
        if [ "$p" = b ]; then
            server[vswitch]=$(printf '%s' "$result" | sed -n 's/.*"address":"\([0-9.]*\)\/.*/\1/p')
            server6[vswitch]=$(printf '%s' "$result" | sed -n 's/.*"address":"\([0-9a-f:]*:[0-9a-f:]*\)\/.*/\1/p')
        fi
    done
    return 0
}

# Namespace of pod P of switch S.
nsof() { # nsof SWITCH POD
    case $1 in
    bridge) echo "$tag-l$2" ;;
    vswitch) echo "$tag-v$2" ;;
    *) echo "$tag-$1-$2" ;;
    esac
}

iperf() { # iperf SWITCH ADDRESS ARGS... -> one number
    local s=$1 addr=$2
    shift 2
    ip netns exec "$(nsof "$s" b)" iperf3 -s -p 5201 -1 -D >/dev/null 2>&1
    sleep 0.3
    ip netns exec "$(nsof "$s" a)" iperf3 -c "$addr" -p 5201 -t "$secs" -J "$@" 2>/dev/null |
        python3 -c 'import json,sys
d=json.load(sys.stdin)["end"]
s=d.get("sum", {})
if "lost_packets" in s:  # UDP: packets that arrived, per second (thousands)
    print(round(s["packets"]*(1-s["lost_percent"]/100)/s["seconds"]/1e3,1))
else:  # TCP: received throughput, Gbit/s
    print(round(d["sum_received"]["bits_per_second"]/1e9,2))'
}

rtt() { # rtt SWITCH p50|p99 [6] -> microseconds (cached per switch and family)
    local f="$work/rtt-$1${3:-}" addr=${server[$1]}
    [ "${3:-}" = 6 ] && addr=${server6[$1]}
    if [ ! -f "$f" ]; then
        ip netns exec "$(nsof "$1" a)" ping -c 1000 -i 0.002 -W 1 "$addr" |
            sed -n 's/.*time=\([0-9.]*\) ms.*/\1/p' >"$f"
    fi
    python3 -c 'import sys
v=sorted(float(x)*1000 for x in open(sys.argv[1]))
q=float(sys.argv[2])
print(round(v[min(len(v)-1,int(q*len(v)))]) if v else 0)' "$f" "$([ "$2" = p50 ] && echo 0.5 || echo 0.99)"
}

crr_rate() { # crr_rate SWITCH -> connections/s
    local s=$1
    ip netns exec "$(nsof "$s" b)" "$crr" server "${server[$s]}:5300" &
    local pid=$!
    sleep 0.3
    ip netns exec "$(nsof "$s" a)" "$crr" client "${server[$s]}:5300" "$secs" || echo 0
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
}

ratio() { python3 -c "import sys
try: a,b=float(sys.argv[1]),float(sys.argv[2]); print(round(a/b,2) if b else '-')
except ValueError: print('-')" "$1" "$2"; }

declare -A v # "switch measurement" -> value
measures=(tcp1 tcp4 udp64 rtt50 rtt99 crr tcp1v6 rtt50v6)
measure_all() { # measure_all SWITCH
    local s=$1
    # Warm up ARP and the switch's caches.
    ip netns exec "$(nsof "$s" a)" ping -c 2 -i 0.2 -W 1 "${server[$s]}" >/dev/null || {
        echo "no connectivity through $s" >&2
        exit 1
    }
    ip netns exec "$(nsof "$s" a)" ping -c 2 -i 0.2 -W 1 "${server6[$s]}" >/dev/null || {
        echo "no IPv6 connectivity through $s" >&2
        exit 1
    }
    echo "measuring $s..." >&2
    local m=" ${MEASURES:-${measures[*]}} "
    [[ $m == *" tcp1 "* ]] && v[$s tcp1]=$(iperf "$s" "${server[$s]}")
    [[ $m == *" tcp4 "* ]] && v[$s tcp4]=$(iperf "$s" "${server[$s]}" -P 4)
    [[ $m == *" udp64 "* ]] && v[$s udp64]=$(iperf "$s" "${server[$s]}" -u -l 64 -b 0)
    [[ $m == *" tcp1v6 "* ]] && v[$s tcp1v6]=$(iperf "$s" "${server6[$s]}")
    [[ $m == *" rtt50v6 "* ]] && v[$s rtt50v6]=$(rtt "$s" p50 6)
    [[ $m == *" rtt50 "* ]] && v[$s rtt50]=$(rtt "$s" p50)
    [[ $m == *" rtt99 "* ]] && v[$s rtt99]=$(rtt "$s" p99)
    [[ $m == *" crr "* ]] && v[$s crr]=$(crr_rate "$s")
    return 0
}

# ---- the scaling run ----------------------------------------------------------

# Bridge pods for the scaling run: pairs cN and sN on a bridge of their own.
setup_scale_bridge() {
    ip link add "$tag-sb" type bridge
    ip link set "$tag-sb" up
    for i in $(seq "$scale_max"); do
        for r in c s; do
            local ns="$tag-B$r$i" n=$i
            [ "$r" = s ] && n=$((i + 100))
            newns "$ns"
            ip link add "$ns" type veth peer name eth0 netns "$ns"
            ip link set "$ns" master "$tag-sb" up
            ip -n "$ns" addr add "10.95.0.$n/24" dev eth0
            ip -n "$ns" link set eth0 up
        done
        server["bridge s$i"]=10.95.0.$((i + 100))
    done
}

scale_ns() { # scale_ns SWITCH POD
    [ "$1" = bridge ] && echo "$tag-B$2" || echo "$tag-v$2"
}

# CPU time (clock ticks) of vswitchd's packet threads.
lane_ticks() {
    [ -n "$daemon_pid" ] || { echo 0; return; }
    cat /proc/"$daemon_pid"/task/*/stat 2>/dev/null |
        awk '$2 ~ /^\(packets/ {t += $14 + $15} END {print t + 0}'
}

# Busy and total clock ticks of all CPUs.
cpu_ticks() { awk '/^cpu / {print $2+$3+$4+$7+$8, $2+$3+$4+$5+$6+$7+$8}' /proc/stat; }

declare -A sc # "switch pairs measurement" -> value
scale_measure() { # scale_measure SWITCH PAIRS
    local s=$1 n=$2 i kind
    for kind in tcp udp; do
        for i in $(seq "$n"); do
            ip netns exec "$(scale_ns "$s" "s$i")" iperf3 -s -p 5201 -1 -D >/dev/null 2>&1
        done
        sleep 0.3
        local lanes0 cpu0 lanes1 cpu1
        lanes0=$(lane_ticks)
        cpu0=$(cpu_ticks)
        local args=() clients=()
        [ "$kind" = udp ] && args=(-u -l 64 -b 0)
        for i in $(seq "$n"); do
            ip netns exec "$(scale_ns "$s" "c$i")" iperf3 -c "${server[$s s$i]}" -p 5201 -t "$secs" -J "${args[@]}" \
                >"$work/scale-$s-$n-$kind-$i.json" 2>/dev/null &
            clients+=("$!")
        done
        wait "${clients[@]}" || true
        lanes1=$(lane_ticks)
        cpu1=$(cpu_ticks)
        sc[$s $n $kind]=$(python3 -c 'import json,sys
total=0
for f in sys.argv[1:]:
    try: d=json.load(open(f))["end"]
    except Exception: continue
    s=d.get("sum", {})
    if "lost_packets" in s: total+=s["packets"]*(1-s["lost_percent"]/100)/s["seconds"]/1e3
    else: total+=d["sum_received"]["bits_per_second"]/1e9
print(round(total,2))' "$work"/scale-"$s"-"$n"-"$kind"-*.json)
        read -r b0 t0 <<<"$cpu0"
        read -r b1 t1 <<<"$cpu1"
        sc[$s $n ${kind}cpu]=$(python3 -c "print(round(100*($b1-$b0)/max(1,$t1-$t0)))")
        if [ "$s" = vswitch ]; then
            sc[$s $n ${kind}lanes]=$(python3 -c "import os; print(round(100*($lanes1-$lanes0)/os.sysconf('SC_CLK_TCK')/$secs))")
        fi
    done
}

scale_run() {
    local pairs=(${SCALE_PAIRS:-1 2 4 8}) s n
    for n in "${pairs[@]}"; do
        [ "$n" -le "$scale_max" ] || { echo "SCALE_PAIRS: at most $scale_max pairs" >&2; exit 1; }
    done
    setup_scale_bridge
    [ -n "$daemon_pid" ] || setup_vswitch
    for s in bridge vswitch; do
        for i in $(seq "$scale_max"); do
            ip netns exec "$(scale_ns "$s" "c$i")" ping -c 2 -i 0.2 -W 1 "${server[$s s$i]}" >/dev/null || {
                echo "no connectivity through $s between c$i and s$i" >&2
                exit 1
            }
        done
        for n in "${pairs[@]}"; do
            echo "scaling run: $s, $n pairs..." >&2
            scale_measure "$s" "$n"
        done
    done
    printf '\nscaling: N pod pairs at once (%d CPUs, %s packet threads)\n' "$(nproc)" "$(awk '$2 ~ /^\(packets/' /proc/"$daemon_pid"/task/*/stat | wc -l)"
    printf '%5s %12s %12s %6s %11s %11s %6s %9s %9s %11s %11s\n' pairs "bridge Gb/s" "vswitch Gb/s" ratio \
        "bridge kpps" "vswitch kpps" ratio "cpu br %" "cpu vs %" "lanes tcp%" "lanes udp%"
    for n in "${pairs[@]}"; do
        printf '%5s %12s %12s %6s %11s %11s %6s %9s %9s %11s %11s\n' "$n" \
            "${sc[bridge $n tcp]}" "${sc[vswitch $n tcp]}" "$(ratio "${sc[vswitch $n tcp]}" "${sc[bridge $n tcp]}")" \
            "${sc[bridge $n udp]}" "${sc[vswitch $n udp]}" "$(ratio "${sc[vswitch $n udp]}" "${sc[bridge $n udp]}")" \
            "${sc[bridge $n tcpcpu]}/${sc[bridge $n udpcpu]}" "${sc[vswitch $n tcpcpu]}/${sc[vswitch $n udpcpu]}" \
            "${sc[vswitch $n tcplanes]}" "${sc[vswitch $n udplanes]}"
    done
    echo "cpu: busy share of all CPUs over the TCP/UDP runs; lanes: vswitchd's packet threads, % of one core."
}

# ---- the Service run --------------------------------------------------------

svc_net() { [ "$1" = kp ] && echo 1 || echo 2; }
svc_cni() { # svc_cni MODE COMMAND POD (vswitch-cni inside the node namespace of MODE)
    local net
    net=$(svc_net "$1")
    printf '{"cniVersion":"1.0.0","name":"bench","type":"vswitch-cni","socket":"%s","ipam":{"type":"host-local","ranges":[[{"subnet":"10.93.%s.0/24","gateway":"10.93.%s.1"}]],"dataDir":"%s"}}' \
        "$work/svc-$1/vswitchd.sock" "$net" "$net" "$work/svc-$1/ipam" |
        CNI_COMMAND=$2 CNI_CONTAINERID="$tag-$1-$3" CNI_NETNS="/var/run/netns/$tag-s$1$3" CNI_IFNAME=eth0 \
            CNI_ARGS="K8S_POD_NAMESPACE=bench;K8S_POD_NAME=$3" CNI_PATH=/usr/lib/cni:/opt/cni/bin \
            ip netns exec "$tag-n$1" "$bin/vswitch-cni"
}

declare -A svc # "mode measurement" -> value
svc_run() { # svc_run kp|sw
    local m=$1 d="$work/svc-$1" net mode=switch pid b_ip="" result rr
    net=$(svc_net "$m")
    [ "$m" = kp ] && mode=kube-proxy
    mkdir -p "$d/manifests"
    newns "$tag-n$m"
    {
        bench_manifests
        cat <<'YAML'
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: bench}
spec:
  clusterIP: 10.96.93.10
  selector: {role: server}
  ports: [{name: crr, port: 80, targetPort: 5300}, {name: rr, port: 81, targetPort: 5301}]
YAML
    } >"$d/manifests/bench.yaml"
    # The client opens more connections in 30 s (TIME_WAIT) than a pod may
    # have tracked by default (conntrack_max / 16): lifted for the bench.
    printf 'socket = "%s"\nstate_dir = "%s"\nmanifests = "%s"\noffload = %s\nservices = "%s"\nservice_cidrs = ["10.96.0.0/12"]\nconntrack_max_per_pod = 262144\nconntrack_max_per_namespace = 262144\n' \
        "$d/vswitchd.sock" "$d/state" "$d/manifests" "${VSWITCH_OFFLOAD:-true}" "$mode" >"$d/vswitchd.toml"
    [ -n "${VSWITCH_BUSY_POLL_US:-}" ] && echo "busy_poll_us = $VSWITCH_BUSY_POLL_US" >>"$d/vswitchd.toml"
    [ -n "${VSWITCH_CONFIG:-}" ] && printf '%s\n' "$VSWITCH_CONFIG" >>"$d/vswitchd.toml"
    printf '[gateway]\nname = "%s"\naddress = "10.93.%s.1/24"\n' "$tag-g$m" "$net" >>"$d/vswitchd.toml"
    ip netns exec "$tag-n$m" "$bin/vswitchd" --config "$d/vswitchd.toml" 2>"$d/vswitchd.log" &
    pid=$!
    svc_pids+=("$pid")
    for _ in $(seq 100); do [ -S "$d/vswitchd.sock" ] && break; sleep 0.05; done
    for p in a b; do
        newns "$tag-s$m$p"
        # Every client port once per run at most: a port coming round while
        # the server still holds it in TIME_WAIT costs a retransmitted SYN (a
        # second), which would measure TCP, not the path.
        ip netns exec "$tag-s$m$p" sysctl -qw net.ipv4.ip_local_port_range="1024 65000"
        result=$(svc_cni "$m" ADD "$p")
        [ "$p" = b ] && b_ip=$(printf '%s' "$result" | sed -n 's/.*"address":"\([0-9.]*\)\/.*/\1/p')
    done
    if [ "$m" = kp ]; then
        # kube-proxy's translation, in the node's kernel.
        ip netns exec "$tag-n$m" sh -c "sysctl -qw net.ipv4.ip_forward=1 &&
            iptables -t nat -A PREROUTING -d 10.96.93.10 -p tcp --dport 80 -j DNAT --to-destination $b_ip:5300 &&
            iptables -t nat -A PREROUTING -d 10.96.93.10 -p tcp --dport 81 -j DNAT --to-destination $b_ip:5301"
    fi
    ip netns exec "$tag-s${m}b" "$crr" server "$b_ip:5300" &
    svc_pids+=("$!")
    ip netns exec "$tag-s${m}b" "$crr" echo "$b_ip:5301" &
    svc_pids+=("$!")
    # The same pods without the Service, for reference, first and on their own
    # server port: the client's ports come round again while the server still
    # holds them in TIME_WAIT, which only the same peer may reuse.
    ip netns exec "$tag-s${m}b" "$crr" server "$b_ip:5302" &
    svc_pids+=("$!")
    sleep 0.5
    svc[$m dcrr]=$(ip netns exec "$tag-s${m}a" "$crr" client "$b_ip:5302" "$secs" || echo 0)
    rr=$(ip netns exec "$tag-s${m}a" "$crr" rr "$b_ip:5301" 1000)
    svc[$m drr50]=${rr% *}
    ip netns exec "$tag-s${m}a" "$crr" rr 10.96.93.10:81 20 >/dev/null || {
        echo "no connectivity through the Service ($mode)" >&2
        exit 1
    }
    echo "measuring the Service path ($mode)..." >&2
    svc[$m crr]=$(ip netns exec "$tag-s${m}a" "$crr" client 10.96.93.10:80 "$secs" || echo 0)
    rr=$(ip netns exec "$tag-s${m}a" "$crr" rr 10.96.93.10:81 1000)
    svc[$m rr50]=${rr% *}
    svc[$m rr99]=${rr#* }
    # The next run has the CPUs to itself.
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null || true
    return 0
}

only=" ${SWITCHES:-bridge ovs ovstso vswitch svc} "
want() { [[ $only == *" $1 "* ]]; }
if want bridge; then
    setup_bridge
    measure_all bridge
fi
# One Open vSwitch at a time, so the two never compete for the CPUs.
if want ovs; then
    setup_ovs ovs false 10.94.0 o
    measure_all ovs
    ovs_stop "$work/ovs-ovs"
fi
if want ovstso; then
    setup_ovs ovstso true 10.96.0 t
    measure_all ovstso
    ovs_stop "$work/ovs-ovstso"
fi
cache_counts() { # hits misses generation revalidated
    "$bin/flowctl" --socket "$work/vswitchd.sock" --output json stats |
        python3 -c 'import json,sys; d=json.load(sys.stdin); c=d["cache"]; print(c["hits"], c["misses"], d["generation"], c.get("revalidated", 0))'
}
churn_report=""
if want vswitch; then
    setup_vswitch
    if [ -n "${CHURN:-}" ]; then
        churn "$CHURN" &
        churn_pid=$!
        sleep 1
        read -r h0 m0 g0 r0 <<<"$(cache_counts)"
        t0=$(date +%s.%N)
    fi
    measure_all vswitch
    if [ -n "${CHURN:-}" ]; then
        read -r h1 m1 g1 r1 <<<"$(cache_counts)"
        kill "$churn_pid" 2>/dev/null
        wait "$churn_pid" 2>/dev/null || true
        churn_pid=""
        seen=$("$bin/flowctl" --socket "$work/vswitchd.sock" dump-policies 2>/dev/null | grep -c '/churn' || true)
        churn_report=$(python3 -c "import time
h,m=$h1-$h0,$m1-$m0
print(f'churn: ~{$CHURN}/s {\"local\" if \"${CHURN_LOCAL:-}\" else \"unrelated\"} policy rewrites for {time.time()-$t0:.0f} s (policy seen by vswitchd: {\"yes\" if $seen else \"no\"}); '
      f'tables published meanwhile: {$g1-$g0}; microflow cache over the run: {h} hits ({$r1-$r0} revalidated), {m} misses, hit rate {100*h/max(1,h+m):.2f}%')")
    fi
fi

if want bridge || want ovs || want ovstso || want vswitch; then
    names=("TCP 1 stream (Gbit/s)" "TCP 4 streams (Gbit/s)" "UDP 64 B received (kpps)" "ping RTT p50 (us)" "ping RTT p99 (us)" "TCP connections/s" "IPv6 TCP 1 stream (Gbit/s)" "IPv6 ping RTT p50 (us)")
    printf '\n%-26s %10s %10s %10s %10s  %9s %9s\n' "measurement" "bridge" "ovs" "ovs+tso" "vswitch" "vs/ovstso" "vs/bridge"
    for i in "${!measures[@]}"; do
        m=${measures[$i]}
        printf '%-26s %10s %10s %10s %10s  %9s %9s\n' "${names[$i]}" "${v[bridge $m]:--}" "${v[ovs $m]:--}" "${v[ovstso $m]:--}" \
            "${v[vswitch $m]:--}" "$(ratio "${v[vswitch $m]:--}" "${v[ovstso $m]:--}")" "$(ratio "${v[vswitch $m]:--}" "${v[bridge $m]:--}")"
    done
    echo
    echo "vswitch: offload=${VSWITCH_OFFLOAD:-true}, busy_poll_us=${VSWITCH_BUSY_POLL_US:-default}, NetworkPolicy in force; the baselines run without policy."
    if [ -n "$churn_report" ]; then echo "$churn_report"; fi
fi
if want scale; then scale_run; fi
if want svc; then
    svc_run kp
    svc_run sw
    printf '\n%-38s %11s %11s  %9s\n' "through a ClusterIP" "kube-proxy" "switch" "sw/kp"
    for r in "crr:TCP connections/s" "rr50:TCP request/response p50 (us)" "rr99:TCP request/response p99 (us)" \
        "dcrr:pod IP, no Service: connections/s" "drr50:pod IP, no Service: r/r p50 (us)"; do
        k=${r%%:*}
        printf '%-38s %11s %11s  %9s\n' "${r#*:}" "${svc[kp $k]:--}" "${svc[sw $k]:--}" "$(ratio "${svc[sw $k]:--}" "${svc[kp $k]:--}")"
    done
fi
