//! Outside review (c92cde1): a commit that failed at the sync of its end record is cut back
//! by zeroing its first word only; its end record stays in the log. The next attempt of the
//! same number is written at the same place, and if it stops part-way without its own cut
//! (a crash, or a cut that fails), the replay reads its records, then the first attempt's
//! records after them (same layout), up to the first attempt's end record, which names the
//! same number and start: a complete commit mixing the two attempts.

use super::*;
use crate::store::alloc::StoreVec;
use crate::sys::faults;

const LEN: usize = 64 << 20;
const BIG: usize = 1 << 17;

fn in_child(child: impl FnOnce()) -> i32 {
    // SAFETY: the child runs `child` and `_exit`s.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0);
    if pid == 0 {
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(child)).is_ok();
        // SAFETY: ends the child at once.
        unsafe { libc::_exit(i32::from(!ok)) };
    }
    let mut status = 0;
    // SAFETY: our child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "child died: {status:#x}");
    libc::WEXITSTATUS(status)
}

fn make(path: &Path) {
    let _ = fs::remove_dir_all(path);
    let store = Store::create_with_range(path, LEN).unwrap();
    let mut a = StoreVec::new_in(store.allocator());
    a.extend([0u64; 4]);
    store.set_root("a", a).unwrap();
    let mut big = StoreVec::new_in(store.allocator());
    big.extend(std::iter::repeat_n(0u64, BIG));
    store.set_root("big", big).unwrap();
    store.close().unwrap();
}

fn set(store: &Store, x: u64) {
    store.root_mut::<StoreVec<u64>>("a").unwrap()[0] = x;
    let mut big = store.root_mut::<StoreVec<u64>>("big").unwrap();
    big[0] = x;
    big[BIG - 1] = x;
}

fn state(path: &Path) -> (u64, u64, u64) {
    let store = Store::open(path).unwrap();
    let a = store.root::<StoreVec<u64>>("a").unwrap()[0];
    let big = store.root::<StoreVec<u64>>("big").unwrap();
    let s = (a, big[0], big[BIG - 1]);
    drop(big);
    store.close().unwrap();
    s
}

#[test]
fn a_retry_after_a_failed_commit_record_sync_never_mixes_two_attempts() {
    let _serial = super::tests::serial();
    let path = std::env::temp_dir().join(format!("mmapvec-review-retry-{}", std::process::id()));
    let report = path.with_extension("report");
    // The points of a commit of the first change, to find its "sync the commit record".
    make(&path);
    assert_eq!(
        in_child(|| {
            let store = Store::open(&path).unwrap();
            set(&store, 1);
            faults::power_loss_at(None);
            store.commit().unwrap();
            let at = faults::trace()
                .iter()
                .position(|&p| p == "sync the commit record")
                .unwrap();
            fs::write(&report, at.to_string()).unwrap();
        }),
        0
    );
    let at1: u64 = fs::read_to_string(&report).unwrap().parse().unwrap();
    let mut mixes = Vec::new();
    for k in 0..100u64 {
        make(&path);
        assert_eq!(
            in_child(|| {
                let store = Store::open(&path).unwrap();
                set(&store, 1);
                faults::arm(Some(at1), false);
                assert!(store.commit().is_err());
                assert_eq!(faults::first_failure(), Some("sync the commit record"));
                faults::disarm();
                set(&store, 2);
                // The second attempt fails at its point `k`, and so does everything after
                // (its cut too): a disk going bad; a crash there does the same.
                faults::arm(Some(k), true);
                let ok = store.commit().is_ok();
                fs::write(&report, if ok { "ok" } else { "err" }).unwrap();
                // SAFETY: a crash.
                unsafe { libc::_exit(0) };
            }),
            0
        );
        let second_ok = fs::read_to_string(&report).unwrap() == "ok";
        let found = state(&path);
        let whole = [(0, 0, 0), (1, 1, 1), (2, 2, 2)];
        if !whole.contains(&found) {
            mixes.push((k, found));
        }
        if second_ok {
            break;
        }
    }
    let _ = fs::remove_dir_all(&path);
    let _ = fs::remove_file(&report);
    assert!(
        mixes.is_empty(),
        "reopened at a mix of the two attempts (point k: a[0], big[0], big[last]): {mixes:?}"
    );
}
