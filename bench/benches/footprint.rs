//! The disk the small-block tier takes for small vectors of mixed sizes, against what they hold.
//!
//! Each workload runs on a tmpfs of its own, freshly mounted (root only), so the file system's
//! used blocks (`statvfs`: `(f_blocks - f_bfree) × f_frsize`) are the allocator's chunk files
//! and nothing else. The allocator is `MmapAllocator::builder().dir(tmpfs).allow_ram_backed(true)
//! .build()` (the defaults otherwise: chunk files get their blocks reserved, so blocks used are
//! blocks taken). Printed per workload:
//!
//! * **live bytes**: the sum of the capacities of the vectors the workload holds at the moment
//!   of measurement (what the program asked for), and beside it the allocator's own count,
//!   `stats().small.in_use_bytes + stats().mapped_bytes` (blocks at their size class);
//! * **disk used, live**: the tmpfs's used bytes while those vectors are live; **after drop**:
//!   once every vector is dropped (and, for threads, the threads ended);
//! * **ratio**: disk used, live / live bytes;
//! * **chunk files**: `stats().small.chunks_created` since the allocator was built;
//! * **allowed**: 2 × live bytes + 64 MiB, and whether the disk used while live stays within it.
//!
//! The workloads:
//! * **a**: 8 threads each keep 50 vectors of 1 to 2,000 B, measured while all are live;
//! * **b**: 4 threads each keep a rolling window of about 10 MiB of vectors of 1 B to 8 KiB
//!   (40 MiB in all), replacing random ones for 1.5 s, measured at the end with the windows live;
//! * **c**: one thread keeps a rolling window of about 100 MiB of vectors of 1 B to 8 KiB,
//!   replacing random ones, and forks every 20 ms (the child `_exit`s at once, the parent waits
//!   for it); measured after 2 s;
//! * **d**: the request loop of `benches/sweep.rs` (`mixed_request_loop`: 30 vectors of 1 to
//!   2,000 B per request) on 1 and on 4 threads for 2 s: chunk files created per second and
//!   requests per second after a 0.5 s warm-up; the disk used is the peak of samples taken every
//!   50 ms, and live bytes the most a request can hold (30 × 2,000 B per thread);
//! * **e**: 8 threads each build 3,000 vectors of 1 to 2,000 B, drop them, and then sit parked
//!   (not exited); the main thread calls `trim()`, reports the disk used, then asks for a vector
//!   of 85% of the tmpfs (`try_reserve_exact`).
//!
//! Run with `cargo bench -p mmapvec-bench --bench footprint` (about 10 s); as root, since it
//! mounts file systems. Without root (or when a mount fails) each workload prints why it was
//! skipped and the program exits 0.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use mmapvec::allocator_api2::collections::TryReserveError;
use mmapvec::{MmapAllocator, MmapVec};

#[path = "common/mixed.rs"]
mod mixed;
#[path = "common/tmpfs.rs"]
mod tmpfs;
use mixed::{REQUEST_MAX_BYTES, REQUEST_VECS, XorShift};
use tmpfs::Tmpfs;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The tmpfs of workloads a to d: large enough that a tier taking many times what it holds
/// still fits (and is measured) rather than failing; pages count only once written.
const WORKLOAD_FS: u64 = 2 * GIB;
/// The tmpfs of workload e, whose last step asks for 85% of it.
const TRIM_FS: u64 = GIB;

/// The disk a workload may use: 2 × what it holds + 64 MiB.
fn allowed(live: u64) -> u64 {
    2 * live + 64 * MIB
}

/// One line of the table.
#[derive(Debug, Default)]
struct Row {
    /// Sum of the capacities of the vectors held when `disk_live` was measured.
    live: u64,
    /// `small.in_use_bytes + mapped_bytes` at the same moment.
    counted: u64,
    disk_live: u64,
    disk_after: u64,
    chunks_created: u64,
    /// What else the workload found: rates, failures.
    notes: Vec<String>,
}

/// What a workload gives: its row, or why it could not run.
type Outcome = Result<Row, String>;

/// A vector of `len` bytes of `byte`, made with capacity `len`; an error instead of the abort
/// `with_capacity_in` would give when the tmpfs is full.
fn small_vec(alloc: &MmapAllocator, len: usize, byte: u8) -> Result<MmapVec<u8>, TryReserveError> {
    let mut v = MmapVec::new_in(alloc.clone());
    v.try_reserve_exact(len)?;
    v.resize(len, byte);
    Ok(v)
}

/// The sentence for a failed allocation: the allocator's last error says why.
fn failure(alloc: &MmapAllocator, err: TryReserveError) -> String {
    match alloc.take_last_error() {
        Some(cause) => format!("allocation failed: {cause}"),
        None => format!("allocation failed: {err}"),
    }
}

/// Vectors a worker holds, and how the worker stopped if it stopped early.
#[derive(Debug, Default)]
struct Held {
    vecs: Vec<MmapVec<u8>>,
    error: Option<String>,
}

impl Held {
    fn bytes(&self) -> u64 {
        self.vecs.iter().map(|v| v.capacity() as u64).sum()
    }
}

/// A window of vectors of `1..=max_len` bytes, about `target` bytes in all, replaced at random.
#[derive(Debug)]
struct Window {
    held: Held,
    bytes: u64,
    max_len: usize,
    rng: XorShift,
}

impl Window {
    /// Fills a window up to `target` bytes (or until an allocation fails).
    fn fill(alloc: &MmapAllocator, target: u64, max_len: usize, seed: u64) -> Window {
        let mut window = Window {
            held: Held::default(),
            bytes: 0,
            max_len,
            rng: XorShift::new(seed),
        };
        while window.bytes < target && window.held.error.is_none() {
            let len = window.len();
            match small_vec(alloc, len, len as u8) {
                Ok(v) => {
                    window.bytes += v.capacity() as u64;
                    window.held.vecs.push(v);
                }
                Err(e) => window.held.error = Some(failure(alloc, e)),
            }
        }
        window
    }

    fn len(&mut self) -> usize {
        1 + self.rng.below(self.max_len)
    }

    /// Drops a random vector and puts a new one of a random size in its place; false (and the
    /// error kept) when the allocation failed.
    fn replace_one(&mut self, alloc: &MmapAllocator) -> bool {
        if self.held.vecs.is_empty() {
            return false;
        }
        let i = self.rng.below(self.held.vecs.len());
        let len = self.len();
        self.bytes -= self.held.vecs[i].capacity() as u64;
        // The old vector goes first, as a program replacing an entry would free it.
        self.held.vecs[i] = MmapVec::new_in(alloc.clone());
        match small_vec(alloc, len, len as u8) {
            Ok(v) => {
                self.bytes += v.capacity() as u64;
                self.held.vecs[i] = v;
                true
            }
            Err(e) => {
                self.held.error = Some(failure(alloc, e));
                false
            }
        }
    }
}

/// The allocator of a workload, its files on `fs`.
fn allocator(fs: &Tmpfs) -> Result<MmapAllocator, String> {
    MmapAllocator::builder()
        .dir(fs.path())
        .allow_ram_backed(true)
        .build()
        .map_err(|e| format!("build the allocator on {}: {e}", fs.path().display()))
}

/// Fills the measured columns of `row` from `alloc` and `fs`, now.
fn measure_live(row: &mut Row, alloc: &MmapAllocator, fs: &Tmpfs) {
    let stats = alloc.stats();
    row.disk_live = fs.used_bytes();
    row.counted = stats.small.in_use_bytes + stats.mapped_bytes;
    row.chunks_created = stats.small.chunks_created;
}

/// Runs `threads` workers, each keeping what `work(thread index)` builds; once all have built,
/// `row`'s live columns are measured while everything is live; then the workers drop what they
/// hold and end, and the disk is measured again.
fn while_workers_hold<W>(fs: &Tmpfs, alloc: &MmapAllocator, threads: usize, work: W) -> Row
where
    W: Fn(u64) -> Held + Clone + Send + 'static,
{
    let built = Arc::new(Barrier::new(threads + 1));
    let measured = Arc::new(Barrier::new(threads + 1));
    let workers: Vec<_> = (0..threads as u64)
        .map(|thread| {
            let (work, built, measured) = (work.clone(), Arc::clone(&built), Arc::clone(&measured));
            thread::spawn(move || {
                let held = work(thread);
                let report = (held.bytes(), held.error.clone());
                built.wait();
                measured.wait();
                drop(held);
                report
            })
        })
        .collect();
    built.wait();
    let mut row = Row::default();
    measure_live(&mut row, alloc, fs);
    measured.wait();
    for worker in workers {
        let (bytes, error) = worker.join().expect("workload thread");
        row.live += bytes;
        row.notes.extend(error);
    }
    row.disk_after = fs.used_bytes();
    row
}

/// a: 8 threads each keep 50 vectors of 1 to 2,000 B, measured while all are live.
fn many_threads_few_vectors(fs: &Tmpfs) -> Outcome {
    let alloc = allocator(fs)?;
    let each = alloc.clone();
    Ok(while_workers_hold(fs, &alloc, 8, move |thread| {
        let mut rng = XorShift::new(thread);
        let mut held = Held::default();
        for _ in 0..50 {
            let len = 1 + rng.below(REQUEST_MAX_BYTES);
            match small_vec(&each, len, len as u8) {
                Ok(v) => held.vecs.push(v),
                Err(e) => {
                    held.error = Some(failure(&each, e));
                    break;
                }
            }
        }
        held
    }))
}

/// b: 4 threads each keep a rolling window of about 10 MiB of vectors of 1 B to 8 KiB,
/// replacing random ones for 1.5 s; measured at the end, the windows live.
fn rolling_windows(fs: &Tmpfs) -> Outcome {
    const THREADS: usize = 4;
    const RUN: Duration = Duration::from_millis(1500);
    let alloc = allocator(fs)?;
    let each = alloc.clone();
    let replaced = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&replaced);
    let start = Instant::now();
    let mut row = while_workers_hold(fs, &alloc, THREADS, move |thread| {
        let mut window = Window::fill(&each, 10 * MIB, 8 * KIB as usize, thread);
        let mut n = 0;
        while start.elapsed() < RUN && window.replace_one(&each) {
            n += 1;
        }
        counter.fetch_add(n, Ordering::Relaxed);
        window.held
    });
    let secs = start.elapsed().as_secs_f64();
    row.notes.push(format!(
        "{} vectors replaced in {secs:.1} s ({:.0}/s over the 4 threads)",
        replaced.load(Ordering::Relaxed),
        replaced.load(Ordering::Relaxed) as f64 / secs
    ));
    Ok(row)
}

/// Forks a child that exits at once, and waits for it.
fn fork_and_reap() -> io::Result<()> {
    // SAFETY: the child calls nothing but `_exit`, which is async-signal-safe, so it does not
    // matter which locks other threads held at the fork.
    let pid = unsafe { libc::fork() };
    match pid {
        -1 => Err(io::Error::last_os_error()),
        // SAFETY: `_exit` ends the child without running the parent's destructors or atexit
        // handlers (which belong to the parent).
        0 => unsafe { libc::_exit(0) },
        pid => {
            let mut status = 0;
            // SAFETY: `pid` is our child, `status` a valid `c_int` to write.
            if unsafe { libc::waitpid(pid, &mut status, 0) } == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
    }
}

/// c: one thread keeps a rolling window of about 100 MiB of vectors of 1 B to 8 KiB,
/// replacing random ones, and forks every 20 ms; measured after 2 s.
fn forking_window(fs: &Tmpfs) -> Outcome {
    const RUN: Duration = Duration::from_secs(2);
    const FORK_EVERY: Duration = Duration::from_millis(20);
    let alloc = allocator(fs)?;
    let start = Instant::now();
    let mut window = Window::fill(&alloc, 100 * MIB, 8 * KIB as usize, 0);
    let (mut forks, mut replaced) = (0u64, 0u64);
    let mut last_fork = Instant::now();
    let mut notes = Vec::new();
    while start.elapsed() < RUN {
        if !window.replace_one(&alloc) {
            break;
        }
        replaced += 1;
        if last_fork.elapsed() >= FORK_EVERY {
            if let Err(e) = fork_and_reap() {
                notes.push(format!("fork failed: {e}"));
                break;
            }
            forks += 1;
            last_fork = Instant::now();
        }
    }
    let mut row = Row {
        live: window.bytes,
        ..Row::default()
    };
    measure_live(&mut row, &alloc, fs);
    row.notes = notes;
    row.notes.extend(window.held.error.take());
    row.notes.push(format!(
        "{forks} forks, {replaced} vectors replaced in {:.1} s",
        start.elapsed().as_secs_f64()
    ));
    drop(window);
    row.disk_after = fs.used_bytes();
    Ok(row)
}

/// d: the request loop of `benches/sweep.rs` on `threads` threads for 2 s.
fn request_loop(fs: &Tmpfs, threads: usize) -> Outcome {
    const WARM_UP: Duration = Duration::from_millis(500);
    const RUN: Duration = Duration::from_secs(2);
    const SAMPLE_EVERY: Duration = Duration::from_millis(50);
    let alloc = allocator(fs)?;
    let stop = Arc::new(AtomicBool::new(false));
    let requests = Arc::new(AtomicU64::new(0));
    let workers: Vec<_> = (0..threads as u64)
        .map(|thread| {
            let (alloc, stop, requests) = (alloc.clone(), Arc::clone(&stop), Arc::clone(&requests));
            thread::spawn(move || -> Result<(), String> {
                let mut rng = XorShift::new(thread);
                let mut held = Vec::with_capacity(REQUEST_VECS);
                let failed = AtomicBool::new(false);
                let make = |len, byte| {
                    let v = small_vec(&alloc, len, byte);
                    failed.fetch_or(v.is_err(), Ordering::Relaxed);
                    v
                };
                while !stop.load(Ordering::Relaxed) {
                    mixed::request(&mut rng, &mut held, &make);
                    requests.fetch_add(1, Ordering::Relaxed);
                    if failed.load(Ordering::Relaxed) {
                        let cause = alloc.take_last_error().map(|e| e.to_string());
                        return Err(format!("allocation failed: {}", cause.unwrap_or_default()));
                    }
                }
                Ok(())
            })
        })
        .collect();
    let start = Instant::now();
    let mut peak = 0;
    let mut warm = None;
    while start.elapsed() < RUN {
        thread::sleep(SAMPLE_EVERY);
        peak = peak.max(fs.used_bytes());
        if warm.is_none() && start.elapsed() >= WARM_UP {
            let at = (
                Instant::now(),
                requests.load(Ordering::Relaxed),
                alloc.stats().small.chunks_created,
            );
            warm = Some(at);
        }
    }
    let (warm_at, warm_requests, warm_chunks) = warm.expect("the run is longer than the warm-up");
    let mut row = Row {
        live: (threads * REQUEST_VECS * REQUEST_MAX_BYTES) as u64,
        ..Row::default()
    };
    measure_live(&mut row, &alloc, fs);
    row.disk_live = row.disk_live.max(peak);
    let secs = warm_at.elapsed().as_secs_f64();
    let served = requests.load(Ordering::Relaxed) - warm_requests;
    stop.store(true, Ordering::Relaxed);
    for worker in workers {
        if let Err(e) = worker.join().expect("request thread") {
            row.notes.push(e);
        }
    }
    row.disk_after = fs.used_bytes();
    row.notes.push(format!(
        "after the warm-up: {:.0} requests/s, {:.0} chunk files created/s \
         (live bytes: the most the requests in flight can hold; disk: peak of samples)",
        served as f64 / secs,
        (row.chunks_created - warm_chunks) as f64 / secs
    ));
    Ok(row)
}

/// e: 8 threads build and drop 3,000 vectors of 1 to 2,000 B each, then park; the main thread
/// trims, measures, and asks for a vector of 85% of the tmpfs.
fn idle_threads_then_trim(fs: &Tmpfs) -> Outcome {
    const THREADS: usize = 8;
    let alloc = allocator(fs)?;
    let done = Arc::new(Barrier::new(THREADS + 1));
    let stop = Arc::new(AtomicBool::new(false));
    let workers: Vec<_> = (0..THREADS as u64)
        .map(|thread| {
            let (alloc, done, stop) = (alloc.clone(), Arc::clone(&done), Arc::clone(&stop));
            thread::spawn(move || {
                let mut rng = XorShift::new(thread);
                let mut held = Held::default();
                for _ in 0..3_000 {
                    let len = 1 + rng.below(REQUEST_MAX_BYTES);
                    match small_vec(&alloc, len, len as u8) {
                        Ok(v) => held.vecs.push(v),
                        Err(e) => {
                            held.error = Some(failure(&alloc, e));
                            break;
                        }
                    }
                }
                let built = held.bytes();
                drop(held.vecs);
                done.wait();
                // Idle, not exited: whatever the thread keeps for itself stays kept.
                while !stop.load(Ordering::Relaxed) {
                    thread::park();
                }
                (built, held.error)
            })
        })
        .collect();
    done.wait();
    let before_trim = fs.used_bytes();
    alloc.trim();
    let mut row = Row::default();
    measure_live(&mut row, &alloc, fs);
    let big_len = (fs.size() as f64 * 0.85) as usize;
    let mut big = MmapVec::<u8>::new_in(alloc.clone());
    let big_result = match big.try_reserve_exact(big_len) {
        Ok(()) => "succeeded".to_owned(),
        Err(e) => format!("FAILED ({})", failure(&alloc, e)),
    };
    drop(big);
    stop.store(true, Ordering::Relaxed);
    let mut built = 0;
    for worker in &workers {
        worker.thread().unpark();
    }
    for worker in workers {
        let (bytes, error) = worker.join().expect("idle thread");
        built += bytes;
        row.notes.extend(error);
    }
    row.disk_after = fs.used_bytes();
    row.notes.push(format!(
        "{} built and dropped by the 8 threads; disk used with the threads parked: {} before \
         trim(), {} after (the row's live column); after drop = once the threads exited",
        mib(built),
        mib(before_trim),
        mib(row.disk_live)
    ));
    row.notes.push(format!(
        "a vector of 85% of the tmpfs ({}) after trim(): {big_result}",
        mib(big_len as u64)
    ));
    Ok(row)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

/// The workloads: label, tmpfs size, body.
type Workload = (&'static str, u64, Box<dyn Fn(&Tmpfs) -> Outcome>);

fn main() {
    let workloads: Vec<Workload> = vec![
        (
            "a: 8 threads × 50 vectors of 1..2,000 B, all live",
            WORKLOAD_FS,
            Box::new(many_threads_few_vectors),
        ),
        (
            "b: 4 threads, rolling windows of 1 B..8 KiB, ~40 MiB live, 1.5 s",
            WORKLOAD_FS,
            Box::new(rolling_windows),
        ),
        (
            "c: 1 thread, ~100 MiB window of 1 B..8 KiB, fork every 20 ms, 2 s",
            WORKLOAD_FS,
            Box::new(forking_window),
        ),
        (
            "d: request loop (30 × 1..2,000 B), 1 thread, 2 s",
            WORKLOAD_FS,
            Box::new(|fs: &Tmpfs| request_loop(fs, 1)),
        ),
        (
            "d: request loop (30 × 1..2,000 B), 4 threads, 2 s",
            WORKLOAD_FS,
            Box::new(|fs: &Tmpfs| request_loop(fs, 4)),
        ),
        (
            "e: 8 threads built + dropped 3,000 × 1..2,000 B, parked; trim()",
            TRIM_FS,
            Box::new(idle_threads_then_trim),
        ),
    ];
    println!("Disk taken by small vectors of mixed sizes, each workload on a fresh tmpfs.");
    println!(
        "live = sum of the capacities of the vectors held when measured (counted = the \
         allocator's stats().small.in_use_bytes + mapped_bytes then); disk = the tmpfs's used \
         bytes by statvfs, while live and after everything was dropped; ratio = disk live / \
         live; chunk files = stats().small.chunks_created; allowed = 2 × live + 64 MiB."
    );
    println!();
    println!(
        "| workload | live bytes | counted | disk used, live | disk used, after drop | ratio \
         | chunk files created | allowed (2 × live + 64 MiB) | ok? |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut notes = Vec::new();
    for (label, size, run) in &workloads {
        let tag = &label[..1];
        let outcome = Tmpfs::mount(&format!("workload-{tag}"), *size).and_then(|fs| run(&fs));
        match outcome {
            Ok(row) => {
                let ok = if row.disk_live <= allowed(row.live) {
                    "yes"
                } else {
                    "**NO**"
                };
                let ratio = match row.live {
                    0 => "–".to_owned(),
                    live => format!("{:.1}×", row.disk_live as f64 / live as f64),
                };
                println!(
                    "| {label} | {} | {} | {} | {} | {ratio} | {} | {} | {ok} |",
                    mib(row.live),
                    mib(row.counted),
                    mib(row.disk_live),
                    mib(row.disk_after),
                    row.chunks_created,
                    mib(allowed(row.live)),
                );
                notes.extend(row.notes.into_iter().map(|n| format!("{tag}: {n}")));
            }
            Err(why) => println!("| {label} | skipped: {why} |"),
        }
    }
    if !notes.is_empty() {
        println!();
        for note in notes {
            println!("- {note}");
        }
    }
}
