//! Where segment files come from: the [`SegmentCreator`] trait and the default [`DirCreator`].

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use crate::stats::Context;
use crate::sys;

/// What the allocator asks of a [`SegmentCreator`] for one new segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SegmentRequest {
    pub(crate) len: usize,
    pub(crate) keeps_name: bool,
}

impl SegmentRequest {
    /// The length the file will be given right after creation (a multiple of the page size).
    ///
    /// ```
    /// use mmapvec::SegmentRequest;
    /// let request = SegmentRequest::new(4096, false);
    /// assert_eq!(request.len(), 4096);
    /// ```
    #[allow(clippy::len_without_is_empty)] // a segment is never empty
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the segment will keep its file name for its whole life. When `false` the
    /// allocator removes the name at once and keeps the descriptor; when `true` (the process
    /// holds many segments and its descriptor budget is spent) it closes the descriptor and
    /// reopens the file by name to resize it, so the file must stay where it was created.
    ///
    /// ```
    /// use mmapvec::SegmentRequest;
    /// assert!(SegmentRequest::new(4096, true).keeps_name());
    /// ```
    pub fn keeps_name(&self) -> bool {
        self.keeps_name
    }

    /// Makes a request, for testing a creator outside the allocator.
    ///
    /// ```
    /// use mmapvec::SegmentRequest;
    /// assert!(!SegmentRequest::new(8192, false).keeps_name());
    /// ```
    pub fn new(len: usize, keeps_name: bool) -> Self {
        SegmentRequest { len, keeps_name }
    }
}

/// A freshly created, empty, read-write file handed to the allocator by a [`SegmentCreator`].
#[derive(Debug)]
pub struct SegmentFile {
    pub(crate) file: File,
    pub(crate) path: Option<PathBuf>,
}

impl SegmentFile {
    /// A file that has a name. The allocator owns the name from now on: it removes it right
    /// after creation, or when the segment is freed (see [`SegmentRequest::keeps_name`]).
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// let dir = std::env::temp_dir();
    /// let path = dir.join(format!("example-{}", std::process::id()));
    /// let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
    /// let segment = mmapvec::SegmentFile::named(file, &path);
    /// # drop(segment); std::fs::remove_file(path)?;
    /// # Ok(()) }
    /// ```
    pub fn named(file: File, path: impl Into<PathBuf>) -> Self {
        SegmentFile {
            file,
            path: Some(path.into()),
        }
    }

    /// A file without a name (`memfd_create`, `O_TMPFILE`, or already unlinked). The allocator
    /// keeps its descriptor open for the life of the segment.
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// let path = std::env::temp_dir().join(format!("anon-example-{}", std::process::id()));
    /// let file = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
    /// std::fs::remove_file(&path)?;
    /// let segment = mmapvec::SegmentFile::anonymous(file);
    /// # drop(segment);
    /// # Ok(()) }
    /// ```
    pub fn anonymous(file: File) -> Self {
        SegmentFile { file, path: None }
    }
}

/// Makes the files that back segments: where they live, what they are called, how they are
/// opened.
///
/// The allocator calls [`create`](SegmentCreator::create) once per non-empty allocation. The
/// file must be empty and opened for reading and writing. Errors are passed to the caller of
/// the allocation as an `AllocError`, and the `io::Error` itself is kept for
/// [`MmapAllocator::take_last_error`](crate::MmapAllocator::take_last_error).
///
/// ```
/// use std::fs::OpenOptions;
/// use std::io;
/// use std::sync::atomic::{AtomicUsize, Ordering};
/// use mmapvec::{MmapAllocator, MmapVec, SegmentCreator, SegmentFile, SegmentRequest};
///
/// /// Numbered files in a folder of our own.
/// #[derive(Debug)]
/// struct Numbered { dir: std::path::PathBuf, next: AtomicUsize }
///
/// // SAFETY: each call creates a new file (`create_new`) under a fresh number, hands it out
/// // once and keeps no handle to it; the path given is the file's own.
/// unsafe impl SegmentCreator for Numbered {
///     fn create(&self, _request: &SegmentRequest) -> io::Result<SegmentFile> {
///         let n = self.next.fetch_add(1, Ordering::Relaxed);
///         let path = self.dir.join(format!("segment-{n}"));
///         let file = OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
///         Ok(SegmentFile::named(file, path))
///     }
/// }
///
/// # fn main() -> io::Result<()> {
/// let dir = std::env::temp_dir().join(format!("numbered-doc-{}", std::process::id()));
/// std::fs::create_dir_all(&dir)?;
/// let alloc = MmapAllocator::builder()
///     .creator(Numbered { dir: dir.clone(), next: AtomicUsize::new(0) })
///     .build()?;
/// let mut v = MmapVec::<u32>::new_in(alloc.clone());
/// v.extend(0..1000);
/// assert_eq!(v[999], 999);
/// assert_eq!(alloc.stats().creates, 1);
/// # drop(v); std::fs::remove_dir_all(dir)?;
/// # Ok(()) }
/// ```
///
/// # Safety
///
/// The allocator hands out the mapping of each file as memory that nothing else aliases, so an
/// implementation must guarantee that every file returned by `create`:
/// 1. is a new file, given out once: no other segment, live or future, is backed by it;
/// 2. is not mapped, resized, truncated or written by anything else while its segment lives
///    (the creator keeps no handle it uses later; a truncation would kill the process with
///    `SIGBUS`, a write would change memory under safe code's feet);
/// 3. when given with [`SegmentFile::named`], is the file that the path names (the allocator
///    removes that path).
pub unsafe trait SegmentCreator: fmt::Debug + Send + Sync + 'static {
    /// Creates one new, empty, read-write file for a segment of `request.len()` bytes.
    fn create(&self, request: &SegmentRequest) -> io::Result<SegmentFile>;
}

/// Leftover files younger than this may belong to a segment being created right now.
const STALE_AFTER: Duration = Duration::from_secs(60);

/// The default creator: files named by a random UUID v4, in a folder of the crate's own
/// (`mmapvec-<uid>`, mode `0700`) inside a base directory (the temp directory by default).
///
/// * Files are created with `O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC` and mode `0600`.
/// * The crate's folder must be a real directory (not a symlink), owned by the current user, and
///   closed to others (no group or other permission bits); anything else is refused.
/// * A segment that keeps its file name ([`SegmentRequest::keeps_name`]) lives in a
///   per-process *session* folder inside the crate's folder. The process holds an exclusive
///   `flock` on that folder while it runs; on start the creator removes session folders whose
///   lock it can take (their process is gone) and loose segment files over a minute old. The
///   files of a live process are never touched.
/// * Base directories on tmpfs or ramfs (RAM-backed) are reported with a `log` warning; see
///   [`Builder::allow_ram_backed`](crate::Builder::allow_ram_backed) to refuse them instead.
///
/// The folder is prepared on first use; [`DirCreator::open`] prepares it at once.
pub struct DirCreator {
    base: PathBuf,
    prepared: OnceLock<Prepared>,
    preparing: Mutex<()>,
}

struct Prepared {
    folder: PathBuf,
    ram_backed: bool,
    session: OnceLock<Session>,
    session_init: Mutex<()>,
}

/// This process's session folder and the open handle that holds its lock.
struct Session {
    path: PathBuf,
    _lock: File,
    /// A child made by `fork` inherits the session (and shares its lock) but must not remove it.
    owner: u32,
}

impl fmt::Debug for DirCreator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirCreator")
            .field("base", &self.base)
            .field("folder", &self.prepared.get().map(|p| &p.folder))
            .finish()
    }
}

impl DirCreator {
    /// A creator for `base`, prepared lazily at the first segment.
    ///
    /// ```
    /// let creator = mmapvec::DirCreator::new(std::env::temp_dir());
    /// assert!(creator.folder().starts_with(std::env::temp_dir()));
    /// ```
    pub fn new(base: impl Into<PathBuf>) -> Self {
        DirCreator {
            base: base.into(),
            prepared: OnceLock::new(),
            preparing: Mutex::new(()),
        }
    }

    /// A creator for `base`, with its folder checked and created now: errors name the path.
    ///
    /// ```
    /// let err = mmapvec::DirCreator::open("/nonexistent/dir").unwrap_err();
    /// assert!(err.to_string().contains("/nonexistent/dir"));
    /// ```
    pub fn open(base: impl Into<PathBuf>) -> io::Result<Self> {
        let creator = Self::new(base);
        creator.prepared()?;
        Ok(creator)
    }

    /// The crate's folder inside the base directory, where segment files are created.
    ///
    /// ```
    /// let creator = mmapvec::DirCreator::new("/var/tmp");
    /// assert_eq!(creator.folder().parent(), Some(std::path::Path::new("/var/tmp")));
    /// assert!(creator.folder().to_string_lossy().contains("mmapvec-"));
    /// ```
    pub fn folder(&self) -> PathBuf {
        self.base.join(format!("mmapvec-{}", sys::effective_uid()))
    }

    /// Whether the base directory is on a RAM-backed file system (tmpfs, ramfs), where segments
    /// save no memory. Prepares the folder if needed.
    ///
    /// ```
    /// # fn main() -> std::io::Result<()> {
    /// let creator = mmapvec::DirCreator::open("/dev/shm")?;
    /// assert!(creator.is_ram_backed()?);
    /// # Ok(()) }
    /// ```
    pub fn is_ram_backed(&self) -> io::Result<bool> {
        Ok(self.prepared()?.ram_backed)
    }

    fn prepared(&self) -> io::Result<&Prepared> {
        if let Some(p) = self.prepared.get() {
            return Ok(p);
        }
        let _guard = self.preparing.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(p) = self.prepared.get() {
            return Ok(p);
        }
        let prepared = self.prepare()?;
        let prepared = self.prepared.get_or_init(|| prepared);
        drop(_guard);
        // Logged outside the lock: a logger may allocate through this very creator.
        if prepared.ram_backed {
            log::warn!(
                "mmapvec: {} is on a RAM-backed file system (tmpfs): segments there do not \
                 relieve memory; set TMPDIR or MmapAllocator::builder().dir(..) to a disk",
                prepared.folder.display()
            );
        }
        Ok(prepared)
    }

    fn prepare(&self) -> io::Result<Prepared> {
        let base = &self.base;
        let meta = fs::metadata(base).map_err(|e| with_path(e, "segment directory", base))?;
        if !meta.is_dir() {
            return Err(with_path(
                io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
                "segment directory",
                base,
            ));
        }
        let folder = self.folder();
        match DirBuilder::new().mode(0o700).create(&folder) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(with_path(e, "cannot create segment folder", &folder)),
        }
        let handle = open_private_dir(&folder)?;
        let ram_backed = sys::is_ram_backed(&handle).unwrap_or(false);
        remove_stale(&folder);
        Ok(Prepared {
            folder,
            ram_backed,
            session: OnceLock::new(),
            session_init: Mutex::new(()),
        })
    }

    fn session<'a>(&self, prepared: &'a Prepared) -> io::Result<&'a Path> {
        if let Some(s) = prepared.session.get() {
            return Ok(&s.path);
        }
        let _guard = prepared
            .session_init
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(s) = prepared.session.get() {
            return Ok(&s.path);
        }
        let session = new_session(&prepared.folder)?;
        Ok(&prepared.session.get_or_init(|| session).path)
    }
}

// SAFETY: every file is created with O_CREAT | O_EXCL under a fresh UUID v4 name in a folder
// that only this user can enter (checked 0700, owned, not a symlink), handed out once, and no
// handle is kept; the path given is the one just created.
unsafe impl SegmentCreator for DirCreator {
    fn create(&self, request: &SegmentRequest) -> io::Result<SegmentFile> {
        let prepared = self.prepared()?;
        let dir = if request.keeps_name {
            self.session(prepared)?
        } else {
            &prepared.folder
        };
        let path = dir.join(uuid::Uuid::new_v4().to_string());
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(sys::OPEN_FLAGS)
            .open(&path)
            .map_err(|e| with_path(e, "cannot create segment file", &path))?;
        Ok(SegmentFile::named(file, path))
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // Only reached when an allocator built with its own creator goes away, after its last
        // segment: the folder is empty then. A failure leaves an empty folder that the next
        // start removes, so it is ignored.
        if self.owner == std::process::id() {
            let _ = fs::remove_dir(&self.path);
        }
    }
}

fn with_path(err: io::Error, what: &str, path: &Path) -> io::Error {
    Context::wrap(err, format!("{what} {}", path.display()))
}

/// Opens a folder of ours without following a link, and checks that it is ours alone.
fn open_private_dir(path: &Path) -> io::Result<File> {
    let handle = OpenOptions::new()
        .read(true)
        .custom_flags(sys::OPEN_FLAGS | libc::O_DIRECTORY)
        .open(path)
        .map_err(|e| with_path(e, "cannot open segment folder (is it a symlink?)", path))?;
    let meta = handle.metadata()?;
    if meta.uid() != sys::effective_uid() {
        return Err(with_path(
            io::Error::new(io::ErrorKind::PermissionDenied, "owned by another user"),
            "refusing segment folder",
            path,
        ));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        return Err(with_path(
            io::Error::new(
                io::ErrorKind::PermissionDenied,
                "open to other users (want 0700)",
            ),
            "refusing segment folder",
            path,
        ));
    }
    Ok(handle)
}

/// Makes this process's session folder and locks it before anyone can see it as stale.
fn new_session(folder: &Path) -> io::Result<Session> {
    for _ in 0..8 {
        let path = folder.join(format!("session-{}", uuid::Uuid::new_v4()));
        DirBuilder::new()
            .mode(0o700)
            .create(&path)
            .map_err(|e| with_path(e, "cannot create session folder", &path))?;
        let lock = open_private_dir(&path)?;
        // A cleaner that took the lock first is removing this empty folder: start again.
        if !sys::try_lock_exclusive(&lock)? {
            continue;
        }
        // Still there, and still the folder we locked?
        match fs::symlink_metadata(&path) {
            Ok(m) if m.ino() == lock.metadata()?.ino() => {
                return Ok(Session {
                    path,
                    _lock: lock,
                    owner: std::process::id(),
                });
            }
            _ => continue,
        }
    }
    Err(io::Error::other(format!(
        "could not create a session folder in {}",
        folder.display()
    )))
}

/// Removes what dead processes left behind. Errors are ignored: this is tidying, and whatever
/// stays is tried again at the next start.
fn remove_stale(folder: &Path) {
    let Ok(entries) = fs::read_dir(folder) else {
        return;
    };
    let now = SystemTime::now();
    for entry in entries.flatten() {
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if meta.is_dir() && name.starts_with("session-") {
            // Holding the lock proves no live process owns the folder.
            let Ok(lock) = open_private_dir(&path) else {
                continue;
            };
            if sys::try_lock_exclusive(&lock).unwrap_or(false) {
                remove_segment_files(&path);
                let _ = fs::remove_dir(&path);
            }
        } else if meta.is_file() && uuid::Uuid::try_parse(&name).is_ok() {
            // A loose file is normally unlinked microseconds after creation; an old one was left
            // by a process killed in between.
            let old = meta
                .modified()
                .ok()
                .and_then(|m| now.duration_since(m).ok());
            if old.is_some_and(|age| age > STALE_AFTER) {
                let _ = fs::remove_file(&path);
            }
        }
    }
}

fn remove_segment_files(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        if is_file && uuid::Uuid::try_parse(&entry.file_name().to_string_lossy()).is_ok() {
            let _ = fs::remove_file(entry.path());
        }
    }
}
