//! Counters a user can read: what the allocator holds and did, and why allocations failed.

use std::fmt;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sys;

/// Why an allocation, grow or shrink failed. `AllocError` carries nothing, so the allocator
/// counts each failure under its cause (see [`Failures`]) and keeps the last `io::Error`
/// (see [`MmapAllocator::take_last_error`](crate::MmapAllocator::take_last_error)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FailureCause {
    /// The disk or quota is full, or the file would pass `RLIMIT_FSIZE` (`ENOSPC`, `EDQUOT`,
    /// `EFBIG`).
    DiskFull,
    /// Out of file descriptors (`EMFILE`, `ENFILE`).
    TooManyFiles,
    /// Out of mappings or memory for them (`ENOMEM`: often `vm.max_map_count`).
    OutOfMappings,
    /// The mapping would pass the process's address-space limit (`RLIMIT_AS`, as set by
    /// `ulimit -v`): `ENOMEM` with less address space left under the limit than was asked.
    AddressSpace,
    /// The requested size cannot be mapped at all (arithmetic overflow, beyond address space).
    TooLarge,
    /// The segment creator failed (the directory is missing, unwritable, refused...).
    Creator,
    /// The segment file was removed or replaced while in use.
    FileReplaced,
    /// Anything else.
    Other,
}

impl FailureCause {
    pub(crate) fn of(err: &io::Error) -> FailureCause {
        match Context::os_error(err) {
            Some(libc::ENOSPC | libc::EDQUOT | libc::EFBIG) => FailureCause::DiskFull,
            Some(libc::EMFILE | libc::ENFILE) => FailureCause::TooManyFiles,
            Some(libc::ENOMEM) => FailureCause::OutOfMappings,
            Some(libc::EOVERFLOW) => FailureCause::TooLarge,
            _ if err.kind() == io::ErrorKind::NotFound => FailureCause::FileReplaced,
            _ => FailureCause::Other,
        }
    }

    /// The cause of `err`, a failure to map `len` bytes: `ENOMEM` with less than `len` bytes
    /// left under `RLIMIT_AS` is the limit, not the map count.
    pub(crate) fn of_mapping(err: &io::Error, len: usize) -> FailureCause {
        match FailureCause::of(err) {
            FailureCause::OutOfMappings
                if sys::address_space_left().is_some_and(|left| left < len) =>
            {
                FailureCause::AddressSpace
            }
            cause => cause,
        }
    }
}

/// An `io::Error` given a sentence of context (which path, which step) that keeps the original
/// error, and so its OS error number: the failure statistics sort by that number.
#[derive(Debug)]
pub(crate) struct Context {
    message: String,
    source: io::Error,
}

impl Context {
    /// `source`, of the same kind, reading `"{message}: {source}"`.
    pub(crate) fn wrap(source: io::Error, message: String) -> io::Error {
        io::Error::new(source.kind(), Context { message, source })
    }

    /// The OS error number of `err`, or of the error it wraps.
    fn os_error(err: &io::Error) -> Option<i32> {
        err.raw_os_error().or_else(|| {
            err.get_ref()?
                .downcast_ref::<Context>()?
                .source
                .raw_os_error()
        })
    }
}

impl fmt::Display for Context {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.message, self.source)
    }
}

// The source's message is part of `Display`, so `source()` stays `None` (no message twice).
impl std::error::Error for Context {}

/// Failure counts by cause.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Failures {
    /// See [`FailureCause::DiskFull`].
    pub disk_full: u64,
    /// See [`FailureCause::TooManyFiles`].
    pub too_many_files: u64,
    /// See [`FailureCause::OutOfMappings`].
    pub out_of_mappings: u64,
    /// See [`FailureCause::AddressSpace`].
    pub address_space: u64,
    /// See [`FailureCause::TooLarge`].
    pub too_large: u64,
    /// See [`FailureCause::Creator`].
    pub creator: u64,
    /// See [`FailureCause::FileReplaced`].
    pub file_replaced: u64,
    /// See [`FailureCause::Other`].
    pub other: u64,
}

impl Failures {
    /// All failures, whatever the cause.
    ///
    /// ```
    /// let alloc = mmapvec::MmapAllocator::default();
    /// assert_eq!(alloc.stats().failures.total(), alloc.stats().failures.disk_full
    ///     + alloc.stats().failures.too_many_files + alloc.stats().failures.out_of_mappings
    ///     + alloc.stats().failures.address_space
    ///     + alloc.stats().failures.too_large + alloc.stats().failures.creator
    ///     + alloc.stats().failures.file_replaced + alloc.stats().failures.other);
    /// ```
    pub fn total(&self) -> u64 {
        self.disk_full
            + self.too_many_files
            + self.out_of_mappings
            + self.address_space
            + self.too_large
            + self.creator
            + self.file_replaced
            + self.other
    }

    /// The count for one cause.
    ///
    /// ```
    /// use mmapvec::FailureCause;
    /// let stats = mmapvec::MmapAllocator::default().stats();
    /// let _ = stats.failures.count(FailureCause::DiskFull);
    /// ```
    pub fn count(&self, cause: FailureCause) -> u64 {
        match cause {
            FailureCause::DiskFull => self.disk_full,
            FailureCause::TooManyFiles => self.too_many_files,
            FailureCause::OutOfMappings => self.out_of_mappings,
            FailureCause::AddressSpace => self.address_space,
            FailureCause::TooLarge => self.too_large,
            FailureCause::Creator => self.creator,
            FailureCause::FileReplaced => self.file_replaced,
            FailureCause::Other => self.other,
        }
    }
}

/// A snapshot of an allocator's counters, shared by all its clones.
///
/// ```
/// use mmapvec::{MmapAllocator, MmapVec};
/// # fn main() -> std::io::Result<()> {
/// let alloc = MmapAllocator::builder().dir(std::env::temp_dir()).build()?;
/// let mut small = MmapVec::<u8>::new_in(alloc.clone());
/// small.extend_from_slice(&[1; 10_000]); // a block of the small-block tier
/// let mut large = MmapVec::<u8>::new_in(alloc.clone());
/// large.extend_from_slice(&[1; 1_000_000]); // a segment
/// let stats = alloc.stats();
/// assert_eq!(stats.live_segments, 1);
/// assert!(stats.mapped_bytes >= 1_000_000);
/// assert!(stats.small.in_use_bytes >= 10_000);
/// drop((small, large));
/// let stats = alloc.stats();
/// assert_eq!((stats.live_segments, stats.small.in_use_bytes), (0, 0));
/// # Ok(()) }
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Stats {
    /// Segments alive now.
    pub live_segments: u64,
    /// Bytes mapped by live segments now (page-rounded).
    pub mapped_bytes: u64,
    /// Live segments whose descriptor is closed and whose file keeps its name (the process's
    /// descriptor budget was spent when they were made).
    pub named_segments: u64,
    /// Segments created since the allocator was built.
    pub creates: u64,
    /// Grows done by `mremap` (Linux).
    pub grows_remapped: u64,
    /// Grows done by mapping the file again (other systems, or [`GrowStrategy::MapAgain`](crate::GrowStrategy::MapAgain)).
    pub grows_mapped_again: u64,
    /// Grows that had to copy bytes, the only ones that do: a heap block growing into a segment
    /// (with a heap threshold), or a segment inherited through `fork`, which a child moves into
    /// a segment of its own rather than resize the parent's file.
    pub grows_copied: u64,
    /// Shrinks that gave pages back.
    pub shrinks: u64,
    /// Live allocations served by the heap (below the heap threshold).
    pub heap_allocations: u64,
    /// Segments handed out again from the freed ones kept for reuse, instead of a new file.
    pub segments_reused: u64,
    /// Freed segments kept for reuse now: each still holds its mapping and descriptor (see
    /// [`Builder::reuse_bytes`](crate::Builder::reuse_bytes)).
    pub kept_segments: u64,
    /// Bytes of freed segments kept for reuse now (see
    /// [`Builder::reuse_bytes`](crate::Builder::reuse_bytes)).
    pub kept_bytes: u64,
    /// The small-block tier's figures.
    pub small: SmallStats,
    /// Failed allocations, grows and shrinks, by cause.
    pub failures: Failures,
}

/// The small-block tier's figures: blocks up to
/// [`Builder::small_threshold`](crate::Builder::small_threshold) carved out of 4 MiB chunk
/// files that many blocks share.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SmallStats {
    /// Bytes of chunk files with disk blocks now: what the tier costs on disk (in RAM on a
    /// tmpfs). A chunk's pages get their blocks in 64 KiB pieces as its blocks are handed out,
    /// and pieces under no live block are given back (see the README, "What is kept after a
    /// free").
    pub arena_bytes: u64,
    /// Bytes of chunk files mapped now, 4 MiB a chunk, with disk or not: address space, and
    /// one mapping (of `vm.max_map_count`) per chunk.
    pub mapped_bytes: u64,
    /// Bytes of live blocks (each counted at its size class).
    pub in_use_bytes: u64,
    /// `arena_bytes` not in use: free blocks on backed pieces, and the first pieces of empty
    /// chunks kept for the next blocks.
    pub free_bytes: u64,
    /// Bytes of chunk files given back to the file system since the allocator was built.
    pub returned_bytes: u64,
    /// Chunk files created since the allocator was built.
    pub chunks_created: u64,
    /// Chunk files given back since the allocator was built.
    pub chunks_released: u64,
}

/// The live counters behind [`Stats`].
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub(crate) live_segments: AtomicU64,
    pub(crate) mapped_bytes: AtomicU64,
    pub(crate) named_segments: AtomicU64,
    pub(crate) creates: AtomicU64,
    pub(crate) grows_remapped: AtomicU64,
    pub(crate) grows_mapped_again: AtomicU64,
    pub(crate) grows_copied: AtomicU64,
    pub(crate) shrinks: AtomicU64,
    pub(crate) heap_allocations: AtomicU64,
    pub(crate) reused: AtomicU64,
    failures: [AtomicU64; 8],
}

fn cause_index(cause: FailureCause) -> usize {
    match cause {
        FailureCause::DiskFull => 0,
        FailureCause::TooManyFiles => 1,
        FailureCause::OutOfMappings => 2,
        FailureCause::TooLarge => 3,
        FailureCause::Creator => 4,
        FailureCause::FileReplaced => 5,
        FailureCause::Other => 6,
        FailureCause::AddressSpace => 7,
    }
}

impl Counters {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Ordering::Relaxed);
    }

    pub(crate) fn failed(&self, cause: FailureCause) {
        Self::add(&self.failures[cause_index(cause)], 1);
    }

    pub(crate) fn snapshot(&self) -> Stats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let failed = |cause| get(&self.failures[cause_index(cause)]);
        Stats {
            live_segments: get(&self.live_segments),
            mapped_bytes: get(&self.mapped_bytes),
            named_segments: get(&self.named_segments),
            creates: get(&self.creates),
            grows_remapped: get(&self.grows_remapped),
            grows_mapped_again: get(&self.grows_mapped_again),
            grows_copied: get(&self.grows_copied),
            shrinks: get(&self.shrinks),
            heap_allocations: get(&self.heap_allocations),
            segments_reused: get(&self.reused),
            kept_segments: 0,
            kept_bytes: 0,
            small: SmallStats::default(),
            failures: Failures {
                disk_full: failed(FailureCause::DiskFull),
                too_many_files: failed(FailureCause::TooManyFiles),
                out_of_mappings: failed(FailureCause::OutOfMappings),
                address_space: failed(FailureCause::AddressSpace),
                too_large: failed(FailureCause::TooLarge),
                creator: failed(FailureCause::Creator),
                file_replaced: failed(FailureCause::FileReplaced),
                other: failed(FailureCause::Other),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_from_errno() {
        let of = |errno| FailureCause::of(&io::Error::from_raw_os_error(errno));
        assert_eq!(of(libc::ENOSPC), FailureCause::DiskFull);
        assert_eq!(of(libc::EDQUOT), FailureCause::DiskFull);
        assert_eq!(of(libc::EFBIG), FailureCause::DiskFull);
        assert_eq!(of(libc::EMFILE), FailureCause::TooManyFiles);
        assert_eq!(of(libc::ENFILE), FailureCause::TooManyFiles);
        assert_eq!(of(libc::ENOMEM), FailureCause::OutOfMappings);
        assert_eq!(of(libc::ENOENT), FailureCause::FileReplaced);
        assert_eq!(of(libc::EIO), FailureCause::Other);
    }

    #[test]
    fn snapshot_counts_each_cause_once() {
        let counters = Counters::default();
        counters.failed(FailureCause::DiskFull);
        counters.failed(FailureCause::Creator);
        counters.failed(FailureCause::Creator);
        let stats = counters.snapshot();
        assert_eq!(stats.failures.disk_full, 1);
        assert_eq!(stats.failures.creator, 2);
        assert_eq!(stats.failures.count(FailureCause::Creator), 2);
        assert_eq!(stats.failures.total(), 3);
    }
}
