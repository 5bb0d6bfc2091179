//! `release_in_background(true)`: freed segments are released by another thread, and still
//! every file and descriptor goes away.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mmapvec::{MmapAllocator, MmapVec};

fn fresh_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mmapvec-release-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn files_under(dir: &Path) -> usize {
    let mut count = 0;
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            count += files_under(&entry.path());
        } else {
            count += 1;
        }
    }
    count
}

fn mappings_of(dir: &Path) -> usize {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let dir = dir.to_string_lossy();
    maps.lines().filter(|line| line.contains(&*dir)).count()
}

/// Polls `check` until it holds or five seconds pass: the release thread runs on its own time.
fn eventually(what: &str, check: impl Fn() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "never happened: {what}"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn background_release_frees_everything() {
    let dir = fresh_dir();
    // Named segments make the files visible, so their removal can be watched.
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(&dir)
        .descriptor_budget(0)
        .release_in_background(true)
        .build()
        .unwrap();
    let mut vectors: Vec<MmapVec<u64>> = (0..200)
        .map(|i| {
            let mut v = MmapVec::new_in(alloc.clone());
            v.extend(i..i + 1000);
            v
        })
        .collect();
    assert_eq!(files_under(&dir), 200);
    for (i, v) in vectors.iter_mut().enumerate() {
        v.extend(0..10_000); // grows while others are being released
        assert_eq!(v[0], i as u64);
    }
    drop(vectors);
    assert_eq!(alloc.stats().live_segments, 0, "freed at once in the books");
    eventually("every segment file removed", || files_under(&dir) == 0);
    eventually("every mapping gone", || mappings_of(&dir) == 0);
    drop(alloc);
    std::fs::remove_dir_all(&dir).unwrap();
}
