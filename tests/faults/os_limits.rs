//! The OS's per-process limits: open files (`RLIMIT_NOFILE`) and mappings
//! (`vm.max_map_count`). Many live vectors under a small descriptor limit work; past the map
//! count an allocation fails with a recorded cause, and nothing leaks.

use mmapvec::{MmapAllocator, MmapVec};

use crate::support::{
    TestDir, descriptors_under, files_under, in_child, mappings_under, maps, open_descriptors,
    set_soft_limit, skip,
};

#[test]
fn five_thousand_vectors_under_1024_descriptors() {
    const NAME: &str = "os_limits::five_thousand_vectors_under_1024_descriptors";
    const VECTORS: usize = 5000;
    if !in_child(NAME, "nofile") {
        return;
    }
    set_soft_limit(libc::RLIMIT_NOFILE, 1024);
    let dir = TestDir::fast("nofile");
    let descriptors_at_start = open_descriptors();
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .reuse_bytes(0)
        .build()
        .expect("build");
    // The allocator holds its checked segment folder open (one descriptor).
    let descriptors_before = open_descriptors();
    assert_eq!(descriptors_before, descriptors_at_start + 1);

    let mut vectors: Vec<MmapVec<u64>> = Vec::with_capacity(VECTORS);
    for i in 0..VECTORS {
        let mut v = MmapVec::new_in(alloc.clone());
        v.try_reserve_exact(4)
            .unwrap_or_else(|e| panic!("vector {i}: {e:?}, {:?}", alloc.take_last_error()));
        v.push(i as u64);
        vectors.push(v);
    }
    let stats = alloc.stats();
    assert_eq!(stats.live_segments, VECTORS as u64, "{stats:?}");
    assert_eq!(stats.failures.total(), 0, "{stats:?}");
    // The default budget is half the soft limit: the rest keep their names.
    assert!(stats.named_segments >= (VECTORS - 512) as u64, "{stats:?}");
    let held = open_descriptors() - descriptors_before;
    assert!(
        held <= 513,
        "{held} descriptors held (budget 512, plus the session lock)"
    );

    // Growing reopens the named ones by name, one at a time.
    for (i, v) in vectors.iter_mut().enumerate() {
        v.extend(0..1000);
        assert_eq!(v[0], i as u64);
        assert_eq!(v[1000], 999);
    }
    assert_eq!(alloc.stats().failures.total(), 0);

    drop(vectors);
    assert_eq!(alloc.stats().live_segments, 0);
    assert_eq!(mappings_under(dir.path()), 0, "mappings left");
    assert_eq!(
        files_under(dir.path()),
        Vec::<std::path::PathBuf>::new(),
        "files left"
    );
    drop(alloc);
    assert_eq!(descriptors_under(dir.path()), 0, "descriptors left");
    assert_eq!(open_descriptors(), descriptors_at_start);
}

#[test]
fn descriptor_budget_above_the_limit_fails_with_too_many_files() {
    const NAME: &str = "os_limits::descriptor_budget_above_the_limit_fails_with_too_many_files";
    if !in_child(NAME, "emfile") {
        return;
    }
    set_soft_limit(libc::RLIMIT_NOFILE, 64);
    let dir = TestDir::fast("emfile");
    // A budget the process cannot afford: every segment holds its descriptor until EMFILE.
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .reuse_bytes(0)
        .descriptor_budget(usize::MAX)
        .build()
        .expect("build");
    let mut vectors = Vec::with_capacity(64);
    let failed_at = loop {
        let mut v = MmapVec::<u8>::new_in(alloc.clone());
        if v.try_reserve_exact(1).is_err() {
            break vectors.len();
        }
        vectors.push(v);
        assert!(
            vectors.len() < 64,
            "64 descriptors held under a limit of 64"
        );
    };
    let stats = alloc.stats();
    assert_eq!(stats.failures.too_many_files, 1, "{stats:?}");
    let err = alloc.take_last_error().expect("the error is kept");
    // The creator adds the path to the message; the OS error is still in it.
    assert!(
        err.to_string()
            .contains(&format!("(os error {})", libc::EMFILE)),
        "{err}"
    );
    println!("EMFILE after {failed_at} segments: {err}");
    drop(vectors);
    assert_eq!(
        files_under(dir.path()),
        Vec::<std::path::PathBuf>::new(),
        "files left"
    );
    // Only the allocator's handle of its segment folder.
    assert_eq!(descriptors_under(dir.path()), 1, "descriptors left");
    let again = mmapvec::mmap_vec![in alloc.clone(); 1u8; 10];
    assert_eq!(again.len(), 10);
}

#[test]
fn past_max_map_count_is_an_error_and_leaks_nothing() {
    const NAME: &str = "os_limits::past_max_map_count_is_an_error_and_leaks_nothing";
    if !in_child(NAME, "mapcount") {
        return;
    }
    let limit: usize = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if limit == 0 || limit > 262_144 {
        // The sysctl is system-wide: never lowered for a test. Too high means too slow.
        skip!("vm.max_map_count is {limit}: unknown or too high to reach quickly");
    }
    let dir = TestDir::fast("mapcount");
    let descriptors_at_start = open_descriptors();
    // Sparse one-page segments: the directory may be a small tmpfs, and blocks are not what
    // this test is about.
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .reuse_bytes(0)
        .reserve_disk(false)
        .build()
        .expect("build");
    let mappings_before = maps().len();
    let descriptors_before = open_descriptors();

    // Reserve the list up front: near the limit, the heap may not be able to grow.
    let mut vectors: Vec<MmapVec<u8>> = Vec::with_capacity(limit + 1);
    let made = loop {
        let mut v = MmapVec::new_in(alloc.clone());
        if v.try_reserve_exact(1).is_err() {
            break vectors.len();
        }
        vectors.push(v);
        assert!(
            vectors.len() <= limit,
            "more segments than vm.max_map_count"
        );
    };
    // Free at once: formatting messages needs a heap that can grow.
    let stats = alloc.stats();
    let err = alloc.take_last_error();
    drop(vectors);

    println!(
        "vm.max_map_count {limit}: the process had {mappings_before} mappings, \
         {made} segments were made, then: {err:?}"
    );
    assert_eq!(stats.live_segments, made as u64);
    assert_eq!(stats.failures.total(), 1, "{stats:?}");
    assert_eq!(
        stats.failures.out_of_mappings + stats.failures.too_many_files,
        1,
        "{stats:?}"
    );
    let err = err.expect("the error is kept");
    assert!(
        matches!(
            err.raw_os_error(),
            Some(libc::ENOMEM | libc::EMFILE | libc::ENFILE)
        ),
        "{err}"
    );
    // The map count was the limit: within a few mappings of it (the heap may add some).
    assert!(
        made + mappings_before + 64 >= limit,
        "stopped early at {made}: {err}"
    );

    assert_eq!(alloc.stats().live_segments, 0);
    assert_eq!(mappings_under(dir.path()), 0, "mappings left");
    assert_eq!(
        files_under(dir.path()),
        Vec::<std::path::PathBuf>::new(),
        "files left"
    );
    // Only the session folder's lock may remain while the allocator lives.
    assert!(
        open_descriptors() <= descriptors_before + 1,
        "descriptors left"
    );
    let again = mmapvec::mmap_vec![in alloc.clone(); 2u8; 100];
    assert_eq!(again[99], 2);
    drop((again, alloc));
    assert_eq!(descriptors_under(dir.path()), 0, "descriptors left");
    assert_eq!(open_descriptors(), descriptors_at_start);
}
