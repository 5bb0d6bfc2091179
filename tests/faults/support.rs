//! What the fault tests share: private directories, tmpfs mounts, child processes, and
//! counting what a process holds (descriptors, mappings, files).

// Every fault module uses a different part of this one.
#![allow(dead_code)]

use std::ffi::CString;
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicUsize, Ordering};

/// Shared with the core tests (`tests/core_support`).
pub use crate::core_support::{euid, files_under, is_uuid_v4};

/// Says why a test cannot run here and returns from it (the test counts as passed; the message
/// is in the output with `--nocapture`).
macro_rules! skip {
    ($($why:tt)+) => {{
        eprintln!("SKIPPED {}: {}", $crate::support::test_name(), format_args!($($why)+));
        return;
    }};
}
pub(crate) use skip;

/// The running test's name: libtest names each test's thread after it.
pub fn test_name() -> String {
    std::thread::current().name().unwrap_or("a test").to_owned()
}

/// A fresh directory of the test's own, removed with its content when dropped. Its path is
/// canonical, so it can be looked for in `/proc/self/maps` and `/proc/self/fd`.
#[derive(Debug)]
pub struct TestDir {
    path: PathBuf,
}

impl TestDir {
    /// `<temp>/mmapvec-faults-<pid>-<n>-<label>`.
    pub fn new(label: &str) -> TestDir {
        TestDir::new_in(&std::env::temp_dir(), label)
    }

    /// A directory where files are cheap to create, for tests that make tens of thousands of
    /// segments: `/dev/shm` when it is a tmpfs, else the temp directory. (On this project's
    /// VM, creating a file in an ext4 folder under `/tmp` took 0.2 to 0.9 ms, in `/dev/shm`
    /// 15 us.) What those tests count (descriptors, mappings, names, errors) does not depend
    /// on the file system; segments there are small or sparse.
    pub fn fast(label: &str) -> TestDir {
        let shm = Path::new("/dev/shm");
        if on_tmpfs(shm) && fs::metadata(shm).is_ok_and(|m| !m.permissions().readonly()) {
            TestDir::new_in(shm, label)
        } else {
            TestDir::new(label)
        }
    }

    /// `<base>/mmapvec-faults-<pid>-<n>-<label>`.
    pub fn new_in(base: &Path, label: &str) -> TestDir {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let base = fs::canonicalize(base).expect("base dir");
        let path = base.join(format!("mmapvec-faults-{}-{n}-{label}", std::process::id()));
        fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TestDir { path }
    }

    /// Adopts a directory made by someone else (a parent process), removing it when dropped.
    pub fn adopt(path: impl Into<PathBuf>) -> TestDir {
        TestDir { path: path.into() }
    }

    /// The directory (what goes to `Builder::dir`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The crate's folder inside it: `mmapvec-<uid>`.
    pub fn segment_folder(&self) -> PathBuf {
        self.path.join(format!("mmapvec-{}", euid()))
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        if !self.path.exists() {
            return;
        }
        // Cleaning up must not hide the test's own panic: report and go on.
        if let Err(e) = fs::remove_dir_all(&self.path) {
            eprintln!("could not remove {}: {e}", self.path.display());
        }
    }
}

/// A small tmpfs mounted on a fresh directory (root only), unmounted and removed when dropped.
#[derive(Debug)]
pub struct Tmpfs {
    dir: TestDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` bytes, or says why it cannot.
    pub fn mount(label: &str, size: usize) -> Result<Tmpfs, String> {
        if euid() != 0 {
            return Err("needs root to mount a tmpfs".into());
        }
        let dir = TestDir::new(label);
        crate::core_support::mount(c"tmpfs", dir.path(), &format!("size={size},mode=0755"))?;
        Ok(Tmpfs { dir })
    }

    /// The mount point.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        crate::core_support::unmount(self.dir.path());
    }
}

/// Whether `path` is on a tmpfs, by `statfs`.
pub fn on_tmpfs(path: &Path) -> bool {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    let c_path = cstring(path);
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer large enough for one `statfs`.
    if unsafe { libc::statfs(c_path.as_ptr(), buf.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: statfs succeeded, so it filled the buffer.
    let stat = unsafe { buf.assume_init() };
    #[allow(clippy::unnecessary_cast)] // `f_type`'s type differs between targets.
    let kind = stat.f_type as i64;
    kind == TMPFS_MAGIC
}

/// Bytes free for unprivileged users on the file system holding `path`, by `statvfs`.
pub fn free_bytes(path: &Path) -> u64 {
    let c_path = cstring(path);
    let mut buf = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer large enough for one `statvfs`.
    let ret = unsafe { libc::statvfs(c_path.as_ptr(), buf.as_mut_ptr()) };
    assert_eq!(
        ret,
        0,
        "statvfs {}: {}",
        path.display(),
        io::Error::last_os_error()
    );
    // SAFETY: statvfs succeeded, so it filled the buffer.
    let stat = unsafe { buf.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets.
    let free = stat.f_bavail as u64 * stat.f_frsize as u64;
    free
}

/// `path` as a C string.
pub fn cstring(path: &Path) -> CString {
    CString::new(path.as_os_str().as_bytes()).expect("path without NUL")
}

/// The type of `RLIMIT_*` constants (glibc gives them a type of their own).
#[cfg(target_env = "gnu")]
pub type Resource = libc::__rlimit_resource_t;
/// The type of `RLIMIT_*` constants.
#[cfg(not(target_env = "gnu"))]
pub type Resource = libc::c_int;

/// Sets the soft limit of `resource` (the hard limit stays). Child processes only.
pub fn set_soft_limit(resource: Resource, soft: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit.
    let ret = unsafe { libc::getrlimit(resource, &mut limit) };
    assert_eq!(ret, 0, "getrlimit: {}", io::Error::last_os_error());
    limit.rlim_cur = soft.min(limit.rlim_max);
    // SAFETY: `limit` is a valid rlimit no higher than the hard limit.
    let ret = unsafe { libc::setrlimit(resource, &limit) };
    assert_eq!(ret, 0, "setrlimit: {}", io::Error::last_os_error());
}

/// No core files from the crashes a child is asked to show. Child processes only.
pub fn no_core_dumps() {
    set_soft_limit(libc::RLIMIT_CORE, 0);
}

/// The environment variable that tells a re-executed test binary which role it plays.
pub const CHILD_ENV: &str = "MMAPVEC_FAULTS_CHILD";

/// The role this process was started for, `None` in the test runner itself.
pub fn child_role() -> Option<String> {
    std::env::var(CHILD_ENV).ok()
}

/// A command that runs the test `test_name` (its path inside this binary, e.g.
/// `disk_full::rlimit_fsize`) alone, in a new process, as `role`.
pub fn child_command(test_name: &str, role: &str) -> Command {
    let exe = std::env::current_exe().expect("current exe");
    let mut command = Command::new(exe);
    command
        .args(["--exact", test_name, "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, role);
    command
}

/// Runs `test_name` as `role` in a child process and returns what it did, echoing its output.
pub fn run_child(test_name: &str, role: &str, env: &[(&str, &str)]) -> Output {
    let mut command = child_command(test_name, role);
    command.envs(env.iter().copied());
    let output = command.output().expect("spawn child test process");
    echo(test_name, role, &output);
    output
}

/// For a test whose whole body runs in a child process: in the test runner, runs the test
/// again as `role` in a child, checks that it passed, and returns `false` (the caller returns);
/// in that child, returns `true` (the caller goes on with the body).
pub fn in_child(test_name: &str, role: &str) -> bool {
    if child_role().as_deref() == Some(role) {
        return true;
    }
    let output = run_child(test_name, role, &[]);
    assert_child_passed(test_name, &output);
    false
}

/// Prints a child's output, which the test harness shows when the parent fails.
pub fn echo(test_name: &str, role: &str, output: &Output) {
    eprintln!(
        "--- child {test_name} ({role}), {}\n--- stdout:\n{}--- stderr:\n{}---",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Panics unless the child ran its test (a filter matching nothing also exits 0) and passed.
pub fn assert_child_passed(test_name: &str, output: &Output) {
    assert!(
        output.status.success(),
        "child {test_name} failed: {}",
        output.status
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("1 passed"),
        "child {test_name} did not run its test"
    );
}

/// The signal that killed a child, if one did.
pub fn killed_by(output: &Output) -> Option<i32> {
    output.status.signal()
}

/// Open descriptors of this process.
pub fn open_descriptors() -> usize {
    fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

/// Descriptors of this process open on files below `dir` (deleted files included).
pub fn descriptors_under(dir: &Path) -> usize {
    let prefix = format!("{}/", dir.display());
    fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .filter(|target| target.to_string_lossy().starts_with(&prefix))
        .count()
}

/// Lines of `/proc/self/maps`.
pub fn maps() -> Vec<String> {
    fs::read_to_string("/proc/self/maps")
        .expect("read /proc/self/maps")
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Mappings of this process backed by files below `dir`.
pub fn mappings_under(dir: &Path) -> usize {
    let prefix = format!(" {}/", dir.display());
    maps().iter().filter(|line| line.contains(&prefix)).count()
}

/// Names in `dir` (not recursive), sorted; empty if it does not exist.
pub fn names_in(dir: &Path) -> Vec<String> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// `VmSize`: the address space this process maps now.
pub fn vm_size() -> usize {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("statm");
    let pages: usize = statm.split_whitespace().next().unwrap().parse().unwrap();
    pages * 4096
}

/// Disk held by the files below `dir` that this process maps (unlinked ones included):
/// `st_blocks` of each distinct file, read through `/proc/self/map_files` (which needs
/// `CAP_SYS_ADMIN`). Without it, the length of those mappings: an upper bound on their disk,
/// and the disk itself when every mapped page was reserved (`reserve_disk`).
pub fn mapped_disk_under(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut files = std::collections::HashMap::new();
    for (range, _) in mappings_of(dir) {
        let Ok(meta) = fs::metadata(format!("/proc/self/map_files/{range}")) else {
            return mappings_of(dir).iter().map(|(_, len)| len).sum();
        };
        files.insert((meta.dev(), meta.ino()), meta.blocks() * 512);
    }
    files.values().sum()
}

/// This process's mappings of files below `dir`: `start-end` as in `/proc/self/maps`, and the
/// length in bytes.
fn mappings_of(dir: &Path) -> Vec<(String, u64)> {
    let prefix = format!(" {}/", dir.display());
    maps()
        .iter()
        .filter(|line| line.contains(&prefix))
        .map(|line| {
            let range = line.split_whitespace().next().expect("a range");
            let (start, end) = range.split_once('-').expect("start-end");
            let len =
                u64::from_str_radix(end, 16).unwrap() - u64::from_str_radix(start, 16).unwrap();
            (range.to_owned(), len)
        })
        .collect()
}
