//! Commits (issue 20): what they cost, who may make them, and the memory a session keeps.
//! The crash tests are elsewhere: `src/store/tests.rs` (each fault point, a power loss at
//! each point) and `tests/store.rs` (writers killed at random, checked against a model).

mod core_support;
mod store_support;

use mmapvec::store::{Store, StoreError, StoreVec};
use store_support::{TestPath, serial};

/// The private (anonymous) memory of this process, in bytes (`/proc/self/smaps_rollup`).
fn anonymous_bytes() -> u64 {
    let text = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix("Anonymous:"))
        .map(|v| {
            v.trim()
                .trim_end_matches(" kB")
                .trim()
                .parse::<u64>()
                .unwrap()
                * 1024
        })
        .unwrap()
}

/// A commit writes what changed, not the store: one changed `u64` in a 64 MiB vector (and
/// in a map of 100,000 small vectors) costs a few pages of log, and a store made this
/// session is written in place, not logged.
#[test]
fn a_commit_costs_what_changed() {
    let _serial = serial();
    let path = TestPath::new("commit-cost");
    let store = Store::create(&path.0).unwrap();
    let mut big = StoreVec::new_in(store.allocator());
    big.extend(0..(8u64 << 20));
    store.set_root("big", big).unwrap();
    let mut small: StoreVec<StoreVec<u32>> = StoreVec::new_in(store.allocator());
    for i in 0..100_000u32 {
        let mut v = StoreVec::new_in(store.allocator());
        v.extend([i; 5]);
        small.push(v);
    }
    store.set_root("small", small).unwrap();
    store.commit().unwrap();
    let first = store.stats();
    println!(
        "first commit: {} bytes of log, {} in place",
        first.last_commit_log_bytes, first.last_commit_in_place_bytes
    );
    assert!(
        first.last_commit_log_bytes < 4 << 20,
        "the new data was logged: {first:?}"
    );
    assert!(first.last_commit_in_place_bytes >= 2 << 20, "{first:?}");
    for round in 0..3 {
        store.root_mut::<StoreVec<u64>>("big").unwrap()[12345 + round] = 7;
        store.root_mut::<StoreVec<StoreVec<u32>>>("small").unwrap()[99_999][0] = 7;
        store.commit().unwrap();
        let stats = store.stats();
        println!(
            "round {round}: {} bytes of log",
            stats.last_commit_log_bytes
        );
        // Two pages of data, the header page, the small blocks' bitmaps and the list of
        // segments.
        assert!(
            stats.last_commit_log_bytes < 256 << 10,
            "round {round}: {stats:?}"
        );
    }
    store.close().unwrap();
    let store = Store::open(&path.0).unwrap();
    assert_eq!(store.root::<StoreVec<u64>>("big").unwrap()[12347], 7);
    assert_eq!(
        store.root::<StoreVec<StoreVec<u32>>>("small").unwrap()[99_999][0],
        7
    );
    store.close().unwrap();
}

/// A store kept in a `static` (it can never be closed) commits, and its next process finds
/// the commit.
#[test]
fn a_static_store_commits() {
    static STORE: std::sync::OnceLock<Store> = std::sync::OnceLock::new();
    const NAME: &str = "a_static_store_commits";
    if let Some((role, path)) = store_support::role() {
        let store = STORE.get_or_init(|| match role.as_str() {
            "make" => Store::create(&path).unwrap(),
            _ => Store::open(&path).unwrap(),
        });
        if role == "make" {
            store.set_root("n", 41u64).unwrap();
            store.commit().unwrap();
            *store.root_mut::<u64>("n").unwrap() += 1;
            store.commit().unwrap();
            *store.root_mut::<u64>("n").unwrap() += 100; // never committed
        } else {
            assert_eq!(*store.root::<u64>("n").unwrap(), 42);
            assert!(store.recovered().is_some(), "a static is never closed");
        }
        return;
    }
    let _serial = serial();
    let path = TestPath::new("static");
    store_support::in_new_process(NAME, "make", &path.0);
    store_support::in_new_process(NAME, "check", &path.0);
}

/// Threads commit while others allocate, grow and free (each commit holds the store's locks:
/// no block is handed out or freed meanwhile); each thread's own data, which it commits
/// itself after changing it, is exact after a reopen.
#[test]
fn threads_commit_while_others_allocate() {
    let _serial = serial();
    let path = TestPath::new("commit-threads");
    let store = Store::create(&path.0).unwrap();
    for t in 0..4u64 {
        store
            .set_root(&format!("t{t}"), StoreVec::<u64>::new_in(store.allocator()))
            .unwrap();
    }
    std::thread::scope(|scope| {
        for t in 0..4u64 {
            let store = &store;
            scope.spawn(move || {
                let mut scratch: Vec<StoreVec<u64>> = Vec::new();
                for i in 0..300u64 {
                    // Churn: vectors of every size made, grown and dropped.
                    let mut v = StoreVec::new_in(store.allocator());
                    v.extend(0..(i * 37 % 5000));
                    scratch.push(v);
                    if scratch.len() > 8 {
                        scratch.remove((i % 8) as usize);
                    }
                    store
                        .root_mut::<StoreVec<u64>>(&format!("t{t}"))
                        .unwrap()
                        .push(i);
                    if t < 2 && i % 10 == 0 {
                        store.commit().unwrap();
                    }
                }
            });
        }
    });
    store.close().unwrap();
    let store = Store::open(&path.0).unwrap();
    for t in 0..4u64 {
        let v = store.root::<StoreVec<u64>>(&format!("t{t}")).unwrap();
        assert!(v.iter().copied().eq(0..300), "thread {t}");
    }
    let stats = store.stats();
    assert_eq!(
        stats.segments, 0,
        "the scratch vectors were all freed: {stats:?}"
    );
    store.close().unwrap();
}

/// A fork child's copy of the handle cannot commit (nor trim): `ForkChild`, and nothing of
/// what the child changed reaches the store.
#[test]
fn a_fork_child_cannot_commit() {
    let _serial = serial();
    let path = TestPath::new("commit-fork");
    let store = Store::create(&path.0).unwrap();
    store.set_root("n", 1u64).unwrap();
    store.commit().unwrap();
    // SAFETY: the child only touches the store's memory and calls the store, then `_exit`s.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            // The child's copy of the root (a private view), changed in the child.
            let ok = matches!(store.root_mut::<u64>("n"), Err(StoreError::ForkChild))
                && matches!(store.commit(), Err(StoreError::ForkChild));
            i32::from(!ok)
        }))
        .unwrap_or(2);
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: our child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert_eq!(libc::WEXITSTATUS(status), 0, "the child could commit");
    assert_eq!(*store.root::<u64>("n").unwrap(), 1);
    store.close().unwrap();
}

/// The private copies of committed pages a session writes stay in memory until `trim` (or
/// the close): 64 MiB rewritten in place takes about 64 MiB of anonymous memory, which
/// `trim` gives back; the data is intact, in memory and after a reopen.
#[test]
fn trim_gives_back_the_private_copies() {
    let _serial = serial();
    let path = TestPath::new("trim");
    let mut store = Store::create(&path.0).unwrap();
    let mut v = StoreVec::new_in(store.allocator());
    v.resize(8 << 20, 1u64);
    store.set_root("v", v).unwrap();
    store.commit().unwrap();
    let before = anonymous_bytes();
    for x in store.root_mut::<StoreVec<u64>>("v").unwrap().iter_mut() {
        *x += 1;
    }
    store.commit().unwrap();
    let copied = anonymous_bytes().saturating_sub(before);
    store.trim().unwrap();
    let kept = anonymous_bytes().saturating_sub(before);
    println!(
        "64 MiB rewritten: {} MiB of private copies, {} MiB after trim",
        copied >> 20,
        kept >> 20
    );
    assert!(
        copied >= 48 << 20,
        "the rewrite made {copied} bytes of copies"
    );
    assert!(kept < 16 << 20, "trim kept {kept} bytes");
    let all_two = |store: &Store| {
        let v = store.root::<StoreVec<u64>>("v").unwrap();
        v.iter().all(|&x| x == 2)
    };
    assert!(all_two(&store));
    store.close().unwrap();
    let store = Store::open(&path.0).unwrap();
    assert!(all_two(&store));
    store.close().unwrap();
}

/// A disk that fills during a commit: the commit fails, the store keeps its last commit and
/// stays usable; once there is room, the same changes commit.
#[test]
fn a_full_disk_fails_the_commit_and_the_store_goes_on() {
    let _serial = serial();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        println!("SKIPPED: needs root to mount a tmpfs");
        return;
    }
    let dir = TestPath::new("commit-full");
    std::fs::create_dir(&dir.0).unwrap();
    if let Err(e) = core_support::mount(c"tmpfs", &dir.0, "size=40m,mode=0700") {
        println!("SKIPPED: could not mount a tmpfs: {e}");
        return;
    }
    struct Unmount<'a>(&'a std::path::Path);
    impl Drop for Unmount<'_> {
        fn drop(&mut self) {
            core_support::unmount(self.0);
        }
    }
    let _unmount = Unmount(&dir.0);
    let path = dir.0.join("store");
    let store = Store::create(&path).unwrap();
    let mut v = StoreVec::new_in(store.allocator());
    v.resize(2 << 20, 1u64); // 16 MiB
    store.set_root("v", v).unwrap();
    store.commit().unwrap();
    // 16 MiB changed in place: 16 MiB of log, more than the disk has left once it is full.
    let filler = dir.0.join("filler");
    let mut file = std::fs::File::create(&filler).unwrap();
    let page = vec![1u8; 1 << 16];
    while std::io::Write::write_all(&mut file, &page).is_ok() {}
    drop(file);
    for x in store.root_mut::<StoreVec<u64>>("v").unwrap().iter_mut() {
        *x = 2;
    }
    let failed = store.commit();
    assert!(failed.is_err(), "16 MiB logged on a full disk: {failed:?}");
    // Usable: read, and changed more.
    store.root_mut::<StoreVec<u64>>("v").unwrap()[0] = 3;
    std::fs::remove_file(&filler).unwrap();
    store.commit().unwrap();
    store.close().unwrap();
    let store = Store::open(&path).unwrap();
    let v = store.root::<StoreVec<u64>>("v").unwrap();
    assert_eq!(v[0], 3);
    assert!(v[1..].iter().all(|&x| x == 2));
    drop(v);
    store.close().unwrap();
}

/// FNV-1a, the checksum of a format 3 manifest.
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Turns a closed store of format 4 into what format 3 wrote: segments named after their
/// address and span, a manifest of (address, span, length), header version 3, no log.
fn make_format_3(path: &std::path::Path) {
    let segs = path.join("segs");
    let manifest = std::fs::read(segs.join(".manifest")).unwrap();
    let word = |i: usize| u64::from_ne_bytes(manifest[i * 8..i * 8 + 8].try_into().unwrap());
    assert_eq!(&manifest[..8], b"MMAPVMF2");
    let count = word(1) as usize;
    let mut old = Vec::new();
    old.extend_from_slice(b"MMAPVMF1");
    old.extend_from_slice(&(count as u64).to_ne_bytes());
    for i in 0..count {
        let at = 4 + i * 5;
        let (id, kind, addr, span, len) = (
            word(at),
            word(at + 1),
            word(at + 2),
            word(at + 3),
            word(at + 4),
        );
        assert_eq!(kind, u64::MAX, "a numbered segment");
        std::fs::rename(
            segs.join(format!("{id:016x}")),
            segs.join(format!("{addr:x}-{span:x}")),
        )
        .unwrap();
        for w in [addr, span, len] {
            old.extend_from_slice(&w.to_ne_bytes());
        }
    }
    let sum = fnv(&old);
    old.extend_from_slice(&sum.to_ne_bytes());
    std::fs::write(segs.join(".manifest"), &old).unwrap();
    let header = path.join("header");
    let mut bytes = std::fs::read(&header).unwrap();
    bytes[8..12].copy_from_slice(&3u32.to_ne_bytes());
    std::fs::write(&header, &bytes).unwrap();
    std::fs::remove_file(path.join("log")).unwrap();
}

/// A store of format 3 (segments named after their address, no log) opens: read-only as it
/// is, and for writing upgraded by one commit to format 4, its files keeping their names; it
/// then commits, grows its segment into a new numbered one, and a crash reopens its last
/// commit.
#[test]
fn a_format_3_store_is_read_and_upgraded() {
    let _serial = serial();
    const NAME: &str = "a_format_3_store_is_read_and_upgraded";
    if let Some((_, path)) = store_support::role() {
        let store = Store::open(&path).unwrap();
        store
            .root_mut::<StoreVec<u64>>("big")
            .unwrap()
            .extend(1u64 << 18..1u64 << 19);
        store.commit().unwrap();
        store.root_mut::<StoreVec<u64>>("big").unwrap()[0] = 99; // never committed
        std::mem::forget(store);
        return;
    }
    let path = TestPath::new("format-3");
    let store = Store::create(&path.0).unwrap();
    let mut big = StoreVec::new_in(store.allocator());
    big.extend(0..(1u64 << 18)); // 2 MiB: a segment
    store.set_root("big", big).unwrap();
    let mut small = StoreVec::new_in(store.allocator());
    small.extend(0..100u32);
    store.set_root("small", small).unwrap();
    store.close().unwrap();
    make_format_3(&path.0);
    let version = |p: &std::path::Path| {
        let bytes = std::fs::read(p.join("header")).unwrap();
        u32::from_ne_bytes(bytes[8..12].try_into().unwrap())
    };
    let store = Store::open_read_only(&path.0).unwrap();
    assert!(
        store
            .root::<StoreVec<u64>>("big")
            .unwrap()
            .iter()
            .copied()
            .eq(0..1 << 18)
    );
    drop(store);
    assert_eq!(version(&path.0), 3, "a reader changes nothing");
    let store = Store::open(&path.0).unwrap();
    assert_eq!(version(&path.0), 4, "upgraded by the open for writing");
    assert!(
        store
            .root::<StoreVec<u64>>("big")
            .unwrap()
            .iter()
            .copied()
            .eq(0..1 << 18)
    );
    assert!(
        store
            .root::<StoreVec<u32>>("small")
            .unwrap()
            .iter()
            .copied()
            .eq(0..100)
    );
    store.close().unwrap();
    store_support::in_new_process(NAME, "grow", &path.0);
    let store = Store::open(&path.0).unwrap();
    assert!(store.recovered().is_some());
    let big = store.root::<StoreVec<u64>>("big").unwrap();
    assert!(
        big.iter().copied().eq(0..1 << 19),
        "the last commit, not the write after it"
    );
    drop(big);
    assert!(
        store
            .root::<StoreVec<u32>>("small")
            .unwrap()
            .iter()
            .copied()
            .eq(0..100)
    );
    store.close().unwrap();
}
