//! `model.init_from = "DIR"`: a Hugging Face model directory's `config.json` fills `[model]`.
//!
//! The inverse of `model::hf::hf_config`: the class in `architectures` gives `model.arch` (and the
//! Llama family's fixed features: Qwen2's q/k/v biases, Qwen3's q/k norms), [`FIELDS`] maps every
//! shape field to its `[model]` key, and the fields that change the math strata computes are
//! checked to hold the values it computes (`hidden_act = "silu"`, GPT-2's `gelu_new`, …). A field
//! strata does not know is refused by name, since it may change the math; the fields listed in
//! `IGNORED` do not (dropout, token ids, dtype, caching). A `[model]` key the user also set must
//! agree with config.json; the error names both.
//!
//! Both spellings of the rotary settings are read: transformers 4's `rope_theta` and
//! `rope_scaling`, and transformers 5's `rope_parameters` (`rope_theta` inside it).

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::{Arch, ConfigError, ModelConfig, RopeScaling};

/// The largest config.json read (a real one is a few KB).
const CONFIG_JSON_BYTES_MAX: u64 = 4 << 20;

/// One `[model]` key and the config.json field it mirrors, for GPT-2 and for the Llama family
/// (`None`: the family has no such field).
pub struct Field {
    pub key: &'static str,
    pub gpt2: Option<&'static str>,
    pub llama: Option<&'static str>,
}

/// The shape fields, one table for reading and for naming fields in errors.
pub const FIELDS: [Field; 12] = [
    field("n_layer", Some("n_layer"), Some("num_hidden_layers")),
    field("n_head", Some("n_head"), Some("num_attention_heads")),
    field("n_embd", Some("n_embd"), Some("hidden_size")),
    field("vocab_size", Some("vocab_size"), Some("vocab_size")),
    field("seq_len", Some("n_positions"), None),
    field("n_kv_head", None, Some("num_key_value_heads")),
    field("head_dim", None, Some("head_dim")),
    field("intermediate_size", None, Some("intermediate_size")),
    field("rms_norm_eps", None, Some("rms_norm_eps")),
    field("tie_word_embeddings", None, Some("tie_word_embeddings")),
    field("mlp_bias", None, Some("mlp_bias")),
    field(
        "max_position_embeddings",
        None,
        Some("max_position_embeddings"),
    ),
];

const fn field(
    key: &'static str,
    gpt2: Option<&'static str>,
    llama: Option<&'static str>,
) -> Field {
    Field { key, gpt2, llama }
}

/// Fields that do not change the model's math (read by nothing, or checked below by hand).
const IGNORED: [&str; 27] = [
    "_name_or_path",
    "architectures",
    "model_type",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "initializer_range",
    "use_cache",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "problem_type",
    "chunk_size_feed_forward",
    "is_encoder_decoder",
    "id2label",
    "label2id",
    "tokenizer_class",
    // Dropout: strata trains without it (the forward pass is the eval-mode one).
    "attention_dropout",
    "resid_pdrop",
    "embd_pdrop",
    "attn_pdrop",
    "summary_first_dropout",
    // transformers 4's tensor-parallel split of the projections: the same math.
    "pretraining_tp",
    // GPT-2's context (n_positions is read); transformers computes attention in fp32 either way.
    "n_ctx",
];

/// GPT2DoubleHeadsModel's summary head, which GPT2LMHeadModel does not have.
const GPT2_SUMMARY: [&str; 5] = [
    "summary_activation",
    "summary_proj_to_labels",
    "summary_type",
    "summary_use_proj",
    "reorder_and_upcast_attn",
];

/// `DIR/config.json` read into `[model]`; `seq_len` is `seq_len` for the Llama family (its
/// context is the user's choice) and config.json's `n_positions` for GPT-2.
pub fn read_model_dir(dir: &Path, seq_len: usize) -> Result<ModelConfig, ConfigError> {
    let path = dir.join("config.json");
    if !path.is_file() {
        return Err(ConfigError::Key {
            origin: dir.display().to_string(),
            key: "model.init_from".into(),
            message: format!(
                "{}: no such file: a model directory has the config.json that save_pretrained writes",
                path.display()
            ),
        });
    }
    let bytes = crate::inputs::read_bounded(&path, CONFIG_JSON_BYTES_MAX, "a model's config.json")?;
    let json: Value = serde_json::from_slice(&bytes).map_err(|e| ConfigError::Syntax {
        origin: path.display().to_string(),
        message: format!("not valid JSON: {e}"),
    })?;
    let Value::Object(fields) = json else {
        return Err(syntax(&path, "not a JSON object"));
    };
    model_of(&path, &fields, seq_len)
}

fn syntax(path: &Path, message: impl Into<String>) -> ConfigError {
    ConfigError::Syntax {
        origin: path.display().to_string(),
        message: message.into(),
    }
}

fn field_error(path: &Path, name: &str, message: impl std::fmt::Display) -> ConfigError {
    syntax(path, format!("`{name}`: {message}"))
}

/// config.json's fields as a `[model]` section.
pub fn model_of(
    path: &Path,
    fields: &Map<String, Value>,
    seq_len: usize,
) -> Result<ModelConfig, ConfigError> {
    let class = match fields.get("architectures") {
        Some(Value::Array(a)) if a.len() == 1 => a[0].as_str().unwrap_or_default(),
        _ => {
            return Err(field_error(
                path,
                "architectures",
                "must name one transformers class (GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)",
            ))
        }
    };
    let arch = match class {
        "GPT2LMHeadModel" => Arch::Gpt2,
        "LlamaForCausalLM" | "MistralForCausalLM" | "Qwen2ForCausalLM" | "Qwen3ForCausalLM" => {
            Arch::Llama
        }
        other => {
            return Err(field_error(
                path,
                "architectures",
                format!("\"{other}\" is not a model strata builds (GPT2LMHeadModel, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM)"),
            ))
        }
    };
    let mut m = ModelConfig {
        arch,
        seq_len,
        init_from: Some(path.parent().unwrap_or(Path::new(".")).to_path_buf()),
        ..ModelConfig::default()
    };
    let mut read: Vec<&str> = Vec::new();
    let set = |name: &'static str, read: &mut Vec<&str>| -> Option<&Value> {
        read.push(name);
        fields.get(name).filter(|v| !v.is_null())
    };
    let count = |name: &str, v: &Value| -> Result<usize, ConfigError> {
        v.as_u64()
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| field_error(path, name, format!("{v} is not a count")))
    };
    let float = |name: &str, v: &Value| -> Result<f64, ConfigError> {
        v.as_f64()
            .ok_or_else(|| field_error(path, name, format!("{v} is not a number")))
    };
    let boolean = |name: &str, v: &Value| -> Result<bool, ConfigError> {
        v.as_bool()
            .ok_or_else(|| field_error(path, name, format!("{v} is not true or false")))
    };
    for f in &FIELDS {
        let Some(name) = (match arch {
            Arch::Gpt2 => f.gpt2,
            Arch::Llama => f.llama,
        }) else {
            continue;
        };
        let Some(v) = set(name, &mut read) else {
            continue;
        };
        match f.key {
            "n_layer" => m.n_layer = count(name, v)?,
            "n_head" => m.n_head = count(name, v)?,
            "n_embd" => m.n_embd = count(name, v)?,
            "vocab_size" => m.vocab_size = count(name, v)?,
            "seq_len" => m.seq_len = count(name, v)?,
            "n_kv_head" => m.n_kv_head = Some(count(name, v)?),
            "head_dim" => m.head_dim = Some(count(name, v)?),
            "intermediate_size" => m.intermediate_size = Some(count(name, v)?),
            "rms_norm_eps" => m.rms_norm_eps = Some(float(name, v)?),
            "tie_word_embeddings" => m.tie_word_embeddings = Some(boolean(name, v)?),
            "mlp_bias" => m.mlp_bias = Some(boolean(name, v)?).filter(|&b| b),
            "max_position_embeddings" => m.max_position_embeddings = Some(count(name, v)?),
            _ => {}
        }
    }
    // Values strata computes: a field that holds another is refused by name.
    let must =
        |name: &'static str, ok: &dyn Fn(&Value) -> bool, says: &str, read: &mut Vec<&str>| {
            read.push(name);
            match fields.get(name) {
                Some(v) if !ok(v) => Err(field_error(
                    path,
                    name,
                    format!("{v} is not computed by strata ({says})"),
                )),
                _ => Ok(()),
            }
        };
    let is = |want: &'static str| move |v: &Value| v.as_str() == Some(want);
    let off = |v: &Value| v.is_null() || v == &Value::Bool(false);
    match arch {
        Arch::Gpt2 => {
            let gelu = |v: &Value| matches!(v.as_str(), Some("gelu_new" | "gelu_pytorch_tanh"));
            must(
                "activation_function",
                &gelu,
                "GELU with the tanh approximation, \"gelu_new\"",
                &mut read,
            )?;
            let eps = |v: &Value| v.as_f64() == Some(1e-5);
            must(
                "layer_norm_epsilon",
                &eps,
                "LayerNorm's epsilon is 1e-5",
                &mut read,
            )?;
            let n_embd = m.n_embd;
            let inner = move |v: &Value| v.is_null() || v.as_u64() == Some(4 * n_embd as u64);
            must("n_inner", &inner, "the MLP is 4 * n_embd wide", &mut read)?;
            let on = |v: &Value| v == &Value::Bool(true);
            must(
                "scale_attn_weights",
                &on,
                "scores are scaled by 1/sqrt(head size)",
                &mut read,
            )?;
            must(
                "scale_attn_by_inverse_layer_idx",
                &off,
                "no scaling by layer",
                &mut read,
            )?;
            must(
                "add_cross_attention",
                &off,
                "a decoder without cross-attention",
                &mut read,
            )?;
            must(
                "tie_word_embeddings",
                &on,
                "GPT-2's LM head is the token embedding",
                &mut read,
            )?;
            read.extend(GPT2_SUMMARY);
        }
        Arch::Llama => {
            must("hidden_act", &is("silu"), "SwiGLU with SiLU", &mut read)?;
            let full = |v: &Value| {
                v.as_array()
                    .is_some_and(|a| a.iter().all(|t| t.as_str() == Some("full_attention")))
            };
            must(
                "layer_types",
                &full,
                "every layer attends to the whole sequence",
                &mut read,
            )?;
            let one = |v: &Value| v.as_f64() == Some(1.0);
            must(
                "partial_rotary_factor",
                &one,
                "rotary embeddings on the whole head",
                &mut read,
            )?;
            if let Some(v) = set("attention_bias", &mut read) {
                m.attention_bias = Some(boolean("attention_bias", v)?).filter(|&b| b);
            }
            for name in ["num_local_experts", "num_experts"] {
                if let Some(v) = set(name, &mut read) {
                    m.num_experts = Some(count(name, v)?);
                }
            }
            match class {
                "Qwen2ForCausalLM" => m.qkv_bias = Some(true),
                "Qwen3ForCausalLM" => m.qk_norm = Some(true),
                _ => {}
            }
            if class == "MistralForCausalLM" {
                if let Some(v) = set("sliding_window", &mut read) {
                    m.sliding_window = Some(count("sliding_window", v)?);
                }
            } else {
                // Qwen's window applies only with use_sliding_window.
                must(
                    "use_sliding_window",
                    &off,
                    "attention over the whole sequence",
                    &mut read,
                )?;
                read.extend(["sliding_window", "max_window_layers"]);
            }
            rope(path, fields, &mut m, &mut read)?;
        }
    }
    if let Some(name) = fields
        .keys()
        .find(|k| !read.contains(&k.as_str()) && !IGNORED.contains(&k.as_str()))
    {
        return Err(field_error(
            path,
            name,
            "is not a field strata reads, and it may change the model's math: strata refuses it rather than compute another model",
        ));
    }
    Ok(m)
}

/// `rope_theta` and `rope_scaling` (transformers 4) or `rope_parameters` (transformers 5).
fn rope(
    path: &Path,
    fields: &Map<String, Value>,
    m: &mut ModelConfig,
    read: &mut Vec<&str>,
) -> Result<(), ConfigError> {
    read.extend(["rope_theta", "rope_scaling", "rope_parameters"]);
    let theta_of = |name: &str, v: &Value| {
        v.as_f64()
            .ok_or_else(|| field_error(path, name, format!("{v} is not a number")))
    };
    let mut scaling = fields.get("rope_scaling").filter(|v| !v.is_null()).cloned();
    if let Some(v) = fields.get("rope_theta").filter(|v| !v.is_null()) {
        m.rope_theta = Some(theta_of("rope_theta", v)?);
    }
    if let Some(params) = fields.get("rope_parameters").filter(|v| !v.is_null()) {
        let Value::Object(mut params) = params.clone() else {
            return Err(field_error(path, "rope_parameters", "is not a JSON object"));
        };
        if let Some(v) = params.remove("rope_theta") {
            m.rope_theta = Some(theta_of("rope_parameters.rope_theta", &v)?);
        }
        scaling = Some(Value::Object(params));
    }
    if let Some(v) = scaling {
        let r: RopeScaling =
            serde_json::from_value(v).map_err(|e| field_error(path, "rope_scaling", e))?;
        if r.rope_type != "default" {
            m.rope_scaling = Some(r);
        }
    }
    Ok(())
}

/// Where a `[model]` key was set: the config file, or the `--set` that set it.
pub struct SetKey {
    pub key: String,
    pub origin: String,
}

/// Fills `model` from `model.init_from` when it names a directory: config.json's fields replace
/// the section's, and each key in `user` (set by the user) must hold config.json's value.
/// `model.seq_len` stays the user's for the Llama family. Idempotent: a section filled once
/// agrees with config.json.
pub fn resolve(model: &mut ModelConfig, user: &[SetKey]) -> Result<(), ConfigError> {
    let Some(dir) = model.init_from.clone().filter(|p| p.is_dir()) else {
        return Ok(());
    };
    let filled = read_model_dir(&dir, model.seq_len)?;
    let theirs = effective(&filled);
    let ours = effective(model);
    for set in user {
        let name = set.key.strip_prefix("model.").unwrap_or(&set.key);
        if name == "init_from" || (name == "seq_len" && filled.arch == Arch::Llama) {
            continue;
        }
        let (mine, json) = (ours.get(name), theirs.get(name));
        if mine != json {
            let json_name = json_field(filled.arch, name);
            let shown =
                |v: Option<&toml::Value>| v.map_or("nothing".to_string(), |v| v.to_string());
            return Err(ConfigError::Key {
                origin: set.origin.clone(),
                key: set.key.clone(),
                message: format!(
                    "{} disagrees with {}, whose {json_name} gives {}: leave the key out (config.json fills [model]) or use another model",
                    shown(mine),
                    dir.join("config.json").display(),
                    shown(json),
                ),
            });
        }
    }
    *model = ModelConfig {
        init_from: Some(dir),
        ..filled
    };
    Ok(())
}

/// The `[model]` keys the user set, each with the input that set it: the file's (`file_set`:
/// the table came from a file, not the embedded default) and the `--set`s'.
pub(super) fn keys_set(
    table: &toml::Table,
    file_set: bool,
    origin: &str,
    sets: &[super::Override],
) -> Vec<SetKey> {
    let mut keys: Vec<SetKey> = Vec::new();
    for set in sets.iter().rev() {
        let named: Vec<String> = match set.path.as_slice() {
            [section, key, ..] if section == "model" => vec![key.clone()],
            [section] if section == "model" => set
                .value
                .as_table()
                .map(|t| t.keys().cloned().collect())
                .unwrap_or_default(),
            _ => Vec::new(),
        };
        for key in named {
            let key = format!("model.{key}");
            if !keys.iter().any(|k| k.key == key) {
                keys.push(SetKey {
                    key,
                    origin: format!("--set {}", set.arg),
                });
            }
        }
    }
    if let (true, Some(model)) = (file_set, table.get("model").and_then(|m| m.as_table())) {
        for key in model.keys() {
            let key = format!("model.{key}");
            if !keys.iter().any(|k| k.key == key) {
                keys.push(SetKey {
                    key,
                    origin: origin.to_string(),
                });
            }
        }
    }
    keys
}

/// config.json's name for `[model]` key `name`, in words.
fn json_field(arch: Arch, name: &str) -> String {
    let from_table = FIELDS
        .iter()
        .find(|f| f.key == name)
        .and_then(|f| match arch {
            Arch::Gpt2 => f.gpt2,
            Arch::Llama => f.llama,
        });
    match (name, from_table) {
        (_, Some(json)) => format!("`{json}`"),
        ("arch", _) => "`architectures`".into(),
        ("rope_theta" | "rope_scaling", _) => "`rope_parameters`".into(),
        _ => format!("class ({name} is fixed by `architectures`)"),
    }
}

/// `[model]` with every default made explicit, as TOML: two sections that compute the same
/// model give equal tables.
fn effective(m: &ModelConfig) -> toml::Table {
    let mut e = m.clone();
    if e.arch == Arch::Llama {
        e.n_kv_head = Some(m.kv_heads());
        e.head_dim = Some(m.head_size());
        e.rms_norm_eps = Some(m.rms_eps());
        e.rope_theta = Some(m.theta());
        e.tie_word_embeddings = Some(m.tied());
        e.attention_bias = Some(m.has_o_bias());
        e.qkv_bias = Some(m.qkv_bias.unwrap_or(false));
        e.mlp_bias = Some(m.has_mlp_bias());
        e.qk_norm = Some(m.has_qk_norm());
        e.num_experts = Some(m.num_experts.unwrap_or(1));
    }
    e.init_from = None;
    toml::Table::try_from(&e).unwrap_or_default()
}

/// The directory `init_from` names, when it names one (a model directory, not a weights file).
pub fn model_dir(m: &ModelConfig) -> Option<PathBuf> {
    m.init_from.clone().filter(|p| p.is_dir())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RopeKind;

    fn read(json: Value) -> Result<ModelConfig, String> {
        model_of(Path::new("m/config.json"), json.as_object().unwrap(), 128)
            .map_err(|e| e.to_string())
    }

    /// A transformers 4 config.json of Llama 3.2 1B (hub fields, shapes kept).
    fn llama32() -> Value {
        serde_json::json!({
            "architectures": ["LlamaForCausalLM"], "attention_bias": false, "attention_dropout": 0.0,
            "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu",
            "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 8192,
            "max_position_embeddings": 131072, "mlp_bias": false, "model_type": "llama",
            "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
            "pretraining_tp": 1, "rms_norm_eps": 1e-05,
            "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rope_theta": 500000.0, "tie_word_embeddings": true, "torch_dtype": "bfloat16",
            "transformers_version": "4.45.0.dev0", "use_cache": true, "vocab_size": 128256
        })
    }

    #[test]
    fn a_transformers_4_llama_config_fills_every_shape_and_rope_key() {
        let m = read(llama32()).unwrap();
        assert_eq!(
            (m.arch, m.n_layer, m.n_head, m.n_embd),
            (Arch::Llama, 16, 32, 2048)
        );
        assert_eq!(
            (m.kv_heads(), m.head_size(), m.intermediate()),
            (8, 64, 8192)
        );
        assert_eq!((m.vocab_size, m.seq_len, m.tied()), (128256, 128, true));
        assert_eq!(m.theta(), 500000.0);
        assert_eq!(
            m.rope_kind(),
            RopeKind::Llama3 {
                factor: 32.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_max_position_embeddings: 8192
            }
        );
        assert_eq!(m.num_params(), 1_235_814_400);
    }

    #[test]
    fn fields_strata_does_not_compute_are_refused_by_name() {
        for (field, value) in [
            ("hidden_act", serde_json::json!("gelu")),
            ("partial_rotary_factor", serde_json::json!(0.5)),
            ("attn_logit_softcapping", serde_json::json!(50.0)),
            ("layer_types", serde_json::json!(["sliding_attention"])),
        ] {
            let mut json = llama32();
            json[field] = value;
            let e = read(json).unwrap_err();
            assert!(e.contains("m/config.json") && e.contains(field), "{e}");
        }
        let mut json = llama32();
        json["architectures"] = serde_json::json!(["GemmaForCausalLM"]);
        let e = read(json).unwrap_err();
        assert!(
            e.contains("architectures") && e.contains("GemmaForCausalLM"),
            "{e}"
        );
    }

    /// What `strata export` writes for a model (`model::hf_config`) reads back as that model.
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
            let m = crate::config::Config::load(None, &sets)
                .expect("config")
                .model;
            let json = crate::model::hf_config(&m).expect("a transformers class");
            let back = read(json).expect("reads back");
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
}
