//! One shard of the small-block tier: the chunks it hands blocks out of, by class.

use std::collections::HashMap;

use super::chunk::{Blocks, Taken};
use super::class;
use crate::hash::BuildIntHasher;

/// The chunks one shard hands blocks out of. Private memory, only touched under its mutex.
#[derive(Debug)]
pub(super) struct Shard {
    /// The epoch the lists belong to; a newer one empties them (see the module docs).
    pub(super) epoch: u64,
    /// Per class: the chunk being filled, and chunks with free blocks (may hold stale entries,
    /// checked against `chunks` when popped).
    pub(super) classes: Vec<ClassLists>,
    /// Block bitmaps of the open chunks this shard owns.
    pub(super) chunks: HashMap<u32, Blocks, BuildIntHasher>,
    /// Bytes of live blocks in the chunks this shard owns (open or closed). Counted here, under
    /// the shard's lock, rather than in a shared atomic: two threads on two shards write
    /// nothing in common.
    pub(super) in_use: u64,
    /// Classes whose current chunk is empty (kept open for the class's next blocks); at most
    /// the tier's limit (see `SmallTier::max_idle_current`), past which an emptied current
    /// chunk is retired like any other.
    pub(super) idle_currents: usize,
    /// A store's tier: the chunks of earlier fork epochs, sealed (see [`enter`](Self::enter)),
    /// with their bitmaps, which frees keep up to date and the store saves.
    pub(super) sealed: HashMap<u32, Blocks, BuildIntHasher>,
}

/// One class's chunks in a shard.
#[derive(Debug, Default, Clone)]
pub(super) struct ClassLists {
    /// The chunk being filled.
    pub(super) current: Option<u32>,
    /// Chunks with free blocks.
    pub(super) partial: Vec<u32>,
}

impl Shard {
    pub(super) fn new() -> Self {
        Shard {
            epoch: 0,
            classes: vec![ClassLists::default(); class::COUNT],
            chunks: HashMap::default(),
            in_use: 0,
            idle_currents: 0,
            sealed: HashMap::default(),
        }
    }

    /// Moves to a newer epoch: every chunk of the old one is closed (freed by count only).
    /// Returns the chunks closed with their bitmaps; the caller records the counts and
    /// releases those with no live block (an empty current chunk: no free is left to release
    /// it). With `seal` (a store's tier) they are sealed instead, and nothing is returned.
    pub(super) fn enter(&mut self, epoch: u64, seal: bool) -> Vec<(u32, Blocks)> {
        if epoch <= self.epoch {
            return Vec::new();
        }
        self.epoch = epoch;
        self.idle_currents = 0;
        self.classes
            .iter_mut()
            .for_each(|c| *c = ClassLists::default());
        if seal {
            // A store's chunks stay in the store: sealed, their blocks freed in their bitmaps,
            // never handed out again, punched or released in this process (a fork child maps
            // them as they are in the file; see `SmallTier::in_store`).
            self.sealed.extend(self.chunks.drain());
            return Vec::new();
        }
        self.chunks.drain().collect()
    }

    /// A block of class `class` from the chunks already here.
    pub(super) fn take(&mut self, class: usize) -> Option<(u32, Taken)> {
        let lists = &mut self.classes[class];
        if let Some(index) = lists.current
            && let Some(blocks) = self.chunks.get_mut(&index)
        {
            let was_idle = blocks.live() == 0;
            if let Some(taken) = blocks.take() {
                if was_idle {
                    self.idle_currents -= 1;
                }
                return Some((index, taken));
            }
        }
        while let Some(index) = lists.partial.pop() {
            let Some(blocks) = self.chunks.get_mut(&index) else {
                continue; // emptied and gone since it was listed
            };
            if blocks.class() != class || !blocks.listed {
                continue; // a stale entry: the index has been reused since
            }
            blocks.listed = false;
            if let Some(taken) = blocks.take() {
                lists.current = Some(index);
                return Some((index, taken));
            }
        }
        None
    }

    /// Gives back block `index` of chunk `chunk`, just taken by [`take`](Self::take) or
    /// [`install`](Self::install) and never handed out (its pages could not be backed).
    pub(super) fn untake(&mut self, chunk: u32, index: usize) {
        let Some(blocks) = self.chunks.get_mut(&chunk) else {
            debug_assert!(false, "untake of a chunk the shard does not hold");
            return;
        };
        let known = blocks.put(index);
        debug_assert!(known, "untake of a block not taken");
        let lists = &mut self.classes[blocks.class()];
        if blocks.live() == 0 && lists.current == Some(chunk) {
            // Idle again, as it was (or as a fresh chunk is) before the take.
            self.idle_currents += 1;
        } else if lists.current != Some(chunk) && !blocks.listed {
            blocks.listed = true;
            lists.partial.push(chunk);
        }
    }

    /// Takes out an empty chunk that another class keeps as its current one (see
    /// `SmallTier::deallocate`), for `class` to use: memory a class no longer uses goes to the
    /// classes in use before any new chunk is made.
    pub(super) fn take_idle_current(&mut self, class: usize) -> Option<u32> {
        if self.idle_currents == 0 {
            return None;
        }
        let (other, index) = self
            .classes
            .iter()
            .enumerate()
            .filter(|&(c, _)| c != class)
            .find_map(|(c, lists)| {
                let index = lists.current?;
                (self.chunks.get(&index)?.live() == 0).then_some((c, index))
            })?;
        self.classes[other].current = None;
        self.chunks.remove(&index);
        self.idle_currents -= 1;
        Some(index)
    }

    /// Takes out every empty chunk kept as a class's current one, for the caller to release.
    pub(super) fn take_idle_currents(&mut self) -> Vec<u32> {
        let mut idle = Vec::new();
        for lists in &mut self.classes {
            if let Some(index) = lists.current
                && self.chunks.get(&index).is_some_and(|b| b.live() == 0)
            {
                lists.current = None;
                self.chunks.remove(&index);
                idle.push(index);
            }
        }
        self.idle_currents -= idle.len();
        idle
    }

    /// Makes chunk `index` (no live block, held by the caller) this shard's current chunk for
    /// `class`, and takes its first block.
    pub(super) fn install(&mut self, index: u32, class: usize, fresh: bool) -> Taken {
        let mut blocks = Blocks::new(class, fresh);
        let taken = blocks.take().expect("a new chunk has a free block");
        self.chunks.insert(index, blocks);
        // The previous current chunk is full (or we would not be here); it is listed again
        // when one of its blocks is freed.
        self.classes[class].current = Some(index);
        taken
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_newer_epoch_forgets_every_chunk() {
        let mut shard = Shard::new();
        shard.install(3, 2, true);
        assert_eq!(shard.take(2).map(|(index, _)| index), Some(3));
        shard.enter(0, false);
        assert!(shard.take(2).is_some(), "same epoch: lists kept");
        shard.enter(1, false);
        assert!(shard.take(2).is_none(), "newer epoch: chunk 3 is closed");
        assert!(shard.chunks.is_empty());
    }

    #[test]
    fn stale_partial_entries_are_skipped() {
        let mut shard = Shard::new();
        // An index listed, then emptied and gone; another reused for a different class.
        shard.classes[0].partial.push(9);
        shard.install(4, 1, true);
        shard.classes[0].partial.push(4);
        assert!(shard.take(0).is_none());
        assert!(shard.classes[0].partial.is_empty());
    }
}
