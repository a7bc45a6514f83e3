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
