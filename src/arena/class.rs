//! Size classes of the small-block tier.
//!
//! Classes go in 16-byte steps up to 128 bytes, then four per power of two (160, 192, 224, 256,
//! 320, 384, ...) up to [`MAX_SMALL`]: a block wastes less than 16 bytes or a quarter of its
//! size. The class of a size is computed, not searched.
//!
//! Blocks of a class sit at `chunk_base + i * block_size` with `chunk_base` a multiple of
//! [`CHUNK`], so a block is aligned to the largest power of two dividing its class's size. An
//! alignment above 16 is served by the smallest class that is both large enough and a multiple of
//! the alignment; every power of two from 16 to `MAX_SMALL` is a class, so one always exists for
//! alignments up to a page.

use allocator_api2::alloc::Layout;

use super::{CHUNK, MAX_SMALL};

/// Classes of 16-byte steps: 16, 32, ..., 128.
const LINEAR: usize = 8;
/// The last linear class, where the four-per-power-of-two classes start.
const LINEAR_MAX: usize = LINEAR * 16;
/// The largest alignment served: a page. Larger ones go to a segment of their own.
pub(crate) const MAX_ALIGN: usize = 4096;

/// How many classes there are: the linear ones, then four for each power of two from
/// `LINEAR_MAX` (exclusive) to `MAX_SMALL` (inclusive).
pub(crate) const COUNT: usize =
    LINEAR + 4 * (MAX_SMALL.trailing_zeros() - LINEAR_MAX.trailing_zeros()) as usize;

const _: () = assert!(MAX_SMALL.is_power_of_two() && MAX_SMALL <= CHUNK && MAX_ALIGN <= CHUNK);

/// The block size of class `class` (`class < COUNT`).
pub(crate) const fn block_size(class: usize) -> usize {
    if class < LINEAR {
        return (class + 1) * 16;
    }
    let band = (class - LINEAR) / 4;
    let step = (class - LINEAR) % 4 + 1;
    let low = LINEAR_MAX << band;
    low + step * (low / 4)
}

/// The smallest class whose blocks hold `size` bytes (`0 < size <= MAX_SMALL`).
fn class_of_size(size: usize) -> usize {
    debug_assert!(size > 0 && size <= MAX_SMALL);
    if size <= LINEAR_MAX {
        return size.div_ceil(16) - 1;
    }
    // `low` is the power of two with low < size <= 2 * low; the band's four classes split
    // (low, 2 * low] in quarters.
    let log = usize::BITS - 1 - (size - 1).leading_zeros();
    let low = 1usize << log;
    let quarter = (size - low).div_ceil(low / 4);
    LINEAR + 4 * (log - LINEAR_MAX.trailing_zeros()) as usize + quarter - 1
}

/// The class serving `layout`, or `None` when the tier does not serve it (empty, larger than
/// [`MAX_SMALL`], or aligned above a page). The class's block size is at least
/// `layout.size()` and a multiple of `layout.align()`.
pub(crate) fn class_for(layout: Layout) -> Option<usize> {
    let (size, align) = (layout.size(), layout.align());
    if size == 0 || size > MAX_SMALL || align > MAX_ALIGN {
        return None;
    }
    if align <= 16 {
        return Some(class_of_size(size));
    }
    // A multiple of `align` at least `size` (at most MAX_SMALL: both are powers of two or
    // below MAX_SMALL, and MAX_SMALL is a multiple of align).
    let mut class = class_of_size(size.next_multiple_of(align));
    // A band's classes are multiples of a quarter of its lower bound, and its top is a power of
    // two: at most four steps reach a multiple of `align`.
    while !block_size(class).is_multiple_of(align) {
        class += 1;
    }
    debug_assert!(class < COUNT);
    Some(class)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_are_increasing_and_end_at_max_small() {
        assert_eq!(block_size(0), 16);
        assert_eq!(block_size(LINEAR - 1), 128);
        let expected = [160, 192, 224, 256, 320, 384, 448, 512, 640];
        for (i, &size) in expected.iter().enumerate() {
            assert_eq!(block_size(LINEAR + i), size);
        }
        for class in 1..COUNT {
            assert!(block_size(class) > block_size(class - 1));
        }
        assert_eq!(block_size(COUNT - 1), MAX_SMALL);
    }

    #[test]
    fn class_of_size_is_the_smallest_that_fits() {
        for size in 1..=MAX_SMALL {
            let class = class_of_size(size);
            assert!(block_size(class) >= size, "size {size}");
            assert!(class == 0 || block_size(class - 1) < size, "size {size}");
        }
    }

    fn check(size: usize, align: usize) {
        let layout = Layout::from_size_align(size, align).unwrap();
        let class = class_for(layout).unwrap_or_else(|| panic!("{size} / {align} not served"));
        let block = block_size(class);
        assert!(block >= size, "{size} / {align}: block {block}");
        assert!(
            block.is_multiple_of(align),
            "{size} / {align}: block {block}"
        );
        if align == 1 {
            assert!(
                block <= size + size / 4 + 16,
                "{size}: block {block} wastes too much"
            );
        }
        // Nothing smaller would do.
        if class > 0 {
            let smaller = block_size(class - 1);
            assert!(
                smaller < size || !smaller.is_multiple_of(align),
                "{size} / {align}"
            );
        }
    }

    #[test]
    fn every_size_and_alignment_gets_an_aligned_class_with_bounded_waste() {
        let aligns: Vec<usize> = (0..=12).map(|s| 1 << s).collect();
        for size in 1..=4096 {
            for &align in &aligns {
                check(size, align);
            }
        }
        let mut size = 4097;
        while size <= MAX_SMALL {
            for &align in &aligns {
                check(size, align);
            }
            // Hits band edges and odd sizes alike.
            size += 1 + size / 61;
        }
        for &align in &aligns {
            check(MAX_SMALL, align);
        }
    }

    #[test]
    fn unserved_layouts_get_no_class() {
        assert_eq!(class_for(Layout::from_size_align(0, 1).unwrap()), None);
        assert_eq!(
            class_for(Layout::from_size_align(MAX_SMALL + 1, 1).unwrap()),
            None
        );
        assert_eq!(class_for(Layout::from_size_align(16, 8192).unwrap()), None);
    }
}
