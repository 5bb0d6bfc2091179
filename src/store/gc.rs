//! After [`Store::recover`]: the blocks no root reaches are freed.
//!
//! A snapshot keeps every block that was allocated when it was taken, also those that only
//! local variables of the writer held (a vector being built, a value not yet set as a root).
//! After a crash nothing holds them any more: kept, they would stay allocated forever. So the
//! recovered store is traced from its roots, conservatively: every word of a reached block
//! that holds an address inside a live block (its start or any byte of it: a hashbrown table
//! points into the middle of its block) reaches that block. A number that happens to look like
//! such an address keeps a block alive for nothing; a block that is reached is never freed.
//! This needs nothing from the types: every pointer a `Persist` value holds is an aligned word
//! (no `repr(packed)`), and every block it owns is reached through one.
//!
//! The cost is a read of every reached byte, once per recovery (which copies the whole store
//! back from its snapshot anyway, unless the file system has reflinks).

use std::ptr::NonNull;

use super::Store;
use super::alloc::store_epoch;

/// What a recovery did ([`Store::recovery`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Recovery {
    /// The snapshot the store went back to.
    pub snapshot: u64,
    /// Blocks that no root reached, freed.
    pub unreachable_blocks: u64,
    /// Their bytes (small blocks counted at their size class, segments at their mapped
    /// length).
    pub unreachable_bytes: u64,
}

impl Store {
    /// Frees every block no root reaches (see the module docs); returns how many blocks and
    /// bytes. Only on a writer's handle just opened.
    pub(super) fn free_unreachable(&self) -> (u64, u64) {
        let shared = self.shared();
        let roots = shared.lock_roots();
        let mut blocks = shared.tier.live_blocks();
        blocks.extend(shared.lock_space().block_list());
        blocks.sort_unstable();
        let (base, len) = self.range();
        let find = |addr: usize| -> Option<usize> {
            if addr < base || addr - base >= len {
                return None;
            }
            let i = blocks
                .partition_point(|&(start, _)| start <= addr)
                .checked_sub(1)?;
            let (start, len) = blocks[i];
            (addr < start + len).then_some(i)
        };
        let mut reached = vec![false; blocks.len()];
        let mut work = Vec::new();
        for (addr, _) in self.root_values() {
            if let Some(i) = find(addr) {
                reached[i] = true;
                work.push(i);
            }
        }
        drop(roots);
        while let Some(i) = work.pop() {
            let (start, len) = blocks[i];
            let words = std::ptr::with_exposed_provenance::<usize>(start);
            for w in 0..len / size_of::<usize>() {
                // SAFETY: the block is live and mapped (a block of the tier or a segment of
                // this open store, listed above, freed by nobody meanwhile: the store was just
                // opened and is not handed out yet); its bytes are the file's, initialized.
                let word = unsafe { words.add(w).read() };
                if let Some(j) = find(word)
                    && !reached[j]
                {
                    reached[j] = true;
                    work.push(j);
                }
            }
        }
        let (mut count, mut bytes) = (0, 0);
        for (&(start, len), _) in blocks.iter().zip(&reached).filter(|(_, r)| !**r) {
            let ptr = NonNull::new(std::ptr::with_exposed_provenance_mut::<u8>(start))
                .expect("inside the range");
            if shared.tier.contains(ptr) {
                // SAFETY: a live block of the tier (listed above), which nothing refers to:
                // no root reaches it.
                unsafe { shared.tier.deallocate(ptr, store_epoch()) };
            } else {
                shared.lock_space().free(start);
            }
            count += 1;
            bytes += len as u64;
        }
        (count, bytes)
    }
}
