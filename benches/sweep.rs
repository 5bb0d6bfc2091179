//! Issue 9's sweep: every workload across sizes, "create, work, drop; repeated", each size's
//! contenders measured side by side in the same run.
//!
//! | group | work | contenders |
//! |---|---|---|
//! | `sweep_push` | new vector, `push` n `u64` one by one, drop | `std`, `mmapvec`, `mmap-vec-0.2` |
//! | `sweep_hashbrown_insert` | new `HashMap<u64, u64>`, insert n keys, drop | `global`, `mmapvec` |
//! | `sweep_alloc_free` | `allocate` + write one byte + `deallocate` | `malloc`, `mmapvec` |
//! | `sweep_small_threads` | K × (allocate 64 B + write + free) on each of 1 or 2 threads | `{mmapvec,malloc}_{1_thread,2_threads}` |
//! | `sweep_many_small` | build n live vectors of 8 `u32` in an outer vector, drop | `std`, `mmapvec` |
//! | `user_alloc_free` | issue 12's loop: `allocate` + `write(1)` + `deallocate`, concrete types | `libc_malloc`, `malloc`, `mmapvec` |
//! | `user_push100` | issue 12's loop: `new_in`, push 100 `u64`, drop | `std`, `mmapvec`, `mmapvec_default` |
//!
//! `mmapvec` is one allocator per group, built once with `MmapAllocator::builder().build()`
//! (the defaults: small-block tier up to 256 KiB, 256 MiB of large segments kept for reuse),
//! outside the timing loop, as a user would keep one. `malloc` and `global` are allocator-api2's
//! `Global`, i.e. Rust's `System` allocator: glibc `malloc` here. `libc_malloc` calls
//! `libc::malloc` and `libc::free` directly, as issue 12's user did; `mmapvec_default` takes
//! `MmapAllocator::default()` for each vector instead of cloning the built one.
//!
//! The `user_` groups are issue 12's loops as a user writes them: methods called on the concrete
//! allocator (no generic helper), a plain `write`, and `black_box` on what goes in and comes out
//! so that neither the allocation nor the size is folded away: without it LLVM deletes
//! `malloc` + write + `free` as dead code, and the loop times nothing (issue 12's 1.3 ns for
//! glibc). `cargo bench --bench sweep -- user_` runs them alone.
//!
//! Run with `cargo bench --bench sweep` (about 5 minutes, see `budget`); `MMAPVEC_BENCH_QUICK=1` drops
//! the largest sizes and measures briefly. `scripts/bench-report --only sweep` runs it and
//! writes the sweep's tables, targets and `docs/sweep.svg`.
//!
//! mmap-vec 0.2 builds a slice from a null pointer, which aborts in debug builds, so it is only
//! measured when debug assertions are off (`cargo bench` builds in release).

use std::hint::black_box;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput};
use mmapvec::allocator_api2::alloc::{Allocator, Global, Layout};
use mmapvec::{MmapAllocator, MmapVec};

#[path = "common/old_crate.rs"]
mod old_crate;
use old_crate::{Cleanup, OldVec};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;

/// Whether mmap-vec 0.2 can run in this build (see the module docs).
const OLD_CRATE: bool = !cfg!(debug_assertions);

/// Contender names, shared with `scripts/bench-report`.
const MMAPVEC: &str = "mmapvec";
const STD: &str = "std";
const OLD: &str = "mmap-vec-0.2";
const GLOBAL: &str = "global";
const MALLOC: &str = "malloc";
const LIBC_MALLOC: &str = "libc_malloc";
const MMAPVEC_DEFAULT: &str = "mmapvec_default";

fn quick() -> bool {
    std::env::var("MMAPVEC_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// The sizes of a row: all of them, or in quick mode all but the largest.
fn sizes(all: &[usize]) -> &[usize] {
    if quick() { &all[..all.len() - 1] } else { all }
}

/// Sets measurement time and sampling for the benchmarks that follow in `group` (criterion
/// reads the group's settings at each `bench_function`, so a group may change them by size).
/// `heavy`: milliseconds to a second per iteration; flat sampling (the same iteration count in
/// every sample) bounds them. With these budgets the full sweep should take about 5 minutes
/// here, build not included.
fn budget(group: &mut BenchmarkGroup<'_, WallTime>, heavy: bool) {
    let (warm_up, measure, samples) = match (quick(), heavy) {
        (true, _) => (Duration::from_millis(100), Duration::from_millis(400), 10),
        (false, true) => (Duration::from_millis(500), Duration::from_secs(4), 20),
        (false, false) => (Duration::from_millis(500), Duration::from_secs(3), 30),
    };
    group
        .warm_up_time(warm_up)
        .measurement_time(measure)
        .sample_size(samples)
        .sampling_mode(if heavy {
            SamplingMode::Flat
        } else {
            SamplingMode::Auto
        });
}

/// `1e6`- and `5e6`-style labels for element counts.
fn count_label(n: usize) -> String {
    let exp = n.ilog10();
    let unit = 10usize.pow(exp);
    if n.is_multiple_of(unit) {
        format!("{}e{exp}", n / unit)
    } else {
        n.to_string()
    }
}

fn bytes_label(n: usize) -> String {
    match n {
        n if n >= MIB && n.is_multiple_of(MIB) => format!("{}MiB", n / MIB),
        n if n >= KIB && n.is_multiple_of(KIB) => format!("{}KiB", n / KIB),
        n => format!("{n}B"),
    }
}

/// A distinct, well-spread key for each index (multiplication by an odd constant is a
/// bijection on `u64`).
fn key(i: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn allocator() -> MmapAllocator {
    MmapAllocator::builder()
        .build()
        .expect("allocator in the temp directory")
}

/// Create a vector, push `n` u64 one by one, drop it.
fn push(c: &mut Criterion) {
    let alloc = allocator();
    let mut group = c.benchmark_group("sweep_push");
    let all = [
        100,
        1_000,
        10_000,
        100_000,
        1_000_000,
        10_000_000,
        100_000_000,
    ];
    for &n in sizes(&all) {
        let label = count_label(n);
        budget(&mut group, n >= 1_000_000);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_with_input(BenchmarkId::new(STD, &label), &n, |b, &n| {
            b.iter(|| {
                let mut v = Vec::new();
                for i in 0..n as u64 {
                    v.push(i);
                }
                black_box(&v);
            })
        });
        group.bench_with_input(BenchmarkId::new(MMAPVEC, &label), &n, |b, &n| {
            b.iter(|| {
                let mut v = MmapVec::new_in(alloc.clone());
                for i in 0..n as u64 {
                    v.push(i);
                }
                black_box(&v);
            })
        });
        // mmap-vec 0.2 up to 1e7 only. It is not too slow at 1e8 (the `push` group of
        // `benches/compare.rs` measures it there: about 0.8x std in docs/benchmarks.md), so it is
        // left out of this row only to keep the sweep's time down; at every size up to 1e7 it
        // stays cheap enough to measure (one file per vector, a few per iteration).
        if OLD_CRATE && n <= 10_000_000 {
            group.bench_with_input(BenchmarkId::new(OLD, &label), &n, |b, &n| {
                b.iter(|| {
                    let mut v = OldVec::new();
                    for i in 0..n as u64 {
                        v.push(i).expect("mmap-vec 0.2 push");
                    }
                    black_box(&v);
                })
            });
        }
    }
    group.finish();
}

fn insert_all<S, A>(map: &mut hashbrown::HashMap<u64, u64, S, A>, n: usize)
where
    S: std::hash::BuildHasher,
    A: Allocator,
{
    for i in 0..n as u64 {
        map.insert(key(i), i);
    }
}

/// New `hashbrown::HashMap<u64, u64>`, insert `n` keys, drop it.
fn hashbrown_insert(c: &mut Criterion) {
    use hashbrown::HashMap;
    let alloc = allocator();
    let mut group = c.benchmark_group("sweep_hashbrown_insert");
    for &n in sizes(&[1_000, 10_000, 100_000, 1_000_000, 5_000_000]) {
        let label = count_label(n);
        budget(&mut group, n >= 1_000_000);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new(GLOBAL, &label), |b| {
            b.iter(|| {
                let mut map = HashMap::new();
                insert_all(&mut map, n);
                black_box(&map);
            })
        });
        group.bench_function(BenchmarkId::new(MMAPVEC, &label), |b| {
            b.iter(|| {
                let mut map = HashMap::new_in(alloc.clone());
                insert_all(&mut map, n);
                black_box(&map);
            })
        });
    }
    group.finish();
}

/// `allocate`, write the first byte, `deallocate`.
fn allocate_write_free(alloc: &impl Allocator, layout: Layout) {
    let block = alloc.allocate(layout).expect("allocation");
    let ptr = block.cast::<u8>();
    // SAFETY: `block` is at least `layout.size()` ≥ 1 bytes, valid for writes, and ours alone.
    unsafe { ptr.as_ptr().write_volatile(1) };
    // SAFETY: `block` was just allocated by `alloc` with `layout` and nothing else refers to it.
    unsafe { alloc.deallocate(ptr, layout) };
}

/// `allocate` + write one byte + `deallocate`, by size, through the `Allocator` trait.
fn alloc_free(c: &mut Criterion) {
    let alloc = allocator();
    let mut group = c.benchmark_group("sweep_alloc_free");
    budget(&mut group, false);
    for size in [64, 4 * KIB, MIB] {
        let label = bytes_label(size);
        let layout = Layout::from_size_align(size, 8).expect("layout");
        group.bench_function(BenchmarkId::new(MALLOC, &label), |b| {
            b.iter(|| allocate_write_free(&Global, layout))
        });
        group.bench_function(BenchmarkId::new(MMAPVEC, &label), |b| {
            b.iter(|| allocate_write_free(&alloc, layout))
        });
    }
    group.finish();
}

/// Small-block operations per thread and criterion iteration in `sweep_small_threads`.
const THREAD_OPS: u64 = 100_000;

/// Wall time for `threads` threads, each doing `iters × THREAD_OPS` allocate + write + free of
/// `layout` on its own clone of `alloc`, all started together. Thread start-up is not timed.
fn time_threads<A>(alloc: &A, layout: Layout, threads: usize, iters: u64) -> Duration
where
    A: Allocator + Clone + Send + 'static,
{
    let start = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let alloc = alloc.clone();
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..iters * THREAD_OPS {
                    allocate_write_free(&alloc, layout);
                }
            })
        })
        .collect();
    start.wait();
    let t0 = Instant::now();
    for worker in workers {
        worker.join().expect("benchmark thread");
    }
    t0.elapsed()
}

/// Small-block throughput on 1 and 2 threads sharing one allocator: each thread does the same
/// fixed work (`THREAD_OPS` allocate 64 B + write + free per iteration), so the time per
/// iteration is the time for that work, and 2 threads scale perfectly when they take the time
/// of 1. Throughput ratio = (2 × K / t2) / (K / t1) = 2 × t1 / t2 (the report computes it;
/// target ≥ 1.6). On a 2-core machine shared with other jobs, this row is only as good as the
/// second core is idle.
fn small_threads(c: &mut Criterion) {
    let alloc = allocator();
    let layout = Layout::from_size_align(64, 8).expect("layout");
    let label = bytes_label(layout.size());
    let mut group = c.benchmark_group("sweep_small_threads");
    // Heavy: 2 threads that serialize take many times 1 thread's time per iteration.
    budget(&mut group, true);
    for (name, threads) in [("1_thread", 1), ("2_threads", 2)] {
        group.bench_function(BenchmarkId::new(format!("{MALLOC}_{name}"), &label), |b| {
            b.iter_custom(|iters| time_threads(&Global, layout, threads, iters))
        });
        group.bench_function(BenchmarkId::new(format!("{MMAPVEC}_{name}"), &label), |b| {
            b.iter_custom(|iters| time_threads(&alloc, layout, threads, iters))
        });
    }
    group.finish();
}

/// Inner vectors' length in `sweep_many_small`.
const SMALL_LEN: usize = 8;

/// Build `n` live vectors of 8 `u32` (each made with capacity 8 and filled), held in an outer
/// vector made with capacity `n`, then drop them all: `MmapVec<MmapVec<u32>>` against
/// `Vec<Vec<u32>>`.
fn many_small(c: &mut Criterion) {
    let alloc = allocator();
    let n = if quick() { 100_000 } else { 1_000_000 };
    let label = count_label(n);
    let mut group = c.benchmark_group("sweep_many_small");
    budget(&mut group, true);
    group.throughput(Throughput::Elements(n as u64));
    group.bench_function(BenchmarkId::new(STD, &label), |b| {
        b.iter(|| {
            let mut outer = Vec::with_capacity(n);
            for i in 0..n as u32 {
                let mut inner = Vec::with_capacity(SMALL_LEN);
                inner.extend(i..i + SMALL_LEN as u32);
                outer.push(inner);
            }
            black_box(&outer);
        })
    });
    group.bench_function(BenchmarkId::new(MMAPVEC, &label), |b| {
        b.iter(|| {
            let mut outer = MmapVec::with_capacity_in(n, alloc.clone());
            for i in 0..n as u32 {
                let mut inner = MmapVec::with_capacity_in(SMALL_LEN, alloc.clone());
                inner.extend(i..i + SMALL_LEN as u32);
                outer.push(inner);
            }
            black_box(&outer);
        })
    });
    group.finish();
}

/// Issue 12's allocate + write + free: the loop a user writes on a built allocator, with
/// `libc::malloc` and allocator-api2's `Global` beside it. 1 MiB is a reuse-cache hit for
/// `mmapvec` after the first round.
fn user_alloc_free(c: &mut Criterion) {
    let alloc = allocator();
    let mut group = c.benchmark_group("user_alloc_free");
    budget(&mut group, false);
    for size in [64, 4 * KIB, MIB] {
        let label = bytes_label(size);
        let layout = Layout::from_size_align(size, 8).expect("layout");
        group.bench_function(BenchmarkId::new(LIBC_MALLOC, &label), |b| {
            b.iter(|| {
                // SAFETY: `malloc` takes any size; a null result is checked before the write.
                let ptr = unsafe { libc::malloc(black_box(size)) }.cast::<u8>();
                assert!(!ptr.is_null(), "malloc failed");
                // SAFETY: 1. `ptr` is `size` ≥ 1 bytes from `malloc`, ours alone;
                // 2. it is freed once, by the `free` that pairs with that `malloc`.
                unsafe {
                    ptr.write(1);
                    libc::free(black_box(ptr).cast());
                }
            })
        });
        group.bench_function(BenchmarkId::new(MALLOC, &label), |b| {
            b.iter(|| {
                let block = Global.allocate(black_box(layout)).expect("allocation");
                let ptr = block.cast::<u8>();
                // SAFETY: 1. `block` is at least `layout.size()` ≥ 1 bytes, ours alone;
                // 2. it was allocated by `Global` with `layout` and is freed once.
                unsafe {
                    ptr.as_ptr().write(1);
                    Global.deallocate(black_box(ptr), layout);
                }
            })
        });
        group.bench_function(BenchmarkId::new(MMAPVEC, &label), |b| {
            b.iter(|| {
                let block = alloc.allocate(black_box(layout)).expect("allocation");
                let ptr = block.cast::<u8>();
                // SAFETY: 1. `block` is at least `layout.size()` ≥ 1 bytes, ours alone;
                // 2. it was allocated by `alloc` with `layout` and is freed once.
                unsafe {
                    ptr.as_ptr().write(1);
                    alloc.deallocate(black_box(ptr), layout);
                }
            })
        });
    }
    group.finish();
}

/// Elements pushed per vector in `user_push100`.
const USER_PUSHES: u64 = 100;

/// Issue 12's vector loop: a new vector, 100 `u64` pushed one by one, dropped. `mmapvec` clones
/// the built allocator into each vector; `mmapvec_default` takes `MmapAllocator::default()`.
fn user_push100(c: &mut Criterion) {
    let alloc = allocator();
    let mut group = c.benchmark_group("user_push100");
    budget(&mut group, false);
    group.throughput(Throughput::Elements(USER_PUSHES));
    group.bench_function(STD, |b| {
        b.iter(|| {
            let mut v = Vec::<u64>::new();
            for i in 0..black_box(USER_PUSHES) {
                v.push(i);
            }
            black_box(&v);
        })
    });
    group.bench_function(MMAPVEC, |b| {
        b.iter(|| {
            let mut v = MmapVec::<u64>::new_in(alloc.clone());
            for i in 0..black_box(USER_PUSHES) {
                v.push(i);
            }
            black_box(&v);
        })
    });
    group.bench_function(MMAPVEC_DEFAULT, |b| {
        b.iter(|| {
            let mut v = MmapVec::<u64>::new_in(MmapAllocator::default());
            for i in 0..black_box(USER_PUSHES) {
                v.push(i);
            }
            black_box(&v);
        })
    });
    group.finish();
}

fn main() {
    let _cleanup = Cleanup;
    if !OLD_CRATE {
        eprintln!("debug assertions are on: mmap-vec 0.2 is skipped (it aborts in debug builds)");
    }
    let mut c = Criterion::default().configure_from_args();
    push(&mut c);
    hashbrown_insert(&mut c);
    alloc_free(&mut c);
    small_threads(&mut c);
    many_small(&mut c);
    user_alloc_free(&mut c);
    user_push100(&mut c);
    c.final_summary();
}
