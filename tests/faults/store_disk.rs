//! A persistent store on a full disk (issue 13): growing it is an allocation error, never a
//! `SIGBUS`; what it held stays intact; and once space is freed it flushes, closes and reopens
//! with its contents. In a child process: one store per process at a time.

use mmapvec::allocator_api2::alloc::{Allocator, Layout};
use mmapvec::store::{FixedState, Store, StoreMap, StoreVec};

use crate::support::{Tmpfs, in_child, skip};

const MIB: usize = 1 << 20;
const TMPFS_SIZE: usize = 48 * MIB;

type Map<'s> = StoreMap<'s, u64, u64, FixedState>;

#[test]
fn a_full_disk_is_an_alloc_error_and_the_store_reopens_after() {
    const NAME: &str = "store_disk::a_full_disk_is_an_alloc_error_and_the_store_reopens_after";
    if !in_child(NAME, "full") {
        return;
    }
    let fs = match Tmpfs::mount("store-full", TMPFS_SIZE) {
        Ok(fs) => fs,
        Err(why) => skip!("{why}"),
    };
    let path = fs.path().join("store");
    let store = Store::create_with_range(&path, 1 << 30).unwrap();
    let alloc = store.allocator();
    let mut kept = StoreVec::new_in(alloc);
    kept.extend(0..MIB as u64 / 8);
    store.set_root("kept", kept).unwrap();
    let mut map: Map = StoreMap::with_hasher_in(FixedState::default(), alloc);
    map.extend((0..1000).map(|k| (k, !k)));
    store.set_root("map", map).unwrap();
    store.flush().unwrap();

    // Large blocks until the disk is full: an error, not a signal.
    let mut filler: Vec<StoreVec<u8>> = Vec::new();
    loop {
        let mut v = StoreVec::new_in(alloc);
        if v.try_reserve_exact(MIB).is_err() {
            break;
        }
        v.resize(MIB, 0xA5);
        filler.push(v);
        assert!(filler.len() <= TMPFS_SIZE / MIB, "more than the disk holds");
    }
    // Small blocks too: the tier cannot make a chunk.
    let small = Layout::from_size_align(100, 8).unwrap();
    let mut blocks = Vec::new();
    while let Ok(block) = alloc.allocate(small) {
        blocks.push(block);
        assert!(blocks.len() < 1 << 20, "more than the disk holds");
    }
    // A root's map that must grow fails the same way, and keeps its entries.
    {
        let mut map = store.root_mut::<Map>("map").unwrap();
        assert!(map.try_reserve(1 << 20).is_err());
        assert_eq!(map.len(), 1000);
    }
    assert!(filler.iter().all(|v| v.iter().all(|&b| b == 0xA5)));
    println!(
        "{} MiB of large blocks and {} small blocks on a {} MiB tmpfs, then the disk was full",
        filler.len(),
        blocks.len(),
        TMPFS_SIZE / MIB
    );
    // Space back, then a durable point and a clean close.
    for block in blocks {
        // SAFETY: allocated above with `small`, freed once.
        unsafe { alloc.deallocate(block.cast(), small) };
    }
    drop(filler);
    store.flush().unwrap();
    store.close().unwrap();

    let store = Store::open(&path).unwrap();
    let kept = store.root::<StoreVec<u64>>("kept").unwrap();
    assert!(kept.iter().copied().eq(0..MIB as u64 / 8));
    let map = store.root::<Map>("map").unwrap();
    assert!((0..1000).all(|k| map.get(&k) == Some(&!k)));
}

/// Where the file system can share blocks between files (XFS, btrfs), a snapshot is a reflink:
/// O(1) in the data. On a loop-mounted image of one, made here with `mkfs.xfs` or `mkfs.btrfs`;
/// skipped with a message where neither exists or mounting needs what this machine lacks.
#[test]
fn a_snapshot_on_a_reflink_file_system_shares_its_blocks() {
    const NAME: &str = "store_disk::a_snapshot_on_a_reflink_file_system_shares_its_blocks";
    if !in_child(NAME, "reflink") {
        return;
    }
    let found = ["mkfs.xfs", "mkfs.btrfs"].into_iter().find(|mkfs| {
        std::process::Command::new(mkfs)
            .arg("-V")
            .output()
            .is_ok_and(|o| o.status.success())
    });
    let Some(mkfs) = found else {
        skip!("neither mkfs.xfs nor mkfs.btrfs is installed: no file system with reflinks here");
    };
    if crate::core_support::euid() != 0 {
        skip!("needs root to mount a loop image");
    }
    let dir = crate::support::TestDir::new("reflink");
    let image = dir.path().join("fs.img");
    let mount = dir.path().join("mnt");
    std::fs::create_dir(&mount).unwrap();
    std::fs::File::create(&image)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    let made = std::process::Command::new(mkfs)
        .args(["-q", "-f"])
        .arg(&image)
        .status()
        .unwrap();
    assert!(made.success(), "{mkfs} failed");
    let mounted = std::process::Command::new("mount")
        .args(["-o", "loop"])
        .arg(&image)
        .arg(&mount)
        .status()
        .unwrap();
    if !mounted.success() {
        skip!("cannot loop-mount the {mkfs} image (no loop devices?)");
    }
    let result = std::panic::catch_unwind(|| {
        let path = mount.join("store");
        let store = Store::create_with_range(&path, 1 << 30).unwrap();
        store
            .set_root("v", {
                let mut v = StoreVec::new_in(store.allocator());
                v.extend(0..(64 * MIB as u64) / 8);
                v
            })
            .unwrap();
        let snap = store.snapshot().unwrap();
        assert!(snap.reflinked, "{snap:?} on {mkfs}");
        store.close().unwrap();
        let store = Store::recover(&path).unwrap();
        let v = store.root::<StoreVec<u64>>("v").unwrap();
        assert!(v.iter().copied().eq(0..(64 * MIB as u64) / 8));
        println!("{mkfs}: a snapshot of {} MiB by reflink", snap.bytes >> 20);
    });
    let _ = std::process::Command::new("umount").arg(&mount).status();
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}
