#!/usr/bin/env bash
# vswitch demo.
#
# As root: starts vswitchd with the example policy (examples/manifests), creates
# three pods (network namespaces) through vswitch-cni with host-local IPAM, shows
# allowed and denied connections with real traffic, then the live flows and a
# trace naming the deciding policy. Cleans up on exit, also when interrupted.
# Not root: the same policy compiled and traced offline.
#
# Usage: examples/demo.sh        (builds and installs what it needs)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust (rustup) first" >&2
    exit 1
fi

bold() { printf '\n\033[1m== %s\033[0m\n' "$1"; }
show() { printf '$ %s\n' "$*"; "$@"; }

offline_demo() {
    local manifests=examples/manifests
    bold "The policy (examples/manifests/test-network-policy.yaml), compiled: tables 41 (egress NetworkPolicy) and 51 (ingress NetworkPolicy)"
    show "$bin/flowctl" --manifests "$manifests" dump-flows --cookie test-network-policy
    bold "Allowed: a role=frontend pod in default to db on TCP 6379"
    show "$bin/flowctl" --manifests "$manifests" trace tcp,src=default/frontend,dst=default/db,tp_dst=6379
    bold "Denied: 172.17.1.5 is inside the ipBlock's except"
    show "$bin/flowctl" --manifests "$manifests" trace tcp,src=172.17.1.5,dst=default/db,tp_dst=6379
    bold "Every pod to every pod on TCP 6379"
    show "$bin/flowctl" --manifests "$manifests" reachability --port 6379
    local mt=examples/multi-tenancy
    bold "Admin tiers (examples/multi-tenancy): the policies by tier"
    show "$bin/flowctl" --manifests "$mt" dump-policies
    bold "Tenants isolated by an Admin Deny that tenant B's NetworkPolicy cannot undo"
    show "$bin/flowctl" --manifests "$mt" reachability --port 80
    show "$bin/flowctl" --manifests "$mt" trace tcp,src=tenant-a/worker,dst=tenant-b/web,tp_dst=80
}

# Where cargo builds (CARGO_TARGET_DIR, or a cargo config, may move it). The
# demo's few connections need no optimised build: the dev profile builds
# faster and shares its build with scripts/test.sh.
target=$(cargo metadata --format-version 1 --no-deps | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
bin="${target:-$PWD/target}/debug"
echo "==> building vswitchd, vswitch-cni, flowctl into $bin"
echo "    (the first build downloads crates from crates.io and takes a few minutes on 2 cores; later ones seconds)"
cargo build -p vswitch -p flowctl

if [ "$(id -u)" != 0 ] || [ ! -c /dev/net/tun ]; then
    echo "(not root, or no /dev/net/tun: showing the offline demo; run as root for real pods and traffic)"
    offline_demo
    exit 0
fi

need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v socat >/dev/null 2>&1 || need+=(socat)
[ -x /usr/lib/cni/host-local ] || [ -x /opt/cni/bin/host-local ] || need+=(containernetworking-plugins)
if [ "${#need[@]}" -gt 0 ]; then
    echo "==> installing ${need[*]}"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

work=$(mktemp -d /tmp/vswitch-demo.XXXXXX)
tag="vsd$$"
daemon_pid=""
servers=()
pods=(default/db default/frontend other/client tenant-a/web tenant-a/worker tenant-b/web shared/dns)
# A pod's network namespace (and CNI container id): $tag-NAMESPACE-POD.
nsof() { printf '%s-%s' "$tag" "${1//\//-}"; }

netconf() {
    cat <<EOF
{"cniVersion": "1.0.0", "name": "vswitch-demo", "type": "vswitch-cni",
 "socket": "$work/vswitchd.sock",
 "ipam": {"type": "host-local", "ranges": [[{"subnet": "10.244.9.0/24"}], [{"subnet": "fd00:244:9::/64"}]], "dataDir": "$work/ipam"}}
EOF
}

cni() { # cni COMMAND NAMESPACE/POD
    local ns=${2%/*} pod=${2#*/}
    netconf | CNI_COMMAND=$1 CNI_CONTAINERID="$(nsof "$2")" CNI_NETNS="/var/run/netns/$(nsof "$2")" \
        CNI_IFNAME=eth0 CNI_ARGS="K8S_POD_NAMESPACE=$ns;K8S_POD_NAME=$pod" \
        CNI_PATH=/usr/lib/cni:/opt/cni/bin "$bin/vswitch-cni"
}

cleanup() {
    set +e
    for s in "${servers[@]}"; do kill "$s" 2>/dev/null; done
    for p in "${pods[@]}"; do cni DEL "$p" >/dev/null 2>&1; done
    [ -n "$daemon_pid" ] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
    for p in "${pods[@]}"; do ip netns del "$(nsof "$p")" 2>/dev/null; done
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# The cluster: the example policy, and the pods it is about (IPs come from IPAM).
mkdir -p "$work/manifests"
cp examples/manifests/test-network-policy.yaml "$work/manifests/"
cat > "$work/manifests/pods.yaml" <<'EOF'
apiVersion: v1
kind: Namespace
metadata: {name: default}
---
apiVersion: v1
kind: Namespace
metadata: {name: other}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: default, labels: {role: db}}
---
apiVersion: v1
kind: Pod
metadata: {name: frontend, namespace: default, labels: {role: frontend}}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: other, labels: {app: client}}
EOF
# Two tenants and shared services: their policies come later (the admin tiers).
grep -v '^status:' examples/multi-tenancy/cluster.yaml > "$work/manifests/tenants-cluster.yaml"
cat > "$work/vswitchd.toml" <<EOF
socket = "$work/vswitchd.sock"
state_dir = "$work/state"
manifests = "$work/manifests"
[audit]
path = "$work/audit.log"
attempt_quiet_ms = 1000   # a denied attempt's line is written 1 s after its last retry
EOF

bold "Starting vswitchd (standalone, manifests in $work/manifests)"
"$bin/vswitchd" --config "$work/vswitchd.toml" &
daemon_pid=$!
for _ in $(seq 100); do [ -S "$work/vswitchd.sock" ] && break; sleep 0.05; done

bold "Seven dual-stack pods through vswitch-cni (CNI ADD, IPAM by host-local: IPv4 and IPv6)"
declare -A ip ip6
for p in "${pods[@]}"; do
    ip netns add "$(nsof "$p")"
    if ! result=$(cni ADD "$p"); then
        echo "CNI ADD $p failed: $result" >&2
        exit 1
    fi
    ip[$p]=$(printf '%s' "$result" | sed -n 's/.*"address":"\([0-9.]*\)\/.*/\1/p')
    ip6[$p]=$(printf '%s' "$result" | sed -n 's/.*"address":"\([0-9a-f:]*:[0-9a-f:]*\)\/.*/\1/p')
    printf '%-18s eth0 %-13s %s\n' "$p" "${ip[$p]}" "${ip6[$p]}"
done

# Servers in db: redis-like on 6379, web on 80; a server in frontend on 80.
serve() { # serve POD PORT
    ip netns exec "$(nsof "$1")" socat "TCP6-LISTEN:$2,fork,reuseaddr,ipv6only=0" SYSTEM:'echo hello' </dev/null >/dev/null 2>&1 &
    servers+=($!)
}
serve default/db 6379
serve default/db 80
serve default/frontend 80
sleep 0.3

surprises=0
tries=0
try() { # try EXPECTED FROM TO PORT WHY; EXPECTED: connected, dropped or reset
    local want=$1 from=$2 to=$3 port=$4 why=$5 out start took got
    # With FAMILY=6, over IPv6 (the pods' IPv6 addresses).
    local target="TCP:${ip[$to]}:$port"
    [ "${FAMILY:-4}" = 6 ] && target="TCP6:[${ip6[$to]}]:$port"
    start=$(date +%s%N)
    tries=$((tries + 1))
    if out=$(ip netns exec "$(nsof "$from")" socat -T2 - "$target,connect-timeout=2" </dev/null 2>/dev/null) && [ -n "$out" ]; then
        got=connected
        printf '  \033[32mconnected\033[0m   %-17s -> %-17s tcp/%-5s %s\n' "$from" "$to" "$port" "$why"
    else
        took=$(( ($(date +%s%N) - start) / 1000000 ))
        if [ "$took" -ge 1500 ]; then # no answer at all: the switch dropped the SYN
            got=dropped
            printf '  \033[31mdropped\033[0m     %-17s -> %-17s tcp/%-5s %s\n' "$from" "$to" "$port" "$why"
        else # an answer: the pod itself reset the connection
            got=reset
            printf '  \033[33mreset\033[0m       %-17s -> %-17s tcp/%-5s %s\n' "$from" "$to" "$port" "$why"
        fi
    fi
    if [ "$got" != "$want" ]; then
        printf '  \033[1;31m^ expected %s\033[0m\n' "$want"
        surprises=$((surprises + 1))
    fi
}

bold "Real traffic through the switch"
try connected default/frontend default/db 6379 "(role=frontend in default: allowed)"
try dropped other/client default/db 6379 "(namespace other is not project=myproject: denied)"
try dropped default/frontend default/db 80 "(only TCP 6379 is allowed in: denied)"
try dropped default/db default/frontend 80 "(db egress only to 10.0.0.0/24:5978: denied)"
try reset default/frontend other/client 80 "(no listener; the switch lets it through, the pod refuses)"
echo "The same policy over IPv6 (neighbour discovery answered by the switch):"
FAMILY=6 try connected default/frontend default/db 6379 "(IPv6: role=frontend in default: allowed)"
FAMILY=6 try dropped other/client default/db 6379 "(IPv6: namespace other is not project=myproject: denied)"

flowctl="$bin/flowctl --socket $work/vswitchd.sock"
bold "The live policy flows, with counters"
show $flowctl dump-flows --table 51
bold "Why was other/client denied? A trace against the live switch"
show $flowctl trace tcp,src=other/client,dst=default/db,tp_dst=6379
bold "And why was frontend allowed?"
show $flowctl trace tcp,src=default/frontend,dst=default/db,tp_dst=6379
bold "Ports, with counters and drops by reason"
show $flowctl dump-ports
bold "Connections conntrack is following"
show $flowctl dump-conntrack proto=tcp
bold "The audit log: every denied connection attempt, with the deciding rule and its packets"
sleep 1.5
show cat "$work/audit.log"
bold "Counters"
show $flowctl stats

bold "Staged policies: try a deny on real traffic without enforcing it (examples/staged)"
serve other/client 80
sleep 0.3
cp examples/staged/frontend-egress.yaml "$work/manifests/"
sleep 1
echo "frontend-egress is staged (vswitch.io/mode: audit): evaluated, not enforced:"
try connected default/frontend other/client 80 "(staged: it would deny this, but does not)"
try connected default/frontend default/db 6379 "(staged: it would allow this)"
show $flowctl trace tcp,src=default/frontend,dst=other/client,tp_dst=80
# The audit thread explains connections in batches, off the packet path:
# give it a moment (at most 5 s) before showing what it wrote.
for _ in $(seq 50); do
    $flowctl recent 2>/dev/null | grep -q 'would deny' && grep -q '"would deny"' "$work/audit.log" 2>/dev/null && break
    sleep 0.1
done
bold "What the switch saw recently, with what the staged policy would do"
show $flowctl recent
bold "The audit log names the would-be denial next to the real verdict"
show grep '"would deny"' "$work/audit.log"
bold "Before enforcing it: which recent connections would change? (exit 1: some would)"
cp -r "$work/manifests" "$work/proposal"
sed -i '/vswitch.io\/mode/d' "$work/proposal/frontend-egress.yaml"
printf '$ %s\n' "$flowctl --manifests $work/proposal what-if"
$flowctl --manifests "$work/proposal" what-if || echo "(exit $?)"
bold "Enforce it: the annotation removed"
cp "$work/proposal/frontend-egress.yaml" "$work/manifests/"
sleep 1
try dropped default/frontend other/client 80 "(enforced now)"
try connected default/frontend default/db 6379 "(its allow rule)"
rm "$work/manifests/frontend-egress.yaml"
sleep 1

bold "Admin tiers: two tenants, shared services (examples/multi-tenancy)"
serve tenant-a/web 80
serve tenant-b/web 80
serve shared/dns 80
sleep 0.3
echo "Before any ClusterNetworkPolicy, tenants reach each other:"
try connected tenant-b/web tenant-a/web 80 "(no policy)"
cp examples/multi-tenancy/admin.yaml examples/multi-tenancy/tenants.yaml "$work/manifests/"
sleep 1
echo "With the admin's policies and the tenants' NetworkPolicies:"
try connected tenant-a/worker tenant-a/web 80 "(tenant A's NetworkPolicy overrides the Baseline deny)"
try dropped tenant-b/web tenant-a/web 80 "(Admin Deny: tenants are isolated)"
try dropped tenant-a/worker tenant-b/web 80 "(tenant B's NetworkPolicy opens it to A: the Admin Deny wins)"
try connected tenant-a/web shared/dns 80 "(Admin Accept at priority 10: shared services)"
try dropped shared/dns tenant-a/worker 80 "(Baseline default deny: no NetworkPolicy selects worker)"
show $flowctl dump-policies
show $flowctl trace tcp,src=tenant-a/worker,dst=tenant-b/web,tp_dst=80

echo
if [ "$surprises" -gt 0 ]; then
    printf '\033[1;31m%s of %s connections did not behave as the policies say\033[0m\n' "$surprises" "$tries"
    exit 1
fi
printf '\033[1;32mAll %s connections behaved as the policies say.\033[0m\n' "$tries"
