//! Bad configuration is a clear `io::Error` from `build()`, naming the path; a failing segment
//! creator is an `AllocError` whose `io::Error` the user can still read.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use allocator_api2::alloc::{Allocator, Layout};
use mmapvec::{FailureCause, MmapAllocator, MmapVec, SegmentCreator, SegmentFile, SegmentRequest};

use crate::support::{
    TestDir, assert_child_passed, child_role, cstring, euid, files_under, in_child, on_tmpfs,
    run_child, skip,
};

/// Panics unless `err` has `kind` and its message names `path`.
#[track_caller]
fn assert_names(err: &io::Error, kind: io::ErrorKind, path: &Path) {
    assert_eq!(err.kind(), kind, "{err}");
    let path = path.to_str().expect("utf-8 path");
    assert!(
        err.to_string().contains(path),
        "{err:?} does not name {path}"
    );
}

#[test]
fn missing_dir_is_an_error_and_is_not_created() {
    let base = TestDir::new("missing");
    let missing = base.path().join("no-such-dir");
    let err = MmapAllocator::builder()
        .small_threshold(0)
        .dir(&missing)
        .build()
        .unwrap_err();
    assert_names(&err, io::ErrorKind::NotFound, &missing);
    assert!(!missing.exists(), "the missing directory was created");
}

#[test]
fn plain_file_as_dir_is_an_error() {
    let base = TestDir::new("plainfile");
    let file = base.path().join("a-file");
    fs::write(&file, b"not a directory").unwrap();
    let err = MmapAllocator::builder()
        .small_threshold(0)
        .dir(&file)
        .build()
        .unwrap_err();
    assert_names(&err, io::ErrorKind::NotADirectory, &file);
    assert_eq!(fs::read(&file).unwrap(), b"not a directory");
}

#[test]
fn unwritable_dir_is_an_error() {
    const NAME: &str = "bad_config::unwritable_dir_is_an_error";
    const DIR_ENV: &str = "MMAPVEC_FAULTS_DIR";
    if child_role().as_deref() == Some("nobody") {
        // Root ignores permission bits: this child gives up root to see them.
        // SAFETY: plain system calls on this process's credentials; the child is ours alone.
        unsafe {
            assert_eq!(libc::setgroups(0, std::ptr::null()), 0);
            assert_eq!(libc::setgid(65534), 0);
            assert_eq!(libc::setuid(65534), 0);
        }
        let dir = std::env::var(DIR_ENV).expect("dir from the parent");
        let err = MmapAllocator::builder()
            .small_threshold(0)
            .dir(&dir)
            .build()
            .unwrap_err();
        assert_names(&err, io::ErrorKind::PermissionDenied, Path::new(&dir));
        return;
    }
    let dir = TestDir::new("unwritable");
    if euid() != 0 {
        fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o555),
        )
        .unwrap();
        let err = MmapAllocator::builder()
            .small_threshold(0)
            .dir(dir.path())
            .build()
            .unwrap_err();
        assert_names(&err, io::ErrorKind::PermissionDenied, dir.path());
        fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        return;
    }
    // As root: a directory only root may write (0755, owned by root), seen by `nobody`...
    let path = dir.path().to_str().expect("utf-8 path");
    let output = run_child(NAME, "nobody", &[(DIR_ENV, path)]);
    assert_child_passed(NAME, &output);
    assert!(files_under(dir.path()).is_empty());
    assert!(
        fs::read_dir(dir.path()).unwrap().next().is_none(),
        "something was created"
    );

    // ...and a read-only bind mount, which root cannot write either.
    let target = cstring(dir.path());
    // SAFETY: NUL-terminated paths that live across the calls; the mount point is ours.
    let mounted = unsafe {
        libc::mount(
            target.as_ptr(),
            target.as_ptr(),
            std::ptr::null(),
            libc::MS_BIND,
            std::ptr::null(),
        ) == 0
            && libc::mount(
                std::ptr::null(),
                target.as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY,
                std::ptr::null(),
            ) == 0
    };
    let result = mounted.then(|| {
        MmapAllocator::builder()
            .small_threshold(0)
            .dir(dir.path())
            .build()
    });
    // SAFETY: as above; detach so a busy mount cannot outlive the test.
    unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
    match result {
        Some(result) => {
            let err = result.unwrap_err();
            assert_names(&err, io::ErrorKind::ReadOnlyFilesystem, dir.path());
        }
        None => eprintln!(
            "SKIPPED read-only bind mount: {}",
            io::Error::last_os_error()
        ),
    }
}

#[test]
fn missing_tmpdir_is_an_error_naming_it() {
    const NAME: &str = "bad_config::missing_tmpdir_is_an_error_naming_it";
    if child_role().as_deref() == Some("tmpdir") {
        let tmp = std::env::temp_dir();
        assert!(!tmp.exists(), "TMPDIR {} exists", tmp.display());
        let err = MmapAllocator::builder()
            .small_threshold(0)
            .build()
            .unwrap_err();
        assert_names(&err, io::ErrorKind::NotFound, &tmp);
        // The process-wide default cannot fail up front: its allocations fail, with the reason.
        let alloc = MmapAllocator::default();
        let mut v = MmapVec::<u8>::new_in(alloc.clone());
        assert!(v.try_reserve(100).is_err());
        let err = alloc.take_last_error().expect("the error is kept");
        assert_names(&err, io::ErrorKind::NotFound, &tmp);
        assert_eq!(alloc.stats().failures.creator, 1);
        return;
    }
    let base = TestDir::new("tmpdir");
    let missing = base.path().join("gone");
    let output = run_child(
        NAME,
        "tmpdir",
        &[("TMPDIR", missing.to_str().expect("utf-8"))],
    );
    assert_child_passed(NAME, &output);
    assert!(!missing.exists(), "TMPDIR was created");
}

#[test]
fn ram_backed_dir_is_refused_on_request_and_accepted_by_default() {
    let shm = Path::new("/dev/shm");
    if !on_tmpfs(shm) {
        skip!("/dev/shm is missing or not a tmpfs");
    }
    let dir = TestDir::new_in(shm, "ram");
    let err = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .allow_ram_backed(false)
        .build()
        .unwrap_err();
    assert_names(&err, io::ErrorKind::InvalidInput, dir.path());
    assert!(err.to_string().contains("RAM-backed"), "{err}");

    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .build()
        .expect("accepted by default");
    let v = mmapvec::mmap_vec![in alloc.clone(); 3u32; 1000];
    assert_eq!(v[999], 3);
    assert_eq!(alloc.stats().live_segments, 1);
}

/// Keeps the records logged at `warn` or above.
struct Recorder(Mutex<Vec<String>>);

impl log::Log for Recorder {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.level() <= log::Level::Warn
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let mut records = self.0.lock().unwrap_or_else(|e| e.into_inner());
            records.push(format!("{}: {}", record.level(), record.args()));
        }
    }
    fn flush(&self) {}
}

#[test]
fn ram_backed_dir_is_reported_with_a_warning() {
    const NAME: &str = "bad_config::ram_backed_dir_is_reported_with_a_warning";
    static RECORDER: Recorder = Recorder(Mutex::new(Vec::new()));
    let shm = Path::new("/dev/shm");
    if !on_tmpfs(shm) {
        skip!("/dev/shm is missing or not a tmpfs");
    }
    // A logger is process-wide: installed in a child.
    if !in_child(NAME, "logger") {
        return;
    }
    log::set_logger(&RECORDER).expect("first logger");
    log::set_max_level(log::LevelFilter::Warn);
    let dir = TestDir::new_in(shm, "warn");
    let disk = TestDir::new("nowarn");
    MmapAllocator::builder()
        .small_threshold(0)
        .dir(disk.path())
        .build()
        .expect("build on disk");
    assert!(
        RECORDER.0.lock().unwrap().is_empty(),
        "a warning for a disk directory"
    );
    MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .build()
        .expect("build on tmpfs");
    let records = RECORDER.0.lock().unwrap();
    let path = dir.path().to_str().unwrap();
    assert!(
        records
            .iter()
            .any(|r| r.starts_with("WARN") && r.contains("RAM-backed") && r.contains(path)),
        "no warning naming {path}: {records:?}"
    );
}

/// A creator that fails with the error it was given.
#[derive(Debug)]
struct Failing(fn() -> io::Error);

// SAFETY: it never hands out a file.
unsafe impl SegmentCreator for Failing {
    fn create(&self, _request: &SegmentRequest) -> io::Result<SegmentFile> {
        Err((self.0)())
    }
}

#[test]
fn failing_creator_is_an_alloc_error_with_its_io_error_kept() {
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .creator(Failing(|| {
            io::Error::new(io::ErrorKind::PermissionDenied, "no segments today")
        }))
        .build()
        .expect("build");
    let mut v = MmapVec::<u64>::new_in(alloc.clone());
    v.try_reserve(0)
        .expect("nothing to create for an empty reserve");
    assert!(v.try_reserve(10).is_err());
    let layout = Layout::from_size_align(4096, 8).unwrap();
    assert!(alloc.allocate(layout).is_err());
    assert!(alloc.allocate_zeroed(layout).is_err());

    let stats = alloc.stats();
    assert_eq!(stats.failures.creator, 3, "{stats:?}");
    assert_eq!(stats.failures.count(FailureCause::Creator), 3);
    assert_eq!(stats.failures.total(), 3);
    assert_eq!(stats.live_segments, 0);
    let err = alloc
        .take_last_error()
        .expect("the creator's error is kept");
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied);
    assert_eq!(err.to_string(), "no segments today");
    assert!(alloc.take_last_error().is_none(), "taken once");
}

#[test]
fn creator_out_of_space_counts_as_disk_full() {
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .creator(Failing(|| io::Error::from_raw_os_error(libc::ENOSPC)))
        .build()
        .expect("build");
    let mut v = MmapVec::<u8>::new_in(alloc.clone());
    assert!(v.try_reserve(10).is_err());
    assert_eq!(alloc.stats().failures.disk_full, 1);
    assert_eq!(
        alloc.take_last_error().unwrap().raw_os_error(),
        Some(libc::ENOSPC)
    );
}

/// A creator that hands out files the allocator cannot use (not empty, or read-only).
#[derive(Debug)]
struct Broken {
    dir: std::path::PathBuf,
    read_only: bool,
    next: AtomicUsize,
}

// SAFETY: each call creates a new file (`create_new`, fresh name) and keeps no handle to it.
// Files the allocator cannot use are its to refuse; refusing them is what the test checks.
unsafe impl SegmentCreator for Broken {
    fn create(&self, _request: &SegmentRequest) -> io::Result<SegmentFile> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("broken-{}-{n}", self.read_only));
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        if self.read_only {
            return Ok(SegmentFile::anonymous(
                OpenOptions::new().read(true).open(&path)?,
            ));
        }
        file.write_all(b"left over")?;
        Ok(SegmentFile::anonymous(file))
    }
}

#[test]
fn creator_handing_out_a_bad_file_is_an_error() {
    let dir = TestDir::new("broken");
    for read_only in [false, true] {
        let creator = Broken {
            dir: dir.path().to_path_buf(),
            read_only,
            next: AtomicUsize::new(0),
        };
        let alloc = MmapAllocator::builder()
            .small_threshold(0)
            .creator(creator)
            .build()
            .expect("build");
        let mut v = MmapVec::<u8>::new_in(alloc.clone());
        assert!(v.try_reserve(10).is_err(), "read_only {read_only}");
        let stats = alloc.stats();
        assert_eq!(stats.failures.total(), 1, "{stats:?}");
        assert_eq!(stats.live_segments, 0);
        let err = alloc.take_last_error().unwrap();
        println!("read_only {read_only}: {err}");
    }
}
