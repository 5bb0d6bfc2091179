//! The small-block tier: blocks of up to [`MAX_SMALL`] bytes carved out of shared chunk files.
//!
//! A segment (one file, one mapping per block) is slow for small blocks and runs into the
//! process's limits on mappings (`vm.max_map_count`, about 65k) and descriptors. This tier maps
//! [`CHUNK`]-byte files instead and hands out their blocks by size class.
//!
//! # Design
//! * **Regions** ([`region`]). The tier reserves address space (`PROT_NONE`, `MAP_NORESERVE`:
//!   no memory, no disk) in regions aligned to `CHUNK`, as it needs them: 1 GiB first, then
//!   doubling, up to [`REGION`] in all. Chunks are mapped `MAP_FIXED` over the reservation, so
//!   whether a pointer is ours is a comparison per region (usually one:
//!   [`SmallTier::contains`]), and its chunk is one division. A region with no chunk left is
//!   given back at `trim`.
//! * **Chunk table.** A heap array from chunk index to the chunk's metadata ([`ChunkMeta`]):
//!   freeing finds the chunk without a lock or a search.
//! * **Size classes** ([`class`]): 16-byte steps to 128, then four per power of two. One chunk
//!   serves one class at a time; a chunk that empties can serve another class later.
//! * **Shards.** [`SHARDS`] mutexes; a thread sticks to one (picked round-robin at its first
//!   allocation), which holds per class the chunk being filled and the chunks with free blocks.
//!   A free goes to the shard owning the block's chunk.
//! * **No descriptors.** A chunk's file is unlinked and its descriptor closed once mapped: the
//!   mapping keeps the file alive. A million small blocks need a few hundred mappings and no
//!   descriptor at all.
//!
//! # Why classes of our own, not dlmalloc, rlsf or talc
//! Those manage a region handed to them, but are single-threaded (or one lock) and keep their
//! metadata *in band*, in headers and free lists inside the memory they manage. Here every bit
//! of metadata is private heap memory, out of band:
//! 1. freed memory, and memory whose file blocks were given back, is never written by the
//!    allocator (a free-list link would fault pages back in, or refill a punched hole);
//! 2. after `fork`, chunk pages are shared with the child (`MAP_SHARED`): in-band metadata
//!    would be one heap written by two processes. Private metadata is copied by `fork` like
//!    the rest of the heap, so each process only ever writes its own;
//! 3. finding a block's owner is O(1) from its address (the chunk table), with no header.
//!
//! # Fork
//! Every allocation and free takes the caller's fork *epoch*, a counter bumped in parent and
//! child at every fork. A chunk records the epoch in which it got its class. After a fork both
//! processes see the pre-fork chunks' pages, so neither may hand out space from them: a shard
//! locked in a newer epoch forgets its lists, and those chunks are *closed*. A block of a closed
//! chunk is freed by counting it (no bitmap, no shard lock); the last one releases the chunk's
//! view. The chunk table and counts are private memory copied by `fork`: each process counts
//! (and releases) its own live blocks. Empty chunks kept from an older epoch are released, not
//! reused.
//!
//! The fork handlers should call [`SmallTier::observe_epoch`] with the new epoch while they
//! hold the tier's mutexes: every shard locked afterwards then sees it, even for a caller that
//! read the epoch just before the fork.

mod chunk;
mod class;

/// The block size of every size class, smallest first (part of a store's format).
pub(crate) fn class_sizes() -> impl Iterator<Item = usize> {
    (0..class::COUNT).map(class::block_size)
}
mod region;
mod saved;
pub(crate) use saved::check_saved;
mod shard;
mod tcache;

use std::fmt;
use std::fs::File;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use allocator_api2::alloc::Layout;

use crate::creator::SegmentCreator;
use crate::fork;
use crate::segment;
use crate::sys;

pub(crate) use chunk::Backing;
use chunk::{ChunkMeta, Taken};
use shard::Shard;

/// The size and alignment of a chunk.
pub(crate) const CHUNK: usize = 4 << 20;
/// The largest block the tier serves.
pub(crate) const MAX_SMALL: usize = 512 << 10;
/// The address space reserved for chunks at most, in all regions.
#[cfg(target_pointer_width = "64")]
pub(crate) const REGION: usize = 64 << 30;
/// 32-bit targets: a region that fits.
#[cfg(not(target_pointer_width = "64"))]
pub(crate) const REGION: usize = 256 << 20;
/// How many chunks the regions hold at most.
const CHUNKS: usize = REGION / CHUNK;
/// Mutexes that threads spread over.
const SHARDS: usize = 8;

const _: () = assert!(CHUNKS <= u32::MAX as usize);

/// The settings the router gives the tier.
#[derive(Clone, Copy, Debug)]
pub(crate) struct TierConfig {
    /// The largest size served (at most [`MAX_SMALL`]); larger blocks go to segments.
    pub(crate) threshold: usize,
    /// Give chunk files their disk blocks up front (`fallocate`), as for segments.
    pub(crate) reserve_disk: bool,
    /// Keep chunks out of fork children (`MADV_DONTFORK`), as for segments.
    pub(crate) dont_fork: bool,
    /// Empty chunks kept for reuse rather than released (per tier), where a chunk's pieces
    /// cannot be given back one by one ([`Backing::Whole`]). Elsewhere an emptied chunk keeps
    /// only its first pieces backed, and up to [`KEPT_EMPTY`] are kept.
    pub(crate) retain_empty: usize,
    /// The most address space the region may take ([`REGION`] unless a test wants less).
    pub(crate) max_region: usize,
    /// Threads keep freed blocks of small classes for their next allocations (see `tcache`).
    pub(crate) thread_cache: bool,
}

impl Default for TierConfig {
    fn default() -> Self {
        TierConfig {
            threshold: MAX_SMALL,
            reserve_disk: true,
            dont_fork: false,
            retain_empty: 2,
            max_region: REGION,
            thread_cache: true,
        }
    }
}

/// A snapshot of the tier's counters. Bytes are counted by this process (see the module docs
/// on fork).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct TierStats {
    /// Bytes of chunk files backed by disk blocks now (see `chunk::Backing`).
    pub(crate) arena_bytes: u64,
    /// Bytes of chunk views mapped now (`CHUNK` each, backed or not).
    pub(crate) mapped_bytes: u64,
    /// Bytes of live blocks, each counted at its class's size.
    pub(crate) in_use_bytes: u64,
    /// `arena_bytes - in_use_bytes`: free blocks, empty kept chunks, and chunk tails too small
    /// for a block.
    pub(crate) free_bytes: u64,
    /// Bytes of chunk files given back (chunks released, and pieces of mapped chunks), since
    /// the tier was made.
    pub(crate) returned_bytes: u64,
    /// Chunk files created since the tier was made.
    pub(crate) chunks_created: u64,
    /// Chunk views released since the tier was made.
    pub(crate) chunks_released: u64,
}

#[derive(Debug, Default)]
struct Counters {
    arena_bytes: AtomicU64,
    mapped_bytes: AtomicU64,
    returned_bytes: AtomicU64,
    chunks_created: AtomicU64,
    chunks_released: AtomicU64,
}

/// The small-block tier of one allocator (and its clones).
///
/// Its mutexes, which the fork handlers must hold around `fork`, are exactly `shards` and
/// `spare`; they are always taken in that order (a shard, then `spare`), never the other way.
pub(crate) struct SmallTier {
    config: TierConfig,
    /// How chunks get disk blocks, decided when the tier is made.
    backing: Backing,
    /// Where chunks live. Grown and shrunk under `spare`.
    regions: region::Regions,
    /// A region could not be reserved: until this time (`sys::coarse_millis`), the tier
    /// makes no new region (small blocks that need one go to segments). 0: no refusal.
    region_retry_at: AtomicU64,
    /// Chunks lost (see `ChunkMeta::is_lost`) or being mapped now (marked lost until the map
    /// succeeds: a failing map may leave a gap that another mapping fills before the chunk is
    /// known lost). Not zero: `contains` must look closer.
    suspects: AtomicUsize,
    /// Chunk index -> metadata, null until the index is first used. Made with the first
    /// region, as long as the regions may grow.
    table: OnceLock<Box<[AtomicPtr<ChunkMeta>]>>,
    shards: Box<[PaddedShard]>,
    /// Chunk indices to reuse and empty chunks kept, shared by all shards.
    spare: Mutex<Spare>,
    /// The newest fork epoch seen (see [`SmallTier::observe_epoch`]).
    epoch: AtomicU64,
    /// Requests to the threads' caches to give their blocks back (see `tcache`), counted.
    flushes: AtomicU64,
    /// `chunks_created` when the last new chunk asked the caches back (see `allocate`).
    flushed_at_chunk: AtomicU64,
    /// Backed bytes that empty kept chunks keep past their first pieces (see `keep_empty`).
    idle_excess: AtomicU64,
    counters: Counters,
    /// This tier's identity for the threads' caches (never reused, unlike an address).
    id: u64,
    /// A store's tier: its chunk file (chunk *i* at offset *i* × `CHUNK`), and its region is
    /// part of the store's range (see [`SmallTier::in_store`]).
    store_file: Option<File>,
    /// A store's tier: the file it is saved in (see `saved::reserve_slot`).
    store_meta: Option<File>,
    /// A writer's store tier: tracks the writes to its chunks' private views (see
    /// `store::commit`).
    tracker: Option<Arc<sys::WriteTracker>>,
    /// The bytes each thread's cache of this tier holds (see `tcache`).
    caches: Mutex<Vec<Arc<AtomicU64>>>,
}

/// A shard's mutex on cache lines of its own: two threads locking their two shards must not
/// write one line.
#[derive(Debug)]
#[repr(align(128))]
struct PaddedShard(Mutex<Shard>);

/// What the shards share: where new chunks go, and empty chunks to reuse.
#[derive(Debug, Default)]
struct Spare {
    /// Indices from here on were never used.
    next: u32,
    /// Indices whose chunk was released: no view, a meta to reuse.
    free: Vec<u32>,
    /// Chunks with no live block, still mapped (see `SmallTier::max_kept_empty`).
    empty: Vec<u32>,
    /// A writer's store tier: indices released since the last commit, whose file range still
    /// holds the last commit's blocks (see `store::commit`).
    pending: Vec<u32>,
    /// Indices released before the last commit: free in it, but the log may still hold pages
    /// of theirs that a replay would write: reusable (and punched) after the next checkpoint
    /// ([`SmallTier::after_checkpoint`]).
    pending_checkpoint: Vec<u32>,
    /// A writer's store tier: indices mapped since the last commit (their range was punched
    /// to zeros first), whose pages the next commit writes in place, not to the log.
    fresh: Vec<u32>,
}

impl SmallTier {
    /// A tier with nothing reserved yet: the region is made at the first allocation.
    pub(crate) fn new(config: TierConfig) -> SmallTier {
        debug_assert!(config.threshold <= MAX_SMALL);
        let backing = if !config.reserve_disk {
            Backing::Sparse
        } else if sys::can_back_pages() {
            Backing::Pieces
        } else {
            Backing::Whole
        };
        SmallTier {
            config,
            backing,
            regions: region::Regions::default(),
            region_retry_at: AtomicU64::new(0),
            suspects: AtomicUsize::new(0),
            table: OnceLock::new(),
            shards: (0..SHARDS)
                .map(|_| PaddedShard(Mutex::new(Shard::new())))
                .collect(),
            spare: Mutex::new(Spare::default()),
            epoch: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            flushed_at_chunk: AtomicU64::new(0),
            idle_excess: AtomicU64::new(0),
            counters: Counters::default(),
            id: {
                static NEXT_ID: AtomicU64 = AtomicU64::new(1);
                NEXT_ID.fetch_add(1, Ordering::Relaxed)
            },
            caches: Mutex::new(Vec::new()),
            store_file: None,
            store_meta: None,
            tracker: None,
        }
    }

    /// A tier whose chunks get their disk as `backing` says, whatever the system offers.
    #[cfg(test)]
    pub(crate) fn with_backing(config: TierConfig, backing: Backing) -> SmallTier {
        let mut tier = SmallTier::new(config);
        tier.backing = backing;
        tier
    }

    /// The tier of a persistent store: its region is `[base, base + len)` (part of the
    /// store's range, reserved by the store, `CHUNK`-aligned), its chunks are ranges of `file`,
    /// and no thread caches its blocks (a cached block would be kept as live in the store).
    /// At a fork its chunks are sealed, not closed (see `Shard::enter`): a child maps them
    /// privately from the file, so their blocks are never handed out again, nor their pieces
    /// punched, in this process; their bitmaps stay, and are saved.
    ///
    /// `meta` is the file the tier is saved in ([`save`](Self::save)): each new chunk reserves
    /// its part of it.
    ///
    /// With `private` (a writer's store, see `store::commit`) the chunks are private views of
    /// the file, backed piece by piece with `fallocate` ([`Backing::FilePieces`]), nothing of
    /// the file is punched or reused until a commit no longer needs it, and the writes to each
    /// view are tracked by `tracker` (if any).
    pub(crate) fn in_store(
        config: TierConfig,
        base: NonNull<u8>,
        len: usize,
        file: File,
        meta: File,
        private: bool,
        tracker: Option<Arc<sys::WriteTracker>>,
    ) -> Self {
        debug_assert!(base.as_ptr().addr().is_multiple_of(CHUNK) && len.is_multiple_of(CHUNK));
        let mut tier = SmallTier::new(TierConfig {
            thread_cache: false,
            ..config
        });
        let table = (0..len / CHUNK)
            .map(|_| AtomicPtr::new(std::ptr::null_mut()))
            .collect();
        let _ = tier.table.set(table);
        let pushed = tier.regions.push(base, len);
        debug_assert!(pushed, "a new tier has room for a region");
        // A store's chunks get disk piece by piece, as blocks are handed out, where the file
        // system reserves a block at a write fault (so a full disk is an allocation error):
        // a small store costs about its data, not a 4 MiB chunk per size class. Elsewhere
        // each chunk's file range is reserved whole.
        tier.backing = if private {
            Backing::FilePieces
        } else if tier.backing == Backing::Pieces && sys::faults_reserve_blocks(&file) {
            Backing::Pieces
        } else {
            Backing::Whole
        };
        tier.store_file = Some(file);
        tier.store_meta = Some(meta);
        tier.tracker = tracker;
        tier
    }

    /// A chunk just mapped at `index`: its writes are tracked from now (a writer's store).
    pub(super) fn track(&self, index: u32) {
        if let Some(tracker) = &self.tracker {
            // SAFETY: the chunk's view, just mapped by us.
            unsafe { tracker.track(self.chunk_at(index), CHUNK) };
        }
    }

    fn lock_caches(&self) -> MutexGuard<'_, Vec<Arc<AtomicU64>>> {
        // Pushes and removals only: a poisoned lock is consistent.
        self.caches.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lists a thread's cache total, for [`stats`](Self::stats).
    fn register_cache(&self, cached: &Arc<AtomicU64>) {
        self.lock_caches().push(Arc::clone(cached));
    }

    fn unregister_cache(&self, cached: &Arc<AtomicU64>) {
        self.lock_caches().retain(|c| !Arc::ptr_eq(c, cached));
    }

    /// Gives back a block of `class` that a thread's cache held (see `tcache`).
    ///
    /// # Safety
    /// As for [`deallocate`](Self::deallocate); `class` is the block's class.
    unsafe fn free_uncached(&self, ptr: NonNull<u8>, class: usize) {
        debug_assert_eq!(self.meta(self.index_of(ptr)).class(), class);
        // SAFETY: forwarded.
        unsafe { self.free_to_shard(ptr, self.epoch.load(Ordering::Acquire)) };
    }

    /// Asks every thread's cache of this tier to give its blocks back at its next use (see
    /// `tcache`).
    fn request_flush(&self) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// Whether a new chunk is to ask the caches back first: once per [`FLUSH_EVERY_CHUNKS`]
    /// new chunks. Not at every one: a thread whose few classes each need a chunk would give
    /// its cached blocks back, let another class take the emptied chunk, and do so again at
    /// every change of class (a `Vec` pushed to 100 elements went 5 times slower than `std`).
    fn flush_before_new_chunk(&self) -> bool {
        let created = self.counters.chunks_created.load(Ordering::Relaxed);
        let last = self.flushed_at_chunk.load(Ordering::Relaxed);
        created >= last + FLUSH_EVERY_CHUNKS
            && self
                .flushed_at_chunk
                .compare_exchange(last, created, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
    }

    /// The flush requests made so far.
    fn flush_requests(&self) -> u64 {
        self.flushes.load(Ordering::Relaxed)
    }

    /// Gives back what the tier keeps for reuse: this thread's cached blocks, the empty chunks
    /// kept, the shards' empty current chunks, and the disk of every piece of a chunk that no
    /// live block uses (blocks in other threads' caches count as live: those caches are asked
    /// to give their blocks back at their next use), and the regions with no chunk left.
    /// Returns whether anything was given back.
    pub(crate) fn trim(&self) -> bool {
        if self.regions.count() == 0 {
            return false;
        }
        self.request_flush();
        tcache::flush(self);
        let before = self.counters.returned_bytes.load(Ordering::Relaxed);
        for home in 0..SHARDS {
            let mut shard = self.lock_shard(home);
            let idle = shard.take_idle_currents();
            if !idle.is_empty() {
                // Under the shard lock, then `spare`: the order.
                let mut spare = self.lock_spare();
                idle.into_iter()
                    .for_each(|index| self.release(&mut spare, index));
            }
            if self.backing.can_discard() {
                for (&index, blocks) in &shard.chunks {
                    // Open chunks of the current epoch: no other process maps them.
                    self.discard(index, !blocks.used_pieces());
                }
            }
        }
        let mut spare = self.lock_spare();
        while let Some(index) = spare.empty.pop() {
            self.release(&mut spare, index);
        }
        let regions = self.give_back_regions(&mut spare);
        drop(spare);
        log_deferred();
        regions || self.counters.returned_bytes.load(Ordering::Relaxed) > before
    }

    /// Gives back the newest regions while they hold no chunk: address space that a
    /// `RLIMIT_AS` set since may need (the reservation counts in `VmSize`). A store's region is
    /// the store's and stays.
    fn give_back_regions(&self, spare: &mut Spare) -> bool {
        let mut any = false;
        if self.store_file.is_some() {
            return any;
        }
        while let Some((_, first, chunks)) = self.regions.iter().last() {
            let unused = (first..first + chunks).all(|index| {
                let ptr = self.table()[index].load(Ordering::Acquire);
                // SAFETY: as in `meta`: a non-null entry is a leaked `Box<ChunkMeta>`.
                unsafe { ptr.as_ref() }.is_none_or(|meta| !meta.is_lost() && !meta.is_mapped())
            });
            if !unused {
                return any;
            }
            let Some((base, first, chunks)) = self.regions.pop() else {
                return any;
            };
            any = true;
            spare.free.retain(|&index| (index as usize) < first);
            spare.next = spare.next.min(first as u32);
            // SAFETY: the region was ours (reserved by `grow_regions`), holds no chunk, and
            // is no longer published: no pointer into it is ours, and none is handed out.
            if let Err(e) = unsafe { sys::unmap(base, chunks * CHUNK) } {
                log_later(format!("mmapvec: giving back a small-block region: {e}"));
            }
        }
        any
    }

    /// Gives back the backed pieces of `which` of chunk `index`, which the caller holds and
    /// whose blocks do not overlap `which`. Failures are logged later (see [`log_later`]).
    fn discard(&self, index: u32, which: u64) {
        debug_assert!(self.backing.can_discard());
        let meta = self.meta(index);
        if meta.backed() & which == 0 || meta.is_whole() {
            return;
        }
        // Whatever it kept past its first pieces leaves the budget (and mostly goes here).
        self.unidle(meta);
        // SAFETY: the chunk is mapped (held by the caller: open in a locked shard, or out of
        // every list), and the caller says no live block lies on `which`.
        let (bytes, result) = unsafe { meta.discard(self.chunk_at(index), which) };
        let c = &self.counters;
        c.arena_bytes.fetch_sub(bytes, Ordering::Relaxed);
        c.returned_bytes.fetch_add(bytes, Ordering::Relaxed);
        if let Err(e) = result {
            log_later(format!(
                "mmapvec: giving back a small-block chunk's pages: {e}"
            ));
        }
    }

    /// Gives back the pieces of chunk `index` (open in a shard the caller holds locked, with
    /// bitmap `blocks`) under no live block, if its live blocks fill less than a quarter of
    /// its backed pieces. The bitmap is scanned again only once the live blocks have halved
    /// since (`Blocks::scavenge_below`): a chunk emptying block by block is scanned a
    /// logarithmic number of times. So the pieces a chunk holds follow its live blocks down,
    /// even while a few of them (cached by a thread, say) keep it from emptying.
    fn scavenge(&self, index: u32, blocks: &mut chunk::Blocks) {
        let backed = self.meta(index).backed().count_ones() as usize * chunk::PIECE;
        let live = blocks.live() * class::block_size(blocks.class());
        if backed > chunk::KEPT_WHEN_EMPTY && live * 4 < backed {
            blocks.scavenge_below = blocks.live() / 2;
            // Not the pieces the chunk keeps even when empty.
            let kept = chunk::kept_when_empty(class::block_size(blocks.class()));
            self.discard(index, !blocks.used_pieces() & !kept);
        }
    }

    /// Whether emptied chunks like `meta`'s keep only their first pieces backed (so that many
    /// may be kept), rather than their whole files.
    fn keeps_pieces(&self, meta: &ChunkMeta) -> bool {
        self.backing.can_discard() && !meta.is_whole()
    }

    /// The empty current chunks a shard keeps at most, with `meta`'s emptied: every class's
    /// where emptied chunks keep only their first pieces backed, else a few.
    fn max_idle_current(&self, meta: &ChunkMeta) -> usize {
        if self.keeps_pieces(meta) {
            class::COUNT
        } else {
            MAX_IDLE_CURRENT_WHOLE
        }
    }

    /// The empty chunks kept in `spare` at most, with `meta`'s retired (as above).
    fn max_kept_empty(&self, meta: &ChunkMeta) -> usize {
        if self.keeps_pieces(meta) {
            KEPT_EMPTY
        } else {
            self.config.retain_empty
        }
    }

    /// Chunk `index` (held by the caller) has no live block and is kept. It keeps its first
    /// pieces backed; its other backed pieces stay too while the tier's empty chunks keep at
    /// most [`IDLE_EXCESS_BUDGET`] bytes past their first pieces (a loop that fills and empties
    /// the same chunks then backs and gives back nothing), and are given back otherwise.
    fn keep_empty(&self, index: u32) {
        if !self.backing.can_discard() {
            return;
        }
        let meta = self.meta(index);
        let kept = chunk::kept_when_empty(meta.block_size());
        let excess = (meta.backed() & !kept).count_ones() as u64 * chunk::PIECE as u64;
        if excess == 0 || meta.is_whole() {
            return;
        }
        let budget = self.idle_excess.fetch_add(excess, Ordering::Relaxed) + excess;
        if budget <= IDLE_EXCESS_BUDGET {
            meta.set_idle_excess(excess);
        } else {
            self.idle_excess.fetch_sub(excess, Ordering::Relaxed);
            self.discard(index, !kept);
        }
    }

    /// Chunk `index` is no longer an empty one kept (a block of it is handed out, or it is
    /// released or given back): what it kept past its first pieces leaves the budget.
    #[inline]
    fn unidle(&self, meta: &ChunkMeta) {
        let excess = meta.take_idle_excess();
        if excess != 0 {
            self.idle_excess.fetch_sub(excess, Ordering::Relaxed);
        }
    }

    /// Whether the tier takes `layout`: not empty, at most the threshold, aligned to at most a
    /// page.
    pub(crate) fn serves(&self, layout: Layout) -> bool {
        layout.size() > 0
            && layout.size() <= self.config.threshold
            && layout.align() <= class::MAX_ALIGN
    }

    /// Records that fork epoch `epoch` has begun (if newer than any seen). The fork handlers
    /// call it while holding every tier mutex, so that no shard is used in the old epoch
    /// afterwards; allocation and free call it with the epoch they are given.
    pub(crate) fn observe_epoch(&self, epoch: u64) -> u64 {
        let seen = self.epoch.load(Ordering::Acquire);
        if epoch > seen {
            self.epoch.fetch_max(epoch, Ordering::AcqRel).max(epoch)
        } else {
            seen
        }
    }

    /// A block for `layout` (which [`serves`](Self::serves) must accept, threshold aside), of
    /// its class's size, aligned to `layout.align()`, zeroed if asked. `epoch` is the current
    /// fork epoch. Fails when no chunk can be made (creator, disk, or the region is full).
    pub(crate) fn allocate(
        &self,
        layout: Layout,
        zeroed: bool,
        epoch: u64,
        creator: &dyn SegmentCreator,
    ) -> io::Result<NonNull<[u8]>> {
        let class = class::class_for(layout).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                "layout not served by the small-block tier",
            )
        })?;
        let epoch = self.observe_epoch(epoch);
        let block_size = class::block_size(class);
        if self.config.thread_cache
            && class < tcache::CLASSES
            && let Some(ptr) = tcache::pop(self, class, epoch)
        {
            if zeroed {
                // SAFETY: a cached block is a whole block of its class, freed by its last
                // user and handed to this caller alone.
                unsafe { ptr.write_bytes(0, block_size) };
            }
            return Ok(NonNull::slice_from_raw_parts(ptr, block_size));
        }
        let block = self.allocate_from_shard(class, zeroed, creator);
        log_deferred();
        block
    }

    /// A block of `class` from this thread's shard (see [`allocate`](Self::allocate)).
    fn allocate_from_shard(
        &self,
        class: usize,
        zeroed: bool,
        creator: &dyn SegmentCreator,
    ) -> io::Result<NonNull<[u8]>> {
        let home = home_shard();
        let mut flushed = false;
        loop {
            let mut shard = self.lock_shard(home);
            // A block counts as live (in the bitmap, and in bytes) under the lock: a free of
            // the chunk's other blocks must not see it empty while this block is on its way.
            if let Some((index, taken)) = shard.take(class) {
                return self.hand_out(shard, index, taken, zeroed);
            }
            let idle = shard.take_idle_current(class);
            let kept = || {
                self.take_retained(shard.epoch)
                    .or_else(|| self.steal_idle_current(home, shard.epoch))
            };
            if let Some(index) = idle.or_else(kept) {
                self.meta(index).assign(class, shard.epoch, home);
                let taken = shard.install(index, class, false);
                return self.hand_out(shard, index, taken, zeroed);
            }
            // Make the file outside the shard lock: it is slow, and the creator is user code.
            let epoch = shard.epoch;
            drop(shard);
            if !flushed && self.flush_before_new_chunk() {
                // Before new chunks, the free blocks that threads' caches hold go back to
                // their chunks: this thread's now (then look again), the others' at their next
                // use. Cached blocks must not keep chunks while many new ones are made.
                flushed = true;
                self.request_flush();
                if tcache::flush(self) {
                    continue;
                }
            }
            let index = self.new_chunk(creator)?;
            let mut shard = self.lock_shard(home);
            if shard.epoch != epoch {
                // A fork came in between: the chunk may be shared with a child. Drop it.
                drop(shard);
                self.release_to_spare(index);
                continue;
            }
            self.meta(index).assign(class, epoch, home);
            // Another thread of this shard may have installed a chunk of this class meanwhile
            // (and freed its blocks since): that one serves, and the new one is kept empty.
            // Installing over it would leave it in no list (the review of issue 18).
            if let Some((other, taken)) = shard.take(class) {
                let block = self.hand_out(shard, other, taken, zeroed);
                self.retire(index, epoch);
                return block;
            }
            let taken = shard.install(index, class, true);
            return self.hand_out(shard, index, taken, zeroed);
        }
    }

    /// Whether the block at `ptr` may be resized in place: its chunk got its class in the
    /// current fork epoch `epoch` (pre-fork chunks are shared with a child: see the module doc).
    ///
    /// # Safety
    /// As for [`block_len`](Self::block_len).
    pub(crate) unsafe fn is_current(&self, ptr: NonNull<u8>, epoch: u64) -> bool {
        self.meta(self.index_of(ptr)).epoch() == self.observe_epoch(epoch)
    }

    /// The block size `layout` would get (if the tier serves it).
    pub(crate) fn class_len(&self, layout: Layout) -> Option<usize> {
        class::class_for(layout).map(class::block_size)
    }

    /// Whether `ptr` lies in one of the tier's chunks (and so came from
    /// [`allocate`](Self::allocate), if it was allocated at all): in the region, and not in the
    /// range of a lost chunk, where another mapping (a segment, say) may have been placed.
    pub(crate) fn contains(&self, ptr: NonNull<u8>) -> bool {
        let Some(index) = self.regions.locate(ptr.as_ptr().addr()) else {
            return false;
        };
        // Rare: only after a chunk failed to map and its range could not be kept.
        self.suspects.load(Ordering::Acquire) == 0 || !self.lost(index)
    }

    /// Whether chunk `index` was lost (an index never used is not).
    fn lost(&self, index: u32) -> bool {
        let ptr = self.table()[index as usize].load(Ordering::Acquire);
        // SAFETY: as in `meta`: a non-null entry is a leaked `Box<ChunkMeta>`.
        unsafe { ptr.as_ref() }.is_some_and(ChunkMeta::is_lost)
    }

    /// The length of the block at `ptr`, as returned by `allocate`.
    ///
    /// # Safety
    /// `ptr` must have been returned by [`allocate`](Self::allocate) of this tier and be
    /// currently allocated.
    pub(crate) unsafe fn block_len(&self, ptr: NonNull<u8>) -> usize {
        self.meta(self.index_of(ptr)).block_size()
    }

    /// Frees the block at `ptr`. `epoch` is the current fork epoch.
    ///
    /// # Safety
    /// `ptr` must have been returned by [`allocate`](Self::allocate) of this tier and be
    /// currently allocated; it is not used again.
    pub(crate) unsafe fn deallocate(self: &Arc<Self>, ptr: NonNull<u8>, epoch: u64) {
        let epoch = self.observe_epoch(epoch);
        let meta = self.meta(self.index_of(ptr));
        let class = meta.class();
        // Into this thread's cache, if it is a small class of a chunk of the current epoch.
        if self.config.thread_cache
            && class < tcache::CLASSES
            && meta.epoch() == epoch
            && tcache::push(self, class, epoch, ptr)
        {
            return;
        }
        // SAFETY: forwarded.
        unsafe { self.free_to_shard(ptr, epoch) };
    }

    /// Frees the block at `ptr` to its chunk's shard. `epoch` is the current fork epoch.
    ///
    /// # Safety
    /// As for [`deallocate`](Self::deallocate).
    unsafe fn free_to_shard(&self, ptr: NonNull<u8>, epoch: u64) {
        let index = self.index_of(ptr);
        let meta = self.meta(index);
        let block_size = meta.block_size();
        let offset = ptr.as_ptr().addr() - self.chunk_at(index).as_ptr().addr();
        debug_assert!(offset.is_multiple_of(block_size), "not a block start");
        let epoch = self.observe_epoch(epoch);
        // The chunk's shard does not change while the chunk has a live block (this one). Its
        // lock also brings it to the newest epoch, closing (and counting) older chunks.
        let mut guard = self.lock_shard(meta.shard());
        let shard = &mut *guard;
        shard.in_use -= block_size as u64;
        if meta.epoch() == epoch
            && shard.epoch == meta.epoch()
            && let Some(blocks) = shard.chunks.get_mut(&index)
        {
            let known = blocks.put(offset / block_size);
            debug_assert!(known, "double free of a small block");
            if !known {
                // Release builds: leave the count alone rather than corrupt it.
                return;
            }
            let lists = &mut shard.classes[meta.class()];
            if blocks.live() == 0 {
                let current = lists.current == Some(index);
                if current && shard.idle_currents < self.max_idle_current(meta) {
                    // The chunk being filled stays, empty: its blocks are handed out again
                    // at once (an allocate / free loop must not retire and reinstall it, or
                    // make a new file, every time). It keeps its first pieces backed; another
                    // class takes it before a new chunk is made, and `trim`, a fork or the
                    // tier's drop releases it.
                    shard.idle_currents += 1;
                    self.keep_empty(index);
                    drop(guard);
                    log_deferred();
                    return;
                }
                if current {
                    lists.current = None;
                }
                shard.chunks.remove(&index);
                drop(guard);
                self.retire(index, epoch);
                log_deferred();
            } else {
                if !blocks.listed && lists.current != Some(index) {
                    blocks.listed = true;
                    lists.partial.push(index);
                }
                if blocks.live() < blocks.scavenge_below && self.backing.can_discard() {
                    self.scavenge(index, blocks);
                    drop(guard);
                    log_deferred();
                }
            }
            return;
        }
        // A store's sealed chunk (older epoch): the block is free in its bitmap (which the
        // store saves), and the chunk stays as it is (see `Shard::enter`).
        if let Some(blocks) = shard.sealed.get_mut(&index) {
            let known = blocks.put(offset / block_size);
            debug_assert!(known, "double free of a small block");
            return;
        }
        // A closed chunk (older epoch): count only. Its count was recorded when it was
        // closed, under this shard's lock, which we hold.
        let last = meta.sub_live();
        drop(guard);
        if last {
            self.release_to_spare(index);
            log_deferred();
        }
    }

    /// The counters now.
    pub(crate) fn stats(&self) -> TierStats {
        let c = &self.counters;
        let arena_bytes = c.arena_bytes.load(Ordering::Relaxed);
        let counted: u64 = self
            .shards
            .iter()
            .map(|s| s.0.lock().unwrap_or_else(|e| e.into_inner()).in_use)
            .sum();
        // Blocks in threads' caches count as live for their chunks, not as in use.
        let cached: u64 = self
            .lock_caches()
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum();
        let in_use_bytes = counted.saturating_sub(cached);
        TierStats {
            arena_bytes,
            mapped_bytes: c.mapped_bytes.load(Ordering::Relaxed),
            in_use_bytes,
            free_bytes: arena_bytes.saturating_sub(in_use_bytes),
            returned_bytes: c.returned_bytes.load(Ordering::Relaxed),
            chunks_created: c.chunks_created.load(Ordering::Relaxed),
            chunks_released: c.chunks_released.load(Ordering::Relaxed),
        }
    }

    /// Locks shard `index` and brings it to the newest epoch seen. Reading the epoch under the
    /// lock is what makes [`observe_epoch`](Self::observe_epoch) in the fork handlers effective.
    fn lock_shard(&self, index: usize) -> MutexGuard<'_, Shard> {
        // Every change under the lock leaves the shard consistent (a panic can only come from a
        // failed debug assertion or allocation), so a poisoned lock is still usable.
        let mut shard = self.shards[index]
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let closed = shard.enter(
            self.epoch.load(Ordering::Acquire),
            self.store_file.is_some(),
        );
        if !closed.is_empty() {
            // From now on these chunks count their blocks in their metadata. Those with none (a
            // class's current chunk, kept open while empty) have no free left to release
            // them: release them now. Under the shard lock, then `spare`: the order.
            // Pieces under no live block go now: nobody hands out a closed chunk's blocks
            // again, in this process or in a child, so they stay unused in both (a child that
            // closes the same chunk gives back the same pieces).
            let mut spare = self.lock_spare();
            for (index, blocks) in closed {
                let live = blocks.live();
                self.meta(index).close(live);
                if live == 0 {
                    self.release(&mut spare, index);
                } else if self.backing.can_discard()
                    && !chunk::keeps_out_of_children(self.config.dont_fork)
                {
                    // (A child does not map `dont_fork` chunks: its ranges are reservations.)
                    self.discard(index, !blocks.used_pieces());
                }
            }
        }
        shard
    }

    fn lock_spare(&self) -> MutexGuard<'_, Spare> {
        // Pushes and pops only: a poisoned lock is consistent.
        self.spare.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Hands out the block `taken` of chunk `index`, just taken under the lock of `shard`:
    /// backs its pieces if they are not yet (under the lock: the chunk's pieces change only
    /// there), counts it live, and zeroes it if asked. If its pages cannot be backed (a full
    /// disk) the block goes back and the error is returned.
    fn hand_out(
        &self,
        mut shard: MutexGuard<'_, Shard>,
        index: u32,
        taken: Taken,
        zeroed: bool,
    ) -> io::Result<NonNull<[u8]>> {
        let meta = self.meta(index);
        self.unidle(meta);
        let block_size = meta.block_size();
        let (start, end) = (taken.index * block_size, (taken.index + 1) * block_size);
        let want = chunk::pieces(start, end);
        if meta.backed() & want != want {
            if let Err(e) = self.allocate_pieces(index, want & !meta.backed()) {
                shard.untake(index, taken.index);
                return Err(e);
            }
            // SAFETY: the chunk is open in the shard we hold locked, so it is mapped and ours.
            let (bytes, backed) = unsafe { meta.back(self.chunk_at(index), want, self.backing) };
            self.counters
                .arena_bytes
                .fetch_add(bytes, Ordering::Relaxed);
            if let Err(e) = backed {
                shard.untake(index, taken.index);
                return Err(e);
            }
        }
        shard.in_use += block_size as u64;
        drop(shard);
        let chunk = self.chunk_at(index);
        // SAFETY: `taken.index < CHUNK / block_size` (`Blocks` hands out no other), so the block
        // lies inside the chunk's CHUNK bytes.
        let ptr = unsafe { chunk.add(start) };
        if zeroed && !taken.zero {
            // SAFETY: the block is mapped read/write (its chunk is mapped while it has live
            // blocks) and was just handed to us alone.
            unsafe { ptr.write_bytes(0, block_size) };
        }
        Ok(NonNull::slice_from_raw_parts(ptr, block_size))
    }

    /// An empty current chunk of another shard's, if one of `epoch` is there and its shard is
    /// not busy (`try_lock`: the caller holds its own shard, `home`). Threads come and go
    /// (pools, short-lived workers) and land on shards in turn: a thread on a shard nobody
    /// used yet takes the chunks others left empty before it makes new files.
    fn steal_idle_current(&self, home: usize, epoch: u64) -> Option<u32> {
        (1..SHARDS).find_map(|step| {
            let other = (home + step) % SHARDS;
            let mut shard = self.shards[other].0.try_lock().ok()?;
            // A shard of an older epoch first has to close its chunks (`lock_shard`): not
            // here.
            if shard.epoch != epoch {
                return None;
            }
            shard.take_idle_current(class::COUNT)
        })
    }

    /// An empty chunk kept for reuse, if one of `epoch` is there. Kept chunks of an older epoch
    /// are released on the way.
    fn take_retained(&self, epoch: u64) -> Option<u32> {
        let mut spare = self.lock_spare();
        while let Some(index) = spare.empty.pop() {
            if self.meta(index).epoch() == epoch {
                return Some(index);
            }
            self.release(&mut spare, index);
        }
        None
    }

    /// Chunk `index` has just lost its last block (in epoch `epoch`): keep it for reuse (with
    /// its first pieces backed), or release it if enough are kept.
    fn retire(&self, index: u32, epoch: u64) {
        let mut spare = self.lock_spare();
        let meta = self.meta(index);
        if spare.empty.len() < self.max_kept_empty(meta) && meta.epoch() == epoch {
            self.keep_empty(index);
            spare.empty.push(index);
        } else {
            self.release(&mut spare, index);
        }
    }

    fn release_to_spare(&self, index: u32) {
        let mut spare = self.lock_spare();
        self.release(&mut spare, index);
    }

    /// Releases chunk `index` (no live block, held by the caller out of every list) and
    /// makes its index reusable. Failures are logged later (see [`log_later`]).
    fn release(&self, spare: &mut Spare, index: u32) {
        let meta = self.meta(index);
        self.unidle(meta);
        let backed = meta.backed().count_ones() as u64 * chunk::PIECE as u64;
        let c = &self.counters;
        c.arena_bytes.fetch_sub(backed, Ordering::Relaxed);
        c.mapped_bytes.fetch_sub(CHUNK as u64, Ordering::Relaxed);
        c.returned_bytes.fetch_add(backed, Ordering::Relaxed);
        c.chunks_released.fetch_add(1, Ordering::Relaxed);
        // Not ours while it is released: a refused release unmaps the view before it reserves
        // the range again, a gap another mapping can take (see `suspects`).
        meta.set_lost(true);
        self.suspects.fetch_add(1, Ordering::AcqRel);
        // SAFETY: the chunk's view is at `chunk_at(index)`, and it has no live block, so
        // nothing uses its memory again.
        let released = unsafe { meta.release(self.chunk_at(index), self.config.dont_fork) };
        if let Err(failure) = released {
            log_later(format!(
                "mmapvec: releasing a small-block chunk failed: {}",
                failure.error
            ));
            if !failure.range_kept {
                // The view is gone (its file and disk with it), but the range is not ours any
                // more: the chunk stays lost, never used again, `contains` says no, and no
                // drop unmaps it.
                return;
            }
        }
        meta.set_lost(false);
        self.suspects.fetch_sub(1, Ordering::AcqRel);
        if self.backing == Backing::FilePieces {
            // The file's range holds the last commit's blocks until a commit drops them.
            spare.pending.push(index);
            return;
        }
        if let Some(file) = &self.store_file
            && let Err(e) = sys::punch_hole(file, index as u64 * CHUNK as u64, CHUNK as u64)
        {
            log_later(format!("mmapvec: giving a store chunk's blocks back: {e}"));
        }
        spare.free.push(index);
    }

    /// [`Backing::FilePieces`]: gives the pieces `which` of chunk `index` their disk blocks in
    /// the chunk file, so that a commit writing them back never finds the disk full.
    fn allocate_pieces(&self, index: u32, which: u64) -> io::Result<()> {
        let (Some(file), Backing::FilePieces) = (&self.store_file, self.backing) else {
            return Ok(());
        };
        for (first, count) in chunk::runs(which) {
            let at = u64::from(index) * CHUNK as u64 + (first * chunk::PIECE) as u64;
            sys::allocate_blocks(file, at, (count * chunk::PIECE) as u64)?;
        }
        Ok(())
    }

    /// Maps a new chunk file at a free index (reserving the region first if needed).
    fn new_chunk(&self, creator: &dyn SegmentCreator) -> io::Result<u32> {
        let index = {
            let mut spare = self.lock_spare();
            let index = match spare.free.pop() {
                Some(index) => index,
                None => {
                    if spare.next as usize == self.regions.chunks() {
                        self.grow_regions()?;
                    }
                    spare.next += 1;
                    spare.next - 1
                }
            };
            if let Some(meta) = &self.store_meta
                && let Err(e) = saved::reserve_slot(meta, self.table().len(), index as usize)
                    .and_then(|()| self.cover_chunk(index))
            {
                spare.free.push(index);
                return Err(e);
            }
            if self.backing == Backing::FilePieces {
                // Punched by the mapping below: in no commit yet, written in place.
                spare.fresh.push(index);
            }
            // Marked while `spare` is held: `give_back_regions` (under `spare`) must never see
            // the index unused between its leaving `spare` and its mapping.
            let meta = self.meta_or_new(index);
            // Not ours while it is being mapped: see `suspects`.
            meta.set_lost(true);
            self.suspects.fetch_add(1, Ordering::AcqRel);
            index
        };
        let meta = self.meta(index);
        let cfg = &self.config;
        // SAFETY: the index was free: its range is part of our reservation (never mapped, or
        // put back by `release`) and nothing refers to it.
        let mapped = unsafe {
            meta.map(
                self.chunk_at(index),
                self.source(index, creator),
                self.backing,
                cfg.dont_fork,
            )
        };
        if let Err(failure) = mapped {
            // An index whose reservation may be gone is never used again: MAP_FIXED there
            // could replace someone else's mapping, and a pointer there is not ours.
            if failure.range_kept {
                let mut spare = self.lock_spare();
                meta.set_lost(false);
                self.suspects.fetch_sub(1, Ordering::AcqRel);
                spare.free.push(index);
            }
            return Err(failure.error);
        }
        meta.set_lost(false);
        self.suspects.fetch_sub(1, Ordering::AcqRel);
        self.track(index);
        let backed = meta.backed().count_ones() as u64 * chunk::PIECE as u64;
        let c = &self.counters;
        c.arena_bytes.fetch_add(backed, Ordering::Relaxed);
        c.mapped_bytes.fetch_add(CHUNK as u64, Ordering::Relaxed);
        c.chunks_created.fetch_add(1, Ordering::Relaxed);
        Ok(index)
    }

    /// A store's tier backed by pieces: makes the chunk file long enough for chunk `index`
    /// (sparse: the pieces get their blocks as they are used). Called under `spare`, which
    /// serializes every extension, so that the file only ever grows.
    fn cover_chunk(&self, index: u32) -> io::Result<()> {
        let Some(file) = &self.store_file else {
            return Ok(());
        };
        if !self.backing.by_pieces() {
            return Ok(());
        }
        let end = (u64::from(index) + 1) * CHUNK as u64;
        if file.metadata()?.len() < end {
            file.set_len(end)?;
        }
        Ok(())
    }

    /// Where chunk `index` gets its file.
    fn source<'a>(&'a self, index: u32, creator: &'a dyn SegmentCreator) -> chunk::Source<'a> {
        match &self.store_file {
            Some(file) => chunk::Source::Store {
                file,
                offset: index as u64 * CHUNK as u64,
            },
            None => chunk::Source::Creator(creator),
        }
    }

    /// Reserves one more region (and, with the first, the chunk table). Called under `spare`,
    /// which serializes it.
    fn grow_regions(&self) -> io::Result<()> {
        let retry_at = self.region_retry_at.load(Ordering::Relaxed);
        if retry_at != 0 && sys::coarse_millis() < retry_at {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "no address space for small blocks (refused less than a second ago)",
            ));
        }
        let grown = self.grow_regions_now();
        // Not asked again at every small allocation (each would read the limits again), but
        // again after a while: address space may have been freed, or the limit raised.
        let retry_at = match grown {
            Ok(()) => 0,
            Err(_) => sys::coarse_millis() + REGION_RETRY_MILLIS,
        };
        self.region_retry_at.store(retry_at, Ordering::Relaxed);
        grown
    }

    fn grow_regions_now(&self) -> io::Result<()> {
        let max = self.config.max_region.clamp(region::MIN_LEN, REGION);
        let reserved = self.regions.chunks() * CHUNK;
        if self.store_file.is_some()
            || reserved >= max
            || self.regions.count() == region::MAX_REGIONS
        {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                "the small-block regions are full",
            ));
        }
        // The next region, halving on refusal (some environments cap reservations: valgrind
        // refuses tens of GiB): reserving costs no memory, but what the tier reserves the rest
        // of the program cannot map, and `RLIMIT_AS` counts it.
        let mut len =
            region::next_len(reserved, max, sys::address_space_left()).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    "too little address space left under RLIMIT_AS for a small-block region",
                )
            })?;
        let base = loop {
            match segment::reserve_aligned(len, CHUNK) {
                Ok(base) => break base,
                Err(_) if len / 2 >= region::MIN_LEN => len /= 2,
                // Out of memory for the router, which then serves the block from a segment.
                Err(e) => {
                    return Err(io::Error::new(
                        io::ErrorKind::OutOfMemory,
                        format!("cannot reserve address space for small blocks: {e}"),
                    ));
                }
            }
        };
        if self.table.get().is_none() {
            let table = zeroed_table(max / CHUNK);
            // Under `spare` nobody else sets it; before the region is published, so a
            // published region implies it.
            let _ = self.table.set(table);
        }
        let pushed = self.regions.push(base, len);
        debug_assert!(pushed, "a slot was checked free above");
        Ok(())
    }

    fn table(&self) -> &[AtomicPtr<ChunkMeta>] {
        self.table.get().map_or(&[], |t| t)
    }

    /// The start of chunk `index`, which a region holds.
    fn chunk_at(&self, index: u32) -> NonNull<u8> {
        self.regions
            .chunk_at(index)
            .expect("a chunk index in use lies in a region")
    }

    /// The chunk index of `ptr`, which lies in a region.
    fn index_of(&self, ptr: NonNull<u8>) -> u32 {
        debug_assert!(self.contains(ptr));
        self.regions
            .locate(ptr.as_ptr().addr())
            .expect("a small block lies in a region")
    }

    /// The metadata of chunk `index`, which has been used at least once.
    fn meta(&self, index: u32) -> &ChunkMeta {
        let ptr = self.table()[index as usize].load(Ordering::Acquire);
        // SAFETY: a non-null entry points to a `Box<ChunkMeta>` leaked by `meta_or_new`, freed
        // only when the tier drops (`&self` outlives no such drop).
        unsafe { ptr.as_ref() }.expect("chunk index in use has metadata")
    }

    /// The metadata of chunk `index`, made now if the index was never used. Only for an index
    /// the caller holds (fresh out of `spare`).
    fn meta_or_new(&self, index: u32) -> &ChunkMeta {
        let slot = &self.table()[index as usize];
        if slot.load(Ordering::Acquire).is_null() {
            slot.store(Box::into_raw(Box::new(ChunkMeta::new())), Ordering::Release);
        }
        self.meta(index)
    }
}

impl fmt::Debug for SmallTier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SmallTier")
            .field("config", &self.config)
            .field("regions", &self.regions.count())
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

impl fork::ForkLocks for SmallTier {
    /// Locks every mutex of the tier for a `fork` (shards in order, then `spare`: the order of
    /// their use; then the list of thread caches) and notes the epoch the fork begins, so no
    /// shard is used in the old one.
    fn lock_for_fork(&'static self, held: &mut Vec<Box<dyn std::any::Any>>, epoch: u64) {
        for PaddedShard(shard) in self.shards.iter() {
            held.push(Box::new(shard.lock().unwrap_or_else(|e| e.into_inner())));
        }
        held.push(Box::new(self.lock_spare()));
        held.push(Box::new(self.lock_caches()));
        self.observe_epoch(epoch);
    }
}

impl Drop for SmallTier {
    fn drop(&mut self) {
        // First, while every field is alive: a fork in progress may be holding our locks.
        // (Registered by the allocator that made the tier; unregistering an unknown object
        // does nothing.)
        fork::unregister(&*self);
        // Lost chunks, in increasing order. (Every chunk's metadata is taken back, even with
        // no region left: `trim` gives back regions, not the metadata of their chunks.)
        let mut lost = Vec::new();
        // `dont_fork` views leave the fork record together with the unmapping (see `fork`).
        let mut no_fork = chunk::keeps_out_of_children(self.config.dont_fork).then(fork::hold);
        for (index, slot) in self.table().iter().enumerate() {
            let ptr = slot.load(Ordering::Acquire);
            if ptr.is_null() {
                continue;
            }
            // SAFETY: a non-null entry is a leaked `Box<ChunkMeta>` (see `meta_or_new`),
            // taken back once here: the tier is going away.
            let meta = unsafe { Box::from_raw(ptr) };
            if meta.is_lost() {
                lost.push(index);
            }
            if let Some(views) = no_fork.as_mut()
                && meta.is_mapped()
            {
                views.remove(self.chunk_at(index as u32).as_ptr().addr());
            }
        }
        if self.store_file.is_some() {
            // The store unmaps its whole range, less `lost_ranges`.
            drop(no_fork);
            return;
        }
        // Each region is unmapped around lost chunks, whose ranges may hold other mappings now
        // (their remains of our reservation stay reserved: address space, no memory).
        let regions: Vec<_> = self.regions.iter().collect();
        for (base, first, chunks) in regions {
            let mut start = first;
            let inside = lost
                .iter()
                .copied()
                .filter(|&i| i >= first && i < first + chunks);
            for end in inside.chain([first + chunks]) {
                if end > start {
                    let at = (base + (start - first) * CHUNK) as *mut u8;
                    // SAFETY: `[start, end)` are chunks of our region that were never lost, so
                    // their ranges are ours; no block is live: every block is owned by a value
                    // holding a clone of the allocator, whose last clone is being dropped.
                    let unmapped =
                        NonNull::new(at).map(|at| unsafe { sys::unmap(at, (end - start) * CHUNK) });
                    if let Some(Err(e)) = unmapped {
                        // Drop must not panic; a failed munmap of our own range means a broken
                        // invariant.
                        crate::logging::report!(
                            error,
                            "mmapvec: munmap of the small-block region failed: {e}"
                        );
                    }
                }
                start = end + 1;
            }
        }
        drop(no_fork);
    }
}

/// Empty current chunks a shard keeps at most where a chunk's pieces cannot be given back
/// ([`Backing::Whole`]: each keeps its whole file reserved).
const MAX_IDLE_CURRENT_WHOLE: usize = 2;

/// Backed bytes that a tier's empty kept chunks keep at most past their first pieces (see
/// `SmallTier::keep_empty`).
const IDLE_EXCESS_BUDGET: u64 = 16 << 20;

/// Empty chunks kept for reuse at most where each keeps only its first pieces backed (one
/// mapping each, and at most a MiB of disk: see `chunk::kept_when_empty`).
const KEPT_EMPTY: usize = 64;

thread_local! {
    /// Messages of failures met while the tier's locks were held, logged once they are not:
    /// a logger may allocate, and through this very allocator.
    static DEFERRED_LOG: std::cell::RefCell<Vec<String>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Keeps `message` for [`log_deferred`].
fn log_later(message: String) {
    // During thread teardown the message is dropped: nothing else can be done with it.
    let _ = DEFERRED_LOG.try_with(|log| {
        if let Ok(mut log) = log.try_borrow_mut() {
            log.push(message);
        }
    });
}

/// Logs what [`log_later`] kept. Call with none of the tier's locks held.
fn log_deferred() {
    let pending = DEFERRED_LOG
        .try_with(|log| {
            log.try_borrow_mut()
                .map(|mut log| std::mem::take(&mut *log))
        })
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    for message in pending {
        crate::logging::report!(debug, "{message}");
    }
}

/// New chunks between two requests that the threads' caches give their blocks back (see
/// `SmallTier::flush_before_new_chunk`).
const FLUSH_EVERY_CHUNKS: u64 = 8;

/// How long the tier waits after its region was refused before it tries again.
const REGION_RETRY_MILLIS: u64 = 1000;

/// A chunk table of `len` null entries, in zeroed memory: a large table costs only the pages
/// its used entries are on (thousands of allocators each have one).
fn zeroed_table(len: usize) -> Box<[AtomicPtr<ChunkMeta>]> {
    let layout = std::alloc::Layout::array::<AtomicPtr<ChunkMeta>>(len).expect("a table's size");
    if layout.size() == 0 {
        return Box::new([]);
    }
    // SAFETY: the layout is not zero-sized.
    let ptr = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<AtomicPtr<ChunkMeta>>();
    if ptr.is_null() {
        std::alloc::handle_alloc_error(layout);
    }
    // SAFETY: `ptr` is a fresh allocation of the global allocator for `len` entries, with the
    // layout `Box` frees it with; all-zero bytes are a null `AtomicPtr`, a valid value.
    unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, len)) }
}

/// The shard this thread uses, picked at its first allocation: the one with the fewest live
/// threads (the lowest of those). A pool's threads spread over the shards, and threads that
/// come one after another (a thread per task) land on the shard the last one left, with its
/// chunks warm, instead of going round every shard and making chunks in each.
fn home_shard() -> usize {
    /// Live threads per shard.
    static LIVE: [AtomicUsize; SHARDS] = [const { AtomicUsize::new(0) }; SHARDS];
    /// This thread's shard; its drop (at thread exit) leaves the shard.
    struct Home(usize);
    impl Drop for Home {
        fn drop(&mut self) {
            LIVE[self.0].fetch_sub(1, Ordering::Relaxed);
        }
    }
    thread_local! {
        static HOME: Home = {
            let home = (0..SHARDS)
                .min_by_key(|&shard| LIVE[shard].load(Ordering::Relaxed))
                .unwrap_or(0);
            LIVE[home].fetch_add(1, Ordering::Relaxed);
            Home(home)
        };
    }
    // During thread teardown the thread-local may be gone: any shard will do.
    HOME.try_with(|home| home.0).unwrap_or(0)
}

#[cfg(test)]
mod tests;
