//! Per-thread caches of free small blocks: the tier's fast path.
//!
//! A free of a block up to [`MAX_CACHED`] bytes goes into the freeing thread's cache, and the
//! next allocation of that size class on that thread comes out of it, with no lock and no
//! atomic read-modify-write: a `Vec` growing from empty, or a loop that makes and drops small
//! maps, then costs what malloc's own thread cache costs. Everything else (a cache miss, a full
//! bin) takes the shard's lock as before.
//!
//! * A cached block stays *live* for its chunk (its bit set, counted in the chunk's blocks), so
//!   nothing can release the chunk under it. The bytes of cached blocks are subtracted from the
//!   tier's `in_use_bytes` (each cache publishes its total, see [`ThreadCache::cached`]).
//! * So a cached block *pins* its chunk: the chunk stays mapped while it is cached. What it
//!   costs on disk is bounded: a bin holds blocks of one chunk at a time, at most
//!   [`CLASSES`] bins hold blocks at once, and a pinned chunk's pieces under no live block
//!   go as its other blocks are freed (`SmallTier::scavenge`) and at `trim`: what stays is the
//!   pieces under the cached blocks themselves. And pins are short-lived:
//!   - every [`GC_INTERVAL`] operations of the thread, the bins it did not use since the last
//!     time go back to their chunks;
//!   - once in [`FLUSH_EVERY_CHUNKS`](super::FLUSH_EVERY_CHUNKS) new chunks, and before the
//!     tier reports a full disk, it asks every cache to go back
//!     ([`SmallTier::request_flush`]): the asking thread's cache at once, the others at their
//!     next operation on the tier. A thread that never uses the tier again keeps its pins
//!     until it exits (or the allocator is dropped): the bound above is what it can keep.
//! * A thread caches for one tier at a time (the last it freed into); using another flushes
//!   the cache back to its tier first. A cache holds only a `Weak` reference: if its tier (its
//!   allocator) is gone, the region is unmapped already and the cached addresses are forgotten.
//! * A cache belongs to one fork epoch. After a fork the blocks it holds are in chunks made
//!   before the fork, which neither process may hand out again: the first use in the new epoch
//!   gives them back to their (now closed) chunks instead.
//! * At thread exit the cache is given back (a thread-local destructor).

use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use super::class;
use super::{CHUNK, SmallTier};

/// The largest block size cached per thread.
pub(super) const MAX_CACHED: usize = 64 << 10;
/// The classes cached: every class up to [`MAX_CACHED`] (the default small-block threshold).
pub(super) const CLASSES: usize = 44;
const _: () = assert!(class::block_size(CLASSES - 1) == MAX_CACHED);
/// Blocks per class at most, and bytes per class at most: a thread never holds more than
/// about 32 KiB of one class, or two blocks of it if they are larger.
const SLOTS: usize = 32;
const BYTES_PER_CLASS: usize = 32 << 10;
/// A thread's operations on its cache between two collections of the bins it no longer uses
/// (a power of two).
pub(super) const GC_INTERVAL: u32 = 1024;
const _: () = assert!(GC_INTERVAL.is_power_of_two() && CLASSES <= u64::BITS as usize);

/// One thread's cache for one tier.
pub(super) struct ThreadCache {
    tier: Weak<SmallTier>,
    /// The tier's identity (`SmallTier::id`): never reused, unlike an address.
    id: u64,
    epoch: u64,
    /// The tier's flush requests seen (`SmallTier::flush_requests`); a newer one empties the
    /// cache.
    flushes: u64,
    /// Bytes of the blocks held, published for the tier's statistics (written by this thread
    /// only, read by `SmallTier::stats` through the tier's list of caches).
    cached: Arc<AtomicU64>,
    /// Bins holding blocks now (at most [`CLASSES`]).
    pinned: usize,
    /// Bins used (popped or pushed) since the last collection, one bit per class.
    touched: u64,
    /// Operations, counted to run a collection every [`GC_INTERVAL`].
    ops: u32,
    bins: [Bin; CLASSES],
}

#[derive(Clone, Copy)]
struct Bin {
    len: usize,
    /// The chunk (its start address) every block in the bin belongs to, while `len > 0`.
    chunk: usize,
    blocks: [usize; SLOTS],
}

impl Bin {
    const EMPTY: Bin = Bin {
        len: 0,
        chunk: 0,
        blocks: [0; SLOTS],
    };
}

/// The start of the chunk holding the block at `addr` (chunks are [`CHUNK`]-aligned).
fn chunk_of(addr: usize) -> usize {
    addr & !(CHUNK - 1)
}

thread_local! {
    static CACHE: RefCell<Option<Box<ThreadCache>>> = const { RefCell::new(None) };
}

/// How many blocks of each class a bin holds at most (computed once: no division on the hot
/// path).
const CAPACITY: [usize; CLASSES] = {
    let mut capacity = [0; CLASSES];
    let mut class = 0;
    while class < CLASSES {
        let fit = BYTES_PER_CLASS / class::block_size(class);
        capacity[class] = if fit < 2 {
            2
        } else if fit > SLOTS {
            SLOTS
        } else {
            fit
        };
        class += 1;
    }
    capacity
};

fn capacity(class: usize) -> usize {
    CAPACITY[class]
}

/// A cached block of `class` for `tier` in fork epoch `epoch`, if this thread has one.
pub(super) fn pop(tier: &SmallTier, class: usize, epoch: u64) -> Option<NonNull<u8>> {
    debug_assert!(class < CLASSES);
    let mut stale = None;
    let popped = CACHE
        .try_with(|cache| {
            let mut slot = cache.try_borrow_mut().ok()?;
            let cache = slot.as_mut()?;
            if cache.id != tier.id {
                return None;
            }
            if cache.epoch != epoch {
                // From before a fork: its blocks go back to their (closed) chunks, so a thread
                // that only allocates from now on does not pin those chunks.
                stale = slot.take();
                return None;
            }
            cache.tick(tier, class);
            let bin = &mut cache.bins[class];
            if bin.len == 0 {
                return None;
            }
            bin.len -= 1;
            let addr = bin.blocks[bin.len];
            if bin.len == 0 {
                cache.pinned -= 1;
            }
            cache.account(-(class::block_size(class) as i64));
            NonNull::new(addr as *mut u8)
        })
        .ok()
        .flatten();
    // Given back outside the borrow: giving back frees blocks, which must not come here again.
    drop(stale);
    popped
}

/// Keeps the free block `ptr` of `class` (a chunk of the current epoch `epoch`) in this
/// thread's cache for `tier`. `false` when it does not fit (the caller frees it as usual).
pub(super) fn push(tier: &Arc<SmallTier>, class: usize, epoch: u64, ptr: NonNull<u8>) -> bool {
    debug_assert!(class < CLASSES);
    let pushed = CACHE.try_with(|cell| {
        let Ok(mut slot) = cell.try_borrow_mut() else {
            return Ok(false);
        };
        match slot.as_mut() {
            Some(cache) if cache.id == tier.id && cache.epoch == epoch => {
                cache.tick(tier, class);
                Ok(cache.keep(class, ptr))
            }
            // Another tier's cache, or an older epoch's: a fresh one takes its place, and the
            // old one is given back outside the borrow (giving back frees blocks, which must
            // not come here again).
            _ => {
                let mut fresh = ThreadCache::new(tier, epoch);
                let kept = fresh.keep(class, ptr);
                Err((slot.replace(fresh), kept))
            }
        }
    });
    match pushed {
        Ok(Ok(kept)) => kept,
        Ok(Err((old, kept))) => {
            drop(old);
            kept
        }
        // Thread-locals are being destroyed: free it as usual.
        Err(_) => false,
    }
}

/// Gives every block this thread's cache holds for `tier` back to its chunk, now. `true` if
/// there was any.
pub(super) fn flush(tier: &SmallTier) -> bool {
    CACHE
        .try_with(|cell| {
            let Ok(mut slot) = cell.try_borrow_mut() else {
                return false;
            };
            match slot.as_mut() {
                Some(cache) if cache.id == tier.id => {
                    // The request that comes with this flush is answered already.
                    cache.flushes = tier.flush_requests();
                    let any = cache.pinned > 0;
                    cache.give_back(tier, u64::MAX);
                    any
                }
                _ => false,
            }
        })
        .unwrap_or(false)
}

impl ThreadCache {
    // Out of line: its large array would make every `push` probe its stack.
    #[cold]
    #[inline(never)]
    fn new(tier: &Arc<SmallTier>, epoch: u64) -> Box<ThreadCache> {
        let cached = Arc::new(AtomicU64::new(0));
        tier.register_cache(&cached);
        Box::new(ThreadCache {
            tier: Arc::downgrade(tier),
            id: tier.id,
            epoch,
            flushes: tier.flush_requests(),
            cached,
            pinned: 0,
            touched: 0,
            ops: 0,
            bins: [Bin::EMPTY; CLASSES],
        })
    }

    /// Counts an operation on bin `class` of `tier` (this cache's tier), and gives back what
    /// the tier asked for (a flush request) or what this thread no longer uses (a collection
    /// every [`GC_INTERVAL`] operations).
    #[inline]
    fn tick(&mut self, tier: &SmallTier, class: usize) {
        self.touched |= 1 << class;
        self.ops = self.ops.wrapping_add(1);
        let flushes = tier.flush_requests();
        if flushes != self.flushes {
            self.flushes = flushes;
            self.give_back(tier, u64::MAX);
        } else if self.ops & (GC_INTERVAL - 1) == 0 {
            // Bins not used since the last collection; the one in use now stays.
            let idle = !self.touched;
            self.touched = 1 << class;
            if self.pinned > 0 {
                self.give_back(tier, idle);
            }
        }
    }

    /// Gives the blocks of the bins in `classes` (one bit per class) back to their chunks.
    /// Safe inside the thread-local's borrow: freeing to a shard never comes back here.
    #[cold]
    #[inline(never)]
    fn give_back(&mut self, tier: &SmallTier, classes: u64) {
        let mut given = 0;
        for (class, bin) in self.bins.iter_mut().enumerate() {
            if bin.len == 0 || classes & (1 << class) == 0 {
                continue;
            }
            for &addr in &bin.blocks[..bin.len] {
                if let Some(ptr) = NonNull::new(addr as *mut u8) {
                    // SAFETY: a cached block was allocated from `tier` and freed by its caller
                    // into this cache, so the tier still counts it live and nobody else uses
                    // it; it leaves the bin here, so it is given back once.
                    unsafe { tier.free_uncached(ptr, class) };
                }
            }
            given += bin.len * class::block_size(class);
            bin.len = 0;
            self.pinned -= 1;
        }
        self.account(-(given as i64));
    }

    /// Keeps the free block `ptr` of `class`; `false` when its bin is full or holds another
    /// chunk's blocks. (Every bin may hold blocks: a cache pins a chunk per bin at most.)
    fn keep(&mut self, class: usize, ptr: NonNull<u8>) -> bool {
        let addr = ptr.as_ptr().addr();
        let bin = &mut self.bins[class];
        if bin.len == 0 {
            self.pinned += 1;
            bin.chunk = chunk_of(addr);
        } else if bin.len == capacity(class) || bin.chunk != chunk_of(addr) {
            return false;
        }
        bin.blocks[bin.len] = addr;
        bin.len += 1;
        self.account(class::block_size(class) as i64);
        true
    }

    /// Adds `bytes` (negative: takes away) to the published total. One writer: a plain
    /// load and store, no read-modify-write.
    fn account(&mut self, bytes: i64) {
        let now = self.cached.load(Ordering::Relaxed) as i64 + bytes;
        self.cached.store(now as u64, Ordering::Relaxed);
    }
}

impl Drop for ThreadCache {
    fn drop(&mut self) {
        // A tier that is gone took its region with it: the addresses are forgotten.
        let Some(tier) = self.tier.upgrade() else {
            return;
        };
        self.give_back(&tier, u64::MAX);
        tier.unregister_cache(&self.cached);
    }
}
