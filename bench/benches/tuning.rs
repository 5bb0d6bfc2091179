//! The builder's tuning options, each measured against the default allocator in the same run.
//!
//! One group per option: `populate`, `access_pattern`, `huge_pages`, `heap_threshold`,
//! `reserve_disk`, `release_in_background` and `grow_strategy`. Run with
//! `cargo bench -p mmapvec-bench --bench tuning`; `MMAPVEC_BENCH_QUICK=1` uses smaller sizes
//! and short measurements. `scripts/bench-report` turns the results into `docs/benchmarks.md`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, BenchmarkId, Criterion, SamplingMode, Throughput};
use mmapvec::allocator_api2::alloc::{Allocator, Layout};
use mmapvec::{AccessPattern, Builder, GrowStrategy, MmapAllocator, MmapVec};

const KIB: usize = 1 << 10;
const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;
const PAGE: usize = 4 * KIB;

/// The baseline's name in every group, shared with `scripts/bench-report`.
const DEFAULT: &str = "default";

fn quick() -> bool {
    std::env::var("MMAPVEC_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// `full` normally, `small` in quick mode.
fn size(full: usize, small: usize) -> usize {
    if quick() { small } else { full }
}

fn budget(group: &mut BenchmarkGroup<'_, WallTime>) {
    let (warm_up, measure, samples) = if quick() {
        (Duration::from_millis(100), Duration::from_millis(400), 10)
    } else {
        (Duration::from_millis(500), Duration::from_secs(4), 20)
    };
    group
        .warm_up_time(warm_up)
        .measurement_time(measure)
        .sample_size(samples)
        .sampling_mode(SamplingMode::Flat);
}

fn bytes_label(n: usize) -> String {
    match n {
        n if n >= GIB && n.is_multiple_of(GIB) => format!("{}GiB", n / GIB),
        n if n >= MIB && n.is_multiple_of(MIB) => format!("{}MiB", n / MIB),
        n => format!("{}KiB", n / KIB),
    }
}

fn build(builder: Builder) -> MmapAllocator {
    builder.build().expect("allocator in the temp directory")
}

/// Sums `reads` elements of `data` picked by xorshift64.
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

/// A vector of `n` zeros straight from `allocate_zeroed`: a fresh segment none of whose pages
/// has been touched yet.
fn untouched_zeros(alloc: &MmapAllocator, n: usize) -> MmapVec<u64> {
    let layout = Layout::array::<u64>(n).expect("layout");
    let block = alloc.allocate_zeroed(layout).expect("segment");
    // SAFETY: 1. `block` was allocated by `alloc` with the layout of exactly `n` u64s, so the
    // pointer is aligned and the capacity is `n`. 2. All its bytes are zero, a valid `u64`, so
    // the length may be `n`. 3. The vector takes sole ownership and frees it with `alloc`.
    unsafe { MmapVec::from_raw_parts_in(block.cast::<u64>().as_ptr(), n, n, alloc.clone()) }
}

/// Times `work` on `iters` values made by `setup`; setup and drop are not timed.
fn timed<V, R>(
    iters: u64,
    mut setup: impl FnMut() -> V,
    mut work: impl FnMut(&mut V) -> R,
) -> Duration {
    let mut total = Duration::ZERO;
    for _ in 0..iters {
        let mut v = setup();
        let start = Instant::now();
        let out = work(&mut v);
        total += start.elapsed();
        black_box(&out);
        drop((out, v));
    }
    total
}

/// Huge-page use of this process, for the log: whether `huge_pages(true)` took effect.
fn huge_page_usage() -> String {
    let rollup = std::fs::read_to_string("/proc/self/smaps_rollup").unwrap_or_default();
    rollup
        .lines()
        .filter(|l| l.starts_with("FilePmdMapped") || l.starts_with("AnonHugePages"))
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `populate(true)`: allocate a segment and write every byte once; and fill a hashbrown map
/// (random first writes into each new table).
fn populate(c: &mut Criterion) {
    let bytes = size(256 * MIB, 64 * MIB);
    let n = bytes / size_of::<u64>();
    let keys = 1_000_000u64;
    let mut group = c.benchmark_group("tuning_populate");
    budget(&mut group);
    let options = [
        (DEFAULT, MmapAllocator::default()),
        (
            "populate(true)",
            build(MmapAllocator::builder().populate(true)),
        ),
    ];
    group.throughput(Throughput::Bytes(bytes as u64));
    for (name, alloc) in &options {
        group.bench_function(BenchmarkId::new(*name, bytes_label(bytes)), |b| {
            b.iter_custom(|iters| {
                timed(
                    iters,
                    || (),
                    |()| {
                        let mut v = MmapVec::<u64>::with_capacity_in(n, alloc.clone());
                        v.resize(n, 1);
                        v
                    },
                )
            })
        });
    }
    group.throughput(Throughput::Elements(keys));
    for (name, alloc) in &options {
        group.bench_function(BenchmarkId::new(*name, "hashbrown_1e6"), |b| {
            b.iter(|| {
                let mut map = hashbrown::HashMap::new_in(alloc.clone());
                for i in 0..keys {
                    map.insert(i.wrapping_mul(0x9E37_79B9_7F4A_7C15), i);
                }
                black_box(&map);
            })
        });
    }
    group.finish();
}

/// `access_pattern(..)`: the first read of a fresh segment (allocation included, since
/// `WillNeed` does its work there). Sequentially over every page, and sparsely at random
/// (one read per 16 pages on average).
fn access_pattern(c: &mut Criterion) {
    let bytes = size(256 * MIB, 64 * MIB);
    let n = bytes / size_of::<u64>();
    let with = |pattern| build(MmapAllocator::builder().access_pattern(pattern));

    let mut group = c.benchmark_group("tuning_access_sequential");
    budget(&mut group);
    group.throughput(Throughput::Bytes(bytes as u64));
    for (name, alloc) in [
        (DEFAULT, MmapAllocator::default()),
        (
            "access_pattern(Sequential)",
            with(AccessPattern::Sequential),
        ),
        ("access_pattern(WillNeed)", with(AccessPattern::WillNeed)),
    ] {
        group.bench_function(BenchmarkId::new(name, bytes_label(bytes)), |b| {
            b.iter_custom(|iters| {
                timed(
                    iters,
                    || (),
                    |()| {
                        let v = untouched_zeros(&alloc, n);
                        black_box(v.iter().sum::<u64>());
                        v
                    },
                )
            })
        });
    }
    group.finish();

    let reads = bytes / PAGE / 16;
    let mut group = c.benchmark_group("tuning_access_random");
    budget(&mut group);
    group.throughput(Throughput::Elements(reads as u64));
    for (name, alloc) in [
        (DEFAULT, MmapAllocator::default()),
        ("access_pattern(Random)", with(AccessPattern::Random)),
        ("access_pattern(WillNeed)", with(AccessPattern::WillNeed)),
    ] {
        group.bench_function(BenchmarkId::new(name, bytes_label(bytes)), |b| {
            b.iter_custom(|iters| {
                timed(
                    iters,
                    || (),
                    |()| {
                        let v = untouched_zeros(&alloc, n);
                        black_box(random_sum(&v, reads));
                        v
                    },
                )
            })
        });
    }
    group.finish();
}

/// `huge_pages(true)`: random reads over a filled vector (TLB bound), and the fill itself.
fn huge_pages(c: &mut Criterion) {
    const READS: usize = 1_000_000;
    let bytes = size(GIB, 256 * MIB);
    let n = bytes / size_of::<u64>();
    let options = || {
        [
            (DEFAULT, MmapAllocator::default()),
            (
                "huge_pages(true)",
                build(MmapAllocator::builder().huge_pages(true)),
            ),
        ]
    };

    let mut group = c.benchmark_group("tuning_huge_pages_read");
    budget(&mut group);
    group.throughput(Throughput::Elements(READS as u64));
    for (name, alloc) in options() {
        // Filled when the benchmark first runs (never, if filtered out); dropped after it.
        let mut filled: Option<MmapVec<u64>> = None;
        group.bench_function(BenchmarkId::new(name, bytes_label(bytes)), |b| {
            let v = filled.get_or_insert_with(|| {
                let mut v = MmapVec::with_capacity_in(n, alloc.clone());
                v.extend(0..n as u64);
                eprintln!("{name}: {}", huge_page_usage());
                v
            });
            b.iter(|| random_sum(black_box(v), READS))
        });
    }
    group.finish();

    let mut group = c.benchmark_group("tuning_huge_pages_fill");
    budget(&mut group);
    group.throughput(Throughput::Bytes(bytes as u64));
    for (name, alloc) in options() {
        group.bench_function(BenchmarkId::new(name, bytes_label(bytes)), |b| {
            b.iter_custom(|iters| {
                timed(
                    iters,
                    || (),
                    |()| {
                        let mut v = MmapVec::<u64>::with_capacity_in(n, alloc.clone());
                        v.resize(n, 1);
                        v
                    },
                )
            })
        });
    }
    group.finish();
}

/// `heap_threshold(64 KiB)`: many small vectors, each created, filled with 100 pushes, dropped.
fn heap_threshold(c: &mut Criterion) {
    const VECTORS: usize = 1000;
    const PUSHES: u64 = 100;
    let mut group = c.benchmark_group("tuning_heap_threshold");
    budget(&mut group);
    group.throughput(Throughput::Elements(VECTORS as u64));
    for (name, alloc) in [
        (DEFAULT, MmapAllocator::default()),
        (
            "heap_threshold(64KiB)",
            build(MmapAllocator::builder().heap_threshold(64 * KIB)),
        ),
    ] {
        group.bench_function(BenchmarkId::new(name, "1000x100"), |b| {
            b.iter(|| {
                for _ in 0..VECTORS {
                    let mut v = MmapVec::new_in(alloc.clone());
                    for i in 0..PUSHES {
                        v.push(i);
                    }
                    black_box(&v);
                }
            })
        });
    }
    group.finish();
}

/// `reserve_disk(false)`: `allocate` + `deallocate` (sparse file instead of reserved blocks),
/// growing a full vector, and the whole life of a small vector (1e6 pushes, then drop).
fn reserve_disk(c: &mut Criterion) {
    let mut group = c.benchmark_group("tuning_reserve_disk");
    budget(&mut group);
    let options = [
        (DEFAULT, MmapAllocator::default()),
        (
            "reserve_disk(false)",
            build(MmapAllocator::builder().reserve_disk(false)),
        ),
    ];
    let sizes: &[usize] = if quick() {
        &[4 * KIB]
    } else {
        &[4 * KIB, 256 * MIB]
    };
    for &bytes in sizes {
        let layout = Layout::from_size_align(bytes, 8).expect("layout");
        for (name, alloc) in &options {
            group.bench_function(BenchmarkId::new(*name, bytes_label(bytes)), |b| {
                b.iter(|| {
                    let block = alloc.allocate(layout).expect("segment");
                    black_box(block);
                    // SAFETY: `block` was just allocated by `alloc` with `layout`; nothing else
                    // refers to it.
                    unsafe { alloc.deallocate(block.cast(), layout) };
                })
            });
        }
    }
    let grow_bytes = size(512 * MIB, 64 * MIB);
    for (name, alloc) in &options {
        let id = BenchmarkId::new(*name, format!("grow_{}", bytes_label(grow_bytes)));
        group.bench_function(id, |b| {
            b.iter_custom(|iters| time_grows(alloc, grow_bytes / size_of::<u64>(), iters))
        });
    }
    for (name, alloc) in &options {
        group.bench_function(BenchmarkId::new(*name, "push_1e6"), |b| {
            b.iter(|| {
                let mut v = MmapVec::new_in(alloc.clone());
                for i in 0..1_000_000u64 {
                    v.push(i);
                }
                black_box(&v);
            })
        });
    }
    group.finish();
}

/// `release_in_background(true)`: `allocate` + `deallocate` in a loop (past 64 waiting segments
/// `deallocate` releases inline again), the push row, and dropping 32 filled 8 MiB vectors at
/// once (filling not timed; it also gives the release thread time to catch up).
fn release_in_background(c: &mut Criterion) {
    const VECTORS: usize = 32;
    let n = 8 * MIB / size_of::<u64>();
    let mut group = c.benchmark_group("tuning_release_in_background");
    budget(&mut group);
    let options = [
        (DEFAULT, MmapAllocator::default()),
        (
            "release_in_background(true)",
            build(MmapAllocator::builder().release_in_background(true)),
        ),
    ];
    let layout = Layout::from_size_align(4 * KIB, 8).expect("layout");
    for (name, alloc) in &options {
        group.bench_function(BenchmarkId::new(*name, "4KiB"), |b| {
            b.iter(|| {
                let block = alloc.allocate(layout).expect("segment");
                black_box(block);
                // SAFETY: `block` was just allocated by `alloc` with `layout`; nothing else
                // refers to it.
                unsafe { alloc.deallocate(block.cast(), layout) };
            })
        });
    }
    for (name, alloc) in &options {
        group.bench_function(BenchmarkId::new(*name, "push_1e6"), |b| {
            b.iter(|| {
                let mut v = MmapVec::new_in(alloc.clone());
                for i in 0..1_000_000u64 {
                    v.push(i);
                }
                black_box(&v);
            })
        });
    }
    for (name, alloc) in &options {
        group.bench_function(BenchmarkId::new(*name, "drop_32x8MiB"), |b| {
            b.iter_custom(|iters| {
                timed(
                    iters,
                    || {
                        (0..VECTORS)
                            .map(|_| {
                                let mut v = MmapVec::<u64>::with_capacity_in(n, alloc.clone());
                                v.resize(n, 1);
                                v
                            })
                            .collect::<Vec<_>>()
                    },
                    |vectors| vectors.clear(),
                )
            })
        });
    }
    group.finish();
}

/// Times growing `iters` full vectors of `n` u64 to twice their capacity; filling not timed.
fn time_grows(alloc: &MmapAllocator, n: usize, iters: u64) -> Duration {
    timed(
        iters,
        || {
            let mut v = MmapVec::<u64>::with_capacity_in(n, alloc.clone());
            v.resize(n, 1);
            v
        },
        |v| v.reserve_exact(n),
    )
}

/// `grow_strategy(MapAgain)` against the default `Remap`: grow a full vector to twice its
/// capacity.
fn grow_strategy(c: &mut Criterion) {
    let bytes = size(512 * MIB, 64 * MIB);
    let n = bytes / size_of::<u64>();
    let mut group = c.benchmark_group("tuning_grow_strategy");
    budget(&mut group);
    group.throughput(Throughput::Bytes(bytes as u64));
    for (name, alloc) in [
        (DEFAULT, MmapAllocator::default()),
        (
            "grow_strategy(MapAgain)",
            build(MmapAllocator::builder().grow_strategy(GrowStrategy::MapAgain)),
        ),
    ] {
        group.bench_function(BenchmarkId::new(name, bytes_label(bytes)), |b| {
            b.iter_custom(|iters| time_grows(&alloc, n, iters))
        });
    }
    group.finish();
}

fn main() {
    // Prepare the segment folder before anything is timed.
    drop(mmapvec::mmap_vec![0u8; 1]);
    let mut c = Criterion::default().configure_from_args();
    populate(&mut c);
    access_pattern(&mut c);
    huge_pages(&mut c);
    heap_threshold(&mut c);
    reserve_disk(&mut c);
    release_in_background(&mut c);
    grow_strategy(&mut c);
    c.final_summary();
}
