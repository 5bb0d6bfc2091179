//! [`Builder`]: the settings of an [`MmapAllocator`].

use std::io;
use std::path::PathBuf;
use std::sync::Arc;

use crate::allocator::MmapAllocator;
use crate::creator::{DirCreator, SegmentCreator};
use crate::segment::{AccessPattern, GrowStrategy, MapOptions};

/// Configures an [`MmapAllocator`]. Made by [`MmapAllocator::builder`].
///
/// ```
/// use mmapvec::{AccessPattern, MmapAllocator, MmapVec};
/// # fn main() -> std::io::Result<()> {
/// let alloc = MmapAllocator::builder()
///     .dir(std::env::temp_dir())
///     .access_pattern(AccessPattern::Sequential)
///     .build()?;
/// let mut v = MmapVec::<u64>::new_in(alloc);
/// v.push(7);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Builder {
    dir: Option<PathBuf>,
    creator: Option<Arc<dyn SegmentCreator>>,
    settings: Settings,
    allow_ram_backed: bool,
}

/// The default largest block of the small-block tier (measured: see `small_threshold`).
const DEFAULT_SMALL_THRESHOLD: usize = 64 << 10;

/// The default bound on freed segments kept for reuse.
const DEFAULT_REUSE_BYTES: usize = 256 << 20;

/// What a built allocator keeps of its builder.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Settings {
    pub(crate) opts: MapOptions,
    pub(crate) heap_threshold: usize,
    pub(crate) descriptor_budget: Option<usize>,
    pub(crate) background_release: bool,
    pub(crate) reuse_bytes: usize,
    pub(crate) small_threshold: usize,
}

impl Default for Builder {
    fn default() -> Self {
        Self::new()
    }
}

impl Builder {
    /// The defaults: temp directory, blocks reserved on disk, `mremap` growth, no hints.
    ///
    /// ```
    /// let builder = mmapvec::Builder::new();
    /// # let _ = builder;
    /// ```
    pub fn new() -> Self {
        Builder {
            dir: None,
            creator: None,
            settings: Settings {
                opts: MapOptions {
                    reserve_disk: true,
                    populate: false,
                    access: None,
                    huge_pages: false,
                    dont_fork: false,
                    strategy: GrowStrategy::Remap,
                },
                heap_threshold: 0,
                descriptor_budget: None,
                background_release: false,
                reuse_bytes: DEFAULT_REUSE_BYTES,
                small_threshold: DEFAULT_SMALL_THRESHOLD,
            },
            allow_ram_backed: true,
        }
    }

    /// The directory in which the crate's folder (`mmapvec-<uid>`) and the segments go. It must
    /// exist: a missing directory is an error (a typo should not silently create one).
    /// Default: `std::env::temp_dir()`. Conflicts with [`creator`](Builder::creator).
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// let alloc = mmapvec::MmapAllocator::builder().dir(std::path::Path::new("/var/tmp")).build()?;
    /// # let _ = alloc; Ok(()) }
    /// ```
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Makes segment files with a creator of your own instead of the default [`DirCreator`].
    /// See [`SegmentCreator`] for an example.
    pub fn creator(mut self, creator: impl SegmentCreator) -> Self {
        self.creator = Some(Arc::new(creator));
        self
    }

    /// Reserve disk blocks when a segment is created or grown (`fallocate`), so a full disk is
    /// an allocation error then, never a `SIGBUS` later. Default `true`. Turning it off makes
    /// sparse files (a little faster to create, no disk used until written) at the risk of the
    /// process being killed by `SIGBUS` if the disk fills while pages are being written.
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// let risky = mmapvec::MmapAllocator::builder().reserve_disk(false).build()?;
    /// # let _ = risky; Ok(()) }
    /// ```
    pub fn reserve_disk(mut self, reserve: bool) -> Self {
        self.settings.opts.reserve_disk = reserve;
        self
    }

    /// How mappings are resized. Default [`GrowStrategy::Remap`].
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// use mmapvec::GrowStrategy;
    /// let alloc = mmapvec::MmapAllocator::builder().grow_strategy(GrowStrategy::MapAgain).build()?;
    /// # let _ = alloc; Ok(()) }
    /// ```
    pub fn grow_strategy(mut self, strategy: GrowStrategy) -> Self {
        self.settings.opts.strategy = strategy;
        self
    }

    /// Pre-fault new pages for writing when a segment is created or grown
    /// (`MADV_POPULATE_WRITE` on Linux 5.14+, `MADV_WILLNEED` elsewhere): allocation costs
    /// more, first writes cost less. Default `false`.
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// let alloc = mmapvec::MmapAllocator::builder().populate(true).build()?;
    /// # let _ = alloc; Ok(()) }
    /// ```
    pub fn populate(mut self, populate: bool) -> Self {
        self.settings.opts.populate = populate;
        self
    }

    /// An access pattern hint given to the kernel for every segment. Default: none.
    ///
    /// A page fault on a segment reads around the faulting page (the device's `read_ahead_kb`:
    /// 128 KiB by default, 8 MiB on some VMs) unless the hint is `Random`. Leave it unset for
    /// vectors and for tables that fit in memory. Give `Random` to the allocator of a hash table
    /// much larger than the memory it gets: a 1 GiB hashbrown table in a 256 MiB cgroup with
    /// 8 MiB read-ahead did 9,328 random lookups/s instead of 192/s, but an in-order scan took
    /// 24.7 s instead of 2.7 s (`docs/out-of-core.md`).
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// use mmapvec::AccessPattern;
    /// let alloc = mmapvec::MmapAllocator::builder().access_pattern(AccessPattern::Random).build()?;
    /// # let _ = alloc; Ok(()) }
    /// ```
    pub fn access_pattern(mut self, pattern: AccessPattern) -> Self {
        self.settings.opts.access = Some(pattern);
        self
    }

    /// Align segments of 2 MiB or more to 2 MiB, round them to 2 MiB, and ask for transparent
    /// huge pages (`MADV_HUGEPAGE`, Linux). Whether the kernel uses huge pages for file
    /// mappings depends on the file system and kernel. Default `false`.
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// let alloc = mmapvec::MmapAllocator::builder().huge_pages(true).build()?;
    /// # let _ = alloc; Ok(()) }
    /// ```
    pub fn huge_pages(mut self, huge: bool) -> Self {
        self.settings.opts.huge_pages = huge;
        self
    }

    /// Keep segments out of child processes made by `fork` (`MADV_DONTFORK`, Linux). Without
    /// it a child shares the parent's segments: the child's writes are the parent's writes.
    /// With it, touching a segment's address in the child is a `SIGSEGV`. Default `false`.
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// let alloc = mmapvec::MmapAllocator::builder().dont_fork(true).build()?;
    /// # let _ = alloc; Ok(()) }
    /// ```
    pub fn dont_fork(mut self, dont_fork: bool) -> Self {
        self.settings.opts.dont_fork = dont_fork;
        self
    }

    /// Serve allocations smaller than `bytes` from the heap
    /// ([`Global`](allocator_api2::alloc::Global)) instead of a file.
    /// A block that grows past the threshold moves into a segment (one copy). Default 0: every
    /// allocation is file-backed.
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// let alloc = mmapvec::MmapAllocator::builder().heap_threshold(64 << 10).build()?;
    /// let small = mmapvec::mmap_vec![in alloc.clone(); 1u8, 2, 3];
    /// assert_eq!(alloc.stats().live_segments, 0);
    /// # drop(small); Ok(()) }
    /// ```
    pub fn heap_threshold(mut self, bytes: usize) -> Self {
        self.settings.heap_threshold = bytes;
        self
    }

    /// How many segment descriptors the process may hold open before new segments keep their
    /// file name instead (and are reopened by name to resize). Default: half the soft
    /// `RLIMIT_NOFILE`, read at each allocation, so the rest stays for the program. `0` makes
    /// every segment keep its name.
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// let alloc = mmapvec::MmapAllocator::builder().descriptor_budget(0).build()?;
    /// let v = mmapvec::mmap_vec![in alloc.clone(); 0u8; 1 << 20];
    /// assert_eq!(alloc.stats().named_segments, 1);
    /// # drop(v); Ok(()) }
    /// ```
    pub fn descriptor_budget(mut self, descriptors: usize) -> Self {
        self.settings.descriptor_budget = Some(descriptors);
        self
    }

    /// Release freed segments (unmap, close, give the disk blocks back) on a background thread,
    /// so `deallocate` returns at once. Default `false`: the release happens inside
    /// `deallocate`, and no descriptor or file outlives its allocation.
    ///
    /// Worth it where freeing blocks is slow: on ext4 mounted with `discard` (common on cloud
    /// VMs) closing a segment with reserved blocks waits for the device's discard, 1.3 to 3 ms
    /// measured, against 20 µs without `discard`. At most 64 freed segments wait for the
    /// thread; past that, `deallocate` releases its segment itself. Segments still waiting when
    /// the process exits are released by the kernel (their files are already unlinked, unless
    /// the descriptor budget was spent: such files are removed at the next start).
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// let alloc = mmapvec::MmapAllocator::builder().release_in_background(true).build()?;
    /// let v = mmapvec::mmap_vec![in alloc.clone(); 0u8; 1 << 20];
    /// drop(v); // returns without waiting for the file system
    /// assert_eq!(alloc.stats().live_segments, 0);
    /// # Ok(()) }
    /// ```
    pub fn release_in_background(mut self, background: bool) -> Self {
        self.settings.background_release = background;
        self
    }

    /// Blocks up to `bytes` (at most 512 KiB; larger values are capped) come from the
    /// small-block tier: they are carved out of 4 MiB chunk files that thousands of blocks
    /// share, so they cost no file, mapping or descriptor of their own, and freed space is
    /// reused at once. Larger blocks get a segment (a file) each, grown by `mremap`. Default
    /// 64 KiB. `0` turns the tier off: every allocation gets its own segment, as before.
    ///
    /// Why 64 KiB: below it, blocks are by far the most numerous (small vectors, small maps,
    /// nested collections), and a file of their own would cost more than the data. Above it,
    /// a segment costs little next to its data and grows without copying (`mremap`), while
    /// the tier copies a block each time it outgrows its size class. Measured with a
    /// create / push n `u64` / drop loop against `std::vec::Vec` (ratio of times, one run):
    /// with 16 KiB, 64 KiB, 256 KiB and 512 KiB thresholds, n = 1e4 took 1.43, 1.51, 1.58 and
    /// 1.65 times std, n = 1e5 1.17, 1.22, 1.37 and 1.54 times; hashbrown inserts were at or
    /// below the heap's time with each. 64 KiB keeps four times more blocks out of
    /// `vm.max_map_count` than 16 KiB for almost the same speed.
    ///
    /// Chunk files live in the same folder as segments, are unlinked at once (nothing is left
    /// after a crash) and have their blocks reserved (a full disk is an allocation error).
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// let alloc = mmapvec::MmapAllocator::builder().small_threshold(0).build()?;
    /// let v = mmapvec::mmap_vec![in alloc.clone(); 1u8, 2, 3];
    /// assert_eq!(alloc.stats().live_segments, 1); // a file of its own
    /// # drop(v); Ok(()) }
    /// ```
    pub fn small_threshold(mut self, bytes: usize) -> Self {
        self.settings.small_threshold = bytes.min(crate::arena::MAX_SMALL);
        self
    }

    /// How many bytes of freed segments the allocator keeps, mapped, to hand to the next
    /// large allocation that fits instead of making a new file. Default 256 MiB; `0` turns
    /// reuse off (every large allocation gets a new file, every free releases at once).
    ///
    /// A kept segment is released after about a second without use (at the allocator's next
    /// allocation or free), and a segment larger than half the bound is never kept. A kept
    /// segment holds its disk blocks and page-cache pages; freed data is never written back to
    /// disk for it (released files are unlinked scratch). See `src/reuse.rs` for the rules.
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// let alloc = mmapvec::MmapAllocator::builder().reuse_bytes(0).build()?;
    /// let v = mmapvec::mmap_vec![in alloc.clone(); 0u8; 1 << 20];
    /// drop(v);
    /// assert_eq!(alloc.stats().kept_bytes, 0);
    /// # Ok(()) }
    /// ```
    pub fn reuse_bytes(mut self, bytes: usize) -> Self {
        self.settings.reuse_bytes = bytes;
        self
    }

    /// Accept a directory on a RAM-backed file system (tmpfs, ramfs) with a `log` warning
    /// (`true`, the default), or refuse it in [`build`](Builder::build) (`false`).
    ///
    /// ```
    /// let refused = mmapvec::MmapAllocator::builder()
    ///     .dir("/dev/shm")
    ///     .allow_ram_backed(false)
    ///     .build();
    /// assert!(refused.is_err());
    /// ```
    pub fn allow_ram_backed(mut self, allow: bool) -> Self {
        self.allow_ram_backed = allow;
        self
    }

    /// Builds the allocator. The segment folder is checked and created now; errors name the
    /// path (missing directory, not a directory, not writable, a symlink or a folder of
    /// another user where the crate's folder goes, a RAM-backed directory when refused).
    ///
    /// ```
    /// let err = mmapvec::MmapAllocator::builder().dir("/no/such/dir").build().unwrap_err();
    /// assert!(err.to_string().contains("/no/such/dir"));
    /// ```
    pub fn build(mut self) -> io::Result<MmapAllocator> {
        let creator: Arc<dyn SegmentCreator> = match (self.creator.take(), self.dir.take()) {
            (Some(_), Some(dir)) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "both a directory ({}) and a segment creator were given",
                        dir.display()
                    ),
                ));
            }
            (Some(creator), None) => creator,
            (None, dir) => {
                let creator = DirCreator::open(dir.unwrap_or_else(std::env::temp_dir))?;
                if !self.allow_ram_backed && creator.is_ram_backed()? {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!(
                            "{} is on a RAM-backed file system; segments there save no memory",
                            creator.folder().display()
                        ),
                    ));
                }
                Arc::new(creator)
            }
        };
        Ok(MmapAllocator::new(self.settings, creator))
    }

    /// The settings as they are now, for an allocator made without [`build`](Builder::build).
    pub(crate) fn settings(&self) -> Settings {
        self.settings
    }
}
