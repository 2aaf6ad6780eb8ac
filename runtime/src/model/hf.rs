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
    // transformers asks llama3 scaling's original context to lie within max_position_embeddings.
    let max_positions = match m.rope_kind() {
        RopeKind::Llama3 {
            original_max_position_embeddings,
            ..
        } => m.seq_len.max(original_max_position_embeddings),
        _ => m.seq_len,
    };
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
