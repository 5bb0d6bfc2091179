//! One chunk: a [`CHUNK`]-byte file mapped `MAP_SHARED` at a fixed, chunk-aligned address of the
//! tier's region, and the private (heap) metadata that says which of its blocks are in use.
//!
//! The file's descriptor is closed as soon as the file is mapped: the mapping alone keeps the
//! unlinked file alive, so a chunk costs no descriptor. Releasing a chunk maps an inaccessible
//! reservation over its view, which drops the last reference to the file and frees its blocks.
//!
//! # Disk, piece by piece
//! A chunk's file is sparse. Its pages get disk blocks in [`PIECE`]s as blocks are handed out
//! ([`ChunkMeta::back`], `MADV_POPULATE_WRITE` through the mapping: a full disk is an error
//! there, never a `SIGBUS` later), and pieces under no live block can be given back
//! ([`ChunkMeta::discard`], `MADV_REMOVE`) while the chunk stays mapped. So a chunk costs the
//! disk its blocks use, not 4 MiB, and an emptied chunk can be kept for its class's next
//! blocks for the price of one mapping. Where pages cannot be backed that way ([`Backing`]),
//! the whole file is reserved when the chunk is made, as a segment is.

use std::fs::File;
use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use crate::creator::{SegmentCreator, SegmentRequest};
use crate::fork;
use crate::sys;

use super::CHUNK;
use super::class;

/// The unit in which a chunk's pages get and give back disk blocks: 64 per chunk, one bit each
/// of [`ChunkMeta::backed`].
pub(super) const PIECE: usize = CHUNK / 64;

/// How a tier's chunks get disk blocks for their pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Backing {
    /// Piece by piece as blocks are handed out (`MADV_POPULATE_WRITE`); given back piece by
    /// piece (`MADV_REMOVE`). Linux 5.14 and later.
    Pieces,
    /// The whole file when the chunk is made (`fallocate`), given back with the chunk only:
    /// a store's chunks, and systems without [`Pieces`](Backing::Pieces).
    Whole,
    /// Never reserved (`reserve_disk(false)`): a page gets its block when first written.
    /// Given back piece by piece where the system can.
    Sparse,
    /// A writer's store tier, whose views are private (see `store::commit`): piece by piece
    /// as blocks are handed out, by `fallocate` of the chunk file's range (a write fault makes
    /// a private copy, which reserves nothing), never given back while the store is open
    /// (the file's bytes are the last commit's).
    FilePieces,
}

impl Backing {
    /// Whether pieces of a mapped chunk can be given back ([`ChunkMeta::discard`]).
    pub(super) fn can_discard(self) -> bool {
        cfg!(target_os = "linux") && !matches!(self, Backing::Whole | Backing::FilePieces)
    }

    /// Whether chunks get their disk piece by piece, as blocks are handed out.
    pub(super) fn by_pieces(self) -> bool {
        matches!(self, Backing::Pieces | Backing::FilePieces)
    }
}

/// The pieces (one bit each) under the bytes `[start, end)` of a chunk (`start < end <= CHUNK`).
pub(super) fn pieces(start: usize, end: usize) -> u64 {
    debug_assert!(start < end && end <= CHUNK);
    let (first, last) = (start / PIECE, (end - 1) / PIECE);
    let run = last - first + 1;
    let ones = if run == 64 { u64::MAX } else { (1 << run) - 1 };
    ones << first
}

/// What an emptied chunk of blocks of `block_size` bytes keeps backed for its class's next
/// blocks: the pieces under its first two blocks, and at least [`KEPT_WHEN_EMPTY`] bytes (a
/// freed block is handed out lowest first). Enough that a loop which fills a chunk with one or
/// two blocks and empties it again never backs and gives back the same pieces over and over.
pub(super) fn kept_when_empty(block_size: usize) -> u64 {
    pieces(0, (2 * block_size).clamp(KEPT_WHEN_EMPTY, CHUNK))
}

/// The bytes an emptied chunk keeps backed at least (see [`kept_when_empty`]).
pub(super) const KEPT_WHEN_EMPTY: usize = 256 << 10;

/// The runs of consecutive set bits of `mask`, as `(first, count)`.
pub(super) fn runs(mut mask: u64) -> impl Iterator<Item = (usize, usize)> {
    std::iter::from_fn(move || {
        if mask == 0 {
            return None;
        }
        let first = mask.trailing_zeros() as usize;
        let count = (mask >> first).trailing_ones() as usize;
        mask &= !(if count == 64 {
            u64::MAX
        } else {
            ((1 << count) - 1) << first
        });
        Some((first, count))
    })
}

/// What every thread may read about a chunk without a lock. One per chunk index, made at the
/// index's first use and kept (and reused) until the tier drops.
///
/// `class`, `epoch` and `shard` change only while the chunk has no live block and is held by one
/// thread out of every list (see `SmallTier`), so whoever holds a block of the chunk reads
/// values that stay put until that block is freed.
// Each on cache lines of its own: two threads filling two chunks update the two `live` counts
// at the same time, which must not share a line.
#[derive(Debug)]
#[repr(align(128))]
pub(super) struct ChunkMeta {
    /// The size class whose blocks the chunk serves now.
    class: AtomicUsize,
    /// The fork epoch in which the chunk was made or last assigned a class.
    epoch: AtomicU64,
    /// The shard that hands out (and takes back) the chunk's blocks.
    shard: AtomicUsize,
    /// For a *closed* chunk (of an older fork epoch): its blocks not yet freed, as counted by
    /// this process (the metadata is private memory: after a fork each process counts its
    /// own). Set when the chunk is closed; an open chunk's count is its bitmap's.
    live: AtomicUsize,
    /// Whether the chunk's view is mapped now (so it must be released, and unregistered from
    /// the fork guard, once).
    mapped: AtomicBool,
    /// The chunk's range stopped being ours (a failed `map`): the index is never used again,
    /// and something else may be mapped there.
    lost: AtomicBool,
    /// The [`PIECE`]s whose pages have disk blocks (or, for [`Backing::Sparse`], were handed
    /// out): a block may be handed out only over backed pieces. Changed only by whoever holds
    /// the chunk (its shard's lock, or the chunk out of every list).
    backed: AtomicU64,
    /// The chunk's file was reserved whole when mapped, and its pieces are never given back:
    /// on a file system where a write fault may not reserve a block (see
    /// [`sys::faults_reserve_blocks`]), a given-back piece could not be backed again safely.
    whole: AtomicBool,
    /// While the chunk is empty and kept: its backed bytes past [`kept_when_empty`] that it
    /// keeps, counted in the tier's budget for them (see `SmallTier::keep_empty`). 0 otherwise.
    idle_excess: AtomicU64,
}

impl ChunkMeta {
    pub(super) fn new() -> Self {
        ChunkMeta {
            class: AtomicUsize::new(0),
            epoch: AtomicU64::new(0),
            shard: AtomicUsize::new(0),
            live: AtomicUsize::new(0),
            mapped: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            backed: AtomicU64::new(0),
            whole: AtomicBool::new(false),
            idle_excess: AtomicU64::new(0),
        }
    }

    /// Records that the chunk, empty and kept, keeps `bytes` past its first pieces.
    pub(super) fn set_idle_excess(&self, bytes: u64) {
        self.idle_excess.store(bytes, Ordering::Relaxed);
    }

    /// Takes the bytes recorded by [`set_idle_excess`](Self::set_idle_excess), leaving 0.
    #[inline]
    pub(super) fn take_idle_excess(&self) -> u64 {
        if self.idle_excess.load(Ordering::Relaxed) == 0 {
            return 0;
        }
        self.idle_excess.swap(0, Ordering::Relaxed)
    }

    /// Whether the chunk was reserved whole (see [`whole`](Self::whole)).
    pub(super) fn is_whole(&self) -> bool {
        self.whole.load(Ordering::Relaxed)
    }

    /// The pieces backed now (see [`backed`](Self::backed)).
    pub(super) fn backed(&self) -> u64 {
        self.backed.load(Ordering::Relaxed)
    }

    /// Records the pieces of `which` as backed (a store's chunk reopened: the pieces under its
    /// live blocks have their disk blocks).
    pub(super) fn mark_backed(&self, which: u64) {
        self.backed.fetch_or(which, Ordering::Relaxed);
    }

    /// Backs the pieces of `want` not backed yet, for the chunk mapped at `at` with `backing`.
    /// Returns the bytes newly backed, which count even if a later run failed.
    ///
    /// # Safety
    /// `at` must be this chunk's view, mapped read/write, and the caller must hold the chunk.
    pub(super) unsafe fn back(
        &self,
        at: NonNull<u8>,
        want: u64,
        backing: Backing,
    ) -> (u64, io::Result<()>) {
        let missing = want & !self.backed();
        let mut done = 0;
        for (first, count) in runs(missing) {
            if backing == Backing::Pieces {
                // SAFETY: pieces lie inside the chunk's CHUNK bytes (`first + count <= 64`),
                // which the caller says are our read/write view.
                let run = unsafe { at.add(first * PIECE) };
                // SAFETY: as above.
                if let Err(e) = unsafe { sys::back_pages(run, count * PIECE) } {
                    // A populate that stopped part-way (a full disk) may have given some of the
                    // run's pages their blocks: give them back, or they would stay, counted
                    // nowhere, until the chunk goes. No live block lies on a piece not backed.
                    // SAFETY: as above; unused pages.
                    let _ = unsafe { sys::discard_pages(run, count * PIECE) };
                    return (done, Err(e));
                }
            }
            let bits = if count == 64 {
                u64::MAX
            } else {
                ((1 << count) - 1) << first
            };
            self.backed.fetch_or(bits, Ordering::Relaxed);
            done += (count * PIECE) as u64;
        }
        (done, Ok(()))
    }

    /// Gives back the blocks of the backed pieces of `which`, whose contents nobody uses (in
    /// this or any other process). Returns the bytes given back, and the first error.
    ///
    /// # Safety
    /// `at` must be this chunk's view, the caller must hold the chunk, and no live block may
    /// overlap a piece of `which`. `backing.can_discard()` must hold.
    pub(super) unsafe fn discard(&self, at: NonNull<u8>, which: u64) -> (u64, io::Result<()>) {
        let mut done = 0;
        let mut result = Ok(());
        for (first, count) in runs(which & self.backed()) {
            // SAFETY: inside the chunk's view (as in `back`); unused, as the caller promises.
            match unsafe { sys::discard_pages(at.add(first * PIECE), count * PIECE) } {
                Ok(()) => {
                    let bits = if count == 64 {
                        u64::MAX
                    } else {
                        ((1 << count) - 1) << first
                    };
                    self.backed.fetch_and(!bits, Ordering::Relaxed);
                    done += (count * PIECE) as u64;
                }
                Err(e) if result.is_ok() => result = Err(e),
                Err(_) => {}
            }
        }
        (done, result)
    }

    /// Gives the chunk a class, epoch and shard. Only for a chunk with no live block that the
    /// caller holds out of every list.
    pub(super) fn assign(&self, class: usize, epoch: u64, shard: usize) {
        debug_assert_eq!(self.live(), 0);
        self.class.store(class, Ordering::Relaxed);
        self.epoch.store(epoch, Ordering::Relaxed);
        self.shard.store(shard, Ordering::Relaxed);
    }

    pub(super) fn class(&self) -> usize {
        self.class.load(Ordering::Relaxed)
    }

    pub(super) fn block_size(&self) -> usize {
        class::block_size(self.class())
    }

    pub(super) fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Relaxed)
    }

    pub(super) fn shard(&self) -> usize {
        self.shard.load(Ordering::Relaxed)
    }

    pub(super) fn live(&self) -> usize {
        self.live.load(Ordering::Acquire)
    }

    /// Records the live blocks of a chunk being closed (see `live`).
    pub(super) fn close(&self, live: usize) {
        self.live.store(live, Ordering::Release);
    }

    /// Counts one block of a closed chunk freed; `true` when it was the last live one. AcqRel:
    /// whoever sees zero releases the view after every other block's last use.
    pub(super) fn sub_live(&self) -> bool {
        let before = self.live.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(before > 0, "more frees than allocations in a chunk");
        before == 1
    }

    pub(super) fn is_mapped(&self) -> bool {
        self.mapped.load(Ordering::Acquire)
    }

    /// Whether the chunk's range was lost (see [`MapFailure::range_kept`]).
    pub(super) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Acquire)
    }

    pub(super) fn set_lost(&self, lost: bool) {
        self.lost.store(lost, Ordering::Release);
    }

    /// Maps a new chunk at `at` (a `CHUNK`-aligned, `CHUNK`-long part of the tier's
    /// reservation) from `source`, and marks this chunk mapped. The chunk reads as zeros. On
    /// error no file is left behind (except a non-empty file from a custom creator, which is
    /// never removed) and `[at, at + CHUNK)` is a reservation again, unless
    /// [`MapFailure::range_kept`] says otherwise.
    ///
    /// # Safety
    /// `[at, at + CHUNK)` must be a reservation of the caller's that nothing refers to.
    pub(super) unsafe fn map(
        &self,
        at: NonNull<u8>,
        source: Source<'_>,
        backing: Backing,
        dont_fork: bool,
    ) -> Result<(), MapFailure> {
        debug_assert!(!self.is_mapped());

        let made;
        let mut whole = backing == Backing::Whole;
        let (file, offset) = match source {
            Source::Creator(creator) => {
                // Checked empty before its name goes: a custom creator's file with data in it
                // is the user's, never ours to delete.
                made = creator
                    .create(&SegmentRequest::new(CHUNK, false))?
                    .into_unnamed()?;
                whole = backing == Backing::Whole
                    || (backing == Backing::Pieces && !sys::faults_reserve_blocks(&made));
                if whole {
                    sys::allocate_blocks(&made, 0, CHUNK as u64)?;
                } else {
                    made.set_len(CHUNK as u64)?;
                }
                (&made, 0)
            }
            Source::Store { file, offset } => {
                // The range may hold an earlier chunk's bytes (kept empty at a close): zeros.
                sys::punch_hole(file, offset, CHUNK as u64)?;
                // Backed by pieces, the file covers the chunk already (the tier extends it).
                if whole {
                    sys::allocate_blocks(file, offset, CHUNK as u64)?;
                }
                (file, offset)
            }
            Source::Existing { file, offset, .. } => (file, offset),
        };
        let share = match source {
            Source::Existing { share, .. } => share,
            Source::Store { .. } if backing == Backing::FilePieces => sys::Share::Private,
            _ => sys::Share::Write,
        };
        // For a `dont_fork` chunk the view, its advice and the fork record change together
        // under the fork lock: a child never sees the view without its record (see `fork`).
        let mut no_fork = keeps_out_of_children(dont_fork).then(fork::hold);
        // First a page of the file is mapped where it touches nothing of ours, and unmapped:
        // its file system's `mmap` refuses it here, if it does, with our range untouched, on
        // any file system (and so does the map count). One page: the mapping over our own
        // reservation needs no new address space, so neither may the probe.
        let page = sys::page_size();
        // SAFETY: the file has CHUNK bytes from `offset`; the probe is never touched.
        let probe = unsafe { sys::map_file_anywhere(file, offset, page, share) }?;
        // SAFETY: the mapping just made, which nothing refers to.
        unsafe { sys::unmap(probe, page) }?;
        // SAFETY: the caller gives us the reservation `[at, at + CHUNK)`, which nothing refers
        // to; the file has CHUNK bytes from `offset`, so every mapped page has a backing.
        if let Err(error) = unsafe { sys::map_file_fixed_at(at, file, offset, CHUNK, share) } {
            // The file's own `mmap` just worked: an `ENOMEM` now is the kernel refusing the
            // split of our reservation (the map count) or the address space, which it does
            // before it unmaps anything, so the range is still ours if every page of it is
            // mapped. (A failure after the old range was unmapped leaves a gap, which is
            // reserved again if nobody took it.)
            let range_kept = sys::reserve_at(at, CHUNK).is_ok()
                || (error.raw_os_error() == Some(libc::ENOMEM) && sys::is_mapped(at, CHUNK));
            return Err(MapFailure { error, range_kept });
        }
        // The mapping holds the file from now on; a creator's file (its descriptor) drops at
        // the end of this function.
        if let Some(views) = no_fork.as_mut() {
            if let Err(error) = keep_from_children(at) {
                // SAFETY: the view was just mapped by us and nothing refers to it yet.
                let range_kept = unsafe { sys::reserve_fixed(at, CHUNK) }.is_ok();
                return Err(MapFailure { error, range_kept });
            }
            views.add(at.as_ptr().addr(), CHUNK);
        }
        drop(no_fork);
        let backed = if whole { u64::MAX } else { 0 };
        self.backed.store(backed, Ordering::Relaxed);
        self.whole.store(whole, Ordering::Relaxed);
        self.mapped.store(true, Ordering::Release);
        Ok(())
    }

    /// Replaces the chunk's view at `at` with an inaccessible reservation: a temporary chunk's
    /// file loses its last reference and its blocks go back to the file system (a store's
    /// chunk file has its range punched by the tier). The chunk is unmapped after this, and
    /// its pieces are no longer backed.
    ///
    /// When the reservation cannot be mapped over the view (the process is at
    /// `vm.max_map_count`, or `RLIMIT_AS` is below its size now), the view is unmapped instead,
    /// which needs no new mapping and so works at those limits, and the range is reserved again
    /// where it lies if it can be ([`sys::reserve_at`]). `Err` says whether that worked: if not,
    /// the range is no longer ours (see [`MapFailure::range_kept`]).
    ///
    /// # Safety
    /// `at` must be this chunk's address, and no block of the chunk may be used again.
    pub(super) unsafe fn release(
        &self,
        at: NonNull<u8>,
        dont_fork: bool,
    ) -> Result<(), MapFailure> {
        debug_assert!(self.is_mapped());
        self.mapped.store(false, Ordering::Release);
        self.backed.store(0, Ordering::Relaxed);
        let mut no_fork = keeps_out_of_children(dont_fork).then(fork::hold);
        if let Some(views) = no_fork.as_mut() {
            views.remove(at.as_ptr().addr());
        }
        // SAFETY: the view is ours and, as the caller guarantees, unused from now on.
        let Err(error) = (unsafe { sys::reserve_fixed(at, CHUNK) }) else {
            return Ok(());
        };
        // Over `RLIMIT_AS` every new mapping is refused, even over our own: the view stays,
        // its pages given back and made inaccessible (no new mapping, no split), so the range
        // stays ours; a later chunk there maps over it.
        // SAFETY: our view, unused from now on (as the caller guarantees).
        if unsafe { sys::discard_pages(at, CHUNK) }.is_ok()
            // SAFETY: as above.
            && unsafe { sys::make_inaccessible(at, CHUNK) }.is_ok()
        {
            return Err(MapFailure {
                error,
                range_kept: true,
            });
        }
        // SAFETY: as above; the view is one whole mapping, so unmapping it splits nothing.
        let range_kept = match unsafe { sys::unmap(at, CHUNK) } {
            Ok(()) => sys::reserve_at(at, CHUNK).is_ok(),
            // Still our view: a later map of the index replaces it (`MAP_FIXED`), and the
            // tier's drop unmaps it.
            Err(_) => true,
        };
        Err(MapFailure { error, range_kept })
    }
}

/// Where a chunk's file comes from.
#[derive(Clone, Copy)]
pub(crate) enum Source<'a> {
    /// A new file of the creator's, unlinked once mapped (the temporary allocator).
    Creator(&'a dyn SegmentCreator),
    /// `CHUNK` bytes at `offset` of a store's chunk file, made to read as zeros.
    Store { file: &'a File, offset: u64 },
    /// A chunk of a store being reopened: `CHUNK` bytes at `offset` of its chunk file, as
    /// they are.
    Existing {
        file: &'a File,
        offset: u64,
        share: sys::Share,
    },
}

/// Whether chunks of a `dont_fork` tier are kept out of children here (Linux only: elsewhere
/// the setting is accepted and has no effect, as for segments).
pub(super) fn keeps_out_of_children(dont_fork: bool) -> bool {
    cfg!(target_os = "linux") && dont_fork
}

/// `MADV_DONTFORK` on a chunk view just mapped at `at`.
#[cfg(target_os = "linux")]
fn keep_from_children(at: NonNull<u8>) -> io::Result<()> {
    // SAFETY: `[at, at + CHUNK)` is the view just mapped; DONTFORK leaves its contents alone.
    unsafe { sys::advise(at, CHUNK, sys::Advice::DontFork) }
}

#[cfg(not(target_os = "linux"))]
fn keep_from_children(_at: NonNull<u8>) -> io::Result<()> {
    Ok(())
}

/// Why [`ChunkMeta::map`] failed, and whether the chunk's range is still our reservation.
#[derive(Debug)]
pub(super) struct MapFailure {
    pub(super) error: io::Error,
    /// `[at, at + CHUNK)` is still a reservation of ours and may be mapped again.
    pub(super) range_kept: bool,
}

impl From<io::Error> for MapFailure {
    /// A failure before the range was touched.
    fn from(error: io::Error) -> Self {
        MapFailure {
            error,
            range_kept: true,
        }
    }
}

/// Which blocks of a chunk are in use: private memory of the shard that owns the chunk, only
/// touched under that shard's lock. Never stored in the chunk's own pages, so freed memory is
/// never written and a fork child never writes metadata into pages it shares with its parent.
#[derive(Debug)]
pub(super) struct Blocks {
    class: usize,
    /// How many blocks fit in the chunk.
    count: usize,
    /// One bit per block below `bump`, set while the block is in use.
    used: Vec<u64>,
    /// Blocks at and above this index were never handed out since the chunk got its class.
    bump: usize,
    /// Clear bits below `bump`: blocks freed and not handed out again.
    freed: usize,
    /// The word where the last freed block was found, to start the next search there.
    hint: usize,
    /// The chunk's file is new: blocks above `bump` read as zeros.
    fresh: bool,
    /// The chunk is in its class's list of chunks with free blocks (or about to be): set when
    /// pushed, so that a chunk is pushed once per time it becomes non-full.
    pub(super) listed: bool,
    /// A free that leaves fewer live blocks than this looks for pieces to give back (see
    /// `SmallTier::scavenge`).
    pub(super) scavenge_below: usize,
}

/// A block handed out by [`Blocks::take`].
#[derive(Clone, Copy, Debug)]
pub(super) struct Taken {
    pub(super) index: usize,
    /// The block reads as zeros already (never used since the chunk's file was made).
    pub(super) zero: bool,
}

impl Blocks {
    pub(super) fn new(class: usize, fresh: bool) -> Self {
        let count = CHUNK / class::block_size(class);
        Blocks {
            class,
            count,
            used: vec![0; count.div_ceil(64)],
            bump: 0,
            freed: 0,
            hint: 0,
            fresh,
            listed: false,
            scavenge_below: count,
        }
    }

    pub(super) fn class(&self) -> usize {
        self.class
    }

    /// What a store keeps of the bitmap: next never-used block, blocks freed below it, the
    /// bits.
    pub(super) fn parts(&self) -> (usize, usize, &[u64]) {
        (self.bump, self.freed, &self.used)
    }

    /// A bitmap a store kept (see [`parts`](Self::parts)); `None` if it is not consistent.
    pub(super) fn restore(class: usize, bump: usize, freed: usize, used: Vec<u64>) -> Option<Self> {
        let count = CHUNK / class::block_size(class);
        let set: usize = used.iter().map(|w| w.count_ones() as usize).sum();
        // No bit at or past `bump` (those blocks were never handed out).
        let beyond = used.iter().enumerate().any(|(word, &bits)| {
            let first = word * 64;
            if first >= bump {
                bits != 0
            } else {
                first + 64 > bump && bits >> (bump - first) != 0
            }
        });
        let fits = used.len() == count.div_ceil(64) && bump <= count && freed <= bump;
        (fits && !beyond && set == bump - freed).then_some(Blocks {
            class,
            count,
            used,
            bump,
            freed,
            hint: 0,
            fresh: false,
            listed: false,
            scavenge_below: count,
        })
    }

    #[cfg(test)]
    pub(super) fn has_free(&self) -> bool {
        self.freed > 0 || self.bump < self.count
    }

    /// The pieces under a block in use (see [`pieces`]): the ones that must stay backed.
    pub(super) fn used_pieces(&self) -> u64 {
        let size = class::block_size(self.class);
        let mut used = 0;
        for (word, &bits) in self.used.iter().enumerate() {
            if bits != 0 {
                let first = word * 64 + bits.trailing_zeros() as usize;
                let last = word * 64 + 63 - bits.leading_zeros() as usize;
                used |= pieces(first * size, (last + 1) * size);
            }
        }
        used
    }

    /// Blocks handed out and not taken back.
    pub(super) fn live(&self) -> usize {
        self.bump - self.freed
    }

    /// Hands out a free block: a freed one first (its memory is warm), else the next never-used
    /// one.
    pub(super) fn take(&mut self) -> Option<Taken> {
        if self.freed > 0 {
            let words = self.used.len();
            for step in 0..words {
                let word = (self.hint + step) % words;
                let bits = self.used[word];
                if bits != u64::MAX {
                    let index = word * 64 + bits.trailing_ones() as usize;
                    // Bits at and above `bump` are clear too but are not freed blocks.
                    if index < self.bump {
                        self.used[word] |= 1 << (index % 64);
                        self.freed -= 1;
                        self.hint = word;
                        return Some(Taken { index, zero: false });
                    }
                }
            }
            debug_assert!(false, "freed count says a block is free, bitmap disagrees");
        }
        if self.bump < self.count {
            let index = self.bump;
            self.bump += 1;
            self.used[index / 64] |= 1 << (index % 64);
            return Some(Taken {
                index,
                zero: self.fresh,
            });
        }
        None
    }

    /// Whether block `index` is in use (handed out and not taken back).
    pub(super) fn is_used(&self, index: usize) -> bool {
        index < self.bump && self.used[index / 64] & (1 << (index % 64)) != 0
    }

    /// Takes back block `index`. Returns `false` (and changes nothing) if the block is not in
    /// use, which only a double free or a stray pointer can cause.
    pub(super) fn put(&mut self, index: usize) -> bool {
        let (word, bit) = (index / 64, 1u64 << (index % 64));
        if index >= self.bump || self.used[word] & bit == 0 {
            return false;
        }
        self.used[word] &= !bit;
        self.freed += 1;
        if self.freed == 1 || word < self.hint {
            self.hint = word;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_bump_then_reuse_freed_ones() {
        let class = class::class_for(allocator_api2::alloc::Layout::new::<[u8; 64 << 10]>());
        let mut blocks = Blocks::new(class.unwrap(), true);
        assert_eq!(blocks.count, CHUNK / (64 << 10));
        let taken: Vec<_> = std::iter::from_fn(|| blocks.take()).collect();
        assert_eq!(taken.len(), blocks.count);
        assert!(taken.iter().all(|t| t.zero));
        assert!(!blocks.has_free());
        assert!(blocks.put(5));
        assert!(!blocks.put(5), "a double free is refused");
        assert!(blocks.put(63));
        let again = blocks.take().unwrap();
        assert_eq!(again.index, 5);
        assert!(!again.zero, "a reused block is dirty");
        assert_eq!(blocks.take().unwrap().index, 63);
        assert!(blocks.take().is_none());
    }

    #[test]
    fn blocks_search_wraps_around_from_the_hint() {
        let mut blocks = Blocks::new(0, false);
        for _ in 0..1000 {
            blocks.take().unwrap();
        }
        assert!(blocks.put(900));
        assert!(blocks.put(3));
        assert_eq!(blocks.take().unwrap().index, 3);
        assert_eq!(blocks.take().unwrap().index, 900);
        assert_eq!(blocks.take().unwrap().index, 1000, "then the bump");
    }
}
