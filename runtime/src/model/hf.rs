//! The `config.json` of the transformers class that computes the model `[model]` describes, so
//! that `from_pretrained` loads an export: GPT2LMHeadModel, or for the Llama family the class
//! whose fixed features match (Qwen3ForCausalLM for per-head q/k norms, Qwen2ForCausalLM for
//! q/k/v biases, MistralForCausalLM for a sliding window, else LlamaForCausalLM).

use crate::config::{Arch, ModelConfig, RopeKind};
use serde_json::{json, Value};

/// The config.json fields (without `torch_dtype`), or why no transformers class matches.
pub fn hf_config(m: &ModelConfig) -> Result<Value, String> {
    match m.arch {
        Arch::Gpt2 => Ok(json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": m.vocab_size,
            "n_positions": m.seq_len,
            "n_ctx": m.seq_len,
            "n_embd": m.n_embd,
            "n_layer": m.n_layer,
            "n_head": m.n_head,
            "n_inner": Value::Null,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": 1e-5,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": true,
            // GPT-2's end-of-text token, or the vocabulary's last for a smaller one.
            "bos_token_id": m.vocab_size.min(50257) - 1,
            "eos_token_id": m.vocab_size.min(50257) - 1,
        })),
        Arch::Llama => llama_config(m),
    }
}

fn llama_config(m: &ModelConfig) -> Result<Value, String> {
    let qkv_only = m.has_qkv_bias() && !m.has_o_bias();
    let (class, model_type) = match (m.has_qk_norm(), qkv_only, m.sliding_window.is_some()) {
        (true, false, _) if !m.has_mlp_bias() => ("Qwen3ForCausalLM", "qwen3"),
        (false, true, _) if !m.has_mlp_bias() => ("Qwen2ForCausalLM", "qwen2"),
        (false, false, true) if !m.has_mlp_bias() && !m.has_o_bias() => {
            ("MistralForCausalLM", "mistral")
        }
        (false, false, false) => ("LlamaForCausalLM", "llama"),
        _ => {
            return Err(format!(
                "no transformers class has this combination of model.qk_norm = {}, model.qkv_bias = {}, model.attention_bias = {}, model.mlp_bias = {}, model.sliding_window = {:?}",
                m.has_qk_norm(),
                m.qkv_bias.unwrap_or(false),
                m.has_o_bias(),
                m.has_mlp_bias(),
                m.sliding_window
            ))
        }
    };
    // The base model's context, else the one llama3 scaling stretches to (transformers asks its
    // original context to lie below max_position_embeddings); never less than what was trained.
    let max_positions = match (m.max_position_embeddings, m.rope_kind()) {
        (Some(n), _) => n,
        (
            None,
            RopeKind::Llama3 {
                factor,
                original_max_position_embeddings,
                ..
            },
        ) => (original_max_position_embeddings as f64 * factor) as usize,
        (None, _) => m.seq_len,
    }
    .max(m.seq_len);
    let mut config = json!({
        "architectures": [class],
        "model_type": model_type,
        "vocab_size": m.vocab_size,
        "hidden_size": m.n_embd,
        "intermediate_size": m.intermediate(),
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.kv_heads(),
        "head_dim": m.head_size(),
        "hidden_act": "silu",
        "max_position_embeddings": max_positions,
        "rms_norm_eps": m.rms_eps(),
        "rope_theta": m.theta(),
        "rope_scaling": m.rope_scaling.as_ref().map(|r| serde_json::to_value(r).unwrap_or(Value::Null)),
        "tie_word_embeddings": m.tied(),
        "attention_dropout": 0.0,
        "bos_token_id": Value::Null,
        "eos_token_id": Value::Null,
    });
    let extra = match model_type {
        "llama" => json!({"attention_bias": m.has_o_bias(), "mlp_bias": m.has_mlp_bias()}),
        "qwen3" => json!({"attention_bias": m.has_o_bias(), "use_sliding_window": false}),
        "qwen2" => json!({"use_sliding_window": false}),
        _ => json!({"sliding_window": m.sliding_window}),
    };
    if let (Some(config), Value::Object(extra)) = (config.as_object_mut(), extra) {
        config.extend(extra);
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::hf_config;
    use crate::config::hf_dir::model_of;
    use crate::config::{Arch, ModelConfig, RopeScaling};
    use std::path::Path;

    /// Llama 3's rope scaling over an original context of 64.
    fn llama3_scaling() -> RopeScaling {
        RopeScaling {
            rope_type: "llama3".into(),
            factor: Some(8.0),
            low_freq_factor: Some(1.0),
            high_freq_factor: Some(4.0),
            original_max_position_embeddings: Some(64),
            other: Default::default(),
        }
    }

    /// config.json written for a model reads back as the same model (`model.init_from = DIR`).
    #[test]
    fn config_json_reads_back_as_the_model_it_describes() {
        let llama = ModelConfig {
            arch: Arch::Llama,
            n_kv_head: Some(2),
            intermediate_size: Some(256),
            rms_norm_eps: Some(1e-5),
            rope_theta: Some(500000.0),
            rope_scaling: Some(llama3_scaling()),
            tie_word_embeddings: Some(true),
            ..ModelConfig::default()
        };
        let models = [
            ModelConfig::default(),
            llama.clone(),
            ModelConfig {
                qkv_bias: Some(true),
                rope_scaling: None,
                ..llama.clone()
            },
            ModelConfig {
                qk_norm: Some(true),
                head_dim: Some(16),
                attention_bias: Some(true),
                rope_scaling: None,
                ..llama.clone()
            },
            ModelConfig {
                sliding_window: Some(4096),
                rope_scaling: None,
                tie_word_embeddings: Some(false),
                ..llama
            },
        ];
        for m in models {
            let json = hf_config(&m).unwrap();
            let back = model_of(
                Path::new("m/config.json"),
                json.as_object().unwrap(),
                m.seq_len,
            )
            .unwrap_or_else(|e| panic!("{json}: {e}"));
            assert_eq!(hf_config(&back).unwrap(), json);
            assert_eq!(back.shape_keys(), m.shape_keys(), "{json}");
            assert_eq!((back.rope_kind(), back.theta()), (m.rope_kind(), m.theta()));
        }
    }

    /// The context written is the base model's (a fine-tune at a shorter seq_len keeps Llama
    /// 3.1's 131072), else llama3 scaling's stretched one, never below seq_len.
    #[test]
    fn max_position_embeddings_keeps_the_base_models_context() {
        let scaled = ModelConfig {
            arch: Arch::Llama,
            seq_len: 64,
            rope_scaling: Some(llama3_scaling()),
            ..ModelConfig::default()
        };
        let context = |m: &ModelConfig| hf_config(m).unwrap()["max_position_embeddings"].clone();
        assert_eq!(context(&scaled), 512);
        let base = ModelConfig {
            max_position_embeddings: Some(131072),
            ..scaled.clone()
        };
        assert_eq!(context(&base), 131072);
        let longer = ModelConfig {
            max_position_embeddings: Some(32),
            rope_scaling: None,
            ..scaled
        };
        assert_eq!(context(&longer), 64);
    }
}
