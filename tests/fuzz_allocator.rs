//! Random programs of allocator operations (allocate, allocate_zeroed, grow, grow_zeroed, shrink,
//! deallocate) run against a model that knows every byte of every live block.
//!
//! Sizes go from 0 to a few MiB and alignments from 1 byte to 4 MiB. Each block is filled with
//! a pattern of its own; after every step every byte of every live block is compared with the
//! model, and regions that must read as zeros (a zeroed allocation, the new part of a zeroed
//! grow) are checked before they are filled. Each program also writes into the slack that a
//! block has past its requested size, which a later `grow_zeroed` must clear. Both grow
//! strategies run with both tiers (small blocks from shared chunk files, large ones a segment
//! each), with segments only, with a low small threshold (so blocks cross between the tiers
//! both ways), and with a heap threshold.
//!
//! Quick by default; `MMAPVEC_FUZZ_CASES=N` runs `N` programs per configuration.
//! `MMAPVEC_FUZZ_REMAP_MAX_ALIGN=B` caps the alignments asked of the `Remap` strategy at `B`
//! bytes: `scripts/valgrind-test` sets it to the page size, because valgrind (3.19) loses track
//! of the grown part of a mapping moved by `mremap(MREMAP_FIXED)`, the path `Remap` takes for
//! alignments above a page, and reports every access to it (RELIABILITY.md has the details).

use std::ptr::NonNull;

use allocator_api2::alloc::{Allocator, Layout};
use mmapvec::{GrowStrategy, MmapAllocator};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

/// Programs per configuration unless `MMAPVEC_FUZZ_CASES` says otherwise.
const QUICK_CASES: u32 = 24;
const MAX_SIZE: usize = 4 << 20;
const MAX_ALIGN_SHIFT: u8 = 22;
const HEAP_THRESHOLD: usize = 64 << 10;
/// The default `small_threshold`: blocks up to it come from the small-block tier.
const SMALL_DEFAULT: usize = 64 << 10;

#[derive(Clone, Debug)]
enum Op {
    Allocate {
        size: usize,
        align_shift: u8,
        zeroed: bool,
    },
    /// Grows block `slot % live` by `extra` bytes.
    Grow {
        slot: usize,
        extra: usize,
        align_shift: u8,
        zeroed: bool,
    },
    /// Shrinks block `slot % live` to `keep / 1000` of its size.
    Shrink {
        slot: usize,
        keep: u16,
        align_shift: u8,
    },
    Deallocate {
        slot: usize,
    },
    /// Writes a marker into the slack past the requested size of block `slot % live`.
    DirtySlack {
        slot: usize,
    },
}

fn size() -> impl Strategy<Value = usize> {
    prop_oneof![
        4 => 0usize..=64,
        4 => 0usize..=(16 << 10),
        2 => 0usize..=(1 << 20),
        1 => 0usize..=MAX_SIZE,
    ]
}

/// Alignments as powers of two, mostly small, up to `1 << max`.
fn align_shift(max: u8) -> impl Strategy<Value = u8> {
    prop_oneof![
        6 => 0u8..=max.min(4),
        3 => max.min(5)..=max.min(16),
        1 => max.min(17)..=max,
    ]
}

fn op(max_align_shift: u8) -> impl Strategy<Value = Op> {
    let align_shift = || align_shift(max_align_shift);
    prop_oneof![
        4 => (size(), align_shift(), any::<bool>())
            .prop_map(|(size, align_shift, zeroed)| Op::Allocate { size, align_shift, zeroed }),
        3 => (any::<usize>(), size(), align_shift(), any::<bool>()).prop_map(
            |(slot, extra, align_shift, zeroed)| Op::Grow { slot, extra, align_shift, zeroed }
        ),
        2 => (any::<usize>(), 0u16..=1000, align_shift())
            .prop_map(|(slot, keep, align_shift)| Op::Shrink { slot, keep, align_shift }),
        2 => any::<usize>().prop_map(|slot| Op::Deallocate { slot }),
        1 => any::<usize>().prop_map(|slot| Op::DirtySlack { slot }),
    ]
}

fn program(max_align_shift: u8) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(op(max_align_shift), 1..40)
}

/// The byte at `offset` of the block with pattern `id`: a cycle of 251 bytes (a prime, so it
/// never lines up with pages), shifted per block.
fn pattern(id: u32, from: usize, to: usize) -> Vec<u8> {
    const CYCLE: usize = 251;
    let table: Vec<u8> = (0..2 * CYCLE).map(|i| (i % CYCLE) as u8 ^ 0x5A).collect();
    let mut out = Vec::with_capacity(to - from);
    let mut at = from;
    while at < to {
        let start = (at + id as usize * 97) % CYCLE;
        let n = (CYCLE - start).min(to - at);
        out.extend_from_slice(&table[start..start + n]);
        at += n;
    }
    out
}

/// A live block and what it must hold.
struct Block {
    ptr: NonNull<u8>,
    layout: Layout,
    /// The length the allocator returned (at least `layout.size()`).
    usable: usize,
    /// The block's bytes `[0, layout.size())` as the model knows them.
    expect: Vec<u8>,
    id: u32,
}

impl Block {
    fn bytes(&self) -> &[u8] {
        // SAFETY: the block is currently allocated with `layout`, so `layout.size()` bytes
        // from `ptr` are readable; nothing writes to them while this borrow lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    /// Writes the block's pattern to `[from, size)`, in the block and in the model.
    fn fill_from(&mut self, from: usize) {
        let size = self.layout.size();
        let fresh = pattern(self.id, from, size);
        // SAFETY: `[from, size)` lies inside the block, which the model owns alone.
        unsafe {
            std::ptr::copy_nonoverlapping(fresh.as_ptr(), self.ptr.as_ptr().add(from), fresh.len())
        };
        self.expect.truncate(from);
        self.expect.extend_from_slice(&fresh);
    }
}

fn layout(size: usize, align_shift: u8) -> Layout {
    Layout::from_size_align(size, 1 << align_shift).expect("valid layout")
}

/// Checks what the allocator returned for `layout`: long enough and aligned.
fn check_returned(
    block: NonNull<[u8]>,
    layout: Layout,
) -> Result<(NonNull<u8>, usize), TestCaseError> {
    let ptr = block.cast::<u8>();
    prop_assert!(
        block.len() >= layout.size(),
        "{} bytes returned for {layout:?}",
        block.len()
    );
    prop_assert_eq!(
        ptr.as_ptr().addr() % layout.align(),
        0,
        "misaligned for {:?}",
        layout
    );
    Ok((ptr, block.len()))
}

fn check_zeros(bytes: &[u8], what: &str) -> Result<(), TestCaseError> {
    let zeros = [0u8; 4096];
    for chunk in bytes.chunks(zeros.len()) {
        prop_assert!(chunk == &zeros[..chunk.len()], "{} is not zeroed", what);
    }
    Ok(())
}

fn run(alloc: &MmapAllocator, program: &[Op]) -> Result<(), TestCaseError> {
    let mut live: Vec<Block> = Vec::new();
    let mut next_id = 0u32;
    let result = (|| {
        for op in program {
            step(alloc, &mut live, &mut next_id, op)?;
            for (i, block) in live.iter().enumerate() {
                prop_assert!(
                    block.bytes() == &block.expect[..],
                    "block {} differs after {:?}",
                    i,
                    op
                );
            }
        }
        Ok(())
    })();
    for block in live.drain(..) {
        // SAFETY: each block is currently allocated with its layout and freed once.
        unsafe { alloc.deallocate(block.ptr, block.layout) };
    }
    result?;
    let stats = alloc.stats();
    prop_assert_eq!(
        stats.failures.total(),
        0,
        "{:?}: {:?}",
        stats,
        alloc.take_last_error()
    );
    prop_assert_eq!(
        (
            stats.live_segments,
            stats.mapped_bytes,
            stats.heap_allocations
        ),
        (0, 0, 0)
    );
    Ok(())
}

fn step(
    alloc: &MmapAllocator,
    live: &mut Vec<Block>,
    next_id: &mut u32,
    op: &Op,
) -> Result<(), TestCaseError> {
    match *op {
        Op::Allocate {
            size,
            align_shift,
            zeroed,
        } => {
            let layout = layout(size, align_shift);
            let block = if zeroed {
                alloc.allocate_zeroed(layout)
            } else {
                alloc.allocate(layout)
            };
            let block = block.map_err(|_| {
                TestCaseError::fail(format!(
                    "allocate {layout:?}: {:?}",
                    alloc.take_last_error()
                ))
            })?;
            let (ptr, usable) = check_returned(block, layout)?;
            *next_id += 1;
            let mut block = Block {
                ptr,
                layout,
                usable,
                expect: Vec::new(),
                id: *next_id,
            };
            if zeroed {
                check_zeros(block.bytes(), "allocate_zeroed")?;
            }
            block.fill_from(0);
            live.push(block);
        }
        Op::Grow {
            slot,
            extra,
            align_shift,
            zeroed,
        } if !live.is_empty() => {
            let i = slot % live.len();
            let block = &mut live[i];
            let old = block.layout;
            let new = layout(old.size() + extra, align_shift);
            // SAFETY: the block is currently allocated with `old`, and `new` is no smaller.
            let grown = unsafe {
                if zeroed {
                    alloc.grow_zeroed(block.ptr, old, new)
                } else {
                    alloc.grow(block.ptr, old, new)
                }
            };
            let grown = grown.map_err(|_| {
                TestCaseError::fail(format!(
                    "grow {old:?} to {new:?}: {:?}",
                    alloc.take_last_error()
                ))
            })?;
            let (ptr, usable) = check_returned(grown, new)?;
            block.ptr = ptr;
            block.layout = new;
            block.usable = usable;
            // SAFETY: the grown block holds `new.size()` bytes.
            let bytes = unsafe { std::slice::from_raw_parts(ptr.as_ptr(), new.size()) };
            prop_assert!(bytes[..old.size()] == block.expect[..], "grow lost bytes");
            if zeroed {
                check_zeros(&bytes[old.size()..], "the new part of grow_zeroed")?;
            }
            block.fill_from(old.size());
        }
        Op::Shrink {
            slot,
            keep,
            align_shift,
        } if !live.is_empty() => {
            let i = slot % live.len();
            let block = &mut live[i];
            let old = block.layout;
            let new = layout(old.size() * keep as usize / 1000, align_shift);
            // SAFETY: the block is currently allocated with `old`, and `new` is no larger.
            let shrunk = unsafe { alloc.shrink(block.ptr, old, new) };
            let shrunk = shrunk.map_err(|_| {
                TestCaseError::fail(format!(
                    "shrink {old:?} to {new:?}: {:?}",
                    alloc.take_last_error()
                ))
            })?;
            let (ptr, usable) = check_returned(shrunk, new)?;
            block.ptr = ptr;
            block.layout = new;
            block.usable = usable;
            block.expect.truncate(new.size());
        }
        Op::Deallocate { slot } if !live.is_empty() => {
            let block = live.swap_remove(slot % live.len());
            // SAFETY: the block is currently allocated with its layout; it leaves the model.
            unsafe { alloc.deallocate(block.ptr, block.layout) };
        }
        Op::DirtySlack { slot } if !live.is_empty() => {
            let block = &live[slot % live.len()];
            let (size, usable) = (block.layout.size(), block.usable);
            // The returned length is the caller's to use: dirty up to a page of it.
            let end = usable.min(size + 4096);
            // SAFETY: `[size, end)` lies inside the returned block; the model does not track it.
            unsafe { block.ptr.as_ptr().add(size).write_bytes(0xEE, end - size) };
        }
        // Operations on a block when none is live are skipped.
        _ => {}
    }
    Ok(())
}

/// The largest alignment (as a power of two) asked of `strategy`.
fn max_align_shift(strategy: GrowStrategy) -> u8 {
    match std::env::var("MMAPVEC_FUZZ_REMAP_MAX_ALIGN") {
        Ok(bytes) if strategy == GrowStrategy::Remap => {
            let bytes: usize = bytes
                .parse()
                .expect("MMAPVEC_FUZZ_REMAP_MAX_ALIGN must be a number");
            assert!(
                bytes.is_power_of_two(),
                "MMAPVEC_FUZZ_REMAP_MAX_ALIGN must be a power of two"
            );
            (bytes.trailing_zeros() as u8).min(MAX_ALIGN_SHIFT)
        }
        _ => MAX_ALIGN_SHIFT,
    }
}

fn cases() -> u32 {
    match std::env::var("MMAPVEC_FUZZ_CASES") {
        Ok(n) => n.parse().expect("MMAPVEC_FUZZ_CASES must be a number"),
        Err(_) => QUICK_CASES,
    }
}

/// Runs random programs, each on a fresh allocator with these settings, in a directory of
/// its own; then checks that no file is left.
fn fuzz(label: &str, strategy: GrowStrategy, heap_threshold: usize, small_threshold: usize) {
    let base = std::env::temp_dir().join(format!("mmapvec-fuzz-{}-{label}", std::process::id()));
    std::fs::create_dir(&base).expect("create the fuzz directory");
    let config = Config {
        cases: cases(),
        // Failures are reported with the shrunk program; nothing is written to the source tree.
        failure_persistence: None,
        ..Config::default()
    };
    let mut runner = TestRunner::new(config);
    let result = runner.run(&program(max_align_shift(strategy)), |program| {
        let alloc = MmapAllocator::builder()
            .dir(&base)
            .grow_strategy(strategy)
            .heap_threshold(heap_threshold)
            .small_threshold(small_threshold)
            .build()
            .expect("build");
        run(&alloc, &program)
    });
    let leftovers = std::fs::read_dir(base.join(format!("mmapvec-{}", euid())))
        .map(|entries| entries.count())
        .unwrap_or(0);
    std::fs::remove_dir_all(&base).expect("remove the fuzz directory");
    if let Err(e) = result {
        panic!("{label}: {e}");
    }
    assert_eq!(leftovers, 0, "{label}: files left in the segment folder");
}

/// The effective user id (names the crate's folder `mmapvec-<uid>`).
fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[test]
fn remap_both_tiers() {
    fuzz("remap", GrowStrategy::Remap, 0, SMALL_DEFAULT);
}

#[test]
fn remap_segments_only() {
    fuzz("remap-segments", GrowStrategy::Remap, 0, 0);
}

#[test]
fn remap_low_small_threshold() {
    // Most programs cross the tiers' boundary, both ways.
    fuzz("remap-small-4k", GrowStrategy::Remap, 0, 4096);
}

#[test]
fn remap_with_heap_threshold() {
    fuzz(
        "remap-heap",
        GrowStrategy::Remap,
        HEAP_THRESHOLD,
        SMALL_DEFAULT,
    );
}

#[test]
fn map_again_both_tiers() {
    fuzz("mapagain", GrowStrategy::MapAgain, 0, SMALL_DEFAULT);
}

#[test]
fn map_again_segments_only() {
    fuzz("mapagain-segments", GrowStrategy::MapAgain, 0, 0);
}

#[test]
fn map_again_with_heap_threshold() {
    fuzz("mapagain-heap", GrowStrategy::MapAgain, HEAP_THRESHOLD, 0);
}
