//! `fork`ed children and the pipes that pace them, for the fault tests that fork.

// Each fork test uses a different part of this one.
#![allow(dead_code)]

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// Forks; the child runs `body` and `_exit`s with the code it returns (101 if it panics), so
/// no destructor of the parent's runs in the child. Returns the child's pid.
pub fn fork_with(body: impl FnOnce() -> i32) -> libc::pid_t {
    // SAFETY: fork has no memory preconditions. Callers run in a test process of their own
    // (`in_child`) whose other threads hold no lock the child needs (the harness's main thread
    // waits for the test; test threads are joined before forking); the child ends with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        let code = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body)).unwrap_or(101);
        // SAFETY: ends the child at once, without running the parent's destructors again.
        unsafe { libc::_exit(code) };
    }
    pid
}

/// Waits for a child and returns its wait status.
pub fn wait(pid: libc::pid_t) -> i32 {
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child with a valid status pointer.
        let ret = unsafe { libc::waitpid(pid, &mut status, 0) };
        if ret == pid {
            return status;
        }
        let err = io::Error::last_os_error();
        assert_eq!(
            err.kind(),
            io::ErrorKind::Interrupted,
            "waitpid {pid}: {err}"
        );
    }
}

/// A wait status in words: `exited 0`, `killed by signal 7 (SIGBUS)`.
pub fn describe(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exited {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        let name = match sig {
            libc::SIGBUS => "SIGBUS",
            libc::SIGSEGV => "SIGSEGV",
            libc::SIGABRT => "SIGABRT",
            libc::SIGKILL => "SIGKILL",
            _ => "?",
        };
        format!("killed by signal {sig} ({name})")
    } else {
        format!("status {status:#x}")
    }
}

pub fn exited_ok(status: i32) -> bool {
    libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0
}

/// A pipe `(read, write)`, close-on-exec.
pub fn pipe() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(ret, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: both descriptors were just opened by pipe2 and are owned by nothing else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

pub fn send(fd: &OwnedFd, bytes: &[u8]) {
    // SAFETY: writes from a valid buffer of `bytes.len()` bytes. Pipe writes this small are
    // atomic: all or nothing.
    let n = unsafe { libc::write(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
    assert_eq!(
        n,
        bytes.len() as isize,
        "write: {}",
        io::Error::last_os_error()
    );
}

/// Reads exactly `N` bytes, or `None` at end of file.
pub fn receive<const N: usize>(fd: &OwnedFd) -> Option<[u8; N]> {
    let mut buf = [0u8; N];
    let mut got = 0;
    while got < N {
        // SAFETY: reads into the unfilled rest of `buf`.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf[got..].as_mut_ptr().cast(), N - got) };
        match n {
            0 => return None,
            n if n > 0 => got += n as usize,
            _ if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted => {}
            _ => panic!("read: {}", io::Error::last_os_error()),
        }
    }
    Some(buf)
}

/// Polls `ok` every 10 ms for up to `limit`; whether it became true.
pub fn poll(limit: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    loop {
        if ok() {
            return true;
        }
        if start.elapsed() > limit {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
