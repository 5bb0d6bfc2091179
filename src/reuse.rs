//! The large tier's reuse of freed segments.
//!
//! A create / fill / drop loop over large vectors or hash tables would otherwise create a file,
//! reserve its blocks, fault in fresh page-cache pages and give the blocks back (on ext4 with
//! `discard`, a wait for the device) at every turn. Freed segments are kept instead, mapped and
//! with their pages, and handed to the next large request they fit, the way jemalloc keeps
//! dirty pages:
//!
//! * **Bounded** in bytes ([`Builder::reuse_bytes`](crate::Builder::reuse_bytes), 0 turns reuse
//!   off) and in number (32: each holds a mapping and a descriptor); a segment larger than half
//!   the bound is never kept, nor one that keeps its file name (past the descriptor budget).
//!   Past the bounds the oldest go.
//! * **Decaying**: a segment kept longer than [`DECAY`] is released, at the next allocation or
//!   free of the allocator or by the [`timer`] thread, whichever comes first, so a burst does
//!   not hold disk and page cache for long (an allocator that is only read from afterwards
//!   included), and freed data is released before writeback would write it to disk.
//! * **Fit**: the smallest kept segment at least as long as asked, aligned as asked, and not
//!   much longer (at most 4 times, or 8 MiB more), so a small long-lived block never pins a
//!   large file. A larger block than asked is what the `Allocator` contract allows.
//! * **Zeroed** requests take only a segment at most twice as long as asked, and zero it by
//!   hand (fresh segments are zero for free).
//! * **fork**: a segment that was live at a fork is never kept (a child may still map it and
//!   read its inherited data there); a child drops the kept segments it inherited without
//!   using them (the parent may reuse them).

pub(crate) mod slot;
pub(crate) mod timer;

use std::any::Any;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::fork;
use crate::segment::Segment;
use crate::sys;

/// How long a freed segment is kept for reuse at most.
pub(crate) const DECAY: Duration = Duration::from_secs(1);

/// How many segments are kept at most: each holds a mapping (`vm.max_map_count`) and a
/// descriptor (counted against the descriptor budget).
const MAX_KEPT: usize = 32;

/// How much longer than asked a reused segment may be: 4 times, or this many bytes more.
const SLACK: usize = 8 << 20;

/// Freed segments kept for reuse.
pub(crate) struct ReuseCache {
    max_bytes: usize,
    state: Mutex<State>,
}

struct State {
    /// The fork generation the kept segments belong to (see the module doc).
    generation: u64,
    bytes: usize,
    /// By (length, arrival number): best fit is the first at or after the asked length.
    /// At most [`MAX_KEPT`], oldest first: a scan of a few dozen entries, and no allocation
    /// on any operation (capacity reserved up front).
    kept: Vec<Kept>,
    /// When decayed segments were last looked for (`sys::coarse_millis`).
    swept: u64,
    /// The [`timer`] watches the cache: set when it starts keeping segments, cleared by the
    /// timer when it keeps none.
    watched: bool,
}

struct Kept {
    /// When it was freed (`sys::coarse_millis`).
    since: u64,
    segment: Segment,
}

/// How often, at most, the kept segments are checked for decay.
const SWEEP_EVERY_MS: u64 = 100;

impl ReuseCache {
    /// A cache holding at most `max_bytes` of freed segments (0: none).
    pub(crate) fn new(max_bytes: usize) -> ReuseCache {
        ReuseCache {
            max_bytes,
            state: Mutex::new(State {
                generation: fork::generation(),
                bytes: 0,
                kept: Vec::new(),
                swept: 0,
                watched: false,
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // No change leaves the list and the byte count out of step across a panic point: a
        // poisoned lock is fine.
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.generation != fork::generation() {
            // Inherited through fork: the parent's to reuse, not ours. Dropped: an inherited
            // segment's drop only unmaps this process's view and closes its descriptor, it
            // never resizes or removes the parent's file.
            state.generation = fork::generation();
            state.bytes = 0;
            state.watched = false;
            drop(std::mem::take(&mut state.kept));
        }
        state
    }

    /// Locks the cache for a `fork` (see `fork::ForkLocks`).
    pub(crate) fn lock_for_fork(&'static self, held: &mut Vec<Box<dyn Any>>) {
        held.push(Box::new(
            self.state.lock().unwrap_or_else(|e| e.into_inner()),
        ));
    }

    /// Whether reuse is on (`reuse_bytes` above 0).
    pub(crate) fn is_on(&self) -> bool {
        self.max_bytes > 0
    }

    /// Whether a freed `segment` may be kept: reuse is on, it is at most half the bound, it
    /// holds its descriptor (a named one could have had its file replaced, and holds no
    /// descriptor to save anyway), and no fork child may map it (see the module doc).
    pub(crate) fn may_keep(&self, segment: &Segment) -> bool {
        segment.len() <= self.max_bytes / 2
            && segment.holds_descriptor()
            && !segment.may_be_shared()
            && !segment.is_inherited()
    }

    /// Segments and bytes kept now.
    pub(crate) fn kept(&self) -> (usize, usize) {
        if self.max_bytes == 0 {
            return (0, 0);
        }
        let state = self.state();
        (state.kept.len(), state.bytes)
    }

    /// A kept segment for `len` bytes (page-rounded) at an address aligned to `align`, taken
    /// out of the cache; zeroed first if asked. Segments that decayed are moved to `expired`
    /// for the caller to release (outside the lock).
    pub(crate) fn take(
        &self,
        len: usize,
        align: usize,
        zeroed: bool,
        expired: &mut Vec<Segment>,
    ) -> Option<Segment> {
        if self.max_bytes == 0 {
            return None;
        }
        let mut state = self.state();
        state.expire(sys::coarse_millis(), expired);
        // The smallest that fits (the newest of equals: its pages are the warmest).
        let (at, _) = state
            .kept
            .iter()
            .enumerate()
            .filter(|(_, k)| {
                let (have, at) = (k.segment.len(), k.segment.ptr().as_ptr().addr());
                fits(have, at, len, align, zeroed)
            })
            .min_by_key(|&(i, k)| (k.segment.len(), usize::MAX - i))?;
        let kept = state.kept.remove(at);
        state.bytes -= kept.segment.len();
        drop(state);
        let mut segment = kept.segment;
        segment.restamp();
        if zeroed {
            // SAFETY: the segment is ours alone again (out of the cache, not handed out yet):
            // its whole mapping is writable and nothing else refers to it.
            unsafe { segment.ptr().as_ptr().write_bytes(0, segment.len()) };
        }
        Some(segment)
    }

    /// Keeps a freed segment for reuse, or gives it back (`Some`) when it cannot be kept.
    /// Segments pushed out (past the bound, or decayed) go to `expired`. The first segment
    /// kept has the [`timer`] watch the cache.
    pub(crate) fn put(
        self: &Arc<Self>,
        segment: Segment,
        expired: &mut Vec<Segment>,
    ) -> Option<Segment> {
        let len = segment.len();
        if !self.may_keep(&segment) {
            return Some(segment);
        }
        let mut state = self.state();
        let watch = !std::mem::replace(&mut state.watched, true);
        let now = sys::coarse_millis();
        state.expire(now, expired);
        while !state.kept.is_empty()
            && (state.bytes + len > self.max_bytes || state.kept.len() >= MAX_KEPT)
        {
            let oldest = state.kept.remove(0);
            state.bytes -= oldest.segment.len();
            expired.push(oldest.segment);
        }
        if state.kept.capacity() == 0 {
            state.kept.reserve_exact(MAX_KEPT);
        }
        state.bytes += len;
        state.kept.push(Kept {
            since: now,
            segment,
        });
        drop(state);
        if watch {
            timer::watch_cache(Arc::downgrade(self));
        }
        None
    }

    /// For the [`timer`]: releases the segments that decayed, under the cache's lock (so
    /// that an allocator's drop, which drains the cache, waits for them). `false` when none
    /// is kept any more: the timer stops watching the cache, which asks again when it next
    /// keeps one.
    pub(crate) fn expire(&self) -> bool {
        let mut state = self.state();
        state.swept = 0;
        let mut expired = Vec::new();
        state.expire(sys::coarse_millis(), &mut expired);
        drop(expired);
        state.watched = !state.kept.is_empty();
        state.watched
    }

    /// Every kept segment, for the allocator's drop.
    pub(crate) fn drain(&self, out: &mut Vec<Segment>) {
        let mut state = self.state();
        state.bytes = 0;
        out.extend(
            std::mem::take(&mut state.kept)
                .into_iter()
                .map(|k| k.segment),
        );
    }
}

/// Whether a kept segment of `have` bytes at `at` may serve a request for `len` bytes
/// (page-rounded) aligned to `align`: long enough, aligned, and not much longer (at most 4
/// times or [`SLACK`] more; twice for a zeroed request, which zeroes it by hand).
pub(crate) fn fits(have: usize, at: usize, len: usize, align: usize, zeroed: bool) -> bool {
    let longest = if zeroed {
        len.saturating_mul(2)
    } else {
        len.saturating_mul(4).max(len.saturating_add(SLACK))
    };
    have >= len && have <= longest && at.is_multiple_of(align)
}

impl State {
    fn expire(&mut self, now: u64, expired: &mut Vec<Segment>) {
        if self.kept.is_empty() || now.saturating_sub(self.swept) < SWEEP_EVERY_MS {
            return;
        }
        self.swept = now;
        let decay = DECAY.as_millis() as u64;
        // Oldest first: the decayed ones are a prefix.
        let old = self
            .kept
            .iter()
            .take_while(|k| now.saturating_sub(k.since) > decay)
            .count();
        for kept in self.kept.drain(..old) {
            self.bytes -= kept.segment.len();
            expired.push(kept.segment);
        }
    }
}
