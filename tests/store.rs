//! Persistent stores from the public API, each reopen in a new process: this test binary is
//! started again with a role and the store's path (an address space of its own, with the
//! program's statics elsewhere, as a program that reopens a store has).
#![cfg(feature = "hashbrown")]

use allocator_api2::alloc::{Allocator, Layout};
use mmapvec::store::{FixedState, Store, StoreError, StoreMap, StoreSet, StoreVec};

mod store_support;
use store_support::{PATH, ROLE, TestPath, in_new_process, role, serial};

/// A vector of the store holding `items`.
fn vec_of<'s, T>(store: &'s Store, items: impl IntoIterator<Item = T>) -> StoreVec<'s, T> {
    let mut v = StoreVec::new_in(store.allocator());
    v.extend(items);
    v
}

type Counts<'s> = StoreMap<'s, u64, u64, FixedState>;
type Postings<'s> = StoreMap<'s, u64, StoreVec<'s, u32>, FixedState>;
type Shards<'s> = StoreVec<'s, StoreMap<'s, u32, u32, FixedState>>;

const N: u64 = 100_000;

fn value(k: u64) -> u64 {
    k.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 7
}

/// Builds the four roots: a vector, a map, a map of vectors, a vector of maps (some empty).
fn build(store: &Store) {
    let alloc = store.allocator();
    let mut vec = StoreVec::new_in(alloc);
    vec.extend(0..N);
    store.set_root("vec", vec).unwrap();
    let mut counts: Counts = StoreMap::with_hasher_in(FixedState::with_seed(1), alloc);
    counts.extend((0..N).map(|k| (k, value(k))));
    store.set_root("counts", counts).unwrap();
    let mut postings: Postings = StoreMap::with_hasher_in(FixedState::with_seed(2), alloc);
    for k in 0..50u64 {
        let mut list = StoreVec::new_in(alloc);
        list.extend((0..k as u32 * 10).map(|i| i * 3));
        postings.insert(k, list);
    }
    store.set_root("postings", postings).unwrap();
    let mut shards: Shards = StoreVec::new_in(alloc);
    for s in 0..8u32 {
        let mut m = StoreMap::with_hasher_in(FixedState::with_seed(3), alloc);
        // Every other map stays empty: its table is hashbrown's static.
        if s % 2 == 1 {
            m.extend((0..1000).map(|i| (i, i + s)));
        }
        shards.push(m);
    }
    store.set_root("shards", shards).unwrap();
}

/// Checks every entry of the four roots, as `build` made them and `grow` changed them.
fn verify(store: &Store, grown: bool) {
    let vec = store.root::<StoreVec<u64>>("vec").unwrap();
    let len = if grown { 2 * N } else { N };
    assert_eq!(vec.len() as u64, len);
    assert!(vec.iter().copied().eq(0..len));
    let counts = store.root::<Counts>("counts").unwrap();
    assert_eq!(counts.len() as u64, if grown { N / 2 } else { N });
    for k in 0..N {
        let expect = (!grown || k % 2 == 0).then(|| value(k));
        assert_eq!(counts.get(&k).copied(), expect, "key {k}");
    }
    let postings = store.root::<Postings>("postings").unwrap();
    assert_eq!(postings.len(), 50);
    for k in 0..50u64 {
        let list = &postings[&k];
        let mut want: Vec<u32> = (0..k as u32 * 10).map(|i| i * 3).collect();
        if grown {
            want.extend(0..100);
        }
        assert!(list.iter().eq(want.iter()), "postings of {k}");
    }
    let shards = store.root::<Shards>("shards").unwrap();
    assert_eq!(shards.len(), 8);
    for (s, m) in shards.iter().enumerate() {
        let s = s as u32;
        let mut want: Vec<(u32, u32)> = if s % 2 == 1 {
            (0..1000).map(|i| (i, i + s)).collect()
        } else {
            Vec::new()
        };
        if grown {
            want.push((5000, s));
        }
        assert_eq!(m.len(), want.len(), "shard {s}");
        for (k, v) in want {
            assert_eq!(m.get(&k), Some(&v), "shard {s} key {k}");
        }
        // Lookups of absent keys read the control bytes, static or not.
        assert_eq!(m.get(&9999), None);
    }
}

/// Grows and shrinks every root: the vector doubles, half the map goes, every list and every
/// shard (the empty ones too) gets new entries.
fn grow(store: &Store) {
    store
        .root_mut::<StoreVec<u64>>("vec")
        .unwrap()
        .extend(N..2 * N);
    let mut counts = store.root_mut::<Counts>("counts").unwrap();
    counts.retain(|k, _| k % 2 == 0);
    counts.shrink_to_fit();
    drop(counts);
    for list in store.root_mut::<Postings>("postings").unwrap().values_mut() {
        list.extend(0..100);
    }
    for (s, m) in store
        .root_mut::<Shards>("shards")
        .unwrap()
        .iter_mut()
        .enumerate()
    {
        m.insert(5000, s as u32);
    }
}

#[test]
fn vectors_and_maps_are_kept_across_processes() {
    let _serial = serial();
    const NAME: &str = "vectors_and_maps_are_kept_across_processes";
    if let Some((role, path)) = role() {
        let store = Store::open(&path).unwrap();
        match role.as_str() {
            "verify-then-grow" => {
                verify(&store, false);
                grow(&store);
                verify(&store, true);
            }
            "verify-grown" => verify(&store, true),
            other => panic!("unknown role {other}"),
        }
        store.close().unwrap();
        return;
    }
    let path = TestPath::new("kept");
    let store = Store::create(&path.0).unwrap();
    build(&store);
    verify(&store, false);
    let stats = store.stats();
    store.close().unwrap();
    in_new_process(NAME, "verify-then-grow", &path.0);
    in_new_process(NAME, "verify-grown", &path.0);
    let store = Store::open(&path.0).unwrap();
    verify(&store, true);
    assert!(store.stats().small_in_use_bytes >= stats.small_in_use_bytes);
    assert!(store.flushes() >= 3, "every clean close is a flush");
}

#[test]
fn empty_maps_reopen_and_take_inserts() {
    let _serial = serial();
    const NAME: &str = "empty_maps_reopen_and_take_inserts";
    type Sets<'s> = StoreVec<'s, StoreSet<'s, u64, FixedState>>;
    if let Some((_, path)) = role() {
        let store = Store::open(&path).unwrap();
        let mut map = store.root_mut::<Counts>("empty").unwrap();
        assert_eq!(map.get(&7), None);
        map.insert(7, 70);
        assert_eq!(map.get(&7), Some(&70));
        let mut sets = store.root_mut::<Sets>("sets").unwrap();
        for (i, set) in sets.iter_mut().enumerate() {
            assert!(!set.contains(&1));
            set.insert(i as u64);
        }
        drop((map, sets));
        store.close().unwrap();
        return;
    }
    let path = TestPath::new("empty");
    let store = Store::create(&path.0).unwrap();
    let alloc = store.allocator();
    let empty: Counts = StoreMap::with_hasher_in(FixedState::default(), alloc);
    store.set_root("empty", empty).unwrap();
    let mut sets: Sets = StoreVec::new_in(alloc);
    sets.resize_with(4, || StoreSet::with_hasher_in(FixedState::default(), alloc));
    store.set_root("sets", sets).unwrap();
    store.close().unwrap();
    in_new_process(NAME, "insert", &path.0);
    let store = Store::open(&path.0).unwrap();
    assert_eq!(store.root::<Counts>("empty").unwrap().get(&7), Some(&70));
    let sets = store.root::<Sets>("sets").unwrap();
    assert!(
        sets.iter()
            .enumerate()
            .all(|(i, s)| s.len() == 1 && s.contains(&(i as u64)))
    );
}

#[test]
fn a_root_opens_only_as_its_own_type() {
    let _serial = serial();
    let path = TestPath::new("types");
    let store = Store::create(&path.0).unwrap();
    let mut v = StoreVec::new_in(store.allocator());
    v.extend([1u64, 2, 3]);
    store.set_root("v", v).unwrap();
    store.set_root("x", 5u64).unwrap();
    store.close().unwrap();
    let store = Store::open(&path.0).unwrap();
    let wrong = |e: Result<(), StoreError>| {
        assert!(matches!(e, Err(StoreError::WrongType { .. })), "{e:?}");
    };
    wrong(store.root::<StoreVec<u32>>("v").map(drop));
    wrong(store.root::<StoreVec<i64>>("v").map(drop));
    wrong(store.root::<Counts>("v").map(drop));
    wrong(store.root::<i64>("x").map(drop));
    wrong(store.root::<(u32, u32)>("x").map(drop));
    wrong(store.root::<[u8; 8]>("x").map(drop));
    assert!(matches!(
        store.root::<u64>("nope"),
        Err(StoreError::NoRoot(_))
    ));
    assert_eq!(*store.root::<u64>("x").unwrap(), 5);
    assert_eq!(store.root::<StoreVec<u64>>("v").unwrap()[..], [1, 2, 3]);
}

#[test]
fn roots_are_lent_like_refcells_and_taken_out() {
    let _serial = serial();
    let path = TestPath::new("lend");
    let store = Store::create(&path.0).unwrap();
    store.set_root("x", 1u32).unwrap();
    assert!(matches!(
        store.set_root("x", 2u32),
        Err(StoreError::RootExists(_))
    ));
    assert!(matches!(
        store.set_root("", 2u32),
        Err(StoreError::BadRootName(_))
    ));
    assert!(matches!(
        store.set_root(&"n".repeat(65), 2u32),
        Err(StoreError::BadRootName(_))
    ));
    {
        let a = store.root::<u32>("x").unwrap();
        let b = store.root::<u32>("x").unwrap();
        assert_eq!(*a + *b, 2);
        assert!(matches!(
            store.root_mut::<u32>("x"),
            Err(StoreError::RootInUse(_))
        ));
    }
    {
        let mut m = store.root_mut::<u32>("x").unwrap();
        *m = 9;
        assert!(matches!(
            store.root::<u32>("x"),
            Err(StoreError::RootInUse(_))
        ));
        assert!(matches!(
            store.take_root::<u32>("x"),
            Err(StoreError::RootInUse(_))
        ));
    }
    assert_eq!(store.take_root::<u32>("x").unwrap(), 9);
    assert!(store.root_names().is_empty());
    for i in 0..31 {
        store.set_root(&format!("r{i}"), i).unwrap();
    }
    assert!(matches!(
        store.set_root("one more", 0),
        Err(StoreError::RootsFull)
    ));
    assert_eq!(store.root_names().len(), 31);
}

#[test]
fn dropped_containers_give_their_blocks_back() {
    let _serial = serial();
    let path = TestPath::new("drop");
    let store = Store::create(&path.0).unwrap();
    let files = || std::fs::read_dir(path.0.join("segs")).unwrap().count();
    let before = (store.stats(), files());
    {
        let mut v = StoreVec::new_in(store.allocator());
        v.extend(0..1_000_000u64);
        let mut m: Counts = StoreMap::with_hasher_in(FixedState::default(), store.allocator());
        m.extend((0..100_000).map(|k| (k, k)));
        let mut small: Counts = StoreMap::with_hasher_in(FixedState::default(), store.allocator());
        small.extend((0..100).map(|k| (k, k)));
        let stats = store.stats();
        assert_eq!(stats.segments, before.0.segments + 2, "{stats:?}");
        assert!(
            stats.small_in_use_bytes > before.0.small_in_use_bytes,
            "{stats:?}"
        );
        v.truncate(10);
        v.shrink_to_fit();
        assert_eq!(v[..], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        assert_eq!(
            store.stats().segments,
            before.0.segments + 1,
            "the vector is small now"
        );
    }
    let after = store.stats();
    assert_eq!((after.segments, files()), (before.0.segments, before.1));
    assert_eq!(after.small_in_use_bytes, before.0.small_in_use_bytes);
    let taken = {
        store.set_root("v", vec_of(&store, 0..10u8)).unwrap();
        store.take_root::<StoreVec<u8>>("v").unwrap()
    };
    assert_eq!(taken[..], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
    drop(taken);
    assert_eq!(
        store.stats().small_in_use_bytes,
        before.0.small_in_use_bytes
    );
}

#[test]
fn a_million_small_vectors_are_kept_in_chunks_not_files() {
    let _serial = serial();
    const NAME: &str = "a_million_small_vectors_are_kept_in_chunks_not_files";
    type Lists<'s> = StoreVec<'s, StoreVec<'s, u32>>;
    const LISTS: u32 = 1_000_000;
    let check = |store: &Store, grown: bool| {
        let lists = store.root::<Lists>("lists").unwrap();
        assert_eq!(lists.len() as u32, LISTS);
        for (i, list) in lists.iter().enumerate() {
            let i = i as u32;
            let len = i % 7 + u32::from(grown && i.is_multiple_of(3));
            assert_eq!(list.len() as u32, len, "list {i}");
            assert!(
                list.iter().enumerate().all(|(j, &x)| x == i ^ j as u32),
                "list {i}"
            );
        }
    };
    if let Some((role, path)) = role() {
        let store = Store::open(&path).unwrap();
        check(&store, false);
        if role == "grow" {
            let mut lists = store.root_mut::<Lists>("lists").unwrap();
            for (i, list) in lists.iter_mut().enumerate().step_by(3) {
                let len = list.len() as u32;
                list.push(i as u32 ^ len);
            }
            drop(lists);
            check(&store, true);
        }
        store.close().unwrap();
        return;
    }
    let path = TestPath::new("million");
    let store = Store::create(&path.0).unwrap();
    let alloc = store.allocator();
    let mut lists: Lists = StoreVec::new_in(alloc);
    for i in 0..LISTS {
        let mut list = StoreVec::new_in(alloc);
        list.extend((0..i % 7).map(|j| i ^ j));
        lists.push(list);
    }
    store.set_root("lists", lists).unwrap();
    let stats = store.stats();
    assert!(stats.segments <= 2, "{stats:?}");
    store.close().unwrap();
    in_new_process(NAME, "grow", &path.0);
    let store = Store::open(&path.0).unwrap();
    check(&store, true);
}

#[test]
fn readers_share_a_store_and_cannot_change_it() {
    let _serial = serial();
    const NAME: &str = "readers_share_a_store_and_cannot_change_it";
    let check = |store: &Store| {
        assert!(!store.is_writable());
        // The empty map is reattached in the reader's private copy.
        assert_eq!(store.root::<Counts>("m").unwrap().get(&1), None);
        assert_eq!(store.root::<StoreVec<u64>>("v").unwrap().len(), 100);
        assert!(matches!(
            store.root_mut::<Counts>("m"),
            Err(StoreError::ReadOnly)
        ));
        assert!(matches!(
            store.set_root("y", 1u8),
            Err(StoreError::ReadOnly)
        ));
        assert!(matches!(store.flush(), Err(StoreError::ReadOnly)));
        // A reader's allocations are temporary blocks, outside the store's range.
        let layout = Layout::new::<u64>();
        let block = store.allocator().allocate(layout).unwrap();
        let (base, len) = store.range();
        assert!(!(base..base + len).contains(&block.cast::<u8>().as_ptr().addr()));
        // SAFETY: the block just allocated, with its layout.
        unsafe { store.allocator().deallocate(block.cast(), layout) };
    };
    if let Some((_, path)) = role() {
        check(&Store::open_read_only(&path).unwrap());
        return;
    }
    let path = TestPath::new("readers");
    let store = Store::create(&path.0).unwrap();
    let m: Counts = StoreMap::with_hasher_in(FixedState::default(), store.allocator());
    store.set_root("m", m).unwrap();
    store.set_root("v", vec_of(&store, 0..100u64)).unwrap();
    assert!(matches!(
        Store::open_read_only(&path.0),
        Err(StoreError::Locked)
    ));
    store.close().unwrap();
    let reader = Store::open_read_only(&path.0).unwrap();
    check(&reader);
    // Another reader in another process at the same time; a writer is refused meanwhile.
    in_new_process(NAME, "reader", &path.0);
    assert!(matches!(Store::open(&path.0), Err(StoreError::Locked)));
    drop(reader);
    Store::open(&path.0).unwrap();
}

#[test]
fn a_second_store_in_the_process_is_refused() {
    let _serial = serial();
    let (a, b) = (TestPath::new("a"), TestPath::new("b"));
    let store = Store::create(&a.0).unwrap();
    assert!(matches!(
        Store::create(&b.0),
        Err(StoreError::AnotherStoreOpen)
    ));
    assert!(!b.0.exists(), "a refused create leaves no folder");
    drop(store);
    Store::create(&b.0).unwrap().close().unwrap();
    assert!(matches!(Store::open(&a.0).map(drop), Ok(())));
}

#[test]
fn a_fork_child_never_writes_its_parents_store() {
    let _serial = serial();
    let path = TestPath::new("fork");
    let store = Store::create(&path.0).unwrap();
    store.set_root("v", vec_of(&store, 0..1000u64)).unwrap();
    let files = || std::fs::read_dir(path.0.join("segs")).unwrap().count();
    let before = files();
    let addr = store.root::<StoreVec<u64>>("v").unwrap().as_ptr() as usize;
    let child = |body: fn(&Store, usize)| {
        // SAFETY: the child runs `body` and `_exit`s at once, never returning into the test
        // harness; no other thread of this test binary holds a lock `body` takes (the tests
        // take turns, and the store's locks are held across fork by its handlers).
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0);
        if pid == 0 {
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| body(&store, addr)));
            // SAFETY: ends the child at once.
            unsafe { libc::_exit(i32::from(ok.is_err())) };
        }
        let mut status = 0;
        // SAFETY: our child; `status` is writable.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        status
    };
    // The child's handle refuses everything, and dropping it is harmless.
    let status = child(|store, _| {
        assert!(matches!(
            store.root::<StoreVec<u64>>("v"),
            Err(StoreError::ForkChild)
        ));
        assert!(matches!(
            store.set_root("w", 1u8),
            Err(StoreError::ForkChild)
        ));
        assert!(matches!(store.flush(), Err(StoreError::ForkChild)));
        // A child's allocations are temporary blocks, outside its parent's store.
        let block = store.allocator().allocate(Layout::new::<u64>()).unwrap();
        let (base, len) = store.range();
        assert!(!(base..base + len).contains(&block.cast::<u8>().as_ptr().addr()));
        // SAFETY: the child's own copy of the handle, dropped once (the child `_exit`s).
        drop(unsafe { std::ptr::read(store) });
    });
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status:#x}"
    );
    // Writing through a pointer taken before the fork changes the child's private copy (its
    // views are copy-on-write), never the parent's store.
    let status = child(|_, addr| {
        // SAFETY: the child's own copy-on-write view of the block.
        unsafe { (addr as *mut u64).write_volatile(42) };
        // SAFETY: as above.
        assert_eq!(unsafe { (addr as *const u64).read_volatile() }, 42);
    });
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status:#x}"
    );
    assert!(
        store
            .root::<StoreVec<u64>>("v")
            .unwrap()
            .iter()
            .copied()
            .eq(0..1000)
    );
    assert_eq!(files(), before);
    store.close().unwrap();
}

#[test]
fn a_changed_hash_function_or_compiler_is_refused_at_open() {
    let _serial = serial();
    let path = TestPath::new("probe");
    let store = Store::create(&path.0).unwrap();
    let mut m: Counts = StoreMap::with_hasher_in(FixedState::default(), store.allocator());
    m.insert(1, 1);
    store.set_root("m", m).unwrap();
    store.close().unwrap();
    let header = path.0.join("header");
    let good = std::fs::read(&header).unwrap();
    // The first root slot starts at byte 128; its hash probe is its seventh word. A build whose
    // foldhash hashed differently would have stored another value there.
    let mut bad = good.clone();
    bad[128 + 6 * 8] ^= 1;
    std::fs::write(&header, &bad).unwrap();
    let store = Store::open(&path.0).unwrap();
    assert!(matches!(
        store.root::<Counts>("m"),
        Err(StoreError::HasherChanged(_))
    ));
    store.close().unwrap();
    // The compiler's fingerprint: byte 56.
    let mut other = std::fs::read(&header).unwrap();
    other[56] ^= 1;
    std::fs::write(&header, &other).unwrap();
    assert!(matches!(Store::open(&path.0), Err(StoreError::OtherBuild)));
}

#[test]
fn a_snapshot_is_what_recover_goes_back_to() {
    let _serial = serial();
    let path = TestPath::new("snapshot");
    let store = Store::create(&path.0).unwrap();
    store.set_root("v", vec_of(&store, 0..1000u64)).unwrap();
    assert!(matches!(Store::recover(&path.0), Err(StoreError::Locked)));
    let snap = store.snapshot().unwrap();
    assert_eq!((snap.number, store.snapshots()), (1, 1));
    assert!(snap.bytes >= 8000);
    store
        .root_mut::<StoreVec<u64>>("v")
        .unwrap()
        .extend(1000..2000);
    store.set_root("w", 5u8).unwrap();
    store.close().unwrap();
    // A clean store can be put back too: the second half and the second root are gone.
    let store = Store::recover(&path.0).unwrap();
    assert!(
        store
            .root::<StoreVec<u64>>("v")
            .unwrap()
            .iter()
            .copied()
            .eq(0..1000)
    );
    assert!(matches!(store.root::<u8>("w"), Err(StoreError::NoRoot(_))));
    store.close().unwrap();
    let empty = TestPath::new("no-snapshot");
    Store::create(&empty.0).unwrap().close().unwrap();
    assert!(matches!(
        Store::recover(&empty.0),
        Err(StoreError::NoSnapshot)
    ));
}

/// Batches the killed writers add: keys `[b * BATCH, (b + 1) * BATCH)`.
const BATCH: u64 = 64;
/// The writers stop adding after this many batches (and only commit).
const MAX_BATCHES: u64 = 4000;
/// The words of `marks`, all rewritten in place by every batch.
const MARKS: usize = 4096;

/// What a killed writer prints once it has the store open, and after each commit.
const OPENED: &str = "writer: store open";
const COMMITTED: &str = "writer: committed ";

/// Checks that the store holds exactly `batches` batches: the map, the vector, the small
/// vectors, the marks rewritten in place and the count.
fn holds_exactly(store: &Store) -> u64 {
    let batches = *store.root::<u64>("batches").unwrap();
    let keys = batches * BATCH;
    let map = store.root::<Counts>("m").unwrap();
    assert_eq!(map.len() as u64, keys);
    assert!((0..keys).all(|k| map.get(&k) == Some(&value(k))));
    let vec = store.root::<StoreVec<u64>>("v").unwrap();
    assert!(
        vec.iter().copied().eq(0..keys),
        "the vector of {batches} batches"
    );
    let smalls = store.root::<StoreVec<StoreVec<u64>>>("smalls").unwrap();
    assert_eq!(smalls.len() as u64, batches);
    assert!(
        smalls
            .iter()
            .enumerate()
            .all(|(b, s)| s.iter().eq([b as u64; 3].iter()))
    );
    let marks = store.root::<StoreVec<u64>>("marks").unwrap();
    assert!(
        marks.iter().all(|&m| m == batches),
        "marks of {batches} batches"
    );
    batches
}

/// The model test of commits: writers killed (`SIGKILL`) at random instants while they add
/// batches (inserts into a map that grows, a vector whose segment grows and moves, small
/// blocks, and in-place rewrites of committed pages), commit after each one and take a
/// snapshot every tenth. Every reopen (with no other call) holds exactly the last batch a
/// commit returned `Ok` for, or the next (a commit that had reached its commit point when the
/// writer died); never less, never a mix.
#[test]
fn writers_killed_at_random_reopen_at_their_last_commit() {
    let _serial = serial();
    const NAME: &str = "writers_killed_at_random_reopen_at_their_last_commit";
    if let Some((_, path)) = role() {
        let store = Store::open(&path).unwrap();
        println!("{OPENED}");
        std::io::Write::flush(&mut std::io::stdout()).unwrap();
        loop {
            let batches = *store.root::<u64>("batches").unwrap();
            if batches < MAX_BATCHES {
                let keys = batches * BATCH..(batches + 1) * BATCH;
                let mut map = store.root_mut::<Counts>("m").unwrap();
                map.extend(keys.clone().map(|k| (k, value(k))));
                store.root_mut::<StoreVec<u64>>("v").unwrap().extend(keys);
                drop(map);
                store
                    .root_mut::<StoreVec<StoreVec<u64>>>("smalls")
                    .unwrap()
                    .push(vec_of(&store, [batches; 3]));
                store
                    .root_mut::<StoreVec<u64>>("marks")
                    .unwrap()
                    .fill(batches + 1);
                *store.root_mut::<u64>("batches").unwrap() += 1;
            }
            if (batches + 1).is_multiple_of(10) {
                store.snapshot().unwrap();
            } else {
                store.commit().unwrap();
            }
            println!("{COMMITTED}{}", (batches + 1).min(MAX_BATCHES));
            std::io::Write::flush(&mut std::io::stdout()).unwrap();
        }
    }
    let path = TestPath::new("killed");
    let store = Store::create(&path.0).unwrap();
    let m: Counts = StoreMap::with_hasher_in(FixedState::default(), store.allocator());
    store.set_root("m", m).unwrap();
    store.set_root("v", vec_of::<u64>(&store, [])).unwrap();
    let smalls: StoreVec<StoreVec<u64>> = StoreVec::new_in(store.allocator());
    store.set_root("smalls", smalls).unwrap();
    store
        .set_root("marks", vec_of(&store, [0u64; MARKS]))
        .unwrap();
    store.set_root("batches", 0u64).unwrap();
    store.close().unwrap();
    let mut seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    println!("seed {seed}");
    let runs = std::env::var("MMAPVEC_KILL_RUNS").map_or(200, |n| n.parse().unwrap());
    let (mut in_progress, mut last) = (0, 0);
    for run in 0..runs {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", NAME, "--nocapture", "--test-threads=1"])
            .env(ROLE, "writer")
            .env(PATH, &path.0)
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Waits for the writer to have the store open (a loaded machine may take long to
        // start it), then lets it work for 0 to 250 ms; a thread reads what it reports.
        let mut lines =
            std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
        assert!(
            // libtest prints "test <name> ... " before the test's own output, on one line.
            lines.any(|line| line.is_ok_and(|l| l.ends_with(OPENED))),
            "run {run}: the writer never opened the store"
        );
        let reader = std::thread::spawn(move || {
            lines
                .map_while(Result::ok)
                .filter_map(|l| l.strip_prefix(COMMITTED).map(|n| n.parse::<u64>().unwrap()))
                .last()
        });
        std::thread::sleep(std::time::Duration::from_millis(seed % 250));
        child.kill().unwrap();
        child.wait().unwrap();
        let reported = reader.join().unwrap().unwrap_or(last);
        let store =
            Store::open(&path.0).unwrap_or_else(|e| panic!("run {run} (seed above): {e:?}"));
        assert!(store.recovered().is_some(), "run {run}: killed, yet closed");
        let batches = holds_exactly(&store);
        assert!(
            batches == reported || batches == (reported + 1).min(MAX_BATCHES),
            "run {run}: {batches} batches, the last commit that returned Ok had {reported}"
        );
        in_progress += u32::from(batches != reported);
        last = batches;
        store.close().unwrap();
    }
    println!(
        "{runs} writers killed: {last} batches kept, {in_progress} reopened at a commit that \
         was under way when its writer died"
    );
    assert!(last > 0, "no writer got a batch committed");
}

/// Threads share one store: each builds, grows, shrinks and drops vectors of every size (small
/// blocks and segments) and a map, checking every byte, while the main thread flushes, takes
/// snapshots and reads the stats. At the end the store holds what it held before, and a new
/// process finds the root the threads kept.
#[test]
fn threads_share_a_store() {
    let _serial = serial();
    const NAME: &str = "threads_share_a_store";
    if let Some((_, path)) = role() {
        let store = Store::open(&path).unwrap();
        let kept = store.root::<StoreVec<StoreVec<u64>>>("kept").unwrap();
        assert_eq!(kept.len(), 4);
        for (t, v) in kept.iter().enumerate() {
            assert!(v.iter().copied().eq((0..5000).map(|i| i * 4 + t as u64)));
        }
        return;
    }
    let path = TestPath::new("threads");
    let store = Store::create(&path.0).unwrap();
    let before = store.stats();
    let stop = std::sync::atomic::AtomicBool::new(false);
    let kept: Vec<StoreVec<u64>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4u64)
            .map(|t| {
                let store = &store;
                scope.spawn(move || {
                    let alloc = store.allocator();
                    let mut seed = 0x9e37_79b9_7f4a_7c15u64 ^ t;
                    for round in 0..60u64 {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        // 1 to 256 Ki elements: 8 B to 2 MiB, both sides of the tier's limit.
                        let len = 1 + (seed % (1 << (round % 19))) as usize;
                        let fill = (t << 32) | round;
                        let mut v: StoreVec<u64> = StoreVec::new_in(alloc);
                        v.resize(len, fill);
                        v.extend((0..len as u64).map(|i| i ^ fill));
                        v.truncate(len / 2 + 1);
                        v.shrink_to_fit();
                        assert!(v[..len.min(len / 2 + 1)].iter().all(|&x| x == fill));
                        let mut m: Counts = StoreMap::with_hasher_in(FixedState::default(), alloc);
                        m.extend((0..(len as u64).min(3000)).map(|k| (k, k ^ fill)));
                        assert!((0..(len as u64).min(3000)).all(|k| m[&k] == k ^ fill));
                    }
                    let mut keep = StoreVec::new_in(alloc);
                    keep.extend((0..5000).map(|i| i * 4 + t));
                    keep
                })
            })
            .collect();
        let watcher = scope.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                store.flush().unwrap();
                store.snapshot().unwrap();
                let _ = store.stats();
            }
        });
        let kept = workers.into_iter().map(|w| w.join().unwrap()).collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        watcher.join().unwrap();
        kept
    });
    let mut outer = StoreVec::new_in(store.allocator());
    outer.extend(kept);
    store.set_root("kept", outer).unwrap();
    drop(store.take_root::<StoreVec<StoreVec<u64>>>("kept").unwrap());
    let after = store.stats();
    assert_eq!(
        (after.segments, after.small_in_use_bytes),
        (before.segments, before.small_in_use_bytes),
        "{after:?}"
    );
    let mut outer = StoreVec::new_in(store.allocator());
    for t in 0..4u64 {
        let mut v = StoreVec::new_in(store.allocator());
        v.extend((0..5000).map(|i| i * 4 + t));
        outer.push(v);
    }
    store.set_root("kept", outer).unwrap();
    store.close().unwrap();
    in_new_process(NAME, "verify", &path.0);
}
