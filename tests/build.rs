//! Builds the SDK workspace (example plugins and test plugins) for `wasm32-wasip2`, so the
//! integration tests run real components inside real pipelines.
//!
//! The components land in `target/wasm/wasm32-wasip2/release/`; the tests find them through
//! `PROMPTER_WASM_DIR`. A missing target is a hard error with the command that fixes it.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let root = manifest
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf();
    let sdk = root.join("sdk");
    for watched in [
        "src",
        "wit",
        "examples",
        "testing",
        "Cargo.toml",
        "Cargo.lock",
    ] {
        println!("cargo:rerun-if-changed={}", sdk.join(watched).display());
    }
    let target_dir = root.join("target").join("wasm");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.args([
        "build",
        "--release",
        "--locked",
        "--workspace",
        "--target",
        "wasm32-wasip2",
    ])
    .arg("--manifest-path")
    .arg(sdk.join("Cargo.toml"))
    .arg("--target-dir")
    .arg(&target_dir)
    .current_dir(&sdk);
    // The outer build's settings (target dir, flags, profile) must not leak into the guest build.
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        let leaks = (k.starts_with("CARGO_")
            && k != "CARGO_HOME"
            && !k.starts_with("CARGO_NET")
            && !k.starts_with("CARGO_HTTP")
            && !k.starts_with("CARGO_REGISTRIES"))
            || matches!(
                k.as_ref(),
                "RUSTFLAGS"
                    | "RUSTC"
                    | "RUSTC_WRAPPER"
                    | "RUSTC_WORKSPACE_WRAPPER"
                    | "RUSTDOC"
                    | "TARGET"
                    | "HOST"
                    | "OUT_DIR"
                    | "OPT_LEVEL"
                    | "PROFILE"
                    | "DEBUG"
                    | "NUM_JOBS"
                    | "RUSTC_LINKER"
            );
        if leaks {
            cmd.env_remove(&key);
        }
    }
    let status = cmd
        .status()
        .expect("cannot run cargo to build the Wasm plugins");
    if !status.success() {
        panic!(
            "building the Wasm plugins in sdk/ failed (see above). If the target is missing: `rustup target add wasm32-wasip2`"
        );
    }
    println!(
        "cargo:rustc-env=PROMPTER_WASM_DIR={}",
        target_dir.join("wasm32-wasip2").join("release").display()
    );
}
