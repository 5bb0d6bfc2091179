#![doc = include_str!("../README.md")]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![cfg_attr(feature = "nightly", feature(allocator_api))]
// With `nightly`, `Vec::new_in` and friends are std's unstable ones: doc tests need the gate too.
#![doc(test(attr(cfg_attr(feature = "nightly", feature(allocator_api)))))]

#[cfg(not(unix))]
compile_error!("mmapvec needs a unix system (mmap); see the README's platform table");

pub use allocator_api2;

mod allocator;
mod arena;
mod builder;
mod creator;
mod fork;
mod hash;
mod logging;
mod release;
mod reuse;
mod segment;
mod stats;
// Linux only: a store keeps its views out of fork children with `MADV_DONTFORK`; elsewhere a
// child would share them and could write its parent's store.
#[cfg(target_os = "linux")]
pub mod store;
mod sys;
mod table;

pub use allocator::MmapAllocator;
pub use builder::Builder;
pub use creator::{DirCreator, SegmentCreator, SegmentFile, SegmentRequest};
pub use segment::{AccessPattern, GrowStrategy};
pub use stats::{FailureCause, Failures, SmallStats, Stats};

use allocator_api2::collections::TryReserveError;

/// The process-wide locks of the modules above `fork` (the bottom of the crate), in the order
/// the prepare handler takes them: the release queue, the decay thread's watch, the open
/// store's record.
#[cfg(target_os = "linux")]
static FORK_LAYERS: [&dyn fork::ForkLocks; 3] = [&release::FORK, &reuse::timer::FORK, &store::FORK];
#[cfg(not(target_os = "linux"))]
static FORK_LAYERS: [&dyn fork::ForkLocks; 2] = [&release::FORK, &reuse::timer::FORK];

/// Installs the fork handlers (once per process) with the crate's layers: called whenever an
/// allocator or a store is made, before it maps anything.
pub(crate) fn install_fork_handlers() {
    fork::install(&FORK_LAYERS);
}

/// A vector whose buffer lives in a memory-mapped file: `allocator_api2::vec::Vec` with
/// [`MmapAllocator`]. Everything `Vec` has, it has.
///
/// ```
/// use mmapvec::{MmapAllocator, MmapVec};
/// let mut v: MmapVec<u32> = MmapVec::new_in(MmapAllocator::default());
/// v.extend_from_slice(&[3, 1, 2]);
/// v.sort();
/// assert_eq!(v, [1, 2, 3]);
/// ```
pub type MmapVec<T> = allocator_api2::vec::Vec<T, MmapAllocator>;

/// Short constructors for [`MmapVec`] on the default allocator (`Vec::new` and
/// `Vec::with_capacity` exist only for the global heap).
///
/// ```
/// use mmapvec::{MmapVec, MmapVecExt};
/// let mut v = MmapVec::<u64>::with_capacity_mmap(1000);
/// assert!(v.capacity() >= 1000);
/// v.push(1);
/// let empty = MmapVec::<u8>::new_mmap();
/// assert!(empty.is_empty());
/// ```
pub trait MmapVecExt: Sized {
    /// An empty vector on [`MmapAllocator::default()`]; no segment until the first push.
    fn new_mmap() -> Self;
    /// An empty vector with room for `capacity` elements in one segment.
    ///
    /// # Panics
    /// If the segment cannot be made, like `Vec::with_capacity` (through the alloc error
    /// handler). Use [`try_with_capacity_mmap`](MmapVecExt::try_with_capacity_mmap) to handle it.
    fn with_capacity_mmap(capacity: usize) -> Self;
    /// Like [`with_capacity_mmap`](MmapVecExt::with_capacity_mmap), returning an error instead
    /// of aborting when the segment cannot be made.
    fn try_with_capacity_mmap(capacity: usize) -> Result<Self, TryReserveError>;
}

impl<T> MmapVecExt for MmapVec<T> {
    fn new_mmap() -> Self {
        MmapVec::new_in(MmapAllocator::default())
    }

    fn with_capacity_mmap(capacity: usize) -> Self {
        MmapVec::with_capacity_in(capacity, MmapAllocator::default())
    }

    fn try_with_capacity_mmap(capacity: usize) -> Result<Self, TryReserveError> {
        let mut v = MmapVec::new_in(MmapAllocator::default());
        v.try_reserve_exact(capacity)?;
        Ok(v)
    }
}

/// Builds an [`MmapVec`] like `vec!`: `mmap_vec![]`, `mmap_vec![a, b, c]`, `mmap_vec![x; n]`, on
/// the default allocator, or on one of yours with `in alloc;` first.
///
/// ```
/// use mmapvec::{mmap_vec, MmapAllocator};
/// let a = mmap_vec![1, 2, 3];
/// let b = mmap_vec![0u8; 4096];
/// let c: mmapvec::MmapVec<String> = mmap_vec![];
/// let d = mmap_vec![in MmapAllocator::default(); 'x', 'y'];
/// assert_eq!(a, [1, 2, 3]);
/// assert_eq!(b.len(), 4096);
/// assert!(c.is_empty());
/// assert_eq!(d, ['x', 'y']);
/// ```
#[macro_export]
macro_rules! mmap_vec {
    (in $alloc:expr $(;)?) => {
        $crate::__new_in($alloc)
    };
    (in $alloc:expr; $elem:expr; $n:expr) => {
        $crate::__from_elem($elem, $n, $alloc)
    };
    (in $alloc:expr; $($x:expr),+ $(,)?) => {
        $crate::__from_array([$($x),+], $alloc)
    };
    () => {
        $crate::__new_in($crate::MmapAllocator::default())
    };
    ($elem:expr; $n:expr) => {
        $crate::__from_elem($elem, $n, $crate::MmapAllocator::default())
    };
    ($($x:expr),+ $(,)?) => {
        $crate::__from_array([$($x),+], $crate::MmapAllocator::default())
    };
}

// The macro calls this crate's functions rather than `Vec::new_in` itself: with `nightly`, `Vec`
// is std's, whose `new_in` is unstable at the call site (the user's crate).
#[doc(hidden)]
pub fn __new_in<T>(alloc: MmapAllocator) -> MmapVec<T> {
    MmapVec::new_in(alloc)
}

#[doc(hidden)]
pub fn __from_elem<T: Clone>(elem: T, n: usize, alloc: MmapAllocator) -> MmapVec<T> {
    let mut v = MmapVec::with_capacity_in(n, alloc);
    v.resize(n, elem);
    v
}

#[doc(hidden)]
pub fn __from_array<T, const N: usize>(items: [T; N], alloc: MmapAllocator) -> MmapVec<T> {
    let mut v = MmapVec::with_capacity_in(N, alloc);
    v.extend(items);
    v
}
