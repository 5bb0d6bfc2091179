//! Faults that must become errors, not crashes, and nothing left behind or let in (issue 4).
//!
//! Each module takes one family of faults: a full disk, the OS's limits, bad configuration,
//! crashes and leaks, and what other users or processes could reach. Tests that change
//! process-wide state (rlimits, signal dispositions, uid, environment) or `fork` (which starts
//! a new fork epoch for every allocator of the process, and whose child maps all of them) run
//! their body in a child process: the test binary started again on that one test (see
//! `support::run_child`).
//! Tests that need root or a facility this machine lacks say `SKIPPED` and pass.
//! `RELIABILITY.md` lists every test with what it shows.
//!
//! Linux only: the tests read `/proc`, mount file systems and use Linux's `mount` flags.
//!
//! The modules written for one segment per allocation build their allocators with
//! `small_threshold(0)`, so each allocation is a segment whose file, mapping and descriptor
//! they can watch; `small_blocks` runs the same faults through the small-block tier.

#![cfg(target_os = "linux")]

#[path = "core_support/mod.rs"]
mod core_support;
#[path = "faults/process.rs"]
mod process;
#[path = "faults/support.rs"]
mod support;

#[path = "faults/bad_config.rs"]
mod bad_config;
#[path = "faults/disk_full.rs"]
mod disk_full;
#[path = "faults/fork_and_paths.rs"]
mod fork_and_paths;
#[path = "faults/left_behind.rs"]
mod left_behind;
#[path = "faults/no_one_let_in.rs"]
mod no_one_let_in;
#[path = "faults/os_limits.rs"]
mod os_limits;
#[path = "faults/small_blocks.rs"]
mod small_blocks;
#[path = "faults/store_disk.rs"]
mod store_disk;
#[path = "faults/tier_churn.rs"]
mod tier_churn;
#[path = "faults/tier_holes.rs"]
mod tier_holes;
