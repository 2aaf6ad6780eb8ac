//! `[model]`: the architecture and its shape. Keys shared by every architecture keep GPT-2's
//! names (`n_layer`, `n_head`, `n_embd`, `vocab_size`); the Llama family's own keys mirror the
//! fields of a Hugging Face `config.json` (`intermediate_size`, `rope_theta`, `rope_scaling`,
//! `tie_word_embeddings`, …) so that a later reader of config.json maps them one to one. The
//! README's config reference says which field each key mirrors.
//!
//! This module may not ask the model (config does not depend on `model`): the parameter count
//! and the activation estimate below are closed forms, which the model's tests hold equal to the
//! model's own units and allocations.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{invalid, AttentionMode, ConfigError};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Arch {
    /// GPT-2 (transformers' GPT2LMHeadModel).
    Gpt2,
    /// The Llama family's decoder: LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM and
    /// Qwen3ForCausalLM (RMSNorm, rotary embeddings, SwiGLU, grouped-query attention).
    Llama,
}

impl Arch {
    pub fn name(self) -> &'static str {
        match self {
            Arch::Gpt2 => "gpt2",
            Arch::Llama => "llama",
        }
    }

    /// The family's name in prose (the run's first line).
    pub fn title(self) -> &'static str {
        match self {
            Arch::Gpt2 => "GPT-2",
            Arch::Llama => "Llama",
        }
    }
}

/// `model.rope_scaling` (config.json's `rope_scaling`): how rotary frequencies are stretched for
/// contexts longer than the model was trained on.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RopeScaling {
    /// "llama3" (Llama 3.1/3.2) or "linear"; "default" means none. Others ("yarn", "dynamic",
    /// "longrope") are refused.
    #[serde(alias = "type")]
    pub rope_type: String,
    /// Both types: the frequencies' divisor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// "llama3": wavelengths above original_max_position_embeddings / low_freq_factor are
    /// divided by `factor`, those below … / high_freq_factor kept, those between interpolated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// Keys of other scaling types, kept only to be named in the error.
    #[serde(flatten, skip_serializing)]
    pub other: BTreeMap<String, toml::Value>,
}

/// The rotary scaling the decoder computes, resolved from [`RopeScaling`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum RopeKind {
    Default,
    Linear {
        factor: f64,
    },
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    pub arch: Arch,
    /// config.json: `n_layer` (GPT-2), `num_hidden_layers` (Llama).
    pub n_layer: usize,
    /// `n_head`, `num_attention_heads`.
    pub n_head: usize,
    /// `n_embd`, `hidden_size`.
    pub n_embd: usize,
    pub vocab_size: usize,
    /// The training sequence length; GPT-2's `n_positions` (its position table's rows).
    pub seq_len: usize,
    /// Optional safetensors file with the model's Hugging Face tensor names to start from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub init_from: Option<PathBuf>,
    // --- the Llama family (arch = "llama"); None means the default in each key's comment ---
    /// `num_key_value_heads` (grouped-query attention); default n_head.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n_kv_head: Option<usize>,
    /// `head_dim`; default n_embd / n_head.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// `intermediate_size` of the SwiGLU MLP; required with arch = "llama".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intermediate_size: Option<usize>,
    /// `rms_norm_eps`; default 1e-6 (LlamaConfig's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rms_norm_eps: Option<f64>,
    /// `rope_theta`; default 10000.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// `rope_scaling`; default none.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeScaling>,
    /// `tie_word_embeddings`: the LM head is the token embedding; default false (GPT-2 always
    /// ties).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    /// `attention_bias` (Llama, Qwen3): biases on q, k, v and o projections; default false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Biases on q, k, v only, as Qwen2ForCausalLM always has; default false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qkv_bias: Option<bool>,
    /// `mlp_bias` (Llama): biases on the MLP's projections; default false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    /// Per-head RMSNorm of q and k before the rotation, as Qwen3ForCausalLM always has;
    /// default false.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub qk_norm: Option<bool>,
    /// `sliding_window` (Mistral): attention to the last N positions only. The decoder attends
    /// to every earlier position, which is the same while seq_len <= sliding_window; a longer
    /// seq_len is refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// `max_position_embeddings`: the context the model was made for. The math does not read it
    /// (positions are the index, up to seq_len); an export writes it into config.json (at least
    /// seq_len), so that a fine-tune keeps its base model's context. Unset: seq_len, or llama3
    /// scaling's original context × factor when larger.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_position_embeddings: Option<usize>,
    /// `num_local_experts` (Mixtral) / `num_experts` (Qwen MoE): mixture-of-experts layers are
    /// not built; any value above 1 is refused.
    #[serde(skip_serializing_if = "Option::is_none", alias = "num_local_experts")]
    pub num_experts: Option<usize>,
}

impl Default for ModelConfig {
    fn default() -> Self {
        ModelConfig {
            arch: Arch::Gpt2,
            n_layer: 4,
            n_head: 4,
            n_embd: 128,
            vocab_size: 256,
            seq_len: 128,
            init_from: None,
            n_kv_head: None,
            head_dim: None,
            intermediate_size: None,
            rms_norm_eps: None,
            rope_theta: None,
            rope_scaling: None,
            tie_word_embeddings: None,
            attention_bias: None,
            qkv_bias: None,
            mlp_bias: None,
            qk_norm: None,
            sliding_window: None,
            max_position_embeddings: None,
            num_experts: None,
        }
    }
}

/// LlamaConfig's `rms_norm_eps`.
pub const RMS_NORM_EPS_DEFAULT: f64 = 1e-6;
/// transformers' default `rope_theta`.
pub const ROPE_THETA_DEFAULT: f64 = 10_000.0;

impl ModelConfig {
    /// Key/value heads (n_head for GPT-2).
    pub fn kv_heads(&self) -> usize {
        self.n_kv_head.unwrap_or(self.n_head)
    }

    /// The attention's head size.
    pub fn head_size(&self) -> usize {
        self.head_dim.unwrap_or(self.n_embd / self.n_head.max(1))
    }

    /// Whether the LM head is the token embedding.
    pub fn tied(&self) -> bool {
        match self.arch {
            Arch::Gpt2 => true,
            Arch::Llama => self.tie_word_embeddings.unwrap_or(false),
        }
    }

    /// The SwiGLU width (0 for GPT-2).
    pub fn intermediate(&self) -> usize {
        self.intermediate_size.unwrap_or(0)
    }

    pub fn rms_eps(&self) -> f64 {
        self.rms_norm_eps.unwrap_or(RMS_NORM_EPS_DEFAULT)
    }

    pub fn theta(&self) -> f64 {
        self.rope_theta.unwrap_or(ROPE_THETA_DEFAULT)
    }

    /// Biases on q, k, v (either kind of attention bias).
    pub fn has_qkv_bias(&self) -> bool {
        self.attention_bias == Some(true) || self.qkv_bias == Some(true)
    }

    /// A bias on the output projection (Llama's `attention_bias`).
    pub fn has_o_bias(&self) -> bool {
        self.attention_bias == Some(true)
    }

    pub fn has_mlp_bias(&self) -> bool {
        self.mlp_bias == Some(true)
    }

    pub fn has_qk_norm(&self) -> bool {
        self.qk_norm == Some(true)
    }

    /// The rotary scaling, once `validate` accepted it.
    pub fn rope_kind(&self) -> RopeKind {
        let Some(r) = &self.rope_scaling else {
            return RopeKind::Default;
        };
        match r.rope_type.as_str() {
            "linear" => RopeKind::Linear {
                factor: r.factor.unwrap_or(1.0),
            },
            "llama3" => RopeKind::Llama3 {
                factor: r.factor.unwrap_or(1.0),
                low_freq_factor: r.low_freq_factor.unwrap_or(1.0),
                high_freq_factor: r.high_freq_factor.unwrap_or(4.0),
                original_max_position_embeddings: r
                    .original_max_position_embeddings
                    .unwrap_or(self.seq_len),
            },
            _ => RopeKind::Default,
        }
    }

    /// Parameters of the model this section describes (padding excluded).
    pub fn num_params(&self) -> u128 {
        let (l, c, v) = (
            self.n_layer as u128,
            self.n_embd as u128,
            self.vocab_size as u128,
        );
        match self.arch {
            Arch::Gpt2 => {
                let t = self.seq_len as u128;
                v * c + t * c + l * (12 * c * c + 13 * c) + 2 * c
            }
            Arch::Llama => {
                let (nh, nkv, hd) = (
                    self.n_head as u128,
                    self.kv_heads() as u128,
                    self.head_size() as u128,
                );
                let i = self.intermediate() as u128;
                let qkv = (nh + 2 * nkv) * hd;
                let mut layer = 2 * c + qkv * c + c * nh * hd + 3 * c * i;
                if self.has_qkv_bias() {
                    layer += qkv;
                }
                if self.has_o_bias() {
                    layer += c;
                }
                if self.has_qk_norm() {
                    layer += 2 * hd;
                }
                if self.has_mlp_bias() {
                    layer += 2 * i + c;
                }
                let head = if self.tied() { 0 } else { v * c };
                v * c + l * layer + c + head
            }
        }
    }

    /// Tensors in the model's weight files.
    pub fn num_tensors(&self) -> usize {
        match self.arch {
            Arch::Gpt2 => 12 * self.n_layer + 4,
            Arch::Llama => {
                let mut layer = 9;
                if self.has_qkv_bias() {
                    layer += 3;
                }
                if self.has_o_bias() {
                    layer += 1;
                }
                if self.has_qk_norm() {
                    layer += 2;
                }
                if self.has_mlp_bias() {
                    layer += 3;
                }
                1 + self.n_layer * layer + 1 + usize::from(!self.tied())
            }
        }
    }

    /// Floats of activations and workspaces a micro-batch of `b` sequences needs on the CPU
    /// (fp32): per block the forward's activations (one set with activation checkpointing, one
    /// per block without), the backward's scratch, the stage inputs, the head; attention scores
    /// B·heads·T·T when materialized.
    pub fn activation_floats(&self, b: usize, checkpointing: bool, mode: AttentionMode) -> u128 {
        let (l, c, h, t, b) = (
            self.n_layer as u128,
            self.n_embd as u128,
            self.n_head as u128,
            self.seq_len as u128,
            b as u128,
        );
        let sets = if checkpointing { 1 } else { l };
        let rows = b * t;
        // Attention per set of activations and the backward's scratch: the (T,T) scores when they
        // are materialized, one statistic per row (logsumexp, D) when fused.
        let attention = match mode {
            AttentionMode::Materialized => b * h * t * t,
            AttentionMode::Fused => b * h * t,
        };
        let per_token = match self.arch {
            Arch::Gpt2 => c * (15 * sets + 19 + (l + 1) + 4),
            Arch::Llama => {
                let q = h * self.head_size() as u128;
                let qkv = q + 2 * self.kv_heads() as u128 * self.head_size() as u128;
                let i = self.intermediate() as u128;
                let raw = if self.has_qk_norm() { qkv } else { 0 };
                // Acts: 3 C-wide rows, qkv (twice with q/k norms), the output, the gate|up rows
                // and their product; scratch: 2 C, the output's, qkv's (twice) and 3·I; the stage
                // inputs and the head's normed rows.
                let acts = 3 * c + qkv + raw + q + 3 * i;
                let scratch = 2 * c + q + qkv + raw + 3 * i;
                acts * sets + scratch + c * (l + 2)
            }
        };
        rows * per_token + attention * (sets + 1)
    }

    /// The keys that fix the model's shape, with their effective values: a checkpoint must
    /// agree on every one.
    pub fn shape_keys(&self) -> Vec<(&'static str, String)> {
        let mut keys = vec![
            ("model.arch", self.arch.name().to_string()),
            ("model.n_layer", self.n_layer.to_string()),
            ("model.n_head", self.n_head.to_string()),
            ("model.n_embd", self.n_embd.to_string()),
            ("model.vocab_size", self.vocab_size.to_string()),
        ];
        match self.arch {
            // GPT-2's position table has seq_len rows.
            Arch::Gpt2 => keys.push(("model.seq_len", self.seq_len.to_string())),
            Arch::Llama => keys.extend([
                ("model.n_kv_head", self.kv_heads().to_string()),
                ("model.head_dim", self.head_size().to_string()),
                ("model.intermediate_size", self.intermediate().to_string()),
                ("model.tie_word_embeddings", self.tied().to_string()),
                ("model.attention_bias", self.has_o_bias().to_string()),
                ("model.qkv_bias", self.has_qkv_bias().to_string()),
                ("model.mlp_bias", self.has_mlp_bias().to_string()),
                ("model.qk_norm", self.has_qk_norm().to_string()),
            ]),
        }
        keys
    }

    /// The section's own rules; every message names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("model.n_layer", self.n_layer),
            ("model.n_head", self.n_head),
            ("model.n_embd", self.n_embd),
            ("model.vocab_size", self.vocab_size),
            ("model.seq_len", self.seq_len),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1"));
            }
        }
        match self.arch {
            Arch::Gpt2 => self.validate_gpt2(),
            Arch::Llama => self.validate_llama(),
        }
    }

    fn validate_gpt2(&self) -> Result<(), ConfigError> {
        for (key, set) in [
            ("model.n_kv_head", self.n_kv_head.is_some()),
            ("model.head_dim", self.head_dim.is_some()),
            ("model.intermediate_size", self.intermediate_size.is_some()),
            ("model.rms_norm_eps", self.rms_norm_eps.is_some()),
            ("model.rope_theta", self.rope_theta.is_some()),
            ("model.rope_scaling", self.rope_scaling.is_some()),
            (
                "model.tie_word_embeddings",
                self.tie_word_embeddings.is_some(),
            ),
            ("model.attention_bias", self.attention_bias.is_some()),
            ("model.qkv_bias", self.qkv_bias.is_some()),
            ("model.mlp_bias", self.mlp_bias.is_some()),
            ("model.qk_norm", self.qk_norm.is_some()),
            ("model.sliding_window", self.sliding_window.is_some()),
            (
                "model.max_position_embeddings",
                self.max_position_embeddings.is_some(),
            ),
            ("model.num_experts", self.num_experts.is_some()),
        ] {
            if set {
                return Err(invalid(
                    key,
                    "belongs to arch = \"llama\"; this model is arch = \"gpt2\"",
                ));
            }
        }
        if self.n_embd % self.n_head != 0 {
            return Err(invalid(
                "model.n_embd",
                format!(
                    "{} must be a multiple of model.n_head ({})",
                    self.n_embd, self.n_head
                ),
            ));
        }
        Ok(())
    }

    fn validate_llama(&self) -> Result<(), ConfigError> {
        let (nh, nkv) = (self.n_head, self.kv_heads());
        if nkv == 0 || nh % nkv != 0 {
            return Err(invalid(
                "model.n_kv_head",
                format!("{nkv} must divide model.n_head ({nh})"),
            ));
        }
        if self.head_dim.is_none() && self.n_embd % nh != 0 {
            return Err(invalid(
                "model.n_embd",
                format!(
                    "{} must be a multiple of model.n_head ({nh}), or give model.head_dim",
                    self.n_embd
                ),
            ));
        }
        let hd = self.head_size();
        if hd == 0 || hd % 2 != 0 {
            return Err(invalid(
                "model.head_dim",
                format!("{hd} must be even and at least 2 (rotary embeddings rotate pairs)"),
            ));
        }
        if self.intermediate_size.is_none_or(|i| i == 0) {
            return Err(invalid(
                "model.intermediate_size",
                "the width of the SwiGLU MLP is required with arch = \"llama\" (config.json's intermediate_size)",
            ));
        }
        let eps = self.rms_eps();
        if !eps.is_finite() || eps <= 0.0 {
            return Err(invalid(
                "model.rms_norm_eps",
                format!("{eps} must be positive"),
            ));
        }
        let theta = self.theta();
        if !theta.is_finite() || theta <= 1.0 {
            return Err(invalid(
                "model.rope_theta",
                format!("{theta} must exceed 1"),
            ));
        }
        if self.attention_bias == Some(true) && self.qkv_bias == Some(true) {
            return Err(invalid(
                "model.qkv_bias",
                "model.attention_bias already puts biases on q, k and v (and o): set one of them",
            ));
        }
        if let Some(window) = self.sliding_window {
            if self.seq_len > window {
                return Err(invalid(
                    "model.sliding_window",
                    format!(
                        "{window}: sliding-window attention is not built, and model.seq_len = {} would reach past the window (attention over a sequence no longer than the window is the same; lower model.seq_len to at most {window})",
                        self.seq_len
                    ),
                ));
            }
        }
        if let Some(experts) = self.num_experts.filter(|&e| e > 1) {
            return Err(invalid(
                "model.num_experts",
                format!("{experts} experts: mixture-of-experts layers are not built"),
            ));
        }
        self.validate_rope_scaling()
    }

    fn validate_rope_scaling(&self) -> Result<(), ConfigError> {
        let Some(r) = &self.rope_scaling else {
            return Ok(());
        };
        let key = "model.rope_scaling.rope_type";
        let positive = |key: &'static str, v: Option<f64>| match v {
            Some(v) if !(v.is_finite() && v > 0.0) => {
                Err(invalid(key, format!("{v} must be a positive number")))
            }
            _ => Ok(()),
        };
        match r.rope_type.as_str() {
            "default" | "linear" | "llama3" => {}
            other => {
                return Err(invalid(
                    key,
                    format!("\"{other}\" is not built; the decoder computes \"llama3\" and \"linear\" scaling (or none)"),
                ))
            }
        }
        if let Some(name) = r.other.keys().next() {
            return Err(invalid(
                "model.rope_scaling",
                format!(
                    "key `{name}` does not belong to rope_type \"{}\"",
                    r.rope_type
                ),
            ));
        }
        positive("model.rope_scaling.factor", r.factor)?;
        if r.rope_type == "llama3" {
            for (key, v) in [
                ("model.rope_scaling.factor", r.factor),
                ("model.rope_scaling.low_freq_factor", r.low_freq_factor),
                ("model.rope_scaling.high_freq_factor", r.high_freq_factor),
            ] {
                positive(key, v)?;
                if v.is_none() {
                    return Err(invalid(key, "is required with rope_type \"llama3\""));
                }
            }
            if r.original_max_position_embeddings.is_none_or(|n| n == 0) {
                return Err(invalid(
                    "model.rope_scaling.original_max_position_embeddings",
                    "is required with rope_type \"llama3\" (a positive count)",
                ));
            }
            if r.high_freq_factor <= r.low_freq_factor {
                return Err(invalid(
                    "model.rope_scaling.high_freq_factor",
                    "must exceed low_freq_factor",
                ));
            }
        } else if r.rope_type == "linear" && r.factor.is_none() {
            return Err(invalid(
                "model.rope_scaling.factor",
                "is required with rope_type \"linear\"",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;

    fn load(sets: &[&str]) -> Result<Config, String> {
        let sets: Vec<String> = sets.iter().map(|s| s.to_string()).collect();
        Config::load(None, &sets).map_err(|e| e.to_string())
    }

    const LLAMA: [&str; 3] = [
        "model.arch=\"llama\"",
        "model.intermediate_size=256",
        "model.n_kv_head=2",
    ];

    #[test]
    fn a_llama_section_loads_and_what_it_does_not_build_is_refused_naming_the_key() {
        let c = load(&LLAMA).unwrap();
        assert_eq!((c.model.kv_heads(), c.model.head_size()), (2, 32));
        let with = |extra: &str| {
            let mut sets = LLAMA.to_vec();
            sets.push(extra);
            load(&sets).unwrap_err()
        };
        let e = with("model.rope_scaling={rope_type=\"yarn\", factor=4.0, beta_fast=32}");
        assert!(
            e.contains("model.rope_scaling.rope_type") && e.contains("yarn"),
            "{e}"
        );
        let e = with("model.rope_scaling={type=\"dynamic\", factor=2.0}");
        assert!(
            e.contains("model.rope_scaling.rope_type") && e.contains("dynamic"),
            "{e}"
        );
        let e = with("model.sliding_window=64");
        assert!(
            e.contains("model.sliding_window") && e.contains("64"),
            "{e}"
        );
        let e = with("model.num_local_experts=8");
        assert!(
            e.contains("model.num_experts") && e.contains("mixture"),
            "{e}"
        );
        let e = with("model.n_kv_head=3");
        assert!(e.contains("model.n_kv_head"), "{e}");
        let e = with("model.rope_scaling={rope_type=\"llama3\", factor=8.0}");
        assert!(e.contains("low_freq_factor"), "{e}");
        // A window the sequence does not reach is attention over the whole sequence.
        let mut sets = LLAMA.to_vec();
        sets.push("model.sliding_window=128");
        assert!(load(&sets).is_ok());
        let e = load(&["model.arch=\"llama\""]).unwrap_err();
        assert!(e.contains("model.intermediate_size"), "{e}");
        let e = load(&["model.rope_theta=500000.0"]).unwrap_err();
        assert!(e.contains("model.rope_theta") && e.contains("gpt2"), "{e}");
    }
}
