//! The emulator against real hardware: every register-dump section recorded by the GPU
//! check (`tests/data/regdump-*.txt`) is replayed on the emulator with the recorded inputs
//! and must match bit for bit. And against the PTX ISA formulas, independently of any dump.
//! The recorded `MUFU.RCP` results also check the reference's model of it directly.

use finetune_kernels::regdump::RegDump;

fn dumps() -> Vec<(String, RegDump)> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/data");
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if name.starts_with("regdump-") && name.ends_with(".txt") {
            out.push((
                name,
                RegDump::parse(&std::fs::read_to_string(&path).unwrap()).unwrap(),
            ));
        }
    }
    assert!(
        !out.is_empty(),
        "no register dump in tests/data: the GPU check records one"
    );
    out
}

#[cfg(feature = "emu")]
#[test]
fn emulator_reproduces_every_hardware_dump() {
    let emulators = finetune_kernels::testing::emulators();
    assert!(
        !emulators.is_empty(),
        "the emulator is built but did not start"
    );
    for (file, dump) in dumps() {
        for dev in &emulators {
            for s in &dump.sections {
                let got = finetune_kernels::regdump::run_section(dev, s).unwrap();
                let bad = finetune_kernels::testing::bit_mismatches(&got, &s.output);
                assert!(
                    bad.is_empty(),
                    "{file} {} {} on {}: {} of {} words differ; first at word {}: emulator {:08x}, hardware {:08x}",
                    s.kernel,
                    s.set,
                    dev.describe(),
                    bad.len(),
                    got.len(),
                    bad[0],
                    got[bad[0]],
                    s.output[bad[0]]
                );
            }
        }
    }
}

#[test]
fn mufu_model_reproduces_the_hardware_reciprocals() {
    use finetune_kernels::reference::mufu::rcp_approx_ftz;
    let mut checked = 0;
    for (file, dump) in dumps() {
        for s in dump.sections.iter().filter(|s| s.kernel == "regdump_rcp") {
            for (&x, &want) in s.input.iter().zip(&s.output) {
                let got = rcp_approx_ftz(f32::from_bits(x)).to_bits();
                assert_eq!(
                    got, want,
                    "{file}: MUFU.RCP({x:08x}): model {got:08x}, hardware {want:08x}"
                );
                checked += 1;
            }
        }
    }
    assert!(checked >= 1024, "only {checked} recorded reciprocals");
}

/// The emulated wgmma against the PTX ISA's accumulator layout, on small integers (exact
/// products and sums): thread t's accumulator i is D[16·(t/32) + (t%32)/4 + 8·(i/2)]
/// [2·(t%4) + i%2] of D = C + A·Bᵀ over all 64 of K (four m64n8k16 through the swizzled
/// tile), with A from shared memory (K-major, and MN-major as wgmma.cuh's `Columns` tile)
/// and from registers (the kernel builds each lane's fragments by the RS layout), and with B
/// MN-major (the first 8 columns of a `Columns` chunk). Until a GPU run records the same
/// sections, this is the check of the emulator's model; the dump then checks it against
/// hardware.
#[cfg(feature = "emu")]
#[test]
fn emulated_wgmma_follows_the_isa_layout() {
    use finetune_kernels::regdump::{run_section, wgmma_input, MmaInput, Section};
    let emulators = finetune_kernels::testing::emulators();
    assert!(
        !emulators.is_empty(),
        "the emulator is built but did not start"
    );
    for (t, name) in [(MmaInput::BF16, "bf16"), (MmaInput::F16, "f16")] {
        let input = wgmma_input(t, "int", rand::random());
        let element = |index: usize| -> f32 {
            let half = (input[index / 2] >> (16 * (index % 2))) as u16;
            match t {
                MmaInput::BF16 => half::bf16::from_bits(half).to_f32(),
                _ => half::f16::from_bits(half).to_f32(),
            }
        };
        for kernel in [
            format!("regdump_wgmma_{name}"),
            format!("regdump_wgmma_rs_{name}"),
            format!("regdump_wgmma_mn_{name}"),
            format!("regdump_wgmma_mn_b_{name}"),
        ] {
            let section = Section {
                kernel: kernel.clone(),
                set: "int".into(),
                input: input.clone(),
                output: vec![],
            };
            for dev in &emulators {
                let got = run_section(dev, &section).unwrap();
                for thread in 0..128 {
                    let (warp, lane) = (thread / 32, thread % 32);
                    for i in 0..4 {
                        let row = 16 * warp + lane / 4 + 8 * (i / 2);
                        let col = 2 * (lane % 4) + i % 2;
                        let c = f32::from_bits(input[(64 + 8) * 32 + thread * 4 + i]);
                        let want = (0..64).fold(c, |acc, k| {
                            acc + element(row * 64 + k) * element((64 + col) * 64 + k)
                        });
                        let got = f32::from_bits(got[thread * 4 + i]);
                        assert_eq!(
                            got,
                            want,
                            "{kernel} thread {thread} accumulator {i} on {}",
                            dev.describe()
                        );
                    }
                }
            }
        }
    }
}
