//! [`MmapAllocator`], its [`Builder`], and the `Allocator` implementation.
//!
//! The contract's terms (*currently allocated*, *fits*) are those of
//! [`allocator_api2::alloc::Allocator`]; this module relies on them without restating them.

use std::any::Any;
use std::fmt;
use std::io;
use std::ptr::{self, NonNull};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Mutex, Weak};

use allocator_api2::alloc::{AllocError, Allocator, Global, Layout};

use crate::arena::{SmallTier, TierConfig};
use crate::builder::{Builder, Settings};
use crate::creator::{DirCreator, SegmentCreator, SegmentRequest};
use crate::fork;
use crate::release;
use crate::reuse::slot::{self, MAX_SLOT_BYTES, SlotOwner, Slots};
use crate::reuse::{self, ReuseCache};
use crate::segment::{self, Resized, Segment};
use crate::stats::{Counters, FailureCause, SmallStats, Stats};
use crate::sys;
use crate::table::SegmentTable;

/// An allocator whose every allocation is a memory-mapped file (a *segment*), so the kernel can
/// write its pages to disk and drop them instead of running out of memory.
///
/// * Each non-empty allocation gets its own file, made by a [`SegmentCreator`] (by default a
///   [`DirCreator`] in the temp directory), mapped `MAP_SHARED` read/write.
/// * `grow` and `shrink` resize the file and move the mapping with `mremap` on Linux: no byte is
///   copied. Other unix systems map the file again (no copy either).
/// * `allocate_zeroed` costs nothing extra: a fresh file reads as zeros.
/// * `deallocate` unmaps and removes the file. Files are unlinked right after creation while
///   the process's descriptor budget allows, so a crash leaves nothing behind.
///
/// Clones share segments, settings and [`stats`](MmapAllocator::stats); a block may be freed
/// by any clone. Every [`MmapAllocator::default()`] is a clone of one process-wide allocator.
///
/// A clone of a built allocator counts one more reference to it (an atomic add on a counter
/// its clones share, as for an `Arc`): threads that clone one built allocator for every small
/// vector contend for that counter. The process-wide allocator lives as long as the process,
/// so its clones count nothing and cost nothing; a built allocator can be shared the same way
/// as a `&'static MmapAllocator` (which is an `Allocator` too), for example from a
/// `std::sync::LazyLock`.
///
/// ```
/// use mmapvec::{MmapAllocator, MmapVec};
///
/// let mut v: MmapVec<u64> = MmapVec::new_in(MmapAllocator::default());
/// v.extend(0..1_000_000);
/// assert_eq!(v.iter().sum::<u64>(), 499_999_500_000);
/// ```
#[derive(Clone)]
pub struct MmapAllocator {
    inner: Handle,
}

/// How an [`MmapAllocator`] holds its allocator.
#[derive(Clone)]
enum Handle {
    /// Counted: the allocator goes when its last handle does.
    Counted(Arc<Inner>),
    /// The process-wide allocator, which is never dropped: a clone copies a pointer, and
    /// threads cloning it write no memory in common.
    Process(&'static Inner),
}

impl std::ops::Deref for Handle {
    type Target = Inner;

    #[inline]
    fn deref(&self) -> &Inner {
        match self {
            Handle::Counted(inner) => inner,
            Handle::Process(inner) => inner,
        }
    }
}

struct Inner {
    /// First, so it drops first: segments remove their files before the creator (whose session
    /// folder must be empty by then) goes away.
    table: SegmentTable,
    creator: Arc<dyn SegmentCreator>,
    /// The creator again when it is the crate's own, whose lock the fork handlers take too.
    settings: Settings,
    /// Freed segments kept for reuse.
    cache: Arc<ReuseCache>,
    /// One freed segment per thread, kept for that thread's next large allocation (the reuse
    /// cache's fast path: see `reuse::slot`).
    slots: Arc<Slots>,
    /// This allocator, for the threads' slots to give their segments back to.
    me: Weak<Inner>,
    /// Blocks up to the small threshold, carved out of shared chunk files.
    tier: Arc<SmallTier>,
    counters: Counters,
    last_error: Mutex<Option<io::Error>>,
}

/// A failure below the trait boundary: the error and why, before it becomes an `AllocError`.
struct Failure {
    cause: FailureCause,
    error: io::Error,
}

impl Failure {
    fn os(error: io::Error) -> Failure {
        Failure {
            cause: FailureCause::of(&error),
            error,
        }
    }

    fn creator(error: io::Error) -> Failure {
        // Running out of descriptors or disk while creating a file is still that cause.
        let cause = match FailureCause::of(&error) {
            cause @ (FailureCause::TooManyFiles | FailureCause::DiskFull) => cause,
            _ => FailureCause::Creator,
        };
        Failure { cause, error }
    }

    fn too_large(size: usize) -> Failure {
        Failure {
            cause: FailureCause::TooLarge,
            error: io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{size} bytes cannot be mapped (size or alignment overflow)"),
            ),
        }
    }
}

/// The largest mapping attempted. User address space is 47 bits on x86-64 (48 on aarch64), so
/// anything larger fails anyway; refusing it up front avoids creating a file for nothing and
/// reports the right cause. On 32-bit targets `Layout` already caps sizes at `isize::MAX`.
#[cfg(target_pointer_width = "64")]
const MAX_MAPPING: usize = 1 << 47;
#[cfg(not(target_pointer_width = "64"))]
const MAX_MAPPING: usize = isize::MAX as usize;

/// Empty chunks of the small-block tier kept whole for the next blocks where a chunk's pieces
/// cannot be given back one by one (see `TierConfig::retain_empty`).
const RETAIN_EMPTY_CHUNKS: usize = 2;

impl Default for MmapAllocator {
    /// The process-wide allocator: segments in `std::env::temp_dir()` (read at the first call,
    /// so `TMPDIR` is honoured), default settings. Its folder is prepared at the first
    /// allocation; a problem there makes allocations fail, with the reason in
    /// [`take_last_error`](MmapAllocator::take_last_error). Use [`MmapAllocator::builder`] to
    /// get such errors up front.
    fn default() -> Self {
        // Published with a compare-and-swap, not built inside a `OnceLock`: making an
        // allocator registers it with the fork handlers, which waits while a fork is being
        // prepared, and a child forked then would inherit an initializer that never completes.
        static DEFAULT: AtomicPtr<Inner> = AtomicPtr::new(ptr::null_mut());
        let mut current = DEFAULT.load(Ordering::Acquire);
        if current.is_null() {
            let Handle::Counted(made) = MmapAllocator::new(
                Builder::new().settings(),
                Arc::new(DirCreator::new(std::env::temp_dir())),
            )
            .inner
            else {
                unreachable!("a new allocator is counted");
            };
            // Its one count is never given back once published: the allocator lives as long
            // as the process.
            let made = Arc::into_raw(made).cast_mut();
            current = match DEFAULT.compare_exchange(
                ptr::null_mut(),
                made,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => made,
                Err(first) => {
                    // SAFETY: `made` came from `Arc::into_raw` just above and was not
                    // published: this takes its count back, and the allocator goes.
                    drop(unsafe { Arc::from_raw(made) });
                    first
                }
            };
        }
        // SAFETY: a published pointer holds a count of its `Arc` that is never given back:
        // the process-wide allocator lives as long as the process.
        let forever: &'static Inner = unsafe { &*current };
        MmapAllocator {
            inner: Handle::Process(forever),
        }
    }
}

impl fmt::Debug for MmapAllocator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MmapAllocator")
            .field("creator", &self.inner.creator)
            .field("options", &self.inner.settings.opts)
            .field("heap_threshold", &self.inner.settings.heap_threshold)
            .field("stats", &self.stats())
            .finish()
    }
}

impl MmapAllocator {
    /// The allocator for `settings`, making its files with `creator`.
    pub(crate) fn new(settings: Settings, creator: Arc<dyn SegmentCreator>) -> MmapAllocator {
        crate::install_fork_handlers();
        let inner = Arc::new_cyclic(|me| Inner {
            table: SegmentTable::new(),
            creator,
            cache: Arc::new(ReuseCache::new(settings.reuse_bytes)),
            slots: Arc::new(Slots::new()),
            me: me.clone(),
            tier: Arc::new(SmallTier::new(TierConfig {
                threshold: settings.small_threshold,
                reserve_disk: settings.opts.reserve_disk,
                dont_fork: settings.opts.dont_fork,
                retain_empty: RETAIN_EMPTY_CHUNKS,
                ..TierConfig::default()
            })),
            settings,
            counters: Counters::default(),
            last_error: Mutex::new(None),
        });
        // SAFETY: the tier lives in its `Arc` at a fixed address until its `Drop`, which
        // unregisters it first; its `lock_for_fork` takes only its own locks.
        unsafe { fork::register(&*inner.tier) };
        // SAFETY: `Inner` lives in the `Arc` at a fixed address until its `Drop`, which
        // unregisters it first; its `lock_for_fork` takes only its own locks.
        unsafe { fork::register(&*inner) };
        MmapAllocator {
            inner: Handle::Counted(inner),
        }
    }

    /// This allocator, made to live as long as the process: it is never dropped (its files go
    /// when the process ends, as every temporary file of the crate does), and its clones, from
    /// now on, count nothing and cost nothing, as those of [`MmapAllocator::default()`] do.
    /// For an allocator that many threads clone for every small vector (see the type's docs).
    /// Clones made before stay counted, and harmless.
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// use mmapvec::{MmapAllocator, MmapVec};
    ///
    /// let alloc = MmapAllocator::builder().build()?.leak();
    /// let workers: Vec<_> = (0..4)
    ///     .map(|_| {
    ///         let alloc = alloc.clone();
    ///         std::thread::spawn(move || {
    ///             for len in 1..1000 {
    ///                 let mut v: MmapVec<u8> = MmapVec::with_capacity_in(len, alloc.clone());
    ///                 v.resize(len, 1);
    ///             }
    ///         })
    ///     })
    ///     .collect();
    /// workers.into_iter().for_each(|w| w.join().unwrap());
    /// # Ok(()) }
    /// ```
    pub fn leak(self) -> MmapAllocator {
        let inner = match self.inner {
            Handle::Counted(inner) => {
                // SAFETY: `into_raw` keeps this handle's count for good, so the `Inner` is
                // never dropped: a `'static` reference to it stays valid.
                Handle::Process(unsafe { &*Arc::into_raw(inner) })
            }
            forever => forever,
        };
        MmapAllocator { inner }
    }

    /// Starts configuring an allocator.
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// let alloc = mmapvec::MmapAllocator::builder().dir("/var/tmp").build()?;
    /// # let _ = alloc; Ok(()) }
    /// ```
    pub fn builder() -> Builder {
        Builder::new()
    }

    /// A snapshot of the counters shared by this allocator and its clones.
    ///
    /// ```
    /// let alloc = mmapvec::MmapAllocator::builder().build().unwrap();
    /// let small = mmapvec::mmap_vec![in alloc.clone(); 1u8, 2, 3]; // a block of a shared chunk
    /// let large = mmapvec::mmap_vec![in alloc.clone(); 0u8; 1 << 20]; // a segment of its own
    /// let stats = alloc.stats();
    /// assert_eq!((stats.live_segments, stats.creates), (1, 1));
    /// assert!(stats.small.in_use_bytes >= 3);
    /// # drop((small, large));
    /// ```
    pub fn stats(&self) -> Stats {
        // A fork child lets go of what its parent kept at its first look (see `reuse`).
        slot::give_back_orphans(&self.inner.slots, &*self.inner);
        slot::give_back_if_stale(&self.inner.slots, fork::epoch());
        let mut stats = self.inner.counters.snapshot();
        let (kept, kept_bytes) = self.inner.cache.kept();
        (stats.kept_segments, stats.kept_bytes) = (kept as u64, kept_bytes as u64);
        // Segments in threads' slots are in the table (counted live) but free: kept.
        let (in_slots, slot_bytes, slot_hits) = self.inner.slots.totals();
        stats.live_segments = stats.live_segments.saturating_sub(in_slots);
        stats.mapped_bytes = stats.mapped_bytes.saturating_sub(slot_bytes);
        stats.kept_segments += in_slots;
        stats.kept_bytes += slot_bytes;
        stats.segments_reused += slot_hits;
        let tier = self.inner.tier.stats();
        stats.small = SmallStats {
            arena_bytes: tier.arena_bytes,
            mapped_bytes: tier.mapped_bytes,
            in_use_bytes: tier.in_use_bytes,
            free_bytes: tier.free_bytes,
            returned_bytes: tier.returned_bytes,
            chunks_created: tier.chunks_created,
            chunks_released: tier.chunks_released,
        };
        stats
    }

    /// Gives back, now, the disk and address space this allocator keeps for reuse: freed
    /// segments kept for the next allocations, empty chunks of the small-block tier, the disk
    /// of every free piece of its other chunks, the free small blocks that this thread's cache
    /// holds, and the tier's reserved address ranges that no chunk uses. Other threads' caches
    /// give their blocks back at their next allocation or free. Live blocks are not touched.
    ///
    /// The allocator does this by itself before it reports a full disk, the map count or the
    /// address space (`RLIMIT_AS`) exhausted, and what it keeps is bounded (see the README,
    /// "What is kept after a free"); call it to hand the space to another program at once, for
    /// example before a long pause, or after lowering `RLIMIT_AS`.
    ///
    /// ```
    /// use mmapvec::{MmapAllocator, MmapVec};
    /// let alloc = MmapAllocator::builder().build().unwrap();
    /// let v: MmapVec<u8> = MmapVec::with_capacity_in(1 << 20, alloc.clone());
    /// drop(v); // the segment is kept for the next allocation...
    /// assert_eq!(alloc.stats().kept_segments, 1);
    /// alloc.trim(); // ...until now
    /// assert_eq!(alloc.stats().kept_segments, 0);
    /// ```
    pub fn trim(&self) {
        self.inner.trim();
    }

    /// Takes the error behind the most recent failed allocation, grow or shrink of this
    /// allocator (or a clone), leaving `None`. `AllocError` itself carries nothing; this is
    /// where to learn *why*. With several threads failing at once, the last one wins.
    ///
    /// ```
    /// use mmapvec::{MmapAllocator, MmapVec};
    /// let mut v = MmapVec::<u8>::new_in(MmapAllocator::default());
    /// assert!(v.try_reserve(isize::MAX as usize).is_err());
    /// let err = v.allocator().take_last_error().unwrap();
    /// println!("reserve failed: {err}");
    /// ```
    pub fn take_last_error(&self) -> Option<io::Error> {
        self.inner
            .last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }
}

/// The aligned dangling pointer answered for zero-size requests: never reaches the OS.
pub(crate) fn dangling(align: usize) -> NonNull<[u8]> {
    // `Layout` guarantees a non-zero power-of-two alignment.
    let ptr = NonNull::new(ptr::without_provenance_mut::<u8>(align)).unwrap_or(NonNull::dangling());
    NonNull::slice_from_raw_parts(ptr, 0)
}

fn block(segment: &Segment) -> NonNull<[u8]> {
    NonNull::slice_from_raw_parts(segment.ptr(), segment.len())
}

impl Drop for Inner {
    fn drop(&mut self) {
        // First, while every field is alive: a fork in progress may be holding our locks.
        fork::unregister(&*self);
        let mut kept = Vec::new();
        self.cache.drain(&mut kept);
        drop(kept);
    }
}

impl SlotOwner for Inner {
    fn give_back(&self, addr: usize) {
        if let Some(segment) = self.table.take(addr) {
            self.forget(&segment);
            self.release(segment);
        }
    }
}

impl fork::ForkLocks for Inner {
    fn lock_for_fork(&'static self, held: &mut Vec<Box<dyn Any>>, _epoch: u64) {
        // The table shards, the reuse cache and the last error are each taken alone (before
        // `fork::hold`, which the fork handler takes last). The small-block tier and the
        // crate's own creator register their locks themselves: a thread's cache may keep the
        // tier alive after this allocator is gone.
        self.table.lock_for_fork(held);
        let cache: &'static ReuseCache = &self.cache;
        cache.lock_for_fork(held);
        let slots: &'static Slots = &self.slots;
        slots.lock_for_fork(held);
        held.push(Box::new(
            self.last_error.lock().unwrap_or_else(|e| e.into_inner()),
        ));
    }
}

impl Inner {
    /// The mapped length for `size` bytes: page-rounded (huge-page-rounded when asked), or an
    /// error when that overflows what can be mapped.
    fn mapped_len(&self, size: usize) -> Result<usize, Failure> {
        let unit = if self.settings.opts.huge_pages && size >= segment::HUGE_PAGE {
            segment::HUGE_PAGE
        } else {
            sys::page_size()
        };
        size.checked_next_multiple_of(unit)
            .filter(|&len| len <= MAX_MAPPING)
            .ok_or_else(|| Failure::too_large(size))
    }

    fn segment_align(&self, align: usize, len: usize) -> usize {
        if self.settings.opts.huge_pages && len >= segment::HUGE_PAGE {
            align.max(segment::HUGE_PAGE)
        } else {
            align
        }
    }

    fn may_hold_descriptor(&self) -> bool {
        let budget = match self.settings.descriptor_budget {
            Some(budget) => budget,
            None => match sys::open_files_soft_limit() {
                Some(limit) => usize::try_from(limit / 2).unwrap_or(usize::MAX),
                None => usize::MAX,
            },
        };
        segment::held_descriptors() < budget
    }

    /// A segment for `size` bytes aligned to `align`: a kept one if one fits (see `reuse`),
    /// else a new one. It reads as zeros if `zeroed` (a new file does by itself).
    fn new_segment(&self, size: usize, align: usize, zeroed: bool) -> Result<Segment, Failure> {
        let len = self.mapped_len(size)?;
        let align = self.segment_align(align, len);
        let mut expired = Vec::new();
        let reused = self.cache.take(len, align, zeroed, &mut expired);
        expired.into_iter().for_each(|s| self.release_now(s));
        if let Some(segment) = reused {
            let c = &self.counters;
            Counters::add(&c.reused, 1);
            Counters::add(&c.live_segments, 1);
            Counters::add(&c.mapped_bytes, segment.len() as u64);
            if !segment.holds_descriptor() {
                Counters::add(&c.named_segments, 1);
            }
            return Ok(segment);
        }
        let hold = self.may_hold_descriptor();
        let request = SegmentRequest {
            len,
            keeps_name: !hold,
        };
        let file = self.creator.create(&request).map_err(Failure::creator)?;
        let segment =
            Segment::create(file, len, align, &self.settings.opts, hold).map_err(Failure::os)?;
        let c = &self.counters;
        Counters::add(&c.creates, 1);
        Counters::add(&c.live_segments, 1);
        Counters::add(&c.mapped_bytes, len as u64);
        if !segment.holds_descriptor() {
            Counters::add(&c.named_segments, 1);
        }
        Ok(segment)
    }

    fn forget(&self, segment: &Segment) {
        let c = &self.counters;
        Counters::sub(&c.live_segments, 1);
        Counters::sub(&c.mapped_bytes, segment.len() as u64);
        if !segment.holds_descriptor() {
            Counters::sub(&c.named_segments, 1);
        }
    }

    /// Keeps a freed segment for reuse, or releases it (see [`Inner::release_now`]).
    fn release(&self, segment: Segment) {
        let mut expired = Vec::new();
        let refused = self.cache.put(segment, &mut expired);
        expired
            .into_iter()
            .chain(refused)
            .for_each(|s| self.release_now(s));
    }

    /// Unmaps a freed segment and closes or removes its file, here or on the release thread.
    fn release_now(&self, segment: Segment) {
        if self.settings.background_release {
            release::release_in_background(segment);
        } else {
            drop(segment);
        }
    }

    /// Gives back what is kept for reuse (see [`MmapAllocator::trim`]), at once rather than on
    /// the release thread. `true` if anything was given back.
    fn trim(&self) -> bool {
        slot::give_back_orphans(&self.slots, self);
        self.slots.request_flush();
        let slot = slot::flush(&self.slots);
        let tier = self.tier.trim();
        let mut kept = Vec::new();
        self.cache.drain(&mut kept);
        let any = slot || tier || !kept.is_empty();
        drop(kept);
        any
    }

    /// `attempt`, and once more if it found the disk, the map count or the address space
    /// exhausted and [`Inner::trim`] gave some back: what is kept for reuse must not make an
    /// allocation fail.
    fn retry_if_full<T>(
        &self,
        mut attempt: impl FnMut() -> Result<T, Failure>,
    ) -> Result<T, Failure> {
        match attempt() {
            // What the allocator keeps may be what is missing: disk, mappings (each kept
            // segment and chunk is one), or address space (each kept segment and region).
            Err(failure)
                if matches!(
                    failure.cause,
                    FailureCause::DiskFull
                        | FailureCause::OutOfMappings
                        | FailureCause::AddressSpace
                ) && self.trim() =>
            {
                attempt()
            }
            result => result,
        }
    }

    /// Counts and keeps a failure to get `size` bytes, and turns it into the trait's error.
    fn record(&self, mut failure: Failure, size: usize) -> AllocError {
        if failure.cause == FailureCause::OutOfMappings {
            failure.cause = FailureCause::of_mapping(&failure.error, size);
        }
        self.counters.failed(failure.cause);
        crate::logging::report!(
            debug,
            "mmapvec: allocation failed ({:?}): {}",
            failure.cause,
            failure.error
        );
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(failure.error);
        AllocError
    }

    fn allocate(&self, layout: Layout, zeroed: bool) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            return Ok(dangling(layout.align()));
        }
        if layout.size() < self.settings.heap_threshold {
            let block = if zeroed {
                Global.allocate_zeroed(layout)
            } else {
                Global.allocate(layout)
            }?;
            Counters::add(&self.counters.heap_allocations, 1);
            return Ok(block);
        }
        if self.tier.serves(layout) {
            match self.retry_if_full(|| {
                self.tier
                    .allocate(layout, zeroed, fork::epoch(), &*self.creator)
                    .map_err(Failure::creator)
            }) {
                Ok(block) => return Ok(block),
                // The tier's address range is full, or could not be reserved: a segment will do.
                Err(f) if f.error.kind() == io::ErrorKind::OutOfMemory => {}
                Err(f) => return Err(self.record(f, layout.size())),
            }
        }
        if let Some(block) = self.take_from_slot(layout, zeroed) {
            return Ok(block);
        }
        let segment = self
            .retry_if_full(|| self.new_segment(layout.size(), layout.align(), zeroed))
            .map_err(|f| self.record(f, layout.size()))?;
        // A segment taken from the reuse cache may be longer than asked: report the length
        // asked (page-rounded). hashbrown turns a longer block into more buckets, a table
        // several times the size it chose, and slower lookups for it.
        let asked = self.mapped_len(layout.size()).unwrap_or(segment.len());
        let block = NonNull::slice_from_raw_parts(segment.ptr(), asked.min(segment.len()));
        self.table.insert(segment);
        Ok(block)
    }

    /// The segment this thread's slot keeps, if it fits `layout`: no lock, no table change
    /// (it never left the table). Zeroed by hand if asked.
    fn take_from_slot(&self, layout: Layout, zeroed: bool) -> Option<NonNull<[u8]>> {
        if !self.cache.is_on() {
            return None;
        }
        slot::give_back_orphans(&self.slots, self);
        let len = self.mapped_len(layout.size()).ok()?;
        if len > MAX_SLOT_BYTES {
            return None;
        }
        let align = self.segment_align(layout.align(), len);
        let (ptr, have) = slot::take(&self.slots, fork::epoch(), |at, have| {
            reuse::fits(have, at, len, align, zeroed)
        })?;
        if zeroed {
            // SAFETY: the segment is mapped for `have` bytes, free (in this thread's slot until
            // just now) and handed to this caller alone.
            unsafe { ptr.write_bytes(0, have) };
        }
        // As for a reused segment (see `allocate`): the length asked, not the longer mapping.
        Some(NonNull::slice_from_raw_parts(ptr, len))
    }

    /// Keeps a freed segment in this thread's slot if it is one the slot may take. `false`:
    /// not kept, free it as usual.
    fn offer_to_slot(&self, ptr: NonNull<u8>) -> bool {
        if !self.cache.is_on() {
            return false;
        }
        slot::give_back_orphans(&self.slots, self);
        if !slot::has_room(&self.slots) {
            return false;
        }
        let epoch = fork::epoch();
        // The segment's own pointer, not the caller's: the block handed out again carries the
        // mapping's provenance, whatever the caller's pointer was derived through.
        let kept = self.table.peek(ptr.as_ptr().addr(), |segment| {
            (segment.len() <= MAX_SLOT_BYTES && self.cache.may_keep(segment))
                .then(|| (segment.ptr(), segment.len()))
        });
        let Some(Some((start, len))) = kept else {
            return false;
        };
        let owner = || -> Weak<dyn SlotOwner> { self.me.clone() };
        slot::offer(owner, &self.slots, epoch, start, len)
    }

    /// Puts a segment (back) in the table and returns its whole mapping as the block.
    fn keep(&self, segment: Segment) -> NonNull<[u8]> {
        let block = block(&segment);
        self.table.insert(segment);
        block
    }

    /// Resizes the segment at `ptr` to hold `new` (grow or shrink). On error the segment is put
    /// back untouched.
    fn resize(&self, mut segment: Segment, new: Layout) -> Result<(Segment, Resized), AllocError> {
        let result = self.mapped_len(new.size()).and_then(|len| {
            let align = self.segment_align(new.align(), len);
            self.retry_if_full(|| {
                segment
                    .resize(len, align, &self.settings.opts)
                    .map_err(Failure::os)
            })
        });
        match result {
            Ok(resized) => Ok((segment, resized)),
            Err(failure) => {
                self.table.insert(segment);
                Err(self.record(failure, new.size()))
            }
        }
    }

    /// A new block for `new` (from whichever tier serves it) holding a copy of the `keep` bytes
    /// at `src`; past them it reads as zeros if `zeroed`. The old block is the caller's to free.
    ///
    /// # Safety
    /// `src` must be valid for `keep` reads, and `keep <= new.size()`.
    unsafe fn copy_into_new_block(
        &self,
        src: NonNull<u8>,
        keep: usize,
        new: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        debug_assert!(keep <= new.size());
        let block = self.allocate(new, zeroed)?;
        // SAFETY: `src` is valid for `keep` reads (caller); the new block is distinct from any
        // block currently allocated (the old one included) and at least `new.size() >= keep`
        // bytes long, so the ranges cannot overlap.
        unsafe { ptr::copy_nonoverlapping(src.as_ptr(), block.cast::<u8>().as_ptr(), keep) };
        Ok(block)
    }

    /// Moves the block of `segment` to a new block for `new`, copying its first `keep` bytes,
    /// and gives the segment up. On failure the segment is handed back, untouched.
    ///
    /// The way a fork child grows or shrinks an inherited segment (whose file it must not
    /// resize), and the way a segment shrunk small enough moves into the small-block tier.
    fn move_segment(
        &self,
        segment: Segment,
        keep: usize,
        new: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, (Segment, AllocError)> {
        // SAFETY: the segment's view is mapped for `segment.len() >= keep` bytes (the old
        // block, or a part of it, fits it), and callers pass `keep <= new.size()`.
        match unsafe { self.copy_into_new_block(segment.ptr(), keep, new, zeroed) } {
            Ok(block) => {
                self.forget(&segment);
                self.release(segment);
                if new.size() > keep {
                    Counters::add(&self.counters.grows_copied, 1);
                }
                Ok(block)
            }
            Err(e) => Err((segment, e)),
        }
    }

    /// [`Inner::move_segment`], putting the segment back in the table on failure.
    fn move_segment_or_keep(
        &self,
        segment: Segment,
        keep: usize,
        new: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        self.move_segment(segment, keep, new, zeroed)
            .map_err(|(segment, e)| {
                self.table.insert(segment);
                e
            })
    }

    /// Grows or shrinks a block of the small-block tier: in place when the new layout fits the
    /// block (a shrink only within its size class, so `shrink_to_fit` gives memory back) and
    /// no fork came since its chunk was made (pre-fork memory is shared with a child: never
    /// resized in place, see `arena`); else into a new block, copying.
    ///
    /// # Safety
    /// `ptr` is a block of the tier, currently allocated with `old`; the `grow`/`shrink`
    /// contract for `new`.
    unsafe fn resize_small(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        let epoch = fork::epoch();
        // SAFETY: `ptr` is a currently allocated block of the tier (caller).
        let (len, current) =
            unsafe { (self.tier.block_len(ptr), self.tier.is_current(ptr, epoch)) };
        let same_class = || self.tier.serves(new) && self.tier.class_len(new) == Some(len);
        let aligned_within = new.size() <= len && ptr.as_ptr().addr().is_multiple_of(new.align());
        let shrink = new.size() <= old.size();
        // In place: within the block, in a chunk no child may map, and a shrink only within
        // its class (so `shrink_to_fit` gives memory back).
        let in_place = aligned_within && current && (!shrink || same_class());
        // With `dont_fork` a pre-fork chunk is not mapped in a child at all: copying out of it
        // would fault, so a shrink keeps the block whatever the class (in the parent too: no
        // child maps it).
        let kept_whole = aligned_within && shrink && !current && self.settings.opts.dont_fork;
        if in_place || kept_whole {
            if zeroed && old.size() < len {
                // The block past the old size may hold bytes of an earlier, larger use.
                // SAFETY: `[old.size(), len)` lies inside the block, which the caller owns.
                unsafe { ptr.add(old.size()).write_bytes(0, len - old.size()) };
            }
            return Ok(NonNull::slice_from_raw_parts(ptr, len));
        }
        let keep = old.size().min(new.size());
        // SAFETY: the old block is valid for `old.size() >= keep` reads; `keep <= new.size()`.
        let block = match unsafe { self.copy_into_new_block(ptr, keep, new, zeroed) } {
            Ok(block) => block,
            // A shrink that cannot move (no new chunk: full disk, a failing creator) keeps the
            // block whole, as a segment's does: `Vec::shrink_to_fit` aborts on an error.
            // Nothing is written to it, so a pre-fork chunk is fine too.
            Err(_) if aligned_within && shrink => {
                return Ok(NonNull::slice_from_raw_parts(ptr, len));
            }
            Err(e) => return Err(e),
        };
        // SAFETY: the old block is currently allocated and is not used again.
        unsafe { self.tier.deallocate(ptr, epoch) };
        if new.size() > old.size() {
            Counters::add(&self.counters.grows_copied, 1);
        }
        Ok(block)
    }

    /// # Safety
    /// The [`Allocator::grow`] contract.
    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        debug_assert!(new.size() >= old.size(), "grow to a smaller size");
        if old.size() == 0 {
            // The old block is a dangling pointer: nothing to keep, nothing to free.
            return self.allocate(new, zeroed);
        }
        if self.tier.contains(ptr) {
            // SAFETY: a block of the tier (it lies in its range), currently allocated (caller).
            return unsafe { self.resize_small(ptr, old, new, zeroed) };
        }
        let Some(segment) = self.table.take(ptr.as_ptr().addr()) else {
            // SAFETY: not a segment, so (contract: currently allocated by us) a heap block.
            return unsafe { self.grow_heap_block(ptr, old, new, zeroed) };
        };
        if segment.is_inherited() {
            return self.move_segment_or_keep(segment, old.size(), new, zeroed);
        }
        let old_len = segment.len();
        // Never make the mapping smaller while growing: the block may be larger than `new` (a
        // failed shrink keeps it whole, see `shrink`), and the zeroing below relies on the new
        // length being at least `old_len`.
        let at_least = Layout::from_size_align(new.size().max(old_len), new.align()).unwrap_or(new);
        let (segment, resized) = self.resize(segment, at_least)?;
        if zeroed && old.size() < old_len {
            // The file beyond `old_len` is fresh (zeros); the old block's slack up to `old_len`
            // may hold bytes from before a shrink, or writes into the slack we handed out.
            // SAFETY: `[old.size(), old_len)` lies inside the new mapping (new len >= old_len).
            unsafe {
                segment
                    .ptr()
                    .add(old.size())
                    .write_bytes(0, old_len - old.size())
            };
        }
        let c = &self.counters;
        Counters::add(
            &c.mapped_bytes,
            segment.len().saturating_sub(old_len) as u64,
        );
        match resized {
            Resized::Remapped => Counters::add(&c.grows_remapped, 1),
            Resized::MappedAgain => Counters::add(&c.grows_mapped_again, 1),
            Resized::Unchanged => {}
        }
        Ok(self.keep(segment))
    }

    /// # Safety
    /// The [`Allocator::grow`] contract, and `ptr` was allocated from [`Global`] by `self`.
    unsafe fn grow_heap_block(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        debug_assert!(
            self.settings.heap_threshold > 0,
            "unknown block passed to grow"
        );
        if new.size() < self.settings.heap_threshold {
            // SAFETY: forwarded contract; the block came from Global.
            return unsafe {
                if zeroed {
                    Global.grow_zeroed(ptr, old, new)
                } else {
                    Global.grow(ptr, old, new)
                }
            };
        }
        // SAFETY: `ptr` is valid for `old.size()` reads (contract), and `old.size() <=
        // new.size()` (grow).
        let block = unsafe { self.copy_into_new_block(ptr, old.size(), new, zeroed) }?;
        // SAFETY: the heap block is currently allocated by Global with layout `old`.
        unsafe { Global.deallocate(ptr, old) };
        Counters::sub(&self.counters.heap_allocations, 1);
        Counters::add(&self.counters.grows_copied, 1);
        Ok(block)
    }

    /// # Safety
    /// The [`Allocator::shrink`] contract.
    unsafe fn shrink(
        &self,
        ptr: NonNull<u8>,
        old: Layout,
        new: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        debug_assert!(new.size() <= old.size(), "shrink to a larger size");
        if new.size() == 0 {
            // SAFETY: forwarded contract: `ptr` is currently allocated with `old`.
            unsafe { self.deallocate(ptr, old) };
            return Ok(dangling(new.align()));
        }
        if self.tier.contains(ptr) {
            // SAFETY: a block of the tier, currently allocated with `old` (caller).
            return unsafe { self.resize_small(ptr, old, new, false) };
        }
        let Some(segment) = self.table.take(ptr.as_ptr().addr()) else {
            debug_assert!(
                self.settings.heap_threshold > 0,
                "unknown block passed to shrink"
            );
            // SAFETY: not a segment, so a heap block (contract); forwarded.
            return unsafe { Global.shrink(ptr, old, new) };
        };
        let aligned = ptr.as_ptr().addr().is_multiple_of(new.align());
        if segment.is_inherited() {
            if segment.is_dont_fork() && aligned {
                // Not mapped in this child (an inaccessible reservation): nothing to copy, and
                // nothing the child could write into. It stays as it was, as before the shrink.
                return Ok(self.keep(segment));
            }
            // The child's vector gets a block of its own, as for a grow: keeping the shared
            // block would let the child's writes after the shrink land in the parent's data.
            return self.move_segment_or_keep(segment, new.size(), new, false);
        }
        if self.tier.serves(new) || new.size() < self.settings.heap_threshold {
            // Small now: into the tier (or the heap), and the segment goes.
            match self.move_segment(segment, new.size(), new, false) {
                Ok(block) => return Ok(block),
                // The block as it is still fits: keeping it is a valid shrink, where an error
                // would make `Vec::shrink_to_fit` abort the process.
                Err((segment, _)) if aligned => {
                    return Ok(self.keep(segment));
                }
                Err((segment, e)) => {
                    self.table.insert(segment);
                    return Err(e);
                }
            }
        }
        if segment.may_be_shared() {
            // A child made since may map the whole file: it is never made shorter (the child
            // would die of SIGBUS). The block as it is fits the smaller layout if aligned.
            if aligned {
                return Ok(self.keep(segment));
            }
            return self.move_segment_or_keep(segment, new.size(), new, false);
        }
        let old_len = segment.len();
        let (segment, _) = match self.resize(segment, new) {
            Ok(resized) => resized,
            // The segment is back in the table, unchanged, and the failure recorded. The old
            // block still fits `new` if it is aligned enough: keeping it is a valid shrink,
            // where an error would make `Vec::shrink_to_fit` abort the process.
            Err(_) if aligned => {
                return Ok(NonNull::slice_from_raw_parts(ptr, old_len));
            }
            Err(e) => return Err(e),
        };
        if segment.len() < old_len {
            Counters::sub(
                &self.counters.mapped_bytes,
                (old_len - segment.len()) as u64,
            );
            Counters::add(&self.counters.shrinks, 1);
        }
        Ok(self.keep(segment))
    }

    /// # Safety
    /// The [`Allocator::deallocate`] contract.
    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() == 0 {
            return;
        }
        if self.tier.contains(ptr) {
            // SAFETY: a block of the tier (it lies in its range), currently allocated (caller),
            // not used again.
            unsafe { self.tier.deallocate(ptr, fork::epoch()) };
            return;
        }
        // (A block below the heap threshold is most likely a heap block: not looked up twice.)
        if layout.size() >= self.settings.heap_threshold && self.offer_to_slot(ptr) {
            return;
        }
        match self.table.take(ptr.as_ptr().addr()) {
            Some(segment) => {
                self.forget(&segment);
                self.release(segment);
            }
            None if self.settings.heap_threshold > 0 => {
                // SAFETY: not a segment, so a heap block currently allocated with `layout`.
                unsafe { Global.deallocate(ptr, layout) };
                Counters::sub(&self.counters.heap_allocations, 1);
            }
            // A pointer we never handed out: a caller bug. Freeing nothing is the only safe move.
            None => debug_assert!(false, "deallocate of a block this allocator does not own"),
        }
    }
}

// SAFETY: the `Allocator` contract, point by point, for each kind of block:
// 1. Blocks stay valid until deallocated.
//    - A segment's block is a mapping owned by a `Segment` that lives in `Inner::table` until
//      `deallocate` (a reused segment may be mapped longer than the block reported).
//    - A small block is a slot of a chunk of `Inner::tier`; the chunk stays mapped while its
//      bitmap counts the slot live (a slot in a thread's cache still counts), and a slot is
//      handed out only while it is free in that bitmap (see `arena`).
//    - A heap block is owned by `Global`.
//    `Inner` is shared by all clones through an `Arc`, so cloning or moving the allocator
//    invalidates nothing.
// 2. Any clone can free or resize any block: all clones see the same table and tier.
// 3. Returned blocks fit their layout: a segment is at least `layout.size()` bytes (page
//    rounded) at an address aligned to `layout.align()` (page alignment, or an aligned
//    reservation above it, see `segment::map_aligned`); a small block is its size class's
//    length (at least the size) at `chunk base + i * class size`, chunks being 4 MiB aligned and
//    the class a multiple of the alignment (`arena::class`); zero-size requests get an aligned
//    dangling pointer and never reach the OS.
// 4. On a failed grow or shrink the old block is unchanged: a segment is put back untouched
//    (`Segment::resize`), and a move to a new block frees the old one only after the copy.
unsafe impl Allocator for MmapAllocator {
    #[inline]
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        self.inner.allocate(layout, false)
    }

    #[inline]
    fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        self.inner.allocate(layout, true)
    }

    #[inline]
    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: forwarded contract.
        unsafe { self.inner.deallocate(ptr, layout) }
    }

    #[inline]
    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old_layout: Layout,
        new_layout: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded contract.
        unsafe { self.inner.grow(ptr, old_layout, new_layout, false) }
    }

    #[inline]
    unsafe fn grow_zeroed(
        &self,
        ptr: NonNull<u8>,
        old_layout: Layout,
        new_layout: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded contract.
        unsafe { self.inner.grow(ptr, old_layout, new_layout, true) }
    }

    #[inline]
    unsafe fn shrink(
        &self,
        ptr: NonNull<u8>,
        old_layout: Layout,
        new_layout: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded contract.
        unsafe { self.inner.shrink(ptr, old_layout, new_layout) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allocator() -> MmapAllocator {
        MmapAllocator::default()
    }

    #[test]
    fn mapped_len_rounds_to_pages_and_refuses_overflow() {
        let inner = &allocator().inner;
        let page = sys::page_size();
        assert_eq!(inner.mapped_len(1).ok(), Some(page));
        assert_eq!(inner.mapped_len(page).ok(), Some(page));
        assert_eq!(inner.mapped_len(page + 1).ok(), Some(2 * page));
        for size in [usize::MAX, usize::MAX - page + 2, MAX_MAPPING + 1] {
            let failure = inner.mapped_len(size).expect_err("must be refused");
            assert_eq!(failure.cause, FailureCause::TooLarge);
        }
    }

    #[test]
    fn huge_pages_round_and_align_large_segments_only() {
        let alloc = Builder::new().huge_pages(true).build().unwrap();
        let inner = &alloc.inner;
        let huge = segment::HUGE_PAGE;
        assert_eq!(inner.mapped_len(huge + 1).ok(), Some(2 * huge));
        assert_eq!(inner.mapped_len(10).ok(), Some(sys::page_size()));
        assert_eq!(inner.segment_align(8, huge), huge);
        assert_eq!(inner.segment_align(8, sys::page_size()), 8);
    }

    #[test]
    fn dangling_is_aligned_and_empty() {
        for shift in 0..30 {
            let block = dangling(1 << shift);
            assert_eq!(block.len(), 0);
            assert_eq!(block.cast::<u8>().as_ptr().addr(), 1 << shift);
        }
    }
}
