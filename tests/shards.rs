//! Sharded checkpoints (src/shards.rs): `fk quantize` and `fk merge` over the shards of a
//! checkpoint give, tensor for tensor, what they give over the same checkpoint in one file;
//! each output shard holds what its input shard held, beside an index that names every
//! tensor written and counts its bytes; a failure in any shard leaves no output; bad
//! indexes are typed errors.

use finetune_kernels::files::read_file;
use finetune_kernels::lora::adapter::{merge_checkpoint, Adapter};
use finetune_kernels::nf4::checkpoint::{quantize_file, write_atomic, QuantizeOptions, RawTensor};
use finetune_kernels::shards::{Layout, INDEX_FILE};
use finetune_kernels::testing::{fresh_dir, random_bf16_tensor};
use finetune_kernels::Error;
use rand::{rngs::StdRng, Rng, SeedableRng};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// A fresh, empty directory under target/tmp.
fn scratch(name: &str) -> PathBuf {
    fresh_dir(
        Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("shards")
            .join(name),
    )
}

/// Every tensor of a safetensors file: dtype, shape and bytes.
fn contents(path: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = read_file(path).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    st.iter()
        .map(|(n, v)| {
            (
                n.to_string(),
                (v.dtype(), v.shape().to_vec(), v.data().to_vec()),
            )
        })
        .collect()
}

/// The files in `dir`, by name.
fn listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Every file in `dir` (none if it does not exist), by name: its bytes.
fn files(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return BTreeMap::new();
    };
    entries
        .map(|e| {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().into_owned();
            (name, read_file(&e.path()).unwrap())
        })
        .collect()
}

/// Writes `tensors` into `dir` as shards (tensor `i` of each group to shard `i`'s file) and
/// an index, as transformers lays them out, with a metadata field of its own beside
/// `total_size` to be kept.
fn write_sharded(dir: &Path, shards: &[Vec<(String, RawTensor)>]) {
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0;
    for (i, tensors) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{n:05}.safetensors", i + 1);
        for (t, raw) in tensors {
            weight_map.insert(t.clone(), name.clone().into());
            total += raw.data.len();
        }
        write_atomic(&dir.join(&name), tensors.clone(), None).unwrap();
    }
    let index = json!({"metadata": {"total_size": total, "total_parameters": 12345},
                       "weight_map": weight_map});
    std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
}

/// The union of the shards an index names, after checking the index against them: every
/// tensor of every shard is in the map under its own shard, nothing else is, and
/// `total_size` counts their bytes.
fn check_index(dir: &Path) -> BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let index: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join(INDEX_FILE)).unwrap()).unwrap();
    assert_eq!(index["metadata"]["total_parameters"], 12345, "kept");
    let map = index["weight_map"].as_object().unwrap();
    let shards: BTreeSet<&str> = map.values().map(|v| v.as_str().unwrap()).collect();
    let mut all = BTreeMap::new();
    let mut bytes = 0;
    for shard in shards {
        for (name, t) in contents(&dir.join(shard)) {
            assert_eq!(
                map.get(&name).and_then(Value::as_str),
                Some(shard),
                "{name}"
            );
            bytes += t.2.len();
            assert!(all.insert(name, t).is_none());
        }
    }
    assert_eq!(
        map.len(),
        all.len(),
        "the index names tensors no shard holds"
    );
    assert_eq!(index["metadata"]["total_size"], bytes);
    all
}

/// A small model's tensors in three shards: Llama's names, and a GPT-2 Conv1D weight in the
/// second shard whose bias (which shows it is stored [in, out]) is in the last.
fn model(rng: &mut StdRng) -> Vec<Vec<(String, RawTensor<'static>)>> {
    let mut m = |name: &str, rows: usize, cols: usize| {
        (name.to_string(), random_bf16_tensor(rng, rows, cols))
    };
    let shard0 = vec![
        m("model.embed_tokens.weight", 40, 24),
        m("model.layers.0.self_attn.q_proj.weight", 24, 24),
        m("model.layers.0.mlp.up_proj.weight", 56, 24),
    ];
    let shard1 = vec![
        m("model.layers.0.mlp.down_proj.weight", 24, 56),
        m("model.layers.0.self_attn.o_proj.weight", 24, 24),
        m("transformer.h.0.mlp.c_fc.weight", 24, 72),
    ];
    let mut norm = m("model.norm.weight", 1, 24);
    norm.1.shape = vec![24];
    let mut bias = m("transformer.h.0.mlp.c_fc.bias", 1, 72);
    bias.1.shape = vec![72];
    let shard2 = vec![m("lm_head.weight", 40, 24), norm, bias];
    vec![shard0, shard1, shard2]
}

/// [`model`]'s shards written to `dir/in`: the directory and the shards.
fn sharded_model(
    dir: &Path,
    rng: &mut StdRng,
) -> (PathBuf, Vec<Vec<(String, RawTensor<'static>)>>) {
    let input = dir.join("in");
    std::fs::create_dir_all(&input).unwrap();
    let shards = model(rng);
    write_sharded(&input, &shards);
    (input, shards)
}

/// `fk quantize` over three shards (given as their directory, or their index) writes what
/// it writes for the same tensors in one file, each tensor's NF4 parts in its input shard,
/// and an index of it all. The Conv1D weight's orientation is checked against its bias in
/// another shard: refused without --transpose, and then nothing is written.
#[test]
fn quantize_shards_as_one_file() {
    let mut rng = StdRng::seed_from_u64(rand::random());
    let dir = scratch("quantize");
    let (input, shards) = sharded_model(&dir, &mut rng);
    let whole_in = dir.join("whole.safetensors");
    write_atomic(&whole_in, shards.concat(), None).unwrap();

    let out = dir.join("out");
    match quantize_file(&input, &out, &QuantizeOptions::default()) {
        Err(Error::Checkpoint { tensor, why, .. }) => assert!(
            tensor == "transformer.h.0.mlp.c_fc.weight" && why.contains("--transpose"),
            "{tensor}: {why}"
        ),
        other => panic!("a Conv1D weight quantized as it lies: {other:?}"),
    }
    // The first shard was converted (staged) before the second failed: no trace of either,
    // nor of the output directory the conversion made.
    assert!(!out.exists(), "{:?}", listing(&out));

    let opts = QuantizeOptions {
        transpose: vec!["transformer.h.*.c_*.weight".into()],
        ..QuantizeOptions::default()
    };
    let whole_out = dir.join("whole-out.safetensors");
    let whole = quantize_file(&whole_in, &whole_out, &opts).unwrap();
    for source in [input.clone(), input.join(INDEX_FILE)] {
        let _ = std::fs::remove_dir_all(&out);
        let sharded = quantize_file(&source, &out, &opts).unwrap();
        assert_eq!(sharded.quantized, whole.quantized);
        assert_eq!(sharded.left_alone, whole.left_alone);
        assert_eq!(sharded.copied, whole.copied);
        assert_eq!(sharded.quantized.len(), 5, "{:?}", sharded.quantized);
        assert!(
            check_index(&out) == contents(&whole_out),
            "{}",
            source.display()
        );
        for (i, input_shard) in shards.iter().enumerate() {
            let file = format!("model-{:05}-of-00003.safetensors", i + 1);
            for name in contents(&out.join(&file)).keys() {
                let base = name.find(".weight").map_or(&name[..], |at| &name[..at + 7]);
                assert!(
                    input_shard.iter().any(|(n, _)| n == base),
                    "{name} in {file}"
                );
            }
        }
        assert_eq!(listing(&out).len(), 4, "three shards and the index only");
        // The sizes compared are the weights', before and after: no index on either side.
        let size = |dir: &Path, i: usize| {
            let file = format!("model-{:05}-of-00003.safetensors", i + 1);
            std::fs::metadata(dir.join(file)).unwrap().len()
        };
        let (before, after) =
            (0..3).fold((0, 0), |(b, a), i| (b + size(&input, i), a + size(&out, i)));
        assert_eq!((sharded.bytes_before, sharded.bytes_after), (before, after));
    }
}

/// The adapter of tests/data/lora/plain over its base split in two shards: `fk merge` of the
/// shards, into another directory and in place, gives the merge of the one file. A module in
/// no shard, or a bad shape in the second shard, leaves no output and the input untouched.
#[test]
fn merge_shards_as_one_file() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/lora");
    let adapter = Adapter::load(&data.join("plain")).unwrap();
    let dir = scratch("merge");
    let (input, out) = (dir.join("in"), dir.join("out"));
    std::fs::create_dir_all(&input).unwrap();
    let whole_bytes = read_file(&data.join("base.safetensors")).unwrap();
    let whole = SafeTensors::deserialize(&whole_bytes).unwrap();
    let raw = |name: &str| {
        (
            name.to_string(),
            RawTensor::from(whole.tensor(name).unwrap()),
        )
    };
    let shards = vec![
        vec![raw("up.weight"), raw("position_ids")],
        vec![raw("block.down.weight"), raw("up.bias")],
    ];
    write_sharded(&input, &shards);

    let whole_out = dir.join("whole-out.safetensors");
    let expected = merge_checkpoint(&data.join("base.safetensors"), &adapter, &whole_out).unwrap();
    let summary = merge_checkpoint(&input, &adapter, &out).unwrap();
    assert_eq!(summary, expected);
    assert_eq!(summary.merged, ["block.down.weight", "up.weight"]);
    assert!(check_index(&out) == contents(&whole_out));
    assert_eq!(listing(&out), listing(&input));

    // A module in no shard (its weight missing from the second shard), and a bad shape in
    // the second shard merged in place: errors naming the weight, the first shard's merge
    // not written either.
    let bad = dir.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    let mut bad_down = raw("block.down.weight");
    bad_down.1.shape.reverse();
    for (second, output, fragment) in [
        (vec![raw("up.bias")], dir.join("out2"), "no shard"),
        (vec![bad_down, raw("up.bias")], bad.clone(), "shape"),
    ] {
        write_sharded(&bad, &[shards[0].clone(), second]);
        let (input_before, output_before) = (files(&bad), files(&output));
        match merge_checkpoint(&bad, &adapter, &output) {
            Err(Error::Checkpoint { tensor, why, .. }) => assert!(
                tensor == "block.down.weight" && why.contains(fragment),
                "{why}"
            ),
            other => panic!("{other:?}"),
        }
        assert!(
            files(&bad) == input_before,
            "a failed merge changed its input"
        );
        assert!(
            files(&output) == output_before,
            "a failed merge wrote {output:?}"
        );
    }

    // In place: the same files as into another directory, and no temporary files left.
    merge_checkpoint(&input, &adapter, &input).unwrap();
    assert!(files(&input) == files(&out));
}

/// A file given with an existing directory as its output is written into it under its own
/// name; a directory holding `model.safetensors` is converted into a directory (made if
/// absent), as a sharded one is.
#[test]
fn single_files_and_directories() {
    let mut rng = StdRng::seed_from_u64(rand::random());
    let dir = scratch("single");
    let (input, out, into) = (dir.join("in"), dir.join("out"), dir.join("into"));
    std::fs::create_dir_all(&input).unwrap();
    std::fs::create_dir_all(&into).unwrap();
    let file = input.join("model.safetensors");
    let rows = rng.random_range(2..9);
    let weight = [(
        "l.weight".to_string(),
        random_bf16_tensor(&mut rng, rows, 64),
    )];
    write_atomic(&file, weight, None).unwrap();
    assert_eq!(
        Layout::find(&input).unwrap(),
        Layout::Directory(input.clone())
    );
    let opts = QuantizeOptions::default();
    let direct = dir.join("direct.safetensors");
    quantize_file(&file, &direct, &opts).unwrap();
    quantize_file(&input, &out, &opts).unwrap();
    quantize_file(&file, &into, &opts).unwrap();
    for d in [&out, &into] {
        assert_eq!(
            listing(d),
            BTreeSet::from(["model.safetensors".to_string()])
        );
        assert!(contents(&d.join("model.safetensors")) == contents(&direct));
    }
}

/// A model directory's other files come with its converted weights: `fk quantize` gives
/// `config.json` the `quantization_config` transformers loads NF4 weights by (in place too),
/// `fk merge` copies it as it is; the tokenizer's files are copied; other weight formats
/// and hidden files are not.
#[test]
fn model_files_come_along() {
    let mut rng = StdRng::seed_from_u64(rand::random());
    let dir = scratch("model-files");
    let (input, _) = sharded_model(&dir, &mut rng);
    let config = json!({"model_type": "llama", "torch_dtype": "bfloat16", "hidden_size": 24});
    let config_text = serde_json::to_string_pretty(&config).unwrap();
    for (name, text) in [
        ("config.json", config_text.as_str()),
        ("tokenizer.json", "{\"version\": \"1.0\"}"),
        ("pytorch_model.bin", "not carried"),
        (".cache", "not carried"),
    ] {
        std::fs::write(input.join(name), text).unwrap();
    }
    let opts = QuantizeOptions {
        transpose: vec!["transformer.h.*.c_*.weight".into()],
        double_quant: false,
        ..QuantizeOptions::default()
    };
    let out = dir.join("out");
    let summary = quantize_file(&input, &out, &opts).unwrap();
    assert_eq!(summary.carried, ["config.json", "tokenizer.json"]);
    assert_eq!(
        std::fs::read(out.join("tokenizer.json")).unwrap(),
        std::fs::read(input.join("tokenizer.json")).unwrap()
    );
    assert!(!out.join("pytorch_model.bin").exists() && !out.join(".cache").exists());
    let written: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let q = &written["quantization_config"];
    assert_eq!(written["hidden_size"], 24, "the rest of the config is kept");
    assert_eq!(q["quant_method"], "bitsandbytes");
    assert_eq!(q["load_in_4bit"], true);
    assert_eq!(q["bnb_4bit_quant_type"], "nf4");
    assert_eq!(q["bnb_4bit_use_double_quant"], false);
    assert_eq!(q["bnb_4bit_compute_dtype"], "bfloat16");
    assert_eq!(q["bnb_4bit_quant_storage"], "uint8");
    let skip = json!(["lm_head", "model.embed_tokens"]);
    assert_eq!(q["llm_int8_skip_modules"], skip);
    // A config that is not an object, in place: an error, and nothing changed.
    let bad = dir.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    for (name, bytes) in files(&input) {
        let bytes = if name == "config.json" {
            b"[1]".to_vec()
        } else {
            bytes
        };
        std::fs::write(bad.join(name), bytes).unwrap();
    }
    let before = files(&bad);
    assert!(matches!(
        quantize_file(&bad, &bad, &opts),
        Err(Error::Checkpoint { why, .. }) if why.contains("not a JSON object")
    ));
    assert!(
        files(&bad) == before,
        "a failed conversion in place changed the model"
    );
    // An output directory holding the other layout's weights is refused.
    let stale = dir.join("stale");
    std::fs::create_dir_all(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), b"old").unwrap();
    assert!(matches!(
        quantize_file(&input, &stale, &opts),
        Err(Error::Io { why, .. }) if why.contains("model.safetensors")
    ));
    assert_eq!(listing(&stale).len(), 1);
    // In place: the config gains the same quantization_config, the tokenizer is untouched.
    quantize_file(&input, &input, &opts).unwrap();
    assert_eq!(
        std::fs::read(input.join("config.json")).unwrap(),
        std::fs::read(out.join("config.json")).unwrap()
    );
    // Side files linked, as in a Hugging Face cache snapshot, are followed.
    let linked = dir.join("linked");
    std::fs::create_dir_all(&linked).unwrap();
    for name in listing(&input) {
        std::os::unix::fs::symlink(input.join(&name), linked.join(&name)).unwrap();
    }
    let out_linked = dir.join("out-linked");
    let summary = quantize_file(&linked, &out_linked, &opts).unwrap();
    assert_eq!(summary.carried, ["config.json", "tokenizer.json"]);

    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/lora");
    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    std::fs::copy(
        data.join("base.safetensors"),
        base.join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(base.join("config.json"), &config_text).unwrap();
    let merged = dir.join("merged");
    let adapter = Adapter::load(&data.join("plain")).unwrap();
    let summary = merge_checkpoint(&base, &adapter, &merged).unwrap();
    assert_eq!(summary.carried, ["config.json"]);
    assert_eq!(
        std::fs::read_to_string(merged.join("config.json")).unwrap(),
        config_text
    );
    assert!(merged.join("model.safetensors").exists());
    // A quantized model's config: the merge writes NF4 codes as u8, and says so.
    let mut quantized = config.clone();
    quantized["quantization_config"] = json!({"bnb_4bit_quant_storage": "bfloat16"});
    std::fs::write(base.join("config.json"), quantized.to_string()).unwrap();
    merge_checkpoint(&base, &adapter, &merged).unwrap();
    let written: Value =
        serde_json::from_slice(&std::fs::read(merged.join("config.json")).unwrap()).unwrap();
    assert_eq!(
        written["quantization_config"]["bnb_4bit_quant_storage"],
        "uint8"
    );
}

/// Indexes that are not what they claim: typed errors naming the index (and the tensor
/// where one entry is wrong); a shard the index names that is not there: an I/O error
/// naming it. Nothing is written.
#[test]
fn bad_indexes_are_typed_errors() {
    let dir = scratch("bad");
    let index = dir.join(INDEX_FILE);
    let out = dir.join("out");
    for (text, tensor, fragment) in [
        ("{", "", "bad JSON"),
        (r#"{"metadata": {}}"#, "", "no weight_map"),
        (r#"{"weight_map": []}"#, "", "no weight_map"),
        (r#"{"weight_map": {}}"#, "", "no tensors"),
        (
            r#"{"metadata": 3, "weight_map": {"a": "m.safetensors"}}"#,
            "",
            "metadata",
        ),
        (
            r#"{"weight_map": {"a": "../m.safetensors"}}"#,
            "a",
            "not a file name",
        ),
        (
            r#"{"weight_map": {"a": "/tmp/m.safetensors"}}"#,
            "a",
            "not a file name",
        ),
        (r#"{"weight_map": {"b": 7}}"#, "b", "not a file name"),
        (r#"{"weight_map": {"c": "m.bin"}}"#, "c", "not a file name"),
    ] {
        std::fs::write(&index, text).unwrap();
        for r in [
            quantize_file(&dir, &out, &QuantizeOptions::default()).map(|_| ()),
            Layout::find(&index).map(|_| ()),
        ] {
            match r {
                Err(Error::Checkpoint {
                    file,
                    tensor: t,
                    why,
                }) => assert!(
                    file.ends_with(INDEX_FILE) && t == tensor && why.contains(fragment),
                    "{text}: {file}: {t}: {why}"
                ),
                other => panic!("{text}: {other:?}"),
            }
        }
    }
    std::fs::write(&index, r#"{"weight_map": {"a": "gone.safetensors"}}"#).unwrap();
    match quantize_file(&dir, &out, &QuantizeOptions::default()) {
        Err(Error::Io { path, .. }) => assert!(path.ends_with("gone.safetensors"), "{path}"),
        other => panic!("{other:?}"),
    }
    std::fs::remove_file(&index).unwrap();
    match Layout::find(&dir) {
        Err(Error::Io { why, .. }) => assert!(why.contains(INDEX_FILE), "{why}"),
        other => panic!("{other:?}"),
    }
    assert!(!out.exists(), "a failed conversion left {out:?}");
}

/// A failure found after the weights were converted (a `config.json` that is no JSON object,
/// an adapter for a module the base lacks) leaves no output: not the directory the
/// conversion made, nor the missing parents made for it.
#[test]
fn failures_after_the_conversion_leave_no_directory() {
    let mut rng = StdRng::seed_from_u64(rand::random());
    let dir = scratch("late-failure");
    let (input, _) = sharded_model(&dir, &mut rng);
    std::fs::write(input.join("config.json"), "[1]").unwrap();
    let made = dir.join("made");
    let out = made.join("deeper").join("out");
    let opts = QuantizeOptions {
        transpose: vec!["transformer.h.*.c_*.weight".into()],
        ..QuantizeOptions::default()
    };
    match quantize_file(&input, &out, &opts) {
        Err(Error::Checkpoint { file, .. }) => assert!(file.ends_with("config.json"), "{file}"),
        other => panic!("a config.json of [1]: {other:?}"),
    }
    assert!(!made.exists(), "a failed quantize left {made:?}");

    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/lora");
    let adapter = Adapter::load(&data.join("plain")).unwrap();
    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    let whole_bytes = read_file(&data.join("base.safetensors")).unwrap();
    let whole = SafeTensors::deserialize(&whole_bytes).unwrap();
    // Every tensor but the adapted up.weight.
    let kept: Vec<(String, RawTensor)> = whole
        .iter()
        .filter(|(n, _)| *n != "up.weight")
        .map(|(n, v)| (n.to_string(), RawTensor::from(v)))
        .collect();
    write_atomic(&base.join("model.safetensors"), kept, None).unwrap();
    let e = merge_checkpoint(&base, &adapter, &out);
    assert!(e.is_err(), "merged into a base without up.weight");
    assert!(!made.exists(), "a failed merge left {made:?}: {e:?}");
}

/// `fk quantize` and `fk merge` take a sharded checkpoint's directory.
#[test]
fn fk_takes_sharded_checkpoints() {
    let mut rng = StdRng::seed_from_u64(rand::random());
    let dir = scratch("cli");
    let (input, _) = sharded_model(&dir, &mut rng);
    let fk = |args: &[&dyn AsRef<std::ffi::OsStr>]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_fk"))
            .args(args.iter().map(|a| a.as_ref()))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{err}");
    };
    let (cli, lib) = (dir.join("cli"), dir.join("lib"));
    let t = "--transpose";
    fk(&[&"quantize", &input, &cli, &t, &"transformer.h.*.c_*.weight"]);
    let opts = QuantizeOptions {
        transpose: vec!["transformer.h.*.c_*.weight".into()],
        ..QuantizeOptions::default()
    };
    quantize_file(&input, &lib, &opts).unwrap();
    assert!(check_index(&cli) == check_index(&lib));

    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/lora");
    let whole_bytes = read_file(&data.join("base.safetensors")).unwrap();
    let whole = SafeTensors::deserialize(&whole_bytes).unwrap();
    let raw = |name: &str| {
        (
            name.to_string(),
            RawTensor::from(whole.tensor(name).unwrap()),
        )
    };
    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    write_sharded(
        &base,
        &[vec![raw("up.weight")], vec![raw("block.down.weight")]],
    );
    let (cli, lib) = (dir.join("cli-merge"), dir.join("lib-merge"));
    fk(&[&"merge", &base, &data.join("plain"), &cli]);
    merge_checkpoint(&base, &Adapter::load(&data.join("plain")).unwrap(), &lib).unwrap();
    assert!(check_index(&cli) == check_index(&lib));
}
