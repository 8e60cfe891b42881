#!/usr/bin/env bash
# Builds the SDK's example plugins (and test plugins) as WebAssembly components into
# target/wasm/wasm32-wasip2/release/. Installs the wasm32-wasip2 target where missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  rustup target add wasm32-wasip2
fi
cargo build --release --locked --workspace --target wasm32-wasip2 \
  --manifest-path sdk/Cargo.toml --target-dir target/wasm
ls -l target/wasm/wasm32-wasip2/release/*.wasm
