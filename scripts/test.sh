#!/usr/bin/env bash
# Installs the servers the tests start for themselves (Redis, Postgres, NATS,
# from the distribution's packages, only when missing), Chromium and Node.js
# for the browser test (playwright-core from npm, at the version in
# crates/cli/tests/browser/package-lock.json), moto's S3-compatible server
# from PyPI for the object-store test, and runs every check:
# formatting, clippy with warnings as errors, and every test of the workspace.
#
# The tests never use servers already running on the machine: the harness
# (crates/testkit) starts private ones on free loopback ports in temp dirs.
# With CI=true a server that cannot start fails the run; it is never skipped.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v nats-server >/dev/null 2>&1 || [ -x /usr/sbin/nats-server ] || missing+=(nats-server)
compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v node >/dev/null 2>&1 || missing+=(nodejs)
command -v npm >/dev/null 2>&1 || missing+=(npm)

if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing ${missing[*]} (Debian packages)"
    as_root=()
    [ "$(id -u)" -eq 0 ] || as_root=(sudo)
    export DEBIAN_FRONTEND=noninteractive
    "${as_root[@]}" apt-get update -q
    "${as_root[@]}" apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

if ! command -v moto_server >/dev/null 2>&1; then
    echo "==> pip install moto[server] (an S3-compatible server for the object-store test)"
    python3 -m pip install --quiet 'moto[server]==5.2.1'
fi

browser=crates/cli/tests/browser
if [ ! -d "$browser/node_modules/playwright-core" ]; then
    echo "==> npm ci (playwright-core for the browser test)"
    (cd "$browser" && npm ci --no-audit --no-fund --loglevel=error)
fi

echo "==> cargo fmt --check"
cargo fmt --all -- --check
echo "==> cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "==> cargo test"
cargo test --workspace --locked
