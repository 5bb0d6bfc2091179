//! What a store's bytes mean to the code that reads them, as one fingerprint kept in the
//! header and compared at every open ([`StoreError::OtherBuild`](super::StoreError)).
//!
//! The store keeps `Vec`s, `Box`es and hashbrown tables as they lie in memory. Their field order
//! is the compiler's choice (`repr(Rust)`): another build may order them differently (a new
//! `rustc`, or `-Zrandomize-layout`), and its pointers would then be read as lengths. Instead
//! of refusing every other build (a fingerprint of `rustc -vV`: every toolchain update would
//! make every store unreadable), the fingerprint holds what a build must agree on:
//!
//! * **the layouts themselves**, probed at run time: a `Vec`, a `Box` and a hashbrown map are
//!   made with known contents (an allocator whose value is a marker, a capacity, a length, a
//!   number of items...), and the position of each field is found among their words;
//! * the crate's on-disk format: the header's version and the small blocks' size classes;
//! * the target's pointer width and byte order.
//!
//! The probes use an allocator of their own, one word wide like the store's: `rustc` chooses
//! (and `-Zrandomize-layout` shuffles) the order of a generic type's fields per definition,
//! the same for every instantiation of the same shape. The layouts of the user's own types
//! are checked per root by [`Persist::LAYOUT`](super::Persist), which holds their fields'
//! offsets.

use std::ptr::NonNull;

use allocator_api2::alloc::{AllocError, Allocator, Global, Layout};

/// An allocator for the probes: the heap's, with a marker as its one word (never
/// dereferenced), so that the allocator's field can be told from the others.
#[derive(Clone, Copy)]
struct Marked(#[allow(dead_code)] NonNull<u8>);

const MARKER: usize = 0x5a5a_5a5a_5a58;

impl Marked {
    fn new() -> Marked {
        Marked(NonNull::new(std::ptr::without_provenance_mut(MARKER)).expect("non-zero"))
    }
}

// SAFETY: every call is forwarded to the global allocator, which keeps the contract; copies
// are the same allocator (they all forward to it).
unsafe impl Allocator for Marked {
    fn allocate(&self, layout: Layout) -> Result<NonNull<[u8]>, AllocError> {
        Global.allocate(layout)
    }

    unsafe fn deallocate(&self, ptr: NonNull<u8>, layout: Layout) {
        // SAFETY: forwarded: the block came from `Global` through `allocate`.
        unsafe { Global.deallocate(ptr, layout) }
    }
}

/// The words of `value` (which must be made of whole, initialized words: no padding).
fn words_of<T>(value: &T) -> Option<Vec<usize>> {
    if !size_of::<T>().is_multiple_of(size_of::<usize>()) || align_of::<T>() < align_of::<usize>() {
        return None;
    }
    let n = size_of::<T>() / size_of::<usize>();
    let base = (value as *const T).cast::<usize>();
    // SAFETY: `value` is `n` words long and word-aligned (checked); the probes' types are
    // made of word-sized fields only (pointers, `usize`s, a `u64` hasher seed, zero-sized
    // markers), so every word is initialized.
    Some((0..n).map(|i| unsafe { base.add(i).read() }).collect())
}

/// Which word of `value` the field at `field` is.
fn word_index<T, F>(value: &T, field: &F) -> usize {
    ((field as *const F).addr() - (value as *const T).addr()) / size_of::<usize>()
}

/// Names each word of a probe: `known` pairs a value with its name; a word at `at` is named
/// by `placed`; anything else is `?`.
fn signature(words: &[usize], placed: &[(usize, char)], known: &[(usize, char)]) -> String {
    words
        .iter()
        .enumerate()
        .map(|(i, &w)| {
            placed
                .iter()
                .find(|&&(at, _)| at == i)
                .or_else(|| known.iter().find(|&&(v, _)| v == w))
                .map_or('?', |&(_, name)| name)
        })
        .collect()
}

/// The layouts of `Vec`, `Box` and hashbrown's map in this build, as a string of field names
/// per type (`p` pointer, `c` capacity, `l` length, `a` allocator, ...), with sizes.
pub(super) fn probes() -> String {
    let mut out = String::new();
    // Vec: capacity 5, length 3.
    let mut v: allocator_api2::vec::Vec<u64, Marked> =
        allocator_api2::vec::Vec::with_capacity_in(5, Marked::new());
    v.extend([1, 2, 3]);
    let at = word_index(&v, v.allocator());
    let known = [
        (v.as_ptr().addr(), 'p'),
        (v.capacity(), 'c'),
        (v.len(), 'l'),
    ];
    match words_of(&v) {
        Some(words) => out += &signature(&words, &[(at, 'a')], &known),
        None => out += "?",
    }
    out += &format!(":{};", size_of_val(&v));
    drop(v);
    // Box.
    let b = allocator_api2::boxed::Box::new_in(7u64, Marked::new());
    let at = word_index(&b, allocator_api2::boxed::Box::allocator(&b));
    let ptr = (&*b as *const u64).addr();
    match words_of(&b) {
        Some(words) => out += &signature(&words, &[(at, 'a')], &[(ptr, 'p')]),
        None => out += "?",
    }
    out += &format!(":{};", size_of_val(&b));
    drop(b);
    #[cfg(feature = "hashbrown")]
    {
        // A map of 5 items in 8 buckets: mask 7, room for 2 more, 5 items; the control
        // pointer is the one word left.
        let mut m: hashbrown::HashMap<u64, u64, foldhash::fast::FixedState, Marked> =
            hashbrown::HashMap::with_capacity_and_hasher_in(5, Default::default(), Marked::new());
        m.extend((0..5).map(|i| (i, i)));
        let placed = [
            (word_index(&m, m.allocator()), 'a'),
            (word_index(&m, m.hasher()), 'h'),
        ];
        // hashbrown's capacity is `items + growth_left`: the bucket mask itself under 8
        // buckets, seven eighths of the buckets above.
        let capacity = m.capacity();
        let mask = if capacity < 8 {
            capacity
        } else {
            capacity / 7 * 8 - 1
        };
        let known = [(mask, 'm'), (m.capacity() - m.len(), 'g'), (m.len(), 'i')];
        match words_of(&m) {
            Some(words) => out += &signature(&words, &placed, &known),
            None => out += "?",
        }
        out += &format!(":{};", size_of_val(&m));
    }
    out
}

/// The fingerprint a store records and compares: the probes, the header's format version,
/// the small blocks' size classes, the pointer width and the byte order.
pub(super) fn fingerprint() -> u64 {
    let mut parts = vec![
        super::persist::hash_str(&probes()),
        u64::from(super::VERSION),
        usize::BITS as u64,
        u64::from(cfg!(target_endian = "little")),
    ];
    parts.extend(crate::arena::class_sizes().map(|s| s as u64));
    super::persist::fingerprint(&parts)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every word of every probe is named, and each name once: the probes can tell any order
    /// of the fields from any other.
    #[test]
    fn every_field_is_found() {
        let probes = probes();
        for part in probes.split(';').filter(|p| !p.is_empty()) {
            let (names, _) = part.split_once(':').unwrap();
            let mut seen = std::collections::HashSet::new();
            let unknown = names.chars().filter(|&c| c == '?').count();
            assert!(unknown <= 1, "{probes}");
            assert!(names.chars().all(|c| seen.insert(c)), "{probes}");
        }
        // rustc 1.95 on x86-64 lays them out as `pacl:32;pa:16;?mgiah:48;` (the `?` is the
        // control pointer): whatever the order, each field is found.
        assert!(
            probes.contains(";pa:16;") || probes.contains(";ap:16;"),
            "{probes}"
        );
        assert_eq!(fingerprint(), fingerprint());
    }
}
