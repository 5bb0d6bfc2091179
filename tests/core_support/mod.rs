//! Helpers shared by the core behaviour tests (vec, allocator, proptest, hashbrown, threads,
//! many segments): a private temp directory per test, file counting, `/proc/self/maps` parsing,
//! UUID checks, and running a test again in a child process.
//!
//! The fault tests (`tests/faults.rs`) use some of these too.

// Each test binary compiles this module on its own and uses only part of it.
#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use mmapvec::MmapAllocator;

/// A fresh directory of the test's own under the temp directory, removed (with everything in
/// it) when dropped. Declare it before the allocators and vectors that use it, so it is dropped
/// after them.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// Makes `<temp>/mmapvec-core-test-<pid>-<n>-<label>`; the path is canonical so it can be
    /// looked for in `/proc/self/maps`.
    pub fn new(label: &str) -> TestDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = fs::canonicalize(std::env::temp_dir()).expect("temp dir");
        let path = base.join(format!(
            "mmapvec-core-test-{}-{n}-{label}",
            std::process::id()
        ));
        // A leftover from an earlier run with the same pid would skew file counts.
        let _ = fs::remove_dir_all(&path);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TestDir { path }
    }

    /// The directory itself (what goes to `Builder::dir`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The crate's folder inside it, where the default creator puts segment files.
    pub fn segment_folder(&self) -> PathBuf {
        self.path.join(format!("mmapvec-{}", euid()))
    }

    /// An allocator with default settings whose segments go in this directory.
    pub fn allocator(&self) -> MmapAllocator {
        MmapAllocator::builder()
            .dir(&self.path)
            .build()
            .expect("build allocator")
    }

    /// An allocator in the directory that gives every allocation a segment of its own and
    /// keeps no freed segment for reuse, for tests that check what each free gives back.
    pub fn allocator_without_reuse(&self) -> MmapAllocator {
        MmapAllocator::builder()
            .dir(&self.path)
            .small_threshold(0)
            .reuse_bytes(0)
            .build()
            .expect("build allocator")
    }

    /// An allocator in the directory that gives every allocation a segment of its own (the
    /// small-block tier off), for tests that look at segments one by one.
    pub fn allocator_segments_only(&self) -> MmapAllocator {
        MmapAllocator::builder()
            .dir(&self.path)
            .small_threshold(0)
            .build()
            .expect("build allocator")
    }

    /// Regular files anywhere below the directory.
    pub fn files(&self) -> Vec<PathBuf> {
        files_under(&self.path)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        // Cleaning up must not hide the test's own panic message; report and go on.
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("could not remove {}: {e}", self.path.display());
        }
    }
}

/// The effective user id (names the crate's folder `mmapvec-<uid>`).
pub fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// The system page size.
pub fn page() -> usize {
    // SAFETY: sysconf has no preconditions; it only reads a system value.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).expect("a positive page size")
}

/// Everything except directories anywhere below `dir` (an empty list if it does not exist).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries {
            let entry = entry.expect("read_dir entry");
            let kind = entry.file_type().expect("file type");
            if kind.is_dir() {
                pending.push(entry.path());
            } else {
                found.push(entry.path());
            }
        }
    }
    found
}

/// One line of `/proc/self/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// First address.
    pub start: usize,
    /// One past the last address.
    pub end: usize,
    /// The permission field, e.g. `rw-s`.
    pub perms: String,
    /// The file path, without the ` (deleted)` suffix; empty for anonymous mappings.
    pub path: String,
    /// Whether the kernel marked the file ` (deleted)`.
    pub deleted: bool,
}

/// Every mapping of this process.
pub fn maps() -> Vec<Mapping> {
    let text = fs::read_to_string("/proc/self/maps").expect("read /proc/self/maps");
    text.lines().map(parse_maps_line).collect()
}

fn parse_maps_line(line: &str) -> Mapping {
    // `start-end perms offset dev inode   path`: the path (which may hold spaces) starts after
    // the fifth field.
    let mut rest = line;
    let mut fields = Vec::new();
    for _ in 0..5 {
        rest = rest.trim_start();
        let cut = rest.find(' ').unwrap_or(rest.len());
        fields.push(&rest[..cut]);
        rest = &rest[cut..];
    }
    let path = rest.trim();
    let (path, deleted) = match path.strip_suffix(" (deleted)") {
        Some(p) => (p, true),
        None => (path, false),
    };
    let (start, end) = fields[0].split_once('-').expect("address range");
    Mapping {
        start: usize::from_str_radix(start, 16).expect("start address"),
        end: usize::from_str_radix(end, 16).expect("end address"),
        perms: fields[1].to_string(),
        path: path.to_string(),
        deleted,
    }
}

/// The mapping that contains `addr`, if any.
pub fn mapping_containing(addr: usize) -> Option<Mapping> {
    maps().into_iter().find(|m| m.start <= addr && addr < m.end)
}

/// Mappings of files below `dir`.
pub fn mappings_under(dir: &Path) -> Vec<Mapping> {
    let prefix = format!("{}/", dir.display());
    maps()
        .into_iter()
        .filter(|m| m.path.starts_with(&prefix))
        .collect()
}

/// Descriptors of this process open on files below `dir` (deleted files included).
pub fn descriptors_under(dir: &Path) -> usize {
    let prefix = format!("{}/", dir.display());
    let Ok(entries) = fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    entries
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with(&prefix))
        .count()
}

/// Whether `name` is a UUID v4 in its hyphenated lower-case form.
pub fn is_uuid_v4(name: &str) -> bool {
    let bytes = name.as_bytes();
    bytes.len() == 36
        && bytes.iter().enumerate().all(|(i, &b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
        && bytes[14] == b'4'
        && matches!(bytes[19], b'8' | b'9' | b'a' | b'b')
}

/// The last path component of `path`.
pub fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// The environment variable that tells a re-executed test binary it is the child.
pub const CHILD_ENV: &str = "MMAPVEC_CORE_TEST_CHILD";

/// What this process was asked to do as a child (`None` in the parent).
pub fn child_role() -> Option<String> {
    std::env::var(CHILD_ENV).ok()
}

/// Runs the test `test_name` of this same binary again, alone, in a child process with
/// `MMAPVEC_CORE_TEST_CHILD=role`; echoes its output and panics if it failed or did not run.
pub fn run_in_child(test_name: &str, role: &str) -> String {
    let exe = std::env::current_exe().expect("current exe");
    let output = Command::new(exe)
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, role)
        .output()
        .expect("spawn child test process");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let text = format!("--- child stdout\n{stdout}--- child stderr\n{stderr}");
    eprintln!("child {test_name} ({role}):\n{text}");
    assert!(
        output.status.success(),
        "child {test_name} ({role}) failed: {}",
        output.status
    );
    // A filter that matched nothing also exits 0: make sure the test really ran.
    assert!(
        stdout.contains("1 passed"),
        "child {test_name} ({role}) did not run the test"
    );
    text
}

/// The `VmFlags` of the mapping that contains `addr` (from `/proc/self/smaps`), e.g.
/// `["rd", "wr", "sh", "mr", "mw", "me", "ms", "dc"]`; `None` if no mapping contains it.
pub fn vm_flags(addr: usize) -> Option<Vec<String>> {
    let text = fs::read_to_string("/proc/self/smaps").expect("read /proc/self/smaps");
    let mut inside = false;
    for line in text.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            inside = start <= addr && addr < end;
        } else if inside && let Some(flags) = line.strip_prefix("VmFlags:") {
            return Some(flags.split_whitespace().map(str::to_string).collect());
        }
    }
    None
}

/// Mounts a file system of `kind` (`c"tmpfs"`, `c"overlay"`) with `options` on the folder
/// `target` (root only), or says why it cannot.
pub fn mount(kind: &std::ffi::CStr, target: &Path, options: &str) -> Result<(), String> {
    let c_target =
        std::ffi::CString::new(target.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    let c_options = std::ffi::CString::new(options).map_err(|e| e.to_string())?;
    // SAFETY: all four strings are NUL-terminated and live across the call.
    let ret = unsafe {
        libc::mount(
            kind.as_ptr(),
            c_target.as_ptr(),
            kind.as_ptr(),
            0,
            c_options.as_ptr().cast(),
        )
    };
    if ret != 0 {
        return Err(format!(
            "mount {kind:?} on {}: {}",
            target.display(),
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Unmounts `target`, lazily (`MNT_DETACH`: a mapping still alive after a failed test must not
/// leave the mount point busy forever).
pub fn unmount(target: &Path) {
    let Ok(c_target) = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()) else {
        return;
    };
    // SAFETY: a NUL-terminated path.
    if unsafe { libc::umount2(c_target.as_ptr(), libc::MNT_DETACH) } != 0 {
        eprintln!(
            "umount {}: {}",
            target.display(),
            std::io::Error::last_os_error()
        );
    }
}
