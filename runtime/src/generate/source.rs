//! What `strata generate MODEL` names: a strata checkpoint (its manifest holds the model's
//! `[model]`), a directory of checkpoints (its newest), or a safetensors file with the
//! `config.json` that `strata export` writes beside it (or a directory holding both as
//! `model.safetensors` and `config.json`). Read into host memory: the model's `[model]`, each
//! unit's parameters, the end-of-sequence ids, and where a tokenizer may lie.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::GenerateError;
use crate::config::ModelConfig;
use crate::engine::checkpoint::{self, CheckpointReader};
use crate::engine::EngineError;

/// A model read from disk.
pub struct Source {
    pub config: ModelConfig,
    /// Each unit's flat parameters (padding rows zero), f32.
    pub params: Vec<Vec<f32>>,
    /// Token ids that end a continuation (config.json's / generation_config.json's
    /// `eos_token_id`); none: only the token budget ends it.
    pub eos: Vec<u32>,
    /// Directories searched for `tokenizer.json`, in order.
    pub tokenizer_dirs: Vec<PathBuf>,
}

/// The largest config.json or generation_config.json read.
const CONFIG_BYTES_MAX: u64 = 16 << 20;

/// Reads MODEL.
pub fn load(model: &Path) -> Result<Source, GenerateError> {
    if model.is_dir() && model.join("config.json").is_file() {
        return from_hf(model, model);
    }
    if model.is_file() && model.extension().is_some_and(|e| e == "safetensors") {
        let dir = model
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.join("config.json").is_file() {
            return Err(GenerateError::Input(format!(
                "MODEL {}: no config.json beside it (strata export writes one)",
                model.display()
            )));
        }
        return from_hf(dir, model);
    }
    if model.is_dir() {
        return from_checkpoint(model);
    }
    Err(GenerateError::Input(format!(
        "MODEL {}: neither a strata checkpoint (a directory with manifest.json, or of checkpoints) \
         nor a model directory (config.json and its safetensors) nor a .safetensors file with a config.json beside it",
        model.display()
    )))
}

fn from_checkpoint(arg: &Path) -> Result<Source, GenerateError> {
    let dir = crate::export::checkpoint_of(arg).map_err(|e| {
        GenerateError::Input(format!(
            "MODEL {}: neither a strata checkpoint nor a .safetensors file with a config.json beside it ({e})",
            arg.display()
        ))
    })?;
    let manifest = checkpoint::read_manifest(&dir)?;
    let reader = CheckpointReader::open(&dir, &manifest)?;
    let model = crate::model::build(&manifest.model);
    let units = model.units();
    if units.len() != reader.units().len()
        || units
            .iter()
            .zip(reader.units())
            .any(|(u, e)| u.numel() != e.numel)
    {
        return Err(EngineError::Checkpoint(format!(
            "{}: its units do not match the model of its own manifest",
            dir.display()
        ))
        .into());
    }
    let params = (0..units.len())
        .map(|u| reader.master(u))
        .collect::<Result<_, _>>()?;
    // The end-of-sequence token the model's export would declare.
    let eos = crate::model::hf_config(&manifest.model)
        .map(|c| eos_ids(&c))
        .unwrap_or_default();
    let mut tokenizer_dirs = vec![dir.clone()];
    tokenizer_dirs.extend(dir.parent().map(Path::to_path_buf));
    Ok(Source {
        config: manifest.model,
        params,
        eos,
        tokenizer_dirs,
    })
}

/// A Hugging Face model directory `dir` (its config.json, generation_config.json and tokenizer),
/// with the weights of `weights`: the directory itself (model.safetensors or its shards) or one
/// safetensors file in it.
fn from_hf(dir: &Path, weights: &Path) -> Result<Source, GenerateError> {
    let config_path = dir.join("config.json");
    let json = read_json(&config_path)?;
    let bad = |e: String| GenerateError::Input(format!("{}: {e}", config_path.display()));
    let fields = json
        .as_object()
        .ok_or_else(|| bad("not a JSON object".into()))?;
    // The context a continuation may fill: the model's own (max_position_embeddings).
    let context = fields
        .get("max_position_embeddings")
        .or_else(|| fields.get("n_positions"))
        .and_then(Value::as_u64)
        .and_then(|n| usize::try_from(n).ok())
        .ok_or_else(|| bad("no max_position_embeddings".into()))?;
    let config: ModelConfig = crate::config::hf_dir::model_of(&config_path, fields, context)
        .map_err(|e| GenerateError::Input(e.to_string()))?;
    config.validate().map_err(|e| bad(e.to_string()))?;
    let model = crate::model::build(&config);
    let source = crate::weights::WeightSource::open(weights, model.units(), &model.tied_names())?;
    let params = model
        .units()
        .iter()
        .enumerate()
        .map(|(u, unit)| {
            let mut values = vec![0.0; unit.numel()];
            source
                .read(u, 0..unit.numel(), &mut values)
                .map(|()| values)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let generation = dir.join("generation_config.json");
    let eos = if generation.is_file() {
        eos_ids(&read_json(&generation)?)
    } else {
        Vec::new()
    };
    let eos = if eos.is_empty() { eos_ids(&json) } else { eos };
    Ok(Source {
        config,
        params,
        eos,
        tokenizer_dirs: vec![dir.to_path_buf()],
    })
}

fn read_json(path: &Path) -> Result<Value, GenerateError> {
    let bad = |e: String| GenerateError::Input(format!("{}: {e}", path.display()));
    let (file, len) = crate::inputs::open_regular(path).map_err(|e| bad(e.to_string()))?;
    if len > CONFIG_BYTES_MAX {
        return Err(bad(format!(
            "{len} bytes; at most {CONFIG_BYTES_MAX} are read"
        )));
    }
    serde_json::from_reader(std::io::BufReader::new(file)).map_err(|e| bad(e.to_string()))
}

/// `eos_token_id`: one id, a list of ids, or null.
fn eos_ids(json: &Value) -> Vec<u32> {
    let id = |v: &Value| v.as_u64().and_then(|i| u32::try_from(i).ok());
    match json.get("eos_token_id") {
        Some(Value::Array(ids)) => ids.iter().filter_map(id).collect(),
        Some(v) => id(v).into_iter().collect(),
        None => Vec::new(),
    }
}
