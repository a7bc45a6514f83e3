//! The raw entry points (framework authors' launches on memory and a stream they own, with
//! params structs they fill) against the safe API on every backend, bit for bit: the same
//! kernels on the same inputs must give the same outputs, so a wrong field, launch shape or
//! workspace layout in a raw path shows as a mismatch. Outputs start poisoned. On a GPU the
//! raw calls take the device's stream as a framework's own (`Some`); the emulator takes
//! `None` only, and refuses a stream.

use cudarc::driver::sys::CUstream;
use finetune_kernels::device::Device;
use finetune_kernels::lora::raw::BaseGemm;
use finetune_kernels::lora::{
    self, LoraBase, LoraConfig, LoraLinear, LoraPath, Nf4Decode, TileLoads,
};
use finetune_kernels::nf4::{self, MatmulPath, Nf4Weight};
use finetune_kernels::params::{
    self, DropoutMaskParams, GatherParams, LoraParams, Nf4DequantizeParams, Nf4GemvEpilogue,
    Nf4MatmulParams, PhiloxParams, ScatterAddParams, SegmentedScatterAddParams, SparseAdamwParams,
};
use finetune_kernels::reference::sparse::AdamwStepScalars;
use finetune_kernels::sparse::{
    self, AdamwConfig, IndexWidth, ScatterPlan, SparseAdamw, SparseIndex,
};
use finetune_kernels::testing::{backends, bit_mismatches, random_support, random_vec, rel_l2};
use finetune_kernels::{bf16, philox, Buffer, DType, Error, Result};
use rand::{rngs::StdRng, Rng, SeedableRng};

/// The stream a framework would pass: a GPU's own stream as a raw handle; none on the emulator.
fn stream(dev: &Device) -> Option<CUstream> {
    match dev {
        Device::Cuda(c) => Some(c.stream().cu_stream()),
        _ => None,
    }
}

fn same_bits<T: finetune_kernels::Elem>(
    what: &str,
    dev: &Device,
    raw: &Buffer<T>,
    safe: &Buffer<T>,
) {
    let (raw, safe) = (raw.to_host().unwrap(), safe.to_host().unwrap());
    assert_eq!(raw.len(), safe.len(), "{what}: lengths");
    let bad = bit_mismatches(&raw, &safe).len();
    assert!(
        bad == 0,
        "{what} on {}: {bad} of {} elements differ",
        dev.describe(),
        safe.len()
    );
}

fn copy<T: finetune_kernels::Elem>(dev: &Device, b: &Buffer<T>) -> Buffer<T> {
    dev.upload(&b.to_host().unwrap()).unwrap()
}

#[test]
fn philox_raw_matches_the_safe_calls() {
    for dev in backends() {
        let seed = rand::random();
        let (blocks, n, p) = (1001usize, 3001usize, 0.3f32);
        let safe_words = philox::random_words(&dev, seed, 77, [5, 9], blocks).unwrap();
        let mut words = dev.alloc_poisoned::<u32>(4 * blocks).unwrap();
        let params = PhiloxParams {
            out: words.ptr_mut() as *mut u32,
            blocks: blocks as u64,
            seed,
            counter: 77,
            stream0: 5,
            stream1: 9,
        };
        // SAFETY: words holds 4 · blocks u32 on dev.
        unsafe { philox::raw::random_words(&dev, stream(&dev), &params).unwrap() };
        same_bits("philox words", &dev, &words, &safe_words);

        let safe_mask = philox::dropout_mask(&dev, seed, p, n).unwrap();
        let mut mask = dev.alloc_poisoned::<u8>(n).unwrap();
        let params = DropoutMaskParams {
            keep: mask.ptr_mut() as *mut u8,
            n: n as u64,
            seed,
            p,
        };
        // SAFETY: mask holds n bytes on dev.
        unsafe { philox::raw::dropout_mask(&dev, stream(&dev), &params).unwrap() };
        same_bits("dropout mask", &dev, &mask, &safe_mask);
    }
}

/// `n` sorted unique u32 indices below `numel`, and a random bf16 weight of `numel` on `dev`.
fn support_and_weight(
    dev: &Device,
    rng: &mut StdRng,
    numel: usize,
    n: usize,
) -> (Vec<u32>, Buffer<bf16>) {
    let support = random_support(rng, numel as u64, n)
        .into_iter()
        .map(|i| i as u32)
        .collect();
    (
        support,
        dev.upload(&random_vec::<bf16>(rng, numel, 1.0)).unwrap(),
    )
}

#[test]
fn sparse_raw_matches_the_safe_calls() {
    for dev in backends() {
        let mut rng = StdRng::seed_from_u64(rand::random());
        let (numel, n) = (5003usize, 1777usize);
        let (sorted, w0) = support_and_weight(&dev, &mut rng, numel, n);
        let values = dev.upload(&random_vec::<f32>(&mut rng, n, 1.0)).unwrap();
        let index = SparseIndex::with_width(&dev, &sorted, numel as u64, IndexWidth::U32).unwrap();
        let indices = dev.upload(&sorted).unwrap();
        for atomic in [false, true] {
            let mut safe = copy(&dev, &w0);
            if atomic {
                sparse::scatter_add_atomic(&mut safe, &index, &values, 0.7).unwrap();
            } else {
                sparse::scatter_add(&mut safe, &index, &values, 0.7).unwrap();
            }
            let mut raw = copy(&dev, &w0);
            let p = ScatterAddParams {
                w: raw.ptr_mut(),
                values: values.ptr(),
                indices: indices.ptr(),
                n: n as u64,
                numel: numel as u64,
                alpha: 0.7,
            };
            // SAFETY: the indices are sorted, unique and < numel; raw and values are sized.
            unsafe {
                sparse::raw::scatter_add(
                    &dev,
                    stream(&dev),
                    DType::BF16,
                    DType::F32,
                    IndexWidth::U32,
                    atomic,
                    &p,
                )
                .unwrap()
            };
            same_bits(&format!("scatter_add (atomic {atomic})"), &dev, &raw, &safe);
        }

        let mut safe = dev.alloc_poisoned::<f32>(n).unwrap();
        sparse::gather(&w0, &index, &mut safe).unwrap();
        let mut raw = dev.alloc_poisoned::<f32>(n).unwrap();
        let p = GatherParams {
            out: raw.ptr_mut(),
            src: w0.ptr(),
            indices: indices.ptr(),
            n: n as u64,
            numel: numel as u64,
        };
        // SAFETY: as above.
        unsafe {
            sparse::raw::gather(
                &dev,
                stream(&dev),
                DType::BF16,
                DType::F32,
                IndexWidth::U32,
                &p,
            )
            .unwrap()
        };
        same_bits("gather", &dev, &raw, &safe);

        // Repeated, unsorted indices through a plan the caller builds (cuda/params/sparse.h):
        // positions grouped by target, each group in position order.
        let repeated: Vec<u32> = (0..n).map(|_| rng.random_range(0..300)).collect();
        let mut order: Vec<u32> = (0..n as u32).collect();
        order.sort_by_key(|&i| (repeated[i as usize], i));
        let starts: Vec<u32> = (0..n)
            .filter(|&k| k == 0 || repeated[order[k] as usize] != repeated[order[k - 1] as usize])
            .chain([n])
            .map(|k| k as u32)
            .collect();
        let targets: Vec<u32> = starts[..starts.len() - 1]
            .iter()
            .map(|&k| repeated[order[k as usize] as usize])
            .collect();
        let plan = ScatterPlan::with_width(&dev, &repeated, numel as u64, IndexWidth::U32).unwrap();
        let mut safe = copy(&dev, &w0);
        sparse::scatter_add_planned(&mut safe, &plan, &values, -1.3).unwrap();
        let mut raw = copy(&dev, &w0);
        let (targets_d, starts_d, order_d) = (
            dev.upload(&targets).unwrap(),
            dev.upload(&starts).unwrap(),
            dev.upload(&order).unwrap(),
        );
        let p = SegmentedScatterAddParams {
            w: raw.ptr_mut(),
            values: values.ptr(),
            targets: targets_d.ptr(),
            starts: starts_d.ptr(),
            order: order_d.ptr(),
            segments: targets.len() as u64,
            numel: numel as u64,
            alpha: -1.3,
        };
        // SAFETY: the plan's arrays are consistent, targets unique and < numel.
        unsafe {
            sparse::raw::segmented_scatter_add(
                &dev,
                stream(&dev),
                DType::BF16,
                DType::F32,
                IndexWidth::U32,
                &p,
            )
            .unwrap()
        };
        same_bits("segmented scatter_add", &dev, &raw, &safe);
    }
}

/// Two AdamW steps over a sparse support: the optimizer's state in buffers the caller owns,
/// the step's scalars from `AdamwStepScalars`, against `SparseAdamw`.
#[test]
fn sparse_adamw_raw_matches_the_optimizer() {
    for dev in backends() {
        let mut rng = StdRng::seed_from_u64(rand::random());
        let (numel, n) = (4099usize, 1031usize);
        let (support, w0) = support_and_weight(&dev, &mut rng, numel, n);
        let grads = [0, 1].map(|_| {
            dev.upload(&random_vec::<f32>(&mut rng, numel, 1.0))
                .unwrap()
        });
        let config = AdamwConfig {
            lr: 0.01,
            weight_decay: 0.1,
            ..AdamwConfig::default()
        };
        let index = SparseIndex::with_width(&dev, &support, numel as u64, IndexWidth::U32).unwrap();
        let mut safe_w = copy(&dev, &w0);
        let mut opt = SparseAdamw::new(&safe_w, index, config).unwrap();
        for g in &grads {
            opt.step(&mut safe_w, g).unwrap();
        }
        let safe = opt.state_to_host().unwrap();

        let mut w = copy(&dev, &w0);
        let indices = dev.upload(&support).unwrap();
        let w0_host = w0.to_host().unwrap();
        let base = dev
            .upload(
                &support
                    .iter()
                    .map(|&i| w0_host[i as usize].to_f32())
                    .collect::<Vec<_>>(),
            )
            .unwrap();
        let [mut delta, mut exp_avg, mut exp_avg_sq] =
            [0, 1, 2].map(|_| dev.zeros::<f32>(n).unwrap());
        for (step, g) in grads.iter().enumerate() {
            let s = AdamwStepScalars::new(&config, step as u64 + 1);
            let p = SparseAdamwParams {
                w: w.ptr_mut(),
                grad: g.ptr(),
                indices: indices.ptr(),
                base: base.ptr() as *const f32,
                delta: delta.ptr_mut() as *mut f32,
                exp_avg: exp_avg.ptr_mut() as *mut f32,
                exp_avg_sq: exp_avg_sq.ptr_mut() as *mut f32,
                n: n as u64,
                numel: numel as u64,
                beta1: s.beta1,
                beta2: s.beta2,
                one_minus_beta1: s.one_minus_beta1,
                one_minus_beta2: s.one_minus_beta2,
                eps: s.eps,
                decay: s.decay,
                step_size: s.step_size,
                sqrt_bc2: s.sqrt_bc2,
            };
            // SAFETY: the support is sorted, unique and < numel; every buffer is sized.
            unsafe {
                sparse::raw::sparse_adamw(
                    &dev,
                    stream(&dev),
                    DType::BF16,
                    DType::F32,
                    IndexWidth::U32,
                    &p,
                )
                .unwrap()
            };
        }
        same_bits("adamw w", &dev, &w, &safe_w);
        for (what, raw, safe) in [
            ("base", &base, &safe.base),
            ("delta", &delta, &safe.delta),
            ("exp_avg", &exp_avg, &safe.exp_avg),
            ("exp_avg_sq", &exp_avg_sq, &safe.exp_avg_sq),
        ] {
            same_bits(
                &format!("adamw {what}"),
                &dev,
                raw,
                &dev.upload(safe).unwrap(),
            );
        }
    }
}

/// The dX GEMV through `nf4::raw` on a workspace the caller allocates: with the safe API's
/// splits, bit for bit against the safe call (also as `raw::matmul`'s choice where
/// `p.partials` is given; without it `raw::matmul` takes the GEMM as before); with other
/// splits (1, 3, one a row) within the matmul bound of it, as the sum's order differs; and
/// what it refuses before any launch: a forward, more rows than it takes, no workspace, splits
/// of 0 or past the rows, a misaligned workspace.
#[test]
fn nf4_raw_gemv_dx_matches_the_safe_call() {
    for dev in backends() {
        let mut rng = StdRng::seed_from_u64(rand::random());
        // 200 rows: 4 splits of 50 at most 64 rows a split; 136 columns: a short last slab.
        let (rows, cols, m) = (200usize, 136usize, 5usize);
        let w = dev
            .upload(&random_vec::<bf16>(&mut rng, rows * cols, 0.5))
            .unwrap();
        let q = Nf4Weight::quantize(&w, rows, cols, 64, true).unwrap();
        let dy = dev
            .upload(&random_vec::<bf16>(&mut rng, m * rows, 1.0))
            .unwrap();
        let mut safe = dev.alloc_poisoned::<bf16>(m * cols).unwrap();
        nf4::backward_dx_with(&q, &dy, m, &mut safe, MatmulPath::GemvDx).unwrap();
        let splits = nf4::gemv_dx_splits(&dev, rows, cols, m);
        assert!(splits > 1, "{splits} splits: the test wants several");
        let mut partials = dev.alloc_poisoned::<f32>(rows * m * cols).unwrap();
        let mut dx = dev.alloc_poisoned::<bf16>(m * cols).unwrap();
        let p = |splits: usize, partials: *mut std::ffi::c_void, out| Nf4MatmulParams {
            w: q.params(),
            a: dy.ptr(),
            out,
            m: m as u32,
            partials: partials.cast(),
            row_splits: splits as u32,
            ..Nf4MatmulParams::default()
        };
        let (ws, out) = (partials.ptr_mut(), dx.ptr_mut());
        let s = stream(&dev);
        let path = MatmulPath::GemvDx;
        // SAFETY: dy [m, rows], dx [m, cols], the partials [rows, m, cols] f32 (the most
        // splits any call here asks for).
        unsafe { nf4::raw::matmul_with(&dev, s, DType::BF16, false, path, &p(splits, ws, out)) }
            .unwrap();
        same_bits("nf4 raw dX GEMV", &dev, &dx, &safe);
        let mut dx = dev.alloc_poisoned::<bf16>(m * cols).unwrap();
        // SAFETY: as above.
        unsafe { nf4::raw::matmul(&dev, s, DType::BF16, false, &p(splits, ws, dx.ptr_mut())) }
            .unwrap();
        same_bits("nf4 raw matmul's dX GEMV", &dev, &dx, &safe);
        let bound = finetune_kernels::check::nf4::matmul_bound(DType::BF16, rows);
        let want = safe.to_host().unwrap();
        for other in [1, 3, rows] {
            let mut dx = dev.alloc_poisoned::<bf16>(m * cols).unwrap();
            // SAFETY: as above.
            unsafe {
                let p = p(other, ws, dx.ptr_mut());
                nf4::raw::matmul_with(&dev, s, DType::BF16, false, path, &p)
            }
            .unwrap();
            let err = rel_l2(&dx.to_host().unwrap(), &want);
            assert!(err <= bound, "{other} splits: {err} against {bound}");
        }
        // No workspace: raw::matmul's GEMM, as the safe call through it.
        let mut gemm = dev.alloc_poisoned::<bf16>(m * cols).unwrap();
        nf4::backward_dx_with(&q, &dy, m, &mut gemm, MatmulPath::FusedGemm).unwrap();
        let mut dx = dev.alloc_poisoned::<bf16>(m * cols).unwrap();
        let no_ws = p(0, std::ptr::null_mut(), dx.ptr_mut());
        // SAFETY: dy [m, rows], dx [m, cols]; the GEMM reads no workspace.
        unsafe { nf4::raw::matmul(&dev, s, DType::BF16, false, &no_ws) }.unwrap();
        same_bits("nf4 raw matmul without a workspace", &dev, &dx, &gemm);
        // Refused before any launch.
        let mut y = dev.alloc_poisoned::<bf16>(m * cols).unwrap();
        let out = y.ptr_mut();
        let odd = ws.wrapping_byte_add(4);
        for (case, forward, p) in [
            ("forward", true, p(splits, ws, out)),
            (
                "17 rows",
                false,
                Nf4MatmulParams {
                    m: 17,
                    ..p(splits, ws, out)
                },
            ),
            ("no workspace", false, p(splits, std::ptr::null_mut(), out)),
            ("0 splits", false, p(0, ws, out)),
            ("a split past the rows", false, p(rows + 1, ws, out)),
            ("workspace 4 bytes on", false, p(splits, odd, out)),
        ] {
            // SAFETY: refused before any launch.
            let err = unsafe { nf4::raw::matmul_with(&dev, None, DType::BF16, forward, path, &p) }
                .unwrap_err();
            let typed = match case {
                "forward" | "17 rows" => matches!(err, Error::Unsupported { .. }),
                "workspace 4 bytes on" => matches!(err, Error::Misaligned { .. }),
                _ => matches!(err, Error::InvalidArgument { .. }),
            };
            assert!(typed, "dX GEMV {case}: {err}");
        }
        assert!(
            y.to_host().unwrap().iter().all(|v| v.is_nan()),
            "a refused dX GEMV wrote its output"
        );
    }
}

#[test]
fn nf4_raw_matches_the_safe_calls() {
    for dev in backends() {
        let mut rng = StdRng::seed_from_u64(rand::random());
        let (rows, cols) = (136usize, 96usize);
        let w = dev
            .upload(&random_vec::<bf16>(&mut rng, rows * cols, 0.5))
            .unwrap();
        let q = Nf4Weight::quantize(&w, rows, cols, 64, true).unwrap();
        let mut safe = dev.alloc_poisoned::<f32>(rows * cols).unwrap();
        q.dequantize(&mut safe).unwrap();
        let mut raw = dev.alloc_poisoned::<f32>(rows * cols).unwrap();
        let p = Nf4DequantizeParams {
            w: q.params(),
            out: raw.ptr_mut(),
            out_ld: 0,
        };
        // SAFETY: raw holds rows · cols f32; q's buffers match its shape.
        unsafe { nf4::raw::dequantize(&dev, stream(&dev), DType::F32, &p).unwrap() };
        same_bits("nf4 dequantize", &dev, &raw, &safe);

        // The default choice (None: `matmul`) and every fused path (`matmul_with`): the
        // GEMVs at 3 rows (the tensor-core one at 45 too), the GEMMs at 45, forward and
        // backward.
        let mut cases = vec![
            (3, true, None),
            (45, true, None),
            (70, true, None),
            (45, false, None),
            (3, true, Some(MatmulPath::GemvMma)),
            (45, true, Some(MatmulPath::GemvMma)),
            (3, true, Some(MatmulPath::Gemv)),
            (45, true, Some(MatmulPath::FusedGemm)),
            (45, false, Some(MatmulPath::FusedGemm)),
        ];
        if dev.has_wgmma() {
            cases.push((45, true, Some(MatmulPath::FusedGemmWgmma)));
            cases.push((45, false, Some(MatmulPath::FusedGemmWgmma)));
        }
        for (m, forward, path) in cases {
            let (k, n) = if forward { (cols, rows) } else { (rows, cols) };
            let a = dev
                .upload(&random_vec::<bf16>(&mut rng, m * k, 1.0))
                .unwrap();
            // `matmul` takes the GEMV forward up to its rows, else the mma.sync GEMM.
            let safe_path = path.unwrap_or(if forward && m <= nf4::GEMV_MAX_ROWS {
                MatmulPath::GemvMma
            } else {
                MatmulPath::FusedGemm
            });
            let mut safe = dev.alloc_poisoned::<bf16>(m * n).unwrap();
            if forward {
                nf4::forward_with(&q, &a, m, &mut safe, safe_path).unwrap();
            } else {
                nf4::backward_dx_with(&q, &a, m, &mut safe, safe_path).unwrap();
            }
            let mut raw = dev.alloc_poisoned::<bf16>(m * n).unwrap();
            let p = Nf4MatmulParams {
                w: q.params(),
                a: a.ptr(),
                out: raw.ptr_mut(),
                m: m as u32,
                ..Nf4MatmulParams::default()
            };
            let s = stream(&dev);
            // SAFETY: a is [m, k] and raw [m, n] for this direction.
            unsafe {
                match path {
                    None => nf4::raw::matmul(&dev, s, DType::BF16, forward, &p).unwrap(),
                    Some(path) => {
                        nf4::raw::matmul_with(&dev, s, DType::BF16, forward, path, &p).unwrap()
                    }
                }
            };
            same_bits(
                &format!("nf4 matmul m {m} forward {forward} {path:?}"),
                &dev,
                &raw,
                &safe,
            );
        }
        // The GEMVs' epilogue (a bias and a rank-5 term: rows of u and b 10 bytes apart, so
        // the kernels' 16-byte loads and their element-by-element tail both run).
        let (m, rank) = (3, 5);
        let a = dev
            .upload(&random_vec::<bf16>(&mut rng, m * cols, 1.0))
            .unwrap();
        let bias = dev
            .upload(&random_vec::<bf16>(&mut rng, rows, 1.0))
            .unwrap();
        let u = dev
            .upload(&random_vec::<bf16>(&mut rng, m * rank, 1.0))
            .unwrap();
        let b = dev
            .upload(&random_vec::<bf16>(&mut rng, rows * rank, 1.0))
            .unwrap();
        let epilogue = Nf4GemvEpilogue {
            bias: bias.ptr(),
            u: u.ptr(),
            b: b.ptr(),
            rank: rank as u32,
        };
        for path in [MatmulPath::GemvMma, MatmulPath::Gemv] {
            let mut safe = dev.alloc_poisoned::<bf16>(m * rows).unwrap();
            let terms = nf4::GemvEpilogue {
                bias: Some(&bias),
                low_rank: Some((&u, &b, rank)),
            };
            nf4::gemv_with_epilogue(&q, &a, m, &mut safe, path, terms).unwrap();
            let mut raw = dev.alloc_poisoned::<bf16>(m * rows).unwrap();
            let p = Nf4MatmulParams {
                w: q.params(),
                a: a.ptr(),
                out: raw.ptr_mut(),
                m: m as u32,
                epilogue,
                ..Nf4MatmulParams::default()
            };
            // SAFETY: a [m, cols], raw [m, rows], bias [rows], u [m, rank], b [rows, rank].
            unsafe { nf4::raw::matmul_with(&dev, stream(&dev), DType::BF16, true, path, &p) }
                .unwrap();
            same_bits(&format!("nf4 {path:?} epilogue"), &dev, &raw, &safe);
        }
        // Refused before any launch: an epilogue on a GEMM, a u without a b or a rank, and
        // pointers off their element's alignment.
        let mut y = dev.alloc_poisoned::<bf16>(m * rows).unwrap();
        let with = |epilogue, out: *mut std::ffi::c_void| Nf4MatmulParams {
            w: q.params(),
            a: a.ptr(),
            out,
            m: m as u32,
            epilogue,
            ..Nf4MatmulParams::default()
        };
        let no_b = Nf4GemvEpilogue {
            b: std::ptr::null(),
            ..epilogue
        };
        let no_rank = Nf4GemvEpilogue {
            rank: 0,
            ..epilogue
        };
        let odd = |p: *const std::ffi::c_void| p.wrapping_byte_add(1);
        let out = y.ptr_mut();
        for (case, path, p) in [
            ("on a GEMM", MatmulPath::FusedGemm, with(epilogue, out)),
            ("u without b", MatmulPath::GemvMma, with(no_b, out)),
            ("rank 0", MatmulPath::Gemv, with(no_rank, out)),
            (
                "out 1 byte on",
                MatmulPath::GemvMma,
                with(epilogue, out.wrapping_byte_add(1)),
            ),
            (
                "bias 1 byte on",
                MatmulPath::GemvMma,
                with(
                    Nf4GemvEpilogue {
                        bias: odd(epilogue.bias),
                        ..epilogue
                    },
                    out,
                ),
            ),
            (
                "u 1 byte on",
                MatmulPath::GemvMma,
                with(
                    Nf4GemvEpilogue {
                        u: odd(epilogue.u),
                        ..epilogue
                    },
                    out,
                ),
            ),
            (
                "b 1 byte on",
                MatmulPath::Gemv,
                with(
                    Nf4GemvEpilogue {
                        b: odd(epilogue.b),
                        ..epilogue
                    },
                    out,
                ),
            ),
        ] {
            // SAFETY: refused before any launch.
            let err = unsafe { nf4::raw::matmul_with(&dev, None, DType::BF16, true, path, &p) }
                .unwrap_err();
            let typed = match case {
                "on a GEMM" => matches!(err, Error::Unsupported { .. }),
                "u without b" | "rank 0" => matches!(err, Error::InvalidArgument { .. }),
                _ => matches!(err, Error::Misaligned { .. }),
            };
            assert!(typed, "epilogue {case}: {err}");
        }
        assert!(
            y.to_host().unwrap().iter().all(|v| v.is_nan()),
            "a refused GEMV wrote its output"
        );
        // A bias alone: b is not read without a u, so whatever it holds is not refused.
        let bias_only = Nf4GemvEpilogue {
            bias: bias.ptr(),
            u: std::ptr::null(),
            b: odd(b.ptr()),
            rank: 0,
        };
        // SAFETY: a [m, cols], y [m, rows], bias [rows]; b and rank are not read.
        unsafe {
            nf4::raw::matmul_with(
                &dev,
                stream(&dev),
                DType::BF16,
                true,
                MatmulPath::GemvMma,
                &with(bias_only, out),
            )
        }
        .unwrap();
        let mut safe = dev.alloc_poisoned::<bf16>(m * rows).unwrap();
        let terms = nf4::GemvEpilogue {
            bias: Some(&bias),
            low_rank: None,
        };
        nf4::gemv_with_epilogue(&q, &a, m, &mut safe, MatmulPath::GemvMma, terms).unwrap();
        same_bits("nf4 GEMV, a bias alone", &dev, &y, &safe);
        // Refused before any launch: a GEMV backward, dequantize + cuBLAS.
        let p = Nf4MatmulParams {
            w: q.params(),
            m: 3,
            ..Nf4MatmulParams::default()
        };
        for (forward, path) in [
            (false, MatmulPath::GemvMma),
            (true, MatmulPath::DequantizeCublas),
        ] {
            // SAFETY: refused before any launch.
            let err = unsafe { nf4::raw::matmul_with(&dev, None, DType::BF16, forward, path, &p) }
                .unwrap_err();
            assert!(matches!(err, Error::Unsupported { .. }), "{path:?}: {err}");
        }
        // A weight's params the kernels cannot read: refused before any launch.
        let good = q.params();
        let mut out = dev.alloc_poisoned::<f32>(rows * cols).unwrap();
        let refused = |what: &str, err: Error| {
            let typed = matches!(
                err,
                Error::Unsupported { .. } | Error::InvalidArgument { .. }
            );
            assert!(typed, "{what}: {err}");
        };
        for (case, w) in [
            (
                "blocksize 48",
                params::Nf4Weight {
                    blocksize: 48,
                    ..good
                },
            ),
            ("no rows", params::Nf4Weight { rows: 0, ..good }),
            ("nested 2", params::Nf4Weight { nested: 2, ..good }),
            (
                "nested, no map",
                params::Nf4Weight {
                    nested_map: std::ptr::null(),
                    ..good
                },
            ),
            ("plain, no absmax", params::Nf4Weight { nested: 0, ..good }),
        ] {
            let p = Nf4DequantizeParams {
                w,
                out: out.ptr_mut(),
                out_ld: 0,
            };
            // SAFETY: refused before any launch.
            let err = unsafe { nf4::raw::dequantize(&dev, None, DType::F32, &p) }.unwrap_err();
            refused(case, err);
            let p = Nf4MatmulParams {
                w,
                m: 3,
                ..Nf4MatmulParams::default()
            };
            // SAFETY: refused before any launch.
            let err = unsafe { nf4::raw::matmul(&dev, None, DType::BF16, true, &p) }.unwrap_err();
            refused(case, err);
            // The LoRA layer's NF4 base alike, and one of another shape than the layer's.
            let lp = LoraParams {
                m: 3,
                rank: 4,
                d_in: cols as u32,
                d_out: rows as u32,
                nf4: w,
                ..LoraParams::default()
            };
            // SAFETY: refused before any launch.
            let err = unsafe { lora::raw::forward(&dev, None, DType::BF16, BaseGemm::Mma, &lp) }
                .unwrap_err();
            refused(&format!("lora, {case}"), err);
        }
        // Pointers the kernels' vector loads cannot take (codes and activations to 16 bytes,
        // the f32 arrays to 4, dequantize's output to 16): Error::Misaligned, before any
        // launch, and the output untouched.
        let misaligned = |what: &str, err: Error| {
            assert!(matches!(err, Error::Misaligned { .. }), "{what}: {err}");
        };
        let on = |bytes: usize| move |p: *const u8| p.wrapping_add(bytes);
        for (case, w) in [
            (
                "codes 8 bytes on",
                params::Nf4Weight {
                    codes: on(8)(good.codes),
                    ..good
                },
            ),
            (
                "nested_absmax 2 bytes on",
                params::Nf4Weight {
                    nested_absmax: on(2)(good.nested_absmax.cast()).cast(),
                    ..good
                },
            ),
        ] {
            let p = Nf4DequantizeParams {
                w,
                out: out.ptr_mut(),
                out_ld: 0,
            };
            // SAFETY: refused before any launch.
            let err = unsafe { nf4::raw::dequantize(&dev, None, DType::F32, &p) }.unwrap_err();
            misaligned(case, err);
            let p = Nf4MatmulParams {
                w,
                m: 3,
                ..Nf4MatmulParams::default()
            };
            // SAFETY: refused before any launch.
            let err = unsafe { nf4::raw::matmul(&dev, None, DType::BF16, true, &p) }.unwrap_err();
            misaligned(case, err);
        }
        let p = Nf4DequantizeParams {
            w: good,
            out: out.ptr_mut().wrapping_byte_add(4),
            out_ld: 0,
        };
        // SAFETY: refused before any launch.
        let err = unsafe { nf4::raw::dequantize(&dev, None, DType::F32, &p) }.unwrap_err();
        misaligned("dequantize out 4 bytes on", err);
        let x = dev
            .upload(&random_vec::<bf16>(&mut rng, 3 * cols + 1, 1.0))
            .unwrap();
        let mut y = dev.alloc_poisoned::<bf16>(3 * rows).unwrap();
        let p = Nf4MatmulParams {
            w: good,
            a: x.ptr().wrapping_byte_add(2),
            out: y.ptr_mut(),
            m: 3,
            ..Nf4MatmulParams::default()
        };
        // SAFETY: refused before any launch.
        let err = unsafe { nf4::raw::matmul(&dev, None, DType::BF16, true, &p) }.unwrap_err();
        misaligned("activations 2 bytes on", err);
        let untouched = out.to_host().unwrap();
        assert!(
            untouched.iter().all(|v| v.is_nan()),
            "dequantize's output was written"
        );
        let lp = LoraParams {
            m: 3,
            rank: 4,
            d_in: cols as u32,
            d_out: rows as u32 + 1,
            nf4: good,
            ..LoraParams::default()
        };
        // SAFETY: refused before any launch.
        let err =
            unsafe { lora::raw::forward(&dev, None, DType::BF16, BaseGemm::Mma, &lp) }.unwrap_err();
        assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    }
}

/// One layer through LoraLinear and through the raw steps with params filled by hand,
/// workspaces the caller's; on wgmma, where `fused`, as the layer does: without dropout the
/// forward in one kernel (`forward_fused_down`), else `down` then `forward`; the backward's v
/// and dX in one (`backward_dx_fused_v`), and with them the dB partials where `fused_db`,
/// else `backward_v` then `backward_dx`.
fn lora_case(
    dev: &Device,
    gemm: BaseGemm,
    nf4_base: bool,
    dropout: f32,
    bias: bool,
    (fused, fused_db, fused_da): (bool, bool, bool),
) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(rand::random());
    let (m, d_in, d_out, rank) = (77usize, 136usize, 72usize, 9usize);
    let case = format!(
        "lora {gemm:?} nf4 {nf4_base} dropout {dropout} bias {bias} fused {fused} dB {fused_db} \
         dA {fused_da} on {}",
        dev.describe()
    );
    let up = |rng: &mut StdRng, n: usize, s: f32| dev.upload(&random_vec::<bf16>(rng, n, s));
    let w = up(&mut rng, d_out * d_in, 0.5)?;
    let q = Nf4Weight::quantize(&w, d_out, d_in, 64, false)?;
    let (a, b) = (
        up(&mut rng, rank * d_in, 0.5)?,
        up(&mut rng, d_out * rank, 0.5)?,
    );
    let bias_buf = if bias {
        Some(up(&mut rng, d_out, 1.0)?)
    } else {
        None
    };
    let (x, dy) = (up(&mut rng, m * d_in, 1.0)?, up(&mut rng, m * d_out, 1.0)?);
    let config = LoraConfig {
        dropout,
        seed: rand::random(),
        ..LoraConfig::new(rank, 13.0)
    };
    let base = if nf4_base {
        LoraBase::Nf4(Box::new(Nf4Weight::quantize(&w, d_out, d_in, 64, false)?))
    } else {
        LoraBase::Dense(copy(dev, &w))
    };
    let path = match gemm {
        BaseGemm::Mma => LoraPath::Fused,
        BaseGemm::Wgmma => LoraPath::FusedWgmma,
    };
    let layer = LoraLinear::new(
        base,
        bias_buf.as_ref().map(|b| copy(dev, b)),
        copy(dev, &a),
        copy(dev, &b),
        config,
    )?
    .with_path(path)?
    .with_tile_loads(TileLoads::CpAsync)
    .with_nf4_decode(Nf4Decode::InTile)
    .with_fused_down(fused)
    .with_fused_v(fused)
    .with_fused_db(fused_db)
    .with_fused_da(fused_da);
    let (y, saved) = layer.forward(&x, m)?;
    let grads = layer.backward(&x, &saved, &dy)?;

    let sms = dev.sm_count();
    let poisoned_f32 = |n: usize| dev.alloc_poisoned::<f32>(n.max(1));
    let (mut u, mut y_raw) = (
        dev.alloc_poisoned::<bf16>(m * rank)?,
        dev.alloc_poisoned::<bf16>(m * d_out)?,
    );
    let down_splits = lora::k_split_count(m, d_in, sms);
    let mut down_partials = poisoned_f32(lora::raw::rank_partials_len(m, rank, down_splits))?;
    let layer_params = LoraParams {
        m: m as u32,
        d_in: d_in as u32,
        d_out: d_out as u32,
        rank: rank as u32,
        w: if nf4_base { std::ptr::null() } else { w.ptr() },
        nf4: if nf4_base {
            q.params()
        } else {
            Default::default()
        },
        bias: bias_buf.as_ref().map_or(std::ptr::null(), |b| b.ptr()),
        a: a.ptr(),
        b: b.ptr(),
        scale: config.scale(),
        dropout,
        seed: config.seed,
        ..LoraParams::default()
    };
    let forward = LoraParams {
        x: x.ptr(),
        u: u.ptr_mut(),
        y: y_raw.ptr_mut(),
        rank_partials: down_partials.ptr_mut() as *mut f32,
        k_splits: down_splits,
        ..layer_params
    };
    let s = stream(dev);
    // SAFETY: every buffer named is on dev and sized for the layer's shapes and m rows; the
    // partials as rank_partials_len says.
    unsafe {
        if layer.fused_down().is_some() {
            lora::raw::forward_fused_down(dev, s, DType::BF16, &forward)?;
        } else {
            lora::raw::down(dev, s, DType::BF16, &forward)?;
            lora::raw::forward(dev, s, DType::BF16, gemm, &forward)?;
        }
    }
    same_bits(&format!("{case}: u"), dev, &u, &saved.u);
    same_bits(&format!("{case}: y"), dev, &y_raw, &y);

    let (mut v, mut dx) = (
        dev.alloc_poisoned::<bf16>(m * rank)?,
        dev.alloc_poisoned::<bf16>(m * d_in)?,
    );
    let (mut da, mut db) = (poisoned_f32(rank * d_in)?, poisoned_f32(d_out * rank)?);
    let mut dbias = poisoned_f32(d_out)?;
    let v_splits = lora::k_split_count(m, d_out, sms);
    let mut v_partials = poisoned_f32(lora::raw::rank_partials_len(m, rank, v_splits))?;
    let (fused_da, fused_db) = (layer.fused_da(), layer.fused_db());
    let sizes = lora::raw::grad_partials(dev, m, d_in, d_out, rank, fused_da, fused_db);
    let mut partials = poisoned_f32(sizes.len)?;
    let mut bt = dev.alloc_poisoned::<bf16>(rank * d_out)?;
    let backward = LoraParams {
        x: x.ptr(),
        u: u.ptr_mut(),
        dy: dy.ptr(),
        v: v.ptr_mut(),
        dx: dx.ptr_mut(),
        rank_partials: v_partials.ptr_mut() as *mut f32,
        k_splits: v_splits,
        partials: partials.ptr_mut() as *mut f32,
        splits: sizes.splits,
        a_splits: sizes.a_splits,
        b_splits: sizes.b_splits,
        bt: bt.ptr_mut(),
        da: da.ptr_mut() as *mut f32,
        db: db.ptr_mut() as *mut f32,
        dbias: if bias {
            dbias.ptr_mut() as *mut f32
        } else {
            std::ptr::null_mut()
        },
        ..layer_params
    };
    // SAFETY: as above.
    unsafe {
        if layer.fused_v().is_some() {
            lora::raw::backward_dx_fused_v(dev, s, DType::BF16, &backward)?;
        } else {
            lora::raw::backward_v(dev, s, DType::BF16, &backward)?;
            lora::raw::backward_dx(dev, s, DType::BF16, gemm, &backward)?;
        }
        lora::raw::grads(dev, s, DType::BF16, &backward)?;
    }
    same_bits(&format!("{case}: dx"), dev, &dx, &grads.dx);
    same_bits(&format!("{case}: da"), dev, &da, &grads.da);
    same_bits(&format!("{case}: db"), dev, &db, &grads.db);
    assert_eq!(grads.dbias.is_some(), bias, "{case}: the layer's dbias");
    if let Some(safe) = &grads.dbias {
        same_bits(&format!("{case}: dbias"), dev, &dbias, safe);
    }

    if !nf4_base {
        let safe = layer.merged()?;
        let mut merged = dev.alloc_poisoned::<bf16>(d_out * d_in)?;
        let p = LoraParams {
            merged: merged.ptr_mut(),
            ..layer_params
        };
        // SAFETY: merged is [out, in]; W, A and B are the layer's shapes.
        unsafe { lora::raw::merge(dev, s, DType::BF16, &p)? };
        same_bits(&format!("{case}: merged"), dev, &merged, &safe);
    }
    Ok(())
}

#[test]
fn lora_raw_steps_match_the_layer() {
    for dev in backends() {
        let mut gemms = vec![BaseGemm::Mma];
        if dev.has_wgmma() {
            gemms.push(BaseGemm::Wgmma);
        }
        for gemm in gemms {
            for (nf4_base, dropout, bias) in [
                (false, 0.0, true),
                (false, 0.25, false),
                (true, 0.0, false),
                (true, 0.25, true),
            ] {
                lora_case(&dev, gemm, nf4_base, dropout, bias, (true, true, true)).unwrap();
                if gemm == BaseGemm::Wgmma {
                    // dA's and dB's partials each by the dX kernel or by the grads' kernels.
                    for fused_grads in [(false, true), (true, false), (false, false)] {
                        let (db, da) = fused_grads;
                        lora_case(&dev, gemm, nf4_base, dropout, bias, (true, db, da)).unwrap();
                    }
                    lora_case(&dev, gemm, nf4_base, dropout, bias, (false, false, false)).unwrap();
                }
            }
        }
    }
}

/// Every raw LoRA step refuses a pointer below the alignment its kernels need, whichever
/// pointer it is (inputs, outputs, workspaces; these addresses are never dereferenced: the
/// refusal comes before any launch).
#[test]
fn raw_lora_steps_refuse_misaligned_pointers() {
    use std::ffi::c_void;
    for dev in backends() {
        let base = LoraParams {
            m: 4,
            rank: 16,
            d_in: 64,
            d_out: 64,
            splits: 1,
            ..LoraParams::default()
        };
        let at = |addr: usize| addr as *mut c_void;
        // bf16 arrays off their 2 bytes, f32 ones off their 4, x_ext off its 16.
        let cases = [
            LoraParams {
                x: at(0x1001),
                ..base
            },
            LoraParams {
                w: at(0x1003),
                ..base
            },
            LoraParams {
                u: at(0x1005),
                ..base
            },
            LoraParams {
                dy: at(0x1007),
                ..base
            },
            LoraParams {
                dx: at(0x1001),
                ..base
            },
            LoraParams {
                da: at(0x1002).cast(),
                ..base
            },
            LoraParams {
                merged: at(0x1001),
                ..base
            },
            LoraParams {
                rank_partials: at(0x100a).cast(),
                ..base
            },
            LoraParams {
                x_ext: at(0x1008),
                ..base
            },
        ];
        for p in &cases {
            let t = DType::BF16;
            // SAFETY: refused before any launch.
            let refusals = unsafe {
                [
                    lora::raw::down(&dev, None, t, p),
                    lora::raw::forward(&dev, None, t, BaseGemm::Mma, p),
                    lora::raw::backward_v(&dev, None, t, p),
                    lora::raw::backward_dx(&dev, None, t, BaseGemm::Mma, p),
                    lora::raw::grads(&dev, None, t, p),
                    lora::raw::merge(&dev, None, t, p),
                ]
            };
            for (step, r) in refusals.into_iter().enumerate() {
                let err = r.unwrap_err();
                assert!(
                    matches!(err, Error::Misaligned { .. }),
                    "step {step}: {err}"
                );
            }
        }
    }
}

/// The workspace sizes a framework allocates by saturate rather than wrap: partials whose
/// count overflows usize ask for usize::MAX elements, which every backend refuses with a
/// typed error (a wrapped count had been a buffer too small for what the kernels write), and
/// rows past u32 get at least the row tiles of u32::MAX rows (2^32 + 5 rows had wrapped to 5:
/// one tile).
#[test]
fn raw_workspace_sizes_saturate_rather_than_wrap() {
    assert_eq!(
        lora::raw::rank_partials_len(usize::MAX / 2, 3, 4),
        usize::MAX
    );
    let tiles_of_u32_rows = u32::MAX.div_ceil(params::FK_WGMMA_TILE_M);
    for dev in backends() {
        let huge = 1usize << 60;
        let sizes = lora::raw::grad_partials(&dev, 1 << 20, huge, huge, 256, false, false);
        assert_eq!(sizes.len, usize::MAX, "{dev:?}");
        let err = dev.alloc_output::<f32>(sizes.len).err();
        assert!(
            matches!(
                err,
                Some(Error::InvalidArgument {
                    what: "buffer length",
                    ..
                })
            ),
            "{dev:?}: {err:?}"
        );
        let past_u32 = lora::raw::grad_partials(&dev, (1 << 32) + 5, 64, 64, 4, true, true);
        assert_eq!(
            (past_u32.a_splits, past_u32.b_splits),
            (tiles_of_u32_rows, tiles_of_u32_rows),
            "{dev:?}"
        );
    }
}

#[test]
fn raw_entry_points_refuse_what_they_cannot_run() {
    for dev in backends() {
        let p = LoraParams {
            m: 4,
            ..LoraParams::default()
        };
        // SAFETY: each call is refused before any launch.
        unsafe {
            let err = lora::raw::down(&dev, None, DType::F32, &p).unwrap_err();
            assert!(matches!(err, Error::UnsupportedDtype { .. }), "{err}");
            if !dev.has_wgmma() {
                let err =
                    lora::raw::forward(&dev, None, DType::BF16, BaseGemm::Wgmma, &p).unwrap_err();
                assert!(matches!(err, Error::Unsupported { .. }), "{err}");
            }
            // u in the GEMM: no dropout, ranks 1 to 32, and wgmma.
            for (rank, dropout) in [(16, 0.1), (33, 0.0), (0, 0.0)] {
                let p = LoraParams { rank, dropout, ..p };
                let err = lora::raw::forward_fused_down(&dev, None, DType::BF16, &p).unwrap_err();
                assert!(
                    matches!(err, Error::InvalidArgument { .. }),
                    "rank {rank}, p {dropout}: {err}"
                );
            }
            let p = LoraParams { rank: 16, ..p };
            let err = lora::raw::forward_fused_down(&dev, None, DType::F32, &p).unwrap_err();
            assert!(matches!(err, Error::UnsupportedDtype { .. }), "{err}");
            if !dev.has_wgmma() {
                let err = lora::raw::forward_fused_down(&dev, None, DType::BF16, &p).unwrap_err();
                assert!(matches!(err, Error::Unsupported { .. }), "{err}");
            }
            // dX alone makes no partials: grads must not be told to skip their kernels.
            for (a_splits, b_splits) in [(1, 0), (0, 1)] {
                let p = LoraParams {
                    a_splits,
                    b_splits,
                    ..p
                };
                let err =
                    lora::raw::backward_dx(&dev, None, DType::BF16, BaseGemm::Mma, &p).unwrap_err();
                assert!(
                    matches!(err, Error::InvalidArgument { .. }),
                    "a_splits {a_splits}, b_splits {b_splits}: {err}"
                );
            }
            // v in the dX GEMM: ranks 1 to 32 (dropout or not), and wgmma.
            for rank in [33, 0] {
                let p = LoraParams { rank, ..p };
                let err = lora::raw::backward_dx_fused_v(&dev, None, DType::BF16, &p).unwrap_err();
                assert!(
                    matches!(err, Error::InvalidArgument { .. }),
                    "rank {rank}: {err}"
                );
            }
            let err = lora::raw::backward_dx_fused_v(&dev, None, DType::F32, &p).unwrap_err();
            assert!(matches!(err, Error::UnsupportedDtype { .. }), "{err}");
            if !dev.has_wgmma() {
                let err = lora::raw::backward_dx_fused_v(&dev, None, DType::BF16, &p).unwrap_err();
                assert!(matches!(err, Error::Unsupported { .. }), "{err}");
            } else {
                // dB or dA partials other than one per 128 rows (4 rows: one), no Bᵀ
                // workspace, dA's partials without x.
                let mut bt = dev.alloc_poisoned::<bf16>(16).unwrap();
                let x = dev.alloc_poisoned::<bf16>(16).unwrap();
                let p = LoraParams {
                    bt: bt.ptr_mut(),
                    x: x.ptr(),
                    w: x.ptr(), // a dense base: the NF4 one's checks come first
                    ..p
                };
                for (case, p) in [
                    ("b_splits 2", LoraParams { b_splits: 2, ..p }),
                    ("a_splits 2", LoraParams { a_splits: 2, ..p }),
                    (
                        "no bt",
                        LoraParams {
                            b_splits: 1,
                            bt: std::ptr::null_mut(),
                            ..p
                        },
                    ),
                    (
                        "dA without x",
                        LoraParams {
                            a_splits: 1,
                            x: std::ptr::null(),
                            ..p
                        },
                    ),
                ] {
                    let err =
                        lora::raw::backward_dx_fused_v(&dev, None, DType::BF16, &p).unwrap_err();
                    assert!(
                        matches!(err, Error::InvalidArgument { .. }),
                        "{case}: {err}"
                    );
                }
            }
        }
        // grads over no row ranges; x_ext's rows shorter than x's, the rank's and the ones
        // column; split counts for an empty layer (no division by zero).
        let mut ext = dev.alloc_poisoned::<bf16>(64).unwrap();
        let p = LoraParams {
            m: 4,
            rank: 4,
            d_in: 8,
            d_out: 8,
            ..LoraParams::default()
        };
        // SAFETY: each call is refused before any launch.
        unsafe {
            let err = lora::raw::grads(&dev, None, DType::BF16, &p).unwrap_err();
            assert!(matches!(err, Error::InvalidArgument { .. }), "{err}");
            for x_ld in [12, 1 << 33] {
                let p = LoraParams {
                    x_ext: ext.ptr_mut(),
                    x_ld,
                    ..p
                };
                let err = lora::raw::down(&dev, None, DType::BF16, &p).unwrap_err();
                assert!(
                    matches!(err, Error::InvalidArgument { .. }),
                    "x_ld {x_ld}: {err}"
                );
            }
        }
        assert!(lora::k_split_count(0, 4096, dev.sm_count()) >= 1);
        let empty = lora::raw::grad_partials(&dev, 0, 0, 0, 4, false, false);
        assert!(empty.splits >= 1 && empty.len == 0, "{empty:?}");
        if let Device::Emu(_) = dev {
            let mut out = dev.alloc_poisoned::<u8>(16).unwrap();
            let params = DropoutMaskParams {
                keep: out.ptr_mut() as *mut u8,
                n: 16,
                seed: 1,
                p: 0.5,
            };
            // SAFETY: refused before any launch: the emulator has no streams.
            let err =
                unsafe { philox::raw::dropout_mask(&dev, Some(std::ptr::null_mut()), &params) }
                    .unwrap_err();
            assert!(
                matches!(err, Error::InvalidArgument { what: "stream", .. }),
                "{err}"
            );
        }
    }
}

/// `lora::raw::down` writes the whole tail of x_ext's rows however far apart they are: here
/// 2²⁵ + 17 elements (a 32-bit count over a block's 128 rows of them wraps); and refuses a
/// rank outside 1 to 256 (at 0 it would launch no block and leave x_ext unwritten).
#[test]
fn raw_down_writes_the_tail_of_rows_far_apart() {
    for dev in backends() {
        let mut rng = StdRng::seed_from_u64(rand::random());
        let (d_in, rank) = (8, 8);
        let x_ld = d_in + rank + (1 << 25) + 1;
        let x = dev
            .upload(&random_vec::<bf16>(&mut rng, d_in, 1.0))
            .unwrap();
        let a = dev
            .upload(&random_vec::<bf16>(&mut rng, rank * d_in, 0.1))
            .unwrap();
        let mut u = dev.alloc_poisoned::<bf16>(rank).unwrap();
        let mut x_ext = dev.alloc_poisoned::<bf16>(x_ld).unwrap();
        let p = LoraParams {
            m: 1,
            rank: rank as u32,
            d_in: d_in as u32,
            d_out: 8,
            x: x.ptr(),
            a: a.ptr(),
            u: u.ptr_mut(),
            scale: 1.0,
            k_splits: 1,
            x_ext: x_ext.ptr_mut(),
            x_ld: x_ld as u64,
            ..LoraParams::default()
        };
        for bad in [0, LoraConfig::MAX_RANK as u32 + 1] {
            // SAFETY: refused before any launch.
            let err =
                unsafe { lora::raw::down(&dev, None, DType::BF16, &LoraParams { rank: bad, ..p }) }
                    .unwrap_err();
            assert!(
                matches!(
                    err,
                    Error::InvalidArgument {
                        what: "lora raw rank",
                        ..
                    }
                ),
                "{err}"
            );
        }
        // SAFETY: x [1, 8], a [8, 8], u [1, 8] and x_ext [1, x_ld] on dev.
        unsafe { lora::raw::down(&dev, None, DType::BF16, &p) }.unwrap();
        let row = x_ext.to_host().unwrap();
        assert_eq!(&row[..d_in], &x.to_host().unwrap()[..], "x's part");
        assert_eq!(row[d_in + rank], bf16::ONE, "the ones column");
        let stale = row[d_in + rank + 1..]
            .iter()
            .filter(|v| v.to_bits() != 0)
            .count();
        assert_eq!(stale, 0, "{stale} of the padding's elements not zero");
    }
}

/// Every raw sparse and Philox entry point refuses a pointer below the alignment of the
/// element its kernel accesses through it (its dtype's size, the index width, 4 for the f32
/// state and Philox's u32 words), at every misaligned offset, pointer by pointer, for every
/// dtype pair and width (these addresses are never dereferenced: the refusal comes before
/// any launch); and accepts one aligned to exactly that: a bf16 weight 2 bytes past a 4-byte
/// boundary under the atomic path's 16-bit CAS.
#[test]
fn raw_sparse_and_philox_refuse_misaligned_pointers() {
    /// A pointer's name, its setter and the alignment it needs.
    type Pointer<'a, P> = (&'a str, fn(&mut P, usize), usize);
    /// Each pointer of `base` (set by its setter) at every offset from 0x1000 below its
    /// alignment: `call` must refuse it with `Error::Misaligned`.
    fn refuse_each<P: Copy>(
        what: &str,
        base: P,
        pointers: &[Pointer<P>],
        call: impl Fn(&P) -> Result<()>,
    ) {
        for &(name, set, align) in pointers {
            for offset in 1..align {
                let mut p = base;
                set(&mut p, 0x1000 + offset);
                let err = call(&p).unwrap_err();
                assert!(
                    matches!(err, Error::Misaligned { .. }),
                    "{what} {name} at 0x1000 + {offset}: {err}"
                );
            }
        }
    }
    for dev in backends() {
        for (a, b) in sparse::DTYPE_PAIRS {
            for (width, index) in [(IndexWidth::U32, 4), (IndexWidth::U64, 8)] {
                let case = format!("({a}, {b}, {width:?})");
                let (a_size, b_size) = (a.size(), b.size());
                let base = ScatterAddParams {
                    n: 4,
                    numel: 16,
                    alpha: 1.0,
                    ..ScatterAddParams::default()
                };
                for atomic in [false, true] {
                    refuse_each(
                        &format!("scatter_add (atomic {atomic}) {case}"),
                        base,
                        &[
                            ("w", |p, x| p.w = x as _, a_size),
                            ("values", |p, x| p.values = x as _, b_size),
                            ("indices", |p, x| p.indices = x as _, index),
                        ],
                        // SAFETY: refused before any launch.
                        |p| unsafe { sparse::raw::scatter_add(&dev, None, a, b, width, atomic, p) },
                    );
                }

                let base = SegmentedScatterAddParams {
                    segments: 4,
                    numel: 16,
                    alpha: 1.0,
                    ..SegmentedScatterAddParams::default()
                };
                refuse_each(
                    &format!("segmented_scatter_add {case}"),
                    base,
                    &[
                        ("w", |p, x| p.w = x as _, a_size),
                        ("values", |p, x| p.values = x as _, b_size),
                        ("targets", |p, x| p.targets = x as _, index),
                        ("starts", |p, x| p.starts = x as _, index),
                        ("order", |p, x| p.order = x as _, index),
                    ],
                    // SAFETY: refused before any launch.
                    |p| unsafe { sparse::raw::segmented_scatter_add(&dev, None, a, b, width, p) },
                );

                let base = GatherParams {
                    n: 4,
                    numel: 16,
                    ..GatherParams::default()
                };
                refuse_each(
                    &format!("gather {case}"),
                    base,
                    &[
                        ("src", |p, x| p.src = x as _, a_size),
                        ("out", |p, x| p.out = x as _, b_size),
                        ("indices", |p, x| p.indices = x as _, index),
                    ],
                    // SAFETY: refused before any launch.
                    |p| unsafe { sparse::raw::gather(&dev, None, a, b, width, p) },
                );

                let base = SparseAdamwParams {
                    n: 4,
                    numel: 16,
                    ..SparseAdamwParams::default()
                };
                refuse_each(
                    &format!("sparse_adamw {case}"),
                    base,
                    &[
                        ("w", |p, x| p.w = x as _, a_size),
                        ("grad", |p, x| p.grad = x as _, b_size),
                        ("indices", |p, x| p.indices = x as _, index),
                        ("base", |p, x| p.base = x as _, 4),
                        ("delta", |p, x| p.delta = x as _, 4),
                        ("exp_avg", |p, x| p.exp_avg = x as _, 4),
                        ("exp_avg_sq", |p, x| p.exp_avg_sq = x as _, 4),
                    ],
                    // SAFETY: refused before any launch.
                    |p| unsafe { sparse::raw::sparse_adamw(&dev, None, a, b, width, p) },
                );
            }
        }

        let base = PhiloxParams {
            blocks: 4,
            ..PhiloxParams::default()
        };
        refuse_each(
            "philox random_words",
            base,
            &[("out", |p, x| p.out = x as _, 4)],
            // SAFETY: refused before any launch.
            |p| unsafe { philox::raw::random_words(&dev, None, p) },
        );

        // Exactly the element's alignment is enough: a bf16 weight at 2 mod 4 bytes through
        // the atomic path (a 16-bit CAS on the element itself), against the safe call.
        let mut rng = StdRng::seed_from_u64(rand::random());
        let (numel, n) = (1031usize, 257usize);
        let (support, w0) = support_and_weight(&dev, &mut rng, numel + 1, n);
        let support: Vec<u32> = support.into_iter().filter(|&i| i < numel as u32).collect();
        let values = dev
            .upload(&random_vec::<f32>(&mut rng, support.len(), 1.0))
            .unwrap();
        let index = SparseIndex::with_width(&dev, &support, numel as u64, IndexWidth::U32).unwrap();
        let w0_host = w0.to_host().unwrap();
        let mut safe = dev.upload(&w0_host[1..]).unwrap();
        sparse::scatter_add_atomic(&mut safe, &index, &values, 0.5).unwrap();
        let mut raw = copy(&dev, &w0);
        let indices = dev.upload(&support).unwrap();
        let p = ScatterAddParams {
            w: raw.ptr_mut().cast::<u8>().wrapping_add(2).cast(),
            values: values.ptr(),
            indices: indices.ptr(),
            n: support.len() as u64,
            numel: numel as u64,
            alpha: 0.5,
        };
        assert_eq!(p.w as usize % 4, 2, "the weight starts 2 bytes past a word");
        // SAFETY: raw holds numel + 1 bf16, so numel from its second; the indices are
        // unique and < numel; values are sized.
        unsafe {
            sparse::raw::scatter_add(
                &dev,
                None,
                DType::BF16,
                DType::F32,
                IndexWidth::U32,
                true,
                &p,
            )
            .unwrap()
        };
        let raw = raw.to_host().unwrap();
        assert_eq!(raw[0].to_bits(), w0_host[0].to_bits(), "the element before");
        let bad = bit_mismatches(&raw[1..], &safe.to_host().unwrap()).len();
        assert!(
            bad == 0,
            "{}: {bad} of {numel} elements differ",
            dev.describe()
        );
    }
}
