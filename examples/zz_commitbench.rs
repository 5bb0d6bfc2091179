//! scratch
use mmapvec::store::{Store, StoreVec};
fn main() {
    let dir = std::path::PathBuf::from("/var/tmp/cb-store");
    let _ = std::fs::remove_dir_all(&dir);
    let store = Store::create(&dir).unwrap();
    let mut v: StoreVec<u64> = StoreVec::new_in(store.allocator());
    v.extend(0..(1u64 << 20));
    store.set_root("v", v).unwrap();
    let t = std::time::Instant::now();
    store.commit().unwrap();
    println!("first commit (8 MiB new): {:?}", t.elapsed());
    for round in 0..3 {
        let t = std::time::Instant::now();
        let n = 100;
        for i in 0..n {
            store.root_mut::<StoreVec<u64>>("v").unwrap()[i * 4096 % (1 << 20)] = i as u64;
            store.commit().unwrap();
        }
        println!(
            "round {round}: {:?} per commit of one u64",
            t.elapsed() / n as u32
        );
    }
    store.close().unwrap();
    for _ in 0..3 {
        let t = std::time::Instant::now();
        let store = Store::open(&dir).unwrap();
        let o = t.elapsed();
        let t = std::time::Instant::now();
        store.close().unwrap();
        println!("open {o:?} close {:?}", t.elapsed());
    }
}
#[allow(dead_code)]
fn reopen() {}
