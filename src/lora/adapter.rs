//! PEFT LoRA adapters on disk: read and write `adapter_model.safetensors` +
//! `adapter_config.json` as PEFT's `save_pretrained` / `PeftModel.from_pretrained` do (read
//! from PEFT 0.21's source), and merge an adapter into a base checkpoint (`fk merge`).
//!
//! What PEFT writes for LoRA on `nn.Linear` modules, and what this module relies on:
//! - One tensor pair per adapted module `<module>` (its name in the base model, so its
//!   weight is `<module>.weight` in the base checkpoint), the adapter name stripped:
//!   `base_model.model.<module>.lora_A.weight` `[r, in]` and
//!   `base_model.model.<module>.lora_B.weight` `[out, r]`, in the model's dtype; file
//!   metadata `{"format": "pt"}`.
//! - `adapter_config.json`: `peft_type` `"LORA"`, `r`, `lora_alpha`, `use_rslora`
//!   (`scale = lora_alpha / r`, or `/ √r`), `lora_dropout` (training only), `target_modules`
//!   (names, or one regex; the tensors themselves say which modules were adapted), and
//!   many options that default to off.
//! - Options that change what the tensors mean, or add tensors this crate does not apply,
//!   are refused by name ([`UNSUPPORTED`], `bias`, `init_lora_weights`), so nothing is
//!   silently merged wrong.

use crate::dtype::{DType, FloatElem};
use crate::error::{Error, Result};
use crate::files::{read_file, stage_bytes, Staged};
use crate::nf4::checkpoint::{stage_tensors, Checkpoint, RawTensor};
use crate::reference::lora::{LoraConfig, LoraLayer};
use crate::reference::nf4::{self, Absmax, Nf4Quantized};
use crate::shards::{edit_json_object, Layout};
use crate::{bf16, f16};
use safetensors::Dtype;
use serde_json::{json, Map, Value};
use std::borrow::Cow;
use std::collections::BTreeMap;
use std::path::Path;

/// The factors' file in an adapter directory, as PEFT names it.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// The config's file in an adapter directory, as PEFT names it.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// PEFT's prefix of every tensor key: `PeftModel.base_model` (the tuner) `.model` (the
/// wrapped model).
pub const KEY_PREFIX: &str = "base_model.model.";
const A_SUFFIX: &str = ".lora_A.weight";
const B_SUFFIX: &str = ".lora_B.weight";

/// Config fields that must be absent, `null`, `false`, `[]` or `{}`, with what they would
/// mean: each changes the layer's math, adds tensors, or resizes ranks per module.
pub const UNSUPPORTED: [(&str, &str); 16] = [
    (
        "fan_in_fan_out",
        "base weights stored [in, out] (GPT-2's Conv1D)",
    ),
    ("use_dora", "DoRA"),
    ("lora_bias", "a bias on lora_B"),
    ("rank_pattern", "per-module ranks"),
    ("alpha_pattern", "per-module alphas"),
    ("modules_to_save", "fully trained extra modules"),
    ("trainable_token_indices", "trainable embedding rows"),
    ("target_parameters", "LoRA on bare parameters"),
    ("layer_replication", "replicated layers"),
    ("use_qalora", "QALoRA"),
    ("alora_invocation_tokens", "activated LoRA"),
    ("velora_config", "VeLoRA"),
    ("monteclora_config", "MonteCLoRA"),
    ("use_bdlora", "block-diagonal LoRA"),
    ("arrow_config", "Arrow routing"),
    ("kasa_config", "KaSA"),
];

/// `init_lora_weights` values whose initialization rewrites the base weights (PiSSA, OLoRA,
/// CorDA, LoftQ, LoRA-GA): such an adapter only makes sense on that rewritten base. PEFT
/// converts one to a plain LoRA (and writes `init_lora_weights: true`) when saved with
/// `path_initial_model_for_weight_conversion`.
const BASE_REWRITING_INITS: [&str; 5] = ["pissa", "olora", "corda", "loftq", "lora_ga"];

/// PEFT's `target_modules`: module names (exact, or a suffix after a `.`), or one regex.
#[derive(Debug, Clone, PartialEq)]
pub enum TargetModules {
    /// Module names: a module is targeted when its name is one of them or ends in `.` and
    /// one of them.
    Names(Vec<String>),
    /// One regex over full module names, kept as written (not checked here).
    Pattern(String),
}

/// The `adapter_config.json` fields that decide what a LoRA adapter computes.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// The rank (at least 1): rows of `lora_A`, columns of `lora_B`.
    pub r: usize,
    /// f64, as JSON and Python hold it; the scale divides it in f64 and rounds the quotient
    /// to f32, as PEFT's f32 multiply of the Python float does.
    pub lora_alpha: f64,
    /// Whether the scale is `lora_alpha / √r` (rsLoRA) instead of `lora_alpha / r`.
    pub use_rslora: bool,
    /// Dropout probability on the LoRA branch's input; applied only in training.
    pub lora_dropout: f64,
    /// `None` for `null` (PEFT then picks modules by architecture).
    pub target_modules: Option<TargetModules>,
    /// The base model PEFT recorded (a hub id or a path), if any.
    pub base_model_name_or_path: Option<String>,
    /// PEFT's `task_type` (such as `CAUSAL_LM`), if any.
    pub task_type: Option<String>,
}

/// One adapted module's factors as f32 (exact for the f32, bf16 and f16 a file holds) and
/// the dtype they are saved in.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraFactors {
    /// `[r, in]`
    pub a: Vec<f32>,
    /// `[out, r]`
    pub b: Vec<f32>,
    /// Input features of the module: columns of `a`.
    pub d_in: usize,
    /// Output features of the module: rows of `b`.
    pub d_out: usize,
    /// The dtype both factors are stored in on disk: f32, bf16 or f16.
    pub dtype: DType,
}

/// A LoRA adapter: its config and the factors of every adapted module, by module name
/// (without [`KEY_PREFIX`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Adapter {
    /// What `adapter_config.json` says.
    pub config: AdapterConfig,
    /// The factors of each adapted module, by module name.
    pub modules: BTreeMap<String, LoraFactors>,
}

/// What [`merge_checkpoint`] did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MergeSummary {
    /// The weights replaced by `W + scale · B A` (`<module>.weight`).
    pub merged: Vec<String>,
    /// The NF4 weights among them, each with the error its requantization added:
    /// `‖Q(W') − W'‖₂ / ‖W'‖₂`, `W'` the merged weight before it was quantized again.
    pub requantization_error: BTreeMap<String, f64>,
    /// Tensors copied unchanged.
    pub copied: usize,
    /// For a base found in a directory, the other files of the model (config, tokenizer)
    /// written beside the output ([`crate::shards::Converted::carry_side_files`]).
    pub carried: Vec<String>,
}

/// A JSON object's fields, read with errors naming the file and the field.
struct Fields<'a> {
    obj: &'a Map<String, Value>,
    file: &'a str,
}

impl Fields<'_> {
    /// The value, or `None` when absent or `null`.
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key).filter(|v| !v.is_null())
    }

    fn bad(&self, key: &str, want: &str, got: &Value) -> Error {
        Error::checkpoint(self.file, "", format!("{key} must be {want}, got {got}"))
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        self.get(key).map_or(Ok(default), |v| {
            v.as_f64().ok_or_else(|| self.bad(key, "a number", v))
        })
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        self.get(key).map_or(Ok(default), |v| {
            v.as_bool().ok_or_else(|| self.bad(key, "true or false", v))
        })
    }

    fn string(&self, key: &str) -> Result<Option<String>> {
        self.get(key)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.bad(key, "a string", v))
            })
            .transpose()
    }
}

/// Whether a JSON value leaves an option at PEFT's default (off).
fn is_off(v: &Value) -> bool {
    match v {
        Value::Null | Value::Bool(false) => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

impl AdapterConfig {
    /// Parses `adapter_config.json` (`file` names it in errors), refusing what this crate
    /// does not apply and what the layer refuses (a scale that overflows f32, a dropout
    /// outside [0, 1)).
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| Error::checkpoint(file, "", format!("not valid JSON: {e}")))?;
        let obj = value
            .as_object()
            .ok_or_else(|| Error::checkpoint(file, "", format!("not a JSON object: {value}")))?;
        let f = Fields { obj, file };
        let unsupported = |key: &str, v: &Value, what: &str| Error::Unsupported {
            op: "peft adapter",
            why: format!("{file}: {key} = {v}: {what} is not supported"),
        };
        match f.get("peft_type") {
            Some(Value::String(t)) if t == "LORA" => {}
            Some(v) => return Err(unsupported("peft_type", v, "a PEFT method other than LoRA")),
            None => {
                return Err(Error::checkpoint(
                    file,
                    "",
                    "no peft_type (PEFT needs \"LORA\")".into(),
                ))
            }
        }
        for (key, what) in UNSUPPORTED {
            if let Some(v) = obj.get(key).filter(|v| !is_off(v)) {
                return Err(unsupported(key, v, what));
            }
        }
        if let Some(v) = f.get("bias").filter(|v| v.as_str() != Some("none")) {
            return Err(unsupported("bias", v, "trained base biases"));
        }
        if let Some(v) = f.get("init_lora_weights") {
            let init = v.as_str().unwrap_or_default().to_ascii_lowercase();
            if BASE_REWRITING_INITS.iter().any(|p| init.starts_with(p)) {
                return Err(unsupported(
                    "init_lora_weights",
                    v,
                    "an adapter for a base its initialization rewrote",
                ));
            }
        }
        let r = match f.get("r") {
            Some(v) => {
                v.as_u64()
                    .filter(|&r| r > 0)
                    .ok_or_else(|| f.bad("r", "a positive integer", v))? as usize
            }
            None => return Err(Error::checkpoint(file, "", "no r (the rank)".into())),
        };
        let target_modules = match f.get("target_modules") {
            None => None,
            Some(Value::String(s)) => Some(TargetModules::Pattern(s.clone())),
            Some(Value::Array(names)) => Some(TargetModules::Names(
                names
                    .iter()
                    .map(|n| n.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or_else(|| {
                        f.bad(
                            "target_modules",
                            "a list of strings",
                            &Value::Array(names.clone()),
                        )
                    })?,
            )),
            Some(v) => return Err(f.bad("target_modules", "a list of names or a regex", v)),
        };
        let config = AdapterConfig {
            r,
            // PEFT's defaults for absent fields.
            lora_alpha: f.f64_or("lora_alpha", 8.0)?,
            use_rslora: f.bool_or("use_rslora", false)?,
            lora_dropout: f.f64_or("lora_dropout", 0.0)?,
            target_modules,
            base_model_name_or_path: f.string("base_model_name_or_path")?,
            task_type: f.string("task_type")?,
        };
        // The layer's own checks (a finite scale, a dropout probability), said of the fields.
        config.lora(Some(0)).validate().map_err(|e| {
            let (alpha, dropout) = (config.lora_alpha, config.lora_dropout);
            let why = format!("lora_alpha {alpha:?}, r {r}, lora_dropout {dropout:?}: {e}");
            Error::checkpoint(file, "", why)
        })?;
        Ok(config)
    }

    /// `adapter_config.json` as PEFT writes it, less the fields left at their defaults
    /// (PEFT fills those in when it loads).
    pub fn to_json(&self) -> String {
        // PEFT types lora_alpha as int: write it as one when it is.
        let alpha = if self.lora_alpha.fract() == 0.0 && self.lora_alpha.abs() < 1e15 {
            json!(self.lora_alpha as i64)
        } else {
            json!(self.lora_alpha)
        };
        let targets = match &self.target_modules {
            None => Value::Null,
            Some(TargetModules::Names(n)) => json!(n),
            Some(TargetModules::Pattern(p)) => json!(p),
        };
        let config = json!({
            "peft_type": "LORA",
            "task_type": self.task_type,
            "base_model_name_or_path": self.base_model_name_or_path,
            "inference_mode": true,
            "r": self.r,
            "lora_alpha": alpha,
            "use_rslora": self.use_rslora,
            "lora_dropout": self.lora_dropout,
            "target_modules": targets,
            "bias": "none",
            "fan_in_fan_out": false,
            "use_dora": false,
            "init_lora_weights": true,
        });
        serde_json::to_string_pretty(&config).expect("a JSON value serializes")
    }

    /// The layer hyper-parameters: training with dropout keyed by `dropout_seed` (PEFT
    /// has no seed: it draws from torch's global generator), or without dropout, as PEFT
    /// runs in eval mode, for `None`.
    pub fn lora(&self, dropout_seed: Option<u64>) -> LoraConfig {
        LoraConfig {
            rank: self.r,
            alpha: self.lora_alpha,
            use_rslora: self.use_rslora,
            dropout: dropout_seed.map_or(0.0, |_| self.lora_dropout as f32),
            seed: dropout_seed.unwrap_or(0),
        }
    }
}

fn dtype_of(d: Dtype) -> Option<DType> {
    match d {
        Dtype::F32 => Some(DType::F32),
        Dtype::BF16 => Some(DType::BF16),
        Dtype::F16 => Some(DType::F16),
        _ => None,
    }
}

/// A 2-D float tensor's shape and values as f32.
fn matrix(t: &RawTensor, file: &str, name: &str) -> Result<([usize; 2], Vec<f32>, DType)> {
    let dtype = dtype_of(t.dtype).ok_or_else(|| {
        Error::checkpoint(
            file,
            name,
            format!("dtype {:?}: want F32, BF16 or F16", t.dtype),
        )
    })?;
    let shape: [usize; 2] = t.shape.as_slice().try_into().map_err(|_| {
        Error::checkpoint(file, name, format!("shape {:?}: want a matrix", t.shape))
    })?;
    let values = match dtype {
        DType::BF16 => t.values::<bf16>().into_iter().map(f32::from).collect(),
        DType::F16 => t.values::<f16>().into_iter().map(f32::from).collect(),
        _ => t.values::<f32>(),
    };
    Ok((shape, values, dtype))
}

/// `values` in `dtype`'s little-endian bytes, rounded to nearest even.
fn to_bytes(values: &[f32], dtype: DType) -> Vec<u8> {
    fn cast<T: FloatElem>(values: &[f32]) -> Vec<u8> {
        let v: Vec<T> = values.iter().map(|&x| T::from_f32(x)).collect();
        bytemuck::cast_slice(&v).to_vec()
    }
    match dtype {
        DType::BF16 => cast::<bf16>(values),
        DType::F16 => cast::<f16>(values),
        _ => cast::<f32>(values),
    }
}

fn safetensors_dtype(d: DType) -> Dtype {
    match d {
        DType::BF16 => Dtype::BF16,
        DType::F16 => Dtype::F16,
        _ => Dtype::F32,
    }
}

/// Why a tensor that is not a LoRA factor of a Linear module is in an adapter file.
fn stray_tensor(name: &str) -> String {
    if name.contains("lora_magnitude_vector") {
        "a DoRA magnitude: DoRA is not supported".into()
    } else if name.contains("lora_embedding_") {
        "LoRA on an embedding is not supported".into()
    } else {
        format!("not {KEY_PREFIX}<module>{A_SUFFIX} or {B_SUFFIX}: not supported")
    }
}

impl Adapter {
    /// Reads `dir/adapter_config.json` and `dir/adapter_model.safetensors`, checking every
    /// tensor against the config and its partner.
    pub fn load(dir: &Path) -> Result<Adapter> {
        let config_path = dir.join(CONFIG_FILE);
        let config_file = config_path.display().to_string();
        let text = String::from_utf8(read_file(&config_path)?)
            .map_err(|e| Error::checkpoint(&config_file, "", format!("not UTF-8: {e}")))?;
        let config = AdapterConfig::from_json(&text, &config_file)?;

        let weights_path = dir.join(WEIGHTS_FILE);
        let file = weights_path.display().to_string();
        let bytes = read_file(&weights_path)?;
        let ckpt = Checkpoint::parse(&bytes, &file)?;
        if let Some(name) = ckpt.nf4.keys().next() {
            return Err(Error::checkpoint(
                &file,
                name,
                "an NF4 weight in an adapter".into(),
            ));
        }
        let mut pairs: BTreeMap<&str, [Option<&str>; 2]> = BTreeMap::new();
        for name in ckpt.tensors.keys() {
            let module = name.strip_prefix(KEY_PREFIX);
            match (
                module.and_then(|m| m.strip_suffix(A_SUFFIX)),
                module.and_then(|m| m.strip_suffix(B_SUFFIX)),
            ) {
                (Some(m), _) => pairs.entry(m).or_default()[0] = Some(name),
                (_, Some(m)) => pairs.entry(m).or_default()[1] = Some(name),
                _ => return Err(Error::checkpoint(&file, name, stray_tensor(name))),
            }
        }
        if pairs.is_empty() {
            return Err(Error::checkpoint(&file, "", "no LoRA tensors".into()));
        }
        let mut modules = BTreeMap::new();
        for (module, [a, b]) in pairs {
            let missing = |suffix| {
                Error::checkpoint(
                    &file,
                    &format!("{KEY_PREFIX}{module}{suffix}"),
                    "missing".into(),
                )
            };
            let a_name = a.ok_or_else(|| missing(A_SUFFIX))?;
            let b_name = b.ok_or_else(|| missing(B_SUFFIX))?;
            let ([r, d_in], a, dtype) = matrix(&ckpt.tensors[a_name], &file, a_name)?;
            let ([d_out, r_b], b, b_dtype) = matrix(&ckpt.tensors[b_name], &file, b_name)?;
            if b_dtype != dtype {
                // One dtype per module is what save writes back.
                let why = format!("dtype {b_dtype}, but lora_A is {dtype}");
                return Err(Error::checkpoint(&file, b_name, why));
            }
            if r_b != r {
                let why = format!("shape [{d_out}, {r_b}]: rank {r_b}, but lora_A has rank {r}");
                return Err(Error::checkpoint(&file, b_name, why));
            }
            if r != config.r {
                let why = format!("rank {r}, but {CONFIG_FILE} says r = {}", config.r);
                return Err(Error::checkpoint(&file, a_name, why));
            }
            let factors = LoraFactors {
                a,
                b,
                d_in,
                d_out,
                dtype,
            };
            modules.insert(module.to_string(), factors);
        }
        Ok(Adapter { config, modules })
    }

    /// Writes `dir/adapter_model.safetensors` and `dir/adapter_config.json` (creating
    /// `dir`; each through a temporary file, the config last), each factor in its module's
    /// dtype. PEFT wraps the modules `target_modules` names and drops, without a word, the
    /// tensors of any other: `None` is written as the saved modules' full names, and a
    /// list of names must cover every saved module as PEFT matches them (the name itself or
    /// a `.`-separated suffix of it). A pattern is written as it is (PEFT's regex: not
    /// checked here).
    pub fn save(&self, dir: &Path) -> Result<()> {
        self.config.lora(Some(0)).validate()?;
        let invalid = |why: String| Error::InvalidArgument {
            what: "adapter save",
            why,
        };
        if self.modules.is_empty() {
            return Err(invalid("no modules: PEFT has nothing to load".into()));
        }
        let mut config = self.config.clone();
        match &config.target_modules {
            None => {
                let names = self.modules.keys().cloned().collect();
                config.target_modules = Some(TargetModules::Names(names));
            }
            Some(TargetModules::Names(names)) => {
                let targeted = |m: &str| {
                    names
                        .iter()
                        .any(|n| m == n || m.ends_with(&format!(".{n}")))
                };
                if let Some(m) = self.modules.keys().find(|m| !targeted(m)) {
                    return Err(invalid(format!(
                        "{m} is saved but target_modules {names:?} does not name it: PEFT \
                         would drop its factors"
                    )));
                }
            }
            Some(TargetModules::Pattern(_)) => {}
        }
        let r = self.config.r;
        let mut tensors = Vec::new();
        for (module, f) in &self.modules {
            if !matches!(f.dtype, DType::F32 | DType::BF16 | DType::F16) {
                return Err(Error::UnsupportedDtype {
                    op: "adapter save",
                    dtypes: f.dtype.to_string(),
                });
            }
            Error::check_shape(&format!("{module} lora_A [r, in]"), &[r, f.d_in], f.a.len())?;
            Error::check_shape(
                &format!("{module} lora_B [out, r]"),
                &[f.d_out, r],
                f.b.len(),
            )?;
            for (suffix, values, shape) in [
                (A_SUFFIX, &f.a, [r, f.d_in]),
                (B_SUFFIX, &f.b, [f.d_out, r]),
            ] {
                let t = RawTensor {
                    dtype: safetensors_dtype(f.dtype),
                    shape: shape.to_vec(),
                    data: Cow::Owned(to_bytes(values, f.dtype)),
                };
                tensors.push((format!("{KEY_PREFIX}{module}{suffix}"), t));
            }
        }
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        // Both files written whole before either is renamed into place: a failure to write
        // either leaves an adapter already there as it was (new weights beside its old config
        // would load with its scale).
        let weights = stage_tensors(&dir.join(WEIGHTS_FILE), tensors, None)?;
        let config = stage_bytes(&dir.join(CONFIG_FILE), config.to_json())?;
        weights.commit()?;
        config.commit()
    }

    /// The reference layer of `module` over its base weight `w` `[out, in]` and `bias`,
    /// with dropout keyed by `dropout_seed` or none (eval mode).
    pub fn layer<'a, T: FloatElem>(
        &'a self,
        module: &str,
        w: &'a [T],
        bias: Option<&'a [T]>,
        dropout_seed: Option<u64>,
    ) -> Result<LoraLayer<'a, T, f32>> {
        let f = self
            .modules
            .get(module)
            .ok_or_else(|| Error::InvalidArgument {
                what: "module",
                why: format!("{module} has no LoRA factors in this adapter"),
            })?;
        Ok(LoraLayer {
            w,
            bias,
            a: &f.a,
            b: &f.b,
            d_in: f.d_in,
            d_out: f.d_out,
            config: self.config.lora(dropout_seed),
        })
    }
}

/// An NF4 weight merged the way PEFT merges an adapter into bitsandbytes' `Linear4bit`:
/// dequantized to its dtype, `+ scale · B A` (f64, rounded once to f32), and quantized
/// again with the same blocksize and double quantization. Unlike PEFT's it keeps its dtype
/// (PEFT's sum with an f32 adapter makes it float32), and its codes are written as u8
/// whatever `quant_storage` they had. Returns it and the error the requantization added,
/// `‖Q(W') − W'‖₂ / ‖W'‖₂`.
fn merged_nf4(adapter: &Adapter, module: &str, q: &Nf4Quantized) -> Result<(Nf4Quantized, f64)> {
    let w: Vec<f32> = match q.dtype {
        DType::BF16 => q.dequantize::<bf16>().iter().map(|v| v.to_f32()).collect(),
        DType::F16 => q.dequantize::<f16>().iter().map(|v| v.to_f32()).collect(),
        _ => q.dequantize::<f32>(),
    };
    let merged = adapter.layer(module, &w, None, None)?.merged()?;
    let double_quant = matches!(q.absmax, Absmax::Nested(_));
    let requantized = Nf4Quantized {
        dtype: q.dtype,
        ..nf4::quantize(&merged, &q.shape, q.blocksize, double_quant)?
    };
    let error = crate::testing::rel_l2(&requantized.dequantize::<f32>(), &merged);
    Ok((requantized, error))
}

/// `W + scale · B A` for a base weight of dtype `W`, as its bytes.
fn merged_bytes<W: FloatElem>(adapter: &Adapter, module: &str, w: &RawTensor) -> Result<Vec<u8>> {
    let w: Vec<W> = w.values();
    let merged = adapter.layer(module, &w, None, None)?.merged()?;
    Ok(bytemuck::cast_slice(&merged).to_vec())
}

/// Writes `base` with every weight the adapter adapts replaced by `W + scale · B A`
/// (computed in f64, rounded once through f32 to W's dtype) and every other tensor and the
/// metadata copied unchanged, to `out`. `base` is a safetensors file, or a model directory
/// or shard index as [`Layout::find`] takes them: then `out` is a directory, which gets the
/// weights (shards under their names, beside their index) and the model's other files,
/// config and tokenizer ([`MergeSummary::carried`]). Everything is staged before anything
/// is renamed into place; `out` may be `base`. An adapted NF4 weight is dequantized,
/// merged and quantized again, as PEFT merges into bitsandbytes' `Linear4bit`
/// ([`MergeSummary`] reports the error that adds); NF4 weights that are not adapted are
/// written again in bitsandbytes' layout, the same codes and scales. Packed codes stored in
/// another `quant_storage` dtype come back as u8, and a `config.json` carried along says
/// `bnb_4bit_quant_storage` uint8.
pub fn merge_checkpoint(base: &Path, adapter: &Adapter, out: &Path) -> Result<MergeSummary> {
    let layout = Layout::find(base)?;
    let mut summary = MergeSummary::default();
    let mut converted =
        layout.convert(out, |file, out| merge_one(file, adapter, out, &mut summary))?;
    if let Some(module) = adapter
        .modules
        .keys()
        .find(|m| !summary.merged.contains(&format!("{m}.weight")))
    {
        let why = match layout {
            Layout::File(_) | Layout::Directory(_) => format!(
                "missing, but the adapter adapts {module} (one shard of a sharded checkpoint? \
                 pass its index or its directory)"
            ),
            Layout::Sharded { .. } => {
                format!("in no shard, but the adapter adapts {module}")
            }
        };
        let file = base.display().to_string();
        return Err(Error::checkpoint(&file, &format!("{module}.weight"), why));
    }
    if let Some(dir) = layout.model_dir() {
        summary.carried = converted.carry_side_files(dir, |name, bytes| match name {
            "config.json" => with_u8_storage(bytes),
            _ => Ok(None),
        })?;
    }
    converted.commit()?;
    summary.merged.sort();
    Ok(summary)
}

/// A `config.json` whose `quantization_config` names another `bnb_4bit_quant_storage` than
/// uint8, with uint8: the merge writes every NF4 weight's codes as u8. `None` for any other.
fn with_u8_storage(config: &[u8]) -> Result<Option<Vec<u8>>> {
    edit_json_object("config.json", config, |fields| {
        let storage = fields
            .get_mut("quantization_config")
            .and_then(|q| q.get_mut("bnb_4bit_quant_storage"));
        match storage {
            Some(s) if s.as_str() != Some("uint8") => {
                *s = "uint8".into();
                true
            }
            _ => false,
        }
    })
}

/// [`merge_checkpoint`] for one file, adding to `summary` the weights it merged.
fn merge_one(
    path: &Path,
    adapter: &Adapter,
    out: &Path,
    summary: &mut MergeSummary,
) -> Result<Staged> {
    let file = path.display().to_string();
    let bytes = read_file(path)?;
    let mut ckpt = Checkpoint::parse(&bytes, &file)?;
    let merged_before = summary.merged.len();
    for (module, f) in &adapter.modules {
        let key = format!("{module}.weight");
        let shape_error = |shape: &[usize]| {
            let why = format!(
                "shape {shape:?}, but the adapter's B A is [{}, {}]",
                f.d_out, f.d_in
            );
            Error::checkpoint(&file, &key, why)
        };
        if let Some(q) = ckpt.nf4.get_mut(&key) {
            if q.shape != [f.d_out, f.d_in] {
                return Err(shape_error(&q.shape));
            }
            let (merged, error) = merged_nf4(adapter, module, q)
                .map_err(|e| Error::checkpoint(&file, &key, e.to_string()))?;
            *q = merged;
            summary.requantization_error.insert(key.clone(), error);
            summary.merged.push(key);
            continue;
        }
        let Some(w) = ckpt.tensors.get_mut(&key) else {
            continue;
        };
        if w.shape != [f.d_out, f.d_in] {
            return Err(shape_error(&w.shape));
        }
        let data = match dtype_of(w.dtype) {
            Some(DType::BF16) => merged_bytes::<bf16>(adapter, module, w)?,
            Some(DType::F16) => merged_bytes::<f16>(adapter, module, w)?,
            Some(_) => merged_bytes::<f32>(adapter, module, w)?,
            None => {
                let why = format!("dtype {:?}: only F32, BF16 and F16 weights merge", w.dtype);
                return Err(Error::checkpoint(&file, &key, why));
            }
        };
        w.data = Cow::Owned(data);
        summary.merged.push(key);
    }
    summary.copied += ckpt.tensors.len() + ckpt.nf4.len() - (summary.merged.len() - merged_before);
    ckpt.stage(out)
}
