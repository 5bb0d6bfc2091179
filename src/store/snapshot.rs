//! Snapshots of a store, and recovery from the last one.
//!
//! A snapshot is a folder `snapshots/<n>/` holding a copy of the header (marked clean) and of
//! every segment file: reflinks where the file system has them (XFS, btrfs: O(1) in the data,
//! the blocks are shared until written), copies otherwise. It is made under a temporary name
//! and renamed when complete, so a crash leaves either the old snapshot or the new one, and a
//! snapshot that fails is removed. Only the newest is kept.
//!
//! Every file and folder made here is its owner's only (0600, 0700), whatever the umask, and
//! no link is followed inside the store's folder: a `snapshots` that is a link is refused.
//! Copies keep the holes of sparse files.

use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::ptr::NonNull;
use std::sync::atomic::Ordering;

use super::folder::Folder;
use super::space::SEGS;
use super::{
    Access, DIRTY_AT, HEADER, Header, RECOVERING, SMALL, SMALL_META, Store, StoreError, not_found,
};
use crate::sys;

/// The folder of the snapshots.
const SNAPSHOTS: &str = "snapshots";

/// What [`Store::snapshot`] made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Snapshot {
    /// Its number: the store's count of snapshots.
    pub number: u64,
    /// The bytes of the segment files it holds.
    pub bytes: u64,
    /// Whether every file was a reflink (O(1) in the data), not a copy.
    pub reflinked: bool,
}

/// Copies (reflinks) the file `from_name` of `from` to the new file `to_name` of `to`, and
/// syncs it. Neither is followed if it is a link; the new file is private.
fn clone_file(
    from: &Folder,
    from_name: &str,
    to: &Folder,
    to_name: &str,
) -> io::Result<(u64, bool)> {
    let source = from.file(from_name.as_ref(), Access::Read, false)?;
    let target = to.file(to_name.as_ref(), Access::Write, true)?;
    sys::io_point("copy a file")?;
    let reflinked = sys::clone_file(&source, &target)?;
    sys::io_point("sync a copy")?;
    target.sync_all()?;
    Ok((source.metadata()?.len(), reflinked))
}

/// Copies every file of the folder `from` into `to`, a folder just made.
fn clone_folder(from: &Folder, to: &Folder) -> io::Result<(u64, bool)> {
    let (mut bytes, mut reflinked) = (0, true);
    for name in from.names()? {
        let name = name.to_str().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                "a segment name that is not UTF-8",
            )
        })?;
        let (b, r) = clone_file(from, name, to, name)?;
        bytes += b;
        reflinked &= r;
    }
    to.sync()?;
    Ok((bytes, reflinked))
}

/// The numbers of the complete snapshots in `folder`, newest last.
fn complete(folder: &Folder) -> io::Result<Vec<u64>> {
    let mut numbers = folder
        .names()?
        .iter()
        .filter_map(|n| n.to_str()?.parse::<u64>().ok())
        .collect::<Vec<_>>();
    numbers.sort_unstable();
    Ok(numbers)
}

impl Store {
    /// Snapshots taken so far.
    pub fn snapshots(&self) -> u64 {
        if self.generation != crate::fork::generation() {
            return 0; // a fork child has no view of the header
        }
        // Relaxed: see `flushes`.
        self.header().snapshots.load(Ordering::Relaxed)
    }

    /// Takes a snapshot: flushes, then keeps a copy of the whole store that
    /// [`recover`](Self::recover) goes back to. Reflinks where the file system has them (O(1)
    /// in the data), copies otherwise. Only the newest snapshot is kept.
    ///
    /// No block is allocated, grown or freed while it runs (the store's locks), but what other
    /// threads write into existing blocks meanwhile may or may not be in it: take it where the
    /// data is consistent (no other thread changing it).
    pub fn snapshot(&self) -> Result<Snapshot, StoreError> {
        self.check_use(true)?;
        // Never through a link: one here would send the copies, and the removal of older
        // snapshots, elsewhere.
        let folder = self.folder.dir_or_new(SNAPSHOTS).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{}/{SNAPSHOTS} is not a folder of the store's own: {e}",
                    self.path.display()
                ),
            )
        })?;
        let shared = self.shared();
        let _roots = shared.lock_roots();
        let mut space = shared.lock_space();
        let header = self.header();
        let number = header.snapshots.load(Ordering::Acquire) + 1;
        // Counted by the commit the snapshot copies; the files then hold that commit alone
        // (the log emptied), and nothing changes them while the store's locks are held.
        header.snapshots.store(number, Ordering::Release);
        if let Err(e) = self.commit_locked(&mut space, true) {
            header.snapshots.store(number - 1, Ordering::Release);
            return Err(e);
        }
        let partial = format!("partial-{number}");
        let name = number.to_string();
        let made = folder
            .remove_tree(&partial)
            .and_then(|()| folder.make_dir(&partial))
            .map_err(StoreError::from)
            .and_then(|into| self.snapshot_into(&into))
            .and_then(|made| {
                folder.rename(&partial, &name)?;
                folder.sync()?;
                Ok(made)
            });
        if made.is_err() {
            // Nothing of a failed snapshot stays (under either name), and its number is not
            // used (the commit made for it counted it: the next commit does not).
            let _ = folder.remove_tree(&partial);
            let _ = folder.remove_tree(&name);
            header.snapshots.store(number - 1, Ordering::Release);
        }
        let (bytes, reflinked) = made?;
        // Older snapshots are superseded (one that cannot be removed now goes with the next).
        for old in complete(&folder).unwrap_or_default() {
            if old < number {
                let _ = folder.remove_tree(&old.to_string());
            }
        }
        Ok(Snapshot {
            number,
            bytes,
            reflinked,
        })
    }

    /// Copies the store's files (as of the commit just made) into the new folder `partial`.
    /// The caller holds the store's locks and removes `partial` on failure.
    fn snapshot_into(&self, partial: &Folder) -> Result<(u64, bool), StoreError> {
        let segs = partial.make_dir(SEGS)?;
        let (mut bytes, mut reflinked) = clone_folder(&self.folder.dir(SEGS)?, &segs)?;
        for name in [SMALL, SMALL_META] {
            let (b, r) = clone_file(&self.folder, name, partial, name)?;
            bytes += b;
            reflinked &= r;
        }
        clone_file(&self.folder, HEADER, partial, HEADER)?;
        let copy = partial.file(HEADER.as_ref(), Access::Write, false)?;
        sys::io_point("mark the snapshot's header clean")?;
        copy.write_all_at(&0u64.to_ne_bytes(), DIRTY_AT)?;
        copy.sync_all()?;
        partial.sync()?;
        Ok((bytes, reflinked))
    }

    /// Puts the store in the folder `path` back to its last snapshot, whatever its state (a
    /// store left dirty by a writer that died, typically), then opens it for writing. Refused
    /// while anyone has it open ([`StoreError::Locked`]); [`StoreError::NoSnapshot`] if it
    /// has none. Only a snapshot of this store is taken (its header names the store): a
    /// snapshot folder copied in from another store is [`StoreError::NotAStore`].
    ///
    /// Then it frees every block that no root reaches: blocks that only the crashed writer's
    /// local variables held when the snapshot was taken (a vector being built). It traces the
    /// roots conservatively, reading every block they reach once; [`Store::recovery`] says
    /// what was freed.
    pub fn recover(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        let path = path.as_ref();
        let folder = Folder::open(path).map_err(not_found)?;
        // Held from here until the store is open: nobody opens it in between.
        let lock = Store::lock_folder(&folder, Access::Write)?;
        // What would refuse the open is refused before anything is changed.
        if super::open_here().is_some() {
            return Err(StoreError::AnotherStoreOpen);
        }
        let snapshot = Self::restore(&folder)?;
        let mut store = Store::open_locked(path, folder, lock, Access::Write, false)?;
        // What only the writer's local variables held when the snapshot was taken.
        let (unreachable_blocks, unreachable_bytes) = store.free_unreachable();
        store.flush()?;
        store.recovery = Some(super::Recovery {
            snapshot,
            unreachable_blocks,
            unreachable_bytes,
        });
        Ok(store)
    }

    /// Puts the last snapshot back; returns its number. The caller holds the store's lock.
    ///
    /// The snapshot is checked whole first (its header, its segments against its manifest,
    /// its small blocks' metadata against its chunk file): a damaged one is refused
    /// ([`StoreError::NotAStore`]) with the live files untouched, for
    /// [`Store::open_dirty_read_only`] to read. Then the live header is marked dirty (and
    /// synced), so that a recovery cut short anywhere leaves a store that opens as dirty, never
    /// as clean over a mix of files, and is recovered again.
    fn restore(folder: &Folder) -> Result<u64, StoreError> {
        // The store's own header must be readable by this build (its range and format).
        let live_file = folder
            .file(HEADER.as_ref(), Access::Write, false)
            .map_err(not_found)?;
        let live = Header::read(&live_file)?;
        let snapshots = match folder.dir(SNAPSHOTS) {
            Ok(snapshots) => snapshots,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(StoreError::NoSnapshot),
            Err(e) => return Err(e.into()),
        };
        let number = *complete(&snapshots)?.last().ok_or(StoreError::NoSnapshot)?;
        let snapshot = snapshots.dir(&number.to_string())?;
        let copy = Header::read(
            &snapshot
                .file(HEADER.as_ref(), Access::Read, false)
                .map_err(not_found)?,
        )?;
        if copy.dirty != 0 || copy.id != live.id || (copy.base, copy.len) != (live.base, live.len) {
            return Err(StoreError::NotAStore);
        }
        Self::check_snapshot(&snapshot, &copy).map_err(|e| {
            crate::logging::report!(error, "mmapvec: recover: snapshot {number}: {e}");
            not_found(e)
        })?;
        // The range must be free here, or the store could not be opened after.
        let (base, len) = (copy.base as usize, copy.len as usize);
        let at = NonNull::new(base as *mut u8).ok_or(StoreError::NotAStore)?;
        match sys::reserve_at(at, len) {
            // SAFETY: the reservation just made, which nothing refers to.
            Ok(()) => unsafe { sys::unmap(at, len) }?,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::AddressTaken { base, len });
            }
            Err(e) => return Err(e.into()),
        }
        // From here the live files change: dirty first, whatever the store was.
        sys::io_point("mark the store dirty for recovery")?;
        live_file.write_all_at(&RECOVERING.to_ne_bytes(), DIRTY_AT)?;
        sys::io_point("sync the store's header")?;
        live_file.sync_data()?;
        drop(live_file);
        // The live store's commits not yet in its files are worthless now.
        folder.remove_file(super::commit::LOG)?;
        // The live files of a store left dirty are worthless: they go first, so that recovery
        // needs no room for a third copy. Then the segments, into a new folder swapped in
        // whole; the header last, by rename: until then the store is dirty (marked above), and
        // a crash here is recovered again.
        folder.remove_tree("segs.old")?;
        // Missing after a recovery that stopped between the renames.
        match folder.rename(SEGS, "segs.old") {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => other?,
        }
        folder.remove_tree("segs.old")?;
        for name in [SMALL, SMALL_META] {
            folder.remove_file(name)?;
        }
        folder.sync()?;
        let fresh = "segs.recovering";
        folder.remove_tree(fresh)?;
        clone_folder(&snapshot.dir(SEGS)?, &folder.make_dir(fresh)?)?;
        folder.rename(fresh, SEGS)?;
        for name in [SMALL, SMALL_META] {
            let fresh = format!("{name}.recovering");
            folder.remove_file(&fresh)?;
            clone_file(&snapshot, name, folder, &fresh)?;
            folder.rename(&fresh, name)?;
        }
        let header = "header.recovering";
        folder.remove_file(header)?;
        clone_file(&snapshot, HEADER, folder, header)?;
        folder.rename(header, HEADER)?;
        folder.sync()?;
        Ok(number)
    }

    /// Checks a snapshot's files as an open of them would (see `restore`).
    fn check_snapshot(snapshot: &Folder, header: &super::HeaderCopy) -> io::Result<()> {
        let bad = || io::Error::new(io::ErrorKind::InvalidData, "not a store's snapshot");
        let (base, len) = (
            usize::try_from(header.base).map_err(|_| bad())?,
            usize::try_from(header.len).map_err(|_| bad())?,
        );
        let small = usize::try_from(header.small).map_err(|_| bad())?;
        let (start, end) = (
            base.checked_add(super::DATA)
                .and_then(|s| s.checked_add(small))
                .ok_or_else(bad)?,
            base.checked_add(len).ok_or_else(bad)?,
        );
        let segs = snapshot.dir(SEGS)?.into_file();
        super::space::Space::check_folder(segs, start, end, header.version >= 3)?;
        let meta = snapshot.file(SMALL_META.as_ref(), Access::Read, false)?;
        let chunks = snapshot.file(SMALL.as_ref(), Access::Read, false)?;
        crate::arena::check_saved(&meta, &chunks, small / crate::arena::CHUNK)
    }
}
