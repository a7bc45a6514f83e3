//! Philox4x32-10 and dropout masks: the reference against Random123's known answers, the
//! kernels against the reference bit for bit on every backend, and the keep rate against
//! its binomial distribution.

use finetune_kernels::philox;
use finetune_kernels::reference::philox as reference;
use finetune_kernels::testing::backends;
use finetune_kernels::Error;
use proptest::prelude::*;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Random123's `kat_vectors` for philox4x32 with 10 rounds: counter, key, expected output.
const KAT: [([u32; 4], [u32; 2], [u32; 4]); 3] = [
    (
        [0; 4],
        [0; 2],
        [0x6627e8d5, 0xe169c58d, 0xbc57ac4c, 0x9b00dbd8],
    ),
    (
        [u32::MAX; 4],
        [u32::MAX; 2],
        [0x408f276d, 0x41c83b0e, 0xa20bc7c6, 0x6d5451fd],
    ),
    (
        [0x243f6a88, 0x85a308d3, 0x13198a2e, 0x03707344],
        [0xa4093822, 0x299f31d0],
        [0xd16cfe09, 0x94fdcceb, 0x5001e420, 0x24126ea1],
    ),
];

fn seed_of(key: [u32; 2]) -> u64 {
    key[0] as u64 | (key[1] as u64) << 32
}

#[test]
fn reference_matches_random123_known_answers() {
    for (counter, key, expected) in KAT {
        assert_eq!(reference::philox4x32_10(counter, key), expected);
        let c = counter[0] as u64 | (counter[1] as u64) << 32;
        assert_eq!(
            reference::random_words(seed_of(key), c, [counter[2], counter[3]], 1),
            expected
        );
    }
}

#[test]
fn kernel_matches_random123_known_answers() {
    for dev in backends() {
        for (counter, key, expected) in KAT {
            let c = counter[0] as u64 | (counter[1] as u64) << 32;
            let got = philox::random_words(&dev, seed_of(key), c, [counter[2], counter[3]], 1)
                .unwrap()
                .to_host()
                .unwrap();
            assert_eq!(got, expected, "{dev:?}");
        }
    }
}

/// Blocks whose counters carry into the high word, and wrap past 2^64: the kernel adds a
/// block's index to the 64-bit counter, not to its low word alone.
#[test]
fn kernel_counters_carry_and_wrap() {
    for dev in backends() {
        for counter in [(1u64 << 32) - 3, u64::MAX - 2, 7 << 32 | 0xFFFF_FFF0] {
            let (seed, stream) = (0x9E37_79B9_7F4A_7C15, [5, 6]);
            let expected = reference::random_words(seed, counter, stream, 40);
            let got = philox::random_words(&dev, seed, counter, stream, 40)
                .unwrap()
                .to_host()
                .unwrap();
            assert_eq!(got, expected, "counter {counter:#x} {dev:?}");
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Any counter, and counters a few blocks short of a carry into the high word and of
    /// 2^64 (where they wrap, as the reference says).
    #[test]
    fn kernel_words_match_reference(
        seed in any::<u64>(),
        counter in prop_oneof![
            any::<u64>(),
            (0u64..4000).prop_map(|d| u64::MAX - d),
            (any::<u32>(), 0u64..4000).prop_map(|(high, d)| (high as u64) << 32 | (0xFFFF_FFFF - d)),
        ],
        stream in any::<[u32; 2]>(), blocks in 1usize..2000
    ) {
        let expected = reference::random_words(seed, counter, stream, blocks);
        for dev in backends() {
            let got = philox::random_words(&dev, seed, counter, stream, blocks).unwrap().to_host().unwrap();
            prop_assert_eq!(&got, &expected, "{:?}", dev);
        }
    }

    #[test]
    fn kernel_mask_matches_reference(seed in any::<u64>(), p in 0.0f32..1.0, n in 1usize..5000) {
        let expected = reference::dropout_mask(seed, p, n);
        for dev in backends() {
            let got = philox::dropout_mask(&dev, seed, p, n).unwrap().to_host().unwrap();
            prop_assert_eq!(&got, &expected, "{:?}", dev);
        }
    }
}

#[test]
fn kernel_mask_at_odd_and_multi_block_sizes() {
    // Empty, tails of a Philox block, one warp, a thread block's worth of groups and one
    // past it, several blocks; p at both ends and a seed with both halves set.
    let mut rng = StdRng::seed_from_u64(rand::random());
    for n in [0usize, 1, 2, 3, 5, 31, 1024, 1025, 4095, 70_001] {
        for p in [0.0f32, 0.1, 0.5, 0.999] {
            let seed = rng.random::<u64>() | 1 << 63 | 1;
            let expected = reference::dropout_mask(seed, p, n);
            for dev in backends() {
                let got = philox::dropout_mask(&dev, seed, p, n)
                    .unwrap()
                    .to_host()
                    .unwrap();
                assert_eq!(got, expected, "n {n} p {p} seed {seed} {dev:?}");
            }
        }
    }
}

/// The number kept of `n` is Binomial(n, 1 − p); a count more than 6 standard deviations
/// off (a chance of about 2e-9 per check) means the mask is biased.
fn assert_keep_rate(keep: &[u8], p: f32, what: &str) {
    let n = keep.len() as f64;
    let q = 1.0 - p as f64;
    let kept = keep.iter().map(|&k| k as f64).sum::<f64>();
    let sd = (n * q * (1.0 - q)).sqrt();
    assert!(
        (kept - n * q).abs() <= 6.0 * sd + 1.0,
        "{what}: kept {kept} of {n}, expected {} ± {sd:.1} (p = {p})",
        n * q
    );
}

#[test]
fn keep_rate_is_binomial() {
    let mut rng = StdRng::seed_from_u64(rand::random());
    for p in [0.0f32, 0.05, 0.1, 0.3, 0.5, 0.9] {
        let seed = rng.random();
        let n = 1 << 20;
        let mask = reference::dropout_mask(seed, p, n);
        assert_keep_rate(&mask, p, &format!("seed {seed}"));
        // Each of the four words of a block on its own (a word used twice would show here
        // only as correlation, a word never used as a rate off).
        for j in 0..4 {
            let lane: Vec<u8> = mask.iter().skip(j).step_by(4).copied().collect();
            assert_keep_rate(&lane, p, &format!("seed {seed} word {j}"));
        }
        for dev in backends() {
            let got = philox::dropout_mask(&dev, seed, p, 100_003)
                .unwrap()
                .to_host()
                .unwrap();
            assert_keep_rate(&got, p, &format!("seed {seed} {dev:?}"));
        }
    }
}

#[test]
fn masks_differ_across_seeds_and_words() {
    // Two seeds that differ only in the high word (the key's second half) must give
    // different masks, and the four words of a block are not copies of one another.
    let a = reference::dropout_mask(7, 0.5, 4096);
    let b = reference::dropout_mask(7 | 1 << 32, 0.5, 4096);
    let same = a.iter().zip(&b).filter(|(x, y)| x == y).count();
    assert!((1748..=2348).contains(&same), "{same} of 4096 agree");
    let copies = a.chunks(4).filter(|c| c.iter().all(|&x| x == c[0])).count();
    assert!(copies < 250, "{copies} of 1024 blocks are uniform");
}

#[test]
fn bad_p_is_a_typed_error() {
    for dev in backends() {
        for p in [-0.1f32, 1.0, 1.5, f32::NAN, f32::INFINITY] {
            assert!(
                matches!(
                    philox::dropout_mask(&dev, 1, p, 10),
                    Err(Error::InvalidArgument {
                        what: "dropout p",
                        ..
                    })
                ),
                "p {p}"
            );
        }
    }
}
