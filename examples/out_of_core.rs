//! The main example: an out-of-core job on GiBs of generated events, with [`MmapVec`] and an
//! on-disk hashbrown map.
//!
//! ```text
//! cargo run --release --example out_of_core                  # the built-in size, 3 GiB
//! cargo run --release --example out_of_core -- --size 8G --dir /var/tmp
//! cargo run --release --example out_of_core -- --help
//! ```
//!
//! The job is a log-processing pipeline. The event source delivers "at least once", so some
//! events arrive twice, and a few users produce most events (a power law). The program
//!
//! 1. **generates** the events (32-byte records) into an `MmapVec`, one `push` at a time: the
//!    vector grows by `mremap`, no byte is copied;
//! 2. **counts** events per user in a `hashbrown::HashMap` whose table lives on the same
//!    allocator (hash aggregation over the raw stream);
//! 3. **sorts** the vector in runs, one run per core at a time (`sort_unstable` in place);
//! 4. **merges** the runs into a second `MmapVec`, keeping one copy of duplicates (`sort -u`);
//! 5. **verifies** the result: strictly increasing, a checksum proving that sort and merge lost
//!    or invented nothing, and a scan of the sorted users that agrees with the hash map.
//!
//! Every big buffer is a memory-mapped file in the temp directory (or `--dir`): the job needs
//! disk space, not RAM. Under a memory limit the kernel writes pages back and drops them; see
//! `docs/out-of-core.md` for a run in a cgroup of a third of the data's size.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use hashbrown::{DefaultHashBuilder, HashMap};
use indicatif::{ProgressBar, ProgressStyle};
use mmapvec::{DirCreator, MmapAllocator, MmapVec};

/// The built-in size: real out-of-core work (the events, their sorted copy and the map are
/// over 6 GiB of segments at the peak), done in well under a minute on 2 cores.
const DEFAULT_SIZE: u64 = 3 << 30;

const HELP: &str = "\
out_of_core: generate, count, sort, deduplicate and verify GiBs of events with mmapvec

USAGE:
    cargo run --release --example out_of_core -- [OPTIONS]

OPTIONS:
    --size <SIZE>    how much event data to generate; default 3G. Bytes, or a number with a
                     K, M, G or T suffix in powers of 1024 (1.5G, 512MiB and 4gb work too).
                     Each event is 32 bytes.
    --records <N>    generate exactly N events instead of --size
    --dir <PATH>     where the segment files go; default: the temp directory ($TMPDIR, else
                     /tmp). It must exist, and should be on a disk rather than tmpfs.
    -h, --help       print this help

Disk space needed: about 2.2x --size at the peak (the events, their sorted copy, the map).
Memory needed: little. Pages are written to disk and dropped when memory is short.";

/// One event: who, when, what, how much. 32 bytes; the derived order sorts by user, then time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(C)]
struct Event {
    user: u64,
    time: u64,
    kind: u64,
    value: u64,
}

/// Events per user, counted by hash aggregation; its table is a segment like any vector.
type UserCounts = HashMap<u64, u64, DefaultHashBuilder, MmapAllocator>;

#[derive(Debug)]
struct Options {
    records: u64,
    dir: Option<PathBuf>,
}

fn main() -> ExitCode {
    let options = match parse_args(std::env::args().skip(1)) {
        Ok(Some(options)) => options,
        Ok(None) => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(message) => {
            eprintln!("out_of_core: {message}\nTry --help.");
            return ExitCode::from(2);
        }
    };
    match run(&options) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("out_of_core: a check FAILED (see above)");
            ExitCode::FAILURE
        }
        Err(message) => {
            eprintln!("out_of_core: {message}");
            ExitCode::FAILURE
        }
    }
}

/// The options, or `None` for `--help`. Accepts `--flag value` and `--flag=value`.
fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Option<Options>, String> {
    let mut size = DEFAULT_SIZE;
    let mut records = None;
    let mut dir = None;
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) if flag.starts_with("--") => {
                (flag.to_owned(), Some(value.to_owned()))
            }
            _ => (arg, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or(format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(None),
            "--size" => size = parse_size(&value()?)?,
            "--records" => {
                let text = value()?;
                let n = text.replace('_', "").parse::<u64>().ok().filter(|&n| n > 0);
                records = Some(n.ok_or(format!("bad --records {text:?}: want a positive count"))?);
            }
            "--dir" => dir = Some(PathBuf::from(value()?)),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    let records = records.unwrap_or(size / size_of::<Event>() as u64);
    if records == 0 {
        return Err(format!("--size {size} is smaller than one 32-byte event"));
    }
    Ok(Some(Options { records, dir }))
}

/// `3G`, `512M`, `1.5GiB`, `4gb`, `1073741824`: bytes, suffixes in powers of 1024.
fn parse_size(text: &str) -> Result<u64, String> {
    let bad = || format!("bad size {text:?} (examples: 3G, 512M, 1.5G, 1073741824)");
    let lower = text.trim().to_ascii_lowercase();
    let number = lower
        .strip_suffix("ib")
        .or_else(|| lower.strip_suffix('b'))
        .unwrap_or(&lower);
    let (digits, unit) = match number.char_indices().last() {
        Some((i, 'k')) => (&number[..i], 1u64 << 10),
        Some((i, 'm')) => (&number[..i], 1 << 20),
        Some((i, 'g')) => (&number[..i], 1 << 30),
        Some((i, 't')) => (&number[..i], 1 << 40),
        _ => (number, 1),
    };
    let value: f64 = digits.trim().parse().map_err(|_| bad())?;
    let bytes = value * unit as f64;
    if !(bytes.is_finite() && (0.0..u64::MAX as f64).contains(&bytes)) {
        return Err(bad());
    }
    Ok(bytes as u64)
}

fn run(options: &Options) -> Result<bool, String> {
    let n = options.records;
    let input_bytes = n * EVENT_BYTES;
    let dir = options.dir.clone().unwrap_or_else(std::env::temp_dir);
    let alloc = MmapAllocator::builder()
        .dir(&dir)
        .build()
        .map_err(|e| format!("cannot put segments in {}: {e}", dir.display()))?;
    // A second handle on the same folder, only to show where it is and what it is on.
    let creator = DirCreator::open(&dir).map_err(|e| e.to_string())?;
    println!(
        "out_of_core: {} of events ({} records of 32 bytes), segments in {}",
        size(input_bytes),
        thousands(n),
        creator.folder().display()
    );
    if creator.is_ram_backed().unwrap_or(false) {
        println!(
            "  warning: {} is RAM-backed (tmpfs): the segments will take memory, not disk.\n  \
             Pass --dir /var/tmp (or set TMPDIR) to put them on a disk.",
            dir.display()
        );
    }

    let monitor = Monitor::start(alloc.clone());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut phases = Vec::new();
    let job = Instant::now();

    // 1. Generate: a stream of unknown length, so push and let the vector grow.
    let phase = Phase::start("generate (push)", input_bytes);
    let mut events: MmapVec<Event> = MmapVec::new_in(alloc.clone());
    let mut source = EventSource::new(n);
    let mut checksum = 0u64;
    for i in 0..n {
        let event = source.next();
        checksum = checksum.wrapping_add(fingerprint(&event));
        events.push(event);
        if i.is_multiple_of(PROGRESS_STEP) {
            phase.bar.set_position(i * EVENT_BYTES);
        }
    }
    // Growth doubled the capacity (by mremap, no copy); give back the pages and disk blocks
    // past the end now that the length is known.
    events.shrink_to_fit();
    phases.push(phase.finish());

    // 2. Count events per user: hash aggregation over the raw stream.
    let phase = Phase::start("count (hash map)", input_bytes);
    let mut users: UserCounts = HashMap::new_in(alloc.clone());
    for (i, event) in (0u64..).zip(events.iter()) {
        *users.entry(event.user).or_default() += 1;
        if i.is_multiple_of(PROGRESS_STEP) {
            phase.bar.set_position(i * EVENT_BYTES);
        }
    }
    phases.push(phase.finish());

    // 3. Sort in runs, every core busy.
    let phase = Phase::start("sort runs", input_bytes);
    let run_len = run_len(events.len(), threads);
    sort_runs(&mut events, run_len, threads, &phase.bar);
    phases.push(phase.finish());

    // 4. Merge the runs into a new vector, dropping duplicates; then free the events.
    let phase = Phase::start("merge + dedup", input_bytes);
    let merged = merge_unique(&events, run_len, &alloc, &phase.bar);
    phases.push(phase.finish());
    let runs = events.len().div_ceil(run_len);
    drop(events);

    // 5. Verify: walk the sorted users and compare with the hash map.
    let unique = &merged.unique;
    let phase = Phase::start("verify (scan + lookups)", unique.len() as u64 * EVENT_BYTES);
    let groups = check_groups(unique, &users, &phase.bar);
    phases.push(phase.finish());
    let total = job.elapsed().as_secs_f64();
    let peaks = monitor.stop();

    let checks = [
        ("sorted, no duplicate left", merged.out_of_order == 0),
        (
            "checksum unchanged by sort and merge",
            merged.checksum == checksum,
        ),
        (
            "duplicates removed = replays sent",
            merged.duplicates == source.replays,
        ),
        (
            "unique events = generated - replays",
            unique.len() as u64 == n - source.replays,
        ),
        (
            "users in the sorted scan = users in the map",
            groups.users == users.len() as u64,
        ),
        (
            "each user's raw count in the map >= distinct",
            groups.mismatches == 0,
        ),
        (
            "raw - distinct, summed over users = replays",
            groups.replays == source.replays,
        ),
    ];

    println!();
    println!("  {:<25}{:>8}{:>14}", "phase", "time", "throughput");
    for phase in &phases {
        println!(
            "  {:<25}{:>7.2}s{:>9.0} MB/s",
            phase.name,
            phase.secs,
            mb_per_s(phase.bytes, phase.secs)
        );
    }
    let processed: u64 = phases.iter().map(|p| p.bytes).sum();
    println!(
        "  {:<25}{:>7.2}s{:>9.0} MB/s of input ({} through the phases: {:.0} MB/s)",
        "total",
        total,
        mb_per_s(input_bytes, total),
        size(processed),
        mb_per_s(processed, total),
    );
    println!();
    println!(
        "  events  {} generated, {} replays removed, {} unique; {runs} runs sorted on {threads} \
         threads",
        thousands(n),
        thousands(merged.duplicates),
        thousands(unique.len() as u64),
    );
    println!(
        "  users   {}, counted in a hashbrown map on the allocator ({} table)",
        thousands(users.len() as u64),
        size(table_bytes(users.capacity())),
    );
    for (user, count) in top_users(&users, 3) {
        println!(
            "          user {user:016x}: {} events ({:.2}%)",
            thousands(count),
            count as f64 * 100.0 / n as f64
        );
    }
    println!(
        "  memory  peak resident {} (VmHWM) for {} of input; heap (anonymous) peak {}",
        size(peaks.vm_hwm),
        size(input_bytes),
        size(peaks.rss_anon),
    );
    println!(
        "          (the segments' resident pages are page cache, written back and dropped\n           \
         when memory is short: run it in a memory cgroup to see, docs/out-of-core.md)"
    );
    let stats = alloc.stats();
    println!(
        "  disk    peak {} in segments; {} created, {} grown by mremap (no copy), {} shrunk",
        size(peaks.mapped_bytes),
        stats.creates,
        stats.grows_remapped,
        stats.shrinks,
    );
    println!();
    let mut ok = true;
    for (name, passed) in checks {
        println!(
            "  check   {name:<46} {}",
            if passed { "ok" } else { "FAILED" }
        );
        ok &= passed;
    }
    if let Some(err) = alloc.take_last_error() {
        println!("  note    an allocation failed on the way: {err}");
    }
    Ok(ok)
}

const EVENT_BYTES: u64 = size_of::<Event>() as u64;

/// Events between two progress-bar updates.
const PROGRESS_STEP: u64 = 1 << 16;

fn mb_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs.max(1e-9) / 1e6
}

/// A phase of the job: its progress bar while it runs, its time and bytes when done.
struct Phase {
    name: &'static str,
    bytes: u64,
    start: Instant,
    bar: ProgressBar,
}

struct PhaseTime {
    name: &'static str,
    bytes: u64,
    secs: f64,
}

impl Phase {
    fn start(name: &'static str, bytes: u64) -> Phase {
        let style = ProgressStyle::with_template(
            "{prefix:>24} [{bar:30}] {binary_bytes:>10}/{binary_total_bytes} {binary_bytes_per_sec:>12} {eta:>3}",
        )
        .expect("the template is valid")
        .progress_chars("=> ");
        let bar = ProgressBar::new(bytes).with_style(style).with_prefix(name);
        bar.enable_steady_tick(Duration::from_millis(200));
        Phase {
            name,
            bytes,
            start: Instant::now(),
            bar,
        }
    }

    fn finish(self) -> PhaseTime {
        self.bar.finish();
        PhaseTime {
            name: self.name,
            bytes: self.bytes,
            secs: self.start.elapsed().as_secs_f64(),
        }
    }
}

/// splitmix64: small, fast and well mixed; the example needs no `rand`.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix(self.0)
    }
}

/// splitmix64's finalizer: a bijection on `u64` that scatters nearby inputs.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// A term of an order-independent checksum: the sum over all events is the same in any order.
fn fingerprint(e: &Event) -> u64 {
    mix(e.user ^ mix(e.time ^ mix(e.kind ^ mix(e.value))))
}

/// The simulated stream: power-law users, and one event in 16 a replay of a recent one.
struct EventSource {
    rng: SplitMix,
    users: u64,
    originals: u64,
    recent: [Event; 256],
    replays: u64,
}

impl EventSource {
    fn new(records: u64) -> Self {
        let zero = Event {
            user: 0,
            time: 0,
            kind: 0,
            value: 0,
        };
        EventSource {
            rng: SplitMix(0x5EED),
            users: (records / 8).max(1),
            originals: 0,
            recent: [zero; 256],
            replays: 0,
        }
    }

    fn next(&mut self) -> Event {
        let r = self.rng.next();
        if self.originals >= self.recent.len() as u64 && r.is_multiple_of(16) {
            // Delivered again: one of the last 256 original events, byte for byte.
            self.replays += 1;
            return self.recent[(r >> 56) as usize];
        }
        // Rank u^3 for a uniform u in [0, 1): rank 0 is the busiest user, high ranks are rare.
        let u = (self.rng.next() >> 11) as f64 / (1u64 << 53) as f64;
        let rank = (u * u * u * self.users as f64) as u64;
        let r = self.rng.next();
        let event = Event {
            user: mix(rank ^ 0x5555_5555_5555_5555),
            // Unique per original event, so that only replays are exact duplicates.
            time: self.originals * 1000 + r % 1000,
            kind: (r >> 10) % 16,
            value: (r >> 20) % 10_000,
        };
        self.recent[(self.originals % 256) as usize] = event;
        self.originals += 1;
        event
    }
}

/// Run length: at least 4 runs per thread so the cores stay busy and the bar moves; at most
/// 256 MiB, so that the runs being sorted fit in modest memory.
fn run_len(len: usize, threads: usize) -> usize {
    let max = (256 << 20) / size_of::<Event>();
    len.div_ceil(4 * threads).clamp(1, max)
}

/// Sorts each `run_len` run of `events` in place, `threads` runs at a time.
fn sort_runs(events: &mut [Event], run_len: usize, threads: usize, bar: &ProgressBar) {
    let runs = Mutex::new(events.chunks_mut(run_len));
    std::thread::scope(|scope| {
        for _ in 0..threads {
            scope.spawn(|| {
                loop {
                    // A panic elsewhere cannot leave the iterator half-advanced.
                    let next = runs.lock().unwrap_or_else(|e| e.into_inner()).next();
                    let Some(run) = next else { break };
                    run.sort_unstable();
                    bar.inc(run.len() as u64 * EVENT_BYTES);
                }
            });
        }
    });
}

struct Merged {
    unique: MmapVec<Event>,
    duplicates: u64,
    out_of_order: u64,
    checksum: u64,
}

/// k-way merge of the sorted runs into a new vector, keeping one of each run of equal events.
fn merge_unique(
    events: &[Event],
    run_len: usize,
    alloc: &MmapAllocator,
    bar: &ProgressBar,
) -> Merged {
    let runs: Vec<&[Event]> = events.chunks(run_len).collect();
    let mut next = vec![1usize; runs.len()];
    let mut heap: BinaryHeap<Reverse<(Event, usize)>> = runs
        .iter()
        .enumerate()
        .map(|(i, run)| Reverse((run[0], i)))
        .collect();
    // At most every event survives; `shrink_to_fit` below gives back the rest.
    let mut unique: MmapVec<Event> = MmapVec::with_capacity_in(events.len(), alloc.clone());
    let (mut duplicates, mut out_of_order, mut checksum, mut seen) = (0, 0, 0u64, 0u64);
    while let Some(Reverse((event, i))) = heap.pop() {
        if let Some(&following) = runs[i].get(next[i]) {
            heap.push(Reverse((following, i)));
            next[i] += 1;
        }
        checksum = checksum.wrapping_add(fingerprint(&event));
        match unique.last() {
            Some(last) if *last == event => duplicates += 1,
            Some(last) if *last > event => out_of_order += 1,
            _ => unique.push(event),
        }
        seen += 1;
        if seen.is_multiple_of(PROGRESS_STEP) {
            bar.set_position(seen * EVENT_BYTES);
        }
    }
    unique.shrink_to_fit();
    Merged {
        unique,
        duplicates,
        out_of_order,
        checksum,
    }
}

struct Groups {
    users: u64,
    mismatches: u64,
    replays: u64,
}

/// Walks the sorted unique events user by user. Each user must be in the map with at least as
/// many raw events as it has distinct ones; the differences add up to the replays.
fn check_groups(unique: &[Event], users: &UserCounts, bar: &ProgressBar) -> Groups {
    let mut groups = Groups {
        users: 0,
        mismatches: 0,
        replays: 0,
    };
    let mut done = 0u64;
    for group in unique.chunk_by(|a, b| a.user == b.user) {
        groups.users += 1;
        let distinct = group.len() as u64;
        match users.get(&group[0].user) {
            Some(&raw) if raw >= distinct => groups.replays += raw - distinct,
            _ => groups.mismatches += 1,
        }
        done += distinct;
        if groups.users.is_multiple_of(4096) {
            bar.set_position(done * EVENT_BYTES);
        }
    }
    groups
}

/// The `k` users with the most events, busiest first.
fn top_users(users: &UserCounts, k: usize) -> Vec<(u64, u64)> {
    let mut top: Vec<(u64, u64)> = Vec::with_capacity(k + 1);
    for (&user, &count) in users {
        if top.len() < k || count > top[k - 1].1 {
            top.push((user, count));
            top.sort_by_key(|&(_, count)| Reverse(count));
            top.truncate(k);
        }
    }
    top
}

/// hashbrown's table size for a capacity: a power of two of buckets (capacity * 8/7 rounded
/// up), each holding one entry and one control byte.
fn table_bytes(capacity: usize) -> u64 {
    if capacity == 0 {
        return 0;
    }
    let buckets = (capacity * 8 / 7).next_power_of_two();
    (buckets * (size_of::<(u64, u64)>() + 1)) as u64
}

/// Samples in the background what only a sample can show: peak anonymous memory and peak
/// bytes in segments. VmHWM is the kernel's own peak, read at the end.
struct Monitor {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Peaks>,
}

#[derive(Clone, Copy, Debug, Default)]
struct Peaks {
    vm_hwm: u64,
    rss_anon: u64,
    mapped_bytes: u64,
}

impl Monitor {
    fn start(alloc: MmapAllocator) -> Monitor {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut peaks = Peaks::default();
            loop {
                let last = stopped.load(Ordering::Relaxed);
                peaks.rss_anon = peaks.rss_anon.max(status_bytes("RssAnon"));
                peaks.mapped_bytes = peaks.mapped_bytes.max(alloc.stats().mapped_bytes);
                if last {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            peaks.vm_hwm = status_bytes("VmHWM");
            peaks
        });
        Monitor { stop, thread }
    }

    fn stop(self) -> Peaks {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

/// A field of `/proc/self/status` in bytes (`VmHWM`, `RssAnon`...), 0 where unavailable.
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

/// `3.00 GiB`, `34.0 MiB`, `512 B`.
fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = "B";
    for next in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    match unit {
        "B" => format!("{bytes} B"),
        "GiB" | "TiB" => format!("{value:.2} {unit}"),
        _ => format!("{value:.1} {unit}"),
    }
}

/// `1234567` -> `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() * 4 / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}
