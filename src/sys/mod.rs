//! The only module that talks to the operating system.
//!
//! Every function here is a thin, typed wrapper around one system call that reports failure as
//! an [`io::Error`]. The allocator logic above never calls `libc` directly. Linux-only calls are
//! gated item by item; the portable paths compile (and are tested) on Linux as well.

use std::ffi::{CString, OsStr};
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The size of a virtual memory page, asked once and then cached.
pub(crate) fn page_size() -> usize {
    static PAGE_SIZE: AtomicUsize = AtomicUsize::new(0);
    match PAGE_SIZE.load(Ordering::Relaxed) {
        0 => {
            // SAFETY: sysconf has no preconditions; it only reads a system value.
            let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
            // POSIX guarantees a positive page size; 4096 is a safe floor should it ever fail.
            let size = usize::try_from(size)
                .ok()
                .filter(|s| s.is_power_of_two())
                .unwrap_or(4096);
            PAGE_SIZE.store(size, Ordering::Relaxed);
            size
        }
        size => size,
    }
}

fn check_mapped(ret: *mut libc::c_void) -> io::Result<NonNull<u8>> {
    if ret == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        NonNull::new(ret.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null pointer"))
    }
}

fn check_zero(ret: libc::c_int) -> io::Result<()> {
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Maps `len` bytes of `file` from offset 0, shared and read/write, wherever the kernel likes.
pub(crate) fn map_file(file: &File, len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: without MAP_FIXED the kernel picks an unused range, so no existing mapping is
    // touched; the descriptor is valid for the duration of the call (borrowed `file`).
    let ret = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    check_mapped(ret)
}

/// Maps `len` bytes of `file` exactly at `addr`, replacing whatever was mapped there.
///
/// # Safety
/// `[addr, addr + len)` must be address space owned by the caller (typically a reservation made
/// by [`reserve`]) that nothing else refers to: `MAP_FIXED` silently replaces it.
pub(crate) unsafe fn map_file_fixed(addr: NonNull<u8>, file: &File, len: usize) -> io::Result<()> {
    // SAFETY: the caller's guarantee, passed on.
    unsafe { map_file_fixed_with(addr, file, len, true) }
}

/// As [`map_file_fixed`], read/write or read-only.
///
/// # Safety
/// As for [`map_file_fixed`].
pub(crate) unsafe fn map_file_fixed_with(
    addr: NonNull<u8>,
    file: &File,
    len: usize,
    writable: bool,
) -> io::Result<()> {
    let share = if writable { Share::Write } else { Share::Read };
    // SAFETY: the caller's guarantee, passed on.
    unsafe { map_file_fixed_at(addr, file, 0, len, share) }
}

/// How a file is mapped by [`map_file_fixed_at`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Share {
    /// `MAP_SHARED`, read/write: writes reach the file.
    Write,
    /// `MAP_SHARED`, read-only.
    Read,
    /// `MAP_PRIVATE`, read/write: the file's pages, copied on a write, which never reaches the
    /// file.
    Private,
}

/// Maps `len` bytes of `file` from `offset` exactly at `addr`, replacing whatever was mapped
/// there.
///
/// # Safety
/// As for [`map_file_fixed`].
pub(crate) unsafe fn map_file_fixed_at(
    addr: NonNull<u8>,
    file: &File,
    offset: u64,
    len: usize,
    share: Share,
) -> io::Result<()> {
    // SAFETY: the caller guarantees the target range is its own to replace.
    unsafe { map_file_with(Some(addr), file, offset, len, share) }.map(drop)
}

/// Maps `len` bytes of `file` from `offset` wherever the kernel likes (never over another
/// mapping), as `share` says.
///
/// # Safety
/// The file must have `len` bytes from `offset` for every page that will be touched.
pub(crate) unsafe fn map_file_anywhere(
    file: &File,
    offset: u64,
    len: usize,
    share: Share,
) -> io::Result<NonNull<u8>> {
    // SAFETY: placed by the kernel, the mapping replaces nothing; the rest is the caller's.
    unsafe { map_file_with(None, file, offset, len, share) }
}

/// `mmap` of `len` bytes of `file` from `offset`, at exactly `at` (`MAP_FIXED`) or anywhere.
///
/// # Safety
/// With `at`, the range must be the caller's to replace (`MAP_FIXED` unmaps what is there);
/// the file must have `len` bytes from `offset` for every page that will be touched.
unsafe fn map_file_with(
    at: Option<NonNull<u8>>,
    file: &File,
    offset: u64,
    len: usize,
    share: Share,
) -> io::Result<NonNull<u8>> {
    let (prot, flags) = match share {
        Share::Write => (libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED),
        Share::Read => (libc::PROT_READ, libc::MAP_SHARED),
        // Not charged to the commit limit up front: its pages are the file's until written, and
        // a store's private views can be larger than memory (what is written is bounded by the
        // store's commits, see `store::commit`).
        Share::Private => (
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        ),
    };
    let (addr, fixed) = match at {
        Some(at) => (at.as_ptr().cast(), libc::MAP_FIXED),
        None => (std::ptr::null_mut(), 0),
    };
    let offset =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
    // SAFETY: the caller's guarantees, above, cover what MAP_FIXED replaces.
    let ret = unsafe { libc::mmap(addr, len, prot, flags | fixed, file.as_raw_fd(), offset) };
    check_mapped(ret)
}

/// Reserves `len` bytes of address space: inaccessible, backed by nothing, counted by nothing.
pub(crate) fn reserve(len: usize) -> io::Result<NonNull<u8>> {
    // SAFETY: an anonymous PROT_NONE mapping without MAP_FIXED touches no existing mapping.
    let ret = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    check_mapped(ret)
}

/// Replaces `[addr, addr + len)` with an inaccessible reservation (see [`reserve`]).
///
/// # Safety
/// The range must be the caller's to replace: `MAP_FIXED` silently unmaps what is there.
pub(crate) unsafe fn reserve_fixed(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the range; an anonymous PROT_NONE mapping holds no data.
    let ret = unsafe {
        libc::mmap(
            addr.as_ptr().cast(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    check_mapped(ret).map(drop)
}

/// Makes `[addr, addr + len)` accessible (read/write, or read-only) or not.
///
/// # Safety
/// The range must be the caller's mapping; making it inaccessible invalidates references into
/// it.
pub(crate) unsafe fn protect(addr: NonNull<u8>, len: usize, writable: bool) -> io::Result<()> {
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    // SAFETY: the caller owns the range; mprotect changes only its access rights.
    check_zero(unsafe { libc::mprotect(addr.as_ptr().cast(), len, prot) })
}

/// Makes `[addr, addr + len)` inaccessible (`PROT_NONE`), as a reservation is.
///
/// # Safety
/// The range must be the caller's mapping, and unused from now on.
pub(crate) unsafe fn make_inaccessible(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the range and gives up access to it.
    check_zero(unsafe { libc::mprotect(addr.as_ptr().cast(), len, libc::PROT_NONE) })
}

/// Reserves exactly `[addr, addr + len)` if all of it is unmapped, and touches nothing
/// otherwise: the address is only a hint (no `MAP_FIXED`), and a mapping placed elsewhere is
/// undone. `Err` (`AlreadyExists`) when something is mapped in the range.
pub(crate) fn reserve_at(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: without MAP_FIXED the kernel never replaces an existing mapping; the hint only
    // says where to put the new one.
    let ret = unsafe {
        libc::mmap(
            addr.as_ptr().cast(),
            len,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    let got = check_mapped(ret)?;
    if got == addr {
        return Ok(());
    }
    // SAFETY: `got` is the reservation just made, which nothing refers to.
    unsafe { unmap(got, len) }?;
    Err(io::Error::from(io::ErrorKind::AlreadyExists))
}

/// Whether a write fault on a shared mapping of `file` gives the page its disk block or fails
/// (so that [`back_pages`] reserves, as `fallocate` does): the file systems whose
/// `page_mkwrite` allocates or reserves (ext2/3/4, XFS, btrfs, f2fs, tmpfs, and overlayfs,
/// which maps the file of the one below). Elsewhere (NFS, FUSE, ...) a full disk may only show
/// at writeback.
#[cfg(target_os = "linux")]
pub(crate) fn faults_reserve_blocks(file: &File) -> bool {
    const EXT4: u32 = 0xEF53;
    const XFS: u32 = 0x5846_5342;
    const BTRFS: u32 = 0x9123_683E;
    const F2FS: u32 = 0xF2F5_2010;
    const TMPFS: u32 = 0x0102_1994;
    const OVERLAYFS: u32 = 0x794C_7630;
    fs_magic(file).is_ok_and(|kind| [EXT4, XFS, BTRFS, F2FS, TMPFS, OVERLAYFS].contains(&kind))
}

/// Elsewhere [`back_pages`] is not used.
#[cfg(not(target_os = "linux"))]
pub(crate) fn faults_reserve_blocks(_file: &File) -> bool {
    false
}

/// Registers handlers run around every `fork` of this process (`pthread_atfork`).
pub(crate) fn at_fork(
    prepare: extern "C" fn(),
    parent: extern "C" fn(),
    child: extern "C" fn(),
) -> io::Result<()> {
    // SAFETY: the handlers are plain functions that live for the whole program.
    match unsafe { libc::pthread_atfork(Some(prepare), Some(parent), Some(child)) } {
        0 => Ok(()),
        errno => Err(io::Error::from_raw_os_error(errno)),
    }
}

/// Unmaps `[addr, addr + len)`.
///
/// # Safety
/// The range must be mapped by the caller and no reference into it may be used afterwards.
pub(crate) unsafe fn unmap(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the range and gives it up.
    check_zero(unsafe { libc::munmap(addr.as_ptr().cast(), len) })
}

/// Where [`remap`] may put the mapping.
#[cfg(target_os = "linux")]
#[derive(Clone, Copy, Debug)]
pub(crate) enum RemapTo {
    /// Resize in place or fail.
    InPlace,
    /// Resize in place if possible, else anywhere.
    Anywhere,
    /// Move to exactly this address (a reservation of the caller's of the new length).
    Fixed(NonNull<u8>),
}

/// Resizes the mapping at `addr` from `old_len` to `new_len` with `mremap`: page-table entries
/// move, no byte is copied. On failure the old mapping is untouched; with [`RemapTo::Fixed`]
/// the target range may or may not still be mapped (kernels differ), so the caller must not
/// assume it owns it any more.
///
/// # Safety
/// `[addr, addr + old_len)` must be one mapping owned by the caller. If it moves, the old
/// addresses become invalid. With [`RemapTo::Fixed`] the target range (`new_len` bytes) must be
/// owned by the caller too: it is replaced.
#[cfg(target_os = "linux")]
pub(crate) unsafe fn remap(
    addr: NonNull<u8>,
    old_len: usize,
    new_len: usize,
    to: RemapTo,
) -> io::Result<NonNull<u8>> {
    // SAFETY: the caller owns the source (and for Fixed, the target) range; mremap either
    // succeeds as a whole or leaves the old mapping as it was.
    let ret = unsafe {
        match to {
            RemapTo::InPlace => libc::mremap(addr.as_ptr().cast(), old_len, new_len, 0),
            RemapTo::Anywhere => {
                libc::mremap(addr.as_ptr().cast(), old_len, new_len, libc::MREMAP_MAYMOVE)
            }
            RemapTo::Fixed(target) => libc::mremap(
                addr.as_ptr().cast(),
                old_len,
                new_len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                target.as_ptr().cast::<libc::c_void>(),
            ),
        }
    };
    check_mapped(ret)
}

/// A hint or property set on a mapped range with `madvise`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Advice {
    Sequential,
    Random,
    WillNeed,
    #[cfg(target_os = "linux")]
    HugePage,
    #[cfg(target_os = "linux")]
    DontFork,
    #[cfg(target_os = "linux")]
    PopulateWrite,
}

/// Applies `advice` to `[addr, addr + len)`.
///
/// # Safety
/// The range must be mapped by the caller. None of the advice used here changes the contents of
/// a shared file mapping.
pub(crate) unsafe fn advise(addr: NonNull<u8>, len: usize, advice: Advice) -> io::Result<()> {
    let advice = match advice {
        Advice::Sequential => libc::MADV_SEQUENTIAL,
        Advice::Random => libc::MADV_RANDOM,
        Advice::WillNeed => libc::MADV_WILLNEED,
        #[cfg(target_os = "linux")]
        Advice::HugePage => libc::MADV_HUGEPAGE,
        #[cfg(target_os = "linux")]
        Advice::DontFork => libc::MADV_DONTFORK,
        #[cfg(target_os = "linux")]
        Advice::PopulateWrite => libc::MADV_POPULATE_WRITE,
    };
    // SAFETY: the caller owns the range; the advice values above never discard file data.
    check_zero(unsafe { libc::madvise(addr.as_ptr().cast(), len, advice) })
}

/// Faults in `[addr, addr + len)` of a shared file mapping for writing
/// (`MADV_POPULATE_WRITE`), which makes the file system back each page now: a full disk is an
/// `ENOSPC` error here rather than a `SIGBUS` when the page is first written. The pages' contents
/// are left as they are (a hole reads as zeros).
///
/// # Safety
/// The range must be the caller's read/write mapping.
#[cfg(target_os = "linux")]
pub(crate) unsafe fn back_pages(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    loop {
        // SAFETY: the caller owns the mapping; populating writes no byte.
        let ret = unsafe { libc::madvise(addr.as_ptr().cast(), len, libc::MADV_POPULATE_WRITE) };
        match check_zero(ret) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // The kernel reports a fault that would have raised SIGBUS (the file system found
            // no block for a page: a full disk or quota) as EFAULT.
            Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                return Err(io::Error::from_raw_os_error(libc::ENOSPC));
            }
            other => return other,
        }
    }
}

/// Whether [`back_pages`] works on this kernel (Linux 5.14 and later), probed once on a page
/// of anonymous memory.
#[cfg(target_os = "linux")]
pub(crate) fn can_back_pages() -> bool {
    static CAN: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *CAN.get_or_init(|| {
        let len = page_size();
        // SAFETY: a fresh private anonymous mapping, placed by the kernel, unmapped below.
        let ret = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        let Ok(page) = check_mapped(ret) else {
            return false;
        };
        // SAFETY: the page was just mapped read/write by us.
        let ret = unsafe { libc::madvise(page.as_ptr().cast(), len, libc::MADV_POPULATE_WRITE) };
        // SAFETY: our page, unused from here on.
        let _ = unsafe { unmap(page, len) };
        ret == 0
    })
}

/// Elsewhere pages are backed by reserving whole files up front ([`allocate_blocks`]).
#[cfg(not(target_os = "linux"))]
pub(crate) fn can_back_pages() -> bool {
    false
}

/// Elsewhere: never called ([`can_back_pages`] is false).
///
/// # Safety
/// As on Linux.
#[cfg(not(target_os = "linux"))]
pub(crate) unsafe fn back_pages(_addr: NonNull<u8>, _len: usize) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

/// Gives back the file blocks (and page-cache pages) under `[addr, addr + len)` of a shared
/// file mapping (`MADV_REMOVE`, a hole punched through the mapping): the range reads as zeros
/// after, and the file keeps its length.
///
/// # Safety
/// The range must be the caller's read/write shared file mapping, and its contents must be
/// unused: they are gone, for every process that maps the same file.
#[cfg(target_os = "linux")]
pub(crate) unsafe fn discard_pages(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the mapping and gives up its contents.
    check_zero(unsafe { libc::madvise(addr.as_ptr().cast(), len, libc::MADV_REMOVE) })
}

/// Elsewhere nothing is given back until the whole file goes.
///
/// # Safety
/// As on Linux.
#[cfg(not(target_os = "linux"))]
pub(crate) unsafe fn discard_pages(_addr: NonNull<u8>, _len: usize) -> io::Result<()> {
    Err(io::ErrorKind::Unsupported.into())
}

/// Drops the private copies of `[addr, addr + len)`, a run of private file views and
/// reservations (`MADV_DONTNEED`): its pages are the files' again, read from them at the next
/// touch.
///
/// # Safety
/// The range must be the caller's mappings, and what was written to them (their private
/// copies) is given up: the caller has written it to the files, and nothing may write to
/// the range meanwhile (a write would be lost).
#[cfg(target_os = "linux")]
pub(crate) unsafe fn drop_private_copies(addr: NonNull<u8>, len: usize) -> io::Result<()> {
    // SAFETY: the caller owns the mappings and gives up their private copies.
    check_zero(unsafe { libc::madvise(addr.as_ptr().cast(), len, libc::MADV_DONTNEED) })
}

/// Which written pages [`written_pages`] reports.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Scan<'a> {
    /// Those written since the last scan that protected them: `tracker` tracks writes
    /// (userfaultfd, asynchronous write-protect) on every private view of the range, and the
    /// pages reported are protected again (a later write marks them again).
    Since(&'a WriteTracker),
    /// Every page copied since it was mapped; protected again if `Some` tracker (so that the
    /// next `Since` scan starts from here).
    All(Option<&'a WriteTracker>),
}

/// The ranges of `[start, start + len)` (a run of private file mappings and reservations)
/// whose pages were written, as `scan` says: pages that are no longer the file's (private
/// copies), in address order, neighbours merged. A page the kernel cannot tell about is
/// included: an extra page costs a write, a missing one would lose it.
///
/// The `PAGEMAP_SCAN` ioctl (Linux 6.7) walks the page tables once; where it is missing, the
/// entries of `/proc/self/pagemap` are read (bit 61 clear: not a file page), which can tell
/// only `Scan::All`.
#[cfg(target_os = "linux")]
pub(crate) fn written_pages(
    start: usize,
    len: usize,
    scan: Scan<'_>,
) -> io::Result<Vec<(usize, usize)>> {
    use std::sync::atomic::AtomicBool;
    static NO_SCAN: AtomicBool = AtomicBool::new(false);
    let mode = match scan {
        Scan::Since(tracker) if tracker.tracks() => ScanMode::Since,
        Scan::All(Some(tracker)) if tracker.tracks() => ScanMode::AllProtect,
        _ => ScanMode::All,
    };
    let pagemap = std::fs::File::open("/proc/self/pagemap")?;
    if !NO_SCAN.load(Ordering::Relaxed) {
        match pagemap_scan(&pagemap, start, len, mode) {
            Err(e) if matches!(e.raw_os_error(), Some(libc::ENOTTY | libc::EINVAL)) => {
                NO_SCAN.store(true, Ordering::Relaxed);
            }
            other => return other,
        }
    }
    pagemap_read(&pagemap, start, len)
}

/// Tracks the writes to private file views (userfaultfd in asynchronous write-protect mode,
/// Linux 6.7): a write to a protected page unprotects it, and `PAGEMAP_SCAN` reports it as
/// written. Nothing is delivered to this process; no thread waits.
#[derive(Debug)]
pub(crate) struct WriteTracker {
    uffd: Option<File>,
    /// Every view given to [`track`](Self::track) is tracked: a failed registration makes
    /// every later scan report every private copy ([`Scan::All`]), which is never less.
    ok: std::sync::atomic::AtomicBool,
}

#[cfg(target_os = "linux")]
impl WriteTracker {
    /// A tracker, if the kernel has one to give (`None` on older kernels, or where
    /// userfaultfd is refused).
    pub(crate) fn new() -> Option<WriteTracker> {
        const UFFD_USER_MODE_ONLY: libc::c_int = 1;
        const UFFD_API: u64 = 0xaa;
        const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
        // _IOWR(0xAA, 0x3F, struct uffdio_api)
        const UFFDIO_API: u64 = 0xc018_aa3f;
        // SAFETY: no pointer argument; the result is a descriptor or -1.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_userfaultfd,
                libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY,
            )
        };
        if fd < 0 {
            return None;
        }
        // SAFETY: a descriptor just returned to us, owned by the `File` from here.
        let uffd = unsafe { File::from_raw_fd(fd as libc::c_int) };
        let mut api = [UFFD_API, UFFD_FEATURE_WP_ASYNC, 0u64];
        // SAFETY: `api` is a valid `struct uffdio_api`, written by the kernel.
        let ret = unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_API as _, api.as_mut_ptr()) };
        (ret == 0 && api[1] & UFFD_FEATURE_WP_ASYNC != 0).then(|| WriteTracker {
            uffd: Some(uffd),
            ok: std::sync::atomic::AtomicBool::new(true),
        })
    }

    /// Tracks the writes to `[addr, addr + len)`, a private file view just mapped (a new
    /// mapping is not tracked until it is given here).
    ///
    /// # Safety
    /// The range must be the caller's mapping.
    pub(crate) unsafe fn track(&self, addr: NonNull<u8>, len: usize) {
        // _IOWR(0xAA, 0x00, struct uffdio_register)
        const UFFDIO_REGISTER: u64 = 0xc020_aa00;
        const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
        let Some(uffd) = &self.uffd else { return };
        let mut register = [
            addr.as_ptr().addr() as u64,
            len as u64,
            UFFDIO_REGISTER_MODE_WP,
            0,
        ];
        // SAFETY: `register` is a valid `struct uffdio_register`; the range is the caller's
        // mapping, and registering it changes no content.
        let ret = unsafe {
            libc::ioctl(
                uffd.as_raw_fd(),
                UFFDIO_REGISTER as _,
                register.as_mut_ptr(),
            )
        };
        if ret != 0 {
            self.ok.store(false, Ordering::Relaxed);
            return;
        }
        // Every page protected now, unpopulated ones too (a marker in their page-table entry,
        // which a read fault keeps): a page read later is not taken for a written one, so a
        // scan need not ask which pages are the file's (a lookup per page).
        // _IOWR(0xAA, 0x06, struct uffdio_writeprotect)
        const UFFDIO_WRITEPROTECT: u64 = 0xc018_aa06;
        const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;
        let mut protect = [
            addr.as_ptr().addr() as u64,
            len as u64,
            UFFDIO_WRITEPROTECT_MODE_WP,
        ];
        // SAFETY: `protect` is a valid `struct uffdio_writeprotect`; the range was just
        // registered; write-protecting (asynchronous mode) changes no content.
        let ret = unsafe {
            libc::ioctl(
                uffd.as_raw_fd(),
                UFFDIO_WRITEPROTECT as _,
                protect.as_mut_ptr(),
            )
        };
        if ret != 0 {
            self.ok.store(false, Ordering::Relaxed);
        }
    }

    /// Marks `[addr, addr + len)` written (unprotected): the next scan reports it.
    ///
    /// # Safety
    /// The range must be the caller's mapping.
    pub(crate) unsafe fn mark_written(&self, addr: NonNull<u8>, len: usize) -> io::Result<()> {
        const UFFDIO_WRITEPROTECT: u64 = 0xc018_aa06;
        let Some(uffd) = &self.uffd else {
            return Ok(());
        };
        let mut unprotect = [addr.as_ptr().addr() as u64, len as u64, 0];
        // SAFETY: `unprotect` is a valid `struct uffdio_writeprotect`; the range is the
        // caller's mapping; unprotecting changes no content.
        let ret = unsafe {
            libc::ioctl(
                uffd.as_raw_fd(),
                UFFDIO_WRITEPROTECT as _,
                unprotect.as_mut_ptr(),
            )
        };
        check_zero(ret)
    }

    fn tracks(&self) -> bool {
        self.uffd.is_some() && self.ok.load(Ordering::Relaxed)
    }
}

/// What `PAGEMAP_SCAN` is asked for (see [`Scan`]).
#[cfg(target_os = "linux")]
#[derive(Clone, Copy, PartialEq, Eq)]
enum ScanMode {
    /// Written since protected, and protected again.
    Since,
    /// Every private copy, protected again.
    AllProtect,
    /// Every private copy.
    All,
}

/// One region of `PAGEMAP_SCAN`'s answer.
#[cfg(target_os = "linux")]
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg` of `linux/fs.h`.
#[cfg(target_os = "linux")]
#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[cfg(target_os = "linux")]
fn pagemap_scan(
    pagemap: &File,
    start: usize,
    len: usize,
    mode: ScanMode,
) -> io::Result<Vec<(usize, usize)>> {
    const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
    const PAGE_IS_WRITTEN: u64 = 1 << 1;
    const PAGE_IS_FILE: u64 = 1 << 2;
    const PAGE_IS_PRESENT: u64 = 1 << 3;
    const PAGE_IS_SWAPPED: u64 = 1 << 4;
    // _IOWR('f', 16, struct pm_scan_arg)
    const PAGEMAP_SCAN: u64 =
        (3 << 30) | ((size_of::<PmScanArg>() as u64) << 16) | (0x66 << 8) | 16;
    let mut found: Vec<(usize, usize)> = Vec::new();
    let mut regions = vec![PageRegion::default(); 512];
    let end = start + len;
    let mut from = start;
    while from < end {
        let mut arg = PmScanArg {
            size: size_of::<PmScanArg>() as u64,
            flags: 0,
            start: from as u64,
            end: end as u64,
            walk_end: 0,
            vec: regions.as_mut_ptr() as u64,
            vec_len: regions.len() as u64,
            max_pages: 0,
            // `Since`: written (unprotected) since the last scan: every page of a tracked view
            // was protected when it was mapped, so a page read since is not written. Else
            // every page that is not the file's (a lookup per page).
            category_inverted: match mode {
                ScanMode::Since => 0,
                _ => PAGE_IS_FILE,
            },
            category_mask: match mode {
                ScanMode::Since => PAGE_IS_WRITTEN,
                _ => PAGE_IS_FILE,
            },
            // Present or swapped: an unpopulated range counts as "written" (nothing protects
            // it), but holds nothing that is not the file's.
            category_anyof_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
            return_mask: PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_WRITTEN,
        };
        if mode != ScanMode::All {
            // The pages reported are protected again: tracked from here.
            arg.flags = PM_SCAN_WP_MATCHING;
        }
        // SAFETY: `arg` is a valid `pm_scan_arg` whose `vec` points at `regions`, writable for
        // `vec_len` entries; the ioctl reads page tables only.
        let n = unsafe { libc::ioctl(pagemap.as_raw_fd(), PAGEMAP_SCAN as _, &mut arg) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        for region in &regions[..n as usize] {
            let (s, e) = (region.start as usize, region.end as usize);
            match found.last_mut() {
                Some(last) if last.0 + last.1 == s => last.1 += e - s,
                _ => found.push((s, e - s)),
            }
        }
        let walked = arg.walk_end as usize;
        if walked <= from {
            break;
        }
        from = walked;
    }
    Ok(found)
}

#[cfg(target_os = "linux")]
fn pagemap_read(pagemap: &File, start: usize, len: usize) -> io::Result<Vec<(usize, usize)>> {
    use std::os::unix::fs::FileExt;
    const PRESENT: u64 = 1 << 63;
    const SWAPPED: u64 = 1 << 62;
    const FILE_OR_SHARED: u64 = 1 << 61;
    let page = page_size();
    let mut found: Vec<(usize, usize)> = Vec::new();
    let mut entries = vec![0u8; 8 * 4096];
    let mut at = start;
    let end = start + len;
    while at < end {
        let pages = ((end - at) / page).min(4096);
        let bytes = &mut entries[..pages * 8];
        pagemap.read_exact_at(bytes, (at / page * 8) as u64)?;
        for (i, entry) in bytes.chunks_exact(8).enumerate() {
            let entry = u64::from_ne_bytes(entry.try_into().expect("8 bytes"));
            if entry & (PRESENT | SWAPPED) != 0 && entry & FILE_OR_SHARED == 0 {
                let addr = at + i * page;
                match found.last_mut() {
                    Some(last) if last.0 + last.1 == addr => last.1 += page,
                    _ => found.push((addr, page)),
                }
            }
        }
        at += pages * page;
    }
    Ok(found)
}

/// Writes `bytes` at `offset` of `file`, through the fault seam ([`io_point`]; the tests'
/// power loss undoes it unless a [`sync_data`] of the file follows).
pub(crate) fn write_at(file: &File, bytes: &[u8], offset: u64, op: &'static str) -> io::Result<()> {
    io_point(op)?;
    #[cfg(test)]
    faults::journal(file, offset, bytes.len() as u64);
    std::os::unix::fs::FileExt::write_all_at(file, bytes, offset)
}

/// Sets `file`'s length, through the fault seam (as [`write_at`]).
pub(crate) fn set_len(file: &File, len: u64, op: &'static str) -> io::Result<()> {
    io_point(op)?;
    #[cfg(test)]
    faults::journal(file, len, u64::MAX);
    file.set_len(len)
}

/// Writes the `len` bytes at `data` to `file` at `offset` (`pwrite`: the kernel reads the
/// memory, this process does not).
///
/// # Safety
/// `[data, data + len)` must be mapped readable for the whole call.
pub(crate) unsafe fn write_from(
    file: &File,
    data: *const u8,
    len: usize,
    offset: u64,
) -> io::Result<()> {
    #[cfg(test)]
    faults::journal(file, offset, len as u64);
    let mut done = 0;
    while done < len {
        let at = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| io::Error::from_raw_os_error(libc::EOVERFLOW))?;
        // SAFETY: the caller says the range is mapped and readable; the kernel reads it.
        let n = unsafe {
            libc::pwrite(
                file.as_raw_fd(),
                data.add(done).cast(),
                (len - done).min(1 << 30),
                at,
            )
        };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(io::ErrorKind::WriteZero.into()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Copies `len` bytes of `from` at `from_at` to `to` at `to_at`, in the kernel
/// (`copy_file_range`; through a buffer where it is refused). The tests' power loss undoes it
/// unless a [`sync_data`] of `to` follows.
pub(crate) fn copy_between(
    from: &File,
    mut from_at: u64,
    to: &File,
    mut to_at: u64,
    mut len: u64,
) -> io::Result<()> {
    #[cfg(test)]
    faults::journal(to, to_at, len);
    #[cfg(target_os = "linux")]
    while len > 0 {
        let (mut f, mut t) = (from_at as libc::loff_t, to_at as libc::loff_t);
        // SAFETY: both descriptors are open; the offsets are ours, updated by the kernel.
        let n = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut f,
                to.as_raw_fd(),
                &mut t,
                len.min(1 << 30) as usize,
                0,
            )
        };
        match n {
            n if n > 0 => {
                from_at += n as u64;
                to_at += n as u64;
                len -= n as u64;
            }
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => {}
                    Some(libc::EXDEV | libc::ENOSYS | libc::EINVAL | libc::EOPNOTSUPP) => break,
                    _ => return Err(e),
                }
            }
        }
    }
    use std::os::unix::fs::FileExt;
    let mut buffer = vec![0u8; len.min(1 << 20) as usize];
    while len > 0 {
        let n = len.min(buffer.len() as u64) as usize;
        from.read_exact_at(&mut buffer[..n], from_at)?;
        to.write_all_at(&buffer[..n], to_at)?;
        from_at += n as u64;
        to_at += n as u64;
        len -= n as u64;
    }
    Ok(())
}

/// Syncs `file`'s data, through the fault seam ([`io_point`]): what was written to it is on
/// disk (the tests' power loss keeps it).
pub(crate) fn sync_data(file: &File, op: &'static str) -> io::Result<()> {
    io_point(op)?;
    file.sync_data()?;
    #[cfg(test)]
    faults::synced(file);
    Ok(())
}

/// A seam for the store's fault tests: every write, sync, rename, removal, truncation and
/// folder made by the store's durable paths (flush, close, snapshot, recover, the small
/// blocks' save) passes through here first, and a test can make the Nth of them, or every one
/// from the Nth on, fail (`faults::arm`), on its own thread. Compiled to nothing outside the
/// crate's tests.
#[inline]
pub(crate) fn io_point(op: &'static str) -> io::Result<()> {
    #[cfg(test)]
    return faults::point(op);
    #[cfg(not(test))]
    {
        let _ = op;
        Ok(())
    }
}

/// The plan of [`io_point`]'s failures, per thread (the crate's tests only).
#[cfg(test)]
pub(crate) mod faults {
    use std::cell::Cell;
    use std::fs::File;
    use std::io;

    thread_local! {
        /// Points passed since `arm`; the first to fail; whether every later one fails too.
        static PLAN: Cell<(u64, Option<u64>, bool)> = const { Cell::new((0, None, false)) };
        /// The first point that failed.
        static FIRST: Cell<Option<&'static str>> = const { Cell::new(None) };
    }

    /// Counts from zero again; the point numbered `fail_at` fails (and, with `sticky`, every
    /// later one).
    pub(crate) fn arm(fail_at: Option<u64>, sticky: bool) {
        PLAN.set((0, fail_at, sticky));
        FIRST.set(None);
        POWER.with_borrow_mut(|p| *p = None);
    }

    /// No more failures; the count goes on.
    pub(crate) fn disarm() {
        let (n, _, _) = PLAN.get();
        PLAN.set((n, None, false));
    }

    /// The name of the first point that failed since `arm`.
    pub(crate) fn first_failure() -> Option<&'static str> {
        FIRST.get()
    }

    /// The points passed since `arm`.
    pub(crate) fn count() -> u64 {
        PLAN.get().0
    }

    /// What a write changed, to undo at a power loss: the file, and its bytes and length
    /// before the write.
    struct Undo {
        file: File,
        offset: u64,
        bytes: Vec<u8>,
        len: u64,
    }

    /// A planned power loss: the point it strikes at, the names of the points passed, the
    /// writes not yet synced, and (for a loss that keeps some of them) a seed.
    type Power = Option<(u64, Vec<&'static str>, Vec<Undo>, Option<u64>)>;

    thread_local! {
        static POWER: std::cell::RefCell<Power> = const { std::cell::RefCell::new(None) };
    }

    /// Plans a power loss at point `at` (counted from now, as `arm` counts): every write made
    /// through the seam and not synced since is undone, then the process ends at once
    /// (`_exit(0)`). With `None`, the points passed are only recorded ([`trace`]).
    pub(crate) fn power_loss_at(at: Option<u64>) {
        PLAN.set((0, None, false));
        POWER.with_borrow_mut(|p| {
            *p = Some((at.unwrap_or(u64::MAX), Vec::new(), Vec::new(), None));
        });
    }

    /// As [`power_loss_at`], but the disk had written some of the writes not yet synced (a
    /// pseudo-random half of them, chosen by `seed`): a commit torn in any way.
    pub(crate) fn torn_power_loss_at(at: u64, seed: u64) {
        PLAN.set((0, None, false));
        POWER.with_borrow_mut(|p| *p = Some((at, Vec::new(), Vec::new(), Some(seed | 1))));
    }

    /// The names of the points passed since `power_loss_at`.
    pub(crate) fn trace() -> Vec<&'static str> {
        POWER.with_borrow(|p| p.as_ref().map(|p| p.1.clone()).unwrap_or_default())
    }

    /// Records what `file` holds at `[offset, offset + len)` (`len` `u64::MAX`: a new length
    /// `offset`), before a write there.
    pub(crate) fn journal(file: &File, offset: u64, len: u64) {
        use std::os::unix::fs::FileExt;
        POWER.with_borrow_mut(|p| {
            let Some((_, _, undo, _)) = p.as_mut() else {
                return;
            };
            let old_len = file.metadata().map(|m| m.len()).unwrap_or(0);
            let from = offset.min(old_len);
            let to = match len {
                u64::MAX => old_len,
                len => offset.saturating_add(len).min(old_len),
            };
            let mut bytes = vec![0u8; (to - from) as usize];
            let _ = file.read_exact_at(&mut bytes, from);
            undo.push(Undo {
                file: file.try_clone().expect("a descriptor for the journal"),
                offset: from,
                bytes,
                len: old_len,
            });
        });
    }

    /// `file` was synced: its writes so far survive a power loss.
    pub(crate) fn synced(file: &File) {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = file.metadata() else {
            return;
        };
        POWER.with_borrow_mut(|p| {
            let Some((_, _, undo, _)) = p.as_mut() else {
                return;
            };
            undo.retain(|u| {
                u.file
                    .metadata()
                    .is_ok_and(|m| (m.dev(), m.ino()) != (meta.dev(), meta.ino()))
            });
        });
    }

    /// The power loss: every write not synced undone (or, with a seed, about half of them),
    /// newest first; then the end.
    fn lose_power(undo: Vec<Undo>, mut seed: Option<u64>) -> ! {
        use std::os::unix::fs::FileExt;
        for u in undo.into_iter().rev() {
            if let Some(x) = seed.as_mut() {
                *x ^= *x << 13;
                *x ^= *x >> 7;
                *x ^= *x << 17;
                if *x & 1 == 0 {
                    continue; // this write reached the disk
                }
            }
            let _ = u.file.set_len(u.len);
            let _ = u.file.write_all_at(&u.bytes, u.offset);
        }
        // SAFETY: ends the process at once, as a power loss would.
        unsafe { libc::_exit(0) }
    }

    pub(super) fn point(op: &'static str) -> io::Result<()> {
        let (n, fail_at, sticky) = PLAN.get();
        PLAN.set((n + 1, fail_at, sticky));
        let strike = POWER.with_borrow_mut(|p| {
            let (at, trace, undo, seed) = p.as_mut()?;
            trace.push(op);
            (n == *at).then(|| (std::mem::take(undo), *seed))
        });
        if let Some((undo, seed)) = strike {
            lose_power(undo, seed);
        }
        let fails = match fail_at {
            Some(at) => n == at || (sticky && n > at),
            None => false,
        };
        if !fails {
            return Ok(());
        }
        if FIRST.get().is_none() {
            FIRST.set(Some(op));
        }
        Err(io::Error::other(format!("injected failure: {op}")))
    }
}

/// Gives the file blocks for `[offset, offset + len)`, growing it if needed, so that a full disk
/// is an `ENOSPC` now rather than a `SIGBUS` when the page is first written.
#[cfg(target_os = "linux")]
pub(crate) fn allocate_blocks(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let too_big = || io::Error::from_raw_os_error(libc::EFBIG);
    let offset = libc::off_t::try_from(offset).map_err(|_| too_big())?;
    let len = libc::off_t::try_from(len).map_err(|_| too_big())?;
    loop {
        // SAFETY: fallocate only acts on the valid descriptor borrowed from `file`.
        match check_zero(unsafe { libc::fallocate(file.as_raw_fd(), 0, offset, len) }) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Gives the file blocks for `[offset, offset + len)` without changing its length
/// (`FALLOC_FL_KEEP_SIZE`): a later write there cannot fail for want of space. `Ok` where the
/// file system cannot reserve (`EOPNOTSUPP`): the write then takes its chance, as before.
#[cfg(target_os = "linux")]
pub(crate) fn reserve_blocks(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let too_big = || io::Error::from_raw_os_error(libc::EFBIG);
    let offset = libc::off_t::try_from(offset).map_err(|_| too_big())?;
    let len = libc::off_t::try_from(len).map_err(|_| too_big())?;
    loop {
        // SAFETY: fallocate only acts on the valid descriptor borrowed from `file`.
        let ret =
            unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, offset, len) };
        match check_zero(ret) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => return Ok(()),
            other => return other,
        }
    }
}

/// Elsewhere nothing is reserved (there is no portable call that keeps the length).
#[cfg(not(target_os = "linux"))]
pub(crate) fn reserve_blocks(_file: &File, _offset: u64, _len: u64) -> io::Result<()> {
    Ok(())
}

/// Portable stand-in: POSIX `posix_fallocate` is missing on macOS, so other systems only set the
/// length (a sparse file); the README's platform table says so.
#[cfg(not(target_os = "linux"))]
pub(crate) fn allocate_blocks(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let end = offset
        .checked_add(len)
        .ok_or_else(|| io::Error::from_raw_os_error(libc::EFBIG))?;
    if file.metadata()?.len() < end {
        file.set_len(end)
    } else {
        Ok(())
    }
}

/// Gives back the file blocks of `[offset, offset + len)`: the range reads as zeros after, and
/// the file keeps its length.
#[cfg(target_os = "linux")]
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let too_big = || io::Error::from_raw_os_error(libc::EFBIG);
    let offset = libc::off_t::try_from(offset).map_err(|_| too_big())?;
    let len = libc::off_t::try_from(len).map_err(|_| too_big())?;
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    loop {
        // SAFETY: fallocate only acts on the valid descriptor borrowed from `file`.
        match check_zero(unsafe { libc::fallocate(file.as_raw_fd(), mode, offset, len) }) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Portable stand-in: zeros written over the range (within the file's length).
#[cfg(not(target_os = "linux"))]
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let end = offset.saturating_add(len).min(file.metadata()?.len());
    let zeros = vec![0u8; 1 << 16];
    let mut at = offset;
    while at < end {
        let n = ((end - at) as usize).min(zeros.len());
        file.write_all_at(&zeros[..n], at)?;
        at += n as u64;
    }
    Ok(())
}

/// The magic number (`statfs::f_type`) of the file system holding `file`.
#[cfg(target_os = "linux")]
fn fs_magic(file: &File) -> io::Result<u32> {
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `buf` is writable and large enough for one `statfs`; the descriptor is valid.
    check_zero(unsafe { libc::fstatfs(file.as_raw_fd(), buf.as_mut_ptr()) })?;
    // SAFETY: fstatfs succeeded, so it filled `buf`.
    let stat = unsafe { buf.assume_init() };
    // `f_type` is signed and of a target-dependent width; the magic numbers are 32-bit.
    Ok(stat.f_type as u32)
}

/// Whether the file system holding `file` keeps its data in RAM (tmpfs, ramfs).
#[cfg(target_os = "linux")]
pub(crate) fn is_ram_backed(file: &File) -> io::Result<bool> {
    const TMPFS_MAGIC: u32 = 0x0102_1994;
    const RAMFS_MAGIC: u32 = 0x8584_58f6;
    let kind = fs_magic(file)?;
    Ok(kind == TMPFS_MAGIC || kind == RAMFS_MAGIC)
}

/// Other systems: not detected (reported as disk-backed).
#[cfg(not(target_os = "linux"))]
pub(crate) fn is_ram_backed(_file: &File) -> io::Result<bool> {
    Ok(false)
}

/// Takes an exclusive `flock` without waiting. `Ok(false)` when another open file holds it.
pub(crate) fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    try_lock(file, true)
}

/// Takes an exclusive or a shared `flock` without waiting. `Ok(false)` when another open file
/// holds a lock that excludes it.
pub(crate) fn try_lock(file: &File, exclusive: bool) -> io::Result<bool> {
    let kind = if exclusive {
        libc::LOCK_EX
    } else {
        libc::LOCK_SH
    };
    // SAFETY: flock only acts on the valid descriptor borrowed from `file`.
    match check_zero(unsafe { libc::flock(file.as_raw_fd(), kind | libc::LOCK_NB) }) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(e),
    }
}

/// The soft limit on open descriptors (`RLIMIT_NOFILE`), `None` if unlimited or unknown.
pub(crate) fn open_files_soft_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit.
    let ret = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
    #[allow(clippy::unnecessary_cast)] // `rlim_t` differs between targets.
    (ret == 0 && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur as u64)
}

/// The address space this process may still map under its soft `RLIMIT_AS`: the limit less
/// what is mapped now (`VmSize`). `None` when there is no limit (or it cannot be read).
pub(crate) fn address_space_left() -> Option<usize> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit.
    let ret = unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) };
    if ret != 0 || limit.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    let limit = usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX);
    Some(limit.saturating_sub(mapped_now().unwrap_or(0)))
}

/// The bytes of address space mapped by this process now (`VmSize`).
#[cfg(target_os = "linux")]
fn mapped_now() -> Option<usize> {
    // The first field of statm is the total program size in pages.
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: usize = statm.split_whitespace().next()?.parse().ok()?;
    pages.checked_mul(page_size())
}

/// Elsewhere the mapped size is not known: the whole limit counts as left.
#[cfg(not(target_os = "linux"))]
fn mapped_now() -> Option<usize> {
    None
}

/// Whether every page of `[addr, addr + len)` is mapped (by anything): `msync` with `MS_ASYNC`,
/// which changes nothing and fails with `ENOMEM` on an unmapped page.
pub(crate) fn is_mapped(addr: NonNull<u8>, len: usize) -> bool {
    // SAFETY: MS_ASYNC schedules nothing on Linux (and at most a write-back elsewhere); msync
    // reads no memory and changes no mapping.
    unsafe { libc::msync(addr.as_ptr().cast(), len, libc::MS_ASYNC) == 0 }
}

/// The effective user id, used to name the per-user folder.
pub(crate) fn effective_uid() -> u32 {
    // SAFETY: geteuid cannot fail and has no preconditions.
    unsafe { libc::geteuid() }
}

fn c_name(name: &OsStr) -> io::Result<CString> {
    CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

fn check_fd(fd: libc::c_int) -> io::Result<File> {
    if fd < 0 {
        Err(io::Error::last_os_error())
    } else {
        // SAFETY: `fd` was just returned by the kernel and is owned by nobody else.
        Ok(unsafe { File::from_raw_fd(fd) })
    }
}

/// Opens `name` inside the folder `dir` (never through a symbolic link, close-on-exec):
/// created new (`O_EXCL`, read/write, `mode`) when `create` is given, else an existing
/// regular file for reading and writing. Nothing is resolved through a path: a folder renamed
/// or replaced by a link under our feet cannot redirect the call.
pub(crate) fn open_at(dir: &File, name: &OsStr, create: Option<u32>) -> io::Result<File> {
    let name = c_name(name)?;
    // O_NONBLOCK: a FIFO put in place of a file fails the checks after the open, instead of
    // blocking it (no effect on regular files).
    let mut flags = libc::O_RDWR | libc::O_NONBLOCK | OPEN_FLAGS;
    if create.is_some() {
        flags |= libc::O_CREAT | libc::O_EXCL;
    }
    let mode = create.unwrap_or(0) as libc::c_uint;
    loop {
        // SAFETY: `name` is a valid C string; the descriptor is borrowed from `dir`.
        let fd = unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags, mode) };
        match check_fd(fd) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Opens the existing regular file `name` inside `dir` for reading only (never through a
/// symbolic link, close-on-exec).
pub(crate) fn open_read_at(dir: &File, name: &OsStr) -> io::Result<File> {
    let name = c_name(name)?;
    // O_NONBLOCK: see `open_at`.
    let flags = libc::O_RDONLY | libc::O_NONBLOCK | OPEN_FLAGS;
    // SAFETY: `name` is a valid C string; the descriptor is borrowed from `dir`.
    check_fd(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) })
}

/// Opens the folder `name` inside `dir` for reading, without following a link.
pub(crate) fn open_dir_at(dir: &File, name: &OsStr) -> io::Result<File> {
    let name = c_name(name)?;
    let flags = libc::O_RDONLY | libc::O_DIRECTORY | OPEN_FLAGS;
    // SAFETY: `name` is a valid C string; the descriptor is borrowed from `dir`.
    check_fd(unsafe { libc::openat(dir.as_raw_fd(), name.as_ptr(), flags) })
}

/// Creates the folder `name` inside `dir` with `mode`.
pub(crate) fn make_dir_at(dir: &File, name: &OsStr, mode: u32) -> io::Result<()> {
    let name = c_name(name)?;
    // SAFETY: `name` is a valid C string; the descriptor is borrowed from `dir`.
    check_zero(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode as libc::mode_t) })
}

/// Removes the entry `name` of `dir`: a file, or an empty folder when `folder` is set.
pub(crate) fn remove_at(dir: &File, name: &OsStr, folder: bool) -> io::Result<()> {
    let name = c_name(name)?;
    let flags = if folder { libc::AT_REMOVEDIR } else { 0 };
    // SAFETY: `name` is a valid C string; the descriptor is borrowed from `dir`.
    check_zero(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) })
}

/// Points the descriptor `fd` at `/dev/null` (close-on-exec): the file it referred to loses
/// this process's reference (a fork child's copy of a lock, say), and the number stays valid
/// for whoever closes it later. Only async-signal-safe calls: for a fork child handler.
pub(crate) fn point_at_null(fd: std::os::fd::RawFd) {
    // SAFETY: a NUL-terminated path; open, dup2, fcntl and close are async-signal-safe and act
    // on descriptors only.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY | libc::O_CLOEXEC);
        if null < 0 {
            return;
        }
        if libc::dup2(null, fd) >= 0 {
            libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
        }
        libc::close(null);
    }
}

/// Renames the entry `from` of `dir` to `to` in the same folder (replacing `to` if it exists).
pub(crate) fn rename_at(dir: &File, from: &OsStr, to: &OsStr) -> io::Result<()> {
    let (from, to) = (c_name(from)?, c_name(to)?);
    // SAFETY: both names are valid C strings; the descriptor is borrowed from `dir`.
    check_zero(unsafe {
        libc::renameat(dir.as_raw_fd(), from.as_ptr(), dir.as_raw_fd(), to.as_ptr())
    })
}

/// Makes `to` (an empty file) a copy of `from`: a reflink (`FICLONE`: the two files share
/// their blocks until either is written) where the file system has them (XFS, btrfs), else a
/// copy of the bytes. Returns whether it was a reflink.
pub(crate) fn clone_file(from: &File, to: &File) -> io::Result<bool> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: FICLONE takes the source descriptor as its argument and reads no memory;
        // both descriptors are valid (borrowed).
        let ret = unsafe { libc::ioctl(to.as_raw_fd(), libc::FICLONE, from.as_raw_fd()) };
        if ret == 0 {
            return Ok(true);
        }
        let error = io::Error::last_os_error();
        let unsupported = [
            libc::EOPNOTSUPP,
            libc::ENOTTY,
            libc::EXDEV,
            libc::EINVAL,
            libc::ENOSYS,
        ];
        if !error
            .raw_os_error()
            .is_some_and(|e| unsupported.contains(&e))
        {
            return Err(error);
        }
    }
    copy_keeping_holes(from, to)?;
    Ok(false)
}

/// Copies the bytes of `from` into the empty file `to`, keeping `from`'s holes as holes: only
/// the extents with data are copied (`SEEK_DATA`/`SEEK_HOLE`, `copy_file_range`), and the
/// length is set last. A 344 MiB file with 12 MiB of data copies as 12 MiB. Where the file
/// system cannot say where its data is, every byte is copied.
#[cfg(target_os = "linux")]
fn copy_keeping_holes(from: &File, to: &File) -> io::Result<()> {
    let len = from.metadata()?.len();
    let seek = |whence: libc::c_int, at: u64| -> io::Result<Option<u64>> {
        let at =
            libc::off_t::try_from(at).map_err(|_| io::Error::from_raw_os_error(libc::EFBIG))?;
        // SAFETY: lseek on a valid descriptor reads no memory.
        let ret = unsafe { libc::lseek(from.as_raw_fd(), at, whence) };
        if ret >= 0 {
            return Ok(Some(ret as u64));
        }
        match io::Error::last_os_error() {
            // No data at or after `at`.
            e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            e => Err(e),
        }
    };
    let mut at = 0;
    while at < len {
        let data = match seek(libc::SEEK_DATA, at) {
            Ok(Some(data)) => data,
            Ok(None) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) && at == 0 => {
                return copy_all(from, to);
            }
            Err(e) => return Err(e),
        };
        let hole = seek(libc::SEEK_HOLE, data)?.unwrap_or(len).min(len);
        copy_range(from, to, data, hole - data)?;
        at = hole;
    }
    to.set_len(len)
}

/// Copies `len` bytes at `at` of `from` to the same place of `to`: `copy_file_range`, or
/// reads and writes where the kernel cannot.
#[cfg(target_os = "linux")]
fn copy_range(from: &File, to: &File, at: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let too_big = || io::Error::from_raw_os_error(libc::EFBIG);
    let (mut done, mut off_in, mut off_out) = (0, at, at);
    while done < len {
        let mut from_off = libc::loff_t::try_from(off_in).map_err(|_| too_big())?;
        let mut to_off = libc::loff_t::try_from(off_out).map_err(|_| too_big())?;
        let want = usize::try_from(len - done)
            .unwrap_or(usize::MAX)
            .min(1 << 30);
        // SAFETY: both descriptors are valid; the kernel reads and writes only the two offsets
        // given, which live on this stack frame.
        let ret = unsafe {
            libc::copy_file_range(
                from.as_raw_fd(),
                &mut from_off,
                to.as_raw_fd(),
                &mut to_off,
                want,
                0,
            )
        };
        match ret {
            0 => break, // the source ended early (it shrank meanwhile)
            n if n > 0 => {
                done += n as u64;
                off_in += n as u64;
                off_out += n as u64;
            }
            _ => {
                let e = io::Error::last_os_error();
                match e.raw_os_error() {
                    Some(libc::EINTR) => continue,
                    Some(libc::ENOSYS | libc::EXDEV | libc::EOPNOTSUPP | libc::EINVAL) => {
                        let mut buf = vec![0u8; 1 << 20];
                        while done < len {
                            let n = buf
                                .len()
                                .min(usize::try_from(len - done).unwrap_or(usize::MAX));
                            let read = from.read_at(&mut buf[..n], off_in)?;
                            if read == 0 {
                                break;
                            }
                            to.write_all_at(&buf[..read], off_out)?;
                            done += read as u64;
                            off_in += read as u64;
                            off_out += read as u64;
                        }
                    }
                    _ => return Err(e),
                }
            }
        }
    }
    Ok(())
}

/// Copies every byte of `from` into `to`.
fn copy_all(from: &File, to: &File) -> io::Result<()> {
    let (mut from, mut to) = (from, to);
    std::io::Seek::rewind(&mut from)?;
    std::io::copy(&mut from, &mut to)?;
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn copy_keeping_holes(from: &File, to: &File) -> io::Result<()> {
    copy_all(from, to)
}

/// What kind of entry [`entry_at`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum EntryKind {
    File,
    Dir,
    Other,
}

/// What [`entry_at`] tells of a folder entry.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Entry {
    pub(crate) dev: u64,
    pub(crate) ino: u64,
    pub(crate) kind: EntryKind,
    pub(crate) modified: std::time::SystemTime,
    /// Its length in bytes.
    pub(crate) len: u64,
    /// How many names it has (hard links).
    pub(crate) links: u64,
}

/// The entry `name` of `dir` itself (a link is not followed).
pub(crate) fn entry_at(dir: &File, name: &OsStr) -> io::Result<Entry> {
    let name = c_name(name)?;
    let mut buf = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `name` is a valid C string, `buf` is writable and large enough for a `stat`.
    check_zero(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded, so it filled `buf`.
    let stat = unsafe { buf.assume_init() };
    let kind = match stat.st_mode & libc::S_IFMT {
        libc::S_IFREG => EntryKind::File,
        libc::S_IFDIR => EntryKind::Dir,
        _ => EntryKind::Other,
    };
    let secs = u64::try_from(stat.st_mtime).unwrap_or(0);
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets.
    Ok(Entry {
        dev: stat.st_dev as u64,
        ino: stat.st_ino as u64,
        kind,
        modified: std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs),
        len: u64::try_from(stat.st_size).unwrap_or(0),
        links: stat.st_nlink as u64,
    })
}

/// Device and inode of the entry `name` of `dir` itself (a link is not followed).
pub(crate) fn identity_at(dir: &File, name: &OsStr) -> io::Result<(u64, u64)> {
    entry_at(dir, name).map(|e| (e.dev, e.ino))
}

/// The names in the folder `dir` (without `.` and `..`), read through the handle.
pub(crate) fn names_in(dir: &File) -> io::Result<Vec<std::ffi::OsString>> {
    // SAFETY: dup of a valid descriptor borrowed from `dir`; the copy is owned below.
    let fd = unsafe { libc::fcntl(dir.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is ours; on success the stream owns it (closedir closes it).
    let stream = unsafe { libc::fdopendir(fd) };
    if stream.is_null() {
        let err = io::Error::last_os_error();
        // SAFETY: fdopendir failed, so `fd` is still ours to close.
        unsafe { libc::close(fd) };
        return Err(err);
    }
    // The copy shares the original's position: start from the beginning.
    // SAFETY: `stream` is a valid directory stream.
    unsafe { libc::rewinddir(stream) };
    let mut names = Vec::new();
    loop {
        // SAFETY: `stream` is valid; readdir returns null at the end (or on error).
        let entry = unsafe { libc::readdir(stream) };
        if entry.is_null() {
            break;
        }
        // SAFETY: a non-null entry's `d_name` is a NUL-terminated string valid until the next
        // readdir on this stream; it is copied at once.
        let name = unsafe { std::ffi::CStr::from_ptr((*entry).d_name.as_ptr()) };
        let name = OsStr::from_bytes(name.to_bytes());
        if name != "." && name != ".." {
            names.push(name.to_owned());
        }
    }
    // SAFETY: `stream` is valid and closed once; this also closes `fd`.
    unsafe { libc::closedir(stream) };
    Ok(names)
}

/// Milliseconds of a monotonic clock that is cheap to read and coarse (a few ms on Linux,
/// `CLOCK_MONOTONIC_COARSE`): for decays measured in seconds, read on every free.
#[cfg(target_os = "linux")]
pub(crate) fn coarse_millis() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; the clock id is a constant Linux has.
    let ret = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    if ret != 0 {
        return 0;
    }
    #[allow(clippy::unnecessary_cast)] // the field types differ between targets.
    let millis = (ts.tv_sec as u64) * 1000 + (ts.tv_nsec as u64) / 1_000_000;
    millis
}

/// Other systems: the ordinary monotonic clock.
#[cfg(not(target_os = "linux"))]
pub(crate) fn coarse_millis() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
}

/// Flags added to every `open` of a segment file or folder.
pub(crate) const OPEN_FLAGS: libc::c_int = libc::O_NOFOLLOW | libc::O_CLOEXEC;
