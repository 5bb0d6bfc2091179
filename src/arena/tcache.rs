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

use super::SmallTier;
use super::class;

/// The largest block size cached per thread.
pub(super) const MAX_CACHED: usize = 8 << 10;
/// The classes cached: every class up to [`MAX_CACHED`].
pub(super) const CLASSES: usize = 32;
const _: () = assert!(class::block_size(CLASSES - 1) == MAX_CACHED);
/// Blocks per class at most, and bytes per class at most: a thread never holds more than
/// about 32 KiB of one class, 1 MiB in all.
const SLOTS: usize = 32;
const BYTES_PER_CLASS: usize = 32 << 10;

/// One thread's cache for one tier.
pub(super) struct ThreadCache {
    tier: Weak<SmallTier>,
    /// The tier's identity (`SmallTier::id`): never reused, unlike an address.
    id: u64,
    epoch: u64,
    /// Bytes of the blocks held, published for the tier's statistics (written by this thread
    /// only, read by `SmallTier::stats` through the tier's list of caches).
    cached: Arc<AtomicU64>,
    bins: [Bin; CLASSES],
}

#[derive(Clone, Copy)]
struct Bin {
    len: usize,
    blocks: [usize; SLOTS],
}

impl Bin {
    const EMPTY: Bin = Bin {
        len: 0,
        blocks: [0; SLOTS],
    };
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
            if cache.id == tier.id && cache.epoch != epoch {
                // From before a fork: its blocks go back to their (closed) chunks, so a thread
                // that only allocates from now on does not pin those chunks.
                stale = slot.take();
                return None;
            }
            if cache.id != tier.id {
                return None;
            }
            let bin = &mut cache.bins[class];
            if bin.len == 0 {
                return None;
            }
            bin.len -= 1;
            let addr = bin.blocks[bin.len];
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
            cached,
            bins: [Bin::EMPTY; CLASSES],
        })
    }

    /// Keeps the free block `ptr` of `class`; `false` when its bin is full.
    fn keep(&mut self, class: usize, ptr: NonNull<u8>) -> bool {
        let bin = &mut self.bins[class];
        if bin.len == capacity(class) {
            return false;
        }
        bin.blocks[bin.len] = ptr.as_ptr().addr();
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
        for (class, bin) in self.bins.iter().enumerate() {
            for &addr in &bin.blocks[..bin.len] {
                if let Some(ptr) = NonNull::new(addr as *mut u8) {
                    // SAFETY: a cached block was allocated from `tier` and freed by its caller
                    // into this cache, so the tier still counts it live and nobody else uses
                    // it; it is given back once.
                    unsafe { tier.free_uncached(ptr, class) };
                }
            }
        }
        self.cached.store(0, Ordering::Relaxed);
        tier.unregister_cache(&self.cached);
    }
}
