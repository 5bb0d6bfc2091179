//! [`Segment`]: one memory-mapped file, the owner of its mapping and of its file.

use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::creator::{FileName, SegmentFile};
use crate::fork::{self, DontForkViews};
#[cfg(target_os = "linux")]
use crate::sys::RemapTo;
use crate::sys::{self, Advice};

/// How a segment's mapping is moved to a new length.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum GrowStrategy {
    /// `mremap`: the kernel moves page-table entries; one system call, no byte copied. The
    /// default on Linux. Elsewhere it means [`GrowStrategy::MapAgain`].
    #[default]
    Remap,
    /// Map the file again at the new length, then unmap the old view: no byte copied either,
    /// one more system call. The only way on systems without `mremap` (macOS, the BSDs);
    /// selectable on Linux so that path is tested and measured.
    MapAgain,
}

/// An access pattern hint passed to the kernel with `madvise`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum AccessPattern {
    /// Pages are read in order: read ahead aggressively, drop behind (`MADV_SEQUENTIAL`).
    Sequential,
    /// Pages are read in no order: no read-ahead (`MADV_RANDOM`).
    Random,
    /// Pages will be needed soon: start reading them in (`MADV_WILLNEED`).
    WillNeed,
}

/// The per-mapping settings chosen on the builder.
#[derive(Clone, Copy, Debug)]
pub(crate) struct MapOptions {
    pub(crate) reserve_disk: bool,
    pub(crate) populate: bool,
    pub(crate) access: Option<AccessPattern>,
    pub(crate) huge_pages: bool,
    pub(crate) dont_fork: bool,
    pub(crate) strategy: GrowStrategy,
}

/// How a resize was done, for the statistics.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Resized {
    /// Nothing had to move (same length and alignment already right).
    Unchanged,
    /// `mremap`.
    Remapped,
    /// A new view of the file replaced the old one.
    MappedAgain,
}

/// Descriptors held open by segments in this process, against the budget that decides whether a
/// new segment may hold one.
static HELD_DESCRIPTORS: AtomicUsize = AtomicUsize::new(0);

/// How many segment descriptors this process holds open right now.
pub(crate) fn held_descriptors() -> usize {
    HELD_DESCRIPTORS.load(Ordering::Relaxed)
}

/// One memory-mapped file. It owns the mapping `[ptr, ptr + len)` and the file behind it, and
/// its `Drop` releases both.
///
/// Invariants: `len` is a non-zero multiple of the page size; the file is exactly `len` bytes
/// long (or longer, only if giving space back failed); the mapping is `MAP_SHARED`, read/write.
#[derive(Debug)]
pub(crate) struct Segment {
    view: View,
    backing: Backing,
    /// A shrink could not truncate the file: bytes past `len` are stale, not zeros.
    stale_tail: bool,
    /// The fork generation that made the segment (see `fork`). A child made by `fork` shares
    /// the mapping and the file: it must neither resize nor remove them, or it would corrupt
    /// the parent's block.
    generation: u64,
    /// The fork epoch in which the segment was made or last handed out afresh: if a fork came
    /// since, a child may map the file, so it is never made shorter.
    epoch: u64,
    /// Made with `MADV_DONTFORK`: its range is recorded so that a child keeps it reserved.
    dont_fork: bool,
}

// SAFETY: a `Segment` is the only owner of its mapping and its file; nothing in it is tied to the
// thread that created it (mappings and descriptors are process-wide), so moving it to another
// thread is sound. It is only ever accessed through `&mut` or by value (inside a mutex).
unsafe impl Send for Segment {}

/// The mapping itself: `[ptr, ptr + len)`.
#[derive(Debug)]
struct View {
    ptr: NonNull<u8>,
    len: usize,
}

/// What keeps the file reachable for resizing.
#[derive(Debug)]
enum Backing {
    /// The descriptor is held; the file has no name (unlinked at creation, or anonymous).
    Held(HeldFile),
    /// No descriptor is held; the file is reopened by name and checked to be the same file.
    /// Only the fork generation that made it removes it.
    Named {
        name: FileName,
        dev: u64,
        ino: u64,
        generation: u64,
    },
}

#[derive(Debug)]
struct HeldFile(File);

impl HeldFile {
    fn new(file: File) -> Self {
        HELD_DESCRIPTORS.fetch_add(1, Ordering::Relaxed);
        HeldFile(file)
    }
}

impl Drop for HeldFile {
    fn drop(&mut self) {
        HELD_DESCRIPTORS.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Backing {
    /// Takes over a creator's file: `hold` keeps the descriptor (and removes the name now),
    /// otherwise the name is kept and the file returned for this one use. The file has been
    /// checked empty before anything is done to it.
    fn from_file(segment: SegmentFile, hold: bool) -> io::Result<(Backing, Option<File>)> {
        segment.check_empty()?;
        match segment.name {
            Some(name) if !hold => {
                let meta = segment.file.metadata()?;
                let backing = Backing::Named {
                    name,
                    dev: meta.dev(),
                    ino: meta.ino(),
                    generation: fork::generation(),
                };
                Ok((backing, Some(segment.file)))
            }
            // Drop the name at once: from here on a crash leaves nothing on disk.
            _ => Ok((Backing::Held(HeldFile::new(segment.into_unnamed()?)), None)),
        }
    }

    /// The file, reopened by name if the descriptor is not held. Fails (rather than resizing
    /// some other file) if the name now points elsewhere.
    fn open(&self) -> io::Result<FileRef<'_>> {
        match self {
            Backing::Held(held) => Ok(FileRef::Borrowed(&held.0)),
            Backing::Named { name, dev, ino, .. } => {
                let file = name.open()?;
                let meta = file.metadata()?;
                if (meta.dev(), meta.ino()) != (*dev, *ino) {
                    return Err(io::Error::new(
                        io::ErrorKind::NotFound,
                        format!("segment file {} was replaced", name.display().display()),
                    ));
                }
                Ok(FileRef::Owned(file))
            }
        }
    }
}

impl Drop for Backing {
    fn drop(&mut self) {
        if let Backing::Named {
            name,
            dev,
            ino,
            generation,
        } = self
        {
            // Remove the name only in the process that made it (not in a fork child, whose
            // parent still uses the file) and only if it is still our file. An error leaves the
            // file for the next start's clean-up (see `DirCreator`); Drop cannot report it.
            if *generation == fork::generation()
                && name.identity().is_ok_and(|id| id == (*dev, *ino))
            {
                let _ = name.remove();
            }
        }
    }
}

enum FileRef<'a> {
    Borrowed(&'a File),
    Owned(File),
}

impl std::ops::Deref for FileRef<'_> {
    type Target = File;
    fn deref(&self) -> &File {
        match self {
            FileRef::Borrowed(f) => f,
            FileRef::Owned(f) => f,
        }
    }
}

impl Segment {
    /// Maps a new segment of `len` bytes (a non-zero multiple of the page size) at an address
    /// aligned to `align` (a power of two), from a file fresh out of a creator.
    ///
    /// `hold` keeps the descriptor and removes the file's name now; otherwise the descriptor is
    /// closed and the name kept for reopening. On error nothing is left behind.
    pub(crate) fn create(
        segment: SegmentFile,
        len: usize,
        align: usize,
        opts: &MapOptions,
        hold: bool,
    ) -> io::Result<Segment> {
        debug_assert!(len > 0 && len.is_multiple_of(sys::page_size()) && align.is_power_of_two());
        let (backing, named_file) = Backing::from_file(segment, hold)?;
        let file = match (&backing, &named_file) {
            (_, Some(file)) => file,
            (Backing::Held(held), None) => &held.0,
            (Backing::Named { .. }, None) => unreachable!("a named backing comes with its file"),
        };
        extend(file, 0, len, opts)?;
        let ptr = with_fork_record(opts.dont_fork, |views| {
            let ptr = map_view(file, len, align, opts)?;
            if let Some(views) = views {
                views.add(ptr.as_ptr().addr(), len);
            }
            Ok::<_, io::Error>(ptr)
        })?;
        let segment = Segment {
            view: View { ptr, len },
            backing,
            stale_tail: false,
            generation: fork::generation(),
            epoch: fork::epoch(),
            dont_fork: opts.dont_fork,
        };
        segment.apply_hints(0, opts);
        Ok(segment)
    }

    /// The start of the mapping.
    pub(crate) fn ptr(&self) -> NonNull<u8> {
        self.view.ptr
    }

    /// The mapped length in bytes.
    pub(crate) fn len(&self) -> usize {
        self.view.len
    }

    /// Whether this process got the segment through `fork` rather than making it.
    pub(crate) fn is_inherited(&self) -> bool {
        self.generation != fork::generation()
    }

    /// Whether a child made by `fork` may map the file: a fork came since the segment was
    /// made.
    pub(crate) fn may_be_shared(&self) -> bool {
        self.epoch != fork::epoch()
    }

    /// Marks the segment as handed out afresh in this epoch: taken from the reuse cache, which
    /// never keeps a segment that was live at a fork.
    pub(crate) fn restamp(&mut self) {
        self.epoch = fork::epoch();
    }

    /// Whether the segment is kept out of fork children (`MADV_DONTFORK`).
    pub(crate) fn is_dont_fork(&self) -> bool {
        self.dont_fork
    }

    /// Whether the segment holds its file's descriptor (else the file keeps its name).
    pub(crate) fn holds_descriptor(&self) -> bool {
        matches!(self.backing, Backing::Held(_))
    }

    /// Resizes the segment to `new_len` bytes (a non-zero multiple of the page size) at an
    /// address aligned to `align`, keeping every byte below `min(len, new_len)`.
    ///
    /// On error the segment is exactly as it was: same address, same length, same bytes.
    pub(crate) fn resize(
        &mut self,
        new_len: usize,
        align: usize,
        opts: &MapOptions,
    ) -> io::Result<Resized> {
        debug_assert!(
            new_len > 0 && new_len.is_multiple_of(sys::page_size()) && align.is_power_of_two()
        );
        let old_len = self.view.len;
        if new_len == old_len && self.view.ptr.as_ptr().addr().is_multiple_of(align) {
            return Ok(Resized::Unchanged);
        }
        if self.is_inherited() {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a segment inherited through fork is shared with the parent: not resized",
            ));
        }
        let file = self.backing.open()?;
        if new_len > old_len {
            if self.stale_tail {
                // Growing must show zeros past the old length, not what a shrink left there.
                // Cutting the file to the mapped length is safe even if a child maps it: a
                // segment a child may map is never shrunk, so no child maps more than `old_len`.
                file.set_len(old_len as u64)?;
                self.stale_tail = false;
            }
            // Give the extension back on failure: a failed fallocate may have grown the file
            // part way (ext4), holding blocks just when the disk is full. Should giving back
            // fail too, the file is only longer than its mapping until the segment is freed.
            let give_back = |_: &io::Error| {
                let _ = file.set_len(old_len as u64);
            };
            extend(&file, old_len, new_len, opts).inspect_err(give_back)?;
            let dont_fork = self.dont_fork;
            let resized = with_fork_record(dont_fork, |views| {
                self.view
                    .move_to_recorded(&file, new_len, align, opts, views)
            })
            .inspect_err(give_back)?;
            // The mapping has moved: nothing may fail past this point (the caller would keep
            // the old, now invalid, pointer). What follows is hints only.
            self.apply_hints(old_len, opts);
            Ok(resized)
        } else {
            // No fork may start between the check and the cut of the file: a child made in
            // between would map the whole file and die of SIGBUS touching the part cut off.
            let mut no_fork = fork::hold();
            if self.may_be_shared() {
                // A child may map the whole file: it stays whole (the caller keeps the block).
                return Err(io::Error::new(
                    io::ErrorKind::Unsupported,
                    "a segment that a fork child may map is not made shorter",
                ));
            }
            let views = self.dont_fork.then_some(&mut *no_fork);
            let resized = self
                .view
                .move_to_recorded(&file, new_len, align, opts, views)?;
            let mapped = self.view.len;
            if mapped < old_len {
                // Return the blocks past the mapping to the file system. A failure keeps them
                // until the segment is freed or grown; nothing maps them meanwhile.
                self.stale_tail |= file.set_len(mapped as u64).is_err();
            }
            Ok(resized)
        }
    }

    /// Gives the builder's hints for the mapping; `populate` only for the bytes from `from`.
    /// Hints may fail (old kernels, memory pressure) without harm, so errors are ignored.
    fn apply_hints(&self, from: usize, opts: &MapOptions) {
        let (ptr, len) = (self.view.ptr, self.view.len);
        #[cfg(target_os = "linux")]
        if opts.huge_pages && len >= HUGE_PAGE {
            // SAFETY: `[ptr, ptr + len)` is our mapping; a hint that leaves contents alone.
            let _ = unsafe { sys::advise(ptr, len, Advice::HugePage) };
        }
        if let Some(access) = opts.access {
            let advice = match access {
                AccessPattern::Sequential => Advice::Sequential,
                AccessPattern::Random => Advice::Random,
                AccessPattern::WillNeed => Advice::WillNeed,
            };
            // SAFETY: our mapping; access hints leave contents alone.
            let _ = unsafe { sys::advise(ptr, len, advice) };
        }
        if opts.populate && from < len {
            // SAFETY: `from < len`, so the new part lies inside the mapping.
            let new_part = unsafe { ptr.add(from) };
            #[cfg(target_os = "linux")]
            let advice = Advice::PopulateWrite;
            #[cfg(not(target_os = "linux"))]
            let advice = Advice::WillNeed;
            // SAFETY: inside our mapping; populating faults pages in without changing them.
            let _ = unsafe { sys::advise(new_part, len - from, advice) };
        }
    }
}

impl View {
    /// [`View::move_to`], keeping `views` (the `dont_fork` record, when given) in step.
    fn move_to_recorded(
        &mut self,
        file: &File,
        new_len: usize,
        align: usize,
        opts: &MapOptions,
        views: Option<&mut DontForkViews>,
    ) -> io::Result<Resized> {
        let old = self.ptr.as_ptr().addr();
        let resized = self.move_to(file, new_len, align, opts)?;
        if let Some(views) = views {
            views.remove(old);
            views.add(self.ptr.as_ptr().addr(), self.len);
        }
        Ok(resized)
    }

    fn move_to(
        &mut self,
        file: &File,
        new_len: usize,
        align: usize,
        opts: &MapOptions,
    ) -> io::Result<Resized> {
        match opts.strategy {
            #[cfg(target_os = "linux")]
            GrowStrategy::Remap => self.remap(new_len, align),
            _ => self.map_again(file, new_len, align, opts),
        }
    }

    /// Linux: move the page-table entries with `mremap`. Flags set with `madvise`
    /// (`MADV_DONTFORK`) travel with the mapping.
    #[cfg(target_os = "linux")]
    fn remap(&mut self, new_len: usize, align: usize) -> io::Result<Resized> {
        let aligned = self.ptr.as_ptr().addr().is_multiple_of(align);
        if aligned && align <= sys::page_size() {
            // SAFETY: `[ptr, ptr + len)` is our own single mapping (struct invariant); on
            // success it may have moved and we take the new address, on error it is untouched.
            self.ptr = unsafe { sys::remap(self.ptr, self.len, new_len, RemapTo::Anywhere)? };
            self.len = new_len;
            return Ok(Resized::Remapped);
        }
        // MREMAP_MAYMOVE would only keep page alignment. Try in place (the address keeps its
        // alignment), else move into a fresh reservation aligned as asked.
        if aligned {
            // SAFETY: as above; an in-place resize never moves the mapping.
            if let Ok(ptr) = unsafe { sys::remap(self.ptr, self.len, new_len, RemapTo::InPlace) } {
                self.ptr = ptr;
                self.len = new_len;
                return Ok(Resized::Remapped);
            }
        }
        // Move at the larger of the two lengths, so that a failure leaves the whole old block
        // mapped; a shrink then trims in place, which cannot fail.
        let move_len = new_len.max(self.len);
        let target = reserve_aligned(move_len, align)?;
        // On failure the reservation is leaked, not unmapped: some kernels release the target
        // range before failing, and another thread may have mapped something there since. It is
        // address space only, PROT_NONE, and this path is rare.
        // SAFETY: the source is our mapping; the target is the reservation just made, exactly
        // `move_len` bytes, referenced by nothing else.
        self.ptr = unsafe { sys::remap(self.ptr, self.len, move_len, RemapTo::Fixed(target))? };
        self.len = move_len;
        if new_len < self.len {
            // The mapping has moved: no error may escape now. Trimming the end in place does
            // not fail on a sane kernel; if it did, the longer mapping still fits the block.
            // SAFETY: our mapping, now aligned; shrinking in place only trims its end.
            if let Ok(ptr) = unsafe { sys::remap(self.ptr, self.len, new_len, RemapTo::InPlace) } {
                self.ptr = ptr;
                self.len = new_len;
            }
        }
        Ok(Resized::Remapped)
    }

    /// Portable: map the file again at the new length and drop the old view.
    fn map_again(
        &mut self,
        file: &File,
        new_len: usize,
        align: usize,
        opts: &MapOptions,
    ) -> io::Result<Resized> {
        let aligned = self.ptr.as_ptr().addr().is_multiple_of(align);
        if new_len < self.len && aligned {
            // SAFETY: the tail `[ptr + new_len, ptr + len)` lies inside our mapping (new_len <
            // len) and the caller gives it up (it shrinks the block below new_len).
            unsafe { sys::unmap(self.ptr.add(new_len), self.len - new_len)? };
        } else {
            let new_ptr = map_view(file, new_len, align, opts)?;
            // SAFETY: the old view is ours; both views show the same file pages, so the bytes
            // live on in the new one.
            if let Err(e) = unsafe { sys::unmap(self.ptr, self.len) } {
                // munmap of one whole mapping cannot fail on a sane kernel; if it does, the old
                // view leaks address space but the data is safe in the new one.
                crate::logging::report!(warn, "mmapvec: munmap of an old view failed: {e}");
            }
            self.ptr = new_ptr;
        }
        self.len = new_len;
        Ok(Resized::MappedAgain)
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        let View { ptr, len } = self.view;
        with_fork_record(self.dont_fork, |views| {
            if let Some(views) = views {
                views.remove(ptr.as_ptr().addr());
            }
            // SAFETY: the mapping is ours (struct invariant) and the segment is going away, so
            // no pointer into it is used again (the contract: the block was deallocated).
            if let Err(e) = unsafe { sys::unmap(ptr, len) } {
                // Only possible with a corrupted invariant; Drop must not panic: say it, go on.
                crate::logging::report!(error, "mmapvec: munmap failed for a segment: {e}");
            }
        });
        // `backing` drops next: closes the descriptor or removes the file.
    }
}

/// Runs a change of a view's mapping. For a `dont_fork` view (Linux) it runs under the fork
/// lock with the record of such views, so the record changes together with the mapping and no
/// child is ever made between the two (see `fork`); other views need neither.
fn with_fork_record<R>(dont_fork: bool, change: impl FnOnce(Option<&mut DontForkViews>) -> R) -> R {
    if cfg!(target_os = "linux") && dont_fork {
        change(Some(&mut fork::hold()))
    } else {
        change(None)
    }
}

/// The huge page size used for `huge_pages` alignment (x86-64 and aarch64 with 4 KiB pages).
pub(crate) const HUGE_PAGE: usize = 2 << 20;

/// Gives the file `[from, to)` with blocks reserved (or only the length, if the user chose
/// sparse files).
fn extend(file: &File, from: usize, to: usize, opts: &MapOptions) -> io::Result<()> {
    if opts.reserve_disk {
        sys::allocate_blocks(file, from as u64, (to - from) as u64)
    } else {
        file.set_len(to as u64)
    }
}

/// Maps `len` bytes of `file` at an address aligned to `align`.
fn map_aligned(file: &File, len: usize, align: usize) -> io::Result<NonNull<u8>> {
    if align <= sys::page_size() {
        return sys::map_file(file, len);
    }
    let at = reserve_aligned(len, align)?;
    // SAFETY: `[at, at + len)` is the reservation just made, referenced by nothing else. On
    // failure the reservation is leaked rather than unmapped: a kernel may have released the
    // range already, and another thread may have mapped something there since.
    unsafe { sys::map_file_fixed(at, file, len)? };
    Ok(at)
}

/// Maps a new view (see [`map_aligned`]) and applies what the builder promised for every view,
/// as opposed to hints: `MADV_DONTFORK`. On error nothing stays mapped.
fn map_view(file: &File, len: usize, align: usize, opts: &MapOptions) -> io::Result<NonNull<u8>> {
    let ptr = map_aligned(file, len, align)?;
    #[cfg(target_os = "linux")]
    if opts.dont_fork {
        // SAFETY: the view was just mapped by us and nothing refers to it yet; DONTFORK leaves
        // its contents alone.
        if let Err(e) = unsafe { sys::advise(ptr, len, Advice::DontFork) } {
            // SAFETY: as above; nothing refers to the view.
            let _ = unsafe { sys::unmap(ptr, len) };
            return Err(e);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = opts;
    Ok(ptr)
}

/// Reserves exactly `len` bytes of address space starting at a multiple of `align`: reserve
/// `len + align - page`, then give back the unaligned head and the tail.
pub(crate) fn reserve_aligned(len: usize, align: usize) -> io::Result<NonNull<u8>> {
    let page = sys::page_size();
    let span = len
        .checked_add(align.saturating_sub(page))
        .ok_or_else(|| io::Error::from_raw_os_error(libc::ENOMEM))?;
    let base = sys::reserve(span)?;
    let head = base.as_ptr().addr().next_multiple_of(align) - base.as_ptr().addr();
    let tail = span - head - len;
    // SAFETY: head + len <= span, so the aligned start lies inside the reservation.
    let at = unsafe { base.add(head) };
    // Failing to trim only wastes address space, so errors are ignored.
    if head > 0 {
        // SAFETY: `[base, at)` is part of the reservation just made, outside what we keep.
        let _ = unsafe { sys::unmap(base, head) };
    }
    if tail > 0 {
        // SAFETY: `[at + len, base + span)` is the reservation's tail, outside what we keep.
        let _ = unsafe { sys::unmap(at.add(len), tail) };
    }
    Ok(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_aligned_gives_exactly_aligned_ranges() {
        let page = sys::page_size();
        for align in [page, 2 * page, 1 << 16, HUGE_PAGE, 1 << 30] {
            let len = 3 * page;
            let at = reserve_aligned(len, align).unwrap();
            assert_eq!(at.as_ptr().addr() % align, 0, "align {align}");
            // SAFETY: the reservation is ours and nothing refers to it.
            unsafe { sys::unmap(at, len).unwrap() };
        }
    }

    #[test]
    fn reserve_aligned_refuses_overflow() {
        let err = reserve_aligned(usize::MAX - 10, 1 << 21).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ENOMEM));
    }
}
