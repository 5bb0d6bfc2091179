//! Side-by-side benchmarks: `MmapVec` against `std::vec::Vec` and the older crate mmap-vec 0.2,
//! hashbrown on `MmapAllocator` against the heap, and raw `allocate` + `deallocate` latency.
//!
//! Every group runs its contenders in the same process, one after the other, so their ratios
//! are comparable even on a noisy machine. Run with
//! `cargo bench -p mmapvec-bench --bench compare`; `MMAPVEC_BENCH_QUICK=1` runs only the
//! smallest sizes with short measurements. `scripts/bench-report` turns the results into
//! `docs/benchmarks.md`.
//!
//! mmap-vec 0.2 builds a slice from a null pointer, which aborts in debug builds, so it is only
//! measured when debug assertions are off (`cargo bench` builds in release).

use std::cell::OnceCell;
use std::hint::black_box;
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
const GIB: usize = 1 << 30;

/// Whether mmap-vec 0.2 can run in this build (see the module docs).
const OLD_CRATE: bool = !cfg!(debug_assertions);

/// Contender names, shared with `scripts/bench-report`.
const MMAPVEC: &str = "mmapvec";
const MMAPVEC_WITH_CAPACITY: &str = "mmapvec_with_capacity";
const STD: &str = "std";
const OLD: &str = "mmap-vec-0.2";
const MEMCPY: &str = "memcpy";
const GLOBAL: &str = "global";
const GLOBAL_WITH_CAPACITY: &str = "global_with_capacity";

fn quick() -> bool {
    std::env::var("MMAPVEC_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// Picks the sizes of a group: the first one only in quick mode.
fn sizes(all: &[usize]) -> &[usize] {
    if quick() { &all[..1] } else { all }
}

/// Sets measurement time and sampling. `heavy` groups take up to seconds per iteration at
/// their largest size: flat sampling (the same iteration count in every sample) with 20 samples
/// keeps them bounded; criterion picks the count from the warm-up, setup time included.
fn budget(group: &mut BenchmarkGroup<'_, WallTime>, heavy: bool) {
    let (warm_up, measure, samples) = match (quick(), heavy) {
        (true, _) => (Duration::from_millis(100), Duration::from_millis(400), 10),
        (false, true) => (Duration::from_millis(500), Duration::from_secs(4), 20),
        (false, false) => (Duration::from_secs(1), Duration::from_secs(3), 30),
    };
    group
        .warm_up_time(warm_up)
        .measurement_time(measure)
        .sample_size(samples);
    if heavy {
        group.sampling_mode(SamplingMode::Flat);
    }
}

/// `1e6`-style labels for element counts.
fn count_label(n: usize) -> String {
    let exp = n.ilog10();
    if 10usize.pow(exp) == n {
        format!("1e{exp}")
    } else {
        n.to_string()
    }
}

fn bytes_label(n: usize) -> String {
    match n {
        n if n >= GIB && n.is_multiple_of(GIB) => format!("{}GiB", n / GIB),
        n if n >= MIB && n.is_multiple_of(MIB) => format!("{}MiB", n / MIB),
        n => format!("{}KiB", n / KIB),
    }
}

/// A distinct, well-spread key for each index (multiplication by an odd constant is a
/// bijection on `u64`).
fn key(i: u64) -> u64 {
    i.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

/// Sums `reads` elements of `data` picked by xorshift64: independent loads, cache and TLB bound.
fn random_sum(data: &[u64], reads: usize) -> u64 {
    let n = data.len() as u128;
    let mut x = 0x2545_F491_4F6C_DD1D_u64;
    let mut sum = 0u64;
    for _ in 0..reads {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let i = ((u128::from(x) * n) >> 64) as usize;
        sum = sum.wrapping_add(data[i]);
    }
    sum
}

fn old_with_capacity(n: usize) -> OldVec<u64> {
    mmap_vec::MmapVecBuilder::new()
        .capacity(n)
        .try_build()
        .expect("mmap-vec 0.2 segment")
}

/// a. Create, fill and drop a vector of `n` u64: one `push` at a time, or one
/// `extend_from_slice`.
fn fill(c: &mut Criterion) {
    let mut group = c.benchmark_group("push");
    budget(&mut group, true);
    for &n in sizes(&[1_000_000, 10_000_000, 100_000_000]) {
        let label = count_label(n);
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
                let mut v = MmapVec::new_in(MmapAllocator::default());
                for i in 0..n as u64 {
                    v.push(i);
                }
                black_box(&v);
            })
        });
        if OLD_CRATE {
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

    let mut group = c.benchmark_group("extend_from_slice");
    budget(&mut group, true);
    for &n in sizes(&[1_000_000, 10_000_000, 100_000_000]) {
        let label = count_label(n);
        // Built by the first benchmark that runs (never, if the command line filters them out).
        let cell: OnceCell<Vec<u64>> = OnceCell::new();
        let source = || -> &[u64] { cell.get_or_init(|| (0..n as u64).collect()) };
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(BenchmarkId::new(STD, &label), |b| {
            let source = source();
            b.iter(|| {
                let mut v = Vec::new();
                v.extend_from_slice(source);
                black_box(&v);
            })
        });
        group.bench_function(BenchmarkId::new(MMAPVEC, &label), |b| {
            let source = source();
            b.iter(|| {
                let mut v = MmapVec::new_in(MmapAllocator::default());
                v.extend_from_slice(source);
                black_box(&v);
            })
        });
        if OLD_CRATE {
            // mmap-vec 0.2 has no `extend_from_slice`; `TryFrom<&[T]>` is its one-call form.
            group.bench_function(BenchmarkId::new(OLD, &label), |b| {
                let source = source();
                b.iter(|| {
                    let v = OldVec::try_from(source).expect("mmap-vec 0.2 segment");
                    black_box(&v);
                })
            });
        }
    }
    group.finish();
}

/// Times `grow` on `iters` freshly filled vectors; filling and dropping are not timed.
fn time_grows<V>(
    iters: u64,
    mut filled: impl FnMut() -> V,
    mut grow: impl FnMut(&mut V),
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let mut v = filled();
        let start = Instant::now();
        grow(&mut v);
        total += start.elapsed();
        black_box(&v);
    }
    total
}

/// b. Grow a full vector of `bytes` to twice its capacity, against copying the same bytes.
fn grow(c: &mut Criterion) {
    let mut group = c.benchmark_group("grow");
    budget(&mut group, true);
    for &bytes in sizes(&[64 * MIB, 512 * MIB, 2 * GIB]) {
        let n = bytes / size_of::<u64>();
        let label = bytes_label(bytes);
        group.throughput(Throughput::Bytes(bytes as u64));
        group.bench_function(BenchmarkId::new(STD, &label), |b| {
            b.iter_custom(|iters| {
                let filled = || {
                    let mut v = Vec::<u64>::with_capacity(n);
                    v.resize(n, 1);
                    v
                };
                time_grows(iters, filled, |v| v.reserve_exact(n))
            })
        });
        group.bench_function(BenchmarkId::new(MMAPVEC, &label), |b| {
            b.iter_custom(|iters| {
                let filled = || {
                    let mut v = MmapVec::<u64>::with_capacity_in(n, MmapAllocator::default());
                    v.resize(n, 1);
                    v
                };
                time_grows(iters, filled, |v| v.reserve_exact(n))
            })
        });
        if OLD_CRATE {
            group.bench_function(BenchmarkId::new(OLD, &label), |b| {
                b.iter_custom(|iters| {
                    let filled = || {
                        let mut v = old_with_capacity(n);
                        for _ in 0..n {
                            assert!(v.push_within_capacity(1).is_ok());
                        }
                        v
                    };
                    time_grows(iters, filled, |v| {
                        v.reserve(n).expect("mmap-vec 0.2 reserve")
                    })
                })
            });
        }
        // What a grow costs when it has to copy: the same bytes into a buffer whose pages are
        // already faulted in (so only the copy is timed). Built on first use.
        let mut buffers: Option<(Vec<u64>, Vec<u64>)> = None;
        group.bench_function(BenchmarkId::new(MEMCPY, &label), |b| {
            let (source, target) = buffers.get_or_insert_with(|| (vec![1; n], vec![2; n]));
            b.iter(|| {
                target.copy_from_slice(black_box(source));
                black_box(&target);
            })
        });
    }
    group.finish();
}

/// Benchmarks `read` over a vector of `n` u64 filled by each contender in turn. Each vector is
/// built when its benchmark first runs (never, if filtered out) and dropped before the next.
fn read_rows(group: &mut BenchmarkGroup<'_, WallTime>, n: usize, read: fn(&[u64]) -> u64) {
    let label = count_label(n);
    let mut heap: Option<Vec<u64>> = None;
    group.bench_function(BenchmarkId::new(STD, &label), |b| {
        let v = heap.get_or_insert_with(|| (0..n as u64).collect());
        b.iter(|| read(black_box(v)))
    });
    drop(heap);
    let mut mapped: Option<MmapVec<u64>> = None;
    group.bench_function(BenchmarkId::new(MMAPVEC, &label), |b| {
        let v = mapped.get_or_insert_with(|| {
            let mut v = MmapVec::with_capacity_in(n, MmapAllocator::default());
            v.extend(0..n as u64);
            v
        });
        b.iter(|| read(black_box(v)))
    });
    drop(mapped);
    if OLD_CRATE {
        let mut old: Option<OldVec<u64>> = None;
        group.bench_function(BenchmarkId::new(OLD, &label), |b| {
            let v = old.get_or_insert_with(|| {
                let mut v = old_with_capacity(n);
                for i in 0..n as u64 {
                    assert!(v.push_within_capacity(i).is_ok());
                }
                v
            });
            b.iter(|| read(black_box(v)))
        });
    }
}

const RANDOM_READS: usize = 1_000_000;

fn sum_all(data: &[u64]) -> u64 {
    data.iter().sum()
}

fn sum_random(data: &[u64]) -> u64 {
    random_sum(data, RANDOM_READS)
}

/// c. Sequential and random reads over a filled vector.
fn reads(c: &mut Criterion) {
    let counts: &[usize] = if quick() {
        &[1_000_000]
    } else {
        &[10_000_000, 100_000_000]
    };
    let mut group = c.benchmark_group("read_sequential");
    budget(&mut group, true);
    for &n in counts {
        group.throughput(Throughput::Elements(n as u64));
        read_rows(&mut group, n, sum_all);
    }
    group.finish();

    let mut group = c.benchmark_group("read_random");
    budget(&mut group, true);
    group.throughput(Throughput::Elements(RANDOM_READS as u64));
    for &n in counts {
        read_rows(&mut group, n, sum_random);
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

fn lookup_all<S, A>(map: &hashbrown::HashMap<u64, u64, S, A>, n: usize) -> u64
where
    S: std::hash::BuildHasher,
    A: Allocator,
{
    // Look up in another order than inserted: every hit, in no pattern.
    let mut sum = 0u64;
    for i in 0..n as u64 {
        let i = (i.wrapping_mul(0x5851_F42D_4C95_7F2D)) % n as u64;
        sum = sum.wrapping_add(map[&key(i)]);
    }
    sum
}

/// d. hashbrown `HashMap<u64, u64>`: insert `n` keys into a new map (then drop it), and look
/// up every key of a full map.
fn hashbrown(c: &mut Criterion) {
    use hashbrown::HashMap;
    let counts = sizes(&[1_000_000, 10_000_000]);
    let mut group = c.benchmark_group("hashbrown_insert");
    budget(&mut group, true);
    for &n in counts {
        let label = count_label(n);
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
                let mut map = HashMap::new_in(MmapAllocator::default());
                insert_all(&mut map, n);
                black_box(&map);
            })
        });
        group.bench_function(BenchmarkId::new(GLOBAL_WITH_CAPACITY, &label), |b| {
            b.iter(|| {
                let mut map = HashMap::with_capacity(n);
                insert_all(&mut map, n);
                black_box(&map);
            })
        });
        group.bench_function(BenchmarkId::new(MMAPVEC_WITH_CAPACITY, &label), |b| {
            b.iter(|| {
                let mut map = HashMap::with_capacity_in(n, MmapAllocator::default());
                insert_all(&mut map, n);
                black_box(&map);
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("hashbrown_lookup");
    budget(&mut group, true);
    for &n in counts {
        let label = count_label(n);
        group.throughput(Throughput::Elements(n as u64));
        // Each map is built when its benchmark first runs, and dropped before the next.
        let mut heap = None;
        group.bench_function(BenchmarkId::new(GLOBAL, &label), |b| {
            let map = heap.get_or_insert_with(|| {
                let mut map = HashMap::new();
                insert_all(&mut map, n);
                map
            });
            b.iter(|| lookup_all(map, n))
        });
        drop(heap);
        let mut mapped = None;
        group.bench_function(BenchmarkId::new(MMAPVEC, &label), |b| {
            let map = mapped.get_or_insert_with(|| {
                let mut map = HashMap::new_in(MmapAllocator::default());
                insert_all(&mut map, n);
                map
            });
            b.iter(|| lookup_all(map, n))
        });
    }
    group.finish();
}

/// One `allocate` and its `deallocate`, the memory never touched.
fn allocate_and_free(alloc: &impl Allocator, layout: Layout) {
    let block = alloc.allocate(layout).expect("allocation");
    black_box(block);
    // SAFETY: `block` was just allocated by `alloc` with `layout` and nothing else refers to it.
    unsafe { alloc.deallocate(block.cast(), layout) };
}

/// e. `allocate` + `deallocate` latency by size.
fn allocation(c: &mut Criterion) {
    let mut group = c.benchmark_group("alloc_dealloc");
    budget(&mut group, false);
    let all = [4 * KIB, 64 * KIB, MIB, 16 * MIB, 256 * MIB, GIB];
    // Quick mode keeps the ends of the range: both are cheap.
    let sizes: &[usize] = if quick() { &[4 * KIB, GIB] } else { &all };
    let mmap = MmapAllocator::default();
    for &size in sizes {
        let label = bytes_label(size);
        let layout = Layout::from_size_align(size, 8).expect("layout");
        group.bench_function(BenchmarkId::new(GLOBAL, &label), |b| {
            b.iter(|| allocate_and_free(&Global, layout))
        });
        group.bench_function(BenchmarkId::new(MMAPVEC, &label), |b| {
            b.iter(|| allocate_and_free(&mmap, layout))
        });
    }
    group.finish();
}

fn main() {
    let _cleanup = Cleanup;
    if !OLD_CRATE {
        eprintln!("debug assertions are on: mmap-vec 0.2 is skipped (it aborts in debug builds)");
    }
    // Prepare the segment folder before anything is timed.
    drop(mmapvec::mmap_vec![0u8; 1]);
    let mut c = Criterion::default().configure_from_args();
    fill(&mut c);
    grow(&mut c);
    reads(&mut c);
    hashbrown(&mut c);
    allocation(&mut c);
    c.final_summary();
}
