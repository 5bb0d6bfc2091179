//! What the store tests share: fresh store paths, taking turns, and running a test again in a
//! new process (a fresh address space, as a program that reopens a store has).

#![allow(dead_code)] // each test binary uses its own part

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

/// The environment variables that tell a test it runs as a new process of its own: its role
/// and the store's path.
pub const ROLE: &str = "MMAPVEC_STORE_ROLE";
pub const PATH: &str = "MMAPVEC_STORE_PATH";

/// A store path under the temp folder (the store makes the folder), removed at the end.
pub struct TestPath(pub PathBuf);

impl TestPath {
    pub fn new(label: &str) -> TestPath {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!(
            "mmapvec-store-it-{label}-{}-{n}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&path);
        TestPath(path)
    }
}

impl Drop for TestPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// One store per process at a time: the tests of a binary take turns.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The role and path this process was started with by [`in_new_process`], if it was.
pub fn role() -> Option<(String, PathBuf)> {
    Some((std::env::var(ROLE).ok()?, std::env::var_os(PATH)?.into()))
}

/// Runs the test `name` again in a new process with `role` and the store's `path`; asserts
/// that it passed.
pub fn in_new_process(name: &str, role: &str, path: &Path) {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            name,
            "--nocapture",
            "--test-threads=1",
            "--include-ignored",
        ])
        .env(ROLE, role)
        .env(PATH, path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{name} as {role}: {}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}
