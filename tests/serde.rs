//! The `serde` feature: `MmapVec` serializes like a `Vec` and deserializes into the memory of
//! `MmapAllocator::default()`.
//!
//! Run with `cargo test --features serde --test serde`.
#![cfg(feature = "serde")]

use mmapvec::{MmapAllocator, MmapVec, mmap_vec};

/// The file behind the mapping that holds `addr`, from `/proc/self/maps` (Linux only).
fn mapped_file(addr: usize) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        let path = fields.skip(4).collect::<Vec<_>>().join(" ");
        ((start..end).contains(&addr) && path.starts_with('/')).then_some(path)
    })
}

/// Asserts that the buffer of `v` is in the default allocator's memory, whichever tier holds it:
/// a segment of its own or a block of the small-block tier's shared chunk files. Both are file
/// mappings in the default folder. Nothing here depends on what concurrent tests hold: the
/// allocator's totals are checked only to include at least this buffer.
fn assert_in_default_allocator<T>(v: &MmapVec<T>) {
    assert!(
        v.capacity() > 0 && size_of::<T>() > 0,
        "an empty buffer is not in any file"
    );
    let bytes = (v.capacity() * size_of::<T>()) as u64;
    let stats = v.allocator().stats();
    assert!(
        stats.live_segments >= 1 || stats.small.in_use_bytes >= bytes,
        "the buffer is neither a segment nor a small block: {stats:?}"
    );
    if cfg!(target_os = "linux") {
        let file = mapped_file(v.as_ptr().addr()).expect("the buffer is a file mapping");
        let folder = mmapvec::DirCreator::new(std::env::temp_dir()).folder();
        assert!(
            file.starts_with(&*folder.to_string_lossy()),
            "{file} is not in {folder:?}"
        );
    }
}

#[test]
fn numbers_round_trip_in_the_same_format_as_vec() {
    let mut v: MmapVec<u64> = MmapVec::new_in(MmapAllocator::default());
    v.extend((0..10_000u64).map(|i| i * i + 1));
    let json = serde_json::to_string(&v).unwrap();
    let std_vec: Vec<u64> = v.iter().copied().collect();
    assert_eq!(json, serde_json::to_string(&std_vec).unwrap());
    assert!(json.starts_with("[1,2,5,10,"));

    let back: MmapVec<u64> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, v);
    assert_in_default_allocator(&back);

    // A plain `Vec`'s JSON reads into an `MmapVec`, and back.
    let from_std: MmapVec<u64> =
        serde_json::from_str(&serde_json::to_string(&std_vec).unwrap()).unwrap();
    assert_eq!(from_std, std_vec[..]);
    let to_std: Vec<u64> = serde_json::from_str(&json).unwrap();
    assert_eq!(to_std, std_vec);
}

#[test]
fn records_with_strings_round_trip() {
    type Record = (u32, String, Option<bool>, [i16; 3]);
    let mut records: MmapVec<Record> = MmapVec::new_in(MmapAllocator::default());
    records.extend((0..500u32).map(|i| {
        (
            i,
            format!("name {i} ✓"),
            (i % 3 != 0).then_some(i % 2 == 0),
            [i as i16, -1, 7],
        )
    }));
    let json = serde_json::to_string_pretty(&records).unwrap();
    let back: MmapVec<Record> = serde_json::from_str(&json).unwrap();
    assert_eq!(back, records);
    assert_eq!(back[499].1, "name 499 ✓");
    assert_eq!(back[3].2, None);
    assert_eq!(back[4].2, Some(true));
    assert_in_default_allocator(&back);
}

#[test]
fn nested_vectors_each_get_their_own_buffer() {
    let rows: MmapVec<MmapVec<u16>> =
        mmap_vec![mmap_vec![1, 2, 3], mmap_vec![], mmap_vec![40_000; 5000]];
    let json = serde_json::to_vec(&rows).unwrap();
    let back: MmapVec<MmapVec<u16>> = serde_json::from_slice(&json).unwrap();
    assert_eq!(back, rows);
    assert_eq!(back[1].capacity(), 0, "an empty row allocates nothing");
    assert_in_default_allocator(&back);
    assert_in_default_allocator(&back[0]);
    assert_in_default_allocator(&back[2]);
}

#[test]
fn empty_and_invalid_input() {
    let empty: MmapVec<u8> = serde_json::from_str("[]").unwrap();
    assert!(empty.is_empty());

    assert!(serde_json::from_str::<MmapVec<u64>>(r#"[1, 2, "three"]"#).is_err());
    assert!(serde_json::from_str::<MmapVec<u8>>("[1, 2, 256]").is_err());
    assert!(serde_json::from_str::<MmapVec<u8>>(r#"{"not": "a sequence"}"#).is_err());
}
