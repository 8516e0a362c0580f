#!/usr/bin/env bash
# vswitch demo: the example NetworkPolicy compiled into the switch's pipeline,
# then real questions answered by tracing packets through the datapath code.
# Usage: examples/demo.sh        (builds what it needs; no root required)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust (rustup) first" >&2
    exit 1
fi
echo "==> building flowctl"
cargo build --release --quiet -p flowctl
flowctl=target/release/flowctl
manifests=examples/manifests

step() { printf '\n\033[1m== %s\033[0m\n$ %s\n' "$1" "$2"; }

step "The policy (examples/manifests/test-network-policy.yaml), compiled: tables 40 (egress) and 50 (ingress)" \
    "flowctl --manifests $manifests dump-flows --cookie test-network-policy"
$flowctl --manifests "$manifests" dump-flows --cookie test-network-policy

step "Allowed: a role=frontend pod in default to db on TCP 6379" \
    "flowctl --manifests $manifests trace tcp,src=default/frontend,dst=default/db,tp_dst=6379"
$flowctl --manifests "$manifests" trace tcp,src=default/frontend,dst=default/db,tp_dst=6379

step "Denied: 172.17.1.5 is inside the ipBlock's except" \
    "flowctl --manifests $manifests trace tcp,src=172.17.1.5,dst=default/db,tp_dst=6379"
$flowctl --manifests "$manifests" trace tcp,src=172.17.1.5,dst=default/db,tp_dst=6379

step "Egress from db: only 10.0.0.0/24 on TCP 5978" \
    "flowctl --manifests $manifests -o json trace tcp,src=default/db,dst=10.0.0.5,tp_dst=5978"
$flowctl --manifests "$manifests" -o json trace tcp,src=default/db,dst=10.0.0.5,tp_dst=5978 | grep -E '^  "(verdict|rule)"'

step "Every pod to every pod on TCP 6379" \
    "flowctl --manifests $manifests reachability --port 6379"
$flowctl --manifests "$manifests" reachability --port 6379
