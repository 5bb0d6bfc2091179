//! Keeps the address ranges of `dont_fork` segments reserved in a child made by `fork`.
//!
//! `MADV_DONTFORK` leaves a hole where each such segment was. The child still holds the
//! inherited vectors (and the allocator's table entries), so a hole is a trap: the kernel may
//! put a new mapping there (the child's next segment, or the heap's), which the inherited
//! vector's drop would then unmap, or whose table entry would collide with the inherited one.
//! A `pthread_atfork` child handler fills every hole with an inaccessible reservation before
//! `fork` returns: touching an inherited segment is still a `SIGSEGV`, freeing it unmaps only
//! the reservation, and no new mapping lands there.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ptr::NonNull;
use std::sync::{Mutex, MutexGuard, Once};

use crate::sys;

/// Start address -> length of every live `dont_fork` view in this process.
static RANGES: Mutex<BTreeMap<usize, usize>> = Mutex::new(BTreeMap::new());

thread_local! {
    /// The registry's lock, held by the forking thread from `prepare` to `parent`/`child`, so
    /// no other thread is changing it at the moment of the fork.
    static HELD: RefCell<Option<MutexGuard<'static, BTreeMap<usize, usize>>>> =
        const { RefCell::new(None) };
}

fn ranges() -> MutexGuard<'static, BTreeMap<usize, usize>> {
    // Insert and remove cannot leave the map half-updated: a poisoned lock is consistent.
    RANGES.lock().unwrap_or_else(|e| e.into_inner())
}

/// Records a `dont_fork` view, installing the fork handlers the first time.
pub(crate) fn register(ptr: NonNull<u8>, len: usize) {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        if let Err(e) = sys::at_fork(prepare, parent, child) {
            log::error!("mmapvec: pthread_atfork failed, dont_fork holes stay open: {e}");
        }
    });
    ranges().insert(ptr.as_ptr().addr(), len);
}

/// Forgets a view recorded by [`register`].
pub(crate) fn unregister(ptr: NonNull<u8>) {
    ranges().remove(&ptr.as_ptr().addr());
}

extern "C" fn prepare() {
    let guard = ranges();
    HELD.with(|held| *held.borrow_mut() = Some(guard));
}

extern "C" fn parent() {
    HELD.with(|held| drop(held.borrow_mut().take()));
}

extern "C" fn child() {
    HELD.with(|held| {
        let Some(guard) = held.borrow_mut().take() else {
            return;
        };
        for (&addr, &len) in guard.iter() {
            if let Some(ptr) = NonNull::new(addr as *mut u8) {
                // SAFETY: in the child the range is a hole left by MADV_DONTFORK (the parent's
                // view was not copied), so nothing of the child's is replaced. A failure leaves
                // the hole, as before this module existed.
                let _ = unsafe { sys::reserve_fixed(ptr, len) };
            }
        }
    });
}
