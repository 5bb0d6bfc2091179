//! A per-thread slot for one freed segment: the reuse cache's fast path.
//!
//! A loop that allocates and frees one large block (a buffer per request, a scratch table)
//! takes the same segment back every time. Through the shared [`ReuseCache`](super::ReuseCache)
//! a round takes four mutexes and moves the segment in and out of two shared structures. Here
//! the freeing thread keeps the segment in a slot of its own, and its next allocation that
//! fits takes it back without a lock:
//!
//! * The segment stays in its allocator's segment table the whole time, as if live: the slot
//!   holds only its address and length. The free looks the segment up once (a lock, no move);
//!   taking it back touches nothing shared.
//! * It counts as *kept*, not live, in the statistics: each slot publishes what it holds
//!   (plain stores by its thread, summed by [`Slots::totals`]).
//! * Bounded: one segment per thread, of at most [`MAX_SLOT_BYTES`], under the same rules as
//!   the reuse cache (see [`ReuseCache::may_keep`](super::ReuseCache::may_keep)).
//! * Given back to the allocator (as a free: to the reuse cache, or released) when the thread
//!   exits, when a fork came since (the slot belongs to one fork epoch), when its allocator
//!   asks ([`Slots::request_flush`]: `trim`, and before a full disk is reported; the asking
//!   thread's slot at once, the others at their next use), or when the thread frees a segment
//!   of another allocator. An allocator that is gone took its segments with it: the slot then
//!   forgets the address.
//! * In a fork child, the parent's other threads do not exist: their slots are never used or
//!   dropped. At the allocator's first use in the child, [`give_back_orphans`] gives back what
//!   they held, from the addresses they published.

use std::cell::RefCell;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

/// The largest segment a thread's slot keeps.
pub(crate) const MAX_SLOT_BYTES: usize = 8 << 20;

/// What a slot's segments go back to: the allocator that owns them.
pub(crate) trait SlotOwner: Send + Sync {
    /// Frees the segment at `addr`, which a slot held (it is still in the owner's table).
    fn give_back(&self, addr: usize);
}

/// One allocator's side of the slots: its identity, its flush requests, and what its threads'
/// slots hold.
#[derive(Debug)]
pub(crate) struct Slots {
    /// Never reused, unlike an address.
    id: u64,
    flushes: AtomicU64,
    published: Mutex<Vec<Arc<Published>>>,
    /// Hits of slots that are gone (their threads exited).
    retired_hits: AtomicU64,
    /// The process generation (see `fork::generation`) whose orphaned slots were given back:
    /// the one the allocator was made in, at first.
    orphans_seen: AtomicU64,
}

/// What one slot holds, for the statistics and for a fork child. Written by its thread only
/// (and, in a fork child, by the one thread there, for slots whose threads did not survive).
#[derive(Debug, Default)]
struct Published {
    /// The slot's thread (`fork::thread_tag`): in a fork child, the slots of every other
    /// thread are orphans.
    thread: u64,
    /// The segment's address, 0 for none. Cleared before the segment is handed out again.
    addr: AtomicUsize,
    bytes: AtomicU64,
    hits: AtomicU64,
}

impl Published {
    fn set(&self, addr: usize, bytes: usize) {
        self.addr.store(addr, Ordering::Release);
        self.bytes.store(bytes as u64, Ordering::Relaxed);
    }
}

impl Slots {
    pub(crate) fn new() -> Slots {
        static NEXT_ID: AtomicU64 = AtomicU64::new(1);
        Slots {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            flushes: AtomicU64::new(0),
            published: Mutex::new(Vec::new()),
            retired_hits: AtomicU64::new(0),
            orphans_seen: AtomicU64::new(crate::fork::generation()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Published>>> {
        // Pushes and removals only: a poisoned lock is consistent.
        self.published.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Locks the list of slots for a `fork` (see `fork::ForkLocks`).
    pub(crate) fn lock_for_fork(&'static self, held: &mut Vec<Box<dyn std::any::Any>>) {
        held.push(Box::new(self.lock()));
    }

    /// Asks every thread's slot to give its segment back at its next use.
    pub(crate) fn request_flush(&self) {
        self.flushes.fetch_add(1, Ordering::Relaxed);
    }

    /// Segments and bytes the slots hold now, and their hits so far.
    pub(crate) fn totals(&self) -> (u64, u64, u64) {
        let list = self.lock();
        let (mut segments, mut bytes) = (0, 0);
        let mut hits = self.retired_hits.load(Ordering::Relaxed);
        for slot in list.iter() {
            let held = slot.bytes.load(Ordering::Relaxed);
            segments += u64::from(held > 0);
            bytes += held;
            hits += slot.hits.load(Ordering::Relaxed);
        }
        (segments, bytes, hits)
    }
}

/// One thread's slot, for one allocator at a time.
struct Slot {
    owner: Weak<dyn SlotOwner>,
    /// The owner's [`Slots::id`].
    id: u64,
    epoch: u64,
    /// The owner's flush requests seen.
    flushes: u64,
    /// The segment held (none: null) and its length. A pointer, not an address: the segment's
    /// own, so the block handed out again has the provenance of its whole mapping.
    ptr: *mut u8,
    len: usize,
    published: Arc<Published>,
    /// The list `published` is in: the owner's `Slots`, alive as long as the owner.
    slots: Weak<Slots>,
}

thread_local! {
    static SLOT: RefCell<Option<Slot>> = const { RefCell::new(None) };
}

impl Slot {
    /// Takes the segment out of the slot, for the caller to give back outside the borrow.
    fn take_held(&mut self) -> Option<Held> {
        if self.ptr.is_null() {
            return None;
        }
        let ptr = std::mem::replace(&mut self.ptr, std::ptr::null_mut());
        self.published.set(0, 0);
        Some(Held {
            owner: self.owner.clone(),
            addr: ptr.addr(),
        })
    }

    /// Whether the slot is behind its owner's fork epoch or flush requests: its segment must
    /// go back.
    fn is_stale(&self, slots: &Slots, epoch: u64) -> bool {
        self.epoch != epoch || self.flushes != slots.flushes.load(Ordering::Relaxed)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(held) = self.take_held() {
            held.give_back();
        }
        if let Some(slots) = self.slots.upgrade() {
            let hits = self.published.hits.load(Ordering::Relaxed);
            slots.retired_hits.fetch_add(hits, Ordering::Relaxed);
            slots.lock().retain(|p| !Arc::ptr_eq(p, &self.published));
        }
    }
}

/// A segment taken out of a slot, to give back to its owner.
struct Held {
    owner: Weak<dyn SlotOwner>,
    addr: usize,
}

impl Held {
    fn give_back(self) {
        // An owner that is gone took its segments (its table) with it.
        if let Some(owner) = self.owner.upgrade() {
            owner.give_back(self.addr);
        }
    }
}

/// The segment this thread's slot holds for the allocator of `slots`, if it `fits` (given its
/// address and length), taken out of the slot: `(start, length)`. `epoch` is the current fork
/// epoch.
pub(crate) fn take(
    slots: &Slots,
    epoch: u64,
    fits: impl FnOnce(usize, usize) -> bool,
) -> Option<(NonNull<u8>, usize)> {
    let mut stale = None;
    let taken = SLOT
        .try_with(|cell| {
            let mut slot = cell.try_borrow_mut().ok()?;
            let slot = slot.as_mut()?;
            if slot.id != slots.id || slot.ptr.is_null() {
                return None;
            }
            if slot.is_stale(slots, epoch) {
                (slot.epoch, slot.flushes) = (epoch, slots.flushes.load(Ordering::Relaxed));
                stale = slot.take_held();
                return None;
            }
            if !fits(slot.ptr.addr(), slot.len) {
                return None;
            }
            let taken = (NonNull::new(slot.ptr)?, slot.len);
            slot.ptr = std::ptr::null_mut();
            slot.published.set(0, 0);
            let hits = &slot.published.hits;
            hits.store(hits.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            Some(taken)
        })
        .ok()
        .flatten();
    // Outside the borrow: giving back frees a segment, which may come here again.
    if let Some(held) = stale {
        held.give_back();
    }
    taken
}

/// Whether this thread's slot could take a segment of the allocator of `slots` now: checked
/// before the segment is looked up.
pub(crate) fn has_room(slots: &Slots) -> bool {
    SLOT.try_with(|cell| match cell.try_borrow() {
        Ok(slot) => match slot.as_ref() {
            Some(slot) => slot.id != slots.id || slot.ptr.is_null(),
            None => true,
        },
        Err(_) => false,
    })
    .unwrap_or(false)
}

/// Keeps the freed segment at `ptr`, `len` bytes long (at most [`MAX_SLOT_BYTES`], one the
/// reuse cache may keep, still in the table of its allocator, which `owner` gives), in this
/// thread's slot. `false` when
/// the slot is taken: the caller frees the segment as usual.
pub(crate) fn offer(
    owner: impl FnOnce() -> Weak<dyn SlotOwner>,
    slots: &Arc<Slots>,
    epoch: u64,
    ptr: NonNull<u8>,
    len: usize,
) -> bool {
    debug_assert!(len <= MAX_SLOT_BYTES);
    let offered = SLOT.try_with(|cell| {
        let Ok(mut cell) = cell.try_borrow_mut() else {
            return (false, None, None);
        };
        if let Some(slot) = cell.as_mut()
            && slot.id == slots.id
        {
            let stale = if slot.is_stale(slots, epoch) {
                (slot.epoch, slot.flushes) = (epoch, slots.flushes.load(Ordering::Relaxed));
                slot.take_held()
            } else {
                None
            };
            if !slot.ptr.is_null() {
                return (false, stale, None);
            }
            (slot.ptr, slot.len) = (ptr.as_ptr(), len);
            slot.published.set(ptr.as_ptr().addr(), len);
            return (true, stale, None);
        }
        // Another allocator's slot, or none yet: a fresh one for this allocator; the old one
        // is dropped (and gives its segment back) outside the borrow.
        let published = Arc::new(Published {
            thread: crate::fork::thread_tag(),
            ..Published::default()
        });
        published.set(ptr.as_ptr().addr(), len);
        slots.lock().push(Arc::clone(&published));
        let fresh = Slot {
            owner: owner(),
            id: slots.id,
            epoch,
            flushes: slots.flushes.load(Ordering::Relaxed),
            ptr: ptr.as_ptr(),
            len,
            published,
            slots: Arc::downgrade(slots),
        };
        (true, None, cell.replace(fresh))
    });
    match offered {
        Ok((kept, stale, old)) => {
            if let Some(held) = stale {
                held.give_back();
            }
            drop(old);
            kept
        }
        // Thread-locals are being destroyed: free it as usual.
        Err(_) => false,
    }
}

/// Gives the segment this thread's slot holds for the allocator of `slots` back now. `true`
/// if there was one.
pub(crate) fn flush(slots: &Slots) -> bool {
    let held = SLOT
        .try_with(|cell| {
            let mut slot = cell.try_borrow_mut().ok()?;
            let slot = slot.as_mut().filter(|slot| slot.id == slots.id)?;
            slot.flushes = slots.flushes.load(Ordering::Relaxed);
            slot.take_held()
        })
        .ok()
        .flatten();
    held.map(Held::give_back).is_some()
}

/// Gives the segment this thread's slot holds for the allocator of `slots` back now if the
/// slot is stale (a fork came since, or a flush was asked). Like the reuse cache at its first
/// use in a fork child, so a child lets go of what its parent kept. `true` if there was one.
pub(crate) fn give_back_if_stale(slots: &Slots, epoch: u64) -> bool {
    let held = SLOT
        .try_with(|cell| {
            let mut slot = cell.try_borrow_mut().ok()?;
            let slot = slot
                .as_mut()
                .filter(|slot| slot.id == slots.id && slot.is_stale(slots, epoch))?;
            (slot.epoch, slot.flushes) = (epoch, slots.flushes.load(Ordering::Relaxed));
            slot.take_held()
        })
        .ok()
        .flatten();
    held.map(Held::give_back).is_some()
}

/// In a fork child, at the first use of the allocator of `slots` (each call site checks):
/// gives `owner` back the segments that the slots of the parent's other threads held. Those
/// threads were not copied into the child, so their slots are never used or dropped here.
/// The slot of the thread that forked (the one thread the child started with,
/// `fork::forking_thread`) is left to its usual rule (stale since the fork: given back at its
/// next use), whichever thread of the child comes here first. Does nothing (one load) outside
/// a new fork child.
///
/// A slot that was handing its segment out when the parent forked had cleared its published
/// address first (see `take`): only segments still free in the slot are given back. One being
/// put in a slot may not be published yet: it is then not given back, and stays in the table
/// (counted live) until the allocator drops. A slot made in the child is made after this pass
/// (every way into a slot comes here first), so it is never taken for an orphan.
pub(crate) fn give_back_orphans(slots: &Slots, owner: &dyn SlotOwner) {
    let generation = crate::fork::generation();
    if slots.orphans_seen.load(Ordering::Acquire) == generation {
        return;
    }
    let survivor = crate::fork::forking_thread();
    let mut orphans = Vec::new();
    {
        let mut list = slots.lock();
        if slots.orphans_seen.load(Ordering::Acquire) == generation {
            return;
        }
        list.retain(|published| {
            if published.thread == survivor {
                return true;
            }
            let addr = published.addr.swap(0, Ordering::AcqRel);
            published.bytes.store(0, Ordering::Relaxed);
            let hits = published.hits.load(Ordering::Relaxed);
            slots.retired_hits.fetch_add(hits, Ordering::Relaxed);
            if addr != 0 {
                orphans.push(addr);
            }
            false
        });
        slots.orphans_seen.store(generation, Ordering::Release);
    }
    // Outside the lock: giving back frees segments.
    for addr in orphans {
        owner.give_back(addr);
    }
}
