//! The store's first layer: create, reopen in another process, one writer, the dirty flag,
//! the fixed address range.

use super::*;

/// A fresh path for a store under the temp folder (the store makes the folder itself).
struct TestPath(PathBuf);

impl TestPath {
    fn new(label: &str) -> TestPath {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let path =
            std::env::temp_dir().join(format!("mmapvec-store-{label}-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&path);
        TestPath(path)
    }
}

impl Drop for TestPath {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Runs `child` in a forked child process and returns its exit code: 0 if it returned, 1 if
/// it panicked. `_exit` ends it (no destructors of the parent's state run there), unless
/// `child` ends it itself.
fn in_child(child: impl FnOnce()) -> i32 {
    // SAFETY: the child runs `child` and `_exit`s without returning into the test harness;
    // other test threads do not exist in the child, and `child` takes no lock they held.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).is_ok();
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(i32::from(!ok)) };
    }
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is writable.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status),
        "the child died: status {status:#x}"
    );
    libc::WEXITSTATUS(status)
}

const LEN: usize = 64 << 20;

/// One store test at a time: a forked child inherits every open descriptor of the process,
/// store locks included (a `flock` belongs to the open file, which the child shares), so a
/// test's child would hold the locks of the stores other tests have open while it lives.
pub(super) fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// The environment variables that tell a test it runs as a fresh process of its own (see
/// [`in_new_process`]): its role and the store's path.
const ROLE: &str = "MMAPVEC_STORE_TEST_ROLE";
const PATH: &str = "MMAPVEC_STORE_TEST_PATH";

/// Runs the test `name` again in a new process (this test binary, started afresh: an address
/// space of its own, as a program that reopens a store has), with `role` and the store's
/// `path`; asserts that it passed.
fn in_new_process(name: &str, role: &str, path: &Path) {
    let output = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
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

/// The role this process plays in its test, and the store's path, if it was started by
/// [`in_new_process`].
fn role() -> Option<(String, PathBuf)> {
    Some((std::env::var(ROLE).ok()?, std::env::var_os(PATH)?.into()))
}

#[test]
fn a_store_made_in_one_process_reopens_in_another_at_the_same_address() {
    let _serial = serial();
    const NAME: &str =
        "store::tests::a_store_made_in_one_process_reopens_in_another_at_the_same_address";
    if let Some((role, path)) = role() {
        let (base, len): (usize, usize) = {
            let mut parts = role.split(':').map(|p| p.parse().unwrap());
            (parts.next().unwrap(), parts.next().unwrap())
        };
        let store = Store::open_with(&path, Access::Write).unwrap();
        assert_eq!(store.range(), (base, len));
        assert_eq!(dirty_on_disk(&path), 1, "open for writing marks it open");
        // Commits: the one that made it, its close.
        assert_eq!(store.flushes(), 2);
        assert_eq!(store.recovered(), None, "closed by its last writer");
        store.close().unwrap();
        return;
    }
    let path = TestPath::new("reopen");
    let store = Store::create_with_range(&path.0, LEN).unwrap();
    let range = store.range();
    assert_eq!(range.1, LEN);
    assert!(range.0.is_multiple_of(CHUNK));
    store.close().unwrap();
    assert_eq!(dirty_on_disk(&path.0), 0, "a clean close");
    // Unmapped by the close: the whole range can be reserved in place again. (Checked with
    // `reserve_at`, not `is_mapped`: msync on unmapped pages upsets valgrind.)
    let at = NonNull::new(range.0 as *mut u8).unwrap();
    sys::reserve_at(at, LEN).expect("the closed store's range is free");
    // SAFETY: reserved just above.
    unsafe { sys::unmap(at, LEN) }.unwrap();

    in_new_process(NAME, &format!("{}:{}", range.0, range.1), &path.0);
    assert_eq!(dirty_on_disk(&path.0), 0);
    let code = in_child(|| {
        // A fork child of a process without the store open may open it too.
        let store = Store::open_with(&path.0, Access::Read).unwrap();
        assert_eq!((store.range(), store.flushes()), (range, 3));
    });
    assert_eq!(code, 0);
}

#[test]
fn one_writer_or_many_readers() {
    let _serial = serial();
    const NAME: &str = "store::tests::one_writer_or_many_readers";
    if let Some((role, path)) = role() {
        match role.as_str() {
            "refused" => {
                for access in [Access::Write, Access::Read] {
                    assert!(matches!(
                        Store::open_with(&path, access),
                        Err(StoreError::Locked)
                    ));
                }
            }
            "reader" => {
                let _reader = Store::open_with(&path, Access::Read).unwrap();
                let result = Store::open_with(&path, Access::Read);
                assert!(matches!(result, Err(StoreError::OpenHere)), "{result:?}");
                let result = Store::open_with(&path, Access::Write);
                assert!(matches!(result, Err(StoreError::Locked)), "{result:?}");
            }
            other => panic!("unknown role {other}"),
        }
        return;
    }
    let path = TestPath::new("lock");
    let writer = Store::create_with_range(&path.0, LEN).unwrap();
    let result = Store::open_with(&path.0, Access::Write);
    assert!(matches!(result, Err(StoreError::Locked)), "{result:?}");
    // Another process sees the same.
    in_new_process(NAME, "refused", &path.0);
    drop(writer);
    // A reader here and one in another process at once (each maps the range in its own
    // address space); a writer is refused while they have it.
    let reader = Store::open_with(&path.0, Access::Read).unwrap();
    in_new_process(NAME, "reader", &path.0);
    let result = Store::open_with(&path.0, Access::Write);
    assert!(matches!(result, Err(StoreError::Locked)), "{result:?}");
    drop(reader);
    Store::open_with(&path.0, Access::Write).unwrap();
}

#[test]
fn a_writer_that_died_leaves_its_last_commit() {
    let _serial = serial();
    let path = TestPath::new("dirty");
    Store::create_with_range(&path.0, LEN)
        .unwrap()
        .close()
        .unwrap();
    let code = in_child(|| {
        let store = Store::open_with(&path.0, Access::Write).unwrap();
        store.set_root("x", 1u64).unwrap();
        store.commit().unwrap();
        *store.root_mut::<u64>("x").unwrap() = 2;
        store.set_root("y", 3u64).unwrap();
        std::mem::forget(store);
        // SAFETY: ends the child at once, as a crash would (no destructor runs).
        unsafe { libc::_exit(0) };
    });
    assert_eq!(code, 0);
    // A reader first: it needs no writer's help.
    let store = Store::open_with(&path.0, Access::Read).unwrap();
    assert_eq!(*store.root::<u64>("x").unwrap(), 1);
    assert!(matches!(store.root::<u64>("y"), Err(StoreError::NoRoot(_))));
    drop(store);
    let store = Store::open_with(&path.0, Access::Write).unwrap();
    assert_eq!(*store.root::<u64>("x").unwrap(), 1);
    let recovered = store.recovered().expect("its writer did not close");
    // Commits: the store's first, its close, the child's.
    assert_eq!(recovered.last_commit, 3);
    store.close().unwrap();
    let store = Store::open_with(&path.0, Access::Write).unwrap();
    assert_eq!(store.recovered(), None);
    store.close().unwrap();
}

#[test]
fn a_fork_childs_copy_does_not_mark_the_store_clean() {
    let _serial = serial();
    let path = TestPath::new("fork");
    let store = Store::create_with_range(&path.0, LEN).unwrap();
    let code = in_child(|| {
        // The child's copy of the handle, dropped: the parent still has the store open.
        // SAFETY: fork copied the handle into the child; this bitwise copy is the only one the
        // child uses or drops (the child `_exit`s after this closure, dropping nothing else).
        drop(unsafe { std::ptr::read(&store) });
    });
    assert_eq!(code, 0);
    assert_eq!(
        dirty_on_disk(&path.0),
        1,
        "the child marked its parent's store clean"
    );
    store.close().unwrap();
    assert_eq!(dirty_on_disk(&path.0), 0);
}

#[test]
fn a_taken_range_is_an_error_not_a_mapping_over_it() {
    let _serial = serial();
    let path = TestPath::new("taken");
    let store = Store::create_with_range(&path.0, LEN).unwrap();
    let (base, len) = store.range();
    store.close().unwrap();
    // Something of this process's occupies one page in the middle of the range.
    let page = sys::page_size();
    let at = NonNull::new((base + len / 2) as *mut u8).unwrap();
    sys::reserve_at(at, page).expect("the range is free after the close");
    match Store::open_with(&path.0, Access::Write) {
        Err(StoreError::AddressTaken { base: b, len: l }) => assert_eq!((b, l), (base, len)),
        other => panic!("expected AddressTaken, got {other:?}"),
    }
    assert!(
        sys::reserve_at(at, page).is_err(),
        "the page in the range was replaced"
    );
    assert_eq!(dirty_on_disk(&path.0), 0, "a refused open writes nothing");
    // SAFETY: our reservation.
    unsafe { sys::unmap(at, page) }.unwrap();
    Store::open_with(&path.0, Access::Write).unwrap();
}

#[test]
fn bad_folders_and_headers_are_errors() {
    let _serial = serial();
    let path = TestPath::new("bad");
    let result = Store::open_with(&path.0, Access::Read);
    assert!(matches!(result, Err(StoreError::NotAStore)), "{result:?}");
    Store::create_with_range(&path.0, LEN)
        .unwrap()
        .close()
        .unwrap();
    let result = Store::create_with_range(&path.0, LEN);
    assert!(matches!(result, Err(StoreError::Exists(_))), "{result:?}");
    let header = path.0.join(HEADER);
    let good = fs::read(&header).unwrap();
    let mut bad = good.clone();
    bad[0] ^= 1;
    fs::write(&header, &bad).unwrap();
    let result = Store::open_with(&path.0, Access::Read);
    assert!(matches!(result, Err(StoreError::NotAStore)), "{result:?}");
    let mut newer = good.clone();
    newer[8..12].copy_from_slice(&(VERSION + 1).to_ne_bytes());
    fs::write(&header, &newer).unwrap();
    let result = Store::open_with(&path.0, Access::Read);
    assert!(
        matches!(result, Err(StoreError::Version(v)) if v == VERSION + 1),
        "{result:?}"
    );
    fs::write(&header, &good[..20]).unwrap();
    let result = Store::open_with(&path.0, Access::Read);
    assert!(matches!(result, Err(StoreError::NotAStore)), "{result:?}");
    fs::write(&header, &good).unwrap();
    Store::open_with(&path.0, Access::Read).unwrap();
}

/// The fault seam (`sys::io_point`): each write, sync, rename, removal and folder of `close`,
/// `flush`, `snapshot` and `recover` fails in turn (once, and from there on), and the store
/// must then reopen in a state of the model: the last clean state (A) or the new one (B), and
/// after a crash a `recover` that gives exactly A, the snapshot. Never `NotAStore`, never a
/// mix. Returns the number of injection points tested.
mod io_faults {
    use super::*;
    use crate::store::alloc::StoreVec;
    use crate::sys::faults;

    /// A: `v` = 0..100, `big` = 0..2^17 (a segment). B: `v` = 0..200, `big[0]` = 7, and a new
    /// root `new` (a segment of its own).
    fn state(store: &Store) -> char {
        let v = store.root::<StoreVec<u64>>("v").unwrap();
        let big = store.root::<StoreVec<u64>>("big").unwrap();
        let a = v.iter().copied().eq(0..100) && big[0] == 0;
        let b = v.iter().copied().eq(0..200) && big[0] == 7;
        let new = store.root::<StoreVec<u64>>("new");
        match (a, b, new) {
            (true, false, Err(StoreError::NoRoot(_))) => 'A',
            (false, true, Ok(n)) if n.iter().copied().eq(0..(1 << 16)) => 'B',
            (a, b, new) => panic!(
                "neither A nor B: a {a}, b {b}, new {:?}, v {:?}, big[0] {}",
                new.map(|n| n.len()),
                &v[..v.len().min(3)],
                big[0]
            ),
        }
    }

    fn make_a(path: &Path) {
        let store = Store::create_with_range(path, LEN).unwrap();
        let mut v = StoreVec::new_in(store.allocator());
        v.extend(0..100u64);
        store.set_root("v", v).unwrap();
        let mut big = StoreVec::new_in(store.allocator());
        big.extend(0..(1u64 << 17));
        store.set_root("big", big).unwrap();
        store.snapshot().unwrap();
        store.close().unwrap();
    }

    fn change_to_b(store: &Store) {
        store
            .root_mut::<StoreVec<u64>>("v")
            .unwrap()
            .extend(100..200);
        store.root_mut::<StoreVec<u64>>("big").unwrap()[0] = 7;
        let mut new = StoreVec::new_in(store.allocator());
        new.extend(0..(1u64 << 16));
        store.set_root("new", new).unwrap();
    }

    /// What a reopen finds: a store with commits opens at its last commit, never dirty.
    fn reopened(path: &Path) -> char {
        let store = Store::open(path).unwrap_or_else(|e| panic!("reopen: {e:?}"));
        let found = state(&store);
        store.close().unwrap();
        found
    }

    /// Runs `op` on a store in state A, changed to B, with point `fail_at` failing (and the
    /// later ones too if `sticky`), in a forked child; `op` says whether the process then
    /// ends at once (a crash) and whether the operation returned `Ok`. Returns the number of
    /// points `op` passed, and that `Ok`.
    fn run(
        path: &Path,
        fail_at: Option<u64>,
        sticky: bool,
        op: fn(Store) -> (bool, bool),
    ) -> (u64, Outcome) {
        let _ = fs::remove_dir_all(path);
        make_a(path);
        // The child reports through a file.
        let report = path.with_extension("count");
        let status = in_child(|| {
            let store = Store::open(path).unwrap();
            change_to_b(&store);
            faults::arm(fail_at, sticky);
            let (crash, ok) = op(store);
            let n = faults::count();
            faults::disarm();
            // "Ok", or the name of the point that failed first.
            let ok = match (ok, faults::first_failure()) {
                (true, _) => "Ok",
                (false, failed) => failed.unwrap_or("?"),
            };
            fs::write(&report, format!("{n} {ok}")).unwrap();
            if crash {
                // SAFETY: ends the child at once, as a crash would.
                unsafe { libc::_exit(0) };
            }
        });
        assert_eq!(status, 0, "the child panicked (fail_at {fail_at:?})");
        let text = fs::read_to_string(&report).unwrap();
        let _ = fs::remove_file(&report);
        let (n, ok) = text.split_once(' ').unwrap();
        (n.parse().unwrap(), Outcome(ok.to_string()))
    }

    /// What an operation returned: `Ok`, or the name of the point that failed first.
    #[derive(Debug)]
    struct Outcome(String);

    impl Outcome {
        fn ok(&self) -> bool {
            self.0 == "Ok"
        }

        /// A failed sync of the commit record: the record was written, and whether it
        /// reached the disk is not known (the log cut back, or not: a second failure). The
        /// store is at the last commit or at this one.
        fn unknown(&self) -> bool {
            self.0 == "sync the commit record" || self.0 == "cut the log back"
        }
    }

    /// Whether the points after the first failing one fail too (for the operations' checks).
    static STICKY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

    /// `op` failing at each of its points, once and from there on; `expect(ok, found)` says
    /// whether the reopened state `found` is right after `op` returned `ok`.
    fn every_point(
        label: &str,
        op: fn(Store) -> (bool, bool),
        expect: fn(&Outcome, char) -> bool,
    ) -> u64 {
        let _serial = serial();
        let path = TestPath::new(label);
        let (points, ok) = run(&path.0, None, false, op);
        assert!(points > 0 && ok.ok());
        assert_eq!(reopened(&path.0), 'B');
        for sticky in [false, true] {
            STICKY.store(sticky, Ordering::Relaxed);
            for at in 0..points {
                let (_, ok) = run(&path.0, Some(at), sticky, op);
                let found = reopened(&path.0);
                assert!(
                    expect(&ok, found),
                    "{label} failing at {at} (sticky {sticky}): returned {ok:?}, found {found}"
                );
            }
        }
        points
    }

    /// `commit` failing at each point, then a crash: the store is exactly B if the commit
    /// returned `Ok`, exactly A if it did not.
    #[test]
    fn commit_fails_at_each_point() {
        let points = every_point(
            "io-commit",
            |store| {
                let ok = store.commit().is_ok();
                std::mem::forget(store);
                (true, ok)
            },
            |ok, found| match (ok.ok(), found) {
                (true, found) => found == 'B',
                (false, 'A') => true,
                (false, found) => ok.unknown() && found == 'B',
            },
        );
        println!("commit: {points} injection points, each failing once and from there on");
    }

    /// `close` failing at each point, then (if it failed) a crash on the odd points or a
    /// second close: B after an `Ok`; A or B after a crash (the close's commit may have
    /// passed its commit point before the failure).
    #[test]
    fn close_fails_at_each_point() {
        let points = every_point(
            "io-close",
            |store| match store.close() {
                Ok(()) => (false, true),
                Err(failed) => {
                    if faults::count().is_multiple_of(2) {
                        std::mem::forget(failed);
                        (true, false)
                    } else {
                        faults::disarm();
                        (false, failed.into_store().close().is_ok())
                    }
                }
            },
            |ok, found| found == 'B' || (!ok.ok() && found == 'A'),
        );
        println!("close: {points} injection points, each failing once and from there on");
    }

    /// `snapshot` failing at each point, then a clean close: B, whatever the snapshot did;
    /// and a failed snapshot leaves nothing (no `partial-N`, no numbered folder its count
    /// does not name).
    #[test]
    fn snapshot_fails_at_each_point() {
        let points = every_point(
            "io-snapshot",
            |store| {
                let taken = store.snapshot();
                faults::disarm();
                let folder = store.path().join("snapshots");
                let mut names: Vec<String> = fs::read_dir(&folder)
                    .unwrap()
                    .map(|e| e.unwrap().file_name().into_string().unwrap())
                    .collect();
                names.sort();
                // An older snapshot whose removal failed stays until the next snapshot; so
                // does a failed one whose removal failed too (every operation failing from
                // there on): the next snapshot removes them.
                let expected = if taken.is_ok() { "2" } else { "1" };
                if STICKY.load(Ordering::Relaxed) {
                    assert!(
                        names
                            .iter()
                            .all(|n| ["1", "2", "partial-2"].contains(&n.as_str())),
                        "{names:?}"
                    );
                } else {
                    assert_eq!(
                        names.last().map(String::as_str),
                        Some(expected),
                        "{taken:?}"
                    );
                    assert!(names.iter().all(|n| n == "1" || n == "2"), "{names:?}");
                }
                assert_eq!(store.snapshots().to_string(), expected);
                let ok = taken.is_ok();
                store.close().unwrap();
                (false, ok)
            },
            |_, found| found == 'B',
        );
        println!("snapshot: {points} injection points");
    }

    /// A power loss at each point of `op` (every write not synced is undone, then the
    /// process ends): the store reopens exactly at A if the loss struck before the commit
    /// record was synced, exactly at B after. Then again with torn writes (a random half of
    /// the writes not synced reached the disk: 24 draws a point while the commit's records
    /// are written, 2 elsewhere): A or B before the sync, B after, never a mix (which a
    /// commit record that did not cover its records would let through). Returns the points.
    fn power_loss_at_each_point(label: &str, op: fn(Store)) -> usize {
        let _serial = serial();
        let path = TestPath::new(label);
        let trace_file = path.0.with_extension("trace");
        let child = |at: Option<u64>, seed: Option<u64>| {
            let _ = fs::remove_dir_all(&path.0);
            make_a(&path.0);
            let status = in_child(|| {
                let store = Store::open(&path.0).unwrap();
                change_to_b(&store);
                match (at, seed) {
                    (Some(at), Some(seed)) => faults::torn_power_loss_at(at, seed),
                    _ => faults::power_loss_at(at),
                }
                op(store);
                fs::write(&trace_file, faults::trace().join("\n")).unwrap();
            });
            assert_eq!(status, 0, "the child panicked (power loss at {at:?})");
        };
        child(None, None);
        let trace = fs::read_to_string(&trace_file).unwrap();
        let _ = fs::remove_file(&trace_file);
        let trace: Vec<&str> = trace.lines().collect();
        let commit_point = trace
            .iter()
            .position(|&op| op == "sync the commit record")
            .expect("a commit");
        assert_eq!(reopened(&path.0), 'B');
        let mut torn_b = 0;
        // Many torn losses where the commit's records are written, a few elsewhere.
        let first_write = trace
            .iter()
            .position(|&op| op == "write the log")
            .expect("a log write");
        for (at, op) in trace.iter().enumerate() {
            let seeds = if (first_write..=commit_point).contains(&at) {
                24
            } else {
                2
            };
            for seed in 1..=seeds {
                child(Some(at as u64), Some(seed * 0x9e37_79b9 + at as u64));
                let found = reopened(&path.0);
                assert!(
                    found == 'B' || at <= commit_point,
                    "{label}: torn power loss at point {at} ({op}): {found}"
                );
                torn_b += u32::from(found == 'B' && at <= commit_point);
            }
            child(Some(at as u64), None);
            let found = reopened(&path.0);
            let expected = if at <= commit_point { 'A' } else { 'B' };
            assert_eq!(
                found, expected,
                "{label}: power lost at point {at} ({op}), the commit record synced at {commit_point}"
            );
        }
        println!("{label}: {torn_b} torn losses before the commit record's sync kept the commit");
        trace.len()
    }

    #[test]
    fn commit_survives_power_loss_at_each_point() {
        let points = power_loss_at_each_point("power-commit", |store| {
            store.commit().unwrap();
            std::mem::forget(store);
        });
        println!("commit: {points} points, a power loss at each");
    }

    #[test]
    fn close_survives_power_loss_at_each_point() {
        let points = power_loss_at_each_point("power-close", |store| store.close().unwrap());
        println!("close: {points} points, a power loss at each");
    }

    /// A commit made (in the log, not yet in the files: the writer died at once), then the
    /// next open's replay losing power at each of its points: the open after that still
    /// finds B.
    #[test]
    fn replay_survives_power_loss_at_each_point() {
        let _serial = serial();
        let path = TestPath::new("power-replay");
        let prepare = || {
            let _ = fs::remove_dir_all(&path.0);
            make_a(&path.0);
            let status = in_child(|| {
                let store = Store::open(&path.0).unwrap();
                change_to_b(&store);
                // In the log (which a commit this small never empties), and copied into the
                // files (not synced).
                store.commit().unwrap();
                std::mem::forget(store);
                // SAFETY: a crash.
                unsafe { libc::_exit(0) };
            });
            assert_eq!(status, 0);
        };
        prepare();
        faults::power_loss_at(None);
        let store = Store::open(&path.0).unwrap();
        let points = faults::trace().len();
        faults::arm(None, false);
        assert_eq!(state(&store), 'B');
        assert_eq!(store.recovered().map(|r| r.commits_replayed), Some(1));
        store.close().unwrap();
        for at in 0..points {
            prepare();
            let status = in_child(|| {
                faults::power_loss_at(Some(at as u64));
                let _ = Store::open(&path.0);
            });
            assert_eq!(status, 0);
            assert_eq!(reopened(&path.0), 'B', "power lost at replay point {at}");
        }
        println!("replay: {points} points, a power loss at each");
    }

    /// `recover` failing at each point of a store left dirty (and of one closed cleanly in
    /// state B, which the outside review found opened clean over a mix of files after a
    /// recovery cut short): a second `recover` gives A.
    #[test]
    fn recover_fails_at_each_point() {
        let _serial = serial();
        let path = TestPath::new("io-recover");
        let prepare = |path: &Path, crash: bool| {
            let _ = fs::remove_dir_all(path);
            make_a(path);
            assert_eq!(
                in_child(|| {
                    let store = Store::open(path).unwrap();
                    change_to_b(&store);
                    if crash {
                        // SAFETY: a crash.
                        unsafe { libc::_exit(0) };
                    }
                    store.close().unwrap();
                }),
                0
            );
        };
        prepare(&path.0, true);
        faults::arm(None, false);
        Store::recover(&path.0).unwrap().close().unwrap();
        let points = faults::count();
        for (sticky, crash) in [(false, true), (true, true), (false, false), (true, false)] {
            for at in 0..points {
                prepare(&path.0, crash);
                faults::arm(Some(at), sticky);
                let first = Store::recover(&path.0);
                faults::arm(None, false);
                let recovered = first.is_ok();
                drop(first);
                match Store::open(&path.0) {
                    Ok(store) => {
                        let found = state(&store);
                        // A clean B untouched (the recovery failed before it changed
                        // anything), or A.
                        assert!(
                            found == 'A' || (!crash && !recovered && found == 'B'),
                            "recover failing at {at}: {found}"
                        );
                        store.close().unwrap();
                    }
                    Err(StoreError::Dirty { .. }) => {
                        let store = Store::recover(&path.0)
                            .unwrap_or_else(|e| panic!("recover again after {at}: {e:?}"));
                        assert_eq!(state(&store), 'A');
                        store.close().unwrap();
                    }
                    Err(e) => panic!("after recover failed at {at} (sticky {sticky}): {e:?}"),
                }
            }
        }
        println!("recover: {points} injection points");
    }
}
