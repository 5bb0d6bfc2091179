//! Issue 12's three holes in the small-block tier, as the outside review found them: thread
//! caches that pinned whole chunks (and their reserved disk) after everything was freed, a
//! region that took nearly all the address space `RLIMIT_AS` left, and (in `os_limits`) chunk
//! indices lost at the map limit. Each test failed before the fix; the numbers the old code
//! gave are in `RELIABILITY.md`.
//!
//! Each test has an allocator of its own on a folder of its own, and looks only at that
//! allocator's statistics and files: nothing here depends on what other tests hold.

use std::ptr::NonNull;

use allocator_api2::alloc::{Allocator, Layout};
use mmapvec::{MmapAllocator, MmapVec};

use crate::support::{
    TestDir, Tmpfs, in_child, mapped_disk_under, mappings_under, set_soft_limit, skip, vm_size,
};

/// The tier's chunk: a 4 MiB file at a 4 MiB-aligned place of its region.
const CHUNK: usize = 4 << 20;

/// What the README's "What is kept after a free" allows one thread to keep after it freed
/// everything: 2 empty chunks per allocator, 2 current chunks of its shard, and 8 chunks
/// pinned by its cache.
const KEPT_BY_ONE_THREAD: u64 = 12 * CHUNK as u64;

/// Allocates blocks of `size` bytes until they cover `chunks` whole chunks of the tier.
fn fill_chunks(alloc: &MmapAllocator, size: usize, chunks: usize) -> Vec<NonNull<[u8]>> {
    let layout = Layout::from_size_align(size, 8).unwrap();
    (0..chunks * (CHUNK / size))
        .map(|_| alloc.allocate(layout).expect("a small block"))
        .collect()
}

fn free(alloc: &MmapAllocator, size: usize, blocks: impl IntoIterator<Item = NonNull<[u8]>>) {
    let layout = Layout::from_size_align(size, 8).unwrap();
    for block in blocks {
        // SAFETY: allocated by `alloc` with this layout, freed once.
        unsafe { alloc.deallocate(block.cast(), layout) };
    }
}

/// The review's first case: 32 chunks in each of 5 classes, all live; the first block of each
/// chunk freed (into the thread's cache), then all the others. Before the fix the cached
/// blocks kept their chunks (and the chunks' reserved disk) with nothing in use, and still did
/// after 1000 operations on another class.
#[test]
fn cached_blocks_do_not_pin_their_chunks() {
    // On the temp folder's disk, not in RAM: 640 MiB are reserved for a moment.
    let dir = TestDir::new("holes-pin");
    let alloc = MmapAllocator::builder()
        .dir(dir.path())
        .reuse_bytes(0)
        .build()
        .expect("build");
    let classes: Vec<(usize, Vec<_>, Vec<_>)> = [512, 1024, 2048, 4096, 8192]
        .into_iter()
        .map(|size| {
            let (first, rest): (Vec<_>, Vec<_>) = fill_chunks(&alloc, size, 32)
                .into_iter()
                .partition(|b| b.cast::<u8>().as_ptr().addr() % CHUNK == 0);
            assert!(first.len() >= 32, "{} chunks of {size} B", first.len());
            (size, first, rest)
        })
        .collect();
    let held = alloc.stats().small;
    let held_disk = mapped_disk_under(&dir.segment_folder());
    assert!(held.chunks_created >= 160, "{held:?}");
    assert!(
        held_disk >= 160 * CHUNK as u64,
        "{} MiB of disk",
        held_disk >> 20
    );
    let (sizes, (firsts, rests)): (Vec<_>, (Vec<_>, Vec<_>)) = classes
        .into_iter()
        .map(|(size, first, rest)| (size, (first, rest)))
        .unzip();
    for (&size, first) in sizes.iter().zip(firsts) {
        free(&alloc, size, first);
    }
    for (&size, rest) in sizes.iter().zip(rests) {
        free(&alloc, size, rest);
    }
    // 1000 operations on another class.
    let layout = Layout::from_size_align(64, 8).unwrap();
    for _ in 0..1000 {
        let block = alloc.allocate(layout).unwrap();
        // SAFETY: allocated just above, freed once.
        unsafe { alloc.deallocate(block.cast(), layout) };
    }
    let small = alloc.stats().small;
    assert_eq!(small.in_use_bytes, 0, "{small:?}");
    let disk = mapped_disk_under(&dir.segment_folder());
    assert!(
        small.arena_bytes <= KEPT_BY_ONE_THREAD && disk <= KEPT_BY_ONE_THREAD,
        "{} MiB of chunks ({} MiB of disk) kept with nothing in use (at most {} MiB allowed): \
         {small:?}",
        small.arena_bytes >> 20,
        disk >> 20,
        KEPT_BY_ONE_THREAD >> 20
    );
    // `trim` gives back the rest.
    alloc.trim();
    let small = alloc.stats().small;
    assert_eq!(small.arena_bytes, 0, "{small:?}");
    assert_eq!(mapped_disk_under(&dir.segment_folder()), 0);
    assert_eq!(mappings_under(&dir.segment_folder()), 0);
}

/// The review's second case: a std `HashMap` of small `MmapVec`s of 200 B to 2 KiB, dropped.
/// Before the fix 764 MiB of chunks stayed (2M vectors) until the allocator was dropped.
#[test]
fn a_dropped_map_of_small_vectors_keeps_no_chunks() {
    let dir = TestDir::fast("holes-map");
    let alloc = MmapAllocator::builder()
        .dir(dir.path())
        .reuse_bytes(0)
        .build()
        .expect("build");
    let mut map = std::collections::HashMap::new();
    let mut seed = 0x9E37_79B9_7F4A_7C15_u64;
    for key in 0..200_000u64 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let len = 200 + (seed % 1849) as usize;
        let mut v = MmapVec::with_capacity_in(len, alloc.clone());
        v.resize(len, key as u8);
        map.insert(key, v);
    }
    let held = alloc.stats().small;
    assert!(held.arena_bytes >= 200 << 20, "{held:?}");
    drop(map);
    let small = alloc.stats().small;
    assert_eq!(small.in_use_bytes, 0, "{small:?}");
    let disk = mapped_disk_under(&dir.segment_folder());
    assert!(
        small.arena_bytes <= KEPT_BY_ONE_THREAD && disk <= KEPT_BY_ONE_THREAD,
        "{} MiB of chunks ({} MiB of disk) kept after the map was dropped (at most {} MiB \
         allowed): {small:?}",
        small.arena_bytes >> 20,
        disk >> 20,
        KEPT_BY_ONE_THREAD >> 20
    );
    alloc.trim();
    assert_eq!(alloc.stats().small.arena_bytes, 0);
    assert_eq!(mappings_under(&dir.segment_folder()), 0);
}

/// The review's third case: on a small tmpfs, everything freed, a large vector must find the
/// disk the small blocks had. Before the fix it failed with `ENOSPC`: the threads' caches kept
/// their chunks (and their `fallocate`d blocks).
#[test]
fn freed_small_blocks_give_their_disk_back() {
    const TMPFS_SIZE: usize = 80 << 20;
    let fs = match Tmpfs::mount("holes-disk", TMPFS_SIZE) {
        Ok(fs) => fs,
        Err(why) => skip!("{why}"),
    };
    let alloc = MmapAllocator::builder()
        .dir(fs.path())
        .allow_ram_backed(true)
        .reuse_bytes(0)
        .build()
        .expect("build");
    // 64 MiB of small blocks in 4 classes (4 chunks each), the first block of each chunk freed
    // first, as above.
    for size in [1024, 2048, 4096, 8192] {
        let mut blocks = fill_chunks(&alloc, size, 4);
        blocks.sort_by_key(|b| b.cast::<u8>().as_ptr().addr() % CHUNK != 0);
        free(&alloc, size, blocks);
    }
    assert_eq!(alloc.stats().small.in_use_bytes, 0);
    // Half the file system: more than is free while 12 chunks are kept, so the allocator must
    // give its kept chunks back before it reports a full disk.
    let mut v: MmapVec<u8> = MmapVec::new_in(alloc.clone());
    v.try_reserve_exact(TMPFS_SIZE / 2).unwrap_or_else(|e| {
        panic!(
            "{e:?} after every small block was freed: {:?}, {:?}",
            alloc.stats(),
            alloc.take_last_error()
        )
    });
    // Every page is backed (reserved up front): writing them all cannot raise SIGBUS.
    v.resize(TMPFS_SIZE / 2, 7);
    assert_eq!(v[TMPFS_SIZE / 2 - 1], 7);
}

/// Under `RLIMIT_AS`, the tier's region takes at most an eighth of what the limit leaves.
/// Before the fix, under a 4200 MiB limit one 1-byte vector made `VmSize` 4099 MiB, and a
/// 150 MiB heap `Vec` then failed.
#[test]
fn the_tier_leaves_address_space_under_rlimit_as() {
    const NAME: &str = "tier_holes::the_tier_leaves_address_space_under_rlimit_as";
    if !in_child(NAME, "rlimit-as-share") {
        return;
    }
    let headroom = 4200 << 20;
    let before = vm_size();
    set_soft_limit(libc::RLIMIT_AS, (before + headroom) as u64);
    let dir = TestDir::fast("holes-as");
    let alloc = MmapAllocator::builder()
        .dir(dir.path())
        .build()
        .expect("build");
    let one = mmapvec::mmap_vec![in alloc.clone(); 1u8];
    assert_eq!(alloc.stats().small.chunks_created, 1, "a block of the tier");
    let grown = vm_size() - before;
    assert!(
        grown <= headroom / 8 + (16 << 20),
        "one small vector took {} MiB of the {} MiB left",
        grown >> 20,
        headroom >> 20
    );
    let mut heap: Vec<u8> = Vec::new();
    heap.try_reserve_exact(150 << 20)
        .expect("a 150 MiB heap vector next to the tier");
    drop((one, heap));
}

/// Under a 3072 MiB `RLIMIT_AS`, with the tier's region made first, a 1400 MiB vector fits.
/// Before the fix it failed (the region had taken the room), counted as `out_of_mappings`. A
/// request larger than what is left fails, counted as `address_space`.
#[test]
fn a_large_vector_fits_under_rlimit_as() {
    const NAME: &str = "tier_holes::a_large_vector_fits_under_rlimit_as";
    if !in_child(NAME, "rlimit-as-large") {
        return;
    }
    let headroom = 3072 << 20;
    set_soft_limit(libc::RLIMIT_AS, (vm_size() + headroom) as u64);
    let dir = TestDir::fast("holes-as-large");
    let alloc = MmapAllocator::builder()
        .dir(dir.path())
        .reserve_disk(false)
        .build()
        .expect("build");
    let small = mmapvec::mmap_vec![in alloc.clone(); 1u8; 100];
    assert_eq!(alloc.stats().small.chunks_created, 1, "a block of the tier");
    let mut large: MmapVec<u8> = MmapVec::new_in(alloc.clone());
    large
        .try_reserve_exact(1400 << 20)
        .unwrap_or_else(|e| panic!("{e:?}: {:?}, {:?}", alloc.stats(), alloc.take_last_error()));
    large.push(1);
    let mut too_large: MmapVec<u8> = MmapVec::new_in(alloc.clone());
    assert!(too_large.try_reserve_exact(headroom).is_err());
    let failures = alloc.stats().failures;
    assert!(failures.address_space >= 1, "{failures:?}");
    assert_eq!(failures.out_of_mappings, 0, "{failures:?}");
    drop((small, large));
}
