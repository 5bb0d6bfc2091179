//! A store's folder, held by descriptor: resolved once, when the store is created, opened or
//! recovered, and never again through a path. A later `chdir`, a rename of a parent folder or
//! a link put in place of an entry cannot send a flush, a snapshot or a removal to another
//! folder: every call below is an `*at` call on the folder's descriptor, and none follows a
//! symbolic link inside it.

use std::ffi::OsStr;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::Access;
use crate::sys;

/// The mode of every file a store makes: its owner's only, whatever the umask.
const FILE_MODE: u32 = 0o600;
/// The mode of every folder a store makes.
const DIR_MODE: u32 = 0o700;

/// A folder of a store (its own, `segs/`, `snapshots/` or one snapshot), by descriptor.
#[derive(Debug)]
pub(crate) struct Folder(File);

impl Folder {
    /// Opens the folder `path` (resolved now, once; a link to a folder is followed here
    /// only, as the path the user gave).
    pub(crate) fn open(path: &Path) -> io::Result<Folder> {
        OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(path)
            .map(Folder)
    }

    /// Makes the private folder `path`, which must not exist, and opens it: the folder
    /// opened is checked to be the one made (a folder swapped in between is refused).
    pub(crate) fn make(path: &Path) -> io::Result<Folder> {
        sys::io_point("make the store's folder")?;
        std::os::unix::fs::DirBuilderExt::mode(&mut std::fs::DirBuilder::new(), DIR_MODE)
            .create(path)?;
        let folder = Folder::open(path)?;
        let made = std::fs::symlink_metadata(path)?;
        let held = folder.0.metadata()?;
        use std::os::unix::fs::MetadataExt;
        if (made.dev(), made.ino()) != (held.dev(), held.ino()) {
            return Err(io::Error::other(format!(
                "{} was replaced while it was made",
                path.display()
            )));
        }
        Ok(folder)
    }

    /// The folder `name` inside this one, never through a link.
    pub(crate) fn dir(&self, name: &str) -> io::Result<Folder> {
        sys::open_dir_at(&self.0, OsStr::new(name)).map(Folder)
    }

    /// Makes the private folder `name` inside this one, and opens it.
    pub(crate) fn make_dir(&self, name: &str) -> io::Result<Folder> {
        sys::io_point("make a folder")?;
        sys::make_dir_at(&self.0, OsStr::new(name), DIR_MODE)?;
        self.dir(name)
    }

    /// Makes the folder `name` unless it exists, and opens it (never through a link).
    pub(crate) fn dir_or_new(&self, name: &str) -> io::Result<Folder> {
        match sys::make_dir_at(&self.0, OsStr::new(name), DIR_MODE) {
            Err(e) if e.kind() != io::ErrorKind::AlreadyExists => return Err(e),
            _ => {}
        }
        self.dir(name)
    }

    /// Opens the store file `name` for `access` (a regular file with one name, else
    /// `InvalidData`), or makes it (new, private) with `create`; never through a link.
    pub(crate) fn file(&self, name: &OsStr, access: Access, create: bool) -> io::Result<File> {
        let file = match (access, create) {
            (_, true) => {
                sys::io_point("create a file")?;
                return sys::open_at(&self.0, name, Some(FILE_MODE));
            }
            (Access::Write, false) => sys::open_at(&self.0, name, None)?,
            (Access::Read, false) => sys::open_read_at(&self.0, name)?,
        };
        // A store's file is a regular file with one name: a FIFO would block its reads, and
        // a second name (a hard link to another store's file) would be two stores' data.
        let meta = file.metadata()?;
        if !meta.is_file() || std::os::unix::fs::MetadataExt::nlink(&meta) != 1 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{name:?} is not a regular file with one name"),
            ));
        }
        Ok(file)
    }

    /// The names in the folder.
    pub(crate) fn names(&self) -> io::Result<Vec<std::ffi::OsString>> {
        sys::names_in(&self.0)
    }

    /// Renames `from` to `to` inside this folder (replacing `to`).
    pub(crate) fn rename(&self, from: &str, to: &str) -> io::Result<()> {
        sys::io_point("rename")?;
        sys::rename_at(&self.0, OsStr::new(from), OsStr::new(to))
    }

    /// Removes the file `name`; `Ok` if there is none.
    pub(crate) fn remove_file(&self, name: &str) -> io::Result<()> {
        sys::io_point("remove a file")?;
        match sys::remove_at(&self.0, OsStr::new(name), false) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            other => other,
        }
    }

    /// Removes the folder `name` and everything in it, never following a link (a link is
    /// removed, not what it leads to); `Ok` if there is none.
    pub(crate) fn remove_tree(&self, name: &str) -> io::Result<()> {
        sys::io_point("remove a folder")?;
        self.remove_tree_at(OsStr::new(name), 0)
    }

    fn remove_tree_at(&self, name: &OsStr, depth: usize) -> io::Result<()> {
        let entry = match sys::entry_at(&self.0, name) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            other => other?,
        };
        if entry.kind != sys::EntryKind::Dir {
            return sys::remove_at(&self.0, name, false);
        }
        // A store's folders nest three deep (snapshots/N/segs): deeper is not ours.
        if depth > 4 {
            return Err(io::Error::other("a folder nested deeper than a store's"));
        }
        let inner = Folder(sys::open_dir_at(&self.0, name)?);
        for child in inner.names()? {
            inner.remove_tree_at(&child, depth + 1)?;
        }
        sys::remove_at(&self.0, name, true)
    }

    /// Syncs the folder's entries.
    pub(crate) fn sync(&self) -> io::Result<()> {
        sys::io_point("sync a folder")?;
        self.0.sync_all()
    }

    /// The folder's descriptor.
    pub(crate) fn into_file(self) -> File {
        self.0
    }

    /// A second descriptor of the folder.
    pub(crate) fn try_clone(&self) -> io::Result<Folder> {
        self.0.try_clone().map(Folder)
    }
}
