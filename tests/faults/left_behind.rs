//! Nothing left behind: a process killed with `SIGKILL` leaves no segment file that outlives
//! the next start (and a live process's files are never touched), and thousands of cycles on
//! several threads leak no descriptor, mapping or file.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use allocator_api2::alloc::{Allocator, Layout};
use mmapvec::{GrowStrategy, MmapAllocator, MmapVec};

use crate::support::{
    TestDir, child_command, child_role, descriptors_under, files_under, in_child, is_uuid_v4,
    killed_by, mappings_under, names_in, open_descriptors, run_child,
};

const DIR_ENV: &str = "MMAPVEC_FAULTS_DIR";
const MIB: usize = 1 << 20;

/// Session folders (`session-<uuid>`) in a crate folder.
fn sessions(folder: &Path) -> Vec<String> {
    names_in(folder)
        .into_iter()
        .filter(|n| n.starts_with("session-"))
        .collect()
}

/// Vectors with recognisable content: vector `i` holds `len` copies of `i + seed`.
fn patterned(alloc: &MmapAllocator, count: usize, len: usize, seed: u8) -> Vec<MmapVec<u8>> {
    (0..count)
        .map(|i| mmapvec::mmap_vec![in alloc.clone(); seed.wrapping_add(i as u8); len])
        .collect()
}

fn check_patterned(vectors: &[MmapVec<u8>], seed: u8) {
    for (i, v) in vectors.iter().enumerate() {
        let byte = seed.wrapping_add(i as u8);
        assert!(v.iter().all(|&b| b == byte), "vector {i} changed");
    }
}

/// The live child: named segments, then waits for the parent's word on stdin.
fn live_child(dir: &Path) {
    let alloc = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir)
        .descriptor_budget(0)
        .build()
        .expect("build (live)");
    let mut vectors = patterned(&alloc, 3, 100_000, 40);
    assert_eq!(alloc.stats().named_segments, 3);
    let folder = dir.join(format!("mmapvec-{}", crate::support::euid()));
    println!("READY {}", sessions(&folder).join(" "));
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .expect("read the parent's word");
    assert_eq!(line.trim(), "check");
    check_patterned(&vectors, 40);
    // Growing reopens each file by name: the names must still be there.
    for (i, v) in vectors.iter_mut().enumerate() {
        v.resize(3 * MIB, 40 + i as u8);
    }
    check_patterned(&vectors, 40);
    assert_eq!(alloc.stats().failures.total(), 0);
    println!("CHECKED");
}

/// The killed child: held (unlinked) and named segments, then `SIGKILL` from itself.
fn killed_child(dir: &Path) -> ! {
    let held = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir)
        .build()
        .expect("build (held)");
    let named = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir)
        .descriptor_budget(0)
        .build()
        .expect("build (named)");
    let held_vectors = patterned(&held, 4, MIB, 1);
    let named_vectors = patterned(&named, 3, MIB, 11);
    assert_eq!(held.stats().named_segments, 0);
    assert_eq!(named.stats().named_segments, 3);
    println!(
        "holding {} + {} segments",
        held_vectors.len(),
        named_vectors.len()
    );
    // SAFETY: kill has no memory preconditions; this child process ends here on purpose.
    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
    unreachable!("SIGKILL returned");
}

#[test]
fn sigkill_leaves_nothing_behind_and_live_files_are_kept() {
    const NAME: &str = "left_behind::sigkill_leaves_nothing_behind_and_live_files_are_kept";
    match child_role().as_deref() {
        Some("live") => return live_child(Path::new(&std::env::var(DIR_ENV).unwrap())),
        Some("killed") => killed_child(Path::new(&std::env::var(DIR_ENV).unwrap())),
        _ => {}
    }
    let dir = TestDir::new("sigkill");
    let dir_str = dir.path().to_str().expect("utf-8 path");
    let folder = dir.segment_folder();

    // A live process with named segments in the same directory, waiting on a pipe.
    let mut live = child_command(NAME, "live")
        .env(DIR_ENV, dir_str)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the live child");
    let mut live_out = BufReader::new(live.stdout.take().unwrap());
    let live_session = loop {
        let mut line = String::new();
        if live_out.read_line(&mut line).unwrap() == 0 {
            let status = live.wait().unwrap();
            panic!("the live child ended before it was ready: {status}");
        }
        // libtest has printed `test <name> ... ` on the same line.
        if let Some((_, session)) = line.trim_end().split_once("READY ") {
            break session.to_string();
        }
    };
    assert!(live_session.starts_with("session-"), "{live_session}");
    let live_files = names_in(&folder.join(&live_session));
    assert_eq!(live_files.len(), 3, "{live_files:?}");

    // A process holding both kinds of segments dies without any clean-up.
    let output = run_child(NAME, "killed", &[(DIR_ENV, dir_str)]);
    assert_eq!(killed_by(&output), Some(libc::SIGKILL));
    assert!(String::from_utf8_lossy(&output.stdout).contains("holding 4 + 3 segments"));

    // Its unlinked segments are gone with it: nothing loose in the folder, only two sessions.
    let names = names_in(&folder);
    assert!(
        names.iter().all(|n| n.starts_with("session-")),
        "loose files: {names:?}"
    );
    let all = sessions(&folder);
    assert_eq!(all.len(), 2, "{all:?}");
    let dead_session = all.iter().find(|s| **s != live_session).unwrap().clone();
    let dead_files = names_in(&folder.join(&dead_session));
    assert_eq!(dead_files.len(), 3, "{dead_files:?}");
    assert!(dead_files.iter().all(|n| is_uuid_v4(n)), "{dead_files:?}");

    // The next allocator in this directory removes the dead session, not the live one.
    let next = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .reuse_bytes(0)
        .build()
        .expect("build the next one");
    assert_eq!(sessions(&folder), vec![live_session.clone()]);
    assert_eq!(
        names_in(&folder.join(&live_session)),
        live_files,
        "a live file was touched"
    );

    // The live child still finds, checks and grows its files.
    writeln!(live.stdin.take().unwrap(), "check").unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut live_out, &mut rest).unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut live.stderr.take().unwrap(), &mut stderr).unwrap();
    let status = live.wait().unwrap();
    eprintln!("--- live child {status}\n{rest}\n{stderr}");
    assert!(
        status.success() && rest.contains("CHECKED"),
        "the live child failed"
    );

    // It cleaned up after itself on exit.
    drop(next);
    assert_eq!(files_under(&folder), Vec::<PathBuf>::new());
    assert_eq!(names_in(&folder), Vec::<String>::new());
}

#[test]
fn old_loose_files_are_removed_and_fresh_ones_kept() {
    let dir = TestDir::new("loose");
    drop(
        MmapAllocator::builder()
            .small_threshold(0)
            .dir(dir.path())
            .reuse_bytes(0)
            .build()
            .expect("first build"),
    );
    let folder = dir.segment_folder();
    // What a process killed between creating a file and unlinking it leaves, 2 minutes ago...
    let old = folder.join(uuid_like(1));
    // ...a file another process is creating right now...
    let fresh = folder.join(uuid_like(2));
    // ...and files that are none of the crate's business.
    let foreign = folder.join("notes.txt");
    let old_session_file = folder.join("not-a-session").join(uuid_like(3));
    fs::create_dir(folder.join("not-a-session")).unwrap();
    let two_minutes_ago = SystemTime::now() - Duration::from_secs(120);
    for path in [&old, &fresh, &foreign, &old_session_file] {
        let file = File::create(path).unwrap();
        if path != &fresh {
            file.set_modified(two_minutes_ago).unwrap();
        }
    }
    let _next = MmapAllocator::builder()
        .small_threshold(0)
        .dir(dir.path())
        .reuse_bytes(0)
        .build()
        .expect("second build");
    assert!(!old.exists(), "an old loose segment file was kept");
    assert!(fresh.exists(), "a fresh segment file was removed");
    assert!(foreign.exists(), "a file that is not a segment was removed");
    assert!(
        old_session_file.exists(),
        "a folder that is not a session was emptied"
    );
}

/// A UUID v4 text made from `n`, as the default creator would name a file.
fn uuid_like(n: u8) -> String {
    format!("{n:08x}-0000-4000-8000-000000000000")
}

/// One thread's share of the leak test: allocate, write, grow, check, shrink, check, free,
/// keeping a few blocks alive across cycles.
fn churn(alloc: &MmapAllocator, seed: u64, cycles: usize) {
    let mut live: Vec<(std::ptr::NonNull<[u8]>, Layout, u8)> = Vec::new();
    let mut state = seed;
    let mut next = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 33) as usize
    };
    for cycle in 0..cycles {
        let size = 1 + next() % (64 << 10);
        let align = 1 << (next() % 14);
        let byte = cycle as u8;
        let layout = Layout::from_size_align(size, align).unwrap();
        let block = alloc.allocate(layout).expect("allocate");
        let ptr = block.cast::<u8>();
        // SAFETY: the block is ours, at least `size` bytes.
        unsafe {
            ptr.write(byte);
            ptr.add(size - 1).write(byte);
        }
        let grown = Layout::from_size_align(size * 2 + next() % 8192, align).unwrap();
        // SAFETY: `ptr` is currently allocated with `layout`; `grown` is larger.
        let ptr = unsafe { alloc.grow(ptr, layout, grown) }
            .expect("grow")
            .cast::<u8>();
        // SAFETY: the grown block keeps the first `size` bytes and has `grown.size()` of them.
        unsafe {
            assert_eq!((ptr.read(), ptr.add(size - 1).read()), (byte, byte));
            ptr.add(grown.size() - 1).write(byte);
        }
        let shrunk = Layout::from_size_align(size.div_ceil(2), align).unwrap();
        // SAFETY: `ptr` is currently allocated with `grown`; `shrunk` is smaller.
        let block = unsafe { alloc.shrink(ptr, grown, shrunk) }.expect("shrink");
        // SAFETY: the shrunk block keeps its first bytes.
        assert_eq!(unsafe { block.cast::<u8>().read() }, byte);
        live.push((block, shrunk, byte));
        if live.len() > 8 || cycle + 1 == cycles {
            for (block, layout, byte) in live.drain(..) {
                // SAFETY: each block is currently allocated with its layout, freed once.
                unsafe {
                    assert_eq!(block.cast::<u8>().read(), byte);
                    alloc.deallocate(block.cast(), layout);
                }
            }
        }
    }
}

#[test]
fn ten_thousand_cycles_on_four_threads_leak_nothing() {
    const NAME: &str = "left_behind::ten_thousand_cycles_on_four_threads_leak_nothing";
    // Descriptors are counted process-wide: alone in a child, no other test opens any.
    if !in_child(NAME, "leaks") {
        return;
    }
    let dir = TestDir::fast("leaks");
    let count = || {
        (
            open_descriptors(),
            descriptors_under(dir.path()),
            mappings_under(dir.path()),
            files_under(dir.path()).len(),
            names_in(&dir.segment_folder()).len(),
        )
    };
    let before = count();
    let allocators = [
        MmapAllocator::builder()
            .small_threshold(0)
            .dir(dir.path())
            .reuse_bytes(0)
            .build()
            .unwrap(),
        MmapAllocator::builder()
            .small_threshold(0)
            .dir(dir.path())
            .reuse_bytes(0)
            .descriptor_budget(0)
            .build()
            .unwrap(),
        MmapAllocator::builder()
            .small_threshold(0)
            .dir(dir.path())
            .reuse_bytes(0)
            .grow_strategy(GrowStrategy::MapAgain)
            .build()
            .unwrap(),
        MmapAllocator::builder()
            .small_threshold(0)
            .dir(dir.path())
            .reuse_bytes(0)
            .heap_threshold(16 << 10)
            .build()
            .unwrap(),
    ];
    let after_build = count();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (allocators.iter().enumerate())
            .map(|(i, alloc)| scope.spawn(move || churn(alloc, i as u64 + 1, 2500)))
            .collect();
        // Joined by hand: the scope's end waits only for the closures, not for the threads'
        // exit, where their caches give back what they hold.
        for h in handles {
            h.join().expect("worker thread");
        }
    });
    for alloc in &allocators {
        let stats = alloc.stats();
        assert_eq!(
            (
                stats.live_segments,
                stats.mapped_bytes,
                stats.heap_allocations
            ),
            (0, 0, 0)
        );
        assert_eq!(stats.failures.total(), 0, "{stats:?}");
        assert!(stats.creates > 0);
    }
    let total: u64 = allocators.iter().map(|a| a.stats().creates).sum();
    println!("{total} segments created; counts before, built, after: {before:?} {after_build:?}");
    // While they live, each holds its segment folder open (from `build`); the session folder
    // of the named segments went with the last of them, lock and all.
    assert_eq!((after_build.0, after_build.1), (before.0 + 4, 4));
    let (fds, fds_under, maps, files, folders) = count();
    assert_eq!((fds, fds_under, maps, files), (after_build.0, 4, 0, 0));
    assert_eq!(
        folders, 0,
        "no session folder outlives its last named segment"
    );
    drop(allocators);
    assert_eq!(count(), before, "counts after the allocators are gone");
}
