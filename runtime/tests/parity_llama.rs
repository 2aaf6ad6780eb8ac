//! The Llama-family decoder against transformers at random initialisation, for four classes
//! (fixtures from tests/fixtures/llama/make_parity.py): `LlamaForCausalLM` (GQA, untied head,
//! rope_scaling llama3), `Qwen2ForCausalLM` (q/k/v biases, tied head, linear scaling),
//! `Qwen3ForCausalLM` (per-head q/k norms, head_dim 16 ≠ hidden/heads) and `MistralForCausalLM`
//! (one key/value head, a sliding window above seq_len). For each: logits and loss within 1e-5,
//! every gradient within 1e-4 relative, in both attention modes; the losses of 5 AdamW steps
//! within 1e-5 (warmup, cosine decay, weight decay, clipping, accumulation) and the final weights;
//! and the seam's cross-entropy on ignored (-100) targets against PyTorch's `ignore_index`.

use safetensors::SafeTensors;
use std::path::PathBuf;
use std::time::Duration;
use strata::backend::cpu::{CpuDevice, CpuOptions};
use strata::backend::{CrossEntropy, DType, Device};
use strata::data::Loader;
use strata::{Config, Engine};

const MODELS: [&str; 4] = ["llama", "qwen2", "qwen3", "mistral"];

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llama")
        .join(name)
}

struct Reference {
    bytes: Vec<u8>,
}

impl Reference {
    fn load(model: &str) -> Reference {
        let path = fixture(&format!("{model}_parity.safetensors"));
        Reference {
            bytes: std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display())),
        }
    }
    fn meta(&self, key: &str) -> serde_json::Value {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).expect("metadata");
        let meta = meta.metadata().clone().expect("metadata present");
        assert_eq!(meta.get("magic").map(String::as_str), Some("strata-parity"));
        assert_eq!(meta.get("version").map(String::as_str), Some("1"));
        serde_json::from_str(&meta[key]).expect("json")
    }
    fn f32s(&self, name: &str) -> Vec<f32> {
        let st = SafeTensors::deserialize(&self.bytes).expect("safetensors");
        let t = st
            .tensor(name)
            .unwrap_or_else(|_| panic!("fixture tensor {name}"));
        t.data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }
    fn i32s(&self, name: &str) -> Vec<i32> {
        let st = SafeTensors::deserialize(&self.bytes).expect("safetensors");
        let t = st.tensor(name).expect("fixture tensor");
        t.data()
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }
    fn tokens(&self) -> Vec<u16> {
        self.i32s("tokens").into_iter().map(|t| t as u16).collect()
    }
}

/// max |a − b| / max |b|: the error relative to the tensor's scale.
fn rel_diff(name: &str, got: &[f32], want: &[f32]) -> f64 {
    assert_eq!(got.len(), want.len(), "{name}: length");
    let max_diff = got
        .iter()
        .zip(want)
        .map(|(a, b)| (*a as f64 - *b as f64).abs())
        .fold(0.0, f64::max);
    let scale = want
        .iter()
        .map(|b| (*b as f64).abs())
        .fold(0.0, f64::max)
        .max(1e-30);
    let rel = max_diff / scale;
    println!("{name:<52} maxdiff {max_diff:.3e}  rel {rel:.3e}");
    rel
}

/// The [model] section the fixture names, the fixture's training settings, on the CPU.
fn config(model: &str, reference: &Reference, attention: &str) -> Config {
    let mut table = toml::Table::new();
    let strata: toml::Value =
        serde_json::from_value(reference.meta("strata")).expect("the [model] keys");
    let mut model_table = strata.as_table().expect("a table").clone();
    model_table.insert(
        "init_from".into(),
        fixture(&format!("{model}_weights.safetensors"))
            .display()
            .to_string()
            .into(),
    );
    table.insert("model".into(), model_table.into());
    let t = reference.meta("train");
    let text = format!(
        r#"
[data]
micro_batch_size = {micro_batch_size}
grad_accum_steps = {grad_accum_steps}
[optim]
lr = {lr}
min_lr = {min_lr}
warmup_steps = {warmup_steps}
betas = {betas}
eps = {eps}
weight_decay = {weight_decay}
grad_clip = {grad_clip}
schedule = "cosine"
[train]
steps = {steps}
device = "cpu"
attention = "{attention}"
"#,
        micro_batch_size = t["micro_batch_size"],
        grad_accum_steps = t["grad_accum_steps"],
        lr = t["lr"],
        min_lr = t["min_lr"],
        warmup_steps = t["warmup_steps"],
        betas = t["betas"],
        eps = t["eps"],
        weight_decay = t["weight_decay"],
        grad_clip = t["grad_clip"],
        steps = t["steps"],
    );
    let rest: toml::Table = toml::from_str(&text).expect("train settings");
    table.extend(rest);
    Config::from_toml_str(&toml::to_string(&table).expect("toml")).expect("parity config")
}

/// A tensor of the engine's per-unit flat buffers (padding rows dropped).
fn tensor(engine: &Engine, units: &[Vec<f32>], name: &str) -> Vec<f32> {
    for (unit, data) in engine.units().iter().zip(units) {
        for (spec, range) in unit.tensors.iter().zip(unit.ranges()) {
            if spec.name == name {
                assert!(!spec.stored_transposed);
                return data[range.start..range.start + spec.numel()].to_vec();
            }
        }
    }
    panic!("no tensor {name} in the engine")
}

fn param_names(engine: &Engine) -> Vec<String> {
    engine
        .units()
        .iter()
        .flat_map(|u| u.tensors.iter().map(|t| t.name.clone()))
        .collect()
}

#[test]
fn llama_family_matches_transformers_logits_loss_and_gradients() {
    for model in MODELS {
        for attention in ["fused", "materialized"] {
            println!("{model}, train.attention = {attention:?}");
            logits_loss_and_gradients(model, attention);
        }
    }
}

fn logits_loss_and_gradients(model: &str, attention: &str) {
    let reference = Reference::load(model);
    let cfg = config(model, &reference, attention);
    let (b, t, v) = (
        cfg.data.micro_batch_size,
        cfg.model.seq_len,
        cfg.model.vocab_size,
    );
    let mut loader = Loader::from_vec(reference.tokens(), b, t, 0, false).expect("loader");
    let mut engine = Engine::from_config(cfg).expect("engine");
    let mut batch = engine.new_batch();
    loader.fill(&mut batch).expect("batch");

    let logits = engine.logits(&batch).expect("logits");
    assert_eq!(logits.len(), b * t * v);
    let rel = rel_diff("logits", &logits, &reference.f32s("logits"));
    assert!(rel <= 1e-5, "{model}: logits differ by {rel:.3e}");

    let loss = engine
        .forward_backward(std::slice::from_ref(&batch))
        .expect("backward");
    let rel = rel_diff("loss", &[loss], &reference.f32s("loss"));
    assert!(rel <= 1e-5, "{model}: loss differs by {rel:.3e}");
    let grads = engine.grads().expect("grads");
    let mut worst = 0.0f64;
    for name in param_names(&engine) {
        let rel = rel_diff(
            &format!("grad {name}"),
            &tensor(&engine, &grads, &name),
            &reference.f32s(&format!("grad.{name}")),
        );
        worst = worst.max(rel);
    }
    assert!(
        worst <= 1e-4,
        "{model}: worst gradient relative difference {worst:.3e} exceeds 1e-4"
    );
}

#[test]
fn llama_family_matches_transformers_over_five_adamw_steps() {
    for model in MODELS {
        println!("{model}");
        five_adamw_steps(model);
    }
}

fn five_adamw_steps(model: &str) {
    let reference = Reference::load(model);
    let cfg = config(model, &reference, "fused");
    let (b, t) = (cfg.data.micro_batch_size, cfg.model.seq_len);
    let loader = || Loader::from_vec(reference.tokens(), b, t, 0, false).expect("loader");
    let mut batches: Vec<_> = (0..cfg.data.grad_accum_steps)
        .map(|_| strata::Batch::zeros(b, t))
        .collect();
    // The first step's gradient, to tell which weights AdamW moves by rounding noise.
    let first_grads = {
        let mut engine = Engine::from_config(cfg.clone()).expect("engine");
        let mut loader = loader();
        for mb in batches.iter_mut() {
            loader.fill(mb).expect("batch");
        }
        engine.forward_backward(&batches).expect("backward");
        engine.grads().expect("grads")
    };
    let mut loader = loader();
    let mut engine = Engine::from_config(cfg.clone()).expect("engine");
    let (want_loss, want_norm, want_lr) = (
        reference.f32s("step_losses"),
        reference.f32s("grad_norms"),
        reference.f32s("lrs"),
    );
    for step in 0..cfg.train.steps {
        for mb in batches.iter_mut() {
            loader.fill(mb).expect("batch");
        }
        let s = engine.train_step(&batches).expect("step");
        let loss_rel = ((s.loss - want_loss[step]) / want_loss[step]).abs();
        let norm_rel = ((s.grad_norm - want_norm[step]) / want_norm[step]).abs();
        println!(
            "step {step}: loss {:.7} (torch {:.7}, rel {loss_rel:.2e}) grad_norm {:.6} (torch {:.6}, rel {norm_rel:.2e})",
            s.loss, want_loss[step], s.grad_norm, want_norm[step]
        );
        assert!(
            loss_rel <= 1e-5,
            "{model} step {step}: loss differs by {loss_rel:.3e}"
        );
        assert!(
            norm_rel <= 1e-4,
            "{model} step {step}: grad norm differs by {norm_rel:.3e}"
        );
        assert!(((s.lr - want_lr[step]) / want_lr[step]).abs() <= 1e-6);
    }
    let params = engine.params().expect("params");
    let lr_sum: f32 = want_lr.iter().sum();
    let mut worst = 0.0f64;
    for name in param_names(&engine) {
        let (got, want) = (
            tensor(&engine, &params, &name),
            reference.f32s(&format!("final.{name}")),
        );
        // AdamW's step is lr·m̂/√v̂: a weight whose first gradient is nearly zero (below 1e-3 of
        // its tensor's largest — a key bias's components that the rotation barely turns cancel
        // in softmax, as GPT-2's key bias does exactly; an element near zero by chance) moves by
        // ±lr on rounding noise, either sign being right. Those are bounded by AdamW's largest
        // movement (lr per step), the others compared strictly.
        let g0 = tensor(&engine, &first_grads, &name);
        let max = g0.iter().fold(0.0f32, |m, g| m.max(g.abs()));
        let noisy: Vec<bool> = g0.iter().map(|g| g.abs() < 1e-3 * max).collect();
        let moved = got
            .iter()
            .zip(&want)
            .zip(&noisy)
            .filter(|(_, &n)| n)
            .map(|((a, b), _)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(
            moved <= 2.0 * lr_sum,
            "{model}: {name}'s near-zero-gradient weights moved by {moved}"
        );
        let strict = |v: &[f32]| -> Vec<f32> {
            v.iter()
                .zip(&noisy)
                .filter(|(_, &n)| !n)
                .map(|(x, _)| *x)
                .collect()
        };
        let rel = rel_diff(&format!("final {name}"), &strict(&got), &strict(&want));
        worst = worst.max(rel);
    }
    assert!(
        worst <= 1e-4,
        "{model}: final weights differ by {worst:.3e}"
    );
}

/// The seam's cross-entropy on micro-batch 0's logits with every third target -100: per-row
/// losses (0 where ignored) and the gradient of their sum, against PyTorch's.
#[test]
fn crossentropy_ignores_minus_100_targets_as_pytorch_does() {
    let dev = CpuDevice::new(&CpuOptions {
        threads: 1,
        arena_bytes: 8 << 20,
        budget_bytes: None,
        stall_timeout: Duration::from_secs(30),
    })
    .expect("cpu device");
    let dev: &dyn Device = &dev;
    for model in MODELS {
        let reference = Reference::load(model);
        let v = reference.meta("strata")["vocab_size"]
            .as_u64()
            .expect("vocab") as usize;
        let targets = reference.i32s("masked_targets");
        assert!(targets.iter().filter(|&&t| t == -100).count() > targets.len() / 4);
        let r = targets.len();
        let mark = dev.arena().mark();
        let logits = dev.arena().alloc("logits", DType::F32, r * v).unwrap();
        let losses = dev.arena().alloc("losses", DType::F32, r).unwrap();
        let tgt = dev.arena().alloc("targets", DType::I32, r).unwrap();
        dev.upload(&logits, &reference.f32s("logits")).unwrap();
        dev.upload(&tgt, &targets).unwrap();
        dev.run(CrossEntropy {
            logits: &logits,
            losses: &losses,
            targets: &tgt,
            r,
            v,
            vp: v,
            dloss: Some(1.0),
        })
        .unwrap();
        let got_losses = dev.read_f32(&losses).unwrap();
        let got_grads = dev.read_f32(&logits).unwrap();
        let want_losses = reference.f32s("masked_losses");
        for (i, &t) in targets.iter().enumerate() {
            if t < 0 {
                assert_eq!(got_losses[i], 0.0, "{model} row {i}: an ignored row's loss");
                assert!(got_grads[i * v..(i + 1) * v].iter().all(|&g| g == 0.0));
            }
        }
        assert!(rel_diff(&format!("{model} masked losses"), &got_losses, &want_losses) <= 1e-5);
        let want_grads = reference.f32s("masked_dlogits");
        assert!(rel_diff(&format!("{model} masked dlogits"), &got_grads, &want_grads) <= 1e-5);
        dev.arena().reset_to(mark).unwrap();
    }
}

/// A checkpoint of each class exports (`strata export`) with the `config.json` of its
/// transformers class, and the exported file, read back through `model.init_from`, gives the
/// same logits bit for bit.
#[test]
fn each_class_exports_to_its_transformers_class_and_loads_back() {
    let classes = [
        ("llama", "LlamaForCausalLM"),
        ("qwen2", "Qwen2ForCausalLM"),
        ("qwen3", "Qwen3ForCausalLM"),
        ("mistral", "MistralForCausalLM"),
    ];
    for (model, class) in classes {
        let dir = tempfile::tempdir().expect("tempdir");
        let reference = Reference::load(model);
        let cfg = config(model, &reference, "fused");
        let (b, t) = (cfg.data.micro_batch_size, cfg.model.seq_len);
        let mut batch = strata::Batch::zeros(b, t);
        Loader::from_vec(reference.tokens(), b, t, 0, false)
            .expect("loader")
            .fill(&mut batch)
            .expect("batch");
        let mut engine = Engine::from_config(cfg.clone()).expect("engine");
        let logits = engine.logits(&batch).expect("logits");
        let checkpoint = engine.save_checkpoint(dir.path(), 0).expect("checkpoint");
        let output = dir.path().join("export/model.safetensors");
        strata::export::run(&strata::export::ExportArgs {
            checkpoint,
            output: output.clone(),
            dtype: strata::export::ExportDtype::Fp32,
            max_shard_size: strata::weights::MAX_SHARD_BYTES_DEFAULT,
            tokenizer_from: None,
        })
        .expect("export");
        let hf: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("export/config.json")).expect("config.json"),
        )
        .expect("json");
        assert_eq!(hf["architectures"][0], class, "{model}: {hf}");
        assert_eq!(hf["num_key_value_heads"], cfg.model.kv_heads());
        assert_eq!(hf["tie_word_embeddings"], cfg.model.tied());
        let mut again = cfg.clone();
        again.model.init_from = Some(output);
        let back = Engine::from_config(again)
            .expect("engine from the export")
            .logits(&batch)
            .expect("logits");
        assert!(
            back == logits,
            "{model}: the exported weights give other logits"
        );
    }
}

/// A weights file's tensors as (name, shape, bytes).
type Tensors = Vec<(String, Vec<usize>, Vec<u8>)>;

/// `model.init_from` with a tensor missing names it; a tied model's file whose `lm_head.weight`
/// differs from the embedding is refused naming both; an equal copy is accepted.
#[test]
fn weight_files_missing_a_tensor_or_untying_a_tied_head_are_refused_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let rewrite = |model: &str, name: &str, edit: &dyn Fn(&mut Tensors)| {
        let bytes =
            std::fs::read(fixture(&format!("{model}_weights.safetensors"))).expect("weights");
        let st = SafeTensors::deserialize(&bytes).expect("safetensors");
        let mut tensors: Tensors = st
            .tensors()
            .into_iter()
            .map(|(n, v)| (n, v.shape().to_vec(), v.data().to_vec()))
            .collect();
        edit(&mut tensors);
        let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = tensors
            .iter()
            .map(|(n, shape, data)| {
                let view = safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    shape.clone(),
                    data,
                )
                .expect("view");
                (n.clone(), view)
            })
            .collect();
        let path = dir.path().join(name);
        safetensors::serialize_to_file(views, &None, &path).expect("write");
        path
    };
    let load = |model: &str, path: PathBuf| {
        let reference = Reference::load(model);
        let mut cfg = config(model, &reference, "fused");
        cfg.model.init_from = Some(path);
        Engine::from_config(cfg)
            .map(|_| ())
            .map_err(|e| e.to_string())
    };
    let missing = "model.layers.1.mlp.down_proj.weight";
    let path = rewrite("llama", "missing.safetensors", &|t| {
        t.retain(|(n, _, _)| n != missing)
    });
    let err = load("llama", path).expect_err("a tensor is missing");
    assert!(err.contains(missing) && err.contains("missing"), "{err}");
    // Qwen2's head is tied: its file carries lm_head.weight as a copy of the embedding.
    let path = rewrite("qwen2", "untied.safetensors", &|t| {
        let head = t
            .iter_mut()
            .find(|(n, _, _)| n == "lm_head.weight")
            .expect("lm_head");
        head.2[0] ^= 0x40;
    });
    let err = load("qwen2", path).expect_err("an untied copy");
    assert!(
        err.contains("lm_head.weight") && err.contains("model.embed_tokens.weight"),
        "{err}"
    );
    let path = rewrite("qwen2", "tied.safetensors", &|_| {});
    load("qwen2", path).expect("an equal copy of the tied head");
}
