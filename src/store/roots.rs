//! Roots: values kept in a store under a name, and the guards that lend them out.

use std::any::type_name;
use std::fmt;
use std::io;
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use allocator_api2::alloc::{Allocator, Layout};

use super::persist::{Persist, hash_str};
use super::{Store, StoreError};

/// How many roots a store holds: as many as fit in the header's page.
pub(super) const ROOTS: usize = 31;
/// The longest root name, in bytes.
const NAME: usize = 64;

/// One root, as the header holds it.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct RootSlot {
    /// Non-zero when the slot holds a root (written last when a root is set, first when it
    /// is taken).
    used: u64,
    /// Where the value is.
    addr: u64,
    size: u64,
    align: u64,
    /// `Persist::LAYOUT` of the type.
    layout: u64,
    /// The hash of the type's name.
    type_hash: u64,
    /// `Persist::hash_probe` of the type, under the build that stored it.
    probe: u64,
    name_len: u64,
    name: [u8; NAME],
}

const _: () = assert!(size_of::<RootSlot>() == 128);

impl RootSlot {
    fn name(&self) -> &[u8] {
        &self.name[..(self.name_len as usize).min(NAME)]
    }
}

/// This process's use of a root slot.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct RootState {
    /// Shared guards out (> 0), or an exclusive one (-1).
    borrow: isize,
    /// The value's statics were reattached since the store was opened (see
    /// `Persist::reattach`).
    reattached: bool,
}

/// What a type is checked against: its name's hash, size, alignment and layout fingerprint.
fn check_type<'s, T: Persist<'s>>(slot: &RootSlot, name: &str) -> Result<(), StoreError> {
    let same = slot.size == size_of::<T>() as u64
        && slot.align == align_of::<T>() as u64
        && slot.layout == T::LAYOUT
        && slot.type_hash == hash_str(type_name::<T>());
    if !same {
        return Err(StoreError::WrongType {
            name: name.to_owned(),
            asked: type_name::<T>(),
            stored_size: slot.size,
            stored_align: slot.align,
        });
    }
    if slot.probe != T::hash_probe() {
        return Err(StoreError::HasherChanged(name.to_owned()));
    }
    Ok(())
}

impl Store {
    /// The header's root table.
    fn slots(&self) -> *mut [RootSlot; ROOTS] {
        self.header().roots.get()
    }

    /// Where each root's value is: (address, size). Call with the roots' lock held.
    pub(super) fn root_values(&self) -> Vec<(usize, usize)> {
        // SAFETY: as in `find`.
        let slots = unsafe { &*self.slots() };
        slots
            .iter()
            .filter(|s| s.used != 0 && s.size != 0)
            .filter_map(|s| Some((usize::try_from(s.addr).ok()?, usize::try_from(s.size).ok()?)))
            .collect()
    }

    /// The slot of the root `name`. Call with the roots' lock held.
    fn find(&self, name: &str) -> Option<usize> {
        // SAFETY: the table is in the header's mapping; the caller holds the roots' lock,
        // under which alone it is written.
        let slots = unsafe { &*self.slots() };
        slots
            .iter()
            .position(|s| s.used != 0 && s.name() == name.as_bytes())
    }

    /// Keeps `value` in the store under `name`: it moves into the store, and later processes
    /// get it back with [`root`](Self::root) or [`root_mut`](Self::root_mut) (as this one can).
    /// A store holds up to 31 roots, named with 1 to 64 bytes; a map or a vector as a root
    /// holds any number of values.
    ///
    /// What the value holds must live in this store (`Persist`), which the compiler checks.
    pub fn set_root<'s, T: Persist<'s>>(&'s self, name: &str, value: T) -> Result<(), StoreError> {
        self.check_use(true)?;
        if name.is_empty() || name.len() > NAME {
            return Err(StoreError::BadRootName(name.to_owned()));
        }
        let shared = self.shared();
        let mut states = shared.lock_roots();
        if self.find(name).is_some() {
            return Err(StoreError::RootExists(name.to_owned()));
        }
        // SAFETY: as in `find`.
        let free = unsafe { &*self.slots() }.iter().position(|s| s.used == 0);
        let index = free.ok_or(StoreError::RootsFull)?;
        let layout = Layout::new::<T>();
        let ptr = self
            .allocator()
            .allocate(layout)
            .map_err(|_| {
                StoreError::Io(io::Error::new(
                    io::ErrorKind::OutOfMemory,
                    "no room in the store for the root",
                ))
            })?
            .cast::<T>();
        // SAFETY: a fresh block of the store for a `T` (aligned, large enough; dangling and
        // valid for a zero-size `T`).
        unsafe { ptr.write(value) };
        let mut slot = RootSlot {
            used: 0,
            addr: ptr.as_ptr().addr() as u64,
            size: layout.size() as u64,
            align: layout.align() as u64,
            layout: T::LAYOUT,
            type_hash: hash_str(type_name::<T>()),
            probe: T::hash_probe(),
            name_len: name.len() as u64,
            name: [0; NAME],
        };
        slot.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: the slot is in the writer's header mapping (read/write); the roots' lock is
        // held. `used` is set last, so a slot is never half a root in this process's view.
        unsafe {
            let slots = &mut *self.slots();
            slots[index] = slot;
            slots[index].used = 1;
        }
        states[index] = RootState {
            borrow: 0,
            reattached: true,
        };
        Ok(())
    }

    /// Finds the root `name`, checks it is a `T`, reattaches it once per open, and marks it
    /// borrowed (`exclusive`, or shared). Returns the slot and the value's address.
    fn borrow_root<'s, T: Persist<'s>>(
        &'s self,
        name: &str,
        exclusive: bool,
    ) -> Result<(usize, NonNull<T>), StoreError> {
        let shared = self.shared();
        let mut states = shared.lock_roots();
        let index = self
            .find(name)
            .ok_or_else(|| StoreError::NoRoot(name.to_owned()))?;
        // SAFETY: as in `find`.
        let slot = unsafe { (*self.slots())[index] };
        check_type::<T>(&slot, name)?;
        let state = &mut states[index];
        let free = if exclusive {
            state.borrow == 0
        } else {
            state.borrow >= 0
        };
        if !free {
            return Err(StoreError::RootInUse(name.to_owned()));
        }
        // The address comes from a file: it must be a block of this store of its own (and
        // no other root's: two roots at one address would be two `&mut` to one value).
        let addr = usize::try_from(slot.addr).map_err(|_| StoreError::NotAStore)?;
        // SAFETY: as in `find`.
        let shared_addr = unsafe { &*self.slots() }
            .iter()
            .enumerate()
            .any(|(j, s)| j != index && s.used != 0 && s.addr == slot.addr);
        if (shared_addr && size_of::<T>() > 0)
            || !shared.holds(addr, size_of::<T>(), align_of::<T>())
        {
            return Err(StoreError::NotAStore);
        }
        let ptr = NonNull::new(std::ptr::with_exposed_provenance_mut::<T>(addr))
            .ok_or(StoreError::NotAStore)?;
        if T::HAS_STATICS && !state.reattached {
            // SAFETY: the root is a `T` (checked above) in a block of the store, mapped
            // read/write in this process (shared for the writer, private for a reader); no
            // guard of it is out (a first borrow), and it was not used since the open.
            unsafe { (*ptr.as_ptr()).reattach() };
        }
        state.reattached = true;
        state.borrow = if exclusive { -1 } else { state.borrow + 1 };
        Ok((index, ptr))
    }

    /// The root `name`, to read: any number of `Root`s of one root may be out at once, but no
    /// [`RootMut`]. Errors: no such root, another type, a changed hasher, or a `RootMut` out.
    pub fn root<'s, T: Persist<'s>>(&'s self, name: &str) -> Result<Root<'s, T>, StoreError> {
        self.check_use(false)?;
        let (slot, ptr) = self.borrow_root::<T>(name, false)?;
        Ok(Root {
            store: self,
            slot,
            // SAFETY: a `T` of the store (see `borrow_root`), not borrowed mutably while the
            // guard marks it shared; valid for `'s`, as the store stays open that long.
            value: unsafe { ptr.as_ref() },
        })
    }

    /// The root `name`, to change: the only guard of that root while it is out. Only in a
    /// store open for writing.
    pub fn root_mut<'s, T: Persist<'s>>(
        &'s self,
        name: &str,
    ) -> Result<RootMut<'s, T>, StoreError> {
        self.check_use(true)?;
        let (slot, mut ptr) = self.borrow_root::<T>(name, true)?;
        Ok(RootMut {
            store: self,
            slot,
            // SAFETY: as in `root`, and the guard marks it exclusive: no other reference.
            value: unsafe { ptr.as_mut() },
        })
    }

    /// Takes the root `name` out of the store's root table: the value is returned (and still
    /// lives in the store's memory, as any container made with [`allocator`](Self::allocator)
    /// does until dropped), and the name is free again.
    pub fn take_root<'s, T: Persist<'s>>(&'s self, name: &str) -> Result<T, StoreError> {
        self.check_use(true)?;
        let (index, ptr) = self.borrow_root::<T>(name, true)?;
        let shared = self.shared();
        let mut states = shared.lock_roots();
        // SAFETY: as in `set_root`; the slot is cleared first.
        unsafe { (*self.slots())[index].used = 0 };
        states[index] = RootState::default();
        drop(states);
        // SAFETY: the root's `T`, exclusively ours (borrowed above, and its slot cleared):
        // moved out once; its block is then freed, with the layout it was allocated with.
        let value = unsafe { ptr.read() };
        // SAFETY: as above.
        unsafe { self.allocator().deallocate(ptr.cast(), Layout::new::<T>()) };
        Ok(value)
    }

    /// The names of the store's roots.
    pub fn root_names(&self) -> Vec<String> {
        if self.check_use(false).is_err() {
            return Vec::new();
        }
        let _states = self.shared().lock_roots();
        // SAFETY: as in `find`.
        let slots = unsafe { &*self.slots() };
        slots
            .iter()
            .filter(|s| s.used != 0)
            .map(|s| String::from_utf8_lossy(s.name()).into_owned())
            .collect()
    }

    fn release_root(&self, slot: usize) {
        let mut states = self.shared().lock_roots();
        let state = &mut states[slot];
        state.borrow = if state.borrow < 0 {
            0
        } else {
            state.borrow - 1
        };
    }
}

/// A root of a store, lent to read ([`Store::root`]).
pub struct Root<'s, T> {
    store: &'s Store,
    slot: usize,
    value: &'s T,
}

impl<T> Deref for Root<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.value
    }
}

impl<T> Drop for Root<'_, T> {
    fn drop(&mut self) {
        self.store.release_root(self.slot);
    }
}

impl<T: fmt::Debug> fmt::Debug for Root<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.value, f)
    }
}

/// A root of a store, lent to change ([`Store::root_mut`]).
pub struct RootMut<'s, T> {
    store: &'s Store,
    slot: usize,
    value: &'s mut T,
}

impl<T> Deref for RootMut<'_, T> {
    type Target = T;

    fn deref(&self) -> &T {
        self.value
    }
}

impl<T> DerefMut for RootMut<'_, T> {
    fn deref_mut(&mut self) -> &mut T {
        self.value
    }
}

impl<T> Drop for RootMut<'_, T> {
    fn drop(&mut self) {
        self.store.release_root(self.slot);
    }
}

impl<T: fmt::Debug> fmt::Debug for RootMut<'_, T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.value, f)
    }
}
