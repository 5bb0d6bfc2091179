//! Issue 19: ways the store lost data or confused its users, each with a test that failed
//! before its fix (the rest of the issue is open: see RELIABILITY.md).
#![cfg(all(target_os = "linux", feature = "hashbrown"))]

use mmapvec::store::{Store, StoreError, StoreVec};

#[path = "core_support/mod.rs"]
mod core_support;
mod store_support;
use store_support::{TestPath, serial};

/// Item 3: `Drop` marked the store clean while its thread was panicking, so a half-done
/// update was kept as if it were complete. It stays dirty now, as after a crash.
#[test]
fn a_panic_keeps_the_last_commit() {
    let _serial = serial();
    let path = TestPath::new("panic");
    let store = Store::create(&path.0).unwrap();
    let mut v = StoreVec::new_in(store.allocator());
    v.extend(0..10u64);
    store.set_root("v", v).unwrap();
    store.snapshot().unwrap();
    store.close().unwrap();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let store = Store::open(&path.0).unwrap();
        let mut v = store.root_mut::<StoreVec<u64>>("v").unwrap();
        v.push(10);
        panic!("half-way through an update");
    }));
    assert!(panicked.is_err());
    let store = Store::open(&path.0).unwrap();
    assert!(
        store.recovered().is_some(),
        "dropped by the panic, not closed"
    );
    let v = store.root::<StoreVec<u64>>("v").unwrap();
    assert!(
        v.iter().copied().eq(0..10),
        "the last commit, without the half-done push"
    );
    drop(v);
    store.close().unwrap();
}

/// Item 4: `StoreError`'s `Debug` (what `main` returning `Result<_, Box<dyn Error>>` prints)
/// said `Dirty { last_flush: 2, last_snapshot: 1 }` and nothing of what to do; it shows the
/// message, which names the call that goes back to the last snapshot.
#[test]
fn a_dirty_store_says_what_to_call() {
    let error = StoreError::Dirty {
        last_flush: 2,
        last_snapshot: 1,
    };
    let shown = format!("{error:?}");
    assert!(shown.starts_with("Dirty: "), "{shown}");
    assert!(shown.contains("Store::recover"), "{shown}");
    let without = format!(
        "{}",
        StoreError::Dirty {
            last_flush: 2,
            last_snapshot: 0
        }
    );
    assert!(without.contains("no snapshot"), "{without}");
}

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;

/// Every entry below `dir` whose mode lets group or others in.
fn not_private(dir: &Path) -> Vec<String> {
    let mut open = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let meta = std::fs::symlink_metadata(entry.path()).unwrap();
        if meta.permissions().mode() & 0o077 != 0 {
            open.push(format!(
                "{} {:o}",
                entry.path().display(),
                meta.permissions().mode()
            ));
        }
        if meta.is_dir() {
            open.extend(not_private(&entry.path()));
        }
    }
    open
}

/// Item 10: snapshot copies and recovered files were 0644 and their folders 0755 under umask
/// 022 (the live store is 0600/0700). Every file and folder of a store is private now.
#[test]
fn snapshots_and_recovered_files_are_private() {
    let _serial = serial();
    // SAFETY: umask only sets the process's file creation mask (restored below).
    let before = unsafe { libc::umask(0o022) };
    let path = TestPath::new("private");
    let store = Store::create(&path.0).unwrap();
    let mut v = StoreVec::new_in(store.allocator());
    v.extend(0..200_000u64);
    store.set_root("v", v).unwrap();
    store.snapshot().unwrap();
    store.close().unwrap();
    let store = Store::recover(&path.0).unwrap();
    store.close().unwrap();
    // SAFETY: as above.
    unsafe { libc::umask(before) };
    let open = not_private(&path.0);
    assert!(open.is_empty(), "readable by others: {open:?}");
}

/// Item 9: a `snapshots` folder that is a link was followed: the link's target lost its
/// numbered folders and gained `partial-N` ones. Such a link is refused now, and the target is
/// left alone.
#[test]
fn a_snapshots_link_is_not_followed() {
    let _serial = serial();
    let path = TestPath::new("snaplink");
    let elsewhere = TestPath::new("snaplink-target");
    std::fs::create_dir_all(elsewhere.0.join("1")).unwrap();
    let store = Store::create(&path.0).unwrap();
    store
        .set_root("v", StoreVec::<u64>::new_in(store.allocator()))
        .unwrap();
    std::os::unix::fs::symlink(&elsewhere.0, path.0.join("snapshots")).unwrap();
    let taken = store.snapshot();
    assert!(taken.is_err(), "a snapshot through a link: {taken:?}");
    assert_eq!(store.snapshots(), 0);
    let names: Vec<_> = std::fs::read_dir(&elsewhere.0)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["1"], "the link's target was changed");
    store.close().unwrap();
}

/// Item 6: snapshots wrote sparse files out in full (a 344 MiB `small` file holding 12 MiB
/// became 344 MiB). Holes stay holes now (where the file system is not reflinking anyway).
#[test]
fn a_snapshot_keeps_the_holes_of_sparse_files() {
    let _serial = serial();
    let path = TestPath::new("sparse");
    let store = Store::create(&path.0).unwrap();
    // 48 MiB of 64 KiB vectors in chunks of their own class, then all but one dropped: the
    // emptied chunks go back to the file system, as holes in the `small` file.
    let alloc = store.allocator();
    let mut many: Vec<StoreVec<u8>> = (0..768)
        .map(|i| {
            let mut v = StoreVec::with_capacity_in(60_000, alloc);
            v.resize(60_000, i as u8);
            v
        })
        .collect();
    let keep = many.pop().unwrap();
    drop(many);
    store.set_root("keep", keep).unwrap();
    // The emptied chunks' disk goes back once no commit in the log lists them: at the
    // snapshot's checkpoint.
    let taken = store.snapshot().unwrap();
    let live = std::fs::metadata(path.0.join("small")).unwrap();
    let copy = std::fs::metadata(path.0.join("snapshots/1/small")).unwrap();
    println!(
        "small: {} MiB long, {} MiB of blocks; its copy: {} MiB of blocks ({taken:?})",
        live.len() >> 20,
        (live.blocks() * 512) >> 20,
        (copy.blocks() * 512) >> 20
    );
    assert!(
        live.blocks() * 512 < live.len() / 2,
        "the test made no holes"
    );
    assert!(
        copy.blocks() <= live.blocks() + 2048,
        "the copy wrote the holes out: {} against {} blocks",
        copy.blocks(),
        live.blocks()
    );
    store.close().unwrap();
}

/// A tmpfs of `size` bytes mounted on a new folder (root only), unmounted on drop.
struct Tmpfs(TestPath);

impl Tmpfs {
    fn mount(label: &str, size: usize) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        let dir = TestPath::new(label);
        std::fs::create_dir(&dir.0).unwrap();
        core_support::mount(c"tmpfs", &dir.0, &format!("size={size},mode=0700")).ok()?;
        Some(Tmpfs(dir))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        core_support::unmount(&self.0.0);
    }
}

/// A store at `path` holding the root `v`: 24 MiB of `u64`s counting up.
fn store_of_24_mib(path: &Path) -> Store {
    let store = Store::create(path).unwrap();
    let mut v = StoreVec::new_in(store.allocator());
    v.extend(0..(3u64 << 20));
    store.set_root("v", v).unwrap();
    store
}

/// Item 7: `recover` copied the snapshot in before it removed the live files, so it needed
/// room for a third copy: a store and its snapshot that fit on a small tmpfs could not be
/// recovered there. The live files of a dirty store are worthless: they go first now.
#[test]
fn recover_needs_no_room_for_a_third_copy() {
    let _serial = serial();
    const NAME: &str = "recover_needs_no_room_for_a_third_copy";
    if let Some((role, path)) = store_support::role() {
        assert_eq!(role, "leave-dirty");
        let store = Store::open(&path).unwrap();
        store.root_mut::<StoreVec<u64>>("v").unwrap()[0] = 7;
        store.commit().unwrap();
        // A crash: no close, no drop.
        std::mem::forget(store);
        return;
    }
    let Some(fs) = Tmpfs::mount("third-copy", 64 << 20) else {
        println!("SKIPPED: needs root to mount a tmpfs");
        return;
    };
    let path = fs.0.0.join("store");
    let store = store_of_24_mib(&path);
    store.snapshot().unwrap();
    store.close().unwrap();
    store_support::in_new_process(NAME, "leave-dirty", &path);
    let store = Store::recover(&path).unwrap_or_else(|e| panic!("recover: {e:?}"));
    let v = store.root::<StoreVec<u64>>("v").unwrap();
    assert_eq!(v.len(), 3 << 20);
    assert_eq!(v[(3 << 20) - 1], (3 << 20) - 1);
    assert_eq!(
        v[0], 0,
        "the snapshot's value, not the crashed writer's last commit's"
    );
    drop(v);
    store.close().unwrap();
}

/// Item 9's second half: a snapshot that failed (here: the disk is full) left its `partial-N`
/// folder for good. Nothing of it stays now, its number is not used, and the store goes on.
#[test]
fn a_failed_snapshot_leaves_nothing() {
    let _serial = serial();
    let Some(fs) = Tmpfs::mount("failed-snapshot", 40 << 20) else {
        println!("SKIPPED: needs root to mount a tmpfs");
        return;
    };
    let path = fs.0.0.join("store");
    let store = store_of_24_mib(&path);
    let failed = store.snapshot();
    assert!(failed.is_err(), "24 MiB copied into 16 MiB: {failed:?}");
    assert_eq!(store.snapshots(), 0);
    let left: Vec<_> = std::fs::read_dir(path.join("snapshots"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
    store.root_mut::<StoreVec<u64>>("v").unwrap()[1] = 11;
    store.close().unwrap();
    let store = Store::open(&path).unwrap();
    assert_eq!(store.root::<StoreVec<u64>>("v").unwrap()[1], 11);
    store.close().unwrap();
}

/// Item 1: a store opened through a relative path resolved it again after `chdir`: `flush`,
/// `snapshot` and `close` reached another store's folder (its snapshot taken from the other
/// store's files, its old snapshot deleted, the first store left dirty). The folder is held
/// by descriptor now. Runs in a process of its own: the current folder is the process's.
#[test]
fn a_relative_path_is_not_resolved_again_after_chdir() {
    const NAME: &str = "a_relative_path_is_not_resolved_again_after_chdir";
    let Some((_, root)) = store_support::role() else {
        let _serial = serial();
        let root = TestPath::new("chdir");
        std::fs::create_dir_all(root.0.join("a")).unwrap();
        std::fs::create_dir_all(root.0.join("b")).unwrap();
        store_support::in_new_process(NAME, "chdir", &root.0);
        return;
    };
    // The other store, in b/s: closed, with a snapshot of its own.
    let other = Store::create(root.join("b/s")).unwrap();
    let mut v = StoreVec::new_in(other.allocator());
    v.extend([7u64; 4]);
    other.set_root("other", v).unwrap();
    other.snapshot().unwrap();
    other.close().unwrap();
    let other_before = std::fs::read(root.join("b/s/header")).unwrap();

    std::env::set_current_dir(root.join("a")).unwrap();
    let store = Store::create("s").unwrap();
    let mut v = StoreVec::new_in(store.allocator());
    v.extend(0..100u64);
    store.set_root("mine", v).unwrap();
    std::env::set_current_dir(root.join("b")).unwrap();
    store.flush().unwrap();
    let snapshot = store.snapshot().unwrap();
    assert_eq!(snapshot.number, 1);
    assert_eq!(store.path(), root.join("a/s"), "the path as it was at open");
    store.close().unwrap();

    // The other store is untouched: same header, its snapshot 1 still there.
    assert_eq!(
        std::fs::read(root.join("b/s/header")).unwrap(),
        other_before
    );
    assert!(root.join("b/s/snapshots/1/header").exists());
    let other = Store::open(root.join("b/s")).unwrap();
    assert_eq!(*other.root::<StoreVec<u64>>("other").unwrap(), [7u64; 4]);
    other.close().unwrap();
    // The first store was closed cleanly and snapshotted in its own folder.
    assert!(root.join("a/s/snapshots/1/header").exists());
    let store = Store::open(root.join("a/s")).unwrap();
    assert_eq!(store.root::<StoreVec<u64>>("mine").unwrap().len(), 100);
    store.close().unwrap();
}

/// Item 1's second half: `recover` took any snapshot folder it found, even one copied in
/// from another store (whose blocks are not this store's). A snapshot names its store now.
#[test]
fn recover_refuses_another_stores_snapshot() {
    let _serial = serial();
    let (one, two) = (TestPath::new("id-one"), TestPath::new("id-two"));
    for path in [&one.0, &two.0] {
        let store = Store::create(path).unwrap();
        store.snapshot().unwrap();
        store.close().unwrap();
    }
    std::fs::remove_dir_all(two.0.join("snapshots/1")).unwrap();
    let copied = std::process::Command::new("cp")
        .args(["-a"])
        .arg(one.0.join("snapshots/1"))
        .arg(two.0.join("snapshots/1"))
        .status()
        .unwrap();
    assert!(copied.success());
    let recovered = Store::recover(&two.0);
    assert!(
        matches!(recovered, Err(StoreError::NotAStore)),
        "{recovered:?}"
    );
}

/// Item 2: a disk that filled during a session failed its `close` (the first write of a new
/// chunk's slot in the sparse `small.meta` found no space), the store stayed dirty, and what
/// an earlier session had closed was lost with it. A chunk reserves its slot when it is made
/// now, so the close needs no new disk; and a failed close gives the store back to retry.
#[test]
fn a_disk_filled_during_a_session_still_closes() {
    let _serial = serial();
    let Some(fs) = Tmpfs::mount("full-at-close", 48 << 20) else {
        println!("SKIPPED: needs root to mount a tmpfs");
        return;
    };
    let path = fs.0.0.join("store");
    let store = Store::create(&path).unwrap();
    let mut kept = StoreVec::new_in(store.allocator());
    kept.extend(0..1000u64);
    store.set_root("kept", kept).unwrap();
    store.close().unwrap();

    // A new session makes a chunk for each of many size classes...
    let store = Store::open(&path).unwrap();
    let mut small = StoreVec::with_capacity_in(64, store.allocator());
    for len in (1..=64usize).map(|i| i * 8) {
        let mut v: StoreVec<u8> = StoreVec::new_in(store.allocator());
        if v.try_reserve_exact(len).is_err() {
            break;
        }
        v.extend(std::iter::repeat_n(len as u8, len));
        small.push(v);
    }
    // One chunk per size class: 8 to 512 bytes make a dozen classes.
    assert!(small.len() >= 8, "only {} vectors fit", small.len());
    store.set_root("small", small).unwrap();
    // ...then another program fills the disk.
    let mut filler = std::fs::File::create(fs.0.0.join("filler")).unwrap();
    let page = vec![1u8; 1 << 16];
    while std::io::Write::write_all(&mut filler, &page).is_ok() {}
    drop(filler);
    let closed = store.close();
    let store = match closed {
        Ok(()) => None,
        Err(failed) => {
            // Allowed only if it can be retried once the disk has room.
            eprintln!("close failed: {failed}");
            Some(failed.into_store())
        }
    };
    assert!(store.is_none(), "the close needed new disk");
    std::fs::remove_file(fs.0.0.join("filler")).unwrap();
    let store = Store::open(&path).unwrap();
    assert_eq!(store.root::<StoreVec<u64>>("kept").unwrap().len(), 1000);
    let small = store.root::<StoreVec<StoreVec<u8>>>("small").unwrap();
    assert!(
        small
            .iter()
            .enumerate()
            .all(|(i, v)| v.len() == 8 * (i + 1))
    );
    drop(small);
    store.close().unwrap();
}

/// Item 2's second half: a `close` that fails gives the store back, still open, so that it
/// can be closed again once the cause is gone. The cause here: `RLIMIT_FSIZE` (set in a
/// process of its own) refuses the metadata file's first save past its limit.
#[test]
fn a_failed_close_can_be_retried() {
    const NAME: &str = "a_failed_close_can_be_retried";
    let Some((_, path)) = store_support::role() else {
        let _serial = serial();
        let path = TestPath::new("close-retry");
        store_support::in_new_process(NAME, "close", &path.0);
        let store = Store::open(&path.0).unwrap();
        assert_eq!(store.root::<StoreVec<u64>>("v").unwrap().len(), 10);
        store.close().unwrap();
        return;
    };
    let store = Store::create(&path).unwrap();
    let mut v = StoreVec::new_in(store.allocator());
    v.extend(0..10u64);
    store.set_root("v", v).unwrap();
    let limit = |bytes: libc::rlim_t| {
        let rlimit = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: setrlimit reads the struct; signal sets a disposition.
        unsafe {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            assert_eq!(libc::setrlimit(libc::RLIMIT_FSIZE, &rlimit), 0);
        }
    };
    limit(4096);
    let failed = store.close().expect_err("a save past RLIMIT_FSIZE");
    assert!(format!("{failed:?}").contains("Io"), "{failed:?}");
    limit(libc::RLIM_INFINITY);
    let store = failed.into_store();
    assert_eq!(store.root::<StoreVec<u64>>("v").unwrap().len(), 10);
    store.close().unwrap();
}

/// Item 15: `clone()` of a map in a read-only store aborted the process (an allocation error
/// in a reader). A reader's allocations come from the temporary allocator now: it can clone
/// what it reads, change the copies and drop them, and the store is left as it was.
#[test]
fn a_reader_can_clone_and_change_copies() {
    use mmapvec::store::StoreMap;
    let _serial = serial();
    let path = TestPath::new("reader-clone");
    let store = Store::create(&path.0).unwrap();
    let mut map: StoreMap<u64, StoreVec<u64>> =
        StoreMap::with_hasher_in(Default::default(), store.allocator());
    for k in 0..200u64 {
        let mut v = StoreVec::new_in(store.allocator());
        v.extend(0..k);
        map.insert(k, v);
    }
    store.set_root("map", map).unwrap();
    let mut big = StoreVec::new_in(store.allocator());
    big.extend(0..(1u64 << 18)); // a segment of its own
    store.set_root("big", big).unwrap();
    store.close().unwrap();

    let reader = Store::open_read_only(&path.0).unwrap();
    let map = reader.root::<StoreMap<u64, StoreVec<u64>>>("map").unwrap();
    let mut copy = map.clone();
    copy.insert(1000, StoreVec::new_in(reader.allocator()));
    copy.get_mut(&5).unwrap().extend(100..10_000);
    copy.remove(&7);
    assert_eq!(copy.len(), 200);
    assert_eq!(copy[&5].len(), 5 + 9_900);
    let big = reader.root::<StoreVec<u64>>("big").unwrap();
    let mut grown = (*big).clone();
    grown.extend(0..1000);
    grown.truncate(10);
    grown.shrink_to_fit();
    assert_eq!(grown[..], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    drop((copy, grown, map, big));
    reader.close().unwrap();

    let store = Store::open(&path.0).unwrap();
    let map = store.root::<StoreMap<u64, StoreVec<u64>>>("map").unwrap();
    assert_eq!(map.len(), 200);
    assert_eq!(map[&5].len(), 5);
    assert!(map.contains_key(&7) && !map.contains_key(&1000));
    drop(map);
    store.close().unwrap();
}

/// Item 12: stores were placed between 16 and 64 TiB, where the legacy memory layout (which
/// `ulimit -s unlimited` selects) maps a program from about 20 TiB up: 8 of 300 reopens there
/// were `AddressTaken`. Stores made here (default layout) are all reopened by one process
/// running with an unlimited stack.
#[test]
fn stores_reopen_under_the_legacy_memory_layout() {
    const NAME: &str = "stores_reopen_under_the_legacy_memory_layout";
    const STORES: usize = 150;
    if let Some((_, dir)) = store_support::role() {
        let first: usize = std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .next()
            .and_then(|l| usize::from_str_radix(l.split('-').next()?, 16).ok())
            .unwrap();
        if first > 32 << 40 {
            println!(
                "SKIPPED: the child does not run the legacy layout (first mapping {first:#x})"
            );
            return;
        }
        let mut taken = Vec::new();
        for i in 0..STORES {
            match Store::open(dir.join(i.to_string())) {
                Ok(store) => store.close().unwrap(),
                Err(e @ StoreError::AddressTaken { .. }) => taken.push(format!("{i}: {e}")),
                Err(e) => panic!("{i}: {e:?}"),
            }
        }
        assert!(taken.is_empty(), "{} of {STORES}: {taken:#?}", taken.len());
        return;
    }
    let _serial = serial();
    let dir = TestPath::new("legacy-layout");
    std::fs::create_dir(&dir.0).unwrap();
    for i in 0..STORES {
        Store::create(dir.0.join(i.to_string()))
            .unwrap()
            .close()
            .unwrap();
    }
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child
        .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
        .env(store_support::ROLE, "legacy")
        .env(store_support::PATH, &dir.0);
    // SAFETY: the closure only calls setrlimit, which is async-signal-safe.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut child, || {
            let unlimited = libc::rlimit {
                rlim_cur: libc::RLIM_INFINITY,
                rlim_max: libc::RLIM_INFINITY,
            };
            // Only the soft limit matters; a refused raise shows as a skip in the child.
            libc::setrlimit(libc::RLIMIT_STACK, &unlimited);
            Ok(())
        });
    }
    let output = child.output().unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("1 passed"),
        "{}\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Item 11: a segment file cut short (or removed) after a clean close was mapped as it was
/// found, and the first read past its new end was a SIGSEGV. The store lists its segments
/// with their lengths at every durable point now, and `open` refuses what does not match.
#[test]
fn a_cut_or_missing_segment_is_refused_at_open() {
    let _serial = serial();
    for damage in ["cut", "removed", "grown", "added"] {
        let path = TestPath::new("cut-segment");
        let store = Store::create(&path.0).unwrap();
        let mut big = StoreVec::new_in(store.allocator());
        big.extend(0..(1u64 << 18)); // 2 MiB: a segment of its own
        store.set_root("big", big).unwrap();
        store.close().unwrap();
        let segs = path.0.join("segs");
        let seg = std::fs::read_dir(&segs)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
            .unwrap();
        let len = std::fs::metadata(&seg).unwrap().len();
        match damage {
            "cut" => std::fs::File::options()
                .write(true)
                .open(&seg)
                .unwrap()
                .set_len(len / 2)
                .unwrap(),
            "removed" => std::fs::remove_file(&seg).unwrap(),
            "grown" => std::fs::File::options()
                .write(true)
                .open(&seg)
                .unwrap()
                .set_len(len + 4096)
                .unwrap(),
            _ => {
                // A copy under a name no commit gave (a segment's name of the earlier format,
                // which no store of this format makes).
                std::fs::copy(&seg, segs.join("100000000000-200000")).unwrap();
            }
        }
        for read_only in [false, true] {
            let opened = if read_only {
                Store::open_read_only(&path.0)
            } else {
                Store::open(&path.0)
            };
            match opened {
                Err(StoreError::NotAStore) => {}
                Ok(store) => {
                    let big = store.root::<StoreVec<u64>>("big").unwrap();
                    panic!(
                        "{damage}: opened; the last element reads {}",
                        big[big.len() - 1]
                    );
                }
                Err(e) => panic!("{damage}: {e:?}"),
            }
        }
    }
}

/// Item 14: a fork child that dropped containers of containers it inherited (a vector of
/// vectors, a box of a vector, a map of vectors, an `Option<StoreBox<_>>`) died of SIGSEGV:
/// the store's views are kept out of children, so the outer container's buffer was not
/// mapped. A child gets private copy-on-write views now: it reads, changes and drops what it
/// inherited, and nothing of that reaches its parent's store.
#[test]
fn a_fork_child_reads_changes_and_drops_what_it_inherited() {
    use mmapvec::store::{StoreBox, StoreMap};
    type Map<'s> = StoreMap<'s, u64, StoreVec<'s, u64>>;
    let _serial = serial();
    let path = TestPath::new("fork-child-drops");
    for read_only in [false, true] {
        if !read_only {
            let store = Store::create(&path.0).unwrap();
            let a = store.allocator();
            let mut vv = StoreVec::new_in(a);
            for i in 0..100u64 {
                let mut v = StoreVec::new_in(a);
                v.extend(0..i);
                vv.push(v);
            }
            store.set_root("vv", vv).unwrap();
            let mut big = StoreVec::new_in(a);
            big.extend(0..(1u64 << 18)); // a segment
            store.set_root("boxed", StoreBox::new_in(big, a)).unwrap();
            let mut map: Map = StoreMap::with_hasher_in(Default::default(), a);
            for k in 0..50u64 {
                let mut v = StoreVec::new_in(a);
                v.extend(0..k);
                map.insert(k, v);
            }
            store.set_root("map", map).unwrap();
            let mut inner = StoreVec::new_in(a);
            inner.extend([1u64, 2, 3]);
            store
                .set_root("maybe", Some(StoreBox::new_in(inner, a)))
                .unwrap();
            store.close().unwrap();
        }
        let store = if read_only {
            Store::open_read_only(&path.0).unwrap()
        } else {
            Store::open(&path.0).unwrap()
        };
        let vv = store.root::<StoreVec<StoreVec<u64>>>("vv").unwrap();
        let boxed = store.root::<StoreBox<StoreVec<u64>>>("boxed").unwrap();
        let map = store.root::<Map>("map").unwrap();
        let maybe = store
            .root::<Option<StoreBox<StoreVec<u64>>>>("maybe")
            .unwrap();
        // SAFETY: the child only runs the closure and `_exit`s; the tests take turns, and the
        // allocators' and store's locks are held across the fork by their handlers.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let total: u64 = vv.iter().map(|v| v.iter().sum::<u64>()).sum();
                assert_eq!(
                    total,
                    (0..100u64).map(|i| i * i.saturating_sub(1) / 2).sum()
                );
                assert_eq!(boxed[(1 << 18) - 1], (1 << 18) - 1);
                assert_eq!(map[&49].len(), 49);
                assert_eq!(maybe.as_ref().unwrap()[..], [1, 2, 3]);
                // Changes of its own: a copy of the store's vectors, written in place and
                // grown; then everything it holds is dropped.
                let mut mine = (*vv).clone();
                mine[10][0] = 1000;
                mine[20].extend(0..10_000);
                mine.push(StoreVec::new_in(store.allocator()));
                let mut copied = (**boxed).clone();
                copied[0] = 7;
                drop((mine, copied, vv, boxed, map, maybe));
            }));
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(i32::from(ok.is_err())) };
        }
        let mut status = 0;
        // SAFETY: our child; `status` is writable.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "read_only {read_only}: the child ended with {status:#x}"
        );
        drop((vv, boxed, map, maybe));
        store.close().unwrap();
        let store = Store::open(&path.0).unwrap();
        let vv = store.root::<StoreVec<StoreVec<u64>>>("vv").unwrap();
        assert_eq!((vv.len(), vv[20].len()), (100, 20));
        assert_eq!(
            store.root::<StoreBox<StoreVec<u64>>>("boxed").unwrap()[0],
            0
        );
        drop(vv);
        store.close().unwrap();
    }
}

/// Item 14, the child's own copy: writing through a container the child inherited changes its
/// private copy, never the parent's store.
#[test]
fn a_fork_childs_writes_stay_in_the_child() {
    let _serial = serial();
    let path = TestPath::new("fork-child-writes");
    let store = Store::create(&path.0).unwrap();
    let mut v = StoreVec::new_in(store.allocator());
    v.extend(0..(1u64 << 16));
    store.set_root("v", v).unwrap();
    let mut v = store.root_mut::<StoreVec<u64>>("v").unwrap();
    // SAFETY: as above.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            v.iter_mut().for_each(|x| *x = u64::MAX);
            assert!(v.iter().all(|&x| x == u64::MAX));
        }));
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(i32::from(ok.is_err())) };
    }
    let mut status = 0;
    // SAFETY: our child; `status` is writable.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status:#x}"
    );
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64));
    v[0] = 5;
    drop(v);
    store.close().unwrap();
    let store = Store::open(&path.0).unwrap();
    let v = store.root::<StoreVec<u64>>("v").unwrap();
    assert_eq!((v[0], v[1]), (5, 1));
    drop(v);
    store.close().unwrap();
}

/// Item 5: blocks that only the writer's local variables held when the snapshot was taken
/// stayed allocated forever after `recover` (a 64 MiB vector and 10,000 small ones: 64 MiB
/// and 328 KiB in use, 8 KiB rooted). `recover` frees what no root reaches now, and keeps
/// every block a root reaches (a map of vectors, whose table is reached through a pointer
/// into the middle of its block; a box of a box). The writer runs in a process of its own
/// and exits without closing the store.
#[test]
fn recover_frees_what_no_root_reaches() {
    use mmapvec::store::{StoreBox, StoreMap};
    type Map<'s> = StoreMap<'s, u64, StoreVec<'s, u64>>;
    const NAME: &str = "recover_frees_what_no_root_reaches";
    if let Some((_, path)) = store_support::role() {
        let store = Store::create(&path).unwrap();
        let a = store.allocator();
        let mut map: Map = StoreMap::with_hasher_in(Default::default(), a);
        for k in 0..300u64 {
            let mut v = StoreVec::new_in(a);
            v.extend(0..k % 50);
            map.insert(k, v);
        }
        store.set_root("map", map).unwrap();
        let mut inner = StoreVec::new_in(a);
        inner.extend(0..(1u64 << 17)); // 1 MiB: a segment, reached through two boxes
        let boxed = StoreBox::new_in(StoreBox::new_in(inner, a), a);
        store.set_root("boxed", boxed).unwrap();
        let rooted = store.stats();
        std::fs::write(
            path.with_extension("rooted"),
            format!("{} {}", rooted.segments, rooted.small_in_use_bytes),
        )
        .unwrap();
        // Local only: a 64 MiB vector and 10,000 small ones.
        let mut big = StoreVec::new_in(a);
        big.extend(0..(8u64 << 20));
        let small: Vec<StoreVec<u64>> = (0..10_000u64)
            .map(|i| {
                let mut v = StoreVec::new_in(a);
                v.extend(0..i % 20 + 1);
                v
            })
            .collect();
        store.snapshot().unwrap();
        assert_eq!((big.len(), small.len()), (8 << 20, 10_000));
        // The writer dies with them alive: no destructor runs, the store stays dirty.
        std::process::exit(0);
    }
    let _serial = serial();
    let path = TestPath::new("gc");
    let status = run_as_writer(NAME, &path.0);
    assert!(status.success(), "{status}");
    let rooted = std::fs::read_to_string(path.0.with_extension("rooted")).unwrap();
    let _ = std::fs::remove_file(path.0.with_extension("rooted"));
    let (segments, small) = rooted.split_once(' ').unwrap();
    let (segments, small): (usize, u64) = (segments.parse().unwrap(), small.parse().unwrap());

    let store = Store::recover(&path.0).unwrap();
    let recovery = store.recovery().unwrap();
    assert_eq!(recovery.snapshot, 1);
    assert!(
        recovery.unreachable_bytes >= 64 << 20,
        "freed only {recovery:?}"
    );
    assert_eq!(recovery.unreachable_blocks, 10_001, "{recovery:?}");
    let after = store.stats();
    assert_eq!(
        (after.segments, after.small_in_use_bytes),
        (segments, small),
        "{after:?}"
    );
    let map = store.root::<Map>("map").unwrap();
    assert!((0..300u64).all(|k| map[&k].iter().copied().eq(0..k % 50)));
    let boxed = store
        .root::<StoreBox<StoreBox<StoreVec<u64>>>>("boxed")
        .unwrap();
    assert!(boxed.iter().copied().eq(0..(1u64 << 17)));
    drop((map, boxed));
    store.close().unwrap();
    // The frees were kept: reopened, the same.
    let store = Store::open(&path.0).unwrap();
    assert_eq!(store.stats().small_in_use_bytes, small);
    assert_eq!(store.stats().segments, segments);
    store.close().unwrap();
}

/// Item 4: a store a writer left dirty could not be read at all (`Dirty`; with no snapshot,
/// nothing could be saved from it). With commits, a crashed writer's store opens at its last
/// commit, for readers too (the first reader copies the log into the files, under the
/// writer's lock): a root closed cleanly before, one committed later in a chunk and a segment
/// made since; not one set after the last commit. `open_dirty_read_only` (for stores of the
/// earlier format) reads the same.
#[test]
fn a_crashed_writers_store_opens_read_only_at_its_last_commit() {
    const NAME: &str = "a_crashed_writers_store_opens_read_only_at_its_last_commit";
    if let Some((_, path)) = store_support::role() {
        let store = Store::create(&path).unwrap();
        let mut kept = StoreVec::new_in(store.allocator());
        kept.extend(0..1000u64);
        store.set_root("kept", kept).unwrap();
        store.close().unwrap();
        let store = Store::open(&path).unwrap();
        let mut later: StoreVec<u16> = StoreVec::new_in(store.allocator());
        later.extend(0..77u16); // a size class the store had no chunk for
        store.set_root("later", later).unwrap();
        let mut big = StoreVec::new_in(store.allocator());
        big.extend(0..(1u64 << 17)); // a segment the last close did not list
        store.set_root("big", big).unwrap();
        store.commit().unwrap();
        store.set_root("lost", 5u8).unwrap();
        std::process::exit(0); // no close
    }
    let _serial = serial();
    let path = TestPath::new("salvage");
    let status = run_as_writer(NAME, &path.0);
    assert!(status.success(), "{status}");
    for salvage in [false, true] {
        let store = match salvage {
            // SAFETY: a store with commits: nothing half-changed is read.
            true => unsafe { Store::open_dirty_read_only(&path.0) }.unwrap(),
            false => Store::open_read_only(&path.0).unwrap(),
        };
        assert!(!store.is_writable());
        assert!(vec_root_is(&store, "kept", 0..1000u64));
        assert!(vec_root_is(&store, "later", 0..77u16));
        assert!(vec_root_is(&store, "big", 0..(1u64 << 17)));
        assert!(matches!(
            store.root::<u8>("lost"),
            Err(StoreError::NoRoot(_))
        ));
        store.close().unwrap();
    }
    let store = Store::open(&path.0).unwrap();
    assert!(vec_root_is(&store, "big", 0..(1u64 << 17)));
    store.close().unwrap();
}

/// The disk a folder's files take (their blocks, not their lengths).
fn disk_of(path: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(path).unwrap().flatten() {
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            disk_of(&entry.path())
        } else {
            std::os::unix::fs::MetadataExt::blocks(&meta) * 512
        };
    }
    total
}

/// Item 8: a 235 KB word count took 33 MB on disk: each size class reserved a 4 MiB chunk.
/// A store's chunks get disk in 64 KiB pieces as their blocks are used now: a small store
/// costs about its data, and after a reopen the pieces under its blocks are still counted.
#[test]
fn a_small_store_costs_about_its_data() {
    use mmapvec::store::StoreMap;
    let _serial = serial();
    let path = TestPath::new("small-store");
    let store = Store::create(&path.0).unwrap();
    let a = store.allocator();
    // A word count: 4,000 words of 3 to 20 bytes with their counts, 12 size classes.
    let mut counts: StoreMap<StoreVec<u8>, u64> = StoreMap::with_hasher_in(Default::default(), a);
    for i in 0..4_000u64 {
        let mut word = StoreVec::new_in(a);
        word.extend(format!("w{i:0width$}", width = (i % 18 + 2) as usize).bytes());
        *counts.entry(word).or_insert(0) += i;
    }
    store.set_root("counts", counts).unwrap();
    let data = store.stats().small_in_use_bytes + store.stats().segment_bytes;
    store.close().unwrap();
    let disk = disk_of(&path.0);
    println!("data {data} bytes, disk {disk} bytes");
    assert!(
        disk <= 4 * data + (2 << 20),
        "{disk} bytes on disk for {data} of data"
    );
    // Reopened and grown, it still costs about its data.
    let store = Store::open(&path.0).unwrap();
    let mut counts = store
        .root_mut::<StoreMap<StoreVec<u8>, u64>>("counts")
        .unwrap();
    for i in 4_000..6_000u64 {
        let mut word = StoreVec::new_in(store.allocator());
        word.extend(format!("w{i:0width$}", width = (i % 18 + 2) as usize).bytes());
        counts.insert(word, i);
    }
    drop(counts);
    let data = store.stats().small_in_use_bytes + store.stats().segment_bytes;
    store.close().unwrap();
    let disk = disk_of(&path.0);
    println!("data {data} bytes, disk {disk} bytes");
    assert!(
        disk <= 4 * data + (2 << 20),
        "{disk} bytes on disk for {data} of data"
    );
    let store = Store::open(&path.0).unwrap();
    let counts = store.root::<StoreMap<StoreVec<u8>, u64>>("counts").unwrap();
    assert_eq!(counts.len(), 6_000);
    drop(counts);
    store.close().unwrap();
}

/// Waits for `pid`; its exit code, or 128 + the signal that killed it.
fn wait_for(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    // SAFETY: our child; `status` is writable.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        libc::WEXITSTATUS(status)
    }
}

/// Item 14, attacked by the outside review: a writer's child maps its blocks from the files,
/// so whatever the parent did after the fork reached it: a segment the parent freed right away
/// was gone before the child opened its file (SIGSEGV), small blocks the parent freed were
/// punched and reused (the child read zeros, then SIGSEGV), and a grandchild lost the child's
/// own writes (its parent's private views were replaced). Now the files are opened before the
/// fork, the parent seals what a child maps (no block of an older epoch handed out again, no
/// piece punched, no file cut), and a grandchild inherits its parent's private views.
#[test]
fn a_fork_child_is_unmoved_by_what_its_parent_frees() {
    use mmapvec::store::StoreBox;
    let _serial = serial();
    let path = TestPath::new("fork-parent-frees");
    let store = Store::create(&path.0).unwrap();
    let a = store.allocator();
    let mut big: StoreVec<u64> = StoreVec::new_in(a);
    big.extend(0..1_000_000u64);
    let mut small: StoreVec<StoreBox<u64>> = StoreVec::new_in(a);
    for i in 0..1000u64 {
        small.push(StoreBox::new_in(i, a));
    }
    let mut shrinking: StoreVec<u64> = StoreVec::new_in(a);
    shrinking.extend(0..(1u64 << 18));
    let mut pipe = [0i32; 2];
    // SAFETY: `pipe` is writable for two descriptors.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    let big_sum: u64 = (0..1_000_000u64).sum::<u64>() + 4242;
    // SAFETY: the child only runs the closure and `_exit`s; the tests take turns.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            big[0] = 4242; // the child's own copy
            let mut byte = [0u8; 1];
            // SAFETY: reads one byte into `byte`: the parent has freed and reused by then.
            unsafe { libc::read(pipe[0], byte.as_mut_ptr().cast(), 1) };
            assert_eq!(big.iter().sum::<u64>(), big_sum);
            assert_eq!(small.iter().map(|b| **b).sum::<u64>(), (0..1000).sum());
            assert!(shrinking.iter().copied().eq(0..(1 << 18)));
            // SAFETY: a grandchild, as above.
            let grandchild = unsafe { libc::fork() };
            if grandchild == 0 {
                let ok = big[0] == 4242
                    && big.iter().sum::<u64>() == big_sum
                    && small.iter().map(|b| **b).sum::<u64>() == (0..1000).sum();
                // SAFETY: ends the grandchild at once.
                unsafe { libc::_exit(if ok { 0 } else { 3 }) };
            }
            assert_eq!(wait_for(grandchild), 0, "the grandchild");
            drop((big, small, shrinking));
        }));
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(i32::from(ok.is_err())) };
    }
    // The parent frees, reuses and shrinks at once, then lets the child read.
    drop(big);
    drop(small);
    shrinking.truncate(10);
    shrinking.shrink_to_fit();
    let mut other: StoreVec<StoreVec<u64>> = StoreVec::new_in(a);
    for i in 0..2000u64 {
        let mut v = StoreVec::new_in(a);
        v.push(i);
        other.push(v);
    }
    store.flush().unwrap();
    // SAFETY: writes one byte from a static.
    unsafe { libc::write(pipe[1], b"x".as_ptr().cast(), 1) };
    assert_eq!(wait_for(pid), 0, "the child");
    assert!(shrinking.iter().copied().eq(0..10));
    store.set_root("other", other).unwrap();
    drop(shrinking);
    store.close().unwrap();
    // The sealed chunks' frees were saved: reopened, the store holds what is rooted.
    let store = Store::open(&path.0).unwrap();
    let other = store.root::<StoreVec<StoreVec<u64>>>("other").unwrap();
    assert!(other.iter().enumerate().all(|(i, v)| v[..] == [i as u64]));
    drop(other);
    store.close().unwrap();
    // SAFETY: our pipe's descriptors.
    unsafe {
        libc::close(pipe[0]);
        libc::close(pipe[1]);
    }
}

/// The outside review: a reader's child crashed iterating an empty map (the reader had fixed
/// up the map's pointer to hashbrown's static in its private view; the child mapped the file
/// again, which holds the pointer of the process that made the store). A reader's private
/// views are inherited as they are now.
#[test]
fn a_readers_fork_child_iterates_an_empty_map() {
    use mmapvec::store::StoreMap;
    type Map<'s> = StoreMap<'s, u64, u64>;
    const NAME: &str = "a_readers_fork_child_iterates_an_empty_map";
    if let Some((_, path)) = store_support::role() {
        // Another process makes the store: its static is elsewhere.
        let store = Store::create(&path).unwrap();
        let map: Map = StoreMap::with_hasher_in(Default::default(), store.allocator());
        store.set_root("empty", map).unwrap();
        store.close().unwrap();
        return;
    }
    let _serial = serial();
    let path = TestPath::new("reader-fork-map");
    store_support::in_new_process(NAME, "make", &path.0);
    let store = Store::open_read_only(&path.0).unwrap();
    let map = store.root::<Map>("empty").unwrap();
    assert_eq!(map.iter().count(), 0);
    // SAFETY: as above.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let ok = map.iter().count() == 0 && map.get(&1).is_none();
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(if ok { 0 } else { 3 }) };
    }
    assert_eq!(wait_for(pid), 0, "the reader's child");
    drop(map);
    store.close().unwrap();
}

/// The outside review: `recover` removed the live files before it looked at the snapshot, so
/// a damaged snapshot (a segment cut short) lost everything: the live files, which a salvage
/// open could still read, were gone, and what was left could not be opened. The snapshot is
/// checked whole first now: refused, the live files stay as they were.
#[test]
fn a_damaged_snapshot_is_refused_before_the_live_files_go() {
    const NAME: &str = "a_damaged_snapshot_is_refused_before_the_live_files_go";
    if let Some((_, path)) = store_support::role() {
        let store = Store::create(&path).unwrap();
        let mut big = StoreVec::new_in(store.allocator());
        big.extend(0..(1u64 << 17));
        store.set_root("big", big).unwrap();
        store.snapshot().unwrap();
        store
            .root_mut::<StoreVec<u64>>("big")
            .unwrap()
            .push(1 << 17);
        store.commit().unwrap();
        std::process::exit(0); // not closed
    }
    let _serial = serial();
    let path = TestPath::new("damaged-snapshot");
    let status = run_as_writer(NAME, &path.0);
    assert!(status.success());
    let segment = std::fs::read_dir(path.0.join("snapshots/1/segs"))
        .unwrap()
        .flatten()
        .find(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .unwrap()
        .path();
    std::fs::File::options()
        .write(true)
        .open(&segment)
        .unwrap()
        .set_len(4096)
        .unwrap();
    let recovered = Store::recover(&path.0);
    assert!(
        matches!(recovered, Err(StoreError::NotAStore)),
        "{recovered:?}"
    );
    // The live files are still there, at their last commit.
    let store = Store::open(&path.0).unwrap();
    assert!(
        store
            .root::<StoreVec<u64>>("big")
            .unwrap()
            .iter()
            .copied()
            .eq(0..=(1 << 17))
    );
    store.close().unwrap();
}

/// The outside review: a store file that is a hard link to another store's (its `small`) was
/// accepted, and read as this store's; a FIFO in place of a file made a reader's open hang;
/// an empty `small.meta` beside a chunk file with data was taken for a new store's. Each is
/// `NotAStore` now.
#[test]
fn store_files_are_regular_files_of_their_own() {
    let _serial = serial();
    let (one, two) = (TestPath::new("linked-one"), TestPath::new("linked-two"));
    for path in [&one.0, &two.0] {
        let store = Store::create(path).unwrap();
        let mut v = StoreVec::new_in(store.allocator());
        v.extend(0..100u64);
        store.set_root("v", v).unwrap();
        store.close().unwrap();
    }
    std::fs::remove_file(two.0.join("small")).unwrap();
    std::fs::hard_link(one.0.join("small"), two.0.join("small")).unwrap();
    assert!(matches!(Store::open(&two.0), Err(StoreError::NotAStore)));
    assert!(matches!(
        Store::open_read_only(&two.0),
        Err(StoreError::NotAStore)
    ));

    // A FIFO for the header: refused, not waited on (an alarm ends a hang).
    let fifo = TestPath::new("fifo-header");
    Store::create(&fifo.0).unwrap().close().unwrap();
    std::fs::remove_file(fifo.0.join("header")).unwrap();
    let name = std::ffi::CString::new(fifo.0.join("header").into_os_string().into_encoded_bytes())
        .unwrap();
    // SAFETY: a valid path; mkfifo reads it only.
    assert_eq!(unsafe { libc::mkfifo(name.as_ptr(), 0o600) }, 0);
    let (tx, rx) = std::sync::mpsc::channel();
    let fifo_path = fifo.0.clone();
    std::thread::spawn(move || {
        let _ = tx.send(matches!(
            Store::open_read_only(&fifo_path),
            Err(StoreError::NotAStore)
        ));
    });
    let refused = rx.recv_timeout(std::time::Duration::from_secs(10));
    assert_eq!(refused, Ok(true), "a FIFO header");

    // An empty small.meta beside a chunk file with data.
    let empty = TestPath::new("empty-meta");
    let store = Store::create(&empty.0).unwrap();
    let mut v = StoreVec::new_in(store.allocator());
    v.extend(0..100u64);
    store.set_root("v", v).unwrap();
    store.close().unwrap();
    std::fs::File::options()
        .write(true)
        .open(empty.0.join("small.meta"))
        .unwrap()
        .set_len(0)
        .unwrap();
    assert!(matches!(Store::open(&empty.0), Err(StoreError::NotAStore)));
}

/// Runs the test `name` again in a process of its own as the role "writer" on the store at
/// `path`, which the role ends without closing (a crash): its exit status.
fn run_as_writer(name: &str, path: &Path) -> std::process::ExitStatus {
    std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(store_support::ROLE, "writer")
        .env(store_support::PATH, path)
        .status()
        .unwrap()
}

/// Whether the root `name` is a vector holding exactly `expected`.
fn vec_root_is<T>(store: &Store, name: &str, expected: impl IntoIterator<Item = T>) -> bool
where
    T: for<'s> mmapvec::store::Persist<'s> + PartialEq + Copy,
{
    store
        .root::<StoreVec<T>>(name)
        .is_ok_and(|v| v.iter().copied().eq(expected))
}

/// Forks while three threads allocate, grow and free in the store: every child reads and
/// drops what it inherited, and none hangs (a lock held across the fork by a thread that does
/// not exist in the child) or dies. The store's tier takes part in the fork handlers, so no
/// block is handed out or freed across a fork.
#[test]
fn forks_while_threads_allocate_in_the_store() {
    let _serial = serial();
    let path = TestPath::new("fork-threads");
    let store = Store::create(&path.0).unwrap();
    let a = store.allocator();
    let mut keep: StoreVec<u64> = StoreVec::new_in(a);
    keep.extend(0..100_000u64);
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        for t in 0..3u64 {
            let stop = &stop;
            scope.spawn(move || {
                let mut live: Vec<StoreVec<u64>> = Vec::new();
                let mut i = t;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let mut v = StoreVec::new_in(a);
                    v.extend(0..if i % 50 == 0 { 100_000 } else { i % 40 + 1 });
                    live.push(v);
                    if live.len() > 64 {
                        live.swap_remove((i as usize * 7) % 64);
                    }
                    i += 1;
                }
            });
        }
        for fork in 0..30 {
            // SAFETY: the child only reads, drops and `_exit`s.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                let ok = keep.iter().copied().eq(0..100_000u64);
                let mut mine = keep.clone();
                mine.extend(0..1000u64);
                drop(mine);
                // SAFETY: ends the child at once.
                unsafe { libc::_exit(if ok { 0 } else { 3 }) };
            }
            let mut status = 0;
            let mut waited = 0;
            loop {
                // SAFETY: our child; `status` is writable.
                if unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } == pid {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
                waited += 5;
                if waited > 20_000 {
                    // SAFETY: our child, hung: ended and reaped.
                    unsafe {
                        libc::kill(pid, libc::SIGKILL);
                        libc::waitpid(pid, &mut status, 0);
                    }
                    panic!("fork {fork}: the child hangs");
                }
            }
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "fork {fork}: {status:#x}"
            );
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
    });
    store.set_root("keep", keep).unwrap();
    store.close().unwrap();
    let store = Store::open(&path.0).unwrap();
    assert!(vec_root_is(&store, "keep", 0..100_000u64));
    store.close().unwrap();
}
