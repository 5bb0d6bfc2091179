//! Persistent stores: `Vec`s and hashbrown maps that outlive the process and reopen without
//! being read.
//!
//! A [`Store`] is a folder on disk and a fixed range of address space. Everything allocated
//! with its [`StoreAllocator`] lives in files of the folder, mapped at the same addresses in
//! every process that opens it, so the pointers inside the data stay valid: reopening maps the
//! files back and reads none of the data. Values are kept under names as *roots*
//! ([`Store::set_root`], [`Store::root`]), and checked against the type they are opened as.
//!
//! ```
//! use mmapvec::store::{Store, StoreVec};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("mmapvec-doc-store-{}", std::process::id()));
//! # let _ = std::fs::remove_dir_all(&dir);
//! // One run builds the data and keeps it...
//! let store = Store::create(&dir)?;
//! let mut squares = StoreVec::new_in(store.allocator());
//! squares.extend((0..1000u64).map(|i| i * i));
//! store.set_root("squares", squares)?;
//! store.close()?;
//!
//! // ...a later one (a new process, typically) opens it and goes on where it stopped.
//! let store = Store::open(&dir)?;
//! let mut squares = store.root_mut::<StoreVec<u64>>("squares")?;
//! assert_eq!(squares[999], 999 * 999);
//! squares.push(1000 * 1000);
//! drop(squares);
//! store.close()?;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```
//!
//! # Commits
//! [`Store::commit`] makes everything the store holds its state, durably and all at once: a
//! crash at any instant after it returns (the process killed, the machine losing power)
//! leaves a store that the next [`Store::open`] opens exactly as it was then, with no other
//! call. Its cost follows what changed since the last commit, not the store's size.
//! [`Store::close`] commits; dropping a store without `close` (an error path, a panic) keeps
//! the last commit and drops what came after it, as a crash would. [`Store::recovered`] says
//! whether the last writer closed.
//!
//! How, in short (the source's `commit.rs` has the whole design): every page of data the
//! last commit holds is a *private* view of its file, so that a write never reaches the file
//! before a commit; blocks made since the last commit are written in place (they are in no
//! commit yet, and stay out of core). A commit appends the pages written since the last one
//! (the kernel tracks them) to a log, with the roots and the bookkeeping, syncs it, and
//! writes a commit record: that is the commit point. The log is copied into the files after,
//! and again by the next open if the writer died first.
//!
//! ```
//! use mmapvec::store::{Store, StoreVec};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = std::env::temp_dir().join(format!("mmapvec-doc-commits-{}", std::process::id()));
//! # let _ = std::fs::remove_dir_all(&dir);
//! let store = Store::create(&dir)?;
//! store.set_root("balance", 100i64)?;
//! store.commit()?;
//! // Two changes that must go together: a crash before the next commit keeps neither.
//! *store.root_mut::<i64>("balance")? -= 30;
//! store.set_root("paid", 30i64)?;
//! store.commit()?;
//! store.close()?;
//! # std::fs::remove_dir_all(&dir)?;
//! # Ok(())
//! # }
//! ```
//!
//! The private copies of pages written since the store was opened stay in memory until it is
//! closed or [`Store::trim`] gives them back (a commit cannot drop a page another thread may
//! be writing; `trim` takes `&mut self`): what a session changes *in place* in data that was
//! already committed between two `trim`s is bounded by memory (new blocks, and blocks that
//! grow into new ones, are not). See the limits in the README.
//!
//! # What a store is on disk
//! * `header`, one page, mapped at the start of the range: magic, format version, page size,
//!   the range's address and length, whether a writer has it open, the counts of commits and
//!   snapshots, the layout fingerprint, and the table of roots.
//! * `segs/`: one file per block larger than the small blocks, named by a number (a block
//!   that moves keeps its file), and `segs/.manifest`, the list of them as of the last
//!   commit: where each is mapped and how long it is (see `space.rs`).
//! * `small`, `small.meta`: the small blocks' chunks, and which of their blocks are in use.
//! * `log`: the commits not yet copied into the files (see `commit.rs`).
//! * `lock`: `flock`ed, exclusive for the writer, shared for readers.
//!
//! # Rules that keep it sound
//! * **One store per process at a time** ([`StoreError::AnotherStoreOpen`]): the lifetime of a
//!   [`StoreAllocator`] keeps containers from outliving their store, but cannot tell two
//!   stores apart, so a vector of one could be put into a map of the other.
//! * **Addresses.** The range is reserved again at exactly its address at every open, without
//!   `MAP_FIXED` (which would replace whatever is there): a taken range is
//!   [`StoreError::AddressTaken`].
//! * **One writer or many readers** (`flock`, never waited for: [`StoreError::Locked`]).
//! * **Crashes.** A store opens at its last commit (see above). A store of the earlier
//!   format (version 3 and before) that a writer left open is [`StoreError::Dirty`], as it
//!   was; so is a store whose [`Store::recover`] was cut short, until a recovery completes.
//! * **The compiler.** The layout of `Vec` and of hashbrown's tables is the compiler's choice:
//!   a store made by another build of `rustc` is [`StoreError::OtherBuild`].
//! * **Types.** A root is opened only as the type it was stored as (name, size, alignment and
//!   a layout fingerprint from [`Persist`]), and only types whose every pointer leads into the
//!   store implement [`Persist`].
//! * **fork.** A child gets none of the store's shared views (`MADV_DONTFORK`): its fork
//!   handler maps every block again as a private, copy-on-write view of its file, so the
//!   child can read, change and drop the containers it inherited, and nothing it writes
//!   reaches the store. Its allocations come from the temporary allocator, it frees none of
//!   the store's blocks, and every call on its copy of the handle is
//!   [`StoreError::ForkChild`]: it can never write its parent's store. What the child reads
//!   is the files' contents: pages it has not written still show what the parent writes to
//!   them after the fork (fork where the data is not being changed, as for a snapshot). The
//!   parent seals what a child maps: no block of a chunk made before the fork is handed out
//!   again or its disk given back in this process, and no segment file mapped before the fork
//!   is cut. A fork costs a few system calls per segment of the open store.
//!
//! # Nothing outlives its store
//! Containers, guards and the allocator borrow the [`Store`]: closing (or dropping) it while
//! one is alive does not compile.
//!
//! ```compile_fail,E0505
//! # use mmapvec::store::{Store, StoreVec};
//! # fn f(dir: &std::path::Path) -> Result<(), mmapvec::store::StoreError> {
//! let store = Store::create(dir)?;
//! let v: StoreVec<u64> = StoreVec::new_in(store.allocator());
//! store.close()?; // `v` still borrows the store
//! drop(v);
//! # Ok(()) }
//! ```
//! ```compile_fail,E0505
//! # use mmapvec::store::Store;
//! # fn f(dir: &std::path::Path) -> Result<(), mmapvec::store::StoreError> {
//! let store = Store::open(dir)?;
//! let x = store.root::<u64>("x")?;
//! drop(store); // the guard still borrows the store
//! println!("{}", *x);
//! # Ok(()) }
//! ```
//!
//! Nor can a container be given a longer lifetime than the handle it came from:
//!
//! ```compile_fail,E0521
//! # use mmapvec::store::{Store, StoreVec};
//! fn smuggle(store: &Store) -> StoreVec<'static, u64> {
//!     store.take_root::<StoreVec<'static, u64>>("v").unwrap()
//! }
//! ```

use std::cell::UnsafeCell;
use std::fmt;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::arena::{CHUNK, SmallTier, TierConfig};
use crate::fork;
use crate::segment;
use crate::sys::{self, Share};

mod alloc;
mod commit;
mod folder;
mod gc;
mod layout;
mod persist;
#[cfg(test)]
mod review_tests;
mod roots;
mod snapshot;
mod space;
#[cfg(test)]
mod tests;

pub use alloc::{StoreAllocator, StoreBox, StoreVec};
#[cfg(feature = "hashbrown")]
pub use alloc::{StoreMap, StoreSet};
/// foldhash's fast hash function (hashbrown's own) with a fixed seed: the default hasher of
/// [`StoreMap`] and [`StoreSet`], re-exported so that no other dependency is needed.
#[cfg(feature = "hashbrown")]
pub use foldhash::fast::FixedState;
pub use gc::Recovery;
pub use persist::{Persist, PersistHasher, fingerprint, type_fingerprint};
pub use roots::{Root, RootMut};
pub use snapshot::Snapshot;

use folder::Folder;
use roots::{ROOTS, RootSlot, RootState};
use space::Space;

/// The first eight bytes of a store's header.
const MAGIC: [u8; 8] = *b"MMAPVST\0";
/// The header format this code writes. Version 3 added the store's id and the list of
/// segments (`segs/.manifest`); version 4 the commit log (`log`) and segment files named by
/// number. Stores of version 2 and 3 are read, and upgraded (by a commit) when opened for
/// writing.
const VERSION: u32 = 4;
/// The first version with commits: a store of an earlier one that a writer left open is
/// [`StoreError::Dirty`].
const COMMITS: u32 = 4;
/// The header's dirty word while [`Store::recover`] puts a snapshot in place: the store is
/// refused ([`StoreError::Dirty`]) until a recovery completes, whatever its version.
const RECOVERING: u64 = 2;
/// The oldest header format this code reads.
const OLDEST_VERSION: u32 = 2;
/// The header file: its length is one page of the machine that made the store.
const HEADER: &str = "header";
/// The file whose `flock` says who has the store open.
const LOCK: &str = "lock";
/// Where the header's `dirty` word is.
const DIRTY_AT: u64 = 32;
/// The address space a store reserves unless told otherwise.
#[cfg(target_pointer_width = "64")]
pub const DEFAULT_RANGE: usize = 1 << 40;
/// The address space a store reserves unless told otherwise.
#[cfg(not(target_pointer_width = "64"))]
pub const DEFAULT_RANGE: usize = 512 << 20;
/// Where blocks start in the range: the header's page and the runtime page come first.
const DATA: usize = CHUNK;
/// The file of the small blocks' chunks, and the file of their metadata.
const SMALL: &str = "small";
const SMALL_META: &str = "small.meta";

/// The part of a store's range (of `len` bytes) given to small blocks: an eighth, at most
/// 64 GiB.
fn small_region(len: usize) -> usize {
    (len / 8).min(crate::arena::REGION) / CHUNK * CHUNK
}

/// Which compiler built this code (see `build.rs`), hashed: what a version 2 store records
/// (version 3 records [`layout::fingerprint`] instead, which a compiler update keeps).
fn build_fingerprint() -> u64 {
    persist::hash_str(env!("MMAPVEC_BUILD"))
}

/// What a store of header `version` records of the build that made it.
fn fingerprint_for(version: u32) -> u64 {
    if version >= 3 {
        layout::fingerprint()
    } else {
        build_fingerprint()
    }
}

/// The header, as it lies at the start of the store's range (and of the `header` file).
#[repr(C)]
struct Header {
    magic: [u8; 8],
    /// Written once, when a version 2 store is upgraded.
    version: AtomicU32,
    /// The page size of the machine that made the store: the range's layout depends on it.
    page_size: u32,
    /// The range's start and length.
    base: u64,
    len: u64,
    /// Non-zero while a writer has the store open.
    dirty: AtomicU64,
    /// Commits made so far ([`Store::commit`]): the number of the last one.
    flushes: AtomicU64,
    /// Snapshots taken so far.
    snapshots: AtomicU64,
    /// What the build that made the store must agree on ([`fingerprint_for`]): rewritten
    /// once, when a version 2 store is upgraded.
    build: AtomicU64,
    /// The length of the small blocks' region, which follows the first chunk of the range.
    small: u64,
    /// The store's identity, random, made with it and kept by its snapshots: `recover` takes
    /// only a snapshot of this store (zero in stores made before it was recorded).
    id: [u64; 2],
    _reserved: [u64; 5],
    /// The roots: written by the writer under `Shared::roots`, read under it.
    roots: UnsafeCell<[RootSlot; ROOTS]>,
}

const _: () = assert!(size_of::<Header>() <= 4096);
/// The bytes of the header before its roots that [`Header::read`] reads.
const HEADER_WORDS: usize = 88;
const _: () = assert!(std::mem::offset_of!(Header, _reserved) == HEADER_WORDS);

impl Header {
    /// A header read from the start of a file: checked for the magic, the version, the page
    /// size and the build, not yet for being clean.
    fn read(file: &File) -> Result<HeaderCopy, StoreError> {
        let mut bytes = [0u8; HEADER_WORDS];
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
            build: word(56),
            small: word(64),
            id: [word(72), word(80)],
        };
        if !(OLDEST_VERSION..=VERSION).contains(&copy.version) {
            return Err(StoreError::Version(copy.version));
        }
        if copy.page_size as usize != sys::page_size() {
            return Err(StoreError::PageSize(copy.page_size));
        }
        if file.metadata()?.len() < size_of::<Header>() as u64 {
            return Err(StoreError::NotAStore);
        }
        if copy.build != fingerprint_for(copy.version) {
            return Err(StoreError::OtherBuild);
        }
        Ok(copy)
    }

    /// The first bytes of a new store's header (the roots that follow are zeros).
    fn bytes(base: usize, len: usize, small: usize, dirty: bool) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(HEADER_WORDS);
        let id = uuid::Uuid::new_v4().as_u64_pair();
        bytes.extend_from_slice(&MAGIC);
        bytes.extend_from_slice(&VERSION.to_ne_bytes());
        bytes.extend_from_slice(&(sys::page_size() as u32).to_ne_bytes());
        for word in [
            base as u64,
            len as u64,
            u64::from(dirty),
            0,
            0,
            fingerprint_for(VERSION),
            small as u64,
            id.0,
            id.1,
        ] {
            bytes.extend_from_slice(&word.to_ne_bytes());
        }
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
    build: u64,
    small: u64,
    id: [u64; 2],
}

/// Why a store could not be created, opened or used.
///
/// Its `Debug` is its message (what `fn main() -> Result<(), Box<dyn Error>>` prints on an
/// error), after the variant's name.
#[non_exhaustive]
pub enum StoreError {
    /// `create` on a path that exists.
    Exists(PathBuf),
    /// The folder has no store header (or a truncated one), or its files are not a store's.
    NotAStore,
    /// The header is of a format version this build does not read.
    Version(u32),
    /// The store was made on a machine with another page size.
    PageSize(u32),
    /// The store was made by a build that does not lay out its containers as this one does:
    /// the field order of `Vec`, `Box` or hashbrown's tables (probed at run time), the crate's
    /// format and size classes, the pointer width and byte order are compared. A compiler
    /// update that keeps them opens the store. (A store of format version 2 was tied to the
    /// exact `rustc` that made it.)
    OtherBuild,
    /// Another process (or another handle of this one) has the store open in a way that
    /// excludes this one: a writer excludes everyone, readers exclude a writer.
    Locked,
    /// The store's address range is (partly) mapped already in this process.
    AddressTaken {
        /// The range's start.
        base: usize,
        /// The range's length.
        len: usize,
    },
    /// This process has this store open already.
    OpenHere,
    /// This process has another store open: one at a time (see the module docs).
    AnotherStoreOpen,
    /// A store of the earlier format (version 3 and before, without commits) that a writer
    /// had open and did not close (it crashed, or was killed), or a store whose
    /// [`Store::recover`] was cut short. A store with commits opens at its last commit.
    Dirty {
        /// The number of the last durable point (a commit; a clean close is one).
        last_flush: u64,
        /// The number of the last snapshot.
        last_snapshot: u64,
    },
    /// The store is open read-only.
    ReadOnly,
    /// [`Store::recover`] found no snapshot to go back to.
    NoSnapshot,
    /// The handle was inherited through `fork`: only the process that opened the store uses
    /// it.
    ForkChild,
    /// No root has this name.
    NoRoot(String),
    /// A root of this name exists already.
    RootExists(String),
    /// A root's name is empty or longer than 64 bytes.
    BadRootName(String),
    /// Every root slot of the store is used.
    RootsFull,
    /// The root is in use by a [`Root`] or [`RootMut`] that excludes this one.
    RootInUse(String),
    /// The root was stored as another type.
    WrongType {
        /// The root's name.
        name: String,
        /// The type it was asked for as.
        asked: &'static str,
        /// The size and alignment of the type it was stored as.
        stored_size: u64,
        /// As above.
        stored_align: u64,
    },
    /// A hasher of the root hashes differently from the one that built it (a new version of
    /// the hash function): its maps would not find their keys.
    HasherChanged(String),
    /// A system call failed.
    Io(io::Error),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Exists(path) => write!(f, "{} exists already", path.display()),
            StoreError::NotAStore => f.write_str("not a store: no valid header or segments"),
            StoreError::Version(v) => {
                write!(
                    f,
                    "store format version {v}, this build reads {OLDEST_VERSION} to {VERSION}"
                )
            }
            StoreError::PageSize(p) => write!(
                f,
                "store made with {p}-byte pages, this machine has {}",
                sys::page_size()
            ),
            StoreError::OtherBuild => write!(
                f,
                "the store was made by a build that lays out `Vec`, `Box` or hashbrown's tables \
                 differently, or with another version of this crate's format or size classes, \
                 or for another target (this build: layouts {}, {})",
                layout::probes(),
                env!("MMAPVEC_BUILD")
            ),
            StoreError::Locked => f.write_str("the store is open elsewhere (locked)"),
            StoreError::OpenHere => f.write_str("this process has the store open already"),
            StoreError::AnotherStoreOpen => {
                f.write_str("this process has another store open (one at a time)")
            }
            StoreError::AddressTaken { base, len } => write!(
                f,
                "the store's address range {base:#x}..{:#x} is taken in this process: another \
                 mapping is there. If it runs with `ulimit -s unlimited` (Linux then maps from \
                 about 20 TiB up), run it with a finite stack limit; or close what this \
                 process mapped there first (another store). Stores made by this version \
                 are placed where neither of Linux's layouts maps anything",
                base.saturating_add(*len)
            ),
            StoreError::Dirty {
                last_flush,
                last_snapshot: 0,
            } => write!(
                f,
                "the store was not closed cleanly (last flush: {last_flush}) and has no \
                 snapshot to go back to: `Store::open_dirty_read_only(path)` reads what the \
                 writer left, to save what can be saved"
            ),
            StoreError::Dirty {
                last_flush,
                last_snapshot,
            } => write!(
                f,
                "the store was not closed cleanly (last flush: {last_flush}); \
                 `Store::recover(path)` puts it back to its last snapshot ({last_snapshot}) \
                 and opens it; `Store::open_dirty_read_only(path)` reads what the writer left"
            ),
            StoreError::ReadOnly => f.write_str("the store is open read-only"),
            StoreError::NoSnapshot => f.write_str("the store has no snapshot to recover from"),
            StoreError::ForkChild => {
                f.write_str("the store handle was inherited through fork: unusable in a child")
            }
            StoreError::NoRoot(name) => write!(f, "no root named {name:?}"),
            StoreError::RootExists(name) => write!(f, "a root named {name:?} exists already"),
            StoreError::BadRootName(name) => {
                write!(f, "bad root name {name:?}: 1 to 64 bytes")
            }
            StoreError::RootsFull => write!(f, "every one of the {ROOTS} root slots is used"),
            StoreError::RootInUse(name) => write!(f, "the root {name:?} is in use"),
            StoreError::WrongType {
                name,
                asked,
                stored_size,
                stored_align,
            } => write!(
                f,
                "the root {name:?} was stored as another type than {asked} (stored: {stored_size} \
                 bytes, aligned to {stored_align})"
            ),
            StoreError::HasherChanged(name) => write!(
                f,
                "a hasher of the root {name:?} hashes differently from the build that made it"
            ),
            StoreError::Io(e) => write!(f, "store I/O: {e}"),
        }
    }
}

impl fmt::Debug for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            StoreError::Exists(_) => "Exists",
            StoreError::NotAStore => "NotAStore",
            StoreError::Version(_) => "Version",
            StoreError::PageSize(_) => "PageSize",
            StoreError::OtherBuild => "OtherBuild",
            StoreError::Locked => "Locked",
            StoreError::AddressTaken { .. } => "AddressTaken",
            StoreError::OpenHere => "OpenHere",
            StoreError::AnotherStoreOpen => "AnotherStoreOpen",
            StoreError::Dirty { .. } => "Dirty",
            StoreError::ReadOnly => "ReadOnly",
            StoreError::NoSnapshot => "NoSnapshot",
            StoreError::ForkChild => "ForkChild",
            StoreError::NoRoot(_) => "NoRoot",
            StoreError::RootExists(_) => "RootExists",
            StoreError::BadRootName(_) => "BadRootName",
            StoreError::RootsFull => "RootsFull",
            StoreError::RootInUse(_) => "RootInUse",
            StoreError::WrongType { .. } => "WrongType",
            StoreError::HasherChanged(_) => "HasherChanged",
            StoreError::Io(e) => return write!(f, "Io({e:?}): {self}"),
        };
        write!(f, "{name}: {self}")
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

/// A [`Store::close`] that failed: the error, and the store, still open (and dirty), to close
/// again once the cause is gone. Dropping it drops the store, which tries to close once more
/// and logs what fails.
///
/// Its `Debug` is the error's message, as [`StoreError`]'s is; `?` turns it into the
/// [`StoreError`] (dropping the store).
pub struct CloseError {
    error: StoreError,
    store: Box<Store>,
}

impl CloseError {
    /// Why the store could not be closed.
    pub fn error(&self) -> &StoreError {
        &self.error
    }

    /// The store, still open: close it again, or go on using it.
    pub fn into_store(self) -> Store {
        *self.store
    }

    /// Both parts.
    pub fn into_parts(self) -> (StoreError, Store) {
        (self.error, *self.store)
    }
}

impl fmt::Display for CloseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "closing the store {}: {}",
            self.store.path.display(),
            self.error
        )
    }
}

impl fmt::Debug for CloseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CloseError({:?})", self.error)
    }
}

impl std::error::Error for CloseError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

impl From<CloseError> for StoreError {
    fn from(e: CloseError) -> Self {
        e.error
    }
}

/// What an open found of a writer that did not close the store ([`Store::recovered`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct Recovered {
    /// Commits found in the log and copied into the files by the open.
    pub commits_replayed: u64,
    /// Bytes of the log after its last complete commit: a commit that had not reached its
    /// commit point (dropped, as it never returned `Ok`).
    pub bytes_dropped: u64,
    /// The number of the commit the store is at ([`Store::flushes`]).
    pub last_commit: u64,
}

/// What a store holds ([`Store::stats`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Blocks larger than the small-block tier serves: one file each.
    pub segments: usize,
    /// Their mapped bytes.
    pub segment_bytes: u64,
    /// Bytes of live small blocks, each counted at its size class.
    pub small_in_use_bytes: u64,
    /// Bytes of the small blocks' chunks in use (4 MiB each).
    pub small_chunk_bytes: u64,
    /// Bytes the last commit of this handle appended to the log: the pages of committed data
    /// written since the commit before, the roots and the bookkeeping (blocks made since are
    /// written in place, not counted here).
    pub last_commit_log_bytes: u64,
    /// Bytes the last commit of this handle wrote in place: the pages of chunks of small
    /// blocks made since the commit before (segments made since are synced in place, not
    /// counted here).
    pub last_commit_in_place_bytes: u64,
}

/// The descriptor of the open store's lock file, -1 if none. Set and cleared under
/// `fork::hold`, which the fork handlers hold: a fork child finds it exact.
static LOCK_FD: AtomicI32 = AtomicI32::new(-1);

/// The stores' part in the fork handlers (a layer, see `fork::install`): the record of the
/// open store is held across a fork (a child's drop of an inherited handle takes it), and in
/// the child the copy of the lock's descriptor is pointed at `/dev/null`, so the child does
/// not keep the store locked after its parent closes it (a `flock` belongs to the open file,
/// which a child shares until it closes its copy).
pub(crate) struct ForkLayer;

/// The layer given to `fork::install`.
pub(crate) static FORK: ForkLayer = ForkLayer;

impl fork::ForkLocks for ForkLayer {
    fn lock_for_fork(&'static self, held: &mut Vec<Box<dyn std::any::Any>>, _epoch: u64) {
        held.push(Box::new(open_here()));
    }

    fn in_child(&'static self, _held: &mut [Box<dyn std::any::Any>], _: &mut fork::DontForkViews) {
        let fd = LOCK_FD.swap(-1, Ordering::AcqRel);
        if fd >= 0 {
            sys::point_at_null(fd);
        }
    }
}

/// The range of the store this process has open, if any (inherited by a fork child with the
/// handle).
static OPEN: Mutex<Option<usize>> = Mutex::new(None);

fn open_here() -> MutexGuard<'static, Option<usize>> {
    // Set and cleared only: a poisoned lock is consistent.
    OPEN.lock().unwrap_or_else(|e| e.into_inner())
}

/// The bands of address space where new stores go (64-bit Linux's layouts, x86-64 and
/// arm64 with 47- or 48-bit user space):
/// * the default (top-down) layout maps the program and its heap near 85 TiB and everything
///   else down from just below the stack, near 128 TiB;
/// * the legacy (bottom-up) layout, which `ulimit -s unlimited` selects, maps from a random
///   base between about 20.3 and 21.3 TiB upwards;
/// * AddressSanitizer's shadow takes everything below 16 TiB.
///
/// So a store goes between 16 and 20 TiB, where none of them puts anything; a store too large
/// for that band between 24 and 80 TiB (above the legacy base and what a process usually maps
/// above it, below the program). A store's range is then free in the processes that reopen it,
/// whichever layout they run with.
#[cfg(target_pointer_width = "64")]
const BANDS: [(usize, usize); 2] = [(16 << 40, 20 << 40), (24 << 40, 80 << 40)];

/// Reserves the range of a new store in the first of [`BANDS`] it fits, at a random place on
/// a 1 GiB grid (tried a few times: another mapping may be there); anywhere the kernel likes
/// after that.
fn reserve_new_range(len: usize) -> io::Result<NonNull<u8>> {
    #[cfg(target_pointer_width = "64")]
    for (low, high) in BANDS {
        const STEP: usize = 1 << 30;
        if len > high - low {
            continue;
        }
        for _ in 0..8 {
            let random = uuid::Uuid::new_v4().as_u128() as usize;
            let at = low + random % ((high - low - len) / STEP + 1) * STEP;
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

/// What the store's allocators reach through the range's second page (the *runtime page*, a
/// private page of this process): its blocks and its roots.
#[derive(Debug)]
pub(crate) struct Shared {
    space: Mutex<Space>,
    /// The small blocks: the tier of the temporary allocator, on the store's chunk file.
    tier: Arc<SmallTier>,
    /// The writer's commit log (`None` for a reader). Taken after `space`, before the tier's
    /// locks.
    log: Mutex<Option<commit::Log>>,
    /// Tracks the writes to the writer's private views, where the kernel can.
    tracker: Option<Arc<sys::WriteTracker>>,
    /// A commit failed after its scan protected the pages it found: the next one takes every
    /// private copy (and protects them again).
    full_scan: AtomicBool,
    /// This process's use of each root slot. Also the lock for the header's root table.
    roots: Mutex<[RootState; ROOTS]>,
    access: Access,
    /// The process generation that opened the store: a fork child's copy never writes.
    generation: u64,
    /// The store's range.
    base: usize,
    range_len: usize,
    /// Opened by [`Store::open_dirty_read_only`]: a root is any mapped block.
    salvage: bool,
}

impl Shared {
    /// Whether a value of `size` bytes aligned to `align` at `addr` (read from the store's
    /// files) can be a root: the address a zero-size value gets, or the start of a small block
    /// in use or of a segment, large enough. (Whether that block is another container's
    /// buffer cannot be told without walking the data: a store is trusted input.)
    fn holds(&self, addr: usize, size: usize, align: usize) -> bool {
        if size == 0 {
            return addr == align;
        }
        if !addr.is_multiple_of(align) {
            return false;
        }
        match NonNull::new(std::ptr::without_provenance_mut::<u8>(addr)) {
            Some(ptr) if self.tier.contains(ptr) && self.salvage => {
                // The live blocks were saved at the last flush: any block of a mapped chunk.
                self.tier
                    .mapped_block_len(ptr)
                    .is_some_and(|len| size <= len)
            }
            Some(ptr) if self.tier.contains(ptr) => {
                // A root is a small block of its own, in use (`set_root` allocates one).
                self.tier.live_block_len(ptr).is_some_and(|len| size <= len)
            }
            // Or a segment of its own, from its start.
            Some(_) => self
                .lock_space()
                .len_of(addr)
                .is_some_and(|len| size <= len),
            None => false,
        }
    }

    fn lock_space(&self) -> MutexGuard<'_, Space> {
        // A panic inside `Space` leaves it consistent or a range marked lost: go on.
        self.space.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_roots(&self) -> MutexGuard<'_, [RootState; ROOTS]> {
        self.roots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_log(&self) -> MutexGuard<'_, Option<commit::Log>> {
        // A panic in a commit leaves the log as a crash would: its next commit or open mends.
        self.log.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this process is the one that opened the store (not a fork child).
    fn is_owner(&self) -> bool {
        self.generation == fork::generation()
    }
}

impl fork::ForkLocks for Shared {
    fn lock_for_fork(&'static self, held: &mut Vec<Box<dyn std::any::Any>>, _epoch: u64) {
        held.push(Box::new(self.lock_roots()));
        let space = self.lock_space();
        // Opened now, under the lock: the parent may remove a segment right after the fork.
        held.push(Box::new(space.files_for_child()));
        held.push(Box::new(space));
    }

    /// A writer's child reads and drops what it inherited: the store's blocks are mapped again
    /// in the child as private copy-on-write views of their files (the shared views are kept
    /// out of children), so that nothing the child does reaches the store. Its allocator then
    /// takes new blocks from the temporary allocator, and frees none of the store's. The
    /// parent seals what the child maps: chunks of an earlier epoch hand out no block and are
    /// never punched, segment files mapped before the fork are never cut (see `store_epoch`).
    /// A reader's views are private already: a child inherits them as they are. A grandchild
    /// inherits its parent's private views (they leave the record of `dont_fork` views here).
    fn in_child(
        &'static self,
        held: &mut [Box<dyn std::any::Any>],
        views: &mut fork::DontForkViews,
    ) {
        // Only the first child of the process that opened the store: later generations
        // inherit the private views.
        if self.access != Access::Write || fork::generation() != self.generation + 1 {
            return;
        }
        let Some(files) = held
            .iter()
            .find_map(|g| g.downcast_ref::<space::ChildFiles>())
        else {
            return;
        };
        // SAFETY: in the child, from its fork handler; the writer's shared views (segments
        // made since the last commit) are `dont_fork`, so their ranges are the holes the
        // handler refilled with reservations. Its private views (the header, the chunks,
        // committed segments) are inherited, copy-on-write.
        unsafe { Space::map_private_in_child(files) };
        views.forget_range(self.base, self.range_len);
    }
}

/// An open store: a folder, its lock, and its range of address space with everything the
/// store holds mapped in it. Dropping it closes it as [`close`](Self::close) does, logging
/// an error instead of returning it.
///
/// See the [module docs](self) for what a store is and the rules that keep it sound.
#[derive(Debug)]
pub struct Store {
    /// The folder's path as it was when the store was opened (absolute), for messages and
    /// [`path`](Self::path) only: the folder is used through `folder`.
    path: PathBuf,
    /// The store's folder, held from open to drop: never resolved again through a path.
    folder: Folder,
    /// Holds the `flock` for as long as the store is open (closed by the drop, under
    /// `fork::hold`).
    lock: Option<File>,
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
    /// Made once the range's mappings are in place; its address is in the runtime page.
    shared: Option<Box<Shared>>,
    /// Chunks lost while a failed open restored the small blocks (see `Drop`).
    lost_at_start: Vec<(usize, usize)>,
    /// What [`Store::recover`] did, if the store was opened by it.
    recovery: Option<Recovery>,
    /// What the open found of a writer that did not close.
    recovered: Option<Recovered>,
    /// Opened by [`Store::open_dirty_read_only`].
    salvage: bool,
}

// SAFETY: the raw pointer is the start of the store's range, which this value owns (reserved
// and mapped by it, unmapped only by its drop); the header it points to is only written
// through atomics, or under `Shared::roots`; everything else is behind mutexes.
unsafe impl Send for Store {}
// SAFETY: as above.
unsafe impl Sync for Store {}

impl Store {
    /// Makes a new store in the folder `path`, which must not exist, and opens it for writing.
    /// It reserves [`DEFAULT_RANGE`] bytes of address space (1 TiB on 64-bit systems), which
    /// costs nothing until used and bounds what the store can hold.
    pub fn create(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        Self::create_with_range(path, DEFAULT_RANGE)
    }

    /// As [`create`](Self::create), reserving `len` bytes of address space (rounded up to
    /// whole 4 MiB).
    pub fn create_with_range(path: impl AsRef<Path>, len: usize) -> Result<Store, StoreError> {
        let path = path.as_ref();
        let len = len
            .max(2 * CHUNK)
            .checked_next_multiple_of(CHUNK)
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
        let folder = match Folder::make(path) {
            Ok(folder) => folder,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(StoreError::Exists(path.to_path_buf()));
            }
            Err(e) => return Err(e.into()),
        };
        let made = folder
            .try_clone()
            .map_err(StoreError::from)
            .and_then(|held| Self::create_in(path, held, len));
        if made.is_err() {
            // Nothing of ours is in the folder yet that anyone could want: it was just made.
            // Its entries go through the descriptor; the folder itself by its path, only if
            // it is empty.
            if let Ok(names) = folder.names() {
                for name in names {
                    let _ = folder.remove_tree(&name.to_string_lossy());
                }
            }
            let _ = fs::remove_dir(path);
        }
        made
    }

    fn create_in(path: &Path, folder: Folder, len: usize) -> Result<Store, StoreError> {
        let lock = folder.file(LOCK.as_ref(), Access::Write, true)?;
        // A fresh folder: nobody else can hold the lock yet, but take it as every open does.
        if !lock_file(&lock, Access::Write)? {
            return Err(StoreError::Locked);
        }
        let header_file = folder.file(HEADER.as_ref(), Access::Write, true)?;
        folder.make_dir(space::SEGS)?;
        for name in [SMALL, SMALL_META] {
            folder.file(name.as_ref(), Access::Write, true)?;
        }
        crate::install_fork_handlers();
        let base = {
            let mut open = open_here();
            if open.is_some() {
                return Err(StoreError::AnotherStoreOpen);
            }
            let base = reserve_new_range(len)?;
            *open = Some(base.as_ptr().addr());
            base
        };
        let mut store = Store::unmapped(path, folder, lock, header_file, base, len, Access::Write);
        // `store` owns the reservation from here: an error below unmaps it (its drop).
        let file = &store.header_file;
        file.set_len(sys::page_size() as u64)?;
        let header = Header::bytes(base.as_ptr().addr(), len, small_region(len), true);
        file.write_all_at(&header, 0)?;
        file.sync_all()?;
        store.folder.sync()?;
        store.map_header()?;
        store.start(true)?;
        // Its first commit: the (empty) list of segments, the small blocks' metadata.
        store.commit_now(true)?;
        store.folder.sync()?;
        Ok(store)
    }

    /// Opens the store in the folder `path` for writing: the only handle anywhere while it is
    /// open. Refused if the store is open elsewhere, was not closed cleanly, or its address
    /// range is taken in this process.
    pub fn open(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        Self::open_with(path.as_ref(), Access::Write)
    }

    /// Opens the store in the folder `path` for reading: any number of processes may, while
    /// no writer has it. Its roots are read through [`root`](Self::root); nothing can be
    /// allocated.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        Self::open_with(path.as_ref(), Access::Read)
    }

    pub(crate) fn open_with(path: &Path, access: Access) -> Result<Store, StoreError> {
        let folder = Folder::open(path).map_err(not_found)?;
        Self::open_in(path, folder, access, false)
    }

    /// Opens a store of the earlier format (version 3 and before, without commits) that a
    /// writer left dirty (it crashed, or was killed), read-only, to read what can be saved
    /// from it: its roots and blocks as the writer left them in the files.
    /// [`StoreError::Dirty`] says the same store opens with [`recover`](Self::recover) at
    /// its last snapshot; this is for a store with none, or for what came after it. A store
    /// with commits is opened as [`open_read_only`](Self::open_read_only) does: at its last
    /// commit.
    ///
    /// What it sees of an earlier store: the root table and every byte as the writer last wrote them (after a
    /// crash of the process, the writer's last state: its writes were in the files; after a
    /// power loss, any mix of what had reached the disk). Every segment file is mapped as it
    /// is, and every chunk of small blocks (the list of segments and of live small blocks is
    /// from the writer's last flush, so it is not used). A root set after the last flush is
    /// found.
    ///
    /// # Safety
    /// A value the writer was changing when it died may be half-changed, and its pointers
    /// may lead outside any block (a vector whose buffer was being moved): reading such a
    /// value may read garbage or die of `SIGSEGV`. Only read values whose consistency the
    /// program can check, or copy out what it can, in a process that may die.
    pub unsafe fn open_dirty_read_only(path: impl AsRef<Path>) -> Result<Store, StoreError> {
        let path = path.as_ref();
        let folder = Folder::open(path).map_err(not_found)?;
        Self::open_in(path, folder, Access::Read, true)
    }

    /// Opens the store whose folder (`path` when it was opened) is `folder`; a `salvage`
    /// (read) open takes a dirty store as it is ([`open_dirty_read_only`]).
    ///
    /// [`open_dirty_read_only`]: Self::open_dirty_read_only
    fn open_in(
        path: &Path,
        folder: Folder,
        access: Access,
        salvage: bool,
    ) -> Result<Store, StoreError> {
        if access == Access::Read && !commit::log_is_empty(&folder, Self::id_of(&folder)?)? {
            // A writer crashed with commits not yet copied into the files: copied now, under
            // the writer's lock (refused while anyone has the store open).
            let lock = Self::lock_folder(&folder, Access::Write)?;
            Self::replay(&folder)?;
            drop(lock);
        }
        let lock = Self::lock_folder(&folder, access)?;
        Self::open_locked(path, folder, lock, access, salvage)
    }

    /// Copies the complete commits of the log into the files (see `commit`), unless a
    /// recovery was cut short (the snapshot's files half in place: only `recover` goes on).
    /// The caller holds the lock for writing.
    fn replay(folder: &Folder) -> Result<commit::Replayed, StoreError> {
        let header_file = folder
            .file(HEADER.as_ref(), Access::Read, false)
            .map_err(not_found)?;
        let header = Header::read(&header_file)?;
        if header.dirty == RECOVERING {
            return Err(StoreError::Dirty {
                last_flush: header.flushes,
                last_snapshot: header.snapshots,
            });
        }
        Ok(commit::replay(folder, header.id)?)
    }

    /// The id in the header of the store in `folder`.
    fn id_of(folder: &Folder) -> Result<[u64; 2], StoreError> {
        let file = folder
            .file(HEADER.as_ref(), Access::Read, false)
            .map_err(not_found)?;
        Ok(Header::read(&file)?.id)
    }

    /// The store's lock file, locked for `access` (never waited for).
    fn lock_folder(folder: &Folder, access: Access) -> Result<File, StoreError> {
        let lock = folder
            .file(LOCK.as_ref(), access, false)
            .map_err(not_found)?;
        if !lock_file(&lock, access)? {
            return Err(StoreError::Locked);
        }
        Ok(lock)
    }

    /// As `open_in`, with the store's lock taken already.
    fn open_locked(
        path: &Path,
        folder: Folder,
        lock: File,
        access: Access,
        salvage: bool,
    ) -> Result<Store, StoreError> {
        let replayed = match access {
            Access::Write => Self::replay(&folder)?,
            Access::Read => commit::Replayed::default(),
        };
        let header_file = folder
            .file(HEADER.as_ref(), access, false)
            .map_err(not_found)?;
        let header = Header::read(&header_file)?;
        let commits = header.version >= COMMITS;
        if (header.dirty == RECOVERING || (header.dirty != 0 && !commits)) && !salvage {
            return Err(StoreError::Dirty {
                last_flush: header.flushes,
                last_snapshot: header.snapshots,
            });
        }
        let recovered = (commits && (header.dirty != 0 || replayed != Default::default()))
            .then_some(Recovered {
                commits_replayed: replayed.commits,
                bytes_dropped: replayed.dropped,
                last_commit: header.flushes,
            });
        let (Ok(base), Ok(len)) = (usize::try_from(header.base), usize::try_from(header.len))
        else {
            return Err(StoreError::NotAStore);
        };
        let at = NonNull::new(base as *mut u8).ok_or(StoreError::NotAStore)?;
        let small = usize::try_from(header.small).unwrap_or(usize::MAX);
        if !len.is_multiple_of(CHUNK)
            || !base.is_multiple_of(CHUNK)
            || len < 2 * CHUNK
            || !small.is_multiple_of(CHUNK)
            || small > len - DATA
        {
            return Err(StoreError::NotAStore);
        }
        crate::install_fork_handlers();
        {
            let mut open = open_here();
            match *open {
                Some(b) if b == base => return Err(StoreError::OpenHere),
                Some(_) => return Err(StoreError::AnotherStoreOpen),
                None => {}
            }
            // Exactly there or not at all: never MAP_FIXED over what may be someone else's.
            sys::reserve_at(at, len).map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => StoreError::AddressTaken { base, len },
                _ => StoreError::Io(e),
            })?;
            *open = Some(base);
        }
        let mut store = Store::unmapped(path, folder, lock, header_file, at, len, access);
        // A store with commits is never left dirty in the old sense: it opens as it is.
        store.salvage = salvage && !commits;
        store.recovered = recovered;
        store.map_header()?;
        // Everything mapped and checked before the store is marked open for writing: a store
        // refused here is left as it was.
        store.start(false)?;
        if access == Access::Write {
            if !commits {
                // Upgraded by a commit: the header's new version, the list of segments by
                // name and the log's first commit are one commit (all or nothing).
                let header = store.header();
                header
                    .build
                    .store(fingerprint_for(VERSION), Ordering::Relaxed);
                header.version.store(VERSION, Ordering::Relaxed);
                store.commit_now(true)?;
            }
            store.mark_open()?;
        }
        Ok(store)
    }

    fn unmapped(
        path: &Path,
        folder: Folder,
        lock: File,
        header_file: File,
        base: NonNull<u8>,
        len: usize,
        access: Access,
    ) -> Store {
        {
            let _no_fork = fork::hold();
            LOCK_FD.store(lock.as_raw_fd(), Ordering::Release);
        }
        Store {
            path: std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf()),
            folder,
            lock: Some(lock),
            header_file,
            base,
            len,
            access,
            generation: fork::generation(),
            header_mapped: false,
            first_page_lost: false,
            shared: None,
            lost_at_start: Vec::new(),
            recovery: None,
            recovered: None,
            salvage: false,
        }
    }

    /// Maps the header file over the first page of the range.
    fn map_header(&mut self) -> io::Result<()> {
        let page = sys::page_size();
        // The writer's view is private, as every committed page is (see `commit`).
        let share = match self.access {
            Access::Write => Share::Private,
            Access::Read => Share::Read,
        };
        // SAFETY: the range is our reservation (made by `create` or `open`, owned by `self`),
        // and nothing refers to its first page yet.
        let mapped =
            unsafe { sys::map_file_fixed_at(self.base, &self.header_file, 0, page, share) };
        match mapped {
            Ok(()) => {
                self.header_mapped = true;
                Ok(())
            }
            // A failed MAP_FIXED may leave a gap (see `arena::chunk::MapFailure`): ours again
            // only if it can be reserved in place.
            Err(e) => {
                self.first_page_lost = sys::reserve_at(self.base, page).is_err();
                Err(e)
            }
        }
    }

    /// Makes the runtime page and maps every block back: the store is ready. A `new` store
    /// has no list of segments yet.
    fn start(&mut self, new: bool) -> Result<(), StoreError> {
        let page = sys::page_size();
        // SAFETY: the second page of the range is our reservation, which nothing refers to.
        let runtime = unsafe { self.base.add(page) };
        // SAFETY: as above; it becomes private read/write memory of this process.
        unsafe { sys::protect(runtime, page, true) }?;
        // The folder itself, never a link to elsewhere.
        let segs = self.folder.dir(space::SEGS)?.into_file();
        // Every committed page is a private view, the writer's as a reader's (see `commit`).
        let share = Share::Private;
        let small = self.header().small as usize;
        let chunks = self
            .folder
            .file(SMALL.as_ref(), self.access, false)
            .map_err(not_found)?;
        let small_meta = self
            .folder
            .file(SMALL_META.as_ref(), self.access, false)
            .map_err(not_found)?;
        // SAFETY: the small region follows the first chunk of the range (checked to fit at
        // open), CHUNK-aligned.
        let region = unsafe { self.base.add(DATA) };
        // Private views, inherited by a child as they are.
        let config = TierConfig::default();
        let writer = self.access == Access::Write;
        // The writes to the writer's private views, tracked: a commit writes what changed.
        let tracker = writer.then(sys::WriteTracker::new).flatten().map(Arc::new);
        let tier = SmallTier::in_store(
            config,
            region,
            small,
            chunks,
            small_meta.try_clone()?,
            writer,
            tracker.clone(),
        );
        let tier = Arc::new(tier);
        // The chunks restored are of this process's fork epoch.
        tier.observe_epoch(fork::epoch());
        let restored = tier.restore(&small_meta, share);
        let start = self.base.as_ptr().addr() + DATA + small;
        let end = self.base.as_ptr().addr() + self.len;
        let corrupt = |e: io::Error| match e.kind() {
            io::ErrorKind::InvalidData => {
                crate::logging::report!(error, "mmapvec: store {}: {e}", self.path.display());
                StoreError::NotAStore
            }
            _ => StoreError::Io(e),
        };
        // Whatever fails, what was mapped is unmapped with the range by the drop, less the
        // ranges that may no longer be ours.
        self.lost_at_start = tier.lost_ranges();
        restored.map_err(corrupt)?;
        if self.salvage {
            // Chunks made after the last flush are in the file, not in its metadata.
            tier.map_unlisted_chunks();
            self.lost_at_start = tier.lost_ranges();
        }
        let manifest = !new && !self.salvage && self.header().version.load(Ordering::Relaxed) >= 3;
        let space_share = if writer { Share::Write } else { Share::Private };
        let space = Space::open(
            segs,
            (start, end),
            space_share,
            manifest,
            tracker.clone(),
            &mut self.lost_at_start,
        );
        let log = match writer {
            true => Some(commit::Log::open(
                &self.folder,
                self.header().flushes.load(Ordering::Acquire),
                self.header().id,
            )?),
            false => None,
        };
        let shared = Box::new(Shared {
            space: Mutex::new(space.map_err(corrupt)?),
            tier,
            log: Mutex::new(log),
            tracker,
            full_scan: AtomicBool::new(false),
            roots: Mutex::new([RootState::default(); ROOTS]),
            access: self.access,
            generation: self.generation,
            base: self.base.as_ptr().addr(),
            range_len: self.len,
            salvage: self.salvage,
        });
        // SAFETY: `shared` stays boxed (at its address) until the drop, which unregisters it
        // first; its `lock_for_fork` only takes its own mutexes.
        unsafe { fork::register(&*shared) };
        // The tier's locks too, after the store's (the order every path takes them in: roots,
        // space, then the tier's), and its fork epoch moves with the fork itself: no block is
        // handed out or freed across it, so none a child maps is handed out again after it.
        // SAFETY: the tier lives in its `Arc` until `shared` goes, and its drop unregisters it
        // first; its `lock_for_fork` only takes its own mutexes.
        unsafe { fork::register(&*shared.tier) };
        // SAFETY: the runtime page is ours, read/write, aligned for a pointer.
        unsafe { runtime.cast::<*const Shared>().write(&*shared) };
        self.shared = Some(shared);
        Ok(())
    }

    fn header(&self) -> &Header {
        // SAFETY: the header file is mapped at `base` for as long as `self` lives (see
        // `map_header`; unmapped by the drop), at least one page long and page aligned, so
        // aligned for `Header`; its fields are plain integers, atomics and an `UnsafeCell`,
        // valid for any bytes. A reader's mapping is read-only, and a reader never writes
        // through it.
        unsafe { self.base.cast::<Header>().as_ref() }
    }

    pub(crate) fn shared(&self) -> &Shared {
        self.shared
            .as_deref()
            .expect("a store handed out is started")
    }

    /// Marks the store open for writing, in the header file (synced) and in the header's
    /// view (so that every commit says so, until `close` commits it closed): the next open
    /// knows whether this writer closed.
    fn mark_open(&self) -> io::Result<()> {
        self.header().dirty.store(1, Ordering::Release);
        sys::write_at(
            &self.header_file,
            &1u64.to_ne_bytes(),
            DIRTY_AT,
            "mark the store open",
        )?;
        sys::sync_data(&self.header_file, "sync the header")
    }

    /// Errors out in a fork child's copy of the handle, and for a reader when `write`.
    fn check_use(&self, write: bool) -> Result<(), StoreError> {
        if self.generation != fork::generation() {
            Err(StoreError::ForkChild)
        } else if write && self.access != Access::Write {
            Err(StoreError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// The allocator of this store: containers made with it live in the store, and cannot
    /// outlive this handle.
    pub fn allocator(&self) -> StoreAllocator<'_> {
        StoreAllocator::new(self)
    }

    /// The store's folder, as its path was when the store was opened (made absolute). The
    /// store holds its folder by descriptor: a later `chdir` or rename does not change which
    /// folder it uses, only what this path may lead to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// What [`recover`](Self::recover) did when it opened this handle: the snapshot it went
    /// back to, and the blocks it freed that no root reached. `None` for a handle opened
    /// otherwise.
    pub fn recovery(&self) -> Option<Recovery> {
        self.recovery
    }

    /// The store's address range: start and length.
    pub fn range(&self) -> (usize, usize) {
        (self.base.as_ptr().addr(), self.len)
    }

    /// Whether the store is open for writing.
    pub fn is_writable(&self) -> bool {
        self.access == Access::Write
    }

    /// Commits made so far (closes and snapshots commit too), since the store was made: the
    /// number of the commit the store is at.
    pub fn flushes(&self) -> u64 {
        if self.generation != fork::generation() {
            return 0; // a fork child has no view of the header
        }
        // Relaxed: a reader's mapping is read-only, where only small relaxed atomic loads are
        // allowed.
        self.header().flushes.load(Ordering::Relaxed)
    }

    /// What the store holds now (all zeros in a fork child).
    pub fn stats(&self) -> StoreStats {
        if self.generation != fork::generation() {
            // A fork child: the tier's locks may be held by threads that do not exist here.
            return StoreStats::default();
        }
        let shared = self.shared();
        let tier = shared.tier.stats();
        let space = shared.lock_space();
        let (log_bytes, in_place_bytes) = shared
            .lock_log()
            .as_ref()
            .map_or((0, 0), |log| log.last_commit_bytes());
        StoreStats {
            segments: space.blocks(),
            segment_bytes: space.mapped_bytes() as u64,
            small_in_use_bytes: tier.in_use_bytes,
            small_chunk_bytes: tier.arena_bytes,
            last_commit_log_bytes: log_bytes,
            last_commit_in_place_bytes: in_place_bytes,
        }
    }

    /// Commits: everything the store holds now becomes what the store is, durably and all at
    /// once. After `Ok`, a crash at any instant (the process killed, the machine losing
    /// power) leaves a store that the next [`open`](Self::open) opens exactly as it is now:
    /// every root and every byte of every block. An error leaves the last commit as it was
    /// (a full disk, say: free some and commit again); nothing is lost from memory.
    ///
    /// Its cost follows what changed since the last commit, not the store's size: the pages
    /// written (the kernel says which), the blocks made, the small blocks' bookkeeping, and
    /// two syncs of the log. See the module docs of `commit` (in the source) for how.
    ///
    /// No block is allocated, grown or freed while it runs (the store's locks); what other
    /// threads write into existing blocks meanwhile may or may not be in it, each page as it
    /// was at some instant of the commit: commit where the data is consistent.
    ///
    /// ```
    /// use mmapvec::store::{Store, StoreVec};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = std::env::temp_dir().join(format!("mmapvec-doc-commit-{}", std::process::id()));
    /// # let _ = std::fs::remove_dir_all(&dir);
    /// let store = Store::create(&dir)?;
    /// let mut log = StoreVec::new_in(store.allocator());
    /// log.push(1u64);
    /// store.set_root("log", log)?;
    /// store.commit()?; // from here a crash keeps [1]
    /// store.root_mut::<StoreVec<u64>>("log")?.push(2);
    /// drop(store); // not committed: dropped, as a crash would
    ///
    /// let store = Store::open(&dir)?;
    /// assert_eq!(*store.root::<StoreVec<u64>>("log")?, [1]);
    /// assert!(store.recovered().is_some(), "the last writer did not close");
    /// store.close()?;
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn commit(&self) -> Result<(), StoreError> {
        self.check_use(true)?;
        self.commit_now(false)
    }

    /// Commits (see [`commit`](Self::commit)), syncs the files, then gives back the memory
    /// that the pages of committed data written since the store was opened take (their
    /// private copies: the files hold the same bytes now). `&mut self`: no container or
    /// guard of the store is alive, so nothing writes to its pages meanwhile.
    ///
    /// A long session that changes data in place calls it now and then (between batches,
    /// say): what it changes in place between two calls is then what is bounded by memory.
    ///
    /// ```
    /// use mmapvec::store::{Store, StoreVec};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = std::env::temp_dir().join(format!("mmapvec-doc-trim-{}", std::process::id()));
    /// # let _ = std::fs::remove_dir_all(&dir);
    /// let mut store = Store::create(&dir)?;
    /// let mut v = StoreVec::new_in(store.allocator());
    /// v.resize(1 << 20, 0u64);
    /// store.set_root("v", v)?;
    /// for round in 1..=3u64 {
    ///     for x in store.root_mut::<StoreVec<u64>>("v")?.iter_mut() {
    ///         *x += round; // in place: private copies of committed pages
    ///     }
    ///     store.trim()?; // committed, and the copies given back
    /// }
    /// assert_eq!(store.root::<StoreVec<u64>>("v")?[0], 6);
    /// store.close()?;
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn trim(&mut self) -> Result<(), StoreError> {
        self.check_use(true)?;
        let shared = self.shared();
        let _roots = shared.lock_roots();
        let mut space = shared.lock_space();
        self.commit_locked(&mut space, true)?;
        // SAFETY: the commit just made is in the files and synced (the checkpoint), and
        // `&mut self` means that no container or guard of the store is alive: nothing writes
        // to its pages. The header's view, the chunks' and the committed segments' are ours.
        unsafe {
            sys::drop_private_copies(self.base, sys::page_size())?;
            shared.tier.drop_private_copies()?;
            space.drop_private_copies()?;
        }
        Ok(())
    }

    /// The name earlier versions gave [`commit`](Self::commit), which it now is.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.commit()
    }

    /// A commit under the store's locks, then a checkpoint (the log emptied, the files
    /// synced) if `checkpoint` or the log is long.
    fn commit_now(&self, checkpoint: bool) -> Result<(), StoreError> {
        let shared = self.shared();
        let _roots = shared.lock_roots();
        let mut space = shared.lock_space();
        self.commit_locked(&mut space, checkpoint)
    }

    /// As [`commit_now`](Self::commit_now), with the roots' and the space's locks held by
    /// the caller.
    fn commit_locked(&self, space: &mut Space, checkpoint: bool) -> Result<(), StoreError> {
        use commit::Target;
        let shared = self.shared();
        let mut log = shared.lock_log();
        let log = log.as_mut().ok_or(StoreError::ReadOnly)?;
        let header = self.header();
        let seq = header.flushes.load(Ordering::Acquire) + 1;
        header.flushes.store(seq, Ordering::Release);
        let base = self.base.as_ptr().addr();
        // The ranges the scans protected again: written again if the commit fails.
        let mut scanned: Vec<(usize, usize)> = Vec::new();
        let made = shared
            .tier
            .commit_with(|image, committed| -> Result<(), StoreError> {
                log.begin();
                let manifest = space.prepare_commit()?;
                let mut changes = commit::Changes::new();
                changes.set_len(Target::Small, image.file_len);
                changes.memory(Target::Header, 0, base, sys::page_size());
                let tracker = shared.tracker.as_deref();
                let scan = match tracker {
                    Some(tracker) if !shared.full_scan.load(Ordering::Relaxed) => {
                        sys::Scan::Since(tracker)
                    }
                    _ => sys::Scan::All(tracker),
                };
                let mut written = |addr: usize, len: usize| {
                    let found = sys::written_pages(addr, len, scan);
                    match &found {
                        Ok(ranges) => scanned.extend_from_slice(ranges),
                        // What a failed scan protected is not known: the next commit takes
                        // every private copy.
                        Err(_) => shared.full_scan.store(true, Ordering::Relaxed),
                    }
                    found
                };
                // Chunks made since the last commit are in none yet: their pages are written in
                // place (and synced before the commit point), not to the log.
                let (region, used) = image.used;
                let fresh: std::collections::HashSet<usize> =
                    image.fresh.iter().map(|&(addr, _)| addr).collect();
                let mut in_place = false;
                if used > 0 {
                    for (addr, len) in written(region, used)? {
                        // Split at chunk boundaries.
                        let mut at = addr;
                        while at < addr + len {
                            let chunk = at - (at - region) % CHUNK;
                            let n = (chunk + CHUNK).min(addr + len) - at;
                            let offset = (at - region) as u64;
                            if fresh.contains(&chunk) {
                                log.write_in_place(Target::Small, offset, at, n)?;
                                in_place = true;
                            } else {
                                changes.memory(Target::Small, offset, at, n);
                            }
                            at += n;
                        }
                    }
                }
                if in_place || !image.fresh.is_empty() {
                    log.sync_in_place(Target::Small)?;
                }
                for (addr, len, name) in space.private_views() {
                    for (at, n) in written(addr, len)? {
                        changes.memory(Target::Seg(name), (at - addr) as u64, at, n);
                    }
                }
                for (offset, bytes) in &image.meta_writes {
                    changes.bytes(Target::SmallMeta, *offset, bytes.clone());
                }
                changes.bytes(Target::Manifest, 0, manifest);
                log.commit(seq, &changes, committed)?;
                shared.full_scan.store(false, Ordering::Relaxed);
                space.after_commit();
                Ok(())
            });
        if let Err(e) = made {
            header.flushes.store(seq - 1, Ordering::Release);
            // The pages this commit found are written again for the next one (else it takes
            // every private copy).
            if let Some(tracker) = shared.tracker.as_deref() {
                for &(addr, len) in &scanned {
                    let at = NonNull::new(addr as *mut u8).expect("a store address");
                    // SAFETY: a range the scan found in the store's views, mapped (the
                    // store's locks are held); unprotecting changes no content.
                    if unsafe { tracker.mark_written(at, len) }.is_err() {
                        shared.full_scan.store(true, Ordering::Relaxed);
                    }
                }
            }
            return Err(e);
        }
        if checkpoint || log.wants_checkpoint() {
            match log.checkpoint() {
                Ok(emptied) => {
                    if emptied {
                        shared.tier.after_checkpoint();
                    }
                }
                Err(e) if checkpoint => return Err(e.into()),
                Err(e) => crate::logging::report!(
                    warn,
                    "mmapvec: store {}: emptying the log: {e}",
                    self.path.display()
                ),
            }
        }
        Ok(())
    }

    /// What this open found of the writer before it, if that writer did not close the store
    /// (it crashed, was killed, or dropped its handle): how many commits the open copied from
    /// the log into the files, and how many bytes of an unfinished commit it dropped. The
    /// store is as of its last commit either way.
    pub fn recovered(&self) -> Option<Recovered> {
        self.recovered
    }

    /// Closes the store: a writer commits (see [`commit`](Self::commit)), marked closed, and
    /// syncs its files. Dropping the handle instead keeps the last commit and drops what came
    /// after it, as a crash would (a half-done update never becomes the store's state).
    ///
    /// On an error the store stays open, and comes back in the [`CloseError`]: free some disk
    /// (say) and close it again. The disk the store's metadata and its blocks' pages take is
    /// reserved as its blocks are made, so a disk that fills up fails an allocation rather
    /// than the close (the log, which a commit appends to, needs disk for what changed).
    ///
    /// ```
    /// # use mmapvec::store::Store;
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let dir = std::env::temp_dir().join(format!("mmapvec-doc-close-{}", std::process::id()));
    /// # let _ = std::fs::remove_dir_all(&dir);
    /// let store = Store::create(&dir)?;
    /// if let Err(failed) = store.close() {
    ///     eprintln!("{failed}; trying once more");
    ///     failed.into_store().close()?;
    /// }
    /// # std::fs::remove_dir_all(&dir)?;
    /// # Ok(())
    /// # }
    /// ```
    pub fn close(mut self) -> Result<(), CloseError> {
        match self.mark_clean() {
            Ok(()) => {
                drop(self);
                Ok(())
            }
            Err(error) => Err(CloseError {
                error,
                store: Box::new(self),
            }),
        }
    }

    /// Commits the store marked closed, and empties its log, once; only in the process that
    /// opened the store for writing (a fork child's copy leaves the parent's store alone).
    fn mark_clean(&mut self) -> Result<(), StoreError> {
        if self.access != Access::Write
            || self.generation != fork::generation()
            || !self.header_mapped
            || self.shared.is_none()
        {
            return Ok(());
        }
        let header = self.header();
        if header.dirty.load(Ordering::Acquire) == 0 {
            return Ok(());
        }
        header.dirty.store(0, Ordering::Release);
        let committed = self.commit_now(true);
        if committed.is_err() {
            self.header().dirty.store(1, Ordering::Release);
        }
        committed
    }
}

impl Drop for Store {
    fn drop(&mut self) {
        // Not closed: what came after the last commit is dropped (a panic may have cut an
        // update in half), and the files are made to hold the last commit alone.
        if self.access == Access::Write
            && self.generation == fork::generation()
            && let Some(shared) = self.shared.as_deref()
            && let Some(log) = shared.lock_log().as_mut()
            && let Err(e) = log.checkpoint().map(|_| shared.tier.after_checkpoint())
        {
            crate::logging::report!(
                error,
                "mmapvec: the store {}: syncing its last commit: {e}",
                self.path.display()
            );
        }
        let base = self.base.as_ptr().addr();
        let page = sys::page_size();
        // Ranges that may be someone else's now stay mapped.
        let mut keep = Vec::new();
        if self.first_page_lost {
            keep.push((base, page));
        }
        keep.append(&mut self.lost_at_start);
        if let Some(shared) = self.shared.take() {
            fork::unregister(&*shared);
            keep.extend_from_slice(shared.lock_space().lost());
            keep.extend(shared.tier.lost_ranges());
        }
        keep.sort_unstable();
        let mut views = fork::hold();
        let mut from = base;
        let mut failed = None;
        for (addr, len) in keep.into_iter().chain([(base + self.len, 0)]) {
            if addr > from {
                let at = NonNull::new(from as *mut u8).expect("inside the range");
                // SAFETY: the range (less the ranges kept) is ours, reserved by `create` or
                // `open`, and with `self` gone nothing refers to it.
                let unmapped = unsafe { sys::unmap(at, addr - from) };
                if let Err(e) = unmapped {
                    failed = Some(e);
                }
            }
            from = from.max(addr + len);
        }
        views.forget_range(base, self.len);
        if let Some(lock) = self.lock.take() {
            if LOCK_FD.load(Ordering::Acquire) == lock.as_raw_fd() {
                LOCK_FD.store(-1, Ordering::Release);
            }
            drop(lock);
        }
        drop(views);
        let mut open = open_here();
        if *open == Some(base) {
            *open = None;
        }
        // Logged after the lock is let go: a logger may allocate, and a fork takes this lock.
        drop(open);
        if let Some(e) = failed {
            crate::logging::report!(
                error,
                "mmapvec: unmapping the store {}: {e}",
                self.path.display()
            );
        }
    }
}

/// A store's folder or a file in it that is not there, or not a regular file: not a store.
fn not_found(e: io::Error) -> StoreError {
    match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory | io::ErrorKind::InvalidData => {
            StoreError::NotAStore
        }
        _ => StoreError::Io(e),
    }
}

/// Takes the store's lock for `access`, without waiting: `false` if another handle holds it.
fn lock_file(file: &File, access: Access) -> io::Result<bool> {
    sys::try_lock(file, access == Access::Write)
}

/// The dirty flag as the header file holds it on disk (for the tests).
#[cfg(test)]
fn dirty_on_disk(path: &Path) -> u64 {
    let file = File::open(path.join(HEADER)).unwrap();
    Header::read(&file).unwrap().dirty
}
