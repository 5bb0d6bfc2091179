//! Issue 19: ways the store lost data or confused its users, each with a test that failed
//! before its fix (the rest of the issue is open: see RELIABILITY.md).
#![cfg(all(target_os = "linux", feature = "hashbrown"))]

use mmapvec::store::{Store, StoreError, StoreVec};

mod store_support;
use store_support::{TestPath, serial};

/// Item 3: `Drop` marked the store clean while its thread was panicking, so a half-done
/// update was kept as if it were complete. It stays dirty now, as after a crash.
#[test]
fn a_panic_leaves_the_store_dirty() {
    let _serial = serial();
    let path = TestPath::new("panic");
    let store = Store::create(&path.0).unwrap();
    let mut v = StoreVec::new_in(store.allocator());
    v.extend(0..10u64);
    store.set_root("v", v).unwrap();
    store.snapshot().unwrap();
    store.close().unwrap();
    let panicked = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let store = Store::open(&path.0).unwrap();
        let mut v = store.root_mut::<StoreVec<u64>>("v").unwrap();
        v.push(10);
        panic!("half-way through an update");
    }));
    assert!(panicked.is_err());
    match Store::open(&path.0) {
        Err(StoreError::Dirty { .. }) => {}
        other => panic!("a store dropped by a panic must be dirty: {other:?}"),
    }
    let store = Store::recover(&path.0).unwrap();
    let v = store.root::<StoreVec<u64>>("v").unwrap();
    assert!(
        v.iter().copied().eq(0..10),
        "the snapshot, without the half-done push"
    );
    drop(v);
    store.close().unwrap();
}

/// Item 4: `StoreError`'s `Debug` (what `main` returning `Result<_, Box<dyn Error>>` prints)
/// said `Dirty { last_flush: 2, last_snapshot: 1 }` and nothing of what to do; it shows the
/// message, which names the call that goes back to the last snapshot.
#[test]
fn a_dirty_store_says_what_to_call() {
    let error = StoreError::Dirty {
        last_flush: 2,
        last_snapshot: 1,
    };
    let shown = format!("{error:?}");
    assert!(shown.starts_with("Dirty: "), "{shown}");
    assert!(shown.contains("Store::recover"), "{shown}");
    let without = format!(
        "{}",
        StoreError::Dirty {
            last_flush: 2,
            last_snapshot: 0
        }
    );
    assert!(without.contains("no snapshot"), "{without}");
}
