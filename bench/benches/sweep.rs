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
//! | `mixed_request_loop` | requests of 30 vectors of 1 to 2,000 B (built, filled, kept, dropped) on each of 1 or 4 threads | `std`, `mmapvec` × `1_thread`, `4_threads` |
//! | `mixed_many_classes` | per thread 4 live blocks of each of 40 sizes from 16 B to 64 KiB; each op frees one and allocates it again | `global`, `mmapvec` × `1_thread`, `4_threads` |
//! | `sweep_mixed_sizes` | build n live vectors of 1 B to 64 KiB (log-uniform) in an outer vector, drop | `std`, `mmapvec` |
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
//! glibc). `cargo bench -p mmapvec-bench --bench sweep -- user_` runs them alone.
//!
//! The `mixed` groups are small vectors and blocks of many sizes at once, as a server's requests
//! make them. Every earlier row used one size at a time, and none showed the small-block tier
//! making and releasing 4 MiB chunk files hundreds of times a second under such a mix. Sizes
//! come from a xorshift sequence (`benches/common/mixed.rs`) that every contender replays the
//! same.
//! `cargo bench -p mmapvec-bench --bench sweep -- mixed` runs them alone;
//! `benches/footprint.rs` measures the disk the same workloads take.
//!
//! Run with `cargo bench -p mmapvec-bench --bench sweep` (about 5 minutes, see `budget`);
//! `MMAPVEC_BENCH_QUICK=1` drops the largest sizes and measures briefly.
//! `scripts/bench-report --only sweep` runs it and writes the sweep's tables, targets and
//! `docs/sweep.svg`.
//!
//! mmap-vec 0.2 builds a slice from a null pointer, which aborts in debug builds, so it is only
//! measured when debug assertions are off (`cargo bench` builds in release).

use std::hint::black_box;
use std::ptr::NonNull;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput};
use mmapvec::allocator_api2::alloc::{Allocator, Global, Layout};
use mmapvec::{MmapAllocator, MmapVec};

#[path = "common/mixed.rs"]
mod mixed;
#[path = "common/old_crate.rs"]
mod old_crate;
use mixed::{REQUEST_VECS, XorShift};
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
/// A built allocator made to live as long as the process (`MmapAllocator::leak`): its clones
/// count nothing, so threads that clone it for every vector share no counter.
const MMAPVEC_LEAKED: &str = "mmapvec_leaked";

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

/// Wall time for `threads` threads, each running `work(thread index)` (its own clone of `work`),
/// all started together. Thread start-up is not timed.
fn time_on_threads<W>(threads: usize, work: W) -> Duration
where
    W: Fn(u64) + Clone + Send + 'static,
{
    let start = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads as u64)
        .map(|thread| {
            let work = work.clone();
            let start = Arc::clone(&start);
            std::thread::spawn(move || {
                start.wait();
                work(thread);
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

/// Wall time for `threads` threads, each doing `iters × THREAD_OPS` allocate + write + free of
/// `layout` on its own clone of `alloc`, all started together. Thread start-up is not timed.
fn time_threads<A>(alloc: &A, layout: Layout, threads: usize, iters: u64) -> Duration
where
    A: Allocator + Clone + Send + 'static,
{
    let alloc = alloc.clone();
    time_on_threads(threads, move |_| {
        for _ in 0..iters * THREAD_OPS {
            allocate_write_free(&alloc, layout);
        }
    })
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

/// The thread counts of the `mixed` groups, with their labels.
const MIXED_THREADS: [(&str, usize); 2] = [("1_thread", 1), ("4_threads", 4)];

/// `len` bytes of `byte` in a `std` vector made with capacity `len`.
fn std_bytes(len: usize, byte: u8) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    v.resize(len, byte);
    v
}

/// `len` bytes of `byte` in an `MmapVec` made with capacity `len` on a clone of `alloc`.
fn mmap_bytes(alloc: &MmapAllocator, len: usize, byte: u8) -> MmapVec<u8> {
    let mut v = MmapVec::with_capacity_in(len, alloc.clone());
    v.resize(len, byte);
    v
}

/// Wall time for `threads` threads each serving `iters` requests (`mixed::request`), each
/// vector made by `make`; thread `t` draws its sizes from `XorShift::new(t)`.
fn time_requests<V, F>(threads: usize, iters: u64, make: F) -> Duration
where
    F: Fn(usize, u8) -> V + Clone + Send + 'static,
{
    time_on_threads(threads, move |thread| {
        let mut rng = XorShift::new(thread);
        let mut held = Vec::with_capacity(REQUEST_VECS);
        for _ in 0..iters {
            mixed::request(&mut rng, &mut held, &make);
        }
    })
}

/// A server's request loop: each request builds 30 `u8` vectors of 1 to 2,000 bytes (each
/// `with_capacity` its length, then filled by `resize`), keeps them in a small `std` vector,
/// then drops them all. One iteration is one request per thread; on 4 threads each thread
/// serves its own requests on clones of the one allocator. Throughput in requests.
fn mixed_request_loop(c: &mut Criterion) {
    let alloc = allocator();
    let leaked = allocator().leak();
    let mut group = c.benchmark_group("mixed_request_loop");
    // Heavy: a request is about a microsecond with `std`, but can be milliseconds when every
    // few vectors make or release a chunk file.
    budget(&mut group, true);
    for (label, threads) in MIXED_THREADS {
        group.throughput(Throughput::Elements(threads as u64));
        group.bench_function(BenchmarkId::new(STD, label), |b| {
            b.iter_custom(|iters| time_requests(threads, iters, std_bytes))
        });
        group.bench_function(BenchmarkId::new(MMAPVEC, label), |b| {
            b.iter_custom(|iters| {
                let alloc = alloc.clone();
                time_requests(threads, iters, move |len, byte| {
                    mmap_bytes(&alloc, len, byte)
                })
            })
        });
        group.bench_function(BenchmarkId::new(MMAPVEC_LEAKED, label), |b| {
            b.iter_custom(|iters| {
                let alloc = leaked.clone();
                time_requests(threads, iters, move |len, byte| {
                    mmap_bytes(&alloc, len, byte)
                })
            })
        });
    }
    group.finish();
}

/// Sizes in `mixed_many_classes`.
const CLASS_SIZES: usize = 40;
/// Live blocks per size in `mixed_many_classes`.
const CLASS_SLOTS: usize = 4;
/// Operations per thread and criterion iteration in `mixed_many_classes`: a long loop, as the
/// issue's was. Each sample runs on threads of its own, so with a short one the row would time
/// mostly each new thread's first blocks (its cache, its shard's chunks) and its exit.
const CLASS_OPS: u64 = 20_000;

/// The block size of each slot row: 40 sizes from 16 B to 64 KiB (the default small-block
/// threshold), in equal ratios.
fn class_sizes() -> [usize; CLASS_SIZES] {
    let last = (CLASS_SIZES - 1) as f64;
    std::array::from_fn(|i| (16.0 * 4096f64.powf(i as f64 / last)).round() as usize)
}

/// `ops` times: pick a random slot of a table of `CLASS_SLOTS` per size, free the block in it
/// (if any), allocate a new block of the slot's size into it and write its first byte. At most
/// 160 blocks are live at once, of every size. The blocks left at the end are freed.
fn churn_classes(alloc: &impl Allocator, seed: u64, ops: u64) {
    let sizes = class_sizes();
    let layout =
        |slot: usize| Layout::from_size_align(sizes[slot / CLASS_SLOTS], 8).expect("layout");
    let mut slots: Vec<Option<NonNull<u8>>> = vec![None; CLASS_SIZES * CLASS_SLOTS];
    let mut rng = XorShift::new(seed);
    for _ in 0..ops {
        let slot = rng.below(slots.len());
        if let Some(ptr) = slots[slot].take() {
            // SAFETY: the slot's block was allocated below by `alloc` with `layout(slot)`, and
            // taking it out of the slot leaves no other reference to it.
            unsafe { alloc.deallocate(ptr, layout(slot)) };
        }
        let ptr = alloc
            .allocate(layout(slot))
            .expect("allocation")
            .cast::<u8>();
        // SAFETY: the block is at least 16 bytes, valid for writes, and ours alone.
        unsafe { ptr.as_ptr().write_volatile(1) };
        slots[slot] = Some(ptr);
    }
    for (slot, ptr) in slots.into_iter().enumerate() {
        if let Some(ptr) = ptr {
            // SAFETY: as above: allocated by `alloc` with `layout(slot)`, freed once.
            unsafe { alloc.deallocate(ptr, layout(slot)) };
        }
    }
}

/// A few live blocks of many size classes at once, raw `allocate` / `deallocate` on the
/// concrete allocator: each thread runs `churn_classes` on its own table (`CLASS_OPS`
/// operations per iteration; the table starts empty at each sample, and fills within its
/// first few hundred operations). Throughput in operations.
fn mixed_many_classes(c: &mut Criterion) {
    let alloc = allocator();
    let mut group = c.benchmark_group("mixed_many_classes");
    budget(&mut group, true);
    for (label, threads) in MIXED_THREADS {
        group.throughput(Throughput::Elements(CLASS_OPS * threads as u64));
        group.bench_function(BenchmarkId::new(GLOBAL, label), |b| {
            b.iter_custom(|iters| {
                time_on_threads(threads, move |thread| {
                    churn_classes(&Global, thread, iters * CLASS_OPS)
                })
            })
        });
        group.bench_function(BenchmarkId::new(MMAPVEC, label), |b| {
            b.iter_custom(|iters| {
                let alloc = alloc.clone();
                time_on_threads(threads, move |thread| {
                    churn_classes(&alloc, thread, iters * CLASS_OPS)
                })
            })
        });
    }
    group.finish();
}

/// The largest vector in `sweep_mixed_sizes`, exclusive.
const MIXED_MAX_BYTES: usize = 64 * KIB;

/// A size in `1..MIXED_MAX_BYTES`, log-uniform: a power of two `2^e` (`e` uniform in 0..16),
/// then uniform in `2^e..2^(e+1)`. So every size class gets about as many vectors, small ones
/// most numerous, and the mean is about 6 KiB (uniform sizes would average 32 KiB, 3.2 GB live
/// at n = 1e5, nearly all in the largest classes).
fn log_uniform_size(rng: &mut XorShift) -> usize {
    let e = rng.below(MIXED_MAX_BYTES.ilog2() as usize);
    (1 << e) + rng.below(1 << e)
}

/// Build `n` live `u8` vectors of mixed sizes (`log_uniform_size`; each `with_capacity` its
/// length, then filled by `resize`) in an outer `std` vector made `with_capacity(n)`, then drop
/// them all. Every iteration and contender builds the same sizes.
fn sweep_mixed_sizes(c: &mut Criterion) {
    let alloc = allocator();
    let mut group = c.benchmark_group("sweep_mixed_sizes");
    for &n in sizes(&[1_000, 10_000, 100_000]) {
        let label = count_label(n);
        budget(&mut group, true);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new(STD, &label), |b| {
            b.iter(|| {
                let mut rng = XorShift::new(n as u64);
                let mut outer = Vec::with_capacity(n);
                for _ in 0..n {
                    let len = log_uniform_size(&mut rng);
                    outer.push(std_bytes(len, len as u8));
                }
                black_box(&outer);
            })
        });
        group.bench_function(BenchmarkId::new(MMAPVEC, &label), |b| {
            b.iter(|| {
                let mut rng = XorShift::new(n as u64);
                let mut outer = Vec::with_capacity(n);
                for _ in 0..n {
                    let len = log_uniform_size(&mut rng);
                    outer.push(mmap_bytes(&alloc, len, len as u8));
                }
                black_box(&outer);
            })
        });
    }
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
    mixed_request_loop(&mut c);
    mixed_many_classes(&mut c);
    sweep_mixed_sizes(&mut c);
    c.final_summary();
}
