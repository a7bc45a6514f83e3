//! The emulator's own tests: planted bugs it must catch, collectives against a Rust model,
//! ldmatrix/mma against the PTX ISA formulas, and launches a GPU would refuse.
#![cfg(feature = "emu")]

use finetune_kernels::device::{
    Device, EmuOptions, Kernel, LaunchConfig, Schedule, Target, TileMap,
};
use finetune_kernels::params::{EmuTestParams, RegdumpParams};
use finetune_kernels::regdump;
use finetune_kernels::testing::tma_boxes;
use finetune_kernels::Error;
use half::bf16;
use rand::{rngs::StdRng, Rng, SeedableRng};

/// Forward, reverse and two random schedules (the seed from `FK_EMU_SEED` if set, as
/// `EmuOptions::default` takes it; failures print the schedule, seed included).
fn schedules() -> Vec<Schedule> {
    let Schedule::Random(seed) = EmuOptions::default().schedule else {
        unreachable!("the default schedule is random")
    };
    vec![
        Schedule::Forward,
        Schedule::Reverse,
        Schedule::Random(seed),
        Schedule::Random(seed ^ 0x9E37),
    ]
}

fn emu(schedule: Schedule) -> Device {
    Device::emu(EmuOptions {
        schedule,
        ..EmuOptions::default()
    })
    .unwrap()
}

/// Runs a test kernel with `threads` threads in one block and `n` floats of dynamic shared
/// memory; returns the output (poisoned beforehand) or the emulator's error.
fn run(
    dev: &Device,
    kernel: &str,
    input: &[f32],
    out_len: usize,
    threads: u32,
    smem_floats: u32,
) -> Result<Vec<f32>, Error> {
    run_grid(dev, kernel, input, out_len, 1, threads, smem_floats)
}

/// [`run`] over `blocks` blocks.
fn run_grid(
    dev: &Device,
    kernel: &str,
    input: &[f32],
    out_len: usize,
    blocks: u32,
    threads: u32,
    smem_floats: u32,
) -> Result<Vec<f32>, Error> {
    let inp = dev.upload(input)?;
    let mut out = dev.alloc_poisoned::<f32>(out_len)?;
    let p = EmuTestParams {
        out: out.ptr_mut() as *mut f32,
        in_: inp.ptr() as *const f32,
        n: smem_floats,
    };
    let cfg = LaunchConfig {
        grid: (blocks, 1, 1),
        block: (threads, 1, 1),
        shared_bytes: smem_floats * 4,
        cluster: (1, 1, 1),
    };
    let k = Kernel {
        module: "emu_tests",
        name: kernel.into(),
    };
    // SAFETY: every test kernel reads at most `input.len()` and writes at most `out_len`
    // floats, as the tests below size them.
    unsafe { dev.launch(&k, cfg, &p)? };
    out.to_host()
}

fn random(n: usize) -> Vec<f32> {
    let mut rng = StdRng::seed_from_u64(rand::random());
    (0..n).map(|_| rng.random_range(-2.0..2.0)).collect()
}

fn expect_error<T: std::fmt::Debug>(r: Result<Vec<T>, Error>, needle: &str) {
    match r {
        Err(Error::Emulator(msg)) => assert!(
            msg.contains(needle),
            "error {msg:?} does not mention {needle:?}"
        ),
        other => panic!("expected an emulator error mentioning {needle:?}, got {other:?}"),
    }
}

/// A planted race (`buggy`) must give a wrong result under some schedule, and its correct
/// twin (`fixed`, if any) the right one under every schedule.
fn assert_race_caught(buggy: &str, fixed: Option<&str>, input: &[f32], expected: &[f32]) {
    let n = input.len();
    let launch = |kernel, s| run(&emu(s), kernel, input, n, n as u32, n as u32).unwrap();
    let all = schedules();
    assert!(
        all.iter().any(|&s| launch(buggy, s) != expected),
        "{buggy}: no schedule of {all:?} exposed the race"
    );
    if let Some(fixed) = fixed {
        for &s in &all {
            assert_eq!(launch(fixed, s), expected, "{fixed}, {s:?}");
        }
    }
}

#[test]
fn missing_syncthreads_is_caught_by_some_schedule() {
    let input = random(64);
    let expected: Vec<f32> = (0..64).map(|t| input[(t + 1) % 64]).collect();
    assert_race_caught(
        "emu_test_missing_syncthreads",
        Some("emu_test_with_syncthreads"),
        &input,
        &expected,
    );
}

#[test]
fn race_between_warps_is_caught_by_some_schedule() {
    let input = random(64);
    let expected: Vec<f32> = (0..64).map(|t| input[(t + 32) % 64]).collect();
    assert_race_caught("emu_test_cross_warp_race", None, &input, &expected);
}

/// Static shared memory (FK_SHARED) is poison when each block starts, also for blocks that
/// follow another on the same OS thread (one thread, so every block after the first does).
#[test]
fn static_shared_memory_is_poison_in_every_block() {
    for schedule in schedules() {
        let dev = Device::emu(EmuOptions {
            schedule,
            threads: 1,
            ..EmuOptions::default()
        })
        .unwrap();
        let out = run_grid(
            &dev,
            "emu_test_static_shared_read_first",
            &[0.0],
            5 * 32,
            5,
            32,
            0,
        )
        .unwrap();
        assert!(
            out.iter().all(|x| x.is_nan()),
            "{schedule:?}: a block read {out:?}"
        );
    }
}

#[test]
fn divergent_barrier_is_an_error() {
    for s in schedules() {
        expect_error(
            run(&emu(s), "emu_test_divergent_barrier", &[0.0], 32, 32, 0),
            "divergent __syncthreads",
        );
    }
}

#[test]
fn exit_while_others_wait_is_an_error_naming_every_thread() {
    for s in schedules() {
        let r = run(&emu(s), "emu_test_barrier_after_exit", &[0.0], 32, 32, 0);
        expect_error(r.clone(), "exited while others wait at __syncthreads");
        let Err(Error::Emulator(msg)) = r else {
            unreachable!()
        };
        assert!(
            msg.contains("threads 0: waiting at __syncthreads")
                && msg.contains("threads 1: exited"),
            "{msg}"
        );
    }
}

#[test]
fn shuffle_with_a_wrong_mask_is_an_error() {
    for s in schedules() {
        expect_error(
            run(&emu(s), "emu_test_bad_shfl_mask", &random(32), 32, 32, 0),
            "leaves itself out",
        );
        expect_error(
            run(&emu(s), "emu_test_shfl_after_exit", &random(32), 32, 32, 0),
            "exited",
        );
    }
}

#[test]
fn cp_async_read_before_wait_sees_poison() {
    let n = 32;
    let input = random(4 * n);
    for s in schedules() {
        let out = run(
            &emu(s),
            "emu_test_cp_async_before_wait",
            &input,
            4 * n,
            n as u32,
            4 * n as u32,
        )
        .unwrap();
        assert!(
            out.iter().all(|x| x.is_nan()),
            "{s:?}: a read before the wait saw data"
        );
        let out = run(
            &emu(s),
            "emu_test_cp_async",
            &input,
            8 * n,
            n as u32,
            4 * n as u32,
        )
        .unwrap();
        let expected: Vec<f32> = (0..4 * n)
            .map(|i| input[(4 * (i / 4 + 1) + i % 4) % (4 * n)])
            .collect();
        assert_eq!(out[..4 * n], expected, "{s:?}");
        expect_error(
            run(
                &emu(s),
                "emu_test_cp_async_written_before_wait",
                &input,
                4 * n,
                n as u32,
                4 * n as u32,
            ),
            "written before the copy landed",
        );
        // After wait_group 1: each thread's first group (2 floats) landed, its second not.
        for (i, &x) in out[4 * n..].iter().enumerate() {
            if i % 4 < 2 {
                assert_eq!(x, input[i], "{s:?}: element {i} of the first group");
            } else {
                assert!(x.is_nan(), "{s:?}: element {i} of the pending group is {x}");
            }
        }
    }
}

/// The Rust model of every collective in emu_test_collectives (CUDA's documented rules).
fn collectives_model(v: &[f32]) -> Vec<f32> {
    let n = v.len();
    let mut out = vec![0f32; 8 * n];
    let count = v.iter().filter(|&&x| x > 0.0).count() as f32;
    let or = v.iter().any(|&x| x > 1.9) as u32 as f32;
    let and = v.iter().all(|&x| x > -1.99) as u32 as f32;
    for t in 0..n {
        let (w, lane) = (t / 32 * 32, t % 32);
        let lane_v = |l: usize| v[w + l];
        let o = &mut out[8 * t..8 * t + 8];
        o[0] = lane_v((lane * 7 + 3) % 32);
        let base16 = lane / 16 * 16;
        o[1] = if lane >= base16 + 3 {
            lane_v(lane - 3)
        } else {
            lane_v(lane)
        };
        let base8 = lane / 8 * 8;
        o[2] = if lane + 5 < base8 + 8 {
            lane_v(lane + 5)
        } else {
            lane_v(lane)
        };
        o[3] = lane_v(lane ^ 6);
        let ballot: u32 = (0..32)
            .filter(|&l| lane_v(l) > 0.0)
            .map(|l| 1u32 << l)
            .sum();
        o[4] = (ballot & 0xffff) as f32;
        let any = (0..32).any(|l| lane_v(l) > 1.5) as u32;
        let all = (0..32).all(|l| lane_v(l) > -2.0) as u32;
        o[5] = (any + 2 * all) as f32;
        o[6] = count;
        o[7] = or + 2.0 * and;
    }
    out
}

#[test]
fn collectives_follow_cuda_semantics() {
    let n = 96; // three warps
    for s in schedules() {
        let input = random(n);
        let out = run(&emu(s), "emu_test_collectives", &input, 8 * n, n as u32, 0).unwrap();
        assert_eq!(out, collectives_model(&input), "{s:?}");
    }
}

#[test]
fn launches_a_gpu_would_refuse_are_errors() {
    let dev = emu(Schedule::Forward);
    // Past CUDA's limits: refused on every backend (tests/device.rs).
    match run(&dev, "emu_test_with_syncthreads", &[0.0; 4], 4, 1025, 4) {
        Err(Error::InvalidArgument { what, .. }) => assert_eq!(what, "LaunchConfig::block"),
        other => panic!("{other:?}"),
    }
    expect_error(
        run(
            &dev,
            "emu_test_with_syncthreads",
            &[0.0; 4],
            4,
            4,
            228 * 1024 / 4,
        ),
        "exceeds the 227 KiB",
    );
    // Static and dynamic shared memory together: 32 KB beside 200 KB.
    expect_error(
        run(
            &dev,
            "emu_test_static_and_dynamic_shared",
            &[1.0; 4],
            4,
            4,
            200 * 1024 / 4,
        ),
        "exceed the 227 KiB",
    );
    assert_eq!(
        run(
            &dev,
            "emu_test_static_and_dynamic_shared",
            &[1.0; 4],
            4,
            4,
            4
        )
        .unwrap(),
        [1.0; 4]
    );
    expect_error(
        run(&dev, "no_such_kernel", &[0.0], 1, 1, 0),
        "no emulated kernel named no_such_kernel",
    );
    // A params struct of the wrong size is refused before anything runs.
    let k = Kernel {
        module: "emu_tests",
        name: "emu_test_with_syncthreads".into(),
    };
    let cfg = LaunchConfig {
        grid: (1, 1, 1),
        block: (1, 1, 1),
        shared_bytes: 4,
        cluster: (1, 1, 1),
    };
    // SAFETY: refused before the kernel could read it.
    let r = unsafe { dev.launch(&k, cfg, &0u8) };
    assert!(matches!(r, Err(Error::Emulator(m)) if m.contains("params struct is 1 bytes")));
    // A grid CUDA takes but no host can order (2³¹ − 1 × 65,535 × 65,535 blocks): the C++
    // exception it raises in the emulator is an error, not the end of the process.
    let mut out = dev.alloc_poisoned::<f32>(1).unwrap();
    let p = EmuTestParams {
        out: out.ptr_mut() as *mut f32,
        in_: out.ptr() as *const f32,
        n: 1,
    };
    let huge = LaunchConfig {
        grid: (i32::MAX as u32, 65_535, 65_535),
        ..cfg
    };
    // SAFETY: the emulator fails before any block runs.
    let r = unsafe { dev.launch(&k, huge, &p) };
    assert!(
        matches!(&r, Err(Error::Emulator(m)) if m.contains("the emulator failed")),
        "{r:?}"
    );
    // A fiber's stack below the floor is refused when the emulator is made.
    let small = Device::emu(EmuOptions {
        stack_bytes: finetune_kernels::device::MIN_STACK_BYTES - 1,
        ..EmuOptions::default()
    });
    assert!(matches!(small, Err(Error::InvalidArgument { .. })));
}

/// stmatrix.trans as ldmatrix.trans's inverse (the PTX ISA gives both one fragment layout),
/// on the register dump's stmatrix section: the element at row r, column c of matrix m,
/// whose rows lanes 8m.. give (scattered through shared memory), comes from lane
/// 4c + r/2, register m, half r % 2.
#[test]
fn stmatrix_trans_stores_ldmatrix_trans_fragments() {
    let section = regdump::plan(Target::Sm90a)
        .into_iter()
        .find(|s| s.kernel == "regdump_stmatrix")
        .unwrap();
    for s in schedules() {
        let out = regdump::run_section(&emu(s), &section).unwrap();
        for m in 0..4u32 {
            for r in 0..8u32 {
                for c in 0..8u32 {
                    let want = 0x4000 | (m << 7) | ((4 * c + r / 2) << 1) | (r % 2);
                    let word = out[(4 * (8 * m + r) + c / 2) as usize];
                    let got = (word >> (16 * (c % 2))) & 0xffff;
                    assert_eq!(got, want, "{s:?}: matrix {m} row {r} column {c}");
                }
            }
        }
    }
}

/// A section's kernel runs on an input of the length it reads and nothing else: a short
/// input (which it would read past) and a kernel no section runs (the MUFU table, which
/// writes 2^18 words into the section's output) are refused.
#[test]
fn register_dump_sections_are_checked_before_they_run() {
    let dev = emu(schedules()[0]);
    let plan = regdump::plan(Target::Sm90a);
    let rcp = plan.iter().find(|s| s.kernel == "regdump_rcp").unwrap();
    let short = regdump::Section {
        input: rcp.input[..rcp.input.len() - 1].to_vec(),
        ..rcp.clone()
    };
    let table = regdump::Section {
        kernel: "regdump_rcp_table".into(),
        ..rcp.clone()
    };
    for s in [short, table] {
        let err = regdump::run_section(&dev, &s).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { .. }),
            "{}: {err}",
            s.kernel
        );
    }
    assert!(regdump::run_section(&dev, rcp).is_ok());
}

/// ldmatrix and mma against the PTX ISA formulas (reference/ptx-fragments.md), written
/// here independently of the emulator and of any hardware dump.
#[test]
fn ldmatrix_follows_the_ptx_isa_formulas() {
    for s in schedules() {
        let section = &regdump::plan(Target::Sm89)[0];
        let out = regdump::run_section(&emu(s), section).unwrap();
        let id = |m: u32, r: u32, c: u32| 0xA000 | (m << 6) | (r << 3) | c;
        for (variant, (count, trans)) in [
            (1, false),
            (2, false),
            (4, false),
            (1, true),
            (2, true),
            (4, true),
        ]
        .into_iter()
        .enumerate()
        {
            for lane in 0..32u32 {
                let (g, t) = (lane / 4, lane % 4);
                for j in 0..4u32 {
                    let (lo, hi) = if trans {
                        (id(j, 2 * t, g), id(j, 2 * t + 1, g))
                    } else {
                        (id(j, g, 2 * t), id(j, g, 2 * t + 1))
                    };
                    let want = if j < count { lo | (hi << 16) } else { 0 };
                    let got = out[(variant * 32 + lane as usize) * 4 + j as usize];
                    assert_eq!(
                        got, want,
                        "variant {variant} lane {lane} reg {j}: {got:08x} vs {want:08x}"
                    );
                }
            }
        }
    }
}

#[test]
fn mma_bf16_follows_the_ptx_isa_formulas() {
    let mut rng = StdRng::seed_from_u64(rand::random());
    // Small integers: every product and sum is exact, so D must equal A·B + C exactly.
    let a: Vec<Vec<f32>> = (0..16)
        .map(|_| {
            (0..16)
                .map(|_| rng.random_range(-4i32..=4) as f32)
                .collect()
        })
        .collect();
    let b: Vec<Vec<f32>> = (0..16)
        .map(|_| (0..8).map(|_| rng.random_range(-4i32..=4) as f32).collect())
        .collect();
    let c: Vec<Vec<f32>> = (0..16)
        .map(|_| (0..8).map(|_| rng.random_range(-8i32..=8) as f32).collect())
        .collect();
    let pack = |lo: f32, hi: f32| {
        bf16::from_f32(lo).to_bits() as u32 | ((bf16::from_f32(hi).to_bits() as u32) << 16)
    };
    let mut input = Vec::new();
    for lane in 0..32usize {
        let (g, t) = (lane / 4, lane % 4);
        input.push(pack(a[g][2 * t], a[g][2 * t + 1]));
        input.push(pack(a[g + 8][2 * t], a[g + 8][2 * t + 1]));
        input.push(pack(a[g][2 * t + 8], a[g][2 * t + 9]));
        input.push(pack(a[g + 8][2 * t + 8], a[g + 8][2 * t + 9]));
        input.push(pack(b[2 * t][g], b[2 * t + 1][g]));
        input.push(pack(b[2 * t + 8][g], b[2 * t + 9][g]));
        for (r, col) in [
            (g, 2 * t),
            (g, 2 * t + 1),
            (g + 8, 2 * t),
            (g + 8, 2 * t + 1),
        ] {
            input.push(c[r][col].to_bits());
        }
    }
    for s in schedules() {
        let dev = emu(s);
        let inp = dev.upload(&input).unwrap();
        let mut out = dev.alloc_poisoned::<u32>(128).unwrap();
        let p = RegdumpParams {
            out: out.ptr_mut() as *mut u32,
            in_: inp.ptr() as *const u32,
        };
        let k = Kernel {
            module: "regdump",
            name: "regdump_mma_bf16".into(),
        };
        let cfg = LaunchConfig {
            grid: (1, 1, 1),
            block: (32, 1, 1),
            shared_bytes: 0,
            cluster: (1, 1, 1),
        };
        // SAFETY: the kernel reads 32 x 10 words and writes 32 x 4.
        unsafe { dev.launch(&k, cfg, &p).unwrap() };
        let d = out.to_host().unwrap();
        for lane in 0..32usize {
            let (g, t) = (lane / 4, lane % 4);
            for (i, (r, col)) in [
                (g, 2 * t),
                (g, 2 * t + 1),
                (g + 8, 2 * t),
                (g + 8, 2 * t + 1),
            ]
            .into_iter()
            .enumerate()
            {
                let want: f32 = c[r][col] + (0..16).map(|k| a[r][k] * b[k][col]).sum::<f32>();
                assert_eq!(f32::from_bits(d[lane * 4 + i]), want, "lane {lane} d{i}");
            }
        }
    }
}

/// Writing past dynamic or static (FK_SHARED) shared memory is caught by AddressSanitizer;
/// this test runs in the ASan CI step (`FK_EMU_ASAN=1`), where the emulator is built
/// instrumented. The out-of-bounds write aborts the process, so the test re-runs itself as
/// a child, once per kernel.
#[cfg(fk_emu_asan)]
#[test]
fn out_of_bounds_shared_write_is_caught_by_asan() {
    if let Ok(kernel) = std::env::var("FK_EMU_OOB_CHILD") {
        let _ = run(&emu(Schedule::Forward), &kernel, &[0.0], 32, 32, 16);
        return;
    }
    for kernel in ["emu_test_oob_shared", "emu_test_oob_static_shared"] {
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "out_of_bounds_shared_write_is_caught_by_asan",
                "--nocapture",
            ])
            .env("FK_EMU_OOB_CHILD", kernel)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains("heap-buffer-overflow"),
            "{kernel}: ASan did not report: {stderr}"
        );
    }
}

/// Planted TMA and mbarrier bugs (beside `regdump_tma`, tested in tests/device.rs): a tile
/// read before its barrier's wait sees poison (all ones: NaN); a wrong byte count deadlocks,
/// reported with the bytes pending; a load nobody waits for, a barrier initialized twice or
/// overwritten while live, a tile written while its load is in flight, a box whose first
/// column is not a 16-byte multiple (a fault on an H200) are errors.
#[test]
fn tma_and_mbarrier_bugs_are_caught() {
    let dev = emu(Schedule::Forward);
    let host: Vec<bf16> = (0..64 * 64).map(|i| bf16::from_f32(i as f32)).collect();
    let matrix = dev.upload(&host).unwrap();
    let map = dev
        .tile_map::<bf16>(TileMap {
            ptr: matrix.ptr(),
            cols: 64,
            rows: 64,
            ld: 64,
            box_rows: 64,
        })
        .unwrap()
        .unwrap();
    let run_at = |dev: &Device, module: &'static str, name: &str, c0: i32| {
        let k = Kernel {
            module,
            name: name.into(),
        };
        tma_boxes(dev, &k, map, (c0, 0), 64, 1, 1)
    };
    let run = |dev: &Device, name: &str| run_at(dev, "emu_tests", name, 0);
    for c0 in [1, 4, -3, 60] {
        expect_error(
            run_at(&dev, "regdump", "regdump_tma", c0),
            "not a 16-byte multiple",
        );
    }
    for s in schedules() {
        let out = run(&emu(s), "emu_test_tma_before_wait").unwrap();
        assert!(
            out.iter().all(|&x| x == 0xFFFF),
            "{s:?}: a read before the wait saw data"
        );
    }
    for (kernel, needle) in [
        ("emu_test_tma_short_expect", "-2 bytes pending"),
        (
            "emu_test_tma_never_waited",
            "TMA loads no thread waited for",
        ),
        ("emu_test_mbarrier_reinit", "the mbarrier is live"),
        ("emu_test_mbarrier_overwritten", "overwritten"),
        (
            "emu_test_tma_written_before_wait",
            "written before the load landed",
        ),
    ] {
        match run(&dev, kernel) {
            Err(Error::Emulator(msg)) => {
                assert!(msg.contains(needle), "{kernel}: {msg:?} lacks {needle:?}")
            }
            other => panic!("{kernel}: expected an emulator error, got {other:?}"),
        }
    }
}

/// Planted cluster bugs (beside `regdump_tma_multicast`, tested in tests/device.rs). Under
/// the forward and reverse schedules a block runs ahead of its peer as far as its own
/// barriers let it: a block-wide barrier where the cluster's is needed shows, as a load
/// naming a peer's barrier before the peer initialized it, or as a peer's next load
/// overwriting a tile still being read (a wrong tile or a phase's bytes never adding up), or
/// a load to a block that has exited. A mask naming a block outside the cluster and a block
/// exiting while its peers wait at the cluster barrier are errors under every schedule; the
/// correct kernel passes under all.
#[test]
fn cluster_bugs_are_caught() {
    let (rows, box_rows, boxes) = (32usize, 16u32, 3u32);
    let host: Vec<bf16> = (0..rows * 256)
        .map(|i| bf16::from_f32((i % 251) as f32))
        .collect();
    let dev = emu(Schedule::Forward);
    let matrix = dev.upload(&host).unwrap();
    let map = dev
        .tile_map::<bf16>(TileMap {
            ptr: matrix.ptr(),
            cols: 256,
            rows,
            ld: 256,
            box_rows,
        })
        .unwrap()
        .unwrap();
    let run = |dev: &Device, module: &'static str, name: &str| {
        let k = Kernel {
            module,
            name: name.into(),
        };
        tma_boxes(dev, &k, map, (0, 0), box_rows, boxes, 2)
    };
    let good = run(&dev, "regdump", "regdump_tma_multicast").unwrap();
    for s in schedules() {
        assert_eq!(
            run(&emu(s), "regdump", "regdump_tma_multicast").unwrap(),
            good,
            "{s:?}"
        );
    }
    for s in [Schedule::Forward, Schedule::Reverse] {
        expect_error(
            run(&emu(s), "emu_tests", "emu_test_multicast_no_init_sync"),
            "no mbarrier was initialized",
        );
        match run(&emu(s), "emu_tests", "emu_test_multicast_no_reuse_sync") {
            Ok(out) => assert_ne!(
                out, good,
                "{s:?}: a tile overwritten while read went unseen"
            ),
            Err(e) => assert!(matches!(e, Error::Emulator(_)), "{s:?}: {e:?}"),
        }
    }
    // Reverse runs the exiting block first, so the load finds it gone.
    expect_error(
        run(
            &emu(Schedule::Reverse),
            "emu_tests",
            "emu_test_multicast_to_exited",
        ),
        "a block of the cluster that has exited",
    );
    for s in schedules() {
        expect_error(
            run(&emu(s), "emu_tests", "emu_test_multicast_mask_outside"),
            "names a block outside the cluster",
        );
        expect_error(
            run(&emu(s), "emu_tests", "emu_test_cluster_exit_early"),
            "exited while others wait at the cluster barrier",
        );
    }
}

/// The async proxy: a wgmma reading a tile that cp.async filled is an error unless each
/// copying thread fenced (fence.proxy.async) after its copies landed; with the fence, it runs.
#[test]
fn wgmma_after_cp_async_needs_the_proxy_fence() {
    let input: Vec<f32> = (0..72 * 32).map(|i| (i % 7) as f32 * 0.25).collect();
    for s in schedules() {
        let dev = emu(s);
        expect_error(
            run(&dev, "emu_test_wgmma_unfenced", &input, 512, 128, 2560),
            "no fence.proxy.async",
        );
        let out = run(&dev, "emu_test_wgmma_fenced", &input, 512, 128, 2560).unwrap();
        assert!(out.iter().all(|x| x.is_finite()), "{s:?}");
    }
}
