//! Outside review of the crash-atomic commit path (c92cde1): each test states what the
//! crate promises, and failed on c92cde1 (the findings in RELIABILITY.md); the last three held
//! up. Adapted to the fixes' log format (a 32-byte head with the store's id, a commit's first
//! record of three words) and to `Store::trim`.

mod store_support;

use std::os::unix::fs::FileExt;
use std::path::Path;

use mmapvec::store::{Store, StoreError, StoreVec};
use store_support::{PATH, ROLE, TestPath, role, serial};

const LOG_MAGIC: u64 = u64::from_ne_bytes(*b"MMAPVLG1");
const BEGIN: u64 = u64::from_ne_bytes(*b"MMAPVCB1");

/// Runs this binary's test `name` as `role` on `path`; returns (exit status, stdout+stderr).
fn run_role(name: &str, role: &str, path: &Path) -> (std::process::ExitStatus, String) {
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(PATH, path)
        .output()
        .unwrap();
    let text = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status, text)
}

fn word(file: &std::fs::File, at: u64) -> u64 {
    let mut b = [0u8; 8];
    file.read_exact_at(&mut b, at).unwrap();
    u64::from_ne_bytes(b)
}

/// Ends the process now, as a crash would (no destructor runs).
fn crash() -> ! {
    // SAFETY: ends the process at once.
    unsafe { libc::_exit(0) }
}

/// A writer killed while it wrote a commit's records (before its end record) leaves an
/// unfinished commit in the log. `replay` copies nothing and leaves the log as it is, so
/// `log_is_empty` stays false and *every* read-only open first takes the writer's lock: while
/// one reader has the store open, every other reader gets `Locked`, until a writer opens it.
#[test]
fn readers_are_locked_out_by_an_unfinished_commit_of_a_dead_writer() {
    let _serial = serial();
    let path = TestPath::new("review-unfinished");
    let store = Store::create(&path.0).unwrap();
    store.set_root("x", 7u64).unwrap();
    store.close().unwrap();

    // Another reader holds the store open (its shared flock on `lock`).
    let lock = std::fs::File::open(path.0.join("lock")).unwrap();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&lock);
    // SAFETY: flock on a descriptor we own.
    let locked = unsafe { libc::flock(fd, libc::LOCK_SH | libc::LOCK_NB) };
    assert_eq!(locked, 0);
    // Control: a clean store opens for a second reader.
    let r = Store::open_read_only(&path.0).unwrap();
    assert_eq!(*r.root::<u64>("x").unwrap(), 7);
    drop(r);

    // What a writer killed in the middle of commit `last + 1` leaves: its first words, and
    // records without an end record.
    let log = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path.0.join("log"))
        .unwrap();
    assert_eq!(word(&log, 0), LOG_MAGIC);
    let last = word(&log, 8);
    let mut partial = Vec::new();
    for w in [BEGIN, last + 1, 77, 1 /* WRITE */, 0, 0, 0, 0, 4096] {
        partial.extend_from_slice(&u64::to_ne_bytes(w));
    }
    log.write_all_at(&partial, 32).unwrap();

    let second_reader = Store::open_read_only(&path.0);
    assert!(
        second_reader.is_ok(),
        "a second reader of a store whose dead writer left an unfinished commit: {:?}",
        second_reader.err()
    );
}

/// A log whose number is `u64::MAX` (a damaged or hostile file): `replay` and `log_is_empty`
/// compute `last + 1` and panic (overflow) in a debug build instead of refusing the store.
#[test]
fn a_log_numbered_u64_max_is_an_error_not_a_panic() {
    let _serial = serial();
    let path = TestPath::new("review-max");
    let store = Store::create(&path.0).unwrap();
    store.close().unwrap();
    let log = std::fs::OpenOptions::new()
        .write(true)
        .open(path.0.join("log"))
        .unwrap();
    log.write_all_at(&u64::MAX.to_ne_bytes(), 8).unwrap();
    for read_only in [false, true] {
        let opened = std::panic::catch_unwind(|| {
            let s = if read_only {
                Store::open_read_only(&path.0)
            } else {
                Store::open(&path.0)
            };
            s.map(|s| s.close().is_ok())
        });
        assert!(
            opened.is_ok(),
            "open (read_only {read_only}) of a store with a damaged log panicked"
        );
    }
}

/// A log copied in from another store (an operator's mistake, a backup restored in part) is
/// replayed into this store's files: its header (roots), small blocks' metadata and manifest
/// are overwritten with the other store's before anything is checked. The log carries no
/// store id.
#[test]
fn a_log_from_another_store_is_never_replayed() {
    let _serial = serial();
    const NAME: &str = "a_log_from_another_store_is_never_replayed";
    if let Some((role, path)) = role() {
        assert_eq!(role, "crash-after-commit");
        let store = Store::open(&path).unwrap();
        *store.root_mut::<u64>("a").unwrap() = 222;
        store.commit().unwrap();
        crash();
    }
    let a = TestPath::new("review-foreign-a");
    let b = TestPath::new("review-foreign-b");
    let store = Store::create(&a.0).unwrap();
    store.set_root("a", 111u64).unwrap();
    store.close().unwrap();
    let (status, out) = run_role(NAME, "crash-after-commit", &a.0);
    assert!(status.success(), "{out}");

    let store = Store::create(&b.0).unwrap();
    store.set_root("b", 5u64).unwrap();
    store.close().unwrap();
    std::fs::copy(a.0.join("log"), b.0.join("log")).unwrap();

    let opened = Store::open(&b.0);
    match &opened {
        Ok(s) => {
            let (rb, ra) = (
                s.root::<u64>("b").map(|v| *v),
                s.root::<u64>("a").map(|v| *v),
            );
            println!("B opened: root b {rb:?}, root a {ra:?}");
            assert!(
                matches!((rb, ra), (Ok(5), Err(StoreError::NoRoot(_)))),
                "B's header was overwritten by the commit of store A's log"
            );
        }
        Err(e) => println!("B refused: {e:?}"),
    }
    drop(opened);
}

/// `Space::after_commit` makes each new segment a private view once the commit point is
/// passed; if that fails (here: `open_seg` hits `RLIMIT_NOFILE`), the commit still returns
/// `Ok` and the segment's view stays `MAP_SHARED` over the file that commit now lists. Every
/// later write reaches the committed file, so a crash reopens the last commit with those
/// later writes in it (later commits are refused: "reopen the store").
#[test]
fn a_segment_left_shared_after_its_commit_leaks_later_writes_into_it() {
    let _serial = serial();
    const NAME: &str = "a_segment_left_shared_after_its_commit_leaks_later_writes_into_it";
    const N: usize = 1 << 18; // 2 MiB of u64: a segment of its own
    if let Some((role, path)) = role() {
        assert_eq!(role, "writer");
        let store = Store::open(&path).unwrap();
        store
            .root_mut::<StoreVec<u64>>("w")
            .unwrap()
            .extend(std::iter::repeat_n(2u64, N));
        // One descriptor free: the commit's scans open and close /proc/self/pagemap in it,
        // then its copy into the files keeps it (the chunk file), and the segment's file
        // cannot be opened after the commit point.
        // SAFETY: F_GETFD only asks whether a descriptor is open.
        let is_open = |fd: i32| unsafe { libc::fcntl(fd, libc::F_GETFD) } >= 0;
        let mut limit = 0i32;
        let mut free = 0;
        while free < 1 {
            if !is_open(limit) {
                free += 1;
            }
            limit += 1;
        }
        let limit = limit as u64;
        let mut old = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: plain rlimit calls on valid structs.
        unsafe {
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut old);
            let new = libc::rlimit {
                rlim_cur: limit,
                rlim_max: old.rlim_max,
            };
            libc::setrlimit(libc::RLIMIT_NOFILE, &new);
        }
        let committed = store.commit();
        // SAFETY: as above.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &old) };
        println!("commit with one descriptor free: {committed:?}");
        if committed.is_ok() {
            // Not committed: must not be what a crash reopens. (On c92cde1 the view stayed
            // shared and these writes reached the committed file.)
            store.root_mut::<StoreVec<u64>>("w").unwrap().fill(3);
        }
        crash();
    }
    let path = TestPath::new("review-shared");
    let store = Store::create(&path.0).unwrap();
    store
        .set_root("w", StoreVec::<u64>::new_in(store.allocator()))
        .unwrap();
    store.close().unwrap();
    let (status, out) = run_role(NAME, "writer", &path.0);
    println!("{out}");
    assert!(status.success());
    assert!(
        out.contains("commit with one descriptor free: Ok"),
        "setup: {out}"
    );
    let store = Store::open(&path.0).unwrap();
    let w = store.root::<StoreVec<u64>>("w").unwrap();
    assert_eq!(w.len(), N);
    let threes = w.iter().filter(|&&x| x == 3).count();
    assert_eq!(
        threes, 0,
        "the reopened commit holds {threes} values written after it (never committed)"
    );
}

/// The memory a writer's private copies take: a page of a committed block that is written
/// stays an anonymous page of the process until the store is closed, through commits and
/// checkpoints, although the files hold it after a checkpoint. A long session that rewrites
/// more committed data than RAM (+ swap) is killed; in a memory cgroup the copies are not
/// reclaimable the way the file pages they replace were.
#[test]
fn private_copies_are_given_back_by_trim() {
    let _serial = serial();
    const NAME: &str = "private_copies_are_given_back_by_trim";
    const MIB: usize = 96;
    if let Some((_, path)) = role() {
        let anon = || -> usize {
            let status = std::fs::read_to_string("/proc/self/status").unwrap();
            let line = status.lines().find(|l| l.starts_with("RssAnon:")).unwrap();
            line.split_whitespace()
                .nth(1)
                .unwrap()
                .parse::<usize>()
                .unwrap()
                / 1024
        };
        let mut store = Store::open(&path).unwrap();
        let before = anon();
        for round in 0..3u8 {
            store.root_mut::<StoreVec<u8>>("v").unwrap().fill(round + 2);
            store.commit().unwrap();
        }
        // `commit(&self)` keeps the copies (another thread may write them); `trim(&mut self)`
        // gives them back.
        store.trim().unwrap();
        let after = anon();
        println!("anon MiB before {before}, after commits and checkpoints {after}");
        assert!(
            after < before + MIB / 2,
            "{} MiB of private copies kept after the files hold them",
            after - before
        );
        store.close().unwrap();
        return;
    }
    let path = TestPath::new("review-anon");
    let store = Store::create(&path.0).unwrap();
    let mut v = StoreVec::<u8>::with_capacity_in(MIB << 20, store.allocator());
    v.resize(MIB << 20, 1);
    store.set_root("v", v).unwrap();
    store.close().unwrap();
    let (status, out) = run_role(NAME, "writer", &path.0);
    println!("{out}");
    assert!(status.success(), "{out}");
}

/// A fork child's copy of the handle never commits, and writes nothing to the store.
#[test]
fn a_fork_child_commit_is_refused_and_writes_nothing() {
    let _serial = serial();
    let path = TestPath::new("review-forkchild");
    let store = Store::create(&path.0).unwrap();
    store.set_root("x", 1u64).unwrap();
    store.commit().unwrap();
    *store.root_mut::<u64>("x").unwrap() = 2;
    let log_before = std::fs::read(path.0.join("log")).unwrap();
    // SAFETY: the child only calls the store and `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let refused = matches!(store.commit(), Err(StoreError::ForkChild))
            && matches!(store.snapshot(), Err(StoreError::ForkChild));
        drop(store);
        // SAFETY: ends the child.
        unsafe { libc::_exit(if refused { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: our child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(
        libc::WEXITSTATUS(status),
        0,
        "the child's commit was not ForkChild"
    );
    assert_eq!(std::fs::read(path.0.join("log")).unwrap(), log_before);
    drop(store);
    let store = Store::open(&path.0).unwrap();
    assert_eq!(*store.root::<u64>("x").unwrap(), 1);
    store.close().unwrap();
}

/// A commit on a full disk fails (its log needs room for the pages written), leaves the last
/// commit, and the next commit (after room is made) holds every page the failed one scanned
/// (`full_scan`). Runs on a 48 MiB tmpfs (root only).
#[test]
fn a_commit_on_a_full_disk_fails_cleanly_and_the_retry_has_everything() {
    let _serial = serial();
    const NAME: &str = "a_commit_on_a_full_disk_fails_cleanly_and_the_retry_has_everything";
    const N: usize = 1 << 20; // 8 MiB of u64
    if let Some((_, path)) = role() {
        let store = Store::open(&path).unwrap();
        store.root_mut::<StoreVec<u64>>("v").unwrap().fill(5);
        *store.root_mut::<u64>("n").unwrap() = 5;
        let filler = path.parent().unwrap().join("filler");
        let mut f = std::fs::File::create(&filler).unwrap();
        let mib = vec![1u8; 1 << 20];
        while std::io::Write::write_all(&mut f, &mib).is_ok() {}
        let _ = std::io::Write::write_all(&mut f, &[1u8; 4096][..]);
        let failed = store.commit();
        println!("commit on a full disk: {failed:?}");
        assert!(failed.is_err());
        drop(f);
        std::fs::remove_file(&filler).unwrap();
        store.commit().unwrap();
        println!("retry: Ok");
        crash();
    }
    // SAFETY: plain getuid.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let mnt = std::env::temp_dir().join(format!("mmapvec-review-tmpfs-{}", std::process::id()));
    std::fs::create_dir_all(&mnt).unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=48m", "tmpfs"])
        .arg(&mnt)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount");
    let path = mnt.join("store");
    let result = std::panic::catch_unwind(|| {
        let store = Store::create(&path).unwrap();
        let mut v = StoreVec::<u64>::with_capacity_in(N, store.allocator());
        v.resize(N, 1);
        store.set_root("v", v).unwrap();
        store.set_root("n", 1u64).unwrap();
        store.close().unwrap();
        let (status, out) = run_role(NAME, "writer", &path);
        println!("{out}");
        assert!(status.success(), "{out}");
        let store = Store::open(&path).unwrap();
        let v = store.root::<StoreVec<u64>>("v").unwrap();
        let fives = v.iter().filter(|&&x| x == 5).count();
        assert_eq!((*store.root::<u64>("n").unwrap(), fives), (5, N));
    });
    let _ = std::process::Command::new("umount").arg(&mnt).status();
    let _ = std::fs::remove_dir(&mnt);
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}

/// Opening and closing a store many times keeps the process's descriptors and mappings flat.
#[test]
fn open_close_cycles_leak_no_descriptors_or_mappings() {
    let _serial = serial();
    let path = TestPath::new("review-cycles");
    let store = Store::create(&path.0).unwrap();
    let mut v = StoreVec::<u64>::new_in(store.allocator());
    v.extend(0..100_000);
    store.set_root("v", v).unwrap();
    store.close().unwrap();
    let count = |dir: &str| std::fs::read_dir(dir).unwrap().count();
    let maps = || {
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .count()
    };
    let (fds0, maps0) = (count("/proc/self/fd"), maps());
    for i in 0..100u64 {
        let store = Store::open(&path.0).unwrap();
        store.root_mut::<StoreVec<u64>>("v").unwrap()[0] = i;
        store.commit().unwrap();
        if i % 2 == 0 {
            store.close().unwrap();
        } else {
            drop(store);
        }
    }
    let (fds1, maps1) = (count("/proc/self/fd"), maps());
    println!("fds {fds0} -> {fds1}, maps {maps0} -> {maps1}");
    assert!(fds1 <= fds0 + 1 && maps1 <= maps0 + 4);
}
