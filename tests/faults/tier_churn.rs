//! Issue 18: the small-block tier after its hardening made and released chunk files hundreds
//! of times a second under small vectors of mixed sizes, kept 4 MiB of disk per size class and
//! thread, could not reach what idle threads' caches held, leaked a chunk whose release failed,
//! and logged under its locks. Each test failed before the fix (the figures the old code gave
//! are in `RELIABILITY.md`).
//!
//! Each test has an allocator of its own on a folder of its own, and looks only at that
//! allocator's statistics and files.

use std::ptr::NonNull;
use std::sync::{Arc, Barrier, OnceLock};

use allocator_api2::alloc::{Allocator, Layout};
use mmapvec::{MmapAllocator, MmapVec};

use crate::support::{
    TestDir, in_child, mapped_disk_under, mappings_under, set_soft_limit, vm_size,
};

const MIB: u64 = 1 << 20;

/// xorshift64: the same sizes every run.
fn next(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn allocator(dir: &TestDir) -> MmapAllocator {
    MmapAllocator::builder()
        .dir(dir.path())
        .reuse_bytes(0)
        .build()
        .expect("build")
}

/// The request: 30 vectors of 1 to 2,000 bytes, built, then dropped.
fn request(alloc: &MmapAllocator, seed: &mut u64) {
    let vectors: Vec<MmapVec<u8>> = (0..30)
        .map(|_| {
            let len = 1 + (next(seed) % 2000) as usize;
            let mut v = MmapVec::with_capacity_in(len, alloc.clone());
            v.resize(len, len as u8);
            v
        })
        .collect();
    assert!(vectors.iter().all(|v| v.last() == Some(&(v.len() as u8))));
}

/// The first loop. Before the fix each request made and released chunk files (about
/// 460 a second); once warm, none may be made now.
#[test]
fn a_request_loop_of_mixed_sizes_makes_no_chunk_once_warm() {
    let dir = TestDir::fast("churn-requests");
    let alloc = allocator(&dir);
    let mut seed = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..200 {
        request(&alloc, &mut seed);
    }
    let warm = alloc.stats().small;
    for _ in 0..2000 {
        request(&alloc, &mut seed);
    }
    let after = alloc.stats().small;
    assert_eq!(
        (after.chunks_created, after.chunks_released),
        (warm.chunks_created, warm.chunks_released),
        "2000 requests after the warm-up made or released chunks: {warm:?} -> {after:?}"
    );
    assert_eq!(after.in_use_bytes, 0);
}

/// The second loop: rounds of a few live blocks in each of 40 sizes from 16 B to
/// 64 KiB, one replaced at each step, all freed at the end of the round, on 4 threads. Before
/// the fix it ran at 0.62 M operations a second against the heap's 19 M per thread, making
/// and releasing chunks all the while.
#[test]
fn a_loop_over_many_classes_makes_no_chunk_once_warm() {
    let dir = TestDir::fast("churn-classes");
    let alloc = allocator(&dir);
    let sizes: Vec<usize> = (0..40)
        .map(|i| (16.0 * 4096f64.powf(i as f64 / 39.0)) as usize)
        .collect();
    let round = move |alloc: &MmapAllocator, seed: &mut u64| {
        let mut slots: Vec<Option<(NonNull<[u8]>, Layout)>> = vec![None; sizes.len() * 4];
        for _ in 0..1000 {
            let slot = (next(seed) % slots.len() as u64) as usize;
            if let Some((block, layout)) = slots[slot].take() {
                // SAFETY: allocated below with this layout, freed once.
                unsafe { alloc.deallocate(block.cast(), layout) };
            }
            let layout = Layout::from_size_align(sizes[slot / 4], 8).unwrap();
            let block = alloc.allocate(layout).expect("a small block");
            // SAFETY: the block is ours, at least one byte long.
            unsafe { block.cast::<u8>().write(1) };
            slots[slot] = Some((block, layout));
        }
        for (block, layout) in slots.into_iter().flatten() {
            // SAFETY: allocated above with this layout, freed once.
            unsafe { alloc.deallocate(block.cast(), layout) };
        }
    };
    let barrier = Arc::new(Barrier::new(5));
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (alloc, barrier, round) = (alloc.clone(), barrier.clone(), round.clone());
            std::thread::spawn(move || {
                let mut seed = 0x2545_F491_4F6C_DD1D ^ t;
                for _ in 0..20 {
                    round(&alloc, &mut seed);
                }
                barrier.wait(); // warm
                barrier.wait(); // counted from here
                for _ in 0..100 {
                    round(&alloc, &mut seed);
                }
            })
        })
        .collect();
    barrier.wait();
    let warm = alloc.stats().small;
    barrier.wait();
    threads.into_iter().for_each(|t| t.join().unwrap());
    let after = alloc.stats().small;
    assert_eq!(
        (after.chunks_created, after.chunks_released),
        (warm.chunks_created, warm.chunks_released),
        "400 rounds after the warm-up made or released chunks: {warm:?} -> {after:?}"
    );
    assert_eq!(after.in_use_bytes, 0);
}

/// Eight threads, each building `count` vectors of 1 to 2,000 bytes on `alloc`, keeping them
/// (`keep`) or dropping them, then waiting twice at the returned barrier (with the caller):
/// once all are built, and once the caller has measured. Join the handles after the second.
fn eight_threads_of_small_vectors(
    alloc: &MmapAllocator,
    count: usize,
    keep: bool,
) -> (Arc<Barrier>, Vec<std::thread::JoinHandle<()>>) {
    let barrier = Arc::new(Barrier::new(9));
    let threads = (0..8u64)
        .map(|t| {
            let (alloc, barrier) = (alloc.clone(), barrier.clone());
            std::thread::spawn(move || {
                let mut seed = 0x9E37_79B9_7F4A_7C15 ^ (t + 1);
                let mut built: Vec<MmapVec<u8>> = (0..count)
                    .map(|_| {
                        let len = 1 + (next(&mut seed) % 2000) as usize;
                        let mut v = MmapVec::with_capacity_in(len, alloc.clone());
                        v.resize(len, 3);
                        v
                    })
                    .collect();
                if !keep {
                    built.clear();
                }
                barrier.wait(); // built
                barrier.wait(); // measured
                drop(built);
            })
        })
        .collect();
    (barrier, threads)
}

/// The first footprint case: 8 threads each keeping 50 small vectors. Before the fix
/// their chunks took 540 MiB of disk (4 MiB per class and thread) for 0.8 MiB live; the
/// target is at most twice the live bytes and 64 MiB.
#[test]
fn small_vectors_kept_by_eight_threads_take_disk_near_their_size() {
    let dir = TestDir::fast("churn-kept");
    let alloc = allocator(&dir);
    let (barrier, threads) = eight_threads_of_small_vectors(&alloc, 50, true);
    barrier.wait();
    let live = alloc.stats().small.in_use_bytes;
    let disk = mapped_disk_under(&dir.segment_folder());
    barrier.wait();
    threads.into_iter().for_each(|t| t.join().unwrap());
    println!("{} KiB live, {} KiB of disk", live >> 10, disk >> 10);
    assert!(
        disk <= 2 * live + 64 * MIB,
        "{} MiB of disk for {} KiB live: {:?}",
        disk >> 20,
        live >> 10,
        alloc.stats().small
    );
}

/// The idle pool: 8 workers build and drop small vectors, then wait. Before the fix
/// their caches pinned 8 chunks each (256 MiB with nothing live) and `trim()` could not reach
/// them; now it gives back every piece under no live block, cached blocks aside.
#[test]
fn trim_reaches_what_idle_threads_hold() {
    let dir = TestDir::fast("churn-idle");
    let alloc = allocator(&dir);
    let (barrier, threads) = eight_threads_of_small_vectors(&alloc, 3000, false);
    barrier.wait();
    alloc.trim();
    let disk = mapped_disk_under(&dir.segment_folder());
    let small = alloc.stats().small;
    barrier.wait();
    threads.into_iter().for_each(|t| t.join().unwrap());
    println!(
        "after trim, idle threads: {} KiB of disk, {small:?}",
        disk >> 10
    );
    assert_eq!(small.in_use_bytes, 0, "{small:?}");
    // What stays: the pieces under the blocks the 8 caches hold (at most 32 KiB per class).
    assert!(
        disk <= 32 * MIB && small.arena_bytes <= 32 * MIB,
        "{} MiB of disk kept by idle threads after trim: {small:?}",
        disk >> 20
    );
}

/// The allocator the logger below allocates through.
static LOGGED_THROUGH: OnceLock<MmapAllocator> = OnceLock::new();

/// Messages the logger below received.
static LOGGED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A logger that allocates a small vector through [`LOGGED_THROUGH`] for every message.
struct AllocatingLogger;

impl log::Log for AllocatingLogger {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        LOGGED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if let Some(alloc) = LOGGED_THROUGH.get() {
            let mut line: MmapVec<u8> = MmapVec::new_in(alloc.clone());
            // At the map limit the block may not be had: the message is printed anyway.
            let _ = line.try_reserve(100);
            line.extend(format!("{}", record.args()).bytes().take(line.capacity()));
            println!("logged: {}", String::from_utf8_lossy(&line));
        }
    }

    fn flush(&self) {}
}

/// With `RLIMIT_AS` lowered below what the process maps (or at `vm.max_map_count`), a chunk's
/// release cannot map a reservation over its view. Before the fix the chunk then stayed
/// mapped, with its disk, for the life of the process (marked lost, skipped even by the
/// allocator's drop), and the failure was logged while the tier's locks were held: a logger
/// that allocates through the allocator deadlocked. Now the view's pages are given back and
/// made inaccessible (or, failing that, the view is unmapped and the range reserved again),
/// and the message logged after the locks are released; the logger's own failed allocation is
/// not logged into it again.
#[test]
fn a_chunk_whose_release_is_refused_gives_its_disk_back() {
    const NAME: &str = "tier_churn::a_chunk_whose_release_is_refused_gives_its_disk_back";
    if !in_child(NAME, "release-refused") {
        return;
    }
    // A deadlock ends the child (and fails the test) instead of hanging it.
    // SAFETY: alarm only schedules a signal.
    unsafe { libc::alarm(60) };
    let dir = TestDir::fast("churn-release-refused");
    let alloc = allocator(&dir);
    let _ = LOGGED_THROUGH.set(alloc.clone());
    log::set_logger(&AllocatingLogger).expect("the child's only logger");
    log::set_max_level(log::LevelFilter::Debug);
    // Two chunks of 64 KiB blocks, emptied: they stay mapped, kept for the next blocks.
    let big: Vec<MmapVec<u8>> = (0..128)
        .map(|_| mmapvec::mmap_vec![in alloc.clone(); 9u8; 64 << 10])
        .collect();
    drop(big);
    let before = alloc.stats().small;
    assert!(before.mapped_bytes >= 2 * (4 * MIB), "{before:?}");
    // Releases every chunk, with no room for a new mapping.
    set_soft_limit(libc::RLIMIT_AS, (vm_size() - (64 << 20)) as u64);
    alloc.trim();
    set_soft_limit(libc::RLIMIT_AS, libc::RLIM_INFINITY);
    // The logger's own block may have taken a chunk meanwhile (over one of the views left):
    // given back now, with room again.
    alloc.trim();
    let after = alloc.stats().small;
    println!("release refused: {before:?} -> {after:?}");
    let logged = LOGGED.load(std::sync::atomic::Ordering::Relaxed);
    assert!(logged > 0, "no release was refused: the test shows nothing");
    assert_eq!(after.mapped_bytes, 0, "{after:?}");
    assert_eq!(mapped_disk_under(&dir.segment_folder()), 0);
    // Over the limit no mapping at all can be made: a view the reservation could not replace
    // stays, inaccessible and with no disk, and keeps its range the tier's.
    let prefix = format!(" {}/", dir.segment_folder().display());
    let open: Vec<_> = crate::support::maps()
        .into_iter()
        .filter(|line| line.contains(&prefix))
        .filter(|line| {
            !line
                .split_whitespace()
                .nth(1)
                .is_some_and(|p| p.starts_with("---"))
        })
        .collect();
    assert!(open.is_empty(), "chunk views still accessible: {open:?}");
    // The tier goes on: the next blocks come from a new chunk.
    let again = mmapvec::mmap_vec![in alloc.clone(); 2u8; 64 << 10];
    let stats = alloc.stats();
    assert_eq!(stats.live_segments, 0, "{stats:?}");
    assert_eq!(stats.small.chunks_created, after.chunks_created + 1);
    drop(again);
}

/// The read-only map: freed segments kept for reuse were released only at the next
/// allocation or free, so an allocator that is only read from afterwards kept them for good
/// (33 MiB in the issue). A thread now releases them once they decay (about a second).
#[test]
fn kept_segments_go_without_another_allocation() {
    let dir = TestDir::new("churn-decay");
    let alloc = MmapAllocator::builder()
        .dir(dir.path())
        .build()
        .expect("build");
    let table: MmapVec<u64> = {
        // A table rehashed through larger and larger segments: the old ones are kept.
        let mut v = MmapVec::new_in(alloc.clone());
        v.extend(0..(4u64 << 20));
        v.shrink_to_fit();
        let scratch = mmapvec::mmap_vec![in alloc.clone(); 0u8; 16 << 20];
        drop(scratch);
        v
    };
    let kept = alloc.stats().kept_segments;
    assert!(kept >= 1, "{:?}", alloc.stats());
    // Only reads from here on.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let mut sum = 0u64;
    while alloc.stats().kept_segments > 0 && std::time::Instant::now() < deadline {
        sum = sum.wrapping_add(table.iter().step_by(4096).sum::<u64>());
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let stats = alloc.stats();
    assert_eq!(
        (stats.kept_segments, stats.kept_bytes),
        (0, 0),
        "kept segments still there 10 s after they were freed: {stats:?} ({sum})"
    );
    // What is mapped: the table alone.
    assert_eq!(mappings_under(&dir.segment_folder()), 1);
}

/// Allocates `count` blocks of `size` bytes from `alloc`, writing the first byte of each.
fn blocks(alloc: &MmapAllocator, size: usize, count: usize) -> Vec<(NonNull<[u8]>, Layout)> {
    let layout = Layout::from_size_align(size, 8).unwrap();
    (0..count)
        .map(|_| {
            let block = alloc.allocate(layout).expect("a small block");
            // SAFETY: the block is ours, at least one byte long.
            unsafe { block.cast::<u8>().write(1) };
            (block, layout)
        })
        .collect()
}

fn free_blocks(alloc: &MmapAllocator, blocks: Vec<(NonNull<[u8]>, Layout)>) {
    for (block, layout) in blocks {
        // SAFETY: allocated by `blocks` with this layout, freed once.
        unsafe { alloc.deallocate(block.cast(), layout) };
    }
}

/// The issue's `RLIMIT_AS` case: under a 4,200 MiB limit the tier's region was an eighth of
/// what was left (512 MiB) and never grew; past it every small block became a one-page
/// segment (0.8 ms each) with over 3 GiB still free. The regions now grow in steps.
#[test]
fn the_tier_grows_in_steps_under_rlimit_as() {
    const NAME: &str = "tier_churn::the_tier_grows_in_steps_under_rlimit_as";
    if !in_child(NAME, "regions-grow") {
        return;
    }
    set_soft_limit(libc::RLIMIT_AS, (vm_size() + (4200 << 20)) as u64);
    let dir = TestDir::fast("churn-regions");
    let alloc = allocator(&dir);
    // 768 MiB of 64 KiB blocks: more than one region of an eighth of the room.
    let held = blocks(&alloc, 64 << 10, 12 * 1024);
    let stats = alloc.stats();
    println!("{stats:?}");
    assert_eq!(
        stats.live_segments, 0,
        "small blocks became segments: {stats:?}"
    );
    assert_eq!(stats.failures.total(), 0, "{stats:?}");
    assert!(stats.small.mapped_bytes >= 768 << 20, "{stats:?}");
    free_blocks(&alloc, held);
}

/// The later `RLIMIT_AS`: the tier reserved 64 GiB at its first block, which counts in
/// `VmSize`, so a limit set afterwards (4 GiB here) left no room at all: a 100 MiB vector, a
/// 100 MiB heap `Vec` and a thread all failed. The first region is 1 GiB now, and `trim`
/// gives back a region with no chunk.
#[test]
fn an_rlimit_as_set_later_leaves_the_program_room() {
    const NAME: &str = "tier_churn::an_rlimit_as_set_later_leaves_the_program_room";
    if !in_child(NAME, "rlimit-later") {
        return;
    }
    let dir = TestDir::fast("churn-rlimit-later");
    let alloc = allocator(&dir);
    let small = mmapvec::mmap_vec![in alloc.clone(); 1u8; 100];
    let with_region = vm_size();
    set_soft_limit(libc::RLIMIT_AS, 4 << 30);
    let big: Result<MmapVec<u8>, _> = {
        let mut v = MmapVec::new_in(alloc.clone());
        v.try_reserve_exact(100 << 20).map(|()| v)
    };
    let heap = {
        let mut v = Vec::<u8>::new();
        v.try_reserve_exact(100 << 20).map(|()| v)
    };
    let thread = std::thread::Builder::new().spawn(|| 7).map(|t| t.join());
    set_soft_limit(libc::RLIMIT_AS, libc::RLIM_INFINITY);
    println!("VmSize with the tier's region: {} MiB", with_region >> 20);
    assert!(big.is_ok(), "{:?}", alloc.take_last_error());
    assert!(heap.is_ok() && thread.is_ok());
    drop((big, heap, small));
    alloc.trim();
    let trimmed = vm_size();
    println!("after trim: {} MiB", trimmed >> 20);
    // The 1 GiB region went (less what the thread above added: its stack, glibc's arena).
    assert!(
        trimmed + (768 << 20) <= with_region,
        "trim gave back no region: {} MiB -> {} MiB",
        with_region >> 20,
        trimmed >> 20
    );
    // And the tier comes back.
    drop(mmapvec::mmap_vec![in alloc.clone(); 2u8; 100]);
    assert_eq!(alloc.stats().live_segments, 0);
}

/// The many allocators: each reserved 64 GiB, so 2,600 live ones took the whole
/// 128 TiB and a 1 GiB heap `Vec` then failed.
#[test]
fn thousands_of_allocators_leave_address_space() {
    const NAME: &str = "tier_churn::thousands_of_allocators_leave_address_space";
    if !in_child(NAME, "many-allocators") {
        return;
    }
    let dir = TestDir::fast("churn-allocators");
    let held: Vec<MmapVec<u8>> = (0..2600)
        .map(|_| {
            let alloc = MmapAllocator::builder()
                .dir(dir.path())
                .reuse_bytes(0)
                .build()
                .expect("build");
            mmapvec::mmap_vec![in alloc; 3u8; 100]
        })
        .collect();
    println!("VmSize with 2600 allocators: {} GiB", vm_size() >> 30);
    let heap = {
        let mut v = Vec::<u8>::new();
        v.try_reserve_exact(1 << 30).map(|()| v)
    };
    assert!(heap.is_ok(), "a 1 GiB heap Vec failed");
    assert!(held.iter().all(|v| v[99] == 3));
}

/// The review of issue 18, finding 1: two threads on one shard both miss a class and both make
/// a chunk; the second installed its chunk over the first's, which (emptied meanwhile) was
/// then in no list: mapped for the life of the tier, `trim` or not (11, then 33 and 43 chunks
/// over the review's rounds). Sixteen threads on eight shards: each shard has two (a new
/// thread takes the shard with the fewest live threads, and this test runs alone in its
/// process).
#[test]
fn chunks_made_at_once_on_one_shard_are_not_orphaned() {
    const NAME: &str = "tier_churn::chunks_made_at_once_on_one_shard_are_not_orphaned";
    if !in_child(NAME, "orphans") {
        return;
    }
    let dir = TestDir::fast("churn-orphans");
    let alloc = MmapAllocator::builder()
        .dir(dir.path())
        .small_threshold(512 << 10)
        .reuse_bytes(0)
        .build()
        .expect("build");
    let vector = |alloc: &MmapAllocator, seed: &mut u64| {
        let len = (448 << 10) + (next(seed) % (64 << 10)) as usize;
        let mut v: MmapVec<u8> = MmapVec::with_capacity_in(len, alloc.clone());
        v.push(1);
        v
    };
    for round in 0..3u64 {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let keepers: Vec<_> = (0..8u64)
            .map(|t| {
                let alloc = alloc.clone();
                std::thread::spawn(move || {
                    let mut seed = 0x9E37_79B9_7F4A_7C15 ^ (round * 100 + t + 1);
                    (0..100)
                        .map(|_| vector(&alloc, &mut seed))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let temps: Vec<_> = (0..8u64)
            .map(|t| {
                let (alloc, stop) = (alloc.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut seed = 0x2545_F491_4F6C_DD1D ^ (round * 1000 + t + 7);
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        drop(vector(&alloc, &mut seed));
                    }
                })
            })
            .collect();
        let kept: Vec<_> = keepers.into_iter().map(|h| h.join().unwrap()).collect();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        temps.into_iter().for_each(|h| h.join().unwrap());
        drop(kept);
        alloc.trim();
        let small = alloc.stats().small;
        assert_eq!(small.in_use_bytes, 0, "{small:?}");
        assert_eq!(
            small.mapped_bytes >> 22,
            0,
            "round {round}: chunks mapped with no live block, every thread gone, after trim: \
             {small:?}"
        );
    }
}

/// The review's finding 2: a populate that stopped part-way on a full disk left the pages it
/// had filled allocated, counted nowhere and out of `trim`'s reach (200 KiB in the review).
#[test]
fn a_block_refused_on_a_full_disk_leaves_no_disk_behind() {
    let fs = match crate::support::Tmpfs::mount("churn-partial", 16 << 20) {
        Ok(fs) => fs,
        Err(why) => crate::support::skip!("{why}"),
    };
    let alloc = MmapAllocator::builder()
        .dir(fs.path())
        .allow_ram_backed(true)
        .small_threshold(512 << 10)
        .reuse_bytes(0)
        .build()
        .expect("build");
    // One live 512 KiB block: its chunk's first 8 pieces are backed.
    let mut keep: MmapVec<u8> = MmapVec::with_capacity_in(512 << 10, alloc.clone());
    keep.resize(512 << 10, 1);
    // A file takes all but about 200 KiB.
    let used = |path: &std::path::Path| {
        let total = 16u64 << 20;
        total - crate::support::free_bytes(path)
    };
    let free = crate::support::free_bytes(fs.path());
    let hog = fs.path().join("hog");
    std::fs::write(&hog, vec![7u8; (free - (200 << 10)) as usize]).expect("the hog file");
    let before = (used(fs.path()), alloc.stats().small.arena_bytes);
    // A second 512 KiB block of the same chunk: 8 pieces to back, about 3 fit.
    let mut v: MmapVec<u8> = MmapVec::new_in(alloc.clone());
    assert!(
        v.try_reserve_exact(512 << 10).is_err(),
        "the disk was not full"
    );
    alloc.trim();
    let after = (used(fs.path()), alloc.stats().small.arena_bytes);
    println!("(disk used, arena_bytes) before {before:?}, after the refusal and trim {after:?}");
    assert_eq!(after, before, "disk left behind by the refused block");
    assert_eq!(keep[(512 << 10) - 1], 1);
}

/// The review's finding 3: with `dont_fork`, a fork child closing the parent's chunks gave
/// back pieces of ranges it does not map (reservations there), and logged each failure.
#[test]
fn a_fork_child_gives_back_nothing_of_chunks_kept_from_it() {
    const NAME: &str = "tier_churn::a_fork_child_gives_back_nothing_of_chunks_kept_from_it";
    if !in_child(NAME, "dont-fork-child") {
        return;
    }
    let _ = LOGGED_THROUGH.set(MmapAllocator::default());
    log::set_logger(&AllocatingLogger).expect("the child's only logger");
    log::set_max_level(log::LevelFilter::Debug);
    let dir = TestDir::fast("churn-dont-fork");
    let alloc = MmapAllocator::builder()
        .dir(dir.path())
        .dont_fork(true)
        .small_threshold(512 << 10)
        .build()
        .expect("build");
    // Blocks of many sizes, every other one freed: the chunks have free pieces.
    let mut seed = 3;
    let mut held = Vec::new();
    for i in 0..2000 {
        let len = 1 + (next(&mut seed) % (256 << 10)) as usize;
        let v = mmapvec::mmap_vec![in alloc.clone(); 5u8; len];
        if i % 2 == 0 {
            held.push(v);
        }
    }
    let before = LOGGED.load(std::sync::atomic::Ordering::Relaxed);
    // SAFETY: the child only allocates, trims, reads counters and exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let mine = mmapvec::mmap_vec![in alloc.clone(); 1u8; 100];
        alloc.trim();
        let logged = LOGGED.load(std::sync::atomic::Ordering::Relaxed) - before;
        let code = if logged == 0 && mine[99] == 1 { 0 } else { 1 };
        std::mem::forget((held, mine));
        // SAFETY: ends the child without running the parent's destructors.
        unsafe { libc::_exit(code) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the child logged failures giving back pieces it does not map (status {status:#x})"
    );
    assert!(held.iter().all(|v| v.iter().all(|&b| b == 5)));
}

/// A creator that refuses every other file.
#[derive(Debug)]
struct EveryOtherFails {
    dir: std::path::PathBuf,
    calls: std::sync::atomic::AtomicU64,
}

// SAFETY: every file it returns is new, empty, read-write, and its own.
unsafe impl mmapvec::SegmentCreator for EveryOtherFails {
    fn create(&self, _request: &mmapvec::SegmentRequest) -> std::io::Result<mmapvec::SegmentFile> {
        use std::os::unix::fs::OpenOptionsExt;
        let n = self
            .calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n % 2 == 1 {
            return Err(std::io::Error::other("refused"));
        }
        let path = self.dir.join(format!("f-{n}"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        Ok(mmapvec::SegmentFile::named(file, path))
    }
}

/// The second review of issue 18: a chunk being made (its index taken, not yet marked) or
/// failing to be made (its index put back in two steps) raced `trim`, which gave back the
/// newest region when it saw no chunk in it: the index was then used twice (a second map over
/// a live chunk's view, whose blocks lost their contents) or outside any region (a panic).
#[test]
fn chunks_made_while_another_thread_trims_stay_whole() {
    let dir = TestDir::fast("churn-trim-race");
    std::fs::create_dir_all(dir.path().join("files")).unwrap();
    let alloc = MmapAllocator::builder()
        .creator(EveryOtherFails {
            dir: dir.path().join("files"),
            calls: std::sync::atomic::AtomicU64::new(0),
        })
        .reuse_bytes(0)
        .build()
        .expect("build");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let trimmer = {
        let (alloc, stop) = (alloc.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                alloc.trim();
            }
        })
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    let mut seed = 0x9E37_79B9_7F4A_7C15;
    let mut rounds = 0;
    while std::time::Instant::now() < deadline {
        // Blocks of many classes, each filled with its own byte, checked, all freed: the tier
        // makes chunks (half of them refused) and empties its regions while `trim` runs.
        let held: Vec<(u8, MmapVec<u8>)> = (0..64u8)
            .filter_map(|byte| {
                let len = 1 + (next(&mut seed) % (64 << 10)) as usize;
                let mut v = MmapVec::new_in(alloc.clone());
                v.try_reserve_exact(len).ok()?;
                v.resize(len, byte);
                Some((byte, v))
            })
            .collect();
        for (byte, v) in &held {
            assert!(v.iter().all(|b| b == byte), "a block lost its contents");
        }
        drop(held);
        rounds += 1;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    trimmer.join().expect("the trimming thread");
    println!("{rounds} rounds: {:?}", alloc.stats().small);
    assert_eq!(alloc.stats().small.in_use_bytes, 0);
}

/// The second review's regression: each new chunk's file was first mapped whole elsewhere (a
/// probe), which needs 4 MiB of address space: with a `RLIMIT_AS` leaving less, no chunk could
/// be made even inside the region reserved already (108 of 2,000 blocks, all segments). The
/// probe is one page now.
#[test]
fn chunks_are_made_inside_the_region_with_little_address_space_left() {
    const NAME: &str =
        "tier_churn::chunks_are_made_inside_the_region_with_little_address_space_left";
    if !in_child(NAME, "probe-page") {
        return;
    }
    let dir = TestDir::fast("churn-probe");
    let alloc = allocator(&dir);
    let first = blocks(&alloc, 64, 1);
    set_soft_limit(libc::RLIMIT_AS, (vm_size() + (3 << 20)) as u64);
    let mut held = Vec::new();
    for i in 0..2000usize {
        let layout = Layout::from_size_align(1024 * (1 + i % 64), 8).unwrap();
        if let Ok(block) = alloc.allocate(layout) {
            held.push((block, layout));
        }
    }
    set_soft_limit(libc::RLIMIT_AS, libc::RLIM_INFINITY);
    let stats = alloc.stats();
    println!("{} of 2000 blocks: {stats:?}", held.len());
    assert_eq!(held.len(), 2000, "{:?}", alloc.take_last_error());
    assert_eq!(stats.live_segments, 0, "{stats:?}");
    free_blocks(&alloc, held);
    free_blocks(&alloc, first);
}
