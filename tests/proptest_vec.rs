//! Property test: random programs of `Vec` operations run on an `MmapVec<u32>` and on a
//! `std::vec::Vec<u32>` (the model) must leave both with the same contents after every step,
//! with the allocator holding exactly the segment the vector's capacity needs. Both grow
//! strategies. 64 cases per strategy; set `MMAPVEC_PROPTEST_CASES` for more.

mod core_support;

use core_support::{TestDir, page};
use mmapvec::{GrowStrategy, MmapAllocator, MmapVec};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};

/// One step of a program. Indices are seeds, reduced modulo the current length when run, so
/// every generated program is valid.
#[derive(Clone, Debug)]
enum Op {
    Push(u32),
    Pop,
    Insert(usize, u32),
    Remove(usize),
    SwapRemove(usize),
    Truncate(usize),
    ExtendFromSlice(Vec<u32>),
    /// Appends `start..start + count`: large extends without large generated values.
    ExtendRange(u32, u16),
    Reserve(u16),
    ReserveExact(u16),
    ShrinkToFit,
    ShrinkTo(u16),
    Clear,
    Resize(u16, u32),
    /// Keeps the elements not divisible by the given number (2..=5).
    Retain(u32),
    /// Removes `a % (len + 1)..b % (len + 1)` (ordered) through `drain`.
    Drain(usize, usize),
    /// Splits at `i % (len + 1)` into a second vector (its own segment), checks it, and
    /// appends it back when the flag is set (else drops it).
    SplitOff(usize, bool),
    /// Clones the vector (a second segment) and checks the clone.
    Clone,
    Dedup,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => any::<u32>().prop_map(Op::Push),
        2 => Just(Op::Pop),
        2 => (any::<usize>(), any::<u32>()).prop_map(|(i, x)| Op::Insert(i, x)),
        2 => any::<usize>().prop_map(Op::Remove),
        1 => any::<usize>().prop_map(Op::SwapRemove),
        1 => any::<usize>().prop_map(Op::Truncate),
        2 => prop::collection::vec(any::<u32>(), 0..200).prop_map(Op::ExtendFromSlice),
        2 => (any::<u32>(), any::<u16>()).prop_map(|(s, n)| Op::ExtendRange(s, n)),
        1 => any::<u16>().prop_map(Op::Reserve),
        1 => any::<u16>().prop_map(Op::ReserveExact),
        1 => Just(Op::ShrinkToFit),
        1 => any::<u16>().prop_map(Op::ShrinkTo),
        1 => Just(Op::Clear),
        1 => (any::<u16>(), any::<u32>()).prop_map(|(n, x)| Op::Resize(n, x)),
        1 => (2u32..=5).prop_map(Op::Retain),
        1 => (any::<usize>(), any::<usize>()).prop_map(|(a, b)| Op::Drain(a, b)),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(i, back)| Op::SplitOff(i, back)),
        1 => Just(Op::Clone),
        1 => Just(Op::Dedup),
    ]
}

/// Runs `op` on the vector under test and on the model.
fn apply(op: &Op, v: &mut MmapVec<u32>, model: &mut Vec<u32>) {
    let len = model.len();
    match op {
        Op::Push(x) => {
            v.push(*x);
            model.push(*x);
        }
        Op::Pop => assert_eq!(v.pop(), model.pop()),
        Op::Insert(i, x) => {
            let i = i % (len + 1);
            v.insert(i, *x);
            model.insert(i, *x);
        }
        Op::Remove(i) if len > 0 => assert_eq!(v.remove(i % len), model.remove(i % len)),
        Op::SwapRemove(i) if len > 0 => {
            assert_eq!(v.swap_remove(i % len), model.swap_remove(i % len));
        }
        Op::Remove(_) | Op::SwapRemove(_) => {}
        Op::Truncate(n) => {
            let n = n % (len + 2);
            v.truncate(n);
            model.truncate(n);
        }
        Op::ExtendFromSlice(items) => {
            v.extend_from_slice(items);
            model.extend_from_slice(items);
        }
        Op::ExtendRange(start, count) => {
            let range = *start..start.saturating_add(u32::from(*count));
            v.extend(range.clone());
            model.extend(range);
        }
        Op::Reserve(n) => {
            v.reserve(usize::from(*n));
            model.reserve(usize::from(*n));
            assert!(v.capacity() >= len + usize::from(*n));
        }
        Op::ReserveExact(n) => {
            v.reserve_exact(usize::from(*n));
            model.reserve_exact(usize::from(*n));
            assert!(v.capacity() >= len + usize::from(*n));
        }
        Op::ShrinkToFit => {
            v.shrink_to_fit();
            model.shrink_to_fit();
            assert_eq!(v.capacity(), len);
        }
        Op::ShrinkTo(n) => {
            let before = v.capacity();
            v.shrink_to(usize::from(*n));
            model.shrink_to(usize::from(*n));
            assert!(v.capacity() >= len.max(usize::from(*n)).min(before));
        }
        Op::Clear => {
            v.clear();
            model.clear();
        }
        Op::Resize(n, x) => {
            v.resize(usize::from(*n), *x);
            model.resize(usize::from(*n), *x);
        }
        Op::Retain(m) => {
            v.retain(|x| x % m != 0);
            model.retain(|x| x % m != 0);
        }
        Op::Drain(a, b) => {
            let (a, b) = (a % (len + 1), b % (len + 1));
            let range = a.min(b)..a.max(b);
            assert!(v.drain(range.clone()).eq(model.drain(range)));
        }
        Op::SplitOff(i, back) => {
            let i = i % (len + 1);
            let mut tail = v.split_off(i);
            let mut model_tail = model.split_off(i);
            assert_eq!(tail.as_slice(), model_tail.as_slice());
            if *back {
                v.append(&mut tail);
                model.append(&mut model_tail);
                assert!(tail.is_empty());
            }
        }
        Op::Clone => {
            let copy = v.clone();
            assert_eq!(copy.as_slice(), model.as_slice());
        }
        Op::Dedup => {
            v.dedup();
            model.dedup();
        }
    }
}

/// The small-block tier's largest block (the default `small_threshold`).
const SMALL: usize = 64 << 10;

/// Where the vector's buffer is: nowhere for no capacity; a block of the small-block tier up to
/// `small` bytes (its size class: at most a quarter more); else one segment sized to the
/// capacity.
fn check_segments(alloc: &MmapAllocator, v: &MmapVec<u32>, small: usize) {
    let stats = alloc.stats();
    let bytes = v.capacity() * 4;
    let in_tier = bytes > 0 && bytes <= small;
    assert_eq!(
        stats.live_segments,
        u64::from(bytes > 0 && !in_tier),
        "segments for capacity {}",
        v.capacity()
    );
    if in_tier {
        let used = stats.small.in_use_bytes as usize;
        assert!(
            used >= bytes && used <= bytes + bytes / 4 + 16,
            "{used} bytes in use for capacity {}",
            v.capacity()
        );
        assert_eq!(stats.mapped_bytes, 0);
    } else {
        assert_eq!(stats.small.in_use_bytes, 0);
        // Exactly the capacity, page-rounded; a segment taken from the reuse cache may be
        // longer (4 times, or 8 MiB more, at most).
        let rounded = bytes.next_multiple_of(page()) as u64;
        assert!(
            stats.mapped_bytes >= rounded
                && stats.mapped_bytes <= (4 * rounded).max(rounded + (8 << 20)),
            "{} mapped for {rounded}",
            stats.mapped_bytes
        );
        if stats.segments_reused == 0 {
            assert_eq!(stats.mapped_bytes, rounded);
        }
    }
    assert_eq!(stats.failures.total(), 0);
}

fn cases() -> u32 {
    match std::env::var("MMAPVEC_PROPTEST_CASES") {
        Ok(n) => n.parse().expect("MMAPVEC_PROPTEST_CASES must be a number"),
        Err(_) => 64,
    }
}

fn matches_the_model(strategy: GrowStrategy, small: usize) {
    let dir = TestDir::new("proptest");
    let alloc = MmapAllocator::builder()
        .dir(dir.path())
        .grow_strategy(strategy)
        .small_threshold(small)
        .build()
        .expect("build");
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        ..Config::default()
    });
    let programs = prop::collection::vec(op(), 1..60);
    runner
        .run(&programs, |program| {
            let mut v = MmapVec::new_in(alloc.clone());
            let mut model = Vec::new();
            for (step, op) in program.iter().enumerate() {
                apply(op, &mut v, &mut model);
                prop_assert_eq!(v.len(), model.len(), "len after step {} ({:?})", step, op);
                prop_assert!(
                    v.as_slice() == model.as_slice(),
                    "contents after step {step} ({op:?})"
                );
                prop_assert!(v.capacity() >= v.len());
                check_segments(&alloc, &v, small);
            }
            drop(v);
            prop_assert_eq!(alloc.stats().live_segments, 0);
            prop_assert_eq!(alloc.stats().small.in_use_bytes, 0);
            Ok(())
        })
        .unwrap_or_else(|e| panic!("{strategy:?}: {e}"));
    let stats = alloc.stats();
    assert!(stats.creates > 0);
    match strategy {
        GrowStrategy::Remap => assert!(stats.grows_remapped > 0 && stats.grows_mapped_again == 0),
        _ => assert!(stats.grows_mapped_again > 0 && stats.grows_remapped == 0),
    }
    assert!(dir.files().is_empty());
}

#[test]
fn matches_the_model_remap() {
    matches_the_model(GrowStrategy::Remap, SMALL);
}

#[test]
fn matches_the_model_segments_only() {
    matches_the_model(GrowStrategy::Remap, 0);
}

#[test]
fn matches_the_model_map_again() {
    matches_the_model(GrowStrategy::MapAgain, SMALL);
}
