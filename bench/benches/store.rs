//! Issue 13's persistent store, against the other ways of keeping a map on disk, each group's
//! contenders measured side by side in the same run.
//!
//! | group | work | contenders |
//! |---|---|---|
//! | `store_reopen` | open a kept `HashMap<u64, u64>` of a given table size and look one key up | `store_open`, `store_open_read_only`, `rkyv_access_unchecked`, `rkyv_access`, `bincode`, `store_open_cold`, `rkyv_access_unchecked_cold` |
//! | `store_insert` | insert n random `u64` keys into an empty map | `store`, `store_durable`, `mmapvec`, `mmapvec_reused`, `global`, `heed`, `redb` |
//! | `store_lookup` | look up the n keys of a full map | `store`, `mmapvec`, `global`, `heed`, `redb` |
//! | `store_snapshot` | `Store::snapshot` of the store of the largest `store_reopen` size up to 1 GiB, against copies of its table's file | `snapshot`, `dd`, `copy_file_range` |
//!
//! **Reopen.** The map is a `StoreMap<u64, u64, FixedState>` made `with_capacity` for 7/8 of
//! its buckets (hashbrown's full load), so that its table is the size named: 2^26 buckets of
//! 16 bytes for `1GiB` (58.7 million entries; the allocation is that plus one control byte per
//! bucket), 2^29 for `8GiB` (470 million). Each is built once, kept as a root, closed, and
//! reused by every iteration; the same entries are written once as a bincode file and as an
//! rkyv archive. Timed, per iteration:
//! * `store_open`: `Store::open` (for writing: it marks the store dirty and syncs the header)
//!   + `root::<StoreMap<..>>` + one `get`. The close (a clean, unmodified store) is not timed.
//! * `store_open_read_only`: the same with `Store::open_read_only`.
//! * `rkyv_access_unchecked`: open the file, `mmap` it (memmap2), `rkyv::access_unchecked`, one
//!   `get`. `rkyv_access`: the same with the checked `rkyv::access` (bytecheck walks the
//!   whole table). Unmapping is not timed.
//! * `bincode`: read the file and deserialize it (serde, `bincode::config::standard()`) into a
//!   `std::collections::HashMap<u64, u64, FixedState>` on the heap, one `get`; the drop is not
//!   timed. Up to 1 GiB only (8 GiB would be about a minute an iteration and 8 GiB of heap).
//! * `*_cold`: as their warm forms, after `posix_fadvise(DONTNEED)` on every file of the store
//!   or the archive (not timed): the page cache no longer holds them, as after a reboot, so the
//!   first lookup reads from the disk. Run last for each size, after the warm contenders.
//!
//! **Inserts and lookups.** Keys come from xorshift64 (distinct, random), values are the
//! index. `store` is a `StoreMap` grown from empty in a fresh store (timer stopped before
//! anything is made durable); `store_durable` adds `set_root` + `Store::flush` (every page
//! written and synced), the same work as the databases' commit. `mmapvec` is the same hashbrown
//! map on `MmapAllocator::default()` (temporary files), `global` on the heap, both with the same
//! `FixedState` hasher. `heed` (LMDB) and `redb` insert in one write transaction, committed
//! (synced) inside the timing, and look up in one read transaction. heed and redb are
//! measured at 1e6 only by default: at 1e5 they take 0.4 to 0.6 µs an insert here, and a B-tree
//! slows with depth and once it outgrows the caches, so one iteration at 1e7 would be 5 to 20
//! seconds, a few minutes per contender with criterion's 10 samples and warm-up (not measured:
//! an estimate). `MMAPVEC_BENCH_STORE_DB_1E7=1` adds them at 1e7. The hash maps are measured at
//! both sizes, so every ratio is taken at one n. The time criterion reports is for the whole
//! n; its throughput line (`Throughput::Elements`) gives elements per second.
//!
//! **Snapshot.** `Store::snapshot` of the reopen store (its table and chunk files, each copied
//! and synced: this machine's ext4 has no reflink, `reflinked` is printed), against `dd` (read
//! and write 1 MiB blocks of the table's segment file, then `fsync`) and `copy_file_range`
//! (`std::io::copy` between the files, which is what the snapshot does without reflinks, then
//! `fsync`). The previous copy is removed before each iteration, not timed.
//!
//! Everything goes to a folder of the run's own in the temp directory (`TMPDIR`, else `/tmp`),
//! removed at the end. The 8 GiB size needs 20 GiB free there for the store, and 20 GiB again
//! for its rkyv archive; with less it is skipped with a message. A process has one store open at
//! a time: every group closes its store before the next opens one.
//!
//! Run with `cargo bench -p mmapvec-bench --bench store` (full: long, see the docs);
//! `MMAPVEC_BENCH_QUICK=1` shrinks everything (tables of 16 and 64 MiB, n = 1e5) and measures
//! briefly: under two minutes here, build not included.

use std::collections::HashMap as StdHashMap;
use std::fs::{self, File};
use std::hash::BuildHasher;
use std::hint::black_box;
use std::io::{BufWriter, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use mmapvec::MmapAllocator;
use mmapvec::store::{FixedState, Store, StoreMap};

mod common;
use common::{
    GIB, KIB, Keys, MIB, REDB_TABLE, Scratch, budget, entries, free_bytes, fresh, heed_db,
    heed_env, heed_fill, quick, redb_fill,
};

/// The map kept in the stores.
type Map<'s> = StoreMap<'s, u64, u64, FixedState>;
/// What rkyv archives a `HashMap<u64, u64>` as.
type ArchivedMap = rkyv::collections::swiss_table::ArchivedHashMap<U64Le, U64Le>;
/// What rkyv archives a `u64` as (`rend::u64_le`).
type U64Le = rkyv::Archived<u64>;

/// The root's name in every store of this bench.
const ROOT: &str = "map";
/// A size needs this much free space in the temp directory for each large file set.
const FREE_NEEDED: u64 = 20 << 30;
/// Keys looked up by the reopen rows, one per iteration in turn.
const PROBES: usize = 1024;

fn bytes_label(n: usize) -> String {
    match n {
        n if n >= GIB && n.is_multiple_of(GIB) => format!("{}GiB", n / GIB),
        n if n >= MIB && n.is_multiple_of(MIB) => format!("{}MiB", n / MIB),
        n if n >= KIB && n.is_multiple_of(KIB) => format!("{}KiB", n / KIB),
        n => format!("{n}B"),
    }
}

fn count_label(n: usize) -> String {
    let exp = n.ilog10();
    let unit = 10usize.pow(exp);
    if n.is_multiple_of(unit) {
        format!("{}e{exp}", n / unit)
    } else {
        n.to_string()
    }
}

/// Every file under `dir` (or `dir` itself if it is a file).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(p) = stack.pop() {
        match fs::read_dir(&p) {
            Ok(rd) => stack.extend(rd.flatten().map(|e| e.path())),
            Err(_) if p.is_file() => out.push(p),
            Err(_) => {}
        }
    }
    out
}

/// Drops the page cache of every file under `path` (clean pages only: the files are closed
/// and synced by then).
fn evict(path: &Path) {
    for f in files_under(path) {
        if let Ok(file) = File::open(&f) {
            // SAFETY: a plain system call on a descriptor we own.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        }
    }
}

fn dir_bytes(path: &Path) -> u64 {
    files_under(path)
        .iter()
        .filter_map(|f| fs::metadata(f).ok())
        .map(|m| m.len())
        .sum()
}

/// A kept map of one table size, and the same entries as a bincode file and an rkyv archive.
struct Kept {
    label: String,
    entries: usize,
    store: PathBuf,
    bincode: Option<PathBuf>,
    rkyv: Option<PathBuf>,
    probes: Vec<u64>,
}

/// serde's view of a map kept in a store: what `bincode` writes.
struct SerMap<'a, 's>(&'a Map<'s>);

impl serde::Serialize for SerMap<'_, '_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.0.iter())
    }
}

/// rkyv's view of a map kept in a store: archived as rkyv archives a `std` `HashMap<u64, u64>`
/// (its impl, applied to the store's map without copying it to the heap first).
struct ArchMap<'a, 's>(&'a Map<'s>);

impl rkyv::Archive for ArchMap<'_, '_> {
    type Archived = ArchivedMap;
    type Resolver = rkyv::collections::swiss_table::map::HashMapResolver;

    fn resolve(&self, resolver: Self::Resolver, out: rkyv::Place<Self::Archived>) {
        ArchivedMap::resolve_from_len(self.0.len(), (7, 8), resolver, out);
    }
}

impl<S> rkyv::Serialize<S> for ArchMap<'_, '_>
where
    S: rkyv::rancor::Fallible + rkyv::ser::Writer + rkyv::ser::Allocator + ?Sized,
    S::Error: rkyv::rancor::Source,
{
    fn serialize(&self, serializer: &mut S) -> Result<Self::Resolver, S::Error> {
        ArchivedMap::serialize_from_iter::<_, _, _, u64, u64, _>(self.0.iter(), (7, 8), serializer)
    }
}

/// Builds the store of a table of `table` bytes (2^k buckets of 16 bytes, 7/8 full), then its
/// bincode file (if `with_bincode`) and rkyv archive (if there is room).
fn build_kept(scratch: &Scratch, table: usize, with_bincode: bool) -> Option<Kept> {
    let label = bytes_label(table);
    let buckets = table / 16;
    let n = buckets / 8 * 7;
    let free = free_bytes(&scratch.0);
    if table >= 8 * GIB && free < FREE_NEEDED {
        eprintln!(
            "store bench: skipping the {label} store: {} GiB free in {}, {} GiB needed",
            free >> 30,
            scratch.0.display(),
            FREE_NEEDED >> 30
        );
        return None;
    }
    let path = scratch.path(&format!("reopen-{label}"));
    let t = Instant::now();
    {
        let store = Store::create(&path).expect("create the store");
        let mut map: Map =
            Map::with_capacity_and_hasher_in(n, FixedState::default(), store.allocator());
        let cap = map.capacity();
        assert!(
            cap == n,
            "{label}: capacity {cap} for {n} entries: not 2^k buckets"
        );
        // In passes, each filling a window of the table of at most 512 MiB: keys inserted at
        // random over an 8 GiB shared file mapping keep more pages dirty than the kernel allows
        // (`vm.dirty_ratio`), so it writes them back and they are dirtied again, over and over
        // (a first try wrote 300 GB to the disk in 10 minutes). The build is not timed.
        let passes = (table / (512 * MIB)).max(1);
        let hasher = map.hasher().clone();
        for pass in 0..passes {
            map.extend(entries(n).filter(|&(k, _)| {
                let bucket = (hasher.hash_one(k) as usize) & (buckets - 1);
                bucket / (buckets / passes) == pass
            }));
        }
        assert_eq!(map.len(), n);
        store.set_root(ROOT, map).expect("set the root");
        store.close().expect("close the store");
    }
    eprintln!(
        "store bench: {label} store built ({n} entries, {:.2} GiB on disk) in {:.1?}",
        dir_bytes(&path) as f64 / GIB as f64,
        t.elapsed()
    );
    let probes: Vec<u64> = Keys::new()
        .take(n)
        .step_by((n / PROBES).max(1))
        .take(PROBES)
        .collect();

    let store = Store::open_read_only(&path).expect("open the store to export it");
    let map = store.root::<Map>(ROOT).expect("the root");
    let bincode = with_bincode.then(|| {
        let t = Instant::now();
        let file = scratch.path(&format!("reopen-{label}.bincode"));
        let mut w = BufWriter::with_capacity(MIB, File::create(&file).expect("bincode file"));
        bincode::serde::encode_into_std_write(SerMap(&map), &mut w, bincode::config::standard())
            .expect("bincode encode");
        w.into_inner().expect("flush").sync_all().expect("sync");
        eprintln!(
            "store bench: {label} bincode file ({:.2} GiB) written in {:.1?}",
            fs::metadata(&file).unwrap().len() as f64 / GIB as f64,
            t.elapsed()
        );
        file
    });
    let free = free_bytes(&scratch.0);
    let rkyv = if table >= 8 * GIB && free < FREE_NEEDED {
        eprintln!(
            "store bench: skipping the {label} rkyv archive: {} GiB free, {} GiB needed",
            free >> 30,
            FREE_NEEDED >> 30
        );
        None
    } else {
        let t = Instant::now();
        let file = scratch.path(&format!("reopen-{label}.rkyv"));
        let w = BufWriter::with_capacity(MIB, File::create(&file).expect("rkyv file"));
        let w = rkyv::api::high::to_bytes_in::<_, rkyv::rancor::Error>(
            &ArchMap(&map),
            rkyv::ser::writer::IoWriter::new(w),
        )
        .expect("rkyv serialize");
        w.into_inner()
            .into_inner()
            .expect("flush")
            .sync_all()
            .expect("sync");
        eprintln!(
            "store bench: {label} rkyv archive ({:.2} GiB) written in {:.1?}",
            fs::metadata(&file).unwrap().len() as f64 / GIB as f64,
            t.elapsed()
        );
        Some(file)
    };
    drop(map);
    drop(store);
    Some(Kept {
        label,
        entries: n,
        store: path,
        bincode,
        rkyv,
        probes,
    })
}

fn probe(kept: &Kept, i: u64) -> u64 {
    kept.probes[i as usize % kept.probes.len()]
}

/// Open + root + one lookup, `iters` times; the close is not timed.
fn time_store_open(kept: &Kept, iters: u64, read_only: bool, cold: bool) -> Duration {
    let mut total = Duration::ZERO;
    for i in 0..iters {
        if cold {
            evict(&kept.store);
        }
        let key = probe(kept, i);
        let t = Instant::now();
        let store = if read_only {
            Store::open_read_only(&kept.store)
        } else {
            Store::open(&kept.store)
        }
        .expect("reopen the store");
        let map = store.root::<Map>(ROOT).expect("the root");
        let found = map.get(&key).copied();
        total += t.elapsed();
        assert!(found.is_some());
        drop(map);
        store.close().expect("close");
    }
    total
}

fn rkyv_lookup(map: &ArchivedMap, key: u64) -> Option<u64> {
    map.get(&U64Le::from_native(key)).map(|v| v.to_native())
}

/// Open + mmap + access + one lookup, `iters` times; the unmap is not timed.
fn time_rkyv(file: &Path, kept: &Kept, iters: u64, checked: bool, cold: bool) -> Duration {
    let mut total = Duration::ZERO;
    for i in 0..iters {
        if cold {
            evict(file);
        }
        let key = probe(kept, i);
        let t = Instant::now();
        let f = File::open(file).expect("open the archive");
        // SAFETY: nobody writes the file while the bench runs.
        let mmap = unsafe { memmap2::Mmap::map(&f) }.expect("map the archive");
        let map = if checked {
            rkyv::access::<ArchivedMap, rkyv::rancor::Error>(&mmap).expect("a valid archive")
        } else {
            // SAFETY: the file is the archive this run wrote, of this type.
            unsafe { rkyv::access_unchecked::<ArchivedMap>(&mmap) }
        };
        let found = rkyv_lookup(map, key);
        total += t.elapsed();
        assert!(found.is_some());
        drop(mmap);
    }
    total
}

/// Read + deserialize + one lookup, `iters` times; the drop is not timed.
fn time_bincode(file: &Path, kept: &Kept, iters: u64) -> Duration {
    let mut total = Duration::ZERO;
    for i in 0..iters {
        let key = probe(kept, i);
        let t = Instant::now();
        let bytes = fs::read(file).expect("read the bincode file");
        let (map, _): (StdHashMap<u64, u64, FixedState>, usize) =
            bincode::serde::decode_from_slice(&bytes, bincode::config::standard())
                .expect("bincode decode");
        let found = map.get(&key).copied();
        total += t.elapsed();
        assert!(found.is_some() && map.len() == kept.entries);
        drop(bytes);
        drop(map);
    }
    total
}

/// Issue 13's first target: reopen + first lookup.
fn reopen(c: &mut Criterion, kept: &[Kept]) {
    let mut group = c.benchmark_group("store_reopen");
    for k in kept {
        let label = &k.label;
        // Bounded: an untimed close follows every timed open.
        budget(&mut group, 3);
        group.bench_function(BenchmarkId::new("store_open", label), |b| {
            b.iter_custom(|iters| time_store_open(k, iters, false, false))
        });
        group.bench_function(BenchmarkId::new("store_open_read_only", label), |b| {
            b.iter_custom(|iters| time_store_open(k, iters, true, false))
        });
        if let Some(file) = &k.rkyv {
            group.bench_function(BenchmarkId::new("rkyv_access_unchecked", label), |b| {
                b.iter_custom(|iters| time_rkyv(file, k, iters, false, false))
            });
            budget(&mut group, 10);
            group.bench_function(BenchmarkId::new("rkyv_access", label), |b| {
                b.iter_custom(|iters| time_rkyv(file, k, iters, true, false))
            });
        }
        if let Some(file) = &k.bincode {
            budget(&mut group, 20);
            group.bench_function(BenchmarkId::new("bincode", label), |b| {
                b.iter_custom(|iters| time_bincode(file, k, iters))
            });
        }
        budget(&mut group, 3);
        group.bench_function(BenchmarkId::new("store_open_cold", label), |b| {
            b.iter_custom(|iters| time_store_open(k, iters, false, true))
        });
        if let Some(file) = &k.rkyv {
            group.bench_function(BenchmarkId::new("rkyv_access_unchecked_cold", label), |b| {
                b.iter_custom(|iters| time_rkyv(file, k, iters, false, true))
            });
        }
    }
    group.finish();
}

/// Issue 13's second target: n inserts, then n lookups.
fn insert_lookup(c: &mut Criterion, scratch: &Scratch) {
    let sizes: &[usize] = if quick() {
        &[100_000]
    } else {
        &[1_000_000, 10_000_000]
    };
    // heed and redb up to this n (see the module docs); `MMAPVEC_BENCH_STORE_DB_1E7=1` adds
    // them at 1e7 too.
    let db_1e7 = std::env::var("MMAPVEC_BENCH_STORE_DB_1E7").is_ok_and(|v| v == "1");
    let db_max = match (quick(), db_1e7) {
        (true, _) => 100_000,
        (false, false) => 1_000_000,
        (false, true) => 10_000_000,
    };
    let heed_ok = heed_env(&fresh(scratch, "heed-probe")).is_some();

    let mut group = c.benchmark_group("store_insert");
    for &n in sizes {
        let label = count_label(n);
        budget(&mut group, if n >= 10_000_000 { 20 } else { 5 });
        group.throughput(Throughput::Elements(n as u64));
        for durable in [false, true] {
            let name = if durable { "store_durable" } else { "store" };
            group.bench_function(BenchmarkId::new(name, &label), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let path = fresh(scratch, "insert-store");
                        let store = Store::create(&path).expect("create the store");
                        let t = Instant::now();
                        let mut map: Map =
                            Map::with_hasher_in(FixedState::default(), store.allocator());
                        map.extend(entries(n));
                        if durable {
                            store.set_root(ROOT, map).expect("set the root");
                            store.flush().expect("flush");
                            total += t.elapsed();
                        } else {
                            total += t.elapsed();
                            black_box(&map);
                            drop(map);
                        }
                        store.close().expect("close");
                        let _ = fs::remove_dir_all(&path);
                    }
                    total
                })
            });
        }
        // `mmapvec`: a new allocator each time, as `store` makes a new store: both write to new
        // files, whose first touch of each page is the cost that dominates (ext4 converts a
        // `fallocate`d block at its first write). `mmapvec_reused`: the process-wide default
        // allocator, which hands the previous iteration's freed table (its pages already
        // touched) to the next one.
        group.bench_function(BenchmarkId::new("mmapvec", &label), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let alloc = MmapAllocator::builder().build().expect("an allocator");
                    let t = Instant::now();
                    let mut map = hashbrown::HashMap::with_hasher_in(FixedState::default(), alloc);
                    map.extend(entries(n));
                    total += t.elapsed();
                    black_box(&map);
                }
                total
            })
        });
        group.bench_function(BenchmarkId::new("mmapvec_reused", &label), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let mut map = hashbrown::HashMap::with_hasher_in(
                        FixedState::default(),
                        MmapAllocator::default(),
                    );
                    map.extend(entries(n));
                    total += t.elapsed();
                    black_box(&map);
                }
                total
            })
        });
        group.bench_function(BenchmarkId::new("global", &label), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let t = Instant::now();
                    let mut map = hashbrown::HashMap::with_hasher(FixedState::default());
                    map.extend(entries(n));
                    total += t.elapsed();
                    black_box(&map);
                }
                total
            })
        });
        if n <= db_max && heed_ok {
            group.bench_function(BenchmarkId::new("heed", &label), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let dir = fresh(scratch, "insert-heed");
                        let env = heed_env(&dir).expect("heed env");
                        let db = heed_db(&env);
                        let t = Instant::now();
                        heed_fill(&env, db, n);
                        total += t.elapsed();
                        drop(env);
                        let _ = fs::remove_dir_all(&dir);
                    }
                    total
                })
            });
        }
        if n <= db_max {
            group.bench_function(BenchmarkId::new("redb", &label), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let dir = fresh(scratch, "insert-redb");
                        fs::create_dir_all(&dir).unwrap();
                        let db = redb::Database::create(dir.join("db.redb")).expect("redb create");
                        let t = Instant::now();
                        redb_fill(&db, n);
                        total += t.elapsed();
                        drop(db);
                        let _ = fs::remove_dir_all(&dir);
                    }
                    total
                })
            });
        }
    }
    group.finish();

    let mut group = c.benchmark_group("store_lookup");
    for &n in sizes {
        let label = count_label(n);
        budget(&mut group, if n >= 10_000_000 { 10 } else { 3 });
        group.throughput(Throughput::Elements(n as u64));
        let sum = |get: &dyn Fn(u64) -> Option<u64>| -> u64 {
            let mut s = 0u64;
            for k in Keys::new().take(n) {
                s = s.wrapping_add(get(k).expect("a kept key"));
            }
            s
        };
        {
            let path = fresh(scratch, "lookup-store");
            let store = Store::create(&path).expect("create the store");
            let mut map: Map = Map::with_hasher_in(FixedState::default(), store.allocator());
            map.extend(entries(n));
            store.set_root(ROOT, map).expect("set the root");
            {
                let map = store.root::<Map>(ROOT).expect("the root");
                group.bench_function(BenchmarkId::new("store", &label), |b| {
                    b.iter(|| black_box(sum(&|k| map.get(&k).copied())))
                });
            }
            store.close().expect("close");
            let _ = fs::remove_dir_all(&path);
        }
        {
            let mut map =
                hashbrown::HashMap::with_hasher_in(FixedState::default(), MmapAllocator::default());
            map.extend(entries(n));
            group.bench_function(BenchmarkId::new("mmapvec", &label), |b| {
                b.iter(|| black_box(sum(&|k| map.get(&k).copied())))
            });
        }
        {
            let mut map = hashbrown::HashMap::with_hasher(FixedState::default());
            map.extend(entries(n));
            group.bench_function(BenchmarkId::new("global", &label), |b| {
                b.iter(|| black_box(sum(&|k| map.get(&k).copied())))
            });
        }
        if n <= db_max && heed_ok {
            let dir = fresh(scratch, "lookup-heed");
            let env = heed_env(&dir).expect("heed env");
            let db = heed_db(&env);
            heed_fill(&env, db, n);
            group.bench_function(BenchmarkId::new("heed", &label), |b| {
                b.iter(|| {
                    let rtxn = env.read_txn().expect("heed read txn");
                    black_box(sum(&|k| db.get(&rtxn, &k).expect("heed get")))
                })
            });
            drop(env);
            let _ = fs::remove_dir_all(&dir);
        }
        if n <= db_max {
            let dir = fresh(scratch, "lookup-redb");
            fs::create_dir_all(&dir).unwrap();
            let db = redb::Database::create(dir.join("db.redb")).expect("redb create");
            redb_fill(&db, n);
            group.bench_function(BenchmarkId::new("redb", &label), |b| {
                use redb::ReadableDatabase;
                b.iter(|| {
                    let rtxn = db.begin_read().expect("redb read txn");
                    let table = rtxn.open_table(REDB_TABLE).expect("redb table");
                    black_box(sum(&|k| table.get(k).expect("redb get").map(|v| v.value())))
                })
            });
            drop(db);
            let _ = fs::remove_dir_all(&dir);
        }
    }
    group.finish();
}

/// The largest file under `dir`: the table's segment.
fn largest_file(dir: &Path) -> PathBuf {
    files_under(dir)
        .into_iter()
        .max_by_key(|f| fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .expect("a file")
}

/// `dd`: 1 MiB reads and writes, then `fsync`.
fn dd(from: &Path, to: &Path) {
    let mut src = File::open(from).expect("open the source");
    let mut dst = File::create(to).expect("create the copy");
    let mut buf = vec![0u8; MIB];
    loop {
        let got = src.read(&mut buf).expect("read");
        if got == 0 {
            break;
        }
        dst.write_all(&buf[..got]).expect("write");
    }
    dst.sync_all().expect("fsync");
}

/// `copy_file_range` through `std::io::copy`, then `fsync`.
fn copy_range(from: &Path, to: &Path) {
    let mut src = File::open(from).expect("open the source");
    let mut dst = File::create(to).expect("create the copy");
    std::io::copy(&mut src, &mut dst).expect("copy");
    dst.sync_all().expect("fsync");
}

/// Issue 13's third target: a snapshot against plain copies of the same bytes.
fn snapshot(c: &mut Criterion, scratch: &Scratch, kept: &Kept) {
    let mut group = c.benchmark_group("store_snapshot");
    budget(&mut group, 10);
    let label = &kept.label;
    let store = Store::open(&kept.store).expect("open the store for snapshots");
    let snapshots = kept.store.join("snapshots");
    let first = store.snapshot().expect("a snapshot");
    eprintln!(
        "store bench: snapshot of {label}: {:.2} GiB, reflinked: {}",
        first.bytes as f64 / GIB as f64,
        first.reflinked
    );
    group.throughput(Throughput::Bytes(first.bytes));
    group.bench_function(BenchmarkId::new("snapshot", label), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // The previous snapshot goes first, untimed (the snapshot would remove it).
                let _ = fs::remove_dir_all(&snapshots);
                let t = Instant::now();
                let s = store.snapshot().expect("a snapshot");
                total += t.elapsed();
                black_box(s);
            }
            total
        })
    });
    drop(store);
    let _ = fs::remove_dir_all(&snapshots);
    let table = largest_file(&kept.store.join("segs"));
    let len = fs::metadata(&table).unwrap().len();
    group.throughput(Throughput::Bytes(len));
    let copy = scratch.path("snapshot-copy");
    for (name, f) in [
        ("dd", dd as fn(&Path, &Path)),
        ("copy_file_range", copy_range),
    ] {
        group.bench_function(BenchmarkId::new(name, label), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let _ = fs::remove_file(&copy);
                    let t = Instant::now();
                    f(&table, &copy);
                    total += t.elapsed();
                }
                total
            })
        });
    }
    let _ = fs::remove_file(&copy);
    group.finish();
}

fn main() {
    let scratch = Scratch::new("store");
    let mut c = Criterion::default().configure_from_args();
    let tables: &[usize] = if quick() {
        &[16 * MIB, 64 * MIB]
    } else {
        &[64 * MIB, GIB, 8 * GIB]
    };
    let kept: Vec<Kept> = tables
        .iter()
        .filter_map(|&t| build_kept(&scratch, t, t <= GIB))
        .collect();
    reopen(&mut c, &kept);
    insert_lookup(&mut c, &scratch);
    let snap = kept
        .iter()
        .rfind(|k| k.entries <= GIB / 16 / 8 * 7)
        .expect("a store of at most 1 GiB");
    snapshot(&mut c, &scratch, snap);
    c.final_summary();
}
