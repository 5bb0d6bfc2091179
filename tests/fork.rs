//! A child made by `fork` shares its parent's segments: it may read, write, grow and drop its
//! copies of the parent's vectors without resizing or removing the parent's files.

use std::path::PathBuf;

use mmapvec::{MmapAllocator, MmapVec};

/// One test at a time: a `fork` by one test starts a new fork epoch for every allocator of the
/// process, and a segment made before it is never kept for reuse (a child may map it). Another
/// test's fork between a worker's allocation and its free made
/// `a_child_gives_back_the_segments_its_parents_other_threads_kept` see no kept segment (CI,
/// the third of five repeated runs).
fn serial() -> std::sync::MutexGuard<'static, ()> {
    static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn fresh_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mmapvec-fork-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Forks; the child runs `child` and exits 0 if it returns, 1 if it panics.
fn in_child(child: impl FnOnce()) -> i32 {
    // SAFETY: the child only runs `child` and then `_exit`s, never returning into the test
    // harness. Other test threads are not running in the child (fork copies one thread); the
    // child code below takes no lock that another thread might have held at the fork.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).is_ok();
        // SAFETY: `_exit` ends the child at once, without running the parent's destructors.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: `pid` is our child; `status` is a valid out-pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    status
}

#[test]
fn child_resizing_and_dropping_inherited_vectors_leaves_the_parent_intact() {
    let _serial = serial();
    for budget in [None, Some(0)] {
        let dir = fresh_dir(if budget.is_some() { "named" } else { "held" });
        let mut builder = MmapAllocator::builder().small_threshold(0).dir(&dir);
        if let Some(budget) = budget {
            builder = builder.descriptor_budget(budget);
        }
        let alloc = builder.build().unwrap();
        let mut shrunk = MmapVec::<u64>::new_in(alloc.clone());
        shrunk.extend(0..1_000_000);
        let mut grown = MmapVec::<u64>::new_in(alloc.clone());
        grown.extend(0..1000);
        let mut dropped = MmapVec::<u64>::new_in(alloc.clone());
        dropped.extend(0..1000);
        let kept = dropped.clone();

        let status = in_child(|| {
            let dropped = std::mem::replace(&mut dropped, MmapVec::new_in(alloc.clone()));
            // Writes to a shared mapping reach the parent: documented behaviour.
            grown[0] = 42;
            shrunk.truncate(10);
            shrunk.shrink_to_fit();
            grown.extend(0..1_000_000);
            drop(dropped);
            assert_eq!(grown.len(), 1_001_000);
            assert_eq!(shrunk[..], [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]);
        });
        assert_eq!(status, 0, "the child failed");

        // The parent's blocks are whole: no SIGBUS from a truncated file, data intact.
        assert_eq!(shrunk.len(), 1_000_000);
        assert!(shrunk.iter().copied().eq(0..1_000_000));
        assert_eq!(
            grown[0], 42,
            "a child's write to a shared segment is seen by the parent"
        );
        assert!(grown[1..].iter().copied().eq(1..1000));
        assert!(dropped.iter().copied().eq(0..1000));
        assert_eq!(dropped, kept);
        // And the parent can still resize them: their files were not removed.
        grown.extend(0..1_000_000);
        shrunk.shrink_to_fit();
        assert_eq!(grown.len(), 1_001_000);
        drop((shrunk, grown, dropped, kept));
        assert_eq!(alloc.stats().live_segments, 0);
        drop(alloc);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}

/// Mappings of files under `dir` in this process.
fn mappings_under(dir: &std::path::Path) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let dir = dir.to_string_lossy();
    maps.lines().filter(|line| line.contains(&*dir)).count()
}

/// A segment kept in another thread's slot (the per-thread reuse fast path) is given back by a
/// fork child, where that thread does not exist: not counted as kept, and unmapped there. The
/// parent keeps its slot.
#[test]
fn a_child_gives_back_the_segments_its_parents_other_threads_kept() {
    let _serial = serial();
    let dir = fresh_dir("slots");
    let alloc = MmapAllocator::builder().dir(&dir).build().unwrap();
    let (kept_tx, kept_rx) = std::sync::mpsc::channel();
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    let worker = {
        let alloc = alloc.clone();
        std::thread::spawn(move || {
            let v = MmapVec::<u8>::with_capacity_in(1 << 20, alloc.clone());
            drop(v);
            kept_tx.send(()).unwrap();
            // Alive (with its slot) until the parent is done.
            done_rx.recv().unwrap();
            // Given back at this thread's next use: a segment of an older fork epoch may be
            // mapped by the child, so it is never handed out again.
            let v = MmapVec::<u8>::with_capacity_in(1 << 20, alloc.clone());
            drop(v);
        })
    };
    kept_rx.recv().unwrap();
    let before = alloc.stats();
    assert_eq!((before.live_segments, before.kept_segments), (0, 1));
    assert_eq!(mappings_under(&dir), 1);

    let status = in_child(|| {
        let stats = alloc.stats();
        assert_eq!(
            (stats.live_segments, stats.kept_segments, stats.mapped_bytes),
            (0, 0, 0),
            "the child still counts its parent's other thread's slot: {stats:?}"
        );
        assert_eq!(
            mappings_under(&dir),
            0,
            "the slot's segment is still mapped"
        );
        // And the child allocates as usual.
        let v = MmapVec::<u8>::with_capacity_in(1 << 20, alloc.clone());
        assert_eq!(alloc.stats().live_segments, 1);
        drop(v);
    });
    assert_eq!(status, 0, "the child failed");

    // The parent's slot is untouched by the child.
    assert_eq!(alloc.stats().kept_segments, 1);
    assert_eq!(mappings_under(&dir), 1);
    done_tx.send(()).unwrap();
    worker.join().unwrap();
    assert_eq!(alloc.stats().live_segments, 0);
    drop(alloc);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// In a fork child, a new thread that uses the allocator first must not take the forking
/// thread's slot for an orphan: that slot gives its segment back itself, later, and a segment
/// made meanwhile at the same address would then be freed under its owner (the review's
/// finding; before the fix the pass spared only the calling thread's slot).
#[test]
fn a_childs_new_thread_leaves_the_forking_threads_slot_alone() {
    let _serial = serial();
    let dir = fresh_dir("slots-survivor");
    let alloc = MmapAllocator::builder().dir(&dir).build().unwrap();
    // This thread's slot keeps a freed 1 MiB segment.
    drop(MmapVec::<u8>::with_capacity_in(1 << 20, alloc.clone()));
    assert_eq!(alloc.stats().kept_segments, 1);
    let status = in_child(|| {
        let worker = {
            let alloc = alloc.clone();
            std::thread::spawn(move || {
                // First use in the child: the orphan pass runs here.
                let _ = alloc.stats();
                let mut w = MmapVec::<u8>::with_capacity_in(1 << 20, alloc.clone());
                w.resize(1 << 20, 7);
                w
            })
        };
        let w = worker.join().unwrap();
        // The forking thread's slot is stale: this gives its segment back, once.
        let stats = alloc.stats();
        assert_eq!(
            stats.live_segments, 1,
            "the worker's vector was freed: {stats:?}"
        );
        assert!(w.iter().all(|&b| b == 7));
        drop(w);
    });
    assert_eq!(status, 0, "the child failed");
    drop(alloc);
    std::fs::remove_dir_all(&dir).unwrap();
}
