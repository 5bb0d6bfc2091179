//! Each `Allocator` method of `MmapAllocator` called directly: alignments from 1 byte to 1 GiB,
//! zero sizes, overflowing sizes, bytes kept across grow and shrink, zeroed memory, failed grows
//! that leave the old block intact, and the heap threshold. Both grow strategies.

mod core_support;

use std::fmt::Debug;
use std::fs;
use std::ptr::NonNull;

use core_support::{TestDir, page};
use mmapvec::allocator_api2::alloc::{Allocator, Layout};
use mmapvec::{AccessPattern, GrowStrategy, MmapAllocator, MmapVec};

const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;

/// `MmapAllocator` must be usable wherever allocators are passed around, shared and stored.
#[test]
fn allocator_traits() {
    fn assert_traits<A: Allocator + Clone + Default + Debug + Send + Sync + 'static>() {}
    assert_traits::<MmapAllocator>();
    let debug = format!("{:?}", MmapAllocator::default());
    assert!(debug.contains("MmapAllocator"), "{debug}");
}

/// A segment-per-allocation allocator (the small-block tier off): these tests check the large
/// tier's segments one by one. The small tier's contract is tested by `tests/fuzz_allocator.rs`
/// (random programs across both tiers) and `tests/small_blocks.rs`.
fn allocator(dir: &TestDir, strategy: GrowStrategy) -> MmapAllocator {
    MmapAllocator::builder()
        .dir(dir.path())
        .grow_strategy(strategy)
        .small_threshold(0)
        .build()
        .expect("build")
}

fn layout(size: usize, align: usize) -> Layout {
    Layout::from_size_align(size, align).expect("valid layout")
}

/// The pattern's period: a prime, so a page moved to the wrong place shows.
const PERIOD: usize = 4093;

/// One period of the pattern for `seed` (blocks written at different times differ).
fn period(seed: u8) -> Vec<u8> {
    (0..PERIOD)
        .map(|i| ((i.wrapping_mul(2_654_435_761) >> 7) as u8) ^ seed)
        .collect()
}

/// Writes the pattern to `[ptr, ptr + len)`. (Whole periods at a time: tests run unoptimized.)
///
/// # Safety
/// The range must be writable.
unsafe fn fill(ptr: NonNull<u8>, len: usize, seed: u8) {
    // SAFETY: the caller guarantees `len` writable bytes at `ptr`.
    let bytes = unsafe { std::slice::from_raw_parts_mut(ptr.as_ptr(), len) };
    let period = period(seed);
    for chunk in bytes.chunks_mut(PERIOD) {
        chunk.copy_from_slice(&period[..chunk.len()]);
    }
}

/// Panics unless `[ptr, ptr + len)` holds the pattern.
///
/// # Safety
/// The range must be readable and initialized.
unsafe fn check(ptr: NonNull<u8>, len: usize, seed: u8, what: &str) {
    // SAFETY: the caller guarantees `len` readable bytes at `ptr`.
    let bytes = unsafe { std::slice::from_raw_parts(ptr.as_ptr(), len) };
    let period = period(seed);
    for (n, chunk) in bytes.chunks(PERIOD).enumerate() {
        if chunk != &period[..chunk.len()] {
            let i = chunk
                .iter()
                .zip(&period)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            panic!(
                "{what}: byte {} of {len} lost (found {:#x})",
                n * PERIOD + i,
                chunk[i]
            );
        }
    }
}

/// Panics unless `[ptr + from, ptr + to)` is all zeros.
///
/// # Safety
/// The range must be readable and initialized.
unsafe fn check_zeros(ptr: NonNull<u8>, from: usize, to: usize, what: &str) {
    const ZEROS: [u8; 4096] = [0; 4096];
    // SAFETY: the caller guarantees the range is readable.
    let bytes = unsafe { std::slice::from_raw_parts(ptr.as_ptr().add(from), to - from) };
    for (n, chunk) in bytes.chunks(ZEROS.len()).enumerate() {
        if chunk != &ZEROS[..chunk.len()] {
            let i = chunk.iter().position(|&b| b != 0).unwrap_or(0);
            panic!(
                "{what}: byte {} is {:#x}, not zero",
                from + n * 4096 + i,
                chunk[i]
            );
        }
    }
}

fn assert_fits(block: NonNull<[u8]>, layout: Layout, what: &str) -> NonNull<u8> {
    let ptr = block.cast::<u8>();
    assert!(
        ptr.as_ptr().addr().is_multiple_of(layout.align()),
        "{what}: {ptr:p} is not aligned to {}",
        layout.align()
    );
    assert!(
        block.len() >= layout.size(),
        "{what}: {} < {} bytes",
        block.len(),
        layout.size()
    );
    ptr
}

/// Allocates, grows, grows zeroed, shrinks and frees blocks at every power-of-two alignment from
/// 1 byte to 2 MiB, checking alignment and bytes at each step.
fn every_alignment(strategy: GrowStrategy) {
    let dir = TestDir::new("alignments");
    let alloc = allocator(&dir, strategy);
    let page = page();
    let mut align = 1;
    while align <= 2 * MIB {
        for size in [1, 100, page + 1, 3 * page] {
            let what = format!("{strategy:?} align {align} size {size}");
            let l1 = layout(size, align);
            let ptr = assert_fits(alloc.allocate(l1).expect(&what), l1, &what);
            // SAFETY: `ptr` holds `size` writable bytes (just allocated).
            unsafe { fill(ptr, size, 1) };

            let l2 = layout(size * 3 + page, align);
            // SAFETY: `ptr` is currently allocated with `l1`; `l2` is larger.
            let block = unsafe { alloc.grow(ptr, l1, l2) }.expect(&what);
            let ptr = assert_fits(block, l2, &format!("{what}, grown"));
            // SAFETY: the first `size` bytes were kept by the grow.
            unsafe { check(ptr, size, 1, &format!("{what}, grown")) };
            // SAFETY: the grown block holds `l2.size()` writable bytes.
            unsafe { fill(ptr, l2.size(), 2) };

            let l3 = layout(l2.size() + 5 * page, align);
            // SAFETY: `ptr` is currently allocated with `l2`; `l3` is larger.
            let block = unsafe { alloc.grow_zeroed(ptr, l2, l3) }.expect(&what);
            let ptr = assert_fits(block, l3, &format!("{what}, grown zeroed"));
            // SAFETY: bytes up to `l2.size()` kept, the rest zeroed, all inside the block.
            unsafe {
                check(ptr, l2.size(), 2, &format!("{what}, grown zeroed"));
                check_zeros(
                    ptr,
                    l2.size(),
                    block.len(),
                    &format!("{what}, grown zeroed"),
                );
            }

            let l4 = layout(size.div_ceil(2), align);
            // SAFETY: `ptr` is currently allocated with `l3`; `l4` is smaller.
            let block = unsafe { alloc.shrink(ptr, l3, l4) }.expect(&what);
            let ptr = assert_fits(block, l4, &format!("{what}, shrunk"));
            // SAFETY: the shrunk block keeps its first `l4.size()` bytes.
            unsafe { check(ptr, l4.size(), 2, &format!("{what}, shrunk")) };
            // SAFETY: currently allocated with `l4`.
            unsafe { alloc.deallocate(ptr, l4) };

            let zeroed = alloc.allocate_zeroed(l1).expect(&what);
            let ptr = assert_fits(zeroed, l1, &format!("{what}, zeroed"));
            // SAFETY: the whole block is readable; allocate_zeroed zeroes all of it.
            unsafe { check_zeros(ptr, 0, zeroed.len(), &format!("{what}, zeroed")) };
            // SAFETY: currently allocated with `l1`.
            unsafe { alloc.deallocate(ptr, l1) };
        }
        align *= 2;
    }
    let stats = alloc.stats();
    assert_eq!(stats.live_segments, 0);
    assert_eq!(stats.mapped_bytes, 0);
    assert_eq!(stats.failures.total(), 0);
    match strategy {
        GrowStrategy::Remap => {
            assert!(stats.grows_remapped > 0);
            assert_eq!(stats.grows_mapped_again, 0);
        }
        _ => {
            assert!(
                stats.grows_mapped_again > 0,
                "the portable path was not taken: {stats:?}"
            );
            assert_eq!(stats.grows_remapped, 0);
        }
    }
    assert!(stats.shrinks > 0);
    assert!(dir.files().is_empty());
}

#[test]
fn every_alignment_remap() {
    every_alignment(GrowStrategy::Remap);
}

#[test]
fn every_alignment_map_again() {
    every_alignment(GrowStrategy::MapAgain);
}

fn one_gib_alignment(strategy: GrowStrategy) {
    let dir = TestDir::new("gib-align");
    let alloc = allocator(&dir, strategy);
    let page = page();
    let l1 = layout(100, GIB);
    let ptr = assert_fits(alloc.allocate(l1).expect("1 GiB alignment"), l1, "1 GiB");
    // SAFETY: 100 writable bytes.
    unsafe { fill(ptr, 100, 3) };
    let l2 = layout(3 * page, GIB);
    // SAFETY: currently allocated with `l1`.
    let ptr = assert_fits(
        unsafe { alloc.grow(ptr, l1, l2) }.expect("grow"),
        l2,
        "1 GiB grown",
    );
    // SAFETY: first 100 bytes kept.
    unsafe { check(ptr, 100, 3, "1 GiB grown") };
    let l3 = layout(10, GIB);
    // SAFETY: currently allocated with `l2`.
    let ptr = assert_fits(
        unsafe { alloc.shrink(ptr, l2, l3) }.expect("shrink"),
        l3,
        "1 GiB shrunk",
    );
    // SAFETY: first 10 bytes kept.
    unsafe { check(ptr, 10, 3, "1 GiB shrunk") };
    // SAFETY: currently allocated with `l3`.
    unsafe { alloc.deallocate(ptr, l3) };

    let zeroed = alloc
        .allocate_zeroed(l2)
        .expect("zeroed at 1 GiB alignment");
    let ptr = assert_fits(zeroed, l2, "1 GiB zeroed");
    // SAFETY: the whole block is readable.
    unsafe { check_zeros(ptr, 0, zeroed.len(), "1 GiB zeroed") };
    // SAFETY: currently allocated with `l2`.
    unsafe { alloc.deallocate(ptr, l2) };
    assert_eq!(alloc.stats().live_segments, 0);
}

#[test]
fn one_gib_alignment_remap() {
    one_gib_alignment(GrowStrategy::Remap);
}

#[test]
fn one_gib_alignment_map_again() {
    one_gib_alignment(GrowStrategy::MapAgain);
}

/// `grow` and `shrink` may ask for a different alignment than the block has.
fn alignment_changes(strategy: GrowStrategy) {
    let dir = TestDir::new("align-change");
    let alloc = allocator(&dir, strategy);
    let page = page();
    let l1 = layout(2 * page, 8);
    let ptr = assert_fits(alloc.allocate(l1).unwrap(), l1, "start");
    // SAFETY: 2 pages writable.
    unsafe { fill(ptr, l1.size(), 4) };
    let l2 = layout(3 * page, 2 * MIB);
    // SAFETY: currently allocated with `l1`.
    let ptr = assert_fits(
        unsafe { alloc.grow(ptr, l1, l2) }.unwrap(),
        l2,
        "grow to 2 MiB align",
    );
    // SAFETY: the old bytes were kept.
    unsafe { check(ptr, l1.size(), 4, "grow to 2 MiB align") };
    let l3 = layout(page, 8 * MIB);
    // SAFETY: currently allocated with `l2`.
    let ptr = assert_fits(
        unsafe { alloc.shrink(ptr, l2, l3) }.unwrap(),
        l3,
        "shrink to 8 MiB align",
    );
    // SAFETY: the first page was kept.
    unsafe { check(ptr, page, 4, "shrink to 8 MiB align") };
    // Same size, larger alignment: a shrink that only moves.
    let l4 = layout(page, 64 * MIB);
    // SAFETY: currently allocated with `l3`.
    let ptr = assert_fits(
        unsafe { alloc.shrink(ptr, l3, l4) }.unwrap(),
        l4,
        "move to 64 MiB align",
    );
    // SAFETY: the page was kept.
    unsafe { check(ptr, page, 4, "move to 64 MiB align") };
    // SAFETY: currently allocated with `l4`.
    unsafe { alloc.deallocate(ptr, l4) };
    assert_eq!(alloc.stats().live_segments, 0);
    assert_eq!(alloc.stats().mapped_bytes, 0);
}

#[test]
fn alignment_changes_remap() {
    alignment_changes(GrowStrategy::Remap);
}

#[test]
fn alignment_changes_map_again() {
    alignment_changes(GrowStrategy::MapAgain);
}

#[test]
fn zero_size() {
    let dir = TestDir::new("zero-size");
    let alloc = dir.allocator_segments_only();
    for align in [1, 2, 8, 4096, 2 * MIB, GIB, 1 << 62, 1 << 63] {
        let l0 = layout(0, align);
        for block in [
            alloc.allocate(l0).unwrap(),
            alloc.allocate_zeroed(l0).unwrap(),
        ] {
            assert_eq!(block.len(), 0);
            let ptr = block.cast::<u8>();
            assert!(
                ptr.as_ptr().addr().is_multiple_of(align),
                "dangling {ptr:p} for align {align}"
            );
            // SAFETY: a zero-size block; deallocating it is a no-op.
            unsafe { alloc.deallocate(ptr, l0) };
        }
    }
    assert_eq!(
        alloc.stats().creates,
        0,
        "zero-size requests never reach the OS"
    );
    assert_eq!(alloc.stats().live_segments, 0);

    // Grow from nothing, shrink to nothing.
    for zeroed in [false, true] {
        let l0 = layout(0, 64);
        let dangling = alloc.allocate(l0).unwrap().cast::<u8>();
        let l1 = layout(5000, 64);
        // SAFETY: `dangling` is "currently allocated" with the zero-size layout `l0`.
        let block = unsafe {
            if zeroed {
                alloc.grow_zeroed(dangling, l0, l1)
            } else {
                alloc.grow(dangling, l0, l1)
            }
        }
        .unwrap();
        let ptr = assert_fits(block, l1, "grown from zero");
        assert_eq!(alloc.stats().live_segments, 1);
        if zeroed {
            // SAFETY: the block is readable.
            unsafe { check_zeros(ptr, 0, block.len(), "grow_zeroed from zero") };
        }
        // SAFETY: writable.
        unsafe { fill(ptr, 5000, 5) };
        let l2 = layout(0, 4096);
        // SAFETY: currently allocated with `l1`.
        let block = unsafe { alloc.shrink(ptr, l1, l2) }.unwrap();
        assert_eq!(block.len(), 0);
        assert!(block.cast::<u8>().as_ptr().addr().is_multiple_of(4096));
        assert_eq!(
            alloc.stats().live_segments,
            0,
            "a shrink to zero frees the segment"
        );
        assert_eq!(alloc.stats().mapped_bytes, 0);
        // SAFETY: a zero-size block.
        unsafe { alloc.deallocate(block.cast(), l2) };
    }
    // The second segment may be the first one, kept for reuse.
    let stats = alloc.stats();
    assert_eq!(stats.creates + stats.segments_reused, 2, "{stats:?}");
    assert!(dir.files().is_empty());
}

#[test]
fn overflowing_sizes_are_errors() {
    let dir = TestDir::new("overflow");
    let alloc = dir.allocator_segments_only();
    let page = page();

    // Rounding up to a page overflows what can be mapped.
    let huge = layout(isize::MAX as usize, 1);
    assert!(alloc.allocate(huge).is_err());
    assert!(alloc.allocate_zeroed(huge).is_err());
    let s = alloc.stats();
    assert_eq!(s.failures.too_large, 2);
    assert_eq!(s.creates, 0);
    let err = alloc.take_last_error().expect("the cause is kept");
    assert!(err.to_string().contains("cannot be mapped"), "{err}");
    assert!(alloc.take_last_error().is_none());

    // Within the address space, but nowhere near the disk space (64 TiB): the file system
    // refuses (EFBIG on ext4, ENOSPC elsewhere).
    let unholdable = layout(1 << 46, page);
    assert!(alloc.allocate(unholdable).is_err());
    assert_eq!(alloc.stats().failures.total(), 3);
    let err = alloc.take_last_error().expect("the cause is kept");
    assert!(err.raw_os_error().is_some(), "an OS error: {err}");
    assert_eq!(alloc.stats().live_segments, 0);
    assert!(
        dir.files().is_empty(),
        "a failed allocation leaves no file: {:?}",
        dir.files()
    );

    // An alignment no address space can honour: the file made for it is removed again.
    let unalignable = layout(page, 1 << 62);
    assert!(alloc.allocate(unalignable).is_err());
    assert!(alloc.allocate_zeroed(unalignable).is_err());
    assert_eq!(alloc.stats().failures.total(), 5);
    assert!(alloc.take_last_error().is_some());
    assert_eq!(alloc.stats().live_segments, 0);
    assert!(
        dir.files().is_empty(),
        "a failed allocation leaves no file: {:?}",
        dir.files()
    );
    assert_eq!(
        core_support::descriptors_under(&dir.segment_folder()),
        0,
        "nor a descriptor"
    );

    // Through a vector.
    let mut v: MmapVec<u8> = MmapVec::new_in(alloc.clone());
    v.push(1);
    assert!(
        v.try_reserve(usize::MAX).is_err(),
        "capacity overflow is an error, not a panic"
    );
    // len 1 + this = isize::MAX bytes: a valid layout, so the allocator is asked.
    assert!(v.try_reserve(isize::MAX as usize - 1).is_err());
    assert_eq!(
        alloc.stats().failures.too_large,
        3,
        "the grow reached the allocator and failed"
    );
    assert!(alloc.take_last_error().is_some());
    let mut w: MmapVec<u64> = MmapVec::new_in(alloc.clone());
    assert!(w.try_reserve_exact(usize::MAX / 4).is_err());
    assert!(w.try_reserve(isize::MAX as usize / 8).is_err());
    assert_eq!(v, [1]);
    assert_eq!(alloc.stats().live_segments, 1);
    drop(v);
    assert_eq!(alloc.stats().live_segments, 0);
}

fn grow_and_shrink_keep_bytes(strategy: GrowStrategy) {
    let dir = TestDir::new("keep-bytes");
    let alloc = allocator(&dir, strategy);
    let mut l = layout(1000, 16);
    let mut ptr = alloc.allocate(l).unwrap().cast::<u8>();
    // SAFETY: 1000 writable bytes.
    unsafe { fill(ptr, 1000, 6) };
    let mut written = 1000;
    for size in [5000, 50_000, MIB, 8 * MIB + 123] {
        let next = layout(size, 16);
        // SAFETY: currently allocated with `l`; `next` is larger.
        ptr = assert_fits(unsafe { alloc.grow(ptr, l, next) }.unwrap(), next, "grow").cast();
        // SAFETY: the first `written` bytes hold the pattern.
        unsafe { check(ptr, written, 6, &format!("{strategy:?} grow to {size}")) };
        // SAFETY: `size` writable bytes now.
        unsafe { fill(ptr, size, 6) };
        written = size;
        l = next;
    }
    for size in [3 * MIB, 3000, 10] {
        let next = layout(size, 16);
        // SAFETY: currently allocated with `l`; `next` is smaller.
        ptr = assert_fits(
            unsafe { alloc.shrink(ptr, l, next) }.unwrap(),
            next,
            "shrink",
        )
        .cast();
        // SAFETY: the first `size` bytes hold the pattern.
        unsafe { check(ptr, size, 6, &format!("{strategy:?} shrink to {size}")) };
        l = next;
    }
    let next = layout(2 * MIB, 16);
    // SAFETY: currently allocated with `l`.
    ptr = unsafe { alloc.grow(ptr, l, next) }.unwrap().cast();
    // SAFETY: the first 10 bytes hold the pattern.
    unsafe { check(ptr, 10, 6, "grow after shrinks") };
    // SAFETY: currently allocated with `next`.
    unsafe { alloc.deallocate(ptr, next) };
    assert_eq!(alloc.stats().live_segments, 0);
}

#[test]
fn grow_and_shrink_keep_bytes_remap() {
    grow_and_shrink_keep_bytes(GrowStrategy::Remap);
}

#[test]
fn grow_and_shrink_keep_bytes_map_again() {
    grow_and_shrink_keep_bytes(GrowStrategy::MapAgain);
}

fn zeroed_memory(strategy: GrowStrategy) {
    let dir = TestDir::new("zeroed");
    let alloc = allocator(&dir, strategy);
    let page = page();

    // Fill a segment, free it, and allocate zeroed again: nothing of the old one shows.
    for round in 0..3 {
        let l = layout(10 * page, 8);
        let block = alloc.allocate_zeroed(l).unwrap();
        let ptr = block.cast::<u8>();
        // SAFETY: the whole block is readable.
        unsafe {
            check_zeros(
                ptr,
                0,
                block.len(),
                &format!("allocate_zeroed round {round}"),
            )
        };
        // SAFETY: writable.
        unsafe { ptr.as_ptr().write_bytes(0xAA, block.len()) };
        // SAFETY: currently allocated with `l`.
        unsafe { alloc.deallocate(ptr, l) };
    }

    // Shrink a dirty block to 100 bytes: bytes 100.. of its page stay 0xAA (stale), the pages
    // after it are given back. grow_zeroed must show zeros after the 100 bytes.
    let big = layout(3 * page, 8);
    let ptr = alloc.allocate(big).unwrap().cast::<u8>();
    // SAFETY: writable.
    unsafe { ptr.as_ptr().write_bytes(0xAA, big.size()) };
    let small = layout(100, 8);
    // SAFETY: currently allocated with `big`.
    let block = unsafe { alloc.shrink(ptr, big, small) }.unwrap();
    let ptr = block.cast::<u8>();
    // The caller may use the whole block it got, slack included.
    // SAFETY: the block returned by shrink is `block.len()` bytes, all ours.
    unsafe { ptr.as_ptr().add(200).write_bytes(0xBB, block.len() - 200) };
    // SAFETY: currently allocated with `small`.
    let block = unsafe { alloc.grow_zeroed(ptr, small, big) }.unwrap();
    let ptr = block.cast::<u8>();
    // SAFETY: readable.
    unsafe {
        let first = std::slice::from_raw_parts(ptr.as_ptr(), 100);
        assert!(first.iter().all(|&b| b == 0xAA), "the kept bytes changed");
        // Beyond the old block: required by the Allocator contract.
        check_zeros(
            ptr,
            page,
            block.len(),
            &format!("{strategy:?} shrink then grow_zeroed"),
        );
        // The old block's slack: this crate zeroes it too (a stronger promise than required).
        check_zeros(
            ptr,
            100,
            page,
            &format!("{strategy:?} slack after grow_zeroed"),
        );
    }
    // SAFETY: currently allocated with `big`.
    unsafe { alloc.deallocate(ptr, big) };

    // A plain grow after a shrink: the pages that were given back come back as zeros too
    // (the file was truncated), even though `grow` does not promise it.
    let ptr = alloc.allocate(big).unwrap().cast::<u8>();
    // SAFETY: writable.
    unsafe { ptr.as_ptr().write_bytes(0xCC, big.size()) };
    // SAFETY: currently allocated with `big`.
    let ptr = unsafe { alloc.shrink(ptr, big, small) }
        .unwrap()
        .cast::<u8>();
    // SAFETY: currently allocated with `small`.
    let block = unsafe { alloc.grow(ptr, small, big) }.unwrap();
    // SAFETY: readable.
    unsafe {
        check_zeros(
            block.cast(),
            page,
            block.len(),
            "pages given back by a shrink",
        )
    };
    // SAFETY: currently allocated with `big`.
    unsafe { alloc.deallocate(block.cast(), big) };
    assert_eq!(alloc.stats().live_segments, 0);
}

#[test]
fn zeroed_memory_remap() {
    zeroed_memory(GrowStrategy::Remap);
}

#[test]
fn zeroed_memory_map_again() {
    zeroed_memory(GrowStrategy::MapAgain);
}

fn failed_grow_leaves_old_block(strategy: GrowStrategy) {
    let dir = TestDir::new("failed-grow");
    // Named segments, so the file's length can be checked after each failure; no reuse, so
    // the free at the end removes the file at once.
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .grow_strategy(strategy)
        .descriptor_budget(0)
        .reuse_bytes(0)
        .build()
        .unwrap();
    let page = page();
    let l = layout(3 * page, 8);
    let ptr = alloc.allocate(l).unwrap().cast::<u8>();
    // SAFETY: writable.
    unsafe { fill(ptr, l.size(), 7) };
    let files = dir.files();
    assert_eq!(files.len(), 1);
    let file_len = || fs::metadata(&files[0]).unwrap().len();

    let attempts = [
        // Too large to map at all.
        ("size overflow", layout(isize::MAX as usize - 7, 8)),
        // Larger than the file system allows for one file (EFBIG on ext4, ENOSPC on tmpfs).
        ("file too large", layout(1 << 45, 8)),
        // An alignment no address space can honour: fails after the file was extended.
        ("alignment", layout(4 * page, 1 << 62)),
    ];
    for (n, (what, new)) in attempts.into_iter().enumerate() {
        // SAFETY: `ptr` is currently allocated with `l`; `new` is larger.
        let grown = unsafe { alloc.grow(ptr, l, new) };
        assert!(grown.is_err(), "{what}: grow succeeded");
        // SAFETY: `ptr` is still currently allocated with `l`: a failed grow keeps it.
        let grown = unsafe { alloc.grow_zeroed(ptr, l, new) };
        assert!(grown.is_err(), "{what}: grow_zeroed succeeded");
        // SAFETY: the old block is still valid and holds the pattern.
        unsafe {
            check(
                ptr,
                l.size(),
                7,
                &format!("{strategy:?} after failed grow ({what})"),
            )
        };
        // SAFETY: and is still writable.
        unsafe { fill(ptr, l.size(), 7) };
        assert_eq!(
            file_len(),
            l.size() as u64,
            "{what}: the file keeps its length"
        );
        assert_eq!(alloc.stats().failures.total(), 2 * (n as u64 + 1));
        assert!(alloc.take_last_error().is_some());
    }
    let s = alloc.stats();
    assert_eq!(s.failures.too_large, 2);
    assert_eq!((s.live_segments, s.mapped_bytes), (1, l.size() as u64));
    // The block still grows normally afterwards.
    let bigger = layout(5 * page, 8);
    // SAFETY: currently allocated with `l`.
    let ptr = unsafe { alloc.grow(ptr, l, bigger) }.unwrap().cast::<u8>();
    // SAFETY: the pattern was kept.
    unsafe { check(ptr, l.size(), 7, "grow after failures") };
    // SAFETY: currently allocated with `bigger`.
    unsafe { alloc.deallocate(ptr, bigger) };
    assert_eq!(alloc.stats().live_segments, 0);
    assert!(dir.files().is_empty());
}

#[test]
fn failed_grow_leaves_old_block_remap() {
    failed_grow_leaves_old_block(GrowStrategy::Remap);
}

#[test]
fn failed_grow_leaves_old_block_map_again() {
    failed_grow_leaves_old_block(GrowStrategy::MapAgain);
}

#[test]
fn heap_threshold_small_blocks_on_the_heap() {
    let dir = TestDir::new("heap");
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .heap_threshold(64 << 10)
        .build()
        .unwrap();
    let l1 = layout(100, 8);
    let ptr = alloc.allocate(l1).unwrap().cast::<u8>();
    let s = alloc.stats();
    assert_eq!((s.heap_allocations, s.live_segments, s.creates), (1, 0, 0));
    // SAFETY: writable.
    unsafe { fill(ptr, 100, 8) };
    let l2 = layout(10_000, 8);
    // SAFETY: currently allocated with `l1`; still below the threshold.
    let ptr = unsafe { alloc.grow(ptr, l1, l2) }.unwrap().cast::<u8>();
    assert_eq!(alloc.stats().heap_allocations, 1);
    assert_eq!(alloc.stats().live_segments, 0);
    // SAFETY: kept, then writable.
    unsafe {
        check(ptr, 100, 8, "heap grow");
        fill(ptr, 10_000, 8);
    }
    let l3 = layout(1 << 20, 8);
    // SAFETY: currently allocated with `l2`; past the threshold: moves into a segment.
    let ptr = unsafe { alloc.grow_zeroed(ptr, l2, l3) }
        .unwrap()
        .cast::<u8>();
    let s = alloc.stats();
    assert_eq!(
        (s.heap_allocations, s.live_segments, s.grows_copied),
        (0, 1, 1)
    );
    // SAFETY: readable.
    unsafe {
        check(ptr, 10_000, 8, "heap block copied into a segment");
        check_zeros(ptr, 10_000, l3.size(), "grow_zeroed into a segment");
    }
    // Shrinking below the threshold moves it back to the heap (one copy), and the segment
    // goes: a block's size alone says where it lives.
    // SAFETY: currently allocated with `l3`.
    let ptr = unsafe { alloc.shrink(ptr, l3, l1) }.unwrap().cast::<u8>();
    let s = alloc.stats();
    assert_eq!((s.live_segments, s.heap_allocations), (0, 1));
    // SAFETY: kept.
    unsafe { check(ptr, 100, 8, "shrink below threshold") };
    // SAFETY: currently allocated with `l1`.
    unsafe { alloc.deallocate(ptr, l1) };

    // Zeroed heap blocks, and a heap block shrunk to nothing.
    let z = alloc.allocate_zeroed(l2).unwrap();
    // SAFETY: readable.
    unsafe { check_zeros(z.cast(), 0, l2.size(), "zeroed heap block") };
    let l0 = layout(0, 8);
    // SAFETY: currently allocated with `l2`.
    let d = unsafe { alloc.shrink(z.cast(), l2, l0) }.unwrap();
    assert_eq!(d.len(), 0);
    assert_eq!(alloc.stats().heap_allocations, 0);

    // Through a vector: small on the heap, big in a segment, bytes carried over.
    let mut v: MmapVec<u32> = MmapVec::new_in(alloc.clone());
    v.extend(0..1000);
    assert_eq!(alloc.stats().heap_allocations, 1);
    assert_eq!(alloc.stats().live_segments, 0);
    v.extend(1000..100_000);
    assert_eq!(alloc.stats().heap_allocations, 0);
    assert_eq!(alloc.stats().live_segments, 1);
    assert_eq!(alloc.stats().grows_copied, 2);
    assert!(v.iter().copied().eq(0..100_000));
    drop(v);
    let s = alloc.stats();
    assert_eq!(
        (s.heap_allocations, s.live_segments, s.mapped_bytes),
        (0, 0, 0)
    );
    assert!(dir.files().is_empty());
}

#[test]
fn any_clone_frees_any_block() {
    let dir = TestDir::new("clones");
    let a = dir.allocator_segments_only();
    let b = a.clone();
    let l = layout(10_000, 8);
    let ptr = a.allocate(l).unwrap().cast::<u8>();
    // SAFETY: writable.
    unsafe { fill(ptr, 10_000, 9) };
    let l2 = layout(100_000, 8);
    // SAFETY: allocated by a clone of `b` with `l`.
    let ptr = unsafe { b.grow(ptr, l, l2) }.unwrap().cast::<u8>();
    // SAFETY: kept.
    unsafe { check(ptr, 10_000, 9, "grown by a clone") };
    assert_eq!(a.stats().live_segments, 1);
    // SAFETY: allocated with `l2` by a clone of `b`.
    unsafe { b.deallocate(ptr, l2) };
    assert_eq!(a.stats().live_segments, 0);
    // Separate allocators keep separate counters.
    let other = dir.allocator_segments_only();
    let _v = mmapvec::mmap_vec![in other.clone(); 1u8; 10];
    assert_eq!(a.stats().live_segments, 0);
    assert_eq!(other.stats().live_segments, 1);
}

/// Every builder option still gives working, aligned, byte-keeping blocks.
#[test]
fn builder_options_keep_the_contract() {
    let dir = TestDir::new("options");
    let builders = [
        ("sparse files", MmapAllocator::builder().reserve_disk(false)),
        ("populate", MmapAllocator::builder().populate(true)),
        (
            "sequential",
            MmapAllocator::builder().access_pattern(AccessPattern::Sequential),
        ),
        (
            "random",
            MmapAllocator::builder().access_pattern(AccessPattern::Random),
        ),
        (
            "will need",
            MmapAllocator::builder().access_pattern(AccessPattern::WillNeed),
        ),
        ("huge pages", MmapAllocator::builder().huge_pages(true)),
        ("dont fork", MmapAllocator::builder().dont_fork(true)),
        (
            "everything, map again",
            MmapAllocator::builder()
                .small_threshold(0)
                .populate(true)
                .huge_pages(true)
                .dont_fork(true)
                .reserve_disk(false)
                .grow_strategy(GrowStrategy::MapAgain),
        ),
    ];
    for (what, builder) in builders {
        let alloc = builder.dir(dir.path()).build().expect(what);
        let l1 = layout(100_000, 64);
        let ptr = assert_fits(alloc.allocate(l1).expect(what), l1, what);
        // SAFETY: writable.
        unsafe { fill(ptr, l1.size(), 10) };
        let l2 = layout(5 * MIB, 64);
        // SAFETY: currently allocated with `l1`.
        let ptr = assert_fits(unsafe { alloc.grow(ptr, l1, l2) }.expect(what), l2, what);
        // SAFETY: kept, then writable.
        unsafe {
            check(ptr, l1.size(), 10, what);
            fill(ptr, l2.size(), 11);
        }
        let l3 = layout(3 * MIB, 64);
        // SAFETY: currently allocated with `l2`.
        let ptr = assert_fits(unsafe { alloc.shrink(ptr, l2, l3) }.expect(what), l3, what);
        // SAFETY: kept.
        unsafe { check(ptr, l3.size(), 11, what) };
        // SAFETY: currently allocated with `l3`.
        unsafe { alloc.deallocate(ptr, l3) };
        let s = alloc.stats();
        assert_eq!(
            (s.live_segments, s.mapped_bytes, s.failures.total()),
            (0, 0, 0),
            "{what}"
        );
    }
    assert!(dir.files().is_empty());
}

/// `dont_fork` is a promise (the mapping is not inherited by a child process), so it must hold
/// after every way a segment can be resized or moved, not only after it is created.
fn dont_fork_survives_resizes(strategy: GrowStrategy) {
    let dir = TestDir::new("dont-fork");
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .grow_strategy(strategy)
        .dont_fork(true)
        .build()
        .unwrap();
    let page = page();
    let has_dc = |ptr: NonNull<u8>| {
        let flags = core_support::vm_flags(ptr.as_ptr().addr()).expect("mapped");
        flags.iter().any(|f| f == "dc")
    };
    let l1 = layout(page, 8);
    let ptr = alloc.allocate(l1).unwrap().cast::<u8>();
    assert!(has_dc(ptr), "{strategy:?}: new segment");
    let l2 = layout(10 * page, 8);
    // SAFETY: currently allocated with `l1`.
    let ptr = unsafe { alloc.grow(ptr, l1, l2) }.unwrap().cast::<u8>();
    assert!(has_dc(ptr), "{strategy:?}: after a grow");
    let l3 = layout(3 * page, 8);
    // SAFETY: currently allocated with `l2`.
    let ptr = unsafe { alloc.shrink(ptr, l2, l3) }.unwrap().cast::<u8>();
    assert!(has_dc(ptr), "{strategy:?}: after a shrink");
    let l4 = layout(2 * page, 4 * MIB);
    // SAFETY: currently allocated with `l3`; a smaller size at a larger alignment moves it.
    let ptr = unsafe { alloc.shrink(ptr, l3, l4) }.unwrap().cast::<u8>();
    assert!(ptr.as_ptr().addr().is_multiple_of(4 * MIB));
    assert!(
        has_dc(ptr),
        "{strategy:?}: after a shrink that moved the segment"
    );
    let l5 = layout(2 * page, 8 * MIB);
    // SAFETY: currently allocated with `l4`; same size, larger alignment: a move only.
    let ptr = unsafe { alloc.shrink(ptr, l4, l5) }.unwrap().cast::<u8>();
    assert!(
        has_dc(ptr),
        "{strategy:?}: after a move to a larger alignment"
    );
    let l6 = layout(6 * page, 16 * MIB);
    // SAFETY: currently allocated with `l5`.
    let ptr = unsafe { alloc.grow(ptr, l5, l6) }.unwrap().cast::<u8>();
    assert!(
        has_dc(ptr),
        "{strategy:?}: after a grow that moved the segment"
    );
    // SAFETY: currently allocated with `l6`.
    unsafe { alloc.deallocate(ptr, l6) };
}

#[test]
fn dont_fork_survives_resizes_remap() {
    dont_fork_survives_resizes(GrowStrategy::Remap);
}

#[test]
fn dont_fork_survives_resizes_map_again() {
    dont_fork_survives_resizes(GrowStrategy::MapAgain);
}

/// A thread that frees a large block and asks for one like it again takes the same segment
/// back from its own slot (issue 12, the hot path): one file for the whole loop, counted as
/// kept, not live, while it waits; zeroed when asked; given back by `trim`, by another
/// allocator's segment taking the slot, and at thread exit.
#[test]
fn a_large_block_freed_and_asked_again_comes_back_from_the_threads_slot() {
    let dir = TestDir::new("slot");
    let alloc = MmapAllocator::builder()
        .dir(dir.path())
        .build()
        .expect("build");
    let big = layout(MIB, 8);
    let mut first = None;
    for round in 0..100u8 {
        let block = alloc.allocate(big).unwrap();
        let ptr = block.cast::<u8>();
        assert!(block.len() >= MIB);
        first.get_or_insert(ptr);
        // SAFETY: the block is ours, at least 1 MiB long.
        unsafe { ptr.add(MIB - 1).write(round) };
        // SAFETY: allocated just above with `big`, freed once.
        unsafe { alloc.deallocate(ptr, big) };
    }
    let s = alloc.stats();
    assert_eq!((s.creates, s.segments_reused), (1, 99), "{s:?}");
    assert_eq!((s.live_segments, s.mapped_bytes), (0, 0), "{s:?}");
    assert_eq!((s.kept_segments, s.kept_bytes), (1, MIB as u64), "{s:?}");

    // Zeroed: the dirty segment comes back zeroed.
    let block = alloc.allocate_zeroed(big).unwrap();
    assert_eq!(Some(block.cast::<u8>()), first, "the slot's segment");
    // SAFETY: a live block of at least 1 MiB.
    assert!(unsafe { block.as_ref() }.iter().all(|&b| b == 0));
    // SAFETY: allocated above with `big`, freed once.
    unsafe { alloc.deallocate(block.cast(), big) };

    // Another allocator's segment takes this thread's slot: the first goes back to its own
    // allocator's reuse cache (still kept, no longer in the slot).
    let other = MmapAllocator::builder()
        .dir(dir.path())
        .build()
        .expect("build");
    let block = other.allocate(big).unwrap();
    // SAFETY: allocated just above with `big`, freed once.
    unsafe { other.deallocate(block.cast(), big) };
    assert_eq!(other.stats().kept_segments, 1);
    assert_eq!(alloc.stats().kept_segments, 1);
    assert_eq!(alloc.stats().live_segments, 0);

    // trim: nothing kept, nothing mapped.
    alloc.trim();
    other.trim();
    for a in [&alloc, &other] {
        let s = a.stats();
        assert_eq!(
            (s.kept_segments, s.live_segments, s.mapped_bytes),
            (0, 0, 0),
            "{s:?}"
        );
    }

    // A thread's slot goes back when the thread exits.
    let worker = alloc.clone();
    std::thread::spawn(move || {
        let block = worker.allocate(big).unwrap();
        // SAFETY: allocated just above with `big`, freed once.
        unsafe { worker.deallocate(block.cast(), big) };
        assert_eq!(worker.stats().kept_segments, 1);
    })
    .join()
    .unwrap();
    let s = alloc.stats();
    assert_eq!(
        (s.kept_segments, s.live_segments),
        (1, 0),
        "in the reuse cache: {s:?}"
    );
    alloc.trim();
    assert_eq!(alloc.stats().kept_segments, 0);
}
