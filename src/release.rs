//! Releasing freed segments on a background thread, when the builder asks for it.
//!
//! Closing the last descriptor of a file with reserved blocks frees those blocks. On ext4
//! mounted with `discard` (common on cloud VMs) that waits for the device's discard: measured
//! 1.3 to 3 ms per segment, against 20 µs without `discard`. With
//! [`Builder::release_in_background`](crate::Builder::release_in_background) the segment is
//! handed to one thread that unmaps and closes it, so `deallocate` returns at once.
//!
//! A child made by `fork` has no such thread (`fork` copies only the calling thread), and the
//! parent's channel may have been in use by the parent's thread at the moment of the fork. So
//! the queue belongs to one fork generation: a child starts a thread and channel of its own at
//! its first release and never touches the inherited ones (segments that were waiting in them
//! stay mapped in the child; the parent releases its own).

use std::any::Any;
use std::sync::mpsc::{self, SyncSender, TrySendError};
use std::sync::{Mutex, MutexGuard};

use crate::fork;
use crate::segment::Segment;

/// Segments waiting to be released at most. Past it the caller releases its segment itself, so
/// the descriptors and disk blocks held on behalf of freed segments stay bounded.
const MAX_PENDING: usize = 64;

/// This generation's channel to its release thread (`None`: the thread could not start).
struct Queue {
    generation: u64,
    sender: Option<SyncSender<Segment>>,
}

static QUEUE: Mutex<Option<Queue>> = Mutex::new(None);

fn queue() -> MutexGuard<'static, Option<Queue>> {
    // Every change is a single assignment: a poisoned lock is still consistent.
    QUEUE.lock().unwrap_or_else(|e| e.into_inner())
}

/// The release queue's part in the fork handlers (a layer, see `fork::install`): no thread
/// may hold the queue's lock at the moment of a fork.
pub(crate) struct ForkLayer;

/// The layer given to `fork::install`.
pub(crate) static FORK: ForkLayer = ForkLayer;

impl fork::ForkLocks for ForkLayer {
    fn lock_for_fork(&'static self, held: &mut Vec<Box<dyn Any>>, _epoch: u64) {
        held.push(Box::new(queue()));
    }
}

fn start() -> Queue {
    let (sender, receiver) = mpsc::sync_channel::<Segment>(MAX_PENDING);
    let spawned = std::thread::Builder::new()
        .name("mmapvec-release".into())
        .spawn(move || receiver.into_iter().for_each(drop));
    Queue {
        generation: fork::generation(),
        sender: spawned.ok().map(|_| sender),
    }
}

/// Unmaps and closes `segment` on the release thread, or right here when the queue is full or
/// the thread could not be started.
pub(crate) fn release_in_background(segment: Segment) {
    let sender = {
        let mut queue = queue();
        match queue.as_ref() {
            Some(q) if q.generation == fork::generation() => {}
            // Another generation's (the parent's, in a fork child): its channel may be in any
            // state and its thread does not run here. Leave it alone for good.
            Some(_) => std::mem::forget(queue.replace(start())),
            None => *queue = Some(start()),
        }
        queue.as_ref().and_then(|q| q.sender.clone())
    };
    match sender {
        Some(sender) => match sender.try_send(segment) {
            Ok(()) => {}
            Err(TrySendError::Full(segment) | TrySendError::Disconnected(segment)) => drop(segment),
        },
        None => drop(segment),
    }
}
