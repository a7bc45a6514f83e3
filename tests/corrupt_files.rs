//! Corrupt and hostile files against every reader of src/nf4/checkpoint.rs,
//! src/lora/adapter.rs and src/shards.rs, and `fk quantize` / `fk merge`: small valid files
//! the test writes (an NF4 checkpoint with and without double quantization, a float one, a
//! PEFT adapter with its config, a sharded checkpoint with its index), spoiled
//! systematically: truncated at every byte, bytes flipped at random (seeded:
//! `FK_CORRUPT_SEED` replaces the fixed seed; failures print it), the header's length, its
//! dtypes, shapes and offsets lying, the quant state's, the adapter config's and the
//! index's fields wrong. A spoiled file must give an error (a flipped byte may leave a valid
//! file: then a result), never a panic nor an allocation its few KB do not warrant; a
//! failed conversion leaves nothing behind; `fk` exits 2 with a message and leaves its
//! output as it was.

use finetune_kernels::files::read_file;
use finetune_kernels::lora::adapter::{
    merge_checkpoint, Adapter, AdapterConfig, LoraFactors, CONFIG_FILE, WEIGHTS_FILE,
};
use finetune_kernels::nf4::checkpoint::{
    nf4_tensors, quantize_file, Checkpoint, QuantizeOptions, RawTensor, QUANT_STATE_SUFFIX,
};
use finetune_kernels::reference::nf4;
use finetune_kernels::shards::{ShardIndex, INDEX_FILE};
use finetune_kernels::testing::{fresh_dir, random_vec};
use finetune_kernels::{bf16, DType, Error};
use rand::{rngs::StdRng, Rng, SeedableRng};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Map, Value};
use std::alloc::{GlobalAlloc, Layout, System};
use std::borrow::Cow;
use std::cell::Cell;
use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

/// The weight that is NF4, or adapted, in every file here; its module; a tensor beside it.
const W: &str = "layer.q.weight";
const MODULE: &str = "layer.q";
const NORM: &str = "layer.norm.weight";
/// `W`'s shape `[OUT, IN]`: 320 elements, 5 blocks of 64, a nested block of 256.
const OUT: usize = 8;
const IN: usize = 40;
const BLOCKSIZE: usize = 64;
const RANK: usize = 2;
const SHARDS: [&str; 2] = [
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
];

// ------------------------------------------------------------------ allocations

thread_local! {
    static LARGEST_ALLOCATION: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, noting the largest block each thread asks for: a reader that sizes
/// a buffer by a length or shape the file states, before checking it against the file,
/// shows here.
struct NotingAllocator;

fn note(size: usize) {
    let _ = LARGEST_ALLOCATION.try_with(|l| l.set(l.get().max(size)));
}

unsafe impl GlobalAlloc for NotingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: NotingAllocator = NotingAllocator;

/// Far more than any case over these few-KB files needs at once.
const ALLOCATION_LIMIT: usize = 1 << 20;

// ------------------------------------------------------------------ cases

/// How a case must end.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Must {
    /// In an error: the file is not what it claims.
    Fail,
    /// In an error or a result (a flipped byte may leave a valid file), never a panic.
    NotPanic,
}

/// How a case ended.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Ended {
    Ok,
    Err,
    Panicked,
}

/// The seed of the random flips.
fn seed() -> u64 {
    std::env::var("FK_CORRUPT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5EED_F11E)
}

/// The cases run and the failures seen, each named by its input.
struct Cases {
    seed: u64,
    run: usize,
    failures: Vec<String>,
}

impl Cases {
    fn new() -> Self {
        Cases {
            seed: seed(),
            run: 0,
            failures: Vec::new(),
        }
    }

    fn rng(&self) -> StdRng {
        StdRng::seed_from_u64(self.seed)
    }

    fn fail(&mut self, name: &str, why: String) {
        self.failures.push(format!("{name}: {why}"));
    }

    /// Runs `case`, which must end as `must` says, within [`ALLOCATION_LIMIT`]; its error
    /// must say each of `says`.
    fn check<T>(
        &mut self,
        name: &str,
        must: Must,
        says: &[&str],
        case: impl FnOnce() -> Result<T, Error>,
    ) -> Ended {
        self.run += 1;
        LARGEST_ALLOCATION.set(0);
        let outcome = catch_unwind(AssertUnwindSafe(case));
        let largest = LARGEST_ALLOCATION.get();
        if largest > ALLOCATION_LIMIT {
            self.fail(name, format!("allocated {largest} bytes at once"));
        }
        match outcome {
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("?");
                self.fail(name, format!("panicked: {message}"));
                Ended::Panicked
            }
            Ok(Ok(_)) => {
                if must == Must::Fail {
                    self.fail(name, "accepted".into());
                }
                Ended::Ok
            }
            Ok(Err(e)) => {
                let message = e.to_string();
                if let Some(s) = says.iter().find(|s| !message.contains(*s)) {
                    self.fail(name, format!("the error does not say {s:?}: {message}"));
                }
                Ended::Err
            }
        }
    }

    /// [`Cases::check`] for a conversion writing `out` in `dir`: one that fails must leave
    /// `dir` as it found it (no output, no temporary file, an existing output unchanged).
    /// `out` is removed afterwards.
    fn conversion<T>(
        &mut self,
        name: &str,
        must: Must,
        says: &[&str],
        (dir, out): (&Path, &Path),
        convert: impl FnOnce() -> Result<T, Error>,
    ) {
        let before = snapshot(dir);
        if self.check(name, must, says, convert) != Ended::Ok {
            let after = snapshot(dir);
            if after != before {
                let names = |s: &Snapshot| s.keys().cloned().collect::<Vec<_>>();
                let why = format!("left {:?}, found {:?}", names(&after), names(&before));
                self.fail(name, why);
            }
        }
        remove(out);
    }

    /// `fk quantize`'s and `fk merge`'s library calls on `input`, as [`Cases::conversion`].
    fn quantize_and_merge(
        &mut self,
        name: &str,
        spoiled: (Must, &[&str]),
        (input, adapter): (&Path, &Adapter),
        (dir, out): (&Path, &Path),
    ) {
        let (must, says) = spoiled;
        self.conversion(&format!("{name}: quantize"), must, says, (dir, out), || {
            quantize_file(input, out, &QuantizeOptions::default())
        });
        self.conversion(&format!("{name}: merge"), must, says, (dir, out), || {
            merge_checkpoint(input, adapter, out)
        });
    }

    /// Panics naming every failure, and the seed.
    fn finish(self) {
        assert!(
            self.failures.is_empty(),
            "{} of {} cases failed (seed {}):\n{}",
            self.failures.len(),
            self.run,
            self.seed,
            self.failures.join("\n")
        );
    }
}

/// A directory's entries: each file's bytes, `None` for a directory.
type Snapshot = BTreeMap<String, Option<Vec<u8>>>;

fn snapshot(dir: &Path) -> Snapshot {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let path = e.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            (name, std::fs::read(&path).ok())
        })
        .collect()
}

fn remove(path: &Path) {
    let _ = std::fs::remove_file(path).or_else(|_| std::fs::remove_dir_all(path));
}

fn scratch(name: &str) -> PathBuf {
    fresh_dir(
        Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join("corrupt")
            .join(name),
    )
}

// ------------------------------------------------------------------ valid files

fn raw<T: bytemuck::Pod>(dtype: Dtype, shape: Vec<usize>, values: &[T]) -> RawTensor<'static> {
    RawTensor {
        dtype,
        shape,
        data: Cow::Owned(bytemuck::cast_slice(values).to_vec()),
    }
}

fn serialize(tensors: Vec<(String, RawTensor)>) -> Vec<u8> {
    safetensors::serialize(tensors, None).unwrap()
}

/// `W` `[OUT, IN]` quantized to NF4 from bf16, and `NORM` in bf16.
fn nf4_file(double_quant: bool, rng: &mut StdRng) -> Vec<u8> {
    let w: Vec<bf16> = random_vec(rng, OUT * IN, 1.0);
    let q = nf4::quantize(&w, &[OUT, IN], BLOCKSIZE, double_quant).unwrap();
    let mut tensors = nf4_tensors(W, &q).unwrap();
    let norm: Vec<bf16> = random_vec(rng, OUT, 1.0);
    tensors.push((NORM.into(), raw(Dtype::BF16, vec![OUT], &norm)));
    serialize(tensors)
}

/// The weights `names`, each f32 `[OUT, IN]`.
fn float_file(names: &[&str], rng: &mut StdRng) -> Vec<u8> {
    let tensors = names.iter().map(|name| {
        let w: Vec<f32> = random_vec(rng, OUT * IN, 1.0);
        (name.to_string(), raw(Dtype::F32, vec![OUT, IN], &w))
    });
    serialize(tensors.collect())
}

/// An adapter of `module` (`[OUT, IN]`) of rank `rank`, saved in `dir`.
fn save_adapter(dir: &Path, module: &str, rank: usize, rng: &mut StdRng) -> Adapter {
    let factors = LoraFactors {
        a: random_vec(rng, rank * IN, 0.1),
        b: random_vec(rng, OUT * rank, 0.1),
        d_in: IN,
        d_out: OUT,
        dtype: DType::F32,
    };
    let adapter = Adapter {
        config: AdapterConfig {
            r: rank,
            lora_alpha: 16.0,
            use_rslora: false,
            lora_dropout: 0.05,
            target_modules: None,
            base_model_name_or_path: None,
            task_type: Some("CAUSAL_LM".into()),
        },
        modules: BTreeMap::from([(module.to_string(), factors)]),
    };
    adapter.save(dir).unwrap();
    adapter
}

/// Two shards in `dir` (`W` in the first, `layer.k.weight` and `NORM` in the second) and
/// the index: its weight map.
fn write_shards(dir: &Path, rng: &mut StdRng) -> Map<String, Value> {
    let contents = [&[W][..], &["layer.k.weight", NORM]];
    let mut weight_map = Map::new();
    for (shard, names) in SHARDS.iter().zip(contents) {
        std::fs::write(dir.join(shard), float_file(names, rng)).unwrap();
        for name in names {
            weight_map.insert(name.to_string(), json!(shard));
        }
    }
    write_index(dir, &weight_map);
    weight_map
}

fn write_index(dir: &Path, weight_map: &Map<String, Value>) {
    let index = json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    std::fs::write(dir.join(INDEX_FILE), index.to_string()).unwrap();
}

// ------------------------------------------------------------------ spoiling

/// A safetensors file's header, as a JSON object, and its data.
fn header_and_data(bytes: &[u8]) -> (Map<String, Value>, &[u8]) {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
        &bytes[8 + n..],
    )
}

/// A safetensors file of `header`'s bytes, whatever they are, and `data`.
fn assemble(header: &[u8], data: &[u8]) -> Vec<u8> {
    [&(header.len() as u64).to_le_bytes()[..], header, data].concat()
}

/// `bytes` with its length field saying `n`.
fn with_header_len(bytes: &[u8], n: u64) -> Vec<u8> {
    [&n.to_le_bytes()[..], &bytes[8..]].concat()
}

/// A safetensors file with `edit` applied to its tensor `name`.
fn with_tensor(bytes: &[u8], name: &str, edit: impl FnOnce(&mut RawTensor)) -> Vec<u8> {
    let st = SafeTensors::deserialize(bytes).unwrap();
    let mut tensors: Vec<(String, RawTensor)> = st
        .iter()
        .map(|(n, v)| (n.to_string(), RawTensor::from(v)))
        .collect();
    let (_, tensor) = tensors.iter_mut().find(|(n, _)| n == name).unwrap();
    edit(tensor);
    serialize(tensors)
}

/// Documents that are no JSON object, where one belongs, named: JSON nested deeper than
/// any parser's stack should follow among them.
fn not_objects() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("empty", Vec::new()),
        ("cut short", b"{\"a\": ".to_vec()),
        ("not UTF-8", b"{\"\xff\": 1}".to_vec()),
        ("a list", b"[]".to_vec()),
        ("null", b"null".to_vec()),
        ("a number", b"5".to_vec()),
        ("nested 100,000 deep", "[".repeat(100_000).into_bytes()),
    ]
}

/// How much of a file's bytes [`spoiled`] spoils.
#[derive(Clone, Copy, PartialEq)]
enum Density {
    /// Truncated at every byte, 64 flips per region, every tensor's header entry lying.
    Every,
    /// A sample: for the conversions, which write files.
    Sample,
}

/// A valid file spoiled: how, how reading it must end, and the tensor its error must name
/// where one is at fault.
struct Spoiled {
    what: String,
    must: Must,
    names: Option<String>,
    bytes: Vec<u8>,
}

impl Spoiled {
    fn new(what: String, must: Must, bytes: Vec<u8>) -> Self {
        Spoiled {
            what,
            must,
            names: None,
            bytes,
        }
    }

    fn naming(self, tensor: &str) -> Self {
        let names = Some(tensor.to_string());
        Spoiled { names, ..self }
    }

    /// What its error must say.
    fn says(&self) -> Vec<&str> {
        self.names.iter().map(String::as_str).collect()
    }
}

/// `bytes`, a valid safetensors file, spoiled every way this test knows.
fn spoiled(bytes: &[u8], density: Density, rng: &mut StdRng) -> Vec<Spoiled> {
    let mut out = Vec::new();
    let len = bytes.len();
    let (header, data) = header_and_data(bytes);
    let header_end = len - data.len();
    let truncations: Vec<usize> = match density {
        Density::Every => (0..len).collect(),
        Density::Sample => [0, 4, 8, 9, header_end / 2, header_end - 1, header_end]
            .into_iter()
            .chain((1..8).map(|i| header_end + i * data.len() / 8))
            .chain([len - 1])
            .collect(),
    };
    for at in truncations {
        let name = format!("truncated to {at} of {len} bytes");
        out.push(Spoiled::new(name, Must::Fail, bytes[..at].to_vec()));
    }
    let appended = [bytes, &[0]].concat();
    out.push(Spoiled::new("a byte appended".into(), Must::Fail, appended));

    let n = (header_end - 8) as u64;
    for lie in [
        0,
        1,
        n - 1,
        n + 1,
        n + 8,
        len as u64 - 8,
        len as u64,
        100_000_000,
        100_000_001,
        u32::MAX as u64,
        1 << 63,
        u64::MAX - 7,
        u64::MAX,
    ] {
        let name = format!("header length {lie} (it is {n})");
        out.push(Spoiled::new(name, Must::Fail, with_header_len(bytes, lie)));
    }
    for i in 0..8 {
        let mut b = bytes.to_vec();
        b[i] ^= rng.random_range(1..=255u8);
        let name = format!("length byte {i} flipped to {:#04x}", b[i]);
        out.push(Spoiled::new(name, Must::Fail, b));
    }
    let flips = match density {
        Density::Every => 64,
        Density::Sample => 4,
    };
    for (region, range) in [("header", 8..header_end), ("data", header_end..len)] {
        for _ in 0..flips {
            let (at, to) = (rng.random_range(range.clone()), rng.random::<u8>());
            let mut b = bytes.to_vec();
            b[at] = to;
            let name = format!("{region} byte {at} set to {to:#04x}");
            out.push(Spoiled::new(name, Must::NotPanic, b));
        }
    }

    let mut whole_headers = not_objects();
    whole_headers.extend([
        ("no tensors", b"{}".to_vec()),
        (
            "metadata not strings",
            br#"{"__metadata__": {"a": 3}}"#.to_vec(),
        ),
        ("metadata a list", br#"{"__metadata__": []}"#.to_vec()),
    ]);
    for (what, h) in whole_headers {
        out.push(Spoiled::new(
            format!("header {what}"),
            Must::Fail,
            assemble(&h, data),
        ));
    }
    let mut extra = header.clone();
    let end = data.len() as u64;
    extra.insert(
        "extra".into(),
        json!({"dtype": "U8", "shape": [4], "data_offsets": [end, end + 4]}),
    );
    let past_the_data = serde_json::to_vec(&extra).unwrap();
    out.push(Spoiled::new(
        "a tensor past the data".into(),
        Must::Fail,
        assemble(&past_the_data, data),
    ));

    let mut names: Vec<&String> = header.keys().filter(|k| *k != "__metadata__").collect();
    if density == Density::Sample {
        names.truncate(1);
    }
    for name in names {
        for (what, entry) in entry_lies(&header[name]) {
            let mut h = header.clone();
            h.insert(name.clone(), entry);
            let bytes = assemble(&serde_json::to_vec(&h).unwrap(), data);
            let lie = Spoiled::new(format!("{name}: {what}"), Must::Fail, bytes);
            out.push(lie.naming(name));
        }
    }
    out
}

/// A header entry (`dtype`, `shape`, `data_offsets`) lying each way, named.
fn entry_lies(entry: &Value) -> Vec<(String, Value)> {
    let [s, e] = [0, 1].map(|i| entry["data_offsets"][i].as_u64().unwrap());
    let other_size = if entry["dtype"] == "F64" { "U8" } else { "F64" };
    let mut lies: Vec<(&str, Option<Value>)> = vec![
        ("shape", Some(json!([1u64 << 32, 1u64 << 32, 2]))),
        ("shape", Some(json!([u64::MAX, 2]))),
        ("shape", Some(json!([1u64 << 62]))),
        ("shape", Some(json!([-1]))),
        ("shape", Some(json!("8"))),
        ("dtype", Some(json!("Q4"))),
        ("dtype", Some(json!(other_size))),
        ("dtype", Some(json!("F4"))),
        ("dtype", Some(json!(7))),
        ("data_offsets", Some(json!([s, e + 1]))),
        ("data_offsets", Some(json!([s + 1, e + 1]))),
        ("data_offsets", Some(json!([e, s]))),
        ("data_offsets", Some(json!([u64::MAX - 1, u64::MAX]))),
        ("data_offsets", Some(json!([-1, e]))),
        ("data_offsets", Some(json!([s]))),
        ("data_offsets", Some(json!("x"))),
        ("dtype", None),
        ("shape", None),
        ("data_offsets", None),
    ];
    if s > 0 {
        lies.push(("data_offsets", Some(json!([s - 1, e - 1]))));
    }
    lies.into_iter()
        .filter(|(key, value)| value.as_ref() != Some(&entry[*key]))
        .map(|(key, value)| {
            let (what, lying) = lie(entry.as_object().unwrap(), key, value);
            (what, Value::Object(lying))
        })
        .collect()
}

/// `object` with `field` set to `value` (removed for `None`), and what that did.
fn lie(
    object: &Map<String, Value>,
    field: &str,
    value: Option<Value>,
) -> (String, Map<String, Value>) {
    let mut lying = object.clone();
    let what = match value {
        Some(v) => {
            let what = format!("{field} {v}");
            lying.insert(field.into(), v);
            what
        }
        None => {
            lying.remove(field);
            format!("no {field}")
        }
    };
    (what, lying)
}

/// An NF4 quant state's fields lying: `(field, value)`, `None` for a field removed.
fn quant_state_lies(double_quant: bool) -> Vec<(&'static str, Option<Value>)> {
    let mut lies = vec![
        ("quant_type", Some(json!("fp4"))),
        ("quant_type", Some(json!("NF4"))),
        ("quant_type", Some(json!(4))),
        ("quant_type", None),
        ("blocksize", Some(json!(0))),
        ("blocksize", Some(json!(1))),
        ("blocksize", Some(json!(48))),
        ("blocksize", Some(json!(1u64 << 40))),
        ("blocksize", Some(json!(u64::MAX))),
        ("blocksize", Some(json!(-64))),
        ("blocksize", Some(json!("64"))),
        ("blocksize", Some(json!(64.5))),
        ("blocksize", None),
        ("dtype", Some(json!("int8"))),
        ("dtype", Some(json!(16))),
        ("dtype", None),
        ("shape", Some(json!([OUT, IN + 1]))),
        ("shape", Some(json!([OUT * 2, IN]))),
        ("shape", Some(json!([]))),
        ("shape", Some(json!([0, IN]))),
        ("shape", Some(json!([1u64 << 32, 1u64 << 32]))),
        ("shape", Some(json!([u64::MAX, 2]))),
        ("shape", Some(json!([-8, IN]))),
        ("shape", Some(json!([8.5, IN]))),
        ("shape", Some(json!("8x40"))),
        ("shape", None),
    ];
    if double_quant {
        lies.extend([
            ("nested_blocksize", Some(json!(0))),
            ("nested_blocksize", Some(json!(1))),
            ("nested_blocksize", Some(json!(5))),
            ("nested_blocksize", Some(json!(1u64 << 63))),
            ("nested_blocksize", Some(json!(-256))),
            ("nested_blocksize", None),
            ("nested_dtype", Some(json!("float16"))),
            ("nested_dtype", None),
            ("nested_offset", Some(json!("x"))),
            ("nested_offset", Some(json!(1e39))),
            ("nested_offset", Some(Value::Null)),
        ]);
    } else {
        lies.push(("nested_offset", Some(json!(0.5))));
    }
    lies
}

/// The quant state blob's tensor, holding `json`.
fn state_blob(json: &[u8]) -> RawTensor<'static> {
    raw(Dtype::U8, vec![json.len()], json)
}

/// The NF4 file `bytes` with its quant state's field lying each way (`fk quantize` and
/// `fk merge` must refuse them as the reader does), and blobs that are no quant state.
fn quant_state_spoiled(bytes: &[u8], double_quant: bool) -> Vec<Spoiled> {
    let state_name = format!("{W}{QUANT_STATE_SUFFIX}");
    let st = SafeTensors::deserialize(bytes).unwrap();
    let state: Map<String, Value> =
        serde_json::from_slice(st.tensor(&state_name).unwrap().data()).unwrap();
    let mut out = Vec::new();
    for (field, value) in quant_state_lies(double_quant) {
        let (what, lying) = lie(&state, field, value);
        let blob = state_blob(&serde_json::to_vec(&lying).unwrap());
        let bytes = with_tensor(bytes, &state_name, |t| *t = blob);
        out.push((format!("quant state {what}"), bytes));
    }
    for (what, blob) in not_objects() {
        let blob = state_blob(&blob);
        let bytes = with_tensor(bytes, &state_name, |t| *t = blob);
        out.push((format!("quant state {what}"), bytes));
    }
    let as_f32 = with_tensor(bytes, &state_name, |t| {
        let padded = [
            &t.data[..],
            &[b' '; 4][..t.data.len().next_multiple_of(4) - t.data.len()],
        ]
        .concat();
        *t = RawTensor {
            dtype: Dtype::F32,
            shape: vec![padded.len() / 4],
            data: Cow::Owned(padded),
        }
    });
    out.push(("quant state stored as f32".into(), as_f32));
    out.into_iter()
        .map(|(what, bytes)| Spoiled::new(what, Must::Fail, bytes).naming(W))
        .collect()
}

/// Parses a checkpoint and dequantizes its NF4 weights, which the reader vouched for.
fn read_checkpoint(bytes: &[u8]) -> Result<(), Error> {
    let ckpt = Checkpoint::parse(bytes, "spoiled.safetensors")?;
    for q in ckpt.nf4.values() {
        q.dequantize::<f32>();
    }
    Ok(())
}

// ------------------------------------------------------------------ tests

/// A test's cases, their generator, its fresh directory `name` and an adapter of `MODULE`
/// saved there.
fn setup(name: &str) -> (Cases, StdRng, PathBuf, Adapter) {
    let cases = Cases::new();
    let mut rng = cases.rng();
    let dir = scratch(name);
    let adapter = save_adapter(&dir.join("adapter"), MODULE, RANK, &mut rng);
    (cases, rng, dir, adapter)
}

/// NF4 checkpoints, double-quantized and plain, spoiled every way: the reader, and
/// `fk quantize` and `fk merge` over a sample and every quant state lie.
#[test]
fn spoiled_nf4_checkpoints_are_errors() {
    let (mut cases, mut rng, dir, adapter) = setup("nf4");
    let (input, out) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    for double_quant in [true, false] {
        let kind = if double_quant { "nf4 dq" } else { "nf4" };
        let bytes = nf4_file(double_quant, &mut rng);
        for s in spoiled(&bytes, Density::Every, &mut rng) {
            let name = format!("{kind}: {}", s.what);
            cases.check(&name, s.must, &s.says(), || read_checkpoint(&s.bytes));
        }
        let mut conversions = spoiled(&bytes, Density::Sample, &mut rng);
        conversions.extend(quant_state_spoiled(&bytes, double_quant));
        for s in conversions {
            std::fs::write(&input, &s.bytes).unwrap();
            let name = format!("{kind}: {}", s.what);
            let io = (dir.as_path(), out.as_path());
            cases.check(&format!("{name}: read"), s.must, &s.says(), || {
                read_checkpoint(&s.bytes)
            });
            let spoiled = (s.must, &s.says()[..]);
            cases.quantize_and_merge(&name, spoiled, (&input, &adapter), io);
        }
    }
    cases.finish();
}

/// A float checkpoint spoiled, through `fk quantize` and `fk merge`; its weight's shape and
/// dtype lying about what the adapter adapts.
#[test]
fn spoiled_float_checkpoints_are_errors() {
    let (mut cases, mut rng, dir, adapter) = setup("float");
    let (input, out) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    let bytes = float_file(&[W, NORM], &mut rng);
    let io = (dir.as_path(), out.as_path());
    for s in spoiled(&bytes, Density::Sample, &mut rng) {
        std::fs::write(&input, &s.bytes).unwrap();
        let spoiled = (s.must, &s.says()[..]);
        cases.quantize_and_merge(&s.what, spoiled, (&input, &adapter), io);
    }
    // Not the weight the adapter adapts (quantize takes it as the file says).
    for (what, lying) in [
        (
            "transposed",
            with_tensor(&bytes, W, |t| t.shape = vec![IN, OUT]),
        ),
        ("I32", with_tensor(&bytes, W, |t| t.dtype = Dtype::I32)),
    ] {
        std::fs::write(&input, &lying).unwrap();
        cases.conversion(
            &format!("weight {what}: merge"),
            Must::Fail,
            &[W],
            io,
            || merge_checkpoint(&input, &adapter, &out),
        );
    }
    cases.finish();
}

/// A config's field lying: `(field, value)`, `None` for a field removed.
fn config_lies() -> Vec<(&'static str, Option<Value>)> {
    vec![
        ("r", Some(json!(0))),
        ("r", Some(json!(-2))),
        ("r", Some(json!(2.5))),
        ("r", Some(json!("2"))),
        ("r", Some(json!(true))),
        ("r", Some(json!(RANK + 1))),
        ("r", Some(json!(1u64 << 40))),
        ("r", Some(json!(u64::MAX))),
        ("r", Some(json!(1e20))),
        ("r", None),
        ("lora_alpha", Some(json!("16"))),
        ("lora_alpha", Some(json!(1e300))),
        ("lora_alpha", Some(json!([]))),
        ("use_rslora", Some(json!("yes"))),
        ("lora_dropout", Some(json!("0.1"))),
        ("lora_dropout", Some(json!(1.5))),
        ("lora_dropout", Some(json!(-0.5))),
        ("lora_dropout", Some(json!(1e300))),
        ("target_modules", Some(json!(5))),
        ("target_modules", Some(json!({"q": 1}))),
        ("target_modules", Some(json!([1]))),
        ("peft_type", Some(json!("LOHA"))),
        ("peft_type", Some(json!(5))),
        ("peft_type", None),
        ("bias", Some(json!("all"))),
        ("use_dora", Some(json!(true))),
        ("init_lora_weights", Some(json!("pissa"))),
        ("base_model_name_or_path", Some(json!(5))),
        ("task_type", Some(json!([]))),
    ]
}

/// A PEFT adapter spoiled: its weights every way, its config's fields, ranks that disagree,
/// a module the base does not have.
#[test]
fn spoiled_adapters_are_errors() {
    let mut cases = Cases::new();
    let mut rng = cases.rng();
    let dir = scratch("adapter");
    let (adapter_dir, spoiled_dir) = (dir.join("adapter"), dir.join("spoiled"));
    save_adapter(&adapter_dir, MODULE, RANK, &mut rng);
    std::fs::create_dir_all(&spoiled_dir).unwrap();
    let weights = std::fs::read(adapter_dir.join(WEIGHTS_FILE)).unwrap();
    let config = std::fs::read(adapter_dir.join(CONFIG_FILE)).unwrap();
    let mut load = |name: &str, must: Must, says: &[&str], weights: &[u8], config: &[u8]| {
        std::fs::write(spoiled_dir.join(WEIGHTS_FILE), weights).unwrap();
        std::fs::write(spoiled_dir.join(CONFIG_FILE), config).unwrap();
        cases.check(name, must, says, || Adapter::load(&spoiled_dir));
    };
    for s in spoiled(&weights, Density::Every, &mut rng) {
        load(
            &format!("weights {}", s.what),
            s.must,
            &s.says(),
            &s.bytes,
            &config,
        );
    }
    let fields: Map<String, Value> = serde_json::from_slice(&config).unwrap();
    for (field, value) in config_lies() {
        let (what, lying) = lie(&fields, field, value);
        let lying = serde_json::to_vec(&lying).unwrap();
        load(
            &format!("config {what}"),
            Must::Fail,
            &[field],
            &weights,
            &lying,
        );
    }
    for (what, text) in not_objects() {
        load(
            &format!("config {what}"),
            Must::Fail,
            &[CONFIG_FILE],
            &weights,
            &text,
        );
    }
    // Ranks that disagree: B's with A's, both with the config's.
    let b_name = format!("base_model.model.{MODULE}.lora_B.weight");
    let wider_b = with_tensor(&weights, &b_name, |t| {
        *t = raw(Dtype::F32, vec![OUT, RANK + 1], &[0f32; OUT * (RANK + 1)])
    });
    load(
        "lora_B of another rank",
        Must::Fail,
        &[&b_name],
        &wider_b,
        &config,
    );
    let rank_3 = dir.join("rank-3");
    save_adapter(&rank_3, MODULE, RANK + 1, &mut rng);
    let weights_3 = std::fs::read(rank_3.join(WEIGHTS_FILE)).unwrap();
    load(
        "tensors of rank 3, r = 2",
        Must::Fail,
        &["lora_A"],
        &weights_3,
        &config,
    );

    // A module the base does not have.
    let absent = save_adapter(&dir.join("absent"), "layer.absent", RANK, &mut rng);
    let (base, out) = (dir.join("base.safetensors"), dir.join("out.safetensors"));
    std::fs::write(&base, float_file(&[W, NORM], &mut rng)).unwrap();
    cases.conversion(
        "an adapter of a module the base lacks",
        Must::Fail,
        &["layer.absent.weight"],
        (&dir, &out),
        || merge_checkpoint(&base, &absent, &out),
    );
    cases.finish();
}

/// A sharded checkpoint whose index lies (a missing shard, a tensor its shard lacks, a
/// tensor in another shard than the index says, the index spoiled), or whose shard is
/// spoiled: `fk quantize` and `fk merge` over its directory fail and leave no output.
#[test]
fn spoiled_sharded_checkpoints_are_errors() {
    let (mut cases, mut rng, dir, adapter) = setup("shards");
    let (input, out) = (dir.join("in"), dir.join("out"));
    std::fs::create_dir_all(&input).unwrap();
    let weight_map = write_shards(&input, &mut rng);
    let index = std::fs::read(input.join(INDEX_FILE)).unwrap();
    let shards = SHARDS.map(|s| std::fs::read(input.join(s)).unwrap());

    // Each case writes the shards and the index it spoils, the rest as they were.
    let convert = |cases: &mut Cases,
                   name: &str,
                   must: Must,
                   says: &[&str],
                   index: &[u8],
                   shards: &[Vec<u8>]| {
        std::fs::write(input.join(INDEX_FILE), index).unwrap();
        for (shard, bytes) in SHARDS.iter().zip(shards) {
            std::fs::write(input.join(shard), bytes).unwrap();
        }
        let io = (dir.as_path(), out.as_path());
        cases.quantize_and_merge(name, (must, says), (&input, &adapter), io);
    };
    let lying_map = |tensor: &str, shard: &str| {
        let mut map = weight_map.clone();
        map.insert(tensor.into(), json!(shard));
        json!({"weight_map": map}).to_string().into_bytes()
    };
    let missing = "model-00003-of-00003.safetensors";
    for (what, says, lying) in [
        ("a missing shard", missing, lying_map(NORM, missing)),
        (
            "a tensor its shard lacks",
            SHARDS[0],
            lying_map("layer.v.weight", SHARDS[0]),
        ),
        (
            "a tensor in the other shard",
            NORM,
            lying_map(NORM, SHARDS[0]),
        ),
    ] {
        let name = format!("index names {what}");
        convert(&mut cases, &name, Must::Fail, &[says], &lying, &shards);
    }
    let trimmed = index.trim_ascii_end();
    for at in 0..trimmed.len() {
        let name = format!("index truncated to {at} of {} bytes", trimmed.len());
        let must_fail = ShardIndex::parse(&String::from_utf8_lossy(&trimmed[..at]), "index");
        cases.check(&name, Must::Fail, &[], || must_fail);
    }
    for _ in 0..16 {
        let (at, to) = (rng.random_range(0..index.len()), rng.random::<u8>());
        let mut spoiled = index.clone();
        spoiled[at] = to;
        let name = format!("index byte {at} set to {to:#04x}");
        convert(&mut cases, &name, Must::NotPanic, &[], &spoiled, &shards);
    }
    let not_utf8 = b"{\"\xff\": 1}";
    convert(
        &mut cases,
        "index not UTF-8",
        Must::Fail,
        &[INDEX_FILE],
        not_utf8,
        &shards,
    );
    for s in spoiled(&shards[1], Density::Sample, &mut rng) {
        let name = format!("{}: {}", SHARDS[1], s.what);
        let spoiled_shards = [shards[0].clone(), s.bytes.clone()];
        convert(
            &mut cases,
            &name,
            s.must,
            &s.says(),
            &index,
            &spoiled_shards,
        );
    }
    cases.finish();
}

/// Runs `fk args`: `Ok` where it succeeds, its message as an error where it exits 2 with
/// one, a panic (which [`Cases::check`] records) for anything else.
fn fk(args: &[&OsStr]) -> Result<(), Error> {
    let run = std::process::Command::new(env!("CARGO_BIN_EXE_fk"))
        .args(args)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&run.stderr).into_owned();
    match run.status.code() {
        Some(0) => Ok(()),
        Some(2) if said.starts_with("fk: ") && !said.contains("panicked") => {
            Err(Error::InvalidArgument {
                what: "fk",
                why: said,
            })
        }
        code => panic!("fk exited with {code:?}: {said}"),
    }
}

/// `fk quantize` and `fk merge` on a sample of spoiled files (a checkpoint, an NF4 one, an
/// adapter's weights and config, a sharded checkpoint's index): exit 2 with a message, and
/// the output as it was: absent, or an existing file's bytes.
#[test]
fn fk_refuses_spoiled_files_and_writes_nothing() {
    let mut cases = Cases::new();
    let mut rng = cases.rng();
    let dir = scratch("fk");
    let adapter = dir.join("adapter");
    save_adapter(&adapter, MODULE, RANK, &mut rng);
    let (input, out) = (dir.join("in.safetensors"), dir.join("out.safetensors"));
    let float = float_file(&[W, NORM], &mut rng);
    let nf4 = nf4_file(true, &mut rng);
    let mut inputs: Vec<Spoiled> = spoiled(&float, Density::Sample, &mut rng)
        .into_iter()
        .filter(|s| s.must == Must::Fail)
        .step_by(5)
        .collect();
    inputs.extend(quant_state_spoiled(&nf4, true).into_iter().step_by(6));
    for (i, s) in inputs.into_iter().enumerate() {
        std::fs::write(&input, &s.bytes).unwrap();
        for command in ["quantize", "merge"] {
            if i % 2 == 0 {
                std::fs::write(&out, b"old").unwrap();
            }
            let args: Vec<&OsStr> = match command {
                "quantize" => vec![command.as_ref(), input.as_ref(), out.as_ref()],
                _ => vec![
                    command.as_ref(),
                    input.as_ref(),
                    adapter.as_ref(),
                    out.as_ref(),
                ],
            };
            let name = format!("fk {command}: {}", s.what);
            cases.conversion(&name, Must::Fail, &s.says(), (&dir, &out), || fk(&args));
        }
    }

    // The adapter spoiled: its weights truncated, its rank 0, a module the base lacks.
    std::fs::write(&input, &float).unwrap();
    let [truncated, rank_0, absent] = ["truncated", "rank-0", "absent"].map(|d| dir.join(d));
    save_adapter(&truncated, MODULE, RANK, &mut rng);
    let weights = std::fs::read(truncated.join(WEIGHTS_FILE)).unwrap();
    std::fs::write(truncated.join(WEIGHTS_FILE), &weights[..weights.len() / 2]).unwrap();
    save_adapter(&rank_0, MODULE, RANK, &mut rng);
    let mut config: Value =
        serde_json::from_slice(&read_file(&rank_0.join(CONFIG_FILE)).unwrap()).unwrap();
    config["r"] = json!(0);
    std::fs::write(rank_0.join(CONFIG_FILE), config.to_string()).unwrap();
    save_adapter(&absent, "layer.absent", RANK, &mut rng);
    for (what, says, adapter) in [
        ("weights truncated", WEIGHTS_FILE, &truncated),
        ("r 0", "r must be a positive integer", &rank_0),
        ("of a module the base lacks", "layer.absent.weight", &absent),
    ] {
        let args = [
            "merge".as_ref(),
            input.as_ref(),
            adapter.as_ref(),
            out.as_ref(),
        ];
        let name = format!("fk merge: adapter {what}");
        cases.conversion(&name, Must::Fail, &[says], (&dir, &out), || fk(&args));
    }

    // A sharded checkpoint whose index puts a tensor in a shard that lacks it.
    let (shards, out_dir) = (dir.join("shards"), dir.join("out"));
    std::fs::create_dir_all(&shards).unwrap();
    let mut weight_map = write_shards(&shards, &mut rng);
    weight_map.insert("layer.v.weight".into(), json!(SHARDS[0]));
    write_index(&shards, &weight_map);
    for args in [
        vec!["quantize".as_ref(), shards.as_os_str(), out_dir.as_ref()],
        vec![
            "merge".as_ref(),
            shards.as_os_str(),
            adapter.as_ref(),
            out_dir.as_ref(),
        ],
    ] {
        let name = format!("fk {:?}: index names a tensor its shard lacks", args[0]);
        cases.conversion(
            &name,
            Must::Fail,
            &["layer.v.weight"],
            (&dir, &out_dir),
            || fk(&args),
        );
    }
    cases.finish();
}
