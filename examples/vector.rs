//! A vector whose buffer is a memory-mapped file: push a million numbers, sort them, read the
//! allocator's counters, and find the file behind the buffer.
//!
//! ```text
//! cargo run --example vector
//! ```

use mmapvec::{DirCreator, MmapAllocator, MmapVec};

fn main() -> std::io::Result<()> {
    // An allocator of our own, so that its counters count this vector alone.
    // `MmapAllocator::default()` works the same way (segments in the temp directory).
    let alloc = MmapAllocator::builder().build()?;
    let mut v: MmapVec<u64> = MmapVec::new_in(alloc.clone());

    // Pseudo-random numbers (xorshift64), pushed one at a time like into any `Vec`.
    let mut x = 0x2545_f491_4f6c_dd1d_u64;
    for _ in 0..1_000_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push(x % 1_000_000);
    }
    v.sort_unstable();
    assert!(v.is_sorted());
    println!(
        "{} numbers sorted: smallest {}, median {}, largest {}",
        v.len(),
        v[0],
        v[v.len() / 2],
        v[v.len() - 1]
    );

    let stats = alloc.stats();
    println!(
        "segments: {} live, {} created; {:.1} MiB mapped; {} grows by mremap, {} by mapping again",
        stats.live_segments,
        stats.creates,
        stats.mapped_bytes as f64 / (1 << 20) as f64,
        stats.grows_remapped,
        stats.grows_mapped_again,
    );
    // One file for the vector's whole life: every grow resized it and moved its mapping.
    assert_eq!(stats.live_segments, 1);
    assert_eq!(stats.creates, 1);
    assert!(stats.grows_remapped + stats.grows_mapped_again > 0);
    assert!(stats.mapped_bytes >= (v.capacity() * size_of::<u64>()) as u64);

    // Where the bytes live. The file's name was removed right after it was created (the
    // allocator keeps the descriptor), so the kernel shows it as "(deleted)" and a crash
    // leaves nothing behind on disk.
    let folder = DirCreator::new(std::env::temp_dir()).folder();
    println!("segment folder: {}", folder.display());
    if let Some(file) = mapped_file(v.as_ptr().addr()) {
        println!("the buffer at {:p} is mapped from {file}", v.as_ptr());
        assert!(file.starts_with(&*folder.to_string_lossy()), "{file}");
    }

    drop(v);
    let stats = alloc.stats();
    println!(
        "after drop: {} live segments, {} bytes mapped",
        stats.live_segments, stats.mapped_bytes
    );
    assert_eq!((stats.live_segments, stats.mapped_bytes), (0, 0));
    Ok(())
}

/// The file behind the mapping that holds `addr`, from `/proc/self/maps` (Linux only; `None`
/// elsewhere or for anonymous memory).
fn mapped_file(addr: usize) -> Option<String> {
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        // "start-end perms offset dev inode path", the path possibly followed by " (deleted)".
        let mut fields = line.split_whitespace();
        let (start, end) = fields.next()?.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        let path = fields.skip(4).collect::<Vec<_>>().join(" ");
        ((start..end).contains(&addr) && path.starts_with('/')).then_some(path)
    })
}
