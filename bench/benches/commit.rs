//! Issue 20's crash-atomic commits, against LMDB (heed) and redb with their durable defaults
//! (every commit synced), each group's contenders measured side by side in one run.
//!
//! | group | work | contenders |
//! |---|---|---|
//! | `commit_one` | change one `u64` of a map and commit | `store/1GiB`, `store/8GiB` (a store holding a `StoreMap<u64, u64>` whose table is that size, every page of it read first: its page tables populated), `heed/1e6`, `redb/1e6` (one put and its commit, in a database of 1e6 keys) |
//! | `commit_batches` | 1e6 random `u64` inserts into an empty map, a commit every 1,000 | `store`, `heed`, `redb` |
//! | `commit_bulk` | commit 1 GiB of changed pages (every element of a committed 1 GiB vector rewritten first, not timed) | `store`, `dd` (`dd if=/dev/zero bs=1M count=1024 conv=fsync`) |
//! | `open_after_crash` | `Store::open` of the 1 GiB map's store whose writer died right after a commit of 1,000 changed entries (in the log, not yet checkpointed) | `replay`, and `clean` (the same store closed) |
//! | `inserts_between_commits` | 1e5 inserts into a map of 1e6 keys: committed in a store (its pages private copies on a write), or on the temporary allocator | `store`, `mmapvec` |
//!
//! `store/2GiB` is measured by default; `store/8GiB` only with `MMAPVEC_BENCH_COMMIT_8GIB=1`:
//! on this machine (ext4 with `discard`) building it did not finish in 10 minutes (the
//! kernel's writeback of 8 GiB of new pages, at 100% of a core), so it is not in the default
//! run. It needs 12 GiB free in the temp directory (skipped with a message otherwise).
//! `MMAPVEC_BENCH_QUICK=1` shrinks everything (maps of 16 and 64 MiB, n = 1e5, 64 MiB for the
//! bulk commit) and measures briefly.
//!
//! Run with `cargo bench -p mmapvec-bench --bench commit`.

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput};
use mmapvec::MmapAllocator;
use mmapvec::store::{FixedState, Store, StoreMap, StoreVec};

mod common;
use common::{
    GIB, MIB, REDB_TABLE, Scratch, budget, entries, free_bytes, fresh, heed_db, heed_env,
    heed_fill, quick, redb_fill,
};

type Map<'s> = StoreMap<'s, u64, u64, FixedState>;
const ROOT: &str = "map";

/// A store holding a map whose table is `table` bytes (2^k buckets of 16 bytes, 7/8 full,
/// sequential keys), committed and closed.
fn build_map_store(path: &Path, table: usize) -> usize {
    let buckets = table / 16;
    let n = buckets / 8 * 7;
    let store = Store::create(path).expect("create the store");
    let mut map: Map =
        StoreMap::with_capacity_and_hasher_in(n, FixedState::default(), store.allocator());
    map.extend((0..n as u64).map(|k| (k, k)));
    store.set_root(ROOT, map).expect("set_root");
    store.close().expect("close");
    n
}

/// Reads every entry of the map (its pages then have page-table entries, as in a program that
/// uses the map), returning a sum for `black_box`.
fn read_all(store: &Store) -> u64 {
    store
        .root::<Map>(ROOT)
        .expect("root")
        .values()
        .fold(0u64, |a, &v| a.wrapping_add(v))
}

fn commit_one(c: &mut Criterion, scratch: &Scratch) {
    let mut group = c.benchmark_group("commit_one");
    budget(&mut group, 10);
    let eight = std::env::var("MMAPVEC_BENCH_COMMIT_8GIB").is_ok_and(|v| v == "1");
    let sizes: &[(usize, &str)] = if quick() {
        &[(16 * MIB, "16MiB"), (64 * MIB, "64MiB")]
    } else if eight {
        &[(GIB, "1GiB"), (2 * GIB, "2GiB"), (8 * GIB, "8GiB")]
    } else {
        &[(GIB, "1GiB"), (2 * GIB, "2GiB")]
    };
    for &(table, label) in sizes {
        if table > GIB && free_bytes(&scratch.0) < 12 * GIB as u64 {
            eprintln!("commit bench: less than 12 GiB free in the temp directory: {label} skipped");
            continue;
        }
        let path = fresh(scratch, &format!("one-{label}"));
        let t = Instant::now();
        let n = build_map_store(&path, table);
        eprintln!(
            "commit bench: {label} map of {n} entries built in {:.1?}",
            t.elapsed()
        );
        let store = Store::open(&path).expect("open");
        black_box(read_all(&store));
        let mut key = 0u64;
        group.bench_function(BenchmarkId::new("store", label), |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    key = (key + 7919) % n as u64;
                    *store
                        .root_mut::<Map>(ROOT)
                        .expect("root")
                        .get_mut(&key)
                        .expect("key") += 1;
                    store.commit().expect("commit");
                }
                t.elapsed()
            })
        });
        store.close().expect("close");
        let _ = std::fs::remove_dir_all(&path);
    }
    let n = if quick() { 100_000 } else { 1_000_000 };
    let label = if quick() { "1e5" } else { "1e6" };
    let dir = fresh(scratch, "one-heed");
    if let Some(env) = heed_env(&dir) {
        let db = heed_db(&env);
        heed_fill(&env, db, n);
        let mut i = 0u64;
        group.bench_function(BenchmarkId::new("heed", label), |b| {
            b.iter(|| {
                i += 1;
                let mut wtxn = env.write_txn().expect("heed write txn");
                db.put(&mut wtxn, &(i % n as u64), &i).expect("heed put");
                wtxn.commit().expect("heed commit");
            })
        });
    }
    let dir = fresh(scratch, "one-redb");
    std::fs::create_dir_all(&dir).expect("redb folder");
    let db = redb::Database::create(dir.join("db.redb")).expect("redb create");
    redb_fill(&db, n);
    let mut i = 0u64;
    group.bench_function(BenchmarkId::new("redb", label), |b| {
        b.iter(|| {
            i += 1;
            let wtxn = db.begin_write().expect("redb write txn");
            wtxn.open_table(REDB_TABLE)
                .expect("redb table")
                .insert(i % n as u64, i)
                .expect("redb insert");
            wtxn.commit().expect("redb commit");
        })
    });
    group.finish();
}

fn commit_batches(c: &mut Criterion, scratch: &Scratch) {
    let n = if quick() { 100_000 } else { 1_000_000 };
    const BATCH: usize = 1000;
    let keys: Vec<(u64, u64)> = entries(n).collect();
    let mut group = c.benchmark_group("commit_batches");
    budget(&mut group, 20);
    group.throughput(Throughput::Elements(n as u64));
    let label = if quick() { "1e5" } else { "1e6" };
    group.bench_function(BenchmarkId::new("store", label), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let path = fresh(scratch, "batches-store");
                let store = Store::create(&path).expect("create");
                let map: Map = StoreMap::with_hasher_in(FixedState::default(), store.allocator());
                store.set_root(ROOT, map).expect("set_root");
                store.commit().expect("commit");
                let t = Instant::now();
                for batch in keys.chunks(BATCH) {
                    store
                        .root_mut::<Map>(ROOT)
                        .expect("root")
                        .extend(batch.iter().copied());
                    store.commit().expect("commit");
                }
                total += t.elapsed();
                store.close().expect("close");
            }
            total
        })
    });
    group.bench_function(BenchmarkId::new("heed", label), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = fresh(scratch, "batches-heed");
                let Some(env) = heed_env(&dir) else {
                    return Duration::from_secs(1);
                };
                let db = heed_db(&env);
                let t = Instant::now();
                for batch in keys.chunks(BATCH) {
                    let mut wtxn = env.write_txn().expect("heed write txn");
                    for (k, v) in batch {
                        db.put(&mut wtxn, k, v).expect("heed put");
                    }
                    wtxn.commit().expect("heed commit");
                }
                total += t.elapsed();
            }
            total
        })
    });
    group.bench_function(BenchmarkId::new("redb", label), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = fresh(scratch, "batches-redb");
                std::fs::create_dir_all(&dir).expect("redb folder");
                let db = redb::Database::create(dir.join("db.redb")).expect("redb create");
                let t = Instant::now();
                for batch in keys.chunks(BATCH) {
                    let wtxn = db.begin_write().expect("redb write txn");
                    {
                        let mut table = wtxn.open_table(REDB_TABLE).expect("redb table");
                        for (k, v) in batch {
                            table.insert(*k, *v).expect("redb insert");
                        }
                    }
                    wtxn.commit().expect("redb commit");
                }
                total += t.elapsed();
            }
            total
        })
    });
    group.finish();
}

fn commit_bulk(c: &mut Criterion, scratch: &Scratch) {
    let bytes = if quick() { 64 * MIB } else { GIB };
    let label = if quick() { "64MiB" } else { "1GiB" };
    let mut group = c.benchmark_group("commit_bulk");
    budget(&mut group, 30);
    group.throughput(Throughput::Bytes(bytes as u64));
    let path = fresh(scratch, "bulk");
    let mut store = Store::create(&path).expect("create");
    let mut v = StoreVec::new_in(store.allocator());
    v.resize(bytes / 8, 0u64);
    store.set_root("v", v).expect("set_root");
    store.commit().expect("commit");
    let mut round = 0u64;
    group.bench_function(BenchmarkId::new("store", label), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                round += 1;
                for x in store
                    .root_mut::<StoreVec<u64>>("v")
                    .expect("root")
                    .iter_mut()
                {
                    *x = round;
                }
                let t = Instant::now();
                store.commit().expect("commit");
                total += t.elapsed();
                // The private copies given back between iterations (not timed).
                store.trim().expect("trim");
            }
            total
        })
    });
    store.close().expect("close");
    let file = scratch.path("dd.out");
    group.bench_function(BenchmarkId::new("dd", label), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let _ = std::fs::remove_file(&file);
                let t = Instant::now();
                let status = std::process::Command::new("dd")
                    .arg("if=/dev/zero")
                    .arg(format!("of={}", file.display()))
                    .args(["bs=1M", &format!("count={}", bytes / MIB), "conv=fsync"])
                    .stderr(std::process::Stdio::null())
                    .status()
                    .expect("dd");
                total += t.elapsed();
                assert!(status.success());
            }
            total
        })
    });
    group.finish();
    let _ = std::fs::remove_file(&file);
    let _ = std::fs::remove_dir_all(&path);
}

/// A child process opens the store, changes `changes` entries, commits and dies (no
/// checkpoint: the commit is in the log).
fn crash_after_commit(path: &Path, n: usize, changes: usize) {
    // SAFETY: the child only uses the store and `_exit`s; this process has no other thread
    // running (criterion measures on this thread).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let store = Store::open(path).expect("child: open");
        {
            let mut map = store.root_mut::<Map>(ROOT).expect("child: root");
            for i in 0..changes as u64 {
                *map.get_mut(&(i * 7919 % n as u64)).expect("key") += 1;
            }
        }
        store.commit().expect("child: commit");
        std::mem::forget(store);
        // SAFETY: ends the child at once, as a crash would.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: our child; `status` is ours.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "the writer failed"
    );
}

fn open_after_crash(c: &mut Criterion, scratch: &Scratch) {
    let table = if quick() { 64 * MIB } else { GIB };
    let label = if quick() { "64MiB" } else { "1GiB" };
    let path = fresh(scratch, "crash");
    let n = build_map_store(&path, table);
    let mut group = c.benchmark_group("open_after_crash");
    budget(&mut group, 10);
    group.bench_function(BenchmarkId::new("replay", label), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                crash_after_commit(&path, n, 1000);
                let t = Instant::now();
                let store = Store::open(&path).expect("open");
                total += t.elapsed();
                let recovered = store.recovered().expect("the writer died");
                assert_eq!(recovered.commits_replayed, 1);
                store.close().expect("close");
            }
            total
        })
    });
    group.bench_function(BenchmarkId::new("clean", label), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let t = Instant::now();
                let store = Store::open(&path).expect("open");
                total += t.elapsed();
                store.close().expect("close");
            }
            total
        })
    });
    group.finish();
    let _ = std::fs::remove_dir_all(&path);
}

fn inserts_between_commits(c: &mut Criterion, scratch: &Scratch) {
    let (base, more) = if quick() {
        (100_000, 10_000)
    } else {
        (1_000_000, 100_000)
    };
    let keys: Vec<(u64, u64)> = entries(base + more).collect();
    let (old, new) = keys.split_at(base);
    let mut group = c.benchmark_group("inserts_between_commits");
    budget(&mut group, 10);
    group.throughput(Throughput::Elements(more as u64));
    let label = if quick() { "1e4" } else { "1e5" };
    group.bench_function(BenchmarkId::new("store", label), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let path = fresh(scratch, "between");
                let store = Store::create(&path).expect("create");
                let mut map: Map =
                    StoreMap::with_hasher_in(FixedState::default(), store.allocator());
                map.extend(old.iter().copied());
                store.set_root(ROOT, map).expect("set_root");
                store.commit().expect("commit");
                let t = Instant::now();
                store
                    .root_mut::<Map>(ROOT)
                    .expect("root")
                    .extend(new.iter().copied());
                total += t.elapsed();
                store.close().expect("close");
            }
            total
        })
    });
    group.bench_function(BenchmarkId::new("mmapvec", label), |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut map = hashbrown::HashMap::with_hasher_in(
                    FixedState::default(),
                    MmapAllocator::default(),
                );
                map.extend(old.iter().copied());
                let t = Instant::now();
                map.extend(new.iter().copied());
                total += t.elapsed();
                black_box(&map);
            }
            total
        })
    });
    group.finish();
}

fn main() {
    let mut c = Criterion::default().configure_from_args();
    let scratch = Scratch::new("commit");
    commit_one(&mut c, &scratch);
    commit_batches(&mut c, &scratch);
    commit_bulk(&mut c, &scratch);
    open_after_crash(&mut c, &scratch);
    inserts_between_commits(&mut c, &scratch);
    c.final_summary();
}
