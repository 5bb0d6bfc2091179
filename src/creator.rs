//! Where segment files come from: the [`SegmentCreator`] trait and the default [`DirCreator`].

use std::ffi::{OsStr, OsString};
use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::{Duration, SystemTime};

use crate::fork;
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
    pub(crate) name: Option<FileName>,
}

impl SegmentFile {
    /// A file that has a name. The allocator owns the name from now on: it removes it right
    /// after creation, or when the segment is freed (see [`SegmentRequest::keeps_name`]). A
    /// relative path is made absolute now, so a later change of the working directory does not
    /// change which file it names.
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
        let path = path.into();
        let path = std::path::absolute(&path).unwrap_or(path);
        SegmentFile {
            file,
            name: Some(FileName::Path(path)),
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
        SegmentFile { file, name: None }
    }

    /// Checks that the file is empty, as the creator promised, *before* anything is done to it
    /// (a creator's mistake must not cost the user a file), then removes its name if it has one.
    /// What is left is a file only the returned descriptor reaches.
    pub(crate) fn into_unnamed(self) -> io::Result<File> {
        self.check_empty()?;
        if let Some(name) = &self.name {
            name.remove()?;
        }
        Ok(self.file)
    }

    /// An error unless the file is empty.
    pub(crate) fn check_empty(&self) -> io::Result<()> {
        if self.file.metadata()?.len() != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the segment creator returned a file that is not empty",
            ));
        }
        Ok(())
    }
}

/// Where a named segment file is: a name inside a folder held open (the default creator), or
/// an absolute path (a creator of the user's).
#[derive(Debug)]
pub(crate) enum FileName {
    In { dir: Arc<HeldDir>, name: OsString },
    Path(PathBuf),
}

impl FileName {
    /// Opens the file for reading and writing, never through a link.
    pub(crate) fn open(&self) -> io::Result<File> {
        let opened = match self {
            FileName::In { dir, name } => sys::open_at(&dir.handle, name, None),
            FileName::Path(path) => OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(sys::OPEN_FLAGS)
                .open(path),
        };
        opened.map_err(|e| Context::wrap(e, format!("reopen {}", self.display().display())))
    }

    /// Device and inode of what the name points at now (a link is not followed).
    pub(crate) fn identity(&self) -> io::Result<(u64, u64)> {
        match self {
            FileName::In { dir, name } => sys::identity_at(&dir.handle, name),
            FileName::Path(path) => fs::symlink_metadata(path).map(|m| (m.dev(), m.ino())),
        }
    }

    /// Removes the name. `NotFound` counts as done: a clean-up took it, the file is still ours
    /// through its descriptor or mapping.
    pub(crate) fn remove(&self) -> io::Result<()> {
        let removed = match self {
            FileName::In { dir, name } => sys::remove_at(&dir.handle, name, false),
            FileName::Path(path) => fs::remove_file(path),
        };
        match removed {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// The path, for messages.
    pub(crate) fn display(&self) -> PathBuf {
        match self {
            FileName::In { dir, name } => dir.path.join(name),
            FileName::Path(path) => path.clone(),
        }
    }
}

/// A folder of the crate's, checked once and held open: files are created, reopened and
/// removed relative to the handle, so nothing is resolved again through a path that someone
/// could change (rename the folder, plant a link).
pub(crate) struct HeldDir {
    handle: File,
    /// For messages.
    path: PathBuf,
    /// For a session folder: its parent and name, and the generation that made it (and alone
    /// removes it when the last segment and the creator let go of it).
    session: Option<(Arc<HeldDir>, OsString, u64)>,
}

impl fmt::Debug for HeldDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("HeldDir").field(&self.path).finish()
    }
}

impl Drop for HeldDir {
    fn drop(&mut self) {
        // A session folder is empty once its last named segment is gone. A failure leaves an
        // empty folder that the next start removes (its lock is free), so it is ignored.
        if let Some((parent, name, generation)) = &self.session
            && *generation == fork::generation()
        {
            let _ = sys::remove_at(&parent.handle, name, true);
        }
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
/// v.extend(0..1_000_000); // small blocks share a chunk file, then a segment of its own
/// assert_eq!(v[999_999], 999_999);
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
/// * The base directory is made absolute when the creator is made, so changing the working
///   directory later changes nothing.
/// * The crate's folder must be a real directory (not a symlink), owned by the current user, and
///   closed to others (no group or other permission bits); anything else is refused. Once
///   checked it is held open, and files are created in it through that handle (`openat`), so a
///   rename of the folder or a link planted at its path cannot redirect them.
/// * Files are created with `O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC` and mode `0600`.
/// * If the folder is removed while the process runs (a `/tmp` cleaner), the next segment
///   prepares it again with the same checks: a symlink found at its path then is refused.
/// * A segment that keeps its file name ([`SegmentRequest::keeps_name`]) lives in a
///   per-process *session* folder inside the crate's folder. The process holds an exclusive
///   `flock` on that folder while it runs; on start the creator removes session folders whose
///   lock it can take (their process is gone) and loose segment files over a minute old. The
///   files of a live process are never touched. A child made by `fork` makes a session of its
///   own for its named segments and never removes its parent's.
/// * Base directories on tmpfs or ramfs (RAM-backed) are reported with a `log` warning; see
///   [`Builder::allow_ram_backed`](crate::Builder::allow_ram_backed) to refuse them instead.
///
/// The folder is prepared on first use; [`DirCreator::open`] prepares it at once.
pub struct DirCreator {
    base: PathBuf,
    /// Registered with the fork handlers for the creator's life (see `fork`): it is held while
    /// a folder or session is prepared, and a child forked then must not inherit it locked.
    state: Arc<StateLock>,
}

/// The creator's state behind its lock, at a fixed address for the fork handlers.
struct StateLock(Mutex<State>);

impl fork::ForkLocks for StateLock {
    fn lock_for_fork(&'static self, held: &mut Vec<Box<dyn std::any::Any>>, _epoch: u64) {
        held.push(Box::new(self.0.lock().unwrap_or_else(|e| e.into_inner())));
    }
}

impl Drop for DirCreator {
    fn drop(&mut self) {
        fork::unregister(&*self.state);
    }
}

/// The folder and session in use. Behind one lock, held briefly (and across the fork handlers,
/// see `fork`), except while a folder or session is being prepared.
#[derive(Default)]
struct State {
    folder: Option<Arc<Folder>>,
    /// Held by the named segments in it, not here: the folder goes when its last segment does
    /// (so a fork child that exits without running destructors leaves no empty folder, and
    /// neither does an allocator dropped while a freed segment waits for the release thread).
    session: Weak<HeldDir>,
}

struct Folder {
    dir: Arc<HeldDir>,
    ram_backed: bool,
}

impl fmt::Debug for DirCreator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DirCreator")
            .field("base", &self.base)
            .field("folder", &self.folder())
            .finish()
    }
}

impl DirCreator {
    /// A creator for `base` (made absolute now), prepared lazily at the first segment.
    ///
    /// ```
    /// let creator = mmapvec::DirCreator::new(std::env::temp_dir());
    /// assert!(creator.folder().starts_with(std::env::temp_dir()));
    /// ```
    pub fn new(base: impl Into<PathBuf>) -> Self {
        let base = base.into();
        DirCreator {
            base: std::path::absolute(&base).unwrap_or(base),
            state: {
                crate::install_fork_handlers();
                let state = Arc::new(StateLock(Mutex::new(State::default())));
                // SAFETY: the `Arc`'s contents stay at their address until the last clone goes,
                // and the creator holds one until its `Drop`, which unregisters first;
                // `lock_for_fork` takes only the state's own lock.
                unsafe { fork::register(&*state) };
                state
            },
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

    fn state(&self) -> MutexGuard<'_, State> {
        // Every change is a single assignment: a poisoned lock is still consistent.
        self.state.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The checked folder, prepared now if this is the first use or it was found removed.
    fn prepared(&self) -> io::Result<Arc<Folder>> {
        let mut state = self.state();
        if let Some(folder) = &state.folder {
            return Ok(folder.clone());
        }
        let folder = Arc::new(self.prepare()?);
        state.folder = Some(folder.clone());
        drop(state);
        // Logged outside the lock: a logger may allocate through this very creator.
        if folder.ram_backed {
            crate::logging::report!(
                warn,
                "mmapvec: {} is on a RAM-backed file system (tmpfs): segments there do not \
                 relieve memory; set TMPDIR or MmapAllocator::builder().dir(..) to a disk",
                folder.dir.path.display()
            );
        }
        Ok(folder)
    }

    fn prepare(&self) -> io::Result<Folder> {
        let base = &self.base;
        let meta = fs::metadata(base).map_err(|e| with_path(e, "segment directory", base))?;
        if !meta.is_dir() {
            return Err(with_path(
                io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
                "segment directory",
                base,
            ));
        }
        let path = self.folder();
        match DirBuilder::new().mode(0o700).create(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(with_path(e, "cannot create segment folder", &path)),
        }
        let handle = open_private_dir(&path)?;
        let ram_backed = sys::is_ram_backed(&handle).unwrap_or(false);
        remove_stale(&handle);
        Ok(Folder {
            dir: Arc::new(HeldDir {
                handle,
                path,
                session: None,
            }),
            ram_backed,
        })
    }

    /// This process's session folder (made now if needed: first named segment, a child of
    /// `fork`, or the previous one was removed).
    fn session(&self, folder: &Arc<Folder>) -> io::Result<Arc<HeldDir>> {
        let mut state = self.state();
        if let Some(session) = state.session.upgrade()
            && session
                .session
                .as_ref()
                .is_some_and(|s| s.2 == fork::generation())
        {
            return Ok(session);
        }
        let session = Arc::new(new_session(&folder.dir)?);
        state.session = Arc::downgrade(&session);
        Ok(session)
    }

    /// Forgets the session, and the folder too if it is gone, after a file could not be made
    /// in them: the next attempt prepares them again.
    fn forget_removed(&self, folder: &Arc<Folder>) {
        let mut state = self.state();
        state.session = Weak::new();
        let removed = sys::identity_at(&folder.dir.handle, OsStr::new("."))
            .ok()
            .zip(fs::symlink_metadata(&folder.dir.path).ok())
            .is_none_or(|(held, now)| held != (now.dev(), now.ino()));
        if removed
            && state
                .folder
                .as_ref()
                .is_some_and(|f| Arc::ptr_eq(f, folder))
        {
            state.folder = None;
        }
    }

    fn create_in(&self, folder: &Arc<Folder>, keeps_name: bool) -> io::Result<SegmentFile> {
        let dir = if keeps_name {
            self.session(folder)?
        } else {
            folder.dir.clone()
        };
        let name = OsString::from(uuid::Uuid::new_v4().to_string());
        let file = sys::open_at(&dir.handle, &name, Some(0o600))
            .map_err(|e| with_path(e, "cannot create segment file", &dir.path.join(&name)))?;
        Ok(SegmentFile {
            file,
            name: Some(FileName::In { dir, name }),
        })
    }
}

// SAFETY: every file is created with O_CREAT | O_EXCL under a fresh UUID v4 name in a folder
// that only this user can enter (checked 0700, owned, not a symlink, and held open so the check
// stays true), handed out once, and no handle is kept; the name given is the one just created.
unsafe impl SegmentCreator for DirCreator {
    fn create(&self, request: &SegmentRequest) -> io::Result<SegmentFile> {
        let folder = self.prepared()?;
        match self.create_in(&folder, request.keeps_name) {
            // The folder or the session was removed under us (a /tmp cleaner): prepare again,
            // with every check, once.
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.forget_removed(&folder);
                let folder = self.prepared()?;
                self.create_in(&folder, request.keeps_name)
            }
            other => other,
        }
    }
}

fn with_path(err: io::Error, what: &str, path: &Path) -> io::Error {
    Context::wrap(err, format!("{what} {}", path.display()))
}

/// Checks that an open folder is ours alone: owned by this user, no group or other bits.
fn check_private(handle: &File, path: &Path) -> io::Result<()> {
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
    Ok(())
}

/// Opens a folder of ours without following a link, and checks that it is ours alone.
fn open_private_dir(path: &Path) -> io::Result<File> {
    let handle = OpenOptions::new()
        .read(true)
        .custom_flags(sys::OPEN_FLAGS | libc::O_DIRECTORY)
        .open(path)
        .map_err(|e| with_path(e, "cannot open segment folder (is it a symlink?)", path))?;
    check_private(&handle, path)?;
    Ok(handle)
}

/// Makes this process's session folder inside `folder` and locks it before anyone can see it
/// as stale. A cleaner (another process starting) may remove the new, empty folder before we
/// lock it: then start again with another name.
fn new_session(folder: &Arc<HeldDir>) -> io::Result<HeldDir> {
    for _ in 0..8 {
        let name = OsString::from(format!("session-{}", uuid::Uuid::new_v4()));
        let path = folder.path.join(&name);
        sys::make_dir_at(&folder.handle, &name, 0o700)
            .map_err(|e| with_path(e, "cannot create session folder", &path))?;
        let handle = match sys::open_dir_at(&folder.handle, &name) {
            Ok(handle) => handle,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(with_path(e, "cannot open session folder", &path)),
        };
        check_private(&handle, &path)?;
        // A cleaner that took the lock first is removing this empty folder: start again.
        if !sys::try_lock_exclusive(&handle)? {
            continue;
        }
        // Still there, and still the folder we locked?
        let locked = handle.metadata()?;
        match sys::identity_at(&folder.handle, &name) {
            Ok(id) if id == (locked.dev(), locked.ino()) => {
                return Ok(HeldDir {
                    handle,
                    path,
                    session: Some((folder.clone(), name, fork::generation())),
                });
            }
            _ => continue,
        }
    }
    Err(io::Error::other(format!(
        "could not create a session folder in {}",
        folder.path.display()
    )))
}

/// Removes what dead processes left behind in the folder held open by `folder`. Everything is
/// done relative to that handle, never through the folder's path, so a link swapped in at the
/// path after the check cannot point the clean-up at another folder. Errors are ignored: this
/// is tidying, and whatever stays is tried again at the next start.
fn remove_stale(folder: &File) {
    let Ok(names) = sys::names_in(folder) else {
        return;
    };
    let now = SystemTime::now();
    for name in names {
        let Ok(entry) = sys::entry_at(folder, &name) else {
            continue;
        };
        let text = name.to_string_lossy();
        if entry.kind == sys::EntryKind::Dir && text.starts_with("session-") {
            // Holding the lock proves no live process owns the folder.
            let Ok(session) = sys::open_dir_at(folder, &name) else {
                continue;
            };
            if check_private(&session, Path::new(&name)).is_ok()
                && sys::try_lock_exclusive(&session).unwrap_or(false)
            {
                remove_segment_files(&session);
                let _ = sys::remove_at(folder, &name, true);
            }
        } else if entry.kind == sys::EntryKind::File && uuid::Uuid::try_parse(&text).is_ok() {
            // A loose file is normally unlinked microseconds after creation; an old one was left
            // by a process killed in between.
            let age = now.duration_since(entry.modified).ok();
            if age.is_some_and(|age| age > STALE_AFTER) {
                let _ = sys::remove_at(folder, &name, false);
            }
        }
    }
}

/// Removes the segment files of a dead process's session folder, held open by `dir`.
fn remove_segment_files(dir: &File) {
    let Ok(names) = sys::names_in(dir) else {
        return;
    };
    for name in names {
        let is_file = sys::entry_at(dir, &name).is_ok_and(|e| e.kind == sys::EntryKind::File);
        if is_file && uuid::Uuid::try_parse(&name.to_string_lossy()).is_ok() {
            let _ = sys::remove_at(dir, &name, false);
        }
    }
}
