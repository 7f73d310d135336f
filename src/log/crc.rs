//! CRC-32 (IEEE, as `crc32fast` computes it) for frames, and the CRC of any
//! sub-range of a buffer from prefix CRCs, which keeps the torn-tail check
//! of `reader.rs` linear in the bytes it reads.
//!
//! # Why a sub-range costs O(1)
//! CRC-32 is linear over GF(2). For byte strings `s` and `t` (zlib's
//! `crc32_combine`; the initial value and final XOR of the standard CRC
//! cancel out):
//!
//! ```text
//! crc(s ‖ t) = crc(s) · x^(8·|t|) mod P  ⊕  crc(t)
//! ```
//!
//! So with `F(i) = crc(buf[origin..i])`, the CRC of `buf[a..b]` is
//! `F(b) ⊕ F(a) · x^(8·(b−a)) mod P`. [`RangeCrc`] keeps `F` at every
//! [`STEP`]-th byte (one pass over the bytes, as far as asked for) and
//! finishes a prefix from the nearest mark below it (under `STEP` bytes);
//! [`shift`] multiplies by `x^(8k)` with one table row per byte of `k`.
//!
//! # Representation
//! A polynomial of degree below 32 is a `u32` in the reflected order the
//! CRC register uses: bit 31 is the coefficient of `x^0`, bit 0 that of
//! `x^31`. `P` (with its `x^32` term implied) is `0xEDB8_8320`.

/// The CRC-32 (IEEE) polynomial, reflected, without its `x^32` term.
const POLY: u32 = 0xEDB8_8320;
/// The polynomial `1` (`x^0`), reflected.
const ONE: u32 = 1 << 31;
/// Bytes between two prefix marks of a [`RangeCrc`]: finishing a prefix
/// hashes fewer than this many bytes, and the marks take 4 bytes per
/// `STEP` bytes of the range.
pub(crate) const STEP: usize = 64;
/// Bytes in a `usize`: the rows of [`POWERS`].
const DIGITS: usize = (usize::BITS / 8) as usize;

/// `a · b mod P`.
const fn mul(a: u32, mut b: u32) -> u32 {
    let mut product = 0;
    let mut bit = ONE;
    while bit != 0 {
        if a & bit != 0 {
            product ^= b;
        }
        // b · x: the register shifts toward bit 0; a carry out of x^31
        // reduces by P.
        b = if b & 1 != 0 { (b >> 1) ^ POLY } else { b >> 1 };
        bit >>= 1;
    }
    product
}

/// `POWERS[j][d]` is `x^(8 · d · 256^j) mod P`: one row per byte of a
/// shift, so that a shift by `k` bytes is a product over `k`'s bytes.
static POWERS: [[u32; 256]; DIGITS] = powers();

// In bounds: `j < DIGITS` and `0 < d < 256`; this runs only at compile
// time, where an index out of bounds would fail the build.
#[allow(clippy::indexing_slicing)]
const fn powers() -> [[u32; 256]; DIGITS] {
    let mut table = [[ONE; 256]; DIGITS];
    // x^8: the register value of x^8 is bit 31 - 8.
    let mut base = ONE >> 8;
    let mut j = 0;
    while j < DIGITS {
        let mut d = 1;
        while d < 256 {
            table[j][d] = mul(table[j][d - 1], base);
            d += 1;
        }
        // The next row's base is this one's to the 256th power.
        let mut squarings = 0;
        while squarings < 8 {
            base = mul(base, base);
            squarings += 1;
        }
        j += 1;
    }
    table
}

/// `v · x^(8k) mod P`: the CRC of `s` moved past `k` more bytes, as the
/// combine rule above needs it. At most one product per non-zero byte of
/// `k`.
pub(crate) fn shift(v: u32, k: usize) -> u32 {
    let mut acc = v;
    for (row, byte) in POWERS.iter().zip(k.to_le_bytes()) {
        if byte != 0 {
            // In bounds: a byte indexes a row of 256.
            #[allow(clippy::indexing_slicing)]
            let power = row[usize::from(byte)];
            acc = mul(acc, power);
        }
    }
    acc
}

/// The CRC-32 of `bytes`.
pub(crate) fn hash(bytes: &[u8]) -> u32 {
    resume(0, bytes)
}

/// The CRC-32 of `s ‖ bytes`, given `crc`, the CRC-32 of `s`.
fn resume(crc: u32, bytes: &[u8]) -> u32 {
    count_hashed(bytes.len());
    let mut hasher = crc32fast::Hasher::new_with_initial(crc);
    hasher.update(bytes);
    hasher.finalize()
}

/// The CRC-32 of sub-ranges of `buf[origin..]`, each in O(1) after one pass
/// over the bytes up to the range's end.
///
/// # Invariants
/// `marks[i]` is the CRC-32 of `buf[origin .. origin + i * STEP]`, and
/// `marks` is never empty (`marks[0]` is the CRC of no bytes, 0).
#[derive(Debug)]
pub(crate) struct RangeCrc<'a> {
    buf: &'a [u8],
    origin: usize,
    marks: Vec<u32>,
}

impl<'a> RangeCrc<'a> {
    /// Ranges of `buf` that start at `origin` or later. Hashes nothing yet.
    pub fn new(buf: &'a [u8], origin: usize) -> RangeCrc<'a> {
        RangeCrc {
            buf,
            origin,
            marks: vec![0],
        }
    }

    /// The CRC-32 of `buf[start..end]`, or `None` unless
    /// `origin <= start <= end <= buf.len()`. Hashes the bytes up to `end`
    /// that no earlier call hashed, plus fewer than `2 * STEP` others.
    pub fn crc(&mut self, start: usize, end: usize) -> Option<u32> {
        if start > end {
            return None;
        }
        let whole = self.prefix(end)?;
        let head = self.prefix(start)?;
        Some(whole ^ shift(head, end - start))
    }

    /// The CRC-32 of `buf[origin..at]`.
    fn prefix(&mut self, at: usize) -> Option<u32> {
        let mark = at.checked_sub(self.origin)? / STEP;
        if at > self.buf.len() {
            return None;
        }
        while self.marks.len() <= mark {
            let last = *self.marks.last()?;
            let from = self.origin + (self.marks.len() - 1) * STEP;
            let next = resume(last, self.buf.get(from..from + STEP)?);
            self.marks.push(next);
        }
        let from = self.origin + mark * STEP;
        Some(resume(*self.marks.get(mark)?, self.buf.get(from..at)?))
    }
}

#[cfg(test)]
thread_local! {
    /// Bytes hashed on this thread, for tests that bound the work a check
    /// does (tests run on several threads; each counts its own).
    static HASHED: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// Counts `n` bytes hashed (tests only).
#[cfg_attr(not(test), allow(unused_variables))]
#[inline(always)]
fn count_hashed(n: usize) {
    #[cfg(test)]
    HASHED.with(|h| h.set(h.get() + n as u64));
}

/// Bytes hashed on this thread so far.
#[cfg(test)]
pub(crate) fn hashed_bytes() -> u64 {
    HASHED.with(std::cell::Cell::get)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// `v · x^(8k)`, one byte at a time.
    fn shift_slowly(v: u32, k: usize) -> u32 {
        (0..k).fold(v, |v, _| mul(v, ONE >> 8))
    }

    #[test]
    fn one_is_the_identity_and_x_shifts_by_one_bit() {
        for v in [0, 1, 0x8000_0000, 0xdead_beef, u32::MAX] {
            assert_eq!(mul(ONE, v), v);
            assert_eq!(mul(v, ONE), v);
            assert_eq!(shift(v, 0), v);
        }
        // x · x^31 = x^32 = P's lower terms.
        assert_eq!(mul(ONE >> 1, 1), POLY);
    }

    #[test]
    fn shift_matches_shifting_one_byte_at_a_time() {
        for k in (0..600).chain([65_535, 65_536, 65_537, 70_000]) {
            assert_eq!(shift(0x1234_5678, k), shift_slowly(0x1234_5678, k), "k {k}");
        }
    }

    proptest! {
        #[test]
        fn the_crc_of_a_concatenation_combines(
            s in proptest::collection::vec(any::<u8>(), 0..300),
            t in proptest::collection::vec(any::<u8>(), 0..300),
        ) {
            let whole = [&s[..], &t[..]].concat();
            prop_assert_eq!(
                crc32fast::hash(&whole),
                shift(crc32fast::hash(&s), t.len()) ^ crc32fast::hash(&t)
            );
        }

        #[test]
        fn shifts_add_up_and_agree_with_crc32fast_combine(
            v in any::<u32>(),
            t in any::<u32>(),
            a in any::<u32>(),
            b in any::<u32>(),
        ) {
            let (a, b) = (a as usize, b as usize);
            prop_assert_eq!(shift(shift(v, a), b), shift(v, a + b));
            let mut left = crc32fast::Hasher::new_with_initial_len(v, 0);
            left.combine(&crc32fast::Hasher::new_with_initial_len(t, a as u64));
            prop_assert_eq!(left.finalize(), shift(v, a) ^ t);
        }

        #[test]
        fn a_range_crc_equals_hashing_the_range(
            buf in proptest::collection::vec(any::<u8>(), 0..1500),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 3..12),
        ) {
            let n = buf.len();
            let origin = cuts[0].index(n + 1);
            let mut ranges = RangeCrc::new(&buf, origin);
            // Ranges in any order: later ones reuse, or extend, the marks.
            for pair in cuts[1..].chunks(2) {
                let x = origin + pair[0].index(n - origin + 1);
                let y = origin + pair.get(1).map_or(0, |c| c.index(n - origin + 1));
                let (start, end) = (x.min(y), x.max(y));
                prop_assert_eq!(ranges.crc(start, end), Some(crc32fast::hash(&buf[start..end])));
            }
        }
    }

    #[test]
    fn a_range_outside_the_buffer_or_before_the_origin_has_no_crc() {
        let buf = [7u8; 200];
        let mut ranges = RangeCrc::new(&buf, 10);
        assert_eq!(ranges.crc(9, 20), None);
        assert_eq!(ranges.crc(20, 201), None);
        assert_eq!(ranges.crc(30, 20), None);
        assert_eq!(ranges.crc(10, 10), Some(0));
        assert_eq!(ranges.crc(10, 200), Some(crc32fast::hash(&buf[10..])));
    }

    #[test]
    fn a_range_hashes_each_byte_once_plus_under_two_steps() {
        let buf: Vec<u8> = (0..10_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let mut ranges = RangeCrc::new(&buf, 100);
        let before = hashed_bytes();
        assert_eq!(ranges.crc(100, 10_000), Some(crc32fast::hash(&buf[100..])));
        assert!(hashed_bytes() - before < 9_900 + 2 * STEP as u64);
        for start in (100..9_000).step_by(37) {
            let before = hashed_bytes();
            let end = start + 999;
            assert_eq!(
                ranges.crc(start, end),
                Some(crc32fast::hash(&buf[start..end]))
            );
            assert!(
                hashed_bytes() - before < 2 * STEP as u64,
                "range at {start}"
            );
        }
    }
}
