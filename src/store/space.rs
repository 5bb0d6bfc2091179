//! The store's address space and the blocks in it: one file per block (a *store segment*),
//! mapped at a fixed address of the store's range, and named after that address, so that
//! reopening maps every block back where its pointers expect it without reading anything but
//! the folder.
//!
//! * **Spans.** A block of `len` bytes gets a *span* of address space of its own, larger than
//!   the block (twice the next power of two), reserved and unused: a vector that grows extends
//!   its file and maps the new part right after the old one, in place. Beyond its span it moves
//!   (`mremap` to a free span, on Linux: page tables move, no byte is copied) and its file is
//!   renamed after the new address.
//! * **Names.** `segs/<address>-<span>` in hexadecimal; the file's length is the block's mapped
//!   length. Reopening lists the folder, checks that the spans lie in the range without
//!   overlapping, and maps each file back.
//! * **Free address space** is two ordered maps (by address, to merge neighbours; by length,
//!   for the best fit), rebuilt at every open from the spans in use.
//! * **Lost ranges.** A failed `MAP_FIXED` or `mremap` may leave a gap in the reservation that
//!   another mapping of the process fills before it is reserved again. Such a range is never
//!   used again, nor unmapped by the store: it may be someone else's.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::ptr::NonNull;

use crate::fork;
use crate::sys::{self, Share};

/// The folder of the store's segments.
pub(super) const SEGS: &str = "segs";
/// The file in `segs` that lists every segment (address, span, length) as of the last durable
/// point: a segment cut short, grown, removed or added since is refused at open.
const MANIFEST: &str = ".manifest";
/// A file name an earlier version wrote the manifest to before a rename (skipped if found).
const MANIFEST_NEW: &str = ".manifest.new";
/// The first eight bytes of a manifest of format version 3 stores (segments named after
/// their address), read only.
const MANIFEST_MAGIC_V1: u64 = u64::from_ne_bytes(*b"MMAPVMF1");
/// The first eight bytes of a manifest that names each segment's file (format version 4).
const MANIFEST_MAGIC: u64 = u64::from_ne_bytes(*b"MMAPVMF2");

/// The smallest span: 16 pages of 4 KiB.
const MIN_SPAN: usize = 64 << 10;
/// Spans are aligned to their length up to this (huge-page friendly), and to pages above it.
const SPAN_ALIGN: usize = 2 << 20;

/// The name of a segment's file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Name {
    /// A number of its own (format version 4): a block that moves keeps its file's name.
    Id(u64),
    /// Named after the address and span it was made at (a store made by format version 3 or
    /// earlier); kept when the block moves.
    Legacy { addr: usize, span: usize },
}

impl Name {
    pub(super) fn file_name(self) -> OsString {
        match self {
            Name::Id(id) => format!("{id:016x}").into(),
            Name::Legacy { addr, span } => seg_name(addr, span),
        }
    }

    /// The name a file of the `segs` folder stands for, if it is a segment's.
    fn parse(name: &OsStr) -> Option<Name> {
        if let Some((addr, span)) = parse_name(name).filter(|&(a, s)| seg_name(a, s) == name) {
            return Some(Name::Legacy { addr, span });
        }
        let text = name.to_str()?;
        let id = u64::from_str_radix(text, 16).ok()?;
        (text.len() == 16 && Name::Id(id).file_name() == name).then_some(Name::Id(id))
    }

    /// Two words, for the manifest and the commit log.
    pub(super) fn words(self) -> (u64, u64) {
        match self {
            Name::Id(id) => (id, u64::MAX),
            Name::Legacy { addr, span } => (addr as u64, span as u64),
        }
    }

    pub(super) fn from_words(a: u64, b: u64) -> Option<Name> {
        if b == u64::MAX {
            return Some(Name::Id(a));
        }
        Some(Name::Legacy {
            addr: usize::try_from(a).ok()?,
            span: usize::try_from(b).ok()?,
        })
    }
}

/// One block: mapped `len` bytes at the start of `span` bytes of the store's range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Seg {
    len: usize,
    span: usize,
    /// The fork epoch its file was first mapped in: a file mapped before the last fork may be
    /// mapped by a child (privately), so it is never cut (see `shrink`).
    epoch: u64,
    name: Name,
    /// Made since the last commit: a shared view (its file is in no commit, so writing it in
    /// place is safe, and keeps it out of core), synced and made private by the next commit.
    /// Otherwise a private view of the last commit's file (see `store::commit`).
    fresh: bool,
}

/// A manifest read back: the segments it lists, and the next number for a new file's name.
struct Recorded {
    next_id: u64,
    /// Files of segments the commit freed, removed after it (or by the next open).
    removed: Vec<Name>,
    /// Whether it names the files (format version 4) or lists addresses.
    named: bool,
    /// (name, address, span, length), by address.
    segments: Vec<(Name, usize, usize, usize)>,
}

/// The segments' files, opened for a fork child before the fork: (address, length, file).
#[derive(Debug)]
pub(super) struct ChildFiles(Vec<(usize, usize, File)>);

/// The blocks of one open store and its free address space. Used under the store's mutex.
#[derive(Debug)]
pub(super) struct Space {
    /// The `segs` folder.
    dir: File,
    share: Share,
    page: usize,
    segs: BTreeMap<usize, Seg>,
    /// Free ranges, start -> length, never adjacent (merged).
    free: BTreeMap<usize, usize>,
    /// The same ranges as (length, start), for the best fit.
    by_len: BTreeSet<(usize, usize)>,
    /// Ranges that may no longer be ours (see the module docs).
    lost: Vec<(usize, usize)>,
    /// The writer's manifest, written in place at every commit, and the bytes of disk
    /// reserved for it (see `reserve_manifest`).
    manifest: Option<File>,
    manifest_reserved: u64,
    /// The number the next new segment file is named after.
    next_id: u64,
    /// The files of committed segments freed since the last commit: removed once a commit no
    /// longer lists them.
    removals: Vec<Name>,
    /// Why a block's view could not be made private after a commit: commits are refused.
    broken: Option<String>,
    /// A segment file was made since the last commit: the folder is synced before the next
    /// commit point (so that the file is there after a crash).
    made_files: bool,
    /// Files of blocks made private to sync before the next commit point.
    to_sync: Vec<Name>,
    /// The writer's: tracks the writes to every private view (see `store::commit`).
    tracker: Option<std::sync::Arc<sys::WriteTracker>>,
}

fn seg_name(addr: usize, span: usize) -> OsString {
    format!("{addr:x}-{span:x}").into()
}

fn parse_name(name: &OsStr) -> Option<(usize, usize)> {
    let (addr, span) = name.to_str()?.split_once('-')?;
    Some((
        usize::from_str_radix(addr, 16).ok()?,
        usize::from_str_radix(span, 16).ok()?,
    ))
}

/// The bytes of a manifest of `segments` entries and `removed` files: magic, counts, next
/// number, five words per segment (name, address, span, length), two per file removed (its
/// name), checksum.
fn manifest_len(segments: usize, removed: usize) -> usize {
    40 + segments * 40 + removed * 16
}

/// FNV-1a of `bytes`: catches a damaged manifest (not an attacker, who can write a matching
/// one: a store is trusted input).
fn checksum(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |hash, &b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn corrupt(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Space {
    /// An empty space over `[start, end)`, which must be reserved by the caller's store.
    pub(super) fn new(dir: File, start: usize, end: usize, share: Share) -> Space {
        let mut space = Space {
            dir,
            share,
            page: sys::page_size(),
            segs: BTreeMap::new(),
            free: BTreeMap::new(),
            by_len: BTreeSet::new(),
            lost: Vec::new(),
            manifest: None,
            manifest_reserved: 0,
            next_id: 0,
            removals: Vec::new(),
            broken: None,
            made_files: false,
            to_sync: Vec::new(),
            tracker: None,
        };
        if end > start {
            space.insert_free(start, end - start);
        }
        space
    }

    /// The space of a store being opened: every segment file of `dir` mapped back at its
    /// address (`[start, end)` must be reserved by the caller, and nothing in it used yet).
    /// On error, what was mapped stays mapped (the caller unmaps its whole range), less the
    /// ranges that may no longer be ours, which are added to `lost`.
    ///
    /// With `manifest` (a store that keeps one), the segments must be exactly those its
    /// manifest lists, with their lengths.
    pub(super) fn open(
        dir: File,
        (start, end): (usize, usize),
        share: Share,
        manifest: bool,
        tracker: Option<std::sync::Arc<sys::WriteTracker>>,
        lost: &mut Vec<(usize, usize)>,
    ) -> io::Result<Space> {
        let mut space = Space::new(dir, start, end, share);
        space.tracker = tracker;
        let mapped = space
            .map_all(start, end, manifest)
            .and_then(|()| space.open_manifest());
        match mapped {
            Ok(()) => Ok(space),
            Err(e) => {
                lost.append(&mut space.lost);
                Err(e)
            }
        }
    }

    /// Checks every name and file of the folder, then maps them one at a time (one descriptor
    /// open at a time, whatever the number of segments).
    fn map_all(&mut self, start: usize, end: usize, manifest: bool) -> io::Result<()> {
        let found = self.listed(start, end, manifest)?;
        self.map_listed(found)
    }

    /// Checks the segments of the folder `dir` as an open would (names, files, lengths,
    /// overlaps, the manifest if `manifest`), without mapping anything: a snapshot's, before
    /// `recover` puts it in place.
    pub(super) fn check_folder(
        dir: File,
        start: usize,
        end: usize,
        manifest: bool,
    ) -> io::Result<()> {
        let mut space = Space::new(dir, start, end, Share::Read);
        let found = space.listed(start, end, manifest)?;
        for (addr, seg, name, _) in found {
            if !space.take_range(addr, seg.span) {
                return Err(corrupt(format!("segment {name:?} is not in free space")));
            }
        }
        Ok(())
    }

    /// Every segment of the folder, checked, in address order: (address, segment, name,
    /// inode). With a manifest that names the files, the manifest is the list: a file it does
    /// not name was made after the last commit, and is removed by a writer (left alone by a
    /// reader).
    fn listed(
        &mut self,
        start: usize,
        end: usize,
        manifest: bool,
    ) -> io::Result<Vec<(usize, Seg, OsString, u64)>> {
        let recorded = if manifest {
            Some(self.read_manifest()?)
        } else {
            None
        };
        let mut found = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut check = |name: &OsStr, entry: &sys::Entry| -> io::Result<usize> {
            // A name of its own, a regular file: two names of one file would be two blocks
            // sharing their bytes.
            if entry.kind != sys::EntryKind::File
                || entry.links != 1
                || !seen.insert((entry.dev, entry.ino))
            {
                return Err(corrupt(format!(
                    "segment {name:?} is not a regular file with one name"
                )));
            }
            Ok(usize::try_from(entry.len).unwrap_or(usize::MAX))
        };
        match recorded {
            Some(recorded) if recorded.named => {
                self.next_id = recorded.next_id;
                let named: std::collections::HashSet<OsString> = recorded
                    .segments
                    .iter()
                    .map(|(name, ..)| name.file_name())
                    .collect();
                for name in sys::names_in(&self.dir)? {
                    if name == MANIFEST || name == MANIFEST_NEW || named.contains(&name) {
                        continue;
                    }
                    // Made after the last commit (numbered from its next number), or freed by
                    // it: not the store's. Any other file is not the store's doing.
                    let leftover = match Name::parse(&name) {
                        Some(Name::Id(id)) if id >= recorded.next_id => true,
                        Some(freed) => recorded.removed.contains(&freed),
                        None => false,
                    };
                    if !leftover {
                        return Err(corrupt(format!("unexpected file {name:?} in the store")));
                    }
                    if self.share == Share::Write {
                        sys::io_point("remove a segment made after the last commit")?;
                        match sys::remove_at(&self.dir, &name, false) {
                            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                            _ => {}
                        }
                    }
                }
                for (name, addr, span, len) in recorded.segments {
                    let file_name = name.file_name();
                    let entry =
                        sys::entry_at(&self.dir, &file_name).map_err(|e| match e.kind() {
                            io::ErrorKind::NotFound => corrupt(format!(
                                "segment {file_name:?} of the last commit is missing"
                            )),
                            _ => e,
                        })?;
                    let on_disk = check(&file_name, &entry)?;
                    if on_disk != len {
                        return Err(corrupt(format!(
                            "segment {file_name:?} is {on_disk} bytes, the last commit says {len}"
                        )));
                    }
                    let epoch = fork::epoch();
                    let seg = Seg {
                        len,
                        span,
                        epoch,
                        name,
                        fresh: false,
                    };
                    found.push((addr, seg, file_name, entry.ino));
                }
            }
            recorded => {
                for name in sys::names_in(&self.dir)? {
                    if name == MANIFEST || name == MANIFEST_NEW {
                        continue;
                    }
                    let (addr, span) = parse_name(&name)
                        .filter(|&(addr, span)| seg_name(addr, span) == name)
                        .ok_or_else(|| corrupt(format!("unexpected file {name:?} in the store")))?;
                    let entry = sys::entry_at(&self.dir, &name)?;
                    let len = check(&name, &entry)?;
                    let epoch = fork::epoch();
                    let seg = Seg {
                        len,
                        span,
                        epoch,
                        name: Name::Legacy { addr, span },
                        fresh: false,
                    };
                    found.push((addr, seg, name, entry.ino));
                }
                found.sort_by_key(|&(addr, ..)| addr);
                if let Some(recorded) = recorded {
                    let listed: Vec<_> = recorded
                        .segments
                        .iter()
                        .map(|&(_, addr, span, len)| (addr, span, len))
                        .collect();
                    Self::same_as_recorded(&listed, &found)?;
                }
            }
        }
        for (addr, seg, name, _) in &found {
            let (addr, span, len) = (*addr, seg.span, seg.len);
            let fits = addr >= start
                && addr < end
                && span <= end - addr
                && addr.is_multiple_of(self.page)
                && span.is_multiple_of(self.page)
                && len.is_multiple_of(self.page)
                && len > 0
                && len <= span;
            if !fits {
                return Err(corrupt(format!(
                    "segment {name:?} ({len} bytes) does not fit the store's range"
                )));
            }
        }
        found.sort_by_key(|&(addr, ..)| addr);
        for pair in found.windows(2) {
            if pair[0].0 + pair[0].1.span > pair[1].0 {
                return Err(corrupt(format!(
                    "segments at {:#x} and {:#x} overlap",
                    pair[0].0, pair[1].0
                )));
            }
        }
        Ok(found)
    }

    /// A format version 3 store: its segments must be those its manifest lists.
    fn same_as_recorded(
        listed: &[(usize, usize, usize)],
        found: &[(usize, Seg, OsString, u64)],
    ) -> io::Result<()> {
        let on_disk: Vec<_> = found
            .iter()
            .map(|&(addr, seg, ..)| (addr, seg.span, seg.len))
            .collect();
        if listed == on_disk {
            return Ok(());
        }
        let (missing, changed): (Vec<&(usize, usize, usize)>, Vec<_>) = listed
            .iter()
            .filter(|l| !on_disk.contains(l))
            .partition(|(addr, ..)| !on_disk.iter().any(|(a, ..)| a == addr));
        let extra = on_disk.len() + missing.len() - listed.len();
        Err(corrupt(format!(
            "the segments are not those the store recorded: {} missing, {} of another \
             length, {extra} not recorded (first: {:?})",
            missing.len(),
            changed.len(),
            missing.first().or(changed.first())
        )))
    }

    /// Maps the segments `listed` found.
    fn map_listed(&mut self, found: Vec<(usize, Seg, OsString, u64)>) -> io::Result<()> {
        for (addr, seg, name, ino) in found {
            if !self.take_range(addr, seg.span) {
                return Err(corrupt(format!("segment {name:?} is not in free space")));
            }
            // Every view of a committed file is private: the file is only read through it.
            let file = sys::open_read_at(&self.dir, &name)?;
            let meta = file.metadata()?;
            let (now_ino, now_links) = (
                std::os::unix::fs::MetadataExt::ino(&meta),
                std::os::unix::fs::MetadataExt::nlink(&meta),
            );
            if now_ino != ino || now_links != 1 || meta.len() != seg.len as u64 {
                return Err(corrupt(format!("segment {name:?} changed while opening")));
            }
            // SAFETY: `[addr, addr + span)` lies in the caller's reservation (checked above),
            // which nothing uses yet, and no two spans overlap; the file is `len` bytes long.
            unsafe { self.map_view(addr, &file, 0, seg.len, seg.len, Share::Private) }?;
            self.track(addr, seg.len);
            self.segs.insert(addr, seg);
        }
        Ok(())
    }

    /// Maps `len` bytes of `file` from `offset` at `addr`, as `share` says. A shared view is
    /// kept out of fork children (`MADV_DONTFORK`, recorded so that a child fills the hole
    /// with a reservation: see `fork`); the block that starts at `block` is then `block_len`
    /// bytes long. A private view is inherited by a child, copy-on-write. A failed map leaves
    /// the range reserved again, or marked lost.
    ///
    /// # Safety
    /// `[addr, addr + len)` must be the caller's reservation, which nothing refers to.
    unsafe fn map_view(
        &mut self,
        addr: usize,
        file: &File,
        offset: usize,
        len: usize,
        block_len: usize,
        share: Share,
    ) -> io::Result<()> {
        let block = addr - offset;
        let mut views = fork::hold();
        // SAFETY: the caller's reservation, passed on.
        let mapped = unsafe { sys::map_file_fixed_at(at(addr), file, offset as u64, len, share) };
        if let Err(e) = mapped {
            drop(views);
            self.after_failed_map(addr, len);
            return Err(e);
        }
        // Private views: a child inherits them as they are (with the statics reattached).
        // Shared ones are kept out of children, which map them again privately.
        if share != Share::Write {
            return Ok(());
        }
        // Recorded before the advice: a hole the child fills is harmless, a view it keeps is
        // not.
        views.add(block, block_len);
        // SAFETY: the view just mapped.
        let advised = unsafe { keep_out_of_children(at(addr), len) };
        if let Err(e) = advised {
            // SAFETY: the view just mapped, which nothing refers to yet.
            if unsafe { sys::reserve_fixed(at(addr), len) }.is_err() {
                self.lost.push((addr, len));
            }
            if offset == 0 {
                views.remove(block);
            } else {
                views.add(block, offset);
            }
            return Err(e);
        }
        Ok(())
    }

    fn open_seg(&self, name: Name) -> io::Result<File> {
        sys::open_at(&self.dir, &name.file_name(), None)
    }

    /// For a fork of the writer (the prepare handler, under the space's lock): every segment's
    /// file, opened now, while its name is still there: the child maps them (see
    /// [`map_private_in_child`](Self::map_private_in_child)), even if the parent removes one
    /// right after the fork.
    pub(super) fn files_for_child(&self) -> ChildFiles {
        if self.share != Share::Write {
            return ChildFiles(Vec::new());
        }
        // Only the shared views (made since the last commit): a child inherits the private
        // ones.
        ChildFiles(
            self.segs
                .iter()
                .filter(|(_, seg)| seg.fresh)
                .filter_map(|(&addr, seg)| {
                    let file = sys::open_read_at(&self.dir, &seg.name.file_name()).ok()?;
                    Some((addr, seg.len, file))
                })
                .collect(),
        )
    }

    /// In a fork child of the store's writer: maps every segment again, as a private
    /// (copy-on-write) view of the file opened for it before the fork, where the parent's view
    /// was. A segment that cannot be mapped stays inaccessible.
    ///
    /// # Safety
    /// Only in a fork child, from its fork handler, while the segments' views are holes
    /// refilled with reservations (they are `dont_fork`), nothing else of the child's.
    pub(super) unsafe fn map_private_in_child(files: &ChildFiles) {
        for (addr, len, file) in &files.0 {
            // SAFETY: the block's range is the parent's view, a reserved hole here (the
            // caller's promise); the file was `len` bytes long at the fork, and a file mapped
            // before a fork is never cut (see `shrink`).
            let _ = unsafe { sys::map_file_fixed_at(at(*addr), file, 0, *len, Share::Private) };
        }
    }

    /// Every block, as (address, mapped length).
    pub(super) fn block_list(&self) -> Vec<(usize, usize)> {
        self.segs
            .iter()
            .map(|(&addr, seg)| (addr, seg.len))
            .collect()
    }

    /// How many blocks are mapped now.
    pub(super) fn blocks(&self) -> usize {
        self.segs.len()
    }

    /// The bytes of every block's mapping.
    pub(super) fn mapped_bytes(&self) -> usize {
        self.segs.values().map(|s| s.len).sum()
    }

    /// Ranges that must not be unmapped when the store closes (see the module docs).
    pub(super) fn lost(&self) -> &[(usize, usize)] {
        &self.lost
    }

    fn writable(&self) -> io::Result<()> {
        match self.share {
            Share::Write => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the store is open read-only",
            )),
        }
    }

    /// A new block of at least `size` bytes aligned to `align`, reading as zeros: its address
    /// and mapped length.
    pub(super) fn allocate(&mut self, size: usize, align: usize) -> io::Result<(usize, usize)> {
        self.writable()?;
        let len = self.round(size)?;
        // Its line in the manifest, before anything is made.
        self.reserve_manifest(self.segs.len() + self.removals.len() + 1)?;
        let (addr, span) = self.take_span(len, align)?;
        let id = Name::Id(self.next_id);
        self.next_id += 1;
        let name = id.file_name();
        // A file of a failed session may be there (a commit removes what it does not list
        // only at the next open): it is nobody's.
        let _ = sys::remove_at(&self.dir, &name, false);
        self.made_files = true;
        let made = sys::open_at(&self.dir, &name, Some(0o600)).and_then(|file| {
            sys::allocate_blocks(&file, 0, len as u64)?;
            // SAFETY: `[addr, addr + span)` was just taken from the free ranges: our
            // reservation, which nothing refers to.
            unsafe { self.map_view(addr, &file, 0, len, len, Share::Write) }
        });
        match made {
            Ok(()) => {
                let epoch = fork::epoch();
                let seg = Seg {
                    len,
                    span,
                    epoch,
                    name: id,
                    fresh: true,
                };
                self.segs.insert(addr, seg);
                Ok((addr, len))
            }
            Err(e) => {
                let _ = sys::remove_at(&self.dir, &name, false);
                self.give_back_unless_lost(addr, span);
                Err(e)
            }
        }
    }

    /// The mapped length of the block at `addr`.
    pub(super) fn len_of(&self, addr: usize) -> Option<usize> {
        self.segs.get(&addr).map(|s| s.len)
    }

    /// Grows the block at `addr` to at least `size` bytes (the new bytes read as zeros): in
    /// place within its span, else moved to a new span. Returns its address and length. On
    /// error the block is as it was.
    pub(super) fn grow(
        &mut self,
        addr: usize,
        size: usize,
        align: usize,
    ) -> io::Result<(usize, usize)> {
        self.writable()?;
        let seg = *self.segs.get(&addr).ok_or_else(not_ours)?;
        let len = self.round(size)?;
        if len <= seg.len {
            return Ok((addr, seg.len));
        }
        if !seg.fresh {
            // A committed block's file holds the last commit, and its view is private (what
            // was written since is in memory): the grown block is a new one, whose pages go to
            // a file of their own (out of core), with the bytes copied over once. The old
            // block's file goes with the next commit.
            let (to, new_len) = self.allocate(len, align)?;
            // SAFETY: both blocks are ours, mapped read/write, and distinct; the old one has
            // `seg.len` bytes and the new one at least as many.
            unsafe {
                std::ptr::copy_nonoverlapping(addr as *const u8, to as *mut u8, seg.len);
            }
            self.free(addr);
            return Ok((to, new_len));
        }
        let file = self.open_seg(seg.name)?;
        // Bytes past the block's end may be left from before a shrink whose cut failed: cut
        // now, so that the new part reads as zeros.
        file.set_len(seg.len as u64)?;
        sys::allocate_blocks(&file, seg.len as u64, (len - seg.len) as u64)?;
        let undo = |file: &File| {
            let _ = file.set_len(seg.len as u64);
        };
        // In place: within the span, unless part of it was lost (see `after_failed_map`).
        if len <= seg.span && !self.overlaps_lost(addr + seg.len, len - seg.len) {
            let tail = addr + seg.len;
            let mut views = fork::hold();
            // SAFETY: the block's view is ours, and `[tail, addr + len)` lies in its span, past
            // the view: our reservation, which nothing refers to. The file has `len` bytes.
            let extended = unsafe { extend_in_place(at(addr), seg.len, len, &file, Share::Write) };
            if let Err(e) = extended {
                drop(views);
                self.after_failed_map(tail, len - seg.len);
                undo(&file);
                return Err(e);
            }
            views.add(addr, len);
            drop(views);
            self.set_len(addr, len);
            return Ok((addr, len));
        }
        let (to, span) = match self.take_span(len, align) {
            Ok(taken) => taken,
            Err(e) => {
                undo(&file);
                return Err(e);
            }
        };
        let mut views = fork::hold();
        // SAFETY: the block's mapping is ours, and `[to, to + span)` was just taken from the
        // free ranges: our reservation, which nothing refers to. The file has `len` bytes.
        let moved = unsafe { move_mapping(at(addr), seg.len, len, at(to), &file) };
        if moved.is_ok() {
            views.remove(addr);
            views.add(to, len);
        }
        drop(views);
        if let Err(e) = moved {
            undo(&file);
            // The target may or may not still be our reservation (see `sys::remap`).
            self.after_failed_map(to, len);
            self.give_back_unless_lost(to, span);
            return Err(e);
        }
        // The old view is gone: its range is a gap until reserved again.
        self.segs.remove(&addr);
        // The same file, whose name does not change: a child that maps it still does.
        self.segs.insert(to, Seg { len, span, ..seg });
        self.after_failed_map(addr, seg.len);
        self.give_back_unless_lost(addr, seg.span);
        Ok((to, len))
    }

    /// Shrinks the block at `addr` to at least `size` (> 0) bytes, giving the rest of its file
    /// back. Returns its mapped length (the old one if nothing could be given back).
    pub(super) fn shrink(&mut self, addr: usize, size: usize) -> io::Result<usize> {
        let seg = *self.segs.get(&addr).ok_or_else(not_ours)?;
        let len = self.round(size.max(1))?;
        // A file mapped before the last fork is not cut: a child may map it, and would die of
        // `SIGBUS` past its new end. Nor is a committed one: its bytes are the last commit's.
        // The block stays whole (a valid shrink).
        if len >= seg.len || self.share != Share::Write || seg.epoch < fork::epoch() || !seg.fresh {
            return Ok(seg.len);
        }
        let mut views = fork::hold();
        // SAFETY: `[addr + len, addr + seg.len)` is the end of the block's own mapping, which
        // the caller gives up (it shrinks the block).
        let reserved = unsafe { sys::reserve_fixed(at(addr + len), seg.len - len) };
        views.add(addr, len);
        drop(views);
        if reserved.is_err() {
            // A failed MAP_FIXED may have unmapped the tail (a gap): it is ours again if it can
            // be reserved in place, else it is never touched again. The block ends at `len`
            // either way.
            self.after_failed_map(addr + len, seg.len - len);
        }
        self.set_len(addr, len);
        // The view ends at `len` now: cutting the file cannot leave a page past its end mapped.
        if let Ok(file) = self.open_seg(seg.name) {
            let _ = file.set_len(len as u64);
        }
        Ok(len)
    }

    /// Frees the block at `addr`: its view becomes a reservation again, its file is removed.
    pub(super) fn free(&mut self, addr: usize) {
        let Some(seg) = self.segs.remove(&addr) else {
            debug_assert!(false, "freeing {addr:#x}, not a block of the store");
            return;
        };
        let mut views = fork::hold();
        // SAFETY: the block's own mapping, which the caller frees: nothing refers to it.
        let reserved = unsafe { sys::reserve_fixed(at(addr), seg.len) }.is_ok();
        views.remove(addr);
        drop(views);
        if self.share == Share::Write {
            if seg.fresh {
                let _ = sys::remove_at(&self.dir, &seg.name.file_name(), false);
            } else {
                // The last commit lists it: removed once a commit no longer does.
                self.removals.push(seg.name);
            }
        }
        if !reserved {
            // The view may still be there, or someone else's mapping: never reuse it.
            self.lost.push((addr, seg.len));
        }
        self.give_back_unless_lost(addr, seg.span);
    }

    /// Before a commit point: the blocks made since the last commit (shared views) become
    /// private views of their files, whose writes are tracked from then on, and the files
    /// are synced (after the switch: a write made through the shared view until then is in
    /// the file's pages); the folder is synced if a file was made. Returns the manifest the
    /// commit writes. On error the commit must not be made; what was done stays done (a
    /// block made private is taken by the next commit as any other, its file synced first).
    pub(super) fn prepare_commit(&mut self) -> io::Result<Vec<u8>> {
        self.writable()?;
        if let Some(why) = &self.broken {
            return Err(io::Error::other(format!(
                "a block's view was lost while it was made private ({why}): reopen the store"
            )));
        }
        let fresh: Vec<usize> = self
            .segs
            .iter()
            .filter(|(_, seg)| seg.fresh)
            .map(|(&addr, _)| addr)
            .collect();
        for addr in fresh {
            let seg = self.segs[&addr];
            sys::io_point("make a new segment private")?;
            let file = self.open_seg(seg.name)?;
            let mut views = fork::hold();
            // SAFETY: the block's own view, replaced by a view of the same file (whose pages
            // hold what the old view showed: the page cache is the file's), at the same place
            // and length; under the fork lock, with its record.
            let private =
                unsafe { sys::map_file_fixed_at(at(addr), &file, 0, seg.len, Share::Private) };
            if let Err(e) = private {
                // The shared view again if the range is still ours (a failed `MAP_FIXED` may
                // have unmapped it): the block stays as it was.
                // SAFETY: as above: the block's range, its file.
                let again =
                    unsafe { sys::map_file_fixed_at(at(addr), &file, 0, seg.len, Share::Write) };
                if again.is_err() {
                    if !sys::is_mapped(at(addr), seg.len) {
                        self.lost.push((addr, seg.len));
                    }
                    self.broken = Some(e.to_string());
                }
                return Err(e);
            }
            views.remove(addr);
            drop(views);
            self.track(addr, seg.len);
            if let Some(seg) = self.segs.get_mut(&addr) {
                seg.fresh = false;
            }
            self.to_sync.push(seg.name);
        }
        while let Some(&name) = self.to_sync.last() {
            // Freed since: nothing to sync.
            if let Ok(file) = self.open_seg(name) {
                sys::sync_data(&file, "sync a new segment")?;
            }
            self.to_sync.pop();
        }
        if self.made_files {
            sys::io_point("sync the segments' folder")?;
            self.dir.sync_all()?;
        }
        Ok(self.manifest_bytes())
    }

    /// Drops the private copies of every committed block's pages (see [`Store::trim`]).
    ///
    /// # Safety
    /// The last commit must be in the files, and nothing may write to the blocks meanwhile.
    ///
    /// [`Store::trim`]: super::Store::trim
    pub(super) unsafe fn drop_private_copies(&self) -> io::Result<()> {
        for (&addr, seg) in self.segs.iter().filter(|(_, seg)| !seg.fresh) {
            // SAFETY: the block's private view, ours; the caller's promises.
            unsafe { sys::drop_private_copies(at(addr), seg.len) }?;
        }
        Ok(())
    }

    /// The committed blocks (private views): (address, length, file), whose written pages a
    /// commit logs.
    pub(super) fn private_views(&self) -> Vec<(usize, usize, Name)> {
        self.segs
            .iter()
            .filter(|(_, seg)| !seg.fresh)
            .map(|(&addr, seg)| (addr, seg.len, seg.name))
            .collect()
    }

    /// After a commit point: the files of blocks freed before it are removed.
    pub(super) fn after_commit(&mut self) {
        self.made_files = false;
        // A file whose removal fails stays listed for removal (the next open removes it).
        let removals = std::mem::take(&mut self.removals);
        self.removals = removals
            .into_iter()
            .filter(|name| {
                matches!(sys::remove_at(&self.dir, &name.file_name(), false),
                    Err(e) if e.kind() != io::ErrorKind::NotFound)
            })
            .collect();
    }

    /// A private view just mapped at `addr`: its writes are tracked from now.
    fn track(&self, addr: usize, len: usize) {
        if let Some(tracker) = &self.tracker {
            // SAFETY: the block's view, ours.
            unsafe { tracker.track(at(addr), len) };
        }
    }

    /// The list of segments as a commit records it: magic, count, the next number, the count
    /// of files removed, then per segment its name (two words), address, span and length, per
    /// file removed its name; a checksum.
    pub(super) fn manifest_bytes(&self) -> Vec<u8> {
        let (count, removed) = (self.segs.len(), self.removals.len());
        let mut bytes = Vec::with_capacity(manifest_len(count, removed));
        let mut put = |word: u64| bytes.extend_from_slice(&word.to_ne_bytes());
        put(MANIFEST_MAGIC);
        put(count as u64);
        put(self.next_id);
        put(removed as u64);
        for (&addr, seg) in &self.segs {
            let (a, b) = seg.name.words();
            for word in [a, b, addr as u64, seg.span as u64, seg.len as u64] {
                put(word);
            }
        }
        for name in &self.removals {
            let (a, b) = name.words();
            put(a);
            put(b);
        }
        let sum = checksum(&bytes);
        bytes.extend_from_slice(&sum.to_ne_bytes());
        debug_assert_eq!(bytes.len(), manifest_len(count, removed));
        bytes
    }

    /// A writer's manifest file, made if missing, with room reserved for the segments there
    /// are and one more.
    fn open_manifest(&mut self) -> io::Result<()> {
        if self.share != Share::Write {
            return Ok(());
        }
        let file = match sys::open_at(&self.dir, OsStr::new(MANIFEST), None) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                sys::open_at(&self.dir, OsStr::new(MANIFEST), Some(0o600))?
            }
            other => other?,
        };
        self.manifest = Some(file);
        self.reserve_manifest(self.segs.len() + 1)
    }

    /// Reserves the disk a manifest of `segments` entries takes, so that writing it at a
    /// durable point needs no new disk: a full disk fails the allocation that makes a
    /// segment, never a `flush` or `close` (in 4 KiB steps; the file's length is what was
    /// written).
    fn reserve_manifest(&mut self, segments: usize) -> io::Result<()> {
        let Some(file) = &self.manifest else {
            return Ok(());
        };
        let need = manifest_len(segments, 0) as u64;
        if need <= self.manifest_reserved {
            return Ok(());
        }
        let reserve = need.next_multiple_of(4096);
        sys::reserve_blocks(file, 0, reserve)?;
        self.manifest_reserved = reserve;
        Ok(())
    }

    /// The segments the manifest lists, by address.
    fn read_manifest(&self) -> io::Result<Recorded> {
        let missing = |e: io::Error| match e.kind() {
            io::ErrorKind::NotFound => corrupt("the store's list of segments is missing".into()),
            _ => e,
        };
        let file = sys::open_read_at(&self.dir, OsStr::new(MANIFEST)).map_err(missing)?;
        let mut bytes = Vec::new();
        io::Read::read_to_end(&mut &file, &mut bytes)?;
        let bad = || corrupt("the store's list of segments is damaged".into());
        if bytes.len() < 24 {
            return Err(bad());
        }
        let word = |i: usize| u64::from_ne_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap());
        let named = match word(0) {
            MANIFEST_MAGIC => true,
            MANIFEST_MAGIC_V1 => false,
            _ => return Err(bad()),
        };
        let (head, each) = if named { (4, 5) } else { (2, 3) };
        if bytes.len() < head * 8 + 8 {
            return Err(bad());
        }
        let count = usize::try_from(word(1)).map_err(|_| bad())?;
        let removed = if named {
            usize::try_from(word(3)).map_err(|_| bad())?
        } else {
            0
        };
        let len = count
            .checked_mul(each * 8)
            .and_then(|n| n.checked_add(removed.checked_mul(16)?))
            .and_then(|n| n.checked_add(head * 8 + 8))
            .filter(|&n| n <= bytes.len())
            .ok_or_else(bad)?;
        let words = len / 8;
        if word(words - 1) != checksum(&bytes[..len - 8]) {
            return Err(bad());
        }
        let as_usize = |w: u64| usize::try_from(w).map_err(|_| bad());
        let segments = (0..count)
            .map(|i| {
                let at = head + i * each;
                if named {
                    let name = Name::from_words(word(at), word(at + 1)).ok_or_else(bad)?;
                    Ok((
                        name,
                        as_usize(word(at + 2))?,
                        as_usize(word(at + 3))?,
                        as_usize(word(at + 4))?,
                    ))
                } else {
                    let (addr, span) = (as_usize(word(at))?, as_usize(word(at + 1))?);
                    Ok((
                        Name::Legacy { addr, span },
                        addr,
                        span,
                        as_usize(word(at + 2))?,
                    ))
                }
            })
            .collect::<io::Result<Vec<_>>>()?;
        let removed = (0..removed)
            .map(|i| {
                let at = head + count * each + i * 2;
                Name::from_words(word(at), word(at + 1)).ok_or_else(bad)
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Recorded {
            next_id: if named { word(2) } else { 0 },
            removed,
            named,
            segments,
        })
    }

    /// Records the new mapped length of the block at `addr`.
    fn set_len(&mut self, addr: usize, len: usize) {
        if let Some(seg) = self.segs.get_mut(&addr) {
            seg.len = len;
        }
    }

    fn round(&self, size: usize) -> io::Result<usize> {
        size.max(1)
            .checked_next_multiple_of(self.page)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))
    }

    /// Takes a free span for a block of `len` bytes: twice the next power of two if there is
    /// room (so that it can grow in place), else just `len`.
    fn take_span(&mut self, len: usize, align: usize) -> io::Result<(usize, usize)> {
        let align = align.max(self.page);
        let roomy = len
            .checked_next_power_of_two()
            .and_then(|p| p.checked_mul(2))
            .map(|s| s.max(MIN_SPAN));
        let roomy = roomy.map(|span| (span, align.max(span.min(SPAN_ALIGN))));
        for (span, align) in roomy.into_iter().chain([(len, align)]) {
            if let Some(addr) = self.take_free(span, align) {
                return Ok((addr, span));
            }
        }
        Err(io::Error::new(
            io::ErrorKind::OutOfMemory,
            "the store's address range is full",
        ))
    }

    /// Best fit: the shortest free range that holds `len` bytes at an `align`ed address.
    fn take_free(&mut self, len: usize, align: usize) -> Option<usize> {
        let (addr, _) = self
            .by_len
            .range((len, 0)..)
            .map(|&(free_len, start)| (start.next_multiple_of(align), start + free_len))
            .find(|&(addr, end)| addr.checked_add(len).is_some_and(|e| e <= end))?;
        let taken = self.take_range(addr, len);
        debug_assert!(taken, "a best fit is free");
        Some(addr)
    }

    /// Removes `[addr, addr + len)` from the free ranges: `false` (and nothing removed) unless
    /// it lies inside one of them.
    #[must_use]
    fn take_range(&mut self, addr: usize, len: usize) -> bool {
        let Some((&start, &free_len)) = self.free.range(..=addr).next_back() else {
            return false;
        };
        if addr
            .checked_add(len)
            .is_none_or(|end| end > start + free_len)
        {
            return false;
        }
        self.free.remove(&start);
        self.by_len.remove(&(free_len, start));
        if addr > start {
            self.free.insert(start, addr - start);
            self.by_len.insert((addr - start, start));
        }
        let end = start + free_len;
        if addr + len < end {
            self.free.insert(addr + len, end - addr - len);
            self.by_len.insert((end - addr - len, addr + len));
        }
        true
    }

    fn insert_free(&mut self, mut addr: usize, mut len: usize) {
        if let Some((&before, &before_len)) = self.free.range(..addr).next_back()
            && before + before_len == addr
        {
            self.free.remove(&before);
            self.by_len.remove(&(before_len, before));
            addr = before;
            len += before_len;
        }
        if let Some(&after_len) = self.free.get(&(addr + len)) {
            self.free.remove(&(addr + len));
            self.by_len.remove(&(after_len, addr + len));
            len += after_len;
        }
        self.free.insert(addr, len);
        self.by_len.insert((len, addr));
    }

    /// After a `MAP_FIXED` or `mremap` over `[addr, addr + len)` failed, or a view moved away
    /// from there: the range is ours again if it can be reserved in place; otherwise it is
    /// either still our reservation or someone else's mapping, and is marked lost.
    fn after_failed_map(&mut self, addr: usize, len: usize) {
        if sys::reserve_at(at(addr), len).is_err() {
            self.lost.push((addr, len));
        }
    }

    /// Whether any part of `[addr, addr + len)` is marked lost.
    fn overlaps_lost(&self, addr: usize, len: usize) -> bool {
        self.lost
            .iter()
            .any(|&(a, l)| a < addr + len && a + l > addr)
    }

    /// Returns a span to the free ranges, less any part marked lost.
    fn give_back_unless_lost(&mut self, addr: usize, span: usize) {
        let end = addr + span;
        let mut lost: Vec<(usize, usize)> = self
            .lost
            .iter()
            .copied()
            .filter(|&(a, l)| a < end && a + l > addr)
            .collect();
        lost.sort_unstable();
        let mut from = addr;
        for (a, l) in lost {
            if a > from {
                self.insert_free(from, a - from);
            }
            from = from.max(a + l);
        }
        if from < end {
            self.insert_free(from, end - from);
        }
    }
}

/// `MADV_DONTFORK` on a view of the store (the store is built on Linux only: elsewhere a child
/// would share its views, and could write to them).
///
/// # Safety
/// `[addr, addr + len)` must be the caller's mapping; the advice leaves its contents alone.
pub(super) unsafe fn keep_out_of_children(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: the caller's mapping; DONTFORK changes no content.
        unsafe { sys::advise(addr, len, sys::Advice::DontFork) }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (addr, len);
        Ok(())
    }
}

fn not_ours() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, "not a block of this store")
}

fn at(addr: usize) -> NonNull<u8> {
    NonNull::new(addr as *mut u8).expect("store addresses are never null")
}

/// Extends the view `[addr, addr + old_len)` of `file` to `new_len` bytes in place. On error
/// the view is as it was, and the range past it may be a gap.
///
/// `mremap`, after the reservation past the view is unmapped: one mapping (a view mapped in two
/// parts from two descriptors would be two, and `mremap` cannot move two at once).
///
/// # Safety
/// The view must be the caller's and `[addr + old_len, addr + new_len)` its reservation.
#[cfg(target_os = "linux")]
unsafe fn extend_in_place(
    addr: NonNull<u8>,
    old_len: usize,
    new_len: usize,
    _file: &File,
    _share: Share,
) -> io::Result<()> {
    // SAFETY: the caller's reservation; for an instant it is a gap, which the caller
    // reserves again (or marks lost) if the extension fails.
    unsafe { sys::unmap(addr.add(old_len), new_len - old_len) }?;
    // SAFETY: the caller's view; in place, so no other mapping moves.
    unsafe { sys::remap(addr, old_len, new_len, sys::RemapTo::InPlace) }.map(drop)
}

/// Without `mremap`: the whole file mapped again over the view and the reservation past it
/// (no byte copied: the pages are the file's).
#[cfg(not(target_os = "linux"))]
unsafe fn extend_in_place(
    addr: NonNull<u8>,
    _old_len: usize,
    new_len: usize,
    file: &File,
    share: Share,
) -> io::Result<()> {
    // SAFETY: the view and the reservation past it are the caller's.
    unsafe { sys::map_file_fixed_at(addr, file, 0, new_len, share) }
}

/// Moves the view `[from, from + old_len)` of `file` to `to`, `new_len` bytes long.
///
/// # Safety
/// The view must be the caller's, and `[to, to + new_len)` the caller's reservation.
#[cfg(target_os = "linux")]
unsafe fn move_mapping(
    from: NonNull<u8>,
    old_len: usize,
    new_len: usize,
    to: NonNull<u8>,
    _file: &File,
) -> io::Result<()> {
    // SAFETY: forwarded: both ranges are the caller's.
    unsafe { sys::remap(from, old_len, new_len, sys::RemapTo::Fixed(to)) }.map(drop)
}

/// Without `mremap`: the file mapped again at `to`, the old view unmapped (no byte copied:
/// both views are of the same file).
#[cfg(not(target_os = "linux"))]
unsafe fn move_mapping(
    from: NonNull<u8>,
    old_len: usize,
    new_len: usize,
    to: NonNull<u8>,
    file: &File,
) -> io::Result<()> {
    // SAFETY: `[to, to + new_len)` is the caller's reservation.
    unsafe { sys::map_file_fixed_at(to, file, 0, new_len, Share::Write) }?;
    // SAFETY: the old view is the caller's; unmapped here, the caller reserves it again.
    unsafe { sys::unmap(from, old_len) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space(len: usize) -> (Space, tempdir::Dir) {
        let dir = tempdir::Dir::new();
        let base = sys::reserve(len).unwrap().as_ptr().addr();
        let handle = File::open(&dir.0).unwrap();
        (Space::new(handle, base, base + len, Share::Write), dir)
    }

    mod tempdir {
        pub(super) struct Dir(pub(super) std::path::PathBuf);
        impl Dir {
            pub(super) fn new() -> Dir {
                use std::sync::atomic::{AtomicU64, Ordering};
                static N: AtomicU64 = AtomicU64::new(0);
                let path = std::env::temp_dir().join(format!(
                    "mmapvec-space-{}-{}",
                    std::process::id(),
                    N.fetch_add(1, Ordering::Relaxed)
                ));
                std::fs::create_dir(&path).unwrap();
                Dir(path)
            }
        }
        impl Drop for Dir {
            fn drop(&mut self) {
                let _ = std::fs::remove_dir_all(&self.0);
            }
        }
    }

    fn fill(addr: usize, len: usize, byte: u8) {
        // SAFETY: the test's own block, mapped read/write for `len` bytes.
        unsafe { std::ptr::write_bytes(addr as *mut u8, byte, len) };
    }

    fn all(addr: usize, len: usize, byte: u8) -> bool {
        // SAFETY: the test's own block, mapped for `len` bytes.
        let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
        bytes.iter().all(|&b| b == byte)
    }

    #[test]
    fn blocks_grow_in_place_then_move_keeping_their_bytes() {
        let (mut space, _dir) = space(1 << 30);
        let (a, len) = space.allocate(100, 8).unwrap();
        assert_eq!(len, sys::page_size());
        fill(a, len, 7);
        let (b, len2) = space.grow(a, 3 * len, 8).unwrap();
        assert_eq!(b, a, "within its span: in place");
        assert!(all(a, len, 7) && all(a + len, len2 - len, 0));
        let (c, len3) = space.grow(b, 1 << 20, 8).unwrap();
        assert_ne!(c, b, "past its span: moved");
        assert!(all(c, len, 7) && all(c + len, len3 - len, 0));
        assert_eq!(space.blocks(), 1);
        assert_eq!(space.shrink(c, 10).unwrap(), sys::page_size());
        assert!(all(c, 10, 7));
        space.free(c);
        assert_eq!(space.blocks(), 0);
        assert_eq!(sys::names_in(&space.dir).unwrap().len(), 0);
        assert_eq!(space.free.len(), 1, "every span merged back");
    }

    #[test]
    fn a_full_range_is_an_error_not_a_panic() {
        let (mut space, _dir) = space(1 << 20);
        assert!(space.allocate(2 << 20, 8).is_err());
        let (a, _) = space.allocate(1 << 20, 8).unwrap();
        assert!(space.allocate(1, 8).is_err());
        space.free(a);
        assert!(space.allocate(1, 8).is_ok());
    }

    #[test]
    fn alignment_is_kept() {
        let (mut space, _dir) = space(1 << 30);
        let (a, _) = space.allocate(1, 1 << 16).unwrap();
        assert!(a.is_multiple_of(1 << 16));
        let (b, _) = space.allocate(1, 1 << 21).unwrap();
        assert!(b.is_multiple_of(1 << 21));
    }
}
