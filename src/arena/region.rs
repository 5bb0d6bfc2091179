//! The address ranges the tier's chunks live in.
//!
//! The tier reserves address space (`PROT_NONE`, `MAP_NORESERVE`: no memory, no disk, but it
//! counts in the process's `VmSize`, which `RLIMIT_AS` caps) in *regions*, as it needs them:
//! [`FIRST`] bytes at the first small block, then regions as large as all before them
//! together, up to the tier's maximum ([`REGION`](super::REGION)) in [`MAX_REGIONS`] steps. So
//! a program with a few small blocks holds 1 GiB of address space per allocator, not 64 GiB,
//! and thousands of allocators fit in the address space. Under `RLIMIT_AS` a region takes at
//! most an eighth of what the limit leaves at the time, so regions follow the room there is.
//!
//! Chunks are numbered across regions in the order the regions were made: region *r* holds
//! the indices from the sum of the earlier regions' chunk counts on. Only the newest region
//! may be given back ([`Regions::pop`]), so the numbering of the others never changes.
//!
//! Readers (whether an address is the tier's, where a chunk is) take no lock: a region is
//! published whole, as one word (its base with its chunk count in the low bits, which a
//! chunk-aligned base leaves free), after it is reserved, and withdrawn before it is unmapped.

use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::CHUNK;

/// Regions a tier makes at most.
pub(super) const MAX_REGIONS: usize = 32;
/// The first region's length, where nothing limits the address space.
#[cfg(target_pointer_width = "64")]
pub(super) const FIRST: usize = 1 << 30;
/// 32-bit targets: a region that fits.
#[cfg(not(target_pointer_width = "64"))]
pub(super) const FIRST: usize = 64 << 20;
/// The smallest region made: 16 chunks.
pub(super) const MIN_LEN: usize = 16 * CHUNK;
/// The part of the address space left under `RLIMIT_AS` that one region may take.
const ADDRESS_SPACE_SHARE: usize = 8;

// A region's chunk count is kept in the low bits of its chunk-aligned base.
const _: () = assert!(super::REGION / CHUNK < CHUNK);

/// The regions of one tier. Changed only under the tier's `spare` lock (see `SmallTier`).
#[derive(Debug, Default)]
pub(super) struct Regions {
    /// `base | chunks` of each region, in the order made; the first `count` are live.
    slots: [AtomicUsize; MAX_REGIONS],
    count: AtomicUsize,
}

impl Regions {
    /// How many regions are live.
    pub(super) fn count(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// The live regions: base, first chunk index, chunk count.
    pub(super) fn iter(&self) -> impl Iterator<Item = (usize, usize, usize)> + '_ {
        let mut first = 0;
        self.slots[..self.count()].iter().map(move |slot| {
            let word = slot.load(Ordering::Acquire);
            let (base, chunks) = (word & !(CHUNK - 1), word & (CHUNK - 1));
            first += chunks;
            (base, first - chunks, chunks)
        })
    }

    /// Chunks in all live regions.
    pub(super) fn chunks(&self) -> usize {
        self.iter().map(|(_, _, chunks)| chunks).sum()
    }

    /// The index of the chunk holding `addr`, if a region holds it.
    #[inline]
    pub(super) fn locate(&self, addr: usize) -> Option<u32> {
        self.iter().find_map(|(base, first, chunks)| {
            let offset = addr.wrapping_sub(base);
            (offset < chunks * CHUNK).then(|| (first + offset / CHUNK) as u32)
        })
    }

    /// Where chunk `index` lives, if a region holds it.
    #[inline]
    pub(super) fn chunk_at(&self, index: u32) -> Option<NonNull<u8>> {
        let index = index as usize;
        self.iter().find_map(|(base, first, chunks)| {
            (index >= first && index < first + chunks)
                .then(|| NonNull::new((base + (index - first) * CHUNK) as *mut u8))
                .flatten()
        })
    }

    /// Publishes a region of `len` bytes (a multiple of `CHUNK`) just reserved at `base`
    /// (`CHUNK`-aligned). `false` if there is no slot left. Only under the tier's `spare` lock.
    pub(super) fn push(&self, base: NonNull<u8>, len: usize) -> bool {
        let count = self.count();
        let chunks = len / CHUNK;
        debug_assert!(base.as_ptr().addr().is_multiple_of(CHUNK) && chunks > 0);
        debug_assert!(chunks < CHUNK);
        if count == MAX_REGIONS {
            return false;
        }
        self.slots[count].store(base.as_ptr().addr() | chunks, Ordering::Release);
        self.count.store(count + 1, Ordering::Release);
        true
    }

    /// Withdraws the newest region and returns its base, first chunk index and chunk count,
    /// for the caller to unmap. Only under the tier's `spare` lock.
    pub(super) fn pop(&self) -> Option<(NonNull<u8>, usize, usize)> {
        let (base, first, chunks) = self.iter().last()?;
        self.count.fetch_sub(1, Ordering::AcqRel);
        Some((NonNull::new(base as *mut u8)?, first, chunks))
    }
}

/// The length of the next region: [`FIRST`], or as much as the regions made so far
/// (`reserved` bytes) for the reserved length to double, without passing `max` in all; cut to a
/// power of two no larger than an [`ADDRESS_SPACE_SHARE`]th of the address space `left` under
/// `RLIMIT_AS` (`None`: no limit). `None` when less than [`MIN_LEN`] may be had.
pub(super) fn next_len(reserved: usize, max: usize, left: Option<usize>) -> Option<usize> {
    let room = max.saturating_sub(reserved);
    let mut len = reserved.max(FIRST).min(room) / CHUNK * CHUNK;
    if let Some(left) = left {
        let share = left / ADDRESS_SPACE_SHARE;
        if len > share {
            // The largest power of two within the share (a multiple of CHUNK if not below it).
            len = share.checked_ilog2().map_or(0, |log| 1 << log);
        }
    }
    (len >= MIN_LEN).then_some(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_double_up_to_the_maximum() {
        let max = 64 << 30;
        let mut reserved = 0;
        let mut steps = Vec::new();
        while let Some(len) = next_len(reserved, max, None) {
            steps.push(len >> 30);
            reserved += len;
        }
        assert_eq!(steps, [1, 1, 2, 4, 8, 16, 32]);
        assert_eq!(reserved, max);
        assert!(steps.len() <= MAX_REGIONS);
    }

    #[test]
    fn a_region_takes_an_eighth_of_what_rlimit_as_leaves() {
        // 4200 MiB left: 525 MiB may be had, so 512 MiB.
        assert_eq!(next_len(0, 64 << 30, Some(4200 << 20)), Some(512 << 20));
        // After 3 GiB of regions, 1 GiB more would double them, but only an eighth of 2 GiB
        // may be had.
        assert_eq!(next_len(3 << 30, 64 << 30, Some(2 << 30)), Some(256 << 20));
        // Too little left.
        assert_eq!(next_len(0, 64 << 30, Some(100 << 20)), None);
        // The maximum is reached.
        assert_eq!(next_len(64 << 30, 64 << 30, None), None);
    }

    #[test]
    fn chunks_are_numbered_across_regions() {
        let regions = Regions::default();
        let a = NonNull::new((64 * CHUNK) as *mut u8).unwrap();
        let b = NonNull::new((1024 * CHUNK) as *mut u8).unwrap();
        assert!(regions.push(a, 16 * CHUNK));
        assert!(regions.push(b, 32 * CHUNK));
        assert_eq!(regions.chunks(), 48);
        assert_eq!(regions.locate(a.as_ptr().addr() + 5 * CHUNK + 7), Some(5));
        assert_eq!(regions.locate(b.as_ptr().addr() + CHUNK), Some(17));
        assert_eq!(regions.locate(b.as_ptr().addr() + 32 * CHUNK), None);
        assert_eq!(regions.locate(a.as_ptr().addr() - 1), None);
        assert_eq!(
            regions.chunk_at(17).map(|p| p.as_ptr().addr()),
            Some(b.as_ptr().addr() + CHUNK)
        );
        assert_eq!(regions.chunk_at(48), None);
        assert_eq!(regions.pop(), Some((b, 16, 32)));
        assert_eq!(regions.locate(b.as_ptr().addr()), None);
        assert_eq!(regions.chunks(), 16);
    }
}
