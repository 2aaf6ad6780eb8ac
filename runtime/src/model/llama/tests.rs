//! The decoder keeps the `Model` contract in every variant: the engine's recompute gives the same
//! gradients, and every stage's backward (RMSNorm, rotary, grouped-query attention, SwiGLU, q/k
//! norms, biases, tied and untied heads) matches central finite differences of its forward.

use crate::config::Config;
use crate::testing::check_model_gradients;

fn config(sets: &[&str]) -> Config {
    let mut all = vec![
        "model.arch=\"llama\"",
        "model.n_layer=2",
        "model.n_embd=32",
        "model.n_head=4",
        "model.vocab_size=96",
        "model.seq_len=16",
        "model.intermediate_size=40",
        "data.micro_batch_size=2",
    ];
    all.extend_from_slice(sets);
    let all: Vec<String> = all.iter().map(|s| s.to_string()).collect();
    Config::load(None, &all).expect("config")
}

#[test]
fn every_variant_passes_the_gradient_check() {
    let variants: [&[&str]; 3] = [
        // Llama 3: GQA, untied head, llama3 scaling.
        &[
            "model.n_kv_head=2",
            "model.rope_scaling={rope_type=\"llama3\", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8}",
        ],
        // Qwen2: q/k/v biases, tied head, one key/value head.
        &["model.n_kv_head=1", "model.qkv_bias=true", "model.tie_word_embeddings=true"],
        // Qwen3 with Llama's biases everywhere: q/k norms, a head size of its own.
        &[
            "model.n_kv_head=2",
            "model.head_dim=16",
            "model.qk_norm=true",
            "model.attention_bias=true",
            "model.mlp_bias=true",
        ],
    ];
    for sets in variants {
        for attention in ["fused", "materialized"] {
            let mode = format!("train.attention=\"{attention}\"");
            let config = config(&[sets, &[mode.as_str()]].concat());
            let check = check_model_gradients(&config, || crate::model::build(&config.model))
                .unwrap_or_else(|e| panic!("{sets:?} {attention}: {e}"));
            println!("{sets:?} {attention}: {check:?}");
            assert_eq!(check.checkpointing_rel, 0.0, "{sets:?}");
            // embed, 2 layers of at least 7 tensors + input, head (norm, matrix) + input.
            assert!(check.elements_checked >= 4 * (1 + 2 * 8 + 3), "{check:?}");
        }
    }
}
