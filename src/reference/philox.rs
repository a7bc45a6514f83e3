//! Philox4x32-10 (Salmon, Moraes, Dror, Shaw: "Parallel random numbers: as easy as 1, 2, 3",
//! SC 2011, with Random123's constants) and the dropout keep-mask built on it.
//!
//! Counter-based: the random words for any element are a pure function of (key, counter),
//! so a kernel regenerates a dropout mask in backward instead of storing it, and every
//! thread of the GPU, the emulator and this reference agree bit for bit.
//!
//! The dropout mask (cuda/params/philox.h says the same):
//! - key = (seed as u32, (seed >> 32) as u32);
//! - element `i` lives in block `g = i / 4`, counter = (g as u32, (g >> 32) as u32, 0, 0),
//!   and uses word `i % 4` of `philox4x32_10(counter, key)`;
//! - `u = (word >> 8) as f32 · 2⁻²⁴` (exact: 24 bits fit f32's mantissa), uniform in [0, 1);
//! - the element is kept iff `u >= p`, so P(keep) = 1 − p up to the 2⁻²⁴ grid.
//!
//! Counter words 2 and 3 are zero for dropout; other users of the same seed (MeZO's
//! perturbations, DESIGN.md §6) put a nonzero id there to draw an independent stream.

/// Multipliers of the two Philox S-boxes.
pub const M0: u32 = 0xD251_1F53;
/// The second S-box's multiplier ([`M0`] is the first's): it multiplies counter word 2.
pub const M1: u32 = 0xCD9E_8D57;
/// The Weyl sequence increments of the key schedule (golden ratio, √3 − 1).
pub const W0: u32 = 0x9E37_79B9;
/// The key schedule's increment of key word 1, √3 − 1 in 32-bit fixed point ([`W0`] bumps
/// key word 0).
pub const W1: u32 = 0xBB67_AE85;
/// Rounds of Philox4x32-10.
pub const ROUNDS: usize = 10;

fn mulhilo(a: u32, b: u32) -> (u32, u32) {
    let p = a as u64 * b as u64;
    ((p >> 32) as u32, p as u32)
}

/// Philox4x32 with `ROUNDS` rounds: the key is bumped by (W0, W1) before every round but
/// the first.
pub fn philox4x32_10(counter: [u32; 4], key: [u32; 2]) -> [u32; 4] {
    let (mut c, mut k) = (counter, key);
    for round in 0..ROUNDS {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let (hi0, lo0) = mulhilo(M0, c[0]);
        let (hi1, lo1) = mulhilo(M1, c[2]);
        c = [hi1 ^ c[1] ^ k[0], lo1, hi0 ^ c[3] ^ k[1], lo0];
    }
    c
}

/// The key for a 64-bit seed: (low word, high word).
pub fn key(seed: u64) -> [u32; 2] {
    [seed as u32, (seed >> 32) as u32]
}

/// `blocks` consecutive Philox outputs, 4 words each: block `i` has counter
/// `(c as u32, (c >> 32) as u32, stream[0], stream[1])` with `c = counter + i` (mod 2⁶⁴).
pub fn random_words(seed: u64, counter: u64, stream: [u32; 2], blocks: usize) -> Vec<u32> {
    (0..blocks as u64)
        .flat_map(|i| {
            let c = counter.wrapping_add(i);
            philox4x32_10(
                [c as u32, (c >> 32) as u32, stream[0], stream[1]],
                key(seed),
            )
        })
        .collect()
}

/// The top 24 bits of a word as a uniform float in [0, 1), exactly.
pub fn uniform24(word: u32) -> f32 {
    (word >> 8) as f32 * (1.0 / (1u32 << 24) as f32)
}

/// The four words block `group` of a dropout mask draws from (elements `4·group..4·group+4`).
pub fn dropout_words(seed: u64, group: u64) -> [u32; 4] {
    philox4x32_10([group as u32, (group >> 32) as u32, 0, 0], key(seed))
}

/// Whether element `index` survives dropout with probability `p` under `seed`.
pub fn dropout_keep(seed: u64, index: u64, p: f32) -> bool {
    uniform24(dropout_words(seed, index / 4)[(index % 4) as usize]) >= p
}

/// Keep flags (1 keep, 0 drop) of elements `0..n`, as the `philox_dropout_mask` kernel
/// writes them.
pub fn dropout_mask(seed: u64, p: f32, n: usize) -> Vec<u8> {
    (0..n.div_ceil(4) as u64)
        .flat_map(|g| dropout_words(seed, g).map(|w| (uniform24(w) >= p) as u8))
        .take(n)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_agrees_with_single_element_keep() {
        let mask = dropout_mask(0x1234_5678_9abc_def0, 0.3, 23);
        for (i, &m) in mask.iter().enumerate() {
            assert_eq!(m == 1, dropout_keep(0x1234_5678_9abc_def0, i as u64, 0.3));
        }
    }

    #[test]
    fn uniform24_spans_the_unit_interval() {
        assert_eq!(uniform24(0), 0.0);
        assert_eq!(uniform24(0xFF), 0.0);
        assert_eq!(uniform24(0x100), 2f32.powi(-24));
        assert_eq!(uniform24(u32::MAX), 1.0 - 2f32.powi(-24));
    }
}
