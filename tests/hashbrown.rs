//! hashbrown collections on `MmapAllocator`: a `HashMap` of a million entries, a `HashSet`, a
//! `HashTable`, and maps of vectors; every table lives in a segment and is freed with the map.

mod core_support;

use std::hash::BuildHasher;

use core_support::TestDir;
use hashbrown::{DefaultHashBuilder, HashMap, HashSet, HashTable};
use mmapvec::{MmapAllocator, MmapVec};

const N: u64 = 1_000_000;

#[test]
fn hash_map_of_a_million_entries() {
    let dir = TestDir::new("hashmap");
    let alloc = dir.allocator_segments_only();
    let mut map: HashMap<u64, u64, DefaultHashBuilder, MmapAllocator> =
        HashMap::new_in(alloc.clone());
    for k in 0..N {
        assert_eq!(map.insert(k, k * 2 + 1), None);
    }
    assert_eq!(map.len(), N as usize);
    let s = alloc.stats();
    assert_eq!(
        s.live_segments, 1,
        "hashbrown frees the old table after each rehash"
    );
    assert!(
        s.creates > 10,
        "the table was reallocated as it grew ({} creates)",
        s.creates
    );
    assert!(s.mapped_bytes >= N * 16, "the entries live in the segment");
    assert_eq!(s.failures.total(), 0);
    // The table is a file mapping of our folder (beside the old tables kept for reuse).
    let folder = dir.segment_folder();
    let table = map
        .iter()
        .next()
        .map(|(k, _)| k as *const u64 as usize)
        .unwrap();
    let maps = core_support::mappings_under(&folder);
    assert!(
        maps.iter().any(|m| (m.start..m.end).contains(&table)),
        "{maps:?}"
    );

    for k in 0..N {
        assert_eq!(map.get(&k), Some(&(k * 2 + 1)), "key {k}");
    }
    assert_eq!(map.get(&N), None);
    for k in (0..N).step_by(2) {
        assert_eq!(map.remove(&k), Some(k * 2 + 1));
    }
    assert_eq!(map.len(), (N / 2) as usize);
    for k in 0..N {
        let expected = (k % 2 == 1).then_some(k * 2 + 1);
        assert_eq!(
            map.get(&k).copied(),
            expected,
            "key {k} after removing the even keys"
        );
    }
    let sum: u64 = map.values().sum();
    assert_eq!(sum, (0..N).filter(|k| k % 2 == 1).map(|k| k * 2 + 1).sum());

    map.shrink_to_fit();
    assert_eq!(alloc.stats().live_segments, 1);
    assert!(map.contains_key(&(N - 1)));
    drop(map);
    let s = alloc.stats();
    assert_eq!((s.live_segments, s.mapped_bytes), (0, 0));
    // Freed tables may be kept for reuse while the allocator lives; none outlives it.
    drop(alloc);
    assert!(core_support::mappings_under(&folder).is_empty());
    assert!(dir.files().is_empty());
}

#[test]
fn hash_map_with_capacity_needs_one_segment() {
    let dir = TestDir::new("hashmap-capacity");
    let alloc = dir.allocator_segments_only();
    let mut map =
        HashMap::with_capacity_and_hasher_in(100_000, DefaultHashBuilder::default(), alloc.clone());
    for k in 0..100_000u64 {
        map.insert(k, k.to_string());
    }
    let s = alloc.stats();
    assert_eq!(
        (s.creates, s.live_segments),
        (1, 1),
        "no rehash with enough capacity"
    );
    assert_eq!(map[&77_777], "77777");
    map.clear();
    assert_eq!(alloc.stats().live_segments, 1, "clear keeps the table");
    drop(map);
    assert_eq!(alloc.stats().live_segments, 0);
}

#[test]
fn hash_set() {
    let dir = TestDir::new("hashset");
    let alloc = dir.allocator_segments_only();
    let mut set: HashSet<String, DefaultHashBuilder, MmapAllocator> =
        HashSet::new_in(alloc.clone());
    for i in 0..50_000 {
        assert!(set.insert(format!("item-{i}")));
    }
    assert!(
        !set.insert("item-123".to_string()),
        "a duplicate is refused"
    );
    assert_eq!(set.len(), 50_000);
    assert!(set.contains("item-49999"));
    assert!(!set.contains("item-50000"));
    set.retain(|s| s.ends_with('7'));
    assert_eq!(set.len(), 5_000);
    assert!(set.iter().all(|s| s.ends_with('7')));

    let other: HashSet<String, DefaultHashBuilder, MmapAllocator> = (0..20)
        .map(|i| format!("item-{i}"))
        .fold(HashSet::new_in(alloc.clone()), |mut s, x| {
            s.insert(x);
            s
        });
    let mut common: Vec<&str> = set.intersection(&other).map(String::as_str).collect();
    common.sort_unstable();
    assert_eq!(common, ["item-17", "item-7"]);
    assert_eq!(alloc.stats().live_segments, 2);
    drop(set);
    drop(other);
    assert_eq!(alloc.stats().live_segments, 0);
    assert!(dir.files().is_empty());
}

#[test]
fn hash_table() {
    let dir = TestDir::new("hashtable");
    let alloc = dir.allocator_segments_only();
    let hasher = DefaultHashBuilder::default();
    let hash = |name: &str| hasher.hash_one(name);
    let mut table: HashTable<(String, u32), MmapAllocator> = HashTable::new_in(alloc.clone());
    for i in 0..20_000u32 {
        let name = format!("name-{i}");
        let h = hash(&name);
        table.insert_unique(h, (name, i), |(n, _)| hash(n));
    }
    assert_eq!(table.len(), 20_000);
    assert_eq!(alloc.stats().live_segments, 1);
    for i in (0..20_000u32).step_by(97) {
        let name = format!("name-{i}");
        let found = table.find(hash(&name), |(n, _)| *n == name);
        assert_eq!(found.map(|(_, v)| *v), Some(i));
    }
    let gone = table
        .find_entry(hash("name-5"), |(n, _)| n == "name-5")
        .expect("present");
    let ((name, value), _) = gone.remove();
    assert_eq!((name.as_str(), value), ("name-5", 5));
    assert!(table.find(hash("name-5"), |(n, _)| n == "name-5").is_none());
    assert_eq!(table.len(), 19_999);
    drop(table);
    assert_eq!(alloc.stats().live_segments, 0);
    assert!(dir.files().is_empty());
}

#[test]
fn map_of_vectors_frees_every_segment() {
    let dir = TestDir::new("map-of-vecs");
    let alloc = dir.allocator_segments_only();
    let mut map: HashMap<u32, MmapVec<u32>, DefaultHashBuilder, MmapAllocator> =
        HashMap::new_in(alloc.clone());
    for k in 0..50u32 {
        let mut v = MmapVec::new_in(alloc.clone());
        v.extend(0..k * 100 + 1);
        map.insert(k, v);
    }
    assert_eq!(alloc.stats().live_segments, 51, "one table and 50 vectors");
    assert!(
        map.iter()
            .all(|(k, v)| v.len() as u32 == k * 100 + 1 && v[v.len() - 1] == k * 100)
    );
    map.retain(|k, _| k % 2 == 0);
    assert_eq!(alloc.stats().live_segments, 26);
    map.get_mut(&10).unwrap().extend(0..100_000);
    assert_eq!(map[&10].len(), 101_001);
    drop(map);
    let s = alloc.stats();
    assert_eq!((s.live_segments, s.mapped_bytes), (0, 0));
    assert!(dir.files().is_empty());
}

#[test]
fn ten_thousand_small_maps_share_a_few_chunk_files() {
    let dir = TestDir::new("small-maps");
    let alloc = dir.allocator();
    let maps: Vec<HashMap<u32, u64, DefaultHashBuilder, MmapAllocator>> = (0..10_000u32)
        .map(|m| {
            let mut map = HashMap::new_in(alloc.clone());
            map.extend((0..10).map(|k| (k, u64::from(m) * 100 + u64::from(k))));
            map
        })
        .collect();
    let s = alloc.stats();
    assert_eq!(
        s.live_segments, 0,
        "small tables come from the small-block tier"
    );
    assert!(s.small.in_use_bytes > 0, "{s:?}");
    // 10,000 tables of a few hundred bytes fit in a handful of 4 MiB chunk files, with no
    // descriptor held for them.
    assert!(s.small.arena_bytes <= 8 << 22, "{s:?}");
    assert_eq!(core_support::descriptors_under(&dir.segment_folder()), 0);
    for (m, map) in maps.iter().enumerate() {
        for k in 0..10u32 {
            assert_eq!(map[&k], m as u64 * 100 + u64::from(k));
        }
    }
    drop(maps);
    assert_eq!(alloc.stats().small.in_use_bytes, 0);
    drop(alloc);
    assert!(core_support::mappings_under(&dir.segment_folder()).is_empty());
    assert!(dir.files().is_empty());
}
