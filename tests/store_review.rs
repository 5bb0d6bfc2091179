//! Outside review of the store's unsafe code (issue 13): adversarial tests.
//!
//! Tests named after a finding of the review failed before its fix (each says which; all are
//! fixed now);
//! the others pin down behaviour the review checked and found sound. Reopens that must happen
//! in a fresh address space re-run this binary (as `tests/store.rs` does).
#![cfg(feature = "hashbrown")]

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::AtomicU64;

use allocator_api2::alloc::{Allocator, Layout};
use mmapvec::store::{FixedState, Store, StoreBox, StoreError, StoreMap, StoreSet, StoreVec};

mod store_support;
use store_support::{TestPath, in_new_process, role, serial};

/// What the store holds: segments and bytes of live small blocks (0 and 0: nothing).
fn live(store: &Store) -> u64 {
    let stats = store.stats();
    stats.segments as u64 + stats.small_in_use_bytes
}

/// Forks; the child runs `body` and `_exit`s (0 if it returned). Returns the wait status.
fn in_fork_child(body: impl FnOnce()) -> i32 {
    // SAFETY: the child runs `body` and `_exit`s at once, never returning into the harness;
    // the tests take turns (`serial`), so no other test thread holds a lock `body` takes.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).is_ok();
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(i32::from(!ok)) };
    }
    let mut status = 0;
    // SAFETY: our child; `status` is writable.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    status
}

fn seg_files(path: &Path) -> Vec<(String, u64)> {
    let mut v: Vec<_> = std::fs::read_dir(path.join("segs"))
        .unwrap()
        // Not the list of segments (`.manifest`).
        .filter(|e| {
            !e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .starts_with('.')
        })
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().into_string().unwrap(),
                e.metadata().unwrap().len(),
            )
        })
        .collect();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------
// Findings (ignored: they fail today).
// ---------------------------------------------------------------------------------------------

/// FINDING, fixed since (soundness, hostile folder): `Space::open` checks `span <= end - addr` after
/// `addr >= start` but never `addr < end`. A segment named after an address past the range
/// makes `end - addr` underflow: a panic (arithmetic overflow) in debug builds, and in release
/// builds the check passes, the file is mapped with `MAP_FIXED` outside the store's range
/// (over whatever the process has there), and `take_range` puts `[last free start, addr)` in
/// the free ranges, which reach past the range too. Expected: `StoreError::NotAStore`.
#[test]
fn a_segment_past_the_range_is_refused() {
    let _serial = serial();
    let path = TestPath::new("past");
    let store = Store::create_with_range(&path.0, 64 << 20).unwrap();
    let (base, len) = store.range();
    store.close().unwrap();
    // A page of this process's own, past the store's range: the "someone else's mapping".
    let page = 4096usize;
    let hint = base + len + (1 << 30);
    // SAFETY: a fresh anonymous mapping at a hint (no MAP_FIXED): nothing of ours replaced.
    let victim = unsafe {
        libc::mmap(
            hint as *mut libc::c_void,
            page,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_eq!(victim as usize, hint, "the hint was free");
    // SAFETY: our page, read/write.
    unsafe { std::ptr::write_bytes(victim.cast::<u8>(), 0xAA, page) };
    std::fs::write(
        path.0.join("segs").join(format!("{hint:x}-{page:x}")),
        vec![0x55u8; page],
    )
    .unwrap();
    let opened = std::panic::catch_unwind(|| Store::open(&path.0).map(drop));
    // SAFETY: our page (or, after the bug, a view of the hostile file mapped over it).
    let first = unsafe { victim.cast::<u8>().read_volatile() };
    assert_eq!(
        first, 0xAA,
        "the store mapped its file over a page outside its range"
    );
    match opened {
        Ok(Err(StoreError::NotAStore)) => {}
        Ok(other) => panic!("expected NotAStore, got {other:?}"),
        Err(_) => panic!("Store::open panicked (arithmetic overflow in Space::open)"),
    }
}

/// A static of this process that a hostile header points a root at.
static TARGET: AtomicU64 = AtomicU64::new(0x5EC2_E7DA_7A00_0001);

/// FINDING, fixed since (soundness, hostile/corrupt header): `borrow_root` trusts the slot's `addr`: it is
/// neither checked to lie in a block of the store (or even in the range) nor to be aligned for
/// `T`. A header whose root slot points anywhere makes `root`/`root_mut` hand out references to
/// arbitrary memory of the process (here: a static of the program; `root_mut` would write it).
/// Expected: an error (`NotAStore`).
#[test]
fn a_root_slot_pointing_outside_the_store_is_refused() {
    let _serial = serial();
    let path = TestPath::new("rootaddr");
    let store = Store::create_with_range(&path.0, 64 << 20).unwrap();
    store.set_root("x", 1u64).unwrap();
    store.close().unwrap();
    let header = path.0.join("header");
    let mut bytes = std::fs::read(&header).unwrap();
    // Slot 0 at byte 128; its address is its second word.
    let target = &TARGET as *const AtomicU64 as u64;
    bytes[128 + 8..128 + 16].copy_from_slice(&target.to_ne_bytes());
    std::fs::write(&header, &bytes).unwrap();
    let store = Store::open(&path.0).unwrap();
    let got = store.root::<u64>("x").map(|r| *r);
    store.close().unwrap();
    assert!(
        got.is_err(),
        "the root was read from the program's static: {got:x?}"
    );
}

/// FINDING, fixed since (soundness, hostile folder): two segment names that are hard links to one file are
/// mapped as two blocks that alias. Here a `Root` and a `RootMut` of two roots see each other's
/// writes (a `&` and a `&mut` to the same bytes). Expected: refused at open (`st_nlink != 1`,
/// or two names with one inode).
#[test]
fn hard_linked_segments_are_refused() {
    let _serial = serial();
    let path = TestPath::new("hardlink");
    let store = Store::create_with_range(&path.0, 64 << 20).unwrap();
    let a: StoreVec<u64> = {
        // Larger than the small-block tier serves: a segment file of its own.
        let mut v = StoreVec::with_capacity_in(100_000, store.allocator());
        v.extend(0..100_000u64);
        v
    };
    let b: StoreVec<u64> = {
        let mut v = StoreVec::with_capacity_in(100_000, store.allocator());
        v.extend(1000..101_000u64);
        v
    };
    store.set_root("a", a).unwrap();
    store.set_root("b", b).unwrap();
    store.close().unwrap();
    // Segment files are numbered in the order they were made: `a`'s, then `b`'s.
    let files = seg_files(&path.0);
    assert_eq!(files.len(), 2, "{files:?}");
    let segs = path.0.join("segs");
    let (fa, fb) = (segs.join(&files[0].0), segs.join(&files[1].0));
    assert_eq!(
        std::fs::metadata(&fa).unwrap().len(),
        std::fs::metadata(&fb).unwrap().len()
    );
    std::fs::remove_file(&fb).unwrap();
    std::fs::hard_link(&fa, &fb).unwrap();
    assert_eq!(std::fs::metadata(&fb).unwrap().nlink(), 2);
    let store = match Store::open(&path.0) {
        Err(_) => return,
        Ok(store) => store,
    };
    let aliased = {
        let read_b = store.root::<StoreVec<u64>>("b").unwrap();
        let mut write_a = store.root_mut::<StoreVec<u64>>("a").unwrap();
        let before = read_b[0];
        write_a[0] = 4242;
        before != read_b[0]
    };
    store.close().unwrap();
    panic!("open accepted hard-linked segments (aliasing seen through a shared root: {aliased})");
}

/// FINDING, fixed since (minor): `Store::flushes` reads the header without `check_use`: in a fork child the
/// header's page is a hole filled with an inaccessible reservation (`MADV_DONTFORK`), so a safe
/// call dies of `SIGSEGV` (a reference to unmapped memory) instead of answering or erroring.
#[test]
fn flushes_in_a_fork_child_does_not_fault() {
    let _serial = serial();
    let path = TestPath::new("flushes");
    let store = Store::create_with_range(&path.0, 64 << 20).unwrap();
    let status = in_fork_child(|| {
        let _ = std::hint::black_box(store.flushes());
    });
    store.close().unwrap();
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child died: status {status:#x}"
    );
}

/// FINDING, fixed since (contract, minor): a fork child inherits the store's `lock` descriptor, which holds
/// the writer's `flock` (a lock belongs to the open file description the child shares). After
/// the parent closes the store cleanly, nobody (the parent included) can open it until every
/// such child exits or closes it: `Locked`, although no handle that opened it is left. The lock
/// file could be opened again (a new description) after fork in the parent, or the child
/// handler could close it (`FD_CLOEXEC` does not help a child that does not exec).
#[test]
fn a_fork_child_does_not_keep_the_store_locked() {
    let _serial = serial();
    let path = TestPath::new("flock");
    let store = Store::create_with_range(&path.0, 64 << 20).unwrap();
    let (mut fds, mut started) = ([0; 2], [0; 2]);
    // SAFETY: both arrays are writable for two descriptors.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: as above.
    assert_eq!(unsafe { libc::pipe(started.as_mut_ptr()) }, 0);
    // SAFETY: the child only writes, blocks in `read` and `_exit`s (async-signal-safe calls).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let mut byte = 0u8;
        // SAFETY: says it runs (its fork handlers have run: the child lets go of the lock
        // there, not at the fork itself), waits for the parent to close the pipe, then ends.
        unsafe {
            libc::write(started[1], (&byte as *const u8).cast(), 1);
            libc::close(fds[1]);
            libc::read(fds[0], (&mut byte as *mut u8).cast(), 1);
            libc::_exit(0);
        }
    }
    let mut byte = 0u8;
    // SAFETY: the parent's copies of the read end and of the child's "started" pipe; waits
    // for the child to run.
    unsafe {
        libc::close(fds[0]);
        libc::close(started[1]);
        assert_eq!(libc::read(started[0], (&mut byte as *mut u8).cast(), 1), 1);
        libc::close(started[0]);
    }
    store.close().unwrap();
    let reopened = Store::open(&path.0).map(drop);
    // SAFETY: lets the child go, then reaps it.
    unsafe {
        libc::close(fds[1]);
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
    }
    assert!(reopened.is_ok(), "{reopened:?}");
}

/// An allocated table with every slot DELETED: `capacity() == 0` (no items, no growth left)
/// although the table has a block. 128 buckets of 4 KiB values (a 513 KiB table: a segment,
/// past the small-block tier, so that its block is a file the test can count). The keys are
/// chosen by their hash so that they fill the first 112 of the 128 buckets in order; the 16
/// empty slots are then contiguous, and `retain` erases every slot as DELETED (each has a
/// group's width of non-empty slots around it).
type Wide<'s> = StoreMap<'s, u64, [u8; 4096], FixedState>;

fn all_deleted_map(store: &Store) -> Wide<'_> {
    use std::hash::BuildHasher;
    let mut m: Wide =
        StoreMap::with_capacity_and_hasher_in(112, FixedState::default(), store.allocator());
    let buckets = 128u64;
    assert_eq!(m.capacity(), 112, "a table of 128 buckets");
    let mut next = 0u64;
    for slot in 0..112 {
        let key = (next..)
            .find(|k| m.hasher().hash_one(k) % buckets == slot)
            .unwrap();
        next = key + 1;
        m.insert(key, [key as u8; 4096]);
    }
    assert_eq!(m.capacity(), 112);
    m.retain(|_, _| false);
    assert!(m.is_empty());
    assert_eq!(m.capacity(), 0, "every slot DELETED");
    assert!(m.allocation_size() > 0);
    m
}

/// FINDING, fixed since (leak, fixed): `reattach` told an empty table by `capacity() == 0`, which is also
/// true of an allocated table whose every slot is DELETED (items 0, growth_left 0). Such a
/// table was overwritten with a fresh empty one without being freed: its block (a file of the
/// store) leaked for good. `allocation_size() == 0` tells the static singleton exactly.
#[test]
fn reattach_does_not_leak_an_all_deleted_table() {
    let _serial = serial();
    let path = TestPath::new("deleted");
    let store = Store::create_with_range(&path.0, 256 << 20).unwrap();
    // Control: in the session that made it (no reattach), taking and dropping frees all.
    store.set_root("c", all_deleted_map(&store)).unwrap();
    assert!(store.stats().segments >= 1, "the table is a segment");
    drop(store.take_root::<Wide>("c").unwrap());
    assert_eq!(live(&store), 0);
    let m = all_deleted_map(&store);
    store.set_root("m", m).unwrap();
    store.close().unwrap();
    let store = Store::open(&path.0).unwrap();
    let m = store.take_root::<Wide>("m").unwrap();
    drop(m);
    let left = live(&store);
    store.close().unwrap();
    assert_eq!(
        left, 0,
        "blocks left after the only root was taken and dropped"
    );
}

// ---------------------------------------------------------------------------------------------
// Checked and found sound.
// ---------------------------------------------------------------------------------------------

type M<'s, V> = StoreMap<'s, u64, V, FixedState>;
type Nested<'s> = (
    Option<M<'s, u64>>,
    StoreBox<'s, M<'s, u64>>,
    [M<'s, u32>; 2],
    M<'s, M<'s, u64>>,
    StoreVec<'s, (u8, StoreSet<'s, u64, FixedState>)>,
    StoreVec<'s, StoreVec<'s, Option<M<'s, u64>>>>,
);

fn nested_empty(store: &Store) -> Nested<'_> {
    let a = store.allocator();
    let map = || M::<u64>::with_hasher_in(FixedState::default(), a);
    let mut outer: M<M<u64>> = M::with_hasher_in(FixedState::default(), a);
    outer.insert(1, map());
    outer.insert(2, map());
    let mut sets = StoreVec::new_in(a);
    sets.push((1, StoreSet::with_hasher_in(FixedState::default(), a)));
    let mut inner = StoreVec::new_in(a);
    inner.push(Some(map()));
    inner.push(None);
    let mut vv = StoreVec::new_in(a);
    vv.push(inner);
    (
        Some(map()),
        StoreBox::new_in(map(), a),
        [
            M::with_hasher_in(FixedState::default(), a),
            M::with_hasher_in(FixedState::default(), a),
        ],
        outer,
        sets,
        vv,
    )
}

fn fill_nested(n: &mut Nested<'_>) {
    n.0.as_mut().unwrap().insert(7, 7);
    n.1.insert(7, 7);
    n.2[0].insert(7, 7);
    n.2[1].insert(7, 7);
    for v in n.3.values_mut() {
        v.insert(7, 7);
    }
    n.4[0].1.insert(7);
    n.5[0][0].as_mut().unwrap().insert(7, 7);
}

fn check_nested(n: &Nested<'_>, filled: bool) {
    let want = filled.then_some(&7u64);
    assert_eq!(n.0.as_ref().unwrap().get(&7), want);
    assert_eq!(n.1.get(&7), want);
    assert_eq!(n.2[0].get(&7).map(|&x| u64::from(x)).as_ref(), want);
    assert_eq!(n.2[1].get(&7).map(|&x| u64::from(x)).as_ref(), want);
    assert_eq!(n.3.len(), 2);
    for v in n.3.values() {
        assert_eq!(v.get(&7), want);
    }
    assert_eq!(n.4[0].1.contains(&7), filled);
    assert_eq!(n.5[0][0].as_ref().unwrap().get(&7), want);
    assert!(n.5[0][1].is_none());
}

/// Empty maps in every nesting the crate implements `Persist` for (an `Option`, a box, an
/// array, map values, sets in tuples in vectors, options in vectors of vectors), reopened in
/// fresh processes: read-only (lookups read the control bytes), then taken out with
/// `take_root`, then through `root_mut`, and inserted into.
#[test]
fn empty_maps_in_every_nesting_are_reattached() {
    let _serial = serial();
    match role() {
        None => {
            let path = TestPath::new("nested");
            let store = Store::create_with_range(&path.0, 1 << 30).unwrap();
            store.set_root("n", nested_empty(&store)).unwrap();
            store.set_root("t", nested_empty(&store)).unwrap();
            store.close().unwrap();
            let name = "empty_maps_in_every_nesting_are_reattached";
            in_new_process(name, "reader", &path.0);
            in_new_process(name, "taker", &path.0);
            in_new_process(name, "writer", &path.0);
            in_new_process(name, "verifier", &path.0);
        }
        Some((role, path)) if role == "reader" => {
            let store = Store::open_read_only(&path).unwrap();
            check_nested(&store.root::<Nested>("n").unwrap(), false);
            check_nested(&store.root::<Nested>("t").unwrap(), false);
        }
        Some((role, path)) if role == "taker" => {
            let store = Store::open(&path).unwrap();
            let mut t = store.take_root::<Nested>("t").unwrap();
            fill_nested(&mut t);
            check_nested(&t, true);
            store.set_root("t", t).unwrap();
            store.close().unwrap();
        }
        Some((role, path)) if role == "writer" => {
            let store = Store::open(&path).unwrap();
            let mut n = store.root_mut::<Nested>("n").unwrap();
            check_nested(&n, false);
            fill_nested(&mut n);
            drop(n);
            store.close().unwrap();
        }
        Some((role, path)) => {
            assert_eq!(role, "verifier");
            let store = Store::open_read_only(&path).unwrap();
            check_nested(&store.root::<Nested>("n").unwrap(), true);
            check_nested(&store.root::<Nested>("t").unwrap(), true);
        }
    }
}

/// The `Allocator` contract: zero sizes, alignments above a page, grown bytes zeroed (after
/// the whole returned block was written, and after a shrink), contents kept across an in-place
/// grow, a move and a shrink, blocks given back, and refusals in a reader and a fork child.
#[test]
fn the_allocator_contract_holds() {
    let _serial = serial();
    let path = TestPath::new("contract");
    let store = Store::create_with_range(&path.0, 1 << 30).unwrap();
    let a = store.allocator();
    let page = 4096;
    // Zero sizes: dangling, aligned, and every method accepts them.
    for align in [1, 8, 4096, 1 << 21] {
        let l = Layout::from_size_align(0, align).unwrap();
        let p = a.allocate(l).unwrap();
        assert_eq!(p.len(), 0);
        assert!((p.cast::<u8>().as_ptr() as usize).is_multiple_of(align));
        // SAFETY: the zero-size block just made.
        unsafe { a.deallocate(p.cast(), l) };
    }
    assert_eq!(live(&store), 0);
    // Alignment above a page.
    for align in [1 << 13, 1 << 16, 1 << 21, 1 << 24] {
        let l = Layout::from_size_align(100, align).unwrap();
        let p = a.allocate(l).unwrap();
        assert!((p.cast::<u8>().as_ptr() as usize).is_multiple_of(align));
        // SAFETY: the block just made.
        unsafe { a.deallocate(p.cast(), l) };
    }
    assert_eq!(live(&store), 0);
    // grow_zeroed after the whole block was written.
    let l1 = Layout::from_size_align(100, 8).unwrap();
    let p = a.allocate(l1).unwrap();
    assert!(p.len() >= 100);
    // SAFETY: the block is `p.len()` bytes, ours.
    unsafe { p.cast::<u8>().as_ptr().write_bytes(0xFF, p.len()) };
    let l2 = Layout::from_size_align(3 * page, 8).unwrap();
    // SAFETY: `p` with the layout it was made with.
    let q = unsafe { a.grow_zeroed(p.cast(), l1, l2) }.unwrap();
    // SAFETY: `q` is `q.len()` bytes, ours.
    let bytes = unsafe { std::slice::from_raw_parts(q.cast::<u8>().as_ptr(), q.len()) };
    assert!(bytes[..100].iter().all(|&b| b == 0xFF));
    assert!(
        bytes[100..].iter().all(|&b| b == 0),
        "grow_zeroed left old bytes"
    );
    // Shrink, then grow_zeroed past it: the bytes past the shrink read zero.
    // SAFETY: ours.
    unsafe { q.cast::<u8>().as_ptr().write_bytes(0xEE, q.len()) };
    let l3 = Layout::from_size_align(10, 8).unwrap();
    // SAFETY: `q` with `l2`.
    let r = unsafe { a.shrink(q.cast(), l2, l3) }.unwrap();
    assert!(r.len() >= 10);
    // Past the span (64 KiB): a move, contents kept, the new part zeroed.
    let l4 = Layout::from_size_align(1 << 20, 8).unwrap();
    // SAFETY: `r` with `l3`.
    let s = unsafe { a.grow_zeroed(r.cast(), l3, l4) }.unwrap();
    assert_ne!(s.cast::<u8>(), r.cast::<u8>(), "moved");
    // SAFETY: ours.
    let bytes = unsafe { std::slice::from_raw_parts(s.cast::<u8>().as_ptr(), s.len()) };
    assert!(bytes[..10].iter().all(|&b| b == 0xEE));
    assert!(bytes[10..].iter().all(|&b| b == 0));
    // A grow to a larger alignment than the block has: moved, contents kept.
    let l5 = Layout::from_size_align(2 << 20, 1 << 23).unwrap();
    // SAFETY: `s` with `l4`.
    let t = unsafe { a.grow(s.cast(), l4, l5) }.unwrap();
    assert!((t.cast::<u8>().as_ptr() as usize).is_multiple_of(1 << 23));
    // SAFETY: ours.
    assert_eq!(unsafe { t.cast::<u8>().as_ptr().read() }, 0xEE);
    // Shrink to zero: the block is freed.
    // SAFETY: `t` with `l5`.
    let u = unsafe { a.shrink(t.cast(), l5, Layout::from_size_align(0, 8).unwrap()) }.unwrap();
    assert_eq!(u.len(), 0);
    assert_eq!(live(&store), 0);
    assert!(seg_files(&path.0).is_empty());
    // Huge requests fail cleanly.
    assert!(
        a.allocate(Layout::from_size_align(isize::MAX as usize - 4095, 4096).unwrap())
            .is_err()
    );
    // A fork child: its blocks are temporary ones, a store block it grows or shrinks is
    // copied out, its deallocation is a no-op, and the files are untouched.
    let v = a.allocate(Layout::new::<[u64; 64]>()).unwrap();
    // SAFETY: the block just allocated, 512 bytes.
    unsafe { v.cast::<u8>().as_ptr().write_bytes(0x5A, 512) };
    let files = seg_files(&path.0);
    let (base, len) = store.range();
    let outside = move |p: std::ptr::NonNull<[u8]>| {
        !(base..base + len).contains(&p.cast::<u8>().as_ptr().addr())
    };
    let status = in_fork_child(|| {
        let l = Layout::new::<[u64; 64]>();
        let mine = a.allocate(l).unwrap();
        assert!(outside(mine));
        // SAFETY: `v` with its layout.
        let grown = unsafe { a.grow(v.cast(), l, Layout::new::<[u64; 4096]>()) }.unwrap();
        assert!(outside(grown));
        // SAFETY: the grown block keeps the first 512 bytes.
        assert_eq!(unsafe { grown.cast::<u8>().as_ptr().add(511).read() }, 0x5A);
        // SAFETY: as above.
        let shrunk = unsafe { a.shrink(v.cast(), l, Layout::new::<u64>()) }.unwrap();
        assert!(outside(shrunk));
        // SAFETY: as above; a no-op for the store's block.
        unsafe { a.deallocate(v.cast(), l) };
        // SAFETY: the temporary blocks, with their layouts.
        unsafe {
            a.deallocate(mine.cast(), l);
            a.deallocate(grown.cast(), Layout::new::<[u64; 4096]>());
            a.deallocate(shrunk.cast(), Layout::new::<u64>());
        }
    });
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{status:#x}"
    );
    assert_eq!(seg_files(&path.0), files);
    // SAFETY: the parent's block is still there, as it was.
    assert_eq!(unsafe { v.cast::<u8>().as_ptr().add(511).read() }, 0x5A);
    // SAFETY: `v` with its layout.
    unsafe { a.deallocate(v.cast(), Layout::new::<[u64; 64]>()) };
    store.close().unwrap();
    // A reader allocates temporary blocks only.
    let store = Store::open_read_only(&path.0).unwrap();
    let (base, len) = store.range();
    let l = Layout::new::<u64>();
    let block = store.allocator().allocate(l).unwrap();
    assert!(!(base..base + len).contains(&block.cast::<u8>().as_ptr().addr()));
    // SAFETY: the block just allocated.
    unsafe { store.allocator().deallocate(block.cast(), l) };
    assert!(store.allocator().allocate(Layout::new::<()>()).is_ok());
    store.close().unwrap();
}

/// A root read as any other type is an error: element types, signedness, map values, options,
/// tuples' order, boxes, hashers.
#[test]
fn roots_are_only_read_as_their_own_type() {
    let _serial = serial();
    let path = TestPath::new("types");
    let store = Store::create_with_range(&path.0, 1 << 30).unwrap();
    let a = store.allocator();
    store.set_root("v", StoreVec::<u64>::new_in(a)).unwrap();
    store
        .set_root("m", M::<u64>::with_hasher_in(FixedState::default(), a))
        .unwrap();
    store.set_root("t", (1u32, 2u64)).unwrap();
    store.set_root("o", Some(3u64)).unwrap();
    store.set_root("b", StoreBox::new_in(4u64, a)).unwrap();
    store.close().unwrap();
    let store = Store::open(&path.0).unwrap();
    let wrong = |r: Result<(), StoreError>| {
        assert!(matches!(r, Err(StoreError::WrongType { .. })), "{r:?}")
    };
    wrong(store.root::<StoreVec<i64>>("v").map(drop));
    wrong(store.root::<StoreVec<f64>>("v").map(drop));
    wrong(store.root::<StoreVec<[u32; 2]>>("v").map(drop));
    wrong(store.root::<M<u32>>("m").map(drop));
    wrong(store.root::<M<i64>>("m").map(drop));
    wrong(
        store
            .root::<StoreMap<u64, u64, foldhash::quality::FixedState>>("m")
            .map(drop),
    );
    wrong(store.root::<(u64, u32)>("t").map(drop));
    wrong(store.root::<(i32, u64)>("t").map(drop));
    wrong(store.root::<u128>("t").map(drop));
    wrong(store.root::<(u64, u64)>("o").map(drop));
    wrong(store.root::<Option<i64>>("o").map(drop));
    wrong(store.root::<StoreBox<i64>>("b").map(drop));
    wrong(store.root::<usize>("b").map(drop));
    assert_eq!(*store.root::<StoreBox<u64>>("b").unwrap().as_ref(), 4);
    assert_eq!(*store.root::<Option<u64>>("o").unwrap(), Some(3));
    store.close().unwrap();
}

/// A hostile `segs/` folder is an error, never a panic, a fault or a mapping: names that do
/// not parse, spans that overlap or leave the range, files of odd or zero length, a symbolic
/// link, a folder, non-canonical names.
#[test]
fn hostile_segment_folders_are_errors() {
    let _serial = serial();
    let path = TestPath::new("hostile");
    let store = Store::create_with_range(&path.0, 64 << 20).unwrap();
    let (base, len) = store.range();
    let v: StoreVec<u64> = {
        let mut v = StoreVec::new_in(store.allocator());
        v.extend(0..10u64);
        v
    };
    let block = v.as_ptr() as usize;
    store.set_root("v", v).unwrap();
    store.close().unwrap();
    let segs = path.0.join("segs");
    let start = base + (4 << 20);
    let page = 4096usize;
    type Make = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Make)> = vec![
        (
            "garbage name",
            Box::new(|d: &Path| std::fs::write(d.join("hello"), [0u8; 4096]).unwrap()),
        ),
        (
            "odd length",
            Box::new(move |d: &Path| {
                std::fs::write(d.join(format!("{:x}-10000", start + (8 << 20))), [0u8; 100])
                    .unwrap()
            }),
        ),
        (
            "zero length",
            Box::new(move |d: &Path| {
                std::fs::write(d.join(format!("{:x}-10000", start + (8 << 20))), []).unwrap()
            }),
        ),
        (
            "longer than span",
            Box::new(move |d: &Path| {
                std::fs::write(
                    d.join(format!("{:x}-1000", start + (8 << 20))),
                    vec![0u8; 2 * page],
                )
                .unwrap()
            }),
        ),
        (
            "before the range",
            Box::new(move |d: &Path| {
                std::fs::write(d.join(format!("{:x}-1000", base)), vec![0u8; page]).unwrap()
            }),
        ),
        (
            "ends past the range",
            Box::new(move |d: &Path| {
                std::fs::write(
                    d.join(format!("{:x}-2000", base + len - page)),
                    vec![0u8; page],
                )
                .unwrap()
            }),
        ),
        (
            "overlaps",
            Box::new(move |d: &Path| {
                std::fs::write(d.join(format!("{:x}-1000", block + page)), vec![0u8; page]).unwrap()
            }),
        ),
        (
            "unaligned",
            Box::new(move |d: &Path| {
                std::fs::write(
                    d.join(format!("{:x}-2000", start + (8 << 20) + 8)),
                    vec![0u8; page],
                )
                .unwrap()
            }),
        ),
        (
            "huge span",
            Box::new(move |d: &Path| {
                std::fs::write(
                    d.join(format!("{:x}-{:x}", start + (8 << 20), usize::MAX - 4095)),
                    vec![0u8; page],
                )
                .unwrap()
            }),
        ),
        (
            "symlink",
            Box::new(move |d: &Path| {
                std::os::unix::fs::symlink(
                    "/etc/hostname",
                    d.join(format!("{:x}-1000", start + (8 << 20))),
                )
                .unwrap()
            }),
        ),
        (
            "folder",
            Box::new(move |d: &Path| {
                std::fs::create_dir(d.join(format!("{:x}-1000", start + (8 << 20)))).unwrap()
            }),
        ),
        (
            "uppercase name",
            Box::new(move |d: &Path| {
                std::fs::write(
                    d.join(format!("{:X}-1000", start + (10 << 20))),
                    vec![0u8; page],
                )
                .unwrap()
            }),
        ),
        (
            "plus sign",
            Box::new(move |d: &Path| {
                std::fs::write(
                    d.join(format!("+{:x}-1000", start + (8 << 20))),
                    vec![0u8; page],
                )
                .unwrap()
            }),
        ),
    ];
    for (what, make) in cases {
        let scratch = path.0.join("scratch");
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir(&scratch).unwrap();
        make(&scratch);
        let name = std::fs::read_dir(&scratch)
            .unwrap()
            .next()
            .unwrap()
            .unwrap()
            .file_name();
        std::fs::rename(scratch.join(&name), segs.join(&name)).unwrap();
        let opened = std::panic::catch_unwind(|| Store::open_read_only(&path.0).map(drop));
        let target = segs.join(&name);
        if target.is_dir() && !target.is_symlink() {
            std::fs::remove_dir(&target).unwrap();
        } else {
            std::fs::remove_file(&target).unwrap();
        }
        match opened {
            Ok(Err(_)) => {}
            Ok(Ok(())) => panic!("{what}: opened"),
            Err(_) => panic!("{what}: panicked"),
        }
    }
    let store = Store::open(&path.0).unwrap();
    assert!(
        store
            .root::<StoreVec<u64>>("v")
            .unwrap()
            .iter()
            .copied()
            .eq(0..10)
    );
    store.close().unwrap();
}

/// One store per process, whatever the order of create, open, read-only open and drop; a store
/// taken in the range before the open is `AddressTaken`.
#[test]
fn one_store_at_a_time_and_taken_ranges() {
    let _serial = serial();
    let (a, b) = (TestPath::new("one-a"), TestPath::new("one-b"));
    let sa = Store::create_with_range(&a.0, 64 << 20).unwrap();
    let (base, len) = sa.range();
    sa.close().unwrap();
    let sb = Store::create_with_range(&b.0, 64 << 20).unwrap();
    assert!(matches!(
        Store::open(&a.0),
        Err(StoreError::AnotherStoreOpen)
    ));
    assert!(matches!(
        Store::open_read_only(&a.0),
        Err(StoreError::AnotherStoreOpen)
    ));
    drop(sb);
    let ra = Store::open_read_only(&a.0).unwrap();
    assert!(matches!(
        Store::open_read_only(&a.0),
        Err(StoreError::OpenHere)
    ));
    assert!(matches!(
        Store::open_read_only(&b.0),
        Err(StoreError::AnotherStoreOpen)
    ));
    assert!(matches!(Store::open(&a.0), Err(StoreError::Locked)));
    drop(ra);
    // Something of the process's own in the middle of the range: refused, and left alone.
    let mid = base + len / 2;
    // SAFETY: a hint mapping (no MAP_FIXED): nothing replaced.
    let p = unsafe {
        libc::mmap(
            mid as *mut libc::c_void,
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_eq!(p as usize, mid);
    // SAFETY: ours.
    unsafe { p.cast::<u8>().write(9) };
    assert!(matches!(
        Store::open(&a.0),
        Err(StoreError::AddressTaken { .. })
    ));
    // SAFETY: ours.
    assert_eq!(unsafe { p.cast::<u8>().read() }, 9);
    // SAFETY: ours, unmapped once.
    unsafe { libc::munmap(p, 4096) };
    Store::open(&a.0).unwrap().close().unwrap();
}

/// FINDING, fixed since (data availability): `Space::open` keeps every segment file open until all are
/// checked (`found` holds the `File`s), so a store of more blocks than the soft
/// `RLIMIT_NOFILE` (1024 by default on Linux) is written fine (a writer opens files one at a
/// time) but can never be opened again under the default limit: `EMFILE`. Checking names and
/// lengths first (`fstatat`), then opening, mapping and closing one file at a time, avoids it.
#[test]
fn a_store_of_many_blocks_reopens_under_the_default_file_limit() {
    let _serial = serial();
    match role() {
        None => {
            let path = TestPath::new("nofile");
            let store = Store::create_with_range(&path.0, 8 << 30).unwrap();
            let a = store.allocator();
            let mut outer: StoreVec<StoreVec<u8>> = StoreVec::with_capacity_in(1100, a);
            for i in 0..1100u32 {
                // Past the small-block tier (512 KiB): a segment file each.
                let mut v = StoreVec::with_capacity_in(520 << 10, a);
                v.push(i as u8);
                outer.push(v);
            }
            assert!(store.stats().segments >= 1100);
            store.set_root("vv", outer).unwrap();
            store.close().unwrap();
            in_new_process(
                "a_store_of_many_blocks_reopens_under_the_default_file_limit",
                "reopen",
                &path.0,
            );
        }
        Some((_, path)) => {
            let limit = libc::rlimit {
                rlim_cur: 1024,
                rlim_max: 1024.max(unsafe_hard_limit()),
            };
            // SAFETY: a valid rlimit.
            assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) }, 0);
            let store = Store::open_read_only(&path).unwrap();
            assert_eq!(
                store.root::<StoreVec<StoreVec<u8>>>("vv").unwrap().len(),
                1100
            );
        }
    }
}

fn unsafe_hard_limit() -> libc::rlim_t {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `l` is writable.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) };
    l.rlim_max
}

/// Second review (fixed): a root's address must be a small block of its own, in use, or the
/// start of a segment, and no other root's. Before: two slots at one address gave two `&mut`
/// to one value, and a slot on a free block (or the tail past a chunk's last block) was
/// accepted.
#[test]
fn a_root_address_must_be_a_live_block_of_its_own() {
    let _serial = serial();
    let path = TestPath::new("own-block");
    let store = Store::create_with_range(&path.0, 256 << 20).unwrap();
    store.set_root("a", 1u64).unwrap();
    store.set_root("b", 2u64).unwrap();
    store.close().unwrap();
    let header = path.0.join("header");
    let good = std::fs::read(&header).unwrap();
    let word = |bytes: &[u8], at: usize| u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap());
    // Slot i starts at 128 + 128 i; its address is its second word.
    let (a, b) = (word(&good, 128 + 8), word(&good, 256 + 8));
    assert_ne!(a, b);
    let patched = |addr: u64| {
        let mut bytes = good.clone();
        bytes[256 + 8..256 + 16].copy_from_slice(&addr.to_ne_bytes());
        std::fs::write(&header, &bytes).unwrap();
    };
    // "b" at "a"'s address.
    patched(a);
    let store = Store::open(&path.0).unwrap();
    assert!(matches!(store.root::<u64>("b"), Err(StoreError::NotAStore)));
    assert!(matches!(store.root::<u64>("a"), Err(StoreError::NotAStore)));
    store.close().unwrap();
    // "b" on a block nobody was given: the blocks after both roots' are free.
    patched(a.max(b) + 16 * 16);
    let store = Store::open(&path.0).unwrap();
    assert!(matches!(store.root::<u64>("b"), Err(StoreError::NotAStore)));
    assert_eq!(*store.root::<u64>("a").unwrap(), 1);
    store.close().unwrap();
    patched(b);
    let store = Store::open(&path.0).unwrap();
    assert_eq!(*store.root::<u64>("b").unwrap(), 2);
}
