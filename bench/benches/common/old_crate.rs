//! mmap-vec 0.2, the crate mmapvec replaces, set up for the benches: its segment files go to a
//! folder of the run's own beside `MmapAllocator`'s in the temp directory (so both write to the
//! same file system), removed when `main` ends.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// The folder of mmap-vec 0.2's files during the run.
fn old_crate_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("mmapvec-bench-old-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the folder for mmap-vec 0.2 segments");
        dir
    })
}

/// mmap-vec 0.2's segment naming, pointed at [`old_crate_dir`] (its default is `~/.cache`).
#[derive(Clone, Debug)]
pub struct OldSegments(&'static Path);

impl Default for OldSegments {
    fn default() -> Self {
        OldSegments(old_crate_dir())
    }
}

impl mmap_vec::SegmentBuilder for OldSegments {
    fn new_segment_path(&self) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        self.0
            .join(format!("{}.seg", NEXT.fetch_add(1, Ordering::Relaxed)))
    }
}

/// mmap-vec 0.2's vector, its files in [`old_crate_dir`].
pub type OldVec<T> = mmap_vec::MmapVec<T, OldSegments>;

/// Removes [`old_crate_dir`] when dropped (at the end of `main`, panics included).
pub struct Cleanup;

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(old_crate_dir());
    }
}
