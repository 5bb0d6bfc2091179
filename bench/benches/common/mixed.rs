//! Small vectors of mixed sizes, shared by `benches/sweep.rs` (their speed) and
//! `benches/footprint.rs` (the disk they take): a cheap random sequence that every contender
//! replays the same, and the request loop of a server that builds a few dozen small vectors per
//! request.

use std::hint::black_box;

/// xorshift64 (Marsaglia): deterministic, a few instructions per number, so that drawing sizes
/// costs nothing next to what is measured, and every contender gets the same sizes.
#[derive(Debug)]
pub struct XorShift(u64);

impl XorShift {
    /// The sequence of `seed`; different seeds (threads) give unrelated sequences.
    pub fn new(seed: u64) -> XorShift {
        // Spread the seed (odd multiplier: a bijection) and keep the state non-zero, the one
        // state xorshift never leaves.
        XorShift(seed.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    /// The next 64 bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A number in `0..n` (`n` > 0; the modulo bias is far below anything measured).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

/// Vectors built by one request.
pub const REQUEST_VECS: usize = 30;

/// The largest vector of a request, in bytes (sizes are uniform in `1..=REQUEST_MAX_BYTES`).
pub const REQUEST_MAX_BYTES: usize = 2_000;

/// One request: [`REQUEST_VECS`] vectors of 1 to [`REQUEST_MAX_BYTES`] bytes, each made by
/// `make(len, byte)` (with capacity `len`, filled with `byte`), all kept in `held` until the
/// request ends, then all dropped. `held` is the caller's, reused from request to request, so
/// that the vectors are the only allocations.
pub fn request<V>(rng: &mut XorShift, held: &mut Vec<V>, make: &impl Fn(usize, u8) -> V) {
    for _ in 0..REQUEST_VECS {
        let len = 1 + rng.below(REQUEST_MAX_BYTES);
        held.push(make(len, len as u8));
    }
    black_box(&*held);
    held.clear();
}
