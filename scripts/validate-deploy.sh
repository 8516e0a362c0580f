#!/usr/bin/env bash
# Renders deploy/ with kustomize (kubectl kustomize) and validates every object
# against the Kubernetes 1.33 schemas with kubernetes-validate (pinned; its
# schemas ship with the package, so validation itself is offline).
# Usage: scripts/validate-deploy.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v kubectl >/dev/null 2>&1; then
    echo "==> installing kubectl (kubernetes-client)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq kubernetes-client >/dev/null
fi
venv=target/validate-venv
if [ ! -x "$venv/bin/kubernetes-validate" ]; then
    echo "==> installing kubernetes-validate 1.33.1 into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q kubernetes-validate==1.33.1
fi
mkdir -p target
rendered=target/deploy-rendered.yaml
kubectl kustomize deploy/ >"$rendered"
"$venv/bin/kubernetes-validate" --kubernetes-version 1.33.1 --strict --quiet "$rendered"
echo "deploy/: $(grep -c '^kind:' "$rendered") objects valid against Kubernetes 1.33"
