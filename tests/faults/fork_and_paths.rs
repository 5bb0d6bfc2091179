//! Fork, process identity and paths (issue 8): one test per hole an outside audit found, plus
//! the cosmetic leftover, the suspected deletion of a custom creator's file, and a matrix of
//! `fork` in both directions.
//!
//! Each test asserts the behaviour the fork model of issue 8 promises; on the code before that
//! fix the tests of holes 1 to 7, the cosmetic one and the creator one fail (the doc comment of
//! each says how). Tests that `fork` run their body in a child test process of their own (see
//! `support::in_child`): forking a process whose other threads run other tests could copy a
//! lock held by one of them. Crashes are only ever observed in `fork`ed children, through
//! their wait status.

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use mmapvec::{MmapAllocator, MmapVec, SegmentCreator, SegmentFile, SegmentRequest, mmap_vec};

use crate::process::{describe, exited_ok, fork_with, pipe, poll, receive, send, wait};
use crate::support::{
    TestDir, descriptors_under, euid, files_under, in_child, mappings_under, names_in, skip,
};

const MILLION: u64 = 1_000_000;
/// `0 + 1 + ... + 999_999`.
const MILLION_SUM: u64 = MILLION * (MILLION - 1) / 2;

/// The two kinds of segment: the descriptor held and the name removed (`None`, the default),
/// or the name kept and reopened to resize (`Some(0)`: no descriptor budget).
const BACKINGS: [(&str, Option<usize>); 2] = [("held", None), ("named", Some(0))];

/// An allocator in `dir` with that descriptor budget. Freed segments are not kept for reuse:
/// these tests watch files, folders and mappings come and go with each allocation
/// (`tests/reuse.rs` covers reuse across a fork).
fn builder(dir: &Path, budget: Option<usize>) -> mmapvec::Builder {
    let builder = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir)
        .reuse_bytes(0);
    match budget {
        Some(budget) => builder.descriptor_budget(budget),
        None => builder,
    }
}

/// Session folders (`session-<uuid>`) in a crate folder.
fn sessions(folder: &Path) -> Vec<String> {
    names_in(folder)
        .into_iter()
        .filter(|n| n.starts_with("session-"))
        .collect()
}

/// Hole 1: the `dont_fork` registry falls out of step with the mappings.
///
/// `Segment::resize` forgets the old view in the registry *after* the mapping moved; meanwhile
/// another thread may map a new `dont_fork` segment at the freed old address and register it,
/// and the late `unregister(old)` deletes that other entry. After a `fork` that live range is an
/// unreserved hole in the child, where the kernel puts the child's next mapping.
///
/// Three threads allocate, grow (4096 -> 8192 bytes, which moves the mapping) and free; three
/// keep a rolling window of live 4096-byte vectors; for `MMAPVEC_FORK_STRESS_SECS` seconds
/// (default 3). Then a child checks that every live range is covered by a mapping in its
/// `/proc/self/maps`, and that 2000 new 4096-byte vectors, written, overlap none of them.
///
/// The race reproduces probabilistically. Measured on this project's 2-core VM (debug build)
/// before the fix: at the default 3 s the child found holes in 9 of 9 runs (3 to 8 of the 7,500
/// live ranges), at 20 s in 2 of 2 runs (7 and 10), at 0.5 s in 1 of 1 (6). The count does not
/// grow with the duration: the keepers' window evicts old vectors, lost entries with them. Each
/// time the child's next allocations then landed in a hole and hit the table's collision
/// `debug_assert` (exit 101). A pass here on unfixed code does not prove the registry right:
/// raise `MMAPVEC_FORK_STRESS_SECS`.
#[test]
fn dont_fork_child_finds_every_live_range_reserved() {
    const NAME: &str = "fork_and_paths::dont_fork_child_finds_every_live_range_reserved";
    if !in_child(NAME, "body") {
        return;
    }
    const PAGE: usize = 4096;
    const GROWERS: usize = 3;
    const KEEPERS: usize = 3;
    const WINDOW: usize = 2500;
    let secs: f64 = std::env::var("MMAPVEC_FORK_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3.0);
    let dir = TestDir::fast("registry");
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .dont_fork(true)
        .build()
        .unwrap();
    let stop = AtomicBool::new(false);
    let (stop, alloc_ref) = (&stop, &alloc);
    let (kept, cycles) = std::thread::scope(|s| {
        let growers: Vec<_> = (0..GROWERS)
            .map(|_| {
                s.spawn(move || {
                    let mut cycles = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        let mut v = MmapVec::<u8>::with_capacity_in(PAGE, alloc_ref.clone());
                        v.reserve_exact(2 * PAGE);
                        drop(v);
                        cycles += 1;
                    }
                    cycles
                })
            })
            .collect();
        let keepers: Vec<_> = (0..KEEPERS)
            .map(|k| {
                s.spawn(move || {
                    let alloc = alloc_ref.clone();
                    let mut live: Vec<MmapVec<u8>> = Vec::with_capacity(WINDOW);
                    let mut seed = 0x9e37_79b9_7f4a_7c15_u64 ^ k as u64;
                    while !stop.load(Ordering::Relaxed) {
                        if live.len() == WINDOW {
                            seed ^= seed << 13;
                            seed ^= seed >> 7;
                            seed ^= seed << 17;
                            drop(live.swap_remove(seed as usize % WINDOW));
                        }
                        live.push(MmapVec::with_capacity_in(PAGE, alloc.clone()));
                    }
                    live
                })
            })
            .collect();
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
        let cycles: u64 = growers.into_iter().map(|t| t.join().unwrap()).sum();
        let kept: Vec<MmapVec<u8>> = keepers
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        (kept, cycles)
    });
    let mut ranges: Vec<(usize, usize)> = kept
        .iter()
        .map(|v| (v.as_ptr().addr(), v.as_ptr().addr() + PAGE))
        .collect();
    ranges.sort_unstable();
    eprintln!(
        "{secs} s: {cycles} grow cycles, {} live ranges at the fork",
        ranges.len()
    );

    let pid = fork_with(|| {
        // Every live range must be reserved (mapped, even if inaccessible), not a hole.
        let mut covered: Vec<(usize, usize)> = Vec::new();
        for m in crate::core_support::maps() {
            match covered.last_mut() {
                Some(last) if last.1 == m.start => last.1 = m.end,
                _ => covered.push((m.start, m.end)),
            }
        }
        let holes: Vec<&(usize, usize)> = ranges
            .iter()
            .filter(|&&(start, end)| {
                let at = covered.partition_point(|c| c.0 <= start);
                at == 0 || covered[at - 1].1 < end
            })
            .collect();
        eprintln!(
            "child: {} of {} live ranges are holes (not mapped): {:x?}",
            holes.len(),
            ranges.len(),
            &holes[..holes.len().min(5)]
        );
        // New blocks must land outside every inherited range.
        let mut fresh = Vec::with_capacity(2000);
        let mut overlaps = 0;
        for i in 0..2000 {
            let mut v = MmapVec::<u8>::with_capacity_in(PAGE, alloc.clone());
            v.resize(PAGE, i as u8);
            let (start, end) = (v.as_ptr().addr(), v.as_ptr().addr() + PAGE);
            let at = ranges.partition_point(|r| r.0 < end);
            if at > 0 && ranges[at - 1].1 > start {
                overlaps += 1;
                eprintln!("child: new block #{i} at {start:#x} lies in an inherited range");
            }
            fresh.push(v);
        }
        for (i, v) in fresh.iter().enumerate() {
            assert!(v.iter().all(|&b| b == i as u8), "new block {i} changed");
        }
        if holes.is_empty() && overlaps == 0 {
            0
        } else {
            1
        }
    });
    let status = wait(pid);
    assert!(
        exited_ok(status),
        "the child {} (1: holes or overlaps listed above; 101: a panic, such as the table's \
         collision assertion)",
        describe(status)
    );
    drop(kept);
    assert_eq!(alloc.stats().live_segments, 0);
}

/// Hole 2: a parent's shrink must not kill its child. The child shares the parent's segment;
/// the parent truncating the shared file made the child's next read beyond the new length a
/// `SIGBUS`. The child here waits until the parent has shrunk its vector, then sums all
/// 1,000,000 elements: it must see the data as it was at the fork. Held and named backing.
///
/// Before the fix: the child is killed by signal 7 (SIGBUS) with both backings.
#[test]
fn parent_shrink_does_not_kill_the_child() {
    const NAME: &str = "fork_and_paths::parent_shrink_does_not_kill_the_child";
    if !in_child(NAME, "body") {
        return;
    }
    let dir = TestDir::new("parent-shrink");
    let mut failures = Vec::new();
    for (label, budget) in BACKINGS {
        let alloc = builder(dir.path(), budget).build().unwrap();
        let mut w = MmapVec::<u64>::new_in(alloc.clone());
        w.extend(0..MILLION);
        let (ready_r, ready_w) = pipe();
        let pid = fork_with(|| {
            receive::<1>(&ready_r).expect("the parent's word");
            let sum: u64 = w.iter().sum();
            i32::from(w.len() != MILLION as usize || sum != MILLION_SUM) * 2
        });
        w.truncate(10);
        w.shrink_to_fit();
        send(&ready_w, b"s");
        let status = wait(pid);
        if !exited_ok(status) {
            failures.push(format!(
                "{label}: the child reading its view after the parent's shrink {}",
                describe(status)
            ));
        }
        assert!(w.iter().copied().eq(0..10), "{label}: the parent's data");
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Hole 3: a child's shrink must not write into the parent's data. A child that resizes an
/// inherited vector gets a copy of its own (`RELIABILITY.md`); a shrink that kept the shared,
/// already aligned block let the child's next write land in the parent's vector. Held and named.
///
/// Before the fix: the parent reads `v[0] == 777` (assertion), with both backings.
#[test]
fn child_shrink_does_not_write_into_the_parent() {
    const NAME: &str = "fork_and_paths::child_shrink_does_not_write_into_the_parent";
    if !in_child(NAME, "body") {
        return;
    }
    let dir = TestDir::new("child-shrink");
    let mut failures = Vec::new();
    for (label, budget) in BACKINGS {
        let alloc = builder(dir.path(), budget).build().unwrap();
        let mut v = MmapVec::<u64>::new_in(alloc.clone());
        v.extend(0..100_000);
        let pid = fork_with(|| {
            v.truncate(10);
            v.shrink_to_fit();
            v[0] = 777;
            assert_eq!(v[..], [777, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
            0
        });
        let status = wait(pid);
        assert!(exited_ok(status), "{label}: the child {}", describe(status));
        if v[0] != 0 {
            failures.push(format!(
                "{label}: the child's write after its shrink reached the parent: v[0] = {}",
                v[0]
            ));
        }
        if !v[1..].iter().copied().eq(1..100_000) {
            failures.push(format!("{label}: the parent's other elements changed"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Hole 4: ownership must not rest on the pid, which is reused. P allocates a vector of 1M
/// `u64`, forks C and exits; once P is reaped, C forks G with P's old pid (forced through
/// `/proc/sys/kernel/ns_last_pid`, retried a few times). G shrinks its copy of the vector and
/// exits; C then reads all of its own: it must not be killed and the data must be whole. Held
/// and named backing. Needs root (writing `ns_last_pid`); skipped otherwise, or when the pid
/// cannot be forced (other processes forking in between).
///
/// The test process is made a child subreaper so that it inherits C when P exits and can wait
/// for it.
///
/// Before the fix: G passes for the owner and truncates the shared file; C is killed by signal 7
/// (SIGBUS), with both backings.
#[test]
fn reused_pid_does_not_make_a_grandchild_the_owner() {
    const NAME: &str = "fork_and_paths::reused_pid_does_not_make_a_grandchild_the_owner";
    const NS_LAST_PID: &str = "/proc/sys/kernel/ns_last_pid";
    if euid() != 0 {
        skip!("needs root to write {NS_LAST_PID}");
    }
    if !in_child(NAME, "body") {
        return;
    }
    if let Err(e) = OpenOptions::new().write(true).open(NS_LAST_PID) {
        skip!("cannot open {NS_LAST_PID} for writing: {e}");
    }
    // SAFETY: prctl with an integer argument; only makes orphaned descendants our children.
    let ret = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    assert_eq!(
        ret,
        0,
        "PR_SET_CHILD_SUBREAPER: {}",
        io::Error::last_os_error()
    );
    let dir = TestDir::new("pid-reuse");
    let mut failures = Vec::new();
    let mut skipped = Vec::new();
    for (label, budget) in BACKINGS {
        let (c_pid_r, c_pid_w) = pipe();
        let (go_r, go_w) = pipe();
        let p = fork_with(|| {
            // P.
            let alloc = builder(dir.path(), budget).build().unwrap();
            let mut v = MmapVec::<u64>::new_in(alloc.clone());
            v.extend(0..MILLION);
            // SAFETY: getpid has no preconditions.
            let p_pid = unsafe { libc::getpid() };
            let c = fork_with(|| {
                // C: wait until P is gone and reaped, then fork G with P's pid.
                receive::<1>(&go_r).expect("the test's word");
                let mut forced = false;
                for _ in 0..20 {
                    if fs::write(NS_LAST_PID, format!("{}", p_pid - 1)).is_err() {
                        return 3;
                    }
                    let g = fork_with(|| {
                        // SAFETY: getpid has no preconditions.
                        if unsafe { libc::getpid() } != p_pid {
                            return 99;
                        }
                        v.truncate(10);
                        v.shrink_to_fit();
                        0
                    });
                    let status = wait(g);
                    match (libc::WIFEXITED(status), libc::WEXITSTATUS(status)) {
                        (true, 99) => continue,
                        (true, 0) => {
                            forced = true;
                            break;
                        }
                        _ => {
                            eprintln!("C: G {}", describe(status));
                            return 4;
                        }
                    }
                }
                if !forced {
                    return 3;
                }
                let whole = v.len() == MILLION as usize && v.iter().copied().eq(0..MILLION);
                if whole { 0 } else { 2 }
            });
            send(&c_pid_w, &c.to_ne_bytes());
            // P exits as by `std::process::exit`: no destructor runs, so a named segment's
            // file keeps its name (C's view is shared with it).
            std::mem::forget((v, alloc));
            0
        });
        let p_status = wait(p);
        assert!(exited_ok(p_status), "{label}: P {}", describe(p_status));
        let c = libc::pid_t::from_ne_bytes(receive(&c_pid_r).expect("C's pid"));
        send(&go_w, b"g");
        let c_status = wait(c);
        if libc::WIFEXITED(c_status) && libc::WEXITSTATUS(c_status) == 3 {
            eprintln!("{label}: could not give G the pid of P");
            skipped.push(label);
        } else if !exited_ok(c_status) {
            failures.push(format!(
                "{label}: C, after G (with P's reused pid) shrank its copy, {} (2: data changed, \
                 4: G failed)",
                describe(c_status)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    if !skipped.is_empty() {
        skip!(
            "{skipped:?}: could not give G the pid of P (other processes forked in between, or \
             {NS_LAST_PID} refused the write)"
        );
    }
}

/// Hole 5: background release must run in a `fork` child too. The child inherits the release
/// queue but not its thread: what it freed was never unmapped, closed or removed.
///
/// Held backing: the child allocates and drops 50 vectors of 100 KB; within 5 s its mappings of
/// the directory and its descriptors on files in it must be back to what they were before.
/// Named backing (`descriptor_budget(0)`): the child does the same and exits (after giving its
/// release up to 1 s); then no segment file may remain on disk, and once the parent has dropped
/// its allocator no session folder may remain.
///
/// Before the fix: held, the child keeps 50 mappings and 50 descriptors (exits 1); named, the
/// child's 50 files stay on disk and the parent's session folder stays after the drop.
#[test]
fn background_release_runs_in_a_fork_child() {
    const NAME: &str = "fork_and_paths::background_release_runs_in_a_fork_child";
    if !in_child(NAME, "body") {
        return;
    }
    let mut failures = Vec::new();

    let dir = TestDir::new("bg-held");
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .release_in_background(true)
        .reuse_bytes(0)
        .build()
        .unwrap();
    drop(mmap_vec![in alloc.clone(); 1u8; 100_000]);
    // The release thread is running and idle (not holding its queue) at the fork.
    assert!(poll(Duration::from_secs(2), || mappings_under(dir.path()) == 0));
    let pid = fork_with(|| {
        let (maps, fds) = (mappings_under(dir.path()), descriptors_under(dir.path()));
        for i in 0..50u8 {
            drop(mmap_vec![in alloc.clone(); i; 100_000]);
        }
        let released = poll(Duration::from_secs(5), || {
            mappings_under(dir.path()) == maps && descriptors_under(dir.path()) == fds
        });
        if released {
            return 0;
        }
        eprintln!(
            "child: 5 s after freeing 50 segments, {} mappings and {} descriptors of the \
             directory (before: {maps} and {fds}); live_segments = {}",
            mappings_under(dir.path()),
            descriptors_under(dir.path()),
            alloc.stats().live_segments
        );
        1
    });
    let status = wait(pid);
    if !exited_ok(status) {
        failures.push(format!("held: the child {}", describe(status)));
    }
    drop(alloc);

    let dir = TestDir::new("bg-named");
    let folder = dir.segment_folder();
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .release_in_background(true)
        .reuse_bytes(0)
        .descriptor_budget(0)
        .build()
        .unwrap();
    drop(mmap_vec![in alloc.clone(); 1u8; 100_000]);
    assert!(poll(Duration::from_secs(2), || files_under(&folder).is_empty()));
    let pid = fork_with(|| {
        for i in 0..50u8 {
            drop(mmap_vec![in alloc.clone(); i; 100_000]);
        }
        // The files, and the session folder that goes with the last of them.
        poll(Duration::from_secs(1), || {
            files_under(&folder).is_empty() && sessions(&folder).is_empty()
        });
        0
    });
    let status = wait(pid);
    assert!(exited_ok(status), "named: the child {}", describe(status));
    if !poll(Duration::from_secs(1), || files_under(&folder).is_empty()) {
        failures.push(format!(
            "named: {} segment files made by the child remain after it exited",
            files_under(&folder).len()
        ));
    }
    drop(alloc);
    if !poll(Duration::from_secs(1), || sessions(&folder).is_empty()) {
        failures.push(format!(
            "named: session folders remain after the parent dropped its allocator: {:?}",
            sessions(&folder)
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Hole 6: a relative `dir` must not break after `chdir`. With `dir("work")` and named segments,
/// after `set_current_dir` elsewhere the next grow (which reopens the file by name) must
/// succeed and keep the data, new allocations must succeed, after dropping everything no file
/// may remain under the original `work` folder, and nothing may be created under the new cwd.
/// Runs in a child process: the working directory is process-wide.
///
/// Before the fix: the grow fails (`ENOENT` on the reopen of a relative path), so do the new
/// allocations, and the segment file stays in `work` after the drop.
#[test]
fn relative_dir_survives_chdir() {
    const NAME: &str = "fork_and_paths::relative_dir_survives_chdir";
    if !in_child(NAME, "body") {
        return;
    }
    let first = TestDir::new("cwd-first");
    let work = first.path().join("work");
    fs::create_dir(&work).unwrap();
    let second = TestDir::new("cwd-second");
    std::env::set_current_dir(first.path()).unwrap();
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir("work")
        .descriptor_budget(0)
        .build()
        .unwrap();
    let mut v = MmapVec::<u64>::new_in(alloc.clone());
    v.extend(0..1000);
    assert_eq!(files_under(&work).len(), 1, "one named segment in work");

    std::env::set_current_dir(second.path()).unwrap();
    let mut failures = Vec::new();
    if let Err(e) = v.try_reserve(1_000_000) {
        failures.push(format!(
            "the grow after chdir failed: {e}: {:?}",
            alloc.take_last_error()
        ));
    }
    assert!(v.iter().copied().eq(0..1000), "the vector's data");
    let mut fresh = Vec::new();
    for i in 0..3u64 {
        let mut w = MmapVec::<u64>::new_in(alloc.clone());
        match w.try_reserve(1000) {
            Ok(()) => {
                w.extend(i..i + 1000);
                fresh.push(w);
            }
            Err(e) => failures.push(format!(
                "new allocation {i} after chdir failed: {e}: {:?}",
                alloc.take_last_error()
            )),
        }
    }
    for (i, w) in fresh.iter().enumerate() {
        assert!(w.iter().copied().eq(i as u64..i as u64 + 1000));
    }
    drop((v, fresh));
    drop(alloc);
    let left = files_under(&work);
    if !left.is_empty() {
        failures.push(format!(
            "files left under the original work folder: {left:?}"
        ));
    }
    let created = names_in(second.path());
    if !created.is_empty() {
        failures.push(format!("created under the new cwd: {created:?}"));
    }
    std::env::set_current_dir("/").unwrap();
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Hole 7: the crate folder removed while the process runs (a `/tmp` cleaner) must be made
/// again, with the same checks, at the next allocation: the allocation succeeds and the folder
/// exists again, mode `0700`. Held and named backing.
///
/// Before the fix: every later allocation fails with `ENOENT` (the folder, and the session
/// folder, were checked once and cached).
#[test]
fn removed_segment_folder_is_made_again() {
    let mut failures = Vec::new();
    for (label, budget) in BACKINGS {
        let dir = TestDir::new("folder-removed");
        let folder = dir.segment_folder();
        let alloc = builder(dir.path(), budget).build().unwrap();
        drop(mmap_vec![in alloc.clone(); 1u8; 10_000]);
        fs::remove_dir_all(&folder).unwrap();
        let mut v = MmapVec::<u8>::new_in(alloc.clone());
        match v.try_reserve(10_000) {
            Ok(()) => {
                v.resize(10_000, 3);
                assert!(v.iter().all(|&b| b == 3));
            }
            Err(e) => failures.push(format!(
                "{label}: the allocation after the folder was removed failed: {e}: {:?}",
                alloc.take_last_error()
            )),
        }
        match fs::symlink_metadata(&folder) {
            Ok(meta) if meta.is_dir() && meta.permissions().mode() & 0o777 == 0o700 => {}
            Ok(meta) => failures.push(format!(
                "{label}: the folder is back but not a 0700 directory: {meta:?}"
            )),
            Err(e) => failures.push(format!("{label}: the folder was not made again: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Hole 7, the dangerous half: after the crate folder was removed, a symlink to a directory
/// open to all (0777) is planted at its path. The next allocations must fail (the link is
/// refused, as `build()` refuses it) with the reason in `take_last_error()`, and nothing may be
/// created in the link's target. Three attempts each, held and named backing. The named
/// allocator makes no segment before the removal, so its session folder is made afterwards.
///
/// Before the fix: `O_NOFOLLOW` covers only the last path component, so the allocations
/// succeed through the link; held, the files are created there (and unlinked at once); named,
/// a session folder and the segment files stay in the target.
#[test]
fn symlink_planted_at_removed_folder_is_refused() {
    let mut failures = Vec::new();
    for (label, budget) in BACKINGS {
        let dir = TestDir::new("folder-planted");
        let target = TestDir::new("planted-target");
        fs::set_permissions(target.path(), fs::Permissions::from_mode(0o777)).unwrap();
        let folder = dir.segment_folder();
        let alloc = builder(dir.path(), budget).build().unwrap();
        if budget.is_none() {
            drop(mmap_vec![in alloc.clone(); 1u8; 10_000]);
        }
        fs::remove_dir_all(&folder).unwrap();
        symlink(target.path(), &folder).unwrap();
        let mut kept = Vec::new();
        for attempt in 0..3 {
            let mut v = MmapVec::<u8>::new_in(alloc.clone());
            match v.try_reserve(10_000) {
                Ok(()) => {
                    failures.push(format!(
                        "{label}: allocation {attempt} through the planted link succeeded"
                    ));
                    v.push(1);
                    kept.push(v);
                }
                Err(_) => {
                    if alloc.take_last_error().is_none() {
                        failures.push(format!(
                            "{label}: allocation {attempt} failed, no error kept"
                        ));
                    }
                }
            }
        }
        let found = files_under(target.path());
        let names = names_in(target.path());
        if !names.is_empty() {
            failures.push(format!(
                "{label}: created in the link's target: {names:?}, files {found:?}"
            ));
        }
        drop(kept);
        drop(alloc);
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Cosmetic (issue 8, "also seen"): with background release and a named segment, dropping the
/// allocator right after its last free must not leave an empty session folder (checked for up
/// to 2 s).
///
/// Before the fix: the session folder is removed when the allocator drops, while the release
/// thread still holds the freed segment whose file is in it; the removal fails and the folder
/// stays.
#[test]
fn no_session_folder_left_after_background_release() {
    let dir = TestDir::new("bg-session");
    let folder = dir.segment_folder();
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .release_in_background(true)
        .reuse_bytes(0)
        .descriptor_budget(0)
        .build()
        .unwrap();
    let v = mmap_vec![in alloc.clone(); 1u8; 100_000];
    assert_eq!(sessions(&folder).len(), 1);
    drop(v);
    drop(alloc);
    let gone = poll(Duration::from_secs(2), || sessions(&folder).is_empty());
    assert!(
        gone,
        "left: {:?} holding {:?}",
        sessions(&folder),
        files_under(&folder)
    );
}

/// A creator that hands out an existing file, by name, again and again.
#[derive(Debug)]
struct HandsOutExisting {
    path: PathBuf,
}

// SAFETY: deliberately breaks one promise of the contract: the file is not empty. The
// allocator must check that and refuse the file before mapping it, so nothing is ever aliased:
// the file is not mapped by anyone, and nothing else resizes or writes it meanwhile.
unsafe impl SegmentCreator for HandsOutExisting {
    fn create(&self, _request: &SegmentRequest) -> io::Result<SegmentFile> {
        let file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        Ok(SegmentFile::named(file, &self.path))
    }
}

/// Suspicion of issue 8: a custom creator that returns `SegmentFile::named` for an existing,
/// non-empty file. The allocation must fail ("not empty"), and the file must still be there with
/// its content: the allocator may own a name only once it accepted the file. Held (the name
/// would be removed at once) and named (`descriptor_budget(0)`).
///
/// Before the fix: the allocation fails, but the file is gone with both backings (held: the
/// name is removed before the emptiness check; named: the refused segment's drop removes it).
#[test]
fn non_empty_file_from_a_creator_is_refused_and_left_alone() {
    const CONTENT: &[u8] = b"precious data, not a segment";
    let dir = TestDir::new("non-empty");
    let mut failures = Vec::new();
    for (label, budget) in BACKINGS {
        let path = dir.path().join(format!("existing-{label}"));
        fs::write(&path, CONTENT).unwrap();
        let mut builder = MmapAllocator::builder()
            .small_threshold(0)
            .creator(HandsOutExisting { path: path.clone() });
        if let Some(budget) = budget {
            builder = builder.descriptor_budget(budget);
        }
        let alloc = builder.build().unwrap();
        let mut v = MmapVec::<u8>::new_in(alloc.clone());
        if v.try_reserve(100).is_ok() {
            failures.push(format!("{label}: a non-empty file was accepted"));
        } else {
            let err = alloc.take_last_error().map(|e| e.to_string());
            if !err.as_deref().is_some_and(|e| e.contains("not empty")) {
                failures.push(format!("{label}: unexpected error {err:?}"));
            }
        }
        match fs::read(&path) {
            Ok(content) if content == CONTENT => {}
            Ok(content) => failures.push(format!(
                "{label}: the file's content changed: {:?}",
                String::from_utf8_lossy(&content)
            )),
            Err(e) => failures.push(format!("{label}: the file is gone: {e}")),
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// The fork model both ways, for held and named backing, `dont_fork` off and on, background
/// release off and on. The parent holds four vectors and forks. Without `dont_fork` the child
/// reads them, grows one, shrinks one, drops one, allocates and drops new ones; with it the
/// child only drops the inherited vectors (their memory is not in the child) and allocates new
/// ones. The child must exit 0; then the parent finds all its data intact and grows, shrinks
/// and drops its vectors.
///
/// Not one of the holes: this passes before the fix too. It guards the fork model as a whole.
#[test]
fn fork_both_ways_matrix() {
    const NAME: &str = "fork_and_paths::fork_both_ways_matrix";
    if !in_child(NAME, "body") {
        return;
    }
    let dir = TestDir::new("fork-matrix");
    for (label, budget) in BACKINGS {
        for dont_fork in [false, true] {
            for background in [false, true] {
                let case = format!("{label}, dont_fork {dont_fork}, background {background}");
                let alloc = builder(dir.path(), budget)
                    .dont_fork(dont_fork)
                    .release_in_background(background)
                    .build()
                    .unwrap();
                let mut grown = MmapVec::<u64>::new_in(alloc.clone());
                grown.extend(0..10_000);
                let mut shrunk = MmapVec::<u64>::new_in(alloc.clone());
                shrunk.extend(0..200_000);
                let mut dropped = MmapVec::<u64>::new_in(alloc.clone());
                dropped.extend(0..5000);
                let mut kept = MmapVec::<u64>::new_in(alloc.clone());
                kept.extend(0..3000);
                let pid = fork_with(|| {
                    let take =
                        |v: &mut MmapVec<u64>| std::mem::replace(v, MmapVec::new_in(alloc.clone()));
                    if dont_fork {
                        drop((take(&mut grown), take(&mut shrunk), take(&mut dropped)));
                        drop(take(&mut kept));
                    } else {
                        assert!(grown.iter().copied().eq(0..10_000));
                        assert!(shrunk.iter().copied().eq(0..200_000));
                        assert!(dropped.iter().copied().eq(0..5000));
                        assert!(kept.iter().copied().eq(0..3000));
                        grown.extend(10_000..1_000_000);
                        shrunk.truncate(100);
                        shrunk.shrink_to_fit();
                        drop(take(&mut dropped));
                        assert!(grown.iter().copied().eq(0..1_000_000));
                        assert!(shrunk.iter().copied().eq(0..100));
                    }
                    for round in 0..5u64 {
                        let mut fresh: Vec<MmapVec<u64>> = (0..4)
                            .map(|i| {
                                let mut v = MmapVec::new_in(alloc.clone());
                                v.extend(round * i..round * i + 50_000);
                                v
                            })
                            .collect();
                        fresh[0].extend(0..100_000);
                        fresh[1].truncate(10);
                        fresh[1].shrink_to_fit();
                        for (i, v) in fresh.iter().enumerate().skip(2) {
                            let i = i as u64;
                            assert!(v.iter().copied().eq(round * i..round * i + 50_000));
                        }
                    }
                    0
                });
                let status = wait(pid);
                assert!(exited_ok(status), "{case}: the child {}", describe(status));
                assert!(grown.iter().copied().eq(0..10_000), "{case}: grown");
                assert!(shrunk.iter().copied().eq(0..200_000), "{case}: shrunk");
                assert!(dropped.iter().copied().eq(0..5000), "{case}: dropped");
                assert!(kept.iter().copied().eq(0..3000), "{case}: kept");
                grown.extend(10_000..500_000);
                shrunk.truncate(10);
                shrunk.shrink_to_fit();
                drop(dropped);
                assert!(grown.iter().copied().eq(0..500_000), "{case}: grown again");
                assert!(shrunk.iter().copied().eq(0..10), "{case}: shrunk again");
                assert!(kept.iter().copied().eq(0..3000), "{case}: kept again");
                drop((grown, shrunk, kept));
                assert_eq!(alloc.stats().live_segments, 0, "{case}");
            }
        }
    }
}
