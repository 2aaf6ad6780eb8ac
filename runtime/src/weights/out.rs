//! Weights out, streamed unit by unit: one safetensors file, or a Hugging Face model directory
//! that `from_pretrained(DIR)` loads — `config.json` (with `torch_dtype`), `generation_config.json`,
//! the weights as `model.safetensors` or, above `max_shard_bytes`, as shards
//! `model-0000K-of-0000N.safetensors` with `model.safetensors.index.json` (transformers' rule: tensors
//! in order, a new shard when the next tensor would take the current one past the limit), and the
//! tokenizer files of the directory the run started from.
//!
//! An [`Export`] is the plan: every file with its exact size, known from the model's shapes before
//! anything is written, so the caller checks and locks them as outputs (`crate::outputs`). Its
//! [`ExportWriter`] then writes each shard's header at once and the tensors as each unit arrives;
//! every file is written under a temporary name and renamed into place only when all are whole;
//! then a directory's weight files of an earlier export that this one did not write are removed.

use std::collections::BTreeMap;
use std::io::Write;
use std::ops::Range;
use std::path::{Path, PathBuf};

use super::{source, transpose, WeightsError};
use crate::config::ModelConfig;
use crate::model::UnitSpec;
use crate::outputs::{AtomicFile, OutputFile};

/// Element type of exported tensors.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ExportDtype {
    Fp32,
    Bf16,
    Fp16,
}

impl ExportDtype {
    fn safetensors(self) -> &'static str {
        match self {
            ExportDtype::Fp32 => "F32",
            ExportDtype::Bf16 => "BF16",
            ExportDtype::Fp16 => "F16",
        }
    }

    /// As `--dtype` spells it.
    pub fn name(self) -> &'static str {
        match self {
            ExportDtype::Fp32 => "fp32",
            ExportDtype::Bf16 => "bf16",
            ExportDtype::Fp16 => "fp16",
        }
    }

    fn size(self) -> usize {
        match self {
            ExportDtype::Fp32 => 4,
            ExportDtype::Bf16 | ExportDtype::Fp16 => 2,
        }
    }

    /// config.json's `torch_dtype`.
    pub fn torch(self) -> &'static str {
        match self {
            ExportDtype::Fp32 => "float32",
            ExportDtype::Bf16 => "bfloat16",
            ExportDtype::Fp16 => "float16",
        }
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            ExportDtype::Fp32 => bytemuck::cast_slice(values).to_vec(),
            ExportDtype::Bf16 => {
                let v: Vec<half::bf16> = values.iter().map(|&x| half::bf16::from_f32(x)).collect();
                bytemuck::cast_slice(&v).to_vec()
            }
            ExportDtype::Fp16 => {
                let v: Vec<half::f16> = values.iter().map(|&x| half::f16::from_f32(x)).collect();
                bytemuck::cast_slice(&v).to_vec()
            }
        }
    }
}

/// transformers' default `max_shard_size` ("5GB").
pub const MAX_SHARD_BYTES_DEFAULT: u64 = 5_000_000_000;

/// The files of a model directory copied from the one the run started from, when it has them.
pub const TOKENIZER_FILES: [&str; 8] = [
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
];

const GENERATION_CONFIG: &str = "generation_config.json";

enum Content {
    Shard(usize),
    Text(String),
    Copy(PathBuf),
}

/// One file of an export: its path, its size, and what it holds.
pub struct PlannedFile {
    pub path: PathBuf,
    pub bytes: u64,
    what: String,
    content: Content,
}

struct Shard {
    /// The length prefix and the JSON header, padded so data starts 8-byte aligned.
    header: Vec<u8>,
    /// The tensors it holds, by their index in the model's order.
    tensors: Range<usize>,
}

/// What an export writes, every size known.
pub struct Export {
    files: Vec<PlannedFile>,
    shards: Vec<Shard>,
    dtype: ExportDtype,
    units: Vec<UnitSpec>,
    /// A model directory's path: weight files of an earlier export there that this one does not
    /// write are removed once it is in place.
    dir: Option<PathBuf>,
}

/// A tensor's shape in the files (Conv1D's `[in, out]` for tensors stored transposed).
fn file_shape(spec: &crate::model::TensorSpec) -> Vec<usize> {
    if spec.stored_transposed {
        vec![spec.shape[1], spec.shape[0]]
    } else {
        spec.shape.clone()
    }
}

impl Export {
    /// The weights as one safetensors file at `path`, with `metadata` in its header.
    pub fn file(
        path: &Path,
        units: &[UnitSpec],
        dtype: ExportDtype,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Export, WeightsError> {
        let mut export = Export::shards(units, dtype, u64::MAX, metadata, path)?;
        export.files[0].path = path.to_path_buf();
        Ok(export)
    }

    /// A model directory `dir` of the model `model`: config.json, generation_config.json, the
    /// weights in shards of at most `max_shard_bytes` (a tensor larger than that has a shard of
    /// its own), and the tokenizer files of `source` (the model directory the run started from).
    pub fn dir(
        dir: &Path,
        units: &[UnitSpec],
        model: &ModelConfig,
        dtype: ExportDtype,
        max_shard_bytes: u64,
        source: Option<&Path>,
        metadata: &BTreeMap<String, String>,
    ) -> Result<Export, WeightsError> {
        let mut export = Export::shards(units, dtype, max_shard_bytes, metadata, dir)?;
        export.dir = Some(dir.to_path_buf());
        let n = export.shards.len();
        if n > 1 {
            let mut weight_map = serde_json::Map::new();
            let tensors: Vec<&str> = units
                .iter()
                .flat_map(|u| &u.tensors)
                .map(|t| t.name.as_str())
                .collect();
            let mut total = 0u64;
            for (k, shard) in export.shards.iter().enumerate() {
                export.files[k].path = dir.join(shard_name(k, n));
                total += export.files[k].bytes - shard.header.len() as u64;
                for t in shard.tensors.clone() {
                    weight_map.insert(tensors[t].into(), shard_name(k, n).into());
                }
            }
            let params: usize = units.iter().map(UnitSpec::num_params).sum();
            let index = serde_json::json!({
                "metadata": {"total_size": total, "total_parameters": params},
                "weight_map": weight_map,
            });
            export.text(
                dir.join(source::INDEX_FILE),
                pretty(&index)?,
                "the shards' index",
            );
        } else {
            export.files[0].path = dir.join(source::SINGLE_FILE);
        }
        // The source's own config fields that strata does not model (token ids).
        let source_config = source.and_then(|s| read_json(&s.join("config.json")));
        let mut config = config_json(model, dtype)?;
        if let (Some(fields), Some(theirs)) = (config.as_object_mut(), &source_config) {
            for key in ["bos_token_id", "eos_token_id", "pad_token_id"] {
                if let Some(v) = theirs.get(key) {
                    fields.insert(key.into(), v.clone());
                }
            }
        }
        export.text(
            dir.join("config.json"),
            pretty(&config)?,
            "the model's config",
        );
        match source
            .map(|s| s.join(GENERATION_CONFIG))
            .filter(|p| p.is_file())
        {
            Some(from) => export.copy(dir, &from)?,
            None => {
                let token = |k: &str| config.get(k).cloned().unwrap_or(serde_json::Value::Null);
                let generation = serde_json::json!({
                    "_from_model_config": true,
                    "bos_token_id": token("bos_token_id"),
                    "eos_token_id": token("eos_token_id"),
                });
                export.text(
                    dir.join(GENERATION_CONFIG),
                    pretty(&generation)?,
                    "generation defaults",
                );
            }
        }
        for name in TOKENIZER_FILES {
            if let Some(from) = source.map(|s| s.join(name)).filter(|p| p.is_file()) {
                export.copy(dir, &from)?;
            }
        }
        Ok(export)
    }

    /// The shards alone (each file's path set by the caller).
    fn shards(
        units: &[UnitSpec],
        dtype: ExportDtype,
        max_shard_bytes: u64,
        metadata: &BTreeMap<String, String>,
        path: &Path,
    ) -> Result<Export, WeightsError> {
        let specs: Vec<_> = units.iter().flat_map(|u| &u.tensors).collect();
        let mut cuts = vec![0];
        let mut size = 0u64;
        for (t, spec) in specs.iter().enumerate() {
            let bytes = (spec.numel() * dtype.size()) as u64;
            if size > 0 && size.saturating_add(bytes) > max_shard_bytes {
                cuts.push(t);
                size = 0;
            }
            size += bytes;
        }
        cuts.push(specs.len());
        let mut export = Export {
            files: Vec::new(),
            shards: Vec::new(),
            dtype,
            units: units.to_vec(),
            dir: None,
        };
        for (k, w) in cuts.windows(2).enumerate() {
            let mut header = serde_json::Map::new();
            let mut at = 0usize;
            for spec in &specs[w[0]..w[1]] {
                let bytes = spec.numel() * dtype.size();
                header.insert(
                    spec.name.clone(),
                    serde_json::json!({"dtype": dtype.safetensors(), "shape": file_shape(spec), "data_offsets": [at, at + bytes]}),
                );
                at += bytes;
            }
            header.insert("__metadata__".into(), serde_json::json!(metadata));
            let mut text = serde_json::to_string(&header).map_err(|e| WeightsError::Format {
                path: path.into(),
                message: e.to_string(),
            })?;
            while (8 + text.len()) % 8 != 0 {
                text.push(' ');
            }
            let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
            bytes.extend_from_slice(text.as_bytes());
            export.files.push(PlannedFile {
                path: PathBuf::new(),
                bytes: (bytes.len() + at) as u64,
                what: format!(
                    "{} {} parameters and the safetensors header",
                    specs[w[0]..w[1]].iter().map(|s| s.numel()).sum::<usize>(),
                    dtype.name()
                ),
                content: Content::Shard(k),
            });
            export.shards.push(Shard {
                header: bytes,
                tensors: w[0]..w[1],
            });
        }
        Ok(export)
    }

    /// Adds a file of `text` at `path`.
    pub fn text(&mut self, path: PathBuf, text: String, what: &str) {
        self.files.push(PlannedFile {
            path,
            bytes: text.len() as u64,
            what: what.into(),
            content: Content::Text(text),
        });
    }

    /// Adds a copy of the file `from` into `dir`, under its own name.
    fn copy(&mut self, dir: &Path, from: &Path) -> Result<(), WeightsError> {
        let (_, len) = crate::inputs::open_regular(from)?;
        self.files.push(PlannedFile {
            path: dir.join(from.file_name().unwrap_or_default()),
            bytes: len,
            what: format!("a copy of {}", from.display()),
            content: Content::Copy(from.to_path_buf()),
        });
        Ok(())
    }

    /// Every file, in the order [`Export::writer`] takes their targets.
    pub fn files(&self) -> &[PlannedFile] {
        &self.files
    }

    /// The files as outputs named by `key` (`--output`, `train.export_to`), for `crate::outputs`.
    pub fn outputs(&self, key: &str) -> Vec<OutputFile> {
        self.files
            .iter()
            .enumerate()
            .map(|(i, f)| OutputFile {
                key: match i {
                    0 => key.to_string(),
                    _ => format!(
                        "{key}'s {}",
                        f.path.file_name().unwrap_or_default().to_string_lossy()
                    ),
                },
                path: f.path.clone(),
                size_bytes: f.bytes,
                size_detail: f.what.clone(),
            })
            .collect()
    }

    /// The files read (copied) into the export.
    pub fn sources(&self) -> impl Iterator<Item = &Path> {
        self.files.iter().filter_map(|f| match &f.content {
            Content::Copy(from) => Some(from.as_path()),
            _ => None,
        })
    }

    /// Starts writing: every file created under a temporary name beside its target (`targets`,
    /// one per [`Export::files`], as resolved by `crate::outputs`), the small files and each
    /// shard's header written now.
    pub fn writer(&self, targets: &[PathBuf]) -> Result<ExportWriter<'_>, WeightsError> {
        if targets.len() != self.files.len() {
            return Err(WeightsError::Format {
                path: self.files[0].path.clone(),
                message: format!(
                    "the export has {} files, but {} places were checked for them",
                    self.files.len(),
                    targets.len()
                ),
            });
        }
        let mut files = Vec::with_capacity(self.files.len());
        for (plan, target) in self.files.iter().zip(targets) {
            let mut atomic = AtomicFile::create(target)?;
            let written = match &plan.content {
                Content::Shard(k) => atomic.file().write_all(&self.shards[*k].header),
                Content::Text(text) => atomic.file().write_all(text.as_bytes()),
                Content::Copy(from) => {
                    let (mut input, _) = crate::inputs::open_regular(from)?;
                    std::io::copy(&mut input, atomic.file()).map(|_| ())
                }
            };
            written.map_err(|e| atomic.error("writing", e))?;
            files.push(atomic);
        }
        Ok(ExportWriter {
            export: self,
            files,
            next_unit: 0,
        })
    }
}

/// Writes an [`Export`]'s tensors as the units arrive, in order.
pub struct ExportWriter<'a> {
    export: &'a Export,
    files: Vec<AtomicFile>,
    next_unit: usize,
}

impl ExportWriter<'_> {
    /// The next unit's weights (its flat layout: tensors in order, padding rows after each).
    pub fn unit(&mut self, values: &[f32]) -> Result<(), WeightsError> {
        let u = self.next_unit;
        let first: usize = self.export.units[..u].iter().map(|u| u.tensors.len()).sum();
        let unit = &self.export.units[u];
        for (i, (spec, range)) in unit.tensors.iter().zip(unit.ranges()).enumerate() {
            let t = first + i;
            let k = self
                .export
                .shards
                .iter()
                .position(|s| s.tensors.contains(&t))
                .unwrap_or(0);
            let v = &values[range.start..range.start + spec.numel()];
            let bytes = if spec.stored_transposed {
                self.export
                    .dtype
                    .encode(&transpose(v, spec.shape[0], spec.shape[1]))
            } else {
                self.export.dtype.encode(v)
            };
            let atomic = &mut self.files[k];
            atomic
                .file()
                .write_all(&bytes)
                .map_err(|e| atomic.error("writing", e))?;
        }
        self.next_unit += 1;
        Ok(())
    }

    /// Every file into place, the shards first, once every unit was written.
    pub fn finish(self) -> Result<(), WeightsError> {
        if self.next_unit != self.export.units.len() {
            let path = self.export.files[0].path.clone();
            return Err(WeightsError::Format {
                path,
                message: format!(
                    "the export was given {} of the model's {} units",
                    self.next_unit,
                    self.export.units.len()
                ),
            });
        }
        for atomic in self.files {
            atomic.commit()?;
        }
        match &self.export.dir {
            Some(dir) => self.export.remove_stale(dir),
            None => Ok(()),
        }
    }
}

impl Export {
    /// Removes the weight files of an earlier export in `dir` that this one did not write — its
    /// shards of another count, its index when this export is one file, its single file when
    /// this one is sharded — as transformers' `save_pretrained` cleans the folder: a reader that
    /// prefers the index (strata does) would otherwise load the old weights.
    fn remove_stale(&self, dir: &Path) -> Result<(), WeightsError> {
        let written: Vec<&std::ffi::OsStr> = self
            .files
            .iter()
            .filter_map(|f| f.path.file_name())
            .collect();
        let entries = std::fs::read_dir(dir).map_err(|error| WeightsError::Io {
            path: dir.to_path_buf(),
            error,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name();
            if written.contains(&name.as_os_str()) || !is_weight_file(&name.to_string_lossy()) {
                continue;
            }
            let path = entry.path();
            tracing::info!("removed {} of an earlier export", path.display());
            std::fs::remove_file(&path).map_err(|error| WeightsError::Io { path, error })?;
        }
        Ok(())
    }
}

/// Whether `name` is a weight file of a model directory as exports write them.
fn is_weight_file(name: &str) -> bool {
    let shard = name
        .strip_prefix("model-")
        .and_then(|rest| rest.strip_suffix(".safetensors"))
        .and_then(|rest| rest.split_once("-of-"))
        .is_some_and(|(k, n)| {
            [k, n]
                .iter()
                .all(|d| d.len() == 5 && d.bytes().all(|b| b.is_ascii_digit()))
        });
    shard || name == source::SINGLE_FILE || name == source::INDEX_FILE
}

fn shard_name(k: usize, n: usize) -> String {
    format!("model-{:05}-of-{n:05}.safetensors", k + 1)
}

fn pretty(v: &serde_json::Value) -> Result<String, WeightsError> {
    serde_json::to_string_pretty(v)
        .map(|mut t| {
            t.push('\n');
            t
        })
        .map_err(|e| WeightsError::Format {
            path: PathBuf::new(),
            message: e.to_string(),
        })
}

fn read_json(path: &Path) -> Option<serde_json::Value> {
    let bytes = crate::inputs::read_bounded(path, 4 << 20, "a model's config.json").ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// The `config.json` of the model's transformers class with `torch_dtype`.
pub fn config_json(
    model: &ModelConfig,
    dtype: ExportDtype,
) -> Result<serde_json::Value, WeightsError> {
    let mut config = crate::model::hf_config(model).map_err(|message| WeightsError::Format {
        path: PathBuf::from("config.json"),
        message: format!("cannot export: {message}"),
    })?;
    if let Some(fields) = config.as_object_mut() {
        fields.insert("torch_dtype".into(), dtype.torch().into());
    }
    Ok(config)
}

/// `--max-shard-size`: a size as transformers writes it (`5GB`, `500MB`, `10KB`: powers of 1000;
/// `2GiB`: powers of 1024), or a plain count of bytes.
pub fn parse_shard_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let digits = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(digits);
    let n: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a size (5GB, 500MB, 2GiB or bytes)"))?;
    let scale = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1u64,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        "TB" => 1_000_000_000_000,
        "KIB" => 1 << 10,
        "MIB" => 1 << 20,
        "GIB" => 1 << 30,
        "TIB" => 1 << 40,
        other => {
            return Err(format!(
                "`{text}`: unit `{other}` is not one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
            ))
        }
    };
    let bytes = n * scale as f64;
    if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err(format!("`{text}` must be at least one byte"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::{parse_shard_size, Export, ExportDtype};
    use crate::config::ModelConfig;
    use std::collections::BTreeMap;
    use std::path::PathBuf;

    /// Exporting into a directory that holds an earlier export of another shard count leaves the
    /// new export's weight files only (other files stay): with a stale index beside a new single
    /// file, a reader would take the old weights.
    #[test]
    fn an_export_removes_the_weight_files_of_an_earlier_one_it_does_not_write() {
        let config = ModelConfig::default();
        let model = crate::model::build(&config);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("adapter_model.safetensors"), b"theirs").unwrap();
        let export = |max_shard_bytes: u64| {
            let export = Export::dir(
                dir.path(),
                model.units(),
                &config,
                ExportDtype::Bf16,
                max_shard_bytes,
                None,
                &BTreeMap::new(),
            )
            .unwrap();
            let targets: Vec<PathBuf> = export.files().iter().map(|f| f.path.clone()).collect();
            let mut writer = export.writer(&targets).unwrap();
            for unit in model.units() {
                writer.unit(&vec![0.5; unit.numel()]).unwrap();
            }
            writer.finish().unwrap();
            let mut names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains("safetensors"))
                .collect();
            names.sort();
            names
        };
        let sharded = export(200_000);
        assert!(sharded.len() > 4, "{sharded:?}");
        assert!(sharded.contains(&"model.safetensors.index.json".to_string()));
        assert!(!sharded.contains(&"model.safetensors".to_string()));
        assert_eq!(
            export(u64::MAX),
            ["adapter_model.safetensors", "model.safetensors"]
        );
        assert_eq!(export(200_000), sharded);
    }

    #[test]
    fn shard_sizes_read_as_transformers_writes_them() {
        assert_eq!(parse_shard_size("5GB"), Ok(5_000_000_000));
        assert_eq!(parse_shard_size("20KB"), Ok(20_000));
        assert_eq!(parse_shard_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_shard_size("1.5MB"), Ok(1_500_000));
        assert_eq!(parse_shard_size("4096"), Ok(4096));
        for bad in ["", "GB", "5 parsecs", "0", "-1GB"] {
            assert!(parse_shard_size(bad).is_err(), "{bad}");
        }
    }
}
