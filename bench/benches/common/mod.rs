//! What the benches of the persistent store share (`store.rs`, `commit.rs`): the quick mode,
//! random keys, criterion's settings for long iterations, the run's folder, and LMDB (heed)
//! and redb set up the same way for both.

#![allow(dead_code)] // each bench uses its own part

use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{BenchmarkGroup, SamplingMode};

pub const KIB: usize = 1 << 10;
pub const MIB: usize = 1 << 20;
pub const GIB: usize = 1 << 30;

pub fn quick() -> bool {
    std::env::var("MMAPVEC_BENCH_QUICK").is_ok_and(|v| !v.is_empty() && v != "0")
}

/// xorshift64: a permutation of the non-zero `u64`, so the first 2^64 - 1 keys are distinct.
#[derive(Clone)]
pub struct Keys(pub u64);

impl Keys {
    pub fn new() -> Keys {
        Keys(0x2545_F491_4F6C_DD1D)
    }
}

impl Iterator for Keys {
    type Item = u64;
    fn next(&mut self) -> Option<u64> {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        Some(x)
    }
}

/// `(key, index)` for the first `n` keys.
pub fn entries(n: usize) -> impl Iterator<Item = (u64, u64)> {
    Keys::new().take(n).zip(0..)
}

/// Criterion settings for iterations of milliseconds to seconds: flat sampling, few samples.
pub fn budget(group: &mut BenchmarkGroup<'_, WallTime>, measure_secs: u64) {
    let (warm_up, measure, samples) = if quick() {
        (Duration::from_millis(50), Duration::from_millis(300), 10)
    } else {
        (
            Duration::from_millis(500),
            Duration::from_secs(measure_secs),
            10,
        )
    };
    group
        .warm_up_time(warm_up)
        .measurement_time(measure)
        .sample_size(samples)
        .sampling_mode(SamplingMode::Flat);
}

/// The run's folder in the temp directory, removed on drop (panics included).
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(bench: &str) -> Scratch {
        let dir =
            std::env::temp_dir().join(format!("mmapvec-bench-{bench}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).expect("create the bench's folder in the temp directory");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Free bytes for an unprivileged user in the file system of `dir`.
pub fn free_bytes(dir: &Path) -> u64 {
    let c = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: `statvfs` fills the zeroed struct we own from a NUL-terminated path.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut s) != 0 {
            return 0;
        }
        s.f_bavail as u64 * s.f_frsize as u64
    }
}

/// A fresh folder under the scratch one for one iteration's database.
pub fn fresh(scratch: &Scratch, name: &str) -> PathBuf {
    let p = scratch.path(name);
    let _ = fs::remove_dir_all(&p);
    p
}

pub fn heed_env(dir: &Path) -> Option<heed::Env> {
    fs::create_dir_all(dir).ok()?;
    let mut opts = heed::EnvOpenOptions::new();
    opts.map_size(64 * GIB).max_dbs(1);
    // SAFETY: the folder is this run's own; no other process opens it.
    match unsafe { opts.open(dir) } {
        Ok(env) => Some(env),
        Err(e) => {
            eprintln!("store bench: heed (LMDB) cannot open an environment here: {e}; skipped");
            None
        }
    }
}

pub type HeedU64 = heed::types::U64<heed::byteorder::NativeEndian>;
pub type HeedDb<'e> = heed::Database<'e, HeedU64, HeedU64>;

/// The environment's unnamed database, created (and committed) untimed.
pub fn heed_db(env: &heed::Env) -> HeedDb<'_> {
    let wtxn = env.write_txn().expect("heed write txn");
    env.create_databases_and_commit(wtxn, |opener, wtxn| {
        opener
            .create_database::<HeedU64, HeedU64>(wtxn, None)
            .map(heed::CommitOrAbort::<_, ()>::Commit)
    })
    .expect("heed db")
    .unwrap_commit()
}

/// `n` puts in one write transaction, committed (synced).
pub fn heed_fill(env: &heed::Env, db: HeedDb<'_>, n: usize) {
    let mut wtxn = env.write_txn().expect("heed write txn");
    for (k, v) in entries(n) {
        db.put(&mut wtxn, &k, &v).expect("heed put");
    }
    wtxn.commit().expect("heed commit");
}

pub const REDB_TABLE: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("map");

/// `n` inserts in one write transaction, committed (synced).
pub fn redb_fill(db: &redb::Database, n: usize) {
    let wtxn = db.begin_write().expect("redb write txn");
    {
        let mut table = wtxn.open_table(REDB_TABLE).expect("redb table");
        for (k, v) in entries(n) {
            table.insert(k, v).expect("redb insert");
        }
    }
    wtxn.commit().expect("redb commit");
}
