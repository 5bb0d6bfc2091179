//! A hasher for the integer keys of the allocator's own maps (chunk indices, mapping
//! addresses): one multiplication, where the standard SipHash costs tens of nanoseconds on every
//! free. The keys are our own (indices we hand out, addresses the kernel gives), so no one can
//! choose them to collide.

use std::hash::{BuildHasherDefault, Hasher};

/// Builds [`IntHasher`]s, for `HashMap::default()`.
pub(crate) type BuildIntHasher = BuildHasherDefault<IntHasher>;

/// See the module doc.
#[derive(Default)]
pub(crate) struct IntHasher(u64);

const MIX: u64 = 0x9E37_79B9_7F4A_7C15;

impl Hasher for IntHasher {
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8 | u64::from(b)).wrapping_mul(MIX);
        }
    }

    fn write_u32(&mut self, i: u32) {
        self.write_u64(u64::from(i));
    }

    fn write_usize(&mut self, i: usize) {
        self.write_u64(i as u64);
    }

    fn write_u64(&mut self, i: u64) {
        // Fold the high bits down: page-aligned addresses have their low 12 bits zero.
        let h = i.wrapping_mul(MIX);
        self.0 = h ^ (h >> 29);
    }

    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn adjacent_keys_spread_over_buckets() {
        let build = BuildIntHasher::default();
        let mut buckets = [0usize; 16];
        for page in 0..1600usize {
            buckets[(build.hash_one(0x7f00_0000_0000 + page * 4096) % 16) as usize] += 1;
        }
        assert!(buckets.iter().all(|&n| n > 50), "{buckets:?}");
        let mut buckets = [0usize; 16];
        for index in 0..1600u32 {
            buckets[(build.hash_one(index) % 16) as usize] += 1;
        }
        assert!(buckets.iter().all(|&n| n > 50), "{buckets:?}");
    }
}
