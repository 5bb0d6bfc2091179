//! The reuse cache's clock: a thread that releases kept segments once they decay, so that an
//! allocator that stops allocating and freeing (a map that is only read from now on) does not
//! keep them for good.
//!
//! One thread per process, started when a cache first keeps a segment and ending when no cache
//! keeps any: it wakes every [`TICK`], and each cache it watches releases what decayed (see
//! [`ReuseCache::expire`]). It holds caches by `Weak` reference only, so it never keeps an
//! allocator alive, and a cache releases under its own lock, so an allocator's drop (which
//! drains its cache under that lock) returns only once the thread is done with its segments.
//!
//! A child made by `fork` has no such thread (`fork` copies only the calling thread): the
//! thread belongs to the process that started it, and a child starts its own when one of its
//! caches next keeps a segment.

use std::any::Any;
use std::sync::{Mutex, MutexGuard, Weak};
use std::time::Duration;

use super::{DECAY, ReuseCache};

/// How often the thread looks at the caches: half the decay, so a kept segment goes at most
/// one and a half decays after it was freed.
const TICK: Duration = Duration::from_millis(DECAY.as_millis() as u64 / 2);

/// The caches watched, and the process whose thread watches them.
struct Watch {
    /// The process id of the running thread's process; 0 when no thread runs.
    runs_in: u32,
    caches: Vec<Weak<ReuseCache>>,
}

static WATCH: Mutex<Watch> = Mutex::new(Watch {
    runs_in: 0,
    caches: Vec::new(),
});

fn watch() -> MutexGuard<'static, Watch> {
    // Pushes, swaps and assignments: a poisoned lock is still consistent.
    WATCH.lock().unwrap_or_else(|e| e.into_inner())
}

/// The decay thread's part in the fork handlers (a layer, see `fork::install`): no thread may
/// hold the watch's lock at the moment of a fork.
pub(crate) struct ForkLayer;

/// The layer given to `fork::install`.
pub(crate) static FORK: ForkLayer = ForkLayer;

impl crate::fork::ForkLocks for ForkLayer {
    fn lock_for_fork(&'static self, held: &mut Vec<Box<dyn Any>>, _epoch: u64) {
        held.push(Box::new(watch()));
    }
}

/// Has the thread watch `cache`, which has just started keeping segments (see
/// `ReuseCache::put`), starting the thread if none runs in this process. If it cannot start,
/// the cache's segments decay at its next use, as without the thread.
pub(crate) fn watch_cache(cache: Weak<ReuseCache>) {
    let mut watch = watch();
    watch.caches.push(cache);
    let me = std::process::id();
    if watch.runs_in == me {
        return;
    }
    if watch.runs_in != 0 {
        // Inherited from the parent through fork: its thread does not run here. The caches
        // it lists drop what they inherited at their next use, and ask again if they keep.
        watch.runs_in = 0;
        let cache = watch.caches.pop();
        watch.caches.clear();
        watch.caches.extend(cache);
    }
    let started = std::thread::Builder::new()
        .name("mmapvec-decay".into())
        .spawn(run);
    if started.is_ok() {
        watch.runs_in = me;
    }
}

/// The thread: every tick, each watched cache releases what decayed; a cache that keeps
/// nothing more leaves the list (it asks again when it next keeps a segment); the thread ends
/// with an empty list.
fn run() {
    loop {
        std::thread::sleep(TICK);
        let caches = std::mem::take(&mut watch().caches);
        let still: Vec<_> = caches
            .into_iter()
            .filter(|cache| cache.upgrade().is_some_and(|cache| cache.expire()))
            .collect();
        let mut watch = watch();
        watch.caches.extend(still);
        if watch.caches.is_empty() {
            watch.runs_in = 0;
            return;
        }
    }
}
