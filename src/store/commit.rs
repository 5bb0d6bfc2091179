//! Commits: a store's files only ever hold what a commit wrote, and a commit is all or
//! nothing, at a cost that follows what changed.
//!
//! * **What the writer maps.** Every block that the last commit holds is a *private* view of
//!   its file (`MAP_PRIVATE`): a write makes a copy of the page in memory and never reaches the
//!   file. A segment made since the last commit is a *shared* view of a file of its own, which
//!   no commit lists yet: written in place, it stays out of core (the kernel writes its pages
//!   back and drops them). A chunk of small blocks made since the last commit is a private
//!   view too, but written in place by the commit (no commit holds its range).
//! * **Which pages changed.** The kernel tracks the writes to every private view
//!   (userfaultfd's asynchronous write-protect, Linux 6.7): `sys::written_pages` asks it
//!   (`PAGEMAP_SCAN`) for the pages written since the last commit, and protects them again in
//!   the same call. Without it, every private copy is taken (`/proc/self/pagemap`), which is
//!   never less, and costs more as a session goes on.
//! * **What a commit writes.** Under the store's locks (no block is allocated, grown or freed
//!   meanwhile): the new segments are synced in place, and the written pages of the new
//!   chunks are written in place and synced; then the written pages of the committed views,
//!   the header page (the roots), the small blocks' metadata and the list of segments are
//!   appended to the log (`log`) as records, then a 32-byte end record whose sum covers them,
//!   and the log is synced once: **that is the commit point** (a commit whose writes reached
//!   the disk only in part does not check). Only then are the records copied
//!   from the log into the files (`copy_file_range`), and the new segments become private
//!   views.
//! * **After a crash** (or a power loss) [`replay`] runs at the next open, before anything is
//!   read: it copies every commit of the log that has its end record into the files, in
//!   order (a commit's number must follow the last one's, and records are idempotent), and
//!   drops what follows the last one. So the files hold exactly the last commit that reached
//!   its commit point; files that no commit lists (made after it) are removed by the open.
//! * **Frees wait.** The file of a committed segment that is freed is removed after the commit
//!   that frees it (the commit lists it for removal, in case the removal does not happen); a
//!   committed segment that grows is copied into a new one (its file is not extended); a chunk
//!   of small blocks released is reused, and its range punched, only after a checkpoint (the
//!   log may hold pages of it that a replay would write).
//! * **Checkpoints.** The files are synced and the log emptied (renumbered: what is left in it
//!   is never read again) when it passes [`CHECKPOINT_AT`] bytes, and at every close, drop and
//!   snapshot: a commit itself syncs only the log (and the new blocks). The log keeps
//!   [`LOG_RESERVE`] bytes of disk, so that a small commit needs no new disk.
//!
//! What a commit holds of a value that another thread writes while it runs is undefined (some
//! of its pages may be from before, some from after the write): commit where the data is
//! consistent. The private copies of written pages stay in memory until the store is closed:
//! a commit never drops a page another thread may be writing (the write would be lost, which
//! safe code could see).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use super::space::{Name, SEGS};
use super::{Access, HEADER, SMALL, SMALL_META, folder::Folder};
use crate::sys;

/// The log's file name.
pub(super) const LOG: &str = "log";
/// The list of segments, in `segs/`.
const MANIFEST: &str = ".manifest";
/// The log's first word; the second is the number of the last commit the files hold (the
/// commits of the log follow it, numbered from the next one); the third and fourth, the
/// store's id (a log copied in from another store is not replayed).
const LOG_MAGIC: u64 = u64::from_ne_bytes(*b"MMAPVLG1");
/// Where the log's first commit starts.
const LOG_HEAD: u64 = 32;
/// The words of a commit's first record: `BEGIN`, its number, and a number of its own
/// (random), which its sum covers: what an earlier attempt at the same commit left in the log
/// never checks with this one's records.
const BEGIN_WORDS: u64 = 3;
/// The disk the log keeps (reserved when the store is opened, kept when the log is emptied):
/// a commit of up to about this many bytes of changes to committed data needs no new disk.
const LOG_RESERVE: u64 = 1 << 20;
/// The first word of a commit in the log.
const BEGIN: u64 = u64::from_ne_bytes(*b"MMAPVCB1");
/// The first word of its end record.
const END: u64 = u64::from_ne_bytes(*b"MMAPVCE1");
/// Record kinds.
const WRITE: u64 = 1;
const SET_LEN: u64 = 3;
/// The words of a record's head: kind, target (three words), offset, length.
const HEAD: usize = 6;
/// The log is applied, synced and emptied once it is this long.
pub(super) const CHECKPOINT_AT: u64 = 64 << 20;

/// A file a record writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(super) enum Target {
    Header,
    Small,
    SmallMeta,
    Manifest,
    Seg(Name),
}

impl Target {
    fn words(self) -> [u64; 3] {
        match self {
            Target::Header => [0, 0, 0],
            Target::Small => [1, 0, 0],
            Target::SmallMeta => [2, 0, 0],
            Target::Manifest => [3, 0, 0],
            Target::Seg(name) => {
                let (a, b) = name.words();
                [4, a, b]
            }
        }
    }

    fn from_words(words: [u64; 3]) -> Option<Target> {
        Some(match words {
            [0, 0, 0] => Target::Header,
            [1, 0, 0] => Target::Small,
            [2, 0, 0] => Target::SmallMeta,
            [3, 0, 0] => Target::Manifest,
            [4, a, b] => Target::Seg(Name::from_words(a, b)?),
            _ => return None,
        })
    }
}

/// One record of a commit, as the log holds it: its data (for a write) is `len` bytes at
/// `data` in the log.
#[derive(Clone, Copy, Debug)]
struct Record {
    kind: u64,
    target: Target,
    offset: u64,
    len: u64,
    data: u64,
}

/// What a commit writes: records whose data is in memory (pages of the store's views) or in
/// buffers of the commit's own.
pub(super) struct Changes {
    records: Vec<(u64, Target, u64, Source)>,
}

/// Where a write record's bytes come from.
enum Source {
    /// `len` bytes of the store's mapped range, at this address.
    Memory(usize, usize),
    Bytes(Vec<u8>),
    /// A set-length record: no data.
    None(u64),
}

impl Changes {
    pub(super) fn new() -> Changes {
        Changes {
            records: Vec::new(),
        }
    }

    /// `len` bytes of the mapping at `addr` go to `target` at `offset`.
    pub(super) fn memory(&mut self, target: Target, offset: u64, addr: usize, len: usize) {
        self.records
            .push((WRITE, target, offset, Source::Memory(addr, len)));
    }

    pub(super) fn bytes(&mut self, target: Target, offset: u64, bytes: Vec<u8>) {
        self.records
            .push((WRITE, target, offset, Source::Bytes(bytes)));
    }

    /// `target` is at least `len` bytes long.
    pub(super) fn set_len(&mut self, target: Target, len: u64) {
        self.records.push((SET_LEN, target, len, Source::None(0)));
    }
}

/// A hash of words (64 bits), for the end record: it covers every byte of the commit before
/// it, so that a commit whose writes reached the disk only in part (a power loss before the
/// one sync of the commit) is not taken for a complete one.
struct Hasher(u64);

impl Hasher {
    fn new() -> Hasher {
        Hasher(0x9e37_79b9_7f4a_7c15)
    }

    fn word(&mut self, w: u64) {
        let h = (self.0 ^ w).wrapping_mul(0xff51_afd7_ed55_8ccd);
        let h = (h ^ (h >> 29)).wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        self.0 = h ^ (h >> 32);
    }

    /// `bytes` (a multiple of 8 long).
    fn bytes(&mut self, bytes: &[u8]) {
        for w in bytes.chunks_exact(8) {
            self.word(u64::from_ne_bytes(w.try_into().expect("8 bytes")));
        }
    }
}

/// The sum of the commit `seq` that starts at `begin` of `log` and whose end record is at
/// `end`: a hash of its bytes (read back from the file: they are the log's, and this process
/// reads no memory another thread may write), then of its end record's first words.
fn commit_sum(log: &File, seq: u64, begin: u64, end: u64) -> io::Result<u64> {
    let mut hasher = Hasher::new();
    let mut buffer = vec![0u8; (end - begin).min(1 << 20) as usize];
    let mut at = begin;
    while at < end {
        let n = (end - at).min(buffer.len() as u64) as usize;
        log.read_exact_at(&mut buffer[..n], at)?;
        hasher.bytes(&buffer[..n]);
        at += n as u64;
    }
    for w in [END, seq, begin] {
        hasher.word(w);
    }
    Ok(hasher.0)
}

fn words_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_ne_bytes()).collect()
}

/// The store's log, and the files its records go to.
#[derive(Debug)]
pub(super) struct Log {
    file: File,
    /// Where the next commit goes: the end of the last one.
    end: u64,
    /// The number of the last commit written (the files hold it once checkpointed).
    last: u64,
    targets: Targets,
    /// The records of the commits written since the last checkpoint, which copies them into
    /// the files (each page once, its last version).
    pending: Vec<Vec<Record>>,
    /// What the last commit appended to the log, and wrote in place.
    last_bytes: (u64, u64),
    /// What the commit being made has written in place so far.
    in_place: u64,
    /// The store's id, in the log's head.
    id: [u64; 2],
}

impl Log {
    /// The log of the store in `folder` (made if missing), after [`replay`]: emptied, and
    /// numbered from `last`, the commit the files hold. Its disk is reserved.
    pub(super) fn open(folder: &Folder, last: u64, id: [u64; 2]) -> io::Result<Log> {
        let file = match folder.file(LOG.as_ref(), Access::Write, false) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                folder.file(LOG.as_ref(), Access::Write, true)?
            }
            other => other?,
        };
        let head = words_bytes(&[LOG_MAGIC, last, id[0], id[1]]);
        sys::write_at(&file, &head, 0, "number the log")?;
        sys::allocate_blocks(&file, 0, LOG_RESERVE)?;
        sys::sync_data(&file, "sync the log's number")?;
        Ok(Log {
            file,
            end: LOG_HEAD,
            last,
            targets: Targets::new(folder.try_clone()?),
            pending: Vec::new(),
            last_bytes: (0, 0),
            in_place: 0,
            id,
        })
    }

    /// A commit begins (before anything is written in place).
    pub(super) fn begin(&mut self) {
        self.in_place = 0;
    }

    /// What the last commit appended to the log, and wrote in place (bytes).
    pub(super) fn last_commit_bytes(&self) -> (u64, u64) {
        self.last_bytes
    }

    /// Writes `len` bytes of the store's mapping at `addr` to `target` at `offset`, in place
    /// (a chunk made since the last commit, which no commit holds yet); synced by
    /// [`sync_in_place`](Self::sync_in_place) before the commit point.
    pub(super) fn write_in_place(
        &mut self,
        target: Target,
        offset: u64,
        addr: usize,
        len: usize,
    ) -> io::Result<()> {
        let Some(file) = self.targets.file(target)? else {
            return Ok(());
        };
        sys::io_point("write new pages in place")?;
        // SAFETY: `[addr, addr + len)` is a mapped view of the store (the caller holds the
        // store's locks: it stays mapped); the kernel reads it.
        unsafe { sys::write_from(file, addr as *const u8, len, offset) }?;
        self.in_place += len as u64;
        Ok(())
    }

    /// Syncs what [`write_in_place`](Self::write_in_place) wrote to `target` (with its
    /// length and holes).
    pub(super) fn sync_in_place(&mut self, target: Target) -> io::Result<()> {
        let Some(file) = self.targets.file(target)? else {
            return Ok(());
        };
        sys::io_point("sync new pages")?;
        file.sync_all()?;
        #[cfg(test)]
        sys::faults::synced(file);
        Ok(())
    }

    /// Writes commit `seq` of `changes`: records, sync, end record, sync (the commit point),
    /// then applies it to the files. `committed` is set once the commit point is passed; an
    /// error before leaves the log as it was (the commit did not happen), an error after is
    /// logged and the files are mended by the next checkpoint or the next open's replay.
    pub(super) fn commit(
        &mut self,
        seq: u64,
        changes: &Changes,
        committed: &mut bool,
    ) -> io::Result<()> {
        debug_assert_eq!(seq, self.last + 1, "commits are numbered in turn");
        let begin = self.end;
        let written = self.write(seq, changes);
        let (records, end) = match written {
            Ok(written) => written,
            Err(e) => {
                // Nothing of this commit counts: its first word goes (a record written but
                // not synced might otherwise reach the disk later).
                let cut = sys::write_at(&self.file, &[0; 24], begin, "cut the log back")
                    .and_then(|()| sys::sync_data(&self.file, "sync the cut log"));
                if let Err(cut) = cut {
                    crate::logging::report!(
                        error,
                        "mmapvec: a failed commit could not be cut from the log ({cut}): the \
                         store may open at it"
                    );
                }
                return Err(e);
            }
        };
        *committed = true;
        self.last_bytes = (end - begin, self.in_place);
        self.end = end;
        self.last = seq;
        // Copied into the files by the next checkpoint (or the next open's replay): the
        // files are read only then, and a page changed by several commits is copied once.
        self.pending.push(records);
        Ok(())
    }

    /// Appends the records of commit `seq` and its end record, each synced; the records, with
    /// where their data lies in the log, and where the commit ends.
    fn write(&mut self, seq: u64, changes: &Changes) -> io::Result<(Vec<Record>, u64)> {
        let begin = self.end;
        let mut at = begin;
        let nonce = uuid::Uuid::new_v4().as_u64_pair().0;
        let mut buffer = words_bytes(&[BEGIN, seq, nonce]);
        let mut records = Vec::with_capacity(changes.records.len());
        let flush = |buffer: &mut Vec<u8>, at: &mut u64| -> io::Result<()> {
            sys::write_at(&self.file, buffer, *at, "write the log")?;
            *at += buffer.len() as u64;
            buffer.clear();
            Ok(())
        };
        for (kind, target, offset, source) in &changes.records {
            let len = match source {
                Source::Memory(_, len) => *len as u64,
                Source::Bytes(bytes) => bytes.len() as u64,
                Source::None(len) => *len,
            };
            let [t0, t1, t2] = target.words();
            buffer.extend_from_slice(&words_bytes(&[*kind, t0, t1, t2, *offset, len]));
            let data = at + buffer.len() as u64;
            match source {
                Source::Memory(addr, len) => {
                    flush(&mut buffer, &mut at)?;
                    sys::io_point("write pages to the log")?;
                    // SAFETY: `[addr, addr + len)` is a mapped view of the store (the caller
                    // holds the store's locks: it stays mapped); the kernel reads it.
                    unsafe { sys::write_from(&self.file, *addr as *const u8, *len, at) }?;
                    at += *len as u64;
                }
                Source::Bytes(bytes) => {
                    buffer.extend_from_slice(bytes);
                    buffer.resize(buffer.len().next_multiple_of(8), 0);
                    if buffer.len() >= 1 << 20 {
                        flush(&mut buffer, &mut at)?;
                    }
                }
                Source::None(_) => {}
            }
            records.push(Record {
                kind: *kind,
                target: *target,
                offset: *offset,
                len,
                data,
            });
        }
        flush(&mut buffer, &mut at)?;
        // One sync for the records and the end record: the end record's sum covers the
        // records, so that a power loss that kept the end record and not all of them leaves
        // a commit that does not check.
        sys::io_point("sum the commit")?;
        let sum = commit_sum(&self.file, seq, begin, at)?;
        sys::write_at(
            &self.file,
            &words_bytes(&[END, seq, begin, sum]),
            at,
            "write the commit record",
        )?;
        sys::sync_data(&self.file, "sync the commit record")?;
        Ok((records, at + 32))
    }

    /// Whether the log should be applied, synced and emptied now.
    pub(super) fn wants_checkpoint(&self) -> bool {
        self.end >= CHECKPOINT_AT
    }

    /// Copies the log's commits into the files, syncs them, then empties the log (its first
    /// words say that the files hold the last commit): the files alone hold it. A failure
    /// leaves the log as it is (the next checkpoint, or open, copies it all again). Returns
    /// whether the log was emptied now (it may have been already).
    pub(super) fn checkpoint(&mut self) -> io::Result<bool> {
        if self.end == LOG_HEAD {
            return Ok(false);
        }
        self.targets.apply_all(&self.file, &self.pending)?;
        self.targets.sync()?;
        self.pending.clear();
        sys::write_at(
            &self.file,
            &words_bytes(&[LOG_MAGIC, self.last, self.id[0], self.id[1]]),
            0,
            "empty the log",
        )?;
        sys::sync_data(&self.file, "sync the emptied log")?;
        self.end = LOG_HEAD;
        // What a large commit grew it by goes back (what is left is never read: its commits
        // are numbered below the log's).
        if self.file.metadata()?.len() > LOG_RESERVE {
            let _ = self.file.set_len(LOG_RESERVE);
        }
        Ok(true)
    }
}

/// The files records go to, opened as they are first needed (a segment's file may be gone:
/// a later commit freed it).
#[derive(Debug)]
struct Targets {
    folder: Folder,
    segs: Option<Folder>,
    open: HashMap<Target, Option<File>>,
}

impl Targets {
    fn new(folder: Folder) -> Targets {
        Targets {
            folder,
            segs: None,
            open: HashMap::new(),
        }
    }

    /// The file of `target`; `None` for a segment whose file is gone.
    fn file(&mut self, target: Target) -> io::Result<Option<&File>> {
        if !self.open.contains_key(&target) {
            let name = match target {
                Target::Header => HEADER.into(),
                Target::Small => SMALL.into(),
                Target::SmallMeta => SMALL_META.into(),
                Target::Manifest => MANIFEST.into(),
                Target::Seg(name) => name.file_name(),
            };
            let file = match target {
                Target::Header | Target::Small | Target::SmallMeta => {
                    Some(self.folder.file(&name, Access::Write, false)?)
                }
                Target::Manifest | Target::Seg(_) => {
                    if self.segs.is_none() {
                        self.segs = Some(self.folder.dir(SEGS)?);
                    }
                    let segs = self.segs.as_ref().expect("just opened");
                    match segs.file(&name, Access::Write, false) {
                        Ok(file) => Some(file),
                        Err(e) if e.kind() == io::ErrorKind::NotFound => match target {
                            Target::Manifest => Some(segs.file(&name, Access::Write, true)?),
                            _ => None,
                        },
                        Err(e) => return Err(e),
                    }
                }
            };
            self.open.insert(target, file);
        }
        Ok(self.open[&target].as_ref())
    }

    /// Carries out the records of `commits` (in their order; their data is in `log`): each
    /// page of the store's data (the header, the chunks, the segments) once, as the last
    /// commit that wrote it has it, in runs as long as the log holds them in a row; the
    /// lengths set, the largest; the small blocks' metadata and the list of segments as the
    /// last commit wrote them (each commit writes them whole).
    fn apply_all(&mut self, log: &File, commits: &[Vec<Record>]) -> io::Result<()> {
        let page = sys::page_size() as u64;
        let mut pages: std::collections::BTreeMap<(Target, u64), u64> = Default::default();
        let mut lengths: HashMap<Target, u64> = HashMap::new();
        let mut ordered: Vec<Record> = Vec::new();
        for (i, records) in commits.iter().enumerate() {
            let last = i + 1 == commits.len();
            for &record in records {
                match (record.kind, record.target) {
                    (SET_LEN, target) => {
                        let len = lengths.entry(target).or_default();
                        *len = (*len).max(record.offset);
                    }
                    (_, Target::SmallMeta | Target::Manifest) => {
                        if last {
                            ordered.push(record);
                        }
                    }
                    (_, target) if record.offset % page == 0 && record.len % page == 0 => {
                        for n in 0..record.len / page {
                            pages
                                .insert((target, record.offset + n * page), record.data + n * page);
                        }
                    }
                    // Not whole pages (no record of this version makes such): in order.
                    _ => ordered.push(record),
                }
            }
        }
        let mut runs: Vec<Record> = Vec::new();
        for ((target, offset), data) in pages {
            match runs.last_mut() {
                Some(run)
                    if run.target == target
                        && run.offset + run.len == offset
                        && run.data + run.len == data =>
                {
                    run.len += page;
                }
                _ => runs.push(Record {
                    kind: WRITE,
                    target,
                    offset,
                    len: page,
                    data,
                }),
            }
        }
        let lengths = lengths.into_iter().map(|(target, len)| Record {
            kind: SET_LEN,
            target,
            offset: len,
            len: 0,
            data: 0,
        });
        let all: Vec<Record> = lengths.chain(runs).chain(ordered).collect();
        self.apply(log, &all)
    }

    /// Carries out `records`, whose data is in `log`.
    fn apply(&mut self, log: &File, records: &[Record]) -> io::Result<()> {
        for record in records {
            let Some(file) = self.file(record.target)? else {
                continue;
            };
            match record.kind {
                WRITE => {
                    sys::io_point("copy a record into its file")?;
                    sys::copy_between(log, record.data, file, record.offset, record.len)?;
                }
                SET_LEN => {
                    if file.metadata()?.len() < record.offset {
                        sys::set_len(file, record.offset, "extend a file")?;
                    }
                }
                _ => unreachable!("records are checked when read"),
            }
        }
        Ok(())
    }

    /// Syncs every file opened (those records went to since the last checkpoint), and
    /// forgets them.
    fn sync(&mut self) -> io::Result<()> {
        for file in self.open.values().flatten() {
            sys::sync_data(file, "sync a file of the store")?;
        }
        if let Some(segs) = &self.segs {
            sys::io_point("sync the segments' folder")?;
            segs.sync()?;
        }
        self.open.clear();
        Ok(())
    }
}

/// What [`replay`] found in a store's log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(super) struct Replayed {
    /// Commits copied into the files.
    pub(super) commits: u64,
    /// Bytes after the last complete commit: a commit that did not reach its commit point.
    pub(super) dropped: u64,
}

/// Reads a word of `log` at `at`; `None` past its end.
fn word_at(log: &File, at: u64, len: u64) -> io::Result<Option<u64>> {
    if at.checked_add(8).is_none_or(|end| end > len) {
        return Ok(None);
    }
    let mut bytes = [0u8; 8];
    log.read_exact_at(&mut bytes, at)?;
    Ok(Some(u64::from_ne_bytes(bytes)))
}

/// What [`read_commit`] found.
enum Parsed {
    /// A commit with its end record: its records, and where it ends.
    Complete(Vec<Record>, u64),
    /// The commit expected began there, without its end record (up to the byte given): a
    /// commit that did not reach its commit point.
    Unfinished(u64),
    /// No commit of the number expected.
    Nothing,
}

/// The commit numbered `seq` at `at` of `log` (`len` bytes), if it is there.
fn read_commit(log: &File, at: u64, len: u64, seq: u64) -> io::Result<Parsed> {
    if (word_at(log, at, len)?, word_at(log, at + 8, len)?) != (Some(BEGIN), Some(seq)) {
        return Ok(Parsed::Nothing);
    }
    let mut records = Vec::new();
    let mut pos = at + BEGIN_WORDS * 8;
    loop {
        let Some(kind) = word_at(log, pos, len)? else {
            return Ok(Parsed::Unfinished(pos));
        };
        if kind == END {
            let rest = [word_at(log, pos + 8, len)?, word_at(log, pos + 16, len)?];
            let sum = word_at(log, pos + 24, len)?;
            let ok = rest == [Some(seq), Some(at)]
                && sum.is_some_and(|sum| commit_sum(log, seq, at, pos).is_ok_and(|s| s == sum));
            return Ok(match ok {
                true => Parsed::Complete(records, pos + 32),
                false => Parsed::Unfinished(pos),
            });
        }
        if ![WRITE, SET_LEN].contains(&kind) || pos + (HEAD * 8) as u64 > len {
            return Ok(Parsed::Unfinished(pos));
        }
        let mut head = [0u8; HEAD * 8];
        log.read_exact_at(&mut head, pos)?;
        let w = |i: usize| u64::from_ne_bytes(head[i * 8..i * 8 + 8].try_into().expect("8"));
        let Some(target) = Target::from_words([w(1), w(2), w(3)]) else {
            return Ok(Parsed::Unfinished(pos));
        };
        let (offset, rec_len) = (w(4), w(5));
        let data = pos + (HEAD * 8) as u64;
        let mut next = data;
        if kind == WRITE {
            match rec_len
                .checked_next_multiple_of(8)
                .and_then(|n| data.checked_add(n))
                .filter(|&n| n <= len)
            {
                Some(n) => next = n,
                None => return Ok(Parsed::Unfinished(pos)),
            }
        }
        records.push(Record {
            kind,
            target,
            offset,
            len: rec_len,
            data,
        });
        pos = next;
    }
}

/// Copies every complete commit of the store's log into its files, in order, syncs them and
/// empties the log. Run by an open before anything else is read (the header is one of the
/// files), with the store's lock held for writing.
pub(super) fn replay(folder: &Folder, id: [u64; 2]) -> io::Result<Replayed> {
    let log = match folder.file(LOG.as_ref(), Access::Write, false) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Replayed::default()),
        other => other?,
    };
    let len = log.metadata()?.len();
    // Never numbered (no commit was written to it), or another store's.
    let Some(first) = head(&log, id)? else {
        return Ok(Replayed::default());
    };
    let mut targets = Targets::new(folder.try_clone()?);
    let (mut at, mut seq, mut dropped) = (LOG_HEAD, first, 0);
    let mut complete = Vec::new();
    loop {
        match read_commit(&log, at, len, seq)? {
            Parsed::Complete(records, end) => {
                complete.push(records);
                seq += 1;
                at = end;
            }
            Parsed::Unfinished(end) => {
                dropped = end - at;
                break;
            }
            Parsed::Nothing => break,
        }
    }
    let commits = complete.len() as u64;
    if commits > 0 {
        targets.apply_all(&log, &complete)?;
    }
    if commits > 0 {
        targets.sync()?;
        let emptied = words_bytes(&[LOG_MAGIC, seq - 1, id[0], id[1]]);
        sys::write_at(&log, &emptied, 0, "empty the log after replay")?;
        sys::sync_data(&log, "sync the emptied log")?;
    }
    Ok(Replayed { commits, dropped })
}

/// The number of the first commit of `log`, from its head: `None` if it has none (never
/// numbered), or is another store's (its id is not `id`: a log copied in from elsewhere).
fn head(log: &File, id: [u64; 2]) -> io::Result<Option<u64>> {
    let len = log.metadata()?.len();
    let mut words = [None; 4];
    for (i, word) in words.iter_mut().enumerate() {
        *word = word_at(log, i as u64 * 8, len)?;
    }
    let [Some(LOG_MAGIC), Some(last), Some(id0), Some(id1)] = words else {
        return Ok(None);
    };
    if [id0, id1] != id {
        crate::logging::report!(
            warn,
            "mmapvec: a store's log is another store's (its id differs): not replayed"
        );
        return Ok(None);
    }
    last.checked_add(1)
        .map(Some)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "the log's number is damaged"))
}

/// Whether the store in `folder` has a log with a complete commit in it, which a reader
/// cannot replay: it takes the writer's lock for that. (An unfinished commit needs nothing.)
pub(super) fn log_is_empty(folder: &Folder, id: [u64; 2]) -> io::Result<bool> {
    let log = match folder.file(LOG.as_ref(), Access::Read, false) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(true),
        other => other?,
    };
    let len = log.metadata()?.len();
    let Some(first) = head(&log, id)? else {
        return Ok(true);
    };
    Ok(!matches!(
        read_commit(&log, LOG_HEAD, len, first)?,
        Parsed::Complete(..)
    ))
}
