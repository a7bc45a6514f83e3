//! PEFT interop: an adapter PEFT wrote (tests/data/lora, made by make_peft_adapter.py) loads
//! here and, through the reference forward, gives PEFT's outputs; the merge gives PEFT's
//! `merge_and_unload()` weights; adapters round-trip; bad files are typed errors naming the
//! problem; `fk merge` runs the library merge.

use finetune_kernels::dtype::DType;
use finetune_kernels::files::read_file;
use finetune_kernels::lora::adapter::{
    merge_checkpoint, Adapter, AdapterConfig, LoraFactors, TargetModules, CONFIG_FILE, KEY_PREFIX,
    WEIGHTS_FILE,
};
use finetune_kernels::nf4::checkpoint::{write_atomic, Checkpoint, RawTensor};
use finetune_kernels::reference::lora::{LoraConfig, LoraLayer};
use finetune_kernels::reference::nf4::{self, Absmax};
use finetune_kernels::testing::{bit_mismatches, fresh_dir, random_vec, rel_l2};
use finetune_kernels::{bf16, f16, Error};
use rand::{rngs::StdRng, SeedableRng};
use safetensors::Dtype;
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// f32 PEFT on the CPU against the f64 reference rounded to f32: a few f32 roundings of
/// sums of at most 37 products, so about 1e-7 relative; 1e-6 leaves room.
const PEFT_TOLERANCE: f64 = 1e-6;

/// The `fk` binary cargo built with this test, or, where the test runs elsewhere (the GPU
/// check's bundle), the `fk` beside the test executable.
fn fk_binary() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_BIN_EXE_fk"));
    if built.exists() {
        return built;
    }
    let exe = std::env::current_exe().unwrap();
    exe.with_file_name("fk")
}

fn data(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/lora")
        .join(path)
}

/// A fresh, empty directory under target/tmp.
fn scratch(name: &str) -> PathBuf {
    fresh_dir(
        Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("lora")
            .join(name),
    )
}

/// Every tensor of a safetensors file, owned.
fn tensors(path: &Path) -> BTreeMap<String, RawTensor<'static>> {
    let bytes = read_file(path).unwrap();
    let ckpt = Checkpoint::parse(&bytes, &path.display().to_string()).unwrap();
    ckpt.tensors
        .into_iter()
        .map(|(k, t)| {
            let owned = RawTensor {
                data: Cow::Owned(t.data.into_owned()),
                ..t
            };
            (k, owned)
        })
        .collect()
}

fn f32s(t: &BTreeMap<String, RawTensor>, name: &str) -> Vec<f32> {
    assert_eq!(t[name].dtype, Dtype::F32, "{name}");
    t[name].values()
}

#[test]
fn peft_adapters_give_peft_outputs() {
    let base = tensors(&data("base.safetensors"));
    let (w_up, b_up, w_down) = (
        f32s(&base, "up.weight"),
        f32s(&base, "up.bias"),
        f32s(&base, "block.down.weight"),
    );
    for (name, r, alpha, rslora, dropout) in
        [("plain", 5, 7.0, false, 0.1), ("rslora", 3, 6.0, true, 0.0)]
    {
        let adapter = Adapter::load(&data(name)).unwrap();
        let c = &adapter.config;
        assert_eq!(
            (c.r, c.lora_alpha, c.use_rslora, c.lora_dropout),
            (r, alpha, rslora, dropout)
        );
        assert_eq!(
            adapter.modules.keys().collect::<Vec<_>>(),
            ["block.down", "up"]
        );
        let io = tensors(&data(&format!("{name}/io.safetensors")));
        let (x, h, y) = (f32s(&io, "x"), f32s(&io, "h"), f32s(&io, "y"));
        // Eval mode (no dropout seed): PEFT's outputs have dropout off.
        let up = adapter.layer("up", &w_up, Some(&b_up), None).unwrap();
        let h_ours = up.forward(&x, 6).unwrap().y;
        // The second layer from PEFT's own h, so each layer is checked on its own.
        let down = adapter.layer("block.down", &w_down, None, None).unwrap();
        let y_ours = down.forward(&h, 6).unwrap().y;
        let (eh, ey) = (rel_l2(&h_ours, &h), rel_l2(&y_ours, &y));
        eprintln!("{name}: rel error h {eh:.1e}, y {ey:.1e}");
        assert!(
            eh <= PEFT_TOLERANCE && ey <= PEFT_TOLERANCE,
            "{name}: {eh} {ey}"
        );
        // The LoRA term is as large as the base term: a wrong scale or factor would show.
        let zero_b = vec![0.0f32; up.b.len()];
        let base_only = LoraLayer { b: &zero_b, ..up };
        assert!(rel_l2(&base_only.forward(&x, 6).unwrap().y, &h) > 0.1);
    }
}

#[test]
fn merge_gives_peft_merge_and_unload() {
    for name in ["plain", "rslora"] {
        let adapter = Adapter::load(&data(name)).unwrap();
        let out = scratch(&format!("merge-{name}")).join("merged.safetensors");
        let summary = merge_checkpoint(&data("base.safetensors"), &adapter, &out).unwrap();
        assert_eq!(summary.merged, ["block.down.weight", "up.weight"]);
        assert_eq!(summary.copied, 2);
        let (ours, peft) = (
            tensors(&out),
            tensors(&data(&format!("{name}/merged.safetensors"))),
        );
        assert_eq!(
            ours.keys().collect::<Vec<_>>(),
            peft.keys().collect::<Vec<_>>()
        );
        for key in ["up.weight", "block.down.weight"] {
            let e = rel_l2(&f32s(&ours, key), &f32s(&peft, key));
            assert!(e <= PEFT_TOLERANCE, "{name} {key}: {e}");
        }
        // Copied through byte for byte: a float bias and an int64 buffer.
        let base = tensors(&data("base.safetensors"));
        for key in ["up.bias", "position_ids"] {
            assert_eq!(ours[key], base[key], "{key}");
        }
    }
}

#[test]
fn adapters_round_trip() {
    // PEFT's files: the re-save has the same tensors, byte for byte, and the same config.
    // The directory stays in target/tmp/lora/plain for make_peft_adapter.py --verify.
    let peft = Adapter::load(&data("plain")).unwrap();
    let dir = scratch("plain");
    peft.save(&dir).unwrap();
    assert_eq!(Adapter::load(&dir).unwrap(), peft);
    assert_eq!(
        tensors(&dir.join(WEIGHTS_FILE)),
        tensors(&data("plain").join(WEIGHTS_FILE))
    );

    // One made here: bf16 factors, a fractional alpha, a regex target, rsLoRA.
    let mut rng = StdRng::seed_from_u64(rand::random());
    let factors = |d_in: usize, d_out: usize, rng: &mut StdRng| {
        let round = |v: Vec<bf16>| v.into_iter().map(f32::from).collect();
        LoraFactors {
            a: round(random_vec(rng, 4 * d_in, 1.0)),
            b: round(random_vec(rng, d_out * 4, 1.0)),
            d_in,
            d_out,
            dtype: DType::BF16,
        }
    };
    let ours = Adapter {
        config: AdapterConfig {
            r: 4,
            lora_alpha: 12.5,
            use_rslora: true,
            lora_dropout: 0.05,
            target_modules: Some(TargetModules::Pattern(r".*\.(q|v)_proj".into())),
            base_model_name_or_path: Some("org/model".into()),
            task_type: Some("CAUSAL_LM".into()),
        },
        modules: BTreeMap::from([
            (
                "model.layers.0.self_attn.q_proj".into(),
                factors(33, 17, &mut rng),
            ),
            (
                "model.layers.0.self_attn.v_proj".into(),
                factors(33, 5, &mut rng),
            ),
        ]),
    };
    let dir = scratch("ours");
    ours.save(&dir).unwrap();
    assert_eq!(Adapter::load(&dir).unwrap(), ours);

    // A rank past what LoraLinear takes: adapters on disk take any rank, as PEFT does.
    let r = LoraConfig::MAX_RANK + 44;
    let wide = Adapter {
        config: AdapterConfig {
            r,
            ..ours.config.clone()
        },
        modules: BTreeMap::from([(
            "model.layers.0.mlp.up_proj".into(),
            LoraFactors {
                a: vec![0.5; r * 3],
                b: vec![-0.25; 2 * r],
                d_in: 3,
                d_out: 2,
                dtype: DType::F32,
            },
        )]),
    };
    let wide_dir = scratch("wide");
    wide.save(&wide_dir).unwrap();
    assert_eq!(Adapter::load(&wide_dir).unwrap(), wide);
    let saved = tensors(&dir.join(WEIGHTS_FILE));
    let key = format!("{KEY_PREFIX}model.layers.0.self_attn.v_proj.lora_B.weight");
    assert_eq!(
        (saved[&key].dtype, saved[&key].shape.as_slice()),
        (Dtype::BF16, &[5, 4][..])
    );
}

#[test]
fn merge_into_bf16_base_and_nf4_copied_through() {
    let mut rng = StdRng::seed_from_u64(rand::random());
    let adapter = Adapter::load(&data("rslora")).unwrap();
    let dir = scratch("bf16-base");
    let (base_path, out) = (dir.join("base.safetensors"), dir.join("out.safetensors"));
    let f32_base = tensors(&data("base.safetensors"));
    let mut base: Vec<(String, RawTensor)> = Vec::new();
    for key in ["up.weight", "block.down.weight"] {
        let w: Vec<bf16> = f32s(&f32_base, key)
            .into_iter()
            .map(bf16::from_f32)
            .collect();
        let t = RawTensor {
            dtype: Dtype::BF16,
            shape: f32_base[key].shape.clone(),
            data: Cow::Owned(bytemuck::cast_slice(&w).to_vec()),
        };
        base.push((key.to_string(), t));
    }
    // An NF4 weight of a module the adapter does not touch rides along unchanged.
    let other: Vec<f32> = random_vec(&mut rng, 64 * 3, 1.0);
    let q = nf4::quantize(&other, &[3, 64], 64, true).unwrap();
    let mut ckpt = Checkpoint {
        nf4: BTreeMap::from([("lm_head.weight".to_string(), q.clone())]),
        ..Default::default()
    };
    ckpt.tensors.extend(base.iter().cloned());
    ckpt.save(&base_path).unwrap();

    let summary = merge_checkpoint(&base_path, &adapter, &out).unwrap();
    assert_eq!(summary.copied, 1);
    let bytes = read_file(&out).unwrap();
    let merged = Checkpoint::parse(&bytes, "out").unwrap();
    assert_eq!(merged.nf4["lm_head.weight"], q);
    let scale = 6.0 / 3f64.sqrt();
    for (key, module) in [("up.weight", "up"), ("block.down.weight", "block.down")] {
        let f = &adapter.modules[module];
        let w: Vec<bf16> = base.iter().find(|(k, _)| k == key).unwrap().1.values();
        // W + scale · B A in f64, independently of the library's matrix code.
        let expected: Vec<bf16> = (0..f.d_out * f.d_in)
            .map(|k| {
                let (o, i) = (k / f.d_in, k % f.d_in);
                let ba: f64 = (0..3)
                    .map(|j| f.b[o * 3 + j] as f64 * f.a[j * f.d_in + i] as f64)
                    .sum();
                bf16::from_f32((w[k].to_f32() as f64 + (scale as f32) as f64 * ba) as f32)
            })
            .collect();
        let got: Vec<bf16> = merged.tensors[key].values();
        assert_eq!(merged.tensors[key].dtype, Dtype::BF16);
        assert!(bit_mismatches(&got, &expected).is_empty(), "{key}");
    }
}

/// Copies tests/data/lora/plain to a scratch directory, with `edit` applied to its config
/// and `tensors` to its tensors, and loads it.
fn load_edited(
    name: &str,
    edit: impl FnOnce(&mut serde_json::Value),
    tensors_edit: impl FnOnce(&mut BTreeMap<String, RawTensor<'static>>),
) -> Result<Adapter, Error> {
    let dir = scratch(&format!("bad-{name}"));
    let mut config: serde_json::Value =
        serde_json::from_slice(&read_file(&data("plain").join(CONFIG_FILE)).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(dir.join(CONFIG_FILE), config.to_string()).unwrap();
    let mut t = tensors(&data("plain").join(WEIGHTS_FILE));
    tensors_edit(&mut t);
    write_atomic(&dir.join(WEIGHTS_FILE), t, None).unwrap();
    Adapter::load(&dir)
}

fn set(key: &'static str, value: serde_json::Value) -> impl FnOnce(&mut serde_json::Value) {
    move |c| c[key] = value
}

fn unchanged<T>(_: &mut T) {}

const UP_A: &str = "base_model.model.up.lora_A.weight";
const UP_B: &str = "base_model.model.up.lora_B.weight";

#[test]
fn unsupported_configs_are_refused_by_name() {
    use serde_json::json;
    for (key, value) in [
        ("fan_in_fan_out", json!(true)),
        ("use_dora", json!(true)),
        ("lora_bias", json!(true)),
        ("rank_pattern", json!({"up": 4})),
        ("alpha_pattern", json!({"up": 4})),
        ("modules_to_save", json!(["classifier"])),
        ("layer_replication", json!([[0, 1]])),
        ("bias", json!("lora_only")),
        ("init_lora_weights", json!("pissa_niter_4")),
        ("init_lora_weights", json!("loftq")),
        ("peft_type", json!("IA3")),
    ] {
        match load_edited(key, set(key, value.clone()), unchanged) {
            Err(Error::Unsupported { why, .. }) => assert!(why.contains(key), "{why}"),
            other => panic!("{key} = {value}: {other:?}"),
        }
    }
    // Defaults written out explicitly are fine.
    for (key, value) in [
        ("use_dora", json!(false)),
        ("modules_to_save", json!([])),
        ("init_lora_weights", json!("gaussian")),
        ("bias", json!("none")),
    ] {
        load_edited(key, set(key, value), unchanged).unwrap();
    }
}

/// The error is `Error::Checkpoint` and its message contains every fragment.
fn assert_checkpoint_error(r: Result<Adapter, Error>, fragments: &[&str]) {
    match r {
        Err(e @ Error::Checkpoint { .. }) => {
            let msg = e.to_string();
            for f in fragments {
                assert!(msg.contains(f), "{msg:?} lacks {f:?}");
            }
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn bad_configs_are_typed_errors() {
    use serde_json::json;
    let dir = scratch("bad-json");
    std::fs::copy(data("plain").join(WEIGHTS_FILE), dir.join(WEIGHTS_FILE)).unwrap();
    std::fs::write(dir.join(CONFIG_FILE), "{\"r\": 5,").unwrap();
    assert_checkpoint_error(Adapter::load(&dir), &[CONFIG_FILE, "not valid JSON"]);
    std::fs::remove_file(dir.join(CONFIG_FILE)).unwrap();
    assert!(matches!(Adapter::load(&dir), Err(Error::Io { .. })));

    let remove = |key: &'static str| {
        move |c: &mut serde_json::Value| {
            c.as_object_mut().unwrap().remove(key);
        }
    };
    assert_checkpoint_error(
        load_edited("no-type", remove("peft_type"), unchanged),
        &["peft_type"],
    );
    assert_checkpoint_error(load_edited("no-r", remove("r"), unchanged), &["no r"]);
    for (name, key, value) in [
        ("r-zero", "r", json!(0)),
        ("r-text", "r", json!("five")),
        ("alpha-text", "lora_alpha", json!("x")),
        ("rslora-int", "use_rslora", json!(1)),
        ("targets", "target_modules", json!([1, 2])),
    ] {
        assert_checkpoint_error(load_edited(name, set(key, value), unchanged), &[key]);
    }
    // The config's rank against the tensors' (r = 4, tensors of rank 5).
    assert_checkpoint_error(
        load_edited("r-mismatch", set("r", json!(4)), unchanged),
        &["lora_A.weight", "rank 5", "r = 4"],
    );
    assert_checkpoint_error(
        load_edited("alpha-inf", set("lora_alpha", json!(1e300)), unchanged),
        &[CONFIG_FILE, "lora_alpha 1e300", "scale inf"],
    );
    assert_checkpoint_error(
        load_edited("dropout-1", set("lora_dropout", json!(1.0)), unchanged),
        &[CONFIG_FILE, "lora_dropout 1.0", "not in [0, 1)"],
    );
}

#[test]
fn bad_tensors_are_typed_errors_naming_the_tensor() {
    assert_checkpoint_error(
        load_edited("no-b", unchanged, |t| {
            t.remove(UP_B);
        }),
        &[UP_B, "missing"],
    );
    assert_checkpoint_error(
        load_edited("no-a", unchanged, |t| {
            t.remove(UP_A);
        }),
        &[UP_A, "missing"],
    );
    // B of rank 6 against A of rank 5.
    assert_checkpoint_error(
        load_edited("rank", unchanged, |t| {
            let b = t.get_mut(UP_B).unwrap();
            b.shape = vec![29, 6];
            b.data = Cow::Owned(vec![0; 29 * 6 * 4]);
        }),
        &[UP_B, "rank 6", "rank 5"],
    );
    // B in bf16 against A in f32: a module has one dtype.
    assert_checkpoint_error(
        load_edited("mixed", unchanged, |t| {
            let b = t.get_mut(UP_B).unwrap();
            let n = b.shape.iter().product::<usize>();
            b.dtype = Dtype::BF16;
            b.data = Cow::Owned(vec![0; n * 2]);
        }),
        &[UP_B, "bf16", "f32"],
    );
    assert_checkpoint_error(
        load_edited("dora", unchanged, |t| {
            let m = RawTensor {
                dtype: Dtype::F32,
                shape: vec![29],
                data: Cow::Owned(vec![0; 29 * 4]),
            };
            t.insert("base_model.model.up.lora_magnitude_vector".into(), m);
        }),
        &["lora_magnitude_vector", "DoRA"],
    );
    assert_checkpoint_error(
        load_edited("one-d", unchanged, |t| {
            t.get_mut(UP_A).unwrap().shape = vec![5 * 37];
        }),
        &[UP_A, "matrix"],
    );
    assert_checkpoint_error(
        load_edited("int", unchanged, |t| {
            let a = t.get_mut(UP_A).unwrap();
            a.dtype = Dtype::I32;
        }),
        &[UP_A, "I32"],
    );
    assert_checkpoint_error(
        load_edited("prefix", unchanged, |t| {
            let a = t.remove(UP_A).unwrap();
            t.insert("up.lora_A.weight".into(), a);
        }),
        &["up.lora_A.weight", KEY_PREFIX],
    );
    assert_checkpoint_error(
        load_edited("empty", unchanged, BTreeMap::clear),
        &["no LoRA tensors"],
    );
}

#[test]
fn merge_errors_name_the_weight() {
    let adapter = Adapter::load(&data("plain")).unwrap();
    let dir = scratch("merge-bad");
    let out = dir.join("out.safetensors");
    let base = tensors(&data("base.safetensors"));
    let write = |edit: &dyn Fn(&mut BTreeMap<String, RawTensor<'static>>)| {
        let mut t = base.clone();
        edit(&mut t);
        let path = dir.join("base.safetensors");
        write_atomic(&path, t, None).unwrap();
        merge_checkpoint(&path, &adapter, &out)
    };
    let checkpoint_error = |r: Result<_, Error>, key: &str, what: &str| match r {
        Err(e @ Error::Checkpoint { .. }) => {
            let msg = e.to_string();
            assert!(msg.contains(key) && msg.contains(what), "{msg}");
        }
        other => panic!("{other:?}"),
    };
    checkpoint_error(
        write(&|t| {
            t.remove("up.weight");
        }),
        "up.weight",
        "sharded checkpoint",
    );
    checkpoint_error(
        write(&|t| t.get_mut("up.weight").unwrap().shape = vec![37, 29]),
        "up.weight",
        "[29, 37]",
    );
    checkpoint_error(
        write(&|t| t.get_mut("up.weight").unwrap().dtype = Dtype::I32),
        "up.weight",
        "I32",
    );
    assert!(!out.exists(), "a failed merge wrote its output");
    // An NF4 weight of the wrong shape.
    let w: Vec<f32> = f32s(&base, "up.weight");
    let ckpt = Checkpoint {
        nf4: BTreeMap::from([(
            "up.weight".to_string(),
            nf4::quantize(&w, &[37, 29], 64, false).unwrap(),
        )]),
        ..Default::default()
    };
    let path = dir.join("nf4.safetensors");
    ckpt.save(&path).unwrap();
    checkpoint_error(
        merge_checkpoint(&path, &adapter, &out),
        "up.weight",
        "[29, 37]",
    );
    assert!(!out.exists(), "a failed merge wrote its output");
}

/// Adapted NF4 weights merge as PEFT merges into bitsandbytes' `Linear4bit`: dequantized to
/// their dtype, plus `scale · B A` in f32, quantized again with their blocksize and double
/// quantization, keeping their dtype; the summary reports the error the requantization
/// added. Two weights: bf16 with double quantization (1,073 elements: a partial last block),
/// f16 without.
#[test]
fn merge_into_nf4_weights_requantizes() {
    let adapter = Adapter::load(&data("rslora")).unwrap();
    let scale = adapter.config.lora(None).scale() as f64;
    let rank = adapter.config.r;
    let dir = scratch("merge-nf4");
    let (path, out) = (dir.join("nf4.safetensors"), dir.join("out.safetensors"));
    let base = tensors(&data("base.safetensors"));
    let quantized = [
        ("up", DType::BF16, 64, true),
        ("block.down", DType::F16, 32, false),
    ]
    .map(|(module, dtype, blocksize, double_quant)| {
        let key = format!("{module}.weight");
        let shape = base[&key].shape.clone();
        let q = match dtype {
            DType::BF16 => {
                let w: Vec<bf16> = f32s(&base, &key).into_iter().map(bf16::from_f32).collect();
                nf4::quantize(&w, &shape, blocksize, double_quant)
            }
            _ => {
                let w: Vec<f16> = f32s(&base, &key).into_iter().map(f16::from_f32).collect();
                nf4::quantize(&w, &shape, blocksize, double_quant)
            }
        };
        (module, key, q.unwrap())
    });
    let ckpt = Checkpoint {
        nf4: quantized
            .iter()
            .map(|(_, k, q)| (k.clone(), q.clone()))
            .collect(),
        tensors: BTreeMap::from([("up.bias".to_string(), base["up.bias"].clone())]),
        ..Default::default()
    };
    ckpt.save(&path).unwrap();
    let summary = merge_checkpoint(&path, &adapter, &out).unwrap();
    assert_eq!(summary.merged, ["block.down.weight", "up.weight"]);
    assert_eq!(summary.copied, 1);
    let bytes = read_file(&out).unwrap();
    let merged = Checkpoint::parse(&bytes, "out").unwrap();
    for (module, key, q) in &quantized {
        let f = &adapter.modules[*module];
        // The base as bitsandbytes dequantizes it, in its dtype, then W + scale · B A in f64,
        // by loops of this test's own.
        let w: Vec<f32> = match q.dtype {
            DType::BF16 => q.dequantize::<bf16>().iter().map(|v| v.to_f32()).collect(),
            _ => q.dequantize::<f16>().iter().map(|v| v.to_f32()).collect(),
        };
        let expected_w: Vec<f32> = (0..f.d_out * f.d_in)
            .map(|k| {
                let (o, i) = (k / f.d_in, k % f.d_in);
                let ba: f64 = (0..rank)
                    .map(|j| f.b[o * rank + j] as f64 * f.a[j * f.d_in + i] as f64)
                    .sum();
                (w[k] as f64 + scale * ba) as f32
            })
            .collect();
        let double_quant = matches!(q.absmax, Absmax::Nested(_));
        let mut expected = nf4::quantize(&expected_w, &q.shape, q.blocksize, double_quant).unwrap();
        expected.dtype = q.dtype;
        assert_eq!(merged.nf4[key], expected, "{key}");
        assert_ne!(
            merged.nf4[key].codes, q.codes,
            "{key}: the merge changed no code"
        );
        let error = rel_l2(&expected.dequantize::<f32>(), &expected_w);
        let reported = summary.requantization_error[key];
        assert!(
            (reported - error).abs() <= 1e-12 && error > 0.01 && error < 0.2,
            "{key}: {reported} {error}"
        );
    }
}

#[test]
fn fk_merge_writes_the_library_merge() {
    let dir = scratch("fk-merge");
    let (ours, cli) = (dir.join("lib.safetensors"), dir.join("cli.safetensors"));
    let adapter = Adapter::load(&data("plain")).unwrap();
    merge_checkpoint(&data("base.safetensors"), &adapter, &ours).unwrap();
    let run = |args: &[&Path]| {
        std::process::Command::new(fk_binary())
            .arg("merge")
            .args(args)
            .output()
            .unwrap()
    };
    let ok = run(&[&data("base.safetensors"), &data("plain"), &cli]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(read_file(&cli).unwrap(), read_file(&ours).unwrap());
    let bad = run(&[&data("base.safetensors"), &dir, &cli]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains(CONFIG_FILE));
}

/// What PEFT would load differently is refused, or written so that it does not: a `null`
/// target_modules goes out as the saved modules' names (PEFT would pick modules by
/// architecture and drop the others' factors), names that miss a saved module, no modules,
/// a dtype safetensors factors are not saved in. The config goes last: a save whose weights
/// fail leaves the old config.
#[test]
fn save_writes_what_peft_loads_the_same() {
    let peft = Adapter::load(&data("plain")).unwrap();
    let modules: Vec<String> = peft.modules.keys().cloned().collect();
    let untargeted = Adapter {
        config: AdapterConfig {
            target_modules: None,
            ..peft.config.clone()
        },
        ..peft.clone()
    };
    let dir = scratch("untargeted");
    untargeted.save(&dir).unwrap();
    let back = Adapter::load(&dir).unwrap();
    assert_eq!(
        back.config.target_modules,
        Some(TargetModules::Names(modules.clone()))
    );
    assert_eq!(back.modules, peft.modules);

    let missed = Adapter {
        config: AdapterConfig {
            target_modules: Some(TargetModules::Names(vec!["k_proj".into()])),
            ..peft.config.clone()
        },
        ..peft.clone()
    };
    let empty = Adapter {
        modules: BTreeMap::new(),
        ..peft.clone()
    };
    for (case, adapter) in [("names miss", &missed), ("no modules", &empty)] {
        let err = adapter.save(&scratch("refused")).unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidArgument {
                    what: "adapter save",
                    ..
                }
            ),
            "{case}: {err}"
        );
    }
    let mut f64s = peft.clone();
    f64s.modules.values_mut().next().unwrap().dtype = DType::F64;
    assert!(matches!(
        f64s.save(&scratch("f64")),
        Err(Error::UnsupportedDtype { .. })
    ));

    // The weights' file cannot be replaced (a directory of its name): no new config either.
    let dir = scratch("half");
    peft.save(&dir).unwrap();
    let config = std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap();
    std::fs::remove_file(dir.join(WEIGHTS_FILE)).unwrap();
    std::fs::create_dir(dir.join(WEIGHTS_FILE)).unwrap();
    std::fs::write(dir.join(WEIGHTS_FILE).join("x"), b"x").unwrap();
    let other = Adapter {
        config: AdapterConfig {
            lora_alpha: peft.config.lora_alpha * 2.0,
            ..peft.config.clone()
        },
        ..peft.clone()
    };
    assert!(other.save(&dir).is_err());
    assert_eq!(
        std::fs::read_to_string(dir.join(CONFIG_FILE)).unwrap(),
        config
    );
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
}
