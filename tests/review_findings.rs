//! An outside review of issue 8's fix (fork, pid reuse, paths) broke it seven more ways; each
//! test here reproduced one and passes since its fix (RELIABILITY.md lists them). They assert
//! the behaviour the crate promises.
//!
//! Every test that forks runs its body in a test process of its own (`support::in_child`), so
//! no other test's thread holds a lock or has touched process-wide state (the default
//! allocator, the release queue) there. Hangs are observed with a time limit on a `fork`ed
//! grandchild, crashes through its wait status.

#![cfg(target_os = "linux")]

#[path = "core_support/mod.rs"]
mod core_support;
// Shared with the fault tests, which use more of it.
#[allow(unused_imports, unused_macros)]
#[path = "faults/support.rs"]
mod support;

use std::ffi::CString;
use std::fs::{self, File};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, symlink};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mmapvec::{DirCreator, MmapAllocator, MmapVec, SegmentCreator, SegmentFile, SegmentRequest};

use support::{TestDir, euid, in_child};

/// Forks; the child runs `body` and `_exit`s with its return value (101 on panic).
fn fork_with(body: impl FnOnce() -> i32) -> libc::pid_t {
    // SAFETY: fork has no memory preconditions; the child ends with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(101);
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(code) };
    }
    pid
}

/// Waits up to `limit` for a child; kills it (SIGKILL) and returns `None` if it is still running.
fn wait_for(pid: libc::pid_t, limit: Duration) -> Option<i32> {
    let start = Instant::now();
    loop {
        let mut status = 0;
        // SAFETY: our own child, a valid status pointer.
        let ret = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if ret == pid {
            return Some(status);
        }
        assert!(ret >= 0 || io::Error::last_os_error().kind() == io::ErrorKind::Interrupted);
        if start.elapsed() > limit {
            // SAFETY: signals our own child; then reaps it.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, &mut status, 0);
            }
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn describe(status: Option<i32>) -> String {
    match status {
        None => "HUNG (killed after the time limit)".into(),
        Some(s) if libc::WIFEXITED(s) => format!("exited {}", libc::WEXITSTATUS(s)),
        Some(s) if libc::WIFSIGNALED(s) => format!("killed by signal {}", libc::WTERMSIG(s)),
        Some(s) => format!("status {s:#x}"),
    }
}

fn exited_ok(status: Option<i32>) -> bool {
    status.is_some_and(|s| libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0)
}

/// A creator of anonymous files (memfd): no file system work, so thousands of allocators
/// are cheap to build.
#[derive(Debug)]
struct Memfd;

// SAFETY: every call makes a new memfd, hands it out once and keeps nothing.
unsafe impl SegmentCreator for Memfd {
    fn create(&self, _request: &SegmentRequest) -> io::Result<SegmentFile> {
        // SAFETY: a valid C string, no flags that need more.
        let fd = unsafe { libc::memfd_create(c"review".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: just opened, owned by nothing else.
        Ok(SegmentFile::anonymous(unsafe {
            <File as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }
}

/// Registers `n` allocators so that the `pthread_atfork` prepare handler (which locks 18
/// mutexes of each) takes a measurable time; returns them and that time.
fn slow_prepare(n: usize) -> (Vec<MmapAllocator>, Duration) {
    let allocators: Vec<MmapAllocator> = (0..n)
        .map(|_| {
            MmapAllocator::builder()
                .creator(Memfd)
                .build()
                .expect("build")
        })
        .collect();
    let start = Instant::now();
    let pid = fork_with(|| 0);
    let took = start.elapsed();
    assert!(exited_ok(wait_for(pid, Duration::from_secs(10))));
    (allocators, took)
}

/// Runs `trials` times: in a fresh process `T` (forked from this one, which has not used what
/// the race initialises), `setup` runs, then a thread runs what it returned while `T` itself
/// forks a grandchild during the prepare handler (the thread starts a fraction of the measured
/// prepare time in, a different fraction each trial); the grandchild then calls
/// `in_grandchild`, which must return within 3 s. Returns the outcomes seen.
fn race_first_use_with_fork(
    trials: usize,
    prepare_time: Duration,
    setup: fn() -> Box<dyn FnOnce() + Send>,
    in_grandchild: fn(),
) -> Vec<String> {
    let mut outcomes = Vec::new();
    for trial in 0..trials {
        let delay = prepare_time * (1 + trial as u32 % 3) / 24;
        let pid = fork_with(|| {
            let first_use = setup();
            let go = Arc::new(AtomicBool::new(false));
            let thread = {
                let go = go.clone();
                std::thread::spawn(move || {
                    while !go.load(Ordering::Acquire) {
                        std::hint::spin_loop();
                    }
                    std::thread::sleep(delay);
                    first_use();
                })
            };
            go.store(true, Ordering::Release);
            let grandchild = fork_with(move || {
                in_grandchild();
                0
            });
            let status = wait_for(grandchild, Duration::from_secs(3));
            thread.join().unwrap();
            match status {
                None => 2,
                s if exited_ok(s) => 0,
                _ => 3,
            }
        });
        let status = wait_for(pid, Duration::from_secs(30));
        let outcome = match status {
            Some(s) if libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 2 => {
                "grandchild HUNG".to_owned()
            }
            other => describe(other),
        };
        outcomes.push(format!(
            "trial {trial} (thread starts {delay:?} in): {outcome}"
        ));
    }
    outcomes
}

/// Finding 1a: `MmapAllocator::default()` hangs forever in a fork child when the fork came
/// while another thread was initialising it.
///
/// `DEFAULT.get_or_init(|| MmapAllocator::new(..))` (allocator.rs) runs `fork::register`
/// inside the `OnceLock`'s initialiser; `register` waits for the registry lock, which the
/// prepare handler holds for the whole fork. The child is made while the `OnceLock` is
/// RUNNING; no thread of the child will ever finish it, so the child's first
/// `MmapAllocator::default()` waits forever. The prepare handler widens a window that would
/// otherwise be nanoseconds into the whole prepare time.
#[test]
fn child_forked_during_default_allocator_init_does_not_hang() {
    const NAME: &str = "child_forked_during_default_allocator_init_does_not_hang";
    if !in_child(NAME, "body") {
        return;
    }
    let (_allocators, took) = slow_prepare(20_000);
    eprintln!("prepare with 20000 allocators: {took:?}");
    // Control: the same race with an allocator that is not behind a `OnceLock` on the other
    // thread (its `register` waits for the registry just the same): the grandchild's
    // `default()` returns. So the hang below is the `OnceLock` left RUNNING.
    let control = race_first_use_with_fork(
        2,
        took,
        || Box::new(|| drop(MmapAllocator::builder().creator(Memfd).build().unwrap())),
        || drop(MmapAllocator::default()),
    );
    eprintln!("control: {control:#?}");
    assert!(
        control.iter().all(|o| o.ends_with("exited 0")),
        "{control:#?}"
    );
    let outcomes = race_first_use_with_fork(
        3,
        took,
        || Box::new(|| drop(MmapAllocator::default())),
        || drop(MmapAllocator::default()),
    );
    eprintln!("{outcomes:#?}");
    assert!(
        outcomes.iter().all(|o| o.ends_with("exited 0")),
        "{outcomes:#?}"
    );
}

/// Finding 1b: the same with the release queue's one-time registration
/// (`release::release_in_background`, `REGISTER.call_once(|| fork::register(..))`): a child
/// forked while another thread makes the process's first background release hangs forever at
/// its own first background release.
#[test]
fn child_forked_during_first_background_release_does_not_hang() {
    const NAME: &str = "child_forked_during_first_background_release_does_not_hang";
    if !in_child(NAME, "body") {
        return;
    }
    let (_allocators, took) = slow_prepare(20_000);
    eprintln!("prepare with 20000 allocators: {took:?}");
    fn background() -> MmapAllocator {
        MmapAllocator::builder()
            .creator(Memfd)
            .release_in_background(true)
            .reuse_bytes(0)
            .build()
            .expect("build")
    }
    fn release_one(alloc: MmapAllocator) {
        let mut v = MmapVec::<u8>::new_in(alloc);
        v.resize(10_000, 1);
        drop(v);
    }
    // The allocator is built before the race (building one waits for the prepare handler
    // outside any `Once`); only the first background release races with the fork.
    let outcomes = race_first_use_with_fork(
        3,
        took,
        || {
            let alloc = background();
            Box::new(move || release_one(alloc))
        },
        || release_one(background()),
    );
    eprintln!("{outcomes:#?}");
    assert!(
        outcomes.iter().all(|o| o.ends_with("exited 0")),
        "{outcomes:#?}"
    );
}

/// Fills `base/mmapvec-<uid>` (made `0700`) with `n` fresh, empty, UUID-named files: every
/// preparation of that folder (`remove_stale`, under the creator's state lock) reads them all
/// and keeps them (they are young), so it takes a while.
fn crowded_segment_folder(base: &Path, n: usize) {
    let folder = base.join(format!("mmapvec-{}", euid()));
    fs::DirBuilder::new().mode(0o700).create(&folder).unwrap();
    for i in 0..n {
        let name = format!("{:08x}-0000-4000-8000-{:012x}", i, i);
        File::create(folder.join(name)).unwrap();
    }
}

/// In a fresh process: a thread makes the first allocation of `alloc` (its creator prepares
/// the crowded folder, `scan` long), and a quarter of the way in this thread forks; the
/// grandchild allocates with `alloc` and must be done within 3 s.
fn fork_during_first_preparation(alloc: MmapAllocator, scan: Duration) -> Option<i32> {
    let first = alloc.clone();
    let thread = std::thread::spawn(move || {
        let mut v = MmapVec::<u8>::new_in(first);
        v.resize(10_000, 1);
    });
    std::thread::sleep(scan / 4);
    let grandchild = fork_with(move || {
        let mut v = MmapVec::<u8>::new_in(alloc);
        v.resize(10_000, 2);
        0
    });
    let status = wait_for(grandchild, Duration::from_secs(3));
    thread.join().unwrap();
    status
}

/// Finding 2: a `DirCreator` given with `Builder::creator` is not fork-safe.
///
/// The fork handlers take the `DirCreator`'s state lock only when the allocator made the
/// creator itself (`Inner::dir_creator`, set in `MmapAllocator::new` for `Err(DirCreator)`).
/// `DirCreator` is public, implements `SegmentCreator`, and `builder().creator(DirCreator::new(
/// dir))` is the way to get a lazily prepared folder; its `State` mutex is then held across
/// the whole folder preparation (`DirCreator::prepared` -> `prepare` -> `remove_stale`) with no
/// fork handler waiting for it. A child forked meanwhile inherits the mutex locked by a thread
/// it does not have: its first allocation waits forever.
///
/// Control: the default allocator (lazily prepared too, with `TMPDIR` at the same kind of
/// crowded folder) makes the fork wait for the preparation, and its child allocates.
#[test]
fn dir_creator_given_to_builder_is_held_across_fork() {
    const NAME: &str = "dir_creator_given_to_builder_is_held_across_fork";
    if !in_child(NAME, "body") {
        return;
    }
    const FILES: usize = 30_000;
    let timing = TestDir::fast("crowded-timing");
    crowded_segment_folder(timing.path(), FILES);
    let start = Instant::now();
    DirCreator::open(timing.path()).unwrap();
    let scan = start.elapsed();
    eprintln!("preparing a folder of {FILES} files: {scan:?}");

    // Control: the crate's own creator (the default allocator, prepared at first use).
    let control = TestDir::fast("crowded-default");
    crowded_segment_folder(control.path(), FILES);
    // SAFETY: no other thread runs in this process yet (`in_child`, before any spawn).
    unsafe { std::env::set_var("TMPDIR", control.path()) };
    let status = fork_during_first_preparation(MmapAllocator::default(), scan);
    eprintln!("default allocator's child: {}", describe(status));
    assert!(exited_ok(status), "control: {}", describe(status));

    let crowded = TestDir::fast("crowded-given");
    crowded_segment_folder(crowded.path(), FILES);
    let alloc = MmapAllocator::builder()
        .creator(DirCreator::new(crowded.path()))
        .reuse_bytes(0)
        .build()
        .unwrap();
    let status = fork_during_first_preparation(alloc, scan);
    eprintln!(
        "DirCreator given to the builder, child: {}",
        describe(status)
    );
    assert!(
        exited_ok(status),
        "the child of a fork made while a given DirCreator prepared its folder: {}",
        describe(status)
    );
}

/// Finding 3: the start-up clean-up (`creator.rs`, `remove_stale`, run by every preparation of
/// the folder, including the re-preparation after a removal) works through paths, not through
/// the handle just checked: `fs::read_dir(folder)`, `symlink_metadata`, `open_private_dir` of
/// `session-*` and `fs::remove_file(folder/name)` each resolve `base/mmapvec-<uid>` again. If
/// that name is swapped for a symlink after `open_private_dir` checked it, the clean-up reads
/// and deletes in the link's target: every UUID-named file older than 60 s, and the content of
/// every unlocked `session-*` folder.
///
/// Here a thread swaps the checked folder with a symlink to a victim folder
/// (`renameat2(RENAME_EXCHANGE)`), while this thread prepares a creator on the base again and
/// again (`DirCreator::open`, as `build()` and the re-preparation after a removal do). Each
/// preparation that succeeded checked the real folder (a link is refused), so whatever it
/// removed in the victim folder went through a re-resolved path.
#[test]
fn stale_file_cleanup_never_follows_a_swapped_folder_path() {
    let base = TestDir::new("swap-base");
    let victim = TestDir::new("swap-victim");
    let folder = base.path().join(format!("mmapvec-{}", euid()));
    fs::DirBuilder::new().mode(0o700).create(&folder).unwrap();
    let link = base.path().join("swap");
    symlink(victim.path(), &link).unwrap();
    // The victim's files: UUID-named, two minutes old (what a clean-up takes for stale).
    let old = std::time::SystemTime::now() - Duration::from_secs(120);
    let victims: Vec<_> = (0..50)
        .map(|i| {
            let path = victim
                .path()
                .join(format!("{:08x}-1111-4111-8111-{:012x}", i, i));
            let file = File::create(&path).unwrap();
            file.set_modified(old).unwrap();
            path
        })
        .collect();

    let stop = Arc::new(AtomicBool::new(false));
    let swapper = {
        let stop = stop.clone();
        let base = CString::new(base.path().as_os_str().as_bytes()).unwrap();
        let a = CString::new(format!("mmapvec-{}", euid())).unwrap();
        std::thread::spawn(move || {
            // SAFETY: `base` is a valid path; the descriptor is closed below.
            let dirfd = unsafe { libc::open(base.as_ptr(), libc::O_RDONLY | libc::O_DIRECTORY) };
            assert!(dirfd >= 0);
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // SAFETY: valid descriptor and C strings.
                let ret = unsafe {
                    libc::renameat2(
                        dirfd,
                        a.as_ptr(),
                        dirfd,
                        c"swap".as_ptr(),
                        libc::RENAME_EXCHANGE,
                    )
                };
                assert_eq!(ret, 0, "renameat2: {}", io::Error::last_os_error());
                swaps += 1;
            }
            // Leave the real folder at its name.
            if swaps % 2 == 1 {
                // SAFETY: as above.
                unsafe {
                    libc::renameat2(
                        dirfd,
                        a.as_ptr(),
                        dirfd,
                        c"swap".as_ptr(),
                        libc::RENAME_EXCHANGE,
                    )
                };
            }
            // SAFETY: ours.
            unsafe { libc::close(dirfd) };
        })
    };
    let start = Instant::now();
    let (mut prepared, mut refused) = (0, 0);
    while start.elapsed() < Duration::from_secs(10) && victims.iter().all(|p| p.exists()) {
        match DirCreator::open(base.path()) {
            Ok(_) => prepared += 1,
            Err(_) => refused += 1,
        }
    }
    stop.store(true, Ordering::Relaxed);
    swapper.join().unwrap();
    let removed = victims.iter().filter(|p| !p.exists()).count();
    eprintln!(
        "{prepared} preparations passed the checks, {refused} refused the link, in {:?}; \
         victim files removed: {removed}",
        start.elapsed()
    );
    assert_eq!(
        removed, 0,
        "the clean-up removed files in the symlink's target (a folder it never checked)"
    );
}

/// Finding 4: `fork` from a thread-local destructor aborts the process.
///
/// The prepare handler keeps what it locked in a `thread_local!` (`fork::HELD`), which has a
/// destructor. Once that destructor has run on a thread (thread exit), `HELD.with` panics, and
/// the panic cannot unwind out of the `extern "C"` handler: the process aborts, with every
/// allocator lock taken. A thread-local whose destructor forks (for instance to hand a
/// finished job to a helper process) and that was touched before the thread's first fork is
/// destroyed after `HELD` (destructors run newest first), so its fork aborts.
#[test]
fn fork_from_a_thread_local_destructor_works() {
    const NAME: &str = "fork_from_a_thread_local_destructor_works";
    if !in_child(NAME, "body") {
        return;
    }
    struct ForkOnDrop;
    impl Drop for ForkOnDrop {
        fn drop(&mut self) {
            let pid = fork_with(|| 0);
            assert!(exited_ok(wait_for(pid, Duration::from_secs(5))));
            eprintln!("fork from the thread-local destructor: fine");
        }
    }
    thread_local! {
        static FORK_ON_DROP: std::cell::RefCell<Option<ForkOnDrop>> =
            const { std::cell::RefCell::new(None) };
    }
    let _alloc = MmapAllocator::builder().creator(Memfd).build().unwrap();
    let pid = fork_with(|| {
        std::thread::spawn(|| {
            FORK_ON_DROP.with(|f| *f.borrow_mut() = Some(ForkOnDrop));
            // This thread's first fork: the handler's thread-local is made now, after ours.
            let pid = fork_with(|| 0);
            assert!(exited_ok(wait_for(pid, Duration::from_secs(5))));
        })
        .join()
        .unwrap();
        0
    });
    let status = wait_for(pid, Duration::from_secs(10));
    assert!(
        exited_ok(status),
        "the process that forked from a thread-local destructor: {}",
        describe(status)
    );
}

/// Finding 5: with `dont_fork(true)`, a child that *shrinks* an inherited vector dies of
/// `SIGSEGV`.
///
/// The fix for hole 3 makes every shrink of an inherited block copy into a new segment
/// (`Inner::shrink` -> `move_inherited`), so the child now reads the inherited view, which under
/// `dont_fork` is an inaccessible reservation. Before the fix an aligned shrink kept the block
/// and the child lived. RELIABILITY.md ("What a forked child sees") tells `dont_fork` users the
/// child may drop inherited vectors and that *growing* one crashes; a shrink (`shrink_to_fit`,
/// `into_boxed_slice`, a `HashMap` shrinking on its own) is not mentioned, and the copy reads
/// the kept elements from the hole.
#[test]
fn dont_fork_child_may_shrink_and_drop_an_inherited_vector() {
    const NAME: &str = "dont_fork_child_may_shrink_and_drop_an_inherited_vector";
    if !in_child(NAME, "body") {
        return;
    }
    support::no_core_dumps();
    let dir = TestDir::new("dont-fork-shrink");
    let alloc = MmapAllocator::builder()
        .dir(dir.path())
        .dont_fork(true)
        .build()
        .unwrap();
    let mut v = MmapVec::<u64>::new_in(alloc.clone());
    v.extend(0..100_000);
    let pid = fork_with(move || {
        // The inherited elements are not mapped in this child: the shrink keeps the block as it
        // is (copying them would fault), and dropping it is fine. (Growing it would need them:
        // that is a SIGSEGV, as any other use of them, and as documented.)
        v.truncate(10);
        v.shrink_to_fit();
        drop(v);
        0
    });
    let status = wait_for(pid, Duration::from_secs(10));
    assert!(
        exited_ok(status),
        "a dont_fork child that shrank an inherited vector: {}",
        describe(status)
    );
}

/// Finding 6: a fork child keeps every segment its parent had kept for reuse (and every one
/// waiting in the parent's release queue) mapped, with its descriptor open, for its whole life.
///
/// `ReuseCache::state` (reuse.rs) `mem::forget`s the inherited kept segments instead of
/// dropping them (the module doc says the child *drops* them). Dropping would be safe (an
/// inherited segment never removes or resizes the parent's file); forgetting leaks up to 32
/// descriptors and 256 MiB of mappings of the parent's files per allocator in every child, counts
/// the descriptors against the child's descriptor budget (`HELD_DESCRIPTORS`) forever, and
/// keeps the parent's later data (written into those reused files) visible in the child's
/// address space.
#[test]
fn fork_child_lets_go_of_the_parents_kept_segments() {
    const NAME: &str = "fork_child_lets_go_of_the_parents_kept_segments";
    if !in_child(NAME, "body") {
        return;
    }
    let dir = TestDir::new("kept-leak");
    let folder = dir.path().join(format!("mmapvec-{}", euid()));
    let alloc = MmapAllocator::builder().dir(dir.path()).build().unwrap();
    let vectors: Vec<MmapVec<u8>> = (0..10)
        .map(|i| {
            let mut v = MmapVec::<u8>::new_in(alloc.clone());
            // Past the small-block tier: each a segment.
            v.resize((i + 1) * 300_000, 1);
            v
        })
        .collect();
    drop(vectors);
    assert_eq!(alloc.stats().kept_segments, 10);
    let pid = fork_with(move || {
        // The child's first use of the cache lets go of the inherited kept segments.
        let kept = alloc.stats().kept_segments;
        let (fds, maps) = (
            support::descriptors_under(&folder),
            support::mappings_under(&folder),
        );
        eprintln!("child: kept {kept}, descriptors {fds}, mappings {maps} of the parent's files");
        if kept == 0 && fds == 0 && maps == 0 {
            0
        } else {
            1
        }
    });
    let status = wait_for(pid, Duration::from_secs(10));
    assert!(
        exited_ok(status),
        "child still holds the parent's kept segments: {}",
        describe(status)
    );
}

/// Finding 7: an allocation from a `pthread_atfork` child (or parent) handler that was
/// registered before mmapvec's deadlocks: parent and child handlers run in registration order,
/// so such a handler runs while mmapvec's prepare handler still holds every allocator's locks.
/// That is documented (RELIABILITY.md), not fixed: mmapvec installs its handlers when the first
/// allocator is made. A handler registered *after* that (the usual case: a library that sets
/// itself up after the allocator exists) runs after mmapvec's handlers released the locks, and
/// may allocate. This test registers its handler after the first allocator.
#[test]
fn allocation_in_a_later_registered_fork_handler_works() {
    const NAME: &str = "allocation_in_a_later_registered_fork_handler_works";
    if !in_child(NAME, "body") {
        return;
    }
    static ALLOC: std::sync::OnceLock<MmapAllocator> = std::sync::OnceLock::new();
    extern "C" fn after_fork_in_child() {
        if let Some(alloc) = ALLOC.get() {
            let v = MmapVec::<u8>::with_capacity_in(10_000, alloc.clone());
            drop(v);
        }
    }
    ALLOC
        .set(MmapAllocator::builder().creator(Memfd).build().unwrap())
        .unwrap();
    // SAFETY: registers a plain function that lives for the whole program.
    let registered = unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
    assert_eq!(registered, 0);
    let pid = fork_with(|| 0);
    let status = wait_for(pid, Duration::from_secs(3));
    assert!(
        exited_ok(status),
        "a child whose earlier-registered fork handler allocates: {}",
        describe(status)
    );
}
