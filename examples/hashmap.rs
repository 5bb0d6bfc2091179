//! hashbrown maps on disk: count words with `HashMap::new_in`, then count numbers in a map
//! sized up front with `HashMap::with_capacity_in`, and see why sizing up front matters.
//!
//! ```text
//! cargo run --example hashmap
//! ```

use hashbrown::{DefaultHashBuilder, HashMap};
use mmapvec::{MmapAllocator, MmapVec};

/// A prime, so that exactly `(P + 1) / 2` numbers are squares modulo `P` (zero included).
const P: u64 = 100_003;

type DiskMap<K, V> = HashMap<K, V, DefaultHashBuilder, MmapAllocator>;

fn main() -> std::io::Result<()> {
    // An allocator of our own, so that its counters count this program alone.
    let alloc = MmapAllocator::builder().build()?;

    // 1. Word counts. The text lives in one segment, the table in another, and the keys are
    //    `&str` slices of the text: nothing sizeable is on the heap.
    let sentence = "the quick brown fox jumps over the lazy dog and the dog sleeps ";
    let mut bytes: MmapVec<u8> = MmapVec::new_in(alloc.clone());
    for _ in 0..10_000 {
        bytes.extend_from_slice(sentence.as_bytes());
    }
    let text = std::str::from_utf8(&bytes).expect("the text is ASCII");

    let mut words = HashMap::new_in(alloc.clone());
    for word in text.split_whitespace() {
        *words.entry(word).or_insert(0u32) += 1;
    }
    let mut by_count: Vec<(u32, &str)> = words.iter().map(|(w, n)| (*n, *w)).collect();
    by_count.sort_unstable_by(|a, b| b.cmp(a));
    println!(
        "{} distinct words; most frequent: {:?}",
        words.len(),
        &by_count[..3]
    );
    assert_eq!(words.len(), 10);
    assert_eq!(words["the"], 30_000);
    assert_eq!(words["dog"], 20_000);
    assert_eq!(words.values().sum::<u32>(), 130_000);

    // 2. Squares modulo a prime, a million times over. hashbrown never grows a table in place:
    //    it allocates a bigger one, moves the entries and frees the old one, so each step is a
    //    new segment. Sizing the map up front makes one table, once.
    let distinct = (P as usize).div_ceil(2);

    let before = alloc.stats().creates;
    let mut grown: DiskMap<u64, u32> = HashMap::new_in(alloc.clone());
    count_squares(&mut grown);
    let grown_tables = alloc.stats().creates - before;

    let before = alloc.stats().creates;
    let mut sized: DiskMap<u64, u32> = HashMap::with_capacity_in(distinct, alloc.clone());
    count_squares(&mut sized);
    let sized_tables = alloc.stats().creates - before;

    println!(
        "{} distinct squares mod {P}: new_in made {grown_tables} tables on the way, \
         with_capacity_in made {sized_tables}",
        sized.len()
    );
    assert_eq!(sized.len(), distinct);
    assert_eq!(grown, sized);
    assert_eq!(
        sized.values().map(|&n| u64::from(n)).sum::<u64>(),
        1_000_000
    );
    // 0, P, 2P, ... 9P are the numbers below a million whose square is 0 mod P.
    assert_eq!(sized[&0], 10);
    assert_eq!(sized_tables, 1);
    assert!(grown_tables > sized_tables, "{grown_tables}");

    // The text and the two number tables are segments; the word table (ten words) is a small
    // block of a chunk file shared with other small blocks.
    let stats = alloc.stats();
    println!(
        "{} live segments, {:.1} MiB mapped",
        stats.live_segments,
        stats.mapped_bytes as f64 / (1 << 20) as f64
    );
    assert_eq!(stats.live_segments, 3);
    Ok(())
}

fn count_squares(map: &mut DiskMap<u64, u32>) {
    for i in 0..1_000_000u64 {
        *map.entry(i * i % P).or_insert(0) += 1;
    }
}
