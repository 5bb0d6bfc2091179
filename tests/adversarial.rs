//! Adversarial programs against the small-block tier, from the public API only: many threads
//! allocating, freeing, growing and shrinking across size classes (16 B to a few MiB, alignments
//! up to 4096), blocks freed on other threads, threads exiting with cached blocks, `trim` racing
//! with allocation, `fork` in the middle of multi-threaded allocation, hashbrown tables across
//! fork, and zeroed allocations of reused blocks.
//!
//! Every live block is filled with a byte derived from its id and checked before every change
//! and at the end; every returned range is also entered in a process-wide interval map, so two
//! live blocks that overlap are reported at the moment the second one is handed out.
//!
//! `MMAPVEC_ADV_SCALE` (default 1, so that `cargo test` stays short) scales the number of
//! operations: the review ran 10 to 40 in release mode, valgrind runs use 1.

mod core_support;

use std::collections::BTreeMap;
use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use core_support::TestDir;
use mmapvec::MmapAllocator;
use mmapvec::allocator_api2::alloc::{Allocator, Layout};
use mmapvec::allocator_api2::vec::Vec as ApiVec;

// ---------------------------------------------------------------------------------------------
// Tools

/// One test at a time: several tests `fork`, and a fork starts a new fork epoch for every
/// allocator of the process (chunks and segments made before it are handled as possibly
/// shared), which changes what the tests beside it measure (kept segments, chunks after
/// `trim`). The review ran them in parallel and saw no failure, but CI repeats every binary.
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn scale() -> usize {
    std::env::var("MMAPVEC_ADV_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1)
}

/// xorshift64*, one per thread.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below((hi - lo + 1) as u64) as usize
    }
}

/// A size from 1 B to 4 MiB, most of them small, crossing every class band and the tier's
/// threshold (512 KiB).
fn size(rng: &mut Rng) -> usize {
    match rng.below(100) {
        0..=44 => rng.range(1, 256),
        45..=74 => rng.range(257, 8 << 10),
        75..=89 => rng.range((8 << 10) + 1, 128 << 10),
        90..=95 => rng.range((128 << 10) + 1, 512 << 10),
        96..=97 => rng.range((512 << 10) - 64, (512 << 10) + 64),
        _ => rng.range((512 << 10) + 1, 4 << 20),
    }
}

fn align(rng: &mut Rng) -> usize {
    match rng.below(10) {
        0..=5 => 1 << rng.below(5),     // 1 .. 16
        6..=8 => 1 << rng.range(5, 12), // 32 .. 4096
        _ => 1 << rng.range(0, 12),
    }
}

fn pattern(id: u64) -> u8 {
    // Never 0, so a block zeroed by mistake is caught.
    ((id.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8) | 1
}

/// The process-wide map of live returned ranges: start -> (end, id).
static LIVE: Mutex<BTreeMap<usize, (usize, u64)>> = Mutex::new(BTreeMap::new());
/// In a fork child `LIVE` may be locked forever (by a thread that is not there): the child
/// uses a map of its own, seeded with the blocks it inherits and uses.
static IN_CHILD: AtomicBool = AtomicBool::new(false);
static CHILD_LIVE: Mutex<BTreeMap<usize, (usize, u64)>> = Mutex::new(BTreeMap::new());

fn live_map() -> std::sync::MutexGuard<'static, BTreeMap<usize, (usize, u64)>> {
    let map = if IN_CHILD.load(Ordering::Relaxed) {
        &CHILD_LIVE
    } else {
        &LIVE
    };
    map.lock().unwrap_or_else(|e| e.into_inner())
}

fn claim(start: usize, len: usize, id: u64) {
    if len == 0 {
        return;
    }
    let end = start + len;
    let mut live = live_map();
    if let Some((&s, &(e, other))) = live.range(..end).next_back() {
        assert!(
            e <= start,
            "block {id} [{start:#x}, {end:#x}) overlaps live block {other} [{s:#x}, {e:#x})"
        );
    }
    live.insert(start, (end, id));
}

fn unclaim(start: usize, len: usize) {
    if len == 0 {
        return;
    }
    let mut live = live_map();
    live.remove(&start)
        .expect("unclaim of a block never claimed");
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One live block: what was asked (`layout`) and what was returned (`len` bytes at `ptr`).
struct Block {
    ptr: NonNull<u8>,
    len: usize,
    layout: Layout,
    id: u64,
}

// SAFETY: a block is plain memory of the (Sync) allocator; it is moved, never shared.
unsafe impl Send for Block {}

impl Block {
    fn bytes(&self, n: usize) -> &[u8] {
        // SAFETY: the block is live and at least `layout.size() >= n` bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), n) }
    }

    fn check(&self, what: &str) {
        self.check_prefix(self.layout.size(), what);
    }

    fn check_prefix(&self, n: usize, what: &str) {
        let p = pattern(self.id);
        if let Some(at) = self.bytes(n).iter().position(|&b| b != p) {
            panic!(
                "{what}: block {} ({} B, align {}, at {:p}) byte {at} is {:#x}, expected {p:#x}",
                self.id,
                self.layout.size(),
                self.layout.align(),
                self.ptr,
                self.bytes(n)[at]
            );
        }
    }

    fn fill(&mut self) {
        // SAFETY: the block is live and `len` bytes long (the whole returned block is ours).
        unsafe { self.ptr.as_ptr().write_bytes(pattern(self.id), self.len) };
    }
}

fn check_returned(ptr: NonNull<[u8]>, layout: Layout, what: &str) -> (NonNull<u8>, usize) {
    let len = ptr.len();
    let p = ptr.cast::<u8>();
    assert!(
        len >= layout.size(),
        "{what}: {len} B returned for {layout:?}"
    );
    assert!(
        p.as_ptr().addr().is_multiple_of(layout.align()),
        "{what}: {p:p} not aligned for {layout:?}"
    );
    (p, len)
}

fn assert_zero(bytes: &[u8], what: &str) {
    if let Some(at) = bytes.iter().position(|&b| b != 0) {
        panic!(
            "{what}: byte {at} of {} is {:#x}, not zero",
            bytes.len(),
            bytes[at]
        );
    }
}

fn allocate(a: &MmapAllocator, layout: Layout, zeroed: bool) -> Block {
    let got = if zeroed {
        a.allocate_zeroed(layout)
    } else {
        a.allocate(layout)
    }
    .unwrap_or_else(|_| panic!("allocate {layout:?}: {:?}", a.take_last_error()));
    let (ptr, len) = check_returned(got, layout, "allocate");
    if zeroed {
        // SAFETY: just returned, `len` bytes.
        assert_zero(
            unsafe { std::slice::from_raw_parts(ptr.as_ptr(), len) },
            &format!("allocate_zeroed {layout:?}"),
        );
    }
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    claim(ptr.as_ptr().addr(), len, id);
    let mut block = Block {
        ptr,
        len,
        layout,
        id,
    };
    block.fill();
    block
}

fn free(a: &MmapAllocator, block: Block) {
    block.check("before free");
    unclaim(block.ptr.as_ptr().addr(), block.len);
    // SAFETY: live, allocated by `a` (or a clone) with `layout`.
    unsafe { a.deallocate(block.ptr, block.layout) };
}

/// Grows or shrinks `block` to `new`, checking the kept bytes (and zeroes, if asked).
fn resize(a: &MmapAllocator, block: &mut Block, new: Layout, zeroed: bool) {
    block.check("before resize");
    let old = block.layout;
    let (old_ptr, old_len) = (block.ptr.as_ptr().addr(), block.len);
    unclaim(old_ptr, old_len);
    // SAFETY: live with `old`; sizes ordered as each call requires.
    let got = unsafe {
        if new.size() >= old.size() {
            if zeroed {
                a.grow_zeroed(block.ptr, old, new)
            } else {
                a.grow(block.ptr, old, new)
            }
        } else {
            a.shrink(block.ptr, old, new)
        }
    };
    let got = match got {
        Ok(got) => got,
        Err(_) => {
            // The old block must be intact.
            claim(old_ptr, old_len, block.id);
            block.check("after a failed resize");
            panic!("resize {old:?} -> {new:?}: {:?}", a.take_last_error());
        }
    };
    let (ptr, len) = check_returned(got, new, "resize");
    block.ptr = ptr;
    block.len = len;
    block.layout = new;
    block.check_prefix(old.size().min(new.size()), "after resize");
    if zeroed && new.size() > old.size() {
        assert_zero(
            &block.bytes(new.size())[old.size()..],
            &format!("grow_zeroed {old:?} -> {new:?}"),
        );
    }
    claim(ptr.as_ptr().addr(), len, block.id);
    block.fill();
}

/// The allocator for one test, in a directory of its own, with the small-block tier taking
/// every size it can (512 KiB; the default is 64 KiB): the large classes get used too.
fn allocator(dir: &TestDir) -> MmapAllocator {
    MmapAllocator::builder()
        .dir(dir.path())
        .small_threshold(512 << 10)
        .build()
        .expect("build allocator")
}

// ---------------------------------------------------------------------------------------------
// Threads

/// A pool where threads leave blocks for other threads to verify, resize and free.
type Pool = Arc<Mutex<Vec<Block>>>;

/// One thread's random program: allocate (plain or zeroed), grow, shrink, free, hand a block
/// to the pool or take one from it, and every so often check every block it holds.
fn churn(a: &MmapAllocator, pool: &Pool, seed: u64, ops: usize, max_live: usize) -> Vec<Block> {
    let mut rng = Rng::new(seed);
    let mut mine: Vec<Block> = Vec::new();
    for op in 0..ops {
        match rng.below(16) {
            0..=5 if mine.len() < max_live => {
                let layout = Layout::from_size_align(size(&mut rng), align(&mut rng)).unwrap();
                mine.push(allocate(a, layout, rng.below(3) == 0));
            }
            6..=7 if !mine.is_empty() => {
                // Grow, often within a class or to just past it.
                let i = rng.below(mine.len() as u64) as usize;
                let old = mine[i].layout.size();
                let new_size = match rng.below(3) {
                    0 => old + rng.range(1, 32),
                    1 => old + rng.range(1, old.max(16)),
                    _ => size(&mut rng).max(old),
                };
                let new = Layout::from_size_align(new_size, align(&mut rng)).unwrap();
                resize(a, &mut mine[i], new, rng.below(2) == 0);
            }
            8 if !mine.is_empty() => {
                let i = rng.below(mine.len() as u64) as usize;
                let old = mine[i].layout.size();
                let new_size = match rng.below(7) {
                    0..=1 => old.saturating_sub(rng.range(0, 16)).max(1),
                    2..=3 => rng.range(1, old.max(1)),
                    4..=5 => old / 2 + 1,
                    _ => 0, // to a dangling block; the next grow is an allocation
                };
                let new = Layout::from_size_align(new_size, align(&mut rng)).unwrap();
                resize(a, &mut mine[i], new, false);
            }
            9..=11 if !mine.is_empty() => {
                let i = rng.below(mine.len() as u64) as usize;
                free(a, mine.swap_remove(i));
            }
            12 if !mine.is_empty() => {
                let i = rng.below(mine.len() as u64) as usize;
                let block = mine.swap_remove(i);
                pool.lock().unwrap().push(block);
            }
            13 => {
                let taken = {
                    let mut pool = pool.lock().unwrap();
                    let n = pool.len();
                    (n > 0).then(|| pool.swap_remove(rng.below(n as u64) as usize))
                };
                if let Some(block) = taken {
                    block.check("taken from the pool");
                    mine.push(block);
                }
            }
            14 if rng.below(16) == 0 => a.trim(),
            _ => {}
        }
        if op % 64 == 0 {
            mine.iter().for_each(|b| b.check("periodic"));
        }
    }
    mine.iter().for_each(|b| b.check("end of churn"));
    mine
}

fn join_all(handles: Vec<thread::JoinHandle<()>>) {
    let mut panicked = 0;
    for h in handles {
        if h.join().is_err() {
            panicked += 1;
        }
    }
    assert_eq!(panicked, 0, "{panicked} thread(s) panicked");
}

/// Every block freed, the books must balance: no small block in use, no live segment, and
/// after `trim` no chunk mapped (no thread that used the tier is alive but this one).
fn assert_all_given_back(a: &MmapAllocator) {
    let stats = a.stats();
    assert_eq!(stats.small.in_use_bytes, 0, "{stats:#?}");
    assert_eq!(stats.live_segments, 0, "{stats:#?}");
    a.trim();
    let stats = a.stats();
    assert_eq!(
        stats.small.arena_bytes, 0,
        "chunks left after trim: {stats:#?}"
    );
    assert_eq!(stats.kept_segments, 0, "{stats:#?}");
}

/// Four long-lived threads churn over all classes and hand blocks to each other through a
/// pool; waves of short-lived threads allocate and free small blocks (left in their caches) and
/// exit, some with blocks still live that others free; one thread calls `trim` and `stats`
/// in a loop.
#[test]
fn threads_churn_across_classes_with_trim_and_exits() {
    let _serial = serial();
    let dir = TestDir::new("adv-churn");
    churn_with_trim_and_exits(allocator(&dir));
}

/// The same with the default settings (blocks above 64 KiB are segments, kept in threads'
/// slots and the reuse cache).
#[test]
fn threads_churn_with_default_settings() {
    let _serial = serial();
    let dir = TestDir::new("adv-churn-default");
    churn_with_trim_and_exits(dir.allocator());
}

fn churn_with_trim_and_exits(a: MmapAllocator) {
    let pool: Pool = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let ops = 400 * scale();

    let trimmer = {
        let (a, stop) = (a.clone(), stop.clone());
        thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                a.trim();
                // Not compared with each other here: `stats` reads the tier's counters one
                // after another while other threads allocate, so `in_use_bytes` may count a
                // block whose new chunk `arena_bytes` was read before (RELIABILITY.md: the
                // stats snapshot is not atomic). Checked once the threads are done.
                black_box(a.stats());
                n += 1;
                thread::yield_now();
            }
            assert!(n > 0);
        })
    };

    let mut handles = Vec::new();
    for t in 0..4u64 {
        let (a, pool) = (a.clone(), pool.clone());
        handles.push(thread::spawn(move || {
            let left = churn(&a, &pool, t + 1, ops, 48);
            for b in left {
                free(&a, b);
            }
        }));
    }
    // Waves of short threads: a few small blocks each, freed into their caches, then exit
    // (the cache goes back at thread exit); some leave a block in the pool.
    for wave in 0..(scale() * 2) as u64 {
        let mut short = Vec::new();
        for t in 0..4u64 {
            let (a, pool) = (a.clone(), pool.clone());
            short.push(thread::spawn(move || {
                let mut rng = Rng::new(1000 + wave * 16 + t);
                let mut blocks: Vec<Block> = (0..40)
                    .map(|_| {
                        let l = Layout::from_size_align(rng.range(1, 8 << 10), align(&mut rng));
                        allocate(&a, l.unwrap(), rng.below(2) == 0)
                    })
                    .collect();
                for _ in 0..30 {
                    let b = blocks.swap_remove(rng.below(blocks.len() as u64) as usize);
                    free(&a, b);
                }
                pool.lock().unwrap().extend(blocks.drain(..5));
                for b in blocks {
                    free(&a, b);
                }
            }));
        }
        join_all(short);
    }
    join_all(handles);
    stop.store(true, Ordering::Relaxed);
    trimmer.join().expect("trimmer");
    let s = a.stats();
    assert!(s.small.in_use_bytes <= s.small.arena_bytes, "{s:#?}");
    let left: Vec<Block> = std::mem::take(&mut *pool.lock().unwrap());
    for b in left {
        free(&a, b);
    }
    assert_all_given_back(&a);
}

/// Producers allocate blocks of every class and send them to consumers, which check, grow or
/// shrink, and free them: every block dies on a thread other than the one that made it.
#[test]
fn blocks_freed_on_other_threads() {
    let _serial = serial();
    let dir = TestDir::new("adv-cross");
    let a = allocator(&dir);
    let n = 300 * scale();
    let (tx, rx) = std::sync::mpsc::sync_channel::<Block>(64);
    let rx = Arc::new(Mutex::new(rx));
    let mut handles = Vec::new();
    for p in 0..2u64 {
        let (a, tx) = (a.clone(), tx.clone());
        handles.push(thread::spawn(move || {
            let mut rng = Rng::new(77 + p);
            for _ in 0..n {
                let mut s = size(&mut rng);
                if rng.below(2) == 0 {
                    s = s.min(8 << 10); // the cached classes
                }
                let l = Layout::from_size_align(s, align(&mut rng)).unwrap();
                tx.send(allocate(&a, l, rng.below(4) == 0)).unwrap();
            }
        }));
    }
    drop(tx);
    for c in 0..2u64 {
        let (a, rx) = (a.clone(), rx.clone());
        handles.push(thread::spawn(move || {
            let mut rng = Rng::new(99 + c);
            let mut held: Vec<Block> = Vec::new();
            loop {
                let got = rx.lock().unwrap().recv();
                let Ok(mut block) = got else { break };
                block.check("received");
                match rng.below(4) {
                    0 => {
                        let s = block.layout.size();
                        let new =
                            Layout::from_size_align(s + rng.range(1, s), block.layout.align());
                        resize(&a, &mut block, new.unwrap(), true);
                    }
                    1 => {
                        let new = Layout::from_size_align(
                            rng.range(1, block.layout.size()),
                            block.layout.align(),
                        );
                        resize(&a, &mut block, new.unwrap(), false);
                    }
                    _ => {}
                }
                held.push(block);
                if held.len() > 32 || rng.below(2) == 0 {
                    let i = rng.below(held.len() as u64) as usize;
                    free(&a, held.swap_remove(i));
                }
            }
            held.into_iter().for_each(|b| free(&a, b));
        }));
    }
    join_all(handles);
    assert_all_given_back(&a);
}

/// A thread's cache holds blocks of an allocator that is then dropped (its region unmapped), and
/// the thread goes on with a second allocator whose region may take the same addresses.
#[test]
fn cache_outlives_its_allocator() {
    let _serial = serial();
    let dir = TestDir::new("adv-outlive");
    for round in 0..(scale() as u64).max(2) {
        let first = allocator(&dir);
        let (go, done) = (Arc::new(Barrier::new(2)), Arc::new(Barrier::new(2)));
        let worker = {
            let (first, go, done) = (first.clone(), go.clone(), done.clone());
            let dir_path = dir.path().to_path_buf();
            thread::spawn(move || {
                let mut rng = Rng::new(round);
                let blocks: Vec<Block> = (0..100)
                    .map(|_| {
                        let l = Layout::from_size_align(rng.range(1, 8 << 10), 8).unwrap();
                        allocate(&first, l, false)
                    })
                    .collect();
                // Freed into this thread's cache.
                blocks.into_iter().for_each(|b| free(&first, b));
                drop(first);
                go.wait();
                done.wait(); // the main thread dropped its clone: the tier is gone
                let second = MmapAllocator::builder().dir(dir_path).build().unwrap();
                let mut blocks: Vec<Block> = (0..200)
                    .map(|_| {
                        let l = Layout::from_size_align(rng.range(1, 8 << 10), 16).unwrap();
                        allocate(&second, l, true)
                    })
                    .collect();
                for b in blocks.iter_mut().step_by(3) {
                    let new = Layout::from_size_align(b.layout.size() * 2, 16).unwrap();
                    resize(&second, b, new, true);
                }
                blocks.into_iter().for_each(|b| free(&second, b));
                assert_all_given_back(&second);
            })
        };
        go.wait();
        drop(first);
        done.wait();
        worker.join().expect("worker");
    }
}

// ---------------------------------------------------------------------------------------------
// Zeroed allocation

/// `allocate_zeroed` and `grow_zeroed` read zeros on every way a block can be reused: this
/// thread's cache, the shard after another thread's exit, a chunk emptied and given to another
/// class, a retained empty chunk, and an in-place grow over bytes written into the slack.
#[test]
fn zeroed_blocks_read_zero_whatever_was_there() {
    let _serial = serial();
    let dir = TestDir::new("adv-zero");
    let a = allocator(&dir);
    let dirty = |b: &Block| {
        // SAFETY: the whole returned block is the caller's.
        unsafe { b.ptr.as_ptr().write_bytes(0xEE, b.len) }
    };
    let sizes = [
        1usize, 15, 16, 17, 100, 128, 129, 500, 4000, 4096, 8192, 8193, 60_000, 300_000, 524_288,
    ];
    for &s in &sizes {
        for al in [1usize, 16, 64, 4096] {
            let layout = Layout::from_size_align(s, al).unwrap();
            // This thread: dirty, free (cached or to the shard), allocate zeroed.
            let blocks: Vec<Block> = (0..40).map(|_| allocate(&a, layout, false)).collect();
            blocks.iter().for_each(dirty);
            blocks.into_iter().rev().for_each(|b| {
                unclaim(b.ptr.as_ptr().addr(), b.len);
                // SAFETY: a live block of this allocator, with the layout it was allocated with.
                unsafe { a.deallocate(b.ptr, b.layout) }
            });
            let again: Vec<Block> = (0..40).map(|_| allocate(&a, layout, true)).collect();
            again.into_iter().for_each(|b| free(&a, b));
            // Another thread dirties and frees, then exits (its cache goes to the shard).
            let a2 = a.clone();
            thread::spawn(move || {
                let blocks: Vec<Block> = (0..40).map(|_| allocate(&a2, layout, false)).collect();
                blocks.iter().for_each(dirty);
                for b in blocks {
                    unclaim(b.ptr.as_ptr().addr(), b.len);
                    // SAFETY: a live block of this allocator, with the layout it was allocated with.
                    unsafe { a2.deallocate(b.ptr, b.layout) }
                }
            })
            .join()
            .unwrap();
            let again: Vec<Block> = (0..40).map(|_| allocate(&a, layout, true)).collect();
            again.into_iter().for_each(|b| free(&a, b));
        }
    }
    // Fill whole chunks of one class with dirt, free them, then take them with other classes
    // (idle current chunks and retained empty chunks change class).
    for (from, to) in [
        (64usize, 48usize),
        (4096, 16),
        (100_000, 200),
        (16, 524_288),
    ] {
        let lf = Layout::from_size_align(from, 8).unwrap();
        let n = (12 << 20) / from.max(64);
        let blocks: Vec<Block> = (0..n.min(20_000))
            .map(|_| allocate(&a, lf, false))
            .collect();
        blocks.iter().for_each(dirty);
        for b in blocks {
            unclaim(b.ptr.as_ptr().addr(), b.len);
            // SAFETY: a live block of this allocator, with the layout it was allocated with.
            unsafe { a.deallocate(b.ptr, b.layout) }
        }
        let lt = Layout::from_size_align(to, 8).unwrap();
        let m = (12 << 20) / to.max(64);
        let blocks: Vec<Block> = (0..m.min(20_000)).map(|_| allocate(&a, lt, true)).collect();
        blocks.into_iter().for_each(|b| free(&a, b));
    }
    // In-place grow_zeroed over slack the user wrote (the whole returned block is writable),
    // and after an in-class shrink.
    let dirty_slack = |b: &Block| {
        // SAFETY: the whole returned block is the caller's; past the asked size is slack.
        unsafe {
            b.ptr
                .as_ptr()
                .add(b.layout.size())
                .write_bytes(0xEE, b.len - b.layout.size())
        }
    };
    for s in [1usize, 10, 100, 129, 1000, 5000, 70_000] {
        let layout = Layout::from_size_align(s, 1).unwrap();
        let mut b = allocate(&a, layout, false);
        dirty_slack(&b);
        let full = Layout::from_size_align(b.len, 1).unwrap();
        resize(&a, &mut b, full, true);
        let small = Layout::from_size_align(b.len - b.len / 8 - 1, 1).unwrap();
        resize(&a, &mut b, small, false);
        dirty_slack(&b);
        let full = Layout::from_size_align(b.len, 1).unwrap();
        resize(&a, &mut b, full, true);
        dirty_slack(&b);
        let bigger = Layout::from_size_align(b.len + 1, 1).unwrap();
        resize(&a, &mut b, bigger, true);
        free(&a, b);
    }
    assert_all_given_back(&a);
}

// ---------------------------------------------------------------------------------------------
// Fork

/// Forks; the child runs `child` and `_exit`s with 0 (returned), 101 (panicked). Returns the
/// raw wait status.
fn fork_child(child: impl FnOnce()) -> libc::pid_t {
    // SAFETY: the child only runs `child` and `_exit`s, never returning into the harness.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        IN_CHILD.store(true, Ordering::Relaxed);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child));
        if let Err(payload) = &result {
            // The harness captures panic output per test thread: it would be lost here.
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            let line = format!("fork child panicked: {msg}\n");
            // SAFETY: a valid buffer of that length.
            unsafe { libc::write(2, line.as_ptr().cast(), line.len()) };
        }
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(if result.is_ok() { 0 } else { 101 }) };
    }
    pid
}

fn wait_child(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: our child, a valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed: status {status:#x} (signal {}, exit {})",
        if libc::WIFSIGNALED(status) {
            libc::WTERMSIG(status)
        } else {
            0
        },
        if libc::WIFEXITED(status) {
            libc::WEXITSTATUS(status)
        } else {
            -1
        },
    );
}

/// The child of a fork taken while other threads allocate: checks the forking thread's blocks,
/// allocates its own, frees half of the inherited ones, grows and shrinks the others and writes
/// its own pattern into them (a resize done in place in shared memory would show in the
/// parent), runs two threads of its own, holds its blocks a while (the parent writes
/// meanwhile), checks them, frees everything.
fn child_program(a: &MmapAllocator, inherited: Vec<Block>, seed: u64, dont_fork: bool) {
    let mut rng = Rng::new(seed);
    for b in &inherited {
        claim(b.ptr.as_ptr().addr(), b.len, b.id);
        if !dont_fork {
            b.check("child: inherited");
        }
    }
    let mut mine: Vec<Block> = (0..300)
        .map(|_| {
            let l = Layout::from_size_align(size(&mut rng).min(1 << 20), align(&mut rng));
            allocate(a, l.unwrap(), rng.below(2) == 0)
        })
        .collect();
    for (i, mut b) in inherited.into_iter().enumerate() {
        if dont_fork {
            // The inherited block is not mapped here: a shrink keeps it whole, a free only
            // counts it. Neither may read it.
            unclaim(b.ptr.as_ptr().addr(), b.len);
            if i % 3 == 0 {
                let new = Layout::from_size_align(1, 1).unwrap();
                // SAFETY: inherited live block, shrunk then freed with the layout returned.
                let got = unsafe { a.shrink(b.ptr, b.layout, new) }.expect("child shrink");
                // SAFETY: as above.
                unsafe { a.deallocate(got.cast(), new) };
            } else {
                // SAFETY: inherited live block.
                unsafe { a.deallocate(b.ptr, b.layout) };
            }
            continue;
        }
        match i % 4 {
            0 | 1 => free(a, b),
            2 => {
                let s = b.layout.size();
                let new = Layout::from_size_align(s + rng.range(1, s), b.layout.align()).unwrap();
                b.id = NEXT_ID.fetch_add(1, Ordering::Relaxed) ^ 0x5555;
                resize_as_new(a, &mut b, new);
                mine.push(b);
            }
            _ => {
                let new = Layout::from_size_align(rng.range(1, b.layout.size()), b.layout.align());
                b.id = NEXT_ID.fetch_add(1, Ordering::Relaxed) ^ 0x5555;
                resize_as_new(a, &mut b, new.unwrap());
                mine.push(b);
            }
        }
    }
    let pool: Pool = Arc::new(Mutex::new(Vec::new()));
    let handles: Vec<_> = (0..2u64)
        .map(|t| {
            let (a, pool) = (a.clone(), pool.clone());
            thread::spawn(move || {
                let left = churn(&a, &pool, seed * 7 + t, 300, 24);
                left.into_iter().for_each(|b| free(&a, b));
            })
        })
        .collect();
    join_all(handles);
    // Held while the parent's threads go on writing their own blocks.
    thread::sleep(Duration::from_millis(30));
    mine.iter()
        .for_each(|b| b.check("child: own block after a while"));
    mine.into_iter().for_each(|b| free(a, b));
    std::mem::take(&mut *pool.lock().unwrap())
        .into_iter()
        .for_each(|b| free(a, b));
    let stats = a.stats();
    assert!(
        stats.small.in_use_bytes <= stats.small.arena_bytes,
        "{stats:#?}"
    );
}

/// A resize in the child of an inherited block (checked by the caller before), under a new id:
/// the child's block is then filled with the child's own pattern, so a resize done in place in
/// memory shared with the parent would show in the parent's checks.
fn resize_as_new(a: &MmapAllocator, b: &mut Block, new: Layout) {
    let (old_ptr, old_len, old) = (b.ptr.as_ptr().addr(), b.len, b.layout);
    unclaim(old_ptr, old_len);
    // SAFETY: a live block of this allocator, with the layout it was allocated with.
    let got = unsafe {
        if new.size() >= old.size() {
            a.grow(b.ptr, old, new)
        } else {
            a.shrink(b.ptr, old, new)
        }
    }
    .unwrap_or_else(|_| panic!("child resize: {:?}", a.take_last_error()));
    let (ptr, len) = check_returned(got, new, "child resize");
    (b.ptr, b.len, b.layout) = (ptr, len, new);
    claim(ptr.as_ptr().addr(), len, b.id);
    b.fill();
}

fn fork_in_the_middle(dont_fork: bool) {
    let dir = TestDir::new(if dont_fork { "adv-fork-df" } else { "adv-fork" });
    let a = MmapAllocator::builder()
        .dir(dir.path())
        .small_threshold(512 << 10)
        .dont_fork(dont_fork)
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let pool: Pool = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..3u64)
        .map(|t| {
            let (a, pool, stop) = (a.clone(), pool.clone(), stop.clone());
            thread::spawn(move || {
                let mut seed = 500 + t;
                let mut kept: Vec<Block> = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    kept.iter()
                        .for_each(|b| b.check("parent worker: kept across forks"));
                    let mut left = churn(&a, &pool, seed, 200, 32);
                    // Some blocks live across the next forks; the rest go.
                    let keep = left.len() / 2;
                    kept.extend(left.drain(..keep));
                    left.into_iter().for_each(|b| free(&a, b));
                    while kept.len() > 64 {
                        free(&a, kept.remove(0));
                    }
                    seed += 3;
                }
                kept.into_iter().for_each(|b| free(&a, b));
            })
        })
        .collect();

    let mut rng = Rng::new(4242);
    for round in 0..(scale() as u64).clamp(3, 12) {
        // The forking thread's own blocks: handed to the child, kept by the parent.
        let blocks: Vec<Block> = (0..120)
            .map(|_| {
                let l = Layout::from_size_align(size(&mut rng).min(2 << 20), align(&mut rng));
                allocate(&a, l.unwrap(), false)
            })
            .collect();
        // Some freed just before the fork (into this thread's cache).
        thread::sleep(Duration::from_millis(rng.range(0, 5) as u64));
        let views: Vec<Block> = blocks
            .iter()
            .map(|b| Block {
                ptr: b.ptr,
                len: b.len,
                layout: b.layout,
                id: b.id,
            })
            .collect();
        let pid = fork_child(|| {
            // The parent's other threads' claims are copied into the child's map but their
            // blocks are never touched here: only the forking thread's blocks are used.
            child_program(&a, views, 9000 + round, dont_fork);
        });
        // The parent goes on while the child runs: new blocks, frees, resizes of pre-fork ones.
        let mut blocks = blocks;
        let mut extra: Vec<Block> = (0..100)
            .map(|_| {
                let l = Layout::from_size_align(size(&mut rng).min(1 << 20), align(&mut rng));
                allocate(&a, l.unwrap(), rng.below(2) == 0)
            })
            .collect();
        for b in blocks.iter_mut().step_by(5) {
            let new = Layout::from_size_align(b.layout.size() + 100, b.layout.align()).unwrap();
            resize(&a, b, new, true);
        }
        wait_child(pid);
        blocks
            .iter()
            .for_each(|b| b.check("parent: after the child exited"));
        extra
            .iter()
            .for_each(|b| b.check("parent: made while the child ran"));
        blocks.into_iter().for_each(|b| free(&a, b));
        for b in extra.iter_mut().step_by(2) {
            let new = Layout::from_size_align(b.layout.size() * 2, b.layout.align()).unwrap();
            resize(&a, b, new, false);
        }
        extra.into_iter().for_each(|b| free(&a, b));
    }
    stop.store(true, Ordering::Relaxed);
    join_all(workers);
    std::mem::take(&mut *pool.lock().unwrap())
        .into_iter()
        .for_each(|b| free(&a, b));
    assert_all_given_back(&a);
}

#[test]
fn fork_in_the_middle_of_threaded_allocation() {
    let _serial = serial();
    fork_in_the_middle(false);
}

#[test]
fn fork_in_the_middle_of_threaded_allocation_dont_fork() {
    let _serial = serial();
    fork_in_the_middle(true);
}

/// hashbrown tables on the allocator (small tables in the tier, large ones as segments), with
/// other threads changing their own tables, across several forks: the child rehashes, grows,
/// removes and drops the parent's tables; the parent's must read the same after.
#[test]
fn hashbrown_tables_across_fork() {
    let _serial = serial();
    type Map<V> = hashbrown::HashMap<u64, V, hashbrown::DefaultHashBuilder, MmapAllocator>;
    let dir = TestDir::new("adv-hb");
    let a = dir.allocator();
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..2u64)
        .map(|t| {
            let (a, stop) = (a.clone(), stop.clone());
            thread::spawn(move || {
                let mut rng = Rng::new(t + 31);
                let mut m: Map<ApiVec<u8, MmapAllocator>> =
                    Map::with_hasher_in(hashbrown::DefaultHashBuilder::default(), a.clone());
                while !stop.load(Ordering::Relaxed) {
                    let k = rng.below(5000);
                    if rng.below(3) == 0 {
                        if let Some(v) = m.remove(&k) {
                            assert!(v.iter().all(|&b| b == pattern(k)), "worker value {k}");
                        }
                    } else {
                        let n = rng.range(1, 3000);
                        let mut v = ApiVec::with_capacity_in(n, a.clone());
                        v.resize(n, pattern(k));
                        if let Some(old) = m.insert(k, v) {
                            assert!(old.iter().all(|&b| b == pattern(k)), "worker value {k}");
                        }
                    }
                }
                for (k, v) in m.iter() {
                    assert!(v.iter().all(|&b| b == pattern(*k)), "worker value {k}");
                }
            })
        })
        .collect();

    let mut small: Map<u64> = Map::with_hasher_in(Default::default(), a.clone());
    let mut big: Map<u64> = Map::with_hasher_in(Default::default(), a.clone());
    let mut vals: Map<ApiVec<u8, MmapAllocator>> =
        Map::with_hasher_in(Default::default(), a.clone());
    for k in 0..500u64 {
        small.insert(k, k * 3);
    }
    for k in 0..(20_000 * scale() as u64) {
        big.insert(k, !k);
    }
    for k in 0..300u64 {
        let mut v = ApiVec::new_in(a.clone());
        v.resize((k as usize * 37) % 20_000 + 1, pattern(k));
        vals.insert(k, v);
    }
    let check = |small: &Map<u64>, big: &Map<u64>, vals: &Map<ApiVec<u8, MmapAllocator>>, who| {
        assert_eq!(small.len(), 500, "{who}");
        assert!(
            (0..500u64).all(|k| small.get(&k) == Some(&(k * 3))),
            "{who}: small"
        );
        assert!(big.iter().all(|(k, v)| *v == !*k), "{who}: big");
        for (k, v) in vals.iter() {
            assert_eq!(
                v.len(),
                (*k as usize * 37) % 20_000 + 1,
                "{who}: len of {k}"
            );
            assert!(v.iter().all(|&b| b == pattern(*k)), "{who}: value {k}");
        }
    };
    for round in 0..4u64 {
        let pid = fork_child(|| {
            // The inherited tables (and the vectors in them) are MAP_SHARED memory: writing
            // them here would be seen by the parent, as documented (README, "fork"). The child
            // reads them, builds its own from them, and drops them (freeing the parent's
            // blocks here: no write into them).
            check(&small, &big, &vals, "child");
            let mut small2 = small.clone();
            for k in 500..20_000u64 {
                small2.insert(k, k); // rehashes: new tables, old ones freed
            }
            for k in 0..500u64 {
                small2.remove(&k);
            }
            small2.shrink_to_fit();
            let mut big2: Map<u64> = Map::with_hasher_in(Default::default(), a.clone());
            big2.extend(
                big.iter()
                    .filter(|(k, _)| *k % 3 == round % 3)
                    .map(|(k, v)| (*k, *v)),
            );
            for k in 0..50_000u64 {
                big2.insert(k << 20, k);
            }
            let mut vals2: Map<ApiVec<u8, MmapAllocator>> =
                Map::with_hasher_in(Default::default(), a.clone());
            for (k, v) in vals.iter() {
                let mut v2 = v.clone();
                v2.resize(v2.len() * 2 + 1, 0xC3);
                v2.truncate(1);
                v2.shrink_to_fit();
                v2[0] = 0xC3;
                vals2.insert(*k, v2);
            }
            let empty = || Map::<u64>::with_hasher_in(Default::default(), a.clone());
            drop(std::mem::replace(&mut small, empty()));
            drop(std::mem::replace(&mut big, empty()));
            drop(std::mem::replace(
                &mut vals,
                Map::with_hasher_in(Default::default(), a.clone()),
            ));
            let mut fresh: Map<u64> = Map::with_hasher_in(Default::default(), a.clone());
            fresh.extend((0..100_000u64).map(|k| (k, k ^ round)));
            assert!(fresh.iter().all(|(k, v)| *v == *k ^ round));
            assert!(vals2.values().all(|v| v[..] == [0xC3]));
            assert_eq!(small2.len(), 19_500);
            assert!(big2.iter().all(|(k, v)| *v == !*k || *k == *v << 20));
            drop((small2, big2, vals2, fresh));
        });
        // The parent changes its own tables meanwhile, as the child does.
        for k in 0..500u64 {
            let v = vals.get_mut(&(k % 300)).unwrap();
            assert!(v.iter().all(|&b| b == pattern(k % 300)));
        }
        let mut tmp: Map<u64> = Map::with_hasher_in(Default::default(), a.clone());
        tmp.extend((0..10_000u64).map(|k| (k, k)));
        wait_child(pid);
        check(&small, &big, &vals, "parent after the child");
        drop(tmp);
        // Grow the parent's tables after the fork too (the old tables are shared with the
        // child that is gone; new ones must be fresh).
        for k in 0..100u64 {
            big.insert(u64::MAX - k - round * 1000, !(u64::MAX - k - round * 1000));
        }
    }
    stop.store(true, Ordering::Relaxed);
    join_all(workers);
    check(&small, &big, &vals, "parent at the end");
    drop((small, big, vals));
    assert_all_given_back(&a);
}

/// The forked child starts with threads of its own at once (before the forking thread uses the
/// allocator), while the parent's threads were in the middle of allocating: the child's threads
/// must never hand out memory the parent's blocks use. The parent's workers write their blocks
/// continuously while the child lives and check them after.
#[test]
fn child_threads_first_then_forking_thread() {
    let _serial = serial();
    let dir = TestDir::new("adv-child-threads");
    let a = allocator(&dir);
    let stop = Arc::new(AtomicBool::new(false));
    let pool: Pool = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (0..2u64)
        .map(|t| {
            let (a, pool, stop) = (a.clone(), pool.clone(), stop.clone());
            thread::spawn(move || {
                let mut seed = 700 + t;
                while !stop.load(Ordering::Relaxed) {
                    let left = churn(&a, &pool, seed, 100, 24);
                    left.into_iter().for_each(|b| free(&a, b));
                    seed += 2;
                }
            })
        })
        .collect();
    let start = Instant::now();
    let mut forks = 0;
    while forks < 3 * scale().min(8) && start.elapsed() < Duration::from_secs(20) {
        let mut held: Vec<Block> = (0..50)
            .map(|i| {
                allocate(
                    &a,
                    Layout::from_size_align(16 << (i % 15), 16).unwrap(),
                    false,
                )
            })
            .collect();
        // Into the forking thread's cache just before the fork.
        for _ in 0..20 {
            free(&a, held.pop().unwrap());
        }
        let pid = fork_child(|| {
            let hs: Vec<_> = (0..3u64)
                .map(|t| {
                    let a = a.clone();
                    thread::spawn(move || {
                        let pool: Pool = Arc::new(Mutex::new(Vec::new()));
                        let left = churn(&a, &pool, 10_000 + t, 400, 32);
                        thread::sleep(Duration::from_millis(20));
                        left.iter()
                            .for_each(|b| b.check("child thread after a while"));
                        left.into_iter().for_each(|b| free(&a, b));
                        let v = std::mem::take(&mut *pool.lock().unwrap());
                        v.into_iter().for_each(|b| free(&a, b));
                    })
                })
                .collect();
            join_all(hs);
            // Now the forking thread: its cache is from before the fork.
            let mine: Vec<Block> = (0..50)
                .map(|i| {
                    allocate(
                        &a,
                        Layout::from_size_align(16 << (i % 15), 16).unwrap(),
                        true,
                    )
                })
                .collect();
            held.iter().for_each(|b| b.check("child: inherited"));
            mine.into_iter().for_each(|b| free(&a, b));
        });
        wait_child(pid);
        held.into_iter().for_each(|b| free(&a, b));
        forks += 1;
    }
    stop.store(true, Ordering::Relaxed);
    join_all(workers);
    std::mem::take(&mut *pool.lock().unwrap())
        .into_iter()
        .for_each(|b| free(&a, b));
    assert_all_given_back(&a);
}

// ---------------------------------------------------------------------------------------------
// Findings

/// In a fork child, the free blocks that the parent's *other* threads held in their caches
/// stay counted live in their (closed) chunks for the child's whole life: those threads do not
/// exist in the child, nothing gives their caches back, and `trim` cannot reach them. Each such
/// chunk keeps a 4 MiB view of a chunk file (and, once the parent lets go of it, the file's
/// reserved disk) in the child, up to 8 chunks per parent thread. Segments kept in the other
/// threads' slots are given back in the child (`slot::give_back_orphans`); thread caches of
/// the small-block tier have no such pass.
///
/// With `other_threads_alive == false` (the threads exited before the fork, giving their
/// caches back) the child ends with no chunk: the check below can pass.
fn orphaned_caches_in_child(other_threads_alive: bool) -> (u64, u64) {
    let dir = TestDir::new("adv-orphans");
    let a = dir.allocator();
    let (ready, release) = (Arc::new(Barrier::new(4)), Arc::new(Barrier::new(4)));
    let threads: Vec<_> = (0..3u64)
        .map(|_| {
            let (a, ready, release) = (a.clone(), ready.clone(), release.clone());
            thread::spawn(move || {
                // Blocks of 8 classes up to 8 KiB, all freed: they sit in this thread's cache.
                for i in 0..8usize {
                    let l = Layout::from_size_align(16 << i, 16).unwrap();
                    let blocks: Vec<Block> = (0..8).map(|_| allocate(&a, l, false)).collect();
                    blocks.into_iter().for_each(|b| free(&a, b));
                }
                if other_threads_alive {
                    ready.wait();
                    release.wait();
                }
            })
        })
        .collect();
    let mut threads = threads;
    if other_threads_alive {
        ready.wait();
    } else {
        threads.drain(..).for_each(|t| t.join().unwrap());
    }
    let mut pipe = [0i32; 2];
    // SAFETY: a valid out-array of two descriptors.
    assert_eq!(unsafe { libc::pipe(pipe.as_mut_ptr()) }, 0);
    let pid = fork_child(|| {
        a.trim();
        let s = a.stats();
        let out = [s.small.arena_bytes, s.small.in_use_bytes];
        // SAFETY: a valid buffer of 16 bytes and the pipe's write end.
        unsafe { libc::write(pipe[1], out.as_ptr().cast(), 16) };
    });
    let mut out = [0u64; 2];
    // SAFETY: a valid buffer of 16 bytes and the pipe's read end.
    let n = unsafe { libc::read(pipe[0], out.as_mut_ptr().cast(), 16) };
    wait_child(pid);
    // SAFETY: our descriptors, closed once.
    unsafe {
        libc::close(pipe[0]);
        libc::close(pipe[1]);
    }
    assert_eq!(n, 16);
    if other_threads_alive {
        release.wait();
        for t in threads {
            t.join().unwrap();
        }
    }
    a.trim();
    assert_all_given_back(&a);
    (out[0], out[1])
}

#[test]
fn child_keeps_no_chunk_when_the_other_threads_had_exited() {
    let _serial = serial();
    let (arena, in_use) = orphaned_caches_in_child(false);
    assert_eq!((arena, in_use), (0, 0));
}

/// BUG (leak): see `orphaned_caches_in_child`. Fails today: the child keeps 13 to 17 chunks
/// (52 to 68 MiB of chunk views, depending on the threads' shards) with no block in use.
#[test]
#[ignore = "bug: a fork child never gives back the parent's other threads' cached small blocks"]
fn child_gives_back_blocks_cached_by_the_parents_other_threads() {
    let _serial = serial();
    let (arena, in_use) = orphaned_caches_in_child(true);
    assert_eq!(in_use, 0);
    assert_eq!(arena, 0, "chunk bytes the child keeps with nothing in use");
}

/// A creator of memfd files that starts failing when told to.
#[derive(Debug, Clone)]
struct Switch(Arc<AtomicBool>);

// SAFETY: every call makes a new memfd, hands it out once and keeps nothing.
unsafe impl mmapvec::SegmentCreator for Switch {
    fn create(&self, _r: &mmapvec::SegmentRequest) -> std::io::Result<mmapvec::SegmentFile> {
        if self.0.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("creator switched off"));
        }
        // SAFETY: a valid C string.
        let fd = unsafe { libc::memfd_create(c"adv".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: just opened, owned by nothing else.
        Ok(mmapvec::SegmentFile::anonymous(unsafe {
            <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd)
        }))
    }
}

/// Shrinks a block of `size` bytes to 100 bytes with the creator failing; returns whether
/// the shrink succeeded and the block's first bytes were kept.
fn shrink_with_a_failing_creator(small_threshold: Option<usize>) -> bool {
    let off = Arc::new(AtomicBool::new(false));
    let mut b = MmapAllocator::builder().creator(Switch(off.clone()));
    if let Some(t) = small_threshold {
        b = b.small_threshold(t);
    }
    let a = b.build().unwrap();
    let mut v: ApiVec<u8, MmapAllocator> = ApiVec::with_capacity_in(30_000, a.clone());
    v.resize(30_000, 7);
    v.truncate(100);
    off.store(true, Ordering::SeqCst);
    let (ptr, cap) = (NonNull::new(v.as_mut_ptr()).unwrap(), v.capacity());
    std::mem::forget(v);
    let old = Layout::array::<u8>(cap).unwrap();
    let new = Layout::array::<u8>(100).unwrap();

    // SAFETY: the vector's block, allocated with `old`; `v` is forgotten.
    match unsafe { a.shrink(ptr, old, new) } {
        Ok(block) => {
            let p = block.cast::<u8>();
            // SAFETY: the shrunk block holds at least 100 bytes.
            let kept = unsafe { std::slice::from_raw_parts(p.as_ptr(), 100) }
                .iter()
                .all(|&x| x == 7);
            // SAFETY: allocated with `new` now.
            unsafe { a.deallocate(p, new) };
            kept
        }
        Err(_) => {
            // SAFETY: the block is unchanged on failure.
            unsafe { a.deallocate(ptr, old) };
            false
        }
    }
}

#[test]
fn a_segment_shrink_with_no_new_file_keeps_the_block() {
    let _serial = serial();
    // The segment tier's own rule: a shrink that cannot move keeps the block (an error would
    // make `Vec::shrink_to_fit` abort).
    assert!(shrink_with_a_failing_creator(Some(0)));
}

/// Found by the adversarial review (fixed in `Inner::resize_small`, `src/allocator.rs`): a
/// shrink of a small block to another class needs a new block; when none could be had (full
/// disk, failing creator, region full) the shrink failed, and `Vec::shrink_to_fit` /
/// `into_boxed_slice` then aborted the process, although keeping the block whole is a valid
/// shrink, as the segment path does (see the test above). Same for every shrink of a pre-fork
/// block in the parent (never in place). Now the block is kept.
#[test]
fn a_small_block_shrink_with_no_new_chunk_keeps_the_block() {
    let _serial = serial();
    assert!(shrink_with_a_failing_creator(None));
}

/// Under `RLIMIT_AS` the tier's regions take an eighth of what the limit leaves; with 520 MiB
/// left, one region of 64 MiB (16 chunks) and no second (an eighth of the 456 MiB left then is
/// less than a region): blocks of more classes than that fall back to segments while the
/// region is full, and come back to the tier as chunks empty. Small blocks as segments and as tier blocks, side by side, grown, shrunk and freed.
/// In a child process (the limit is process-wide).
#[test]
fn a_full_region_falls_back_to_segments() {
    let _serial = serial();
    let dir = TestDir::new("adv-region");
    let pid = fork_child(|| {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let vm_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmSize:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        let limit = vm_kib * 1024 + (520 << 20);
        let rl = libc::rlimit {
            rlim_cur: limit,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: a valid rlimit.
        assert_eq!(unsafe { libc::setrlimit(libc::RLIMIT_AS, &rl) }, 0);
        let a = allocator(&dir);
        let mut rng = Rng::new(5);
        let mut blocks: Vec<Block> = Vec::new();
        // One block of each of 40 sizes spread over the classes: more chunks than the region.
        for i in 0..40usize {
            let s = 16usize << (i % 16) | (i * 8);
            let l = Layout::from_size_align(s.min(512 << 10), 16).unwrap();
            blocks.push(allocate(&a, l, i % 2 == 0));
        }
        let stats = a.stats();
        assert!(
            stats.small.mapped_bytes <= 64 << 20,
            "region above 64 MiB: {stats:#?}"
        );
        assert!(
            stats.live_segments > 0,
            "no small block fell back to a segment: {stats:#?}"
        );
        let pool: Pool = Arc::new(Mutex::new(Vec::new()));
        let mut left = churn(&a, &pool, 17, 3000, 40);
        for b in blocks.iter_mut().step_by(3) {
            let new = Layout::from_size_align(b.layout.size() / 3 + 1, 16).unwrap();
            resize(&a, b, new, false);
        }
        left.extend(std::mem::take(&mut *pool.lock().unwrap()));
        blocks.iter().for_each(|b| b.check("region child"));
        blocks.into_iter().for_each(|b| free(&a, b));
        left.into_iter().for_each(|b| free(&a, b));
        let more: Vec<Block> = (0..2000)
            .map(|_| {
                let l = Layout::from_size_align(rng.range(1, 600), 8).unwrap();
                allocate(&a, l, true)
            })
            .collect();
        more.into_iter().for_each(|b| free(&a, b));
        assert_all_given_back(&a);
    });
    wait_child(pid);
}
