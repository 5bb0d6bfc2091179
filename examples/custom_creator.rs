//! Segment creators of your own: numbered files in a folder you choose, and (on Linux) files
//! that never have a name, made with `O_TMPFILE`.
//!
//! ```text
//! cargo run --example custom_creator
//! ```

use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use mmapvec::{MmapAllocator, MmapVec, SegmentCreator, SegmentFile, SegmentRequest, mmap_vec};

/// Files named `<prefix>-<n>.seg` in a folder of your choice.
#[derive(Debug)]
struct Numbered {
    dir: PathBuf,
    prefix: String,
    next: AtomicU64,
}

// SAFETY: each call creates a new file (`create_new` under a fresh number), hands it out once
// and keeps no handle to it; the path given is the file's own.
unsafe impl SegmentCreator for Numbered {
    fn create(&self, request: &SegmentRequest) -> io::Result<SegmentFile> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{}-{n}.seg", self.prefix));
        // Empty, read-write, and ours alone: `create_new` refuses an existing file or link.
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        println!(
            "  created {} for a {}-byte segment",
            path.display(),
            request.len()
        );
        Ok(SegmentFile::named(file, path))
    }
}

/// Files without a name from the start (`O_TMPFILE`: ext4, xfs, btrfs, tmpfs...): nothing to
/// clean up, ever. A `memfd_create` file would plug in the same way, through
/// `SegmentFile::anonymous`, but it lives in RAM, which defeats the purpose of this crate.
#[cfg(target_os = "linux")]
#[derive(Debug)]
struct Unnamed {
    dir: PathBuf,
}

// SAFETY: `O_TMPFILE` makes a new file with no name to open it by (nothing else reaches it), handed
// out once; no handle to it is kept.
#[cfg(target_os = "linux")]
unsafe impl SegmentCreator for Unnamed {
    fn create(&self, _request: &SegmentRequest) -> io::Result<SegmentFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_TMPFILE)
            .open(&self.dir)?;
        Ok(SegmentFile::anonymous(file))
    }
}

fn main() -> io::Result<()> {
    let dir = std::env::temp_dir().join(format!("custom-creator-example-{}", std::process::id()));
    fs::create_dir(&dir)?;
    let result = run(&dir);
    fs::remove_dir_all(&dir)?;
    result
}

fn run(dir: &Path) -> io::Result<()> {
    let numbered = |prefix: &str| Numbered {
        dir: dir.to_path_buf(),
        prefix: prefix.to_owned(),
        next: AtomicU64::new(0),
    };

    // 1. Numbered files that keep their names. A descriptor budget of 0 asks the allocator to
    //    close each file and keep its name (reopening it to resize), so the files show in `ls`.
    println!("numbered files, names kept:");
    let alloc = MmapAllocator::builder()
        .creator(numbered("kept"))
        .descriptor_budget(0)
        .build()?;
    let mut numbers: MmapVec<u32> = MmapVec::new_in(alloc.clone());
    numbers.extend(0..100_000);
    // 100 KB: above the small-block threshold (64 KiB), so a segment of its own.
    let bytes = mmap_vec![in alloc.clone(); 7u8; 100_000];
    let files = list(dir)?;
    println!("  in {}: {files:?}", dir.display());
    assert_eq!(files, ["kept-0.seg", "kept-1.seg"]);
    assert!(fs::metadata(dir.join("kept-0.seg"))?.len() >= 400_000);
    assert_eq!(alloc.stats().named_segments, 2);
    assert_eq!(
        numbers.iter().map(|&n| u64::from(n)).sum::<u64>(),
        4_999_950_000
    );
    assert!(bytes.iter().all(|&b| b == 7));
    drop((numbers, bytes));
    assert!(list(dir)?.is_empty(), "freeing a block removes its file");

    // 2. The same creator with the default budget: the allocator removes each name right
    //    after creation and keeps the descriptor, so the folder looks empty while in use.
    println!("numbered files, names removed at once:");
    let alloc = MmapAllocator::builder().creator(numbered("gone")).build()?;
    let squares: MmapVec<u64> = {
        let mut v = MmapVec::new_in(alloc.clone());
        // 800 KB: a segment (blocks up to 64 KiB share chunk files).
        v.extend((0..100_000u64).map(|i| i * i));
        v
    };
    assert_eq!(squares[999], 998_001);
    assert!(list(dir)?.is_empty());
    assert_eq!(
        (alloc.stats().live_segments, alloc.stats().named_segments),
        (1, 0)
    );
    println!(
        "  {} live segment, folder empty",
        alloc.stats().live_segments
    );

    #[cfg(target_os = "linux")]
    {
        println!("O_TMPFILE files:");
        let alloc = MmapAllocator::builder()
            .creator(Unnamed {
                dir: dir.to_path_buf(),
            })
            .build()?;
        let mut halves: MmapVec<f64> = MmapVec::new_in(alloc.clone());
        match halves.try_reserve_exact(1 << 20) {
            Ok(()) => {
                halves.resize(1 << 20, 0.5);
                assert_eq!(halves.iter().sum::<f64>(), (1 << 19) as f64);
                assert!(list(dir)?.is_empty());
                let stats = alloc.stats();
                println!(
                    "  {} live segment of {} bytes, folder empty",
                    stats.live_segments, stats.mapped_bytes
                );
                assert_eq!(stats.live_segments, 1);
            }
            // Some file systems (NFS, older ones) have no O_TMPFILE.
            Err(_) => {
                let why = alloc.take_last_error();
                println!("  skipped: O_TMPFILE refused in {}: {why:?}", dir.display());
            }
        }
    }
    Ok(())
}

/// The names in `dir`, sorted.
fn list(dir: &Path) -> io::Result<Vec<String>> {
    let mut names = fs::read_dir(dir)?
        .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<io::Result<Vec<_>>>()?;
    names.sort();
    Ok(names)
}
