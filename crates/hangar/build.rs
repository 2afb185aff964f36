//! Builds `hangar-init` as a static, stripped binary and hands its path to
//! the crate (`HANGAR_INIT_BIN`), which embeds it: machines need a PID 1
//! that runs in images without a libc, and a `hangar` binary that carries
//! it needs no separate build step (`cargo build --release` is enough).
//!
//! A nested `cargo build` of the one package, for the host target, into a
//! target directory of its own (so it never waits on the outer build's
//! lock), with `+crt-static`; `--target` keeps the static flag off build
//! scripts and proc macros. Always optimized: init is small and in every
//! micro-VM's initramfs.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest_dir = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let workspace = manifest_dir.join("../..");
    let init = workspace.join("crates/hangar-init");
    for path in ["src", "Cargo.toml"] {
        println!("cargo:rerun-if-changed={}", init.join(path).display());
    }
    println!(
        "cargo:rerun-if-changed={}",
        workspace.join("Cargo.lock").display()
    );
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("set by cargo"));
    let target = env::var("TARGET").expect("set by cargo");
    let cargo = env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let target_dir = out.join("init");
    let status = Command::new(cargo)
        .args([
            "build",
            "--quiet",
            "--offline",
            "--release",
            "--package",
            "hangar-init",
        ])
        .args(["--bin", "hangar-init", "--target", &target])
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .env("CARGO_TARGET_DIR", &target_dir)
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Ctarget-feature=+crt-static\u{1f}-Cstrip=symbols",
        )
        .status()
        .expect("cannot run cargo to build hangar-init");
    assert!(
        status.success(),
        "building the static hangar-init failed (see above)"
    );
    let bin = target_dir.join(&target).join("release/hangar-init");
    println!("cargo:rustc-env=HANGAR_INIT_BIN={}", bin.display());
}
