//! [`SegmentTable`]: the large tier's live segments, found by address.

use std::any::Any;
use std::collections::HashMap;
use std::sync::Mutex;

use crate::hash::BuildIntHasher;
use crate::segment::Segment;

/// Live segments by start address, split in shards so threads rarely wait on each other.
pub(crate) struct SegmentTable {
    shards: [Mutex<Shard>; SHARDS],
}

const SHARDS: usize = 16;

/// One shard: live segments by start address.
type Shard = HashMap<usize, Segment, BuildIntHasher>;

impl SegmentTable {
    pub(crate) fn new() -> Self {
        SegmentTable {
            shards: std::array::from_fn(|_| Mutex::new(HashMap::default())),
        }
    }

    /// Mappings are page aligned and often adjacent: mix the bits above the page offset.
    fn shard_index(addr: usize) -> usize {
        ((addr >> 12) ^ (addr >> 18) ^ (addr >> 24)) % SHARDS
    }

    fn shard(&self, addr: usize) -> std::sync::MutexGuard<'_, Shard> {
        let index = Self::shard_index(addr);
        // A panic while holding the lock cannot leave a map half-updated (single insert or
        // remove), so a poisoned lock is still consistent.
        self.shards[index].lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn insert(&self, segment: Segment) {
        let addr = segment.ptr().as_ptr().addr();
        if let Some(previous) = self.shard(addr).insert(addr, segment) {
            // Two live segments at one address: one of the mappings was replaced behind the
            // table's back. Dropping either would unmap the other's pages and using either is
            // undefined behaviour, so no way on is sound: stop here, loudly.
            std::mem::forget(previous);
            crate::logging::report!(error, "mmapvec: two live segments at {addr:#x}; aborting");
            eprintln!("mmapvec: two live segments at {addr:#x}: allocator state corrupted");
            std::process::abort();
        }
    }

    /// Locks every shard, in order, for a `fork` (see `fork::ForkLocks`).
    pub(crate) fn lock_for_fork(&'static self, held: &mut Vec<Box<dyn Any>>) {
        for shard in &self.shards {
            held.push(Box::new(shard.lock().unwrap_or_else(|e| e.into_inner())));
        }
    }

    /// `look` at the segment at `addr`, left in the table; `None` if there is none.
    pub(crate) fn peek<R>(&self, addr: usize, look: impl FnOnce(&Segment) -> R) -> Option<R> {
        self.shard(addr).get(&addr).map(look)
    }

    pub(crate) fn take(&self, addr: usize) -> Option<Segment> {
        self.shard(addr).remove(&addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_mappings_spread_over_all_shards() {
        let base = 0x7f00_0000_0000_usize;
        let mut used = [0usize; SHARDS];
        for page in 0..(16 * SHARDS) {
            used[SegmentTable::shard_index(base + page * 4096)] += 1;
        }
        assert!(used.iter().all(|&n| n == 16), "{used:?}");
        // Huge-page aligned mappings too.
        let mut used = [false; SHARDS];
        for i in 0..(4 * SHARDS) {
            used[SegmentTable::shard_index(base + i * (2 << 20))] = true;
        }
        assert!(
            used.iter().filter(|&&u| u).count() >= SHARDS / 2,
            "{used:?}"
        );
    }
}
