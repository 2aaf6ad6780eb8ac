//! What `strata generate MODEL` names: a strata checkpoint (its manifest holds the model's
//! `[model]`), a directory of checkpoints (its newest), or a safetensors file with the
//! `config.json` that `strata export` writes beside it (or a directory holding both as
//! `model.safetensors` and `config.json`). Read into host memory: the model's `[model]`, each
//! unit's parameters, the end-of-sequence ids, and where a tokenizer may lie.

use std::path::{Path, PathBuf};

use serde_json::Value;

use super::GenerateError;
use crate::config::{Arch, ModelConfig, RopeScaling};
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
    let weights = if model.is_dir() && model.join("config.json").is_file() {
        Some(model.join("model.safetensors"))
    } else if model.is_file() && model.extension().is_some_and(|e| e == "safetensors") {
        Some(model.to_path_buf())
    } else {
        None
    };
    match weights {
        Some(file) => from_safetensors(&file),
        None if model.is_dir() => from_checkpoint(model),
        None => Err(GenerateError::Input(format!(
            "MODEL {}: neither a strata checkpoint (a directory with manifest.json, or of checkpoints) \
             nor a .safetensors file with a config.json beside it",
            model.display()
        ))),
    }
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

fn from_safetensors(file: &Path) -> Result<Source, GenerateError> {
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let config_path = dir.join("config.json");
    if !config_path.is_file() {
        return Err(GenerateError::Input(format!(
            "MODEL {}: no config.json beside it (strata export writes one)",
            file.display()
        )));
    }
    let json = read_json(&config_path)?;
    let config = model_config(&json)
        .map_err(|e| GenerateError::Input(format!("{}: {e}", config_path.display())))?;
    config
        .validate()
        .map_err(|e| GenerateError::Input(format!("{}: {e}", config_path.display())))?;
    let model = crate::model::build(&config);
    let mut params: Vec<Vec<f32>> = model.units().iter().map(|u| vec![0.0; u.numel()]).collect();
    crate::weights::load(file, model.units(), &model.tied_names(), &mut params)?;
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

/// `[model]` from the fields of config.json that `strata export` writes (`model::hf_config`):
/// the architecture from `architectures`, the shapes, the rope settings, and the features its
/// class fixes (q/k/v biases for Qwen2, per-head q/k norms for Qwen3). The reader of Hugging Face
/// model directories replaces it.
pub fn model_config(json: &Value) -> Result<ModelConfig, String> {
    let class = json
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .ok_or("`architectures` names no class")?;
    let size = |key: &str| -> Result<usize, String> {
        json.get(key)
            .and_then(Value::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| format!("`{key}` must be a whole number"))
    };
    let opt_size = |key: &str| json.get(key).and_then(Value::as_u64).map(|v| v as usize);
    let opt_f64 = |key: &str| json.get(key).and_then(Value::as_f64);
    let opt_bool = |key: &str| json.get(key).and_then(Value::as_bool);
    if class == "GPT2LMHeadModel" {
        return Ok(ModelConfig {
            arch: Arch::Gpt2,
            n_layer: size("n_layer")?,
            n_head: size("n_head")?,
            n_embd: size("n_embd")?,
            vocab_size: size("vocab_size")?,
            seq_len: size("n_positions")?,
            ..ModelConfig::default()
        });
    }
    let (qkv_bias, qk_norm) = match class {
        "LlamaForCausalLM" | "MistralForCausalLM" => (None, None),
        "Qwen2ForCausalLM" => (Some(true), None),
        "Qwen3ForCausalLM" => (None, Some(true)),
        other => return Err(format!("architecture `{other}` is not one strata builds")),
    };
    let rope_scaling = match json.get("rope_scaling") {
        None | Some(Value::Null) => None,
        Some(v) => Some(
            serde_json::from_value::<RopeScaling>(v.clone())
                .map_err(|e| format!("`rope_scaling`: {e}"))?,
        ),
    };
    Ok(ModelConfig {
        arch: Arch::Llama,
        n_layer: size("num_hidden_layers")?,
        n_head: size("num_attention_heads")?,
        n_embd: size("hidden_size")?,
        vocab_size: size("vocab_size")?,
        seq_len: size("max_position_embeddings")?,
        n_kv_head: opt_size("num_key_value_heads"),
        head_dim: opt_size("head_dim"),
        intermediate_size: Some(size("intermediate_size")?),
        rms_norm_eps: opt_f64("rms_norm_eps"),
        rope_theta: opt_f64("rope_theta"),
        rope_scaling,
        tie_word_embeddings: opt_bool("tie_word_embeddings"),
        attention_bias: opt_bool("attention_bias"),
        qkv_bias,
        mlp_bias: opt_bool("mlp_bias"),
        qk_norm,
        sliding_window: opt_size("sliding_window"),
        ..ModelConfig::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    /// What `strata export` writes for a model reads back as that model.
    #[test]
    fn the_config_json_of_an_export_reads_back_as_its_model() {
        let variants: [&[&str]; 4] = [
            &[],
            &[
                "model.arch=\"llama\"",
                "model.intermediate_size=200",
                "model.n_kv_head=2",
            ],
            &[
                "model.arch=\"llama\"",
                "model.intermediate_size=64",
                "model.qkv_bias=true",
                "model.tie_word_embeddings=true",
                "model.rope_scaling={rope_type=\"linear\", factor=2.0}",
            ],
            &[
                "model.arch=\"llama\"",
                "model.intermediate_size=64",
                "model.qk_norm=true",
                "model.head_dim=64",
            ],
        ];
        for sets in variants {
            let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
            let m = Config::load(None, &sets).expect("config").model;
            let json = crate::model::hf_config(&m).expect("a transformers class");
            let back = model_config(&json).expect("reads back");
            let (a, b) = (crate::model::build(&m), crate::model::build(&back));
            assert_eq!(a.units(), b.units(), "{sets:?}");
            assert_eq!(a.describe(), b.describe(), "{sets:?}");
            assert_eq!(m.rope_kind(), back.rope_kind(), "{sets:?}");
            assert_eq!(
                (m.seq_len, m.theta(), m.rms_eps()),
                (back.seq_len, back.theta(), back.rms_eps())
            );
        }
    }

    #[test]
    fn an_unknown_class_is_named() {
        let json = serde_json::json!({"architectures": ["MixtralForCausalLM"]});
        let e = model_config(&json).expect_err("refused");
        assert!(e.contains("MixtralForCausalLM"), "{e}");
    }
}
