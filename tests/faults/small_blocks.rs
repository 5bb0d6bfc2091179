//! The faults of the other modules, through the small-block tier (issue 9): blocks up to the
//! small threshold carved out of shared chunk files must keep every promise segments keep.
//! Millions of live blocks under the OS's limits, nothing left after threads or `SIGKILL`, a
//! full disk as an error, and `fork` in both directions without either side seeing the other's
//! new data or dying.

use allocator_api2::alloc::{Allocator, Layout};
use mmapvec::{MmapAllocator, MmapVec, mmap_vec};

use std::time::Duration;

use crate::process::{describe, exited_ok, fork_with, pipe, poll, receive, send, wait};
use crate::support::{
    TestDir, Tmpfs, descriptors_under, files_under, in_child, mappings_under, maps,
    open_descriptors, set_soft_limit, skip,
};

/// The tier's chunk files: 4 MiB each.
const CHUNK: u64 = 4 << 20;

/// A million live small vectors (8 `u32` each, the outer vector an `MmapVec` too) under a soft
/// limit of 1024 descriptors and the default `vm.max_map_count`: one segment per vector would
/// need a million mappings (the limit is 65,530) and, past the descriptor budget, a million
/// named files. The tier needs a few chunk files, no descriptor, a few mappings.
#[test]
fn a_million_live_small_vectors_under_1024_descriptors() {
    const NAME: &str = "small_blocks::a_million_live_small_vectors_under_1024_descriptors";
    if !in_child(NAME, "million") {
        return;
    }
    set_soft_limit(libc::RLIMIT_NOFILE, 1024);
    let dir = TestDir::new("million");
    let alloc = MmapAllocator::builder()
        .dir(dir.path())
        .build()
        .expect("build");
    let fds_before = open_descriptors();
    let maps_before = maps().len();
    let n = 1_000_000u32;
    let mut outer: MmapVec<MmapVec<u32>> = MmapVec::with_capacity_in(n as usize, alloc.clone());
    for i in 0..n {
        let mut v = MmapVec::new_in(alloc.clone());
        v.extend(i..i + 8);
        outer.push(v);
    }
    let s = alloc.stats();
    assert_eq!(s.failures.total(), 0, "{s:?}");
    assert_eq!(
        s.live_segments, 1,
        "only the outer vector is a segment: {s:?}"
    );
    // 32-byte blocks: a million fill 32 MB of chunks, give or take the chunks being filled.
    assert!(s.small.in_use_bytes >= u64::from(n) * 32, "{s:?}");
    assert!(
        s.small.arena_bytes <= u64::from(n) * 32 + 4 * CHUNK,
        "{s:?}"
    );
    let chunks = (s.small.mapped_bytes / CHUNK) as usize;
    // One mapping per chunk and one for the outer vector, give or take what the heap added.
    let maps_now = maps().len();
    assert!(
        maps_now <= maps_before + chunks + 1 + 16,
        "{maps_now} mappings (before {maps_before}, {chunks} chunks)"
    );
    // The outer vector's descriptor only.
    assert!(open_descriptors() <= fds_before + 1);
    for (i, v) in outer.iter().enumerate() {
        let i = i as u32;
        assert!(v.iter().copied().eq(i..i + 8), "vector {i}");
    }
    println!(
        "{n} live vectors: {chunks} chunks, {} mappings (before: {maps_before}), {} descriptors \
         (before: {fds_before})",
        maps_now,
        open_descriptors()
    );
    drop(outer);
    let s = alloc.stats();
    assert_eq!((s.live_segments, s.small.in_use_bytes), (0, 0), "{s:?}");
    drop(alloc);
    assert_eq!(mappings_under(dir.path()), 0);
    assert_eq!(descriptors_under(dir.path()), 0);
    assert!(files_under(dir.path()).is_empty());
}

/// Four threads run random programs of small and large blocks on one allocator (its clones),
/// freeing some of each other's blocks; every block keeps its bytes. After the allocator is
/// dropped, descriptors, mappings and files are back to their starting counts.
#[test]
fn four_threads_of_small_and_large_blocks_leave_nothing() {
    const NAME: &str = "small_blocks::four_threads_of_small_and_large_blocks_leave_nothing";
    // Descriptors are counted process-wide: alone in a child, no other test opens any.
    if !in_child(NAME, "threads") {
        return;
    }
    let dir = TestDir::new("threads");
    let count = || {
        (
            open_descriptors(),
            maps().len(),
            mappings_under(dir.path()),
            files_under(dir.path()).len(),
        )
    };
    let before = count();
    let alloc = MmapAllocator::builder()
        .dir(dir.path())
        .small_threshold(64 << 10)
        .build()
        .expect("build");
    let (to_other, from_other) = std::sync::mpsc::channel::<MmapVec<u64>>();
    let from_other = std::sync::Mutex::new(from_other);
    std::thread::scope(|scope| {
        let mut handles = Vec::new();
        for t in 0..4u64 {
            let alloc = alloc.clone();
            let to_other = to_other.clone();
            let from_other = &from_other;
            handles.push(scope.spawn(move || {
                let mut rng = t.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
                let mut next = move || {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    rng
                };
                let mut live: Vec<(u64, MmapVec<u64>)> = Vec::new();
                for step in 0..2000u64 {
                    let tag = (t << 32) | step;
                    match next() % 8 {
                        0..=3 => {
                            // Mostly small, sometimes past the threshold (8 KiB words).
                            let len = match next() % 10 {
                                0 => 8192 + next() % 30_000,
                                _ => next() % 600,
                            } as usize;
                            let mut v = MmapVec::with_capacity_in(len, alloc.clone());
                            v.extend((0..len as u64).map(|i| tag ^ i));
                            live.push((tag, v));
                        }
                        4 if !live.is_empty() => {
                            // Grow or shrink one, across the threshold either way.
                            let k = (next() as usize) % live.len();
                            let (tag, v) = &mut live[k];
                            if next() % 2 == 0 {
                                let add = (next() % 10_000) as usize;
                                let start = v.len() as u64;
                                v.extend((start..start + add as u64).map(|i| *tag ^ i));
                            } else {
                                v.truncate(v.len() / 3);
                                v.shrink_to_fit();
                            }
                        }
                        5 if !live.is_empty() => {
                            let k = (next() as usize) % live.len();
                            let (_, v) = live.swap_remove(k);
                            // Freed by another thread, or dropped here.
                            if next() % 2 == 0 {
                                let _ = to_other.send(v);
                            }
                        }
                        6 => {
                            let got = from_other.lock().unwrap().try_recv();
                            drop(got);
                        }
                        _ if !live.is_empty() => {
                            let (tag, v) = &live[(next() as usize) % live.len()];
                            assert!(
                                v.iter().enumerate().all(|(i, &x)| x == *tag ^ i as u64),
                                "thread {t}: vector {tag:#x} changed"
                            );
                        }
                        _ => {}
                    }
                }
                for (tag, v) in &live {
                    assert!(v.iter().enumerate().all(|(i, &x)| x == *tag ^ i as u64));
                }
            }));
        }
        // Joined by hand: the scope's end waits only for the closures, not for the threads'
        // exit, where their caches give back what they hold.
        for h in handles {
            h.join().expect("worker thread");
        }
    });
    drop(to_other);
    while from_other.lock().unwrap().try_recv().is_ok() {}
    let s = alloc.stats();
    assert_eq!((s.live_segments, s.small.in_use_bytes), (0, 0), "{s:?}");
    assert_eq!(s.failures.total(), 0, "{s:?}");
    assert!(s.small.chunks_created > 0 && s.creates > 0, "{s:?}");
    drop(alloc);
    // A scoped thread's end is signalled before its thread-locals are destroyed: a thread's
    // cache giving its blocks back may hold the tier a moment longer.
    poll(Duration::from_secs(2), || {
        let now = count();
        (now.0, now.2, now.3) == (before.0, before.2, before.3)
    });
    let after = count();
    assert_eq!(
        (after.0, after.2, after.3),
        (before.0, before.2, before.3),
        "descriptors, mappings and files of the directory (before {before:?}, after {after:?})"
    );
    // Process-wide mappings: glibc keeps the malloc arenas of the threads that ran (up to
    // four mappings each), and the stack of the reuse cache's decay thread (`reuse::timer`,
    // with its guard page and arena); the directory's own mappings are counted exactly above.
    assert!(
        after.1 <= before.1 + 16 + 4 + 6,
        "before {before:?}, after {after:?}"
    );
}

/// A full disk with chunk files: on a small tmpfs, small blocks are handed out until a new
/// chunk's blocks cannot be reserved; that is an `AllocError` counted as `disk_full`, and every
/// byte of every block handed out can then be written (no `SIGBUS`).
///
/// In a child process: a `fork` by a test running beside it (the fork epoch is process-wide)
/// closes these chunks, and the fork's child keeps their pages on the tmpfs while it lives, so
/// the space would not come back after the frees (`scripts/repeat-tests` saw "Room again" abort).
#[test]
fn full_disk_is_an_alloc_error_for_small_blocks() {
    const NAME: &str = "small_blocks::full_disk_is_an_alloc_error_for_small_blocks";
    const SIZE: usize = 16 << 20;
    if !in_child(NAME, "full") {
        return;
    }
    let fs = match Tmpfs::mount("small-full", SIZE) {
        Ok(fs) => fs,
        Err(why) => skip!("{why}"),
    };
    let alloc = MmapAllocator::builder()
        .dir(fs.path())
        .build()
        .expect("build");
    let layout = Layout::from_size_align(4000, 8).unwrap();
    let mut blocks = Vec::new();
    let err = loop {
        match alloc.allocate(layout) {
            Ok(block) => blocks.push(block),
            Err(_) => break alloc.take_last_error().expect("the error is kept"),
        }
        assert!(
            blocks.len() <= SIZE / 4000,
            "more handed out than the disk holds"
        );
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    let s = alloc.stats();
    assert_eq!(s.failures.disk_full, 1, "{s:?}");
    assert!(s.small.chunks_created >= 2, "{s:?}");
    // Every block handed out is backed: writing all of them cannot SIGBUS.
    for block in &blocks {
        // SAFETY: each block is ours, `block.len()` bytes long.
        unsafe { block.cast::<u8>().as_ptr().write_bytes(0x5A, block.len()) };
    }
    for block in blocks {
        // SAFETY: allocated with `layout` above, freed once.
        unsafe { alloc.deallocate(block.cast(), layout) };
    }
    // Room again after the frees.
    let again = mmap_vec![in alloc.clone(); 7u8; 4000];
    assert_eq!(again[3999], 7);
}

/// `SIGKILL` while small blocks are live leaves no file: chunk files are unlinked as soon as
/// they are mapped.
#[test]
fn sigkill_with_small_blocks_leaves_no_file() {
    const NAME: &str = "small_blocks::sigkill_with_small_blocks_leaves_no_file";
    if !in_child(NAME, "sigkill") {
        return;
    }
    let dir = TestDir::new("small-sigkill");
    let alloc = MmapAllocator::builder()
        .dir(dir.path())
        .build()
        .expect("build");
    let pid = fork_with(|| {
        let vectors: Vec<MmapVec<u8>> = (0..10_000)
            .map(|i| mmap_vec![in alloc.clone(); i as u8; 100])
            .collect();
        assert!(alloc.stats().small.chunks_created >= 1);
        std::mem::forget(vectors);
        // SAFETY: raise has no preconditions; the process dies here.
        unsafe { libc::raise(libc::SIGKILL) };
        0
    });
    let status = wait(pid);
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
        "{}",
        describe(status)
    );
    assert!(
        files_under(dir.path()).is_empty(),
        "{:?}",
        files_under(dir.path())
    );
}

/// Small vectors made before a fork, in the parent and the child: after the fork each side
/// frees and allocates heavily, writing its new blocks. Neither side's new data may land in
/// the other's inherited vectors (pre-fork chunk space is never handed out again), no side
/// dies, and each keeps its own inherited vectors intact. With `dont_fork` the child cannot
/// read the inherited vectors, but may drop them and allocate.
#[test]
fn fork_both_ways_with_small_blocks() {
    const NAME: &str = "small_blocks::fork_both_ways_with_small_blocks";
    if !in_child(NAME, "fork") {
        return;
    }
    for dont_fork in [false, true] {
        let dir = TestDir::new("small-fork");
        let alloc = MmapAllocator::builder()
            .dir(dir.path())
            .dont_fork(dont_fork)
            .build()
            .expect("build");
        let pattern = |i: usize, j: usize| (i * 31 + j) as u32;
        let make = |n: usize| -> Vec<MmapVec<u32>> {
            (0..n)
                .map(|i| {
                    let mut v = MmapVec::new_in(alloc.clone());
                    v.extend((0..(i % 50) + 1).map(|j| pattern(i, j)));
                    v
                })
                .collect()
        };
        let mut parents = make(20_000);
        // Half of them freed before the fork: their space is free in the pre-fork chunks.
        for v in parents.iter_mut().skip(1).step_by(2) {
            *v = MmapVec::new_in(alloc.clone());
        }
        let kept: Vec<usize> = (0..parents.len()).step_by(2).collect();
        let (go_r, go_w) = pipe();
        let pid = fork_with(|| {
            // The child: first wait while the parent churns, then check and churn itself.
            let _ = receive::<1>(&go_r);
            if !dont_fork {
                for &i in &kept {
                    let v = &parents[i];
                    if !v.iter().enumerate().all(|(j, &x)| x == pattern(i, j)) {
                        eprintln!("child: inherited vector {i} changed by the parent");
                        return 2;
                    }
                }
            }
            // Drop every inherited vector and churn: the parent must not see any of it.
            drop(std::mem::take(&mut parents));
            for round in 0..3 {
                let mut mine = make(20_000);
                for v in &mut mine {
                    v.iter_mut().for_each(|x| *x = !*x ^ round);
                    v.push(round);
                    v.shrink_to_fit();
                }
            }
            0
        });
        // The parent churns while the child waits: frees half of the vectors the child still
        // holds (their space must not be handed out again: the child reads it), makes new
        // ones, writes.
        let mut still_mine = Vec::new();
        for &i in &kept {
            let v = std::mem::replace(&mut parents[i], MmapVec::new_in(alloc.clone()));
            if i % 4 == 0 {
                drop(v);
            } else {
                still_mine.push((i, v));
            }
        }
        for round in 0..3u32 {
            let mut fresh = make(20_000);
            for v in &mut fresh {
                v.iter_mut().for_each(|x| *x = !*x ^ round);
                v.push(round);
            }
        }
        send(&go_w, b"g");
        let status = wait(pid);
        assert!(
            exited_ok(status),
            "dont_fork {dont_fork}: the child {}",
            describe(status)
        );
        // The parent's vectors are intact after the child's churn.
        for (i, v) in &still_mine {
            assert!(
                v.iter().enumerate().all(|(j, &x)| x == pattern(*i, j)),
                "dont_fork {dont_fork}: parent's vector {i} changed by the child"
            );
        }
        // And the parent keeps using them: grow, shrink, free.
        for (i, v) in &mut still_mine {
            v.extend(0..100);
            v.truncate(1);
            v.shrink_to_fit();
            assert_eq!(v[0], pattern(*i, 0));
        }
        drop((parents, still_mine));
        assert_eq!(alloc.stats().small.in_use_bytes, 0);
        drop(alloc);
        assert!(files_under(dir.path()).is_empty());
    }
}

/// With `dont_fork(true)` a child's inherited small blocks are not mapped; shrinking one (to
/// another size class) and dropping it must not touch it. Before the fix the shrink copied the
/// kept elements out of the inaccessible range and the child died of `SIGSEGV`.
#[test]
fn dont_fork_child_may_shrink_an_inherited_small_vector() {
    const NAME: &str = "small_blocks::dont_fork_child_may_shrink_an_inherited_small_vector";
    if !in_child(NAME, "dont-fork") {
        return;
    }
    let dir = TestDir::new("small-dont-fork-shrink");
    let alloc = MmapAllocator::builder()
        .dir(dir.path())
        .dont_fork(true)
        .build()
        .expect("build");
    let mut v: MmapVec<u8> = MmapVec::with_capacity_in(4000, alloc.clone());
    v.extend(std::iter::repeat_n(7u8, 4000));
    let pid = fork_with(move || {
        v.truncate(10);
        v.shrink_to_fit();
        drop(v);
        0
    });
    let status = wait(pid);
    assert!(exited_ok(status), "the child {}", describe(status));
}
