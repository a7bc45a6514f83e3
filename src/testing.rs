//! Helpers for testing kernels against the references: the backends to run on, random
//! inputs, and error measures. Public, so users can test their own kernels the same way.

use crate::device::{Device, EmuOptions, Schedule};
use crate::dtype::FloatElem;
use rand::Rng;

/// Every backend that can run kernels here: the GPU if there is one, and the emulator
/// (when built) under three schedules — forward, reverse and random (seed from
/// `FK_EMU_SEED`, else fresh; it is in each device's description, so a failure replays).
/// With `FK_REQUIRE_GPU=1` a missing GPU is a panic (the GPU check sets it).
///
/// `FK_BACKENDS`, a comma-separated list of `gpu`, `forward`, `reverse` and `random`, keeps
/// only those: the GPU check sets `gpu` (CI runs the emulated tests already), CI's
/// AddressSanitizer run `random` (an out-of-bounds index does not depend on the schedule;
/// the races the schedules expose are the plain run's to find). The longest tests take
/// [`backends_in_turn`] instead: each case on one schedule.
///
/// No backend at all (the emulator left out, `FK_BACKENDS` naming only a GPU that is not
/// there) is a panic, since every kernel test would then pass having run nothing, unless
/// `FK_ALLOW_NO_BACKEND=1` says so on purpose (the GPU check's dry run).
pub fn backends() -> Vec<Device> {
    let mut devices = Vec::new();
    if selected_backends().is_none_or(|names| names.contains(&"gpu")) {
        match Device::cuda(0) {
            Ok(d) => {
                d.set_poison_outputs(true);
                devices.push(d);
            }
            Err(e) => {
                if std::env::var("FK_REQUIRE_GPU").is_ok_and(|v| v == "1") {
                    panic!("FK_REQUIRE_GPU=1 but no GPU backend: {e}");
                }
                eprintln!("note: GPU backend skipped: {e}");
            }
        }
    }
    if selected_backends().is_none_or(|names| names.iter().any(|n| *n != "gpu")) {
        devices.extend(emulators());
    }
    if devices.is_empty() {
        let why = "no backend can run kernels here: the test checks nothing but its reference";
        if std::env::var("FK_ALLOW_NO_BACKEND").as_deref() != Ok("1") {
            panic!("{why} (FK_ALLOW_NO_BACKEND=1 allows it)");
        }
        eprintln!("note: {why}");
    }
    devices
}

/// The backends for case `case` of a long test (many cases, each slow on the emulator): the
/// GPU, if [`backends`] has it, and one of its emulators, the schedules taking the cases in
/// turn from a start drawn once a process. Each schedule then runs a third of the cases, and
/// the test takes a third of the emulator's time; over a few runs every schedule meets every
/// case (failures name the device, its schedule and seed). Where `FK_BACKENDS` names one
/// schedule, it runs every case.
pub fn backends_in_turn(case: usize) -> Vec<Device> {
    static START: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| rand::random_range(0..3));
    let (mut devices, emulated): (Vec<Device>, Vec<Device>) =
        backends().into_iter().partition(Device::is_gpu);
    if !emulated.is_empty() {
        let turn = (start + case) % emulated.len();
        devices.extend(emulated.into_iter().nth(turn));
    }
    devices
}

/// The emulator under the schedules `FK_BACKENDS` names, or under all three — forward,
/// reverse and a random one (seed from `FK_EMU_SEED`, else fresh; each device's description
/// carries it) — if it names none; none if the emulator is not built.
pub fn emulators() -> Vec<Device> {
    let random = EmuOptions::default();
    let names = selected_backends().unwrap_or_default();
    let any_named = names.iter().any(|n| *n != "gpu");
    let mut devices = Vec::new();
    for (name, schedule) in [
        ("forward", Schedule::Forward),
        ("reverse", Schedule::Reverse),
        ("random", random.schedule),
    ] {
        if any_named && !names.contains(&name) {
            continue;
        }
        match Device::emu(EmuOptions { schedule, ..random }) {
            Ok(d) => devices.push(d),
            Err(e) => {
                eprintln!("note: emulator skipped: {e}");
                break;
            }
        }
    }
    devices
}

/// The backends `FK_BACKENDS` names, if it is set.
fn selected_backends() -> Option<Vec<&'static str>> {
    std::env::var("FK_BACKENDS")
        .ok()
        .map(|list| parse_backends(&list))
}

/// A comma-separated list of backend names; a name it does not know is a panic (a misspelt
/// filter must not quietly test nothing).
fn parse_backends(list: &str) -> Vec<&'static str> {
    const NAMES: [&str; 4] = ["gpu", "forward", "reverse", "random"];
    list.split(',')
        .map(|name| {
            let name = name.trim();
            *NAMES
                .iter()
                .find(|known| **known == name)
                .unwrap_or_else(|| panic!("FK_BACKENDS={list:?}: {name:?} is not one of {NAMES:?}"))
        })
        .collect()
}

/// `‖out − ref‖₂ / ‖ref‖₂` in f64 (0 when both are zero; infinite if out has a NaN where
/// ref has none).
pub fn rel_l2<A: FloatElem, B: FloatElem>(out: &[A], reference: &[B]) -> f64 {
    assert_eq!(out.len(), reference.len());
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        let (o, r) = (o.to_f32() as f64, r.to_f32() as f64);
        if o.is_nan() != r.is_nan() {
            return f64::INFINITY;
        }
        if !r.is_nan() {
            num += (o - r) * (o - r);
            den += r * r;
        }
    }
    if den == 0.0 {
        if num == 0.0 {
            0.0
        } else {
            f64::INFINITY
        }
    } else {
        (num / den).sqrt()
    }
}

/// Positions where the bit patterns differ (NaNs compare by bits too).
pub fn bit_mismatches<T: bytemuck::Pod>(a: &[T], b: &[T]) -> Vec<usize> {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .enumerate()
        .filter(|(_, (x, y))| bytemuck::bytes_of(*x) != bytemuck::bytes_of(*y))
        .map(|(i, _)| i)
        .collect()
}

/// A 2-D bf16 tensor `[rows, cols]` of random values in [-1, 1), as a checkpoint holds it.
pub fn random_bf16_tensor(
    rng: &mut impl Rng,
    rows: usize,
    cols: usize,
) -> crate::nf4::checkpoint::RawTensor<'static> {
    let v: Vec<half::bf16> = random_vec(rng, rows * cols, 1.0);
    crate::nf4::checkpoint::RawTensor {
        dtype: safetensors::Dtype::BF16,
        shape: vec![rows, cols],
        data: std::borrow::Cow::Owned(bytemuck::cast_slice(&v).to_vec()),
    }
}

/// `dir`, emptied (removed and made again): a test's own scratch directory.
pub fn fresh_dir(dir: std::path::PathBuf) -> std::path::PathBuf {
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("a scratch directory");
    dir
}

/// `n` values drawn uniformly from `[-scale, scale)` and rounded to T. `scale` must be
/// positive (an empty range panics); one below T's smallest subnormal rounds every value to
/// zero, so tests draw at scales near their data's.
pub fn random_vec<T: FloatElem>(rng: &mut impl Rng, n: usize, scale: f32) -> Vec<T> {
    (0..n)
        .map(|_| T::from_f32(rng.random_range(-scale..scale)))
        .collect()
}

/// `k` distinct sorted indices below `numel` (`k <= numel`).
pub fn random_support(rng: &mut impl Rng, numel: u64, k: usize) -> Vec<u64> {
    assert!(k as u64 <= numel);
    let mut picked = rand::seq::index::sample(rng, numel as usize, k).into_vec();
    picked.sort_unstable();
    picked.into_iter().map(|i| i as u64).collect()
}

/// Runs `kernel`, a kernel on [`crate::params::RegdumpTmaParams`] (`regdump_tma`,
/// `regdump_tma_multicast`, or an emulator test kernel), over `boxes` TMA loads of `map`'s
/// box of 64 × `box_rows` at (`c0` + 64·i, `c1`), in one cluster of `cluster` blocks along x
/// (1: one block, no cluster), each block's tile `cluster` boxes tall; returns what each load
/// left in each block's shared memory (block b's i-th tile at (b · boxes + i) · tile; the
/// output is poisoned beforehand), or the launch's error.
pub fn tma_boxes(
    dev: &Device,
    kernel: &crate::device::Kernel,
    map: crate::params::FkTensorMap,
    (c0, c1): (i32, i32),
    box_rows: u32,
    boxes: u32,
    cluster: u32,
) -> crate::Result<Vec<u16>> {
    let tile = 64 * box_rows * cluster;
    let mut out = dev.alloc_poisoned::<crate::bf16>((tile * boxes * cluster) as usize)?;
    let p = crate::params::RegdumpTmaParams {
        map,
        out: out.ptr_mut() as *mut u16,
        c0,
        c1,
        box_rows,
        boxes,
    };
    let cfg = crate::device::LaunchConfig {
        grid: (cluster, 1, 1),
        block: (crate::params::FK_REGDUMP_TMA_THREADS, 1, 1),
        shared_bytes: tile * 2 + 1024 + 8,
        cluster: (cluster, 1, 1),
    };
    // SAFETY: the kernels write at most tile · boxes elements of out per block and read
    // global memory only through the map, which the caller encoded over a live buffer.
    unsafe { dev.launch(kernel, cfg, &p)? };
    Ok(out.to_host()?.iter().map(|x| x.to_bits()).collect())
}

#[cfg(test)]
mod tests {
    use super::{backends_in_turn, emulators, parse_backends};
    use crate::device::Device;

    /// Consecutive cases take the emulators in turn: as many cases as there are emulators
    /// run each of them once (all three schedules, or the one `FK_BACKENDS` names).
    #[test]
    fn cases_take_the_schedules_in_turn() {
        let schedule = |d: &Device| {
            let d = d.describe();
            d.split(" seed").next().unwrap().to_string() // a random schedule's seed is fresh
        };
        let mut all: Vec<String> = emulators().iter().map(schedule).collect();
        let mut taken: Vec<String> = (0..all.len())
            .flat_map(|i| {
                let devices = backends_in_turn(i);
                let emulated: Vec<Device> = devices.into_iter().filter(|d| !d.is_gpu()).collect();
                assert!(emulated.len() <= 1, "one emulator a case");
                emulated
            })
            .map(|d| schedule(&d))
            .collect();
        all.sort();
        taken.sort();
        assert_eq!(taken, all);
    }

    #[test]
    fn backend_lists_parse_and_a_misspelt_name_is_refused() {
        assert_eq!(parse_backends("gpu"), ["gpu"]);
        assert_eq!(parse_backends("random, forward"), ["random", "forward"]);
        let misspelt = std::panic::catch_unwind(|| parse_backends("gpu,randon"));
        assert!(misspelt.is_err());
    }
}
