//! The code shown in MIGRATION.md, compiled here so the guide cannot drift: each "after" block
//! runs; each "before" block (mmap-vec 0.2) is only compiled, since that crate aborts in debug
//! builds (it makes slices from a null pointer). A last test checks that MIGRATION.md shows
//! exactly the code between the markers below.

use std::path::{Path, PathBuf};

/// mmap-vec 0.2: a vector of rows, then a big vector in a folder of our choice.
mod rows_before {
    // MIGRATION.md begin
    use std::path::Path;

    use mmap_vec::{DefaultSegmentBuilder, MmapStats, MmapVec, MmapVecBuilder};

    #[derive(Debug, Clone, Copy, PartialEq)]
    struct Row {
        id: usize,
        age: u8,
    }

    pub fn rows(folder: &Path) -> std::io::Result<()> {
        // In the default folder: ~/.cache/mmap-vec-rs or /tmp/mmap-vec-rs.
        let mut rows = MmapVec::<Row>::new();
        rows.push(Row { id: 42, age: 18 })?;
        rows.push(Row { id: 894, age: 99 })?;
        assert_eq!(rows.pop(), Some(Row { id: 894, age: 99 }));

        // In a folder of our choice, with room reserved up front.
        let segments = DefaultSegmentBuilder::with_path(folder);
        segments.create_dir_all()?;
        let mut ids = MmapVecBuilder::<u64>::new()
            .capacity(1_000_000)
            .segment_builder(segments)
            .try_build()?;
        for id in 0..1_000_000 {
            ids.push(id)?;
        }
        ids.truncate_first(10);
        let copy = ids.try_clone()?;
        assert_eq!(copy[0], 10);
        println!(
            "{} segments, {} bytes",
            MmapStats.active_segment(),
            ids.disk_size()
        );
        Ok(())
    }
    // MIGRATION.md end
}

/// mmapvec: the same program.
mod rows_after {
    // MIGRATION.md begin
    use std::io;
    use std::path::Path;

    use mmapvec::{MmapAllocator, MmapVec, MmapVecExt};

    #[derive(Debug, Clone, Copy, PartialEq)]
    struct Row {
        id: usize,
        age: u8,
    }

    /// `try_reserve` as an `io::Result`: the allocator keeps the reason of its last failure.
    fn reserve<T>(v: &mut MmapVec<T>, additional: usize) -> io::Result<()> {
        v.try_reserve(additional).map_err(|e| {
            v.allocator()
                .take_last_error()
                .unwrap_or_else(|| io::Error::other(e.to_string()))
        })
    }

    pub fn rows(folder: &Path) -> io::Result<()> {
        // In the default folder: $TMPDIR/mmapvec-<uid>.
        let mut rows = MmapVec::<Row>::new_mmap();
        reserve(&mut rows, 2)?; // then `push` cannot fail
        rows.push(Row { id: 42, age: 18 });
        rows.push(Row { id: 894, age: 99 });
        assert_eq!(rows.pop(), Some(Row { id: 894, age: 99 }));

        // In a folder of our choice (it must exist), with room reserved up front.
        let alloc = MmapAllocator::builder().dir(folder).build()?;
        let mut ids = MmapVec::<u64>::new_in(alloc.clone());
        reserve(&mut ids, 1_000_000)?;
        ids.extend(0..1_000_000);
        ids.drain(..10);
        let copy = ids.clone();
        assert_eq!(copy[0], 10);
        let stats = alloc.stats();
        println!(
            "{} segments, {} bytes",
            stats.live_segments, stats.mapped_bytes
        );
        Ok(())
    }
    // MIGRATION.md end
}

/// mmap-vec 0.2: numbered segment files.
mod creator_before {
    // MIGRATION.md begin
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};

    use mmap_vec::{MmapVec, SegmentBuilder};

    /// Made anew by `Default` for every vector: settings can only be constants or statics.
    #[derive(Debug, Default)]
    struct Numbered;

    static NEXT: AtomicU64 = AtomicU64::new(0);

    impl SegmentBuilder for Numbered {
        fn new_segment_path(&self) -> PathBuf {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            PathBuf::from(format!("/var/tmp/my-app/segment-{n}.seg"))
        }
    }

    pub fn numbered() -> std::io::Result<()> {
        let mut v = MmapVec::<u32, Numbered>::new();
        v.push(7)?;
        Ok(())
    }
    // MIGRATION.md end
}

/// mmapvec: the same creator.
mod creator_after {
    // MIGRATION.md begin
    use std::fs::OpenOptions;
    use std::io;
    use std::os::unix::fs::OpenOptionsExt;
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};

    use mmapvec::{MmapAllocator, MmapVec, SegmentCreator, SegmentFile, SegmentRequest};

    /// One value, shared by every vector of the allocator: settings can be fields.
    #[derive(Debug)]
    struct Numbered {
        dir: PathBuf,
        next: AtomicU64,
    }

    // SAFETY: each call creates a new file (`create_new` under a fresh number), hands it out
    // once and keeps no handle to it; the path given is the file's own.
    unsafe impl SegmentCreator for Numbered {
        fn create(&self, _request: &SegmentRequest) -> io::Result<SegmentFile> {
            let n = self.next.fetch_add(1, Ordering::Relaxed);
            let path = self.dir.join(format!("segment-{n}.seg"));
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)?;
            Ok(SegmentFile::named(file, path))
        }
    }

    pub fn numbered(dir: PathBuf) -> io::Result<()> {
        let creator = Numbered {
            dir,
            next: AtomicU64::new(0),
        };
        let alloc = MmapAllocator::builder().creator(creator).build()?;
        let mut v = MmapVec::<u32>::new_in(alloc);
        v.push(7);
        Ok(())
    }
    // MIGRATION.md end
}

/// A fresh folder for one test, removed when the test ends.
struct TestDir(PathBuf);

impl TestDir {
    fn new(name: &str) -> TestDir {
        let dir =
            std::env::temp_dir().join(format!("mmapvec-migration-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        TestDir(dir)
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn rows_after_runs() {
    let dir = TestDir::new("rows");
    rows_after::rows(dir.path()).unwrap();
}

#[test]
fn creator_after_runs() {
    let dir = TestDir::new("creator");
    creator_after::numbered(dir.path().to_path_buf()).unwrap();
    // The file was named segment-0.seg, and its name was removed as soon as it was mapped.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn before_code_compiles_against_mmap_vec_0_2() {
    let _: fn(&Path) -> std::io::Result<()> = rows_before::rows;
    let _: fn() -> std::io::Result<()> = creator_before::numbered;
}

#[test]
fn migration_md_shows_exactly_this_code() {
    let begin = concat!("// MIGRATION", ".md begin\n");
    let end = concat!("    // MIGRATION", ".md end");
    let guide = include_str!("../MIGRATION.md");
    let blocks: Vec<String> = include_str!("migration.rs")
        .split(begin)
        .skip(1)
        .map(|rest| {
            let code = rest.split(end).next().unwrap();
            code.lines()
                .map(|line| format!("{}\n", line.strip_prefix("    ").unwrap_or(line)))
                .collect()
        })
        .collect();
    assert_eq!(blocks.len(), 4);
    for code in blocks {
        assert!(
            guide.contains(&format!("```rust\n{code}```\n")),
            "MIGRATION.md lacks:\n{code}"
        );
    }
}
