//! The `nightly` feature: `MmapAllocator` implements `core::alloc::Allocator`, so std's own
//! collections take it, and `MmapVec` is std's `Vec`.
//!
//! Run with `cargo +nightly test --features nightly --test nightly` (or `scripts/check-nightly`).
#![cfg(feature = "nightly")]
#![cfg_attr(feature = "nightly", feature(allocator_api))]

use std::collections::VecDeque;
use std::rc::Rc;

use mmapvec::{MmapAllocator, MmapVec, mmap_vec};

/// An allocator of its own per test, so that each test's counters are its own; one segment
/// per allocation (no small-block tier, no reuse), so the counters count each block.
fn allocator() -> MmapAllocator {
    MmapAllocator::builder()
        .small_threshold(0)
        .reuse_bytes(0)
        .build()
        .expect("an allocator in the temp directory")
}

#[test]
fn std_vec_grows_in_one_segment() {
    let alloc = allocator();
    let mut v = std::vec::Vec::new_in(alloc.clone());
    for i in 0..1_000_000u64 {
        v.push(i * 3);
    }
    assert_eq!(v.len(), 1_000_000);
    assert!(v.iter().enumerate().all(|(i, &x)| x == i as u64 * 3));

    let stats = alloc.stats();
    assert_eq!(stats.live_segments, 1);
    assert_eq!(stats.creates, 1, "every grow resized the one segment");
    assert!(stats.grows_remapped + stats.grows_mapped_again > 0);
    assert!(stats.mapped_bytes >= (v.capacity() * size_of::<u64>()) as u64);

    v.truncate(10);
    v.shrink_to_fit();
    assert_eq!(v, [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]);
    assert!(alloc.stats().shrinks > 0);
    // Down to one page (whatever its size): from 8 MB to at most 64 KiB.
    assert!(alloc.stats().mapped_bytes <= 1 << 16);

    drop(v);
    assert_eq!(alloc.stats().live_segments, 0);
}

#[test]
fn mmap_vec_is_std_vec() {
    let alloc = allocator();
    let v: std::vec::Vec<u32, MmapAllocator> = mmap_vec![in alloc.clone(); 1, 2, 3];
    let mut same: MmapVec<u32> = v;
    same.extend_from_within(..);
    assert_eq!(same, [1, 2, 3, 1, 2, 3]);
    // std's `Vec` methods that allocator-api2's stable copy lacks work too.
    let mut evens = std::vec::Vec::new_in(alloc.clone());
    evens.extend(same.extract_if(.., |x| *x % 2 == 0));
    assert_eq!(same.pop_if(|x| *x == 3), Some(3));
    assert_eq!(evens, [2, 2]);
    assert_eq!(same, [1, 3, 1]);
    assert_eq!(alloc.stats().live_segments, 2);
}

#[test]
fn boxes_live_in_segments() {
    let alloc = allocator();
    let small = Box::new_in(42u64, alloc.clone());
    let big = Box::new_in([7u8; 1 << 16], alloc.clone());
    assert_eq!(*small, 42);
    assert!(big.iter().all(|&b| b == 7));
    let stats = alloc.stats();
    assert_eq!(stats.live_segments, 2);
    // Two segments, each page-rounded: the box of 8 bytes takes a page of its own.
    assert!(stats.mapped_bytes > 1 << 16);

    let slice: Box<[u64], MmapAllocator> =
        mmap_vec![in alloc.clone(); 5u64; 1000].into_boxed_slice();
    assert_eq!(slice.iter().sum::<u64>(), 5000);
    drop((small, big, slice));
    assert_eq!(alloc.stats().live_segments, 0);
}

#[test]
fn other_std_collections() {
    let alloc = allocator();
    let mut queue = VecDeque::new_in(alloc.clone());
    queue.extend(0..10_000u32);
    queue.rotate_left(5000);
    assert_eq!(queue.front(), Some(&5000));
    assert_eq!(queue.pop_back(), Some(4999));

    let shared = Rc::new_in(String::from("in a segment"), alloc.clone());
    let other = Rc::clone(&shared);
    assert_eq!(*other, "in a segment");
    assert_eq!(alloc.stats().live_segments, 2);
    drop((queue, shared, other));
    assert_eq!(alloc.stats().live_segments, 0);
}

#[test]
fn hashbrown_still_takes_it() {
    let alloc = allocator();
    let mut map = hashbrown::HashMap::with_capacity_in(1000, alloc.clone());
    for i in 0..1000u32 {
        map.insert(i, i.to_string());
    }
    assert_eq!(map[&999], "999");
    assert_eq!(alloc.stats().creates, 1);
}
