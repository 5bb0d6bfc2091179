//! The crate's log messages, kept from running into themselves.
//!
//! A logger may allocate, and through this very allocator (a logger writing into an
//! `MmapVec`, or a program whose global state lives in one). An allocation failure is logged;
//! if the logger's own allocation then fails, it is logged again, and so on until the stack
//! runs out. So a message that the crate logs while a message of this thread is being logged
//! already is dropped.
//!
//! The crate's locks are a second hazard: a logger that allocates must not run while the
//! thread holds a lock that allocation takes. Code that fails under such a lock keeps its
//! message and logs it once the lock is released (see `arena::log_later`).

use std::cell::Cell;

thread_local! {
    /// This thread is in the logger, for a message of the crate's.
    static LOGGING: Cell<bool> = const { Cell::new(false) };
}

/// Runs `log` (which logs one message) unless this thread is logging a message of the
/// crate's already, or is being torn down.
pub(crate) fn guarded(log: impl FnOnce()) {
    struct Reset;
    impl Drop for Reset {
        fn drop(&mut self) {
            let _ = LOGGING.try_with(|logging| logging.set(false));
        }
    }
    if LOGGING.try_with(|logging| logging.replace(true)) != Ok(false) {
        return;
    }
    // Reset even if the logger panics.
    let _reset = Reset;
    log();
}

/// `log::$level!(...)`, through [`guarded`].
macro_rules! report {
    ($level:ident, $($arg:tt)+) => {
        $crate::logging::guarded(|| log::$level!($($arg)+))
    };
}
pub(crate) use report;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_logged_while_logging_is_dropped() {
        let mut outer = 0;
        let mut inner = 0;
        guarded(|| {
            outer += 1;
            guarded(|| inner += 1);
        });
        guarded(|| outer += 1);
        assert_eq!((outer, inner), (2, 0));
    }
}
