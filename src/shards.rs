//! Sharded safetensors checkpoints. transformers splits a model larger than its shard size
//! into files `model-0000i-of-0000n.safetensors` beside an index,
//! `model.safetensors.index.json`:
//!
//! ```json
//! {"metadata": {"total_size": 13476839424},
//!  "weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors", ...}}
//! ```
//!
//! `weight_map` names each tensor's shard and `total_size` counts the tensors' bytes.
//! transformers reads the shards the map names, and takes the map's keys as the checkpoint's
//! tensors, so a converted checkpoint needs an index that lists what was written.
//!
//! [`Layout::find`] finds a checkpoint's files from a path; [`Layout::convert`] runs a
//! conversion of one file (`fk quantize`'s, `fk merge`'s) over each of them and indexes
//! what it wrote. Every output is staged before any is renamed into place, so a failure in
//! one shard leaves none converted.

use crate::error::{Error, Result};
use crate::files::{stage_bytes, Staged};
use safetensors::tensor::TensorInfo;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

/// The file name transformers gives a model's index; others end the same way
/// (`diffusion_pytorch_model.safetensors.index.json`).
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// What every index's file name ends with.
pub const INDEX_SUFFIX: &str = ".safetensors.index.json";
/// The file name of a checkpoint saved whole.
pub const SINGLE_FILE: &str = "model.safetensors";

/// Where a checkpoint's tensors are.
#[derive(Debug, Clone, PartialEq)]
pub enum Layout {
    /// One safetensors file.
    File(PathBuf),
    /// A directory holding `model.safetensors` (transformers' layout for a model saved
    /// whole): converted into a directory.
    Directory(PathBuf),
    /// Shards in `dir`, named by the index `dir/index_name`.
    Sharded {
        /// The directory of the index and its shards (`.` for an index path with no
        /// directory part).
        dir: PathBuf,
        /// The index's file name.
        index_name: String,
        /// The index as read.
        index: ShardIndex,
    },
}

/// A sharded checkpoint's index: which shard holds each tensor.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShardIndex {
    /// The index's `metadata`, `total_size` included (recomputed for what is written).
    pub metadata: Map<String, Value>,
    /// Tensor name to shard file name (a name in the index's directory).
    pub weight_map: BTreeMap<String, String>,
}

impl Layout {
    /// The checkpoint at `path`: a safetensors file, an index (a name ending in
    /// `.safetensors.index.json`), or a directory holding `model.safetensors` or (where it
    /// holds none, as transformers looks) `model.safetensors.index.json`.
    pub fn find(path: &Path) -> Result<Layout> {
        if path.is_dir() {
            // transformers' order: the single file before the index.
            return if path.join(SINGLE_FILE).is_file() {
                Ok(Layout::Directory(path.to_path_buf()))
            } else if path.join(INDEX_FILE).is_file() {
                Layout::sharded(&path.join(INDEX_FILE))
            } else {
                let why = format!("a directory with neither {INDEX_FILE} nor {SINGLE_FILE}");
                Err(Error::io(path, why))
            };
        }
        let name = path.file_name().map(|n| n.to_string_lossy());
        if name.is_some_and(|n| n.ends_with(INDEX_SUFFIX)) {
            Layout::sharded(path)
        } else {
            Ok(Layout::File(path.to_path_buf()))
        }
    }

    fn sharded(index_path: &Path) -> Result<Layout> {
        let file = index_path.display().to_string();
        let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
        let (dir, index_name) = (index_path.parent(), index_path.file_name());
        let dir = dir.filter(|d| !d.as_os_str().is_empty());
        Ok(Layout::Sharded {
            dir: dir.unwrap_or(Path::new(".")).to_path_buf(),
            index_name: index_name
                .unwrap_or_default()
                .to_string_lossy()
                .into_owned(),
            index: ShardIndex::parse(&text, &file)?,
        })
    }

    /// The checkpoint's files: the one file, or every shard the index names.
    pub fn files(&self) -> Vec<PathBuf> {
        match self {
            Layout::File(path) => vec![path.clone()],
            Layout::Directory(dir) => vec![dir.join(SINGLE_FILE)],
            Layout::Sharded { dir, index, .. } => {
                index.shards().iter().map(|s| dir.join(s)).collect()
            }
        }
    }

    /// The directory of a model the checkpoint was found in (a directory, or an index's),
    /// whose other files (config, tokenizer) belong with it; `None` for a file given alone.
    pub fn model_dir(&self) -> Option<&Path> {
        match self {
            Layout::File(_) => None,
            Layout::Directory(dir) | Layout::Sharded { dir, .. } => Some(dir),
        }
    }

    /// Every tensor's dtype and shape, from the files' headers (their data is not read).
    pub fn headers(&self) -> Result<BTreeMap<String, TensorInfo>> {
        let mut all = BTreeMap::new();
        for file in self.files() {
            all.extend(read_header(&file)?);
        }
        Ok(all)
    }

    /// Runs `convert(input, output)` on each file of the checkpoint, which stages its
    /// output. A file's output is `output`, or `output/<its name>` where `output` is a
    /// directory; a checkpoint found in a directory goes into the directory `output` (made
    /// if absent, with any missing parents, and removed again unless the conversion is
    /// committed), shards under their names beside
    /// an index of what was written (staged too). `output` may be the input's own
    /// directory: nothing is renamed into place before [`Converted::commit`]. Refused: a
    /// directory `output` (not the input's) holding the other layout's weights, which
    /// transformers could load in place of these (`model.safetensors` before an index).
    pub fn convert(
        &self,
        output: &Path,
        convert: impl FnMut(&Path, &Path) -> Result<Staged>,
    ) -> Result<Converted> {
        let dir = match self {
            Layout::File(input) => {
                let output = match input.file_name() {
                    Some(name) if output.is_dir() => output.join(name),
                    _ => output.to_path_buf(),
                };
                return self.convert_into(&output, convert);
            }
            Layout::Directory(dir) | Layout::Sharded { dir, .. } => dir,
        };
        // The directories made here, deepest first: removed again unless the conversion is
        // committed.
        let created: Vec<PathBuf> = output
            .ancestors()
            .take_while(|d| !d.as_os_str().is_empty() && !d.exists())
            .map(Path::to_path_buf)
            .collect();
        std::fs::create_dir_all(output).map_err(|e| Error::io(output, e))?;
        match self
            .check_no_other_layout(dir, output)
            .and_then(|()| self.convert_into(output, convert))
        {
            Ok(mut converted) => {
                converted.created = created;
                Ok(converted)
            }
            Err(e) => {
                // Empty by now: every staged file was removed when dropped.
                remove_empty(&created);
                Err(e)
            }
        }
    }

    /// Errors where `output` (another directory than `dir`) holds weights of the layout this
    /// conversion does not write.
    fn check_no_other_layout(&self, dir: &Path, output: &Path) -> Result<()> {
        if same_dir(dir, output) {
            return Ok(());
        }
        let other = match self {
            Layout::Sharded { .. } => SINGLE_FILE,
            _ => INDEX_FILE,
        };
        if output.join(other).exists() {
            let why = format!(
                "holds {other}, which transformers would read in place of what this writes: \
                 remove it or write elsewhere"
            );
            return Err(Error::io(output, why));
        }
        Ok(())
    }

    /// [`Layout::convert`] into `output` (the file, or the directory made).
    fn convert_into(
        &self,
        output: &Path,
        mut convert: impl FnMut(&Path, &Path) -> Result<Staged>,
    ) -> Result<Converted> {
        let (dir, index_name, index) = match self {
            Layout::File(input) => {
                let files = vec![convert(input, output)?];
                return Ok(Converted::new(files, None));
            }
            Layout::Directory(dir) => {
                let files = vec![convert(&dir.join(SINGLE_FILE), &output.join(SINGLE_FILE))?];
                return Ok(Converted::new(files, Some(output)));
            }
            Layout::Sharded {
                dir,
                index_name,
                index,
            } => (dir, index_name, index),
        };
        let mut written = ShardIndex {
            metadata: index.metadata.clone(),
            weight_map: BTreeMap::new(),
        };
        let mut total_size = 0u64;
        let mut files = Vec::new();
        for shard in index.shards() {
            let input = dir.join(shard);
            index.check_shard(&input, shard, &dir.join(index_name))?;
            let staged = convert(&input, &output.join(shard))?;
            for (name, info) in read_header(staged.written())? {
                if let Some(other) = written.weight_map.insert(name.clone(), shard.into()) {
                    let why = format!("written to {other} and to {shard}: in two input shards?");
                    return Err(Error::checkpoint(&output.display().to_string(), &name, why));
                }
                total_size += (info.data_offsets.1 - info.data_offsets.0) as u64;
            }
            files.push(staged);
        }
        written
            .metadata
            .insert("total_size".into(), total_size.into());
        let index = stage_bytes(&output.join(index_name), written.to_json())?;
        let mut converted = Converted::new(files, Some(output));
        converted.index = Some(index);
        Ok(converted)
    }
}

/// Removes the directories `dirs` (deepest first) that are empty.
fn remove_empty(dirs: &[PathBuf]) {
    for d in dirs {
        let _ = std::fs::remove_dir(d);
    }
}

/// What [`Layout::convert`] wrote, not yet in place: the checkpoint's files, its index, and
/// any side files [`Converted::carry_side_files`] added. Dropped uncommitted (an error after
/// the conversion), it removes them, and the output directories the conversion made.
#[must_use = "converted files are removed unless committed"]
#[derive(Debug)]
pub struct Converted {
    files: Vec<Staged>,
    index: Option<Staged>,
    side: Vec<Staged>,
    /// The output's directory, for a checkpoint found in a directory.
    dir: Option<PathBuf>,
    /// The directories [`Layout::convert`] made for the output, deepest first.
    created: Vec<PathBuf>,
}

impl Drop for Converted {
    fn drop(&mut self) {
        // The staged files first (each removes itself), then the directories they were in.
        self.files.clear();
        self.index = None;
        self.side.clear();
        remove_empty(&self.created);
    }
}

impl Converted {
    fn new(files: Vec<Staged>, dir: Option<&Path>) -> Self {
        Converted {
            files,
            index: None,
            side: Vec::new(),
            dir: dir.map(Path::to_path_buf),
            created: Vec::new(),
        }
    }

    /// Where the checkpoint's files go: the weights, and the index last.
    pub fn destinations(&self) -> Vec<PathBuf> {
        let files = self.files.iter().chain(&self.index);
        files.map(|f| f.destination().to_path_buf()).collect()
    }

    /// Stages the side files of the model directory `from` ([`side_files`]) into the
    /// output's directory, each passed through `edit` (by name; `None` keeps it as it is):
    /// all of them where the output is another directory, only the edited ones in place.
    /// Returns their names. Nothing for a checkpoint given as a file.
    pub fn carry_side_files(
        &mut self,
        from: &Path,
        edit: impl Fn(&str, &[u8]) -> Result<Option<Vec<u8>>>,
    ) -> Result<Vec<String>> {
        let Some(to) = self.dir.clone() else {
            return Ok(Vec::new());
        };
        let in_place = same_dir(from, &to);
        let mut names = Vec::new();
        for name in side_files(from)? {
            let path = from.join(&name);
            let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
            let edited = edit(&name, &bytes)?;
            if in_place && edited.is_none() {
                continue;
            }
            let bytes = edited.unwrap_or(bytes);
            self.side.push(stage_bytes(&to.join(&name), bytes)?);
            names.push(name);
        }
        Ok(names)
    }

    /// Renames every staged file into place: the weights, the side files, the index last.
    /// A failed rename (or a crash) part of the way leaves the files before it converted
    /// and those after it as they were.
    pub fn commit(mut self) -> Result<()> {
        self.created.clear();
        let (files, side) = (
            std::mem::take(&mut self.files),
            std::mem::take(&mut self.side),
        );
        for file in files.into_iter().chain(side).chain(self.index.take()) {
            file.commit()?;
        }
        Ok(())
    }
}

fn same_dir(a: &Path, b: &Path) -> bool {
    matches!(
        (std::fs::canonicalize(a), std::fs::canonicalize(b)),
        (Ok(a), Ok(b)) if a == b
    )
}

impl ShardIndex {
    /// Parses an index (`file` names it in errors). Shard names must be plain file names
    /// ending in `.safetensors`: a path would read, and write, outside the directory.
    pub fn parse(text: &str, file: &str) -> Result<Self> {
        let bad = |why: String| Error::checkpoint(file, "", why);
        let json: Value = serde_json::from_str(text).map_err(|e| bad(format!("bad JSON: {e}")))?;
        let metadata = match json.get("metadata") {
            None | Some(Value::Null) => Map::new(),
            Some(Value::Object(m)) => m.clone(),
            Some(other) => return Err(bad(format!("metadata is not an object: {other}"))),
        };
        let Some(Value::Object(map)) = json.get("weight_map") else {
            return Err(bad("no weight_map object".into()));
        };
        let mut weight_map = BTreeMap::new();
        for (tensor, shard) in map {
            let shard = shard.as_str().filter(|s| is_shard_name(s)).ok_or_else(|| {
                let why = format!(
                    "shard {shard}: not a file name ending in .safetensors in the index's \
                     directory"
                );
                Error::checkpoint(file, tensor, why)
            })?;
            weight_map.insert(tensor.clone(), shard.to_string());
        }
        if weight_map.is_empty() {
            return Err(bad("the weight_map names no tensors".into()));
        }
        Ok(ShardIndex {
            metadata,
            weight_map,
        })
    }

    /// The index as transformers writes it (keys sorted, indented by 2).
    pub fn to_json(&self) -> String {
        pretty_json(&serde_json::json!({"metadata": self.metadata, "weight_map": self.weight_map}))
    }

    /// Errors where the shard `input` (the index's `shard`) lacks a tensor the index puts in
    /// it: transformers would fail to load it from the written index, and the conversion
    /// would write an index without it.
    fn check_shard(&self, input: &Path, shard: &str, index_path: &Path) -> Result<()> {
        let held = read_header(input)?;
        let mut named = self.weight_map.iter().filter(|(_, s)| *s == shard);
        match named.find(|(tensor, _)| !held.contains_key(*tensor)) {
            Some((tensor, _)) => {
                let why = format!("the index puts it in {shard}, which does not hold it");
                Err(Error::checkpoint(
                    &index_path.display().to_string(),
                    tensor,
                    why,
                ))
            }
            None => Ok(()),
        }
    }

    /// The shard file names, each once, in order.
    pub fn shards(&self) -> Vec<&str> {
        let mut shards: Vec<&str> = self.weight_map.values().map(String::as_str).collect();
        shards.sort_unstable();
        shards.dedup();
        shards
    }
}

/// The files of a model directory that are not its weights (`config.json`, the tokenizer's,
/// `generation_config.json`, ...): every top-level file but weights in any format, indexes
/// of them and hidden files.
pub fn side_files(dir: &Path) -> Result<Vec<String>> {
    const WEIGHTS: [&str; 10] = [
        ".safetensors",
        ".index.json",
        ".bin",
        ".pt",
        ".pth",
        ".ckpt",
        ".h5",
        ".msgpack",
        ".gguf",
        ".onnx",
    ];
    let mut names = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))? {
        let entry = entry.map_err(|e| Error::io(dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        // Following links: a Hugging Face cache snapshot links every file.
        let is_file = std::fs::metadata(entry.path()).is_ok_and(|m| m.is_file());
        if is_file && !name.starts_with('.') && !WEIGHTS.iter().any(|w| name.ends_with(w)) {
            names.push(name);
        }
    }
    names.sort();
    Ok(names)
}

/// A JSON value as transformers writes its files: keys sorted, indented by 2, a newline last.
pub fn pretty_json(value: &Value) -> String {
    serde_json::to_string_pretty(value).expect("a JSON value serializes") + "\n"
}

/// A side file's JSON object (`config.json`) with `edit` applied, written out again where
/// `edit` says it changed something (`None` where it did not); `name` names it in errors.
pub fn edit_json_object(
    name: &str,
    bytes: &[u8],
    edit: impl FnOnce(&mut Map<String, Value>) -> bool,
) -> Result<Option<Vec<u8>>> {
    let bad = |why: String| Error::checkpoint(name, "", why);
    let mut json: Value =
        serde_json::from_slice(bytes).map_err(|e| bad(format!("bad JSON: {e}")))?;
    let fields = json
        .as_object_mut()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    Ok(edit(fields).then(|| pretty_json(&json).into_bytes()))
}

fn is_shard_name(name: &str) -> bool {
    let mut parts = Path::new(name).components();
    let one_name =
        matches!(parts.next(), Some(std::path::Component::Normal(_))) && parts.next().is_none();
    let stem = name.strip_suffix(".safetensors").unwrap_or_default();
    one_name && !stem.is_empty() && stem != "." && !name.contains(['/', '\\', ':'])
}

/// A safetensors file's tensors (dtype, shape, offsets), from its header alone.
pub fn read_header(path: &Path) -> Result<BTreeMap<String, TensorInfo>> {
    let file = path.display().to_string();
    let bad = |why: String| Error::checkpoint(&file, "", why);
    let mut f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|e| bad(format!("no safetensors header: {e}")))?;
    // safetensors' own limit on a header, and the file's size: the length is the file's
    // word until checked, not a size to allocate.
    let len = u64::from_le_bytes(len);
    if len > 100_000_000 {
        return Err(bad(format!("a header of {len} bytes")));
    }
    let size = f.metadata().map_err(|e| Error::io(path, e))?.len();
    if len > size.saturating_sub(8) {
        return Err(bad(format!("a header of {len} bytes in a file of {size}")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)
        .map_err(|e| bad(format!("a header of {len} bytes, truncated: {e}")))?;
    header_entries(&header, &file)
}

/// The tensors of a safetensors header (the JSON after the length), each entry checked on
/// its own: a dtype, a shape and offsets that agree on its size. Errors name the tensor,
/// which safetensors' own mostly do not.
pub(crate) fn header_entries(header: &[u8], file: &str) -> Result<BTreeMap<String, TensorInfo>> {
    let entries: BTreeMap<String, Value> = serde_json::from_slice(header)
        .map_err(|e| Error::checkpoint(file, "", format!("bad header: {e}")))?;
    let mut tensors = BTreeMap::new();
    for (name, entry) in entries {
        if name == "__metadata__" {
            continue;
        }
        let bad = |why: String| Error::checkpoint(file, &name, why);
        let info: TensorInfo =
            serde_json::from_value(entry).map_err(|e| bad(format!("bad header entry: {e}")))?;
        let (start, end) = info.data_offsets;
        if end < start {
            return Err(bad(format!(
                "data offsets {:?} run backwards",
                info.data_offsets
            )));
        }
        let bits = (info.shape.iter()).try_fold(info.dtype.bitsize(), |n, &d| n.checked_mul(d));
        if bits.is_none_or(|bits| !bits.is_multiple_of(8) || bits / 8 != end - start) {
            let why = format!(
                "{:?} {:?} is not the {} bytes of its data offsets {:?}",
                info.dtype,
                info.shape,
                end - start,
                info.data_offsets
            );
            return Err(bad(why));
        }
        tensors.insert(name, info);
    }
    Ok(tensors)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_names_stay_in_the_directory() {
        for ok in ["model-00001-of-00002.safetensors", "a.b.safetensors"] {
            assert!(is_shard_name(ok), "{ok}");
        }
        for bad in [
            "../model.safetensors",
            "sub/model.safetensors",
            "..\\model.safetensors",
            "/etc/model.safetensors",
            "C:model.safetensors",
            "..safetensors",
            ".safetensors",
            "model.bin",
            "",
        ] {
            assert!(!is_shard_name(bad), "{bad}");
        }
    }
}
