//! [`StoreAllocator`]: the allocator whose blocks live in a store.

use std::fmt;
use std::marker::PhantomData;
use std::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator, Layout};

use super::{Shared, Store};
use crate::allocator::dangling;
use crate::creator::{SegmentCreator, SegmentFile, SegmentRequest};
use crate::sys;

/// A vector whose elements live in a store: `allocator_api2`'s `Vec` with a
/// [`StoreAllocator`]. Made with `StoreVec::new_in(store.allocator())`.
pub type StoreVec<'s, T> = allocator_api2::vec::Vec<T, StoreAllocator<'s>>;

/// A box whose value lives in a store.
pub type StoreBox<'s, T> = allocator_api2::boxed::Box<T, StoreAllocator<'s>>;

/// A hashbrown map whose table lives in a store. Its hasher must be one whose hashes are the
/// same in every process ([`PersistHasher`](super::PersistHasher)), such as
/// `foldhash::fast::FixedState`, for it to be kept as (part of) a root.
#[cfg(feature = "hashbrown")]
pub type StoreMap<'s, K, V, S = foldhash::fast::FixedState> =
    hashbrown::HashMap<K, V, S, StoreAllocator<'s>>;

/// A hashbrown set whose table lives in a store (see [`StoreMap`]).
#[cfg(feature = "hashbrown")]
pub type StoreSet<'s, T, S = foldhash::fast::FixedState> =
    hashbrown::HashSet<T, S, StoreAllocator<'s>>;

/// The allocator of a [`Store`]: every block is a file of the store, mapped at a fixed address
/// of its range, so that the pointers to it are the same in every process that opens the
/// store.
///
/// It is `Copy` and one pointer wide: the address of the store's range, which is the same in
/// every process, so containers kept in the store hold an allocator that is valid again when
/// the store is reopened. The lifetime ties every container made with it to the [`Store`]
/// handle: none outlives it.
///
/// Blocks of up to 512 KiB come from the small-block tier of the temporary allocator, run on the
/// store's chunk file (`small`); larger ones are segments of their own, which grow in place or
/// move without copying.
///
/// **Where nothing can be written to the store** (a store opened read-only, or a fork child's
/// copy of a writer's containers), it allocates from the process's temporary allocator
/// ([`MmapAllocator::default`](crate::MmapAllocator::default)) instead: a reader can clone
/// what it reads and build temporary values from it, and those blocks are freed there. Such a
/// value cannot be kept in the store (a reader cannot set a root); the store's own blocks are
/// never freed or changed by such a process (their deallocation is a no-op there, and growing
/// one copies it out).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct StoreAllocator<'s> {
    /// The start of the store's range. The runtime page after the header holds the address
    /// of the store's [`Shared`].
    base: NonNull<u8>,
    _store: PhantomData<&'s Store>,
}

// SAFETY: the allocator only reaches the store's `Shared`, whose state is behind mutexes, and
// the store (which the lifetime keeps open) is `Sync`.
unsafe impl Send for StoreAllocator<'_> {}
// SAFETY: as above.
unsafe impl Sync for StoreAllocator<'_> {}

impl fmt::Debug for StoreAllocator<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreAllocator")
            .field("base", &self.base)
            .finish()
    }
}

impl<'s> StoreAllocator<'s> {
    pub(super) fn new(store: &'s Store) -> Self {
        // The runtime page is written by `Store::start`, before a store is handed out.
        let _ = store.shared();
        StoreAllocator {
            base: store.base,
            _store: PhantomData,
        }
    }

    fn shared(&self) -> &'s Shared {
        // SAFETY: `base` is the range of a store that is open for `'s` (the lifetime borrows
        // the handle); its runtime page, the range's second page, holds the address of the
        // store's `Shared`, which lives (boxed) as long as the handle. A container reopened
        // from the store holds this same `base`, and its lifetime is that of the handle it
        // was reopened through.
        unsafe {
            let runtime = self.base.add(sys::page_size()).cast::<*const Shared>();
            &*runtime.read()
        }
    }

    /// The store's state if this process may allocate in it: the writer that opened it.
    fn usable(&self) -> Option<&'s Shared> {
        let shared = self.shared();
        (shared.is_owner() && shared.access == super::Access::Write).then_some(shared)
    }

    /// Whether `ptr` is in the store's range (a block of the store, not a temporary one).
    fn in_store(&self, ptr: NonNull<u8>) -> bool {
        let addr = ptr.as_ptr().addr();
        let base = self.base.as_ptr().addr();
        addr >= base && addr - base < self.shared().range_len
    }
}

/// Where a process that cannot write the store (a reader, a fork child) gets its blocks.
fn temporary() -> crate::MmapAllocator {
    crate::MmapAllocator::default()
}

fn slice(addr: usize, len: usize) -> NonNull<[u8]> {
    let ptr = NonNull::new(std::ptr::with_exposed_provenance_mut::<u8>(addr)).unwrap();
    NonNull::slice_from_raw_parts(ptr, len)
}

// SAFETY: blocks are mapped files of the store, valid until freed (or the store closes, which
// the lifetime orders after every container); a block is handed out once and never shared
// with another; `grow`, `shrink` and `deallocate` accept exactly the blocks `allocate` made
// (their address is looked up). Copies of the allocator are the same allocator (same store).
unsafe impl Allocator for StoreAllocator<'_> {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        self.allocate_with(layout, false)
    }

    fn allocate_zeroed(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        self.allocate_with(layout, true)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        if layout.size() == 0 {
            return;
        }
        if !self.in_store(ptr) {
            // SAFETY: a block outside the store's range came from `temporary` (the caller's
            // promise: it came from this allocator), with this layout.
            return unsafe { temporary().deallocate(ptr, layout) };
        }
        // A reader or a fork child never frees its store's blocks.
        let Some(shared) = self.usable() else {
            return;
        };
        if shared.tier.contains(ptr) {
            // SAFETY: a live block of the tier (the caller's promise: it came from `allocate`,
            // and the tier's region holds only its own blocks).
            unsafe { shared.tier.deallocate(ptr, store_epoch()) };
        } else {
            shared.lock_space().free(ptr.as_ptr().expose_provenance());
        }
    }

    unsafe fn grow(
        &self,
        ptr: NonNull<u8>,
        old_layout: Layout,
        new_layout: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded.
        unsafe { self.resize(ptr, old_layout, new_layout, false) }
    }

    unsafe fn grow_zeroed(
        &self,
        ptr: NonNull<u8>,
        old_layout: Layout,
        new_layout: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        // SAFETY: forwarded.
        unsafe { self.resize(ptr, old_layout, new_layout, true) }
    }

    unsafe fn shrink(
        &self,
        ptr: NonNull<u8>,
        old_layout: Layout,
        new_layout: Layout,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if new_layout.size() == 0 {
            // SAFETY: the caller gives up the block.
            unsafe { self.deallocate(ptr, old_layout) };
            return Ok(dangling(new_layout.align()));
        }
        let addr = ptr.as_ptr().expose_provenance();
        if !self.in_store(ptr) {
            // SAFETY: a temporary block (see `deallocate`), the caller's layouts.
            return unsafe { temporary().shrink(ptr, old_layout, new_layout) };
        }
        let Some(shared) = self.usable() else {
            // A store block where it cannot be changed: copied out.
            // SAFETY: forwarded.
            return unsafe { self.moved(ptr, old_layout, new_layout, false) };
        };
        if shared.tier.contains(ptr) {
            // SAFETY: a live block of the tier (see `deallocate`).
            let len = unsafe { shared.tier.block_len(ptr) };
            let same_class = shared.tier.serves(new_layout)
                && shared.tier.class_len(new_layout) == Some(len)
                && addr.is_multiple_of(new_layout.align());
            if same_class {
                return Ok(NonNull::slice_from_raw_parts(ptr, len));
            }
            // SAFETY: forwarded.
            return match unsafe { self.moved(ptr, old_layout, new_layout, false) } {
                // No block for the move (a full disk): the block is kept whole, a valid
                // shrink (`Vec::shrink_to_fit` aborts on an error).
                Err(_) if addr.is_multiple_of(new_layout.align()) => {
                    Ok(NonNull::slice_from_raw_parts(ptr, len))
                }
                other => other,
            };
        }
        if !addr.is_multiple_of(new_layout.align()) {
            // SAFETY: forwarded; a move keeps the first `new_layout.size()` bytes.
            return unsafe { self.moved(ptr, old_layout, new_layout, false) };
        }
        if shared.tier.serves(new_layout) {
            // Small enough for the tier: its file goes (copying at most 512 KiB).
            // SAFETY: forwarded.
            if let Ok(block) = unsafe { self.moved(ptr, old_layout, new_layout, false) } {
                return Ok(block);
            }
        }
        let len = shared
            .lock_space()
            .shrink(addr, new_layout.size())
            .map_err(|_| AllocError)?;
        Ok(slice(addr, len))
    }
}

/// The fork epoch the store's tier runs in: the process's. A fork child maps the store's
/// chunks as they are in the file (private views, see `Shared::in_child`), so the chunks of
/// earlier epochs are sealed in the parent: their blocks are never handed out again, their
/// pieces never punched, in this process (see `Shard::enter`). A child never allocates or
/// frees in the store.
pub(super) fn store_epoch() -> u64 {
    crate::fork::epoch()
}

/// The creator the store's tier is given: never used (the tier's chunks are ranges of the
/// store's chunk file).
#[derive(Debug)]
struct NoFiles;

// SAFETY: it never returns a file.
unsafe impl SegmentCreator for NoFiles {
    fn create(&self, _: &SegmentRequest) -> std::io::Result<SegmentFile> {
        Err(std::io::Error::other(
            "a store's chunks are not made by a creator",
        ))
    }
}

impl StoreAllocator<'_> {
    /// A new block: from the small-block tier if it serves the layout (and has room), else a
    /// segment of the store. Zeroed if asked (a new segment's file reads as zeros already).
    fn allocate_with(&self, layout: Layout, zeroed: bool) -> Result<NonNull<[u8]>, AllocError> {
        if layout.size() == 0 {
            return Ok(dangling(layout.align()));
        }
        let Some(shared) = self.usable() else {
            return if zeroed {
                temporary().allocate_zeroed(layout)
            } else {
                temporary().allocate(layout)
            };
        };
        if shared.tier.serves(layout) {
            match shared
                .tier
                .allocate(layout, zeroed, store_epoch(), &NoFiles)
            {
                Ok(block) => return Ok(block),
                Err(e) => {
                    crate::logging::report!(debug, "mmapvec: store small block of {layout:?}: {e}")
                }
            }
        }
        let (addr, len) = shared
            .lock_space()
            .allocate(layout.size(), layout.align())
            .map_err(|e| {
                crate::logging::report!(debug, "mmapvec: store allocation of {layout:?}: {e}");
                AllocError
            })?;
        Ok(slice(addr, len))
    }

    /// `grow` and `grow_zeroed`.
    ///
    /// # Safety
    /// As for `Allocator::grow`.
    unsafe fn resize(
        &self,
        ptr: NonNull<u8>,
        old_layout: Layout,
        new_layout: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        if old_layout.size() == 0 {
            return if zeroed {
                self.allocate_zeroed(new_layout)
            } else {
                self.allocate(new_layout)
            };
        }
        let addr = ptr.as_ptr().expose_provenance();
        if !self.in_store(ptr) {
            // SAFETY: a temporary block (see `deallocate`), the caller's layouts.
            return unsafe {
                if zeroed {
                    temporary().grow_zeroed(ptr, old_layout, new_layout)
                } else {
                    temporary().grow(ptr, old_layout, new_layout)
                }
            };
        }
        let Some(shared) = self.usable() else {
            // A store block where it cannot be changed: copied out.
            // SAFETY: forwarded.
            return unsafe { self.moved(ptr, old_layout, new_layout, zeroed) };
        };
        if shared.tier.contains(ptr) {
            // SAFETY: a live block of the tier (see `deallocate`).
            let len = unsafe { shared.tier.block_len(ptr) };
            if new_layout.size() <= len && addr.is_multiple_of(new_layout.align()) {
                if zeroed {
                    // SAFETY: the rest of the caller's block, which may have been written.
                    unsafe {
                        ptr.add(old_layout.size())
                            .write_bytes(0, len - old_layout.size())
                    };
                }
                return Ok(NonNull::slice_from_raw_parts(ptr, len));
            }
            // SAFETY: forwarded.
            return unsafe { self.moved(ptr, old_layout, new_layout, zeroed) };
        }
        if !addr.is_multiple_of(new_layout.align()) {
            // SAFETY: forwarded.
            return unsafe { self.moved(ptr, old_layout, new_layout, zeroed) };
        }
        let mut space = shared.lock_space();
        let old_len = space.len_of(addr).ok_or(AllocError)?;
        let (to, len) = space
            .grow(addr, new_layout.size(), new_layout.align())
            .map_err(|e| {
                crate::logging::report!(
                    debug,
                    "mmapvec: growing a store block to {new_layout:?}: {e}"
                );
                AllocError
            })?;
        if zeroed {
            // The bytes past the old layout that the old block had may have been written (a
            // block may be used to its full length): zero them. The bytes past `old_len` are
            // new file blocks, which read as zeros.
            // SAFETY: `[to + old size, to + old_len)` is in the grown block, mapped, ours.
            unsafe {
                std::ptr::with_exposed_provenance_mut::<u8>(to + old_layout.size())
                    .write_bytes(0, old_len - old_layout.size())
            };
        }
        Ok(slice(to, len))
    }

    /// A resize that cannot keep the block (a small block to another class, or to an alignment
    /// the block's address does not have): a new block, the bytes copied, the old block freed.
    ///
    /// # Safety
    /// As for `Allocator::grow` or `Allocator::shrink`.
    unsafe fn moved(
        &self,
        ptr: NonNull<u8>,
        old_layout: Layout,
        new_layout: Layout,
        zeroed: bool,
    ) -> Result<NonNull<[u8]>, AllocError> {
        let new = if zeroed {
            self.allocate_zeroed(new_layout)?
        } else {
            self.allocate(new_layout)?
        };
        let keep = old_layout.size().min(new_layout.size());
        // SAFETY: both blocks are valid for `keep` bytes and distinct (the new one was just
        // handed out).
        unsafe { std::ptr::copy_nonoverlapping(ptr.as_ptr(), new.cast::<u8>().as_ptr(), keep) };
        // SAFETY: the caller gives up the old block.
        unsafe { self.deallocate(ptr, old_layout) };
        Ok(new)
    }
}
