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

use std::ffi::OsStr;
use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use super::space::SEGS;
use super::{
    Access, HEADER, Header, LOCK, PrivateMode, SMALL, SMALL_META, Store, StoreError, lock_file,
    open_file,
};
use crate::sys;

/// The folder of the snapshots.
const SNAPSHOTS: &str = "snapshots";
/// Where the header's `dirty` word is.
const DIRTY_AT: u64 = 32;

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

/// Copies (reflinks) the file `name` of `from` into `to`.
fn clone_into(from: &Path, to: &Path, name: &OsStr) -> io::Result<(u64, bool)> {
    clone_path(&from.join(name), &to.join(name))
}

/// Copies (reflinks) the file `from` to the new file `to`, and syncs it. Neither path is
/// followed if it is a link; the new file is private.
fn clone_path(from: &Path, to: &Path) -> io::Result<(u64, bool)> {
    let source = open_file(from, Access::Read, false)?;
    let target = open_file(to, Access::Write, true)?;
    let reflinked = sys::clone_file(&source, &target)?;
    target.sync_all()?;
    Ok((source.metadata()?.len(), reflinked))
}

/// Copies every file of the folder `from` into the new (private) folder `to`.
fn clone_folder(from: &Path, to: &Path) -> io::Result<(u64, bool)> {
    fs::DirBuilder::new().mode_private().create(to)?;
    let (mut bytes, mut reflinked) = (0, true);
    for name in sys::names_in(&real_folder(from)?)? {
        let (b, r) = clone_into(from, to, &name)?;
        bytes += b;
        reflinked &= r;
    }
    File::open(to)?.sync_all()?;
    Ok((bytes, reflinked))
}

/// The numbers of the complete snapshots in `folder`, newest last.
fn complete(folder: &Path) -> io::Result<Vec<u64>> {
    let mut numbers = match real_folder(folder) {
        Ok(dir) => sys::names_in(&dir)?
            .iter()
            .filter_map(|n| n.to_str()?.parse::<u64>().ok())
            .collect::<Vec<_>>(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    numbers.sort_unstable();
    Ok(numbers)
}

fn sync_folder(path: &Path) -> io::Result<()> {
    real_folder(path)?.sync_all()
}

/// Opens the folder `path`, which must be a folder, not a link to one (`O_NOFOLLOW`).
fn real_folder(path: &Path) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
        .open(path)
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
        let folder = self.path.join(SNAPSHOTS);
        match fs::DirBuilder::new().mode_private().create(&folder) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e.into()),
            _ => {}
        }
        // A link here would send the copies, and the removal of older snapshots, elsewhere.
        real_folder(&folder).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "{} is not a folder of the store's own: {e}",
                    folder.display()
                ),
            )
        })?;
        let shared = self.shared();
        let _roots = shared.lock_roots();
        let space = shared.lock_space();
        space.sync()?;
        let header = self.header();
        let number = header.snapshots.load(Ordering::Acquire) + 1;
        let partial = folder.join(format!("partial-{number}"));
        let _ = fs::remove_dir_all(&partial);
        let made = self.snapshot_into(&partial, number);
        if made.is_err() {
            // Nothing of a failed snapshot stays, and its number is not used.
            let _ = fs::remove_dir_all(&partial);
            if header.snapshots.load(Ordering::Acquire) == number {
                header.snapshots.store(number - 1, Ordering::Release);
                let _ = self.sync_header();
            }
        }
        let (bytes, reflinked) = made?;
        fs::rename(&partial, folder.join(number.to_string()))?;
        sync_folder(&folder)?;
        // Older snapshots are superseded.
        for old in complete(&folder)?.into_iter().filter(|&n| n < number) {
            let _ = fs::remove_dir_all(folder.join(old.to_string()));
        }
        Ok(Snapshot {
            number,
            bytes,
            reflinked,
        })
    }

    /// Copies the store into the new folder `partial` as snapshot `number`, and counts it in
    /// the header. The caller holds the store's locks and removes `partial` on failure.
    fn snapshot_into(&self, partial: &Path, number: u64) -> Result<(u64, bool), StoreError> {
        let shared = self.shared();
        let header = self.header();
        fs::DirBuilder::new().mode_private().create(partial)?;
        let (mut bytes, mut reflinked) = clone_folder(&self.path.join(SEGS), &partial.join(SEGS))?;
        // The small blocks' file and their metadata, copied while no small block can be
        // allocated or freed (the tier's locks): the copy's metadata is the copy's state.
        let small = shared.tier.save_then(&shared.small_meta, || {
            let mut copied = (0, true);
            for name in [SMALL, SMALL_META] {
                let (b, r) = clone_into(&self.path, partial, OsStr::new(name))?;
                copied = (copied.0 + b, copied.1 && r);
            }
            Ok(copied)
        })?;
        bytes += small.0;
        reflinked &= small.1;
        // The header as it will be once this snapshot is counted, marked clean.
        header.snapshots.store(number, Ordering::Release);
        header.flushes.fetch_add(1, Ordering::AcqRel);
        self.sync_header()?;
        clone_into(&self.path, partial, OsStr::new(HEADER))?;
        let copy = open_file(&partial.join(HEADER), Access::Write, false)?;
        copy.write_all_at(&0u64.to_ne_bytes(), DIRTY_AT)?;
        copy.sync_all()?;
        sync_folder(partial)?;
        Ok((bytes, reflinked))
    }

    /// Puts the store in the folder `path` back to its last snapshot, whatever its state (a
    /// store left dirty by a writer that died, typically), then opens it for writing. Refused
    /// while anyone has it open ([`StoreError::Locked`]); [`StoreError::NoSnapshot`] if it
    /// has none.
    pub fn recover(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        let path = path.as_ref();
        Self::restore(path)?;
        Store::open(path)
    }

    fn restore(path: &Path) -> Result<(), StoreError> {
        let lock =
            open_file(&path.join(LOCK), Access::Write, false).map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => StoreError::NotAStore,
                _ => StoreError::Io(e),
            })?;
        if !lock_file(&lock, Access::Write)? {
            return Err(StoreError::Locked);
        }
        // The store's own header must be readable by this build (its range and format).
        Header::read(&open_file(&path.join(HEADER), Access::Read, false)?)?;
        let folder = path.join(SNAPSHOTS);
        let number = *complete(&folder)?.last().ok_or(StoreError::NoSnapshot)?;
        let snapshot = folder.join(number.to_string());
        let saved = open_file(&snapshot.join(HEADER), Access::Read, false)?;
        let copy = Header::read(&saved)?;
        if copy.dirty != 0 {
            return Err(StoreError::NotAStore);
        }
        // The live files of a store left dirty are worthless: they go first, so that recovery
        // needs no room for a third copy. Then the segments, into a new folder swapped in
        // whole; the header last, by rename: until then the store is as dirty as it was (its
        // header says so), and a crash here is recovered again.
        let segs = path.join(SEGS);
        let old = path.join("segs.old");
        let _ = fs::remove_dir_all(&old);
        // Missing after a recovery that stopped between the renames.
        match fs::rename(&segs, &old) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            other => other?,
        }
        let _ = fs::remove_dir_all(&old);
        for name in [SMALL, SMALL_META] {
            match fs::remove_file(path.join(name)) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                other => other?,
            }
        }
        sync_folder(path)?;
        let fresh: PathBuf = path.join("segs.recovering");
        let _ = fs::remove_dir_all(&fresh);
        clone_folder(&snapshot.join(SEGS), &fresh)?;
        fs::rename(&fresh, &segs)?;
        for name in [SMALL, SMALL_META] {
            let fresh = path.join(format!("{name}.recovering"));
            let _ = fs::remove_file(&fresh);
            clone_path(&snapshot.join(name), &fresh)?;
            fs::rename(&fresh, path.join(name))?;
        }
        let header = path.join("header.recovering");
        let _ = fs::remove_file(&header);
        clone_path(&snapshot.join(HEADER), &header)?;
        fs::rename(&header, path.join(HEADER))?;
        sync_folder(path)?;
        drop(lock);
        Ok(())
    }
}
