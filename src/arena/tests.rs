//! Unit tests of the small-block tier.

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::sync::Mutex;

use super::*;
use crate::creator::{DirCreator, SegmentFile, SegmentRequest};
use std::sync::Arc;

fn creator() -> DirCreator {
    DirCreator::new(std::env::temp_dir())
}

fn tier(retain_empty: usize) -> Arc<SmallTier> {
    Arc::new(SmallTier::new(TierConfig {
        retain_empty,
        ..TierConfig::default()
    }))
}

/// A tier whose chunks are reserved whole when made, as where pages cannot be backed one by
/// one (and as a store's).
fn whole_tier(retain_empty: usize) -> Arc<SmallTier> {
    let config = TierConfig {
        retain_empty,
        ..TierConfig::default()
    };
    Arc::new(SmallTier::with_backing(config, Backing::Whole))
}

fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).unwrap()
}

/// A small deterministic generator (xorshift64*), so failures reproduce.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }

    /// Mostly small sizes, sometimes up to `MAX_SMALL`.
    fn size(&mut self) -> usize {
        match self.below(10) {
            0 => 1 + self.below(MAX_SMALL),
            1..=3 => 1 + self.below(4096),
            _ => 1 + self.below(256),
        }
    }

    fn align(&mut self) -> usize {
        if self.below(4) == 0 {
            1 << self.below(13)
        } else {
            1 << self.below(4)
        }
    }
}

/// A live block and the byte it was filled with.
struct Live {
    ptr: NonNull<[u8]>,
    fill: u8,
}

// SAFETY: a `Live` is the only handle to its block (a test's own allocation); blocks may be
// used and freed from any thread.
unsafe impl Send for Live {}

fn fill(block: NonNull<[u8]>, byte: u8) {
    // SAFETY: the block was just allocated by the tier, `block.len()` bytes, used by no one else.
    unsafe { block.cast::<u8>().write_bytes(byte, block.len()) };
}

fn check(live: &Live) {
    // SAFETY: the block is currently allocated and was filled over its whole length.
    let bytes = unsafe { live.ptr.as_ref() };
    assert!(
        bytes.iter().all(|&b| b == live.fill),
        "block at {:p} ({} bytes) lost its contents",
        live.ptr,
        bytes.len()
    );
}

fn check_disjoint(blocks: &[Live]) {
    let mut ranges: Vec<(usize, usize)> = blocks
        .iter()
        .map(|b| (b.ptr.cast::<u8>().as_ptr().addr(), b.ptr.len()))
        .collect();
    ranges.sort_unstable();
    for pair in ranges.windows(2) {
        assert!(
            pair[0].0 + pair[0].1 <= pair[1].0,
            "blocks overlap: {pair:?}"
        );
    }
}

fn chunk_of(tier: &SmallTier, ptr: NonNull<[u8]>) -> u32 {
    tier.index_of(ptr.cast())
}

/// A random program of allocations and frees; returns the live blocks.
fn run_program(tier: &Arc<SmallTier>, creator: &DirCreator, seed: u64, steps: usize) -> Vec<Live> {
    let mut rng = Rng(seed);
    let mut live: Vec<Live> = Vec::new();
    for step in 0..steps {
        if !live.is_empty() && rng.below(5) < 2 {
            let victim = live.swap_remove(rng.below(live.len()));
            check(&victim);
            // SAFETY: allocated by this tier, freed once.
            unsafe { tier.deallocate(victim.ptr.cast(), 0) };
        } else {
            let (size, align) = (rng.size(), rng.align());
            let ptr = tier
                .allocate(layout(size, align), false, 0, creator)
                .unwrap();
            assert!(ptr.len() >= size);
            assert!(ptr.cast::<u8>().as_ptr().addr().is_multiple_of(align));
            // SAFETY: just allocated.
            assert_eq!(unsafe { tier.block_len(ptr.cast()) }, ptr.len());
            assert!(tier.contains(ptr.cast()));
            let fill = (step % 251) as u8 + 1;
            self::fill(ptr, fill);
            live.push(Live { ptr, fill });
        }
        if step % 500 == 0 {
            live.iter().for_each(check);
            check_disjoint(&live);
        }
    }
    live.iter().for_each(check);
    check_disjoint(&live);
    live
}

fn free_all(tier: &Arc<SmallTier>, live: Vec<Live>, epoch: u64) {
    for block in live {
        check(&block);
        // SAFETY: allocated by this tier, freed once.
        unsafe { tier.deallocate(block.ptr.cast(), epoch) };
    }
}

#[test]
fn random_blocks_are_aligned_disjoint_and_keep_their_contents() {
    let (tier, creator) = (tier(2), creator());
    let live = run_program(&tier, &creator, 0x9e37_79b9_7f4a_7c15, 4000);
    let stats = tier.stats();
    let in_use: u64 = live.iter().map(|b| b.ptr.len() as u64).sum();
    assert_eq!(stats.in_use_bytes, in_use);
    assert_eq!(
        stats.mapped_bytes,
        (stats.chunks_created - stats.chunks_released) * CHUNK as u64
    );
    assert!(stats.arena_bytes <= stats.mapped_bytes, "{stats:?}");
    free_all(&tier, live, 0);
    let stats = tier.stats();
    assert_eq!(stats.in_use_bytes, 0);
    // What stays mapped: the empty chunks kept, and each class's current chunk (kept open,
    // empty, for that class's next blocks), each with its first pieces backed.
    let kept = (KEPT_EMPTY + class::COUNT) as u64;
    assert!(stats.mapped_bytes <= kept * CHUNK as u64, "{stats:?}");
    assert!(
        stats.arena_bytes <= kept * kept_when_empty(MAX_SMALL),
        "{stats:?}"
    );
    assert_eq!(stats.free_bytes, stats.arena_bytes);
}

#[test]
fn freed_space_is_reused_across_cycles() {
    let (tier, creator) = (tier(usize::MAX), creator());
    let mut created = Vec::new();
    for _ in 0..3 {
        let live = run_program(&tier, &creator, 42, 2000);
        free_all(&tier, live, 0);
        created.push(tier.stats().chunks_created);
    }
    // The same program needs the same chunks: every later cycle reuses the earlier ones'.
    // (The first free leaves blocks in this thread's cache, which may pin a few chunks that
    // the second cycle then does not find empty: at most a cache's worth more, once.)
    assert_eq!(created[1], created[2], "{created:?}");
    assert!(
        created[1] <= created[0] + tcache::CLASSES as u64,
        "{created:?}"
    );
    assert_eq!(tier.stats().chunks_released, 0);
}

/// The descriptors of this process open on files in `folder` (named or removed): only the
/// files of the creator there, whatever other tests running in parallel open.
fn descriptors_into(folder: &std::path::Path) -> usize {
    let folder = folder.to_string_lossy().into_owned() + "/";
    fs::read_dir("/proc/self/fd").map_or(0, |fds| {
        fds.filter_map(|fd| fs::read_link(fd.ok()?.path()).ok())
            .filter(|target| target.to_string_lossy().starts_with(&folder))
            .count()
    })
}

#[test]
fn hundred_thousand_small_blocks_share_few_chunks_and_hold_no_descriptor() {
    let base = std::env::temp_dir().join(format!("mmapvec-arena-fds-{}", std::process::id()));
    fs::create_dir_all(&base).unwrap();
    let creator = DirCreator::new(&base);
    let tier = tier(2);
    let blocks: Vec<NonNull<[u8]>> = (0..100_000u32)
        .map(|i| {
            let block = tier.allocate(layout(32, 8), false, 0, &creator).unwrap();
            // SAFETY: a fresh 32-byte block, aligned to 16.
            unsafe { block.cast::<u32>().write(i) };
            block
        })
        .collect();
    let needed = (100_000 * 32usize).div_ceil(CHUNK) as u64;
    let stats = tier.stats();
    assert!(stats.chunks_created <= needed + 1, "{stats:?}");
    assert_eq!(stats.in_use_bytes, 100_000 * 32);
    for (i, block) in blocks.iter().enumerate() {
        // SAFETY: still allocated, written above.
        assert_eq!(unsafe { block.cast::<u32>().read() }, i as u32);
    }

    // Many chunks (sparse files, never touched): still no descriptor per chunk.
    let sparse = Arc::new(SmallTier::new(TierConfig {
        reserve_disk: false,
        ..TierConfig::default()
    }));
    let big: Vec<_> = (0..1000)
        .map(|_| {
            sparse
                .allocate(layout(256 << 10, 8), false, 0, &creator)
                .unwrap()
        })
        .collect();
    assert!(sparse.stats().chunks_created >= 60);
    // The creator's folder holds its lock file open (one descriptor); chunks hold none.
    let held = descriptors_into(&creator.folder());
    assert!(held <= 1, "{held} descriptors into {:?}", creator.folder());
    for block in big {
        // SAFETY: allocated above, freed once.
        unsafe { sparse.deallocate(block.cast(), 0) };
    }
    for block in blocks {
        // SAFETY: allocated above, freed once.
        unsafe { tier.deallocate(block.cast(), 0) };
    }
    drop((tier, sparse, creator));
    let _ = fs::remove_dir_all(&base);
}

fn all_zero(block: NonNull<[u8]>) -> bool {
    // SAFETY: a block just allocated by the tier, `len` bytes.
    unsafe { block.as_ref() }.iter().all(|&b| b == 0)
}

#[test]
fn zeroed_blocks_are_zero_even_in_dirty_memory() {
    let (tier, creator) = (tier(2), creator());
    // Fresh chunk: bump blocks are zero without writing.
    let first = tier.allocate(layout(100, 4), true, 0, &creator).unwrap();
    assert!(all_zero(first));
    fill(first, 0xff);
    let dirty: Vec<_> = (0..1000)
        .map(|_| {
            let b = tier.allocate(layout(100, 4), false, 0, &creator).unwrap();
            fill(b, 0xee);
            b
        })
        .collect();
    // Freed blocks of the same class, reused.
    for &b in &dirty[..500] {
        // SAFETY: allocated above, freed once.
        unsafe { tier.deallocate(b.cast(), 0) };
    }
    for _ in 0..500 {
        let b = tier.allocate(layout(100, 4), true, 0, &creator).unwrap();
        assert!(all_zero(b));
        fill(b, 0xdd);
    }
    // A dirty chunk, emptied and kept, then given another class.
    let created = tier.stats().chunks_created;
    let whole: Vec<_> = (0..CHUNK / MAX_SMALL)
        .map(|_| {
            let b = tier
                .allocate(layout(MAX_SMALL, 8), false, 0, &creator)
                .unwrap();
            fill(b, 0xcc);
            b
        })
        .collect();
    for b in whole {
        // SAFETY: allocated above, freed once.
        unsafe { tier.deallocate(b.cast(), 0) };
    }
    let created = created + 1;
    assert_eq!(tier.stats().chunks_created, created);
    for _ in 0..(CHUNK / (384 << 10)) {
        let b = tier
            .allocate(layout(384 << 10, 8), true, 0, &creator)
            .unwrap();
        assert!(all_zero(b));
    }
    assert_eq!(
        tier.stats().chunks_created,
        created,
        "the kept chunk was reused"
    );
}

#[test]
fn empty_chunks_beyond_retain_are_released_and_their_indices_reused() {
    let (tier, creator) = (whole_tier(2), creator());
    let per_chunk = CHUNK / MAX_SMALL;
    let big = layout(MAX_SMALL, 8);
    let blocks: Vec<_> = (0..5 * per_chunk)
        .map(|_| tier.allocate(big, false, 0, &creator).unwrap())
        .collect();
    let indices: HashSet<u32> = blocks.iter().map(|&b| chunk_of(&tier, b)).collect();
    assert_eq!(indices.len(), 5);
    assert_eq!(tier.stats().chunks_created, 5);
    for b in blocks {
        // SAFETY: allocated above, freed once.
        unsafe { tier.deallocate(b.cast(), 0) };
    }
    // The last chunk filled stays open, empty (the class's current chunk); of the other four,
    // two are kept and two released.
    let stats = tier.stats();
    assert_eq!(stats.chunks_released, 2, "{stats:?}");
    assert_eq!(stats.returned_bytes, 2 * CHUNK as u64);
    assert_eq!(stats.arena_bytes, 3 * CHUNK as u64);
    assert_eq!(stats.free_bytes, 3 * CHUNK as u64);

    let again: Vec<_> = (0..5 * per_chunk)
        .map(|_| tier.allocate(big, false, 0, &creator).unwrap())
        .collect();
    let reused: HashSet<u32> = again.iter().map(|&b| chunk_of(&tier, b)).collect();
    assert_eq!(reused, indices, "released indices are reused");
    assert_eq!(
        tier.stats().chunks_created,
        7,
        "the open chunk and two kept ones reused, two made"
    );
    for b in again {
        // SAFETY: allocated above, freed once.
        unsafe { tier.deallocate(b.cast(), 0) };
    }
}

#[test]
fn a_new_epoch_never_hands_out_space_from_older_chunks() {
    let (tier, creator) = (tier(2), creator());
    let per_chunk = CHUNK / MAX_SMALL;
    let big = layout(MAX_SMALL, 8);
    let small = layout(48, 8);
    let mut old: Vec<_> = (0..3 * per_chunk)
        .map(|_| tier.allocate(big, false, 0, &creator).unwrap())
        .collect();
    old.extend((0..100).map(|_| tier.allocate(small, false, 0, &creator).unwrap()));
    // Empty the last big chunk in epoch 0: it is kept for reuse...
    let kept = chunk_of(&tier, old[3 * per_chunk - 1]);
    old.retain(|&b| {
        let in_kept = chunk_of(&tier, b) == kept;
        if in_kept {
            // SAFETY: allocated above, freed once.
            unsafe { tier.deallocate(b.cast(), 0) };
        }
        !in_kept
    });
    assert_eq!(tier.stats().chunks_released, 0);
    let old_chunks: HashSet<u32> = old.iter().map(|&b| chunk_of(&tier, b)).collect();
    assert_eq!(old_chunks.len(), 3, "two big chunks and a small one");

    // ...and after the fork, free space in old chunks (by count only) must not be used.
    // Every other block: each old chunk keeps live blocks, so none is released (and none of
    // their indices can be reused legitimately).
    let mut position = 0;
    old.retain(|&b| {
        position += 1;
        if position % 2 == 0 {
            // SAFETY: allocated above, freed once.
            unsafe { tier.deallocate(b.cast(), 1) };
        }
        position % 2 == 1
    });
    // The emptied epoch-0 chunk (its class's current one, kept open) is released as soon as
    // its shard sees the new epoch: no free is left to release it later.
    assert_eq!(tier.stats().chunks_released, 1);
    let new: Vec<_> = (0..2 * per_chunk)
        .map(|_| tier.allocate(big, false, 1, &creator).unwrap())
        .chain((0..200).map(|_| tier.allocate(small, false, 1, &creator).unwrap()))
        .collect();
    for &b in &new {
        assert!(
            !old_chunks.contains(&chunk_of(&tier, b)),
            "epoch-0 chunk reused"
        );
    }
    let stats = tier.stats();
    assert_eq!(
        stats.chunks_released, 1,
        "the kept epoch-0 chunk: {stats:?}"
    );

    for b in old {
        // SAFETY: allocated above, freed once.
        unsafe { tier.deallocate(b.cast(), 1) };
    }
    let stats = tier.stats();
    assert_eq!(stats.chunks_released, 4, "every epoch-0 chunk: {stats:?}");
    assert_eq!(stats.mapped_bytes, 3 * CHUNK as u64, "{stats:?}");
    for b in new {
        // SAFETY: allocated above, freed once.
        unsafe { tier.deallocate(b.cast(), 1) };
    }
}

#[test]
fn threads_allocate_and_free_each_others_blocks() {
    let (tier, creator) = (tier(2), creator());
    let exchange: Mutex<Vec<Live>> = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        let mut handles = Vec::new();
        for t in 0..2u64 {
            let (tier, creator, exchange) = (&tier, &creator, &exchange);
            handles.push(s.spawn(move || {
                let mut rng = Rng(0x1234_5678 + t);
                let mut mine: Vec<Live> = Vec::new();
                for step in 0..20_000 {
                    match rng.below(6) {
                        0 | 1 if !mine.is_empty() => {
                            let victim = mine.swap_remove(rng.below(mine.len()));
                            check(&victim);
                            // SAFETY: allocated by this tier, freed once.
                            unsafe { tier.deallocate(victim.ptr.cast(), 0) };
                        }
                        2 if !mine.is_empty() => {
                            let given = mine.swap_remove(rng.below(mine.len()));
                            exchange.lock().unwrap().push(given);
                        }
                        3 => {
                            let taken = exchange.lock().unwrap().pop();
                            if let Some(block) = taken {
                                check(&block);
                                // SAFETY: allocated by this tier (maybe in the other thread),
                                // freed once.
                                unsafe { tier.deallocate(block.ptr.cast(), 0) };
                            }
                        }
                        _ => {
                            let size = 1 + rng.below(2048);
                            let ptr = tier.allocate(layout(size, 8), false, 0, creator).unwrap();
                            let fill = (step % 253) as u8 + 1 + t as u8;
                            self::fill(ptr, fill);
                            mine.push(Live { ptr, fill });
                        }
                    }
                }
                mine.iter().for_each(check);
                exchange.lock().unwrap().extend(mine);
            }));
        }
        // Joined by hand: the scope's end waits only for the closures, not for the threads'
        // exit, where their caches give back what they hold.
        for h in handles {
            h.join().expect("worker thread");
        }
    });
    let all = exchange.into_inner().unwrap();
    check_disjoint(&all);
    free_all(&tier, all, 0);
    assert_eq!(tier.stats().in_use_bytes, 0);
}

#[test]
fn contains_only_the_region() {
    let (tier, creator) = (tier(2), creator());
    let heap = Box::new(7u64);
    let stack = 7u64;
    assert!(!tier.contains(NonNull::from(&*heap).cast()));
    let block = tier.allocate(layout(64, 8), false, 0, &creator).unwrap();
    assert!(tier.contains(block.cast()));
    assert!(!tier.contains(NonNull::from(&*heap).cast()));
    assert!(!tier.contains(NonNull::from(&stack).cast()));
    // SAFETY: allocated above, freed once.
    unsafe { tier.deallocate(block.cast(), 0) };
}

#[test]
fn serves_small_page_aligned_layouts_only() {
    let tier = Arc::new(SmallTier::new(TierConfig {
        threshold: 1024,
        ..TierConfig::default()
    }));
    assert!(tier.serves(layout(1, 1)));
    assert!(tier.serves(layout(1024, 4096)));
    assert!(!tier.serves(layout(0, 1)));
    assert!(!tier.serves(layout(1025, 1)));
    assert!(!tier.serves(layout(8, 8192)));
}

#[test]
fn dont_fork_chunks_are_made_and_released() {
    let creator = creator();
    let tier = Arc::new(SmallTier::new(TierConfig {
        dont_fork: true,
        retain_empty: 0,
        ..TierConfig::default()
    }));
    let block = tier.allocate(layout(4000, 64), true, 0, &creator).unwrap();
    assert!(all_zero(block));
    fill(block, 1);
    // SAFETY: allocated above, freed once.
    unsafe { tier.deallocate(block.cast(), 0) };
    // Empty, it stays open for the class's next blocks...
    let stats = tier.stats();
    assert_eq!((stats.chunks_created, stats.chunks_released), (1, 0));
    // ...until a fork closes it: released then (and its fork record dropped with it).
    let block = tier.allocate(layout(4000, 64), true, 1, &creator).unwrap();
    // SAFETY: allocated above, freed once.
    unsafe { tier.deallocate(block.cast(), 1) };
    let stats = tier.stats();
    assert_eq!((stats.chunks_created, stats.chunks_released), (2, 1));
}

/// Hands out a file that already holds data, as a buggy creator might.
#[derive(Debug)]
struct NonEmpty(std::path::PathBuf);

// SAFETY: a new file under a fresh name, handed out once; the path is the file's own.
unsafe impl SegmentCreator for NonEmpty {
    fn create(&self, _request: &SegmentRequest) -> io::Result<SegmentFile> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&self.0)?;
        file.write_all(b"user data")?;
        Ok(SegmentFile::named(file, &self.0))
    }
}

#[test]
fn a_non_empty_file_is_refused_and_kept() {
    let path = std::env::temp_dir().join(format!("mmapvec-arena-nonempty-{}", std::process::id()));
    let _ = fs::remove_file(&path);
    let tier = tier(2);
    let err = tier
        .allocate(layout(64, 8), false, 0, &NonEmpty(path.clone()))
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert_eq!(
        fs::read(&path).unwrap(),
        b"user data",
        "the user's file is left alone"
    );
    fs::remove_file(&path).unwrap();
    // The index went back: the next good chunk takes it.
    let block = tier.allocate(layout(64, 8), false, 0, &creator()).unwrap();
    assert_eq!(chunk_of(&tier, block), 0);
    // SAFETY: allocated above, freed once.
    unsafe { tier.deallocate(block.cast(), 0) };
}

#[test]
fn thread_caches_go_back_on_switch_at_thread_exit_and_after_their_tier() {
    let creator = creator();
    let (a, b, c) = (tier(2), tier(2), tier(2));
    let small = layout(64, 8);
    let caches = |t: &SmallTier| t.lock_caches().len();
    // A thread joined with `join` (a scoped thread's end is signalled before its thread-locals
    // are destroyed).
    let (a2, b2) = (Arc::clone(&a), Arc::clone(&b));
    std::thread::spawn(move || {
        let (a, b, creator) = (a2, b2, self::creator());
        {
            let blocks: Vec<_> = (0..10)
                .map(|_| a.allocate(small, false, 0, &creator).unwrap())
                .collect();
            for block in blocks {
                // SAFETY: allocated above, freed once.
                unsafe { a.deallocate(block.cast(), 0) };
            }
            // Cached on this thread: live for the chunk, not in use.
            assert_eq!((caches(&a), a.stats().in_use_bytes), (1, 0));
            // A block of another tier: `a`'s cache goes back to `a`.
            let other = b.allocate(small, false, 0, &creator).unwrap();
            // SAFETY: allocated above, freed once.
            unsafe { b.deallocate(other.cast(), 0) };
            assert_eq!((caches(&a), caches(&b)), (0, 1));
            // Back in `a`'s bitmap: the next ten come from the same chunk, no new one.
            let created = a.stats().chunks_created;
            let again: Vec<_> = (0..10)
                .map(|_| a.allocate(small, false, 0, &creator).unwrap())
                .collect();
            assert_eq!(a.stats().chunks_created, created);
            for block in again {
                // SAFETY: allocated above, freed once.
                unsafe { a.deallocate(block.cast(), 0) };
            }
        }
    })
    .join()
    .unwrap();
    // The thread's exit gave its cache back.
    assert_eq!((caches(&a), caches(&b)), (0, 0));
    assert_eq!(a.stats().in_use_bytes, 0);

    // A cache whose tier is gone forgets its blocks: the region is unmapped already.
    let c_block = c.allocate(small, false, 0, &creator).unwrap();
    // SAFETY: allocated above, freed once (into this thread's cache).
    unsafe { c.deallocate(c_block.cast(), 0) };
    assert_eq!(caches(&c), 1);
    let weak = Arc::downgrade(&c);
    drop(c);
    assert!(weak.upgrade().is_none());
    let blocks: Vec<_> = (0..3)
        .map(|_| b.allocate(small, false, 0, &creator).unwrap())
        .collect();
    for block in blocks {
        // SAFETY: allocated above, freed once.
        unsafe { b.deallocate(block.cast(), 0) };
    }
}

/// The bytes an emptied chunk of blocks of `size` bytes keeps backed at most.
fn kept_when_empty(size: usize) -> u64 {
    (chunk::kept_when_empty(size).count_ones() as usize * chunk::PIECE) as u64
}

/// Issue 18: a class's emptied current chunk stays, with only its first pieces backed, so a
/// loop over many classes makes no new chunk once warm (before, a shard kept two and the next
/// block of every other class needed a new file).
#[test]
fn empty_current_chunks_stay_with_their_first_pieces() {
    let (tier, creator) = (tier(2), creator());
    // Blocks in each class above the thread caches' sizes, a chunk's worth, freed at once:
    // each class's chunk empties while it is the class's current one.
    let round = || {
        for class in tcache::CLASSES..class::COUNT {
            let size = class::block_size(class);
            let blocks: Vec<_> = (0..CHUNK / size)
                .map(|_| tier.allocate(layout(size, 8), false, 0, &creator).unwrap())
                .collect();
            for block in blocks {
                // SAFETY: allocated above, freed once.
                unsafe { tier.deallocate(block.cast(), 0) };
            }
        }
    };
    round();
    let stats = tier.stats();
    assert_eq!(stats.in_use_bytes, 0);
    let bound: u64 = (tcache::CLASSES..class::COUNT)
        .map(|class| kept_when_empty(class::block_size(class)))
        .sum();
    assert!(stats.arena_bytes <= bound, "{stats:?}, bound {bound}");
    round();
    let again = tier.stats();
    assert_eq!(again.chunks_created, stats.chunks_created, "{again:?}");
    assert_eq!(again.chunks_released, 0, "{again:?}");
    assert!(again.arena_bytes <= bound, "{again:?}, bound {bound}");
    tier.trim();
    assert_eq!(tier.stats().arena_bytes, 0);
}

/// The bytes that threads' caches of `tier` hold now.
fn cached_bytes(tier: &SmallTier) -> u64 {
    tier.lock_caches()
        .iter()
        .map(|c| c.load(Ordering::Relaxed))
        .sum()
}

/// Chunks' worth of blocks of each of five cached classes, the first block of every chunk
/// freed first (into this thread's cache), then the rest. Issue 12, hole 1: each cached block
/// kept its whole chunk, so nothing was given back (40 chunks here).
#[test]
fn cached_blocks_pin_few_chunks_and_trim_gives_everything_back() {
    const CHUNKS_PER_CLASS: usize = 8;
    let (tier, creator) = (tier(2), creator());
    let mut blocks = Vec::new();
    for size in [64, 256, 1024, 4096, 8192] {
        let count = CHUNKS_PER_CLASS * (CHUNK / size);
        let class: Vec<_> = (0..count)
            .map(|_| tier.allocate(layout(size, 8), false, 0, &creator).unwrap())
            .collect();
        blocks.push((size, class));
    }
    let chunks = |t: &SmallTier| t.stats().arena_bytes.div_ceil(CHUNK as u64);
    assert_eq!(chunks(&tier), 5 * CHUNKS_PER_CLASS as u64);
    for (size, class) in &blocks {
        for first in class.iter().step_by(CHUNK / size) {
            // SAFETY: allocated above, freed once (here or below, not both).
            unsafe { tier.deallocate(first.cast(), 0) };
        }
    }
    for (size, class) in &blocks {
        for (i, block) in class.iter().enumerate() {
            if i % (CHUNK / size) != 0 {
                // SAFETY: allocated above, freed once.
                unsafe { tier.deallocate(block.cast(), 0) };
            }
        }
    }
    assert_eq!(tier.stats().in_use_bytes, 0);
    // Kept: the first pieces of every emptied chunk (and, within the tier's budget, some of
    // their other pieces), and under the cached blocks of the chunks the cache pins (one per
    // class): their other pieces went as their blocks were freed.
    let bytes = |t: &SmallTier| t.stats().arena_bytes;
    let emptied = (5 * CHUNKS_PER_CLASS) as u64 * kept_when_empty(8192) + super::IDLE_EXCESS_BUDGET;
    let pinned = 5 * 32 * chunk::PIECE as u64;
    assert!(bytes(&tier) <= emptied + pinned, "{:?}", tier.stats());
    // Another class, long enough for two collections: the other bins go back.
    for _ in 0..2 * tcache::GC_INTERVAL {
        let block = tier.allocate(layout(32, 8), false, 0, &creator).unwrap();
        // SAFETY: allocated just above, freed once.
        unsafe { tier.deallocate(block.cast(), 0) };
    }
    assert!(
        bytes(&tier) <= emptied + kept_when_empty(32),
        "{:?}",
        tier.stats()
    );
    // Trim: everything back, this thread's cache included.
    tier.trim();
    assert_eq!(chunks(&tier), 0, "{:?}", tier.stats());
    assert_eq!(cached_bytes(&tier), 0);
}

/// Before the tier makes new chunks (at one chunk in `FLUSH_EVERY_CHUNKS`), the blocks other
/// threads cache go back at their next use: an idle cache must not hold chunks while new ones
/// are made.
#[test]
fn a_new_chunk_asks_other_threads_caches_back() {
    let (tier, creator) = (tier(0), creator());
    let (to_worker, from_main) = std::sync::mpsc::channel::<()>();
    let (to_main, from_worker) = std::sync::mpsc::channel::<()>();
    let worker_tier = Arc::clone(&tier);
    let worker = std::thread::spawn(move || {
        let creator = self::creator();
        let blocks: Vec<_> = (0..8)
            .map(|_| {
                worker_tier
                    .allocate(layout(4096, 8), false, 0, &creator)
                    .unwrap()
            })
            .collect();
        for block in blocks {
            // SAFETY: allocated above, freed once (into this thread's cache).
            unsafe { worker_tier.deallocate(block.cast(), 0) };
        }
        to_main.send(()).unwrap();
        from_main.recv().unwrap();
        // One operation of another class: the flush request is seen.
        let other = worker_tier
            .allocate(layout(64, 8), false, 0, &creator)
            .unwrap();
        // SAFETY: allocated just above, freed once.
        unsafe { worker_tier.deallocate(other.cast(), 0) };
        to_main.send(()).unwrap();
        from_main.recv().unwrap();
    });
    from_worker.recv().unwrap();
    assert!(cached_bytes(&tier) >= 4096);
    // Classes no chunk serves yet: new chunks, and (once per `FLUSH_EVERY_CHUNKS` of them) the
    // request that comes before one.
    let sizes = [16, 32, 48, 96, 128, 256, 512, 1024, 2048];
    let blocks: Vec<_> = sizes
        .iter()
        .map(|&size| tier.allocate(layout(size, 8), false, 0, &creator).unwrap())
        .collect();
    assert!(tier.stats().chunks_created > FLUSH_EVERY_CHUNKS);
    assert!(tier.flush_requests() >= 1);
    to_worker.send(()).unwrap();
    from_worker.recv().unwrap();
    assert!(
        cached_bytes(&tier) <= 64,
        "the worker still caches {} bytes",
        cached_bytes(&tier)
    );
    to_worker.send(()).unwrap();
    worker.join().unwrap();
    for block in blocks {
        // SAFETY: allocated above, freed once.
        unsafe { tier.deallocate(block.cast(), 0) };
    }
}

/// A chunk whose range was lost (a failed `map` that could not keep it) may hold another
/// mapping later: its pointers are not the tier's, and dropping the tier leaves it alone.
#[test]
fn a_lost_chunk_is_not_the_tiers_and_is_not_unmapped_at_drop() {
    let (tier, creator) = (tier(2), creator());
    let block = tier.allocate(layout(64, 8), false, 0, &creator).unwrap();
    // Lose the next index, as `new_chunk` does after a failed map, and map "someone else's"
    // file where it was.
    let index = {
        let mut spare = tier.lock_spare();
        spare.next += 1;
        spare.next - 1
    };
    tier.meta_or_new(index).set_lost(true);
    tier.suspects.fetch_add(1, Ordering::Release);
    let at = tier.chunk_at(index);
    let path = std::env::temp_dir().join(format!("mmapvec-lost-chunk-{}", std::process::id()));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    fs::remove_file(&path).unwrap();
    file.set_len(CHUNK as u64).unwrap();
    // SAFETY: the range is the tier's reservation, given up above (the index is lost).
    unsafe { sys::map_file_fixed(at, &file, CHUNK) }.unwrap();
    // SAFETY: mapped read/write just above.
    unsafe { at.add(100).write(42) };

    assert!(tier.contains(block.cast()));
    assert!(!tier.contains(at), "a lost chunk's range is not the tier's");
    // SAFETY: in range of the mapping made above.
    assert!(!tier.contains(unsafe { at.add(CHUNK - 1) }));
    // SAFETY: allocated above, freed once.
    unsafe { tier.deallocate(block.cast(), 0) };
    drop(tier);
    assert!(
        sys::is_mapped(at, CHUNK),
        "the tier's drop unmapped a lost chunk's range"
    );
    // SAFETY: still mapped (checked above), and ours.
    assert_eq!(unsafe { at.add(100).read() }, 42);
    // SAFETY: the mapping made above, which nothing refers to any more.
    unsafe { sys::unmap(at, CHUNK) }.unwrap();
}

/// `reserve_at` takes a range only if all of it is free, and never touches a mapping there.
#[test]
fn reserve_at_takes_a_free_range_and_leaves_a_mapped_one_alone() {
    let len = 4 * sys::page_size();
    let at = sys::reserve(len).unwrap();
    // Taken: the range is someone's.
    assert_eq!(
        sys::reserve_at(at, len).unwrap_err().kind(),
        io::ErrorKind::AlreadyExists
    );
    // SAFETY: reserved just above, nothing refers to its second page.
    unsafe { sys::unmap(at.add(sys::page_size()), sys::page_size()) }.unwrap();
    // Partly free: still refused, and the rest stays mapped.
    assert!(sys::reserve_at(at, len).is_err());
    // (Checked with `reserve_at`, not `is_mapped`: msync on a PROT_NONE page upsets valgrind.)
    assert!(
        sys::reserve_at(at, sys::page_size()).is_err(),
        "the first page was unmapped"
    );
    // SAFETY: the reservation made above, which nothing refers to.
    unsafe { sys::unmap(at, len) }.unwrap();
    // All free: reserved at exactly that place. (Another test's thread may map into the range
    // between the unmap and the reservation: then it must be refused, and a new try succeed.)
    let taken = (0..10).any(|_| {
        let at = sys::reserve(len).unwrap();
        // SAFETY: reserved just above, nothing refers to it.
        unsafe { sys::unmap(at, len) }.unwrap();
        let got = sys::reserve_at(at, len).is_ok();
        if got {
            assert!(sys::reserve_at(at, len).is_err(), "not reserved");
            // SAFETY: just reserved by us.
            unsafe { sys::unmap(at, len) }.unwrap();
        }
        got
    });
    assert!(taken, "a free range was never reserved in place");
}

/// A `Vec` pushed from empty to 100 `u64`s over and over walks six classes (32 B to 1 KiB), each
/// block freed into the thread's cache as the next is taken. Each class keeps a chunk; after
/// the first round nothing is made, flushed or moved between classes. Before, every new chunk
/// asked the caches back: the flush emptied the previous class's chunk, the next class took it
/// over, and so on at every step (5 flushes and 5 bitmaps made per vector, 5× `std`).
#[test]
fn a_thread_cycling_a_few_classes_settles_with_no_flush() {
    let (tier, creator) = (tier(2), creator());
    let sizes = [32usize, 64, 128, 256, 512, 1024];
    for _ in 0..1000 {
        let mut prev: Option<NonNull<[u8]>> = None;
        for &size in &sizes {
            let block = tier.allocate(layout(size, 8), false, 0, &creator).unwrap();
            if let Some(old) = prev.replace(block) {
                // SAFETY: allocated above, freed once.
                unsafe { tier.deallocate(old.cast(), 0) };
            }
        }
        // SAFETY: allocated above, freed once.
        unsafe { tier.deallocate(prev.unwrap().cast(), 0) };
    }
    let stats = tier.stats();
    assert_eq!(tier.flush_requests(), 0, "{stats:?}");
    assert_eq!(stats.chunks_created, sizes.len() as u64, "{stats:?}");
    // Nothing else holds blocks: this thread's cache gives them all back.
    tcache::flush(&tier);
    assert_eq!(tier.stats().in_use_bytes, 0);
}
