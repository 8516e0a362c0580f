#!/usr/bin/env bash
# The whole test suite: installs what it needs, builds, runs every test.
# Usage: scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v ip >/dev/null 2>&1 || need_pkgs+=(iproute2)
# ICMP and ICMPv6 echo through the switch (IPv6 and end-to-end tests).
command -v ping >/dev/null 2>&1 || need_pkgs+=(iputils-ping)
# host-local, the IPAM plugin vswitch-cni delegates to (end-to-end tests).
[ -x /usr/lib/cni/host-local ] || [ -x /opt/cni/bin/host-local ] || need_pkgs+=(containernetworking-plugins)
# The web view's test drives a real headless browser.
{ [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; } || need_pkgs+=(chromium chromium-driver)
# Validating deploy/: python3 with venv for kubernetes-validate.
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_pkgs+=(python3-venv)
if [ "${#need_pkgs[@]}" -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "==> installing ${need_pkgs[*]}"
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
    else
        echo "missing packages: ${need_pkgs[*]} (run as root, or install them)" >&2
        exit 1
    fi
fi
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install Rust (rustup) first" >&2
    exit 1
fi

echo "==> module circles"
python3 scripts/module-cycles.py
# On a CI machine, no incremental caches: a clean checkout builds once, and
# the caches would only take disk (the debug build is ~2 GB without them).
[ "${CI:-}" = true ] && export CARGO_INCREMENTAL=0
echo "==> cargo test (workspace)"
echo "    (WARN and ERROR log lines below come from tests that provoke failures on purpose:"
echo "     bad manifests, a refused API server, dead ports; a test fails only with FAILED)"
cargo test --workspace --locked
echo "==> deploy/ manifests"
scripts/validate-deploy.sh
# The Quick start's first command, as a user with CARGO_TARGET_DIR set runs
# it: from a copy of the sources, building where cargo says (here, the
# suite's own target directory: little to rebuild). As root it runs real
# pods and fails when a connection does not behave as the policies say.
echo "==> the demo (examples/demo.sh) with CARGO_TARGET_DIR set"
demo_src=$(mktemp -d /tmp/vswitch-demo-src.XXXXXX)
trap 'rm -rf "$demo_src"' EXIT
tar --exclude=./target --exclude=./.git -cf - . | tar -xf - -C "$demo_src"
if CARGO_TARGET_DIR="$PWD/target" "$demo_src/examples/demo.sh" > target/demo.log 2>&1; then
    grep -a "behaved as the policies say" target/demo.log || echo "    (the offline demo: not root)"
else
    cat target/demo.log
    echo "the demo failed (its output is above, and in target/demo.log)" >&2
    exit 1
fi
