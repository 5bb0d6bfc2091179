//! A store's tier, kept in the store's metadata file at every durable point and read back when
//! the store is reopened: which chunks are in use, their classes and their block bitmaps.
//!
//! The file: a header (magic, the number of chunk indices used), then one 16-byte record per
//! index (class, next never-used block, blocks freed below it, in use), then one bitmap slot
//! per index, large enough for the smallest class. Chunks kept empty are saved as unused:
//! their range is made to read as zeros when it is used again.
//!
//! Reopening reads the records and the bitmaps of the chunks in use: work in proportion to
//! the small blocks' bytes (one bit per block), not a pass over the data.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;
use std::sync::MutexGuard;
use std::sync::atomic::Ordering;

use super::chunk::{self, Backing, Blocks, Source};
use super::{CHUNK, SHARDS, SmallTier, class};
use crate::sys;

const MAGIC: u64 = u64::from_ne_bytes(*b"MMAPVSM1");
/// Where the records start.
const RECORDS: u64 = 4096;
const RECORD: usize = 16;
/// The bitmap of the smallest class, in words.
const MAX_WORDS: usize = (CHUNK / class::block_size(0)).div_ceil(64);

fn bitmaps_at(chunks: usize) -> u64 {
    (RECORDS + (chunks * RECORD) as u64).next_multiple_of(4096)
}

fn bitmap_at(chunks: usize, index: usize) -> u64 {
    bitmaps_at(chunks) + (index * MAX_WORDS * 8) as u64
}

fn invalid(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("store chunk metadata: {what}"),
    )
}

/// Reserves the disk the metadata of chunk `index` takes in the file `meta` (of a tier of
/// `chunks` indices): the file's header page, the chunk's record and its bitmap slot. Done
/// when the chunk is made, so that saving never needs new disk: a full disk is then an error
/// of the allocation that made the chunk, never of a later `flush` or `close`.
pub(crate) fn reserve_slot(meta: &File, chunks: usize, index: usize) -> io::Result<()> {
    sys::reserve_blocks(meta, 0, RECORDS)?;
    sys::reserve_blocks(meta, RECORDS + (index * RECORD) as u64, RECORD as u64)?;
    sys::reserve_blocks(meta, bitmap_at(chunks, index), (MAX_WORDS * 8) as u64)
}

/// Checks what [`SmallTier::restore`] would read from `meta` for a tier of `chunks` indices
/// over the chunk file `file`, without mapping anything: a snapshot's files, before
/// `recover` puts them in place. `InvalidData` if they do not agree.
pub(crate) fn check_saved(meta: &File, file: &File, chunks: usize) -> io::Result<()> {
    let (meta_len, file_len) = (meta.metadata()?.len(), file.metadata()?.len());
    if meta_len == 0 {
        return match file_len {
            0 => Ok(()),
            _ => Err(invalid("empty, but the chunk file is not")),
        };
    }
    let truncated = |e: io::Error| match e.kind() {
        io::ErrorKind::UnexpectedEof => invalid("truncated"),
        _ => e,
    };
    let mut header = [0u8; 16];
    meta.read_exact_at(&mut header, 0).map_err(truncated)?;
    let word = |at: usize| u64::from_ne_bytes(header[at..at + 8].try_into().unwrap());
    let next = usize::try_from(word(8)).unwrap_or(usize::MAX);
    if word(0) != MAGIC || next > chunks {
        return Err(invalid("bad header"));
    }
    let mut records = vec![0u8; next * RECORD];
    meta.read_exact_at(&mut records, RECORDS)
        .map_err(truncated)?;
    for (index, record) in records.chunks_exact(RECORD).enumerate() {
        let field = |i: usize| u32::from_ne_bytes(record[i * 4..i * 4 + 4].try_into().unwrap());
        if field(3) == 0 {
            continue;
        }
        if field(0) as usize >= class::COUNT {
            return Err(invalid("bad class"));
        }
        if file_len < ((index + 1) * CHUNK) as u64 {
            return Err(invalid("the chunk file is shorter than its chunks"));
        }
    }
    Ok(())
}

/// What a commit writes of a store's tier ([`SmallTier::commit_with`]).
#[derive(Debug)]
pub(crate) struct TierImage {
    /// The metadata file's writes: (offset, bytes).
    pub(crate) meta_writes: Vec<(u64, Vec<u8>)>,
    /// The chunk file's length now (it only grows while the store is open).
    pub(crate) file_len: u64,
    /// The chunks mapped since the last commit, in no commit yet: (address, file offset),
    /// `CHUNK` bytes each. Their pages are written in place.
    pub(crate) fresh: Vec<(usize, u64)>,
    /// The part of the region chunks have used: (address, length).
    pub(crate) used: (usize, usize),
}

impl SmallTier {
    /// The writes that make the metadata file say which chunks are in use and their bitmaps:
    /// (offset, bytes), the file's header last.
    fn image_writes(
        &self,
        shards: &[MutexGuard<'_, super::shard::Shard>],
        spare: &super::Spare,
    ) -> Vec<(u64, Vec<u8>)> {
        let chunks = self.table().len();
        let next = spare.next as usize;
        let mut writes = Vec::new();
        let mut records = vec![0u8; next * RECORD];
        for shard in shards {
            for (&index, blocks) in shard.chunks.iter().chain(&shard.sealed) {
                let (bump, freed, used) = blocks.parts();
                let index = index as usize;
                let record = &mut records[index * RECORD..(index + 1) * RECORD];
                for (i, word) in [blocks.class(), bump, freed, 1].into_iter().enumerate() {
                    record[i * 4..i * 4 + 4].copy_from_slice(&(word as u32).to_ne_bytes());
                }
                let bytes: Vec<u8> = used.iter().flat_map(|w| w.to_ne_bytes()).collect();
                writes.push((bitmap_at(chunks, index), bytes));
            }
        }
        writes.push((RECORDS, records));
        let mut header = MAGIC.to_ne_bytes().to_vec();
        header.extend_from_slice(&(next as u64).to_ne_bytes());
        writes.push((0, header));
        writes
    }

    /// A commit of a writer's store (see `store::commit`): runs `commit` with what the tier
    /// must write, holding every shard and `spare` (no small block is allocated or freed
    /// meanwhile). Once `commit` sets its flag (the commit point passed), the chunks mapped
    /// since the last commit are in it, and those released before it wait for a checkpoint.
    pub(crate) fn commit_with<R, E>(
        &self,
        commit: impl FnOnce(&TierImage, &mut bool) -> Result<R, E>,
    ) -> Result<R, E> {
        let shards: Vec<_> = (0..SHARDS).map(|i| self.lock_shard(i)).collect();
        let mut spare = self.lock_spare();
        let region = self.regions.iter().next().map(|(base, ..)| base);
        let image = TierImage {
            meta_writes: self.image_writes(&shards, &spare),
            file_len: self
                .store_file
                .as_ref()
                .and_then(|f| f.metadata().ok())
                .map_or(0, |m| m.len()),
            fresh: spare
                .fresh
                .iter()
                .map(|&i| {
                    (
                        self.chunk_at(i).as_ptr().addr(),
                        u64::from(i) * CHUNK as u64,
                    )
                })
                .collect(),
            used: region.map_or((0, 0), |base| (base, spare.next as usize * CHUNK)),
        };
        let mut committed = false;
        let result = commit(&image, &mut committed);
        if committed {
            let pending = std::mem::take(&mut spare.pending);
            spare.pending_checkpoint.extend(pending);
            spare.fresh.clear();
        }
        drop(spare);
        drop(shards);
        result
    }

    /// Drops the private copies of the pages of every chunk mapped (a writer's store, see
    /// `Store::trim`).
    ///
    /// # Safety
    /// The last commit must be in the chunk file, and nothing may write to the chunks
    /// meanwhile.
    pub(crate) unsafe fn drop_private_copies(&self) -> io::Result<()> {
        let _spare = self.lock_spare();
        for index in 0..self.table().len() as u32 {
            let slot = self.table()[index as usize].load(Ordering::Acquire);
            // SAFETY: a non-null entry is a leaked `Box<ChunkMeta>`, freed only with the tier.
            let Some(meta) = (unsafe { slot.as_ref() }) else {
                continue;
            };
            if meta.is_mapped() && !meta.is_lost() {
                // SAFETY: the chunk's view, ours (mapped, not lost); the caller's promises.
                unsafe { sys::drop_private_copies(self.chunk_at(index), CHUNK) }?;
            }
        }
        Ok(())
    }

    /// After a checkpoint of a writer's store (its log emptied): the chunks released before
    /// the last commit have their range punched and can be used again.
    pub(crate) fn after_checkpoint(&self) {
        let mut spare = self.lock_spare();
        let done = std::mem::take(&mut spare.pending_checkpoint);
        if let Some(file) = &self.store_file {
            for &index in &done {
                if let Err(e) = sys::punch_hole(file, u64::from(index) * CHUNK as u64, CHUNK as u64)
                {
                    super::log_later(format!("mmapvec: giving a store chunk's blocks back: {e}"));
                }
            }
        }
        spare.free.extend(done);
    }

    /// Reads back what [`save`](Self::save) wrote to `meta`, mapping every chunk in use
    /// (`share`: the store's access). Only on a tier just made with `in_store`.
    pub(crate) fn restore(&self, meta: &File, share: sys::Share) -> io::Result<()> {
        let chunks = self.table().len();
        if meta.metadata()?.len() == 0 {
            // A new store, whose chunk file is empty too.
            let file_len = self
                .store_file
                .as_ref()
                .map_or(Ok(0), |f| f.metadata().map(|m| m.len()))?;
            if file_len != 0 {
                return Err(invalid("empty, but the chunk file is not"));
            }
            return Ok(());
        }
        let truncated = |e: io::Error| match e.kind() {
            io::ErrorKind::UnexpectedEof => invalid("truncated"),
            _ => e,
        };
        let mut header = [0u8; 16];
        meta.read_exact_at(&mut header, 0).map_err(truncated)?;
        let word = |at: usize| u64::from_ne_bytes(header[at..at + 8].try_into().unwrap());
        if word(0) != MAGIC {
            return Err(invalid("bad magic"));
        }
        let next = usize::try_from(word(8)).unwrap_or(usize::MAX);
        if next > chunks {
            return Err(invalid("more chunks than the region holds"));
        }
        let file = self
            .store_file
            .as_ref()
            .ok_or_else(|| invalid("not a store's tier"))?;
        // Every chunk in use must lie wholly in the file: a page past its end is a SIGBUS.
        let file_len = file.metadata()?.len();
        let mut records = vec![0u8; next * RECORD];
        meta.read_exact_at(&mut records, RECORDS)
            .map_err(truncated)?;
        let mut free = Vec::new();
        for index in 0..next {
            let record = &records[index * RECORD..(index + 1) * RECORD];
            let field = |i: usize| u32::from_ne_bytes(record[i * 4..i * 4 + 4].try_into().unwrap());
            if field(3) == 0 {
                free.push(index as u32);
                continue;
            }
            let class = field(0) as usize;
            if class >= class::COUNT {
                return Err(invalid("bad class"));
            }
            let words = (CHUNK / class::block_size(class)).div_ceil(64);
            let mut bytes = vec![0u8; words * 8];
            meta.read_exact_at(&mut bytes, bitmap_at(chunks, index))
                .map_err(truncated)?;
            if file_len < ((index + 1) * CHUNK) as u64 {
                return Err(invalid("the chunk file is shorter than its chunks"));
            }
            let used = bytes
                .chunks_exact(8)
                .map(|w| u64::from_ne_bytes(w.try_into().unwrap()))
                .collect();
            let (bump, freed) = (field(1) as usize, field(2) as usize);
            let blocks =
                Blocks::restore(class, bump, freed, used).ok_or_else(|| invalid("bad bitmap"))?;
            let meta = self.meta_or_new(index as u32);
            let at: NonNull<u8> = self.chunk_at(index as u32);
            let source = Source::Existing {
                file,
                offset: (index * CHUNK) as u64,
                share,
            };
            // SAFETY: the region is part of the store's range, reserved by the store and not
            // used yet; each index is mapped once; the file holds the chunk (checked above).
            let mapped = unsafe { meta.map(at, source, self.backing, self.config.dont_fork) };
            if let Err(failure) = mapped {
                if !failure.range_kept {
                    // May be someone else's now: never unmapped by the store (`lost_ranges`).
                    meta.set_lost(true);
                    self.suspects.fetch_add(1, Ordering::AcqRel);
                }
                return Err(failure.error);
            }
            self.track(index as u32);
            if self.backing.by_pieces() {
                // The pieces under live blocks have their disk blocks (they were backed when
                // the blocks were handed out); the others are backed again before use.
                let size = class::block_size(class);
                let (_, _, used) = blocks.parts();
                let mut under = 0;
                for (w, &bits) in used.iter().enumerate() {
                    let mut bits = bits;
                    while bits != 0 {
                        let start = (w * 64 + bits.trailing_zeros() as usize) * size;
                        bits &= bits - 1;
                        under |= chunk::pieces(start, start + size);
                    }
                }
                meta.mark_backed(under);
            }
            let home = index % SHARDS;
            // Of this process's epoch: a process forked before it opened the store has no
            // child that maps these chunks.
            meta.assign(class, self.epoch.load(Ordering::Acquire), home);
            let mut shard = self.lock_shard(home);
            let live = blocks.live();
            shard.in_use += (live * class::block_size(class)) as u64;
            let mut blocks = blocks;
            let (bump, freed, _) = blocks.parts();
            if freed > 0 || bump < CHUNK / class::block_size(class) {
                blocks.listed = true;
                shard.classes[class].partial.push(index as u32);
            }
            shard.chunks.insert(index as u32, blocks);
            drop(shard);
            let c = &self.counters;
            let backed = meta.backed().count_ones() as u64 * chunk::PIECE as u64;
            c.arena_bytes.fetch_add(backed, Ordering::Relaxed);
            c.mapped_bytes.fetch_add(CHUNK as u64, Ordering::Relaxed);
        }
        let mut spare = self.lock_spare();
        spare.next = next as u32;
        spare.free = free;
        Ok(())
    }

    /// The chunk that `ptr` is in, if it is mapped: its index, its metadata, and `ptr`'s
    /// offset in it.
    fn mapped_chunk_of(&self, ptr: NonNull<u8>) -> Option<(u32, &super::chunk::ChunkMeta, usize)> {
        if !self.contains(ptr) {
            return None;
        }
        let index = self.index_of(ptr);
        let slot = self.table()[index as usize].load(Ordering::Acquire);
        // SAFETY: a non-null entry is a leaked `Box<ChunkMeta>`, freed only with the tier.
        let meta = unsafe { slot.as_ref() }?;
        if !meta.is_mapped() {
            return None;
        }
        let offset = ptr.as_ptr().addr() - self.chunk_at(index).as_ptr().addr();
        Some((index, meta, offset))
    }

    /// The length of the block at `ptr` if `ptr` is the start of a block in use (handed out,
    /// not freed) of a chunk mapped now. For checking an address read from a store's files
    /// before it is used.
    pub(crate) fn live_block_len(&self, ptr: NonNull<u8>) -> Option<usize> {
        let (index, meta, offset) = self.mapped_chunk_of(ptr)?;
        let len = meta.block_size();
        // A block of the chunk: not in the tail past its last block.
        if !offset.is_multiple_of(len) || offset / len >= CHUNK / len {
            return None;
        }
        let shard = self.lock_shard(meta.shard());
        let used = shard
            .chunks
            .get(&index)
            .or_else(|| shard.sealed.get(&index))
            .is_some_and(|blocks| blocks.class() == meta.class() && blocks.is_used(offset / len));
        used.then_some(len)
    }

    /// A salvage open (a store left dirty): maps every chunk that the chunk file holds and the
    /// metadata does not list (made after the last save), privately, read-only in effect.
    /// Their blocks are not known (no bitmap): they serve reads only.
    pub(crate) fn map_unlisted_chunks(&self) {
        let Some(file) = &self.store_file else {
            return;
        };
        let Ok(meta) = file.metadata() else {
            return;
        };
        let in_file = usize::try_from(meta.len() / CHUNK as u64).unwrap_or(usize::MAX);
        for index in 0..in_file.min(self.table().len()) as u32 {
            let chunk = self.meta_or_new(index);
            if chunk.is_mapped() || chunk.is_lost() {
                continue;
            }
            let source = Source::Existing {
                file,
                offset: u64::from(index) * CHUNK as u64,
                share: sys::Share::Private,
            };
            // SAFETY: the index is not mapped: its range is part of the store's reservation,
            // unused; the file holds the whole chunk (its length, checked above).
            let mapped = unsafe {
                chunk.map(
                    self.chunk_at(index),
                    source,
                    Backing::Whole,
                    self.config.dont_fork,
                )
            };
            match mapped {
                // Its class is not known: marked past the last one (see `mapped_block_len`).
                Ok(()) => chunk.assign(class::COUNT, 0, 0),
                Err(failure) if !failure.range_kept => {
                    chunk.set_lost(true);
                    self.suspects.fetch_add(1, Ordering::AcqRel);
                }
                Err(_) => {}
            }
        }
    }

    /// The length of the block that starts at `ptr` in a mapped chunk, whatever its state (a
    /// salvage open: see [`map_unlisted_chunks`](Self::map_unlisted_chunks)).
    pub(crate) fn mapped_block_len(&self, ptr: NonNull<u8>) -> Option<usize> {
        let (_, meta, offset) = self.mapped_chunk_of(ptr)?;
        if meta.class() >= class::COUNT {
            // A chunk the metadata did not list: its blocks are not known.
            return Some(CHUNK - offset);
        }
        let len = meta.block_size();
        (offset.is_multiple_of(len) && offset / len < CHUNK / len).then_some(len)
    }

    /// Every live block (handed out, not freed) of the tier, as (address, length).
    pub(crate) fn live_blocks(&self) -> Vec<(usize, usize)> {
        let mut live = Vec::new();
        for i in 0..SHARDS {
            let shard = self.lock_shard(i);
            for (&index, blocks) in shard.chunks.iter().chain(&shard.sealed) {
                let start = self.chunk_at(index).as_ptr().addr();
                let len = class::block_size(blocks.class());
                let (_, _, used) = blocks.parts();
                for (w, &bits) in used.iter().enumerate() {
                    let mut bits = bits;
                    while bits != 0 {
                        let bit = bits.trailing_zeros() as usize;
                        bits &= bits - 1;
                        live.push((start + (w * 64 + bit) * len, len));
                    }
                }
            }
        }
        live
    }

    /// The ranges of chunks lost (see `ChunkMeta::is_lost`), which the store must not unmap.
    pub(crate) fn lost_ranges(&self) -> Vec<(usize, usize)> {
        (0..self.table().len() as u32)
            .filter(|&index| self.lost(index))
            .map(|index| (self.chunk_at(index).as_ptr().addr(), CHUNK))
            .collect()
    }
}
