//! A tmpfs of the bench's own (root only): a fresh file system per workload, so that its used
//! blocks are the allocator's files and nothing else's.

use std::ffi::CString;
use std::io;
use std::mem::MaybeUninit;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// A tmpfs of a given size mounted on a fresh directory under the temp directory, unmounted and
/// the directory removed when dropped (as `tests/faults/support.rs`'s `Tmpfs`).
#[derive(Debug)]
pub struct Tmpfs {
    path: PathBuf,
    size: u64,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` bytes on `<temp>/mmapvec-footprint-<pid>-<label>`, or says why
    /// it cannot.
    pub fn mount(label: &str, size: u64) -> Result<Tmpfs, String> {
        // SAFETY: `geteuid` has no preconditions and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("needs root to mount a tmpfs".into());
        }
        let path =
            std::env::temp_dir().join(format!("mmapvec-footprint-{}-{label}", std::process::id()));
        std::fs::create_dir(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
        let target = cstring(&path);
        let options = CString::new(format!("size={size},mode=0755")).expect("no NUL");
        // SAFETY: all four strings are NUL-terminated and live across the call.
        let ret = unsafe {
            libc::mount(
                c"tmpfs".as_ptr(),
                target.as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                options.as_ptr().cast(),
            )
        };
        if ret != 0 {
            let err = io::Error::last_os_error();
            let _ = std::fs::remove_dir(&path);
            return Err(format!("mount tmpfs on {}: {err}", path.display()));
        }
        Ok(Tmpfs { path, size })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The size it was mounted with.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Bytes of the file system in use now: `(f_blocks - f_bfree) × f_frsize` by `statvfs`.
    pub fn used_bytes(&self) -> u64 {
        let path = cstring(&self.path);
        let mut buf = MaybeUninit::<libc::statvfs>::uninit();
        // SAFETY: a NUL-terminated path and a buffer large enough for one `statvfs`.
        let ret = unsafe { libc::statvfs(path.as_ptr(), buf.as_mut_ptr()) };
        assert_eq!(
            ret,
            0,
            "statvfs {}: {}",
            self.path.display(),
            io::Error::last_os_error()
        );
        // SAFETY: statvfs succeeded, so it filled the buffer.
        let stat = unsafe { buf.assume_init() };
        #[allow(clippy::unnecessary_cast)] // the field types differ between targets.
        let used = (stat.f_blocks - stat.f_bfree) as u64 * stat.f_frsize as u64;
        used
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let target = cstring(&self.path);
        // SAFETY: `target` is a NUL-terminated path. MNT_DETACH: a mapping still alive (a
        // vector leaked by a panicking workload) must not leave the mount point busy.
        if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
            eprintln!(
                "umount {}: {}",
                self.path.display(),
                io::Error::last_os_error()
            );
            return;
        }
        // Reporting is all a drop can do; the directory is empty once unmounted.
        if let Err(e) = std::fs::remove_dir(&self.path) {
            eprintln!("remove {}: {e}", self.path.display());
        }
    }
}

fn cstring(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}
