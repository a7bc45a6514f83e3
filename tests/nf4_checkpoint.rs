//! NF4 checkpoints (src/nf4/checkpoint.rs) and `fk quantize` against bitsandbytes' own
//! serialization: `tests/data/nf4/<device>/checkpoint_{dq,plain}.safetensors` are the
//! `Linear4bit` state_dicts scripts/nf4_vectors.py saved from `checkpoint_input.safetensors`
//! (what transformers writes for a 4-bit model), `checkpoint_dequant.safetensors` their
//! weights as bitsandbytes dequantizes them.

use finetune_kernels::files::read_file;
use finetune_kernels::nf4::checkpoint::{
    quantize_file, write_atomic, Checkpoint, QuantizeOptions, RawTensor, QUANT_STATE_SUFFIX,
};
use finetune_kernels::reference::nf4::{self, Absmax, BLOCKSIZES};
use finetune_kernels::testing::{fresh_dir, random_bf16_tensor, random_vec};
use finetune_kernels::{bf16, f16, DType, Error};
use rand::{rngs::StdRng, Rng, SeedableRng};
use safetensors::{Dtype, SafeTensors};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The linear weights of the vector checkpoints (scripts/nf4_vectors.py, `LINEARS`).
const LINEARS: [&str; 5] = [
    "model.layers.0.extra.odd_proj.weight",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.mlp.up_proj.weight",
    "model.layers.0.self_attn.o_proj.weight",
    "model.layers.0.self_attn.q_proj.weight",
];

fn data_dirs() -> Vec<PathBuf> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/nf4");
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|d| d.join("checkpoint_input.safetensors").exists())
        .collect();
    dirs.sort();
    assert!(
        !dirs.is_empty(),
        "no NF4 checkpoints under {}",
        root.display()
    );
    dirs
}

/// Whether bitsandbytes' CUDA kernels made the files in `dir` (else its CPU path did).
fn made_on_cuda(dir: &Path) -> bool {
    let bytes = read_file(&dir.join("checkpoint_dequant.safetensors")).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    header.metadata().as_ref().unwrap()["device"] == "cuda"
}

/// A fresh, empty directory under target/tmp for one test's outputs (emptied each run, so
/// runs leave nothing behind in the system's temp directory).
fn scratch(test: &str) -> PathBuf {
    fresh_dir(
        Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("nf4")
            .join(test),
    )
}

#[test]
fn reads_bitsandbytes_checkpoints() {
    for dir in data_dirs() {
        let input_bytes = read_file(&dir.join("checkpoint_input.safetensors")).unwrap();
        let input = Checkpoint::parse(&input_bytes, "input").unwrap();
        let dequant_bytes = read_file(&dir.join("checkpoint_dequant.safetensors")).unwrap();
        let dequant = Checkpoint::parse(&dequant_bytes, "dequant").unwrap();
        for tag in ["dq", "plain"] {
            let bytes = read_file(&dir.join(format!("checkpoint_{tag}.safetensors"))).unwrap();
            let ck = Checkpoint::parse(&bytes, tag).unwrap();
            assert_eq!(
                ck.nf4.keys().map(String::as_str).collect::<Vec<_>>(),
                LINEARS,
                "{tag}"
            );
            for (name, q) in &ck.nf4 {
                assert_eq!((q.blocksize, q.dtype), (64, DType::BF16), "{name}");
                assert_eq!(q.shape, input.tensors[name].shape, "{name}");
                assert_eq!(matches!(q.absmax, Absmax::Nested(_)), tag == "dq", "{name}");
                let ours: Vec<bf16> = q.dequantize();
                let theirs: Vec<bf16> = dequant.tensors[&format!("{tag}.{name}")].values();
                assert_eq!(
                    bytemuck::cast_slice::<_, u16>(&ours),
                    bytemuck::cast_slice::<_, u16>(&theirs),
                    "{tag} {name}"
                );
            }
            // Everything else (embeddings, norms, lm_head, biases) is the input, untouched.
            let plain: Vec<&String> = input
                .tensors
                .keys()
                .filter(|k| !ck.nf4.contains_key(*k))
                .collect();
            assert_eq!(ck.tensors.keys().collect::<Vec<_>>(), plain);
            for (name, t) in &ck.tensors {
                assert_eq!(t, &input.tensors[name], "{name}");
            }
            assert_eq!(ck.metadata.as_ref().unwrap()["format"], "pt");
        }
    }
}

/// Our writer stores what bitsandbytes stored, byte for byte (the JSON blob compares as
/// JSON: number formatting may differ), and our reader reads it back.
#[test]
fn bitsandbytes_checkpoints_round_trip_through_our_writer() {
    let out = scratch("roundtrip");
    for dir in data_dirs() {
        for tag in ["dq", "plain"] {
            let bytes = read_file(&dir.join(format!("checkpoint_{tag}.safetensors"))).unwrap();
            let theirs = SafeTensors::deserialize(&bytes).unwrap();
            let ck = Checkpoint::parse(&bytes, tag).unwrap();
            let path = out.join(format!("{tag}.safetensors"));
            ck.save(&path).unwrap();
            let ours_bytes = read_file(&path).unwrap();
            let ours = SafeTensors::deserialize(&ours_bytes).unwrap();
            let mut names = ours.names();
            names.sort();
            let mut expected = theirs.names();
            expected.sort();
            assert_eq!(names, expected, "{tag}: the same tensors");
            for name in names {
                let (o, t) = (ours.tensor(name).unwrap(), theirs.tensor(name).unwrap());
                assert_eq!((o.dtype(), o.shape()), (t.dtype(), t.shape()), "{name}");
                if name.ends_with(QUANT_STATE_SUFFIX) {
                    let json = |d: &[u8]| serde_json::from_slice::<serde_json::Value>(d).unwrap();
                    assert_eq!(json(o.data()), json(t.data()), "{name}");
                } else {
                    assert_eq!(o.data(), t.data(), "{name}");
                }
            }
            assert_eq!(Checkpoint::parse(&ours_bytes, "ours").unwrap(), ck);
        }
    }
}

#[test]
fn random_weights_round_trip() {
    let out = scratch("random");
    let mut rng = StdRng::seed_from_u64(rand::random());
    let mut ck = Checkpoint::default();
    for (i, &blocksize) in BLOCKSIZES.iter().enumerate() {
        let shape = vec![rng.random_range(1..20), rng.random_range(1..300)];
        let n = shape[0] * shape[1];
        let dq = i % 2 == 0;
        let q = match i % 3 {
            0 => nf4::quantize(&random_vec::<bf16>(&mut rng, n, 1.0), &shape, blocksize, dq),
            1 => nf4::quantize(&random_vec::<f16>(&mut rng, n, 0.1), &shape, blocksize, dq),
            _ => nf4::quantize(&random_vec::<f32>(&mut rng, n, 30.0), &shape, blocksize, dq),
        };
        ck.nf4.insert(format!("layer.{i}.weight"), q.unwrap());
    }
    let bias: Vec<f32> = random_vec(&mut rng, 7, 1.0);
    let bias = RawTensor {
        dtype: Dtype::F32,
        shape: vec![7],
        data: Cow::Owned(bytemuck::cast_slice(&bias).to_vec()),
    };
    ck.tensors.insert("layer.0.bias".into(), bias);
    let path = out.join("ck.safetensors");
    ck.save(&path).unwrap();
    let bytes = read_file(&path).unwrap();
    let back = Checkpoint::parse(&bytes, "ck").unwrap();
    assert_eq!((back.nf4, back.tensors), (ck.nf4, ck.tensors));
}

/// `fk quantize` on the vectors' input: the same weights quantized, the rest copied; and
/// the same bytes as bitsandbytes' own checkpoint wherever its path is the CUDA kernel's
/// (on the CPU, blocks cut short by the end of the weight divide instead).
#[test]
fn fk_quantize_matches_bitsandbytes() {
    let out = scratch("fk-quantize");
    for dir in data_dirs() {
        let cuda = made_on_cuda(&dir);
        let input_path = dir.join("checkpoint_input.safetensors");
        let input_bytes = read_file(&input_path).unwrap();
        let input = Checkpoint::parse(&input_bytes, "input").unwrap();
        for (tag, double_quant) in [("dq", true), ("plain", false)] {
            let opts = QuantizeOptions {
                double_quant,
                ..QuantizeOptions::default()
            };
            let path = out.join(format!("{tag}.safetensors"));
            let summary = quantize_file(&input_path, &path, &opts).unwrap();
            assert_eq!(summary.quantized, LINEARS);
            assert_eq!(summary.copied, input.tensors.len() - LINEARS.len());
            assert!(summary.bytes_after < summary.bytes_before, "{summary:?}");
            assert_eq!(summary.bytes_after, std::fs::metadata(&path).unwrap().len());

            let ours_bytes = read_file(&path).unwrap();
            let ours = Checkpoint::parse(&ours_bytes, "ours").unwrap();
            let bnb_bytes = read_file(&dir.join(format!("checkpoint_{tag}.safetensors"))).unwrap();
            let bnb = Checkpoint::parse(&bnb_bytes, "bitsandbytes").unwrap();
            for (name, q) in &ours.nf4 {
                let w: Vec<bf16> = input.tensors[name].values();
                assert_eq!(
                    q,
                    &nf4::quantize(&w, &q.shape, 64, double_quant).unwrap(),
                    "{name}"
                );
                let theirs = &bnb.nf4[name];
                if cuda || q.numel() % 64 == 0 {
                    assert_eq!(q.codes, theirs.codes, "{tag} {name}: codes");
                }
                if !double_quant {
                    assert_eq!(q.absmax, theirs.absmax, "{tag} {name}: absmax");
                }
            }
            assert_eq!(ours.tensors, bnb.tensors, "{tag}: the copied tensors");
            assert_eq!(ours.metadata.as_ref().unwrap()["format"], "pt");
        }
    }
}

#[test]
fn include_and_exclude_patterns() {
    let dir = &data_dirs()[0];
    let input = dir.join("checkpoint_input.safetensors");
    let out = scratch("patterns").join("out.safetensors");
    let only_mlp = QuantizeOptions {
        include: vec!["*.mlp.*".into()],
        ..QuantizeOptions::default()
    };
    let s = quantize_file(&input, &out, &only_mlp).unwrap();
    assert_eq!(
        s.quantized,
        [
            "model.layers.0.mlp.down_proj.weight",
            "model.layers.0.mlp.up_proj.weight"
        ]
    );
    let no_down = QuantizeOptions {
        exclude: vec!["*down*".into()],
        ..QuantizeOptions::default()
    };
    let s = quantize_file(&input, &out, &no_down).unwrap();
    assert_eq!(
        s.quantized.len(),
        6,
        "embeddings and lm_head are 2-D weights too: {:?}",
        s.quantized
    );
    assert!(s.quantized.contains(&"lm_head.weight".to_string()));
    assert!(
        !s.quantized
            .iter()
            .any(|n| n.contains("down") || n.contains("norm")),
        "1-D norms never"
    );
    let everything = QuantizeOptions {
        include: vec!["*".into()],
        exclude: vec![],
        blocksize: 128,
        double_quant: false,
        transpose: vec![],
    };
    let s = quantize_file(&input, &out, &everything).unwrap();
    assert_eq!(s.quantized.len(), LINEARS.len() + 2);
    let bad = QuantizeOptions {
        blocksize: 48,
        ..QuantizeOptions::default()
    };
    assert!(matches!(
        quantize_file(&input, &out, &bad),
        Err(Error::Unsupported { .. })
    ));
}

// ------------------------------------------------------------------ bad input

/// bitsandbytes' double-quantized checkpoint, with `edit` applied to its tensors.
fn edited(edit: impl FnOnce(&mut BTreeMap<String, RawTensor<'static>>)) -> Vec<u8> {
    let bytes = read_file(&data_dirs()[0].join("checkpoint_dq.safetensors")).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: BTreeMap<String, RawTensor<'static>> = st
        .iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                RawTensor {
                    dtype: v.dtype(),
                    shape: v.shape().to_vec(),
                    data: Cow::Owned(v.data().to_vec()),
                },
            )
        })
        .collect();
    edit(&mut tensors);
    safetensors::serialize(tensors, None).unwrap()
}

const W: &str = "model.layers.0.self_attn.q_proj.weight";

/// A change to a checkpoint's tensors.
type Edit = Box<dyn FnOnce(&mut BTreeMap<String, RawTensor<'static>>)>;

fn blob(json: &str) -> RawTensor<'static> {
    RawTensor {
        dtype: Dtype::U8,
        shape: vec![json.len()],
        data: Cow::Owned(json.as_bytes().to_vec()),
    }
}

/// The error for an edited checkpoint: which tensor it names and what it says.
fn error_of(bytes: &[u8]) -> (String, String) {
    match Checkpoint::parse(bytes, "edited.safetensors") {
        Err(Error::Checkpoint { file, tensor, why }) => {
            assert_eq!(file, "edited.safetensors");
            (tensor, why)
        }
        other => panic!("expected a checkpoint error, got {other:?}"),
    }
}

#[test]
fn bad_checkpoints_are_errors_that_name_the_tensor() {
    let state = format!("{W}{QUANT_STATE_SUFFIX}");
    let json = r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [48, 48], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.5}"#;
    let cases: Vec<(&str, Edit, String, &str)> = vec![
        (
            "missing absmax",
            Box::new(|t| drop(t.remove(&format!("{W}.absmax")))),
            format!("{W}.absmax"),
            "missing",
        ),
        (
            "missing nested absmax",
            Box::new(|t| drop(t.remove(&format!("{W}.nested_absmax")))),
            format!("{W}.nested_absmax"),
            "missing",
        ),
        (
            "missing quant_map",
            Box::new(|t| drop(t.remove(&format!("{W}.quant_map")))),
            format!("{W}.quant_map"),
            "missing",
        ),
        (
            "missing codes",
            Box::new(|t| drop(t.remove(W))),
            W.to_string(),
            "missing",
        ),
        (
            "short absmax",
            Box::new(|t| {
                let a = t.get_mut(&format!("{W}.absmax")).unwrap();
                a.shape = vec![35];
                a.data = Cow::Owned(a.data[..35].to_vec());
            }),
            format!("{W}.absmax"),
            "35 elements",
        ),
        (
            "codes as f32, a word short",
            Box::new(|t| {
                let c = t.get_mut(W).unwrap();
                c.dtype = Dtype::F32;
                c.shape = vec![c.data.len() / 4 - 1];
                c.data = Cow::Owned(c.data[4..].to_vec());
            }),
            W.to_string(),
            "expected 1152 for 2304 packed 4-bit codes",
        ),
        (
            "nested parts, a plain quant state",
            Box::new(move |t| {
                let plain = r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [48, 48]}"#;
                drop(t.insert(format!("{W}{QUANT_STATE_SUFFIX}"), blob(plain)))
            }),
            format!("{W}{QUANT_STATE_SUFFIX}"),
            "no nested_offset",
        ),
        (
            "another quant_map",
            Box::new(|t| {
                let m = t.get_mut(&format!("{W}.quant_map")).unwrap();
                m.data.to_mut()[4] ^= 1;
            }),
            format!("{W}.quant_map"),
            "NF4 table",
        ),
        (
            "fp4",
            Box::new(move |t| drop(t.insert(state.clone(), blob(&json.replace("nf4", "fp4"))))),
            format!("{W}{QUANT_STATE_SUFFIX}"),
            "fp4",
        ),
        (
            "bad JSON",
            Box::new(|t| {
                drop(t.insert(
                    format!("{W}{QUANT_STATE_SUFFIX}"),
                    blob("{\"quant_type\": \"nf4\", "),
                ))
            }),
            format!("{W}{QUANT_STATE_SUFFIX}"),
            "bad JSON",
        ),
        (
            "no shape",
            Box::new(|t| {
                drop(t.insert(
                    format!("{W}{QUANT_STATE_SUFFIX}"),
                    blob(&json.replace(r#""shape": [48, 48], "#, "")),
                ))
            }),
            format!("{W}{QUANT_STATE_SUFFIX}"),
            "shape",
        ),
        (
            "wrong shape",
            Box::new(|t| {
                drop(t.insert(
                    format!("{W}{QUANT_STATE_SUFFIX}"),
                    blob(&json.replace("[48, 48]", "[48, 49]")),
                ))
            }),
            W.to_string(),
            "expected 1176 for 2352 packed 4-bit codes",
        ),
        (
            "blocksize 48",
            Box::new(|t| {
                drop(t.insert(
                    format!("{W}{QUANT_STATE_SUFFIX}"),
                    blob(&json.replace("64", "48")),
                ))
            }),
            format!("{W}{QUANT_STATE_SUFFIX}"),
            "blocksize 48",
        ),
        (
            "no offset number",
            Box::new(|t| {
                drop(t.insert(
                    format!("{W}{QUANT_STATE_SUFFIX}"),
                    blob(&json.replace("0.5", "\"x\"")),
                ))
            }),
            format!("{W}{QUANT_STATE_SUFFIX}"),
            "nested_offset",
        ),
        (
            "fp4 key",
            Box::new(|t| {
                let s = t.remove(&format!("{W}{QUANT_STATE_SUFFIX}")).unwrap();
                t.insert(format!("{W}.quant_state.bitsandbytes__fp4"), s);
            }),
            format!("{W}.quant_state.bitsandbytes__fp4"),
            "only nf4",
        ),
        (
            "no quant state",
            Box::new(|t| drop(t.remove(&format!("{W}{QUANT_STATE_SUFFIX}")))),
            format!("{W}.*"),
            "without",
        ),
    ];
    for (what, edit, tensor, says) in cases {
        let (t, why) = error_of(&edited(edit));
        match tensor.strip_suffix('*') {
            Some(prefix) => assert!(t.starts_with(prefix), "{what}: {t}: {why}"),
            None => assert_eq!(t, tensor, "{what}: {why}"),
        }
        assert!(why.contains(says), "{what}: {why:?} should say {says:?}");
    }
    // A truncated file, and one that is not safetensors at all.
    let whole = edited(|_| ());
    for bytes in [
        &whole[..whole.len() / 2],
        &whole[..5],
        b"{\"not\": \"safetensors\"}".as_slice(),
    ] {
        let (t, why) = error_of(bytes);
        assert!(
            t.is_empty() && why.contains("not a valid safetensors file"),
            "{why}"
        );
    }
    let e = Checkpoint::parse(&whole[..100], "f.safetensors")
        .unwrap_err()
        .to_string();
    assert!(e.starts_with("f.safetensors: "), "{e}");
}

/// A failing `fk quantize` leaves an existing output as it was and no temporary file.
#[test]
fn failure_leaves_no_half_written_output() {
    let dir = scratch("atomic");
    let input = dir.join("in.safetensors");
    let mut w = vec![0.5f32; 64 * 3];
    w[100] = f32::NAN;
    let tensors = [(
        "a.weight".to_string(),
        RawTensor {
            dtype: Dtype::F32,
            shape: vec![3, 64],
            data: Cow::Owned(bytemuck::cast_slice(&w).to_vec()),
        },
    )];
    write_atomic(&input, tensors, None).unwrap();
    let output = dir.join("out.safetensors");
    std::fs::write(&output, b"old").unwrap();
    match quantize_file(&input, &output, &QuantizeOptions::default()) {
        Err(Error::Checkpoint { tensor, why, .. }) => {
            assert!(tensor == "a.weight" && why.contains("NaN"), "{why}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(&output).unwrap(), b"old");
    let left: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left.len(), 2, "{left:?}");
    // An output in a missing directory is an I/O error naming it.
    let nowhere = dir.join("missing/out.safetensors");
    let e = quantize_file(
        &data_dirs()[0].join("checkpoint_input.safetensors"),
        &nowhere,
        &QuantizeOptions::default(),
    );
    assert!(
        matches!(&e, Err(Error::Io { path, .. }) if path.ends_with("missing/out.safetensors")),
        "{e:?}"
    );
    assert!(matches!(
        read_file(&dir.join("absent")),
        Err(Error::Io { .. })
    ));
}

#[test]
fn nf4_weights_in_the_input_are_copied_not_requantized() {
    let dir = &data_dirs()[0];
    let out = scratch("requant").join("out.safetensors");
    let s = quantize_file(
        &dir.join("checkpoint_dq.safetensors"),
        &out,
        &QuantizeOptions::default(),
    )
    .unwrap();
    assert!(s.quantized.is_empty(), "{:?}", s.quantized);
    assert_eq!(s.already_nf4, LINEARS);
    let bytes = read_file(&out).unwrap();
    let a = Checkpoint::parse(&bytes, "out").unwrap();
    let bnb_bytes = read_file(&dir.join("checkpoint_dq.safetensors")).unwrap();
    let b = Checkpoint::parse(&bnb_bytes, "in").unwrap();
    assert_eq!(a.nf4, b.nf4);
}

/// bitsandbytes packs the codes into elements of `bnb_4bit_quant_storage` (bf16 or f32 under
/// FSDP): the same bytes in a tensor of another dtype, read as the u8 ones.
#[test]
fn codes_in_another_storage_dtype_read_the_same() {
    let plain = read_file(&data_dirs()[0].join("checkpoint_dq.safetensors")).unwrap();
    let expected = Checkpoint::parse(&plain, "u8").unwrap().nf4[W].clone();
    for dtype in [Dtype::BF16, Dtype::F32] {
        let bytes = edited(move |t| {
            let c = t.get_mut(W).unwrap();
            c.dtype = dtype;
            c.shape = vec![c.data.len() * 8 / dtype.bitsize(), 1];
        });
        let ck = Checkpoint::parse(&bytes, "storage").unwrap();
        assert_eq!(ck.nf4[W], expected, "{dtype:?}");
    }
}

/// `fk quantize` over a checkpoint whose NF4 codes are packed in bf16 or f32: those weights are
/// NF4 all the same. They are not quantized again (their 2-D float codes are no weight to
/// quantize), nor listed as left alone (which would put their modules in the config's
/// `llm_int8_skip_modules`), and their codes are written as u8, the storage that config
/// names, reading back as the u8 input does.
#[test]
fn nf4_weights_in_another_storage_are_written_as_u8() {
    let dir = scratch("storage");
    let plain = read_file(&data_dirs()[0].join("checkpoint_dq.safetensors")).unwrap();
    let expected = Checkpoint::parse(&plain, "u8").unwrap().nf4;
    for dtype in [Dtype::BF16, Dtype::F32] {
        // Every weight whose codes fill whole elements of the dtype: the others (an odd
        // weight's) stay u8, so the file holds both, as no model would, and both are kept.
        let bytes = edited(move |t| {
            for w in LINEARS {
                let c = t.get_mut(w).unwrap();
                if c.data.len() % 4 == 0 {
                    c.dtype = dtype;
                    c.shape = vec![c.data.len() * 8 / dtype.bitsize(), 1];
                }
            }
        });
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let relabelled = LINEARS
            .iter()
            .filter(|w| st.tensor(w).unwrap().dtype() == dtype)
            .count();
        assert!(relabelled >= 3, "{relabelled} weights' codes in {dtype:?}");
        let input = dir.join(format!("in-{dtype:?}.safetensors"));
        std::fs::write(&input, bytes).unwrap();
        let nothing = QuantizeOptions {
            include: vec!["*.nothing".into()],
            ..QuantizeOptions::default()
        };
        for opts in [QuantizeOptions::default(), nothing] {
            let out = dir.join("out.safetensors");
            let s = quantize_file(&input, &out, &opts).unwrap();
            assert!(s.quantized.is_empty(), "{dtype:?}: {:?}", s.quantized);
            assert_eq!(s.already_nf4, LINEARS, "{dtype:?}");
            let modules = s.skip_modules();
            for w in LINEARS {
                assert!(
                    !s.left_alone.iter().any(|n| n == w),
                    "{dtype:?}: {w} left alone"
                );
                let module = w.strip_suffix(".weight").unwrap();
                assert!(
                    !modules.iter().any(|m| m == module),
                    "{dtype:?}: skips {module}"
                );
            }
            let written = read_file(&out).unwrap();
            let st = SafeTensors::deserialize(&written).unwrap();
            for w in LINEARS {
                assert_eq!(st.tensor(w).unwrap().dtype(), Dtype::U8, "{dtype:?}: {w}");
            }
            assert_eq!(Checkpoint::parse(&written, "out").unwrap().nf4, expected);
        }
    }
}

/// Other model families' names: GPT-2's and T5's embeddings, nested and renamed heads stay
/// as they are by default, and are listed; GPT-2's Conv1D weights (stored [in, out], as their
/// biases show) are refused unless `transpose` names them, and then quantized as their
/// transpose, the [out, in] weight transformers quantizes.
#[test]
fn other_families_embeddings_heads_and_conv1d() {
    let dir = scratch("families");
    let mut rng = StdRng::seed_from_u64(rand::random());
    let mut tensors = BTreeMap::new();
    for (name, rows, cols) in [
        ("transformer.wte.weight", 50, 16),
        ("transformer.wpe.weight", 20, 16),
        ("shared.weight", 30, 16),
        (
            "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
            32,
            4,
        ),
        ("language_model.lm_head.weight", 50, 16),
        ("transformer.output_layer.weight", 50, 16),
        ("score.weight", 3, 16),
        ("transformer.h.0.attn.c_attn.weight", 16, 48),
        ("transformer.h.0.attn.c_proj.weight", 16, 16),
        ("transformer.h.0.mlp.c_fc.weight", 16, 64),
    ] {
        tensors.insert(name.to_string(), random_bf16_tensor(&mut rng, rows, cols));
        if let Some(module) = name.strip_suffix(".weight").filter(|m| m.contains(".c_")) {
            let bias = RawTensor {
                shape: vec![cols],
                ..random_bf16_tensor(&mut rng, 1, cols)
            };
            tensors.insert(format!("{module}.bias"), bias);
        }
    }
    let input = dir.join("in.safetensors");
    write_atomic(&input, tensors.clone(), None).unwrap();
    let output = dir.join("out.safetensors");
    match quantize_file(&input, &output, &QuantizeOptions::default()) {
        Err(Error::Checkpoint { tensor, why, .. }) => assert!(
            tensor.ends_with("c_attn.weight") || tensor.ends_with("c_fc.weight"),
            "{tensor}: {why}"
        ),
        other => panic!("a Conv1D weight quantized as it lies: {other:?}"),
    }
    assert!(!output.exists());
    let conv1d = QuantizeOptions {
        transpose: vec!["transformer.h.*.c_*.weight".into()],
        ..QuantizeOptions::default()
    };
    let s = quantize_file(&input, &output, &conv1d).unwrap();
    let conv = [
        "transformer.h.0.attn.c_attn.weight",
        "transformer.h.0.attn.c_proj.weight",
        "transformer.h.0.mlp.c_fc.weight",
    ];
    assert_eq!(s.quantized, conv);
    assert_eq!(s.left_alone.len(), 7, "{:?}", s.left_alone);
    assert!(s.left_alone.iter().all(|n| !n.contains(".c_")));
    let bytes = read_file(&output).unwrap();
    let ck = Checkpoint::parse(&bytes, "out").unwrap();
    for name in conv {
        let raw = &tensors[name];
        let (rows, cols) = (raw.shape[0], raw.shape[1]);
        let v = raw.values::<bf16>();
        let mut t = vec![bf16::ZERO; rows * cols];
        for (r, row) in v.chunks(cols).enumerate() {
            for (c, &x) in row.iter().enumerate() {
                t[c * rows + r] = x;
            }
        }
        let expected = nf4::quantize(&t, &[cols, rows], 64, true).unwrap();
        assert_eq!(ck.nf4[name], expected, "{name}");
    }
    // A Linear weight ([out, in], as its bias shows) named by `transpose` is refused too.
    let linear = QuantizeOptions {
        transpose: vec!["*".into()],
        include: vec!["*.c_attn.weight".into()],
        ..QuantizeOptions::default()
    };
    let mut tensors = BTreeMap::new();
    tensors.insert(
        "h.c_attn.weight".to_string(),
        random_bf16_tensor(&mut rng, 48, 16),
    );
    let bias = RawTensor {
        shape: vec![48],
        ..random_bf16_tensor(&mut rng, 1, 48)
    };
    tensors.insert("h.c_attn.bias".to_string(), bias);
    write_atomic(&input, tensors, None).unwrap();
    match quantize_file(&input, &output, &linear) {
        Err(Error::Checkpoint { tensor, why, .. }) => assert!(
            tensor == "h.c_attn.weight" && why.contains("needs no transpose"),
            "{tensor}: {why}"
        ),
        other => panic!("{other:?}"),
    }
}

/// An input whose names would collide with an NF4 weight's parts: an error naming the
/// tensor, no output (safetensors would write one of the two, or panic). A quant state's
/// name is read as one, and refused as one.
#[test]
fn names_that_collide_with_nf4_parts_are_refused() {
    let dir = scratch("collide");
    let mut rng = StdRng::seed_from_u64(rand::random());
    let input = dir.join("in.safetensors");
    for (part, says) in [
        (".absmax", "two tensors"),
        (".quant_map", "two tensors"),
        (QUANT_STATE_SUFFIX, "dtype BF16, expected U8"),
    ] {
        let clash = format!("a.weight{part}");
        let tensors = [
            ("a.weight".to_string(), random_bf16_tensor(&mut rng, 4, 64)),
            (
                clash.clone(),
                RawTensor {
                    shape: vec![1, 16],
                    ..random_bf16_tensor(&mut rng, 1, 16)
                },
            ),
        ];
        write_atomic(&input, tensors, None).unwrap();
        let output = dir.join("out.safetensors");
        match quantize_file(&input, &output, &QuantizeOptions::default()) {
            Err(Error::Checkpoint { tensor, why, .. }) => {
                assert!(tensor == clash && why.contains(says), "{tensor}: {why}")
            }
            other => panic!("{part}: {other:?}"),
        }
        assert!(!output.exists());
    }
}
