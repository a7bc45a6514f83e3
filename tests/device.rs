//! Buffers on every backend: round trips, empty buffers, strided row copies, and the typed
//! errors for lengths and devices that do not match; TMA loads and their tensor maps on every
//! backend that has them.

use finetune_kernels::bf16;
use finetune_kernels::device::{Kernel, LaunchConfig, TileMap};
use finetune_kernels::error::Error;
use finetune_kernels::testing::{backends, tma_boxes};
use rand::{Rng, SeedableRng};

fn rng() -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(rand::random())
}

#[test]
fn round_trips_every_length() {
    let mut rng = rng();
    for dev in backends() {
        for len in [0usize, 1, 3, 17, 1000, 4097] {
            let host: Vec<u32> = (0..len).map(|_| rng.random()).collect();
            let mut b = dev.upload(&host).unwrap();
            assert_eq!(b.len(), len);
            assert_eq!(b.to_host().unwrap(), host, "{} len {len}", dev.describe());
            let again: Vec<u32> = (0..len).map(|_| rng.random()).collect();
            b.copy_from_host(&again).unwrap();
            assert_eq!(b.to_host().unwrap(), again, "{} len {len}", dev.describe());
        }
    }
}

#[test]
fn empty_buffers_are_empty_on_every_backend() {
    for dev in backends() {
        let what = dev.describe();
        assert_eq!(
            dev.upload::<f32>(&[]).unwrap().to_host().unwrap(),
            Vec::<f32>::new(),
            "{what}"
        );
        let poisoned = dev.alloc_poisoned::<u32>(0).unwrap();
        assert!(poisoned.is_empty(), "{what}");
        assert_eq!(poisoned.to_host().unwrap(), Vec::<u32>::new(), "{what}");
        let mut zeros = dev.zeros::<u8>(0).unwrap();
        zeros.copy_from_host(&[]).unwrap();
        assert_eq!(zeros.to_host().unwrap(), Vec::<u8>::new(), "{what}");
    }
}

#[test]
fn poisoned_and_zeroed_buffers() {
    for dev in backends() {
        let p = dev.alloc_poisoned::<f32>(33).unwrap().to_host().unwrap();
        assert!(p.iter().all(|v| v.is_nan()), "{}", dev.describe());
        let z = dev.zeros::<u32>(33).unwrap().to_host().unwrap();
        assert_eq!(z, [0; 33], "{}", dev.describe());
    }
}

#[test]
fn copy_rows_between_strides() {
    let mut rng = rng();
    for dev in backends() {
        let (rows, cols, src_ld, dst_ld) = (7, 5, 9, 6);
        let src_host: Vec<u32> = (0..rows * src_ld).map(|_| rng.random()).collect();
        let src = dev.upload(&src_host).unwrap();
        let mut dst = dev
            .alloc_poisoned::<u32>((rows - 1) * dst_ld + cols)
            .unwrap();
        dst.copy_rows_from(&src, rows, cols, src_ld, dst_ld)
            .unwrap();
        let got = dst.to_host().unwrap();
        for r in 0..rows {
            assert_eq!(
                got[r * dst_ld..r * dst_ld + cols],
                src_host[r * src_ld..r * src_ld + cols],
                "{} row {r}",
                dev.describe()
            );
            // The gap between rows is left as it was.
            if r + 1 < rows {
                assert!(got[r * dst_ld + cols..(r + 1) * dst_ld]
                    .iter()
                    .all(|&v| v == 0xffff_ffff));
            }
        }
        // One row too many for the destination.
        let err = dst
            .copy_rows_from(&src, rows + 1, cols, src_ld, dst_ld)
            .unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    }
}

#[test]
fn wrong_lengths_and_devices_are_typed_errors() {
    let devices = backends();
    for dev in &devices {
        let mut b = dev.upload(&[1u32, 2, 3]).unwrap();
        let err = b.copy_from_host(&[1, 2]).unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
        assert_eq!(b.to_host().unwrap(), [1, 2, 3], "nothing is lost");
    }
    // A buffer cannot be copied into one on another device: the GPU's into the emulator's,
    // or between two emulator devices (each its own device, as two GPUs would be).
    for (a, b) in devices.iter().zip(devices.iter().skip(1)) {
        let src = a.upload(&[1u8; 4]).unwrap();
        let mut dst = b.zeros::<u8>(4).unwrap();
        let err = dst.copy_rows_from(&src, 1, 4, 4, 4).unwrap_err();
        assert!(matches!(err, Error::DeviceMismatch), "{err}");
        assert_eq!(dst.to_host().unwrap(), [0; 4], "nothing is written");
    }
}

/// A row copy of no elements returns at once, whatever the row count: the emulator had
/// looped over every one of 2^64 - 1 empty rows. Run on a thread of its own, so that a copy
/// that never ends fails the test rather than hanging it.
#[test]
fn row_copies_of_no_elements_return_at_once() {
    for dev in backends() {
        let what = dev.describe();
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let src = dev.upload(&[1u32, 2, 3]).unwrap();
            let mut dst = dev.zeros::<u32>(3).unwrap();
            let copied = dst.copy_rows_from(&src, usize::MAX, 0, 0, 0);
            let _ = done.send(copied.and_then(|()| dst.to_host()));
        });
        let got = finished.recv_timeout(std::time::Duration::from_secs(20));
        assert_eq!(got, Ok(Ok(vec![0; 3])), "{what}: nothing is written");
    }
}

/// The error `r` must be.
fn error<T>(r: Result<T, Error>) -> Error {
    match r {
        Err(e) => e,
        Ok(_) => panic!("expected an error"),
    }
}

/// Sizes no memory holds are typed errors on every backend, before anything is written:
/// a length whose bytes overflow, one past any host's or GPU's memory (128 TiB), a kernel's
/// output sized from an argument, a row pitch that overflows; and launches that cannot run
/// (a grid past u32, blocks of no threads, a kernel name with a NUL, no timed repetitions).
/// The emulator had wrapped the byte count and written past a buffer of none.
#[test]
fn sizes_and_launches_no_device_takes_are_typed_errors() {
    use finetune_kernels::bench::GpuTimer;
    for dev in backends() {
        let what = dev.describe();
        let err = error(dev.zeros::<f32>(usize::MAX / 2));
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    what: "buffer length",
                    ..
                }
            ),
            "{what}: {err}"
        );
        let err = error(dev.alloc_poisoned::<f32>(1 << 45));
        assert!(
            matches!(err, Error::OutOfMemory { bytes } if bytes == 1 << 47),
            "{what}: {err}"
        );
        let err = error(finetune_kernels::philox::random_words(
            &dev,
            1,
            0,
            [0, 0],
            1 << 60,
        ));
        assert!(
            matches!(
                err,
                Error::Unsupported { .. } | Error::InvalidArgument { .. }
            ),
            "{what}: {err}"
        );
        let src = dev.upload(&[1u32, 2, 3]).unwrap();
        let mut dst = dev.zeros::<u32>(3).unwrap();
        let err = dst.copy_rows_from(&src, 1, 3, usize::MAX, 3).unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{what}: {err}");
        assert_eq!(dst.to_host().unwrap(), [0; 3], "{what}: nothing is written");
        let nul = Kernel {
            module: "regdump",
            name: "regdump_tma\0".into(),
        };
        let one = LaunchConfig::grid_stride(32, 32, 1);
        // SAFETY: refused before launch: nothing runs.
        let err = unsafe { dev.launch(&nul, one, &0u8) }.unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    what: "kernel name",
                    ..
                }
            ),
            "{what}: {err}"
        );
        let mut timer = GpuTimer::new(&dev).unwrap();
        let err = timer.time(0, 0, || Ok(())).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { .. }),
            "{what}: {err}"
        );
        let err = timer.breakdown(0, 0, || Ok(())).unwrap_err();
        assert!(
            matches!(err, Error::InvalidArgument { .. }),
            "{what}: breakdown: {err}"
        );
    }
    for cfg in [
        LaunchConfig::grid_stride(100, 0, 8),
        LaunchConfig::tiles(1, usize::MAX, 1),
        LaunchConfig::narrow(usize::MAX, 1, 1),
        LaunchConfig::wgmma(usize::MAX, 1, false, 1, usize::MAX),
    ] {
        assert!(cfg.check("k").is_err(), "{cfg:?}");
    }
}

/// A call's launch-by-launch breakdown (the benchmarks' `GpuTimer::breakdown`; on the
/// emulator by the wall clock): each launch named after its kernel, in order, with a positive
/// time, and none of another thread's launches meanwhile.
#[test]
fn breakdown_names_each_launch_in_order() {
    use finetune_kernels::bench::GpuTimer;
    use finetune_kernels::nf4::Nf4Weight;
    for dev in backends() {
        let w = dev
            .upload(&finetune_kernels::testing::random_vec::<
                finetune_kernels::bf16,
            >(&mut rng(), 64 * 256, 1.0))
            .unwrap();
        let q = Nf4Weight::quantize(&w, 64, 256, 64, false).unwrap();
        let mut bf = dev
            .alloc_poisoned::<finetune_kernels::bf16>(64 * 256)
            .unwrap();
        let mut f32s = dev.alloc_poisoned::<f32>(64 * 256).unwrap();
        let mut timer = GpuTimer::new(&dev).unwrap();
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        let (done, launched) = (AtomicBool::new(false), AtomicUsize::new(0));
        let parts = std::thread::scope(|s| {
            let q = &q;
            let beside = s.spawn(|| {
                let mut f16s = dev
                    .alloc_poisoned::<finetune_kernels::f16>(64 * 256)
                    .unwrap();
                while !done.load(Ordering::Relaxed) {
                    q.dequantize(&mut f16s).unwrap();
                    launched.fetch_add(1, Ordering::Relaxed);
                }
            });
            while launched.load(Ordering::Relaxed) == 0 {
                std::thread::yield_now();
            }
            let parts = timer.breakdown(1, 3, || {
                q.dequantize(&mut bf)?;
                q.dequantize(&mut f32s)
            });
            done.store(true, Ordering::Relaxed);
            beside.join().unwrap();
            parts.unwrap()
        });
        let names: Vec<&str> = parts.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["nf4_dequantize_bf16", "nf4_dequantize_f32"]);
        assert!(parts.iter().all(|(_, t)| t.median_us > 0.0), "{parts:?}");
    }
}

/// Timing with inputs rotated (the decode rows' `GpuTimer::time_rotated`): the launches run
/// in turn, whole rotations only, and the time is per launch; a rotation needs at least two
/// inputs, more the larger the L2 is against them; no repetitions is an error.
#[test]
fn rotated_timing_runs_each_launch_in_turn() {
    use finetune_kernels::bench::GpuTimer;
    use finetune_kernels::nf4::Nf4Weight;
    for dev in backends() {
        let values = finetune_kernels::testing::random_vec::<bf16>(&mut rng(), 32 * 128, 1.0);
        let w = dev.upload(&values).unwrap();
        let qs = [(); 3].map(|_| Nf4Weight::quantize(&w, 32, 128, 64, true).unwrap());
        let mut out = dev.alloc_poisoned::<bf16>(32 * 128).unwrap();
        let mut timer = GpuTimer::new(&dev).unwrap();
        let mut order = Vec::new();
        let t = timer
            .time_rotated(4, qs.len(), |i| {
                order.push(i);
                qs[i].dequantize(&mut out)
            })
            .unwrap();
        assert!(t.median_us > 0.0, "{t:?}");
        assert!(!order.is_empty() && order.len() % 3 == 0, "{order:?}");
        assert!(
            order.iter().enumerate().all(|(n, &i)| i == n % 3),
            "{order:?}"
        );
        assert!(timer.rotation(usize::MAX) == 2 && timer.rotation(0) >= 2);
        let small = timer.rotation(1 << 20);
        assert!(small >= 2 && small >= timer.rotation(1 << 30), "{small}");
        for (reps, launches) in [(0, 3), (3, 0)] {
            let err = timer.time_rotated(reps, launches, |_| Ok(())).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
        }
    }
}

fn tma_devices() -> Vec<finetune_kernels::Device> {
    backends().into_iter().filter(|d| d.has_wgmma()).collect()
}

/// A TMA load lands the box as the PTX ISA says, on the emulator and on a GPU alike (there
/// it shows that the driver-encoded map means what the emulator's does): element (r, e) of
/// the box (matrix element (c1 + r, c0 + e), zero outside the matrix, negative coordinates
/// included; c0 a multiple of 8) at byte 2·(64r + e) of the tile with address bits 4-6
/// XORed with bits 7-9 (the 128-byte swizzle); consecutive phases of one barrier alternate
/// parity. Multicast to a cluster of 2 or 4 blocks, each loading its box below the previous
/// rank's into all: every block's tile holds all the boxes, the rank-r box at row
/// r · box_rows. Against the formula, at random shapes and every corner of the matrix.
#[test]
fn tma_loads_follow_the_ptx_isa() {
    let mut rng = rng();
    for dev in tma_devices() {
        let (rows, cols) = (rng.random_range(1..300usize), rng.random_range(1..200usize));
        let ld = cols.next_multiple_of(8) + 8 * rng.random_range(0..3usize);
        let host: Vec<bf16> = (0..rows * ld)
            .map(|_| bf16::from_bits(rng.random_range(1..0x7F80u16)))
            .collect();
        let matrix = dev.upload(&host).unwrap();
        let box_rows = [8u32, 64, 128, 256][rng.random_range(0..4usize)];
        let map = dev
            .tile_map::<bf16>(TileMap {
                ptr: matrix.ptr(),
                cols,
                rows,
                ld,
                box_rows,
            })
            .unwrap()
            .expect("an aligned matrix has a map");
        for (name, cluster) in [
            ("regdump_tma", 1u32),
            ("regdump_tma_multicast", 2),
            ("regdump_tma_multicast", 4),
        ] {
            let kernel = Kernel {
                module: "regdump",
                name: name.into(),
            };
            // A box starts at a 16-byte multiple along the row (8 elements): elsewhere an
            // H200 faults, and the emulator refuses it (tests/emu.rs).
            for (c0, c1) in [
                (0, 0),
                (-8, -5),
                ((cols as i32 - 30).div_euclid(8) * 8, rows as i32 - 7),
                (
                    8 * rng.random_range(-8..cols.div_ceil(8) as i32),
                    rng.random_range(-300..rows as i32),
                ),
            ] {
                let boxes = 3;
                let out =
                    tma_boxes(&dev, &kernel, map, (c0, c1), box_rows, boxes, cluster).unwrap();
                let tile_rows = (box_rows * cluster) as usize;
                let tile = 64 * tile_rows;
                for (b, i) in
                    (0..cluster as usize).flat_map(|b| (0..boxes as usize).map(move |i| (b, i)))
                {
                    for r in 0..tile_rows {
                        for e in 0..64 {
                            let (y, x) =
                                (c1 as i64 + r as i64, c0 as i64 + 64 * i as i64 + e as i64);
                            let inside =
                                (0..rows as i64).contains(&y) && (0..cols as i64).contains(&x);
                            let want = if inside {
                                host[y as usize * ld + x as usize].to_bits()
                            } else {
                                0
                            };
                            let logical = 2 * (64 * r + e);
                            let physical = logical ^ (((logical >> 7) & 7) << 4);
                            assert_eq!(
                                out[(b * boxes as usize + i) * tile + physical / 2],
                                want,
                                "{dev:?} {name}: block {b}, box {i} at ({c0}, {c1}) of {rows}x{cols} (ld {ld}), element ({r}, {e})"
                            );
                        }
                    }
                }
            }
        }
    }
}

/// What TMA cannot take gets no map (the kernels load it through cp.async); a dtype TMA
/// is not used for here is an error.
#[test]
fn tile_maps_only_for_what_tma_loads() {
    for dev in tma_devices() {
        let buf = dev.upload(&vec![bf16::ONE; 64 * 40]).unwrap();
        let at = |offset: usize, cols, rows, ld, box_rows| TileMap {
            ptr: (buf.ptr() as usize + 2 * offset) as *const std::ffi::c_void,
            cols,
            rows,
            ld,
            box_rows,
        };
        assert!(dev
            .tile_map::<bf16>(at(0, 40, 60, 40, 128))
            .unwrap()
            .is_some());
        assert!(dev
            .tile_map::<bf16>(at(8, 40, 60, 40, 256))
            .unwrap()
            .is_some());
        for (what, m) in [
            ("address not 16-byte aligned", at(1, 40, 60, 40, 128)),
            ("rows not 16 bytes apart", at(0, 36, 60, 36, 128)),
            ("rows closer than a row", at(0, 48, 40, 40, 128)),
            ("box over 256 rows", at(0, 40, 60, 40, 512)),
            ("no rows", at(0, 40, 0, 40, 128)),
        ] {
            assert!(dev.tile_map::<bf16>(m).unwrap().is_none(), "{what}");
        }
        assert!(matches!(
            dev.tile_map::<f32>(at(0, 40, 60, 40, 128)),
            Err(Error::UnsupportedDtype { .. })
        ));
    }
}

/// A grid-stride grid of items to cover has at least one block, whatever its cap: a cap of 0
/// had made a grid of none, which launches nothing and reports success.
#[test]
fn grid_stride_grids_cover_their_items() {
    for cfg in [
        LaunchConfig::grid_stride(100, 256, 0),
        LaunchConfig::warp_stride(3, 256, 0),
    ] {
        assert_eq!(cfg.grid, (1, 1, 1), "{cfg:?}");
    }
    assert!(LaunchConfig::grid_stride(0, 256, 0).is_empty());
    assert_eq!(LaunchConfig::grid_stride(1000, 256, 2).grid.0, 2);
}

/// A grid or block past CUDA's limits is a typed error naming the limit and the kernel, on
/// every backend, not the driver's bare "invalid argument"; the largest allowed pass the
/// same check.
#[test]
fn launch_limits_are_checked() {
    let kernel = Kernel {
        module: "regdump",
        name: "regdump_tma_multicast".into(),
    };
    let config = |grid, block| LaunchConfig {
        grid,
        block,
        shared_bytes: 0,
        cluster: (1, 1, 1),
    };
    let (one, warp) = ((1, 1, 1), (32, 1, 1));
    for (grid, block, limit) in [
        ((1, 65_536, 1), warp, "LaunchConfig::grid"),
        ((1, 1, 65_536), warp, "LaunchConfig::grid"),
        ((1 << 31, 1, 1), warp, "LaunchConfig::grid"),
        (one, (1025, 1, 1), "LaunchConfig::block"),
        (one, (32, 32, 2), "LaunchConfig::block"),
        (one, (1, 1, 65), "LaunchConfig::block"),
        (one, (32, 0, 1), "LaunchConfig::block"),
    ] {
        for dev in backends() {
            // SAFETY: refused before launch: nothing runs.
            match unsafe { dev.launch(&kernel, config(grid, block), &0u8) } {
                Err(Error::InvalidArgument { what, why }) => {
                    assert_eq!(what, limit);
                    assert!(why.contains("regdump_tma_multicast"), "{why}");
                }
                other => panic!("{grid:?} {block:?}: expected a typed error, got {other:?}"),
            }
        }
    }
    for (grid, block) in [
        ((i32::MAX as u32, 65_535, 65_535), warp),
        (one, (1024, 1, 1)),
        (one, (1, 1024, 1)),
        (one, (16, 1, 64)),
    ] {
        assert!(config(grid, block).check("k").is_ok(), "{grid:?} {block:?}");
    }
}

/// A cluster launch the GPU would refuse is a typed error naming the problem: a grid that is
/// not a whole number of clusters, a cluster of more than 8 blocks or of none. The wgmma
/// GEMM's launch is always whole clusters: a block per tile (A's tiles rounded up to whole
/// clusters) or as many as asked, rounded down to whole clusters.
#[test]
fn cluster_launches_are_checked() {
    let one = LaunchConfig {
        grid: (3, 5, 1),
        block: (32, 1, 1),
        shared_bytes: 0,
        cluster: (1, 1, 1),
    };
    // 300 × 700: 3 tiles of 128 rows (A) by 3 of 256 columns (B); transposed, 6 of 128 by 2
    // of 256.
    for (transposed, cluster, max_blocks, grid) in [
        (false, 2, usize::MAX, 12),
        (false, 2, 5, 4),
        (false, 1, 132, 9),
        (false, 1, 4, 4),
        (true, 2, usize::MAX, 12),
        (true, 1, 7, 7),
    ] {
        let cfg = LaunchConfig::wgmma(300, 700, transposed, cluster, max_blocks);
        assert_eq!(
            (cfg.grid, cfg.cluster),
            ((grid, 1, 1), (cluster, 1, 1)),
            "transposed {transposed}, cluster {cluster}, at most {max_blocks}"
        );
    }
    let kernel = Kernel {
        module: "regdump",
        name: "regdump_tma_multicast".into(),
    };
    for dev in tma_devices() {
        for (cluster, needle) in [
            ((2, 1, 1), "not a whole number of clusters"),
            ((3, 3, 1), "a cluster is 1 to 8"),
            ((0, 1, 1), "a cluster is 1 to 8"),
        ] {
            let cfg = LaunchConfig { cluster, ..one };
            // SAFETY: refused before launch: nothing runs.
            match unsafe { dev.launch(&kernel, cfg, &0u8) } {
                Err(Error::InvalidArgument { what, why }) => {
                    assert_eq!(what, "LaunchConfig::cluster");
                    assert!(why.contains(needle), "{cluster:?}: {why}");
                }
                other => panic!("{cluster:?}: expected a typed error, got {other:?}"),
            }
        }
    }
}
