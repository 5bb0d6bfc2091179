//! [`Persist`]: the types whose values may be kept in a store, and [`PersistHasher`]: the
//! hashers whose maps may be.

use std::mem::offset_of;

use super::alloc::{StoreAllocator, StoreBox, StoreVec};

/// A value that can be kept in a store and used again by a later process that opens it.
///
/// The store keeps a value's bytes as they are, at the same address. That is only sound if
/// everything the value points to is in the store too, so this trait is implemented for:
/// * plain data: integers, floats, `bool`, `char`, `()`;
/// * arrays, tuples (up to 8) and `Option`s of `Persist` types;
/// * the store's own containers over `Persist` types: [`StoreVec`], [`StoreBox`] and (with the
///   `hashbrown` feature) [`StoreMap`](super::StoreMap) and [`StoreSet`](super::StoreSet) with a
///   [`PersistHasher`];
/// * [`StoreAllocator`] itself.
///
/// It is *not* implemented for anything that points outside the store: `String`,
/// `std::vec::Vec`, `Box`, references, raw pointers, `MmapVec` (temporary memory), or maps
/// with a per-process hasher. Keeping one does not compile:
///
/// ```compile_fail,E0277
/// # use mmapvec::store::Store;
/// # fn keep(store: &Store) {
/// store.set_root("name", String::from("on the heap"));
/// # }
/// ```
/// ```compile_fail,E0277
/// # use mmapvec::store::{Store, StoreVec};
/// # fn keep(store: &Store) {
/// // A vector in the store whose elements are heap vectors.
/// let v: StoreVec<Vec<u8>> = StoreVec::new_in(store.allocator());
/// store.set_root("nested", v);
/// # }
/// ```
/// ```compile_fail,E0277
/// # use mmapvec::store::Store;
/// # fn keep(store: &Store, x: &'static u64) {
/// store.set_root("ref", x);
/// # }
/// ```
/// ```compile_fail,E0277
/// # use mmapvec::store::Store;
/// # fn keep(store: &Store) {
/// store.set_root("ptr", std::ptr::null::<u8>());
/// # }
/// ```
/// ```compile_fail,E0277
/// # use mmapvec::store::{Store, StoreMap};
/// # fn keep(store: &Store) {
/// // hashbrown's default hasher is seeded per process: a reopened map would find nothing.
/// let m: StoreMap<u64, u64, hashbrown::DefaultHashBuilder> =
///     StoreMap::with_hasher_in(Default::default(), store.allocator());
/// store.set_root("map", m);
/// # }
/// ```
/// ```compile_fail,E0277
/// # use mmapvec::store::{Store, StoreMap};
/// # fn keep(store: &Store) {
/// let m: StoreMap<u64, u64, std::collections::hash_map::RandomState> =
///     StoreMap::with_hasher_in(Default::default(), store.allocator());
/// store.set_root("map", m);
/// # }
/// ```
///
/// A struct of your own opts in with an `unsafe impl`:
///
/// ```
/// use mmapvec::store::{Persist, StoreVec, fingerprint};
/// use std::mem::offset_of;
///
/// struct Posting<'s> {
///     doc: u32,
///     positions: StoreVec<'s, u32>,
/// }
///
/// // SAFETY: every field is `Persist`; `LAYOUT` covers each field's type and offset, and no
/// // field has statics to reattach.
/// unsafe impl<'s> Persist<'s> for Posting<'s> {
///     const LAYOUT: u64 = fingerprint(&[
///         <u32 as Persist>::LAYOUT,
///         offset_of!(Posting, doc) as u64,
///         <StoreVec<u32> as Persist>::LAYOUT,
///         offset_of!(Posting, positions) as u64,
///     ]);
/// }
/// ```
///
/// # Safety
/// An implementation promises that:
/// * every pointer a value holds, directly or through what it points to, leads into the store
///   whose [`StoreAllocator`] it was made with (or dangles for an empty allocation), except
///   pointers to the program's own statics when `HAS_STATICS` is true, and that such a value
///   is valid again when a new process maps the same bytes at the same addresses;
/// * if any part of a value may point to the program's statics (a hashbrown table with no
///   allocation points to one), `HAS_STATICS` is true and [`reattach`](Self::reattach) replaces
///   every such pointer with one valid in this process, without reading through the old one;
/// * `LAYOUT` is derived from the fields' `LAYOUT`s and offsets (see [`fingerprint`]), so that
///   a change of layout is seen at open; the store also checks the type's name, size and
///   alignment.
///
/// The lifetime `'s` is that of the store's handle: a type that holds a
/// [`StoreAllocator<'s>`](StoreAllocator) implements `Persist<'s>` for that `'s` only.
pub unsafe trait Persist<'s>: Sized {
    /// A fingerprint of the type's layout, composed from its fields' (see [`fingerprint`]).
    const LAYOUT: u64;
    /// Whether a value may point to the program's statics, which move with every build and
    /// every run (address space layout randomization).
    const HAS_STATICS: bool = false;

    /// Replaces every pointer to the program's statics with one valid in this process. Called
    /// once per root each time a store is opened, before the root is used.
    ///
    /// # Safety
    /// Only on a value just reopened from a store, before any other use.
    unsafe fn reattach(&mut self) {}

    /// A number that changes when the hash functions of the maps in the type change (a new
    /// version of the hasher's crate): see [`PersistHasher::probe`].
    fn hash_probe() -> u64 {
        0
    }
}

/// A hasher that hashes the same way in every process, given the same value (a fixed seed, or
/// one stored with the map), so that a map reopened from a store finds its keys.
///
/// Implemented for foldhash's `fast::FixedState` and `quality::FixedState` (hashbrown's own
/// hash function, with a fixed seed). Not for hashbrown's default hasher nor std's
/// `RandomState`, which are seeded at random in every process.
///
/// # Safety
/// A value of the type holds no pointer (it is kept in the store as it is), and its hashes
/// depend only on its own bytes and the hashed data.
pub unsafe trait PersistHasher: std::hash::BuildHasher {
    /// A fingerprint of the type's layout.
    const LAYOUT: u64;

    /// The hash of a fixed key under a fixed seed: stored with each root and compared at
    /// open, it tells when the hash function itself changed between builds.
    fn probe() -> u64;
}

/// Folds fingerprints and numbers (sizes, offsets, counts) into one fingerprint, in `const`
/// context: for [`Persist::LAYOUT`].
pub const fn fingerprint(parts: &[u64]) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut i = 0;
    while i < parts.len() {
        hash = (hash ^ parts[i]).wrapping_mul(0x0000_0100_0000_01b3);
        hash ^= hash >> 29;
        hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        i += 1;
    }
    hash
}

/// The fingerprint of a named type of `size` bytes aligned to `align`: for the `LAYOUT` of
/// plain data types of your own, whose layout is all their size and alignment say.
pub const fn type_fingerprint(name: &str, size: usize, align: usize) -> u64 {
    fingerprint(&[hash_str(name), size as u64, align as u64])
}

/// FNV-1a of a string, in `const` context.
pub(super) const fn hash_str(s: &str) -> u64 {
    let bytes = s.as_bytes();
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut i = 0;
    while i < bytes.len() {
        hash = (hash ^ bytes[i] as u64).wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

macro_rules! plain {
    ($($t:ty),*) => {$(
        // SAFETY: plain data: no pointer; the layout is the size and alignment.
        unsafe impl<'s> Persist<'s> for $t {
            const LAYOUT: u64 = type_fingerprint(stringify!($t), size_of::<$t>(), align_of::<$t>());
        }
    )*};
}

plain!(
    u8,
    u16,
    u32,
    u64,
    u128,
    usize,
    i8,
    i16,
    i32,
    i64,
    i128,
    isize,
    f32,
    f64,
    bool,
    char,
    ()
);

// SAFETY: an array holds its elements inline; `reattach` reaches every element.
unsafe impl<'s, T: Persist<'s>, const N: usize> Persist<'s> for [T; N] {
    const LAYOUT: u64 = fingerprint(&[hash_str("array"), T::LAYOUT, N as u64]);
    const HAS_STATICS: bool = T::HAS_STATICS;

    unsafe fn reattach(&mut self) {
        if T::HAS_STATICS {
            for x in self {
                // SAFETY: forwarded: part of a value just reopened.
                unsafe { x.reattach() };
            }
        }
    }

    fn hash_probe() -> u64 {
        T::hash_probe()
    }
}

// SAFETY: an `Option` holds its value inline; `reattach` reaches it.
unsafe impl<'s, T: Persist<'s>> Persist<'s> for Option<T> {
    const LAYOUT: u64 =
        fingerprint(&[hash_str("Option"), T::LAYOUT, size_of::<Option<T>>() as u64]);
    const HAS_STATICS: bool = T::HAS_STATICS;

    unsafe fn reattach(&mut self) {
        if let Some(x) = self {
            // SAFETY: forwarded: part of a value just reopened.
            unsafe { x.reattach() };
        }
    }

    fn hash_probe() -> u64 {
        T::hash_probe()
    }
}

macro_rules! tuple {
    ($($name:ident $index:tt),+) => {
        // SAFETY: a tuple holds its fields inline; `LAYOUT` covers each field's type and
        // offset (the compiler may order a tuple's fields as it likes); `reattach` reaches
        // every field.
        unsafe impl<'s, $($name: Persist<'s>),+> Persist<'s> for ($($name,)+) {
            const LAYOUT: u64 = fingerprint(&[
                hash_str("tuple"),
                $($name::LAYOUT, offset_of!(Self, $index) as u64,)+
            ]);
            const HAS_STATICS: bool = $($name::HAS_STATICS)||+;

            unsafe fn reattach(&mut self) {
                // SAFETY: forwarded: parts of a value just reopened.
                $(unsafe { self.$index.reattach() };)+
            }

            fn hash_probe() -> u64 {
                fingerprint(&[$($name::hash_probe()),+])
            }
        }
    };
}

tuple!(A 0);
tuple!(A 0, B 1);
tuple!(A 0, B 1, C 2);
tuple!(A 0, B 1, C 2, D 3);
tuple!(A 0, B 1, C 2, D 3, E 4);
tuple!(A 0, B 1, C 2, D 3, E 4, F 5);
tuple!(A 0, B 1, C 2, D 3, E 4, F 5, G 6);
tuple!(A 0, B 1, C 2, D 3, E 4, F 5, G 6, H 7);

// SAFETY: the allocator is the address of the store's range, the same in every process that
// opens it.
unsafe impl<'s> Persist<'s> for StoreAllocator<'s> {
    const LAYOUT: u64 = type_fingerprint(
        "StoreAllocator",
        size_of::<StoreAllocator<'static>>(),
        align_of::<StoreAllocator<'static>>(),
    );
}

// SAFETY: the elements are in a block of the store (or the vector has none, and a dangling
// pointer); the allocator is `Persist`. `reattach` reaches every element.
unsafe impl<'s, T: Persist<'s>> Persist<'s> for StoreVec<'s, T> {
    const LAYOUT: u64 = fingerprint(&[
        hash_str("allocator_api2::vec::Vec"),
        T::LAYOUT,
        size_of::<StoreVec<'static, u8>>() as u64,
    ]);
    const HAS_STATICS: bool = T::HAS_STATICS;

    unsafe fn reattach(&mut self) {
        if T::HAS_STATICS {
            for x in self.iter_mut() {
                // SAFETY: forwarded: part of a value just reopened.
                unsafe { x.reattach() };
            }
        }
    }

    fn hash_probe() -> u64 {
        T::hash_probe()
    }
}

// SAFETY: the value is in a block of the store; `reattach` reaches it.
unsafe impl<'s, T: Persist<'s>> Persist<'s> for StoreBox<'s, T> {
    const LAYOUT: u64 = fingerprint(&[hash_str("allocator_api2::boxed::Box"), T::LAYOUT]);
    const HAS_STATICS: bool = T::HAS_STATICS;

    unsafe fn reattach(&mut self) {
        // SAFETY: forwarded: part of a value just reopened.
        unsafe { (**self).reattach() };
    }

    fn hash_probe() -> u64 {
        T::hash_probe()
    }
}

#[cfg(feature = "hashbrown")]
mod maps {
    use std::hash::{BuildHasher, Hash};

    use super::*;
    use crate::store::alloc::{StoreMap, StoreSet};

    /// The key hashed by [`PersistHasher::probe`].
    const PROBE_KEY: u64 = 0x6d6d_6170_7665_6321;
    /// The seed it is hashed with.
    const PROBE_SEED: u64 = 0x7374_6f72_6521;

    // SAFETY: a `FixedState` is one `u64` seed; its hashes depend on that and the data only.
    unsafe impl PersistHasher for foldhash::fast::FixedState {
        const LAYOUT: u64 = type_fingerprint("foldhash::fast::FixedState", 8, 8);

        fn probe() -> u64 {
            let state = foldhash::fast::FixedState::with_seed(PROBE_SEED);
            fingerprint(&[state.hash_one(PROBE_KEY), state.hash_one("mmapvec")])
        }
    }

    // SAFETY: as for `fast::FixedState`.
    unsafe impl PersistHasher for foldhash::quality::FixedState {
        const LAYOUT: u64 = type_fingerprint("foldhash::quality::FixedState", 8, 8);

        fn probe() -> u64 {
            let state = foldhash::quality::FixedState::with_seed(PROBE_SEED);
            fingerprint(&[state.hash_one(PROBE_KEY), state.hash_one("mmapvec")])
        }
    }

    /// A table with no allocation points to a static of hashbrown's (its empty control
    /// group), at an address of the process that made it: replaced by a fresh empty table.
    /// Keys are never reattached: they are not mutable in place.
    // SAFETY: the table (control bytes and buckets) is a block of the store; keys, values and
    // the hasher are `Persist`; `reattach` replaces the static pointer of an empty table and
    // reaches every value.
    unsafe impl<'s, K: Persist<'s> + Eq + Hash, V: Persist<'s>, S: PersistHasher> Persist<'s>
        for StoreMap<'s, K, V, S>
    {
        const LAYOUT: u64 = fingerprint(&[
            hash_str("hashbrown::HashMap"),
            K::LAYOUT,
            V::LAYOUT,
            S::LAYOUT,
            size_of::<StoreMap<'static, u64, u64, foldhash::fast::FixedState>>() as u64,
        ]);
        const HAS_STATICS: bool = true;

        unsafe fn reattach(&mut self) {
            const { assert!(!K::HAS_STATICS, "map keys that hold maps cannot be kept") };
            if self.allocation_size() == 0 {
                // No allocation: the table points to the static. (`capacity() == 0` is also
                // true of an allocated table whose every slot was deleted, which must be
                // kept, or its block would leak.) `allocation_size`, `hasher` and `allocator`
                // read the table's counts and fields, never its control bytes. The old table
                // is not dropped: with no allocation its drop frees nothing.
                // SAFETY: `self` is valid for reads and writes; the hasher is moved out once
                // and into the new table, the allocator is `Copy`.
                unsafe {
                    let hasher = std::ptr::read(self.hasher());
                    let alloc = *self.allocator();
                    std::ptr::write(self, StoreMap::with_hasher_in(hasher, alloc));
                }
            } else if V::HAS_STATICS {
                for v in self.values_mut() {
                    // SAFETY: forwarded: part of a value just reopened.
                    unsafe { v.reattach() };
                }
            }
        }

        fn hash_probe() -> u64 {
            fingerprint(&[S::probe(), K::hash_probe(), V::hash_probe()])
        }
    }

    // SAFETY: as for the map (a set is a map with `()` values).
    unsafe impl<'s, T: Persist<'s> + Eq + Hash, S: PersistHasher> Persist<'s> for StoreSet<'s, T, S> {
        const LAYOUT: u64 = fingerprint(&[
            hash_str("hashbrown::HashSet"),
            T::LAYOUT,
            S::LAYOUT,
            size_of::<StoreSet<'static, u64, foldhash::fast::FixedState>>() as u64,
        ]);
        const HAS_STATICS: bool = true;

        unsafe fn reattach(&mut self) {
            const {
                assert!(
                    !T::HAS_STATICS,
                    "set elements that hold maps cannot be kept"
                )
            };
            if self.allocation_size() == 0 {
                // SAFETY: as for the map.
                unsafe {
                    let hasher = std::ptr::read(self.hasher());
                    let alloc = *self.allocator();
                    std::ptr::write(self, StoreSet::with_hasher_in(hasher, alloc));
                }
            }
        }

        fn hash_probe() -> u64 {
            fingerprint(&[S::probe(), T::hash_probe()])
        }
    }
}
