//! A persistent inverted index: words -> every place they occur, in a hashbrown map of vectors
//! that lives in a store and is reopened, not rebuilt, by the next run.
//!
//! ```text
//! cargo run --release --example persistent_index                 # build it (once)
//! cargo run --release --example persistent_index -- --query kavo lum
//! cargo run --release --example persistent_index -- --help
//! ```
//!
//! The first run generates a corpus (documents of words drawn from a large vocabulary with a
//! power law, as real text is), builds the index with progress bars, flushes it and exits. A
//! later run with `--query` opens the store (a few mappings: no pass over the data, no copy)
//! and answers at once, whatever the index's size.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use mmapvec::store::{FixedState, Store, StoreError, StoreMap, StoreVec};

const HELP: &str = "\
persistent_index: build a words -> positions index in a store, then query it from new processes

USAGE:
    cargo run --release --example persistent_index -- [OPTIONS] [--query WORD...]

OPTIONS:
    --dir <PATH>     the store's folder; default: mmapvec-persistent-index in the temp directory
    --docs <N>       documents in the generated corpus; default 200000 (100 words each)
    --rebuild        remove the store first and build it again
    --query WORD...  open the store and print where each word occurs (the store must exist)
    -h, --help       print this help";

/// A word as the index keeps it: up to 16 bytes, zero padded (a `String` points to the heap,
/// which a store cannot keep).
type Word = [u8; 16];
/// Where a word occurs: document and position in it.
type Place = (u32, u32);
type Index<'s> = StoreMap<'s, Word, StoreVec<'s, Place>, FixedState>;

const WORDS_PER_DOC: u32 = 100;
const VOCABULARY: u64 = 200_000;

fn word_bytes(s: &str) -> Option<Word> {
    let mut word = [0u8; 16];
    (s.len() <= 16).then(|| {
        word[..s.len()].copy_from_slice(s.as_bytes());
        word
    })
}

fn word_str(word: &Word) -> &str {
    let len = word.iter().position(|&b| b == 0).unwrap_or(16);
    std::str::from_utf8(&word[..len]).unwrap_or("?")
}

/// The `rank`th word of the vocabulary: syllables chosen by the bits of a hash of the rank.
fn word_of(rank: u64) -> Word {
    const SYLLABLES: [&str; 16] = [
        "ka", "lum", "vo", "ri", "sen", "da", "mo", "tel", "quo", "bi", "nar", "el", "fu", "gan",
        "pe", "zi",
    ];
    let mut h = rank.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (rank >> 7);
    let mut s = String::new();
    for _ in 0..2 + (rank + 1).ilog10().min(4) {
        s.push_str(SYLLABLES[(h & 15) as usize]);
        h >>= 4;
    }
    // Ranks are unique; the syllables may not be: the rank's last digits make the word unique.
    if s.len() > 12 {
        s.truncate(12);
    }
    s.push_str(&format!("{}", rank % 1000));
    word_bytes(&s).expect("at most 15 bytes")
}

/// xorshift64*: the corpus is the same at every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A rank from a power law: rank 0 is the most frequent word.
    fn rank(&mut self) -> u64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        ((VOCABULARY as f64).powf(u) - 1.0) as u64
    }
}

fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} ({per_sec}, {eta})")
            .unwrap()
            .progress_chars("=> "),
    );
    bar.set_message(what.to_owned());
    bar
}

fn build(dir: &PathBuf, docs: u32) -> Result<(), StoreError> {
    let started = Instant::now();
    let store = Store::create(dir)?;
    let alloc = store.allocator();
    let mut index: Index = StoreMap::with_hasher_in(FixedState::with_seed(0x1dec), alloc);
    // Ranks of the vocabulary, turned into words once.
    let vocabulary: Vec<Word> = (0..VOCABULARY).map(word_of).collect();
    let mut rng = Rng(0x5eed);
    let progress = bar(u64::from(docs), "indexing");
    for doc in 0..docs {
        for pos in 0..WORDS_PER_DOC {
            let word = vocabulary[rng.rank() as usize];
            index
                .entry(word)
                .or_insert_with(|| StoreVec::new_in(alloc))
                .push((doc, pos));
        }
        if doc % 1024 == 0 {
            progress.set_position(u64::from(doc));
        }
    }
    progress.finish();
    let words = index.len();
    let places: usize = index.values().map(|v| v.len()).sum();
    store.set_root("index", index)?;
    store.set_root("docs", docs)?;
    let stats = store.stats();
    store.close()?;
    println!(
        "built an index of {words} words and {places} places from {docs} documents in {:.1?}",
        started.elapsed()
    );
    println!(
        "store: {} ({} MiB of small blocks, {} large blocks of {} MiB)",
        dir.display(),
        stats.small_chunk_bytes >> 20,
        stats.segments,
        stats.segment_bytes >> 20
    );
    println!(
        "now ask it from a new process: cargo run --release --example persistent_index -- \
         --query {} {}",
        word_str(&word_of(0)),
        word_str(&word_of(1234))
    );
    Ok(())
}

fn query(dir: &PathBuf, words: &[String]) -> Result<(), StoreError> {
    let started = Instant::now();
    let store = Store::open_read_only(dir)?;
    let index = store.root::<Index>("index")?;
    let opened = started.elapsed();
    for word in words {
        let Some(key) = word_bytes(word) else {
            println!("{word}: longer than 16 bytes, not in the index");
            continue;
        };
        let looked = Instant::now();
        let found = index.get(&key);
        let took = looked.elapsed();
        match found {
            None => println!("{word}: not found (looked up in {took:.1?})"),
            Some(places) => {
                let docs = places
                    .iter()
                    .map(|p| p.0)
                    .collect::<std::collections::HashSet<_>>();
                let first: Vec<String> = places
                    .iter()
                    .take(5)
                    .map(|(d, p)| format!("doc {d} word {p}"))
                    .collect();
                println!(
                    "{word}: {} places in {} documents (looked up in {took:.1?}); first: {}",
                    places.len(),
                    docs.len(),
                    first.join(", ")
                );
            }
        }
    }
    println!(
        "store opened and index found in {opened:.2?} ({} words)",
        index.len()
    );
    Ok(())
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut dir = std::env::temp_dir().join("mmapvec-persistent-index");
    let (mut docs, mut rebuild, mut words) = (200_000u32, false, None::<Vec<String>>);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => {
                println!("{HELP}");
                return ExitCode::SUCCESS;
            }
            "--dir" => match args.next() {
                Some(d) => dir = d.into(),
                None => return usage("--dir needs a path"),
            },
            "--docs" => match args.next().and_then(|n| n.parse().ok()) {
                Some(n) => docs = n,
                None => return usage("--docs needs a number"),
            },
            "--rebuild" => rebuild = true,
            "--query" => words = Some(args.by_ref().collect()),
            other => return usage(&format!("unknown argument {other}")),
        }
    }
    let result = match words {
        Some(words) if words.is_empty() => return usage("--query needs words"),
        Some(words) => query(&dir, &words),
        None => {
            if rebuild {
                let _ = std::fs::remove_dir_all(&dir);
            }
            if dir.exists() {
                println!(
                    "{} exists already: query it with --query, or --rebuild",
                    dir.display()
                );
                return ExitCode::SUCCESS;
            }
            build(&dir, docs)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("persistent_index: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage(message: &str) -> ExitCode {
    eprintln!("persistent_index: {message}\n\n{HELP}");
    ExitCode::from(2)
}
