//! NF4 weights in safetensors checkpoints, in the layout bitsandbytes and transformers use,
//! and `fk quantize` ([`quantize_file`]).
//!
//! bitsandbytes' `Linear4bit` saves its weight `<module>.weight` as these tensors
//! (`QuantState.as_dict(packed=True)`; transformers reads them back with
//! `Params4bit.from_prequantized`):
//!
//! | tensor | dtype, shape | holds |
//! |---|---|---|
//! | `<w>` | u8 `[ceil(n/2), 1]` | the packed codes, element `2i` in the high nibble |
//! | `<w>.absmax` | f32 `[blocks]`, or u8 `[blocks]` when double-quantized | per-block scales |
//! | `<w>.quant_map` | f32 `[16]` | the NF4 table |
//! | `<w>.nested_absmax` | f32 `[ceil(blocks/256)]` | double quant only |
//! | `<w>.nested_quant_map` | f32 `[256]` | double quant only: the 8-bit map |
//! | `<w>.quant_state.bitsandbytes__nf4` | u8 `[len]` | UTF-8 JSON: `quant_type`, `blocksize`, `dtype`, `shape`, and `nested_blocksize`, `nested_dtype`, `nested_offset` when double-quantized |
//!
//! Reading checks every part against the others and fails with [`Error::Checkpoint`] naming
//! the tensor; writing goes to a temporary file renamed over the output at the end.

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::files::{read_file, stage, Staged};
use crate::reference::nf4::{self, check_blocksize, Absmax, NestedAbsmax, Nf4Quantized, NF4_CODE};
use crate::shards::{edit_json_object, header_entries, Layout};
use crate::{bf16, f16};
use safetensors::tensor::{TensorInfo, TensorView};
use safetensors::{Dtype, SafeTensors, View};
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The key that marks an NF4 weight: `<w>` + this holds its JSON quant state.
pub const QUANT_STATE_SUFFIX: &str = ".quant_state.bitsandbytes__nf4";
/// The same key for any bitsandbytes 4-bit type (`fp4` is refused by name).
const ANY_QUANT_STATE: &str = ".quant_state.bitsandbytes__";
/// The suffixes of the other parts of an NF4 weight (the nested ones first: `.absmax` is a
/// suffix of `.nested_absmax`).
const PARTS: [&str; 4] = [
    ".nested_absmax",
    ".nested_quant_map",
    ".absmax",
    ".quant_map",
];

/// A tensor as a safetensors file stores it: little-endian bytes, borrowed from the file
/// that was read or owned.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor<'a> {
    /// The element type, as safetensors names it.
    pub dtype: Dtype,
    /// The dimensions, outermost first.
    pub shape: Vec<usize>,
    /// The elements' little-endian bytes, row-major.
    pub data: Cow<'a, [u8]>,
}

impl RawTensor<'static> {
    fn owned<T: bytemuck::Pod>(dtype: Dtype, shape: Vec<usize>, values: &[T]) -> Self {
        RawTensor {
            dtype,
            shape,
            data: Cow::Owned(bytemuck::cast_slice(values).to_vec()),
        }
    }
}

impl RawTensor<'_> {
    /// The elements as `T`, which must be the tensor's dtype.
    pub fn values<T: bytemuck::Pod>(&self) -> Vec<T> {
        self.data
            .chunks_exact(size_of::<T>())
            .map(bytemuck::pod_read_unaligned)
            .collect()
    }
}

impl<'a> From<TensorView<'a>> for RawTensor<'a> {
    /// A tensor of a parsed file, borrowing its bytes.
    fn from(view: TensorView<'a>) -> Self {
        RawTensor {
            dtype: view.dtype(),
            shape: view.shape().to_vec(),
            data: Cow::Borrowed(view.data()),
        }
    }
}

impl View for RawTensor<'_> {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

/// A checkpoint read whole: its NF4 weights by name (`<module>.weight`), every other tensor
/// as it is, and the file's metadata.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Checkpoint<'a> {
    /// The NF4 weights, each assembled from its parts, by weight name.
    pub nf4: BTreeMap<String, Nf4Quantized>,
    /// Every tensor that is not part of an NF4 weight, by name.
    pub tensors: BTreeMap<String, RawTensor<'a>>,
    /// The file's `__metadata__` map, if it has one.
    pub metadata: Option<HashMap<String, String>>,
}

impl<'a> Checkpoint<'a> {
    /// Parses a safetensors file's bytes (`file` names it in errors).
    pub fn parse(bytes: &'a [u8], file: &str) -> Result<Self> {
        let (st, metadata) = deserialize(bytes, file)?;
        let mut nf4 = BTreeMap::new();
        for weight in nf4_weights(&st, file)? {
            nf4.insert(weight.to_string(), read_nf4(&st, weight, file)?);
        }
        let mut tensors = BTreeMap::new();
        for (name, view) in st.iter() {
            if is_part_of(name, &nf4) {
                continue;
            }
            if let Some(weight) = PARTS.iter().find_map(|p| name.strip_suffix(p)) {
                if st.tensor(weight).is_ok_and(|w| w.dtype() == Dtype::U8) {
                    return Err(Error::checkpoint(
                        file,
                        name,
                        format!("an NF4 part without {weight}{QUANT_STATE_SUFFIX}"),
                    ));
                }
            }
            tensors.insert(name.to_string(), RawTensor::from(view));
        }
        Ok(Checkpoint {
            nf4,
            tensors,
            metadata,
        })
    }

    /// Writes the checkpoint (NF4 weights in bitsandbytes' layout) to `path`, atomically.
    pub fn save(&self, path: &Path) -> Result<()> {
        self.stage(path)?.commit()
    }

    /// Writes the checkpoint beside `path`, to be renamed over it by [`Staged::commit`].
    pub fn stage(&self, path: &Path) -> Result<Staged> {
        let mut out: Vec<(String, RawTensor)> = self
            .tensors
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        for (name, q) in &self.nf4 {
            out.extend(nf4_tensors(name, q)?);
        }
        stage_tensors(path, out, self.metadata.clone())
    }
}

fn deserialize<'a>(
    bytes: &'a [u8],
    file: &str,
) -> Result<(SafeTensors<'a>, Option<HashMap<String, String>>)> {
    let not_safetensors = |e: safetensors::SafeTensorError| {
        // Where one header entry is at fault, name its tensor (safetensors mostly does not).
        let len = bytes
            .get(..8)
            .map(|n| u64::from_le_bytes(n.try_into().unwrap()));
        let header = len.and_then(|n| bytes.get(8..).and_then(|b| b.get(..n.try_into().ok()?)));
        match header.and_then(|h| header_entries(h, file).err()) {
            Some(Error::Checkpoint { tensor, why, .. }) if !tensor.is_empty() => {
                Error::checkpoint(file, &tensor, why)
            }
            _ => Error::checkpoint(file, "", format!("not a valid safetensors file: {e}")),
        }
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(not_safetensors)?;
    let st = SafeTensors::deserialize(bytes).map_err(not_safetensors)?;
    Ok((st, header.metadata().clone()))
}

/// The names of a file's NF4 weights, `<w>` of each `<w>.quant_state.bitsandbytes__nf4`: an
/// error for another bitsandbytes 4-bit type.
fn nf4_weights<'a>(st: &'a SafeTensors, file: &str) -> Result<Vec<&'a str>> {
    let mut weights = Vec::new();
    for name in st.names() {
        if let Some(at) = name.find(ANY_QUANT_STATE) {
            if !name.ends_with(QUANT_STATE_SUFFIX) {
                let kind = &name[at + ANY_QUANT_STATE.len()..];
                return Err(Error::checkpoint(
                    file,
                    name,
                    format!("quant_type {kind:?}: only nf4 is supported"),
                ));
            }
            weights.push(&name[..at]);
        }
    }
    Ok(weights)
}

/// Whether `name` is one of the tensors of an NF4 weight in `nf4`.
fn is_part_of(name: &str, nf4: &BTreeMap<String, Nf4Quantized>) -> bool {
    nf4.contains_key(name)
        || name
            .strip_suffix(QUANT_STATE_SUFFIX)
            .is_some_and(|w| nf4.contains_key(w))
        || PARTS
            .iter()
            .any(|p| name.strip_suffix(p).is_some_and(|w| nf4.contains_key(w)))
}

/// bitsandbytes' name for a weight dtype in the quant state (`str(dtype)` less `torch.`).
fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

/// Reads the NF4 weight `weight` (e.g. `model.layers.0.mlp.up_proj.weight`) from its parts.
pub fn read_nf4(st: &SafeTensors, weight: &str, file: &str) -> Result<Nf4Quantized> {
    let state_name = format!("{weight}{QUANT_STATE_SUFFIX}");
    let get = |suffix: &str, dtype: Dtype, numel: Option<usize>| -> Result<RawTensor> {
        let name = format!("{weight}{suffix}");
        let view = st
            .tensor(&name)
            .map_err(|_| Error::checkpoint(file, &name, "missing".into()))?;
        if view.dtype() != dtype {
            return Err(Error::checkpoint(
                file,
                &name,
                format!("dtype {:?}, expected {dtype:?}", view.dtype()),
            ));
        }
        let n: usize = view.shape().iter().product();
        if let Some(expected) = numel.filter(|&e| e != n) {
            return Err(Error::checkpoint(
                file,
                &name,
                format!(
                    "{n} elements (shape {:?}), expected {expected}",
                    view.shape()
                ),
            ));
        }
        Ok(RawTensor::from(view))
    };
    let state = get(QUANT_STATE_SUFFIX, Dtype::U8, None)?;
    let state =
        QuantState::parse(&state.data).map_err(|why| Error::checkpoint(file, &state_name, why))?;
    let numel = state
        .shape
        .iter()
        .try_fold(1usize, |n, &d| n.checked_mul(d))
        .filter(|&n| n > 0);
    let numel = numel
        .ok_or_else(|| Error::checkpoint(file, &state_name, format!("shape {:?}", state.shape)))?;
    let blocks = numel.div_ceil(state.blocksize);

    let codes = packed_codes(st, weight, numel, file)?;
    let quant_map = get(".quant_map", Dtype::F32, Some(16))?.values::<f32>();
    if let Some(i) = (0..16).find(|&i| quant_map[i].to_bits() != NF4_CODE[i].to_bits()) {
        let why = format!(
            "entry {i} is {}, not the NF4 table's {}",
            quant_map[i], NF4_CODE[i]
        );
        return Err(Error::checkpoint(file, &format!("{weight}.quant_map"), why));
    }
    let absmax = match state.nested {
        None if st.tensor(&format!("{weight}.nested_absmax")).is_ok() => {
            let why = "a .nested_absmax, but no nested_offset: not double-quantized".into();
            return Err(Error::checkpoint(file, &state_name, why));
        }
        None => Absmax::Plain(get(".absmax", Dtype::F32, Some(blocks))?.values()),
        Some((blocksize, offset)) => {
            let map = get(".nested_quant_map", Dtype::F32, Some(256))?.values::<f32>();
            Absmax::Nested(NestedAbsmax {
                codes: get(".absmax", Dtype::U8, Some(blocks))?.values(),
                absmax: get(
                    ".nested_absmax",
                    Dtype::F32,
                    Some(blocks.div_ceil(blocksize)),
                )?
                .values(),
                code: map.try_into().expect("256 checked"),
                offset,
                blocksize,
            })
        }
    };
    let q = Nf4Quantized {
        shape: state.shape,
        dtype: state.dtype,
        blocksize: state.blocksize,
        codes,
        absmax,
    };
    q.validate()
        .map_err(|e| Error::checkpoint(file, weight, e.to_string()))?;
    Ok(q)
}

/// The packed codes of the NF4 weight `weight` of `numel` elements: bytes in a tensor of
/// any dtype (`bnb_4bit_quant_storage`: u8 by default, bf16 or f32 for FSDP), as bitsandbytes
/// packs them into `ceil(numel / (2 · size))` elements of `size` bytes, the last padded.
fn packed_codes(st: &SafeTensors, weight: &str, numel: usize, file: &str) -> Result<Vec<u8>> {
    let view = st
        .tensor(weight)
        .map_err(|_| Error::checkpoint(file, weight, "missing".into()))?;
    let size = view.dtype().bitsize() / 8;
    let expected = numel.div_ceil(2 * size.max(1)) * size;
    if view.dtype().bitsize() % 8 != 0 || view.data().len() != expected {
        let why = format!(
            "{} bytes ({:?} {:?}), expected {expected} for {numel} packed 4-bit codes",
            view.data().len(),
            view.dtype(),
            view.shape()
        );
        return Err(Error::checkpoint(file, weight, why));
    }
    Ok(view.data()[..numel.div_ceil(2)].to_vec())
}

/// The JSON blob of `<w>.quant_state.bitsandbytes__nf4`, checked.
struct QuantState {
    blocksize: usize,
    dtype: DType,
    shape: Vec<usize>,
    /// `(nested_blocksize, nested_offset)` when double-quantized.
    nested: Option<(usize, f32)>,
}

impl QuantState {
    fn parse(bytes: &[u8]) -> std::result::Result<Self, String> {
        let v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format!("bad JSON: {e}"))?;
        let field = |k: &str| {
            v.get(k)
                .ok_or_else(|| format!("no {k:?} in the quant state"))
        };
        let size = |k: &str| {
            field(k)?
                .as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| format!("{k:?} is not a size"))
        };
        let text = |k: &str| {
            field(k)?
                .as_str()
                .ok_or_else(|| format!("{k:?} is not a string"))
        };

        let quant_type = text("quant_type")?;
        if quant_type != "nf4" {
            return Err(format!("quant_type {quant_type:?}: only nf4 is supported"));
        }
        let blocksize = size("blocksize")?;
        check_blocksize("quant_state", blocksize).map_err(|e| e.to_string())?;
        let dtype = match text("dtype")? {
            "bfloat16" => DType::BF16,
            "float16" => DType::F16,
            "float32" => DType::F32,
            other => {
                return Err(format!(
                    "dtype {other:?}: NF4 weights are bfloat16, float16 or float32"
                ))
            }
        };
        let shape = field("shape")?
            .as_array()
            .and_then(|dims| {
                dims.iter()
                    .map(|d| d.as_u64().map(|d| d as usize))
                    .collect::<Option<Vec<_>>>()
            })
            .ok_or("\"shape\" is not a list of sizes")?;
        let nested = match v.get("nested_offset") {
            None => None,
            Some(offset) => {
                let offset = offset.as_f64().map(|o| o as f32).filter(|o| o.is_finite());
                let offset = offset.ok_or("\"nested_offset\" is not a finite number")?;
                if text("nested_dtype")? != "float32" {
                    return Err("nested_dtype must be \"float32\"".into());
                }
                let blocksize = size("nested_blocksize")?;
                // bitsandbytes writes 256, and dequantizes no blocksize but its own.
                check_blocksize("nested_blocksize", blocksize).map_err(|e| e.to_string())?;
                Some((blocksize, offset))
            }
        };
        Ok(QuantState {
            blocksize,
            dtype,
            shape,
            nested,
        })
    }

    /// The JSON as bitsandbytes writes it (`json.dumps` of `as_dict`'s non-tensor items).
    fn to_json(q: &Nf4Quantized) -> String {
        let mut json = format!(
            r#"{{"quant_type": "nf4", "blocksize": {}, "dtype": "{}", "shape": {:?}"#,
            q.blocksize,
            dtype_name(q.dtype),
            q.shape
        );
        if let Absmax::Nested(n) = &q.absmax {
            let offset = serde_json::Value::from(n.offset as f64);
            json += &format!(
                r#", "nested_blocksize": {}, "nested_dtype": "float32", "nested_offset": {offset}"#,
                n.blocksize
            );
        }
        json + "}"
    }
}

/// The tensors bitsandbytes stores for the NF4 weight `weight`.
pub fn nf4_tensors(weight: &str, q: &Nf4Quantized) -> Result<Vec<(String, RawTensor<'static>)>> {
    q.validate()?;
    let name = |suffix: &str| format!("{weight}{suffix}");
    let mut out = vec![
        (
            name(""),
            RawTensor::owned(Dtype::U8, vec![q.codes.len(), 1], &q.codes),
        ),
        (
            name(".quant_map"),
            RawTensor::owned(Dtype::F32, vec![16], &NF4_CODE),
        ),
    ];
    match &q.absmax {
        Absmax::Plain(a) => out.push((
            name(".absmax"),
            RawTensor::owned(Dtype::F32, vec![a.len()], a),
        )),
        Absmax::Nested(n) => out.extend([
            (
                name(".absmax"),
                RawTensor::owned(Dtype::U8, vec![n.codes.len()], &n.codes),
            ),
            (
                name(".nested_absmax"),
                RawTensor::owned(Dtype::F32, vec![n.absmax.len()], &n.absmax),
            ),
            (
                name(".nested_quant_map"),
                RawTensor::owned(Dtype::F32, vec![256], &n.code),
            ),
        ]),
    }
    let json = QuantState::to_json(q).into_bytes();
    out.push((
        name(QUANT_STATE_SUFFIX),
        RawTensor::owned(Dtype::U8, vec![json.len()], &json),
    ));
    Ok(out)
}

/// Writes tensors to `path` as [`crate::files::replace_file`] does. The metadata gets `format: pt`, which
/// transformers asks for, if absent.
pub fn write_atomic<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (String, RawTensor<'a>)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    stage_tensors(path, tensors, metadata)?.commit()
}

/// [`write_atomic`] up to the rename: the file is written and synced beside `path`.
pub fn stage_tensors<'a>(
    path: &Path,
    tensors: impl IntoIterator<Item = (String, RawTensor<'a>)>,
    metadata: Option<HashMap<String, String>>,
) -> Result<Staged> {
    let mut metadata = metadata.unwrap_or_default();
    metadata
        .entry("format".into())
        .or_insert_with(|| "pt".into());
    // safetensors would keep one of two tensors of a name, or panic, and write a header
    // that does not describe its data.
    let tensors: Vec<(String, RawTensor)> = tensors.into_iter().collect();
    let mut names = std::collections::HashSet::new();
    if let Some((name, _)) = tensors.iter().find(|(n, _)| !names.insert(n.as_str())) {
        let why = "two tensors of this name would be written (an NF4 weight's part and a \
                   tensor of the input of the same name?)";
        return Err(Error::checkpoint(
            &path.display().to_string(),
            name,
            why.into(),
        ));
    }
    stage(path, |tmp| {
        safetensors::serialize_to_file(tensors, Some(metadata), tmp).map_err(|e| e.to_string())
    })
}

/// What `fk quantize` converts, and how.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeOptions {
    /// Elements per NF4 block: one of [`nf4::BLOCKSIZES`].
    pub blocksize: usize,
    /// Whether the absmaxes are double-quantized to 8-bit codes (bitsandbytes'
    /// `compress_statistics`).
    pub double_quant: bool,
    /// Glob patterns (`*` any run of characters, `?` one): a 2-D bf16/f16/f32 tensor is
    /// quantized if its name matches one of `include` and none of `exclude`.
    pub include: Vec<String>,
    /// Glob patterns of tensors left as they are even where `include` matches them.
    pub exclude: Vec<String>,
    /// Weights stored `[in, out]` (GPT-2's `Conv1D`), by glob: quantized as their transpose
    /// `[out, in]`, as transformers quantizes them (and reads them back untransposed).
    pub transpose: Vec<String>,
}

/// The default `exclude`: by name, the 2-D weights transformers leaves unquantized in the
/// usual model families (it replaces only `nn.Linear` and `Conv1D`, and not the output
/// head): token and position embeddings (`*embed*`; GPT-2's `wte`, `wpe`; T5's `shared` and
/// relative attention bias), norms, LM heads wherever they sit (`lm_head`, ChatGLM's
/// `output_layer`) and the sequence-classification head (`score`).
pub const DEFAULT_EXCLUDE: [&str; 9] = [
    "*embed*",
    "*norm*",
    "*lm_head*",
    "*wte.weight",
    "*wpe.weight",
    "shared.weight",
    "*relative_attention_bias*",
    "*output_layer*",
    "score.weight",
];

impl Default for QuantizeOptions {
    /// QLoRA's usual setting: blocksize 64, double quantization, the linear weights only
    /// ([`DEFAULT_EXCLUDE`] stay as they are, as transformers leaves them).
    fn default() -> Self {
        QuantizeOptions {
            blocksize: 64,
            double_quant: true,
            include: vec!["*.weight".into()],
            exclude: DEFAULT_EXCLUDE.map(String::from).to_vec(),
            transpose: Vec::new(),
        }
    }
}

impl QuantizeOptions {
    /// Whether the tensor `name` of this dtype and shape gets quantized.
    pub fn selects(&self, name: &str, dtype: Dtype, shape: &[usize]) -> bool {
        is_float_matrix(dtype, shape)
            && self.include.iter().any(|p| glob_match(p, name))
            && !self.exclude.iter().any(|p| glob_match(p, name))
    }
}

fn is_float_matrix(dtype: Dtype, shape: &[usize]) -> bool {
    shape.len() == 2 && matches!(dtype, Dtype::BF16 | Dtype::F16 | Dtype::F32)
}

/// Which way the 2-D weight `name` is stored, where its module's bias (in `headers`, which
/// may come from every shard) says: `nn.Linear`'s `[out, in]` has as many rows as the bias
/// has elements, `Conv1D`'s `[in, out]` as many columns. A square weight, or one without a
/// bias, cannot tell (it is taken as `transpose` says). An error where the bias contradicts
/// `transpose`.
fn check_orientation(
    headers: &BTreeMap<String, TensorInfo>,
    name: &str,
    shape: &[usize],
    transpose: bool,
) -> std::result::Result<(), String> {
    let Some(bias) = name.strip_suffix(".weight").map(|m| format!("{m}.bias")) else {
        return Ok(());
    };
    let Some(&[len]) = headers.get(&bias).map(|b| &b.shape[..]) else {
        return Ok(());
    };
    let (rows, cols) = (shape[0], shape[1]);
    if !transpose && len == cols && len != rows {
        Err(format!(
            "stored [in, out] = [{rows}, {cols}] ({bias} has {len} elements), as GPT-2's \
             Conv1D: transformers quantizes it transposed, so pass --transpose for it (or \
             --exclude it)"
        ))
    } else if transpose && len == rows && len != cols {
        Err(format!(
            "matched by --transpose, but stored [out, in] = [{rows}, {cols}] ({bias} has \
             {len} elements), as nn.Linear: it needs no transpose"
        ))
    } else {
        Ok(())
    }
}

/// `values` `[rows, cols]` quantized as they lie, or (`transpose`) as their transpose.
fn quantize_matrix<T: crate::dtype::FloatElem>(
    values: Vec<T>,
    shape: &[usize],
    transpose: bool,
    opts: &QuantizeOptions,
) -> Result<Nf4Quantized> {
    let (rows, cols) = (shape[0], shape[1]);
    let (values, shape) = if transpose {
        let t = (0..rows * cols).map(|i| values[i % rows * cols + i / rows]);
        (t.collect(), vec![cols, rows])
    } else {
        (values, shape.to_vec())
    };
    nf4::quantize(&values, &shape, opts.blocksize, opts.double_quant)
}

/// `*` matches any run of characters (dots included), `?` any one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Greedy matching with backtracking to the last `*`.
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// What [`quantize_file`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct QuantizeSummary {
    /// The tensors quantized to NF4, by name.
    pub quantized: Vec<String>,
    /// The NF4 weights the input already held (copied as they are), by name.
    pub already_nf4: Vec<String>,
    /// How many tensors were copied unchanged.
    pub copied: usize,
    /// The 2-D bf16/f16/f32 tensors among those, by name: transformers loads a checkpoint
    /// with such weights left as they are only if their modules are in the quantization
    /// config's `llm_int8_skip_modules`.
    pub left_alone: Vec<String>,
    /// Total size of the input weight files read, in bytes (a shard index not counted).
    pub bytes_before: u64,
    /// Total size of the weight files written, in bytes (as [`Self::bytes_before`]: a shard
    /// index and carried side files not counted).
    pub bytes_after: u64,
    /// For a checkpoint found in a directory, the model's other files written beside the
    /// output: its `config.json` with a `quantization_config` for the NF4 weights
    /// (transformers loads them as they are only with one), the tokenizer's copied.
    pub carried: Vec<String>,
}

impl QuantizeSummary {
    /// The modules of the 2-D weights left alone: what transformers' `BitsAndBytesConfig`
    /// needs as `llm_int8_skip_modules` to load them unquantized. `lm_head` too unless an
    /// `lm_head` weight is NF4 (quantized here or before): a list replaces transformers'
    /// default, which keeps the output embedding unquantized, and a model whose head is tied
    /// to its embeddings has no `lm_head` weight in its checkpoint to be left alone.
    pub fn skip_modules(&self) -> Vec<String> {
        let module = |n: &String| n.strip_suffix(".weight").unwrap_or(n).to_string();
        let mut modules: Vec<String> = self.left_alone.iter().map(module).collect();
        let head = |m: &String| m == "lm_head" || m.ends_with(".lm_head");
        let nf4 = self.quantized.iter().chain(&self.already_nf4);
        let quantized_head = nf4.map(module).any(|m| head(&m));
        if !quantized_head && !modules.iter().any(head) {
            modules.push("lm_head".into());
        }
        modules
    }
}

/// `fk quantize`: converts the selected weights of the checkpoint `input` to NF4 and writes
/// `output` with every other tensor copied unchanged. `input` is a safetensors file, or a
/// model directory or shard index as [`Layout::find`] takes them: then `output` is a
/// directory, which gets the weights (shards under their names, beside an index listing
/// every tensor written) and the model's other files, `config.json` given a
/// `quantization_config` ([`QuantizeSummary::carried`]). Each file is read whole into
/// memory; the weights are staged whole before any of them is renamed into place.
pub fn quantize_file(
    input: &Path,
    output: &Path,
    opts: &QuantizeOptions,
) -> Result<QuantizeSummary> {
    check_blocksize("fk quantize", opts.blocksize)?;
    let layout = Layout::find(input)?;
    let headers = layout.headers()?;
    let mut summary = QuantizeSummary::default();
    let mut converted = layout.convert(output, |input, output| {
        quantize_one(input, output, opts, &headers, &mut summary)
    })?;
    summary.quantized.sort();
    summary.already_nf4.sort();
    summary.left_alone.sort();
    if let Some(dir) = layout.model_dir() {
        summary.carried = converted.carry_side_files(dir, |name, bytes| match name {
            "config.json" => with_quantization_config(bytes, opts, &summary),
            _ => Ok(None),
        })?;
    }
    let destinations = converted.destinations();
    converted.commit()?;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let weights = |p: &&PathBuf| p.extension().is_some_and(|e| e == "safetensors");
    summary.bytes_after = destinations.iter().filter(weights).map(|p| size(p)).sum();
    Ok(summary)
}

/// A model's `config.json` with the `quantization_config` transformers reads to load the
/// NF4 weights as they are (bitsandbytes, 4-bit, nf4, the double quantization used, the
/// weights left alone as `llm_int8_skip_modules`, and the compute dtype the config's
/// `torch_dtype` names, else float32, bitsandbytes' default); one already there is replaced.
fn with_quantization_config(
    config: &[u8],
    opts: &QuantizeOptions,
    summary: &QuantizeSummary,
) -> Result<Option<Vec<u8>>> {
    edit_json_object("config.json", config, |fields| {
        let dtypes = ["bfloat16", "float16", "float32"];
        let compute = ["torch_dtype", "dtype"]
            .iter()
            .filter_map(|k| fields.get(*k).and_then(serde_json::Value::as_str))
            .find(|d| dtypes.contains(d))
            .unwrap_or("float32");
        let quantization = serde_json::json!({
            "quant_method": "bitsandbytes",
            "load_in_4bit": true,
            "load_in_8bit": false,
            "_load_in_4bit": true,
            "_load_in_8bit": false,
            "bnb_4bit_quant_type": "nf4",
            "bnb_4bit_use_double_quant": opts.double_quant,
            "bnb_4bit_compute_dtype": compute,
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_skip_modules": summary.skip_modules(),
            "llm_int8_threshold": 6.0,
            "llm_int8_has_fp16_weight": false,
            "llm_int8_enable_fp32_cpu_offload": false,
        });
        fields.insert("quantization_config".into(), quantization);
        true
    })
}

/// [`quantize_file`] for one file (`headers`: every tensor of the checkpoint), adding to
/// `summary`.
fn quantize_one(
    input: &Path,
    output: &Path,
    opts: &QuantizeOptions,
    headers: &BTreeMap<String, TensorInfo>,
    summary: &mut QuantizeSummary,
) -> Result<Staged> {
    let file = input.display().to_string();
    let bytes = read_file(input)?;
    let (st, metadata) = deserialize(&bytes, &file)?;
    // The NF4 weights already there, read as merge reads them first: one that does not hold
    // together is refused, not passed on. Their parts are copied as they are where the codes
    // are stored as u8; codes packed in another dtype (`bnb_4bit_quant_storage`, e.g. bf16
    // under FSDP) are written as u8, the storage the config written beside them names (and
    // their 2-D float codes are not taken for a weight to quantize).
    let (mut kept, mut restored) = (BTreeMap::new(), BTreeMap::new());
    for weight in nf4_weights(&st, &file)? {
        let q = read_nf4(&st, weight, &file)?;
        summary.already_nf4.push(weight.to_string());
        let u8_codes = st.tensor(weight).is_ok_and(|v| v.dtype() == Dtype::U8);
        if u8_codes { &mut kept } else { &mut restored }.insert(weight.to_string(), q);
    }
    let mut out = Vec::new();
    for (weight, q) in &restored {
        out.extend(nf4_tensors(weight, q)?);
    }
    for (name, view) in st.iter() {
        let raw = RawTensor::from(view);
        if is_part_of(name, &restored) {
            continue;
        }
        if is_part_of(name, &kept) || !opts.selects(name, raw.dtype, &raw.shape) {
            if is_float_matrix(raw.dtype, &raw.shape) {
                summary.left_alone.push(name.to_string());
            }
            out.push((name.to_string(), raw));
            summary.copied += 1;
            continue;
        }
        let transpose = opts.transpose.iter().any(|p| glob_match(p, name));
        check_orientation(headers, name, &raw.shape, transpose)
            .map_err(|why| Error::checkpoint(&file, name, why))?;
        let q = match raw.dtype {
            Dtype::BF16 => quantize_matrix(raw.values::<bf16>(), &raw.shape, transpose, opts),
            Dtype::F16 => quantize_matrix(raw.values::<f16>(), &raw.shape, transpose, opts),
            _ => quantize_matrix(raw.values::<f32>(), &raw.shape, transpose, opts),
        };
        let q = q.map_err(|e| Error::checkpoint(&file, name, e.to_string()))?;
        out.extend(nf4_tensors(name, &q)?);
        summary.quantized.push(name.to_string());
    }
    summary.bytes_before += bytes.len() as u64;
    stage_tensors(output, out, metadata)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The skip list names every module left alone, and `lm_head` unless a head was
    /// quantized (a tied head has no weight of its own to leave alone).
    #[test]
    fn skip_modules_keep_the_head() {
        let summary = |quantized: &[&str], left_alone: &[&str]| QuantizeSummary {
            quantized: quantized.iter().map(|s| s.to_string()).collect(),
            left_alone: left_alone.iter().map(|s| s.to_string()).collect(),
            ..QuantizeSummary::default()
        };
        let tied = summary(&["m.q.weight"], &["m.embed_tokens.weight"]);
        assert_eq!(tied.skip_modules(), ["m.embed_tokens", "lm_head"]);
        let kept = summary(&["m.q.weight"], &["lm_head.weight"]);
        assert_eq!(kept.skip_modules(), ["lm_head"]);
        let nested = summary(&["m.q.weight"], &["language_model.lm_head.weight"]);
        assert_eq!(nested.skip_modules(), ["language_model.lm_head"]);
        let quantized = summary(&["m.q.weight", "lm_head.weight"], &[]);
        assert!(quantized.skip_modules().is_empty());
        let before = QuantizeSummary {
            already_nf4: vec!["lm_head.weight".into()],
            ..summary(&[], &["m.embed_tokens.weight"])
        };
        assert_eq!(before.skip_modules(), ["m.embed_tokens"]);
    }

    #[test]
    fn globs() {
        assert!(glob_match("*.weight", "model.layers.0.mlp.up_proj.weight"));
        assert!(!glob_match("*.weight", "model.layers.0.mlp.up_proj.bias"));
        assert!(glob_match("*embed*", "model.embed_tokens.weight"));
        assert!(glob_match("lm_head*", "lm_head.weight"));
        assert!(!glob_match("lm_head*", "model.lm_head_x"));
        assert!(glob_match("model.layers.?.*", "model.layers.3.x"));
        assert!(!glob_match("model.layers.?.*", "model.layers.12.x"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXbYbZc"));
    }
}
