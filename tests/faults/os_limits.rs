//! The OS's per-process limits: open files (`RLIMIT_NOFILE`) and mappings
//! (`vm.max_map_count`). Many live vectors under a small descriptor limit work; past the map
//! count an allocation fails with a recorded cause, and nothing leaks.

use mmapvec::{MmapAllocator, MmapVec};

use crate::support::{
    TestDir, descriptors_under, files_under, in_child, mappings_under, maps, open_descriptors,
    set_soft_limit, skip, vm_size,
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

/// Issue 12, hole 3: a chunk that cannot be mapped because the process is at
/// `vm.max_map_count` keeps its place in the small-block region. Before the fix every such
/// failure counted the chunk's index as lost, so after as many failures as the region has
/// chunks the tier could never make a chunk again and every small block became a segment.
///
/// The region is made small (32 chunks) through `RLIMIT_AS`, so 200 failures are more than it
/// has (or than the 128 the region had before the fix): before the fix the block asked for
/// after the limit is gone was a segment.
#[test]
fn chunks_that_fail_at_the_map_limit_keep_their_place() {
    const NAME: &str = "os_limits::chunks_that_fail_at_the_map_limit_keep_their_place";
    if !in_child(NAME, "mapcount-tier") {
        return;
    }
    let dir = TestDir::fast("mapcount-tier");
    map_limit_failures_keep_chunk_places(dir.path());
}

/// Issue 18: the same on a file system whose `mmap` may fail after it has unmapped the range
/// it replaces (overlayfs here, the usual `/tmp` of containers; NFS, ZFS and FUSE are alike).
/// The rule that kept a chunk's place trusted such an `ENOMEM` on five file systems only, so
/// here every failure lost an index. The tier now maps a page of the file elsewhere first (its
/// file system's `mmap` and the map count refuse it there, touching nothing of ours), then
/// over the reservation: what is there after a failure does not depend on the file system.
#[test]
fn chunks_that_fail_at_the_map_limit_keep_their_place_on_overlayfs() {
    const NAME: &str = "os_limits::chunks_that_fail_at_the_map_limit_keep_their_place_on_overlayfs";
    if !in_child(NAME, "mapcount-tier-overlay") {
        return;
    }
    let overlay = match Overlay::mount("mapcount-overlay") {
        Ok(overlay) => overlay,
        Err(why) => skip!("{why}"),
    };
    map_limit_failures_keep_chunk_places(&overlay.merged());
}

/// An overlayfs mount (root only) over three folders of a test folder; unmounted on drop.
struct Overlay {
    dir: TestDir,
}

impl Overlay {
    fn mount(label: &str) -> Result<Overlay, String> {
        if crate::support::euid() != 0 {
            return Err("needs root to mount an overlayfs".into());
        }
        let dir = TestDir::new(label);
        for sub in ["lower", "upper", "work", "merged"] {
            std::fs::create_dir(dir.path().join(sub)).map_err(|e| e.to_string())?;
        }
        let p = |sub: &str| dir.path().join(sub).display().to_string();
        let options = format!(
            "lowerdir={},upperdir={},workdir={}",
            p("lower"),
            p("upper"),
            p("work")
        );
        crate::core_support::mount(c"overlay", &dir.path().join("merged"), &options)?;
        Ok(Overlay { dir })
    }

    fn merged(&self) -> std::path::PathBuf {
        self.dir.path().join("merged")
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        crate::core_support::unmount(&self.merged());
    }
}

/// The body of the tests above, with the allocator's folder in `folder`.
fn map_limit_failures_keep_chunk_places(folder: &std::path::Path) {
    let limit: usize = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    if limit == 0 || limit > 262_144 {
        skip!("vm.max_map_count is {limit}: unknown or too high to reach quickly");
    }
    let page = 4096;
    // What is mapped now, and a limit leaving 1 GiB: the tier takes an eighth of what is
    // left, cut to a power of two (128 MiB, 32 chunks); the rest holds the filler below.
    let vm_size = vm_size();
    set_soft_limit(libc::RLIMIT_AS, (vm_size + (1 << 30)) as u64);
    let alloc = MmapAllocator::builder()
        .dir(folder)
        .reuse_bytes(0)
        .build()
        .expect("build");
    // The region and its first chunk (64-byte blocks).
    let first = mmapvec::mmap_vec![in alloc.clone(); 7u8; 64];
    assert_eq!(alloc.stats().small.chunks_created, 1);
    // Reserve the list of failures up front: at the limit, the heap may not be able to grow.
    let mut failures = Vec::with_capacity(64);

    // Fill the map count: one filler, then every other page made inaccessible (each split is
    // one more mapping), until the kernel refuses.
    let filler_len = (limit + 16) * page;
    // SAFETY: a fresh anonymous mapping, touching no other mapping.
    let filler = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            filler_len,
            libc::PROT_READ,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    assert_ne!(
        filler,
        libc::MAP_FAILED,
        "filler: {}",
        std::io::Error::last_os_error()
    );
    let mut split = 0;
    loop {
        let at = filler.cast::<u8>().wrapping_add((2 * split + 1) * page);
        if (2 * split + 2) * page > filler_len {
            panic!("the filler ran out before the map count did");
        }
        // SAFETY: a page of our own filler.
        if unsafe { libc::mprotect(at.cast(), page, libc::PROT_NONE) } != 0 {
            break;
        }
        split += 1;
    }
    // A split in the middle adds two mappings, so one may still fit: the filler's last page,
    // split off its end, is one.
    let last = filler.cast::<u8>().wrapping_add(filler_len - page);
    // SAFETY: a page of our own filler.
    let _ = unsafe { libc::mprotect(last.cast(), page, libc::PROT_NONE) };
    // Blocks of 32 KiB (128 to a chunk) until one fails: Linux lets one mapping that splits
    // a single other one go past the limit, so the first new chunk may still come. Then 200,
    // more than the region could hold before the fix (512 MiB there), each needing a new
    // chunk that cannot be mapped.
    let mut held: Vec<MmapVec<u8>> = Vec::with_capacity(1024);
    while held.len() < 1000 {
        let mut v: MmapVec<u8> = MmapVec::new_in(alloc.clone());
        if v.try_reserve_exact(32 << 10).is_err() {
            failures.push(true);
            break;
        }
        held.push(v);
    }
    for _ in 0..200 {
        let mut v: MmapVec<u8> = MmapVec::new_in(alloc.clone());
        failures.push(v.try_reserve_exact(32 << 10).is_err());
    }
    // SAFETY: the filler is ours and nothing refers to it.
    assert_eq!(unsafe { libc::munmap(filler, filler_len) }, 0);

    assert!(
        failures.iter().all(|&f| f),
        "allocations at the map limit must fail ({split} splits, {} mappings, {failures:?})",
        maps().len()
    );
    let stats = alloc.stats();
    assert_eq!(stats.failures.out_of_mappings, 201, "{stats:?}");
    // Below the limit again: the next block comes from a new chunk of the tier.
    let mut v: MmapVec<u8> = MmapVec::new_in(alloc.clone());
    let created = stats.small.chunks_created;
    v.try_reserve_exact(32 << 10)
        .unwrap_or_else(|e| panic!("{e:?}: {:?}", alloc.take_last_error()));
    let stats = alloc.stats();
    println!("{split} splits filled the map count; after it: {stats:?}");
    assert_eq!(
        (stats.small.chunks_created, stats.live_segments),
        (created + 1, 0),
        "the block must come from the tier, not a segment of its own"
    );
    drop((v, first, held));
}

/// A region refused under `RLIMIT_AS` is tried again once address space is back: the tier
/// is not off for the rest of the process (it was, before).
#[test]
fn the_tier_comes_back_when_address_space_does() {
    const NAME: &str = "os_limits::the_tier_comes_back_when_address_space_does";
    if !in_child(NAME, "rlimit-as-back") {
        return;
    }
    // 256 MiB left: an eighth is less than the smallest region, so the tier is off.
    set_soft_limit(libc::RLIMIT_AS, (vm_size() + (256 << 20)) as u64);
    let dir = TestDir::fast("rlimit-as-back");
    let alloc = MmapAllocator::builder()
        .dir(dir.path())
        .build()
        .expect("build");
    let refused = mmapvec::mmap_vec![in alloc.clone(); 7u8; 64];
    let stats = alloc.stats();
    assert_eq!(
        (stats.small.chunks_created, stats.live_segments),
        (0, 1),
        "with the region refused, a small vector is a segment: {stats:?}"
    );
    // The limit goes away; after the retry delay, the next small vector is a block again.
    set_soft_limit(libc::RLIMIT_AS, libc::RLIM_INFINITY);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    let block = mmapvec::mmap_vec![in alloc.clone(); 8u8; 64];
    let stats = alloc.stats();
    assert_eq!(
        (stats.small.chunks_created, stats.live_segments),
        (1, 1),
        "the tier stayed off after address space came back: {stats:?}"
    );
    drop((refused, block));
}
