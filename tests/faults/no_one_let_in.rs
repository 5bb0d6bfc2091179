//! No one let in: private modes, random names, no symlink followed, no file of someone else's
//! resized, and what a `fork`ed child sees.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Path, PathBuf};

use mmapvec::{MmapAllocator, MmapVec, mmap_vec};

use crate::support::{TestDir, euid, files_under, in_child, is_uuid_v4, names_in, skip};

/// The segment files of named segments in `dir` (they sit in a session folder).
fn named_files(dir: &TestDir) -> Vec<PathBuf> {
    files_under(&dir.segment_folder())
}

/// Panics unless `err` names `path`.
#[track_caller]
fn assert_names(err: &io::Error, path: &Path) {
    let path = path.to_str().expect("utf-8 path");
    assert!(
        err.to_string().contains(path),
        "{err:?} does not name {path}"
    );
}

#[test]
fn segment_files_are_0600_and_folders_0700() {
    let dir = TestDir::new("modes");
    let named = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .descriptor_budget(0)
        .build()
        .unwrap();
    let held = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .build()
        .unwrap();
    let v = mmap_vec![in named.clone(); 1u8; 5000];
    let w = mmap_vec![in held.clone(); 2u8; 5000];

    let folder = dir.segment_folder();
    let mode = |p: &Path| fs::symlink_metadata(p).unwrap().permissions().mode();
    assert_eq!(mode(&folder) & 0o7777, 0o700, "crate folder");
    let files = named_files(&dir);
    assert_eq!(files.len(), 1, "{files:?}");
    let session = files[0].parent().unwrap();
    assert_eq!(mode(session) & 0o7777, 0o700, "session folder");
    assert_eq!(mode(&files[0]) & 0o7777, 0o600, "named segment file");
    assert_eq!(fs::metadata(&files[0]).unwrap().uid(), euid());
    assert!(is_uuid_v4(&files[0].file_name().unwrap().to_string_lossy()));

    // The held segment's file has no name; its descriptor shows the same mode, and it is
    // close-on-exec, so no program this process starts inherits it.
    let prefix = format!("{}/", folder.display());
    let mut held_fds = 0;
    for entry in fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = fs::read_link(entry.path()) else {
            continue;
        };
        let target = target.to_string_lossy();
        if !(target.starts_with(&prefix) && target.ends_with(" (deleted)")) {
            continue;
        }
        held_fds += 1;
        let meta = fs::metadata(entry.path()).unwrap();
        assert_eq!(meta.permissions().mode() & 0o7777, 0o600, "{target}");
        let fd = entry.file_name().to_string_lossy().into_owned();
        let info = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).unwrap();
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .unwrap()
            .trim();
        let flags = i32::from_str_radix(flags, 8).unwrap();
        assert_ne!(flags & libc::O_CLOEXEC, 0, "{target} is not close-on-exec");
    }
    assert_eq!(held_fds, 1, "one held segment");
    drop((v, w));
}

#[test]
fn segment_names_are_distinct_uuid_v4() {
    let dir = TestDir::new("names");
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .descriptor_budget(0)
        .build()
        .unwrap();
    let vectors: Vec<MmapVec<u8>> = (0..300)
        .map(|_| mmap_vec![in alloc.clone(); 0u8; 1])
        .collect();
    let names: HashSet<String> = named_files(&dir)
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), vectors.len());
    assert!(names.iter().all(|n| is_uuid_v4(n)), "{names:?}");
}

#[test]
fn symlink_where_the_crate_folder_goes_is_refused() {
    for dangling in [false, true] {
        let base = TestDir::new("symlink");
        let elsewhere = TestDir::new("elsewhere");
        let target = if dangling {
            elsewhere.path().join("not-yet")
        } else {
            elsewhere.path().into()
        };
        let folder = base.segment_folder();
        symlink(&target, &folder).unwrap();

        let err = MmapAllocator::builder()
            .small_threshold(0)
            .dir(base.path())
            .build()
            .unwrap_err();
        assert_names(&err, &folder);
        // The lazily prepared default path refuses too, at the first allocation.
        let lazy = MmapAllocator::builder()
            .small_threshold(0)
            .creator(mmapvec::DirCreator::new(base.path()))
            .build();
        let lazy = lazy.unwrap();
        let mut v = MmapVec::<u8>::new_in(lazy.clone());
        assert!(v.try_reserve(10).is_err());
        assert_names(&lazy.take_last_error().unwrap(), &folder);

        assert!(
            fs::symlink_metadata(&folder)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(
            names_in(elsewhere.path()),
            Vec::<String>::new(),
            "written through the link"
        );
    }
}

#[test]
fn crate_folder_open_to_others_is_refused() {
    for mode in [0o755, 0o770, 0o701] {
        let base = TestDir::new("open");
        let folder = base.segment_folder();
        fs::create_dir(&folder).unwrap();
        fs::set_permissions(&folder, fs::Permissions::from_mode(mode)).unwrap();
        let err = MmapAllocator::builder()
            .small_threshold(0)
            .dir(base.path())
            .build()
            .unwrap_err();
        assert_eq!(
            err.kind(),
            io::ErrorKind::PermissionDenied,
            "{mode:o}: {err}"
        );
        assert_names(&err, &folder);
        assert_eq!(names_in(&folder), Vec::<String>::new());
    }
}

#[test]
fn crate_folder_of_another_user_is_refused() {
    if euid() != 0 {
        skip!("needs root to give a folder to another user");
    }
    let base = TestDir::new("owner");
    let folder = base.segment_folder();
    fs::create_dir(&folder).unwrap();
    fs::set_permissions(&folder, fs::Permissions::from_mode(0o700)).unwrap();
    std::os::unix::fs::chown(&folder, Some(65534), Some(65534)).unwrap();
    let err = MmapAllocator::builder()
        .small_threshold(0)
        .dir(base.path())
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), io::ErrorKind::PermissionDenied, "{err}");
    assert_names(&err, &folder);
    assert_eq!(names_in(&folder), Vec::<String>::new());
}

#[test]
fn a_replaced_segment_file_is_never_resized_nor_removed() {
    let dir = TestDir::new("replaced");
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .descriptor_budget(0)
        .build()
        .unwrap();
    let victim_content = b"someone else's file".repeat(10);
    let victim = dir.path().join("victim");
    for swap_in_symlink in [false, true] {
        fs::write(&victim, &victim_content).unwrap();
        let mut v = mmap_vec![in alloc.clone(); 9u8; 5000];
        let files = named_files(&dir);
        assert_eq!(files.len(), 1, "{files:?}");
        let segment = &files[0];
        // Someone puts another file (or a link to one) where the segment's name is.
        let planted = dir.path().join("planted");
        if swap_in_symlink {
            symlink(&victim, &planted).unwrap();
        } else {
            fs::copy(&victim, &planted).unwrap();
        }
        fs::rename(&planted, segment).unwrap();

        let failures = alloc.stats().failures;
        assert!(
            v.try_reserve(1 << 20).is_err(),
            "grew through a planted file"
        );
        let after = alloc.stats().failures;
        assert_eq!(after.total(), failures.total() + 1);
        if !swap_in_symlink {
            assert_eq!(after.file_replaced, failures.file_replaced + 1, "{after:?}");
        }
        println!(
            "planted symlink {swap_in_symlink}: {:?}",
            alloc.take_last_error()
        );
        // The vector keeps its bytes (the mapping holds the old file).
        assert!(v.iter().all(|&b| b == 9));
        assert_eq!(v.len(), 5000);
        drop(v);
        // Neither the planted file nor the file behind the link was changed or removed.
        assert_eq!(fs::read(&victim).unwrap(), victim_content);
        let planted_meta = fs::symlink_metadata(segment).expect("the planted name was removed");
        assert_eq!(planted_meta.file_type().is_symlink(), swap_in_symlink);
        if !swap_in_symlink {
            assert_eq!(fs::read(segment).unwrap(), victim_content);
        }
        fs::remove_file(segment).unwrap();
    }
}

/// Whether `maps` (the text of `/proc/<pid>/maps`, after a newline) has a shared read-write
/// mapping (`rw-s`, a segment's view) starting where `needle` (`"\n<start>-"`) says. Slices only,
/// no allocation: it runs in a `fork`ed child.
fn shared_view_at(maps: &[u8], needle: &[u8]) -> bool {
    (0..maps.len().saturating_sub(needle.len())).any(|at| {
        let Some(rest) = maps[at..].strip_prefix(needle) else {
            return false;
        };
        // `<end> <perms> ...`: the permissions follow the first space.
        let Some(space) = rest.iter().position(|&b| b == b' ') else {
            return false;
        };
        rest[space + 1..].starts_with(b"rw-s")
    })
}

/// Whether a `fork`ed child of this process has the shared view of a segment starting at
/// `addr` (with `dont_fork` it may have an inaccessible reservation there instead); if
/// `write` is given, the child first writes that byte at `addr`.
fn child_sees_mapping(addr: usize, write: Option<u8>) -> bool {
    // Everything the child needs is made before `fork`: in a child of a threaded process only
    // async-signal-safe calls (open, read, close, _exit) are allowed.
    let needle = format!("\n{addr:x}-").into_bytes();
    let mut buf = vec![0u8; 4 << 20];
    // SAFETY: fork has no memory preconditions; the child below only makes async-signal-safe
    // calls on memory allocated before the fork, and ends with `_exit`.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        // SAFETY: (1) `write` is only asked for when the parent's mapping is shared with the
        // child, so `addr` is mapped and writable here. (2) The read fills `buf` within its
        // length. (3) `_exit` skips every destructor, which must not run in this copy.
        unsafe {
            if let Some(byte) = write {
                (addr as *mut u8).write_volatile(byte);
            }
            let fd = libc::open(c"/proc/self/maps".as_ptr(), libc::O_RDONLY);
            buf[0] = b'\n';
            let mut len = 1;
            while fd >= 0 && len < buf.len() {
                let n = libc::read(fd, buf.as_mut_ptr().add(len).cast(), buf.len() - len);
                if n <= 0 {
                    break;
                }
                len += n as usize;
            }
            let found = shared_view_at(&buf[..len], &needle);
            libc::_exit(if fd < 0 {
                2
            } else if found {
                1
            } else {
                0
            });
        }
    }
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child status {status:#x}");
    match libc::WEXITSTATUS(status) {
        0 => false,
        1 => true,
        other => panic!("the child could not read its maps ({other})"),
    }
}

#[test]
fn dont_fork_keeps_segments_out_of_children() {
    const NAME: &str = "no_one_let_in::dont_fork_keeps_segments_out_of_children";
    if !in_child(NAME, "fork") {
        return;
    }
    let dir = TestDir::new("dontfork");
    let private = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .dont_fork(true)
        .build()
        .unwrap();
    let shared = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .build()
        .unwrap();
    let mut p = mmap_vec![in private.clone(); 5u8; 10_000];
    let s = mmap_vec![in shared.clone(); 6u8; 10_000];
    // Growing keeps the promise (the new range is advised again).
    p.resize(3 << 20, 5);
    assert!(
        !child_sees_mapping(p.as_ptr().addr(), None),
        "dont_fork segment in the child"
    );
    // The check can fail: the default segment is in the child.
    assert!(
        child_sees_mapping(s.as_ptr().addr(), None),
        "shared segment not in the child"
    );
}

#[test]
fn without_dont_fork_the_child_writes_into_the_parents_vector() {
    const NAME: &str = "no_one_let_in::without_dont_fork_the_child_writes_into_the_parents_vector";
    if !in_child(NAME, "fork") {
        return;
    }
    let dir = TestDir::new("fork");
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .build()
        .unwrap();
    let v = mmap_vec![in alloc.clone(); 0u8; 10_000];
    assert!(child_sees_mapping(v.as_ptr().addr(), Some(42)));
    assert_eq!(v[0], 42, "the child's write is the parent's");
    assert!(v[1..].iter().all(|&b| b == 0));
}

/// A `fork`ed child that goes on using the allocator: it makes a block of the size of an
/// inherited `dont_fork` segment (the kernel tends to put it in the hole that segment left),
/// writes it, drops the inherited vector, and writes its block again. Returns the child's
/// wait status, or panics in the child's stead.
fn child_allocates_then_drops_inherited(alloc: &MmapAllocator, inherited: MmapVec<u8>) -> i32 {
    // SAFETY: fork has no memory preconditions. This runs in a child test process whose only
    // other thread (the harness's main thread) is blocked waiting for this one, so no lock the
    // child needs (the heap's, the allocator's) can be held by a thread that is not copied.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork: {}", io::Error::last_os_error());
    if pid == 0 {
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut fresh = MmapVec::<u8>::with_capacity_in(inherited.capacity(), alloc.clone());
            println!(
                "child: inherited at {:p}, fresh at {:p}",
                inherited.as_ptr(),
                fresh.as_ptr()
            );
            fresh.resize(fresh.capacity(), 7);
            drop(inherited);
            fresh[0] = 8;
            assert!(fresh[1..].iter().all(|&b| b == 7));
        }))
        .is_ok();
        // SAFETY: `_exit` ends the child without running the parent's destructors again.
        unsafe { libc::_exit(if ok { 0 } else { 3 }) };
    }
    // The parent keeps its own vector: forget this copy of the handle without freeing it.
    std::mem::forget(inherited);
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    status
}

#[test]
fn dont_fork_child_may_allocate_and_drop_inherited_vectors() {
    const NAME: &str = "no_one_let_in::dont_fork_child_may_allocate_and_drop_inherited_vectors";
    // Forking needs a process with no other busy thread: a child test process of its own.
    if crate::support::child_role().as_deref() != Some("fork-user") {
        let output = crate::support::child_command(NAME, "fork-user")
            .arg("--include-ignored")
            .output()
            .expect("spawn");
        crate::support::echo(NAME, "fork-user", &output);
        crate::support::assert_child_passed(NAME, &output);
        return;
    }
    let dir = TestDir::new("dontfork-user");
    for dont_fork in [false, true] {
        let alloc = MmapAllocator::builder()
            .small_threshold(0)
            .dir(dir.path())
            .dont_fork(dont_fork)
            .build()
            .unwrap();
        let v = mmap_vec![in alloc.clone(); 5u8; 4096];
        let addr = v.as_ptr().addr();
        let status = child_allocates_then_drops_inherited(&alloc, v);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "dont_fork {dont_fork}: the child failed (status {status:#x})"
        );
        // The parent's block is intact.
        // SAFETY: the parent's vector was forgotten, not freed: its block is still mapped.
        let first = unsafe { *(addr as *const u8) };
        assert_eq!(first, 5);
    }
}
