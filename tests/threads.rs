//! One allocator shared by several threads (through clones, `&` references and an `Arc`),
//! vectors moved between threads, and the books balanced at the end: no live segment, no file.

mod core_support;

use std::sync::mpsc;
use std::sync::{Arc, Barrier};
use std::thread;

use core_support::TestDir;
use mmapvec::allocator_api2::vec::Vec as ApiVec;
use mmapvec::{MmapAllocator, MmapVec};

const THREADS: usize = 4;
const ROUNDS: usize = 40;

/// A small deterministic generator, one per thread (no shared state, no dependency).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// What one thread does: keeps a few vectors alive at once, grows, shrinks and drops them at
/// random, and checks each one's contents against what it wrote.
fn churn<A: mmapvec::allocator_api2::alloc::Allocator + Clone>(alloc: A, seed: u64) {
    let mut rng = Rng(seed | 1);
    let mut live: Vec<(u64, ApiVec<u64, A>)> = Vec::new();
    for round in 0..ROUNDS {
        match rng.below(4) {
            0 | 1 => {
                let tag = seed << 32 | round as u64;
                let mut v = ApiVec::new_in(alloc.clone());
                let n = rng.below(20_000) + 1;
                v.extend((0..n).map(|i| tag ^ i));
                live.push((tag, v));
            }
            2 if !live.is_empty() => {
                let i = rng.below(live.len() as u64) as usize;
                let (tag, v) = &mut live[i];
                let old = v.len() as u64;
                let more = rng.below(100_000);
                v.extend((old..old + more).map(|i| *tag ^ i));
                let keep = rng.below(v.len() as u64 + 1) as usize;
                v.truncate(keep);
                v.shrink_to_fit();
            }
            _ if !live.is_empty() => {
                let i = rng.below(live.len() as u64) as usize;
                drop(live.swap_remove(i));
            }
            _ => {}
        }
        for (tag, v) in &live {
            assert!(
                v.iter().enumerate().all(|(i, &x)| x == tag ^ i as u64),
                "vector {tag:#x}"
            );
        }
    }
}

fn assert_all_freed(dir: &TestDir, alloc: &MmapAllocator) {
    let s = alloc.stats();
    assert_eq!(s.live_segments, 0, "{s:?}");
    assert_eq!(s.mapped_bytes, 0, "{s:?}");
    assert_eq!(s.failures.total(), 0, "{s:?}");
    assert!(s.creates > 0);
    assert!(dir.files().is_empty(), "files left: {:?}", dir.files());
    // What stays is kept for reuse: a mapping and a descriptor each.
    let kept = s.kept_segments as usize;
    assert!(kept <= 32, "{s:?}");
    // And the small-block tier's chunks still mapped, all empty: those kept for the next
    // blocks, plus each thread's current chunk per size class it used.
    assert_eq!(s.small.in_use_bytes, 0, "{s:?}");
    assert_eq!(s.small.free_bytes, s.small.arena_bytes, "{s:?}");
    let chunks = (s.small.mapped_bytes >> 22) as usize;
    assert_eq!(
        core_support::mappings_under(&dir.segment_folder()).len(),
        kept + chunks
    );
    assert_eq!(core_support::descriptors_under(&dir.segment_folder()), kept);
}

#[test]
fn threads_share_clones() {
    let dir = TestDir::new("threads-clones");
    let alloc = dir.allocator();
    let start = Arc::new(Barrier::new(THREADS));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let alloc = alloc.clone();
            let start = start.clone();
            thread::spawn(move || {
                start.wait();
                churn(alloc, 0x9E37_79B9 + t as u64);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("worker thread");
    }
    assert_all_freed(&dir, &alloc);
}

#[test]
fn threads_share_references() {
    let dir = TestDir::new("threads-refs");
    let alloc = dir.allocator();
    // `&MmapAllocator` is an allocator too: borrowed by scoped threads...
    let start = Barrier::new(THREADS);
    thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let (alloc, start) = (&alloc, &start);
                s.spawn(move || {
                    start.wait();
                    churn(alloc, 0x5151 + t as u64);
                })
            })
            .collect();
        // Joined by hand: the end of the scope waits only for the closures, not for the
        // threads' exit, where their caches and slots give back what they hold.
        for h in handles {
            h.join().expect("worker thread");
        }
    });
    assert_all_freed(&dir, &alloc);

    // ...and borrowed from an `Arc` in each thread.
    let shared = Arc::new(alloc.clone());
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let shared = shared.clone();
            thread::spawn(move || churn(&*shared, 0xABCD + t as u64))
        })
        .collect();
    for h in handles {
        h.join().expect("worker thread");
    }
    assert_all_freed(&dir, &alloc);
}

#[test]
fn vectors_move_between_threads() {
    let dir = TestDir::new("threads-move");
    let alloc = dir.allocator();
    let (to_worker, from_main) = mpsc::channel::<MmapVec<u32>>();
    let (to_main, from_worker) = mpsc::channel::<MmapVec<u32>>();
    let worker = thread::spawn(move || {
        for mut v in from_main {
            // Check, grow here (the segment was made on the other thread), send back.
            assert!(v.iter().copied().eq(0..v.len() as u32));
            let n = v.len() as u32;
            v.extend(n..n + 50_000);
            to_main.send(v).expect("main is listening");
        }
    });
    for n in [1u32, 1000, 100_000] {
        let mut v = MmapVec::new_in(alloc.clone());
        v.extend(0..n);
        to_worker.send(v).expect("worker is listening");
        let v = from_worker.recv().expect("worker answers");
        assert!(v.iter().copied().eq(0..n + 50_000));
        // A segment past the small-block tier's 64 KiB, else a block of the tier.
        let segments = u64::from(v.capacity() * 4 > 64 << 10);
        assert_eq!(alloc.stats().live_segments, segments);
        // Dropped here, on the main thread.
    }
    assert_eq!(alloc.stats().live_segments, 0);

    // Made here, dropped there.
    let v: MmapVec<u32> = mmapvec::mmap_vec![in alloc.clone(); 7; 10_000];
    let dropper = thread::spawn(move || {
        assert_eq!(v.iter().map(|&x| u64::from(x)).sum::<u64>(), 70_000);
        drop(v);
    });
    dropper.join().expect("dropper thread");
    drop(to_worker);
    worker.join().expect("worker thread");
    assert_all_freed(&dir, &alloc);
}
