//! What the crate does around `fork`: who made a segment, what may be shared with a child, and
//! which locks no other thread may hold at the moment of the fork.
//!
//! The model (the README and `RELIABILITY.md` state it for users):
//!
//! * **Generation.** Every process has a generation number, advanced in the child by a
//!   `pthread_atfork` child handler. A segment, a named file or a session folder records the
//!   generation that made it; a process of another generation got it through `fork` and
//!   *inherited* it: it never resizes, truncates or removes it. This replaces a comparison of
//!   process ids, which breaks when a pid is reused.
//! * **Epoch.** Advanced at every fork, in the parent (before the fork, so the child starts with
//!   the new value too). Whatever was mapped before the current epoch may be mapped in a child
//!   as well. So, in the parent too, such a file is never made shorter (the child would die of
//!   `SIGBUS` touching its tail), and such memory is never handed out again for new data (the
//!   child would see its inherited data change under it).
//! * **Locks.** The prepare handler takes every lock registered here (the allocators' tables,
//!   caches and queues) and the process-wide [`hold`] lock, and the parent and child handlers
//!   release them. So no lock is held by a thread that does not exist in the child, and no
//!   fork happens in the middle of a truncation or of a `dont_fork` mapping change.
//! * **Layers.** This module is the bottom of the crate and knows nothing of what is above it:
//!   the modules above give it their process-wide locks as *layers* (a list fixed when the
//!   handlers are installed, [`install`]) and their objects through [`register`]; the prepare
//!   handler locks each, and the child handler gives each its turn ([`ForkLocks::in_child`]).
//! * **`dont_fork` holes.** `MADV_DONTFORK` leaves a hole in the child where each such view
//!   was. The child still holds the inherited vectors, so a hole is a trap: the kernel may put a
//!   new mapping there, which the inherited vector's drop would then unmap. The child handler
//!   fills every hole with an inaccessible reservation. The ranges are recorded while [`hold`]
//!   is held *around* the mapping change itself, so the record can never fall out of step with
//!   the mappings.

use std::any::Any;
use std::cell::UnsafeCell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::sys;

static GENERATION: AtomicU64 = AtomicU64::new(0);
static EPOCH: AtomicU64 = AtomicU64::new(0);

/// This process's generation: differs from that of any process it was forked from.
pub(crate) fn generation() -> u64 {
    GENERATION.load(Ordering::Acquire)
}

/// The number of forks this process and its ancestors made, as seen here: anything stamped
/// with an older epoch may be mapped by a child too.
pub(crate) fn epoch() -> u64 {
    EPOCH.load(Ordering::Acquire)
}

/// The tag of the thread that made the last fork (see [`thread_tag`]): in a child, the one
/// thread that exists.
static FORKER: AtomicU64 = AtomicU64::new(0);

/// This thread's tag: unique in the process and never reused (unlike a thread id), never 0.
pub(crate) fn thread_tag() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    thread_local! {
        static TAG: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    TAG.try_with(|tag| {
        if tag.get() == 0 {
            tag.set(NEXT.fetch_add(1, Ordering::Relaxed));
        }
        tag.get()
    })
    .unwrap_or(0)
}

/// The tag of the thread that made the last fork: in a fork child, the thread that runs.
pub(crate) fn forking_thread() -> u64 {
    FORKER.load(Ordering::Acquire)
}

/// Installs the fork handlers once per process. Called whenever an allocator is made, before
/// it can map anything.
///
/// Not a `Once`: glibc holds its fork-handler lock during a `fork`, so `pthread_atfork` may
/// wait for a fork in progress, and a child made while a `Once` waits is left with a `Once`
/// that never completes. A flag set first never makes anyone wait: a thread that sees it set
/// while the first one is still registering goes on (a fork in that instant runs without our
/// handlers, as any fork before the first allocator did).
///
/// `layers` are the process-wide locks of the modules above, locked in this order after every
/// registered object; every caller passes the same list (the crate's, see `lib.rs`), and only
/// the first call's is kept: they are recorded before the handlers exist, so no fork can miss
/// one.
pub(crate) fn install(layers: &'static [&'static dyn ForkLocks]) {
    static INSTALLED: AtomicBool = AtomicBool::new(false);
    if INSTALLED.swap(true, Ordering::AcqRel) {
        return;
    }
    // Published before the handlers are installed, never changed after.
    let _ = LAYERS.set(layers);
    if let Err(e) = sys::at_fork(prepare, parent, child) {
        crate::logging::report!(
            error,
            "mmapvec: pthread_atfork failed, fork children are not protected: {e}"
        );
    }
}

/// The `dont_fork` views mapped in this process: start address -> length.
#[derive(Debug, Default)]
pub(crate) struct DontForkViews(BTreeMap<usize, usize>);

impl DontForkViews {
    /// Records a view just mapped with `MADV_DONTFORK`.
    pub(crate) fn add(&mut self, addr: usize, len: usize) {
        self.0.insert(addr, len);
    }

    /// Forgets a view that is being unmapped or moved.
    pub(crate) fn remove(&mut self, addr: usize) {
        self.0.remove(&addr);
    }

    /// Forgets every view that starts in `[addr, addr + len)` (a store's range being unmapped).
    pub(crate) fn forget_range(&mut self, addr: usize, len: usize) {
        let inside: Vec<usize> = self.0.range(addr..addr + len).map(|(&a, _)| a).collect();
        for a in inside {
            self.0.remove(&a);
        }
    }
}

static HOLD: Mutex<DontForkViews> = Mutex::new(DontForkViews(BTreeMap::new()));

/// Holds off any `fork` until the guard is dropped. Taken around every change of a
/// `dont_fork` mapping (so its record changes with it) and around every truncation of a file
/// that a child could map (so the check "no fork since" stays true until the file is cut).
pub(crate) fn hold() -> MutexGuard<'static, DontForkViews> {
    // Every change under the lock is a single insert or remove: a poisoned lock is consistent.
    HOLD.lock().unwrap_or_else(|e| e.into_inner())
}

/// Something whose locks must all be held by the forking thread across a `fork`.
pub(crate) trait ForkLocks: Sync {
    /// Locks every mutex of `self`, in a fixed order, pushing the guards into `held`, and
    /// takes note of the epoch the fork is about to begin (`epoch`). Called only from the
    /// prepare handler; the guards are dropped after the fork.
    fn lock_for_fork(&'static self, held: &mut Vec<Box<dyn Any>>, epoch: u64);

    /// Runs in the child, on its only thread, after the `dont_fork` holes are filled and
    /// before the guards are dropped: `held` holds every guard taken by the prepare handler
    /// (its own among them, which it may find by type), and `views` the record of `dont_fork`
    /// views (a view mapped again here leaves it, or a grandchild would fill its range with a
    /// reservation). Only calls that are safe in a fork child of a threaded process (system
    /// calls; glibc's and musl's `malloc` are usable here).
    fn in_child(&'static self, held: &mut [Box<dyn Any>], views: &mut DontForkViews) {
        let _ = (held, views);
    }
}

/// The layers given to [`install`].
static LAYERS: std::sync::OnceLock<&'static [&'static dyn ForkLocks]> = std::sync::OnceLock::new();

fn layers() -> &'static [&'static dyn ForkLocks] {
    LAYERS.get().copied().unwrap_or(&[])
}

/// A registered object. Raw, because registration does not own it: see [`register`].
struct Registered(*const dyn ForkLocks);

// SAFETY: the pointer is only dereferenced under `REGISTRY`'s lock, while (by the contract of
// `register`) the object is alive; `ForkLocks: Sync` makes sharing it between threads sound.
unsafe impl Send for Registered {}

static REGISTRY: Mutex<Vec<Registered>> = Mutex::new(Vec::new());

fn registry() -> MutexGuard<'static, Vec<Registered>> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// Adds `object` to what the prepare handler locks. Waits while a fork is being prepared: never
/// call it inside a `Once` or `OnceLock` initializer, or a child forked meanwhile would inherit
/// an initializer that never completes.
///
/// # Safety
/// `object` must stay at its address and alive until [`unregister`] is called for it, and
/// `unregister` must be called before it is dropped (first thing in its `Drop`). Its
/// `lock_for_fork` must not take the registry's lock (it must not register anything).
pub(crate) unsafe fn register(object: &dyn ForkLocks) {
    let ptr = object as *const dyn ForkLocks;
    // SAFETY: erases the lifetime only; the caller keeps the object alive while registered.
    let ptr: *const (dyn ForkLocks + 'static) = unsafe { std::mem::transmute(ptr) };
    registry().push(Registered(ptr));
}

/// Removes `object` from the registry. Waits for a fork in progress to finish.
pub(crate) fn unregister(object: &dyn ForkLocks) {
    let addr = (object as *const dyn ForkLocks).cast::<()>();
    registry().retain(|r| r.0.cast::<()>() != addr);
}

/// What the forking thread holds between `prepare` and `parent`/`child`. Fields drop in
/// order: the views' lock, the objects' locks, and the registry last (the objects stay alive
/// while the registry is held, see [`register`]).
struct Held {
    views: MutexGuard<'static, DontForkViews>,
    _locks: Vec<Box<dyn Any>>,
    _registry: MutexGuard<'static, Vec<Registered>>,
}

/// Where `prepare` leaves [`Held`] for `parent` or `child`. Not a thread-local: a fork may
/// come from a thread-local destructor, when thread-locals can no longer be reached.
struct HeldSlot(UnsafeCell<Option<Held>>);

// SAFETY: the slot is only touched by the fork handlers, and only by the thread that holds
// `REGISTRY`'s lock: `prepare` fills it after taking the lock, `parent`/`child` empty it
// before the lock (inside the slot's `Held`) is released. So one thread at a time; the guards
// inside are made and dropped on that same thread.
unsafe impl Sync for HeldSlot {}

static HELD: HeldSlot = HeldSlot(UnsafeCell::new(None));

/// Takes what `prepare` left.
///
/// # Safety
/// Only from `parent` or `child`, which the forking thread runs after its `prepare`.
unsafe fn take_held() -> Option<Held> {
    // SAFETY: this thread holds the registry lock (taken in `prepare`, stored in the slot), so
    // no other thread touches the slot (see `HeldSlot`).
    unsafe { (*HELD.0.get()).take() }
}

extern "C" fn prepare() {
    // Order: the registry, each object's locks, then `HOLD`. Code that holds an object's lock
    // may take `HOLD` (a tier mapping a `dont_fork` chunk) but never the other way round, and
    // nothing takes the registry while holding either.
    let registry = registry();
    FORKER.store(thread_tag(), Ordering::Release);
    // Only this handler changes the epoch, and the registry's lock serializes it.
    let next = epoch() + 1;
    let mut locks = Vec::new();
    for r in registry.iter() {
        // SAFETY: registered objects are alive while the registry lock is held (`register`),
        // and the guards taken through this reference are dropped before that lock: `Held`
        // drops its fields in order, the registry's guard last.
        let object: &'static dyn ForkLocks = unsafe { &*r.0 };
        object.lock_for_fork(&mut locks, next);
    }
    for layer in layers() {
        layer.lock_for_fork(&mut locks, next);
    }
    let views = hold();
    EPOCH.store(next, Ordering::Release);
    // SAFETY: this thread holds the registry lock (`registry`), so it alone touches the slot
    // (see `HeldSlot`), until `parent` or `child` takes it back.
    unsafe {
        *HELD.0.get() = Some(Held {
            views,
            _locks: locks,
            _registry: registry,
        })
    };
}

extern "C" fn parent() {
    // SAFETY: a fork handler, after this thread's `prepare`.
    drop(unsafe { take_held() });
}

extern "C" fn child() {
    GENERATION.fetch_add(1, Ordering::AcqRel);
    // SAFETY: a fork handler, after this thread's `prepare` (the child is that thread).
    let Some(held) = (unsafe { take_held() }) else {
        return;
    };
    #[cfg(target_os = "linux")]
    for (&addr, &len) in held.views.0.iter() {
        if let Some(ptr) = std::ptr::NonNull::new(addr as *mut u8) {
            // SAFETY: in the child the range is a hole left by MADV_DONTFORK (the parent's
            // view was not copied; the record is exact because it changes only under `HOLD`,
            // which prepare holds), so nothing of the child's is replaced. A failure leaves the
            // hole, as it would be without this handler.
            let _ = unsafe { sys::reserve_fixed(ptr, len) };
        }
    }
    let mut held = held;
    for r in held._registry.iter() {
        // SAFETY: as in `prepare`: alive while the registry lock (in `held`) is held.
        let object: &'static dyn ForkLocks = unsafe { &*r.0 };
        object.in_child(&mut held._locks, &mut held.views);
    }
    for layer in layers() {
        layer.in_child(&mut held._locks, &mut held.views);
    }
    drop(held);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_are_recorded_and_forgotten() {
        let mut views = DontForkViews::default();
        views.add(0x1000, 4096);
        views.add(0x3000, 8192);
        views.remove(0x1000);
        assert_eq!(views.0.into_iter().collect::<Vec<_>>(), [(0x3000, 8192)]);
    }
}
