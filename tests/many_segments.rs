//! Thousands of live vectors under a low open-files limit: 5000 `MmapVec`s, each its own
//! segment, with `RLIMIT_NOFILE` at 1024. Past the descriptor budget (half the soft limit) new
//! segments keep their file name and close their descriptor, so all 5000 live, grow, keep their
//! data and go away without the process running out of descriptors.
//!
//! Each variant runs in a child process (the test binary run again with an environment
//! variable), since limits are process-wide. Segments are sparse files by default (see
//! `many_vectors`); set `MMAPVEC_MANY_SEGMENTS_RESERVE=1` to reserve their blocks as by default.

mod core_support;

use std::fs::File;
use std::time::Instant;

use core_support::{TestDir, child_role, run_in_child};
use mmapvec::{MmapAllocator, MmapVec};

const VECTORS: usize = 5000;
const LIMIT: libc::rlim_t = 1024;

fn get_nofile() -> libc::rlimit {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit.
    let ret = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    assert_eq!(ret, 0, "getrlimit: {}", std::io::Error::last_os_error());
    limit
}

fn set_nofile(soft: libc::rlim_t, hard: libc::rlim_t) {
    let limit = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `limit` is a valid rlimit; this only changes this (child) process's limits.
    let ret = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) };
    assert_eq!(ret, 0, "setrlimit: {}", std::io::Error::last_os_error());
}

/// Descriptors this process has open.
fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

/// The value vector `i` holds at index `j`.
fn value(i: usize, j: usize) -> u64 {
    (i as u64) << 32 | j as u64
}

/// The child's work: 5000 live vectors under the limit set by the caller.
fn many_vectors(lower_hard_limit: bool) {
    let before = get_nofile();
    // RLIM_INFINITY is the largest value, so this also accepts an unlimited hard limit.
    if before.rlim_max < LIMIT {
        eprintln!(
            "SKIPPED: the hard open-files limit ({}) is below {LIMIT}",
            before.rlim_max
        );
        return;
    }
    let hard = if lower_hard_limit {
        LIMIT
    } else {
        before.rlim_max
    };
    set_nofile(LIMIT, hard);
    let budget = (LIMIT / 2) as usize;

    let dir = TestDir::new("many");
    // Sparse files unless asked otherwise: on ext4 mounted with `discard` (this project's
    // machines), freeing a file with reserved blocks waits for the discard, about 2.5 ms each,
    // so dropping 5000 such segments takes 12 s or more. Descriptors are the subject here;
    // block reservation is tested elsewhere.
    let reserve = std::env::var_os("MMAPVEC_MANY_SEGMENTS_RESERVE").is_some();
    // No reuse: the test counts what each free gives back at once (`tests/reuse.rs` covers
    // the kept segments).
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .reserve_disk(reserve)
        .reuse_bytes(0)
        .build()
        .expect("build");
    let folder = dir.segment_folder();
    let start = Instant::now();

    let mut vectors: Vec<MmapVec<u64>> = Vec::with_capacity(VECTORS);
    for i in 0..VECTORS {
        let mut v = MmapVec::with_capacity_in(100, alloc.clone());
        v.extend((0..100).map(|j| value(i, j)));
        vectors.push(v);
    }
    let created = start.elapsed();
    let s = alloc.stats();
    assert_eq!(s.live_segments, VECTORS as u64);
    assert_eq!(s.failures.total(), 0, "{s:?}");
    let held = VECTORS - s.named_segments as usize;
    assert_eq!(held, budget, "segments holding a descriptor: {s:?}");
    // The named ones are files in the session folder; the others are unlinked.
    let files = dir.files();
    assert_eq!(files.len(), s.named_segments as usize);
    assert!(
        files
            .iter()
            .all(|f| f.parent().unwrap().parent().unwrap() == folder)
    );
    let open = open_descriptors();
    assert!(open < LIMIT as usize, "{open} descriptors open");
    // The other half of the limit is left to the program.
    let spare: Vec<File> = (0..200)
        .map(|n| {
            File::open("/dev/null").unwrap_or_else(|e| panic!("open #{n} with {open} open: {e}"))
        })
        .collect();
    drop(spare);

    // Grow each one again, now that all exist: the named ones are reopened by name.
    let grows = alloc.stats().grows_remapped;
    for (i, v) in vectors.iter_mut().enumerate() {
        v.extend((100..2000).map(|j| value(i, j)));
    }
    let grown = start.elapsed();
    let s = alloc.stats();
    assert_eq!(s.failures.total(), 0, "{s:?}");
    assert_eq!(
        s.grows_remapped - grows,
        VECTORS as u64,
        "every vector grew once"
    );
    assert_eq!(s.live_segments, VECTORS as u64);
    assert!(open_descriptors() < LIMIT as usize);

    for (i, v) in vectors.iter().enumerate() {
        assert_eq!(v.len(), 2000);
        assert!(
            v.iter().enumerate().all(|(j, &x)| x == value(i, j)),
            "vector {i}"
        );
    }

    let checked = start.elapsed();
    drop(vectors);
    let dropped = start.elapsed();
    let s = alloc.stats();
    assert_eq!(
        (s.live_segments, s.named_segments, s.mapped_bytes),
        (0, 0, 0),
        "{s:?}"
    );
    assert!(dir.files().is_empty(), "files left: {}", dir.files().len());
    // The session folder (and its lock) went with its last named segment.
    assert_eq!(core_support::descriptors_under(&folder), 0);
    let left: Vec<_> = std::fs::read_dir(&folder)
        .expect("segment folder")
        .collect();
    assert!(
        left.is_empty(),
        "the session folder goes with its last segment: {left:?}"
    );
    drop(alloc);
    eprintln!(
        "{VECTORS} vectors, nofile {LIMIT}/{hard}, reserve_disk {reserve}: created in \
         {created:?}, all grown by {grown:?}, checked by {checked:?}, dropped by {dropped:?} \
         ({budget} held a descriptor, the rest named)"
    );
}

#[test]
fn five_thousand_vectors_soft_limit_1024() {
    match child_role().as_deref() {
        Some("soft-limit") => many_vectors(false),
        Some(role) => panic!("unexpected child role {role}"),
        None => {
            run_in_child("five_thousand_vectors_soft_limit_1024", "soft-limit");
        }
    }
}

#[test]
fn five_thousand_vectors_hard_limit_1024() {
    match child_role().as_deref() {
        Some("hard-limit") => many_vectors(true),
        Some(role) => panic!("unexpected child role {role}"),
        None => {
            run_in_child("five_thousand_vectors_hard_limit_1024", "hard-limit");
        }
    }
}
