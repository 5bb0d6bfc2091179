//! `MmapVec` behaviour: the `Vec` operations, element drops, one segment per vector and its file
//! (name, place, mapping, removal), custom segment creators, statistics, the `mmap_vec!` macro
//! and `MmapVecExt`, named segments (`descriptor_budget(0)`), and a segment file removed or
//! replaced behind the allocator's back.

mod core_support;

use std::collections::HashSet;
use std::fs::{self, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use core_support::{
    TestDir, child_role, euid, file_name, files_under, is_uuid_v4, mappings_under, page,
};
use mmapvec::{
    GrowStrategy, MmapAllocator, MmapVec, MmapVecExt, SegmentCreator, SegmentFile, SegmentRequest,
    mmap_vec,
};

#[test]
fn push_pop_index_and_slices() {
    let dir = TestDir::new("push-pop");
    let mut v: MmapVec<u64> = MmapVec::new_in(dir.allocator_segments_only());
    assert!(v.is_empty());
    assert_eq!(v.pop(), None);
    for i in 0..10_000u64 {
        v.push(i * 3);
    }
    assert_eq!(v.len(), 10_000);
    assert!(v.capacity() >= 10_000);
    assert_eq!(v[0], 0);
    assert_eq!(v[9_999], 29_997);
    assert_eq!(v.first(), Some(&0));
    assert_eq!(v.last(), Some(&29_997));
    assert_eq!(v.get(10_000), None);
    assert_eq!(&v[10..13], &[30, 33, 36]);
    assert_eq!(v.iter().sum::<u64>(), 3 * (9_999 * 10_000 / 2));
    assert!(v.contains(&300));
    assert_eq!(v.binary_search(&301), Err(101));

    v[5] = 1;
    v.as_mut_slice()[6] = 2;
    v.swap(0, 9_999);
    assert_eq!((v[0], v[5], v[6], v[9_999]), (29_997, 1, 2, 0));
    v.sort_unstable();
    assert!(v.windows(2).all(|w| w[0] <= w[1]));

    for expected in (9_990..10_000u64).rev() {
        assert_eq!(v.pop(), Some(expected * 3));
    }
    assert_eq!(v.len(), 9_990);
    v.insert(0, 7);
    assert_eq!(v[0], 7);
    assert_eq!(v.remove(0), 7);
    v.extend_from_slice(&[1, 2, 3]);
    assert_eq!(&v[v.len() - 3..], &[1, 2, 3]);
    let std_copy: Vec<u64> = v.iter().copied().collect();
    assert_eq!(v.as_slice(), std_copy.as_slice());
}

#[test]
fn with_capacity_allocates_once() {
    let dir = TestDir::new("with-capacity");
    let alloc = dir.allocator_segments_only();
    let mut v: MmapVec<u32> = MmapVec::with_capacity_in(100_000, alloc.clone());
    assert!(v.capacity() >= 100_000);
    assert_eq!(alloc.stats().creates, 1);
    assert_eq!(alloc.stats().live_segments, 1);
    let start = v.as_ptr();
    v.extend(0..100_000);
    // Filling the reserved capacity neither moves nor grows the buffer.
    assert_eq!(v.as_ptr(), start);
    let stats = alloc.stats();
    assert_eq!(stats.creates, 1);
    assert_eq!(
        stats.grows_remapped + stats.grows_mapped_again,
        0,
        "{stats:?}"
    );
    assert!(v.iter().copied().eq(0..100_000));

    let empty: MmapVec<u32> = MmapVec::with_capacity_in(0, alloc.clone());
    assert_eq!(empty.capacity(), 0);
    assert_eq!(alloc.stats().creates, 1, "an empty vector has no segment");
}

#[test]
fn truncate_and_clear() {
    let dir = TestDir::new("truncate");
    let alloc = dir.allocator_segments_only();
    let mut v: MmapVec<u16> = MmapVec::new_in(alloc.clone());
    v.extend(0..5_000);
    let capacity = v.capacity();
    v.truncate(10_000);
    assert_eq!(v.len(), 5_000, "truncate to more than len is a no-op");
    v.truncate(1_234);
    assert_eq!(v.len(), 1_234);
    assert!(v.iter().copied().eq(0..1_234));
    assert_eq!(v.capacity(), capacity, "truncate keeps the capacity");
    v.clear();
    assert!(v.is_empty());
    assert_eq!(v.capacity(), capacity);
    assert_eq!(alloc.stats().live_segments, 1);
    v.push(9);
    assert_eq!(v, [9]);
}

/// An element that records each drop of its id.
#[derive(Debug)]
struct Tracked {
    id: usize,
    drops: Arc<Vec<AtomicUsize>>,
}

impl Drop for Tracked {
    fn drop(&mut self) {
        self.drops[self.id].fetch_add(1, Ordering::Relaxed);
    }
}

fn drop_counts(drops: &[AtomicUsize], ids: std::ops::Range<usize>) -> Vec<usize> {
    ids.map(|i| drops[i].load(Ordering::Relaxed)).collect()
}

#[test]
fn every_element_is_dropped_exactly_once() {
    const N: usize = 2_000;
    let dir = TestDir::new("drops");
    let alloc = dir.allocator_segments_only();
    let drops: Arc<Vec<AtomicUsize>> = Arc::new((0..N).map(|_| AtomicUsize::new(0)).collect());
    let tracked = |id| Tracked {
        id,
        drops: Arc::clone(&drops),
    };

    let mut v: MmapVec<Tracked> = MmapVec::new_in(alloc.clone());
    for id in 0..1_000 {
        v.push(tracked(id));
    }
    assert!(
        drop_counts(&drops, 0..N).iter().all(|&n| n == 0),
        "growth dropped something"
    );

    v.truncate(900);
    assert!(drop_counts(&drops, 900..1_000).iter().all(|&n| n == 1));
    assert!(drop_counts(&drops, 0..900).iter().all(|&n| n == 0));

    let popped = v.pop().expect("non-empty");
    assert_eq!(popped.id, 899);
    assert_eq!(
        drops[899].load(Ordering::Relaxed),
        0,
        "a popped element is the caller's"
    );
    drop(popped);
    assert_eq!(drops[899].load(Ordering::Relaxed), 1);

    drop(v.remove(0));
    drop(v.swap_remove(0));
    assert_eq!(drop_counts(&drops, 0..2), [1, 1]);
    assert_eq!(
        v[0].id, 898,
        "swap_remove moved the last element to the front"
    );
    assert_eq!(drop_counts(&drops, 898..899), [0]);
    v.drain(10..20);
    assert_eq!(
        drop_counts(&drops, 0..N).iter().sum::<usize>(),
        100 + 1 + 2 + 10
    );

    v.shrink_to_fit();
    v.clear();
    assert!(drop_counts(&drops, 0..900).iter().all(|&n| n == 1));

    // Grow, shrink and drop a vector while it holds elements.
    let mut w: MmapVec<Tracked> = MmapVec::with_capacity_in(10, alloc.clone());
    for id in 1_000..N {
        w.push(tracked(id));
    }
    w.truncate(500);
    w.shrink_to_fit();
    let mut iter = w.into_iter();
    drop(iter.next());
    drop(iter.next_back());
    drop(iter);
    drop(v);
    let counts = drop_counts(&drops, 0..N);
    let wrong: Vec<_> = counts
        .iter()
        .enumerate()
        .filter(|&(_, &n)| n != 1)
        .collect();
    assert!(
        wrong.is_empty(),
        "ids not dropped exactly once (id, drops): {wrong:?}"
    );
    assert_eq!(alloc.stats().live_segments, 0);
}

#[test]
fn zero_sized_elements_need_no_segment() {
    let dir = TestDir::new("zst");
    let alloc = dir.allocator_segments_only();
    let mut v: MmapVec<()> = MmapVec::new_in(alloc.clone());
    for _ in 0..10_000 {
        v.push(());
    }
    assert_eq!(v.len(), 10_000);
    assert_eq!(alloc.stats().creates, 0);
}

#[test]
fn elements_larger_and_more_aligned_than_a_page() {
    #[derive(Clone, Copy)]
    #[repr(align(16384))]
    struct Big([u8; 20_000]);

    let dir = TestDir::new("big-elements");
    let mut v: MmapVec<Big> = MmapVec::new_in(dir.allocator_segments_only());
    for i in 0..10u8 {
        v.push(Big([i; 20_000]));
    }
    for (i, big) in v.iter().enumerate() {
        assert_eq!(
            (big as *const Big).addr() % 16384,
            0,
            "element {i} misaligned"
        );
        assert!(big.0.iter().all(|&b| usize::from(b) == i));
    }
}

#[test]
fn one_segment_per_vector() {
    let dir = TestDir::new("one-per-vector");
    let alloc = dir.allocator_without_reuse();
    let folder = dir.segment_folder();
    let vectors: Vec<MmapVec<u64>> = (0..10u64)
        .map(|i| {
            let mut v = MmapVec::new_in(alloc.clone());
            v.extend(0..1_000 * (i + 1));
            v
        })
        .collect();
    assert_eq!(alloc.stats().live_segments, 10);
    let maps = mappings_under(&folder);
    assert_eq!(maps.len(), 10, "one mapping per vector: {maps:#?}");
    let names: HashSet<_> = maps.iter().map(|m| m.path.clone()).collect();
    assert_eq!(names.len(), 10, "one file per vector");
    for v in &vectors {
        let addr = v.as_ptr().addr();
        let found = maps
            .iter()
            .filter(|m| m.start <= addr && addr < m.end)
            .count();
        assert_eq!(
            found, 1,
            "the vector's buffer is in exactly one segment mapping"
        );
    }
    drop(vectors);
    assert_eq!(alloc.stats().live_segments, 0);
    assert!(mappings_under(&folder).is_empty());
    assert!(dir.files().is_empty(), "files left: {:?}", dir.files());
}

#[test]
fn segment_file_is_a_uuid_in_the_folder_and_goes_away() {
    let dir = TestDir::new("maps");
    let alloc = dir.allocator_without_reuse();
    let folder = dir.segment_folder();
    assert_eq!(folder, dir.path().join(format!("mmapvec-{}", euid())));

    let mut v: MmapVec<u8> = MmapVec::new_in(alloc.clone());
    v.extend_from_slice(b"hello");
    let maps = mappings_under(&folder);
    assert_eq!(maps.len(), 1, "{maps:#?}");
    let seg = &maps[0];
    let seg_path = Path::new(&seg.path);
    assert_eq!(seg_path.parent(), Some(folder.as_path()));
    let name = file_name(&seg.path);
    assert!(
        is_uuid_v4(name),
        "segment file name {name:?} is not a UUID v4"
    );
    assert!(seg.deleted, "the file is unlinked right after creation");
    assert_eq!(seg.perms, "rw-s", "a shared read-write mapping");
    assert!(seg.start <= v.as_ptr().addr() && v.as_ptr().addr() < seg.end);
    assert!(!seg_path.exists());
    assert!(
        dir.files().is_empty(),
        "unlinked files are not in the folder"
    );

    // Growing keeps the same file.
    v.resize(10 * page() + 1, 7);
    let maps = mappings_under(&folder);
    assert_eq!(maps.len(), 1, "{maps:#?}");
    assert_eq!(maps[0].path, seg.path);
    assert!(maps[0].end - maps[0].start >= v.capacity());
    assert_eq!(&v[..5], b"hello");

    drop(v);
    assert!(
        mappings_under(&folder).is_empty(),
        "mapping still there after drop"
    );
    assert!(dir.files().is_empty());
}

#[test]
fn segment_names_are_unique() {
    let dir = TestDir::new("unique");
    let alloc = dir.allocator_without_reuse();
    let folder = dir.segment_folder();
    let mut seen = HashSet::new();
    for round in 0..3 {
        let vectors: Vec<MmapVec<u8>> = (0..100u8)
            .map(|i| mmap_vec![in alloc.clone(); i; 10])
            .collect();
        let maps = mappings_under(&folder);
        assert_eq!(maps.len(), 100);
        for m in &maps {
            let name = file_name(&m.path).to_string();
            assert!(is_uuid_v4(&name), "{name:?}");
            assert!(
                seen.insert(name.clone()),
                "name {name} used twice (round {round})"
            );
        }
        for (i, v) in (0..100u8).zip(&vectors) {
            assert!(v.iter().all(|&b| b == i), "vectors share no bytes");
        }
    }
    assert_eq!(seen.len(), 300);
    assert_eq!(alloc.stats().live_segments, 0);
}

#[test]
fn stats_follow_the_vector() {
    let dir = TestDir::new("stats");
    let alloc = dir.allocator_segments_only();
    let page = page() as u64;
    let zero = alloc.stats();
    assert_eq!(
        (zero.creates, zero.live_segments, zero.mapped_bytes),
        (0, 0, 0)
    );

    let mut v: MmapVec<u8> = MmapVec::new_in(alloc.clone());
    assert_eq!(alloc.stats().creates, 0, "no segment before the first push");
    v.push(1);
    let s = alloc.stats();
    assert_eq!((s.creates, s.live_segments, s.mapped_bytes), (1, 1, page));

    v.reserve_exact(5 * page as usize);
    let s = alloc.stats();
    assert_eq!(s.grows_remapped, 1);
    assert_eq!(s.mapped_bytes, (v.capacity() as u64).next_multiple_of(page));
    assert_eq!(
        (s.creates, s.live_segments),
        (1, 1),
        "growing creates no segment"
    );

    v.truncate(10);
    v.shrink_to_fit();
    let s = alloc.stats();
    assert_eq!(s.shrinks, 1);
    assert_eq!(s.mapped_bytes, page);

    let w = mmap_vec![in alloc.clone(); 0u32; 3 * page as usize];
    let s = alloc.stats();
    assert_eq!(
        (s.creates, s.live_segments, s.mapped_bytes),
        (2, 2, page + 12 * page)
    );

    drop(v);
    drop(w);
    let s = alloc.stats();
    assert_eq!((s.creates, s.live_segments, s.mapped_bytes), (2, 0, 0));
    assert_eq!(s.failures.total(), 0);
    assert_eq!(s.named_segments, 0);
    assert_eq!(s.heap_allocations, 0);
}

#[test]
fn macro_forms() {
    let a = mmap_vec![1, 2, 3];
    assert_eq!(a, [1, 2, 3]);
    let trailing = mmap_vec!["x", "y",];
    assert_eq!(trailing, ["x", "y"]);
    let repeated = mmap_vec![String::from("ab"); 3];
    assert_eq!(repeated, ["ab", "ab", "ab"]);
    let none = mmap_vec![0u64; 0];
    assert!(none.is_empty());
    let empty: MmapVec<u8> = mmap_vec![];
    assert!(empty.is_empty());

    let dir = TestDir::new("macro");
    let alloc = dir.allocator_segments_only();
    let b = mmap_vec![in alloc.clone(); 4u8, 5, 6];
    let c = mmap_vec![in alloc.clone(); 0xAAu8; 10_000];
    let d: MmapVec<u8> = mmap_vec![in alloc.clone()];
    let e: MmapVec<u8> = mmap_vec![in alloc.clone();];
    assert_eq!(b, [4, 5, 6]);
    assert_eq!(c.len(), 10_000);
    assert!(c.iter().all(|&x| x == 0xAA));
    assert!(d.is_empty() && e.is_empty());
    assert_eq!(
        alloc.stats().live_segments,
        2,
        "b and c; empty vectors have no segment"
    );
}

#[test]
fn ext_constructors() {
    let v = MmapVec::<u64>::new_mmap();
    assert_eq!((v.len(), v.capacity()), (0, 0));
    let mut w = MmapVec::<u64>::with_capacity_mmap(1_000);
    assert!(w.capacity() >= 1_000);
    w.extend(0..1_000);
    assert_eq!(w.iter().sum::<u64>(), 499_500);
    let t = MmapVec::<u32>::try_with_capacity_mmap(50_000).expect("a small reservation");
    assert!(t.capacity() >= 50_000);
    assert!(MmapVec::<u64>::try_with_capacity_mmap(usize::MAX).is_err());
    assert!(MmapVec::<u8>::try_with_capacity_mmap(usize::MAX / 2).is_err());
    // All of them live on the process-wide default allocator: 8 KB is a block of its
    // small-block tier, 200 KB a segment.
    let stats = v.allocator().stats();
    assert!(stats.small.in_use_bytes >= 8_000 && stats.live_segments >= 1);
}

/// The files a [`CountingCreator`] made, with whether the allocator asked them to keep their name.
type MadeFiles = Arc<Mutex<Vec<(PathBuf, bool)>>>;

/// Counts its calls and makes numbered files in a directory of the test's own.
#[derive(Debug)]
struct CountingCreator {
    dir: PathBuf,
    calls: Arc<AtomicUsize>,
    made: MadeFiles,
    anonymous: bool,
}

// SAFETY: 1. every file is made with `create_new` under a number never used before; 2. the
// creator keeps no handle on it; 3. a named file is returned with the path it was created at.
unsafe impl SegmentCreator for CountingCreator {
    fn create(&self, request: &SegmentRequest) -> io::Result<SegmentFile> {
        assert!(request.len() > 0 && request.len().is_multiple_of(page()));
        let n = self.calls.fetch_add(1, Ordering::SeqCst);
        let path = self.dir.join(format!("counted-{n}"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        self.made
            .lock()
            .unwrap()
            .push((path.clone(), request.keeps_name()));
        if self.anonymous {
            fs::remove_file(&path)?;
            Ok(SegmentFile::anonymous(file))
        } else {
            Ok(SegmentFile::named(file, path))
        }
    }
}

fn counting_allocator(
    dir: &Path,
    anonymous: bool,
    budget: Option<usize>,
) -> (MmapAllocator, Arc<AtomicUsize>, MadeFiles) {
    let calls = Arc::new(AtomicUsize::new(0));
    let made = Arc::new(Mutex::new(Vec::new()));
    let creator = CountingCreator {
        dir: dir.to_path_buf(),
        calls: Arc::clone(&calls),
        made: Arc::clone(&made),
        anonymous,
    };
    let mut builder = MmapAllocator::builder()
        .small_threshold(0)
        .creator(creator)
        .reuse_bytes(0);
    if let Some(budget) = budget {
        builder = builder.descriptor_budget(budget);
    }
    (builder.build().expect("build with a creator"), calls, made)
}

#[test]
fn custom_creator_files_are_used_and_removed() {
    let dir = TestDir::new("creator");
    let (alloc, calls, made) = counting_allocator(dir.path(), false, None);
    let mut v: MmapVec<u32> = MmapVec::new_in(alloc.clone());
    v.extend(0..100_000);
    let w = mmap_vec![in alloc.clone(); 1u8; 100];
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "one call per segment; growth calls nothing"
    );
    let made = made.lock().unwrap().clone();
    let maps = mappings_under(dir.path());
    assert_eq!(maps.len(), 2, "{maps:#?}");
    for (path, keeps_name) in &made {
        assert!(!keeps_name, "the default budget allows holding descriptors");
        let mapped = |m: &core_support::Mapping| Path::new(&m.path) == path && m.deleted;
        assert!(maps.iter().any(mapped), "{path:?} not mapped");
        assert!(
            !path.exists(),
            "the allocator removes the name of a held file"
        );
    }
    assert!(v.iter().copied().eq(0..100_000));
    drop(v);
    drop(w);
    assert!(mappings_under(dir.path()).is_empty());
    assert!(dir.files().is_empty());
    assert_eq!(alloc.stats().live_segments, 0);
}

#[test]
fn custom_creator_named_files_live_as_long_as_the_segment() {
    let dir = TestDir::new("creator-named");
    let (alloc, calls, made) = counting_allocator(dir.path(), false, Some(0));
    let mut v: MmapVec<u64> = MmapVec::new_in(alloc.clone());
    v.push(1);
    let (path, keeps_name) = made.lock().unwrap()[0].clone();
    assert!(
        keeps_name,
        "a budget of 0 asks the creator for a file that keeps its name"
    );
    assert!(path.exists());
    assert_eq!(alloc.stats().named_segments, 1);
    v.extend(0..100_000);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert!(fs::metadata(&path).unwrap().len() >= 8 * 100_001);
    let maps = mappings_under(dir.path());
    assert_eq!(maps.len(), 1);
    assert!(!maps[0].deleted && Path::new(&maps[0].path) == path);
    drop(v);
    assert!(!path.exists(), "the file is removed with its segment");
    assert!(dir.files().is_empty());
    assert_eq!(alloc.stats().named_segments, 0);
}

#[test]
fn custom_creator_anonymous_files() {
    let dir = TestDir::new("creator-anon");
    // Even with a budget of 0 a file without a name must keep its descriptor.
    let (alloc, calls, _) = counting_allocator(dir.path(), true, Some(0));
    let mut v: MmapVec<u64> = MmapVec::new_in(alloc.clone());
    v.extend(0..50_000);
    v.truncate(10);
    v.shrink_to(10);
    v.extend(0..50_000);
    assert_eq!(v.len(), 50_010);
    assert_eq!(calls.load(Ordering::SeqCst), 1);
    assert_eq!(alloc.stats().named_segments, 0);
    assert_eq!(mappings_under(dir.path()).len(), 1);
    drop(v);
    assert!(mappings_under(dir.path()).is_empty());
    assert!(dir.files().is_empty());
}

/// A creator that fails, or hands out a file that is not empty.
#[derive(Debug)]
struct BadCreator {
    dir: PathBuf,
    not_empty: bool,
}

// SAFETY: 1. each file is made anew (the allocator removed the previous one when it refused it),
// and it is handed out once; 2. the creator keeps no handle on it; 3. it is returned with the
// path it was written at. It is not empty on purpose: the allocator must refuse it.
unsafe impl SegmentCreator for BadCreator {
    fn create(&self, _request: &SegmentRequest) -> io::Result<SegmentFile> {
        if !self.not_empty {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "no segments today",
            ));
        }
        let path = self.dir.join("dirty");
        fs::write(&path, b"left over")?;
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        Ok(SegmentFile::named(file, path))
    }
}

#[test]
fn creator_failures_are_reported() {
    let dir = TestDir::new("bad-creator");
    let failing = MmapAllocator::builder()
        .small_threshold(0)
        .creator(BadCreator {
            dir: dir.path().to_path_buf(),
            not_empty: false,
        })
        .build()
        .unwrap();
    let mut v: MmapVec<u8> = MmapVec::new_in(failing.clone());
    assert!(v.try_reserve(10).is_err());
    assert_eq!(failing.stats().failures.creator, 1);
    let err = failing
        .take_last_error()
        .expect("the creator's error is kept");
    assert!(err.to_string().contains("no segments today"), "{err}");
    assert!(
        failing.take_last_error().is_none(),
        "taking the error clears it"
    );

    for budget in [None, Some(0)] {
        let mut builder = MmapAllocator::builder()
            .small_threshold(0)
            .creator(BadCreator {
                dir: dir.path().to_path_buf(),
                not_empty: true,
            });
        if let Some(b) = budget {
            builder = builder.descriptor_budget(b);
        }
        let dirty = builder.build().unwrap();
        let mut v: MmapVec<u8> = MmapVec::new_in(dirty.clone());
        assert!(
            v.try_reserve(10).is_err(),
            "a file that is not empty is refused"
        );
        assert_eq!(dirty.stats().failures.total(), 1);
        assert_eq!(dirty.stats().live_segments, 0);
        assert!(dirty.take_last_error().is_some());
        // The allocator never took the refused file over: it is the creator's, left as it
        // was (it could be a file the user needs).
        let files = dir.files();
        assert_eq!(files.len(), 1, "{files:?}");
        assert!(std::fs::metadata(&files[0]).unwrap().len() > 0);
        std::fs::remove_file(&files[0]).unwrap();
    }
}

#[test]
fn zero_budget_keeps_named_files_in_the_session_folder() {
    named_files_in_the_session_folder(GrowStrategy::Remap);
}

#[test]
fn zero_budget_keeps_named_files_in_the_session_folder_map_again() {
    named_files_in_the_session_folder(GrowStrategy::MapAgain);
}

fn named_files_in_the_session_folder(strategy: GrowStrategy) {
    let dir = TestDir::new("named");
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .descriptor_budget(0)
        .grow_strategy(strategy)
        .build()
        .unwrap();
    let folder = dir.segment_folder();
    let mut v: MmapVec<u64> = MmapVec::new_in(alloc.clone());
    v.extend(0..100);
    assert_eq!(alloc.stats().named_segments, 1);
    let files = dir.files();
    assert_eq!(files.len(), 1, "{files:?}");
    let file = &files[0];
    let session = file.parent().expect("session folder");
    assert_eq!(session.parent(), Some(folder.as_path()));
    let session_name = session.file_name().unwrap().to_str().unwrap();
    let session_uuid = session_name
        .strip_prefix("session-")
        .expect("a session-<uuid> folder");
    assert!(is_uuid_v4(session_uuid), "{session_name}");
    assert!(is_uuid_v4(file.file_name().unwrap().to_str().unwrap()));
    let maps = mappings_under(&folder);
    assert_eq!(maps.len(), 1);
    assert_eq!(Path::new(&maps[0].path), file);
    assert!(!maps[0].deleted);

    // Growing reopens the file by name.
    v.extend(100..200_000);
    assert!(v.iter().copied().eq(0..200_000));
    let stats = alloc.stats();
    assert!(
        stats.grows_remapped + stats.grows_mapped_again >= 1,
        "{stats:?}"
    );
    if strategy == GrowStrategy::MapAgain {
        assert_eq!(stats.grows_remapped, 0, "{stats:?}");
    }
    assert!(fs::metadata(file).unwrap().len() >= 8 * 200_000);
    v.truncate(10);
    v.shrink_to_fit();
    assert_eq!(
        fs::metadata(file).unwrap().len(),
        page() as u64,
        "shrink gives blocks back"
    );
    assert!(v.iter().copied().eq(0..10));
    assert_eq!(dir.files().len(), 1);

    let w = mmap_vec![in alloc.clone(); 5u8; 10];
    assert_eq!(dir.files().len(), 2);
    assert_eq!(alloc.stats().named_segments, 2);
    drop(v);
    drop(w);
    assert!(dir.files().is_empty(), "{:?}", dir.files());
    assert_eq!(alloc.stats().named_segments, 0);
    assert!(mappings_under(&folder).is_empty());
}

#[test]
fn removed_named_file_fails_the_grow_and_keeps_the_data() {
    let dir = TestDir::new("removed");
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .descriptor_budget(0)
        .build()
        .unwrap();
    let mut v: MmapVec<u64> = MmapVec::new_in(alloc.clone());
    v.extend(0..100);
    let files = dir.files();
    assert_eq!(files.len(), 1);
    fs::remove_file(&files[0]).unwrap();

    let capacity = v.capacity();
    assert!(
        v.try_reserve(100_000).is_err(),
        "growing a removed file must fail"
    );
    assert_eq!(v.capacity(), capacity);
    assert!(v.iter().copied().eq(0..100), "old data still readable");
    v[0] = 42;
    v.push(100);
    assert_eq!((v[0], v[100]), (42, 100));
    let stats = alloc.stats();
    assert_eq!(stats.failures.file_replaced, 1);
    assert_eq!(stats.failures.total(), 1);
    let err = alloc.take_last_error().expect("the reason is kept");
    assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    drop(v);
    assert_eq!(alloc.stats().live_segments, 0);
    assert!(dir.files().is_empty());
}

#[test]
fn replaced_named_file_is_not_resized_nor_removed() {
    let dir = TestDir::new("replaced");
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .descriptor_budget(0)
        .build()
        .unwrap();
    let mut v: MmapVec<u8> = MmapVec::new_in(alloc.clone());
    v.extend_from_slice(b"original");
    let files = dir.files();
    assert_eq!(files.len(), 1);
    let path = &files[0];
    fs::remove_file(path).unwrap();
    fs::write(path, b"impostor").unwrap();

    assert!(
        v.try_reserve(1 << 20).is_err(),
        "another file under the name must not be grown"
    );
    assert_eq!(alloc.stats().failures.file_replaced, 1);
    assert!(
        alloc
            .take_last_error()
            .unwrap()
            .to_string()
            .contains("replaced")
    );
    assert_eq!(v, b"original");
    drop(v);
    assert_eq!(
        fs::read(path).unwrap(),
        b"impostor",
        "someone else's file is left alone"
    );
    fs::remove_file(path).unwrap();
}

/// A shrink that cannot reach the segment's file (its name was removed) must not take the
/// process down: `Vec::shrink_to_fit` turns an allocator error into `handle_alloc_error`, which
/// aborts. Keeping the larger block is a valid answer to a shrink. Runs in a child process so
/// that an abort fails this test only; the parent owns the directory, so it is removed even then.
#[test]
fn removed_named_file_shrink_does_not_abort() {
    let Some(dir) = child_role() else {
        let dir = TestDir::new("shrink-removed");
        let role = dir.path().to_str().expect("UTF-8 temp path");
        core_support::run_in_child("removed_named_file_shrink_does_not_abort", role);
        return;
    };
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(&dir)
        .descriptor_budget(0)
        .build()
        .unwrap();
    let mut v: MmapVec<u64> = MmapVec::new_in(alloc.clone());
    v.extend(0..10_000);
    let files = files_under(Path::new(&dir));
    assert_eq!(files.len(), 1, "{files:?}");
    fs::remove_file(&files[0]).unwrap();
    v.truncate(10);
    v.shrink_to_fit();
    assert!(v.iter().copied().eq(0..10));
    let failures = alloc.stats().failures;
    assert_eq!(
        failures.file_replaced, 1,
        "the failed shrink is still counted"
    );
    v.push(10);
    assert_eq!(v.len(), 11);
    drop(v);
    assert_eq!(alloc.stats().live_segments, 0);
}
