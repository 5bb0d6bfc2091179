//! The programs `scripts/out-of-core-test` runs inside a memory-limited cgroup.
//!
//! ```text
//! oom_probe mmapvec-fill <size> [OPTIONS]   fill an MmapVec<u64> by push, then verify it
//! oom_probe hashmap-fill <size> [OPTIONS]   fill a hashbrown map whose table is >= size, verify
//! oom_probe std-fill <size>                 the same fill as mmapvec-fill with a std Vec<u64>
//! oom_probe small-vectors <count>           <count> live MmapVec<u32> of 8 each, in an
//!                                           MmapVec of them, then verify them all
//! oom_probe std-small-vectors <count>       the same with Vec<Vec<u32>>
//! oom_probe store-build <size> --dir <path> a persistent store in <path>/store: an
//!                                           Vec<u64> of size/2 and a map whose table is
//!                                           >= size/2, kept as roots, closed
//! oom_probe store-verify <size> --dir <path> reopen that store (a new process), check every
//!                                           element and entry, add more, close
//!
//! OPTIONS: --dir <path>                     where segments go (default: the temp directory)
//!          --access sequential|random|willneed   the allocator's access pattern hint
//!          --random-lookups <n>             hashmap-fill: then time n random lookups
//! ```
//!
//! Sizes are bytes with an optional `K`/`M`/`G` suffix (powers of 1024); a count takes the same
//! suffixes. Each run ends with one
//! `RESULT key=value ...` line that the script parses; a failed check exits with status 1.
//! Under a limit far below `<size>`, `std-fill` is expected to be killed by the OOM killer.

use std::hash::{BuildHasher, Hasher};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use mmapvec::store::{PersistHasher, Store, StoreMap, StoreVec};
use mmapvec::{AccessPattern, MmapAllocator, MmapVec};

const USAGE: &str = "usage: oom_probe <mmapvec-fill|hashmap-fill|std-fill|small-vectors|\
                     std-small-vectors|store-build|store-verify> <size or count> \
                     [--dir <path>] [--access sequential|random|willneed] [--random-lookups <n>]";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("oom_probe: {message}");
            ExitCode::FAILURE
        }
    }
}

struct Options {
    dir: Option<PathBuf>,
    access: Option<AccessPattern>,
    random_lookups: u64,
}

impl Options {
    fn allocator(&self) -> Result<MmapAllocator, String> {
        let mut builder = MmapAllocator::builder();
        if let Some(dir) = &self.dir {
            builder = builder.dir(dir);
        }
        if let Some(access) = self.access {
            builder = builder.access_pattern(access);
        }
        builder
            .build()
            .map_err(|e| format!("cannot set up the allocator: {e}"))
    }
}

fn run() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let command = args.next().ok_or(USAGE)?;
    let size = parse_size(&args.next().ok_or(USAGE)?)?;
    let mut options = Options {
        dir: None,
        access: None,
        random_lookups: 0,
    };
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--dir" => options.dir = Some(PathBuf::from(value()?)),
            "--access" => {
                options.access = Some(match value()?.as_str() {
                    "sequential" => AccessPattern::Sequential,
                    "random" => AccessPattern::Random,
                    "willneed" => AccessPattern::WillNeed,
                    other => return Err(format!("unknown access pattern {other:?}")),
                });
            }
            "--random-lookups" => {
                let text = value()?;
                options.random_lookups = text.parse().map_err(|_| format!("bad count {text:?}"))?;
            }
            other => return Err(format!("unexpected argument {other:?}\n{USAGE}")),
        }
    }
    match command.as_str() {
        "mmapvec-fill" => mmapvec_fill(size, options.allocator()?),
        "hashmap-fill" => hashmap_fill(size, options.allocator()?, options.random_lookups),
        "std-fill" => std_fill(size),
        "small-vectors" => small_vectors(size, options.allocator()?),
        "std-small-vectors" => std_small_vectors(size),
        "store-build" => store_build(size, &options.dir.ok_or("store-build needs --dir")?),
        "store-verify" => store_verify(size, &options.dir.ok_or("store-verify needs --dir")?),
        other => Err(format!("unknown command {other:?}\n{USAGE}")),
    }
}

/// `4G`, `512M`, `64K`, `1048576`: bytes, suffixes in powers of 1024.
fn parse_size(text: &str) -> Result<usize, String> {
    let bad = || format!("bad size {text:?} (examples: 2G, 512M, 1048576)");
    let (digits, shift) = match text.as_bytes().last().map(u8::to_ascii_uppercase) {
        Some(b'K') => (&text[..text.len() - 1], 10),
        Some(b'M') => (&text[..text.len() - 1], 20),
        Some(b'G') => (&text[..text.len() - 1], 30),
        _ => (text, 0),
    };
    let n: usize = digits.parse().map_err(|_| bad())?;
    n.checked_mul(1 << shift).ok_or_else(bad)
}

/// The value stored at index `i`: a cheap bijective mix (splitmix64's finalizer), so a page of
/// zeros or a page from the wrong offset cannot pass verification.
fn pattern(i: u64) -> u64 {
    let mut z = i.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn mb_per_s(bytes: usize, secs: f64) -> f64 {
    bytes as f64 / secs / 1e6
}

/// A line of `/proc/self/status` in bytes (`VmHWM`, `RssAnon`, ...), 0 if unavailable.
fn status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

fn mmapvec_fill(size: usize, alloc: MmapAllocator) -> Result<(), String> {
    let n = size / size_of::<u64>();
    let mut v: MmapVec<u64> = MmapVec::new_in(alloc.clone());
    let start = Instant::now();
    for i in 0..n as u64 {
        v.push(pattern(i));
    }
    let fill = start.elapsed().as_secs_f64();
    let peak_mapped = alloc.stats().mapped_bytes;

    let start = Instant::now();
    let bad = v
        .iter()
        .zip(0u64..)
        .filter(|&(&x, i)| x != pattern(i))
        .count();
    let verify = start.elapsed().as_secs_f64();
    let stats = alloc.stats();
    println!(
        "mmapvec-fill: {n} u64 ({:.2} GiB) pushed in {fill:.2} s ({:.0} MB/s), \
         verified in {verify:.2} s ({:.0} MB/s), {bad} wrong",
        size as f64 / (1u64 << 30) as f64,
        mb_per_s(size, fill),
        mb_per_s(size, verify),
    );
    println!(
        "mmapvec-fill: {} grows by mremap, {} MiB mapped; VmHWM {} MiB (file pages included), \
         RssAnon {} MiB",
        stats.grows_remapped,
        peak_mapped >> 20,
        status_bytes("VmHWM") >> 20,
        status_bytes("RssAnon") >> 20,
    );
    println!(
        "RESULT kind=mmapvec-fill bytes={size} fill_secs={fill:.3} fill_mb_s={:.1} \
         verify_mb_s={:.1} wrong={bad}",
        mb_per_s(size, fill),
        mb_per_s(size, verify),
    );
    if bad != 0 || v.len() != n {
        return Err(format!(
            "verification failed: {bad} wrong values, len {}",
            v.len()
        ));
    }
    Ok(())
}

fn std_fill(size: usize) -> Result<(), String> {
    let n = size / size_of::<u64>();
    let mut v: Vec<u64> = Vec::new();
    let start = Instant::now();
    for i in 0..n as u64 {
        v.push(pattern(i));
    }
    let fill = start.elapsed().as_secs_f64();
    let bad = v
        .iter()
        .zip(0u64..)
        .filter(|&(&x, i)| x != pattern(i))
        .count();
    // Reaching this line under a limit below `size` means the limit did not bite.
    println!(
        "std-fill: {n} u64 pushed in {fill:.2} s ({:.0} MB/s), {bad} wrong, VmHWM {} MiB",
        mb_per_s(size, fill),
        status_bytes("VmHWM") >> 20,
    );
    println!(
        "RESULT kind=std-fill bytes={size} fill_mb_s={:.1}",
        mb_per_s(size, fill)
    );
    Ok(())
}

/// The eight values of small vector `i`.
fn small_values(i: usize) -> impl Iterator<Item = u32> {
    let base = pattern(i as u64) as u32;
    (0..8).map(move |j| base.wrapping_add(j))
}

/// `count` live `MmapVec<u32>` of 8 elements each (blocks of the small-block tier), held in an
/// `MmapVec` of them (a segment), then all verified.
fn small_vectors(count: usize, alloc: MmapAllocator) -> Result<(), String> {
    let start = Instant::now();
    let mut outer: MmapVec<MmapVec<u32>> = MmapVec::with_capacity_in(count, alloc.clone());
    for i in 0..count {
        let mut v = MmapVec::with_capacity_in(8, alloc.clone());
        v.extend(small_values(i));
        outer.push(v);
    }
    let build = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let bad = outer
        .iter()
        .enumerate()
        .filter(|(i, v)| !v.iter().copied().eq(small_values(*i)))
        .count();
    let verify = start.elapsed().as_secs_f64();
    let stats = alloc.stats();
    println!(
        "small-vectors: {count} vectors built in {build:.2} s, verified in {verify:.2} s, {bad} \
         wrong; {} MiB in {} chunk files, {} segment(s); VmHWM {} MiB, RssAnon {} MiB",
        stats.small.arena_bytes >> 20,
        stats.small.chunks_created - stats.small.chunks_released,
        stats.live_segments,
        status_bytes("VmHWM") >> 20,
        status_bytes("RssAnon") >> 20,
    );
    println!(
        "RESULT kind=small-vectors count={count} build_secs={build:.2} verify_secs={verify:.2} \
         bad={bad}"
    );
    if bad > 0 {
        return Err(format!("{bad} vectors read back wrong"));
    }
    Ok(())
}

/// The same as [`small_vectors`] with `Vec<Vec<u32>>`: under a limit below its size, it is
/// expected to be killed by the OOM killer.
fn std_small_vectors(count: usize) -> Result<(), String> {
    let start = Instant::now();
    let mut outer: Vec<Vec<u32>> = Vec::with_capacity(count);
    for i in 0..count {
        let mut v = Vec::with_capacity(8);
        v.extend(small_values(i));
        outer.push(v);
    }
    let build = start.elapsed().as_secs_f64();
    let bad = outer
        .iter()
        .enumerate()
        .filter(|(i, v)| !v.iter().copied().eq(small_values(*i)))
        .count();
    println!(
        "std-small-vectors: {count} vectors built in {build:.2} s, {bad} wrong, VmHWM {} MiB",
        status_bytes("VmHWM") >> 20
    );
    println!("RESULT kind=std-small-vectors count={count} build_secs={build:.2} bad={bad}");
    Ok(())
}

/// Hashes key `k` to bucket `k * 8 / 7` (low bits) with a mixed tag (top 7 bits, hashbrown's
/// `h2`). Keys inserted in increasing order then fill the table front to back, one bucket each,
/// leaving one bucket in eight empty in every stretch, as in a table at its full 7/8 load: a
/// lookup of a missing key stops at the first group it reads, as with a good hash.
///
/// Why not a random order: a table larger than memory filled in random order touches a page
/// that is not resident at nearly every insert, and each such insert waits for a disk read and
/// a write-back. That is the cost of random I/O, the same with any allocator; the in-order
/// fill is what a bulk load of data sorted by hash does.
#[derive(Clone, Copy, Debug, Default)]
struct BucketOrder;

#[derive(Debug, Default)]
struct BucketOrderHasher(u64);

impl BuildHasher for BucketOrder {
    type Hasher = BucketOrderHasher;
    fn build_hasher(&self) -> BucketOrderHasher {
        BucketOrderHasher(0)
    }
}

impl Hasher for BucketOrderHasher {
    fn finish(&self) -> u64 {
        const TAG_BITS: u64 = 0x7F << 57;
        ((self.0.wrapping_mul(8) / 7) & !TAG_BITS) | (pattern(self.0) & TAG_BITS)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

// SAFETY: `BucketOrder` holds nothing (no pointer), and its hashes depend on the hashed data
// only: the same in every process.
unsafe impl PersistHasher for BucketOrder {
    const LAYOUT: u64 = mmapvec::store::type_fingerprint("oom_probe::BucketOrder", 0, 1);

    fn probe() -> u64 {
        BucketOrder.hash_one(0x5eed_u64)
    }
}

type StoreTable<'s> = StoreMap<'s, u64, u64, BucketOrder>;

/// The sizes of `store-build`'s vector (elements) and map (entries) for `size` bytes.
fn store_sizes(size: usize) -> (usize, usize) {
    let elements = size / 2 / size_of::<u64>();
    let buckets = (size / 2)
        .div_ceil(size_of::<(u64, u64)>() + 1)
        .next_power_of_two();
    (elements, buckets / 8 * 7)
}

fn store_build(size: usize, dir: &std::path::Path) -> Result<(), String> {
    let (elements, entries) = store_sizes(size);
    let path = dir.join("store");
    let start = Instant::now();
    let store = Store::create(&path).map_err(|e| format!("create {}: {e}", path.display()))?;
    let alloc = store.allocator();
    let mut vec = StoreVec::new_in(alloc);
    for i in 0..elements as u64 {
        vec.push(pattern(i));
    }
    let mut map: StoreTable = StoreMap::with_capacity_and_hasher_in(entries, BucketOrder, alloc);
    for key in 0..entries as u64 {
        map.insert(key, pattern(key));
    }
    store.set_root("vec", vec).map_err(|e| e.to_string())?;
    store.set_root("map", map).map_err(|e| e.to_string())?;
    let stats = store.stats();
    store.close().map_err(|e| format!("close: {e}"))?;
    let build = start.elapsed().as_secs_f64();
    println!(
        "store-build: {elements} elements and {entries} entries, {} MiB of blocks, built and \
         closed (flushed) in {build:.2} s",
        stats.segment_bytes >> 20
    );
    println!(
        "RESULT kind=store-build bytes={} build_secs={build:.3}",
        stats.segment_bytes
    );
    Ok(())
}

fn store_verify(size: usize, dir: &std::path::Path) -> Result<(), String> {
    let (elements, entries) = store_sizes(size);
    let path = dir.join("store");
    let start = Instant::now();
    let store = Store::open(&path).map_err(|e| format!("open {}: {e}", path.display()))?;
    let mut map = store
        .root_mut::<StoreTable>("map")
        .map_err(|e| e.to_string())?;
    let vec = store
        .root::<StoreVec<u64>>("vec")
        .map_err(|e| e.to_string())?;
    let opened = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut bad = usize::from(vec.len() != elements) + usize::from(map.len() != entries);
    bad += vec
        .iter()
        .enumerate()
        .filter(|&(i, &x)| x != pattern(i as u64))
        .count();
    bad += (0..entries as u64)
        .filter(|key| map.get(key) != Some(&pattern(*key)))
        .count();
    let verify = start.elapsed().as_secs_f64();
    // The reopened map keeps working: more entries, then a clean close.
    for key in entries as u64..entries as u64 + 1000 {
        map.insert(key, pattern(key));
    }
    drop((map, vec));
    store.close().map_err(|e| format!("close: {e}"))?;
    println!(
        "store-verify: reopened in {:.2} ms, {elements} elements and {entries} entries checked \
         in {verify:.2} s ({:.0} MB/s), {bad} wrong",
        opened * 1e3,
        mb_per_s(size, verify)
    );
    println!(
        "RESULT kind=store-verify open_ms={:.3} verify_secs={verify:.3} wrong={bad}",
        opened * 1e3
    );
    if bad == 0 {
        Ok(())
    } else {
        Err(format!("{bad} wrong elements or entries"))
    }
}

fn hashmap_fill(size: usize, alloc: MmapAllocator, probes: u64) -> Result<(), String> {
    // hashbrown's table: a power-of-two number of buckets, each a 16-byte entry and a control
    // byte, of which 7/8 may be used.
    let buckets = size
        .div_ceil(size_of::<(u64, u64)>() + 1)
        .next_power_of_two();
    let n = buckets / 8 * 7;
    let mut map: hashbrown::HashMap<u64, u64, BucketOrder, MmapAllocator> =
        hashbrown::HashMap::with_capacity_and_hasher_in(n, BucketOrder, alloc.clone());
    let table = alloc.stats().mapped_bytes;
    if (table as usize) < size {
        return Err(format!(
            "the table is {table} bytes, below the {size} asked"
        ));
    }

    eprintln!(
        "hashmap-fill: table of {} MiB made, inserting {n} keys",
        table >> 20
    );
    let start = Instant::now();
    for key in 0..n as u64 {
        map.insert(key, pattern(key));
    }
    eprintln!(
        "hashmap-fill: inserted in {:.2} s",
        start.elapsed().as_secs_f64()
    );
    let fill = start.elapsed().as_secs_f64();
    let grew = alloc.stats().creates > 1;

    let start = Instant::now();
    let bad = (0..n as u64)
        .filter(|key| map.get(key) != Some(&pattern(*key)))
        .count();
    let verify = start.elapsed().as_secs_f64();
    eprintln!("hashmap-fill: looked up in order in {verify:.2} s");

    // Random lookups, hits and misses: each likely a page read from disk. Optional: with a
    // large device read-ahead and no `AccessPattern::Random` hint, each one can read megabytes
    // (see docs/out-of-core.md).
    let start = Instant::now();
    let mut random_bad = 0;
    for i in 0..probes {
        let key = pattern(i ^ 0xABCD) % (2 * n as u64);
        let expect = (key < n as u64).then(|| pattern(key));
        random_bad += usize::from(map.get(&key).copied() != expect);
    }
    let random = start.elapsed().as_secs_f64();

    println!(
        "hashmap-fill: {n} entries in a {} MiB table ({buckets} buckets): inserted in {fill:.2} s \
         ({:.1} M/s, {:.0} MB/s of table), looked up in order in {verify:.2} s, {bad} wrong",
        table >> 20,
        n as f64 / fill / 1e6,
        mb_per_s(table as usize, fill),
    );
    if probes > 0 {
        println!(
            "hashmap-fill: {probes} random lookups in {random:.2} s ({:.0}/s), {random_bad} wrong",
            probes as f64 / random,
        );
    }
    println!(
        "hashmap-fill: VmHWM {} MiB (file pages included), RssAnon {} MiB",
        status_bytes("VmHWM") >> 20,
        status_bytes("RssAnon") >> 20,
    );
    println!(
        "RESULT kind=hashmap-fill table_bytes={table} entries={n} insert_secs={fill:.3} \
         in_order_secs={verify:.3} random_lookups_per_s={:.0} wrong={} rehashed={grew}",
        if probes > 0 {
            probes as f64 / random
        } else {
            0.0
        },
        bad + random_bad
    );
    if bad + random_bad != 0 || map.len() != n || grew {
        return Err(format!(
            "verification failed: {bad} + {random_bad} wrong, len {}, rehashed {grew}",
            map.len()
        ));
    }
    Ok(())
}
