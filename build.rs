//! Records which compiler builds the crate. A persistent store holds Rust values as they lie in
//! memory, and the layout of a `repr(Rust)` struct (a `Vec`'s fields, a hash table's) is the
//! compiler's to choose: a store is only reopened by code built with the compiler that made it
//! (see `src/store/mod.rs`, `StoreError::OtherBuild`).

use std::process::Command;

fn main() {
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let version = Command::new(rustc)
        .arg("-vV")
        .output()
        .ok()
        .filter(|out| out.status.success())
        .map(|out| {
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .replace('\n', "; ")
        })
        .unwrap_or_else(|| "unknown".into());
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=MMAPVEC_BUILD={version}; target: {target}");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=RUSTC");
}
