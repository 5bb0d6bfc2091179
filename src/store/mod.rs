//! Persistent stores (issue 13): the first layer, crate-private until the allocator works
//! inside a store (see `docs/store-design.md`).
//!
//! A store is a folder. This layer owns what every later one stands on:
//!
//! * **The header** (`header`, one page): magic, format version, page size, the store's fixed
//!   address range, the dirty flag, and the counts of flushes and snapshots. Mapped at the
//!   first page of the range, so it is at the same address in every process that opens the
//!   store.
//! * **The address range.** Pointers inside a store are absolute, so the range is reserved at
//!   creation, recorded, and reserved again at exactly that place at every open, without
//!   `MAP_FIXED` (which would replace whatever is there): a range that is taken is
//!   [`StoreError::AddressTaken`], never a mapping over someone else's.
//! * **One writer.** `flock` on `lock`: exclusive for a writer, shared for readers, never
//!   waited for: a conflict is [`StoreError::Locked`].
//! * **Crashes.** A writer sets the dirty flag (synced to disk) before it hands anything out
//!   and clears it at a clean close. A store found dirty is [`StoreError::Dirty`], naming
//!   its last flush and snapshot.
//! * **fork.** A child's copy of a `Store` never writes the header: only the process that
//!   opened it marks it clean.

// Nothing outside the tests uses this layer until the allocator works inside a store.
#![cfg_attr(not(test), allow(dead_code))]

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::arena::CHUNK;
use crate::fork;
use crate::segment;
use crate::sys;

#[cfg(test)]
mod tests;

/// The first eight bytes of a store's header.
const MAGIC: [u8; 8] = *b"MMAPVST\0";
/// The header format this code reads and writes.
const VERSION: u32 = 1;
/// The header file: its length is one page of the machine that made the store.
const HEADER: &str = "header";
/// The file whose `flock` says who has the store open.
const LOCK: &str = "lock";

/// The header, as it lies at the start of the store's range (and of the `header` file).
#[repr(C)]
struct Header {
    magic: [u8; 8],
    version: u32,
    /// The page size of the machine that made the store: the range's layout depends on it.
    page_size: u32,
    /// The range's start and length.
    base: u64,
    len: u64,
    /// Non-zero while a writer has the store open.
    dirty: AtomicU64,
    /// Durable points reached so far ([`Store::flush`]).
    flushes: AtomicU64,
    /// Snapshots taken so far.
    snapshots: AtomicU64,
}

const _: () = assert!(size_of::<Header>() <= 4096);

impl Header {
    /// A header read from the start of a file: checked for the magic, the version and the
    /// page size, not yet for being clean.
    fn read(file: &File) -> Result<HeaderCopy, StoreError> {
        let mut bytes = [0u8; size_of::<Header>()];
        file.read_exact_at(&mut bytes, 0)
            .map_err(|e| match e.kind() {
                io::ErrorKind::UnexpectedEof => StoreError::NotAStore,
                _ => StoreError::Io(e),
            })?;
        let word = |at: usize| u64::from_ne_bytes(bytes[at..at + 8].try_into().unwrap());
        let half = |at: usize| u32::from_ne_bytes(bytes[at..at + 4].try_into().unwrap());
        if bytes[..8] != MAGIC {
            return Err(StoreError::NotAStore);
        }
        let copy = HeaderCopy {
            version: half(8),
            page_size: half(12),
            base: word(16),
            len: word(24),
            dirty: word(32),
            flushes: word(40),
            snapshots: word(48),
        };
        if copy.version != VERSION {
            return Err(StoreError::Version(copy.version));
        }
        if copy.page_size as usize != sys::page_size() {
            return Err(StoreError::PageSize(copy.page_size));
        }
        Ok(copy)
    }

    /// The bytes of a new store's header.
    fn bytes(base: usize, len: usize, dirty: bool) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(size_of::<Header>());
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&VERSION.to_ne_bytes());
        bytes.extend_from_slice(&(sys::page_size() as u32).to_ne_bytes());
        for word in [base as u64, len as u64, u64::from(dirty), 0, 0] {
            bytes.extend_from_slice(&word.to_ne_bytes());
        }
        debug_assert_eq!(bytes.len(), size_of::<Header>());
        bytes
    }
}

/// A header's fields, read from its file before anything is mapped.
#[derive(Debug, Clone, Copy)]
struct HeaderCopy {
    version: u32,
    page_size: u32,
    base: u64,
    len: u64,
    dirty: u64,
    flushes: u64,
    snapshots: u64,
}

/// Why a store could not be created or opened.
#[derive(Debug)]
pub(crate) enum StoreError {
    /// `create` on a path that exists.
    Exists(PathBuf),
    /// The folder has no store header (or a truncated one).
    NotAStore,
    /// The header is of a format version this build does not read.
    Version(u32),
    /// The store was made on a machine with another page size.
    PageSize(u32),
    /// Another process (or another handle of this one) has the store open in a way that
    /// excludes this one: a writer excludes everyone, readers exclude a writer.
    Locked,
    /// The store's address range is (partly) mapped already in this process.
    AddressTaken { base: usize, len: usize },
    /// This process has the store open already (a fork child inherits its parent's handles):
    /// one handle per process, since each maps the whole range at its one address.
    OpenHere,
    /// A writer had the store open and did not close it (it crashed, or was killed).
    Dirty { last_flush: u64, last_snapshot: u64 },
    /// A system call failed.
    Io(io::Error),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Exists(path) => write!(f, "{} exists already", path.display()),
            StoreError::NotAStore => f.write_str("not a store: no valid header"),
            StoreError::Version(v) => {
                write!(f, "store format version {v}, this build reads {VERSION}")
            }
            StoreError::PageSize(p) => write!(
                f,
                "store made with {p}-byte pages, this machine has {}",
                sys::page_size()
            ),
            StoreError::Locked => f.write_str("the store is open elsewhere (locked)"),
            StoreError::OpenHere => f.write_str("this process has the store open already"),
            StoreError::AddressTaken { base, len } => write!(
                f,
                "the store's address range {base:#x}..{:#x} is taken in this process",
                base.saturating_add(*len)
            ),
            StoreError::Dirty {
                last_flush,
                last_snapshot,
            } => write!(
                f,
                "the store was not closed cleanly (last flush: {last_flush}, last snapshot: \
                 {last_snapshot})"
            ),
            StoreError::Io(e) => write!(f, "store I/O: {e}"),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StoreError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for StoreError {
    fn from(e: io::Error) -> Self {
        StoreError::Io(e)
    }
}

/// The ranges of the stores this process has open (inherited by a fork child with the
/// handles).
static OPEN: Mutex<Vec<usize>> = Mutex::new(Vec::new());

fn open_here() -> std::sync::MutexGuard<'static, Vec<usize>> {
    // Pushes and removals only: a poisoned lock is consistent.
    OPEN.lock().unwrap_or_else(|e| e.into_inner())
}

/// Holds the list of open stores around a `fork` (the prepare handler), so that a child never
/// inherits it locked: a child's drop of an inherited handle takes it.
pub(crate) fn lock_for_fork(held: &mut Vec<Box<dyn std::any::Any>>) {
    held.push(Box::new(open_here()));
}

/// Where new stores go: hint addresses from 16 TiB to 64 TiB, away from where Linux puts a
/// process's own mappings (just below the stack, near 128 TiB on x86-64) and its heap (near
/// the program): a store's range is then unlikely to be taken in the processes that reopen
/// it. Tried at a few random places; anywhere the kernel likes after that.
fn reserve_new_range(len: usize) -> io::Result<NonNull<u8>> {
    #[cfg(target_pointer_width = "64")]
    {
        const LOW: usize = 16 << 40;
        const HIGH: usize = 64 << 40;
        const STEP: usize = 1 << 30;
        if len > HIGH - LOW {
            return segment::reserve_aligned(len, CHUNK);
        }
        for _ in 0..8 {
            let random = uuid::Uuid::new_v4().as_u128() as usize;
            let at = LOW + random % ((HIGH - LOW - len) / STEP + 1) * STEP;
            if let Some(at) = NonNull::new(at as *mut u8)
                && sys::reserve_at(at, len).is_ok()
            {
                return Ok(at);
            }
        }
    }
    segment::reserve_aligned(len, CHUNK)
}

/// How a store is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Access {
    /// The only writer: excludes every other handle.
    Write,
    /// One of any number of readers, while no writer has it.
    Read,
}

/// An open store: its folder, its lock, and its reserved range with the header mapped at
/// its start. Dropping it closes it (a writer marks it clean first).
#[derive(Debug)]
pub(crate) struct Store {
    path: PathBuf,
    /// Holds the `flock` for as long as the store is open.
    _lock: File,
    header_file: File,
    /// The reserved range; the header is mapped over its first page.
    base: NonNull<u8>,
    len: usize,
    access: Access,
    /// The process generation that opened the store: a fork child's copy never writes.
    generation: u64,
    /// The header is mapped (the drop may write it).
    header_mapped: bool,
    /// Mapping the header failed, and the first page may since hold someone else's mapping:
    /// the drop leaves it alone.
    first_page_lost: bool,
}

// SAFETY: the raw pointer is the start of the store's range, which this value owns (reserved
// and mapped by it, unmapped only by its drop); the header it points to is only written
// through atomics.
unsafe impl Send for Store {}
// SAFETY: as above; `&Store` gives only atomic access to the shared header.
unsafe impl Sync for Store {}

impl Store {
    /// Makes a new store in the folder `path` (which must not exist), reserving `len` bytes of
    /// address space (rounded up to whole chunks), and opens it for writing.
    pub(crate) fn create(path: impl AsRef<Path>, len: usize) -> Result<Store, StoreError> {
        let path = path.as_ref();
        let len = len
            .max(CHUNK)
            .checked_next_multiple_of(CHUNK)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        match fs::DirBuilder::new().mode_private().create(path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::Exists(path.to_path_buf()));
            }
            Err(e) => return Err(e.into()),
        }
        let made = Self::create_in(path, len);
        if made.is_err() {
            // Nothing of ours is in the folder yet that anyone could want: it was just made.
            let _ = fs::remove_dir_all(path);
        }
        made
    }

    fn create_in(path: &Path, len: usize) -> Result<Store, StoreError> {
        let lock = open_file(&path.join(LOCK), Access::Write, true)?;
        // A fresh folder: nobody else can hold the lock yet, but take it as every open does.
        if !lock_file(&lock, Access::Write)? {
            return Err(StoreError::Locked);
        }
        let header_file = open_file(&path.join(HEADER), Access::Write, true)?;
        fork::install();
        let base = reserve_new_range(len)?;
        open_here().push(base.as_ptr().addr());
        let mut store = Store {
            path: path.to_path_buf(),
            _lock: lock,
            header_file,
            base,
            len,
            access: Access::Write,
            generation: fork::generation(),
            header_mapped: false,
            first_page_lost: false,
        };
        // `store` owns the reservation from here: an error below unmaps it (its drop).
        let file = &store.header_file;
        file.set_len(sys::page_size() as u64)?;
        file.write_all_at(&Header::bytes(base.as_ptr().addr(), len, true), 0)?;
        file.sync_all()?;
        File::open(path)?.sync_all()?;
        store.map_header()?;
        Ok(store)
    }

    /// Opens the store in the folder `path`: for writing (the only handle), or for reading
    /// (one of any number of readers).
    pub(crate) fn open(path: impl AsRef<Path>, access: Access) -> Result<Store, StoreError> {
        let path = path.as_ref();
        let lock = open_file(&path.join(LOCK), access, false).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => StoreError::NotAStore,
            _ => StoreError::Io(e),
        })?;
        if !lock_file(&lock, access)? {
            return Err(StoreError::Locked);
        }
        let header_file = open_file(&path.join(HEADER), access, false)?;
        let header = Header::read(&header_file)?;
        if header.dirty != 0 {
            return Err(StoreError::Dirty {
                last_flush: header.flushes,
                last_snapshot: header.snapshots,
            });
        }
        let (Ok(base), Ok(len)) = (usize::try_from(header.base), usize::try_from(header.len))
        else {
            return Err(StoreError::NotAStore);
        };
        let at = NonNull::new(base as *mut u8).ok_or(StoreError::NotAStore)?;
        if !len.is_multiple_of(CHUNK) || !base.is_multiple_of(CHUNK) || len == 0 {
            return Err(StoreError::NotAStore);
        }
        fork::install();
        {
            let mut open = open_here();
            if open.contains(&base) {
                return Err(StoreError::OpenHere);
            }
            // Exactly there or not at all: never MAP_FIXED over what may be someone else's.
            sys::reserve_at(at, len).map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => StoreError::AddressTaken { base, len },
                _ => StoreError::Io(e),
            })?;
            open.push(base);
        }
        let mut store = Store {
            path: path.to_path_buf(),
            _lock: lock,
            header_file,
            base: at,
            len,
            access,
            generation: fork::generation(),
            header_mapped: false,
            first_page_lost: false,
        };
        store.map_header()?;
        if access == Access::Write {
            store.header().dirty.store(1, Ordering::Release);
            store.sync_header()?;
        }
        Ok(store)
    }

    /// Maps the header file over the first page of the range.
    fn map_header(&mut self) -> io::Result<()> {
        let page = sys::page_size();
        // SAFETY: the range is our reservation (made by `create` or `open`, owned by `self`),
        // and nothing refers to its first page yet.
        let mapped = unsafe {
            sys::map_file_fixed_with(
                self.base,
                &self.header_file,
                page,
                self.access == Access::Write,
            )
        };
        match mapped {
            Ok(()) => self.header_mapped = true,
            // A failed MAP_FIXED may leave a gap (see `arena::chunk::MapFailure`): ours again
            // only if it can be reserved in place.
            Err(_) => self.first_page_lost = sys::reserve_at(self.base, page).is_err(),
        }
        mapped
    }

    fn header(&self) -> &Header {
        // SAFETY: the header file is mapped at `base` for as long as `self` lives (see
        // `map_header`; unmapped by the drop), at least one page long and page aligned, so
        // aligned for `Header`; its fields are plain integers and atomics, valid for any bytes.
        // A reader's mapping is read-only, and a reader never writes through it.
        unsafe { self.base.cast::<Header>().as_ref() }
    }

    /// Writes the header to disk.
    fn sync_header(&self) -> io::Result<()> {
        // SAFETY: the first page of the range is the header's mapping, ours.
        unsafe { sys::sync(self.base, sys::page_size()) }?;
        self.header_file.sync_data()
    }

    /// The store's address range.
    pub(crate) fn range(&self) -> (usize, usize) {
        (self.base.as_ptr().addr(), self.len)
    }

    /// Durable points reached so far.
    pub(crate) fn flushes(&self) -> u64 {
        // Relaxed: a reader's mapping is read-only, where only small relaxed atomic loads are
        // allowed.
        self.header().flushes.load(Ordering::Relaxed)
    }

    /// Closes the store: a writer marks it clean (on disk) first. Dropping it does the same,
    /// without the error.
    pub(crate) fn close(mut self) -> Result<(), StoreError> {
        let marked = self.mark_clean();
        drop(self);
        marked.map_err(StoreError::Io)
    }

    /// Clears the dirty flag on disk, once; only in the process that opened the store for
    /// writing (a fork child's copy leaves the parent's store alone).
    fn mark_clean(&mut self) -> io::Result<()> {
        if self.access != Access::Write
            || self.generation != fork::generation()
            || !self.header_mapped
        {
            return Ok(());
        }
        let header = self.header();
        if header.dirty.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        header.flushes.fetch_add(1, Ordering::AcqRel);
        header.dirty.store(0, Ordering::Release);
        self.sync_header()
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        if let Err(e) = self.mark_clean() {
            log::error!("mmapvec: closing the store {}: {e}", self.path.display());
        }
        // A first page that may be someone else's now stays (see `map_header`).
        let skip = if self.first_page_lost {
            sys::page_size()
        } else {
            0
        };
        let mut open = open_here();
        // SAFETY: the range (less a lost first page) is ours, reserved by `create` or `open`,
        // and with `self` gone nothing refers to it.
        let unmapped = unsafe { sys::unmap(self.base.add(skip), self.len - skip) };
        let base = self.base.as_ptr().addr();
        open.retain(|&b| b != base);
        // Logged after the lock is let go: a logger may allocate, and a fork takes this lock.
        drop(open);
        if let Err(e) = unmapped {
            log::error!("mmapvec: unmapping the store {}: {e}", self.path.display());
        }
    }
}

/// Opens (or, with `create`, makes) a store file, never through a symbolic link.
fn open_file(path: &Path, access: Access, create: bool) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(access == Access::Write)
        .create_new(create)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Takes the store's lock for `access`, without waiting: `false` if another handle holds it.
fn lock_file(file: &File, access: Access) -> io::Result<bool> {
    sys::try_lock(file, access == Access::Write)
}

/// `DirBuilder` with the mode a store's folder gets: its owner's only.
trait PrivateMode {
    fn mode_private(&mut self) -> &mut Self;
}

impl PrivateMode for fs::DirBuilder {
    fn mode_private(&mut self) -> &mut Self {
        std::os::unix::fs::DirBuilderExt::mode(self, 0o700)
    }
}

/// The dirty flag as the header file holds it on disk (for the tests).
#[cfg(test)]
fn dirty_on_disk(path: &Path) -> u64 {
    let file = File::open(path.join(HEADER)).unwrap();
    Header::read(&file).unwrap().dirty
}
