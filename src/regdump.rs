//! Host side of the register-dump kernels (`cuda/regdump.cu`).
//!
//! One warp records what every lane holds after each `ldmatrix` variant, each `mma.sync`
//! variant (on two input sets: small integers, whose products are exact, and random
//! values, which show the hardware's rounding) and the packed `cvt` instructions; on Hopper
//! one warpgroup records `wgmma` (bf16, f16; A from shared memory, K- and MN-major, and from
//! registers; B K- and MN-major) on the same two sets. The GPU check writes the dump to
//! `tests/data/regdump-<gpu>.txt`; the emulator must reproduce it.

use crate::device::{Device, Kernel, LaunchConfig, Target};
use crate::error::{Error, Result};
use crate::params::{
    RegdumpParams, FK_REGDUMP_CVT_IN, FK_REGDUMP_LDMATRIX_VARIANTS, FK_REGDUMP_MMA_IN,
    FK_REGDUMP_RCP_SAMPLES, FK_REGDUMP_RCP_WORDS, FK_REGDUMP_WGMMA_IN, FK_REGDUMP_WGMMA_THREADS,
};
use half::{bf16, f16};
use rand::{Rng, SeedableRng};

const MODULE: &str = "regdump";
const LANES: usize = 32;

/// One kernel run: its inputs and what the warp wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Section {
    /// Kernel name, e.g. `regdump_mma_bf16`.
    pub kernel: String,
    /// Input set: `none`, `int`, `random` or `edge`.
    pub set: String,
    /// The words the kernel reads, as [`mma_input`], [`wgmma_input`], [`cvt_input`] or
    /// [`rcp_input`] lay them out; empty for the kernels that read none.
    pub input: Vec<u32>,
    /// The words the kernel wrote, [`output_len`] of them; empty until recorded.
    pub output: Vec<u32>,
}

/// A whole dump: where it was recorded and every section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegDump {
    /// The device it was recorded on, as [`Device::describe`] names it.
    pub recorded_on: String,
    /// Every section recorded, in the plan's order ([`plan`]).
    pub sections: Vec<Section>,
}

/// The element type an mma kernel takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmaInput {
    /// bfloat16, two per register.
    BF16,
    /// IEEE half precision, two per register.
    F16,
    /// FP8 E4M3, four per register (sm_89 and later).
    E4M3,
    /// FP8 E5M2, four per register (sm_89 and later).
    E5M2,
}

impl MmaInput {
    /// Every input type, in the order the plan records them.
    pub const ALL: [MmaInput; 4] = [
        MmaInput::BF16,
        MmaInput::F16,
        MmaInput::E4M3,
        MmaInput::E5M2,
    ];

    fn name(self) -> &'static str {
        match self {
            MmaInput::BF16 => "bf16",
            MmaInput::F16 => "f16",
            MmaInput::E4M3 => "e4m3",
            MmaInput::E5M2 => "e5m2",
        }
    }

    fn is_fp8(self) -> bool {
        matches!(self, MmaInput::E4M3 | MmaInput::E5M2)
    }

    /// The bits of `x` in this type; `x` must be representable (small integers are).
    fn encode(self, x: f32) -> u32 {
        match self {
            MmaInput::BF16 => bf16::from_f32(x).to_bits() as u32,
            MmaInput::F16 => f16::from_f32(x).to_bits() as u32,
            MmaInput::E4M3 => encode_small_fp8(x, 3, 7),
            MmaInput::E5M2 => encode_small_fp8(x, 2, 15),
        }
    }

    /// A random finite encoding (never NaN or infinity).
    fn random_bits(self, rng: &mut impl Rng) -> u32 {
        match self {
            MmaInput::BF16 => bf16::from_f32(rng.random_range(-2.0..2.0)).to_bits() as u32,
            MmaInput::F16 => f16::from_f32(rng.random_range(-2.0..2.0)).to_bits() as u32,
            MmaInput::E4M3 => loop {
                let b: u8 = rng.random();
                if b & 0x7F != 0x7F {
                    break b as u32;
                }
            },
            MmaInput::E5M2 => loop {
                let b: u8 = rng.random();
                if b & 0x7C != 0x7C {
                    break b as u32;
                }
            },
        }
    }

    /// Elements per 32-bit register.
    fn per_register(self) -> usize {
        if self.is_fp8() {
            4
        } else {
            2
        }
    }
}

/// A small integer (the callers draw from [-4, 4]; with 2 mantissa bits 9, 11, 13 and 15 are
/// not representable) as an FP8 bit pattern with `mant` mantissa bits and `bias`.
fn encode_small_fp8(x: f32, mant: u32, bias: i32) -> u32 {
    let sign = if x < 0.0 { 0x80 } else { 0 };
    let a = x.abs() as u32;
    if a == 0 {
        return sign;
    }
    let e = 31 - a.leading_zeros(); // floor(log2 a)
    let frac = (a - (1 << e)) << mant >> e;
    sign | (((e as i32 + bias) as u32) << mant) | frac
}

fn pack(elems: &[u32], bits: u32) -> u32 {
    elems
        .iter()
        .enumerate()
        .fold(0, |acc, (i, &e)| acc | (e << (bits * i as u32)))
}

/// Inputs for one mma kernel: per lane, registers `A[4]`, `B[2]` and `C[4]` (f32 bits).
pub fn mma_input(t: MmaInput, set: &str, seed: u64) -> Vec<u32> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let per = t.per_register();
    let bits = 32 / per as u32;
    let mut words = Vec::with_capacity(LANES * FK_REGDUMP_MMA_IN as usize);
    for _ in 0..LANES {
        let elem = |rng: &mut rand::rngs::StdRng| match set {
            "int" => t.encode(rng.random_range(-4i32..=4) as f32),
            _ => t.random_bits(rng),
        };
        for _ in 0..6 {
            let e: Vec<u32> = (0..per).map(|_| elem(&mut rng)).collect();
            words.push(pack(&e, bits));
        }
        for _ in 0..4 {
            let c = match set {
                "int" => rng.random_range(-8i32..=8) as f32,
                _ => rng.random_range(-4.0f32..4.0),
            };
            words.push(c.to_bits());
        }
    }
    words
}

/// Inputs for a wgmma kernel (`t` bf16 or f16): A `[64][64]` and B `[8][64]` row-major, two
/// elements a word (the even one low), then each thread's four accumulators C (f32 bits).
pub fn wgmma_input(t: MmaInput, set: &str, seed: u64) -> Vec<u32> {
    assert!(!t.is_fp8(), "the wgmma dump is bf16 and f16");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let elements = (64 + 8) * 64;
    let mut words = Vec::with_capacity(FK_REGDUMP_WGMMA_IN as usize);
    for _ in 0..elements / 2 {
        let mut elem = || match set {
            "int" => t.encode(rng.random_range(-4i32..=4) as f32),
            _ => t.random_bits(&mut rng),
        };
        words.push(pack(&[elem(), elem()], 16));
    }
    for _ in 0..FK_REGDUMP_WGMMA_THREADS * 4 {
        let c = match set {
            "int" => rng.random_range(-8i32..=8) as f32,
            _ => rng.random_range(-4.0f32..4.0),
        };
        words.push(c.to_bits());
    }
    words
}

fn is_wgmma(kernel: &str) -> bool {
    kernel.starts_with("regdump_wgmma")
}

/// Inputs for the cvt kernel: per lane a (hi, lo) pair. The first lanes hold edge cases
/// (ties, saturation, NaN, infinities, signed zero, subnormals), the rest random values.
pub fn cvt_input(seed: u64) -> Vec<u32> {
    let tie = 1.0 + 2f32.powi(-8); // exactly between two bf16 values: rounds to even
    let edge = [
        (1.0, -2.5),
        (tie, 1.0 + 3.0 * 2f32.powi(-8)),
        (448.0, -448.0),
        (464.0, 480.0),
        (1e6, -1e6),
        (57344.0, 61440.0),
        (f32::NAN, -f32::NAN),
        (f32::INFINITY, f32::NEG_INFINITY),
        (0.0, -0.0),
        (2f32.powi(-9), 2f32.powi(-10)),
        (2f32.powi(-16), 2f32.powi(-17)),
        (f32::from_bits(1), -f32::from_bits(0x007F_FFFF)),
        (3.0e38, -3.4e38),
        (0.1, -0.3),
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut words = Vec::with_capacity(LANES * FK_REGDUMP_CVT_IN as usize);
    for lane in 0..LANES {
        let (hi, lo) = edge.get(lane).copied().unwrap_or_else(|| {
            let scale = 2f32.powi(rng.random_range(-20..20));
            (
                rng.random_range(-1.0f32..1.0) * scale,
                rng.random_range(-1.0f32..1.0) * scale,
            )
        });
        words.extend([hi.to_bits(), lo.to_bits()]);
    }
    words
}

/// Inputs for MUFU.RCP: zeros, infinities, NaN, subnormals, the edges where the result
/// becomes subnormal (and flushes), then random values over every exponent.
pub fn rcp_input(seed: u64) -> Vec<u32> {
    let edge: [u32; 16] = [
        0x0000_0000,
        0x8000_0000,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0x0000_0001,
        0x807f_ffff,
        0x0080_0000,
        0x3f80_0000,
        0x4000_0000,
        0x7e80_0000,
        0x7e80_0001,
        0x7eff_ffff,
        0x7f00_0000,
        0x7f7f_ffff,
        0xc0a0_0000,
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut words = edge.to_vec();
    while words.len() < FK_REGDUMP_RCP_SAMPLES as usize {
        words.push(rng.random::<u32>());
    }
    words
}

/// Both input sets of one instruction's kernel, seeded by its place in the plan.
fn both_sets(
    sections: &mut Vec<Section>,
    kernel: String,
    seed: u64,
    input: &dyn Fn(&str, u64) -> Vec<u32>,
) {
    for (j, set) in ["int", "random"].into_iter().enumerate() {
        sections.push(Section {
            kernel: kernel.clone(),
            set: set.into(),
            input: input(set, seed + j as u64),
            output: vec![],
        });
    }
}

/// Every section the dump holds on `target`, with its inputs (FP8 needs sm_89+, wgmma
/// sm_90a).
pub fn plan(target: Target) -> Vec<Section> {
    let mut sections = vec![Section {
        kernel: "regdump_ldmatrix".into(),
        set: "none".into(),
        input: vec![],
        output: vec![],
    }];
    for (i, t) in MmaInput::ALL.into_iter().enumerate() {
        if !(t.is_fp8() && target == Target::Sm80) {
            let input = move |set: &str, seed| mma_input(t, set, seed);
            both_sets(
                &mut sections,
                format!("regdump_mma_{}", t.name()),
                1000 + 10 * i as u64,
                &input,
            );
        }
    }
    if target != Target::Sm80 {
        sections.push(Section {
            kernel: "regdump_cvt".into(),
            set: "edge".into(),
            input: cvt_input(7),
            output: vec![],
        });
    }
    sections.push(Section {
        kernel: "regdump_rcp".into(),
        set: "edge".into(),
        input: rcp_input(11),
        output: vec![],
    });
    // stmatrix, then wgmma last: the newest kernels (see `record`).
    if target == Target::Sm90a {
        sections.push(Section {
            kernel: "regdump_stmatrix".into(),
            set: "none".into(),
            input: vec![],
            output: vec![],
        });
        for (i, t) in [MmaInput::BF16, MmaInput::F16].into_iter().enumerate() {
            let input = move |set: &str, seed| wgmma_input(t, set, seed);
            for (variant, seed) in [("", 2000), ("_rs", 2100), ("_mn", 2200), ("_mn_b", 2300)] {
                both_sets(
                    &mut sections,
                    format!("regdump_wgmma{variant}_{}", t.name()),
                    seed + 10 * i as u64,
                    &input,
                );
            }
        }
    }
    sections
}

/// Every kernel this module can launch (the build checks look each up in the PTX).
pub fn kernels() -> Vec<Kernel> {
    let mut names: Vec<String> = plan(Target::Sm90a).into_iter().map(|s| s.kernel).collect();
    names.dedup();
    names.push("regdump_rcp_table".into());
    // Tested against the PTX ISA's formula (tests/device.rs).
    names.push("regdump_tma".into());
    names.push("regdump_tma_multicast".into());
    names
        .into_iter()
        .map(|name| Kernel {
            module: MODULE,
            name,
        })
        .collect()
}

/// Words each section's kernel writes.
pub fn output_len(kernel: &str) -> usize {
    match kernel {
        "regdump_ldmatrix" => FK_REGDUMP_LDMATRIX_VARIANTS as usize * LANES * 4,
        "regdump_cvt" => LANES * crate::params::FK_REGDUMP_CVT_OUT as usize,
        "regdump_rcp" => FK_REGDUMP_RCP_SAMPLES as usize,
        k if is_wgmma(k) => FK_REGDUMP_WGMMA_THREADS as usize * 4,
        _ => LANES * 4,
    }
}

/// Words each section's kernel reads from its input; None for a kernel no section runs
/// (the MUFU table's and the TMA tests', whose launches are their own).
fn input_len(kernel: &str) -> Option<usize> {
    Some(match kernel {
        "regdump_ldmatrix" | "regdump_stmatrix" => 0,
        "regdump_cvt" => LANES * crate::params::FK_REGDUMP_CVT_IN as usize,
        "regdump_rcp" => FK_REGDUMP_RCP_SAMPLES as usize,
        k if is_wgmma(k) => FK_REGDUMP_WGMMA_IN as usize,
        k if k.starts_with("regdump_mma_") => LANES * crate::params::FK_REGDUMP_MMA_IN as usize,
        _ => return None,
    })
}

/// Runs one section's kernel on `dev` with its input and returns what the warp wrote. A
/// kernel no section runs, or an input of another length than its kernel reads, is an
/// [`Error::InvalidArgument`].
pub fn run_section(dev: &Device, s: &Section) -> Result<Vec<u32>> {
    match input_len(&s.kernel) {
        Some(n) if n == s.input.len() => {}
        expected => {
            return Err(Error::InvalidArgument {
                what: "register dump",
                why: match expected {
                    Some(n) => format!("{}: {} input words, not {n}", s.kernel, s.input.len()),
                    None => format!("{}: not a section's kernel", s.kernel),
                },
            })
        }
    }
    let input = dev.upload(if s.input.is_empty() {
        &[0u32][..]
    } else {
        &s.input
    })?;
    let mut out = dev.alloc_poisoned::<u32>(output_len(&s.kernel))?;
    let p = RegdumpParams {
        out: out.ptr_mut() as *mut u32,
        in_: input.ptr() as *const u32,
    };
    let threads = if is_wgmma(&s.kernel) {
        FK_REGDUMP_WGMMA_THREADS
    } else {
        LANES as u32
    };
    let cfg = LaunchConfig {
        grid: (1, 1, 1),
        block: (threads, 1, 1),
        shared_bytes: 0,
        cluster: (1, 1, 1),
    };
    let kernel = Kernel {
        module: MODULE,
        name: s.kernel.clone(),
    };
    // SAFETY: a section's kernel (checked above) reads input_len words of `input` (checked
    // above: it holds them, or one where it reads none) and writes output_len words.
    unsafe { dev.launch(&kernel, cfg, &p)? };
    out.to_host()
}

/// Records MUFU.RCP against the correctly rounded reciprocal over all 2²³ mantissas: one
/// bit per mantissa, set where they differ (`FK_REGDUMP_RCP_WORDS` little-endian words).
pub fn record_rcp_table(dev: &Device) -> Result<Vec<u32>> {
    let dummy = dev.upload(&[0u32])?;
    let mut out = dev.alloc_poisoned::<u32>(FK_REGDUMP_RCP_WORDS as usize)?;
    let p = RegdumpParams {
        out: out.ptr_mut() as *mut u32,
        in_: dummy.ptr() as *const u32,
    };
    let cfg = LaunchConfig::grid_stride(FK_REGDUMP_RCP_WORDS as u64, 256, u32::MAX);
    // SAFETY: one thread per output word, FK_REGDUMP_RCP_WORDS of them; no input is read.
    unsafe {
        dev.launch(
            &Kernel {
                module: MODULE,
                name: "regdump_rcp_table".into(),
            },
            cfg,
            &p,
        )?
    };
    out.to_host()
}

/// Records the whole dump on `dev`, in the plan's order. A section that fails ends the
/// recording (a GPU fault ends the CUDA context): the dump holds the sections before it, and
/// the error comes with it.
pub fn record(dev: &Device, target: Target) -> (RegDump, Option<Error>) {
    let mut sections = plan(target);
    let mut error = None;
    for (i, s) in sections.iter_mut().enumerate() {
        match run_section(dev, s) {
            Ok(out) => s.output = out,
            Err(e) => {
                error = Some(e);
                sections.truncate(i);
                break;
            }
        }
    }
    let dump = RegDump {
        recorded_on: dev.describe(),
        sections,
    };
    (dump, error)
}

impl RegDump {
    /// The committed text form: a header, then per section its input and output words in
    /// hex, eight per line.
    pub fn to_text(&self) -> String {
        let mut t = String::from("# finetune-kernels register dump v1\n");
        t += &format!("recorded_on {}\n", self.recorded_on);
        for s in &self.sections {
            t += &format!("section {} {}\n", s.kernel, s.set);
            for (tag, words) in [("in", &s.input), ("out", &s.output)] {
                t += &format!("{tag} {}\n", words.len());
                for chunk in words.chunks(8) {
                    let line: Vec<String> = chunk.iter().map(|w| format!("{w:08x}")).collect();
                    t += &line.join(" ");
                    t.push('\n');
                }
            }
        }
        t
    }

    /// Reads the text form [`RegDump::to_text`] writes, skipping lines that start with `#`.
    /// Errors with [`Error::Io`] (path `register dump`) on a missing `recorded_on` line, a
    /// line that is not the section, count or hex words expected, or words that end early.
    pub fn parse(text: &str) -> Result<RegDump> {
        let bad = |why: String| Error::Io {
            path: "register dump".into(),
            why,
        };
        let mut lines = text.lines().filter(|l| !l.starts_with('#'));
        let recorded_on = lines
            .next()
            .and_then(|l| l.strip_prefix("recorded_on "))
            .ok_or_else(|| bad("missing recorded_on line".into()))?
            .to_string();
        let mut sections = Vec::new();
        while let Some(head) = lines.next() {
            let mut f = head.split_whitespace();
            let (Some("section"), Some(kernel), Some(set)) = (f.next(), f.next(), f.next()) else {
                return Err(bad(format!("expected a section line, got {head:?}")));
            };
            let mut read = |tag: &str| -> Result<Vec<u32>> {
                let l = lines
                    .next()
                    .ok_or_else(|| bad(format!("{kernel}: missing {tag}")))?;
                let n: usize = l
                    .strip_prefix(tag)
                    .and_then(|r| r.trim().parse().ok())
                    .ok_or_else(|| bad(format!("{kernel}: bad {tag} line {l:?}")))?;
                let mut words = Vec::with_capacity(n);
                while words.len() < n {
                    let l = lines
                        .next()
                        .ok_or_else(|| bad(format!("{kernel}: {tag} ends early")))?;
                    for w in l.split_whitespace() {
                        words.push(
                            u32::from_str_radix(w, 16)
                                .map_err(|e| bad(format!("{kernel}: {w}: {e}")))?,
                        );
                    }
                }
                Ok(words)
            };
            let input = read("in")?;
            let output = read("out")?;
            sections.push(Section {
                kernel: kernel.into(),
                set: set.into(),
                input,
                output,
            });
        }
        Ok(RegDump {
            recorded_on,
            sections,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_fp8_encodings() {
        // e4m3: 1.0 = 0x38, 3.0 = 0x44, -4.0 = 0xC8; e5m2: 1.0 = 0x3C, 3.0 = 0x42.
        assert_eq!(encode_small_fp8(1.0, 3, 7), 0x38);
        assert_eq!(encode_small_fp8(3.0, 3, 7), 0x44);
        assert_eq!(encode_small_fp8(-4.0, 3, 7), 0xC8);
        assert_eq!(encode_small_fp8(1.0, 2, 15), 0x3C);
        assert_eq!(encode_small_fp8(3.0, 2, 15), 0x42);
        assert_eq!(encode_small_fp8(-0.0, 2, 15), 0x00);
    }

    #[test]
    fn text_round_trip() {
        let d = RegDump {
            recorded_on: "test device".into(),
            sections: plan(Target::Sm90a)
                .into_iter()
                .map(|mut s| {
                    s.output = (0..output_len(&s.kernel) as u32)
                        .map(|x| x.wrapping_mul(2654435761))
                        .collect();
                    s
                })
                .collect(),
        };
        assert_eq!(RegDump::parse(&d.to_text()).unwrap(), d);
    }
}
