//! A full disk is an allocation error, never a `SIGBUS`: blocks are reserved (`fallocate`)
//! when a segment is created or grown.

use mmapvec::{MmapAllocator, MmapVec};

use crate::support::{
    TestDir, Tmpfs, assert_child_passed, child_role, euid, files_under, free_bytes, in_child,
    killed_by, no_core_dumps, run_child, set_soft_limit, skip,
};

const MIB: usize = 1 << 20;
const TMPFS_SIZE: usize = 16 * MIB;
const DIR_ENV: &str = "MMAPVEC_FAULTS_DIR";

/// Fills `v` to its capacity with `byte`: every page of the segment is written.
fn fill(v: &mut MmapVec<u8>, byte: u8) {
    v.clear();
    v.resize(v.capacity(), byte);
}

/// In a child process: a `fork` by a test running beside it would keep a freed segment's
/// pages on the tmpfs while the fork's child lives ("room after a free" would fail).
#[test]
fn full_tmpfs_is_an_alloc_error_and_reserved_bytes_stay_writable() {
    const NAME: &str = "disk_full::full_tmpfs_is_an_alloc_error_and_reserved_bytes_stay_writable";
    if !in_child(NAME, "full") {
        return;
    }
    let fs = match Tmpfs::mount("full", TMPFS_SIZE) {
        Ok(fs) => fs,
        Err(why) => skip!("{why}"),
    };
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(fs.path())
        .allow_ram_backed(true)
        .build()
        .expect("build");
    let mut vectors: Vec<MmapVec<u8>> = Vec::new();
    loop {
        let mut v = MmapVec::new_in(alloc.clone());
        if v.try_reserve_exact(MIB).is_err() {
            break;
        }
        vectors.push(v);
        assert!(
            vectors.len() <= TMPFS_SIZE / MIB,
            "more reserved than the tmpfs holds"
        );
    }
    assert!(
        vectors.len() >= TMPFS_SIZE / MIB / 2,
        "only {} MiB reserved",
        vectors.len()
    );
    println!(
        "{} MiB reserved on a {} MiB tmpfs, then ENOSPC",
        vectors.len(),
        TMPFS_SIZE / MIB
    );
    let stats = alloc.stats();
    assert_eq!(stats.failures.disk_full, 1, "{stats:?}");
    assert_eq!(stats.failures.total(), 1, "{stats:?}");
    let err = alloc.take_last_error().expect("the error is kept");
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");

    // Growing on the full disk fails too, and the vector keeps its bytes and its capacity.
    // The failed grow gives back whatever it could reserve: the free space is what it was.
    fill(&mut vectors[0], 0xA5);
    let free = free_bytes(fs.path());
    assert!(vectors[0].try_reserve_exact(2 * MIB).is_err());
    assert_eq!(vectors[0].capacity(), MIB);
    assert!(vectors[0].iter().all(|&b| b == 0xA5));
    assert_eq!(alloc.stats().failures.disk_full, 2);
    assert_eq!(free_bytes(fs.path()), free, "a failed grow kept blocks");

    // A segment that would keep its name leaves no file behind when it cannot be made.
    let named = MmapAllocator::builder()
        .small_threshold(0)
        .dir(fs.path())
        .allow_ram_backed(true)
        .descriptor_budget(0)
        .build()
        .expect("build");
    let mut v = MmapVec::<u8>::new_in(named.clone());
    assert!(v.try_reserve_exact(MIB).is_err());
    assert_eq!(named.stats().failures.disk_full, 1);
    let folder = fs.path().join(format!("mmapvec-{}", euid()));
    assert_eq!(files_under(&folder), Vec::<std::path::PathBuf>::new());

    // Every reserved byte can be written: this is where sparse files die of SIGBUS.
    for (i, v) in vectors.iter_mut().enumerate() {
        fill(v, i as u8);
    }
    for (i, v) in vectors.iter().enumerate() {
        assert_eq!(v.len(), MIB);
        assert!(v.iter().all(|&b| b == i as u8), "vector {i} lost its bytes");
    }

    // Freeing gives the space back.
    vectors.pop();
    let mut again = MmapVec::<u8>::new_in(alloc.clone());
    again.try_reserve_exact(MIB).expect("room after a free");
    fill(&mut again, 1);
    drop((vectors, again, alloc));
}

#[test]
fn sparse_segments_on_a_full_tmpfs_die_of_sigbus() {
    const NAME: &str = "disk_full::sparse_segments_on_a_full_tmpfs_die_of_sigbus";
    if child_role().as_deref() == Some("sparse") {
        // The design this crate avoids: `reserve_disk(false)` makes sparse files, the
        // allocation succeeds, and writing past the free space kills the process.
        no_core_dumps();
        let dir = std::env::var(DIR_ENV).expect("dir from the parent");
        let alloc = MmapAllocator::builder()
            .small_threshold(0)
            .dir(dir)
            .allow_ram_backed(true)
            .reserve_disk(false)
            .build()
            .expect("build");
        let mut v = MmapVec::<u8>::new_in(alloc);
        v.try_reserve_exact(2 * TMPFS_SIZE)
            .expect("a sparse file reserves nothing");
        println!(
            "reserved {} MiB on a {} MiB tmpfs",
            2 * TMPFS_SIZE / MIB,
            TMPFS_SIZE / MIB
        );
        fill(&mut v, 1);
        panic!(
            "wrote {} bytes to a {} byte tmpfs without SIGBUS",
            v.len(),
            TMPFS_SIZE
        );
    }
    let fs = match Tmpfs::mount("sparse", TMPFS_SIZE) {
        Ok(fs) => fs,
        Err(why) => skip!("{why}"),
    };
    let dir = fs.path().to_str().expect("utf-8 path");
    let output = run_child(NAME, "sparse", &[(DIR_ENV, dir)]);
    assert_eq!(
        killed_by(&output),
        Some(libc::SIGBUS),
        "the sparse child should die of SIGBUS"
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("reserved 32 MiB"));
}

#[test]
fn rlimit_fsize_is_disk_full() {
    const NAME: &str = "disk_full::rlimit_fsize_is_disk_full";
    if child_role().as_deref() != Some("fsize") {
        let output = run_child(NAME, "fsize", &[]);
        assert_child_passed(NAME, &output);
        return;
    }
    // SAFETY: ignoring a signal installs no handler code; this child process is ours alone.
    let previous = unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    assert_ne!(previous, libc::SIG_ERR);
    set_soft_limit(libc::RLIMIT_FSIZE, 8 * MIB as u64);

    let dir = TestDir::new("fsize");
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .build()
        .expect("build");
    let mut big = MmapVec::<u8>::new_in(alloc.clone());
    assert!(
        big.try_reserve_exact(16 * MIB).is_err(),
        "16 MiB passed an 8 MiB file size limit"
    );
    assert_eq!(alloc.stats().failures.disk_full, 1);
    let err = alloc.take_last_error().expect("the error is kept");
    assert_eq!(err.raw_os_error(), Some(libc::EFBIG), "{err}");

    let mut small = MmapVec::<u8>::new_in(alloc.clone());
    small
        .try_reserve_exact(4 * MIB)
        .expect("4 MiB is under the limit");
    fill(&mut small, 7);
    // `try_reserve_exact` counts from the length (4 MiB): ask for 12 MiB in all.
    assert!(
        small.try_reserve_exact(8 * MIB).is_err(),
        "grew past the file size limit"
    );
    assert_eq!(small.capacity(), 4 * MIB);
    assert!(small.iter().all(|&b| b == 7));
    assert_eq!(alloc.stats().failures.disk_full, 2);
    assert_eq!(alloc.stats().failures.total(), 2);

    // The limit is per file: two files of exactly the limit are fine.
    let mut at_limit = MmapVec::<u8>::new_in(alloc.clone());
    at_limit
        .try_reserve_exact(8 * MIB)
        .expect("exactly the limit");
    small
        .try_reserve_exact(4 * MIB)
        .expect("grow up to the limit");
    assert_eq!(small.capacity(), 8 * MIB);
    assert!(small.iter().all(|&b| b == 7));
}
